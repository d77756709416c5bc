"""Visual-faithfulness methods as plug-ins (``base.py`` describes the seam), and ``Methods``: the
configured set the trainer and the actor drive without naming any method.

    methods = build_methods(cfg.algorithm)         # algorithm.shapers / algorithm.loss_terms
    for view in methods.views():                   # one forward-only pass per distinct image view
        ... methods.statistics(view) ...           # computed on the last stage, per micro-batch
    result = methods.shape(inputs)                 # pi_old-phase shapers, in order
    ... methods.current_shapers, methods.loss_terms inside the update's loss function ...

Registered: shapers ``vgpo`` (``vgpo.py``), ``entropy`` (``entropy.py``), ``vppo`` (``vppo.py``, with its
entropy penalty), ``srpo`` (``srpo.py``, provisional); loss terms ``papo`` (``papo.py``).
``algorithm.shapers: []`` with no loss term is plain DAPO/GRPO.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from megatron_vgpo.methods import entropy, noisy_rollout, papo, srpo, vapo, vgpo, vppo  # noqa: F401  (register the plug-ins)
from megatron_vgpo.methods.base import (
    LOSS_TERMS,
    ROLLOUT_METHODS,
    SHAPERS,
    AdvantageShaper,
    LossInputs,
    LossTerm,
    RewardInputs,
    RewardTermResult,
    RolloutMethod,
    ShapingInputs,
    ShapingResult,
    TokenStatistic,
)
from megatron_vgpo.methods.diagnostics import FOCUS, focus_diagnostics
from megatron_vgpo.methods.metrics import MetricSums
from megatron_vgpo.methods.views import ORIGINAL, ImageView

logger = logging.getLogger(__name__)

PRESETS: dict[str, tuple[str, ...]] = {
    "dapo": ("algorithm.shapers=[]", "algorithm.loss_terms=[]"),
    "vgpo": ("algorithm.shapers=[vgpo]", "algorithm.loss_terms=[]"),
    "entropy": ("algorithm.shapers=[entropy]", "algorithm.loss_terms=[]"),
    "vppo": ("algorithm.shapers=[vppo]", "algorithm.loss_terms=[]"),
    "papo": ("algorithm.shapers=[]", "algorithm.loss_terms=[papo]"),
    "vapo": ("algorithm.shapers=[]", "algorithm.loss_terms=[]", "algorithm.rollout_methods=[vapo]",
             "algorithm.dynamic_sampling.metric=reward"),
    "noisy_rollout": ("algorithm.shapers=[]", "algorithm.loss_terms=[]", "algorithm.rollout_methods=[noisy_rollout]"),
    "srpo": ("algorithm.shapers=[srpo]", "algorithm.loss_terms=[]"),  # provisional (methods/srpo.py)
}
"""Method name -> the config overrides that select it alone, each with its section's defaults (the
benchmark and comparison tools run methods by these names)."""


@dataclass
class Methods:
    """The configured shapers (in order) and loss terms, and what they need from the passes."""

    shapers: list[AdvantageShaper]
    loss_terms: list[LossTerm]
    rollout: list[RolloutMethod] = field(default_factory=list)  # rollout-side methods, in order

    def group_size(self, n: int) -> int:
        """Responses per group with ``rollout.n = n``: ``n`` per image view generated on."""
        return n * (1 + sum(m.num_views for m in self.rollout))

    @property
    def old_shapers(self) -> list[AdvantageShaper]:
        return [s for s in self.shapers if not s.current]

    @property
    def current_shapers(self) -> list[AdvantageShaper]:
        return [s for s in self.shapers if s.current]

    def _statistics(self, components) -> dict[str, TokenStatistic]:
        out: dict[str, TokenStatistic] = {}
        for component in components:
            for stat in component.statistics():
                out.setdefault(stat.key, stat)
        return out

    def views(self) -> list[ImageView]:
        """The distinct views the pi_old phase must run, the original first (always: it gives the
        old log-probs)."""
        views = [ORIGINAL]
        for stat in self._statistics([*self.old_shapers, *self.loss_terms]).values():
            if stat.view not in views:
                views.append(stat.view)
        return views

    def statistics(self, view: ImageView) -> list[TokenStatistic]:
        """The pi_old-phase statistics computed in the pass over ``view`` (over the original images,
        the focus score of the diagnostics too)."""
        stats = self._statistics([*self.old_shapers, *self.loss_terms])
        if view == ORIGINAL:
            stats.setdefault(FOCUS.key, FOCUS)
        return [s for s in stats.values() if s.view == view]

    def current_statistics(self) -> list[TokenStatistic]:
        """Statistics the current-policy shapers compute inside each update micro-batch."""
        return list(self._statistics(self.current_shapers).values())

    def loss_statistic_keys(self) -> list[str]:
        """Keys of the pi_old-phase statistics the loss terms read in the update."""
        return list(self._statistics(self.loss_terms))

    @property
    def update_needs_entropy(self) -> bool:
        return (any(t.needs_entropy for t in self.loss_terms)
                or any(s.needs_entropy for s in self.current_statistics()))

    @property
    def update_needs_hidden_states(self) -> bool:
        return any(s.needs_hidden_states for s in self.current_statistics())

    def shape(self, inputs: ShapingInputs) -> ShapingResult:
        """The pi_old-phase shapers in order; the metrics of all of them and the focus diagnostics."""
        result = apply_shapers(self.old_shapers, inputs)
        result.metrics.update(focus_diagnostics(inputs.stats, inputs.response_mask, inputs.has_image))
        return result


def apply_shapers(shapers: list[AdvantageShaper], inputs: ShapingInputs) -> ShapingResult:
    """``shapers`` one after the other, each on the previous one's advantages and loss mask."""
    metrics = MetricSums()
    for shaper in shapers:
        result = shaper.shape(inputs)
        metrics.update(result.metrics)
        inputs = replace(inputs, advantages=result.advantages, loss_mask=result.loss_mask)
    return ShapingResult(inputs.advantages, inputs.loss_mask, metrics)


def build_methods(algorithm, tokenizer=None) -> Methods:
    """``Methods`` of an ``AlgorithmConfig``; ValueError naming the field for an unknown name or an
    impossible combination. With ``hidden_states_from=current`` the shapers that support it run on the
    current policy inside each update micro-batch, the others on the pi_old pass (they must come
    first in ``algorithm.shapers``: current-policy shapers run last). ``tokenizer``: the policy's, for
    the shapers that need it (``needs_tokenizer``)."""
    current = algorithm.hidden_states_from == "current"
    for field_name, names, registry in (("algorithm.shapers", algorithm.shapers, SHAPERS),
                                        ("algorithm.loss_terms", algorithm.loss_terms, LOSS_TERMS),
                                        ("algorithm.rollout_methods", algorithm.rollout_methods, ROLLOUT_METHODS)):
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise ValueError(f"{field_name}: unknown {unknown} (registered: {', '.join(sorted(registry))})")
        if len(set(names)) != len(names):
            raise ValueError(f"{field_name}={list(names)} lists a method twice")
    shapers = [SHAPERS[n].from_config(algorithm, current and SHAPERS[n].supports_current,
                                      **({"tokenizer": tokenizer} if SHAPERS[n].needs_tokenizer else {}))
               for n in algorithm.shapers]
    if current and algorithm.shapers and not any(s.current for s in shapers):
        raise ValueError(f"algorithm.hidden_states_from=current: none of algorithm.shapers={list(algorithm.shapers)} "
                         f"can compute its statistics from the current policy")
    kinds = [s.current for s in shapers]
    if kinds != sorted(kinds):
        raise ValueError(f"algorithm.shapers={list(algorithm.shapers)}: with hidden_states_from=current the "
                         f"current-policy shapers ({[s.name for s in shapers if s.current]}) run inside the update, "
                         f"after the others: list them last")
    loss_terms = [LOSS_TERMS[name].from_config(algorithm) for name in algorithm.loss_terms]
    for shaper in shapers:
        loss_terms += [t for t in shaper.loss_terms() if t.name not in {x.name for x in loss_terms}]
    rollout = [ROLLOUT_METHODS[n].from_config(algorithm, tokenizer) for n in algorithm.rollout_methods]
    for method in rollout:
        if method.filter_on and algorithm.dynamic_sampling.enable and algorithm.dynamic_sampling.metric != method.filter_on:
            logger.warning("algorithm.rollout_methods has %s, which expects algorithm.dynamic_sampling.metric=%s "
                           "(it is %s)", method.name, method.filter_on, algorithm.dynamic_sampling.metric)
    return Methods(shapers, loss_terms, rollout)


__all__ = ["LOSS_TERMS", "PRESETS", "ROLLOUT_METHODS", "SHAPERS", "AdvantageShaper", "ImageView", "LossInputs",
           "LossTerm", "Methods", "MetricSums", "RewardInputs", "RewardTermResult", "RolloutMethod", "ShapingInputs",
           "ShapingResult", "TokenStatistic", "apply_shapers", "build_methods"]
