"""Profile one 2D-scan forward+backward (torch.profiler kernel table); run under ncu for hardware counters.

    python scripts/profile_scan.py [--shape 1 256 16 200 200] [--dtype bfloat16] [--scan 1d]

`--scan 1d` profiles the 1D scan on the same L (one row of H x W), as scripts/bench_scan.py compares them; the
kernel table then shows the kernels' own times where the bench's (host and all) are bound by the host.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import make  # noqa: E402

import ops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=5, default=[1, 256, 16, 200, 200])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--scan", choices=("2d", "1d"), default="2d")
    args = parser.parse_args()
    batch, d, n, H, W = args.shape
    x = make(batch, d, n, H * W, getattr(torch, args.dtype))

    def step():
        if args.scan == "2d":
            out = ops.selective_scan_2d(**x, height=H, width=W, delta_softplus=True)
        else:
            out = ops.selective_scan_1d(**x, delta_softplus=True)
        out.float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
