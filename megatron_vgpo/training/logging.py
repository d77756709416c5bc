"""Metrics of a run: TensorBoard scalars, the console progress, step timers and throughput / MFU.

    metrics = MetricsLogger(cfg.logging, rank, dump_yaml(cfg), total_steps=150, start_step=resumed_step)
    timer = StepTimer()
    with timer("step"):
        with timer("rollout"): ...
    metrics.log(step, {**step_metrics, **timer.metrics(), **perf_metrics(tokens, seconds, flops)})
    metrics.close()

Only rank 0 writes; on other ranks every method does nothing, so the trainer calls them SPMD.

Decisions:
- TensorBoard gets every ``log`` call (an RL step lasts seconds to minutes, a few dozen scalars cost
  nothing); ``log_interval`` only thins the console line. The writer is flushed after each call, so a
  killed run loses no logged step.
- NaN / inf values are written as they are (TensorBoard draws them as gaps/markers): hiding a NaN
  loss would hide the problem. The first non-finite value of each tag is also logged as a warning.
- A resumed run passes ``start_step`` (the checkpoint's step), or calls ``resume_at(step)`` when the
  logger was built before the resume: the writer then purges events at steps > step that the killed
  run wrote after its checkpoint (TensorBoard's ``purge_step``), so the curves have no duplicates.
- The console progress is a tqdm bar on a terminal, else one plain line per ``log_interval`` steps
  (logs of batch jobs): step/total, s/step, ETA, reward; on stderr.
- ``plot_scalars`` needs matplotlib, which is not a dependency: without it, it says so and returns
  None.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Iterator, Mapping, Optional, Sequence

import torch

from megatron_vgpo.config.schema import LoggingConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# Shown on the console line / bar when present: label -> metric tag.
PROGRESS_KEYS = {"reward": "reward/accuracy", "val": "val/accuracy", "pg_loss": "actor/pg_loss"}
VAL_PREFIX = "val/accuracy/"  # per validation dataset: shown each instead of the pooled val/accuracy


class MetricsLogger:
    """TensorBoard scalars under ``tensorboard_dir/run_name/`` plus the console progress (rank 0)."""

    def __init__(self, cfg: LoggingConfig, rank: int, resolved_config_yaml: str, total_steps: Optional[int] = None,
                 start_step: int = 0, stream: Optional[IO[str]] = None,
                 progress_keys: Mapping[str, str] = PROGRESS_KEYS):
        self.cfg, self.rank, self.total_steps, self.start_step = cfg, rank, total_steps, start_step
        self.logdir = Path(cfg.tensorboard_dir) / cfg.run_name
        self.progress_keys = dict(progress_keys)
        self._stream = stream or sys.stderr
        self._started = time.monotonic()
        self._warned_nonfinite: set[str] = set()
        self._writer = self._bar = None
        if rank != 0:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.logdir / CONFIG_FILE, resolved_config_yaml)
        self._writer = self._open_writer(start_step)
        if cfg.progress_bar and _isatty(self._stream) and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=self._stream, desc="train",
                             dynamic_ncols=True, unit="step")
        logger.info("metrics: TensorBoard logs and %s in %s", CONFIG_FILE, self.logdir)

    def resume_at(self, step: int) -> None:
        """The run resumed from the checkpoint of ``step`` (for a logger built before the resume):
        same as passing ``start_step=step`` to the constructor."""
        self.start_step, self._started = step, time.monotonic()
        if self._writer is not None:
            self._writer.close()  # purge_step is a writer argument: reopen (a new event file)
            self._writer = self._open_writer(step)
        if self._bar is not None:
            self._bar.reset(total=self.total_steps)
            self._bar.initial = self._bar.n = step  # the rate counts only this process's steps
            self._bar.refresh()

    def _open_writer(self, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.logdir), purge_step=start_step + 1 if start_step > 0 else None)

    def log(self, step: int, metrics: Mapping[str, float], progress: bool = True) -> None:
        """Write ``metrics`` (tag -> number, e.g. ``actor/pg_loss``) at ``step`` and update the console
        (``progress=False``: TensorBoard only, for phases that are not RL steps, e.g. the warm-up)."""
        if self._writer is None:
            return
        values = {tag: _as_float(tag, value) for tag, value in metrics.items()}
        for tag, value in values.items():
            if not math.isfinite(value) and tag not in self._warned_nonfinite:
                self._warned_nonfinite.add(tag)
                logger.warning("metrics: %s is %s at step %d (written as is)", tag, value, step)
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()
        if progress:
            self._progress(step, values)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _progress(self, step: int, values: dict[str, float]) -> None:
        if not self.cfg.progress_bar:
            return
        shown = {label: values[tag] for label, tag in self.progress_keys.items() if tag in values}
        per_dataset = {_val_label(tag[len(VAL_PREFIX):]): v for tag, v in values.items() if tag.startswith(VAL_PREFIX)}
        if per_dataset:  # "val 0.57" pooled over val and a blank control would hide both
            shown = {k: v for k, v in shown.items() if k != "val"} | per_dataset
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
            return
        if step % max(self.cfg.log_interval, 1) and step != self.total_steps:
            return
        print(self.progress_line(step, shown), file=self._stream, flush=True)

    def progress_line(self, step: int, shown: Mapping[str, float]) -> str:
        """``step 12/150 (8%) | 41.2 s/step | ETA 1:34:48 | reward 0.42``: rate from this process's steps."""
        done = step - self.start_step
        per_step = (time.monotonic() - self._started) / done if done > 0 else float("nan")
        parts = [f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)" if self.total_steps
                 else f"step {step}"]
        if done > 0:
            parts.append(f"{per_step:.3g} s/step")
        if self.total_steps and done > 0:
            parts.append(f"ETA {_hms(per_step * max(self.total_steps - step, 0))}")
        parts += [f"{label} {value:.4g}" for label, value in shown.items()]
        return " | ".join(parts)


def _val_label(dataset: str) -> str:
    """Console label of a validation dataset's accuracy: its name (``val``, ``val_blank``), prefixed
    with ``val`` when the name does not say it (``val mmk12``)."""
    return dataset if dataset.startswith("val") else f"val {dataset}"


def _as_float(tag: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {tag!r} is a tensor of shape {tuple(value.shape)}, not a scalar")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {tag!r} is {type(value).__name__} {value!r}, not a number") from None


def _isatty(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- reading back and plotting ------------------------------------------------------------------

def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files of ``logdir`` -> ``[(step, value), ...]`` sorted by step
    (events a resumed run purged are left out, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})  # 0: keep every event
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()[SCALARS]}


def plot_scalars(logdir: str | Path, tags: Sequence[str], out_png: str | Path,
                 title: Optional[str] = None) -> Optional[Path]:
    """A PNG with one panel per tag (step on x); None, with a warning, when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("plot_scalars: matplotlib is not installed (pip install matplotlib); no plot written. "
                       "read_scalars(%s) gives the numbers.", logdir)
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    scalars = read_scalars(logdir)
    missing = [t for t in tags if t not in scalars]
    if missing:
        raise KeyError(f"{logdir} has no scalars {missing}; it has {sorted(scalars)}")
    fig, axes = plt.subplots(len(tags), 1, figsize=(7, 2.6 * len(tags)), sharex=True, squeeze=False)
    for ax, tag in zip(axes[:, 0], tags):
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# ---- timing and throughput ----------------------------------------------------------------------

class StepTimer:
    """Wall-clock seconds per named section of a step, reported as ``timing_s/<name>``.

    ``with timer("rollout"): ...``; a section entered twice in a step (dynamic-sampling refills)
    adds up; sections may nest (``step`` around the others). On a GPU the device is synchronised at
    both ends of a section (``synchronize``, default: when CUDA is available), otherwise
    asynchronous kernels would be charged to whichever section happens to wait for them.
    """

    def __init__(self, synchronize: Optional[bool] = None):
        self.synchronize = torch.cuda.is_available() if synchronize is None else synchronize
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def time(self, name: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` timed as section ``name``; returns its result."""
        with self(name):
            return fn(*args, **kwargs)

    def metrics(self, reset: bool = True) -> dict[str, float]:
        out = {f"timing_s/{name}": s for name, s in self.seconds.items()}
        if reset:
            self.seconds = {}
        return out

    def _sync(self) -> None:
        if self.synchronize:
            torch.cuda.synchronize()


# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}


def device_peak_flops(device_name: Optional[str] = None) -> Optional[float]:
    """Peak bf16 FLOP/s of ``device_name`` (default: the current CUDA device); None on CPU or for a
    device not in ``PEAK_BF16_FLOPS``."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name.upper()), None)


def flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int,
                    backward: bool = True) -> float:
    """Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): ``6 N + 12 L d T`` for a
    forward + backward pass, ``2 N + 4 L d T`` for a forward only (the log-prob passes).

    ``N`` parameters (the matmuls: 2 FLOPs per parameter forward, twice that backward), ``L`` layers,
    ``d`` hidden size, ``T`` sequence length (prompt + response): the ``Q K^T`` and ``A V`` matmuls,
    PaLM's convention without halving for the causal mask. Embedding lookups count in ``N`` though
    they are no matmul; vision-tower tokens are not counted separately (a few % for Qwen2.5-VL).
    """
    matmul = 2 * num_params
    attention = 4 * num_layers * hidden_size * seq_len
    return float((matmul + attention) * (3 if backward else 1))


def perf_metrics(num_tokens: int, seconds: float, model_flops: Optional[float] = None, num_devices: int = 1,
                 peak_flops: Optional[float] = None) -> dict[str, float]:
    """``perf/tokens_per_s`` = ``num_tokens / seconds``; ``perf/mfu`` = ``model_flops / (seconds x
    num_devices x peak)`` when the peak is known (a GPU in ``PEAK_BF16_FLOPS``; never on CPU).

    ``model_flops``: e.g. ``update_tokens x flops_per_token(...) + logprob_tokens x
    flops_per_token(..., backward=False)`` over all ranks; ``seconds`` the time those passes took.
    """
    out = {"perf/tokens_per_s": num_tokens / seconds if seconds > 0 else float("nan")}
    peak = peak_flops if peak_flops is not None else device_peak_flops()
    if model_flops is not None and peak and seconds > 0:
        out["perf/mfu"] = model_flops / (seconds * num_devices * peak)
    return out
