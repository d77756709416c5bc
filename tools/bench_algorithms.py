"""Benchmark VGPO's cost against one projection of the layer it rides on.

    python tools/bench_algorithms.py [--batch 64 --prompt 1024 --response 2048 --hidden 3584 --repeats 3]

On a micro-batch of B responses of L = prompt + response tokens with hidden size d (defaults: the
issue's 7B case, float32), times
  - ``visual_focus_scores`` (eqs. 2-4: the only part that reads the [B, L, d] hidden states),
  - the shaping from scores (``shape_advantages``, eqs. 5-12),
  - one ``F.linear`` of the same hidden states with a [d, d] weight (one projection of one layer,
    about 1/550 of a 7B forward),
and prints each time and the ratios (median of ``--repeats`` runs after a warm-up). Target: the
VGPO total / linear ratio <= 1, i.e. VGPO adds under ~0.2% to the log-prob pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_vgpo.algorithms.vgpo import VGPOConfig, shape_advantages, visual_focus_scores


def make_batch(B: int, prompt: int, response: int, d: int, image_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = prompt + response
    h = torch.randn(B, L, d, generator=g)
    image = torch.zeros(B, L, dtype=torch.bool)
    image[:, 8:8 + image_tokens] = True
    lengths = torch.randint(response // 4, response + 1, (B,), generator=g)
    resp = torch.arange(L).unsqueeze(0) - prompt < lengths.unsqueeze(1)
    resp &= torch.arange(L).unsqueeze(0) >= prompt
    adv = torch.randn(B, generator=g)
    gid = torch.arange(B) // 8  # groups of n = 8
    return h, image, resp, adv, gid


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--response", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--image-tokens", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", choices=["paper", "official"], default="paper")
    args = p.parse_args()

    torch.manual_seed(0)
    h, image, resp, adv, gid = make_batch(args.batch, args.prompt, args.response, args.hidden, args.image_tokens)
    cfg = VGPOConfig(variant=args.variant)
    weight = torch.randn(args.hidden, args.hidden) / args.hidden ** 0.5
    rho = visual_focus_scores(h, image, resp, cfg.variant, cfg.eps)
    has_image = image.any(-1)

    with torch.no_grad():
        t_scores = timed(lambda: visual_focus_scores(h, image, resp, cfg.variant, cfg.eps), args.repeats)
        t_shape = timed(lambda: shape_advantages(rho, resp, has_image, adv, gid, cfg), args.repeats)
        t_linear = timed(lambda: F.linear(h, weight), args.repeats)

    B, L, d = h.shape
    print(f"micro-batch B={B} L={L} (prompt {args.prompt} + response {args.response}) d={d} float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"visual_focus_scores : {t_scores * 1e3:9.1f} ms")
    print(f"shape_advantages    : {t_shape * 1e3:9.1f} ms")
    print(f"F.linear [d, d]     : {t_linear * 1e3:9.1f} ms")
    print(f"ratio scores / linear : {t_scores / t_linear:.4f}")
    print(f"ratio shaping / linear: {t_shape / t_linear:.4f}")
    print(f"ratio VGPO total / linear: {(t_scores + t_shape) / t_linear:.4f}  (target <= 1)")


if __name__ == "__main__":
    main()
