"""The measuring pieces of ``tools/gpu_check.py``: test policies built in code, their inputs, parity
metrics with their tolerances, and the runner that keeps one failed check from stopping the others.

Policies (``PolicySpec``): real ``Qwen2_5_VLForConditionalGeneration`` configs with seeded random
weights, drawn on the model's device and rounded to bf16-representable values, so that a float32 and
a bfloat16 copy hold exactly the same weights and their difference is the arithmetic alone.

Tolerances (``TOLERANCES``), per dtype, compared in float32 over valid positions only (hidden states
where the attention mask is 1, log-probs where the target is a real token):

- float32: both sides compute in fp32 (TF32 off), so only the order of reductions differs (Megatron
  fuses Q/K/V and gate/up into one matmul, attends with its own softmax; HF calls SDPA): a few fp32
  roundings (2^-24) per op, ~1e-6 after a few layers. The bounds (1e-4 relative hidden error, 1e-3
  nats) sit 100x above that and 100x below what a wrong tensor mapping or rotary section gives.
- bfloat16: 8 significant bits, a relative rounding of 2^-9 ~ 2e-3 per rounding. The two
  implementations round at different places (Megatron fuses QKV and norm+linear under TE, keeps its
  residual in bf16 at other points than HF, and TE fuses whole kernels), so each side carries its own
  few-ulp error per op, growing over layers; HF bf16 against HF fp32 on the same weights (the "noise
  floor" the check also reports) is of the same order. The hidden states are compared by relative
  Frobenius error (<= 0.05, ~25 roundings of 2e-3) and per-token cosine similarity (>= 0.99 on the
  worst token, >= 0.999 on average): rounding leaves every token's direction alone, a gross error (a
  dropped q/k/v bias) turns some. Log-probs differ through the bf16 logits (|z| of a few units, an
  ulp of ~1e-2) and the propagated hidden error: <= 0.05 nats on average, <= 0.5 on the worst token.
  VGPO's rho = (cos + 1) / 2 inherits the hidden states' relative error: <= 0.02. Smaller errors (a
  permuted norm weight, a 5% scale on one matrix, a rotated M-RoPE section) can hide inside these
  bounds; the float32 check and the bf16 accuracy ratio of ``tools/gpu_check.py`` (Megatron bf16's
  distance to the fp32 result over HF bf16's) are the sharp ones.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

import torch

from megatron_vgpo.models.qwen2_5_vl.parity import ParityBatch, fixed_multimodal_batch, pixel_spec
from megatron_vgpo.training.experience import Experience
from megatron_vgpo.training.micro_batch import RowImages

# ---- tolerances -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Pass bounds of a Megatron-vs-HF comparison (see the module docstring for the reasoning)."""

    logprob_mean_abs: float  # nats, mean over valid targets
    logprob_max_abs: float  # nats, worst valid target
    hidden_rel_fro: float  # ||h - h_ref||_F / ||h_ref||_F over valid positions
    hidden_cos_min: float  # worst per-token cosine similarity
    hidden_cos_mean: float
    rho_max_abs: float  # VGPO focus scores, worst response token


TOLERANCES = {
    "float32": Tolerance(1e-4, 1e-3, 1e-4, 0.9999, 0.99999, 1e-4),
    "bfloat16": Tolerance(0.05, 0.5, 0.05, 0.99, 0.999, 0.02),
}


def parity_metrics(logprobs, hidden, ref_logprobs, ref_hidden, lp_mask, h_mask) -> dict[str, float]:
    """Log-prob differences in nats over ``lp_mask``, hidden-state relative Frobenius error and
    per-token cosine similarity over ``h_mask``; all in float32. Shapes ``[B, L]`` and ``[B, L, d]``."""
    lp = (logprobs.float() - ref_logprobs.float())[lp_mask].abs()
    h, r = hidden.float()[h_mask], ref_hidden.float()[h_mask]
    cos = torch.nn.functional.cosine_similarity(h, r, dim=-1)
    return {"logprob_mean_abs": lp.mean().item(), "logprob_max_abs": lp.max().item(),
            "hidden_rel_fro": (torch.linalg.norm(h - r) / torch.linalg.norm(r)).item(),
            "hidden_cos_min": cos.min().item(), "hidden_cos_mean": cos.mean().item()}


def violations(metrics: dict[str, float], tol: Tolerance) -> list[str]:
    """The bounds ``metrics`` break (a NaN breaks every bound it meets)."""
    out = []
    for key, bound in asdict(tol).items():
        if key not in metrics:
            continue
        value, lower = metrics[key], key.startswith("hidden_cos")
        if not (value >= bound if lower else value <= bound):
            out.append(f"{key}={value:.4g} {'<' if lower else '>'} {bound:g}")
    return out


# ---- policies --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySpec:
    """A test policy and the inputs of its PPO update."""

    name: str
    text: dict  # Qwen2_5_VLConfig text_config fields
    vision: dict  # vision_config fields
    token_ids: dict  # image / video / vision start / vision end ids
    init_std: float  # weights N(0, std^2), norms 1 + N(0, std^2)
    micro_batch_size: int
    update_rows: Optional[int] = None  # None: the update runs on the parity batch
    update_len: int = 0  # tokens per row of the long update batch (half prompt, half response)
    image_side: int = 0  # pixels per side of its one shared image

    def hf_config(self):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(text_config=dict(self.text), vision_config=dict(self.vision),
                                tie_word_embeddings=False, **self.token_ids)

    def describe(self) -> dict:
        return {"text": self.text, "vision": self.vision, "init_std": self.init_std,
                "micro_batch_size": self.micro_batch_size,
                "update_batch": "the parity batch" if self.update_rows is None else
                f"{self.update_rows} rows x {self.update_len} tokens, one shared {self.image_side}x"
                f"{self.image_side} image"}


def _text(vocab, hidden, ffn, layers, heads, kv_heads, theta, section, std):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                rms_norm_eps=1e-6, initializer_range=std, bos_token_id=None, eos_token_id=None,
                rope_parameters=dict(rope_type="default", rope_theta=theta, mrope_section=section))


def _vision(hidden, ffn, heads, depth, out, full, std):
    return dict(depth=depth, hidden_size=hidden, intermediate_size=ffn, num_heads=heads, out_hidden_size=out,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=full, initializer_range=std)


def _ids(vocab_top: int) -> dict:
    return dict(vision_start_token_id=vocab_top - 2, vision_end_token_id=vocab_top - 1,
                image_token_id=vocab_top, video_token_id=vocab_top + 1)


# The tests' tiny model (tests/conftest.py): std 0.1 keeps attention far from uniform.
TINY = PolicySpec("tiny", _text(301, 128, 256, 4, 4, 2, 1e4, [4, 6, 6], 0.1),
                  dict(_vision(64, 128, 2, 4, 128, [1, 3], 0.1), window_size=56), _ids(290), 0.1, 2)
# Qwen2.5-VL-7B's widths (its config.json) at 2 decoder layers and 2 vision blocks; std 0.02 (HF's
# initializer_range) keeps activations at their scale across 3584-wide layers.
WIDE_7B = PolicySpec("wide", _text(152064, 3584, 18944, 2, 28, 4, 1e6, [16, 24, 24], 0.02),
                     _vision(1280, 3420, 16, 2, 3584, [1], 0.02),
                     dict(vision_start_token_id=151652, vision_end_token_id=151653, image_token_id=151655,
                          video_token_id=151656), 0.02, 2, update_rows=2, update_len=2048, image_side=448)
# The CPU stand-in: same structure, narrow enough for a 2-core CI run.
WIDE_CPU = PolicySpec("wide", _text(4096, 512, 1536, 2, 8, 2, 1e6, [8, 12, 12], 0.02),
                      _vision(128, 256, 2, 2, 512, [1], 0.02), _ids(4092), 0.02, 2,
                      update_rows=2, update_len=256, image_side=112)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float, representable_in=torch.bfloat16) -> None:
    """Seeded N(0, std^2) weights (norm weights 1 + N(0, std^2)) drawn on the model's device, rounded
    to values ``representable_in`` holds exactly."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        values = torch.randn(param.shape, generator=gen, device=device) * std
        if param.dim() == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight"):
            values += 1.0
        param.copy_(values.to(representable_in).to(param.dtype))


def hf_policy(spec: PolicySpec, device: torch.device, seed: int = 0):
    """The HF model of ``spec`` in float32 on ``device`` (SDPA attention), random weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device(device), torch.random.fork_rng(devices=[]):
        model = Qwen2_5_VLForConditionalGeneration._from_config(spec.hf_config(), attn_implementation="sdpa",
                                                                dtype=torch.float32)
    randomize_(model, seed, spec.init_std)
    return model.eval()


# ---- inputs ----------------------------------------------------------------------------------------


def batch_to(batch: ParityBatch, device: torch.device) -> ParityBatch:
    move = {k: getattr(batch, k).to(device) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    return replace(batch, **move)


def parity_experience(hf_config, device: torch.device, response_tokens: int = 6) -> Experience:
    """The parity batch (3 rows: one image, two images, none) as an Experience; the last
    ``response_tokens`` of each row play the response."""
    batch = fixed_multimodal_batch(hf_config)
    lengths = batch.attention_mask.sum(-1)
    attention = batch.attention_mask.bool()
    response = attention & (torch.arange(attention.shape[1]) >= (lengths - response_tokens).unsqueeze(1))
    slots, first = [], 0
    for count in batch.images_per_row:
        slots.append(tuple(range(first, first + count)))
        first += count
    images = RowImages(batch.image_grid_thw, slots, list(batch.images), pixel_spec(hf_config))
    return _experience(batch.input_ids, attention, response, images, hf_config, device)


def long_experience(hf_config, rows: int, length: int, image_side: int, device: torch.device,
                    seed: int = 0) -> Experience:
    """``rows`` full rows of ``length`` tokens (the first half prompt, with one image shared by every
    row as the ``n`` responses of a prompt share it; the second half response)."""
    gen = torch.Generator().manual_seed(seed)
    spec = pixel_spec(hf_config)
    image = torch.randint(0, 256, (3, image_side, image_side), generator=gen, dtype=torch.uint8)
    grid = spec.grid(image_side, image_side)
    n_pad = spec.num_tokens(image_side, image_side)
    special = min(hf_config.vision_start_token_id, hf_config.image_token_id, hf_config.text_config.vocab_size)
    text = torch.randint(1, special, (rows, length - n_pad - 2), generator=gen)
    image_part = torch.tensor([hf_config.vision_start_token_id] + [hf_config.image_token_id] * n_pad
                              + [hf_config.vision_end_token_id]).expand(rows, -1)
    input_ids = torch.cat([text[:, :8], image_part, text[:, 8:]], dim=1)
    attention = torch.ones(rows, length, dtype=torch.bool)
    response = (torch.arange(length) >= length // 2).expand(rows, -1).clone()
    images = RowImages(torch.tensor([grid]), [(0,)] * rows, [image], spec)
    return _experience(input_ids, attention, response, images, hf_config, device)


def _experience(input_ids, attention, response, images, hf_config, device) -> Experience:
    B = input_ids.shape[0]
    to = dict(device=device)
    return Experience(input_ids=input_ids.to(**to), attention_mask=attention.to(**to),
                      response_mask=response.to(**to),
                      image_mask=((input_ids == hf_config.image_token_id) & attention).to(**to), images=images,
                      lengths=attention.sum(-1).tolist(), group_ids=torch.zeros(B, dtype=torch.long, **to),
                      rewards=torch.zeros(B, **to), rollout_logprobs=torch.zeros(input_ids.shape, **to))


# ---- state snapshots -------------------------------------------------------------------------------


def weight_samples(chunk, per_tensor: int = 1 << 20) -> dict[str, torch.Tensor]:
    """A strided sample (<= ``per_tensor`` elements) of every weight matrix: enough to see an update
    without holding a second copy of the model during the memory measurement."""
    out = {}
    for name, p in chunk.named_parameters():
        if p.dim() >= 2:
            flat = p.detach().reshape(-1)
            out[name] = flat[:: max(1, flat.numel() // per_tensor)].clone()
    return out


def unchanged(before: dict[str, torch.Tensor], chunk) -> list[str]:
    """Names of the sampled matrices that no element of the update moved."""
    after = weight_samples(chunk)
    return [name for name, value in before.items() if torch.equal(value, after[name])]


def model_tensors(chunks) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, c in enumerate(chunks) for k, v in c.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    """Master weights and Adam states of a (chained) Megatron optimizer, keyed by position."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    out = {}
    for o, part in enumerate(chained):
        opt = part.optimizer
        for g, group in enumerate(opt.param_groups):
            for j, p in enumerate(group["params"]):
                out[f"{o}.{g}.{j}.param"] = p.detach()
                out.update({f"{o}.{g}.{j}.{k}": v for k, v in opt.state.get(p, {}).items()
                            if isinstance(v, torch.Tensor)})
    return out


def mismatches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys missing on either side, then keys whose tensors differ."""
    missing = sorted(set(a) ^ set(b))
    return missing + [k for k in a if k in b and not torch.equal(a[k].cpu(), b[k].cpu())]


# ---- environment and the memory model's view of an update ----------------------------------------

REQUIRED = {"megatron.core": "megatron-core", "transformers": "transformers", "safetensors": "safetensors",
            "yaml": "pyyaml", "PIL": "pillow", "numpy": "numpy", "psutil": "psutil"}
"""Modules a run imports -> their pip names (megatron-core needs psutil for dist_checkpointing)."""


def environment() -> dict:
    """Versions, the CUDA device and the optional dependencies (``utils.deps``), importing nothing heavy
    besides those."""
    import platform
    from importlib import metadata

    from megatron_vgpo.training.logging import device_peak_flops
    from megatron_vgpo.utils import deps

    def version(dist: str):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "megatron_core": version("megatron-core"),
           "transformers": version("transformers"), "optional": deps.summary()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        peak = device_peak_flops(props.name)
        env.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   compute_capability=f"{props.major}.{props.minor}", peak_bf16_tflops=peak / 1e12 if peak else None)
    return env


def missing_for(device: str, env: dict) -> list[str]:
    """What a run on ``device`` needs and this machine lacks; optional pieces say what they cost."""
    import importlib.util

    out = [f"{module} (pip install {dist})" for module, dist in REQUIRED.items()
           if importlib.util.find_spec(module.split(".")[0]) is None
           or (module == "megatron.core" and env["megatron_core"] is None)]
    if device == "cuda":
        if env["torch_cuda"] is None:
            out.append(f"a CUDA build of torch (this is {torch.__version__})")
        if not env["cuda_available"]:
            out.append("CUDA device")
        if not env["optional"]["transformer_engine"]:
            out.append("transformer_engine (TE-spec checks will be skipped)")
        if env["cuda_available"] and env.get("peak_bf16_tflops") is None:
            out.append(f"a bf16 peak for {env['device_name']} in training/logging.PEAK_BF16_FLOPS (the MFU "
                       f"check fails)")
    return out


def update_shapes(spec: PolicySpec, hf_config, flash: bool, bf16: bool):
    """The memory model's ``TrainShapes`` of ``spec``'s PPO update (world of one, no recompute)."""
    import math

    from megatron_vgpo.planning import TrainShapes

    if spec.update_rows is None:
        batch = fixed_multimodal_batch(hf_config)
        (rows, seq), images = batch.input_ids.shape, max(batch.images_per_row)
        pixels = max(h * w for _, h, w in batch.image_grid_thw.tolist()) * hf_config.vision_config.patch_size ** 2
    else:
        rows, seq, images, pixels = spec.update_rows, spec.update_len, 1, spec.image_side ** 2
    mbs = min(spec.micro_batch_size, rows)
    return TrainShapes(micro_batch_size=mbs, seq_len=seq, image_pixels=pixels, images_per_micro_batch=images,
                       micro_batches=math.ceil(rows / mbs), flash_attention=flash, params_bytes=2 if bf16 else 4,
                       distributed_optimizer=bf16)


def predicted_update_memory(spec: PolicySpec, hf_config, flash: bool, bf16: bool):
    """``training_memory`` (``PhaseMemory``) of ``spec``'s update on one GPU; ``flash``: the TE spec
    (no stored ``[s, s]`` scores); ``bf16``: the GPU run (16-bit weights, distributed optimizer)."""
    from megatron_vgpo.distributed.layout import ParallelLayout
    from megatron_vgpo.planning import shape_from_hf_config, training_memory

    return training_memory(shape_from_hf_config(hf_config), ParallelLayout(1, 1, 1, 1),
                           update_shapes(spec, hf_config, flash, bf16), stage=0)


# ---- the runner ------------------------------------------------------------------------------------


class CheckFailed(Exception):
    """A measured criterion failed; ``measurements`` still go into the check's record."""

    def __init__(self, message: str, measurements: Optional[dict] = None):
        super().__init__(message)
        self.measurements = measurements or {}


@dataclass
class Check:
    """``run()`` returns the check's measurements or raises (``CheckFailed`` for a missed bound)."""

    name: str
    run: Callable[[], dict]
    what: str  # the pass criterion, in words
    needs: tuple[str, ...] = ()  # checks that must have run to the end first (passed or missed a bound)
    skip: str = ""  # a reason known before running (CUDA only, no Transformer-Engine, ...)


@dataclass
class Runner:
    """Runs checks in order, each in its own try/except, within ``budget_s`` seconds from ``start``."""

    budget_s: float
    start: float = field(default_factory=time.monotonic)
    on_error: Callable[[], None] = lambda: None  # e.g. free the CUDA cache after a failure
    log: Callable[[str], None] = print
    records: list[dict] = field(default_factory=list)

    def run(self, checks: list[Check]) -> list[dict]:
        completed = set()  # checks that ran to the end: what they build is there for the next ones
        for check in checks:
            record = {"name": check.name, "ok": None, "seconds": 0.0}
            failed_needs = [n for n in check.needs if n not in completed]
            elapsed = time.monotonic() - self.start
            if check.skip:
                record["skipped"] = check.skip
            elif failed_needs:
                record["skipped"] = f"needs {', '.join(failed_needs)}, which did not run to the end"
            elif elapsed > self.budget_s:
                record["skipped"] = f"time budget of {self.budget_s:g} s spent ({elapsed:.0f} s elapsed)"
            else:
                record.update(self._run_one(check))
            if record["ok"] is not None and "traceback" not in record:
                completed.add(check.name)
            self.records.append(record)
            verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[record["ok"]]
            detail = record.get("error") or record.get("skipped") or ""
            self.log(f"[gpu_check] {check.name}: {verdict} ({record['seconds']:.1f} s) {detail}")
        return self.records

    def _run_one(self, check: Check) -> dict:
        start = time.monotonic()
        try:
            out = {"ok": True, **check.run()}
        except CheckFailed as e:
            out = {"ok": False, **e.measurements, "error": str(e)}
        except Exception as e:  # noqa: BLE001 -- one broken check must not stop the others
            out = {"ok": False, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=8)[-3000:]}
            self.on_error()
        return {**out, "seconds": round(time.monotonic() - start, 2)}
