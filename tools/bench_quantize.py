"""Side by side: our 4-bit quantizer against bitsandbytes' on the CPU, on the 1.1B benchmark's linear
shapes, checking that both write the same bytes.

    python tools/bench_quantize.py [--threads N] [--repeats 3]

Prints the median time per shape and dtype and the ratio ours / bitsandbytes (target: well under 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import bitsandbytes.functional as F
import torch

from qlora_lite.model.bnb import quantize_4bit
from qlora_lite.model.precision import cpu_features

# (out, in) of the linear layers of one block of the 1.1B LLaMA shape (hidden 2048, GQA 4, MLP 5632).
SHAPES = {"q_proj/o_proj": (2048, 2048), "k_proj/v_proj": (256, 2048), "gate/up": (5632, 2048), "down": (2048, 5632)}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU {cpu_features()}, {torch.get_num_threads()} threads")
    print(f"{'shape':<14} {'dtype':<9} {'bitsandbytes':>12} {'qlora-lite':>11} {'ratio':>6}  same bytes")
    total = {"bnb": 0.0, "ours": 0.0}
    for name, shape in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
            ref = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
            ours = quantize_4bit(weight, "nf4", True)
            same = torch.equal(ref[0], ours[0]) and torch.equal(ref[1].absmax, ours[1].absmax)
            t_ref = median_seconds(lambda w=weight: F.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                                    compress_statistics=True), args.repeats)
            t_ours = median_seconds(lambda w=weight: quantize_4bit(w, "nf4", True), args.repeats)
            total["bnb"] += t_ref
            total["ours"] += t_ours
            print(f"{name:<14} {str(dtype).removeprefix('torch.'):<9} {t_ref * 1e3:10.1f}ms {t_ours * 1e3:9.1f}ms "
                  f"{t_ours / t_ref:6.2f}  {same}")
    print(f"all shapes: ours / bitsandbytes = {total['ours'] / total['bnb']:.2f}")


if __name__ == "__main__":
    main()
