"""Group-relative outcome advantages (GRPO, and Dr.GRPO without std scaling).

Every response belongs to a group (the prompt it answers, VGPO_SPEC.md "Base: DAPO / GRPO"). Groups
are named by an arbitrary integer ``group_ids`` tensor and their rows may sit anywhere in the batch:
nothing here assumes consecutive rows, a fixed group size or ids in ``0..G-1``. Per-group statistics
are scatter reductions (``index_add_`` / ``bincount``) over the dense index that ``torch.unique``
gives, so the cost is O(B) with no Python loop over rows or groups.

Group statistics are computed in float64: they are ``[B]`` vectors, so this is free, and it keeps a
group of equal non-binary rewards (e.g. 0.1 everywhere) from getting a spurious advantage of order
``rounding error / eps``. Nothing in this file carries gradient.
"""

from __future__ import annotations

import torch

__all__ = [
    "broadcast_to_tokens",
    "compute_grpo_outcome_advantages",
    "group_ids_to_index",
    "group_mean_std",
]


def _check_vector(name: str, tensor: torch.Tensor, length: int | None = None) -> None:
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(tensor.shape)}")
    if length is not None and tensor.numel() != length:
        raise ValueError(f"{name} has {tensor.numel()} rows, expected {length} (one per response)")


def group_ids_to_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary integer group ids to a dense group index.

    Args:
        group_ids: ``[B]`` integer tensor; rows with the same id belong to the same group, in any order.

    Returns:
        ``(inverse, num_groups)``: ``inverse`` is ``[B]`` int64 in ``0..G-1`` (groups numbered in
        increasing id order) and ``num_groups`` is ``G``.
    """
    _check_vector("group_ids", group_ids)
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    unique_ids, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse.to(torch.int64), int(unique_ids.numel())


@torch.no_grad()
def group_mean_std(
    values: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group mean, unbiased std and size, broadcast back to every row.

    ``std`` is the unbiased sample standard deviation (Bessel's correction, ``torch.std``'s default),
    as GRPO and verl use: ``std_g = sqrt(sum_{i in g} (v_i - mean_g)^2 / (n_g - 1))``. A group of one
    row has ``std = 0`` by definition here (not nan), so its advantage is 0.

    Args:
        values: ``[B]`` float (or int/bool, promoted to float32).
        group_ids: ``[B]`` integer group ids, rows in any order.

    Returns:
        ``(mean, std, count)``, each ``[B]`` in the float dtype of ``values``; row ``i`` holds the
        statistic of its own group.
    """
    _check_vector("values", values)
    _check_vector("group_ids", group_ids, values.numel())
    out_dtype = values.dtype if values.is_floating_point() else torch.float32
    inverse, num_groups = group_ids_to_index(group_ids)
    v = values.detach().to(torch.float64)
    count = torch.bincount(inverse, minlength=num_groups).to(torch.float64)
    mean = torch.zeros(num_groups, dtype=torch.float64, device=v.device).index_add_(0, inverse, v)
    mean = mean / count
    # Two-pass variance: sum of squared deviations from the group mean, no catastrophic cancellation.
    sq_dev = (v - mean[inverse]).square()
    ss = torch.zeros_like(mean).index_add_(0, inverse, sq_dev)
    std = (ss / (count - 1.0).clamp(min=1.0)).sqrt()  # n = 1: ss = 0, so std = 0
    return tuple(x[inverse].to(out_dtype) for x in (mean, std, count))  # type: ignore[return-value]


@torch.no_grad()
def compute_grpo_outcome_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """GRPO outcome advantage, one scalar per response.

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` (VGPO paper section 2.1; GRPO, Shao et al. 2024),
    with ``std_g`` the unbiased group std (see ``group_mean_std``). ``scale_by_std=False`` gives the
    Dr.GRPO variant ``A_i = r_i - mean_g(r)`` (Liu et al. 2025, "Understanding R1-Zero-Like
    Training"), which removes the per-question difficulty weighting of the std.

    Args:
        rewards: ``[B]`` float (int/bool rewards are promoted to float32).
        group_ids: ``[B]`` integer prompt ids; same id = same prompt, rows in any order.
        eps: added to the std; must be > 0 when ``scale_by_std`` (a zero-spread group has std 0).
        scale_by_std: divide by the group std (GRPO) or not (Dr.GRPO).

    Returns:
        ``[B]`` advantages in the float dtype of ``rewards``. A group whose rewards are all equal
        (including a group of one) gets 0.
    """
    if scale_by_std and not eps > 0:
        raise ValueError(f"eps must be > 0 when scale_by_std=True, got {eps}")
    mean, std, _ = group_mean_std(rewards, group_ids)
    centered = rewards.detach().to(mean.dtype) - mean
    return centered / (std + eps) if scale_by_std else centered


@torch.no_grad()
def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Spread a per-response advantage over its response tokens.

    Args:
        advantages: ``[B]`` float, one value per response.
        response_mask: ``[B, L]`` bool (or 0/1), True on response tokens.

    Returns:
        ``[B, L]``: ``advantages[i]`` on the response tokens of row ``i``, 0 elsewhere.
    """
    _check_vector("advantages", advantages)
    if response_mask.dim() != 2 or response_mask.shape[0] != advantages.numel():
        raise ValueError(
            f"response_mask must be [B, L] with B = {advantages.numel()}, got {tuple(response_mask.shape)}"
        )
    values = advantages.detach().unsqueeze(-1).expand(response_mask.shape)
    return torch.where(response_mask.bool(), values, torch.zeros_like(values))
