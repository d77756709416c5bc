"""Colocation: the order in which a step hands the devices between the rollout engine and the trainer,
checked on the real loop (tiny model, world of one) with a recording engine; and the optimizer-state
offload round trip, bit-exact on the CPU.

Per step: generate -> engine.sleep(rollout.sleep_level) -> log-prob pass -> optimizer states onloaded
-> update -> offloaded -> allocator cache emptied -> wake_up(["weights"]) -> update_weights ->
wake_up(["kv_cache"]). On a CPU the sleep, the wake-ups and the cache emptying are no-ops in the real
engine and allocator; the order is what is tested here.
"""

from __future__ import annotations

import torch

from megatron_vgpo.config import load_config
from megatron_vgpo.config.schema import AlgorithmConfig, ModelConfig, OptimizerConfig
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.rollout.types import RolloutBatch
from megatron_vgpo.training.actor import Actor
from tests.conftest import REPO, tiny_hf_config, tiny_hf_model
from tests.training.test_format_warmup import parity_experience


class RecordingEngine:
    """A ``RolloutEngine`` that answers every prompt with ``response`` and records every call."""

    def __init__(self, events: list, response: list[int]):
        self.events, self.response = events, response

    def generate(self, requests, sampling):
        self.events.append("generate")
        n = len(requests) * sampling.n
        return RolloutBatch([i for i in range(len(requests)) for _ in range(sampling.n)],
                            [r.prompt_token_ids for r in requests for _ in range(sampling.n)],
                            [list(self.response)] * n, [[-0.5] * len(self.response)] * n, ["stop"] * n)

    def update_weights(self, weights):
        self.events.append(f"update_weights({sum(1 for _ in weights)} tensors)")

    def reset_caches(self):
        self.events.append("reset_caches")

    def sleep(self, level: int = 1):
        self.events.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.events.append(f"wake_up({','.join(tags) if tags else 'all'})")

    def shutdown(self):
        pass


def test_call_order_of_a_colocated_step(tmp_path, monkeypatch):
    from megatron_vgpo.data.synthetic import write_synthetic_dataset
    from megatron_vgpo.distributed import destroy_parallel
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, load_processor, write_tiny_checkpoint
    from megatron_vgpo.trainer import Trainer
    from megatron_vgpo.training import actor as actor_module
    from megatron_vgpo.training import rollout as rollout_module

    model = write_tiny_checkpoint(tmp_path / "tiny", TinyOptions(seed=0))
    write_synthetic_dataset(tmp_path / "data", train=8, val=4, seed=0)
    cfg = load_config(REPO / "examples" / "configs" / "cpu_tiny.yaml", [
        f"model.hf_path={model}", f"data.train_files=[{tmp_path / 'data' / 'train.parquet'}]", "data.val_files=[]",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=0",
        f"logging.tensorboard_dir={tmp_path / 'runs'}", "logging.progress_bar=false", "trainer.total_steps=2",
        "trainer.val_interval=0", "trainer.val_before_train=false", "trainer.format_warmup.steps=0",
        "data.rollout_batch_size=2", "trainer.global_batch_size=2", "trainer.micro_batch_size=2", "rollout.n=2",
        "algorithm.dynamic_sampling.enable=false", "optimizer.offload_during_rollout=true", "rollout.sleep_level=2"])
    events: list[str] = []
    tokenizer = load_processor(model).tokenizer
    response = tokenizer.encode("<think> </think> \\boxed{1}", add_special_tokens=False) + [tokenizer.eos_token_id]
    monkeypatch.setattr(rollout_module, "empty_cache", lambda: events.append("empty_cache"))
    for name in ("offload", "onload"):
        original = getattr(actor_module.OptimizerOffloader, name)

        def recorded(self, _original=original, _name=name):
            events.append(f"{_name}{'' if self.offloaded == (_name == 'onload') else ' (no-op)'}")
            _original(self)
        monkeypatch.setattr(actor_module.OptimizerOffloader, name, recorded)
    try:
        trainer = Trainer.from_config(cfg, engine=RecordingEngine(events, response))
        original_pass = trainer.actor.forward_statistics
        trainer.actor.forward_statistics = lambda *a, **k: (events.append("logprobs"), original_pass(*a, **k))[1]
        trainer.train()
    finally:
        destroy_parallel()
    n_tensors = events[events.index("wake_up(weights)") + 1]
    assert n_tensors.startswith("update_weights(") and int(n_tensors[15:].split()[0]) > 10
    sync = ["empty_cache", "wake_up(weights)", n_tensors, "wake_up(kv_cache)"]
    step = ["generate", "sleep(2)", "logprobs", "onload", "offload", *sync]
    start = events.index("generate")
    # Before: the optimizer state leaves the device at once and the engine gets the weights; resume
    # (nothing to resume) brings the state on and off again.
    assert events[:start] == ["offload", *sync, "onload", "offload"], events[:start]
    # After the last step the final checkpoint onloads the optimizer state to save it, then offloads.
    assert events[start:] == step + step + ["onload", "offload"], events[start:]


def tiny_actor(world_of_one, offload: bool) -> Actor:
    hf_model = tiny_hf_model(tiny_hf_config(), seed=11)
    chunks = build_policy(hf_model.config, ModelConfig(params_dtype="float32"), world_of_one)
    load_hf_weights(chunks, hf_model.state_dict().items())
    return Actor(chunks, world_of_one, OptimizerConfig(lr=1e-3, use_distributed_optimizer=False,
                                                       offload_during_rollout=offload), micro_batch_size=2,
                 total_steps=10)


def train_steps(actor: Actor, steps: int) -> None:
    exp = parity_experience(actor.chunks[0].hf_config)
    for _ in range(steps):
        exp.old_logprobs, _ = actor.forward_statistics(exp)
        exp.advantages = torch.linspace(-1, 1, exp.input_ids.numel()).view_as(exp.input_ids) * exp.response_mask
        exp.loss_mask, exp.outcome = exp.response_mask, torch.zeros(len(exp))
        actor.update(exp, [[0, 1], [2]], AlgorithmConfig())


def optimizer_state(actor: Actor) -> dict:
    from megatron_vgpo.training.offload import _torch_optimizers

    return {(i, k): v.clone() for opt in _torch_optimizers(actor.optimizer) for i, state in
            enumerate(opt.state.values()) for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_offload_round_trip_is_bit_exact_and_training_continues_identically(world_of_one):
    reference = tiny_actor(world_of_one, offload=False)
    offloading = tiny_actor(world_of_one, offload=True)
    train_steps(reference, 2)
    train_steps(offloading, 2)  # each update: onload, steps, offload
    assert offloading.offloader.offloaded
    moved = offloading.offloader._tensors()
    assert moved and all(t.device.type == "cpu" for t in moved)
    assert all(b.grad_data.untyped_storage().size() == 0 for m in offloading.model for b in m.buffers)  # freed
    before = optimizer_state(reference)
    offloading.onload()
    after = optimizer_state(offloading)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(b.grad_data.untyped_storage().size() > 0 for m in offloading.model for b in m.buffers)
    train_steps(reference, 1)
    train_steps(offloading, 1)
    for (name, p), (_, q) in zip(reference.chunks[0].named_parameters(), offloading.chunks[0].named_parameters()):
        assert torch.equal(p, q), name
