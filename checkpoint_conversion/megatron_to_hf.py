"""Convert a Megatron-Core distributed checkpoint of Qwen2.5-VL into a Hugging Face directory.

    python checkpoint_conversion/megatron_to_hf.py --megatron-dir ckpt/7b --output ckpt/7b-hf \
        [--dtype bf16|fp32] [--max-shard-size 4GB] [--hf-config DIR] [--force]

Reads one tensor (one layer of a stacked tensor) at a time, whatever TP/PP layout wrote the
checkpoint, and streams it into safetensors shards of at most ``--max-shard-size`` plus
``model.safetensors.index.json``; config, tokenizer and processor files come from the checkpoint's
``hf_config/`` (or ``--hf-config``). The result loads with ``from_pretrained``. A damaged input is
refused (exit 2) with an error naming the file: a training checkpoint is checked against the
manifest in its ``complete.json``, a converted one against its ``.metadata``. Logic:
``megatron_vgpo.checkpoint``.
"""

from __future__ import annotations

import argparse
import re
import sys

from megatron_vgpo.checkpoint.convert import DEFAULT_MAX_SHARD_BYTES, DTYPES, megatron_to_hf
from megatron_vgpo.checkpoint.output_dir import add_output_flags, run_conversion

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"4GB"`` -> 4e9, ``"500MiB"``, ``"200KB"``, ``"123"`` (bytes), as ``save_pretrained`` reads them."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GB, 500MB, 200KB)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-dir", required=True, help="Megatron torch_dist checkpoint directory")
    p.add_argument("--output", required=True, help="HF directory to create")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weight dtype; auto keeps the stored one")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                   help="largest safetensors shard (default 4GiB)")
    p.add_argument("--hf-config", default=None,
                   help="directory with config.json, tokenizer and processor files (default: <megatron-dir>/hf_config)")
    add_output_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_conversion("megatron_to_hf", lambda: megatron_to_hf(
        args.megatron_dir, args.output, dtype=DTYPES[args.dtype], max_shard_bytes=args.max_shard_size,
        force=args.force, hf_config_dir=args.hf_config, progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
