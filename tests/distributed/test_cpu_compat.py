"""The CPU patches for Megatron-Core: scoped to Megatron modules, idempotent, RNG forks that work."""

from __future__ import annotations

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
