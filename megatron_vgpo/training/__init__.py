"""Training infrastructure the trainer (``megatron_vgpo/trainer.py``) builds on: atomic, resumable
checkpoints (``checkpointing``) and TensorBoard / console metrics, step timers and throughput
(``logging``)."""
