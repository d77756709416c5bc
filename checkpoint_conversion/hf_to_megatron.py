"""Convert a Hugging Face Qwen2.5-VL checkpoint into a Megatron-Core distributed checkpoint.

    python checkpoint_conversion/hf_to_megatron.py --hf-dir Qwen2.5-VL-7B-Instruct --output ckpt/7b \
        --tp 4 --pp 2 [--dtype bf16|fp32] [--force]

Streams tensor by tensor (peak memory: about one layer's largest tensor, whatever the model size).
The output is a ``torch_dist`` checkpoint that ``dist_checkpointing.load(model.sharded_state_dict(),
dir)`` reads at ANY TP/PP layout that fits the model; ``--tp/--pp`` are checked against the config
and recorded in ``conversion.json``. The HF config, tokenizer and processor files are kept in
``<output>/hf_config/`` for the way back (``megatron_to_hf.py``). Logic: ``megatron_vgpo.checkpoint``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_vgpo.checkpoint.convert import DTYPES, hf_to_megatron
from megatron_vgpo.checkpoint.output_dir import add_output_flags, run_conversion


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--output", required=True, help="Megatron checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is meant for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is meant for")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weight dtype; auto keeps the HF one")
    add_output_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_conversion("hf_to_megatron", lambda: hf_to_megatron(
        args.hf_dir, args.output, tp=args.tp, pp=args.pp, dtype=DTYPES[args.dtype], force=args.force,
        progress=not args.no_progress))


if __name__ == "__main__":  # the guard matters: DCP and Megatron may spawn processes
    sys.exit(main())
