"""Mamba's mixer as one autograd node, for 2D lattices (2DMambaMIL) and 1D sequences (MambaMIL).

in_proj -> conv + SiLU -> x_proj -> dt_proj -> selective scan with z gating -> out_proj, as mamba's own
`mamba_inner_fn`, with a backward written out by hand. A MIL training step (one slide, a batch of one) is bound
by the host issuing kernels, and this chain as separate autograd ops records ~40 nodes per block: four matmuls,
their transposes and, under autocast, their weight casts, the splits, -exp(A_log), the conv and the scan. Here
the same kernels run (cuBLAS, the conv and scan kernels) without those nodes.

The conv and the scan enter as `Primitive`s, a forward returning (output, saved) and a backward from the saved
state: the CUDA kernels where they run, else the pure-PyTorch references (and PyTorch's conv1d for the causal
conv) differentiated by autograd, so the same chain rule runs, and is tested, on the CPU.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .lattice_conv import conv_backward, conv_forward, kernel_conv
from .reference import lattice_conv_silu_ref, selective_scan_1d_ref, selective_scan_2d_ref
from .selective_scan import _reference, aligned_width, kernels_for, scan2d_backward, scan2d_forward


class Primitive(NamedTuple):
    """forward(*inputs) -> (output, saved); backward(saved, output gradient) -> one gradient per input (None for
    non-tensors). saved = (tensors, meta): the tensors go through the caller's `save_for_backward`, so autograd frees
    them once the backward has run (unless the graph is retained)."""

    forward: Callable
    backward: Callable


def recorded(fn: Callable) -> Primitive:
    """A differentiable PyTorch function as a primitive: its forward recorded by autograd on detached copies of
    its floating-point tensor inputs, its backward `torch.autograd.grad` through that record."""

    def forward(*args):
        leaves = [a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.enable_grad():
            out = fn(*leaves)
        wanted = tuple(torch.is_tensor(a) and a.requires_grad for a in leaves)
        return out.detach(), ((out, *(a for a, w in zip(leaves, wanted) if w)), wanted)

    def backward(saved, grad):
        (out, *leaves), wanted = saved
        # retained: the outer graph may be run again (retain_graph, gradcheck); the record goes with its node
        grads = iter(torch.autograd.grad(out, leaves, grad, retain_graph=True, allow_unused=True))
        return tuple(next(grads) if w else None for w in wanted)

    return Primitive(forward, backward)


def causal_conv1d_silu(x, weight, bias, height: int, width: int):
    """Mamba's depthwise causal conv over the sequence x (C, L) (kernel k, left padding k - 1), then SiLU."""
    k = weight.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[-2])[..., : x.shape[-1]])


def _lattice_conv_ref(x, weight, bias, height: int, width: int):
    return lattice_conv_silu_ref(x, weight, bias, height=height, width=width)


def _scan_ref(ref, u, delta, A, B, C, D, z, delta_bias, softplus, height: int, width: int):
    grid = {"height": height, "width": width} if ref is selective_scan_2d_ref else {}
    return _reference(ref, u, delta, A, B, C, D, z, delta_bias, softplus, **grid)


KERNEL_SCAN = Primitive(scan2d_forward, functools.partial(scan2d_backward, bc_as_summed=True))
KERNEL_LATTICE_CONV = Primitive(conv_forward, conv_backward)


@dataclass(frozen=True)
class Mixer:
    """A mixer kind: its conv (with the kernel primitive, or None where PyTorch's own conv runs on every device) and
    the reference scan used where the kernels do not run."""

    conv: Primitive
    conv_kernel: Primitive | None
    scan_ref: Primitive


MIXERS = {
    "1d": Mixer(recorded(causal_conv1d_silu), None, recorded(functools.partial(_scan_ref, selective_scan_1d_ref))),
    "2d": Mixer(recorded(_lattice_conv_ref), KERNEL_LATTICE_CONV,
                recorded(functools.partial(_scan_ref, selective_scan_2d_ref))),
}


@dataclass(frozen=True)
class _Plan:
    conv: Primitive
    scan: Primitive
    height: int
    width: int
    dt_rank: int
    d_state: int
    dtype: torch.dtype  # the projections', conv's and scan's dtype (autocast's when it is on)


class _MambaInner(torch.autograd.Function):
    """x (L, d_model) -> out_proj(scan(silu(conv(u)), z gating)) (L, d_model) in plan.dtype, (u, z) = in_proj(x),
    with in_proj's weight scaled per column by in_scale when given.

    The activations run channels first, (channels, L), the layout of the conv and the scan; the projections are 2D
    products of the weights with transposed operands, which cuBLAS reads as they are (no layout copies)."""

    @staticmethod
    def forward(ctx, x, in_scale, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, out_w, plan: _Plan):
        c = plan.dtype
        in_eff = in_w if in_scale is None else in_w * in_scale  # the scale folded into in_proj's columns
        xc, in_c, x_c, dt_c, out_c = (t.to(c) for t in (x, in_eff, x_w, dt_w, out_w))
        xz = in_c @ xc.t()  # (2 d_inner, L)
        u0, z = xz.chunk(2, dim=0)
        u, conv_saved = plan.conv.forward(u0, conv_w, conv_b, plan.height, plan.width)
        xdbl = x_c @ u  # (dt_rank + 2 d_state, L)
        dt, B, C = xdbl.split([plan.dt_rank, plan.d_state, plan.d_state], dim=0)
        A = -torch.exp(A_log)
        y, scan_saved = plan.scan.forward(u, dt_c @ dt, A, B, C, D, z, dt_b, True, plan.height, plan.width)
        (conv_t, conv_meta), (scan_t, scan_meta) = conv_saved, scan_saved
        ctx.save_for_backward(*conv_t, *scan_t, xc, u, dt, y, A, in_c, x_c, dt_c, out_c,
                              None if in_scale is None else in_w, in_scale)
        ctx.plan, ctx.meta = plan, (len(conv_t), len(scan_t), conv_meta, scan_meta)
        ctx.dtypes = tuple(t.dtype for t in (x, in_w, x_w, dt_w, out_w))
        return F.linear(y.t(), out_c)  # (L, d_model)

    @staticmethod
    def backward(ctx, dout):
        plan, (n_conv, n_scan, conv_meta, scan_meta) = ctx.plan, ctx.meta
        saved = ctx.saved_tensors
        conv_saved, scan_saved = (saved[:n_conv], conv_meta), (saved[n_conv:n_conv + n_scan], scan_meta)
        xc, u, dt, y, A, in_c, x_c, dt_c, out_c, in_w, in_scale = saved[n_conv + n_scan:]
        x_t, in_t, x_w_t, dt_w_t, out_w_t = ctx.dtypes
        g = dout.to(plan.dtype)
        # the scan's backward first: the step's longest kernel, on the critical path of a step the host bounds, so
        # the host issues it as early as it can (out_proj's weight gradient after it: -0.1 ms per step on the H200)
        du, ddelta, dA, dB, dC, dD, dz, d_dt_b = plan.scan.backward(scan_saved, out_c.t() @ g.t())[:8]
        d_out_w = _mm(g.t(), y.t(), out_w_t)  # (d_model, d_inner)
        d_dt_w = _mm(ddelta, dt.t(), dt_w_t)
        r, n = plan.dt_rank, plan.d_state
        dxdbl = ddelta.new_empty((r + 2 * n, ddelta.shape[-1]))  # the gradient of (dt, B, C)
        torch.mm(dt_c.t(), ddelta, out=dxdbl[:r])
        dxdbl[r:r + n].copy_(dB.reshape(n, -1))  # from the kernel's float32 sums, or the reference's (n, L)
        dxdbl[r + n:].copy_(dC.reshape(n, -1))
        d_x_w = _mm(dxdbl, u.t(), x_w_t)
        du0, d_conv_w, d_conv_b = plan.conv.backward(conv_saved, torch.addmm(du, x_c.t(), dxdbl))[:3]
        dxz = torch.cat([du0, dz])  # (2 d_inner, L)
        d_in_w = _mm(dxz, xc, in_t)  # of the scaled weight: in_w * in_scale
        d_scale = None
        if in_scale is not None:
            d_scale = (d_in_w * in_w).sum(0)  # a sum over 2 d_inner rows, not over the L positions
            d_in_w = d_in_w * in_scale
        dx = dxz.t() @ in_c  # (L, d_model)
        return (dx.to(x_t), d_scale, d_in_w, d_conv_w, d_conv_b, d_x_w, d_dt_w, d_dt_b, dA * A, dD, d_out_w, None)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype` (a weight's gradient): 16-bit products on CUDA sum into float32 in the matmul itself."""
    if dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def mamba_inner(x, in_proj_weight, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                out_proj_weight, *, kind: str, height: int, width: int, in_scale=None) -> torch.Tensor:
    """Mamba's mixer on one sequence x (L, d_model), L = height * width (a 1D sequence: height 1), as one autograd
    node: out_proj(selective_scan(silu(conv(u)), delta, -exp(A_log), B, C, D, z, dt_proj_bias, softplus)) with
    (u, z) = in_proj(x * in_scale), (dt, B, C) = x_proj(...), delta = dt_proj(dt); weights in nn.Linear / nn.ConvNd
    layout. `in_scale` (d_model,), optional, is an RMSNorm's weight: given here rather than applied to x, it is
    folded into in_proj's weight, so its gradient is a sum over in_proj's rows, not over the L positions (PyTorch's
    norm-weight reduction over L took ~0.1 ms of GPU time at 40 000 cells, on the training step's critical path).

    `kind` "2d": depthwise k x k conv on the lattice and the 2D scan (2DMambaMIL); "1d": causal conv and the 1D
    scan (MambaMIL). Returns (L, d_model) in the compute dtype (`compute_dtype`). On CUDA in a kernel dtype the
    conv and scan kernels run, elsewhere the references.

    Rows (or a sequence) the kernels cannot read with wide loads (`aligned_width`) run widened with zero cells on the
    right, then are sliced back: once here on x rather than inside the scan on each of its five inputs. Exact: a
    zero cell stays zero through the bias-free in_proj, so the conv sees the zeros of its own padding; the scan (and
    the causal conv) never carry right-hand cells into the ones on their left; out_proj is per cell.
    """
    if kind not in MIXERS:
        raise ValueError(f"kind must be one of {sorted(MIXERS)}, not {kind!r}")
    if kind == "1d" and height != 1:
        raise ValueError(f"kind '1d' scans one sequence: height must be 1, not {height}")
    if height * width != x.shape[0]:
        raise ValueError(f"height*width = {height}*{width} = {height * width} does not match L = {x.shape[0]}")
    dtype = compute_dtype(x)
    mixer, kernels = MIXERS[kind], kernels_for(x.device, dtype)
    conv = mixer.conv_kernel if kernels and mixer.conv_kernel and kernel_conv(conv_weight) else mixer.conv
    wide = aligned_width(width, dtype) if kernels else width
    dt_rank, d_state = dt_proj_weight.shape[1], A_log.shape[1]
    plan = _Plan(conv, KERNEL_SCAN if kernels else mixer.scan_ref, height, wide, dt_rank, d_state, dtype)
    weights = (in_scale, in_proj_weight, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log,
               D, out_proj_weight)
    if wide == width:
        return _MambaInner.apply(x, *weights, plan)
    d = x.shape[1]
    x = F.pad(x.view(height, width, d), (0, 0, 0, wide - width)).view(height * wide, d)
    out = _MambaInner.apply(x, *weights, plan)
    return out.view(height, wide, d)[:, :width].reshape(height * width, d)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x compute in: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
