"""Training checkpoints: save, check, find and resume, atomically, with Megatron-Core ``dist_checkpointing``.

    ckpt = CheckpointManager(cfg.checkpoint, rank, world_size)
    resumed = ckpt.resume(model_chunks, optimizer)        # None: nothing to resume, start at step 0
    ...
    if ckpt.should_save(step, total_steps):
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
        complete.json       the completion marker and manifest, written last inside the directory
    step_00000150.tmp/      a save in progress (or one killed): never read, removed by the next save

Crash safety: a save writes everything into ``step_K.tmp/``; once every rank's files are written
rank 0 writes the marker, renames the directory to ``step_K/`` and only then replaces ``latest``
(write a temporary file, fsync, ``os.replace``). A kill at any moment therefore leaves ``latest``
naming the previous complete checkpoint: a ``.tmp`` directory is ignored, and a renamed ``step_K/``
that ``latest`` does not name yet is replaced when step K is saved again. Older checkpoints are
pruned (``keep_last``; 0 or less keeps all) only after ``latest`` has moved; so are complete
checkpoints of steps after ``latest`` (left by a run that was resumed from an earlier one).

Damage after the fact (a copy cut short, a failing disk, a deleted file): the marker is also a
manifest, every file of the checkpoint with its size, and a SHA-256 of each file of at most
``HASH_MAX_BYTES`` (every file but the ``.distcp`` shards of a real model; hashing those would
re-read the whole checkpoint). ``resume`` checks the checkpoint against it before loading (rank 0
checks, every rank gets the verdict); a checkpoint that fails the check, or whose load raises
anyway, is named with the file and the reason in one warning line, and the previous checkpoint is
tried, down to the oldest one; none left is a ``CheckpointError`` naming each. A load that failed
may have overwritten part of the model and optimizer in place: the next checkpoint's load
overwrites every tensor and every optimizer field the failed one could have touched (the same
sharded state dict, loaded in full, then the RNG), so the result equals a clean load of it.
``checkpoint.load_step`` picks a checkpoint explicitly (no fallback).

Asynchronous save (``checkpoint.async_save``, megatron-core's): ``save`` plans the write, stages
the shards in host memory (a device-to-host copy on GPU; on CPU the fork's copy-on-write snapshot),
starts the background writer process, writes the small per-rank files itself and returns; training
goes on while the shards are written. The commit (marker, rename, ``latest``) is the request's
finalization, run on every rank together once every rank's writer has finished: polled at each
``should_save`` (one all-reduce while a write is in flight), forced by the next ``save`` (one
write in flight at a time), by ``wait``, ``resume`` and ``load``. Only the periodic saves that
``should_save`` schedules are asynchronous: the last step's save, and any save it did not schedule
(a stop request's, a tool's), is complete when ``save`` returns, so a run that ends normally
never leaves a write uncommitted. A kill while the write is in flight leaves ``step_K.tmp/`` and the previous
``latest``, as above.

Exact resume: the RNG states are captured at the start of ``save`` and put back at its end (a save
never perturbs the run that continues after it; nor does the later commit of an asynchronous one),
and ``resume`` restores them last, so a resumed run draws the same random numbers as an
uninterrupted one. They are restored only when the world size is unchanged (per-rank streams do
not map onto a different layout); model and optimizer states load under any TP/PP layout through
``dist_checkpointing``.

All ranks call ``should_save``/``save``/``wait``/``resume``/``load`` together (they contain
collectives); only rank 0 checks manifests, renames, writes ``latest`` and prunes. ``save_dir``
must be one shared filesystem for all nodes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
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
from torch.distributed.checkpoint.api import CheckpointException

from megatron_vgpo.config.schema import CheckpointConfig
from megatron_vgpo.distributed.cpu_compat import apply_cpu_compat

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the marker carries the manifest ("files"); 1 (no manifest) still loads
LATEST = "latest"
MARKER = "complete.json"
TRAINER_STATE = "trainer_state.pt"
HF_CONFIG_DIR = "hf_config"  # where megatron_to_hf.py looks for config/tokenizer files by default
TMP_SUFFIX = ".tmp"
HASH_MAX_BYTES = 64 << 20  # files up to this size get a SHA-256 in the manifest; larger: size only
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_MEGATRON_FILES = ("metadata.json", ".metadata", "common.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, damaged or unreadable; the message names the path
    (and the file, when one file is at fault)."""


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


def resolve_async_save(setting) -> bool:
    """``checkpoint.async_save``: ``"auto"`` is asynchronous where CUDA is available (the write then
    overlaps GPU training and costs the device-to-host copy), synchronous on CPU (a CPU trainer
    would share its cores with the writer and gain little); ``True``/``False`` force it (the async
    path works on CPU/gloo too, which is how the tests run it)."""
    if setting == "auto":
        return torch.cuda.is_available()
    return bool(setting)


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


# ---- integrity: the manifest and the checks --------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_manifest(root: Path) -> dict[str, dict]:
    """``{relative path: {"size": bytes[, "sha256": hex]}}`` of every file under ``root`` but the
    marker; the hash only for files of at most ``HASH_MAX_BYTES``."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MARKER:
            size = path.stat().st_size
            entry = {"size": size}
            if size <= HASH_MAX_BYTES:
                entry["sha256"] = _sha256(path)
            files[path.relative_to(root).as_posix()] = entry
    return files


def _read_marker(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MARKER} (a save that did not finish, "
                              f"or the marker was removed)")
    try:
        marker = json.loads(marker_path.read_text())
        int(marker["world_size"])
        for entry in marker.get("files", {}).values():  # the manifest, when there is one (format 2)
            int(entry["size"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{marker_path} is corrupt ({type(e).__name__}: {e})") from e
    return marker


def _check_manifest(path: Path, files: dict[str, dict]) -> None:
    """Every file of the manifest is there with its size (and its hash, where recorded)."""
    missing = [rel for rel in files if not (path / rel).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing[:5])}"
                              f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    for rel, entry in files.items():
        size = (path / rel).stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {rel} has {size} bytes, {MARKER} records "
                                  f"{entry['size']} ({'cut short' if size < entry['size'] else 'overwritten'}?)")
    for rel, entry in files.items():
        if "sha256" in entry and _sha256(path / rel) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {rel} does not match its SHA-256 in {MARKER} "
                                  f"(corrupted)")


def check_megatron_files(path: Path) -> None:
    """What a ``torch_dist`` directory without our manifest (``hf_to_megatron.py``'s, or a format-1
    training checkpoint) allows checking: ``metadata.json`` parses, DCP's ``.metadata`` unpickles,
    ``common.pt`` is there, and every ``.distcp`` file is at least as long as the byte ranges that
    ``.metadata``'s storage records place in it. CheckpointError naming the file otherwise."""
    from torch.distributed.checkpoint import FileSystemReader

    missing = [name for name in _MEGATRON_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        backend = json.loads((path / "metadata.json").read_text())["sharded_backend"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'metadata.json'} is corrupt ({type(e).__name__}: {e})") from e
    if backend != "torch_dist":
        return  # another Megatron backend: nothing more we know how to check
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data or {}
    except Exception as e:  # unpickling garbage raises anything
        raise CheckpointError(f"{path / '.metadata'} is corrupt ({type(e).__name__}: {e})") from e
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(ends.items()):
        if not (path / rel).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {rel} (listed in .metadata)")
        size = (path / rel).stat().st_size
        if size < end:
            raise CheckpointError(f"checkpoint {path} is damaged: {rel} has {size} bytes, .metadata places data "
                                  f"up to byte {end} (cut short?)")


def verify_checkpoint(path: str | Path) -> dict:
    """The marker of a complete, undamaged training checkpoint; CheckpointError naming the path, the
    file and the reason otherwise. Cost: one ``stat`` per file and a read of the hashed (small)
    files; no shard is read."""
    path = Path(path)
    marker = _read_marker(path)
    expected = [*_MEGATRON_FILES, TRAINER_STATE, *(_rank_file(r) for r in range(int(marker["world_size"])))]
    missing = [name for name in expected if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if "files" in marker:
        _check_manifest(path, marker["files"])
    else:  # format 1: no manifest
        check_megatron_files(path)
    return marker


def verify_megatron_dir(path: str | Path) -> None:
    """Any Megatron ``torch_dist`` directory: a training checkpoint (it has ``complete.json``) against
    its manifest, any other (e.g. ``hf_to_megatron.py``'s) with ``check_megatron_files``."""
    path = Path(path)
    if (path / MARKER).is_file():
        verify_checkpoint(path)
    else:
        check_megatron_files(path)


def _describe(error: BaseException) -> str:
    """One line for a load failure (torch's CheckpointException prints a traceback per rank)."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (cause, _) = next(iter(error.failures.items()))
        error, where = cause, f" on rank {rank}"
    else:
        where = ""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}{where}: {text[:200]}{'...' if len(text) > 200 else ''}"


# ---- model state ---------------------------------------------------------------------------------

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


_ASYNC_QUEUE = None  # megatron-core's AsyncCallsQueue: one per process, shared by every manager


def _async_queue():
    """The process's queue of asynchronous saves. One for the process, not one per manager: a
    checkpoint saved by one manager must be committed before another one reads (``load`` waits)."""
    global _ASYNC_QUEUE
    if _ASYNC_QUEUE is None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        _ASYNC_QUEUE = AsyncCallsQueue()
    return _ASYNC_QUEUE


class CheckpointManager:
    """Atomic step checkpoints in ``cfg.save_dir``, checked automatic resume with fallback, and
    asynchronous saves (see the module docstring).

    ``rank``/``world_size`` are this process's global coordinates; ``group`` is the process group the
    barriers run in (default: the whole world, which ``dist_checkpointing`` uses anyway).
    ``dp_group``: the data-parallel group; when given, the model replicas share the writing
    (Megatron's fully parallel save), otherwise DP rank 0 writes every shard of its replica.
    ``phase_hook``, for crash-injection tests, is called with the name of each save phase right
    after it: ``sharded_written``, ``files_written``, ``marked``, ``renamed``, ``latest_moved``;
    asynchronous saves call ``files_written`` and ``write_started`` in ``save``, and
    ``sharded_written`` when the write has completed on every rank, before the commit.
    """

    def __init__(self, cfg: CheckpointConfig, rank: int, world_size: int, group=None, dp_group=None,
                 phase_hook: Optional[Callable[[str], None]] = None):
        self.cfg, self.rank, self.world_size, self.group, self.dp_group = cfg, rank, world_size, group, dp_group
        self.save_dir = Path(cfg.save_dir)
        self.async_save = resolve_async_save(cfg.async_save)
        self._phase_hook = phase_hook
        self._last_step: Optional[int] = None  # last step saved or loaded by this manager
        self._async_step: Optional[int] = None  # the periodic save should_save just scheduled

    # ---- public API ----------------------------------------------------------------------------

    def should_save(self, step: int, total_steps: int) -> bool:
        """Every ``save_interval`` steps and at the last step (``save_interval`` 0: the last only).

        The periodic saves it schedules (not the last step's) are the asynchronous ones. Also the
        per-step hook of asynchronous saves: commits one whose write has finished on every rank
        (collective while a write is in flight: every rank calls this every step, as the trainer does).
        """
        self._finalize(blocking=False)
        interval = self.cfg.save_interval
        due = step == total_steps or (interval > 0 and step % interval == 0)
        self._async_step = step if due and step != total_steps else None
        return due

    def save(self, step: int, model, optimizer=None, scheduler_state: Optional[dict] = None,
             data_state: Optional[dict] = None, extra: Optional[dict] = None,
             hf_config_dir: Optional[str | Path] = None) -> Path:
        """Write the checkpoint of (completed) ``step``; returns its directory. Collective.

        ``model``: this rank's model chunk(s) (modules with ``sharded_state_dict``, possibly wrapped
        in Megatron's DDP). ``optimizer``: a Megatron optimizer (sharded, reshardable) or a plain
        torch optimizer (saved per rank). ``extra``: anything else an exact resume needs (consumed
        samples, best metric, ...). ``hf_config_dir``: config/tokenizer files copied into the
        checkpoint so that the HF export needs no ``--hf-config``.

        Asynchronous (``self.async_save``) for the periodic save ``should_save`` just scheduled:
        returns once the write has started; the directory exists once it is committed. Any other
        save (the last step's, a stop request's, a tool's: the caller may exit or read it next) is
        complete, with any save still in flight, when ``save`` returns.
        """
        final = self.save_dir / step_dir_name(step)
        asynchronous, self._async_step = self.async_save and step == self._async_step, None
        if step == self._last_step:  # e.g. the final save right after an interval save
            logger.info("checkpoint: step %d is already saved in %s", step, final)
        else:
            self.wait()  # one write in flight at a time
            self._start_save(step, final, model, optimizer, scheduler_state, data_state, extra, hf_config_dir,
                             asynchronous)
        if not asynchronous:
            self.wait()
        return final

    def wait(self) -> None:
        """Block until an asynchronous save in flight is written by every rank, and commit it.
        Collective when one is in flight; nothing to do otherwise."""
        self._finalize(blocking=True)

    def find_latest(self) -> Optional[Path]:
        """The directory ``latest`` names (checked complete and undamaged), or None when there is no
        checkpoint. CheckpointError when it fails the check (``resume`` falls back instead).

        Without a ``latest`` file, the newest complete ``step_*`` directory is taken (with a
        warning); ``.tmp`` directories are never candidates.
        """
        latest = self.save_dir / LATEST
        if latest.is_file():
            name = latest.read_text().strip()
            if not _STEP_DIR.match(name):
                raise CheckpointError(f"{latest} names {name!r}, not a step_NNNNNNNN directory")
            path = self.save_dir / name
            verify_checkpoint(path)
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
        """Load the latest checkpoint that passes its check and loads, when ``cfg.resume`` is set and
        one exists; else None. ``cfg.load_step`` >= 0 loads that step's checkpoint, or fails.
        Collective; every rank loads the same checkpoint (rank 0 decides).

        Also removes leftover ``.tmp`` directories of killed saves (rank 0).
        """
        if not self.cfg.resume:
            if self.rank == 0:
                logger.info("checkpoint: checkpoint.resume is off; starting from scratch")
            return None
        self.wait()
        if self.rank == 0 and self.save_dir.is_dir():
            self._remove_tmp_dirs()
        candidates = [Path(p) for p in self._from_rank0(self._candidates)]
        if not candidates:
            if self.rank == 0:
                logger.info("checkpoint: no checkpoint in %s; starting from scratch", self.save_dir)
            return None
        failures = []
        for i, path in enumerate(candidates):
            state, reason = self._try_load(path, model, optimizer)
            if state is not None:
                return state
            failures.append(reason)
            if self.rank == 0 and i + 1 < len(candidates):
                logger.warning("%s; falling back to the previous checkpoint %s", reason, candidates[i + 1].name)
        if self.cfg.load_step >= 0:
            raise CheckpointError(f"checkpoint.load_step={self.cfg.load_step}: {failures[0]}")
        raise CheckpointError(f"no usable checkpoint in {self.save_dir}: " + "; ".join(failures)
                              + ". Move the damaged checkpoints away, or set checkpoint.resume=false to start "
                                "from scratch")

    def load(self, path: str | Path, model, optimizer=None) -> ResumeState:
        """Restore model, optimizer and (same world size) RNG states from the checkpoint at ``path``
        after checking it; CheckpointError naming the damage or the load failure. Collective."""
        self.wait()
        state, reason = self._try_load(Path(path), model, optimizer)
        if state is None:
            raise CheckpointError(reason)
        return state

    # ---- saving --------------------------------------------------------------------------------

    def _phase(self, name: str) -> None:
        if self._phase_hook is not None:
            self._phase_hook(name)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    def _start_save(self, step: int, final: Path, model, optimizer, scheduler_state, data_state, extra,
                    hf_config_dir, asynchronous: bool) -> None:
        rng = capture_rng_state()
        start = time.perf_counter()
        tmp = self._begin(step)
        request = self._write_sharded(tmp, model, optimizer, asynchronous)
        if request is None:
            self._phase("sharded_written")
        self._write_small_files(tmp, step, rng, scheduler_state, data_state, extra, optimizer, hf_config_dir)
        self._phase("files_written")
        self._last_step = step
        if request is None:
            self._finish(tmp, final, step, start)
        else:  # scheduled last: nothing can fail in this call after the write is in flight
            request.add_finalize_fn(functools.partial(self._finish, tmp, final, step, start, asynchronous=True))
            _async_queue().schedule_async_request(request)
            self._phase("write_started")
        if request is not None and self.rank == 0:
            logger.info("checkpoint: writing step %d in the background (training resumed after %.1f s)",
                        step, time.perf_counter() - start)
        restore_rng_state(rng)  # whatever the save drew, the run goes on as if it had not saved

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

    def _write_sharded(self, tmp: Path, model, optimizer, asynchronous: bool):
        """Model and (Megatron) optimizer states through ``dist_checkpointing`` (torch_dist format).
        Asynchronous: returns megatron-core's ``AsyncRequest`` (the write not started yet)."""
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
        kwargs = {}
        if asynchronous:
            kwargs["async_sharded_save"] = True
            if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
                kwargs["async_strategy"] = "mcore"  # 0.17 defaults to NVRx's writer, which has its own queue
        return dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy, **kwargs)

    def _write_small_files(self, tmp: Path, step: int, rng: dict, scheduler_state, data_state, extra, optimizer,
                           hf_config_dir) -> None:
        """The per-rank file, and on rank 0 the trainer state and the HF config files: small, so
        written synchronously even when the shards are written in the background."""
        state = {"rng": rng, "data": data_state,
                 "optimizer": None if optimizer is None or hasattr(optimizer, "sharded_state_dict")
                 else optimizer.state_dict()}
        _write_durable(tmp / _rank_file(self.rank), lambda f: torch.save(state, f))
        if self.rank == 0:
            trainer_state = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                             "scheduler": scheduler_state, "data": data_state, "extra": extra or {}}
            _write_durable(tmp / TRAINER_STATE, lambda f: torch.save(trainer_state, f))
            if hf_config_dir:
                from megatron_vgpo.checkpoint.hf_io import copy_non_weight_files

                copy_non_weight_files(Path(hf_config_dir), tmp / HF_CONFIG_DIR)

    def _finish(self, tmp: Path, final: Path, step: int, start: float, asynchronous: bool = False) -> None:
        """Every rank, once every rank's files are written: rank 0 commits and prunes. For an
        asynchronous save this is the request's last finalize function (after megatron-core's own,
        which write ``.metadata`` and ``metadata.json``)."""
        if asynchronous:
            self._phase("sharded_written")
        self._barrier()  # every rank's files are on disk
        if self.rank == 0:
            manifest_s, total_bytes = self._commit(tmp, final, step, time.perf_counter() - start)
            self._prune(step)
        self._barrier()  # nobody goes on (or loads) before the commit
        if self.rank == 0:
            logger.info("checkpoint: saved step %d to %s in %.1f s%s (%.1f MB; manifest %.2f s)", step, final,
                        time.perf_counter() - start, ", written in the background" if asynchronous else "",
                        total_bytes / 1e6, manifest_s)

    def _commit(self, tmp: Path, final: Path, step: int, seconds: float) -> tuple[float, int]:
        """Rank 0: manifest and marker, rename, then ``latest`` (the order is the crash-safety
        argument). Returns the manifest's seconds and the checkpoint's bytes."""
        for name in (*_MEGATRON_FILES, TRAINER_STATE):  # Megatron writes these without fsync
            _fsync_path(tmp / name)
        manifest_start = time.perf_counter()
        files = build_manifest(tmp)
        manifest_s = time.perf_counter() - manifest_start
        marker = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                  "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "save_seconds": round(seconds, 3),
                  "hash": "sha256", "hash_max_bytes": HASH_MAX_BYTES, "files": files}
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
        return manifest_s, sum(entry["size"] for entry in files.values())

    def _finalize(self, blocking: bool) -> None:
        """Commit the asynchronous saves whose writes have finished on every rank (all of them when
        ``blocking``). The RNG is put back afterwards, as after a synchronous save."""
        if _ASYNC_QUEUE is None or not _ASYNC_QUEUE.get_num_unfinalized_calls():
            return
        rng = capture_rng_state()
        try:
            _ASYNC_QUEUE.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointException as e:  # a BaseException: would slip past `except Exception` cleanups
            raise CheckpointError(f"an asynchronous checkpoint write failed ({_describe(e)}); `latest` still names "
                                  f"the previous checkpoint") from e
        finally:
            restore_rng_state(rng)

    # ---- resuming ------------------------------------------------------------------------------

    def _candidates(self) -> list[str]:
        """Rank 0: the checkpoints ``resume`` tries, in order. ``load_step``: that one alone. Else the
        one ``latest`` names, then every older ``step_*`` directory, newest first (without a usable
        ``latest``: every ``step_*`` directory, newest first)."""
        if self.cfg.load_step >= 0:
            return [str(self.save_dir / step_dir_name(self.cfg.load_step))]
        if not self.save_dir.is_dir():
            return []
        steps = sorted((int(m.group(1)) for p in self.save_dir.iterdir()
                        if (m := _STEP_DIR.match(p.name)) and p.is_dir()), reverse=True)
        latest = self.save_dir / LATEST
        name = latest.read_text().strip() if latest.is_file() else None
        if name is not None and _STEP_DIR.match(name):
            newest = int(name.removeprefix("step_"))
            steps = [newest] + [s for s in steps if s < newest]
        elif name is not None:
            logger.warning("checkpoint: %s names %r, not a step_NNNNNNNN directory; trying every checkpoint in %s, "
                           "newest first", latest, name, self.save_dir)
        elif steps:
            logger.warning("checkpoint: %s has no '%s' file; trying every checkpoint, newest first",
                           self.save_dir, LATEST)
        return [str(self.save_dir / step_dir_name(s)) for s in steps]

    def _try_load(self, path: Path, model, optimizer) -> tuple[Optional[ResumeState], Optional[str]]:
        """Check, then load ``path``: ``(state, None)``, or ``(None, reason)`` on every rank when the
        check fails on rank 0 or the load raises on any rank."""
        def check():
            try:
                return verify_checkpoint(path), None
            except CheckpointError as e:
                return None, str(e)

        start = time.perf_counter()
        marker, reason = self._from_rank0(check)
        if reason is not None:
            return None, reason
        check_s = time.perf_counter() - start
        try:
            state, error = self._load_checked(path, marker, model, optimizer), None
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            state, error = None, _describe(e)
        errors = [error]
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            errors = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(errors, error, group=self.group)
        failed = [f"rank {r}: {e}" if len(errors) > 1 else e for r, e in enumerate(errors) if e is not None]
        if failed:
            return None, f"checkpoint {path} passed its check but failed to load ({'; '.join(failed[:2])})"
        self._last_step = state.step
        if self.rank == 0:
            logger.info("checkpoint: resumed from %s (step %d) in %.1f s (check %.2f s)", path, state.step,
                        time.perf_counter() - start, check_s)
        return state, None

    def _load_checked(self, path: Path, marker: dict, model, optimizer) -> ResumeState:
        """Restore model, optimizer and (same world size) RNG states from a checked checkpoint."""
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
        return ResumeState(step=trainer_state["step"], path=path, scheduler=trainer_state["scheduler"],
                           data=rank_state["data"] if rank_state is not None else trainer_state["data"],
                           extra=trainer_state["extra"], rng_restored=rank_state is not None)

    def _from_rank0(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0 and broadcast, so that every rank acts on the same decision."""
        if not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return fn()
        box = [fn() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    # ---- housekeeping --------------------------------------------------------------------------

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
