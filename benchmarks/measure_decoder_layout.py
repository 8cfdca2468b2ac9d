#!/usr/bin/env python3
"""Why ``asr_lora.backends.column_major_decoder`` exists: one decoding step's matrix products on the CPU.

A greedy decoding step multiplies one row per clip by each decoder weight and by the output projection.
For each of whisper-base's decoder weight shapes (random values: speed does not depend on them), at a
few batch sizes, the time of ``torch.nn.functional.linear`` with the weight as ``nn.Linear`` stores it
(row-major) and with the same weight column-major (what ``column_major_decoder`` switches to), side by
side, and their ratio.

    python benchmarks/measure_decoder_layout.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"output projection": (51865, 512), "q/k/v/out_proj": (512, 512), "fc1": (2048, 512), "fc2": (512, 2048)}


def milliseconds(fn, repeats: int) -> float:
    fn(), fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per product, the mean of {args.repeats}")
    print("| weight | shape | batch | row-major | column-major | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for name, shape in SHAPES.items():
        row_major = torch.randn(*shape)
        column_major = row_major.t().contiguous().t()  # same values and shape, as column_major_decoder stores it
        for batch in args.batch_sizes:
            x = torch.randn(batch, 1, shape[1])  # one decoding position per clip
            a = milliseconds(lambda: torch.nn.functional.linear(x, row_major), args.repeats)
            b = milliseconds(lambda: torch.nn.functional.linear(x, column_major), args.repeats)
            print(f"| {name} | {shape[0]} x {shape[1]} | {batch} | {a:.2f} | {b:.2f} | {a / b:.1f}x |")


if __name__ == "__main__":
    main()
