"""Benchmark 2DMambaMIL's lattice conv + SiLU: `ops.lattice_conv_silu`'s kernels against PyTorch's depthwise conv
and SiLU (the reference), forward and forward+backward, at the Mamba block's shape on a 200 x 200 slide.

    python scripts/bench_conv.py [--reps 100] [--channels 256] [--side 200]

Median times, eager (triton.testing.do_bench) and replayed from a CUDA graph (`bench_scan.bench_one`), and peak
memory of forward+backward, per dtype.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ops  # noqa: E402
from bench_scan import bench_one  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=100, help="ms of repetitions per timing (do_bench's rep)")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--side", type=int, default=200)
    parser.add_argument("--kernel", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_conv needs a CUDA device")
    H = W = args.side
    print(f"lattice conv + SiLU: 1 x {args.channels} channels, {H}x{W}, k = {args.kernel}; ms (median), MiB")
    for dtype in (torch.float32, torch.bfloat16):
        x = dict(x=torch.randn(1, args.channels, H * W, device="cuda", dtype=dtype, requires_grad=True),
                 weight=torch.randn(args.channels, 1, args.kernel, args.kernel, device="cuda", requires_grad=True),
                 bias=torch.randn(args.channels, device="cuda", requires_grad=True))
        impls = {  # PyTorch's conv takes the weights in the input's dtype, as autocast would cast them
            "kernels": lambda x, weight, bias: ops.lattice_conv_silu(x, weight, bias, height=H, width=W),
            "pytorch": lambda x, weight, bias: ops.lattice_conv_silu_ref(x, weight.to(x.dtype), bias.to(x.dtype),
                                                                         height=H, width=W),
        }
        times = {name: bench_one(fn, x, args.reps) for name, fn in impls.items()}
        for name, r in times.items():
            print(f"{str(dtype):>15} {name:>8}: fwd {r['fwd_ms']:.3f} fwd+bwd {r['fwd_bwd_ms']:.3f} | graph: fwd "
                  f"{r['fwd_graph_ms']:.3f} fwd+bwd {r['fwd_bwd_graph_ms']:.3f} | {r['peak_mib']:.0f} MiB")
        k, p = times["kernels"], times["pytorch"]
        print(f"{'':>15} fwd+bwd: kernels {p['fwd_bwd_ms'] / k['fwd_bwd_ms']:.1f}x faster eager, "
              f"{p['fwd_bwd_graph_ms'] / k['fwd_bwd_graph_ms']:.1f}x replayed")


if __name__ == "__main__":
    main()
