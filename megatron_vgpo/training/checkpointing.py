"""Training checkpoints: save, find and resume, atomically, with Megatron-Core ``dist_checkpointing``.

    ckpt = CheckpointManager(cfg.checkpoint, rank, world_size)
    resumed = ckpt.resume(model_chunks, optimizer)        # None: nothing to resume, start at step 0
    ...
    ckpt.save(step, model_chunks, optimizer, scheduler.state_dict(), loader.state_dict(), extra)

Layout of ``save_dir``::

    latest                  text file naming the newest COMPLETE checkpoint ("step_00000100")
    step_00000100/          a complete checkpoint; also a Megatron ``torch_dist`` directory, so
        .metadata *.distcp  ``checkpoint_conversion/megatron_to_hf.py --megatron-dir`` takes it as is
        common.pt metadata.json   (Megatron's files: model + optimizer, resharded on load)
        trainer_state.pt    step, LR-scheduler state, data position (rank 0's), extra
        rank_00000.pt ...   per rank: RNG states (python, numpy, torch CPU/CUDA, Megatron's tracker),
                            data position, and a plain torch optimizer's state when it has no
                            ``sharded_state_dict``
        hf_config/          optional: config/tokenizer files for the HF export
        complete.json       the completion marker, written last inside the directory
    step_00000150.tmp/      a save in progress (or one killed): never read, removed by the next save

Crash safety: a save writes everything into ``step_K.tmp/``; after a barrier rank 0 writes the
marker, renames the directory to ``step_K/`` and only then replaces ``latest`` (write a temporary
file, fsync, ``os.replace``). A kill at any moment therefore leaves ``latest`` naming the previous
complete checkpoint: a ``.tmp`` directory is ignored, and a renamed ``step_K/`` that ``latest`` does
not name yet is replaced when step K is saved again. Older checkpoints are pruned (``keep_last``;
0 or less keeps all) only after ``latest`` has moved; so are complete checkpoints of steps after
``latest`` (left by a run that was resumed from an earlier one).

Exact resume: the RNG states are captured at the start of ``save`` and put back at its end (a save
never perturbs the run that continues after it), and ``resume`` restores them last, so a resumed
run draws the same random numbers as an uninterrupted one. They are restored only when the world
size is unchanged (per-rank streams do not map onto a different layout); model and optimizer states
load under any TP/PP layout through ``dist_checkpointing``.

All ranks call ``save``/``resume``/``load`` together (they contain collectives); only rank 0
renames, writes ``latest`` and prunes. ``save_dir`` must be one shared filesystem for all nodes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_vgpo.config.schema import CheckpointConfig
from megatron_vgpo.distributed.cpu_compat import apply_cpu_compat

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest"
MARKER = "complete.json"
TRAINER_STATE = "trainer_state.pt"
HF_CONFIG_DIR = "hf_config"  # where megatron_to_hf.py looks for config/tokenizer files by default
TMP_SUFFIX = ".tmp"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_MEGATRON_FILES = ("metadata.json", ".metadata", "common.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the path."""


@dataclass
class ResumeState:
    """What ``resume``/``load`` hand back after restoring the model, optimizer and RNG in place."""

    step: int  # the last completed step; training continues with step + 1
    path: Path
    scheduler: Optional[dict]  # for ``scheduler.load_state_dict``
    data: Optional[dict]  # for ``loader.load_state_dict``
    extra: dict = field(default_factory=dict)
    rng_restored: bool = True  # False when the world size changed (not bit-exact then)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- RNG -----------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """Every random stream a training step may draw from, copied (python, numpy, torch CPU, CUDA
    when present, and the Megatron tracker's named states used for TP-region dropout)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch_cpu": torch.get_rng_state(),
             "megatron_tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if state["megatron_tracker"]:
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["megatron_tracker"].items()})


# ---- small durable file helpers --------------------------------------------------------------------

def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list: makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    with open(path, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _torch_load(path: Path) -> Any:
    # Our own files hold numpy RNG states and arbitrary dicts: weights_only would reject them.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e}); the checkpoint is corrupt") from e


def _chunks(model) -> list:
    """This rank's model chunks without Megatron's wrappers (DDP, Float16Module, FSDP): a wrapper's
    own ``sharded_state_dict`` would prefix every key with ``module.``."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model) if isinstance(model, (list, tuple)) else [model])


def _model_sharded_state(chunks: list) -> dict:
    # Same convention as megatron_vgpo.checkpoint.model_io: virtual-pipeline chunks go under model<i>.
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _dist_checkpointing():
    from megatron.core import dist_checkpointing
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401  (lazy import, patch it on CPU)

    apply_cpu_compat()
    return dist_checkpointing


class CheckpointManager:
    """Atomic step checkpoints in ``cfg.save_dir`` and automatic resume (see the module docstring).

    ``rank``/``world_size`` are this process's global coordinates; ``group`` is the process group the
    barriers run in (default: the whole world, which ``dist_checkpointing`` uses anyway).
    ``dp_group``: the data-parallel group; when given, the model replicas share the writing
    (Megatron's fully parallel save), otherwise DP rank 0 writes every shard of its replica.
    ``phase_hook``, for crash-injection tests, is called with the name of each save phase
    (``sharded_written``, ``files_written``, ``marked``, ``renamed``, ``latest_moved``) right after it.
    """

    def __init__(self, cfg: CheckpointConfig, rank: int, world_size: int, group=None, dp_group=None,
                 phase_hook: Optional[Callable[[str], None]] = None):
        self.cfg, self.rank, self.world_size, self.group, self.dp_group = cfg, rank, world_size, group, dp_group
        self.save_dir = Path(cfg.save_dir)
        self._phase_hook = phase_hook
        self._last_step: Optional[int] = None  # last step saved or loaded by this manager

    # ---- public API ----------------------------------------------------------------------------

    def should_save(self, step: int, total_steps: int) -> bool:
        """Every ``save_interval`` steps and at the last step (``save_interval`` 0: the last only)."""
        interval = self.cfg.save_interval
        return step == total_steps or (interval > 0 and step % interval == 0)

    def save(self, step: int, model, optimizer=None, scheduler_state: Optional[dict] = None,
             data_state: Optional[dict] = None, extra: Optional[dict] = None,
             hf_config_dir: Optional[str | Path] = None) -> Path:
        """Write the checkpoint of (completed) ``step``; returns its directory. Collective.

        ``model``: this rank's model chunk(s) (modules with ``sharded_state_dict``, possibly wrapped
        in Megatron's DDP). ``optimizer``: a Megatron optimizer (sharded, reshardable) or a plain
        torch optimizer (saved per rank). ``extra``: anything else an exact resume needs (consumed
        samples, best metric, ...). ``hf_config_dir``: config/tokenizer files copied into the
        checkpoint so that the HF export needs no ``--hf-config``.
        """
        final = self.save_dir / step_dir_name(step)
        if step == self._last_step:  # e.g. the final save right after an interval save
            logger.info("checkpoint: step %d is already saved in %s", step, final)
            return final
        rng = capture_rng_state()
        start = time.perf_counter()
        tmp = self._begin(step)
        self._write_sharded(tmp, model, optimizer)
        sharded_s = time.perf_counter() - start
        self._phase("sharded_written")

        self._write_rank_file(tmp, rng, data_state, optimizer)
        if self.rank == 0:
            trainer_state = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                             "scheduler": scheduler_state, "data": data_state, "extra": extra or {}}
            _write_durable(tmp / TRAINER_STATE, lambda f: torch.save(trainer_state, f))
            if hf_config_dir:
                from megatron_vgpo.checkpoint.hf_io import copy_non_weight_files

                copy_non_weight_files(Path(hf_config_dir), tmp / HF_CONFIG_DIR)
        self._phase("files_written")
        self._barrier()  # every rank's files are on disk

        if self.rank == 0:
            self._commit(tmp, final, step, time.perf_counter() - start)
            self._prune(step)
        self._barrier()  # nobody goes on (or loads) before the commit
        self._last_step = step
        restore_rng_state(rng)  # whatever the save drew, the run goes on as if it had not saved
        if self.rank == 0:
            logger.info("checkpoint: saved step %d to %s in %.1f s (model+optimizer %.1f s, %.1f MB)",
                        step, final, time.perf_counter() - start, sharded_s, _dir_bytes(final) / 1e6)
        return final

    def find_latest(self) -> Optional[Path]:
        """The directory ``latest`` names (checked complete), or None when there is no checkpoint.

        Without a ``latest`` file, the newest complete ``step_*`` directory is taken (with a
        warning); ``.tmp`` directories are never candidates.
        """
        latest = self.save_dir / LATEST
        if latest.is_file():
            name = latest.read_text().strip()
            if not _STEP_DIR.match(name):
                raise CheckpointError(f"{latest} names {name!r}, not a step_NNNNNNNN directory")
            path = self.save_dir / name
            self.check_complete(path)
            return path
        complete = self._complete_steps()
        if not complete:
            return None
        path = self.save_dir / step_dir_name(complete[-1])
        if self.rank == 0:
            logger.warning("checkpoint: %s has no '%s' file; taking the newest complete checkpoint %s",
                           self.save_dir, LATEST, path)
        return path

    def resume(self, model, optimizer=None) -> Optional[ResumeState]:
        """Load the latest checkpoint when ``cfg.resume`` is set and one exists; else None. Collective.

        Also removes leftover ``.tmp`` directories of killed saves (rank 0).
        """
        if not self.cfg.resume:
            if self.rank == 0:
                logger.info("checkpoint: checkpoint.resume is off; starting from scratch")
            return None
        if self.rank == 0 and self.save_dir.is_dir():
            self._remove_tmp_dirs()
        path = self.find_latest()
        if path is None:
            if self.rank == 0:
                logger.info("checkpoint: no checkpoint in %s; starting from scratch", self.save_dir)
            return None
        return self.load(path, model, optimizer)

    def load(self, path: str | Path, model, optimizer=None) -> ResumeState:
        """Restore model, optimizer and (same world size) RNG states from ``path``. Collective."""
        path = Path(path)
        start = time.perf_counter()
        marker = self.check_complete(path)
        chunks = _chunks(model)
        model_state = _model_sharded_state(chunks)
        state = {"model": model_state}
        sharded_optimizer = optimizer is not None and hasattr(optimizer, "sharded_state_dict")
        if sharded_optimizer:
            state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch DCP deprecations inside Megatron
            loaded = _dist_checkpointing().load(state, str(path))
        if len(chunks) == 1:
            chunks[0].load_state_dict(loaded["model"], strict=True)
        else:
            for i, chunk in enumerate(chunks):
                chunk.load_state_dict(loaded["model"][f"model{i}"], strict=True)
        if sharded_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])

        trainer_state = _torch_load(path / TRAINER_STATE)
        same_world = marker["world_size"] == self.world_size
        rank_state = _torch_load(path / _rank_file(self.rank)) if same_world else None
        if optimizer is not None and not sharded_optimizer:
            if rank_state is None or rank_state.get("optimizer") is None:
                raise CheckpointError(f"{path}: the optimizer has no sharded_state_dict and its per-rank state "
                                      f"cannot be loaded (saved with world size {marker['world_size']}, "
                                      f"now {self.world_size}, or saved without it)")
            optimizer.load_state_dict(rank_state["optimizer"])
        if rank_state is not None:
            restore_rng_state(rank_state["rng"])
        elif self.rank == 0:
            logger.warning("checkpoint: world size changed (%d -> %d): RNG states not restored, so the "
                           "resumed run is not bit-identical to an uninterrupted one",
                           marker["world_size"], self.world_size)
        self._barrier()
        self._last_step = trainer_state["step"]
        if self.rank == 0:
            logger.info("checkpoint: resumed from %s (step %d) in %.1f s", path, trainer_state["step"],
                        time.perf_counter() - start)
        return ResumeState(step=trainer_state["step"], path=path, scheduler=trainer_state["scheduler"],
                           data=rank_state["data"] if rank_state is not None else trainer_state["data"],
                           extra=trainer_state["extra"], rng_restored=rank_state is not None)

    def check_complete(self, path: str | Path) -> dict:
        """The marker of a complete checkpoint; CheckpointError naming the path and what is missing."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        marker_path = path / MARKER
        if not marker_path.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: no {MARKER} (a save that did not finish?)")
        try:
            marker = json.loads(marker_path.read_text())
            world_size = int(marker["world_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{marker_path} is corrupt ({type(e).__name__}: {e})") from e
        expected = [*_MEGATRON_FILES, TRAINER_STATE, *(_rank_file(r) for r in range(world_size))]
        missing = [name for name in expected if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
        return marker

    # ---- internals -----------------------------------------------------------------------------

    def _phase(self, name: str) -> None:
        if self._phase_hook is not None:
            self._phase_hook(name)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    def _begin(self, step: int) -> Path:
        """Rank 0 clears leftovers of killed saves and creates the fresh temporary directory."""
        tmp = self.save_dir / (step_dir_name(step) + TMP_SUFFIX)
        if self.rank == 0:
            logger.info("checkpoint: saving step %d to %s ...", step, self.save_dir / step_dir_name(step))
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self._remove_tmp_dirs()
            tmp.mkdir()
        self._barrier()
        return tmp

    def _write_sharded(self, tmp: Path, model, optimizer) -> None:
        """Model and (Megatron) optimizer states through ``dist_checkpointing`` (torch_dist format)."""
        dist_checkpointing = _dist_checkpointing()
        state = {"model": _model_sharded_state(_chunks(model))}
        if optimizer is not None and hasattr(optimizer, "sharded_state_dict"):
            state["optimizer"] = optimizer.sharded_state_dict(state["model"])
        strategy = None
        if self.dp_group is not None:
            from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelSaveStrategyWrapper,
            )

            strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), self.dp_group)
        dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy)

    def _write_rank_file(self, tmp: Path, rng: dict, data_state, optimizer) -> None:
        state = {"rng": rng, "data": data_state,
                 "optimizer": None if optimizer is None or hasattr(optimizer, "sharded_state_dict")
                 else optimizer.state_dict()}
        _write_durable(tmp / _rank_file(self.rank), lambda f: torch.save(state, f))

    def _commit(self, tmp: Path, final: Path, step: int, seconds: float) -> None:
        """Rank 0: marker, rename, then ``latest`` (the order is the crash-safety argument)."""
        for name in (*_MEGATRON_FILES, TRAINER_STATE):  # Megatron writes these without fsync
            _fsync_path(tmp / name)
        marker = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                  "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "save_seconds": round(seconds, 3)}
        _write_durable(tmp / MARKER, lambda f: f.write(json.dumps(marker, indent=1)), mode="w")
        _fsync_path(tmp)
        self._phase("marked")
        if final.exists():  # a complete save of this step from a killed run that `latest` never named
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_path(self.save_dir)
        self._phase("renamed")
        latest_tmp = self.save_dir / (LATEST + TMP_SUFFIX)
        _write_durable(latest_tmp, lambda f: f.write(final.name + "\n"), mode="w")
        os.replace(latest_tmp, self.save_dir / LATEST)
        _fsync_path(self.save_dir)
        self._phase("latest_moved")

    def _complete_steps(self) -> list[int]:
        if not self.save_dir.is_dir():
            return []
        steps = []
        for p in self.save_dir.iterdir():
            match = _STEP_DIR.match(p.name)
            if match and p.is_dir() and (p / MARKER).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def _prune(self, latest_step: int) -> None:
        """Rank 0, after ``latest`` moved: keep the ``keep_last`` newest checkpoints up to the latest;
        drop newer ones too (left by a run that was resumed from an earlier checkpoint)."""
        steps = self._complete_steps()
        older = [s for s in steps if s <= latest_step]
        doomed = [s for s in steps if s > latest_step]
        if self.cfg.keep_last > 0:
            doomed += older[:-self.cfg.keep_last]
        for s in doomed:
            shutil.rmtree(self.save_dir / step_dir_name(s), ignore_errors=True)
            logger.info("checkpoint: removed %s (keep_last=%d)", self.save_dir / step_dir_name(s), self.cfg.keep_last)

    def _remove_tmp_dirs(self) -> None:
        for p in self.save_dir.glob("*" + TMP_SUFFIX):
            logger.info("checkpoint: removing %s left by an interrupted save", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
