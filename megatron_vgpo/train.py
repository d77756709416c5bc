"""Entry point: ``python -m megatron_vgpo.train --config FILE [key.sub=value ...] [--dry-run]``.

Under torchrun every rank runs this SPMD. ``--dry-run`` validates the config, prints the resolved
config, the memory plan (``megatron_vgpo/planning/``, as YAML comments) and, last, the TP x PP x DP
layout for the world size (``--world-size``, else torchrun's WORLD_SIZE, else 1), and exits 0; any
config problem exits 2 with a message naming the field.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_vgpo.config import ConfigError, dump_yaml, load_config, validate


class HelpConfig(argparse.Action):
    """``--help-config [PREFIX]``: every config field under ``PREFIX`` with its type, default and
    documentation (the README's config reference), then exit, as ``--help`` does."""

    def __call__(self, parser, namespace, prefix, option_string=None):
        print(config_help(prefix or ""))
        parser.exit()


def config_help(prefix: str = "") -> str:
    """``path (type, default X): help`` of every config field whose dotted path starts with ``prefix``."""
    from megatron_vgpo.config.reference import _type_name, iter_fields
    from megatron_vgpo.config.schema import Config

    lines = [f"{path} ({_type_name(tp)}, default {default!r}): {help}"
             for path, tp, default, help in iter_fields(Config) if path.startswith(prefix)]
    return "\n".join(lines) or f"no config field starts with {prefix!r}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_vgpo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--help-config", nargs="?", const="", metavar="PREFIX", action=HelpConfig,
                   help="print the config fields under PREFIX (e.g. algorithm.srpo) with their documentation, exit")
    p.add_argument("--config", required=True, help="YAML config file (see examples/configs/)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and layout, exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="world size to lay out in --dry-run (default: $WORLD_SIZE, else 1)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        layout = validate(cfg, world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from megatron_vgpo.planning.report import dry_run_plan

        print(dump_yaml(cfg), end="")
        print(dry_run_plan(cfg, layout, args.config))
        print(f"# parallel layout: {layout.describe()}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_vgpo.trainer import Trainer

    summary = Trainer.from_config(cfg).train()
    if int(os.environ.get("RANK", "0")) == 0:
        print(accuracy_table(summary))
    return 0


def accuracy_table(summary: dict) -> str:
    """The last validation accuracy of each validation dataset, as a small text table.

    One row per dataset and nothing pooled: the pooled ``val/accuracy`` averages files of different
    meaning (the task and a control such as ``val_blank``) into a number that answers no question."""
    from megatron_vgpo.training.logging import VAL_PREFIX

    rows = [(k.removeprefix(VAL_PREFIX), v) for k, v in sorted(summary.items()) if k.startswith(VAL_PREFIX)]
    if not rows:
        return "no validation accuracy (no validation ran: see trainer.val_interval)"
    width = max([len(name) for name, _ in rows] + [7])
    lines = [f"{'dataset':<{width}}  accuracy", f"{'-' * width}  --------"]
    lines += [f"{name:<{width}}  {value:8.3f}" for name, value in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
