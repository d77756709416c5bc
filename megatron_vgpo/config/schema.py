"""The config tree: one typed dataclass per component, defaults only on the fields.

Every field carries a one-line ``help`` in its metadata; ``README.md``'s config reference is generated
from it (``python tools/config_reference.py``) and a test keeps the two in sync. Loading, dotted
overrides, validation and YAML dumping live in ``loader.py``; cross-field rules in ``validate.py``.

Each component receives only its own sub-config (``cfg.algorithm.vgpo`` goes to the VGPO functions,
``cfg.parallel`` to the process-group setup, ...), never the whole tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from megatron_vgpo.algorithms.vgpo import VGPOConfig
from megatron_vgpo.methods.entropy import EntropyShapingConfig
from megatron_vgpo.methods.noisy_rollout import NoisyRolloutConfig
from megatron_vgpo.methods.papo import PAPOConfig
from megatron_vgpo.methods.srpo import SRPOConfig
from megatron_vgpo.methods.vapo import VAPOConfig
from megatron_vgpo.methods.vppo import VPPOConfig


def doc(default, help: str, **kw):
    """A dataclass field with its default and its one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def sub(cls, help: str):
    """A nested sub-config field."""
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    hf_path: str = doc("", "Hugging Face Qwen2.5-VL checkpoint directory (config, tokenizer, processor, weights).")
    megatron_path: str = doc("", "Megatron dist checkpoint to initialise the policy from; empty: convert from hf_path.")
    params_dtype: Literal["float32", "bfloat16", "float16"] = doc(
        "bfloat16", "Dtype of the trained parameters (float32 on CPU for exact tests).")
    freeze_vision: bool = doc(False, "Freeze the vision tower (patch embed, blocks and merger).")
    attention_backend: Literal["auto", "te", "local"] = doc(
        "auto", "Layer spec: Transformer-Engine if importable ('auto'), or Megatron's local spec.")
    recompute_activations: bool = doc(False, "Full activation recomputation of every transformer layer.")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = doc(1, "Tensor-parallel size (TP) of the trainer.")
    pipeline_model_parallel_size: int = doc(1, "Pipeline-parallel size (PP); the vision tower sits on stage 0.")
    virtual_pipeline_model_parallel_size: Optional[int] = doc(
        None, "Model chunks per pipeline rank (interleaved schedule); null disables it.")
    first_stage_layers: Union[Literal["auto"], int, None] = doc(
        None, "Decoder layers of pipeline stage 0 (which also runs the vision tower); 'auto': the FLOP model's "
              "balanced choice (planning/flops.py); null: an even share. The other stages split the rest evenly.")
    last_stage_layers: Union[Literal["auto"], int, None] = doc(
        None, "Decoder layers of the last pipeline stage (which also runs the output layer); 'auto' or null as above.")
    sequence_parallel: bool = doc(False, "Megatron sequence parallelism (needs TP > 1).")
    backend: Literal["auto", "nccl", "gloo"] = doc("auto", "torch.distributed backend; 'auto': nccl on GPU, gloo on CPU.")
    timeout_minutes: int = doc(30, "Collective timeout in minutes.")


@dataclass
class SamplingConfig:
    temperature: float = doc(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = doc(1.0, "Nucleus sampling threshold in (0, 1].")
    top_k: int = doc(-1, "Top-k sampling; -1 disables it.")


@dataclass
class RolloutConfig:
    engine: Literal["vllm"] = doc("vllm", "Rollout engine implementation.")
    n: int = doc(8, "Responses sampled per prompt (the group size G).")
    tensor_model_parallel_size: int = doc(1, "Rollout engine TP (may differ from the trainer's).")
    max_prompt_length: int = doc(4096, "Prompt tokens at most (image tokens included); longer rows are skipped.")
    max_response_length: int = doc(2048, "Generated tokens at most per response.")
    sampling: SamplingConfig = sub(SamplingConfig, "Sampling parameters for training rollouts.")
    val_temperature: float = doc(0.0, "Sampling temperature for validation (0 = greedy).")
    gpu_memory_utilization: float = doc(0.6, "Fraction of GPU memory vLLM may take (GPU only).")
    kv_cache_memory_bytes: Optional[int] = doc(
        None, "KV cache size in bytes; required on CPU, where vLLM cannot size it from the device.")
    enable_sleep_mode: bool = doc(True, "Free KV cache and weights during training (GPU only; ignored on CPU).")
    sleep_level: Literal[1, 2] = doc(2, "vLLM sleep level while training: 1 keeps a host copy of the weights, 2 discards them "
                              "(the weight sync rewrites every weight; buffers are kept).")
    enforce_eager: bool = doc(False, "Disable CUDA graphs in the engine.")
    weight_sync_bucket_mb: int = doc(512, "Bucket size in MiB for streaming resharded weights into the engine.")
    seed: int = doc(1, "Base seed of the rollout sampler.")


@dataclass
class OverlongConfig:
    enable: bool = doc(False, "DAPO soft overlong punishment.")
    buffer_length: int = doc(512, "Length of the soft-punishment buffer before max_response_length.")
    penalty_factor: float = doc(1.0, "Penalty at max_response_length (linear ramp over the buffer).")


@dataclass
class DynamicSamplingConfig:
    enable: bool = doc(True, "DAPO dynamic sampling: drop groups whose rewards are all equal, refill.")
    max_batches: int = doc(4, "Rollout batches sampled at most per step while refilling.")
    metric: Literal["accuracy", "reward"] = doc(
        "accuracy", "What must differ within a group for it to be kept: the accuracy (DAPO) or the total reward "
                    "(VAPO: all-correct groups whose perception scores differ still train).")


@dataclass
class AlgorithmConfig:
    advantage_estimator: Literal["grpo", "drgrpo"] = doc(
        "grpo", "Outcome advantage: 'grpo' (r - mean) / (std + eps); 'drgrpo' r - mean (no std scaling).")
    shapers: list = doc(["vgpo"], "Advantage shapers applied in order (vgpo, entropy, vppo, srpo; methods/); [] is plain DAPO.")
    loss_terms: list = doc([], "Extra policy-loss terms (papo; methods/); each term's section below configures it.")
    rollout_methods: list = doc([], "Rollout-side methods (vapo: perception reward; noisy_rollout: n more responses "
                                    "per prompt on a noisy image, same group; methods/).")
    clip_ratio_low: float = doc(0.2, "PPO clip eps_low: ratio >= 1 - eps_low.")
    clip_ratio_high: float = doc(0.28, "PPO clip-higher eps_high: ratio <= 1 + eps_high.")
    clip_ratio_c: Optional[float] = doc(3.0, "Dual-clip bound c (> 1) for negative advantages; null disables it.")
    kl_coef: float = doc(0.0, "Coefficient of the low-variance (k3) KL to the reference policy; 0 disables it.")
    entropy_coef: float = doc(0.0, "Entropy bonus coefficient; 0 disables it.")
    adv_eps: float = doc(1e-6, "eps in the GRPO std normalisation.")
    ppo_epochs: int = doc(1, "Passes over each rollout batch.")
    hidden_states_from: Literal["old", "current"] = doc(
        "old", "Shapers' statistics (VGPO's focus scores, entropy) from the pi_old pass, or the current policy "
               "per update micro-batch (group-aligned micro-batches: micro_batch_size a multiple of rollout.n).")
    dynamic_sampling: DynamicSamplingConfig = sub(DynamicSamplingConfig, "DAPO dynamic sampling.")
    overlong: OverlongConfig = sub(OverlongConfig, "DAPO soft overlong penalty.")
    vgpo: VGPOConfig = sub(VGPOConfig, "VGPO shaping hyper-parameters (VGPO_SPEC.md).")
    entropy: EntropyShapingConfig = sub(EntropyShapingConfig, "Entropy-based advantage shaping (METHODS_SPEC 1).")
    vppo: VPPOConfig = sub(VPPOConfig, "VPPO: token filtering, trajectory scaling, entropy penalty (METHODS_SPEC 2).")
    papo: PAPOConfig = sub(PAPOConfig, "PAPO's implicit perception loss (METHODS_SPEC 3).")
    vapo: VAPOConfig = sub(VAPOConfig, "VAPO's perception reward from probes at anchor points (METHODS_SPEC 4).")
    noisy_rollout: NoisyRolloutConfig = sub(NoisyRolloutConfig, "NoisyRollout's noise schedule (METHODS_SPEC 5).")
    srpo: SRPOConfig = sub(SRPOConfig, "[provisional] SRPO role-aware token weights (METHODS_SPEC 6; the paper's "
                                       "equations are not public: every field is our choice).")


@dataclass
class OptimizerConfig:
    name: Literal["adam"] = doc("adam", "Optimizer (Megatron's; distributed optimizer on GPU).")
    lr: float = doc(1e-6, "Peak learning rate.")
    min_lr: float = doc(0.0, "Learning rate at the end of the decay.")
    weight_decay: float = doc(0.01, "Decoupled weight decay.")
    adam_beta1: float = doc(0.9, "Adam beta1.")
    adam_beta2: float = doc(0.999, "Adam beta2.")
    adam_eps: float = doc(1e-8, "Adam epsilon.")
    clip_grad: float = doc(1.0, "Global gradient-norm clipping; 0 disables it.")
    lr_warmup_steps: int = doc(0, "Linear warmup, in trainer (RL) steps; the schedule itself advances per optimizer step.")
    lr_decay_style: Literal["constant", "linear", "cosine"] = doc(
        "constant", "Decay after warmup, reaching min_lr at the run's last optimizer step.")
    use_distributed_optimizer: bool = doc(True, "Shard optimizer states over DP (GPU only; plain optimizer on CPU).")
    offload_during_rollout: bool = doc(
        False, "Move optimizer states (fp32 master weights, Adam moments) and gradient buffers to host memory while "
               "the rollout engine runs, and back for the update (frees GPU memory for the KV cache).")
    max_consecutive_nonfinite: int = doc(
        3, "An optimizer step whose gradients hold NaN/inf is skipped (weights unchanged); this many in a row stop the run.")


@dataclass
class DataConfig:
    train_files: list = doc([], "Training files (parquet, json or jsonl) in the EasyR1/verl schema.")
    val_files: list = doc([], "Validation files; accuracy is reported per file.")
    prompt_key: str = doc("problem", "Column with the question, one literal <image> per image.")
    answer_key: str = doc("answer", "Column with the ground-truth answer (a string).")
    image_key: str = doc("images", "Column with the list of images ({'bytes', 'path'} structs, bytes or paths).")
    image_dir: str = doc("", "Directory relative image paths are resolved against.")
    parts_key: str = doc("parts", "Optional column of a multi-part row's parts (JSON [{name, count}], the synthetic multicount task): validation reports each part position's accuracy, the format warm-up teaches their layout.")
    claim_key: str = doc("claim_{i}", "Columns of claims about a row's image (VAPO's probes): '{i}' = 1, 2, ... up to the first absent or empty one; optional.")
    claim_label_key: str = doc("label_{i}", "Column of claim i's label (claim_true_label or claim_false_label).")
    claim_true_label: str = doc("CORRECT", "Label of a true claim.")
    claim_false_label: str = doc("WRONG", "Label of a false claim.")
    min_pixels: int = doc(262144, "Images are resized to have at least this many pixels.")
    max_pixels: int = doc(4194304, "Images are resized to have at most this many pixels.")
    rollout_batch_size: int = doc(512, "Prompts per rollout batch.")
    val_batch_size: int = doc(1024, "Prompts per validation batch; -1: the whole validation set.")
    shuffle: bool = doc(True, "Shuffle the training set each epoch.")
    seed: int = doc(1, "Seed of the data order.")
    scan_cache: bool = doc(True, "Cache each file's scan (usable rows, prompt lengths, image sizes): rank 0 scans once, other ranks and later starts reuse it.")
    scan_cache_dir: str = doc("", "Directory of the scan caches; empty: beside each data file (set it for read-only data).")

    def __post_init__(self):
        for name in ("claim_key", "claim_label_key"):
            if "{i}" not in getattr(self, name):
                raise ValueError(f"{name}: {getattr(self, name)!r} must contain '{{i}}' (the claim's number)")
        if self.claim_true_label == self.claim_false_label:
            raise ValueError(f"claim_true_label and claim_false_label are both {self.claim_true_label!r}")


@dataclass
class RewardConfig:
    grader: Literal["mathruler", "math_verify", "lookback"] = doc(
        "mathruler", "Grader of the last \\boxed{} answer (lookback: the VGPO paper's evaluation grader).")
    format_weight: float = doc(0.0, "Weight of the format reward (<think>...</think> then \\boxed{}); 0 disables it.")
    parts_must_sum: bool = doc(
        False, "Multi-part rows (data.parts_key): the accuracy reward also needs the boxed total to be the sum of the "
        "counts the response reads, so the reads carry the answer (rewards/parts.py sums_its_parts).")
    timeout_s: float = doc(5.0, "Wall-clock limit per grading call; a timeout scores 0.")
    num_workers: int = doc(2, "Grading worker processes per rank when auto_workers is false (every rank grades a share of each batch).")
    auto_workers: bool = doc(True, "Size each rank's grading pool to its node: max(1, CPUs // ranks on the node // 2) workers.")
    custom_fn: str = doc("", "User reward as 'module:function'; replaces the accuracy grader when set.")


@dataclass
class CheckpointConfig:
    save_dir: str = doc("checkpoints", "Directory of step checkpoints; `latest` names the newest complete one.")
    save_interval: int = doc(50, "Save every k steps; 0 saves only at the end.")
    keep_last: int = doc(2, "Complete checkpoints kept; older ones are removed.")
    resume: bool = doc(True, "Resume from save_dir's latest checkpoint that passes its check (a damaged one is named and the previous one tried).")
    load_step: int = doc(-1, "Resume from this step's checkpoint instead (no fallback; newer ones are removed at the next save); -1: the latest.")
    async_save: bool | Literal["auto"] = doc(
        "auto", "Write model/optimizer shards in the background (megatron-core async save); 'auto': on GPU only.")

    def __post_init__(self):
        if self.load_step < -1:
            raise ValueError(f"load_step: {self.load_step} is not a step (-1 resumes from the latest checkpoint)")


@dataclass
class LoggingConfig:
    tensorboard_dir: str = doc("runs", "TensorBoard log directory; the resolved config is saved beside it.")
    run_name: str = doc("vgpo", "Run name (sub-directory of tensorboard_dir).")
    log_interval: int = doc(1, "Log every k steps.")
    progress_bar: bool = doc(True, "Console progress bar with step, ETA and reward.")


@dataclass
class FormatWarmupConfig:
    steps: int = doc(0, "Supervised format warm-up steps before RL (targets '<think> </think> \\boxed{X}', X random); 0 disables it.")
    batch_size: int = doc(32, "Prompts per warm-up step (each data-parallel rank trains on its share).")
    lr: float = doc(1.0e-3, "Learning rate of the warm-up steps (the RL schedule is not stepped).")


@dataclass
class TrainerConfig:
    total_steps: int = doc(150, "Optimisation steps (each: rollout, update, weight sync).")
    global_batch_size: int = doc(128, "Prompts per PPO mini-batch (x rollout.n responses).")
    micro_batch_size: int = doc(1, "Responses per micro-batch in the Megatron pipeline.")
    val_interval: int = doc(10, "Validate every k steps (and before the first); 0 disables validation.")
    val_before_train: bool = doc(True, "Validate before the first step.")
    seed: int = doc(42, "Global seed (model init, dropout, sampling).")
    device: Literal["auto", "cuda", "cpu"] = doc("auto", "Device; 'auto': cuda if available.")
    stop_signals: list = doc(["SIGTERM", "SIGUSR1"], "Signals that make the run finish its step, save a checkpoint "
                                                      "and exit 0 (as does a STOP file in checkpoint.save_dir).")
    format_warmup: FormatWarmupConfig = sub(FormatWarmupConfig, "Answer-format warm-up for a policy that never writes \\boxed{} (tiny random models).")


@dataclass
class Config:
    """The whole run. `python -m megatron_vgpo.train --config FILE key.sub=value ...`."""

    model: ModelConfig = sub(ModelConfig, "The policy model.")
    parallel: ParallelConfig = sub(ParallelConfig, "Trainer parallelism; DP = world_size / (TP x PP).")
    rollout: RolloutConfig = sub(RolloutConfig, "The rollout engine and sampling.")
    algorithm: AlgorithmConfig = sub(AlgorithmConfig, "Advantages, policy loss and VGPO shaping.")
    optimizer: OptimizerConfig = sub(OptimizerConfig, "Optimizer and learning-rate schedule.")
    data: DataConfig = sub(DataConfig, "Datasets and prompts.")
    reward: RewardConfig = sub(RewardConfig, "Reward functions.")
    checkpoint: CheckpointConfig = sub(CheckpointConfig, "Checkpointing and resume.")
    logging: LoggingConfig = sub(LoggingConfig, "TensorBoard and console logging.")
    trainer: TrainerConfig = sub(TrainerConfig, "The training loop.")
