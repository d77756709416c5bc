"""The prompt dataset: rows in the EasyR1/verl schema -> typed ``PromptExample``s for the rollout.

Every row is checked once, when the dataset is built, so that a bad row is skipped with its id and
reason instead of failing deep in the model mid-run. The check (the scan) runs once per file and
settings: its result is cached beside the file and reused by the other ranks and by later starts
(``scan_cache.py``: who scans, the cache key). A row is kept only when:

- its problem is a string and its answer a non-empty string, or an int/float (coerced: ``3`` and
  ``3.0`` -> ``"3"``, ``2.5`` -> ``"2.5"``; datasets written from pandas often store numeric answers
  as numbers). ``None``, booleans, NaN, lists and dicts are skipped;
- the number of ``<image>`` placeholders equals the number of images;
- every image decodes completely (the full pixel data, not just the header);
- its prompt, image tokens included, has at most ``max_prompt_length`` tokens. The length is computed
  without running the image processor: each image's token count follows from its resized size.

Examples are light: ``dataset[i]`` tokenises the prompt (image pads expanded from the sizes found by
the scan) and does NOT decode its images; ``example.load_images()`` decodes and resizes them when a
consumer needs the pixels (the rollout engine for the prompts it generates, the first pipeline stage
for the rows it trains). A rollout batch on a rank that never reads its pixels costs no image memory.

Skipped rows are logged (each one up to ``LOG_LIMIT`` per file, then a per-file summary with counts
per reason) and kept in ``dataset.skipped``. A missing column raises ``MissingColumnError`` naming the
column and file; a dataset with no usable row raises ``NoUsableExamplesError``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from PIL import Image

from megatron_vgpo.config.schema import DataConfig
from megatron_vgpo.data.images import ImageDecodeError, decode_image, image_cells, resize_image, smart_resize
from megatron_vgpo.data.prompt import IMAGE_PLACEHOLDER, PROMPT_TEMPLATE, render_prompt
from megatron_vgpo.data.scan_cache import FileScan, load_or_scan, on_rank_zero, processor_fingerprint
from megatron_vgpo.data.sources import DatasetError, RowSource, dataset_names
from megatron_vgpo.rewards.parts import parse_parts

logger = logging.getLogger(__name__)

MAX_CLAIMS = 64
"""Claim columns read per row at most (``data.claim_key``)."""

LOG_LIMIT = 20
"""Skipped rows logged one by one per file; the rest only in the file's summary and ``skipped``."""


class NoUsableExamplesError(DatasetError):
    """Every row of every file was skipped (or the files are empty)."""


@dataclass
class PromptExample:
    """One prompt, ready for the rollout engine and the Megatron forward pass."""

    row_id: str
    """``<dataset name>:<row index in its file>``; unique across the files of a dataset."""
    source: str
    """Dataset name (the file stem, made unique); validation accuracy is reported per source."""
    problem: str
    """The raw problem text, ``<image>`` placeholders included."""
    answer: str
    """Ground truth for the reward."""
    prompt_text: str
    """Chat-templated prompt with ONE ``<|image_pad|>`` per image (what vLLM takes with ``images``)."""
    input_ids: torch.Tensor
    """[L] int64 prompt token ids, each image pad expanded to the image's token count."""
    image_grid_thw: torch.Tensor
    """[num_images, 3] int64 (t, h, w) patch grid per image at its final size; [0, 3] if no image."""
    image_loader: Callable[..., list[Image.Image]] = field(repr=False, compare=False, default=lambda raw=False: [])
    """Decodes (and unless ``raw``, resizes) the row's images (``load_images``)."""
    parts: Optional[list] = None
    """A multi-part row's ``rewards.parts.Part``s in the problem's order (``data.parts_key``); None: not one."""
    claims: list[tuple[str, bool]] = field(default_factory=list)
    """Statements about the row's image with their truth (``data.claim_key``/``claim_label_key``
    columns; VAPO's probes); empty when the row has none."""

    @property
    def num_images(self) -> int:
        return self.image_grid_thw.shape[0]

    def load_images(self, raw: bool = False) -> list[Image.Image]:
        """The RGB images at their final (smart-resized) size, decoded now (nothing is cached: the
        caller keeps them only as long as it needs them). The engine must not resize them. ``raw``:
        as decoded, before resizing (a perturbation drawn on the raw image)."""
        return self.image_loader(raw=raw)


@dataclass(frozen=True)
class SkippedRow:
    row_id: str
    reason: str
    """One of the ``SKIP_*`` kinds below."""
    detail: str


SKIP_PROBLEM = "problem_not_string"
SKIP_ANSWER = "answer_not_string"
SKIP_PLACEHOLDERS = "placeholder_mismatch"
SKIP_IMAGE = "image_decode_error"
SKIP_TOO_LONG = "prompt_too_long"

RESERVED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def coerce_answer(value) -> Optional[str]:
    """The answer as a string, or None when it is unusable (see the module docstring)."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _warn_if_engine_would_resize(image_processor, cfg: DataConfig) -> None:
    """Our images are fixed points of smart_resize only within the processor's own pixel bounds; outside
    them a rollout engine using the checkpoint's preprocessor config would resize them again and see a
    different number of image tokens than the trainer."""
    size = getattr(image_processor, "size", None)
    low, high = getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)
    if low and high and (cfg.min_pixels < low or cfg.max_pixels > high):
        logger.warning("data: pixel bounds [%d, %d] are not within the processor's [%d, %d]: the rollout engine "
                       "must get the data bounds (vLLM mm_processor_kwargs=processor_size_overrides(...)) or it "
                       "resizes the images again", cfg.min_pixels, cfg.max_pixels, low, high)


@dataclass
class _Kept:
    file: int
    index: int
    row_id: str
    prompt_length: int
    image_sizes: tuple[tuple[int, int], ...]  # (height, width) of each image after smart_resize


class PromptDataset:
    """The usable rows of ``files``; ``dataset[i]`` tokenises row ``i`` (``load_images(i)`` decodes its images).

    ``cfg`` gives the column keys, ``image_dir`` and the pixel bounds; ``processor`` is a Qwen2.5-VL
    processor (``load_processor``); ``max_prompt_length`` comes from ``rollout.max_prompt_length``.
    """

    def __init__(self, files: list[str], cfg: DataConfig, processor, max_prompt_length: int,
                 template: str = PROMPT_TEMPLATE):
        if not files:
            raise DatasetError("no data files given")
        self.files = [str(f) for f in files]
        self.cfg, self.processor, self.max_prompt_length, self.template = cfg, processor, max_prompt_length, template
        self.names = dataset_names(self.files)
        columns = (cfg.prompt_key, cfg.answer_key, cfg.image_key)
        optional = [cfg.parts_key, *(key.format(i=i) for i in range(1, MAX_CLAIMS + 1)
                                     for key in (cfg.claim_key, cfg.claim_label_key))]
        # missing required columns fail here
        self._sources = [RowSource(f, columns, optional) for f in self.files]
        self._bad_labels: Counter = Counter()
        image_processor = processor.image_processor
        self._factor = image_processor.patch_size * image_processor.merge_size
        self._patch = image_processor.patch_size
        self._image_pad_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        _warn_if_engine_would_resize(image_processor, cfg)
        self.skipped: list[SkippedRow] = []
        self.kept_per_source: dict[str, int] = {}
        self._kept: list[_Kept] = []
        for f, scan in enumerate(on_rank_zero(self._scan_all)):
            self._add(f, scan)
        if not self._kept:
            raise NoUsableExamplesError(
                f"no usable rows in {', '.join(self.files)}: {len(self.skipped)} skipped "
                f"({self.skip_counts() or 'the files are empty'})")

    # -- scanning ----------------------------------------------------------------------------------

    def _image_dir(self, f: int) -> str:
        return self.cfg.image_dir or str(self._sources[f].path.parent)

    def _check(self, f: int, row: dict) -> tuple[Optional[tuple[str, str]], int, tuple]:
        """``(None, prompt length, image sizes)`` for a usable row, else ``((SKIP_* kind, detail), 0, ())``."""
        cfg = self.cfg
        problem, answer, cells = row[cfg.prompt_key], row[cfg.answer_key], image_cells(row[cfg.image_key])
        if not isinstance(problem, str):
            return (SKIP_PROBLEM, f"problem is {type(problem).__name__}, not a string"), 0, ()
        if coerce_answer(answer) is None:
            return (SKIP_ANSWER, f"answer {answer!r} is not a non-empty string or a number"), 0, ()
        reserved = [t for t in RESERVED_TOKENS if t in problem]
        if reserved:  # a literal image pad in the text would add image tokens that have no image
            return (SKIP_PLACEHOLDERS, f"problem contains the reserved token(s) {', '.join(reserved)}"), 0, ()
        if problem.count(IMAGE_PLACEHOLDER) != len(cells):
            return (SKIP_PLACEHOLDERS, f"{problem.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
                                       f"but {len(cells)} image(s)"), 0, ()
        sizes = []
        for k, cell in enumerate(cells):
            try:
                image = decode_image(cell, self._image_dir(f))
                sizes.append(smart_resize(image.height, image.width, self._factor, cfg.min_pixels, cfg.max_pixels))
            except ImageDecodeError as e:
                return (SKIP_IMAGE, f"image {k}: {e}"), 0, ()
        length = len(self._token_ids(render_prompt(self.processor, problem, self.template), sizes))
        if length > self.max_prompt_length:
            return (SKIP_TOO_LONG, f"{length} prompt tokens > max_prompt_length {self.max_prompt_length}"), 0, ()
        return None, length, tuple(sizes)

    def _token_ids(self, text: str, image_sizes) -> list[int]:
        """The rendered prompt's token ids with each image's pad expanded to its token count, as the
        processor expands them (image pads are special tokens, so the expansion is additive).
        Tokenised without the length warning: over-long rows are skipped by the scan."""
        ids = self.processor.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        counts = iter([(h // self._factor) * (w // self._factor) for h, w in image_sizes])
        out: list[int] = []
        for token in ids:
            out.extend([token] * next(counts) if token == self._image_pad_id else [token])
        return out

    def _scan_settings(self, f: int) -> dict:
        """Everything besides the file's content that the scan of file ``f`` depends on (its cache key)."""
        cfg = self.cfg
        return {"columns": [cfg.prompt_key, cfg.answer_key, cfg.image_key],
                "image_dir": os.path.abspath(self._image_dir(f)), "min_pixels": cfg.min_pixels,
                "max_pixels": cfg.max_pixels, "max_prompt_length": self.max_prompt_length, "template": self.template,
                "processor": processor_fingerprint(self.processor)}

    def _scan_file(self, f: int) -> FileScan:
        """Check every row of file ``f`` (decodes every image, tokenises every prompt)."""
        source, scan = self._sources[f], FileScan(len(self._sources[f]))
        for i in range(len(source)):
            reason, length, sizes = self._check(f, source.row(i))
            if reason is None:
                scan.kept.append((i, length, sizes))
            else:
                scan.skipped.append((i, *reason))
        return scan

    def _scan_all(self) -> list[FileScan]:
        """Every file's scan, from its cache where ``data.scan_cache`` allows."""
        if not self.cfg.scan_cache:
            return [self._scan_file(f) for f in range(len(self.files))]
        return [load_or_scan(path, len(self._sources[f]), functools.partial(self._scan_settings, f),
                             functools.partial(self._scan_file, f), self.cfg.scan_cache_dir)
                for f, path in enumerate(self.files)]

    def _add(self, f: int, scan: FileScan) -> None:
        """Keep the usable rows of file ``f``'s scan; log and record the skipped ones."""
        source = self._sources[f]
        self._kept += [_Kept(f, i, f"{self.names[f]}:{i}", length, sizes) for i, length, sizes in scan.kept]
        skipped = [SkippedRow(f"{self.names[f]}:{i}", reason, detail) for i, reason, detail in scan.skipped]
        for n, row in enumerate(skipped):
            log = logger.warning if n < LOG_LIMIT else logger.debug
            log("data: skipping row %s (%s): %s", row.row_id, row.reason, row.detail)
        self.skipped.extend(skipped)
        self.kept_per_source[self.names[f]] = len(source) - len(skipped)
        if skipped:
            logger.warning("data: %s: skipped %d of %d rows %s; kept %d%s", source.path, len(skipped), len(source),
                           dict(Counter(s.reason for s in skipped)), len(source) - len(skipped),
                           " (this file contributes nothing)" if len(skipped) == len(source) else "")

    # -- access ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._kept)

    def skip_counts(self) -> dict[str, int]:
        """Skipped rows per reason."""
        return dict(Counter(s.reason for s in self.skipped))

    def __getitem__(self, i: int) -> PromptExample:
        kept = self._kept[i]
        row = self._sources[kept.file].row(kept.index)
        problem = row[self.cfg.prompt_key]
        text = render_prompt(self.processor, problem, self.template)
        input_ids = torch.tensor(self._token_ids(text, kept.image_sizes), dtype=torch.long)
        if len(input_ids) != kept.prompt_length:  # the scan and this call disagree: the file changed
            raise DatasetError(f"row {kept.row_id}: {len(input_ids)} prompt tokens, the scan counted "
                               f"{kept.prompt_length} (did the file change under the run?)")
        grid = torch.tensor([(1, h // self._patch, w // self._patch) for h, w in kept.image_sizes],
                            dtype=torch.long).view(-1, 3)
        return PromptExample(
            row_id=kept.row_id, source=self.names[kept.file], problem=problem,
            answer=coerce_answer(row[self.cfg.answer_key]), prompt_text=text, input_ids=input_ids,
            image_grid_thw=grid, image_loader=functools.partial(self.load_images, i), claims=self._claims(kept, row),
            parts=self._parts(kept, row))

    def _parts(self, kept, row: dict) -> Optional[list]:
        """The row's parts (``data.parts_key``), None when it has none; unreadable: warned once, None."""
        value = row.get(self.cfg.parts_key)
        if value is None:
            return None
        try:
            return parse_parts(value)
        except (ValueError, KeyError, TypeError) as e:
            self._bad_labels[self.cfg.parts_key] += 1
            if self._bad_labels[self.cfg.parts_key] == 1:
                logger.warning("%s: %s is not a list of {name, count} (%s: %s): the row has no parts (warned once)",
                               kept.row_id, self.cfg.parts_key, type(e).__name__, e)
            return None

    def _claims(self, kept, row: dict) -> list[tuple[str, bool]]:
        """Claims 1, 2, ... of ``row`` up to the first absent or empty one; a claim whose label is
        neither ``claim_true_label`` nor ``claim_false_label`` is left out (warned once per column)."""
        cfg, out = self.cfg, []
        for i in range(1, MAX_CLAIMS + 1):
            claim, label = row.get(cfg.claim_key.format(i=i)), row.get(cfg.claim_label_key.format(i=i))
            if not isinstance(claim, str) or not claim.strip():
                break
            if label in (cfg.claim_true_label, cfg.claim_false_label):
                out.append((claim, label == cfg.claim_true_label))
                continue
            column = cfg.claim_label_key.format(i=i)
            self._bad_labels[column] += 1
            if self._bad_labels[column] == 1:
                logger.warning("%s: %s is %r, neither data.claim_true_label=%r nor claim_false_label=%r: the claim "
                               "is left out (warned once per column)", kept.row_id, column, label,
                               cfg.claim_true_label, cfg.claim_false_label)
        return out

    def load_images(self, i: int, raw: bool = False) -> list[Image.Image]:
        """Row ``i``'s images, decoded and resized to the sizes the scan found (``raw``: not resized)."""
        kept = self._kept[i]
        cells = image_cells(self._sources[kept.file].row(kept.index)[self.cfg.image_key])
        images = []
        for cell, size in zip(cells, kept.image_sizes):
            try:
                image = decode_image(cell, self._image_dir(kept.file))
                if raw:
                    images.append(image)
                    continue
                image = resize_image(image, self._factor, self.cfg.min_pixels, self.cfg.max_pixels)
            except ImageDecodeError as e:  # it decoded during the scan: the file changed under the run
                raise DatasetError(f"row {kept.row_id}: image no longer decodes: {e}") from e
            if (image.height, image.width) != size:
                raise DatasetError(f"row {kept.row_id}: image is {image.height}x{image.width} after resizing, "
                                   f"the scan found {size[0]}x{size[1]} (did the file change under the run?)")
            images.append(image)
        return images
