"""Benchmark the 2D selective scan (forward and forward+backward) next to the 1D scan and the reference.

    python scripts/bench_scan.py [--out bench_out/scan.json] [--reps 100] [--no-reference]

For each (batch, d, n, H x W) of the issue and each dtype: median times of the eager calls (triton.testing.do_bench,
CUDA events: what an eager training step sees, host included) and of the same calls replayed from a CUDA graph
(the GPU's time alone), peak memory of forward+backward, and the achieved HBM bandwidth of the minimal traffic
(each input read once, each output written once, over the graph's time; the reference's, eager only, over its eager
time) as a fraction of the H100's 3.35 TB/s.
The call is 2DMambaMIL's: D, z, delta_bias and softplus on.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
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


def graph_median(step, leaves, replays: int) -> float:
    """Median milliseconds of `step` captured in a CUDA graph (`ops.graphs.capture`), each replay timed alone with
    CUDA events after an L2 flush (as do_bench times each call): the GPU's time, without the host's gaps between
    launches that an eager step pays where the host is its bound."""
    graph = ops.graphs.capture(step, grads_to_none=leaves)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # do_bench's L2 flush
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def bench_one(fn, x, reps, replays: int = 100, graph: bool = True) -> dict:
    """Eager medians (do_bench, host included) and CUDA-graph medians (the GPU alone; None unless `graph`) of the
    forward and of forward+backward, in ms, and the peak memory of one eager forward+backward above what was
    allocated before (MiB)."""
    from triton.testing import do_bench

    grads = [v for v in x.values() if torch.is_tensor(v) and v.requires_grad]

    def forward():
        with torch.no_grad():
            fn(**x)

    with torch.no_grad():  # (a live autograd graph over x, recorded outside, would break the capture: ops.graphs)
        dout = torch.randn_like(fn(**x))

    def step():
        fn(**x).backward(dout)

    times = dict(fwd_ms=do_bench(forward, warmup=10, rep=reps, return_mode="median"),
                 fwd_bwd_ms=do_bench(step, warmup=10, rep=reps, grad_to_none=grads, return_mode="median"),
                 fwd_graph_ms=graph_median(forward, grads, replays) if graph else None,
                 fwd_bwd_graph_ms=graph_median(step, grads, replays) if graph else None)
    for v in grads:
        v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return dict(times, peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20)


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
                kernel = "kernel" in name
                try:
                    # (the reference, hundreds of ms per call, is not bound by the host: eager only)
                    r = bench_one(fn, x, reps if kernel else max(5, reps // 10), graph=kernel)
                except torch.OutOfMemoryError:
                    LOG.warning("%s out of memory at %s", name, (batch, d, n, H, W))
                    torch.cuda.empty_cache()
                    continue
                seconds = (r["fwd_bwd_graph_ms"] or r["fwd_bwd_ms"]) * 1e-3
                bw = min_bytes(batch, d, n, L, dtype, True) / seconds / PEAK_BW
                rows.append(dict(shape=f"{batch}, {d}, {n}, {H}x{W}", dtype=str(dtype).replace("torch.", ""),
                                 impl=name, **r, hbm_fraction=bw))
                LOG.info("%s", rows[-1])
            del x
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape (batch, d, n, HxW) | dtype | implementation | fwd ms | fwd+bwd ms | fwd ms (graph) | "
             "fwd+bwd ms (graph) | peak MiB | HBM (min bytes, graph) |", "|---|---|---|---|---|---|---|---|---|"]
    def ms(v):
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['impl']} | {ms(r['fwd_ms'])} | {ms(r['fwd_bwd_ms'])} | "
                     f"{ms(r['fwd_graph_ms'])} | {ms(r['fwd_bwd_graph_ms'])} | {r['peak_mib']:.0f} | "
                     f"{100 * r['hbm_fraction']:.1f}% |")
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
