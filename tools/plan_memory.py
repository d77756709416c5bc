"""Print the memory plan of a config: per pipeline stage, GPU memory in the training and the rollout
phase, the vLLM engine's KV cache and host RAM per rank (``megatron_vgpo/planning/``).

    python tools/plan_memory.py --config examples/configs/qwen25vl_32b.yaml --world-size 32
    python tools/plan_memory.py --config examples/configs/qwen25vl_7b.yaml trainer.micro_batch_size=4
    python tools/plan_memory.py --config examples/configs/qwen25vl_7b.yaml --write   # refresh its header

``--world-size`` and ``--gpu-gb`` default to the config header's ``# world size: N`` and
``# gpu: NAME NNGB`` lines (GPU memory in GiB: an "80 GB" H100 has 80 GiB; default 80).
Exit status: 0 fits (or a CPU run), 1 does not fit, 2 config error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_vgpo.config import ConfigError, load_config, validate
from megatron_vgpo.planning import ArchitectureError, Gpu, config_plan, header_gpu, header_world_size, render_plan
from megatron_vgpo.planning.report import with_plan_block


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file (see examples/configs/)")
    p.add_argument("--world-size", type=int, default=None, help="GPUs of the run (default: the header's)")
    p.add_argument("--gpu-gb", type=float, default=None, help="GPU memory in GiB (default: the header's, else 80)")
    p.add_argument("--write", action="store_true",
                   help="also write the plan into the config's header block (header world size and GPU only)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.write and (args.overrides or args.world_size or args.gpu_gb):
            raise ConfigError("--write plans the file as it is: drop the overrides, --world-size and --gpu-gb "
                              "(edit the file and its '# world size:' / '# gpu:' lines instead)")
        world_size = args.world_size or header_world_size(args.config)
        if world_size is None:
            raise ConfigError(f"{args.config} has no '# world size: N' header line: pass --world-size")
        cfg = load_config(args.config, args.overrides)
        layout = validate(cfg, world_size)
        gpu = Gpu(gib=args.gpu_gb) if args.gpu_gb else header_gpu(args.config) or Gpu()
        plan = config_plan(cfg, layout, gpu=gpu)
    except (ConfigError, ArchitectureError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if plan is None:
        print("CPU run (trainer.device=cpu): no GPU memory plan")
        return 0
    rendered = render_plan(plan)
    print(rendered)
    if args.write:
        path = Path(args.config)
        path.write_text(with_plan_block(path.read_text(), rendered))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
