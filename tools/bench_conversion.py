"""Peak memory and time of the checkpoint conversion, both ways, on a full-size random Qwen2.5-VL.

    python tools/bench_conversion.py --workdir /tmp/bench [--preset 3b|7b|small] [--tp 2 --pp 2] [--keep]

1. Writes a random HF checkpoint with the exact tensor shapes of Qwen2.5-VL-3B or -7B (text AND vision
   tower; bf16; tokenizer and processor of the tiny test model), streamed one tensor at a time so
   that it fits any machine with the disk space (3b: 7.5 GB, 7b: 16.6 GB; the run needs 3x that).
2. Runs ``checkpoint_conversion/hf_to_megatron.py`` then ``megatron_to_hf.py`` as child processes and
   reads each one's peak resident set size from the kernel (``wait4`` rusage: anonymous memory AND
   mapped file pages), plus a child that only imports the same modules (the fixed cost).
3. Checks the round trip is bit-exact, tensor by tensor, and prints the numbers: peak RSS, its ratio
   to the model size, the part above the import baseline, wall time and throughput.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {  # real Qwen2.5-VL shapes (text and vision); "small" is for trying the tool quickly
    "3b": dict(tie=True, text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                   num_attention_heads=16, num_key_value_heads=2, vocab_size=151936)),
    "7b": dict(tie=False, text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)),
    "small": dict(tie=False, text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=2, vocab_size=32768)),
}
REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31])
IMPORTS = ("import megatron_vgpo.checkpoint.convert, transformers.models.qwen2_5_vl.modeling_qwen2_5_vl, "
           "megatron.core.dist_checkpointing, transformers, safetensors")


def build_config(preset: str):
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, build_config as tiny_config, build_tokenizer

    spec = PRESETS[preset]
    overrides = {f"text_config.{k}": v for k, v in spec["text"].items()}
    if preset != "small":
        overrides.update({f"vision_config.{k}": v for k, v in REAL_VISION.items()})
    options = TinyOptions(tie_embeddings=spec["tie"], dtype="bfloat16", overrides=overrides)
    tok = build_tokenizer(options.bpe_vocab_size)
    return tok, tiny_config(tok, options), options


def write_random_checkpoint(out: Path, preset: str, seed: int = 0) -> tuple[int, int]:
    """A random bf16 HF checkpoint of ``preset`` in ``out`` (one tensor in memory at a time):
    ``(total bytes, bytes of the largest tensor)``."""
    from megatron_vgpo.checkpoint.hf_io import TensorInfo, plan_shards, write_safetensors_shards
    from megatron_vgpo.models.qwen2_5_vl.loading import expected_hf_shapes
    from megatron_vgpo.models.qwen2_5_vl.tiny import write_processor_files, write_tokenizer_files

    tok, config, options = build_config(preset)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    write_tokenizer_files(tok, out, config.text_config.max_position_embeddings)
    write_processor_files(out, config, options)
    shapes = expected_hf_shapes(config)
    shards = plan_shards([[(n, TensorInfo(tuple(s), torch.bfloat16))] for n, s in shapes.items()], 4 * 2**30)
    gen = torch.Generator().manual_seed(seed)

    def tensors(shard):
        for name, info in shard.entries:
            yield name, (torch.randn(info.shape, generator=gen, dtype=torch.bfloat16) * 0.02)

    write_safetensors_shards(out, shards, tensors)
    largest = 2 * max(torch.Size(info.shape).numel() for s in shards for _, info in s.entries)  # bf16
    return sum(s.nbytes for s in shards), largest


# Runs the command from a small process: a forked child's ru_maxrss starts at its parent's RSS, and
# this benchmark's own process holds the largest generated tensor's pages.
_MEASURE = ("import os, subprocess, sys, time; t = time.perf_counter(); p = subprocess.Popen(sys.argv[1:], "
            "stdout=subprocess.DEVNULL); _, s, u = os.wait4(p.pid, 0); "
            "print(os.waitstatus_to_exitcode(s), u.ru_maxrss, time.perf_counter() - t)")


def measured(cmd: list[str]) -> tuple[float, float]:
    """``(peak RSS in bytes, wall seconds)`` of a child process; fails loudly if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    code, maxrss_kib, wall = out.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return int(maxrss_kib) * 1024.0, float(wall)  # ru_maxrss is in KiB on Linux


def verify_round_trip(a: Path, b: Path) -> int:
    """Number of tensors compared; SystemExit on the first one that differs."""
    from megatron_vgpo.checkpoint.hf_io import HFCheckpoint

    left, right = HFCheckpoint(a), HFCheckpoint(b)
    if sorted(left.info) != sorted(right.info):
        raise SystemExit(f"tensor names differ: {sorted(set(left.info) ^ set(right.info))[:5]}")
    for name in left.info:
        if not torch.equal(left.read(name), right.read(name)):
            raise SystemExit(f"round trip NOT bit-exact: {name}")
    return len(left.info)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="scratch directory (needs about 3x the model size)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="3b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = p.parse_args(argv)
    work = Path(args.workdir) / f"bench_{args.preset}"
    shutil.rmtree(work, ignore_errors=True)
    hf, meg, back = work / "hf", work / "megatron", work / "hf_back"
    t0 = time.perf_counter()
    model_bytes, largest = write_random_checkpoint(hf, args.preset)
    print(f"[bench] random Qwen2.5-VL-{args.preset}: {model_bytes / 1e9:.2f} GB bf16 (largest tensor "
          f"{largest / 2**30:.2f} GiB), written in {time.perf_counter() - t0:.0f}s", flush=True)
    py = sys.executable
    base_rss, _ = measured([py, "-c", IMPORTS])
    to_meg = measured([py, "checkpoint_conversion/hf_to_megatron.py", "--hf-dir", str(hf), "--output", str(meg),
                       "--tp", str(args.tp), "--pp", str(args.pp), "--no-progress"])
    to_hf = measured([py, "checkpoint_conversion/megatron_to_hf.py", "--megatron-dir", str(meg), "--output",
                      str(back), "--no-progress"])
    n = verify_round_trip(hf, back)
    print(f"[bench] round trip bit-exact: {n} tensors")
    print(f"[bench] import baseline (python + torch + megatron + transformers): peak RSS {base_rss / 2**30:.2f} GiB")
    for label, (rss, wall) in (("hf -> megatron", to_meg), ("megatron -> hf", to_hf)):
        print(f"[bench] {label}: peak RSS {rss / 2**30:.2f} GiB = {rss / model_bytes:.3f} x model size "
              f"({(rss - base_rss) / 2**30:.2f} GiB above the baseline), {wall:.0f}s "
              f"({model_bytes / wall / 1e6:.0f} MB/s)")
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
