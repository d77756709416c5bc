"""The dataset scan, cached: which rows of a data file are usable (and why each other row is not),
each kept row's prompt length and image sizes; computed once per file and settings, kept beside the file.

Why: the scan decodes every image and tokenises every prompt (ViRL39K: ~39K images, minutes of
CPU). Run by every rank at every start, it costs that many times over and hammers the shared
filesystem all at once.

Who scans: with torch.distributed initialised, global rank 0 alone reads the cache, or scans and
writes it; it broadcasts the result to the other ranks over a gloo group whose timeout
(``SCAN_TIMEOUT``) outlasts a whole scan, which a training collective's timeout might not. Every
rank thus gets the result whether or not it can read the cache's directory: a node-local
``data.scan_cache_dir`` works too (a restart that puts rank 0 on another node scans again). Without
torch.distributed (tools, tests) the process reads or writes the cache itself.

Where: ``.<file name>.<key>.scan.json`` beside the data file (on a shared filesystem in a multi-node
run), or in ``data.scan_cache_dir`` (read-only data). Written atomically (a temporary file in the
same directory, then ``os.replace``): a reader sees a whole cache or none. A failed write (a
read-only directory) is a warning; the run goes on with the scan it has.

Key: a sha256 of
- the file's content identity: its size, its mtime (ns) and a sha256 of its first and last MiB
  (``CONTENT_PROBE``). Two MiB read per start, whatever the file's size (a full hash of a 20 GB
  parquet would cost minutes); any rewrite moves the mtime, a copy without ``-p`` rescans once. An
  edit that keeps size, mtime and both ends goes unnoticed (don't);
- every setting the result depends on (``PromptDataset._scan_settings``): the column keys, the
  directory relative image paths resolve against, the pixel bounds, ``max_prompt_length``, the prompt
  template, the processor (the tokenizer's full serialisation: vocab, merges, normalisers, added
  tokens; the chat templates, the image token, patch and merge sizes), and ``SCAN_VERSION``, bumped
  whenever the scan's rules change.
Images stored as paths are not in the key (a stat per image would cost on a network filesystem what
the cache saves): an image file changed since the scan is caught when it is loaded (its size no
longer matches the scan's, ``PromptDataset.load_images``).

Row ids are not stored, only row indices: the ids are rebuilt from the dataset's names, so the same
file read under another name (another file list) uses the same cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from megatron_vgpo.data.sources import DatasetError

logger = logging.getLogger(__name__)

SCAN_VERSION = 1
"""Bump when the scan's rules (what is kept, how lengths are counted) change: old caches are ignored."""
CONTENT_PROBE = 1 << 20
"""Bytes hashed at each end of a data file for its cache key."""
SCAN_TIMEOUT = timedelta(hours=6)
"""How long the other ranks wait for rank 0's scan."""


@dataclass
class FileScan:
    """The scan of one data file."""

    num_rows: int
    kept: list[tuple[int, int, tuple[tuple[int, int], ...]]] = field(default_factory=list)
    """(row index, prompt length, (height, width) of each image after smart_resize), in row order."""
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    """(row index, SKIP_* reason, detail), in row order."""

    def to_json(self) -> dict:
        return {"num_rows": self.num_rows, "kept": [[i, n, [list(s) for s in sizes]] for i, n, sizes in self.kept],
                "skipped": [list(s) for s in self.skipped]}

    @classmethod
    def from_json(cls, data: dict) -> "FileScan":
        return cls(int(data["num_rows"]),
                   [(int(i), int(n), tuple((int(h), int(w)) for h, w in sizes)) for i, n, sizes in data["kept"]],
                   [(int(i), str(reason), str(detail)) for i, reason, detail in data["skipped"]])


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Size, mtime and a hash of the first and last ``CONTENT_PROBE`` bytes of ``path``."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(CONTENT_PROBE))
        if stat.st_size > CONTENT_PROBE:
            f.seek(max(CONTENT_PROBE, stat.st_size - CONTENT_PROBE))
            digest.update(f.read(CONTENT_PROBE))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ends_sha256": digest.hexdigest()}


_PROCESSOR_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def processor_fingerprint(processor) -> str:
    """A sha256 of everything of ``processor`` that the scan's result depends on (see the module
    docstring); computed once per processor object (hashing a real tokenizer takes a fraction of a second)."""
    try:
        return _PROCESSOR_FINGERPRINTS[processor]
    except (KeyError, TypeError):
        pass
    tok, image_processor = processor.tokenizer, processor.image_processor
    backend = getattr(tok, "backend_tokenizer", None)
    digest = hashlib.sha256()
    if backend is not None:  # a fast tokenizer: its tokenizer.json (vocab, merges, added tokens, ...)
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    for part in (type(processor).__name__, type(tok).__name__, getattr(processor, "chat_template", None),
                 getattr(tok, "chat_template", None), getattr(processor, "image_token", None),
                 image_processor.patch_size, image_processor.merge_size):
        digest.update(b"\0" + repr(part).encode())
    value = digest.hexdigest()
    try:
        _PROCESSOR_FINGERPRINTS[processor] = value
    except TypeError:  # not weak-referenceable: just not memoised
        pass
    return value


def scan_key(path: str | os.PathLike, settings: dict) -> str:
    """The cache key of ``path`` scanned with ``settings`` (a JSON-serialisable dict)."""
    blob = json.dumps({"version": SCAN_VERSION, "file": file_fingerprint(path), "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(path: str | os.PathLike, key: str, cache_dir: str = "") -> Path:
    """Where the scan of ``path`` under ``key`` is kept: beside it, or in ``cache_dir``."""
    path = Path(path)
    return Path(cache_dir or path.parent) / f".{path.name}.{key[:32]}.scan.json"


def read_scan(cache: Path, key: str, num_rows: int) -> Optional[FileScan]:
    """The cached scan, or None when there is none or it does not match (a damaged file is a warning)."""
    try:
        data = json.loads(cache.read_text())
        if data.get("key") != key:
            return None
        scan = FileScan.from_json(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("data: ignoring the unreadable scan cache %s (%s: %s); scanning again", cache,
                       type(e).__name__, e)
        return None
    return scan if scan.num_rows == num_rows else None


def write_scan(cache: Path, key: str, scan: FileScan, source: str) -> bool:
    """Write ``scan`` to ``cache`` atomically; False (with a warning) when the directory is not writable."""
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"key": key, "version": SCAN_VERSION, "source": source, **scan.to_json()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache)
        return True
    except OSError as e:
        logger.warning("data: cannot write the scan cache %s (%s); the next start scans %s again (set "
                       "data.scan_cache_dir to a writable directory)", cache, e, source)
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


def load_or_scan(path: str, num_rows: int, settings: Callable[[], dict], scan: Callable[[], FileScan],
                 cache_dir: str = "") -> FileScan:
    """The scan of ``path`` from its cache, or ``scan()`` written to the cache (this process only)."""
    key = scan_key(path, settings())
    cache = cache_path(path, key, cache_dir)
    result = read_scan(cache, key, num_rows)
    if result is not None:
        logger.info("data: %s: scan read from %s", path, cache)
        return result
    result = scan()
    if write_scan(cache, key, result, str(path)):
        logger.info("data: %s: scan written to %s", path, cache)
    return result


_GROUP: list = []  # [(default group, gloo group)]: one scan group per torch.distributed world


def _scan_group():
    world = dist.group.WORLD
    if not _GROUP or _GROUP[0][0] is not world:
        _GROUP[:] = [(world, dist.new_group(backend="gloo", timeout=SCAN_TIMEOUT))]
    return _GROUP[0][1]


def on_rank_zero(fn: Callable[[], object]) -> object:
    """``fn()`` run on global rank 0 and broadcast to every rank (just ``fn()`` without
    torch.distributed). A failure on rank 0 is raised on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    group = _scan_group()  # every rank, in the same order: creating a group is collective
    payload: list = [None]
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            payload = [(True, fn())]
        except Exception as e:
            error, payload = e, [(False, f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(payload, src=0, group=group)
    ok, value = payload[0]
    if error is not None:
        raise error
    if not ok:
        raise DatasetError(f"the dataset scan failed on rank 0: {value}")
    return value
