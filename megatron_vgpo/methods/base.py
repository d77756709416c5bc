"""The plug-in seam for visual-faithfulness methods: four kinds of component, each registered by name.

- **Token statistics** (``TokenStatistic``): a ``[b, L]`` float per micro-batch, computed on the last
  pipeline stage from ONE forward pass over one image view (``views.ImageView``: the original images
  or a perturbed copy). Only these ``[b, L]`` tensors leave the micro-batch; hidden states and logits
  never do. A statistic is identified by ``key`` (what it computes, on which view): two methods that
  declare the same key share it, two statistics on the same view share the forward pass.
- **Advantage shapers** (``AdvantageShaper``): pure, vectorised functions of the token-level advantages
  so far, the masks, the group ids and the statistics they declared; they may narrow the loss mask
  (tokens outside it get no policy-gradient term, the token-mean denominator is unchanged). Shapers
  run in the configured order; by default on statistics of the pi_old pass, for the whole step's
  rows at once, or - for a shaper that supports it (``supports_current``) with
  ``algorithm.hidden_states_from=current`` - inside each update micro-batch on the current policy.
- **Loss terms** (``LossTerm``): functions of the current policy's output and precomputed statistics
  that return a token SUM (Megatron divides every micro-batch's loss by the mini-batch's global token
  count, so the term is an exact token mean), plus the sums of their diagnostics.

- **Rollout-side methods** (``RolloutMethod``): act before the trainer sees the step - extra image
  views each prompt is also generated on (NoisyRollout: its rows join the prompt's group) and a term
  added to the reward of a graded batch before dynamic sampling (VAPO's perception reward, whose
  probes the engine answers through ``RewardInputs.probe``).

Every component has its own typed config section in ``AlgorithmConfig`` and reads only it. The
trainer and the actor talk to ``Methods`` (``methods/__init__.py``), never to a method by name.

Groups are data-parallel-local: a data-parallel rank trains whole groups (``RolloutStep.assignment``),
so a shaper's per-group reductions need no communication. A shaper whose statistic is normalised over
the whole step (VPPO's ``batch`` scope) reduces it over ``ShapingInputs.dp_group``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from megatron_vgpo.methods.metrics import MetricSums
from megatron_vgpo.methods.views import ORIGINAL, ImageView


class TokenStatistic(ABC):
    """A per-token float of one forward pass (see the module docstring)."""

    name: str = ""
    view: ImageView = ORIGINAL
    needs_hidden_states: bool = False
    needs_entropy: bool = False

    @property
    def key(self) -> str:
        return f"{self.name}@{self.view.key}"

    @abstractmethod
    def compute(self, batch, output) -> torch.Tensor:
        """``batch``: the ``MicroBatch`` on the device; ``output``: its ``PolicyOutput``. Returns
        ``[b, w]`` float32, token-aligned (see ``training/experience.py``), 0 outside the response."""


@dataclass
class ShapingInputs:
    """What a shaper sees: this data-parallel rank's rows (whole groups), all ``[B, L]`` / ``[B]``."""

    advantages: torch.Tensor  # [B, L] token-level advantages so far (outcome broadcast, then earlier shapers)
    outcome: torch.Tensor  # [B] the outcome advantages A_i
    response_mask: torch.Tensor  # [B, L] bool
    loss_mask: torch.Tensor  # [B, L] bool, tokens that carry a policy-gradient term so far
    group_ids: torch.Tensor  # [B] int64
    has_image: torch.Tensor  # [B] bool
    old_logprobs: torch.Tensor  # [B, L] pi_old log-probs of the sampled tokens (original view)
    stats: Mapping[str, torch.Tensor]  # declared statistics by key, [B, L]
    dp_group: Any = None  # data-parallel group, for step-wide normalisations
    minibatches: Sequence[Sequence[int]] = ()  # rows of each PPO mini-batch (layout-dependent scopes)
    micro_batch_size: int = 1


@dataclass
class ShapingResult:
    advantages: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L] bool
    metrics: MetricSums = field(default_factory=MetricSums)


class AdvantageShaper(ABC):
    """Maps token-level advantages to token-level advantages (see the module docstring)."""

    name: str = ""
    supports_current: bool = False  # may run on the current policy inside update micro-batches
    needs_tokenizer: bool = False  # from_config receives the tokenizer (e.g. to locate tags in responses)

    def __init__(self, current: bool = False):
        if current and not self.supports_current:
            raise ValueError(f"algorithm.hidden_states_from=current: the '{self.name}' shaper needs statistics "
                             f"of the pi_old pass (extra image views), it cannot run per update micro-batch")
        self.current = current

    @classmethod
    def from_config(cls, algorithm, current: bool = False, tokenizer=None) -> "AdvantageShaper":
        """The shaper of an ``AlgorithmConfig`` (it reads its own section only); ``tokenizer`` (the
        policy's Hugging Face tokenizer, or None) is passed only to shapers with ``needs_tokenizer``."""
        raise NotImplementedError

    @abstractmethod
    def statistics(self) -> tuple[TokenStatistic, ...]:
        """The statistics ``shape`` reads (``inputs.stats[s.key]``)."""

    @abstractmethod
    def shape(self, inputs: ShapingInputs) -> ShapingResult:
        ...

    def loss_terms(self) -> tuple["LossTerm", ...]:
        """Loss terms that belong to this method and come with it (e.g. VPPO's entropy penalty)."""
        return ()


@dataclass
class LossInputs:
    """One update micro-batch as a loss term sees it (all ``[b, w]``, on the device)."""

    logprobs: torch.Tensor  # current policy, token-aligned, with grad
    entropy: Optional[torch.Tensor]  # current policy's full-vocabulary entropy, token-aligned (when asked)
    response_mask: torch.Tensor  # bool
    stats: Mapping[str, torch.Tensor]  # declared statistics (pi_old pass), micro-batch slices
    step: int  # the trainer step being trained (0-based)
    total_steps: int


class LossTerm(ABC):
    """An extra term of the policy loss (see the module docstring)."""

    name: str = ""
    needs_entropy: bool = False

    @classmethod
    def from_config(cls, algorithm) -> "LossTerm":
        """The term of an ``AlgorithmConfig`` (it reads its own section only)."""
        raise NotImplementedError

    @abstractmethod
    def statistics(self) -> tuple[TokenStatistic, ...]:
        ...

    @abstractmethod
    def loss_sum(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(token sum of the term, with grad; {metric: token sum}, detached)``; the metric sums are
        divided by the mini-batch's token count when logged (as ``<name>/<metric>``)."""


# ------------------------------------------------------------------------------------- registries

SHAPERS: dict[str, type[AdvantageShaper]] = {}
LOSS_TERMS: dict[str, type[LossTerm]] = {}


def register_shaper(cls: type[AdvantageShaper]) -> type[AdvantageShaper]:
    """Class decorator: registers a shaper under its ``name``; built with ``cls.from_config(algorithm, current)``
    (plus ``tokenizer=`` when the class ``needs_tokenizer``)."""
    SHAPERS[cls.name] = cls
    return cls


def register_loss_term(cls: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: registers a loss term under its ``name``; built with ``cls.from_config(algorithm)``."""
    LOSS_TERMS[cls.name] = cls
    return cls


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask``, 0 elsewhere (float32)."""
    return torch.where(mask, values.float(), torch.zeros((), dtype=torch.float32, device=values.device))


class ViewLogProbs(TokenStatistic):
    """Log-probs of the sampled tokens under pi_old with the images of ``view`` (the responses teacher-
    forced on perturbed images): ``l_aug`` of METHODS_SPEC section 0. Token-aligned, 0 off-response."""

    name = "logprobs"

    def __init__(self, view: ImageView):
        self.view = view

    def compute(self, batch, output) -> torch.Tensor:
        from megatron_vgpo.training.experience import token_aligned

        return masked(token_aligned(output.logprobs), batch.response_mask)


def k3(a: torch.Tensor, b: torch.Tensor, clamp_log_ratio: float = 20.0) -> torch.Tensor:
    """``exp(a - b) - (a - b) - 1`` (>= 0) for two log-probs of the sampled token, the log-ratio clamped
    to ``[-clamp, clamp]`` first (METHODS_SPEC section 0)."""
    delta = (a - b).clamp(-clamp_log_ratio, clamp_log_ratio)
    return delta.exp() - delta - 1.0


# ------------------------------------------------------------------------------ rollout-side methods

@dataclass
class RewardInputs:
    """A graded rollout batch as a reward term sees it: ``N`` responses, the same on every rank."""

    examples: Sequence[Any]  # [N] each response's PromptExample (claims, row id, images)
    responses: Sequence[str]  # [N] decoded response text
    accuracy: torch.Tensor  # [N] float
    format: torch.Tensor  # [N] float
    keys: Sequence[str]  # [N] a response's key within its prompt (for seeding): its index in the group
    seed: int
    step: int
    probe: Callable[[Sequence[tuple[Any, list[int]]], Sequence[int]], list[int]]
    """``probe([(example, continuation_ids), ...], allowed_token_ids)`` -> one greedy token per probe
    from the engine's current weights: each probe is the example's prompt (images included) followed
    by ``continuation_ids`` inside the assistant turn. Batched over the rollout groups; collective (every
    rank calls it with the same probes)."""


@dataclass
class RewardTermResult:
    term: torch.Tensor  # [N] added to each response's reward
    metrics: dict[str, float] = field(default_factory=dict)  # the same on every rank


class RolloutMethod(ABC):
    """A method acting in the rollout and reward phase: extra image views to generate on (each prompt
    gets ``rollout.n`` more responses per view, in its group) and/or a term added to the reward before
    dynamic sampling. Both default to nothing. Registered by ``name``; ``algorithm.rollout_methods``
    lists the active ones; each reads its own config section."""

    name: str = ""
    num_views: int = 0
    """Extra image views per prompt (``generation_views`` returns this many at every step): a group
    holds ``rollout.n * (1 + num_views)`` responses."""
    filter_on: Optional[str] = None
    """The dynamic-sampling signal the method relies on ("reward": groups whose total rewards differ
    train even when their accuracies are equal); a mismatch with the config is warned about."""

    @classmethod
    def from_config(cls, algorithm, tokenizer) -> "RolloutMethod":
        raise NotImplementedError

    def generation_views(self, step: int, total_steps: int) -> tuple[ImageView, ...]:
        """Image views each prompt is also generated on at ``step`` (``rollout.n`` responses each)."""
        return ()

    def reward(self, inputs: RewardInputs) -> Optional[RewardTermResult]:
        """A term added to the rewards of a graded batch (None: none)."""
        return None

    def metrics(self, step: int, total_steps: int) -> dict[str, float]:
        """Per-step values to log (e.g. a schedule's current value)."""
        return {}


ROLLOUT_METHODS: dict[str, type[RolloutMethod]] = {}


def register_rollout_method(cls: type[RolloutMethod]) -> type[RolloutMethod]:
    """Class decorator: registers a rollout-side method under its ``name``; built with
    ``cls.from_config(algorithm, tokenizer)``."""
    ROLLOUT_METHODS[cls.name] = cls
    return cls
