"""torchrun worker of ``test_uneven_stages.py``: the tiny model (4 decoder layers) under PP 2 with
uneven stages, 2 ranks, gloo.

    torchrun --nproc-per-node 2 uneven_worker.py --out DIR NAME=HF_DIR [NAME=HF_DIR ...]

Phases, each a fresh set of process groups: PP2 with 1 + 3 layers (``first_stage_layers=1``), PP2
with 3 + 1 (``last_stage_layers=1``: Megatron's other field), PP2 even (2 + 2), PP1 (DP 2). Per
checkpoint and phase:

1. (PP2 phases) the layers each stage built, by their global numbers;
2. (uneven phases) HF parity: the fixed multimodal batch through the pipeline schedule against
   transformers' model, max |d logprob| and |d hidden| printed;
3. (uneven phases) the weight resharder's stream equals the HF checkpoint's tensors exactly;
4. (uneven phases) one forward + backward of the DAPO loss, the gradients saved by global name
   (``DIR/<name>/grads_<phase>_pp<stage>.pt``) for the test to compare with TP1 x PP1;
5. every Megatron checkpoint saved by an earlier phase is loaded (the layer axis is global, so any
   split reads any other's) and must equal what this phase's HF loader gave, bit for bit; then
   this phase saves its own (``DIR/<name>/megatron_<phase>``).
Results are printed as ``[uneven] ...`` lines that the test parses.
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
from megatron_vgpo.distributed.layout import PipelineSplit
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.name_mapping import canonical_hf_name
from megatron_vgpo.models.qwen2_5_vl.parity import compare, fixed_multimodal_batch, hf_reference, micro_batches
from megatron_vgpo.models.qwen2_5_vl.pipeline import PolicyBatch, run_pipeline
from megatron_vgpo.rollout.weight_sync import hf_state_dict_of
from tests.distributed.grad_worker import dapo_loss, gathered_grads, policy_batches

PHASES = {  # name: (PP, split)
    "first1": (2, PipelineSplit(first=1)),
    "last1": (2, PipelineSplit(last=1)),
    "even": (2, PipelineSplit()),
    "pp1": (1, PipelineSplit()),
}
F32 = ModelConfig(params_dtype="float32", attention_backend="local")


def report(groups, text: str) -> None:
    if groups.rank == 0:
        print(f"[uneven] {text}", flush=True)


def policy(hf_dir: str, groups, split: PipelineSplit):
    chunks = build_policy(AutoConfig.from_pretrained(hf_dir), F32, groups, split)
    load_hf_weights(chunks, hf_dir)
    return chunks


def stage_layers(chunks, groups) -> list[list[int]]:
    """Global 0-based layer numbers of each stage (gathered over the pipeline group)."""
    mine = [layer.layer_number - 1 for chunk in chunks for layer in chunk.language_model.decoder.layers]
    stages = [None] * groups.pp_size
    dist.all_gather_object(stages, mine, group=groups.pp_group)
    return stages


def parity(chunks, groups, hf_dir: str) -> tuple[float, float]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_config = AutoConfig.from_pretrained(hf_dir)
    batches = micro_batches(fixed_multimodal_batch(hf_config))

    def keep(_, out):
        return out.logprobs.sum() * 0, torch.tensor(1), (out.logprobs, out.hidden_states)

    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        outputs = run_pipeline(chunks, [PolicyBatch(b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw)
                                        for b in batches], keep, forward_only=True)
    worst = torch.zeros(2, dtype=torch.float64)
    if outputs:
        hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
        for batch, output in zip(batches, outputs):
            diffs = compare(batch, *output, *hf_reference(hf_model, batch))
            worst = torch.maximum(worst, torch.tensor([diffs["logprobs"], diffs["hidden_states"]], dtype=torch.float64))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst[0]), float(worst[1])


def stream_is_exact(chunks, groups, hf_dir: str) -> bool:
    from safetensors.torch import load_file

    ref = {canonical_hf_name(k): v for k, v in load_file(Path(hf_dir) / "model.safetensors").items()}
    if chunks[0].arch.tie_embeddings:
        ref.pop("lm_head.weight", None)
    got = hf_state_dict_of(chunks, groups, bucket_bytes=64 << 10)
    exact = torch.tensor(int(got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)))
    dist.all_reduce(exact, op=dist.ReduceOp.MIN)
    return bool(exact)


def save_gradients(chunks, groups, hf_dir: str, out: Path, phase: str) -> None:
    for chunk in chunks:
        chunk.train()
    batches = policy_batches(AutoConfig.from_pretrained(hf_dir))
    num_tokens = int(sum(b.response_mask.sum() for b in batches))
    run_pipeline(chunks, batches, lambda b, o: dapo_loss(b, o, num_tokens), compute_entropy=True,
                 return_hidden_states=False)
    grads, _ = gathered_grads(chunks, groups)
    torch.save(grads, out / f"grads_{phase}_pp{groups.pp_rank}.pt")


def checkpoints_agree(chunks, groups, out: Path, phase: str) -> None:
    """Load every checkpoint an earlier phase saved; compare with the HF-loaded parameters."""
    reference = {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()}
    for saved in (out / f"megatron_{earlier}" for earlier in list(PHASES)[:list(PHASES).index(phase)]):
        with torch.no_grad():
            for chunk in chunks:
                for p in chunk.parameters():
                    p.zero_()
        load_model_checkpoint(chunks, saved)
        now = {f"{i}.{n}": p for i, c in enumerate(chunks) for n, p in c.named_parameters()}
        count = torch.tensor([sum(not torch.equal(now[n], reference[n]) for n in reference), len(reference)])
        dist.all_reduce(count)
        report(groups, f"{out.name} checkpoint {saved.name.removeprefix('megatron_')} -> {phase}: "
                       f"{count[0]} of {count[1]} parameters differ")
    save_model_checkpoint(chunks, out / f"megatron_{phase}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("checkpoints", nargs="+", help="NAME=HF_DIR")
    args = p.parse_args()
    for phase, (pp, split) in PHASES.items():  # init_parallel re-creates Megatron's groups in the same world
        groups = init_parallel(ParallelConfig(pipeline_model_parallel_size=pp, backend="gloo"))
        for item in args.checkpoints:
            name, hf_dir = item.split("=", 1)
            out = Path(args.out) / name
            if groups.rank == 0:
                out.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            chunks = policy(hf_dir, groups, split)
            if pp > 1:
                report(groups, f"{name} {phase} layers {stage_layers(chunks, groups)}")
            if not split.is_even:
                dlogprob, dhidden = parity(chunks, groups, hf_dir)
                report(groups, f"{name} {phase} parity max|dlogprob|={dlogprob:.3e} max|dhidden|={dhidden:.3e}")
                report(groups, f"{name} {phase} resharder stream exact={stream_is_exact(chunks, groups, hf_dir)}")
            checkpoints_agree(chunks, groups, out, phase)
            if not split.is_even:
                save_gradients(chunks, groups, hf_dir, out, phase)
    destroy_parallel()


if __name__ == "__main__":
    main()
