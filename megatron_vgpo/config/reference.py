"""The config reference as a Markdown table, generated from the schema's field docs.

``README.md`` embeds it between ``<!-- config-reference:begin -->`` and ``<!-- config-reference:end -->``;
``python tools/config_reference.py --write`` refreshes it and a test keeps it in sync.
"""

from __future__ import annotations

import dataclasses
import typing

from megatron_vgpo.config.loader import _type_name

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def iter_fields(cls, prefix: str = ""):
    """Yield (dotted path, annotation, default, help) of every leaf field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{path}.")
        else:
            yield path, tp, getattr(instance, f.name), f.metadata.get("help", "")


def config_reference_markdown() -> str:
    from megatron_vgpo.config.schema import Config

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, tp, default, help in iter_fields(Config):
        default = "null" if default is None else repr(default).replace("|", "\\|")
        lines.append(f"| `{path}` | {_type_name(tp).replace('|', '/')} | `{default}` | {help.replace('|', '/')} |")
    return "\n".join(lines)
