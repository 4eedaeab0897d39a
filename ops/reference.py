"""Pure-PyTorch selective scans: the specification the CUDA kernels are tested against.

Layout follows mamba's `selective_scan_fn`: u, delta (batch, d, L); A (d, n); B, C (batch, n, L) or
(batch, groups, n, L); D (d,); z (batch, d, L); delta_bias (d,). 2D scans add `height, width` with
L = height * width in row-major order. States and accumulation are float32 (float64 stays float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_channel(x: torch.Tensor, d: int) -> torch.Tensor:
    """B or C as (batch, d, n, L): (batch, n, L) is shared by all channels, (batch, g, n, L) by d/g each."""
    if x.dim() == 3:
        return x.unsqueeze(1).expand(-1, d, -1, -1)
    groups = x.shape[1]
    if d % groups:
        raise ValueError(f"d={d} is not a multiple of the {groups} groups of B/C")
    return x.repeat_interleave(d // groups, dim=1)


def _discretise(u, delta, A, B, delta_bias, delta_softplus):
    """dA = exp(delta * A) and dBu = delta * B * u, each (batch, d, n, L), in float32 or float64."""
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(work), delta.to(work), A.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bd = _per_channel(B.to(work), u.shape[1])
    dA = torch.exp(delta.unsqueeze(2) * A[None, :, :, None])
    dBu = (delta * u).unsqueeze(2) * Bd
    return u, dA, dBu


def _output(u, hC, D, z, out_dtype):
    y = hC
    if D is not None:
        y = y + u * D.to(u.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(u.dtype))
    return y.to(out_dtype)


def selective_scan_1d_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba's selective scan over the sequence: h[t] = dA[t] h[t-1] + dBu[t]; y[t] = <C[t], h[t]> (+ D u)(* silu z)."""
    out_dtype = u.dtype
    u, dA, dBu = _discretise(u, delta, A, B, delta_bias, delta_softplus)
    Cd = _per_channel(C.to(u.dtype), u.shape[1])
    h = torch.zeros_like(dBu[..., 0])
    ys = []
    for t in range(u.shape[-1]):
        h = dA[..., t] * h + dBu[..., t]
        ys.append((h * Cd[..., t]).sum(2))
    return _output(u, torch.stack(ys, -1), D, z, out_dtype)


def selective_scan_2d_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                          height: int, width: int):
    """2DMamba's scan: a selective scan along every row, then along every column of that result.

    g[i, j] = dA[i, j] g[i, j-1] + dBu[i, j];  h[i, j] = dA[i, j] h[i-1, j] + g[i, j];
    y[i, j] = <C[i, j], h[i, j]> (+ D u)(* silu z). O(height + width) Python steps.
    """
    batch, d, L = u.shape
    if height * width != L:
        raise ValueError(f"height*width = {height}*{width} = {height * width} does not match L = {L}")
    out_dtype = u.dtype
    u, dA, dBu = _discretise(u, delta, A, B, delta_bias, delta_softplus)
    n = dA.shape[2]
    dA = dA.reshape(batch, d, n, height, width)
    dBu = dBu.reshape(batch, d, n, height, width)
    Cd = _per_channel(C.to(u.dtype), d).reshape(batch, d, n, height, width)
    g = torch.zeros_like(dBu[..., 0])  # one state per row
    rows = []
    for j in range(width):
        g = dA[..., j] * g + dBu[..., j]
        rows.append(g)
    g_all = torch.stack(rows, -1)
    h = torch.zeros_like(dBu[..., 0, :])  # one state per column
    ys = []
    for i in range(height):
        h = dA[..., i, :] * h + g_all[..., i, :]
        ys.append((h * Cd[..., i, :]).sum(2))
    y = torch.stack(ys, -2).reshape(batch, d, L)
    return _output(u, y, D, z, out_dtype)


def _diagonal_order(height: int, width: int) -> tuple[torch.Tensor, list[int], list[tuple[int, int]]]:
    """Positions l = i * width + j sorted by anti-diagonal t = i + j (then by row), the diagonals' lengths and
    their row ranges [lo, hi]."""
    order, sizes, rows = [], [], []
    for t in range(height + width - 1):
        lo, hi = max(0, t - width + 1), min(height - 1, t)
        order.extend(i * width + (t - i) for i in range(lo, hi + 1))
        sizes.append(hi - lo + 1)
        rows.append((lo, hi))
    return torch.tensor(order), sizes, rows


def wavefront_scan_m2d_ref(u, delta_h, delta_v, A_h, A_v, B_h, B_v, C, D=None, z=None, delta_softplus=False, *,
                           height: int, width: int):
    """Mamba2D's 2D recurrence (mamba2d-paper eq. 14), one parameter set per axis, discretised as in mamba:

    h[i, j] = 1/2 (exp(dv A_v) h[i-1, j] + exp(dh A_h) h[i, j-1] + (dv B_v + dh B_h) u[i, j])
    y[i, j] = <C[i, j], h[i, j]> (+ D u)(* silu z), with dh, dv = delta_h, delta_v (softplus'ed if asked).
    The cells of one anti-diagonal depend only on the previous one: O(height + width) Python steps.
    """
    batch, d, L = u.shape
    if height * width != L:
        raise ValueError(f"height*width = {height}*{width} = {height * width} does not match L = {L}")
    out_dtype = u.dtype
    uw, dAh, bu_h = _discretise(u, delta_h, A_h, B_h, None, delta_softplus)
    _, dAv, bu_v = _discretise(u, delta_v, A_v, B_v, None, delta_softplus)
    Cd = _per_channel(C.to(uw.dtype), d)
    order, sizes, rows = _diagonal_order(height, width)
    order = order.to(u.device)
    split = [torch.split(x.index_select(-1, order), sizes, -1) for x in (dAh, dAv, bu_h + bu_v, Cd)]
    prev, prev_rows, ys = None, None, []
    for t, (lo, hi) in enumerate(rows):
        a_h, a_v, bu, c = (s[t] for s in split)
        if prev is None:
            up = left = torch.zeros_like(bu)
        else:  # place the previous diagonal on the full row axis: left = same row, up = the row before
            full = F.pad(prev, (prev_rows[0], height - 1 - prev_rows[1]))
            left = full[..., lo:hi + 1]
            up = F.pad(full[..., :-1], (1, 0))[..., lo:hi + 1]
        prev, prev_rows = 0.5 * (a_v * up + a_h * left + bu), (lo, hi)
        ys.append((prev * c).sum(2))
    y = torch.empty_like(uw)
    y[..., order] = torch.cat(ys, -1)
    return _output(uw, y, D, z, out_dtype)


def lattice_conv_silu_ref(x, weight, bias=None, *, height: int, width: int):
    """silu(depthwise conv2d of x (..., C, height * width) on its lattice, weight (C, 1, k, k), bias (C,), zero
    padding k // 2): Mamba's conv and activation on a 2D lattice (2DMambaMIL)."""
    channels, k = x.shape[-2], weight.shape[-1]
    out = F.conv2d(x.reshape(-1, channels, height, width), weight, bias, padding=k // 2, groups=channels)
    return F.silu(out).reshape(x.shape)
