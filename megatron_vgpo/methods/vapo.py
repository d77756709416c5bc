"""VAPO's perception reward (METHODS_SPEC section 4; Tian et al., "More Thought, Less Accuracy?").

After generation, each response ``s`` is probed at K anchor points of its reasoning: the prompt (image
included), ``s`` cut after the anchor, a claim about the image and a yes/no question, answered by the
engine with the current weights (greedy, one token, restricted to yes/no tokens). The weighted share of
correct answers ``S`` - later anchors weigh more - gives the perception score ``P``; a correct response
with a high ``P`` is rewarded more:

    u        = s up to ``</think>``, else up to ``\\boxed``, else s                        (think part)
    p_k      = K anchor positions among the cut points of u (``, . \\n ! ? ; :``)
    S_i      = sum_k w_k c_k / sum_k w_k,   w_k = exp(1.5 p_k / len(s))                   (eq. 1)
    P_i      = max((S_i - 0.5) / 0.5, 0)                                                  (eq. 2)
    R_i      = (1 - l_f - l_p) acc_i + l_f fmt_i + l_p acc_i P_i                           (eq. 3)

``c_k`` is 1 when the probe's answer matches the label OF THE CLAIM ASKED (the released code scores
anchor k against label k whatever claim k was drawn - a bug not copied here). The base reward
(``rewards/scorer.py``) is ``(1 - l_f) acc + l_f fmt`` with ``l_f = reward.format_weight``, so VAPO adds
``l_p acc_i (P_i - 1)`` to it (eq. 3). Rows without claims get no perception term (counted in
``vapo/rows_without_claims``). Only responses with ``acc_i > 0`` are probed: ``P_i`` enters the reward
through ``acc_i P_i`` alone. Dynamic sampling then filters on the total reward
(``algorithm.dynamic_sampling.metric=reward``, set by the ``vapo`` preset): all-correct groups whose
``P`` differ still train.

Randomness (anchor and claim choice) is seeded from ``(seed, step, row key)``, so every rank and a
resumed run draw the same probes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from megatron_vgpo.methods.base import RewardInputs, RewardTermResult, RolloutMethod, register_rollout_method

logger = logging.getLogger(__name__)

CUT_CHARS = frozenset(",.\n!?;:")
MIN_CUT_GAP = 2
"""A cut point is kept only when it is at least this many characters after the last kept one."""
PROBE_QUESTION = " Is this claim correct? Answer (Yes/No): "
ANCHOR_TAG = "\n<anchor>"


def _f(default, help: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class VAPOConfig:
    """VAPO's hyper-parameters (defaults: the paper's 3B setting). The claims come from the data
    (``data.claim_key``/``claim_label_key``, read into ``PromptExample.claims``)."""

    num_anchors: int = _f(5, "K anchors (probes) per response; the paper uses 5 for 3B, 20 for 7B.")
    perception_coef: float = _f(0.1, "l_p: weight of acc * P in the reward (l_f is reward.format_weight).")
    weight_scale: float = _f(1.5, "Anchor weight exp(weight_scale * p_k / len(s)): later anchors weigh more.")
    yes_words: list = _f(["yes", "Yes", "True", "true", "1"], "Yes answers (those that are one token are allowed).")
    no_words: list = _f(["no", "No", "False", "false", "0"], "No answers (those that are one token are allowed).")

    def __post_init__(self) -> None:
        if self.num_anchors < 1:
            raise ValueError(f"num_anchors={self.num_anchors!r} is invalid: must be >= 1")
        if not 0 <= self.perception_coef <= 1:
            raise ValueError(f"perception_coef={self.perception_coef!r} is invalid: must be in [0, 1]")



# ------------------------------------------------------------------------------------ pure parts

def think_part(response: str) -> str:
    """``u``: the response up to ``</think>``, else up to ``\\boxed``, else all of it."""
    for marker in ("</think>", "\\boxed"):
        end = response.find(marker)
        if end >= 0:
            return response[:end]
    return response


def cut_points(text: str) -> list[int]:
    """Positions in ``text`` of the characters ``, . \\n ! ? ; :``, left to right, each kept only when it
    is ``>= MIN_CUT_GAP`` characters after the last kept one."""
    out: list[int] = []
    for i, ch in enumerate(text):
        if ch in CUT_CHARS and (not out or i - out[-1] >= MIN_CUT_GAP):
            out.append(i)
    return out


def anchor_positions(response: str, k: int, rng: random.Random) -> list[int]:
    """K anchor positions of ``response`` (character indices; the probe keeps ``response[:p + 1]``):
    K distinct cut points of its think part drawn uniformly, sorted; fewer cut points than K: all of
    them, padded with the last; none: K copies of ``len(response) - 1``."""
    points = cut_points(think_part(response))
    if not points:
        return [max(len(response) - 1, 0)] * k
    if len(points) < k:
        return points + [points[-1]] * (k - len(points))
    return sorted(rng.sample(points, k))


def choose_claims(num_claims: int, k: int, rng: random.Random) -> list[int]:
    """Indices of the claims asked at the K anchors: K distinct claims drawn uniformly. With fewer
    claims than anchors [ours]: every claim once in a random order, then again, until K."""
    if num_claims >= k:
        return rng.sample(range(num_claims), k)
    out: list[int] = []
    while len(out) < k:
        out += rng.sample(range(num_claims), num_claims)
    return out[:k]


def probe_text(response: str, position: int, claim: str) -> str:
    """What follows the prompt in probe k (inside the assistant turn): the response cut after the
    anchor, the anchor tag, the claim and the question."""
    return response[:position + 1] + ANCHOR_TAG + claim + PROBE_QUESTION


def perception_score(positions: Sequence[int], correct: Sequence[bool], length: int,
                     weight_scale: float = 1.5) -> tuple[float, float]:
    """``(S_i, P_i)`` of eqs. 1-2: the share of correct probes weighted by ``exp(weight_scale * p_k /
    len(s))``, and ``max((S - 0.5) / 0.5, 0)``."""
    weights = [math.exp(weight_scale * p / max(length, 1)) for p in positions]
    s = sum(w for w, c in zip(weights, correct) if c) / sum(weights)
    return s, max((s - 0.5) / 0.5, 0.0)


def perception_reward_term(accuracy: torch.Tensor, perception: torch.Tensor, has_claims: torch.Tensor,
                           coef: float) -> torch.Tensor:
    """``[N]`` the term VAPO adds to the base reward ``(1 - l_f) acc + l_f fmt`` so that the total is
    eq. 3: ``l_p acc (P - 1)``; 0 for rows without claims. All inputs ``[N]``."""
    return torch.where(has_claims, coef * accuracy * (perception - 1.0), torch.zeros_like(accuracy))


def answer_token_ids(encode: Callable[[str], list[int]], words: Sequence[str]) -> tuple[int, ...]:
    """The token ids of the ``words`` that are one token each for ``encode`` (a tokenizer's
    ``encode(text)`` without special tokens), in order, without repeats. Words that take several
    tokens cannot be a one-token answer and are left out."""
    out: list[int] = []
    for word in words:
        ids = encode(word)
        if len(ids) == 1 and ids[0] not in out:
            out.append(ids[0])
    return tuple(out)


def yes_no_token_ids(encode: Callable[[str], list[int]], yes_words: Sequence[str],
                     no_words: Sequence[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(yes_ids, no_ids)`` of a tokenizer; ValueError when a set is empty or the two overlap."""
    yes, no = answer_token_ids(encode, yes_words), answer_token_ids(encode, no_words)
    if not yes or not no:
        raise ValueError(f"algorithm.vapo: the tokenizer has no one-token answer among "
                         f"{list(yes_words) if not yes else list(no_words)} (algorithm.vapo.yes_words / no_words)")
    if set(yes) & set(no):
        raise ValueError(f"algorithm.vapo: yes and no answers share token ids {sorted(set(yes) & set(no))}")
    return yes, no


def probe_rng(seed: int, step: int, key: str) -> random.Random:
    """The anchor/claim generator of one response, seeded from ``(seed, step, key)`` alone."""
    digest = hashlib.sha256(f"megatron_vgpo-vapo/{seed}/{step}/{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Probe:
    """One probe: row ``row`` (of the reward inputs), anchor position, the claim asked and its label."""

    row: int
    position: int
    claim: str
    label: bool

    def text(self, response: str) -> str:
        return probe_text(response, self.position, self.claim)


def plan_probes(responses: Sequence[str], claims: Sequence[Sequence[tuple[str, bool]]], rows: Sequence[int],
                k: int, rngs: Sequence[random.Random]) -> list[Probe]:
    """The K probes of each row in ``rows`` (those with claims and a correct response), row-major.
    ``claims[r]``: row r's ``(claim, is_true)`` pairs; ``rngs[r]``: its generator (anchors first, then
    claims)."""
    out = []
    for r in rows:
        positions = anchor_positions(responses[r], k, rngs[r])
        for position, c in zip(positions, choose_claims(len(claims[r]), k, rngs[r])):
            claim, label = claims[r][c]
            out.append(Probe(r, position, claim, label))
    return out


def score_probes(probes: Sequence[Probe], answers: Sequence[int], yes_ids: Sequence[int], no_ids: Sequence[int],
                 lengths: Sequence[int], num_rows: int, weight_scale: float) -> tuple[torch.Tensor, dict]:
    """``P`` per row (``[num_rows]``, 0 for rows not probed) from the engine's one-token ``answers``
    (row-major, as ``probes``): a probe is correct when its answer is a yes-token and ITS claim is true,
    or a no-token and its claim false; an answer in neither set is wrong (counted). ``lengths[r]``:
    ``len(s)`` of row r, in characters."""
    yes, no = set(yes_ids), set(no_ids)
    by_row: dict[int, tuple[list[int], list[bool]]] = {}
    invalid = 0
    for probe, token in zip(probes, answers):
        invalid += token not in yes and token not in no
        said_yes = token in yes
        positions, correct = by_row.setdefault(probe.row, ([], []))
        positions.append(probe.position)
        correct.append((token in yes or token in no) and said_yes == probe.label)
    perception = torch.zeros(num_rows)
    scores = []
    for r, (positions, correct) in by_row.items():
        s, p = perception_score(positions, correct, lengths[r], weight_scale)
        perception[r] = p
        scores.append(s)
    n = max(len(probes), 1)
    metrics = {"vapo/probe_accuracy": sum(c for _, cs in by_row.values() for c in cs) / n,
               "vapo/probe_invalid_rate": invalid / n, "vapo/weighted_score": sum(scores) / max(len(scores), 1)}
    return perception, metrics


# -------------------------------------------------------------------------------------- the term

@register_rollout_method
class VAPO(RolloutMethod):
    """VAPO's perception term of the reward (see the module docstring)."""

    name = "vapo"
    filter_on = "reward"

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        self.encode = encode
        # No tokenizer (the config check builds the methods without one): the token sets are derived
        # when the trainer builds it with the policy's.
        self.yes_ids, self.no_ids = (yes_no_token_ids(encode, cfg.yes_words, cfg.no_words) if tokenizer is not None
                                     else ((), ()))

    @classmethod
    def from_config(cls, algorithm, tokenizer) -> "VAPO":
        return cls(algorithm.vapo, tokenizer)

    @property
    def allowed_token_ids(self) -> tuple[int, ...]:
        return self.yes_ids + self.no_ids

    def reward(self, inputs: RewardInputs) -> RewardTermResult:
        cfg, n = self.cfg, len(inputs.responses)
        has_claims = torch.tensor([len(e.claims) > 0 for e in inputs.examples], dtype=torch.bool)
        probed = [r for r in range(n) if has_claims[r] and inputs.accuracy[r] > 0]
        rngs = {r: probe_rng(inputs.seed, inputs.step, f"{inputs.examples[r].row_id}/{inputs.keys[r]}")
                for r in probed}
        probes = plan_probes(inputs.responses, [e.claims for e in inputs.examples], probed, cfg.num_anchors, rngs)
        answers = inputs.probe([(inputs.examples[p.row], self.encode(p.text(inputs.responses[p.row])))
                                for p in probes], self.allowed_token_ids) if probes else []
        perception, metrics = score_probes(probes, answers, self.yes_ids, self.no_ids,
                                           [len(s) for s in inputs.responses], n, cfg.weight_scale)
        term = perception_reward_term(inputs.accuracy, perception, has_claims, cfg.perception_coef)
        if probed:
            metrics["vapo/perception"] = float(perception[probed].mean())
        metrics.update({"vapo/probes": float(len(probes)), "vapo/probed_rows": float(len(probed)),
                        "vapo/rows_without_claims": float((~has_claims).sum()), "vapo/reward_term": float(term.mean())})
        return RewardTermResult(term, metrics)
