"""Benchmark the 2D selective scan (forward and forward+backward) next to the 1D scan and the reference.

    python scripts/bench_scan.py [--out bench_out/scan.json] [--reps 100] [--no-reference]

For each (batch, d, n, H x W) of the issue and each dtype: median times (triton.testing.do_bench, CUDA events),
peak memory of forward+backward, and the achieved HBM bandwidth of the minimal traffic (each input read once,
each output written once) as a fraction of the H100's 3.35 TB/s. The call is 2DMambaMIL's: D, z, delta_bias
and softplus on.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import ops  # noqa: E402
from ops import selective_scan  # noqa: E402

LOG = logging.getLogger("bench_scan")
SHAPES = [(1, 256, 16, 200, 200), (1, 256, 16, 100, 100), (64, 384, 16, 14, 14), (64, 192, 16, 56, 56)]
PEAK_BW = 3.35e12


def make(batch, d, n, L, dtype):
    x = dict(u=torch.randn(batch, d, L, device="cuda", dtype=dtype),
             delta=(torch.rand(batch, d, L, device="cuda") * 0.6 + 0.05).to(dtype),
             A=-torch.rand(d, n, device="cuda") * 1.5 - 0.2,
             B=torch.randn(batch, n, L, device="cuda", dtype=dtype), C=torch.randn(batch, n, L, device="cuda", dtype=dtype),
             D=torch.randn(d, device="cuda"), z=torch.randn(batch, d, L, device="cuda", dtype=dtype),
             delta_bias=torch.randn(d, device="cuda") * 0.5 - 1.0)
    for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        x[k].requires_grad_()
    return x


def min_bytes(batch, d, n, L, dtype, backward):
    """Inputs read once, outputs written once (u, delta, z, out; B, C); the backward also reads dout and writes
    du, ddelta, dz, dB, dC."""
    esize = torch.tensor([], dtype=dtype).element_size()
    fwd = (4 * batch * d * L + 2 * batch * n * L) * esize
    return fwd + ((4 * batch * d * L + 2 * batch * n * L) * esize if backward else 0)


def bench_one(fn, x, reps):
    from triton.testing import do_bench

    grads = [v for v in x.values() if torch.is_tensor(v) and v.requires_grad]
    with torch.no_grad():
        fwd = do_bench(lambda: fn(**x), warmup=10, rep=reps, return_mode="median")
    out = fn(**x)
    dout = torch.randn_like(out)

    def step():
        fn(**x).backward(dout)

    both = do_bench(step, warmup=10, rep=reps, grad_to_none=grads, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return fwd, both, peak


def run(reps: int, reference: bool) -> list[dict]:
    rows = []
    for batch, d, n, H, W in SHAPES:
        L = H * W
        for dtype in (torch.float32, torch.bfloat16):
            x = make(batch, d, n, L, dtype)
            impls = {"2D kernel": lambda **k: ops.selective_scan_2d(**k, height=H, width=W, delta_softplus=True),
                     "1D kernel (same L)": lambda **k: ops.selective_scan_1d(**k, delta_softplus=True)}
            if reference:
                impls["2D reference (GPU)"] = lambda **k: ops.selective_scan_2d_ref(**k, height=H, width=W,
                                                                                   delta_softplus=True)
            for name, fn in impls.items():
                try:
                    fwd, both, peak = bench_one(fn, x, reps if "kernel" in name else max(5, reps // 10))
                except torch.OutOfMemoryError:
                    LOG.warning("%s out of memory at %s", name, (batch, d, n, H, W))
                    torch.cuda.empty_cache()
                    continue
                bw = min_bytes(batch, d, n, L, dtype, True) / (both * 1e-3) / PEAK_BW
                rows.append(dict(shape=f"{batch}, {d}, {n}, {H}x{W}", dtype=str(dtype).replace("torch.", ""),
                                 impl=name, fwd_ms=fwd, fwd_bwd_ms=both, peak_mib=peak, hbm_fraction=bw))
                LOG.info("%s", rows[-1])
            del x
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape (batch, d, n, HxW) | dtype | implementation | fwd ms | fwd+bwd ms | peak MiB | HBM (min bytes) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{r['peak_mib']:.0f} | {100 * r['hbm_fraction']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/scan.json"))
    parser.add_argument("--reps", type=int, default=100, help="milliseconds of timed repeats per measurement")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow, memory-hungry) reference")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available() or selective_scan.extension() is None:
        raise SystemExit("bench_scan needs a CUDA device and the compiled extension (make build-ops)")
    LOG.info("device: %s, torch %s", torch.cuda.get_device_name(), torch.__version__)
    rows = run(args.reps, not args.no_reference)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
