"""User reward functions: ``reward.custom_fn = "module:function"`` (or ``"path/to/file.py:function"``).

The function replaces the accuracy grader and is called, in a grading worker, as::

    fn(response: str, ground_truth: str, info: dict) -> float | dict

- ``response``: the decoded response text (special tokens removed);
- ``ground_truth``: the example's answer string, as in the data file;
- ``info``: ``{"row_id", "source", "problem", "parts"}`` of the prompt (what the trainer passes; may be
  empty); ``parts``: a multi-part row's ``rewards.parts.Part``s, else None.

It returns either a number (the accuracy reward, e.g. 0.0 or 1.0) or a dict with a number under
``"accuracy"``, optionally ``"format"`` (replaces the built-in format reward) and any other numeric
keys (kept in ``RewardResult.extra`` for logging). Anything else, a non-finite number, an exception or
exceeding ``reward.timeout_s`` scores accuracy 0 and is logged with the row id.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Mapping


class CustomRewardError(ValueError):
    """``reward.custom_fn`` cannot be loaded (bad spec, missing module/file/function, not callable)."""


def load_custom_fn(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` or ``file.py:function`` and return the function."""
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise CustomRewardError(f"reward.custom_fn={spec!r}: expected 'module:function' or 'path/file.py:function'")
    if module_name.endswith(".py"):
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise CustomRewardError(f"reward.custom_fn={spec!r}: file not found: {path}")
        name = f"_megatron_vgpo_custom_reward_{abs(hash(path))}"
        if name not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:
                raise CustomRewardError(f"reward.custom_fn={spec!r}: importing {path} failed: "
                                        f"{type(e).__name__}: {e}") from e
            sys.modules[name] = module
        module = sys.modules[name]
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # ModuleNotFoundError, or an error inside the module
            raise CustomRewardError(f"reward.custom_fn={spec!r}: cannot import module {module_name!r}: "
                                    f"{type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise CustomRewardError(f"reward.custom_fn={spec!r}: module {module_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise CustomRewardError(f"reward.custom_fn={spec!r}: {fn_name!r} is a {type(fn).__name__}, not a function")
    return fn


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or isinstance(value, (int, float)):
        number = float(value)
        if math.isfinite(number):
            return number
        raise ValueError(f"custom reward returned a non-finite {what}: {value!r}")
    raise TypeError(f"custom reward returned {type(value).__name__} for {what}, expected a number")


def normalize_output(value: Any) -> dict:
    """A custom function's return value as ``{"accuracy": float, "format": float | None, "extra": dict}``."""
    if isinstance(value, Mapping):
        if "accuracy" not in value:
            raise ValueError(f"custom reward returned a dict without 'accuracy' (keys: {sorted(value)})")
        extra = {str(k): _number(v, repr(k)) for k, v in value.items() if k not in ("accuracy", "format")}
        fmt = value.get("format")
        return {"accuracy": _number(value["accuracy"], "'accuracy'"),
                "format": None if fmt is None else _number(fmt, "'format'"), "extra": extra}
    return {"accuracy": _number(value, "the reward"), "format": None, "extra": {}}
