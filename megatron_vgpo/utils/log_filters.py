"""Quiet the per-step chatter of the libraries the trainer drives, keeping the warnings that matter.

A rule names one logger and one exact message (the record's format string), and optionally which
arguments; a matching record is demoted to DEBUG rather than dropped, so the library's own debug
logging (``VLLM_LOGGING_LEVEL=DEBUG`` for vLLM) still shows it. The same message with other arguments,
and every other message of those loggers, pass unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Demote:
    """Demote the records of ``logger`` whose format string is ``message`` (and whose arguments
    satisfy ``args``, when given) to DEBUG."""

    logger: str
    message: str
    args: Optional[Callable[[tuple], bool]] = None

    def matches(self, record: logging.LogRecord) -> bool:
        if record.msg != self.message:
            return False
        return self.args is None or self.args(record.args if isinstance(record.args, tuple) else ())


def _is_rotary_embedding(args: tuple) -> bool:
    return bool(args) and str(args[0]).endswith("RotaryEmbedding")


VLLM_RELOAD_NOISE = (
    # Rotary embeddings have no checkpoint tensors: their cos/sin cache is a buffer that the layer-wise
    # reload counts as loadable, finds unloaded, and puts back unchanged. The same warning for any
    # other layer (a layer that really got no weights) is kept.
    Demote("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights", _is_rotary_embedding),
    # Per-reload progress: "info_once" repeats it because the time differs every step (the trainer
    # logs the weight sync as timing_s/weight_sync). The reload's warnings (weights not loaded, ...) stay.
    Demote("vllm.model_executor.model_loader.reload.inplace", "Reloading weights inplace..."),
    Demote("vllm.model_executor.model_loader.reload.inplace", "Reloading and processing weights took %.2f seconds"),
    # Every cache reset after a reload; a failed reset is a warning and stays.
    Demote("vllm.v1.core.block_pool", "Successfully reset prefix cache"),
)
"""What vLLM logs around every weight reload (``VLLMRolloutEngine.update_weights``, once per step)."""


class DemoteToDebug(logging.Filter):
    """A logger filter applying ``rules`` (all for the logger it is attached to)."""

    def __init__(self, rules: tuple[Demote, ...]):
        super().__init__()
        self.rules = rules

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and any(rule.matches(record) for rule in self.rules):
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True  # the handlers' levels decide: vLLM's handler is at INFO unless asked for DEBUG


def install(rules: tuple[Demote, ...] = VLLM_RELOAD_NOISE) -> None:
    """Attach the filters for ``rules`` to their loggers (idempotent; before or after the library is
    imported: its logging config resets its loggers' levels and handlers, not their filters)."""
    by_logger: dict[str, list[Demote]] = {}
    for rule in rules:
        by_logger.setdefault(rule.logger, []).append(rule)
    for name, logger_rules in by_logger.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, DemoteToDebug) and f.rules == tuple(logger_rules) for f in target.filters):
            target.addFilter(DemoteToDebug(tuple(logger_rules)))
