"""The responses to analyse: read from an evaluation JSONL, or generated from a dataset file.

Evaluation JSONL: the ``items.jsonl`` that ``python -m megatron_vgpo.evaluate`` writes, or any JSONL
with these keys per line (extra keys are ignored):

    {"id": "mathvista:12",            # optional, default "<file stem>:<line index>"
     "benchmark": "mathvista",        # optional, default the file stem
     "sample": 0,                     # optional; sample j > 0 of an item is analysed as "<id>#j"
     "prompt": "...",                 # chat-templated (contains <|im_start|>) with the image pads, or the
                                      #   raw problem with one <image> per image (alias key: "problem")
     "images": ["img/12.png"],        # image cells: paths (relative to --image-dir, else to the JSONL's
                                      #   folder), or {"bytes", "path"} structs
     "response": "<think>...</think> \\boxed{3}",
     "correct": true,                 # optional when "label" is given: then graded here
     "label": "3"}

Rows without ``images`` take them from the evaluation's prepared file beside the JSONL,
``prepared/<benchmark>.jsonl``, row ``<index>`` of the id ``<benchmark>:<index>`` (how the
evaluation stores its items), and the evaluation's ``run.json`` supplies the pixel bounds it used
unless ``--min-pixels``/``--max-pixels`` are given. A templated prompt may carry one
``<|image_pad|>`` per image or the processor's expanded runs (a run counts as one image). A raw
problem without ``<image>`` gets its images first. Responses are re-tokenised from their text; rows
without an image, with an image count that does not match, or whose response holds vision tokens
are skipped with a warning.

Dataset file (parquet/json/jsonl in the EasyR1 schema, ``problem``/``answer``/``images``): read with
the training ``PromptDataset`` (same prompt template and image resizing), answered greedily with HF
``generate`` (vision tokens suppressed, as the rollout does) and graded with the project's grader.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterator

import torch

from megatron_vgpo.analysis.trace import VISION_MARKERS, Item
from megatron_vgpo.data.images import decode_image, image_cells, resize_image
from megatron_vgpo.data.prompt import IMAGE_PLACEHOLDER, render_prompt
from megatron_vgpo.data.sources import RowSource

logger = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
RESERVED = (IMAGE_PAD, "<|video_pad|>", *VISION_MARKERS)
DEFAULT_PIXELS = (262144, 1000000)
"""The paper's evaluation bounds (METHODS_SPEC 7), when neither the CLI nor a run.json gives them."""


def is_evaluation_file(path: str | Path) -> bool:
    """A JSONL whose first row has a ``response``: an evaluation output, not a dataset."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        return False
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    return "response" in json.loads(first)


def pixel_bounds(data: str | Path, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """Image pixel bounds: the given ones, else the evaluation's ``run.json`` beside ``data``, else
    ``DEFAULT_PIXELS``."""
    run = Path(data).parent / "run.json"
    settings = json.loads(run.read_text()) if run.is_file() and is_evaluation_file(data) else {}
    return (min_pixels or settings.get("min_pixels", DEFAULT_PIXELS[0]),
            max_pixels or settings.get("max_pixels", DEFAULT_PIXELS[1]))


class _PreparedImages:
    """Image cells of evaluation rows that do not carry them: row ``<index>`` of
    ``prepared/<benchmark>.jsonl`` for the id ``<benchmark>:<index>`` (None when there is none)."""

    def __init__(self, folder: Path):
        self.folder, self.sources = folder / "prepared", {}

    def __call__(self, benchmark: str, row_id: str) -> list | None:
        path = self.folder / f"{benchmark}.jsonl"
        index = row_id.rsplit(":", 1)[-1]
        if not path.is_file() or not index.isdigit():
            return None
        if benchmark not in self.sources:
            self.sources[benchmark] = RowSource(path, ("images",))
        source = self.sources[benchmark]
        return source.row(int(index))["images"] if int(index) < len(source) else None


def _factor(processor) -> int:
    return processor.image_processor.patch_size * processor.image_processor.merge_size


def _prompt_text(processor, prompt: str, n_images: int) -> str | None:
    """The templated prompt with one pad per image, or None when its image count differs."""
    if "<|im_start|>" in prompt:
        text = re.sub(f"(?:{re.escape(IMAGE_PAD)})+", IMAGE_PAD, prompt)
        return text if text.count(IMAGE_PAD) == n_images else None
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = IMAGE_PLACEHOLDER * n_images + prompt
    return render_prompt(processor, prompt) if prompt.count(IMAGE_PLACEHOLDER) == n_images else None


def _response_ids(tokenizer, response: str) -> list[int] | None:
    """Token ids of the response text, trailing end-of-turn tokens dropped; None if it holds vision tokens."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ends = set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    while ids and ids[-1] in ends:
        ids.pop()
    reserved = set(tokenizer.convert_tokens_to_ids(list(RESERVED)))
    return None if reserved & set(ids) else ids


def iter_evaluation(path: str | Path, processor, image_dir: str, min_pixels: int, max_pixels: int,
                    grader: str, limit: int | None = None) -> Iterator[Item]:
    """The rows of an evaluation JSONL (schema in the module docstring) as ``Item``s, one at a time
    (each row's images are decoded only when it is reached)."""
    from megatron_vgpo.rewards import accuracy, load_grader

    path = Path(path)
    grade = None
    kept = 0
    prepared = _PreparedImages(path.parent)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for n, line in enumerate(lines):
        if limit is not None and kept >= limit:
            return
        row = json.loads(line)
        benchmark = str(row.get("benchmark", path.stem))
        row_id = str(row.get("id", f"{path.stem}:{n}"))
        cells = image_cells(row["images"] if "images" in row else prepared(benchmark, row_id))
        row_id += f"#{row['sample']}" if row.get("sample") else ""
        images = [resize_image(decode_image(c, image_dir or str(path.parent)), _factor(processor), min_pixels,
                               max_pixels) for c in cells]
        text = _prompt_text(processor, row.get("prompt", row.get("problem", "")), len(images))
        ids = _response_ids(processor.tokenizer, row.get("response", ""))
        problem = ("no image" if not images else "image count does not match the prompt" if text is None
                   else "response holds vision tokens" if ids is None else "empty response" if not ids else None)
        if problem:
            logger.warning("analysis: skipping %s: %s", row_id, problem)
            continue
        correct = row.get("correct")
        if correct is None:
            if row.get("label") is None:
                raise ValueError(f"{path}:{n + 1}: a row needs 'correct' or 'label'")
            grade = grade or load_grader(grader)
            correct = accuracy(grade, row["response"], str(row["label"])) > 0
        kept += 1
        yield Item(id=row_id, benchmark=benchmark, prompt_text=text, images=images,
                   response_ids=ids, correct=bool(correct), response=row["response"],
                   label=None if row.get("label") is None else str(row["label"]))


@torch.no_grad()
def generate_ids(model, processor, prompt_text: str, images, max_new_tokens: int) -> list[int]:
    """Greedy response ids (end-of-turn excluded) for one prompt, vision tokens suppressed."""
    tokenizer = processor.tokenizer
    enc = processor(text=[prompt_text], images=images or None, return_tensors="pt", do_resize=False)
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    ends = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ends,
                         pad_token_id=ends[1], suppress_tokens=tokenizer.convert_tokens_to_ids(list(RESERVED)))
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    return ids[:next((i for i, t in enumerate(ids) if t in ends), len(ids))]


def iter_generated(path: str | Path, model, processor, image_dir: str, min_pixels: int, max_pixels: int,
                   grader: str, max_new_tokens: int, limit: int | None = None) -> Iterator[Item]:
    """Greedy responses to the rows of an EasyR1-schema dataset file, graded, as ``Item``s."""
    from megatron_vgpo.config.schema import DataConfig
    from megatron_vgpo.data.dataset import PromptDataset
    from megatron_vgpo.rewards import accuracy, load_grader

    cfg = DataConfig(image_dir=image_dir, min_pixels=min_pixels, max_pixels=max_pixels)
    dataset = PromptDataset([str(path)], cfg, processor, max_prompt_length=1 << 30)
    grade = load_grader(grader)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        example = dataset[i]
        if example.num_images == 0:
            logger.warning("analysis: skipping %s: no image", example.row_id)
            continue
        images = example.load_images()
        ids = generate_ids(model, processor, example.prompt_text, images, max_new_tokens)
        if not ids:
            logger.warning("analysis: skipping %s: empty response", example.row_id)
            continue
        text = processor.tokenizer.decode(ids, skip_special_tokens=True)
        logger.info("analysis: generated row %d/%d (%s, %d tokens)", i + 1, n, example.row_id, len(ids))
        yield Item(id=example.row_id, benchmark=example.source, prompt_text=example.prompt_text, images=images,
                   response_ids=ids, correct=accuracy(grade, text, example.answer) > 0, response=text,
                   label=example.answer)
