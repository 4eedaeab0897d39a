"""The CUDA sources compile (nvcc, no GPU needed) and the dispatcher falls back cleanly without them.

The compile goes to build/ops (cached: reruns take about a second; a cold build takes 25-45 s on 2 cores).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ops
from ops import build, selective_scan

ROOT = Path(__file__).resolve().parents[1]


def _have_nvcc() -> bool:
    try:
        build.cuda_home()
        return True
    except build.BuildUnavailable:
        return False


# CI has nvcc (without a GPU): there the compile must run, so a build break cannot land as a skipped test.
NVCC_REQUIRED = os.environ.get("CI", "").lower() == "true"


@pytest.mark.skipif(not _have_nvcc() and not NVCC_REQUIRED, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_sources_compile_and_load():
    # A subprocess, so that the extension's import does not leak into this interpreter's state.
    code = "from ops import build; m = build.load(); print(sorted(n for n in dir(m) if not n.startswith('_')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0"})
    assert out.returncode == 0, out.stderr[-4000:]
    assert "'lattice_conv_bwd', 'lattice_conv_fwd', 'm2d_bwd', 'm2d_fwd', 'scan2d_bwd', 'scan2d_fwd'" in out.stdout


@pytest.mark.skipif(not _have_nvcc() and not NVCC_REQUIRED, reason="no CUDA toolkit (nvcc) on this machine")
def test_scan_plan_rejects_bad_sizes_with_a_message():
    """scan_plan's arguments are plain ints: groups = 0 would divide by zero in the process, not raise."""
    code = """from ops import build
m = build.load()
for args in [(1, 4, 16, 0, 8, 8, 2), (1, 6, 16, 4, 8, 8, 2), (1, 4, 16, 1, 0, 8, 2), (1, 4, 16, 1, 8, 8, 8)]:
    try:
        m.scan_plan(*args, True)
    except RuntimeError as e:
        print(str(e).splitlines()[0])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0"})
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("wsi_pipeline scan: scan_plan: ") for line in lines), out.stdout
    assert "groups 0" in lines[0] and "not a multiple of the 4 groups" in lines[1] and "0x8" in lines[2]
    assert "itemsize must be 2" in lines[3]


@pytest.mark.skipif(not _have_nvcc() and not NVCC_REQUIRED, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_home_follows_a_wrapper_script(tmp_path, monkeypatch):
    real = shutil.which("nvcc")
    assert real is not None, "nvcc is not on PATH"
    toolkit = build.cuda_home()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:/usr/bin:/bin")
    assert build.cuda_home().resolve() == toolkit.resolve()


def test_without_toolkit_one_warning_and_the_reference(monkeypatch):
    def unavailable():
        raise build.BuildUnavailable("no nvcc on PATH and CUDA_HOME is not set")

    monkeypatch.setattr(build, "cuda_home", unavailable)
    monkeypatch.setattr(selective_scan, "_state", {})
    monkeypatch.delenv("WSI_PIPELINE_SCAN", raising=False)
    with pytest.warns(RuntimeWarning, match="reference scan") as record:
        assert selective_scan.extension() is None
        assert selective_scan.extension() is None
    assert len([w for w in record if "reference scan" in str(w.message)]) == 1


def test_env_forces_the_reference(monkeypatch):
    monkeypatch.setenv("WSI_PIPELINE_SCAN", "reference")
    assert selective_scan.extension() is None
    u = torch.randn(1, 2, 6)
    out = ops.selective_scan_2d(u, torch.rand(1, 2, 6), -torch.rand(2, 3), torch.randn(1, 3, 6),
                                torch.randn(1, 3, 6), height=2, width=3)
    assert out.shape == (1, 2, 6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a CUDA device")
def test_graph_capture_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="CUDA-graph capture needs a CUDA device"):
        ops.graphs.capture(lambda: None)


@pytest.mark.skipif(not _have_nvcc() and not NVCC_REQUIRED, reason="no CUDA toolkit (nvcc) on this machine")
def test_kernel_ab_variant_builds_with_the_params_layout_of_its_mirror():
    """scripts/kernel_ab.py compiles a variant of ops/csrc and loads it; its ctypes mirror of scan::Params has the
    C++ struct's size (a field added to scan_params.h and not to the mirror fails here, not on the device)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import kernel_ab

    lib_path = kernel_ab.build("test", ROOT / "ops" / "csrc", ["SCAN_AB_TEST=1"], "float32")
    assert lib_path.exists()
    lib = kernel_ab.load("test")
    assert lib.ab_params_size() == kernel_ab.ctypes.sizeof(kernel_ab.Params)
    assert lib.ab_dtype() == b"float32"
    assert lib.ab_strip() == selective_scan.STRIP  # kernel_ab sizes the checkpoints as the binding does
