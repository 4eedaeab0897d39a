"""The pure-PyTorch scans (ops/reference.py) against closed forms, loops and each other; CPU only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ops
from ops.reference import selective_scan_1d_ref, selective_scan_2d_ref, wavefront_scan_m2d_ref

F64 = torch.float64


def inputs(batch=2, d=4, n=3, L=12, groups=None, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, n, L) if groups is None else (batch, groups, n, L)
    return dict(
        u=torch.randn(batch, d, L, generator=g, dtype=dtype),
        delta=torch.rand(batch, d, L, generator=g, dtype=dtype) * 0.8 + 0.1,
        A=-torch.rand(d, n, generator=g, dtype=dtype) * 2 - 0.1,
        B=torch.randn(*shape_bc, generator=g, dtype=dtype),
        C=torch.randn(*shape_bc, generator=g, dtype=dtype),
    )


def test_constant_decay_is_manhattan_distance():
    for height, width in [(3, 3), (7, 5)]:
        x = inputs(batch=1, d=2, n=3, L=height * width, seed=height)
        x["delta"] = torch.full_like(x["delta"], 0.5)  # constant dA = exp(0.5 A) per (d, n)
        y = selective_scan_2d_ref(**x, height=height, width=width)
        dA = torch.exp(0.5 * x["A"])  # (d, n)
        dBu = 0.5 * x["u"][:, :, None, :] * x["B"][:, None]  # (1, d, n, L)
        ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        ii, jj = ii.flatten(), jj.flatten()
        dist = (ii[:, None] - ii[None, :]) + (jj[:, None] - jj[None, :])  # [l, l'] = (i-i') + (j-j')
        before = (ii[:, None] >= ii[None, :]) & (jj[:, None] >= jj[None, :])
        weight = torch.where(before, dA[..., None, None] ** dist.clamp(min=0), torch.zeros((), dtype=F64))
        h = torch.einsum("dnlm,bdnm->bdnl", weight, dBu)
        expected = (h * x["C"][:, None]).sum(2)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def naive_2d(u, delta, A, B, C, height, width):
    """DESIGN.md's 2D scan as plain loops, one position at a time: in every row the horizontal recurrence
    h_r[i, j] = dA[i, j] h_r[i, j-1] + dBu[i, j], then in every column of h_r the vertical one with the same dA,
    h[i, j] = dA[i, j] h[i-1, j] + h_r[i, j]; y = <C, h>."""
    batch, d, _ = u.shape
    n = A.shape[1]
    y = torch.zeros(batch, d, height * width, dtype=u.dtype)
    for b in range(batch):
        for c in range(d):
            for s in range(n):
                dA = torch.exp(delta[b, c] * A[c, s]).view(height, width)
                dBu = (delta[b, c] * B[b, s] * u[b, c]).view(height, width)
                h_row = torch.zeros(height, width, dtype=u.dtype)
                for i in range(height):
                    for j in range(width):
                        h_row[i, j] = (dA[i, j] * h_row[i, j - 1] if j else 0) + dBu[i, j]
                h = torch.zeros(height, width, dtype=u.dtype)
                for j in range(width):
                    for i in range(height):
                        h[i, j] = (dA[i, j] * h[i - 1, j] if i else 0) + h_row[i, j]
                y[b, c] += (C[b, s].view(height, width) * h).flatten()
    return y


@pytest.mark.parametrize("height,width", [(3, 4), (4, 3), (2, 5)])
def test_row_first_scan_against_loops_with_position_dependent_steps(height, width):
    """Steps (delta) that differ per position: unlike a constant dA, the result then depends on scanning rows
    first and columns second, so this pins the order (a column-first reference fails it)."""
    x = inputs(batch=2, d=3, n=2, L=height * width, seed=height * 10 + width)
    torch.testing.assert_close(selective_scan_2d_ref(**x, height=height, width=width),
                               naive_2d(**x, height=height, width=width), rtol=1e-10, atol=1e-10)
    transposed = {k: v.view(*v.shape[:-1], height, width).transpose(-1, -2).flatten(-2) if v.shape[-1] == height * width
                  else v for k, v in x.items()}
    column_first = naive_2d(**transposed, height=width, width=height).view(2, 3, width, height).transpose(-1, -2)
    assert not torch.allclose(column_first.flatten(-2), naive_2d(**x, height=height, width=width))


@pytest.mark.parametrize("height,width", [(1, 9), (9, 1)])
def test_single_row_or_column_is_the_1d_scan(height, width):
    x = inputs(L=height * width)
    torch.testing.assert_close(selective_scan_2d_ref(**x, height=height, width=width), selective_scan_1d_ref(**x))


def test_grouped_B_C_equal_per_group_scans():
    x = inputs(d=4, groups=2, L=12)
    y = selective_scan_2d_ref(**x, height=3, width=4)
    for grp in range(2):
        part = dict(x, u=x["u"][:, 2 * grp:2 * grp + 2], delta=x["delta"][:, 2 * grp:2 * grp + 2],
                    A=x["A"][2 * grp:2 * grp + 2], B=x["B"][:, grp], C=x["C"][:, grp])
        torch.testing.assert_close(y[:, 2 * grp:2 * grp + 2], selective_scan_2d_ref(**part, height=3, width=4))


def test_D_z_bias_softplus_compose_as_documented():
    x = inputs(L=12)
    D, z, bias = torch.randn(4, dtype=F64), torch.randn(2, 4, 12, dtype=F64), torch.randn(4, dtype=F64)
    got = selective_scan_2d_ref(**x, D=D, z=z, delta_bias=bias, delta_softplus=True, height=4, width=3)
    core = selective_scan_2d_ref(**dict(x, delta=F.softplus(x["delta"] + bias[:, None])), height=4, width=3)
    torch.testing.assert_close(got, (core + D[:, None] * x["u"]) * F.silu(z))


def test_gradcheck_2d_every_input():
    x = inputs(batch=1, d=2, n=2, L=6, groups=1)
    D, z, bias = torch.randn(2, dtype=F64), torch.randn(1, 2, 6, dtype=F64), torch.randn(2, dtype=F64)
    args = [t.requires_grad_() for t in (x["u"], x["delta"], x["A"], x["B"], x["C"], D, z, bias)]

    def f(u, delta, A, B, C, D, z, bias):
        return selective_scan_2d_ref(u, delta, A, B, C, D, z, bias, True, height=2, width=3)

    assert torch.autograd.gradcheck(f, args)


def loop_m2d(u, dh, dv, Ah, Av, Bh, Bv, C, height, width):
    """Eq. 14 cell by cell, the most literal form."""
    b, d, _ = u.shape
    n = Ah.shape[1]
    h = torch.zeros(b, d, n, height, width, dtype=u.dtype)
    y = torch.zeros(b, d, height, width, dtype=u.dtype)
    for i in range(height):
        for j in range(width):
            l = i * width + j
            up = h[..., i - 1, j] if i else 0
            left = h[..., i, j - 1] if j else 0
            bu = (dv[:, :, l, None] * Bv[:, None, :, l] + dh[:, :, l, None] * Bh[:, None, :, l]) * u[:, :, l, None]
            h[..., i, j] = 0.5 * (torch.exp(dv[:, :, l, None] * Av) * up + torch.exp(dh[:, :, l, None] * Ah) * left + bu)
            y[:, :, i, j] = (h[..., i, j] * C[:, None, :, l]).sum(-1)
    return y.reshape(b, d, -1)


@pytest.mark.parametrize("height,width", [(3, 4), (1, 5), (5, 1)])
def test_m2d_reference_is_equation_14(height, width):
    x, x2 = inputs(L=height * width, seed=1), inputs(L=height * width, seed=2)
    args = (x["u"], x["delta"], x2["delta"], x["A"], x2["A"], x["B"], x2["B"], x["C"])
    got = wavefront_scan_m2d_ref(*args, height=height, width=width)
    torch.testing.assert_close(got, loop_m2d(*args, height, width))


def test_m2d_gradcheck():
    x, x2 = inputs(batch=1, d=2, n=2, L=6, seed=3), inputs(batch=1, d=2, n=2, L=6, seed=4)
    args = [t.requires_grad_() for t in (x["u"], x["delta"], x2["delta"], x["A"], x2["A"], x["B"], x2["B"], x["C"])]
    assert torch.autograd.gradcheck(lambda *a: wavefront_scan_m2d_ref(*a, height=2, width=3), args)


def test_public_functions_on_cpu_are_the_references():
    x = inputs(dtype=torch.float32, L=12)
    torch.testing.assert_close(ops.selective_scan_2d(**x, height=3, width=4), selective_scan_2d_ref(**x, height=3, width=4))
    torch.testing.assert_close(ops.selective_scan_1d(**x), selective_scan_1d_ref(**x))


@pytest.mark.parametrize("groups", [None, 2])
def test_unbatched_inputs_are_a_batch_of_one(groups):
    """u, delta, z (d, L) and B, C (n, L) or (groups, n, L): the output and gradients of a batch of one, unbatched."""
    x = inputs(batch=1, d=4, L=12, groups=groups, seed=7)
    x["z"] = torch.randn(1, 4, 12, dtype=F64, generator=torch.Generator().manual_seed(1))
    batched = {k: v.clone().requires_grad_() for k, v in x.items()}
    single = {k: (v[0] if k != "A" else v).detach().clone().requires_grad_() for k, v in x.items()}
    for fn, grid in [(ops.selective_scan_2d, dict(height=3, width=4)), (ops.selective_scan_1d, {})]:
        want, got = fn(**batched, **grid), fn(**single, **grid)
        torch.testing.assert_close(got, want[0])
        want_grads = torch.autograd.grad(want.square().sum(), list(batched.values()))
        got_grads = torch.autograd.grad(got.square().sum(), list(single.values()))
        for name, g, w in zip(x, got_grads, want_grads):
            torch.testing.assert_close(g, w if name == "A" else w[0], msg=name)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="does not match L"):
        selective_scan_2d_ref(**inputs(L=12), height=5, width=3)


def test_right_padding_of_rows_is_exact():
    """The CUDA path widens rows to 16-byte multiples with zero columns on the right and slices them off; the
    row-first scan never carries those columns into the original ones: same output, same gradients."""
    from ops.selective_scan import _widen

    assert ops.aligned_width(203) == 208 and ops.aligned_width(203, torch.float32) == 204
    assert ops.aligned_width(200) == 200 and ops.aligned_width(37) == 37 and ops.aligned_width(37, torch.float32) == 38
    assert ops.aligned_width(101) == 104 and ops.aligned_width(100) == 100  # 4 columns of 8-byte loads up to 128
    height, width, pad = 3, 5, 3
    x = inputs(L=height * width, seed=7)
    x.update(D=torch.randn(4, dtype=F64), z=torch.randn(2, 4, height * width, dtype=F64),
             delta_bias=torch.randn(4, dtype=F64))
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    wide = {k: v.clone().requires_grad_() for k, v in x.items()}
    out = selective_scan_2d_ref(**leaves, delta_softplus=True, height=height, width=width)
    padded = {k: (_widen(v, height, width, pad) if k in ("u", "delta", "B", "C", "z") else v) for k, v in wide.items()}
    out_wide = selective_scan_2d_ref(**padded, delta_softplus=True, height=height, width=width + pad)
    sliced = out_wide.unflatten(-1, (height, width + pad))[..., :width].flatten(-2)
    torch.testing.assert_close(sliced, out)
    dout = torch.randn_like(out)
    out.backward(dout)
    sliced.backward(dout)
    for k in x:
        torch.testing.assert_close(wide[k].grad, leaves[k].grad, msg=k)


def test_lattice_conv_silu_reference_is_a_depthwise_conv_with_same_padding_then_silu():
    """A 3x3 all-ones kernel without bias sums each cell's 3x3 neighbourhood (zeros beyond the border)."""
    x = torch.arange(12, dtype=torch.float64).reshape(1, 1, 12)
    got = ops.lattice_conv_silu_ref(x, torch.ones(1, 1, 3, 3, dtype=torch.float64), None, height=3, width=4)
    grid = torch.nn.functional.pad(x.reshape(3, 4), (1, 1, 1, 1))
    sums = torch.stack([grid[i:i + 3, j:j + 3].sum() for i in range(3) for j in range(4)])
    torch.testing.assert_close(got.reshape(-1), torch.nn.functional.silu(sums))
    with pytest.raises(ValueError, match="does not match"):
        ops.lattice_conv_silu(x, torch.ones(1, 1, 3, 3, dtype=torch.float64), height=3, width=5)


def mixer_weights(d_model=8, d_inner=16, n=4, rank=2, k=3, kind="2d", seed=0, dtype=F64, device="cpu"):
    """Random weights of Mamba's mixer for `ops.mamba_inner` (keyword arguments), in nn.Linear / nn.ConvNd layout,
    the conv's bias not zero and delta in a range where the gates and decays are far from saturated."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(device=device, dtype=dtype)

    conv = (d_inner, 1, k, k) if kind == "2d" else (d_inner, 1, k)
    return dict(in_scale=rnd(d_model, scale=0.3, shift=1.0),
                in_proj_weight=rnd(2 * d_inner, d_model, scale=d_model ** -0.5), conv_weight=rnd(*conv, scale=0.3),
                conv_bias=rnd(d_inner, scale=0.5), x_proj_weight=rnd(rank + 2 * n, d_inner, scale=d_inner ** -0.5),
                dt_proj_weight=rnd(d_inner, rank, scale=0.5), dt_proj_bias=rnd(d_inner, scale=0.5, shift=-2.0),
                A_log=rnd(d_inner, n, scale=0.5), D=rnd(d_inner), out_proj_weight=rnd(d_model, d_inner, scale=0.2))


def mixer_unfused(x, w, kind, height, width):
    """`ops.mamba_inner` written as the chain of separate differentiable ops it fuses (references for conv, scan)."""
    from ops.mamba_inner import causal_conv1d_silu

    u, z = (w["in_proj_weight"] @ (x * w["in_scale"]).t()).chunk(2)
    if kind == "2d":
        u = ops.lattice_conv_silu_ref(u, w["conv_weight"], w["conv_bias"], height=height, width=width)
    else:
        u = causal_conv1d_silu(u, w["conv_weight"], w["conv_bias"], height, width)
    n = w["A_log"].shape[1]
    dt, B, C = (w["x_proj_weight"] @ u).split([w["dt_proj_weight"].shape[1], n, n])
    args = (u[None], (w["dt_proj_weight"] @ dt)[None], -torch.exp(w["A_log"]), B[None], C[None], w["D"], z[None],
            w["dt_proj_bias"], True)
    y = selective_scan_2d_ref(*args, height=height, width=width) if kind == "2d" else selective_scan_1d_ref(*args)
    return F.linear(y[0].t(), w["out_proj_weight"])


@pytest.mark.parametrize("kind,height,width", [("2d", 3, 7), ("2d", 5, 1), ("1d", 1, 19)])
def test_mamba_inner_is_the_chain_it_fuses(kind, height, width):
    """The one-node mixer (hand-written backward, references as primitives) against the same chain of autograd
    ops: the output and the gradients of x and every weight, in float64; and gradcheck of x through it. Without
    in_scale too (a mixer without a norm before it)."""
    w = {k: v.requires_grad_() for k, v in mixer_weights(kind=kind).items()}
    x = torch.randn(height * width, 8, dtype=F64, requires_grad=True)
    fused = ops.mamba_inner(x, **w, kind=kind, height=height, width=width)
    chain = mixer_unfused(x, w, kind, height, width)
    torch.testing.assert_close(fused, chain)
    params = [x, *w.values()]
    dout = torch.randn_like(chain)
    for got, want, name in zip(torch.autograd.grad(fused, params, dout), torch.autograd.grad(chain, params, dout),
                               ["x", *w]):
        torch.testing.assert_close(got, want, msg=lambda m: f"d{name}: {m}")
    assert torch.autograd.gradcheck(lambda x: ops.mamba_inner(x, **w, kind=kind, height=height, width=width), (x,))
    w["in_scale"] = None
    torch.testing.assert_close(ops.mamba_inner(x, **w, kind=kind, height=height, width=width),
                               mixer_unfused(x, {**w, "in_scale": 1.0}, kind, height, width))


def test_mamba_inner_rejects_a_bad_kind_or_shape():
    w = mixer_weights()
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.mamba_inner(torch.zeros(6, 8, dtype=F64), **w, kind="3d", height=2, width=3)
    with pytest.raises(ValueError, match="does not match L = 6"):
        ops.mamba_inner(torch.zeros(6, 8, dtype=F64), **w, kind="2d", height=2, width=4)


def test_mamba_inner_1d_refuses_a_lattice():
    """kind "1d" scans one sequence; given height > 1 the reference would ignore it and the kernel would scan a 2D
    lattice: refused."""
    d, di, r, n = 4, 8, 1, 2
    args = (torch.randn(6, d), torch.randn(2 * di, d), torch.randn(di, 1, 3), torch.randn(di),
            torch.randn(r + 2 * n, di), torch.randn(di, r), torch.randn(di), torch.randn(di, n), torch.randn(di),
            torch.randn(d, di))
    with pytest.raises(ValueError, match="height must be 1, not 2"):
        ops.mamba_inner(*args, kind="1d", height=2, width=3)
