"""The typed micro-batch of the trainer's Megatron passes, and the images it carries.

``MicroBatch`` holds everything one forward (and backward) of ``micro_batch_size`` responses needs,
as named fields: model inputs, the rows' positions in the step's ``Experience``, masks and the loss
inputs. ``to(device)`` is called by the pipeline's forward step (``models/qwen2_5_vl/pipeline.py``),
so only the micro-batch in flight is on the device, and everything the loss function reads is on the
model's device.

``MicroBatches`` builds them lazily: a micro-batch exists only while the schedule runs it (and is
rebuilt if a virtual-pipeline chunk iterates again), so the host never holds all micro-batches
of a step at once.

Images (``RowImages``): each distinct image of the experience is stored once, as uint8 ``[3, H, W]``
(3 bytes per pixel), and only on the ranks that read pixels (the first pipeline stage); every rank
keeps the patch grids, which the M-RoPE positions need. A micro-batch carries its distinct images
once (``VisionInputs``) with the slot -> image index, and ``model_inputs`` turns them into the
processor's float32 patches on the device (``pixels.patchify``): rows sharing a prompt share its
image tensor and its vision-tower encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import torch

from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec, patchify_all, to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from megatron_vgpo.training.experience import Experience


@dataclass
class VisionInputs:
    """The pixels of one micro-batch (first pipeline stage): each distinct image once."""

    images: list  # [n_distinct] of [3, H, W] uint8
    image_index: list[int]  # per image slot of the micro-batch (batch order): its distinct image
    spec: PixelSpec

    def to(self, device: torch.device) -> "VisionInputs":
        return replace(self, images=[im.to(device, non_blocking=True) for im in self.images])

    def pixel_values(self) -> torch.Tensor:
        """``[N_patches, 3 * t * p * p]`` float32 patches of the distinct images, on their device."""
        return patchify_all(self.images, self.spec)[0]


@dataclass
class RowImages:
    """The images of a batch of rows; each distinct image is stored once."""

    grid_thw: torch.Tensor  # [n_distinct, 3] int64 patch grids (every rank)
    row_slots: list[tuple[int, ...]]  # per row: its images, as indices into the distinct images
    pixels: Optional[list]  # [n_distinct] of [3, H, W] uint8 where pixels are read (first stage), else None
    spec: PixelSpec

    @classmethod
    def from_prompts(cls, prompts: Sequence, spec: PixelSpec, load_pixels: bool,
                     keys: Optional[Sequence[str]] = None,
                     loader: Optional[Callable[[int], list]] = None) -> "RowImages":
        """One entry per row, ``prompts[r]`` the row's ``PromptExample``. Rows with the same key (by
        default the prompt's ``row_id``: the rows of one prompt) share their images. ``load_pixels``:
        decode them, once per key, with ``loader(r)`` (uint8 ``[3, H, W]`` tensors of row ``r``;
        default: the prompt's own images)."""
        keys = keys if keys is not None else [ex.row_id for ex in prompts]
        first: dict[str, tuple[int, ...]] = {}
        grids: list[tuple[int, int, int]] = []
        pixels: Optional[list] = [] if load_pixels else None
        slots = []
        for r, (ex, key) in enumerate(zip(prompts, keys)):
            if key not in first:
                first[key] = tuple(range(len(grids), len(grids) + ex.num_images))
                grids += [tuple(g) for g in ex.image_grid_thw.tolist()]
                if load_pixels:
                    pixels += loader(r) if loader is not None else [to_uint8(im) for im in ex.load_images()]
            slots.append(first[key])
        return cls(torch.tensor(grids, dtype=torch.long).view(-1, 3), slots, pixels, spec)

    def select(self, rows: Sequence[int]) -> tuple[Optional[torch.Tensor], Optional[VisionInputs]]:
        """``(image_grid_thw [n_slots, 3], vision inputs)`` of ``rows``' images in batch order;
        ``(None, None)`` without images, vision None where pixels are not kept."""
        slots = [j for r in rows for j in self.row_slots[r]]
        if not slots:
            return None, None
        grid = self.grid_thw[slots]
        if self.pixels is None:
            return grid, None
        local: dict[int, int] = {}
        index = [local.setdefault(j, len(local)) for j in slots]
        return grid, VisionInputs([self.pixels[j] for j in local], index, self.spec)

    def nbytes(self) -> int:
        """Host bytes of the stored pixels."""
        return sum(p.numel() for p in self.pixels) if self.pixels else 0


@dataclass
class MicroBatch:
    """One micro-batch of ``b`` responses, trimmed to its longest row ``w``. Identical on every stage
    except ``vision`` (first stage only)."""

    rows: torch.Tensor  # [b] int64, the rows' positions in the Experience
    input_ids: torch.Tensor  # [b, w] prompt + response, right padded
    attention_mask: torch.Tensor  # [b, w] int64, 1 on tokens
    response_mask: torch.Tensor  # [b, w] bool, response tokens (token-aligned, see experience.py)
    image_mask: torch.Tensor  # [b, w] bool, image tokens of the prompts
    image_grid_thw: Optional[torch.Tensor] = None  # [n_slots, 3], every stage (M-RoPE positions)
    vision: Optional[VisionInputs] = None  # pixels, first stage only
    target_ids: Optional[torch.Tensor] = None  # [b, w]; None: input_ids shifted left
    # Loss inputs (the update pass):
    old_logprobs: Optional[torch.Tensor] = None  # [b, w] pi_old log-probs
    advantages: Optional[torch.Tensor] = None  # [b, w] token-level advantages
    loss_mask: Optional[torch.Tensor] = None  # [b, w] bool, tokens that keep a policy-gradient term
    outcome: Optional[torch.Tensor] = None  # [b] outcome advantages (current-policy shapers)
    group_ids: Optional[torch.Tensor] = None  # [b] (current-policy shapers: whole groups per micro-batch)
    stats: dict = field(default_factory=dict)  # statistic key -> [b, w], the loss terms' pi_old statistics

    def to(self, device: torch.device) -> "MicroBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device, non_blocking=True)
            elif isinstance(value, VisionInputs):
                moved[f.name] = value.to(device)
        moved["stats"] = {k: v.to(device, non_blocking=True) for k, v in self.stats.items()}
        return replace(self, **moved)

    def model_inputs(self) -> dict:
        pixel_values = image_index = None
        if self.vision is not None:
            pixel_values, image_index = self.vision.pixel_values(), self.vision.image_index
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, pixel_values=pixel_values,
                    image_grid_thw=self.image_grid_thw, image_index=image_index, target_ids=self.target_ids)

    @property
    def device_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the micro-batch (tests check where they live)."""
        out = [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]
        return out + list(self.stats.values()) + (list(self.vision.images) if self.vision is not None else [])


class MicroBatches(Sequence[MicroBatch]):
    """The micro-batches of ``rows`` (positions in ``exp``), ``micro_batch_size`` rows each, built one
    at a time as they are read; re-iterable. ``loss_inputs``: carry the loss inputs (the update pass),
    with the pi_old statistics named in ``stat_keys``. ``images``: another view's ``RowImages`` instead
    of the experience's own (an extra forward pass over perturbed images)."""

    def __init__(self, exp: "Experience", rows: Sequence[int], micro_batch_size: int, loss_inputs: bool = False,
                 stat_keys: Sequence[str] = (), images: Optional[RowImages] = None):
        self.exp, self.rows, self.size, self.loss_inputs = exp, list(rows), micro_batch_size, loss_inputs
        self.stat_keys, self.images = list(stat_keys), images if images is not None else exp.images

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.size)

    def __iter__(self) -> Iterator[MicroBatch]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> MicroBatch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        exp = self.exp
        rows = self.rows[i * self.size:(i + 1) * self.size]
        width = max(exp.lengths[r] for r in rows)
        idx = torch.tensor(rows, dtype=torch.long, device=exp.input_ids.device)
        grid, vision = self.images.select(rows)
        loss = {}
        if self.loss_inputs:
            loss = dict(old_logprobs=exp.old_logprobs[idx, :width], advantages=exp.advantages[idx, :width],
                        loss_mask=exp.loss_mask[idx, :width], outcome=exp.outcome[idx], group_ids=exp.group_ids[idx],
                        stats={k: exp.stats[k][idx, :width] for k in self.stat_keys})
        return MicroBatch(rows=idx, input_ids=exp.input_ids[idx, :width],
                          attention_mask=exp.attention_mask[idx, :width].long(),
                          response_mask=exp.response_mask[idx, :width], image_mask=exp.image_mask[idx, :width],
                          image_grid_thw=grid, vision=vision, **loss)
