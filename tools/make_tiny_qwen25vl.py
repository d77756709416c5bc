"""Write a tiny random Qwen2.5-VL checkpoint (weights, config, tokenizer, processor), fully offline.

    python tools/make_tiny_qwen25vl.py --output /tmp/tiny-qwen25vl [--seed 0] [--tie-embeddings] \
        [--dtype bfloat16] [--set text_config.num_hidden_layers=2 --set vision_config.depth=2]

The same options give byte-identical files; the logic and the defaults live in
``megatron_vgpo.models.qwen2_5_vl.tiny`` (see its docstring for what is faithful to the real models).
"""

from __future__ import annotations

import argparse
import sys

from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, parse_overrides, write_tiny_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TinyOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="directory to create (must be absent or empty)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random weights")
    p.add_argument("--tie-embeddings", action="store_true", help="tie lm_head to the embeddings (3B style)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype, help="weight dtype")
    p.add_argument("--init-std", type=float, default=d.init_std, help="std of the random weights")
    p.add_argument("--min-pixels", type=int, default=d.min_pixels, help="image processor min pixels")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="image processor max pixels")
    p.add_argument("--bpe-vocab-size", type=int, default=d.bpe_vocab_size,
                   help="BPE vocabulary size (the 22 special tokens follow it; the corpus allows <= 1199)")
    p.add_argument("--max-shard-size", default=None, help='shard the safetensors, e.g. "200KB"')
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for nested (text_config.num_hidden_layers=2); "
                        "values are JSON/YAML scalars or lists; repeatable")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        options = TinyOptions(
            seed=args.seed, dtype=args.dtype, tie_embeddings=args.tie_embeddings, init_std=args.init_std,
            min_pixels=args.min_pixels, max_pixels=args.max_pixels, max_shard_size=args.max_shard_size,
            bpe_vocab_size=args.bpe_vocab_size,
            overrides=parse_overrides(args.overrides),
        )
        out = write_tiny_checkpoint(args.output, options, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"make_tiny_qwen25vl: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
