"""One command for one H100/H200, no network: the trainer side of megatron_vgpo on CUDA.

    python tools/gpu_check.py [--budget-s 420] [--out summary.json]   # bf16 on the GPU
    python tools/gpu_check.py --dry-run [--gpu-gb 80]                 # no model: environment, plan, what is missing
    python tools/gpu_check.py --device cpu                            # the same checks in float32, smaller shapes (CI)

Two policies (``megatron_vgpo/utils/gpu_check_checks.py``, with the tolerances and their reasoning): the
tests' tiny Qwen2.5-VL and Qwen2.5-VL-7B's widths at 2 decoder layers and 2 vision blocks, seeded random
weights, HF's model (SDPA) as the reference. Checks per policy, each in its own try/except (one failure
never stops the others; a check whose state a later one needs makes that one skip if it crashed):

- ``reference``: HF outputs on the parity batch in float32 and, on the GPU, bfloat16 (their distance: the
  bf16 noise floor); ``parity_fp32`` (GPU, tiny): the Megatron policy in fp32, TF32 off: exact parity;
- ``parity_te`` / ``parity_local``: Megatron's Transformer-Engine / local layer spec against HF: log-probs
  and hidden states within ``TOLERANCES``, and in bf16 no more than ``ACCURACY_RATIO_MAX`` x as far
  from the fp32 result as HF's own bf16. The later checks train TE's chunks when they were built (the
  trainer's ``attention_backend=auto``), the local spec's otherwise;
- ``placement``: every parameter on the device after ``build_policy`` + ``load_hf_weights`` (this tool
  then moves them, so that the later checks still run);
- ``focus_scores``: the Actor's pi_old pass (DDP, micro-batches, shared images) gives HF's log-probs
  and VGPO's rho from HF's hidden states, rho in [0, 1] and 0 off image rows' responses;
- ``ppo_update``: a first update: loss and grad norm finite, grad norm > 0, every weight matrix moved;
  a second one (Adam's moments exist: the steady state) is timed, with CUDA syncs, and its peak memory
  kept; the log-prob pass is timed after a warm-up pass;
- ``distributed_optimizer`` (GPU): Megatron's DistributedOptimizer, every parameter in DDP's buffer;
- ``checkpoint`` (tiny: a wide one is ~20 GB of writes): dist-checkpoint save, load into a fresh actor,
  model and optimizer tensors equal;
- ``memory`` (GPU, wide): that peak against the memory model's prediction for the same shapes (without
  reserve and engine), a calibration within ``MEMORY_BAND``;
- ``mfu`` (GPU, wide): the formula ``perf/mfu`` logs, for the log-prob pass (forward) and the update.

Progress goes to stderr; the last stdout line is the summary as one JSON object. Exit status: 0 every
check that ran passed, 1 one failed, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import megatron_vgpo  # noqa: E402,F401  (first: the torchvision shim)
import torch  # noqa: E402

from megatron_vgpo.utils import deps  # noqa: E402
from megatron_vgpo.utils.gpu_check_checks import (  # noqa: E402
    TINY, TOLERANCES, WIDE_7B, WIDE_CPU, Check, CheckFailed, Runner, batch_to, environment, hf_policy,
    long_experience, mismatches, missing_for, model_tensors, optimizer_tensors, parity_experience,
    parity_metrics, predicted_update_memory, unchanged, violations, weight_samples,
)

GiB = 2 ** 30
POLICIES = {"cuda": (TINY, WIDE_7B), "cpu": (TINY, WIDE_CPU)}
ACCURACY_RATIO_MAX = 2.0
"""bf16: Megatron's distance to the fp32 result over HF bf16's. Both round the same arithmetic at
different places, so ~1 is expected; 2 leaves room for TE's fused kernels, not for a wrong tensor."""
MEMORY_BAND = (0.5, 1.3)
"""measured / predicted peak: the memory model is a calibration, not an allocator trace."""
ENGINE_ITEMS = ("reserve", "vLLM engine", "CUDA graphs")  # outside torch.cuda.max_memory_allocated
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rounded(values: dict) -> dict:
    return {k: float(f"{v:.7g}") if isinstance(v, float) else v for k, v in values.items()}


class Session:
    """The checks' shared state: process groups, and per policy its HF reference, chunks and actor."""

    def __init__(self, device: str, workdir: Path):
        from megatron_vgpo.config.schema import ParallelConfig
        from megatron_vgpo.distributed import init_parallel

        self.groups = init_parallel(ParallelConfig(), seed=1234, device=device)
        self.device = self.groups.device
        self.cuda = self.device.type == "cuda"
        self.dtype = "bfloat16" if self.cuda else "float32"
        self.te = self.cuda and deps.has("transformer_engine")  # the update's spec, as attention_backend=auto
        self.workdir = workdir
        self.policies: dict[str, SimpleNamespace] = {}
        if self.cuda:  # the fp32 reference must be fp32: TF32 off in matmuls and convolutions
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def masks(self, batch):
        return batch.target_mask(), batch.attention_mask.bool()

    def build(self, st, dtype: str, backend: str, load: bool = True):
        """Chunks of ``st``'s policy (HF weights when ``load``), where ``build_policy`` left each
        parameter recorded, then all moved to the device (so a placement bug fails one check only)."""
        from megatron_vgpo.config.schema import ModelConfig
        from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
        from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights

        chunks = build_policy(st.hf_config, ModelConfig(params_dtype=dtype, attention_backend=backend), self.groups)
        if load:
            load_hf_weights(chunks, st.hf.state_dict().items())
        off = {kind: [n for c in chunks for n, t in getattr(c, f"named_{kind}")() if t.device != self.device]
               for kind in ("parameters", "buffers")}
        off["other_dtype"] = [n for c in chunks for n, p in c.named_parameters() if p.dtype != DTYPES[dtype]]
        for chunk in chunks:
            chunk.to(self.device)
        return chunks, off

    def actor(self, chunks, spec):
        from megatron_vgpo.config.schema import OptimizerConfig
        from megatron_vgpo.training.actor import Actor

        return Actor(chunks, self.groups, OptimizerConfig(lr=1e-5, use_distributed_optimizer=True),
                     micro_batch_size=spec.micro_batch_size, total_steps=1, device=self.device)

    # ---- the checks ----------------------------------------------------------------------------

    def reference(self, spec) -> dict:
        from megatron_vgpo.models.qwen2_5_vl.parity import fixed_multimodal_batch, hf_reference

        self.policies.clear()  # an earlier policy's models leave the device first
        self.free()
        hf = hf_policy(spec, self.device)
        batch = batch_to(fixed_multimodal_batch(hf.config), self.device)
        st = self.policies[spec.name] = SimpleNamespace(hf=hf, hf_config=hf.config, batch=batch, refs={})
        st.refs["float32"] = hf_reference(hf, batch)
        out = {"params": sum(p.numel() for p in hf.parameters()), "parity_batch": list(batch.input_ids.shape)}
        if self.dtype == "bfloat16":
            hf.to(torch.bfloat16)  # the weights are bf16-representable: the same model, bf16 arithmetic
            st.refs["bfloat16"] = hf_reference(hf, batch)
            out["bf16_noise_floor"] = rounded(parity_metrics(*st.refs["bfloat16"], *st.refs["float32"],
                                                             *self.masks(batch)))
        if not all(torch.isfinite(t.float()).all() for ref in st.refs.values() for t in ref):
            raise CheckFailed("non-finite HF reference outputs", out)
        return out

    def parity(self, spec, backend: str, dtype: str) -> dict:
        st = self.policies[spec.name]
        chunks, off = self.build(st, dtype, backend)
        b = st.batch
        with torch.no_grad():
            out = chunks[0].eval()(b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw)
        metrics = parity_metrics(out.logprobs, out.hidden_states, *st.refs[dtype], *self.masks(b))
        record = {"dtype": dtype, "layer_spec": backend, **rounded(metrics)}
        bad = violations(metrics, TOLERANCES[dtype])
        if dtype == "bfloat16":
            truth = parity_metrics(out.logprobs, out.hidden_states, *st.refs["float32"], *self.masks(b))
            floor = parity_metrics(*st.refs["bfloat16"], *st.refs["float32"], *self.masks(b))
            ratio = {k: truth[k] / max(floor[k], 1e-12) for k in ("hidden_rel_fro", "logprob_mean_abs")}
            record.update(vs_fp32=rounded(truth), accuracy_ratio=rounded(ratio))
            bad += [f"accuracy ratio {k}={v:.3g} > {ACCURACY_RATIO_MAX}" for k, v in ratio.items()
                    if not v <= ACCURACY_RATIO_MAX]
        if dtype == self.dtype and (backend == "te" or getattr(st, "chunks", None) is None):
            st.chunks, st.off_device, st.layer_spec = chunks, off, backend  # TE's when it ran, else local's
        if bad:
            raise CheckFailed("; ".join(bad), record)
        return record

    def trained(self, spec):
        st = self.policies[spec.name]
        if getattr(st, "chunks", None) is None:
            raise RuntimeError("no policy chunks: neither parity_te nor parity_local ran to the end")
        return st

    def placement(self, spec) -> dict:
        st = self.trained(spec)
        off = st.off_device
        record = {"layer_spec": st.layer_spec, "params_off_device": off["parameters"][:8],
                  "n_params_off_device": len(off["parameters"]), "buffers_off_device": off["buffers"][:8],
                  # information only (Megatron's torch norms are created float32 in a bf16 model):
                  f"params_not_{self.dtype}": off["other_dtype"][:8], "n_params_other_dtype": len(off["other_dtype"])}
        if off["parameters"]:
            raise CheckFailed(f"{len(off['parameters'])} parameters not on {self.device} after build_policy + "
                              f"load_hf_weights (moved by gpu_check for the later checks)", record)
        return record

    def focus_scores(self, spec) -> dict:
        from megatron_vgpo.algorithms.vgpo import visual_focus_scores
        from megatron_vgpo.methods.vgpo import FocusScores
        from megatron_vgpo.training.experience import token_aligned

        st = self.trained(spec)
        st.hf = None  # the update's memory is measured without the HF model
        self.free()
        st.actor = self.actor(st.chunks, spec)
        exp = parity_experience(st.hf_config, self.device)
        focus = FocusScores()
        logprobs, stats = st.actor.forward_statistics(exp, (focus,))
        rho = stats[focus.key]
        ref_logprobs, ref_hidden = st.refs[self.dtype]
        valid = exp.attention_mask.clone()
        valid[:, 0] = False  # no token predicts position 0
        lp = (logprobs - token_aligned(ref_logprobs.float()))[valid].abs()
        ref_rho = visual_focus_scores(ref_hidden, exp.image_mask, exp.response_mask)
        scored = exp.response_mask & exp.has_image.unsqueeze(-1)
        metrics = {"logprob_mean_abs": lp.mean().item(), "logprob_max_abs": lp.max().item(),
                   "rho_max_abs": (rho - ref_rho)[exp.response_mask].abs().max().item()}
        record = {**rounded(metrics), "scored_tokens": int(scored.sum()),
                  "rho_range": [round(rho[scored].min().item(), 4), round(rho[scored].max().item(), 4)]}
        bad = violations(metrics, TOLERANCES[self.dtype])
        if not (torch.isfinite(rho).all() and rho[scored].min() >= 0 and rho[scored].max() <= 1):
            bad.append("rho outside [0, 1]")
        if (rho[~scored] != 0).any() or not scored.any():
            bad.append("rho must be non-zero exactly on the response tokens of rows with an image")
        if bad:
            raise CheckFailed("; ".join(bad), record)
        return record

    def ppo_update(self, spec) -> dict:
        from megatron_vgpo.config.schema import AlgorithmConfig
        from megatron_vgpo.methods.vgpo import FocusScores
        from megatron_vgpo.training.actor import update_metrics
        from megatron_vgpo.training.logging import StepTimer

        st = self.policies[spec.name]
        actor, statistics, alg = st.actor, (FocusScores(),), AlgorithmConfig()  # the trainer's pi_old pass
        exp = (parity_experience(st.hf_config, self.device) if spec.update_rows is None else
               long_experience(st.hf_config, spec.update_rows, spec.update_len, spec.image_side, self.device))
        rows, timer = [list(range(len(exp)))], StepTimer(synchronize=self.cuda)
        actor.forward_statistics(exp, statistics)  # warm-up: kernel selection and allocator growth untimed
        exp.old_logprobs, exp.stats = timer.time("logprob", actor.forward_statistics, exp, statistics)
        exp.advantages = torch.linspace(-1, 1, exp.input_ids.numel(), device=self.device).view_as(
            exp.input_ids) * exp.response_mask
        exp.loss_mask, exp.outcome = exp.response_mask, torch.zeros(len(exp), device=self.device)
        before = weight_samples(actor.chunks[0])
        metrics = update_metrics(actor.update(exp, rows, alg))  # the first: loss, grad norm, weights moved
        still, n_matrices = unchanged(before, actor.chunks[0]), len(before)
        del before
        self.free()
        if self.cuda:  # the second is the steady state (Adam's moments exist): timed, and its peak measured
            torch.cuda.reset_peak_memory_stats()
        timer.time("update", actor.update, exp, rows, alg)
        peak = torch.cuda.max_memory_allocated() if self.cuda else None
        tokens = int(exp.attention_mask.sum())
        st.update = dict(tokens=tokens, seq_len=tokens / len(exp), logprob_s=timer.seconds["logprob"],
                         update_s=timer.seconds["update"], peak_bytes=peak)
        loss, norm = metrics.get("actor/pg_loss", float("nan")), metrics["actor/grad_norm"]
        record = {"rows": len(exp), "tokens": tokens, "pg_loss": loss, "grad_norm": norm,
                  "logprob_s": st.update["logprob_s"], "update_s": st.update["update_s"],
                  "peak_gib": peak / GiB if peak else None, "matrices": n_matrices, "matrices_unchanged": still[:8]}
        bad = [] if math.isfinite(loss) else ["non-finite loss"]
        bad += [] if math.isfinite(norm) and norm > 0 else [f"grad norm {norm} (must be finite and > 0)"]
        bad += [f"{len(still)} weight matrices did not move"] if still else []
        if bad:
            raise CheckFailed("; ".join(bad), rounded(record))
        return rounded(record)

    def distributed_optimizer(self, spec) -> dict:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        actor = self.policies[spec.name].actor
        parts = getattr(actor.optimizer, "chained_optimizers", None) or [actor.optimizer]
        buffers = [b for m in actor.model for b in [*m.buffers, *getattr(m, "expert_parallel_buffers", [])]]
        storages = {b.param_data.untyped_storage().data_ptr() for b in buffers if b.param_data is not None}
        outside = [n for n, p in actor.chunks[0].named_parameters()
                   if p.requires_grad and p.untyped_storage().data_ptr() not in storages]
        record = {"optimizers": [type(p).__name__ for p in parts], "params_outside_ddp_buffer": outside[:8]}
        if not all(isinstance(p, DistributedOptimizer) for p in parts) or outside:
            raise CheckFailed("not Megatron's DistributedOptimizer over DDP's contiguous param buffer", record)
        return record

    def checkpoint(self, spec) -> dict:
        from megatron_vgpo.config.schema import CheckpointConfig
        from megatron_vgpo.training.checkpointing import CheckpointManager

        st = self.trained(spec)
        cfg = CheckpointConfig(save_dir=str(self.workdir / f"ckpt_{spec.name}"), keep_last=1)
        start = time.monotonic()
        path = CheckpointManager(cfg, rank=0, world_size=1).save(1, st.actor.model, st.actor.optimizer,
                                                                 st.actor.scheduler.state_dict())
        saved = time.monotonic()
        fresh = self.actor(self.build(st, self.dtype, st.layer_spec, load=False)[0], spec)
        differed = len(mismatches(model_tensors(st.actor.chunks), model_tensors(fresh.chunks)))
        loaded_at = time.monotonic()
        CheckpointManager(cfg, rank=0, world_size=1).load(path, fresh.model, fresh.optimizer)
        model_bad = mismatches(model_tensors(st.actor.chunks), model_tensors(fresh.chunks))
        opt_bad = mismatches(optimizer_tensors(st.actor.optimizer), optimizer_tensors(fresh.optimizer))
        record = rounded({"mb": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6,
                          "save_s": saved - start, "load_s": time.monotonic() - loaded_at,
                          "model_tensors": len(model_tensors(fresh.chunks)),
                          "optimizer_tensors": len(optimizer_tensors(fresh.optimizer)),
                          "tensors_differing_before_load": differed, "model_mismatches": model_bad[:8],
                          "optimizer_mismatches": opt_bad[:8]})
        del fresh
        self.free()
        if not differed or model_bad or opt_bad:
            raise CheckFailed("the loaded actor differs from the saved one" if differed else
                              "a fresh actor already equals the saved one: nothing was tested", record)
        return record

    def memory(self, spec) -> dict:
        st = self.policies[spec.name]
        mem = predicted_update_memory(spec, st.hf_config, st.layer_spec == "te", self.cuda)
        predicted = mem.total_without(*ENGINE_ITEMS)
        ratio = st.update["peak_bytes"] / predicted
        record = rounded({"measured_gib": st.update["peak_bytes"] / GiB, "predicted_gib": predicted / GiB,
                          "ratio": ratio})
        record.update(layer_spec=st.layer_spec, band=list(MEMORY_BAND),
                      predicted_items_gib={k: round(v / GiB, 3) for k, v in mem.items if k not in ENGINE_ITEMS})
        if not MEMORY_BAND[0] <= ratio <= MEMORY_BAND[1]:
            raise CheckFailed(f"measured / predicted = {ratio:.3f} outside {MEMORY_BAND}", record)
        return record

    def mfu(self, spec) -> dict:
        from megatron_vgpo.models.qwen2_5_vl.loading import expected_hf_shapes
        from megatron_vgpo.training.logging import device_peak_flops, flops_per_token

        st, u = self.policies[spec.name], self.policies[spec.name].update
        n = sum(math.prod(s) for s in expected_hf_shapes(st.hf_config).values())
        text, peak = st.hf_config.text_config, device_peak_flops()
        if peak is None:
            raise CheckFailed(f"no bf16 peak for {torch.cuda.get_device_name()} in logging.PEAK_BF16_FLOPS")
        flops = {k: u["tokens"] * flops_per_token(n, text.num_hidden_layers, text.hidden_size, u["seq_len"],
                                                  backward=k == "update") for k in ("logprob", "update")}
        record = rounded({"num_params": n, "peak_tflops": peak / 1e12, "tokens": u["tokens"],
                          **{f"{k}_mfu": flops[k] / (u[f"{k}_s"] * peak) for k in flops},
                          **{f"{k}_tokens_per_s": u["tokens"] / u[f"{k}_s"] for k in flops}})
        if not all(0 < record[f"{k}_mfu"] < 1 for k in flops):
            raise CheckFailed("MFU outside (0, 1): the timing or the FLOP count is wrong", record)
        return record


ONE_POLICY = {"parity_fp32": "tiny", "checkpoint": "tiny", "memory": "wide", "mfu": "wide"}
"""Checks run for one policy: fp32 parity where it is cheap; a wide dist checkpoint would write ~20 GB;
memory and MFU mean something at the wide model's size only."""


def skip_reason(name: str, cuda: bool, te: bool) -> str:
    if name == "parity_te" and not te:
        return "transformer_engine is not importable" if cuda else "CUDA only: Transformer-Engine kernels need a GPU"
    if cuda:
        return ""
    return {"parity_fp32": "the CPU run is float32 throughout: parity_local is the fp32 check",
            "distributed_optimizer": "CUDA only: its buffers are CUDA tensors (the plain optimizer runs on CPU)",
            "memory": "CUDA only: torch.cuda peak-memory statistics",
            "mfu": "CUDA only: no CPU peak FLOP/s (perf/mfu is GPU only)"}.get(name, "")


def plan_checks(device: str, policies, te: bool, s: Session | None = None) -> list[Check]:
    """The checks in run order (``s`` None: the dry run's plan). TE's parity runs before the local
    spec's: the update then uses TE's chunks when they were built, the local ones otherwise."""
    cuda, dtype = device == "cuda", "bfloat16" if device == "cuda" else "float32"
    ratio = f", accuracy ratio <= {ACCURACY_RATIO_MAX}" if cuda else ""
    table = [  # name, pass criterion, Session method or (policy) -> record, needs
        ("reference", "HF forward on the parity batch finite (fp32; bf16 too on GPU)", "reference", ()),
        ("parity_fp32", "Megatron fp32 vs HF fp32, TF32 off: TOLERANCES['float32']",
         lambda sp: s.parity(sp, "local", "float32"), ("reference",)),
        ("parity_te", f"Transformer-Engine spec vs HF, bf16: TOLERANCES['bfloat16']{ratio}",
         lambda sp: s.parity(sp, "te", "bfloat16"), ("reference",)),
        ("parity_local", f"local spec vs HF, {dtype}: TOLERANCES['{dtype}']{ratio}",
         lambda sp: s.parity(sp, "local", dtype), ("reference",)),
        ("placement", "every parameter on the device after build_policy + load_hf_weights", "placement",
         ("reference",)),
        ("focus_scores", "Actor pi_old pass: log-probs and VGPO rho vs HF's within tolerance, rho in [0, 1]",
         "focus_scores", ("reference",)),
        ("ppo_update", "loss and grad norm finite, grad norm > 0, every weight matrix moved", "ppo_update",
         ("focus_scores",)),
        ("distributed_optimizer", "Megatron's DistributedOptimizer, every parameter in DDP's buffer",
         "distributed_optimizer", ("focus_scores",)),
        ("checkpoint", "dist-checkpoint save, load into a fresh actor: model and optimizer tensors equal",
         "checkpoint", ("ppo_update",)),
        ("memory", f"peak allocated / the memory model's prediction in {MEMORY_BAND}", "memory", ("ppo_update",)),
        ("mfu", "perf/mfu of the log-prob pass and of the update in (0, 1)", "mfu", ("ppo_update",)),
    ]
    checks = []
    for spec in policies:
        for name, what, method, needs in table:
            if ONE_POLICY.get(name, spec.name) != spec.name:
                continue
            run = None
            if s is not None:
                fn = getattr(s, method) if isinstance(method, str) else method
                run = (lambda fn=fn, sp=spec: fn(sp))
            checks.append(Check(f"{spec.name}/{name}", run, what, tuple(f"{spec.name}/{n}" for n in needs),
                                skip_reason(name, cuda, te)))
    return checks


def dry_run(args, env: dict, missing: list[str]) -> dict:
    from megatron_vgpo.models.qwen2_5_vl.parity import fixed_multimodal_batch
    from megatron_vgpo.planning import shape_from_hf_config, total_params

    cuda = args.device == "cuda"
    te = cuda and env["optional"]["transformer_engine"]
    gpu_gib = args.gpu_gb or env.get("device_memory_gib") or 80.0
    policies = {}
    for spec in select(args):
        cfg = spec.hf_config()
        mem = predicted_update_memory(spec, cfg, te, cuda)
        trainer = mem.total_without(*ENGINE_ITEMS)
        policies[spec.name] = {**spec.describe(), "params": total_params(shape_from_hf_config(cfg)),
                               "parity_batch": list(fixed_multimodal_batch(cfg).input_ids.shape),
                               "predicted_update_peak_gib": round(trainer / GiB, 3),
                               "predicted_with_reserve_gib": round(mem.total / GiB, 3)}
        if cuda and mem.total > gpu_gib * GiB:
            missing.append(f"GPU memory: {spec.name}'s update is predicted at {mem.total / GiB:.1f} GiB "
                           f"> {gpu_gib:g} GiB")
    checks = [{"name": c.name, "what": c.what, "needs": list(c.needs), **({"skip": c.skip} if c.skip else {})}
              for c in plan_checks(args.device, select(args), te)]
    return {"mode": "dry-run", "device": args.device, "dtype": "bfloat16" if cuda else "float32",
            "layer_spec_for_update": "te" if te else "local", "gpu_gib": gpu_gib, "environment": env,
            "missing": missing, "policies": policies,
            "tolerances": {k: vars(v) for k, v in TOLERANCES.items()}, "checks": checks}


def select(args) -> list:
    return [spec for spec in POLICIES[args.device] if spec.name in args.policies]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: bf16 on the GPU; cpu: the same checks in float32 on smaller shapes")
    p.add_argument("--dry-run", action="store_true",
                   help="build no model: print the environment, the planned checks and what is missing")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget; checks not started by then are skipped (default 420)")
    p.add_argument("--gpu-gb", type=float, default=None, help="GPU memory in GiB for the dry run's plan "
                   "(default: the device's, else 80)")
    p.add_argument("--policies", type=lambda s: s.split(","), default=["tiny", "wide"],
                   help="comma-separated subset of tiny,wide")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoint directory (default: a temporary one)")
    args = p.parse_args(argv)
    if not set(args.policies) <= {"tiny", "wide"}:
        p.error(f"--policies {','.join(args.policies)}: choose from tiny, wide")
    return args


def emit(summary: dict, out: Path | None) -> None:
    text = json.dumps(summary, default=str)
    if out is not None:
        out.write_text(text + "\n")
    print(text, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    env = environment()
    missing = missing_for(args.device, env)
    if args.dry_run:
        emit(dry_run(args, env, missing), args.out)
        return 0
    fatal = [m for m in missing if not m.startswith(("transformer_engine", "a bf16 peak"))]
    if args.device == "cpu" and env["cuda_available"]:
        fatal.append("--device cpu on a machine with CUDA: hide the GPUs (CUDA_VISIBLE_DEVICES=)")
    if fatal:
        emit({"ok": False, "device": args.device, "error": f"cannot run: missing {'; '.join(fatal)}",
              "environment": env, "missing": missing}, args.out)
        return 2
    from megatron_vgpo.distributed import destroy_parallel

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        try:
            session = Session(args.device, args.workdir or Path(tmp))
        except Exception as e:  # noqa: BLE001 -- e.g. NCCL cannot start: an environment error, said in JSON
            emit({"ok": False, "device": args.device, "error": f"process groups: {type(e).__name__}: {e}",
                  "environment": env, "missing": missing}, args.out)
            return 2
        runner = Runner(args.budget_s, start=start, on_error=session.free, log=log)
        records = runner.run(plan_checks(args.device, select(args), session.te, session))
        session.policies.clear()
        destroy_parallel()
    failed = [r["name"] for r in records if r["ok"] is False]
    summary = {"ok": not failed, "device": args.device, "dtype": session.dtype,
               "seconds": round(time.monotonic() - start, 1), "budget_s": args.budget_s,
               "passed": sum(r["ok"] is True for r in records), "failed": failed,
               "skipped": sum(r["ok"] is None for r in records), "environment": env, "missing": missing,
               "tolerances": {k: vars(v) for k, v in TOLERANCES.items()}, "checks": records}
    emit(summary, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
