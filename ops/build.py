"""Build (JIT, cached) the CUDA extension of ops/csrc with torch.utils.cpp_extension.

The first call compiles into a cache folder (``$WSI_PIPELINE_OPS_BUILD`` or ``<repo>/build/ops``), later calls
load the cached module. ``python -m ops.build`` builds ahead of time (``make build-ops``); it works without a
GPU as long as nvcc is there (``TORCH_CUDA_ARCH_LIST`` picks the targets, default ``9.0`` for the H100).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

LOG = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["scan_bind.cpp", "scan2d_f32.cu", "scan2d_f16.cu", "scan2d_bf16.cu", "m2d.cu", "lattice_conv.cu"]
NAME = "wsi_pipeline_scan"


class BuildUnavailable(RuntimeError):
    """No CUDA toolkit (nvcc) could be found: the caller falls back to the reference."""


def _toolkit_of(nvcc: Path) -> Path | None:
    """The toolkit root of an nvcc binary: the folder holding bin/nvcc and lib64/libcudart*."""
    root = nvcc.resolve().parent.parent
    has_cudart = any(any((root / lib).glob("libcudart.so*")) for lib in ("lib64", "lib"))
    return root if has_cudart and (root / "bin" / "nvcc").exists() else None


def _nvcc_behind_wrapper(path: Path) -> Path | None:
    """Follow a shell wrapper (``exec /usr/local/cuda-X/bin/nvcc "$@"``) or ask nvcc itself (--dryrun)."""
    try:
        text = path.read_text(errors="ignore")[:4096]
    except OSError:
        text = ""
    for match in re.finditer(r"(/\S+/bin/nvcc)\b", text):
        if Path(match.group(1)).exists():
            return Path(match.group(1))
    try:
        out = subprocess.run([str(path), "-v", "--dryrun", "-x", "cu", "/dev/null"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"#\$ _HERE_=(\S+)", out.stdout + out.stderr)
    candidate = Path(found.group(1)) / "nvcc" if found else None
    return candidate if candidate is not None and candidate.exists() else None


def cuda_home() -> Path:
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH if set, else the root behind the nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        raise BuildUnavailable("no nvcc on PATH and CUDA_HOME is not set")
    root = _toolkit_of(Path(nvcc))
    if root is None:
        behind = _nvcc_behind_wrapper(Path(nvcc))
        root = _toolkit_of(behind) if behind else None
    if root is None:
        raise BuildUnavailable(f"{nvcc} is not inside a CUDA toolkit (no lib64/libcudart); set CUDA_HOME")
    return root


def build_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / "build" / "ops"
    path = Path(os.environ.get("WSI_PIPELINE_OPS_BUILD", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(verbose: bool = False):
    """Compile (first time) and import the extension module."""
    home = cuda_home()
    os.environ["CUDA_HOME"] = str(home)  # torch.utils.cpp_extension reads it when first imported
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    import torch.utils.cpp_extension as ext

    ext.CUDA_HOME = str(home)
    import torch

    # torch's own headers need C++20 from 2.12 on (the C++ side gets torch's default flags already)
    std = "c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 12) else "c++17"
    started = time.perf_counter()
    module = ext.load(
        name=NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        build_directory=str(build_dir()),
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", f"-std={std}", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                           "-Xptxas=-warn-spills"],
        verbose=verbose,
    )
    LOG.info("scan extension ready in %.1f s (%s)", time.perf_counter() - started, build_dir())
    return module


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    load(verbose=True)
    LOG.info("built %s in %.1f s", NAME, time.perf_counter() - started)


if __name__ == "__main__":
    main()
