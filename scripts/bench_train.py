"""ms per training step (forward + backward + AdamW) and peak GPU memory for MIL models on one generated slide.

    python scripts/bench_train.py                       # 200 x 200 lattice, ~20 000 tissue cells, 1024-d
    python scripts/bench_train.py --side 24 --cells 300 --dim 64 --steps 5   # small, for a CPU
    python scripts/bench_train.py --models mamba2d,abmil --profile          # + torch.profiler tables

Every model is built from its configs/model/<name>.yaml (the trainer's defaults), trained on the same slide in
one process, bf16 autocast on CUDA as in the trainer. A model's host work on the grid (`grid_prep`: 2DMambaMIL's
lattice, MambaMIL's scan orders) is done by the trainer's data loader workers as they read a slide, so it is done
once here, outside the step, and its host time printed on its own (grid_prep). The features sit on the device
already (the step only); the grid stays on the host, as the trainer passes it. The models' steps run in
interleaved rounds: the steps are bound by the host issuing kernels, and the host's speed drifts between runs.
Prints one line per model (median and min ms per step; host: ms until the host had issued the step, a step
whose host time is near its total is bound by the host, and the medians of its forward, backward and optimiser
shares) and, with --json, writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi_pipeline.feature_grids import tissue_cells  # noqa: E402
from wsi_pipeline.models import create_model  # noqa: E402
from wsi_pipeline.train import make_optimizer  # noqa: E402


def model_config(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml"))
    cfg.pop("name")
    return cfg


def make_step(name: str, feats: torch.Tensor, grid: torch.Tensor,
              amp: bool) -> tuple[Callable[[], tuple[float, float]], Callable | None]:
    """One training step of `name` (forward, loss, backward, AdamW) on the slide, as the trainer runs it: with the
    model's `grid_prep` done beforehand, as the trainer's data loader does it. The step returns the perf_counter times
    at which the host had issued the forward (and loss) and the backward. Returned with the model's grid_prep."""
    device = feats.device
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = create_model(name, in_dim=feats.shape[1], n_classes=2, **model_config(name)).to(device)
    optimizer = make_optimizer(model.parameters(), lr=1e-4)
    label = torch.tensor([1], device=device)
    # the model's host work on the grid, which the trainer's data loader workers do as they read the slide, in pinned
    # memory on CUDA as the loader hands it over
    prepared = model.grid_prep(grid) if model.grid_prep is not None else None
    if cuda and prepared is not None:
        prepared = prepared.pin_memory()

    def step() -> tuple[float, float]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and amp):
            logits = model(feats, grid, prepared).logits
        loss = torch.nn.functional.cross_entropy(logits.float()[None], label)
        forward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        return forward, backward

    return step, model.grid_prep


def timed_steps(step: Callable[[], tuple[float, float]], n: int, cuda: bool) -> list[tuple[float, ...]]:
    """Per step of n, each waited for, in ms: the step; until the host had issued it all; the host's issue of the
    forward (with the loss), of the backward, of the optimiser."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        forward, backward = step()
        issued = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        times.append(tuple(1e3 * x for x in (end - start, issued - start, forward - start, backward - forward,
                                             issued - backward)))
    return times


def grid_prep_ms(grid_prep: Callable | None, grid: torch.Tensor, n: int = 50) -> float:
    """Median host ms of a model's `grid_prep` on the slide's grid (0 without one): the work the trainer's data
    loader does per slide read, in its worker processes by default (train.workers)."""
    if grid_prep is None:
        return 0.0
    times = []
    for _ in range(n):
        start = time.perf_counter()
        grid_prep(grid)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_models(names: list[str], feats: torch.Tensor, grid: torch.Tensor, steps: int, warmup: int, amp: bool,
                 rounds: int) -> list[dict]:
    """Each model's steps in `rounds` interleaved rounds (model A's share, model B's, ..., again), so that drifts of
    the host's speed, which bounds these steps, reach every model alike; peak memory per model."""
    cuda = feats.device.type == "cuda"
    models, preps, peaks, times = {}, {}, {}, {name: [] for name in names}
    for name in names:  # build and warm up each model, measuring its peak memory on its own
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        models[name], preps[name] = make_step(name, feats, grid, amp)
        timed_steps(models[name], warmup, cuda)
        peaks[name] = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else float("nan")
    for r in range(rounds):
        for name in names:
            times[name] += timed_steps(models[name], steps // rounds + (r < steps % rounds), cuda)
    keys = ("ms_per_step", "host_ms", "host_forward_ms", "host_backward_ms", "host_optimizer_ms")
    return [{**{key: statistics.median(t[k] for t in times[name]) for k, key in enumerate(keys)},
             "model": name, "ms_min": min(t[0] for t in times[name]), "peak_mib": peaks[name],
             "grid_prep_ms": grid_prep_ms(preps[name], grid)} for name in names]


def profile_model(name: str, feats: torch.Tensor, grid: torch.Tensor, steps: int, amp: bool, rows: int,
                  trace: Path | None = None) -> str:
    """torch.profiler tables for `steps` steps after a warm-up: top ops by self device time, then by CPU total;
    with `trace`, also the Chrome trace (host ops and device kernels on one timeline) as trace/<name>.json."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = make_step(name, feats, grid, amp)
    cuda = feats.device.type == "cuda"
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace / f"{name}.json"))
    events = prof.key_averages()
    tables = [f"== {name}: {steps} steps, sorted by self {'CUDA' if cuda else 'CPU'} time"]
    tables.append(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows))
    tables.append(f"== {name}: {steps} steps, sorted by CPU total")
    tables.append(events.table(sort_by="cpu_time_total", row_limit=rows))
    return "\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=200, help="lattice rows = cols (default 200)")
    parser.add_argument("--cells", type=int, default=20_000, help="tissue cells on it (default 20000)")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension (default 1024, UNI)")
    parser.add_argument("--models", default="mamba2d,mambamil,abmil")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the steps are split into")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-amp", action="store_true", help="fp32 on CUDA instead of bf16 autocast")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="after the bench, print torch.profiler tables (self CUDA time, CPU total) per model")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--trace", type=Path, help="with --profile, write each model's Chrome trace into this folder")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    grid = torch.from_numpy(tissue_cells(args.side, args.side, args.cells, rng))  # on the host, as the trainer
    feats = torch.from_numpy(rng.normal(0, 1, (len(grid), args.dim)).astype(np.float32)).to(args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"slide: {args.side}x{args.side} lattice, {len(grid)} tissue cells, {args.dim}-d features; "
          f"device {device_name}; {'fp32' if args.no_amp else 'bf16 autocast'} on CUDA; "
          f"median of {args.steps} steps after {args.warmup} warm-up, in {args.rounds} interleaved rounds")
    results = bench_models(args.models.split(","), feats, grid, args.steps, args.warmup, not args.no_amp, args.rounds)
    base = next((r["ms_per_step"] for r in results if r["model"] == "abmil"), None)
    for r in results:
        ratio = f"{r['ms_per_step'] / base:5.2f}x ABMIL" if base else ""
        print(f"{r['model']:>16}: {r['ms_per_step']:9.2f} ms/step (min {r['ms_min']:.2f}, host {r['host_ms']:.2f} = "
              f"forward {r['host_forward_ms']:.2f} + backward {r['host_backward_ms']:.2f} + optimiser "
              f"{r['host_optimizer_ms']:.2f})  peak {r['peak_mib']:8.1f} MiB  {ratio}  "
              f"grid_prep {r['grid_prep_ms']:.2f} ms")
    if args.profile:
        for name in args.models.split(","):
            print(profile_model(name, feats, grid, args.profile_steps, not args.no_amp, args.profile_rows, args.trace))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": device_name,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
