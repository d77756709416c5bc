"""Build the typed config tree from YAML and ``key.sub=value`` overrides; dump it back to YAML.

Strict by design: an unknown key, a value of the wrong type or outside a field's allowed choices is a
``ConfigError`` naming the dotted field, the bad value and what is allowed (with a "did you mean"
for near-miss keys). Defaults come only from the dataclass fields in ``schema.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config problem, always naming the dotted field it is about."""


MIGRATIONS = {
    "algorithm.shaping": "algorithm.shaping was replaced by algorithm.shapers (a list of registered shapers): "
                         "'shaping: vgpo' is 'shapers: [vgpo]', 'shaping: none' is 'shapers: []'",
}
"""Removed keys -> how to say the same with the current config tree."""


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads 1e-6 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, f"{path}.")
    else:  # pragma: no cover - a schema annotation this loader does not know
        raise TypeError(f"unsupported config annotation {tp!r} at {path}")
    raise ConfigError(f"{path}: invalid value {value!r} ({type(value).__name__}); expected {_type_name(tp)}")


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def from_dict(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a (nested) dict, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in MIGRATIONS:
            raise ConfigError(MIGRATIONS[path])
        if key not in fields:
            raise ConfigError(f"unknown key '{path}'{_did_you_mean(str(key), list(fields))}"
                              f" (valid keys of {prefix.rstrip('.') or 'the root'}: {', '.join(fields)})")
        kwargs[key] = _coerce(value, fields[key][1], path)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a component's own range checks, e.g. VGPOConfig.__post_init__
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix}{e}") from None


def _parse_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), raw


def _override_value(raw: str, tp: Any) -> Any:
    """Parse an override string: kept verbatim for string fields, YAML-parsed otherwise."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType, Literal) else (tp,)
    if tp is str or (typing.get_origin(tp) is Literal and raw in args):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str], cls) -> dict:
    """Apply dotted overrides (``algorithm.vgpo.beta=0.5``) to the raw dict of dataclass ``cls``."""
    for item in overrides:
        keys, raw = _parse_override(item)
        node, node_cls, path = data, cls, ""
        for i, key in enumerate(keys):
            fields = _fields(node_cls)
            if f"{path}{key}" in MIGRATIONS:
                raise ConfigError(MIGRATIONS[f"{path}{key}"])
            if key not in fields:
                raise ConfigError(f"unknown key '{path}{key}' in override '{item}'{_did_you_mean(key, list(fields))}")
            tp = fields[key][1]
            if i == len(keys) - 1:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override '{item}' sets the section '{path}{key}'; set one of its fields")
                node[key] = _override_value(raw, tp)
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override '{item}': '{path}{key}' is a {_type_name(tp)}, not a section")
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{path}{key}: expected a mapping, got {node!r}")
                node_cls, path = tp, f"{path}{key}."
    return data


def load_config(path: str | None = None, overrides: list[str] = (), cls=None):
    """Read YAML ``path`` (optional), apply ``overrides``, and return the typed, checked config tree."""
    from megatron_vgpo.config.schema import Config
    from megatron_vgpo.config.validate import validate

    cls = cls or Config
    data: dict = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    cfg = from_dict(cls, apply_overrides(data, list(overrides), cls))
    if cls is Config:
        validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    """The resolved config as YAML (loads back to an equal config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
