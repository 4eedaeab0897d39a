"""The selective-scan operators of 2DMambaMIL (docs/ops.md; the math: DESIGN.md, "The 2D selective scan").

`selective_scan_2d`, `selective_scan_1d` and `wavefront_scan_m2d` run CUDA kernels (with autograd) on CUDA
tensors and the pure-PyTorch references (the `*_ref` functions, the specification) elsewhere. `aligned_width`
is the row width the kernels read fastest. `lattice_conv_silu` is 2DMambaMIL's conv and SiLU before the scan, one
kernel each way on CUDA. `mamba_inner` is Mamba's whole mixer (projections, conv, scan) as one autograd node.
`graphs.capture` captures a step through them (forward and backward) in a CUDA graph.
"""
from . import graphs
from .lattice_conv import lattice_conv_silu
from .mamba_inner import compute_dtype, mamba_inner
from .reference import lattice_conv_silu_ref, selective_scan_1d_ref, selective_scan_2d_ref, wavefront_scan_m2d_ref
from .selective_scan import aligned_width, selective_scan_1d, selective_scan_2d, wavefront_scan_m2d

__all__ = [
    "aligned_width", "compute_dtype", "graphs", "lattice_conv_silu", "lattice_conv_silu_ref", "mamba_inner",
    "selective_scan_1d", "selective_scan_1d_ref", "selective_scan_2d", "selective_scan_2d_ref", "wavefront_scan_m2d",
    "wavefront_scan_m2d_ref",
]
