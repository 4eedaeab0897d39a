"""A/B timing of 2D-scan kernel variants, without torch's extension build.

A variant is the launchers of one dtype (bf16 unless --dtype) of an ops/csrc tree (this checkout's, or a copy with
edits), optionally with -D flags, compiled by nvcc into a shared library with C entry points; `run` loads variants
with ctypes (all of one dtype), times their forward and backward kernels on the same inputs in interleaved rounds
and checks each against the first.

    python scripts/kernel_ab.py build NAME [--src DIR] [-D FLAG ...] [--dtype float32]  # -> build/kernel_ab/lib_NAME.so
    python scripts/kernel_ab.py run NAME [NAME ...] [--shape B D N H W ...] [--reps 30] [--rounds 2]

Builds need nvcc only (sm_90; a few seconds each, no GPU); runs need a GPU and no build there: carry
build/kernel_ab to the device. The timings are the kernels alone (CUDA events, min over rounds of the median of
`--reps` launches), inputs as in scripts/bench_scan.py (D, z, delta_bias, softplus on, one B/C group).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_scan
OUT = ROOT / "build" / "kernel_ab"
SHAPES = [(1, 256, 16, 200, 200), (1, 256, 16, 100, 100), (64, 384, 16, 14, 14), (64, 192, 16, 56, 56)]
SUFFIX = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}  # torch dtype name -> launcher suffix
CAPI = """// C entry points to the {dtype} scan launchers (scripts/kernel_ab.py).
#include "scan_params.h"
extern "C" {{
void ab_fwd(const scan::Params* p, cudaStream_t s) {{ scan::scan2d_fwd_{suffix}(*p, s); }}
void ab_bwd(const scan::Params* p, cudaStream_t s) {{ scan::scan2d_bwd_{suffix}(*p, s); }}
unsigned long ab_params_size() {{ return sizeof(scan::Params); }}
int ab_strip() {{ return scan::kStrip; }}
const char* ab_dtype() {{ return "{dtype}"; }}
}}
"""
_PTR = "u delta B C A delta_bias D z out ypre ckpt carry dout du ddelta dz dA dB dC dD dbias hbuf gbuf"
OUTPUTS = ("out", "ypre", "du", "ddelta", "dz", "dA", "dB", "dC", "dD", "dbias")


class Params(ctypes.Structure):
    """ops/csrc/scan_params.h's scan::Params, field for field (checked against the library's sizeof)."""

    _fields_ = ([(n, ctypes.c_int) for n in "batch dim dstate groups height width strip n_strips".split()]
                + [("softplus", ctypes.c_bool), ("atomic_out", ctypes.c_bool)]
                + [(n, ctypes.c_void_p) for n in _PTR.split()] + [("lane_carries", ctypes.c_bool)]
                + [("n_slots", ctypes.c_int)])


def build(name: str, src: Path, defines: list[str], dtype: str = "bfloat16") -> Path:
    from ops.build import cuda_home

    OUT.mkdir(parents=True, exist_ok=True)
    capi = OUT / f"capi_{SUFFIX[dtype]}.cu"
    capi.write_text(CAPI.format(dtype=dtype, suffix=SUFFIX[dtype]))
    lib = OUT / f"lib_{name}.so"
    cmd = [str(cuda_home() / "bin" / "nvcc"), "-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
           "--expt-relaxed-constexpr", "-arch=sm_90", "-Xptxas=-warn-spills", "-Xcompiler", "-fPIC", "-shared",
           f"-I{src}", *(f"-D{d}" for d in defines), str(capi), str(src / f"scan2d_{SUFFIX[dtype]}.cu"), "-o", str(lib)]
    subprocess.run(cmd, check=True)
    return lib


def load(name: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(OUT / f"lib_{name}.so"))
    lib.ab_params_size.restype = ctypes.c_ulong
    lib.ab_dtype.restype = ctypes.c_char_p
    # a variant from before v19 reads the Params without their last field (n_slots) and ignores it
    if lib.ab_params_size() not in (ctypes.sizeof(Params), Params.n_slots.offset):
        raise RuntimeError(f"lib_{name}.so: scan::Params is {lib.ab_params_size()} bytes, the ctypes mirror "
                           f"{ctypes.sizeof(Params)}: update Params in {__file__}")
    return lib


def setup(batch: int, d: int, n: int, H: int, W: int, dtype: str, strip: int):
    """Inputs, outputs and scratch as the binding allocates them (scratch sized for any K), and their Params, for
    checkpoints every `strip` rows (the variant's kStrip)."""
    import torch

    from bench_scan import make

    torch.manual_seed(0)
    L = H * W
    dt = getattr(torch, dtype)
    t = {k: v.detach() for k, v in make(batch, d, n, L, dt).items()}
    t.update(B=t["B"].unsqueeze(1).contiguous(), C=t["C"].unsqueeze(1).contiguous(),  # one B/C group
             dout=torch.randn(batch, d, L, device="cuda").to(dt))
    strip = min(strip, H)
    n_strips = (H + strip - 1) // strip

    def rows(r: int) -> "torch.Tensor":
        return torch.zeros(max(1, batch * d * n * r), device="cuda")

    # du, d delta: fp32 sums over the state blocks when there are several (atomic_out), else of the input dtype
    grads = (lambda: torch.zeros(batch, d, L, device="cuda")) if n > 16 else (lambda: torch.empty_like(t["u"]))
    t.update(out=torch.empty_like(t["u"]), ypre=torch.zeros(batch, d, L, device="cuda"), ckpt=rows((n_strips - 1) * W),
             carry=rows(W), du=grads(), ddelta=grads(), dz=torch.zeros_like(t["u"]),
             dA=torch.zeros(d, n, device="cuda"), dB=torch.zeros(batch, 1, n, L, device="cuda"),
             dC=torch.zeros(batch, 1, n, L, device="cuda"), dD=torch.zeros(d, device="cuda"),
             dbias=torch.zeros(d, device="cuda"), hbuf=rows((strip - 1) * W), gbuf=rows(strip * ((W + 31) // 32)))
    # v19: the strip scratch per persistent block of the backward, a slot of up to 4 x 16 states (P x kWarpsPerBlock)
    # each; as scan_params.h's scratch_slots, kBlocksPerSM = 2 per SM, no more than the blocks of work (counted here at
    # one channel per warp: at more, some persistent blocks find none). A variant from before takes hbuf, gbuf per
    # state, as allocated above.
    n_slots = min(2 * torch.cuda.get_device_properties(0).multi_processor_count, batch * d * ((n + 15) // 16))
    t.update(hbuf=torch.zeros(max(t["hbuf"].numel(), n_slots * 64 * (strip - 1) * W), device="cuda"),
             gbuf=torch.zeros(max(t["gbuf"].numel(), n_slots * 64 * strip * ((W + 31) // 32)), device="cuda"))
    p = Params(batch=batch, dim=d, dstate=n, groups=1, height=H, width=W, strip=strip, n_strips=n_strips,
               softplus=True, atomic_out=n > 16, n_slots=n_slots)
    for key, value in t.items():
        setattr(p, key, value.data_ptr())
    return p, t


def run(names: list[str], shapes: list[tuple], reps: int, rounds: int) -> None:
    import torch

    from ops.selective_scan import aligned_width

    libs = {name: load(name) for name in names}
    dtypes = {lib.ab_dtype().decode() for lib in libs.values()}
    if len(dtypes) > 1:
        raise SystemExit(f"variants of different dtypes: {sorted(dtypes)}")
    (dtype,) = dtypes
    print(f"dtype {dtype}", flush=True)

    def stream() -> ctypes.c_void_p:
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def outputs(lib, p, t) -> dict:
        for key in ("dA", "dB", "dC", "dD", "dbias", "du", "ddelta", "ypre"):  # (the last 3: sums when atomic_out)
            t[key].zero_()
        lib.ab_fwd(ctypes.byref(p), stream())
        lib.ab_bwd(ctypes.byref(p), stream())
        torch.cuda.synchronize()
        # with atomic_out, out is the binding's finishing kernel's (not run here), from the sums in ypre
        return {key: t[key].float().clone() for key in OUTPUTS if not (key == "out" and p.atomic_out)}

    def median_ms(fn) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    strips = {name: lib.ab_strip() for name, lib in libs.items()}
    for shape in shapes:
        width, wide = shape[4], aligned_width(shape[4], getattr(torch, dtype))
        if wide != width:  # ops.selective_scan_2d would
            print(f"note: ops.selective_scan_2d widens rows of {width} columns to {wide} for the wide loads; "
                  "timed here as given", flush=True)
        args = {strip: setup(*shape, dtype, strip) for strip in set(strips.values())}  # the same inputs (seeded)
        first = outputs(libs[names[0]], *args[strips[names[0]]])
        fwd = {name: [] for name in names}
        bwd = {name: [] for name in names}
        for _ in range(rounds):  # interleaved against drifts of the clock
            for name, lib in libs.items():
                p = args[strips[name]][0]
                fwd[name].append(median_ms(lambda: lib.ab_fwd(ctypes.byref(p), stream())))
                bwd[name].append(median_ms(lambda: lib.ab_bwd(ctypes.byref(p), stream())))
        for name, lib in libs.items():
            got = outputs(lib, *args[strips[name]])
            err = max(((got[k] - first[k]).abs().max() / first[k].abs().max().clamp(min=1e-30)).item() for k in got)
            f, b = min(fwd[name]), min(bwd[name])
            print(f"{'x'.join(map(str, shape)):>16} {name:>12}: fwd {f:6.3f}  bwd {b:6.3f}  sum {f + b:6.3f} ms  "
                  f"max rel. difference to {names[0]} {err:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile a variant")
    b.add_argument("name")
    b.add_argument("--src", type=Path, default=ROOT / "ops" / "csrc", help="an ops/csrc tree (default: this one)")
    b.add_argument("-D", dest="defines", action="append", default=[], help="a preprocessor definition")
    b.add_argument("--dtype", default="bfloat16", choices=sorted(SUFFIX), help="the launchers' input dtype")
    r = sub.add_parser("run", help="time variants (GPU)")
    r.add_argument("names", nargs="+")
    r.add_argument("--shape", type=int, nargs=5, action="append", metavar=("B", "D", "N", "H", "W"))
    r.add_argument("--reps", type=int, default=30)
    r.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.cmd == "build":
        print(build(args.name, args.src.resolve(), args.defines, args.dtype))
    else:
        run(args.names, [tuple(s) for s in args.shape] if args.shape else SHAPES, args.reps, args.rounds)


if __name__ == "__main__":
    main()
