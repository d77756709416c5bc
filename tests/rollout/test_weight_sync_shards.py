"""Shard-to-shard weight sync (``rollout/weight_sync.py``, rollout TP = trainer TP).

Per TP rank, the pieces cut from a Megatron shard (or a replicated / gathered full tensor) equal
vLLM's region of the golden full HF tensors, for every parameter kind; the vocabulary rows line up
exactly when both paddings agree. Under torchrun (``shard_sync_worker.py``, TP2 x PP2, gloo): the
engine stream against the checkpoint, the bytes each rank moves against the formula, the fallback to
full tensors for rollout TP1, and (with vLLM) an engine TP2 filled shard to shard holds bit-identical
weights to one filled with full tensors, and generates the same.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig

from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf, padded_vocab_size
from megatron_vgpo.models.qwen2_5_vl.loading import iter_safetensors
from megatron_vgpo.rollout.shard_sync import VLLM_VOCAB_PADDING, engine_pieces, vllm_region, vocab_aligned
from megatron_vgpo.rollout.weight_sync import WeightResharder
from tests.rollout.conftest import requires_vllm


def golden_and_pieces(arch, name: str, full: torch.Tensor, rank: int):
    """``(golden HF tensors, this rank's pieces)`` of one full Megatron tensor, cut as the sync does."""
    golden = dict(nm.megatron_to_hf([(name, full)], arch))
    partitioned = nm.tp_partition(name)[0] is not None
    shard_ok = partitioned and (name not in (nm.EMBEDDING, nm.OUTPUT) or vocab_aligned(arch))
    source = nm.shard(name, full, rank, arch.tp_size) if shard_ok else full
    return golden, engine_pieces(name, source, arch, rank, whole=not shard_ok)


def test_pieces_equal_vllm_regions_of_the_golden_tensors(tiny_vl_dir):
    """Every tensor of the tiny model at TP2, both ranks: q/k/v from whole query groups, gate/up from
    the stride-2 shard, row-parallel dim-1 slices, the vision tower (replicated in Megatron, split by
    vLLM, its fused q/k/v in three blocks) and the unaligned vocabulary (1025 rows: gathered)."""
    arch = arch_from_hf(AutoConfig.from_pretrained(tiny_vl_dir), tp_size=2)
    assert not vocab_aligned(arch)
    kinds = set()
    for name, full in nm.hf_to_megatron(iter_safetensors(tiny_vl_dir), arch):
        for rank in range(2):
            golden, pieces = golden_and_pieces(arch, name, full, rank)
            assert [n for n, _ in pieces] == list(golden)
            for hf, piece in pieces:
                region = vllm_region(hf, tuple(golden[hf].shape), rank, 2)
                kinds.add((region.dim, len(region.ranges)))
                assert torch.equal(piece, region.of(golden[hf])), (name, hf, rank)
                assert tuple(piece.shape) == region.shape(tuple(golden[hf].shape))
    assert kinds == {(None, 0), (0, 1), (1, 1), (0, 3)}


@pytest.mark.parametrize("vocab,tp,aligned", [(1024, 2, True), (1088, 4, True), (1020, 8, True),
                                               (1025, 2, False), (1000, 4, False)])
def test_vocabulary_rows(tiny_vl_dir, vocab, tp, aligned):
    """Aligned vocabularies take the shard's first rows (1020 at TP8: Megatron's 4 padding rows at the
    end of the last shard are dropped); unaligned ones are cut from the gathered tensor; either way
    vLLM's rows of the real vocabulary, every row once."""
    arch = arch_from_hf(AutoConfig.from_pretrained(tiny_vl_dir), tp_size=2)
    arch = dataclasses.replace(arch, tp_size=tp, vocab_size=vocab, padded_vocab_size=padded_vocab_size(vocab, tp))
    assert vocab_aligned(arch) == aligned
    full = torch.randn(arch.padded_vocab_size, 8)
    full[vocab:] = float("nan")  # Megatron's padding rows must never reach the engine
    rows = []
    for rank in range(tp):
        golden, pieces = golden_and_pieces(arch, nm.EMBEDDING, full, rank)
        [(hf, piece)] = pieces
        assert torch.equal(piece, vllm_region(hf, (vocab, 8), rank, tp).of(golden[hf]))
        rows.append(piece)
    assert torch.equal(torch.cat(rows), full[:vocab])


def test_released_vocabularies_line_up():
    from megatron_vgpo.models.qwen2_5_vl.config import QwenVLArch

    fields = {f.name: 1 for f in dataclasses.fields(QwenVLArch)}
    for vocab in (151936, 152064):
        for tp in (2, 4, 8):
            arch = QwenVLArch(**{**fields, "vocab_size": vocab, "padded_vocab_size": padded_vocab_size(vocab, tp),
                                 "tp_size": tp})
            assert vocab_aligned(arch), (vocab, tp)


@requires_vllm
def test_vocab_padding_is_vllms():
    from vllm.model_executor.layers.vocab_parallel_embedding import DEFAULT_VOCAB_PADDING_SIZE

    assert VLLM_VOCAB_PADDING == DEFAULT_VOCAB_PADDING_SIZE


def test_path_choice_in_a_world_of_one(tiny_vl_dir, world_of_one, caplog):
    """TP1 trainer: rollout TP1 goes shard to shard (nothing moves: the pieces are the parameters'
    HF tensors), rollout TP2 or none falls back to full tensors; each choice is logged."""
    from tests.rollout.test_weight_sync import policy

    chunks = policy(tiny_vl_dir, world_of_one)
    with caplog.at_level("INFO", logger="megatron_vgpo.rollout.weight_sync"):
        shard = WeightResharder(chunks, world_of_one, bucket_bytes=64 << 10, rollout_tp=1)
        full = WeightResharder(chunks, world_of_one, bucket_bytes=64 << 10, rollout_tp=2)
        default = WeightResharder(chunks, world_of_one, bucket_bytes=64 << 10)
    assert shard.shards is not None and full.shards is None and default.shards is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("shard to shard (rollout TP 1 = trainer TP 1)" in m for m in messages)
    assert any("full tensors to every rank (rollout TP 2 != trainer TP 1)" in m for m in messages)
    assert any("full tensors to every rank (rollout TP not given)" in m for m in messages)
    ref = {n: t.clone() for n, t in default.hf_weights()}
    got = {n: t.clone() for n, t in shard.engine_weights()}
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert (shard.traffic.sent, shard.traffic.received) == (0, 0)


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_pp2_shard_stream_bytes_and_fallback(tp2_pp2_results):
    """Without vLLM: every rank's engine stream holds vLLM's regions of the checkpoint's tensors; it
    receives the formula's bytes (its pieces of the other stage's parameters, plus the gathered
    vocabulary's TP share on its own stage), about 1/TP of the full path's; rollout TP1 falls back
    to full tensors."""
    for rank, got in enumerate(r["stream"] for r in tp2_pp2_results):
        assert got["paths"] == {"rollout_tp2": "shard", "rollout_tp1": "full"}, rank
        assert got["regions_exact"] and got["names_complete"], rank
        assert got["fallback_equals_full"], rank
        for path in ("shard", "full"):
            assert got[path]["received"] == got[path]["formula_received"], (rank, path, got[path])
            assert got[path]["sent"] == got[path]["formula_sent"], (rank, path, got[path])
        # About 1/TP of the full path's (norms and row-parallel biases travel whole).
        assert got["shard"]["received"] < 0.6 * got["full"]["received"], rank


@pytest.mark.vllm
@pytest.mark.distributed
@pytest.mark.slow
@requires_vllm
def test_tp2_pp2_to_vllm_tp2_bit_identical_to_full_path(tp2_pp2_results, tiny_vl_dir, processor):
    """A dummy-weight vLLM TP2 engine filled shard to shard, then refilled with full tensors: every
    engine tensor identical, on every rank, and the same greedy tokens (those of Hugging Face)."""
    from megatron_vgpo.rollout.vllm_engine import VISION_SPECIAL_TOKENS
    from tests.rollout.conftest import load_hf_model
    from tests.rollout.test_vllm_distributed import hf_references

    ranks = [r["engine"] for r in tp2_pp2_results]
    banned = processor.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
    tokens, _, _ = hf_references(load_hf_model(tiny_vl_dir), processor, banned)
    for rank, got in enumerate(ranks):
        assert got["engine_tensors"] > 50, rank
        assert got["engine_mismatch"] == [], (rank, got["engine_mismatch"])
        assert got["changed_from_dummy"], rank
        assert got["greedy_shard"] == got["greedy_full"] == tokens, rank
    print(f"{ranks[0]['engine_tensors']} engine tensors identical on each of 4 ranks; shard sync "
          f"{ranks[0]['seconds_shard']:.2f} s, full sync {ranks[0]['seconds_full']:.2f} s (rank 0, incl. vLLM reload)")
