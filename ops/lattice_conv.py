"""2DMambaMIL's depthwise conv on the lattice and its SiLU, one CUDA kernel each way, with autograd.

PyTorch runs a depthwise 3x3 conv of 256 channels over a 200 x 200 lattice, with SiLU, as five kernels (forward,
input and weight gradients, SiLU both ways), ~0.45 ms of GPU time in a training step. The kernels here stage a
tile and its halo in shared memory and recompute the conv in the backward instead of keeping its output.
"""
from __future__ import annotations

import torch

from .reference import lattice_conv_silu_ref
from .selective_scan import _cast, _use_kernel, extension

KERNEL_SIZES = (1, 3, 5, 7)  # the kernels' templates (ops/csrc/lattice_conv.cu, `supported`)


def conv_forward(x, weight, bias, height: int, width: int):
    """The kernel's forward on x (..., C, height * width) contiguous: silu(conv(x) + bias), and what
    `conv_backward` needs: (tensors, meta)."""
    w = _cast(weight, torch.float32).contiguous()
    b = None if bias is None else _cast(bias, torch.float32).contiguous()
    out = extension().lattice_conv_fwd(x, w, b, height, width)
    return out, ((x, w, b), (height, width, weight.dtype, None if bias is None else bias.dtype))


def conv_backward(saved, grad):
    """The kernel's backward: the gradients of x, weight and bias (None without a bias)."""
    (x, w, b), (height, width, w_dtype, b_dtype) = saved
    gx, gw, gb = extension().lattice_conv_bwd(_cast(grad, x.dtype).contiguous(), x, w, b, height, width)
    return gx, _cast(gw, w_dtype), None if b is None else _cast(gb, b_dtype)


def kernel_conv(weight: torch.Tensor) -> bool:
    """Whether the conv's kernels have this weight: k in KERNEL_SIZES, not float64 (the input's device and dtype
    are `selective_scan.kernels_for`'s to judge)."""
    return weight.shape[-1] in KERNEL_SIZES and weight.dtype != torch.float64


class _LatticeConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, height: int, width: int):
        out, (tensors, ctx.meta) = conv_forward(x, weight, bias, height, width)
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (*conv_backward((ctx.saved_tensors, ctx.meta), grad), None, None)


def lattice_conv_silu(x, weight, bias=None, *, height: int, width: int):
    """silu(depthwise conv2d(x) + bias) on the lattice, zero padding k // 2 (see `lattice_conv_silu_ref`).

    x (..., C, height * width), weight (C, 1, k, k), bias (C,) or None. On CUDA tensors of a kernel dtype with
    k in 1, 3, 5, 7: the kernels, in x's dtype with fp32 weights and sums (as autocast's conv, whose sums are
    fp32 too); elsewhere the reference.
    """
    if height * width != x.shape[-1]:
        raise ValueError(f"height*width = {height}*{width} = {height * width} does not match L = {x.shape[-1]}")
    if not (kernel_conv(weight) and _use_kernel(x)):
        return lattice_conv_silu_ref(x, weight, bias, height=height, width=width)
    return _LatticeConvSilu.apply(x.contiguous(), weight, bias, int(height), int(width))
