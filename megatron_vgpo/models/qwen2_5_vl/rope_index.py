"""3-D M-RoPE position ids for Qwen2.5-VL (the transformers ``get_rope_index`` rules).

Qwen2.5-VL rotates every token by three position indices (temporal, height, width) instead of one.
Every pipeline stage needs them (the language model applies M-RoPE in each layer), and they depend only
on ``input_ids`` and the vision grids, so each stage recomputes them with this pure function rather
than receiving them from the first stage.

The rules, as ``Qwen2_5_VLModel.get_rope_index`` implements them in transformers 5.19:

- Only valid tokens (``attention_mask == 1``) are numbered; a padding position gets 0 on all three
  axes. (transformers 4.x filled padding with 1; 5.x initialises the output with zeros. Padding never
  attends or is attended to, so the value only matters for bit-for-bit comparisons.)
- A text token gets the same index ``p`` on all three axes, and the next token gets ``p + 1``.
- A vision item (an image, or a video) whose pad tokens start at text position ``s`` covers a grid of
  ``t x (h / merge) x (w / merge)`` tokens in ``t, h, w`` row-major order; the token at grid cell
  ``(i, j, k)`` gets ``(s + i * interval, s + j, s + k)``, with ``interval = 1`` for images and
  ``tokens_per_second * second_per_grid_t`` (truncated to an integer) for videos.
- The token after the item gets ``s + max(h, w) / merge``; the temporal extent does not advance it
  (for images ``t`` is 1, so this is the previous maximum + 1).
- Grids are consumed in order across the whole batch: the image pad tokens of row 0 take the first
  grids of ``image_grid_thw``, row 1 the next ones, and so on (videos likewise from
  ``video_grid_thw``).
- ``mrope_position_deltas[b] = max position of row b + 1 - number of valid tokens of row b``; during
  generation, new token ``n`` of row ``b`` (0-based over valid tokens) gets position ``n + delta``.
  A row with no valid token gets delta 0.

transformers 5.19 finds vision tokens through ``mm_token_type_ids`` (which its processor sets from
``input_ids == image_token_id`` / ``video_token_id``); here they are found from the token ids directly,
and each item's pad tokens must follow a ``<|vision_start|>`` token, as the chat template writes them.

Implementation: fully vectorised over the batch (no Python loop over rows, items or tokens). Vision
tokens are matched to grids by their rank in batch order (``searchsorted`` over the cumulative token
counts of the grids); every valid token then "advances" the text position by 1 (text), 0 (vision) or
``max(h, w) / merge`` (the last token of an item), and an exclusive cumulative sum of these advances
gives each token's start position, to which vision tokens add their grid offsets.

Note for parity checks: for a batch without any image or video, HF's forward does not call
``get_rope_index`` and numbers positions ``0..L-1`` regardless of the attention mask, whereas this
function (like ``get_rope_index`` on a text-only row of a mixed batch) starts each row at its first
valid token. Pass explicit ``position_ids`` to HF when comparing left-padded text-only batches.
"""

from __future__ import annotations

import torch

__all__ = ["get_rope_index"]


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    vision_start_token_id: int,
    video_grid_thw: torch.Tensor | None = None,
    video_token_id: int | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    tokens_per_second: int | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D M-RoPE position ids and generation deltas for a Qwen2.5-VL batch.

    Args:
        input_ids: ``[B, L]`` integer token ids, containing one ``<|image_pad|>`` token per merged
            image patch (``t * h * w / merge**2`` per image), each run preceded by
            ``<|vision_start|>``.
        image_grid_thw: ``[N_img, 3]`` integer ``(t, h, w)`` patch grid of every image in the batch, in
            batch order (row 0's images first); ``None`` when there is no image.
        attention_mask: ``[B, L]``, 1 (or True) for real tokens and 0 for padding (left, right, or
            anywhere); ``None`` means every token is real.
        spatial_merge_size: side of the square of patches the vision merger fuses into one token
            (``vision_config.spatial_merge_size``, 2 for every released Qwen2.5-VL).
        image_token_id: id of ``<|image_pad|>`` (``config.image_token_id``).
        vision_start_token_id: id of ``<|vision_start|>`` (``config.vision_start_token_id``).
        video_grid_thw: ``[N_vid, 3]`` integer ``(t, h, w)`` grid of every video, in batch order.
        video_token_id: id of ``<|video_pad|>`` (``config.video_token_id``); video pad tokens are only
            recognised when it is given.
        second_per_grid_ts: ``[N_vid]`` seconds per temporal grid step of every video; 1 for each video
            when ``None`` (as transformers does).
        tokens_per_second: temporal position ids per second of video
            (``vision_config.tokens_per_second``); required when there are videos.

    Returns:
        ``(position_ids, mrope_position_deltas)``: ``position_ids`` is ``[3, B, L]`` int64 (axes
        temporal, height, width; 0 at padding); ``mrope_position_deltas`` is ``[B, 1]`` int64.

    Raises:
        ValueError: on malformed shapes; a grid whose ``h`` or ``w`` is not divisible by
            ``spatial_merge_size``; a number of pad tokens that does not match the grids (naming
            both counts and the first row where they disagree); an item whose pad tokens are not
            contiguous or do not follow ``<|vision_start|>``; videos without ``tokens_per_second``.
    """
    valid = _check_inputs(input_ids, attention_mask, spatial_merge_size)
    batch, length = input_ids.shape
    device = input_ids.device
    if (video_grid_thw is not None or second_per_grid_ts is not None) and video_token_id is None:
        raise ValueError("video_grid_thw / second_per_grid_ts given without video_token_id")

    # Every valid token advances the running text position by 1; vision tokens are patched below.
    advance = valid.long()
    offsets = torch.zeros(3, batch * length, dtype=torch.long, device=device)
    modalities = [("image", image_token_id, image_grid_thw, None)]
    if video_token_id is not None:
        video_intervals = _video_intervals(video_grid_thw, second_per_grid_ts, tokens_per_second, device)
        modalities.append(("video", video_token_id, video_grid_thw, video_intervals))
    for name, token_id, grid_thw, intervals in modalities:
        is_vision = (input_ids == token_id) & valid
        grid = _check_grid(name, grid_thw, spatial_merge_size, device)
        flat, item, local = _assign_items(name, is_vision, grid, spatial_merge_size)
        _check_item_layout(name, input_ids, valid, flat, item, local, vision_start_token_id)

        grid_h = grid[:, 1] // spatial_merge_size
        grid_w = grid[:, 2] // spatial_merge_size
        h, w = grid_h[item], grid_w[item]
        t_index = local // (h * w)
        if intervals is not None:
            # Same arithmetic as transformers: (arange(t) * interval).long(), interval possibly float.
            t_index = (t_index * intervals[item]).long()
        offsets[:, flat] = torch.stack([t_index, (local // w) % h, local % w])

        flat_advance = advance.view(-1)
        flat_advance[flat] = 0
        is_last = local == grid[item, 0] * h * w - 1
        flat_advance[flat[is_last]] = torch.maximum(h, w)[is_last]

    start = advance.cumsum(dim=1) - advance  # text position where each token (or its item) starts
    position_ids = (start.unsqueeze(0) + offsets.view(3, batch, length)).masked_fill(~valid, 0)
    if length == 0:
        return position_ids, torch.zeros(batch, 1, dtype=torch.long, device=device)
    row_max = position_ids.masked_fill(~valid, -1).amax(dim=(0, 2))
    deltas = row_max + 1 - valid.sum(dim=1)
    return position_ids, deltas.unsqueeze(1)


def _check_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, spatial_merge_size: int
) -> torch.Tensor:
    """Validate the token tensors; return the ``[B, L]`` bool mask of real tokens."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [B, L], got shape {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if not isinstance(spatial_merge_size, int) or spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be a positive int, got {spatial_merge_size!r}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    return attention_mask.to(device=input_ids.device).bool()


def _check_grid(
    name: str, grid_thw: torch.Tensor | None, merge: int, device: torch.device
) -> torch.Tensor:
    """Validate a ``[N, 3]`` grid tensor (``None`` means no item); return it as int64 on ``device``."""
    if grid_thw is None:
        return torch.zeros(0, 3, dtype=torch.long, device=device)
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"{name}_grid_thw must be [N, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    if grid_thw.is_floating_point() or grid_thw.dtype == torch.bool:
        raise ValueError(f"{name}_grid_thw must be an integer tensor, got dtype {grid_thw.dtype}")
    grid = grid_thw.to(device=device, dtype=torch.long)
    if (grid < 1).any():
        bad = int((grid < 1).any(dim=1).nonzero()[0])
        raise ValueError(f"{name} {bad} has grid (t, h, w) = {grid[bad].tolist()}; all must be >= 1")
    not_divisible = (grid[:, 1:] % merge != 0).any(dim=1)
    if not_divisible.any():
        bad = int(not_divisible.nonzero()[0])
        raise ValueError(
            f"{name} {bad} has grid (t, h, w) = {grid[bad].tolist()}: h and w must be divisible by "
            f"spatial_merge_size={merge}"
        )
    return grid


def _assign_items(
    name: str, is_vision: torch.Tensor, grid: torch.Tensor, merge: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match the batch's vision pad tokens to items in batch order.

    Returns ``(flat, item, local)``, each ``[K]`` for the ``K`` pad tokens in row-major order: the index
    into the flattened ``[B * L]`` batch, the item (grid row) the token belongs to, and the token's
    index inside that item. Raises if the counts disagree or an item would straddle two rows.
    """
    tokens_per_item = grid[:, 0] * (grid[:, 1] // merge) * (grid[:, 2] // merge)
    item_end = tokens_per_item.cumsum(0)
    row_counts = is_vision.sum(dim=1)
    row_end = row_counts.cumsum(0)
    # A row boundary must fall on an item boundary (or at 0): otherwise an item straddles two rows.
    boundaries = torch.cat([item_end.new_zeros(1), item_end])
    aligned = torch.isin(row_end, boundaries)
    total, expected = int(row_counts.sum()), int(boundaries[-1])
    if not bool(aligned.all()) or total != expected:
        counts = (
            f"the batch has {total} {name}_pad tokens but {name}_grid_thw describes {expected} "
            f"(sum of t*h*w/merge^2 over {grid.shape[0]} {name}s, merge={merge})"
        )
        if bool(aligned.all()):
            unused = grid.shape[0] - int(torch.searchsorted(item_end, total, right=True))
            where = f"the last {unused} {name}(s) of {name}_grid_thw have no {name}_pad tokens in any sample"
        else:
            row = int((~aligned).nonzero()[0])
            where = (
                f"first mismatch at sample {row}: its {int(row_counts[row])} {name}_pad tokens bring "
                f"the running count to {int(row_end[row])}, which is not a {name} boundary "
                f"(cumulative grid tokens: {item_end.tolist()})"
            )
        raise ValueError(f"{name}_pad token count does not match {name}_grid_thw: {counts}; {where}")
    flat = is_vision.reshape(-1).nonzero().squeeze(1)
    rank = torch.arange(flat.numel(), device=flat.device)
    item = torch.searchsorted(item_end, rank, right=True)
    local = rank - (item_end - tokens_per_item)[item]
    return flat, item, local


def _check_item_layout(
    name: str,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    flat: torch.Tensor,
    item: torch.Tensor,
    local: torch.Tensor,
    vision_start_token_id: int,
) -> None:
    """Each item's pad tokens must be consecutive real tokens right after ``<|vision_start|>``."""
    if flat.numel() == 0:
        return
    length = input_ids.shape[1]
    rows, cols = flat // length, flat % length
    valid_rank = valid.long().cumsum(dim=1) - 1  # index of each real token among its row's real tokens
    token_rank = valid_rank[rows, cols]
    is_first = local == 0
    first_rank = torch.zeros(int(item.max()) + 1, dtype=torch.long, device=flat.device)
    first_rank[item[is_first]] = token_rank[is_first]
    broken = token_rank - local != first_rank[item]
    if broken.any():
        bad = int(broken.nonzero()[0])
        raise ValueError(
            f"{name} {int(item[bad])} in sample {int(rows[bad])}: its {name}_pad tokens are not "
            f"contiguous (text or another item interrupts them before its grid is filled)"
        )
    # Column of the last real token at or before each position (-1 if none); read one column left.
    col = torch.arange(length, device=flat.device).expand_as(valid)
    last_real = torch.where(valid, col, -1).cummax(dim=1).values
    first_rows, first_cols = rows[is_first], cols[is_first]
    prev_col = torch.where(first_cols > 0, last_real[first_rows, (first_cols - 1).clamp(min=0)], -1)
    prev_token = input_ids[first_rows, prev_col.clamp(min=0)]
    no_start = (prev_col < 0) | (prev_token != vision_start_token_id)
    if no_start.any():
        bad = int(no_start.nonzero()[0])
        raise ValueError(
            f"{name} {int(item[is_first][bad])} in sample {int(first_rows[bad])} does not follow "
            f"<|vision_start|> (id {vision_start_token_id}); two items back to back, or a truncated "
            f"prompt?"
        )


def _video_intervals(
    video_grid_thw: torch.Tensor | None,
    second_per_grid_ts: torch.Tensor | None,
    tokens_per_second: int | float | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Temporal position step of every video: ``tokens_per_second * second_per_grid_ts``."""
    if video_grid_thw is None:
        return None
    if tokens_per_second is None:
        raise ValueError("video_grid_thw given without tokens_per_second (vision_config.tokens_per_second)")
    if second_per_grid_ts is None:
        return torch.full((video_grid_thw.shape[0],), tokens_per_second, device=device)
    seconds = torch.as_tensor(second_per_grid_ts, device=device)
    if seconds.shape != (video_grid_thw.shape[0],):
        raise ValueError(
            f"second_per_grid_ts must be [N_vid] = [{video_grid_thw.shape[0]}], got shape {tuple(seconds.shape)}"
        )
    return tokens_per_second * seconds
