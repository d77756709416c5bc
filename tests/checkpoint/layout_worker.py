"""torchrun worker of ``test_layouts.py``: one converted checkpoint, loaded under several TP x PP layouts.

    torchrun --nproc-per-node 4 layout_worker.py --out DIR HF_DIR:MEGATRON_DIR [HF_DIR:MEGATRON_DIR ...]

For each layout (TP2 x PP2 first, then TP1, TP2, PP2; extra ranks are DP replicas) and each pair:
1. load ``HF_DIR`` through the model's own HF loader (``load_hf_weights``) and keep a copy of
   every parameter of this rank;
2. zero the parameters and load the converted ``MEGATRON_DIR`` with ``dist_checkpointing``;
   every parameter must be bit-identical to step 1 (counted, all-reduced, printed);
3. run the parity batch forward (two micro-batches through the pipeline schedule) and save the
   last stage's log-probs and hidden states to ``DIR/out_<pair>_tp<T>pp<P>.pt`` for the test to
   compare across layouts.
Under TP2 x PP2 the HF-loaded model is also saved by Megatron itself (``dist_checkpointing.save``)
to ``DIR/megatron_saved_<pair>``; the TP1 pass then loads that checkpoint too and compares.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig

from megatron_vgpo.checkpoint.model_io import load_model_checkpoint, save_model_checkpoint
from megatron_vgpo.config.schema import ModelConfig, ParallelConfig
from megatron_vgpo.distributed import destroy_parallel, init_parallel
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.parity import fixed_multimodal_batch, micro_batches
from megatron_vgpo.models.qwen2_5_vl.pipeline import PolicyBatch, run_pipeline

LAYOUTS = ((2, 2), (1, 1), (2, 1), (1, 2))


def snapshot(chunks) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()}


def mismatches(chunks, reference: dict[str, torch.Tensor]) -> list[str]:
    now = snapshot(chunks)
    return [n for n in reference if not torch.equal(now[n], reference[n])]


@torch.no_grad()
def zero_(chunks) -> None:
    for chunk in chunks:
        for p in chunk.parameters():
            p.zero_()


@torch.no_grad()
def forward(chunks, hf_config):
    def keep(_, out):
        return out.logprobs.sum() * 0, torch.tensor(1), (out.logprobs, out.hidden_states)

    batches = [PolicyBatch(b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw)
               for b in micro_batches(fixed_multimodal_batch(hf_config))]
    for chunk in chunks:
        chunk.eval()
    return run_pipeline(chunks, batches, keep, forward_only=True)


def check_pair(name: str, hf_dir: str, meg_dir: str, out: Path, groups, tp: int, pp: int) -> None:
    hf_config = AutoConfig.from_pretrained(hf_dir)
    chunks = build_policy(hf_config, ModelConfig(params_dtype="float32", attention_backend="local"), groups)
    load_hf_weights(chunks, hf_dir)
    reference = snapshot(chunks)
    saved = out / f"megatron_saved_{name}"
    if (tp, pp) == LAYOUTS[0]:
        save_model_checkpoint(chunks, saved)
    sources = {"converted": meg_dir, **({"megatron_saved": saved} if (tp, pp) == (1, 1) else {})}
    for label, ckpt in sources.items():
        zero_(chunks)
        load_model_checkpoint(chunks, ckpt)
        bad = mismatches(chunks, reference)
        count = torch.tensor([len(bad), len(reference)])
        dist.all_reduce(count)
        if groups.rank == 0:
            print(f"[layout] {name} {label} tp{tp}pp{pp}: {count[0]} of {count[1]} parameters differ"
                  f"{' e.g. ' + bad[0] if bad else ''}", flush=True)
    outputs = forward(chunks, hf_config)
    if outputs and groups.tp_rank == 0 and groups.dp_rank == 0:
        torch.save(outputs, out / f"out_{name}_tp{tp}pp{pp}.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("pairs", nargs="+", help="NAME=HF_DIR:MEGATRON_DIR")
    args = p.parse_args()
    out = Path(args.out)
    for tp, pp in LAYOUTS:
        groups = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                              backend="gloo"))
        for pair in args.pairs:
            name, dirs = pair.split("=", 1)
            check_pair(name, *dirs.split(":"), out, groups, tp, pp)
    destroy_parallel()


if __name__ == "__main__":
    main()
