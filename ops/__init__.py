"""The selective-scan operators of 2DMambaMIL (see docs and DESIGN.md, "The 2D selective scan")."""
from .reference import selective_scan_1d_ref, selective_scan_2d_ref

# Until the CUDA kernels are wired in, the public entry points are the reference implementations.
selective_scan_2d = selective_scan_2d_ref
selective_scan_1d = selective_scan_1d_ref

__all__ = ["selective_scan_1d", "selective_scan_1d_ref", "selective_scan_2d", "selective_scan_2d_ref"]
