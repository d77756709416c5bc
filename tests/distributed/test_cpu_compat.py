"""The CPU patches for Megatron-Core: scoped to Megatron modules, idempotent, RNG forks that work, and
one call enough for a checkpoint save and load (whatever the installed megatron-core imports late)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vgpo.distributed.cpu_compat import apply_cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")


def test_megatron_sees_a_cpu_cuda_and_nothing_else_does():
    assert apply_cpu_compat() and apply_cpu_compat()  # idempotent
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.transformer.utils import get_default_causal_mask

    assert schedules.torch.zeros(2, device="cuda").device.type == "cpu"
    assert p2p_communication.torch.cuda.current_device() == "cpu"
    p2p_communication.torch.cuda.synchronize()
    assert get_default_causal_mask(3).device.type == "cpu"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()  # the real torch is untouched


def test_tied_embedding_setup_is_wrapped_once():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    apply_cpu_compat()
    setup = LanguageModule.setup_embeddings_and_output_layer
    apply_cpu_compat()
    assert LanguageModule.setup_embeddings_and_output_layer is setup and setup._cpu_compat


def test_rng_tracker_forks_the_cpu_generator(world_of_one):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    torch.manual_seed(7)
    with tracker.fork():
        inside = torch.rand(4)
    outside = torch.rand(4)
    with tracker.fork():
        inside_again = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(outside, torch.rand(4)), "a fork must not consume the default stream"
    assert not torch.equal(inside, outside) and not torch.equal(inside, inside_again)


def test_megatron_grad_clipping_runs_on_cpu_and_matches_torch():
    from megatron.core.optimizer import clip_grads, optimizer

    apply_cpu_compat()
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, ref):
        p.grad = torch.randn(p.shape, generator=gen)
        r.grad = p.grad.clone()
    total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=total)
    torch.nn.utils.clip_grad_norm_(ref, max_norm=0.5)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad)
    before = [p.grad.clone() for p in params]
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=100.0, total_norm=0.5)  # below the max: unchanged
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))


_MENTIONS_CUDA = re.compile(r"torch\.cuda\.|device=['\"]cuda|\.cuda\(\)")


def _unpatched_megatron_modules() -> list[str]:
    """Loaded ``megatron.core`` modules whose source calls CUDA but whose ``torch`` is the real one."""
    found = []
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch and path:
            if _MENTIONS_CUDA.search(Path(path).read_text(errors="replace")):
                found.append(name)
    return found


def save_and_load_after_one_apply(directory: str) -> None:
    """Run by the test below in a fresh interpreter: ``apply_cpu_compat`` once (``init_parallel``),
    then Megatron's own save and load, fully parallel strategies included (``CheckpointManager``
    uses them); prints the result as JSON."""
    from megatron_vgpo.config.schema import ParallelConfig
    from megatron_vgpo.distributed import destroy_parallel, init_parallel

    init_parallel(ParallelConfig())
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )

    saved = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    save_strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy())
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", saved)}, directory,
                            sharded_strategy=save_strategy)
    target = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4, 3))}
    load_strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(directory))
    loaded = dist_checkpointing.load(target, directory, sharded_strategy=load_strategy)["w"]
    destroy_parallel()
    print(json.dumps({"equal": torch.equal(loaded, saved), "unpatched": _unpatched_megatron_modules()}))


def test_one_apply_covers_a_checkpoint_save_and_load(tmp_path):
    """megatron-core 0.17 imports its save modules inside the save call, after ``apply_cpu_compat``
    (``filesystem_async.preload_tensors`` calls ``torch.cuda.synchronize()``): in a fresh process,
    so that no other test's later call has patched them already."""
    code = f"from tests.distributed.test_cpu_compat import save_and_load_after_one_apply as f; f({str(tmp_path)!r})"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"equal": True, "unpatched": []}, result
