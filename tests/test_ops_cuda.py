"""CUDA kernels against the reference (float64, same rounded inputs): outputs and every gradient.

Skipped without a CUDA device. Tolerances are on ||kernel - reference|| / ||reference|| per tensor.
"""
from __future__ import annotations

import pytest
import torch

import ops
from ops import selective_scan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOL = {torch.float32: 2e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
DTYPES = list(TOL)


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    monkeypatch.delenv("WSI_PIPELINE_SCAN", raising=False)
    assert selective_scan.extension() is not None, "the CUDA extension did not build"


def make(batch, d, n, L, dtype, groups=None, options=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bc = (batch, n, L) if groups is None else (batch, groups, n, L)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device="cuda") * scale + shift).to(dt)

    x = dict(u=rnd(batch, d, L), delta=(torch.rand(batch, d, L, generator=g, device="cuda") * 0.6 + 0.05).to(dtype),
             A=-torch.rand(d, n, generator=g, device="cuda") * 1.5 - 0.2, B=rnd(*bc), C=rnd(*bc))
    if options:
        x.update(D=rnd(d, dt=torch.float32), z=rnd(batch, d, L), delta_bias=rnd(d, scale=0.5, shift=-1.0,
                                                                                   dt=torch.float32),
                 delta_softplus=True)
    return x


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def grad_out(shape, dtype, g):
    """The output gradient for a kernel-vs-reference check, drawn from the test's generator (not the global one,
    whose state depends on the tests run before) and rounded to the kernel's dtype, in float64: the reference then
    gets the values the kernel gets, so the check measures the kernel's error alone (a 1x1 grid's few gradients,
    summed with cancellations, showed 2e-2 relative error in bf16 from the rounding of dout alone)."""
    return torch.randn(shape, generator=g, device="cuda", dtype=torch.float64).to(dtype).double()


def compare(fn, ref, x, grid, tol):
    """Run fn on x and ref on x upcast to float64; compare the output and the gradient of every tensor input."""
    names = [k for k, v in x.items() if torch.is_tensor(v)]
    mine = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in x.items()}
    ref_in = {k: (v.detach().double().requires_grad_() if k in names else v) for k, v in x.items()}
    out = fn(**mine, **grid)
    expected = ref(**ref_in, **grid)
    assert out.dtype == x["u"].dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < tol, f"output: {rel_err(out, expected):.2e}"
    dout = grad_out(expected.shape, out.dtype, torch.Generator(device="cuda").manual_seed(out.numel()))
    out.backward(dout.to(out.dtype))
    expected.backward(dout)
    for k in names:
        got, want = mine[k].grad, ref_in[k].grad
        assert got is not None and got.dtype == x[k].dtype and got.shape == x[k].shape, k
        assert rel_err(got, want) < tol, f"d{k}: {rel_err(got, want):.2e}"


SHAPES = [(1, 1), (1, 37), (37, 1), (13, 29), (200, 200)]


@pytest.mark.parametrize("options", [False, True], ids=["plain", "D-z-bias-softplus"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height,width", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
def test_scan2d_matches_reference(height, width, dtype, options):
    x = make(2 if height * width < 1000 else 1, 4, 8, height * width, dtype, options=options, seed=height + width)
    compare(ops.selective_scan_2d, ops.selective_scan_2d_ref, x, dict(height=height, width=width), TOL[dtype])


@pytest.mark.parametrize("n,groups,height,width", [(20, None, 9, 11), (64, None, 6, 7), (16, 2, 8, 9),
                                                   (16, None, 5, 300), (3, None, 17, 70), (16, None, 19, 96)])
def test_scan2d_states_groups_and_wide_rows(n, groups, height, width):
    x = make(2, 4, n, height * width, torch.float32, groups=groups, options=True, seed=n)
    compare(ops.selective_scan_2d, ops.selective_scan_2d_ref, x, dict(height=height, width=width),
            TOL[torch.float32])


# (height, width, groups, d) at 8 x d channels: 4 channels per warp for rows of <= 64 columns (d % 4 == 0),
# else 2 for rows of <= 128; K = 1, 2, 4 or 8 columns per lane as the packed row needs
PACKED = [(14, 14, None, 256), (37, 1, None, 256), (3, 8, 2, 256), (14, 14, None, 254), (1, 30, None, 256),
          (5, 32, 2, 256), (3, 17, None, 256), (4, 56, None, 256), (2, 33, None, 256), (3, 64, 2, 256),
          (2, 40, None, 254), (2, 100, None, 256), (3, 128, 2, 256), (2, 65, None, 254), (9, 64, None, 254)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height,width,groups,d", PACKED, ids=[f"{h}x{w}-g{g}-d{d}" for h, w, g, d in PACKED])
def test_scan2d_several_channels_per_warp(height, width, groups, d, dtype):
    """Small rows and >= 1024 channels: the kernels pack 2 or 4 channels into each warp."""
    x = make(8, d, 4, height * width, dtype, groups=groups, options=True, seed=height * width)
    compare(ops.selective_scan_2d, ops.selective_scan_2d_ref, x, dict(height=height, width=width), TOL[dtype])


# (height, width, groups) at batch 1 x 256 channels: 128 blocks at 2 channels per warp, enough for the backward
# (one block per SM) but not the forward, which keeps one channel per warp
BACKWARD_PACKED = [(5, 100, None), (3, 40, None), (2, 64, None), (4, 120, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height,width,groups", BACKWARD_PACKED, ids=[f"{h}x{w}-g{g}" for h, w, g in BACKWARD_PACKED])
def test_scan2d_backward_packed_alone(height, width, groups, dtype):
    x = make(1, 256, 4, height * width, dtype, groups=groups, options=True, seed=height + width)
    compare(ops.selective_scan_2d, ops.selective_scan_2d_ref, x, dict(height=height, width=width), TOL[dtype])


# (batch, d, n, height, width, P, K): states a multiple of 16 and rows of one tile, a multiple of K wide, so the
# kernels take their uniform-rows form (kU); at 100 columns one channel per warp (K = 4) rather than two (K = 8).
# The backward runs two states per warp at K = 4 with one channel per warp (v17), with 32 states in two blocks too.
UNIFORM = [(1, 4, 16, 20, 200, 1, 8), (1, 4, 32, 6, 200, 1, 8), (2, 4, 16, 9, 96, 1, 4), (8, 256, 16, 4, 56, 4, 8),
           (8, 256, 16, 3, 120, 2, 8), (8, 256, 16, 2, 100, 1, 4), (1, 4, 32, 7, 100, 1, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,d,n,height,width,P,K", UNIFORM, ids=[f"{b}x{d}x{n}-{h}x{w}" for b, d, n, h, w, *_ in UNIFORM])
def test_scan2d_uniform_rows(batch, d, n, height, width, P, K, dtype):
    ext = selective_scan.extension()
    for forward in (True, False):
        states = 2 if not forward and K == 4 and P == 1 else 1
        plan = ext.scan_plan(batch, d, n, 1, height, width, dtype.itemsize, forward)
        assert tuple(plan) == (P, K, True, states), f"forward={forward}: plan {plan}"
    x = make(batch, d, n, height * width, dtype, options=True, seed=height * width + n)
    compare(ops.selective_scan_2d, ops.selective_scan_2d_ref, x, dict(height=height, width=width), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height,width,groups", [(20, 200, None), (7, 13, 2)], ids=["20x200", "7x13-groups"])
def test_scan2d_unbatched_inputs(height, width, groups, dtype):
    """Unbatched inputs (2DMambaMIL's block passes them, so that it adds no views): the kernels against the float64
    reference, every gradient in the input's unbatched shape; 13 columns are widened for the wide loads."""
    x = make(1, 4, 16, height * width, dtype, groups=groups, options=True, seed=height)
    for k in ("u", "delta", "z", "B", "C"):
        x[k] = x[k][0]
    compare(ops.selective_scan_2d, ops.selective_scan_2d, x, dict(height=height, width=width), TOL[dtype])
    compare(ops.selective_scan_1d, ops.selective_scan_1d, x, {}, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scan2d_unaligned_views(dtype):
    """Contiguous views at an odd storage offset (not 16-byte aligned) give the same result."""
    x = make(2, 4, 8, 17 * 16, dtype, options=True, seed=5)
    for k in ("u", "delta", "z", "B", "C"):
        t = x[k]
        x[k] = torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)
        assert x[k].is_contiguous() and x[k].data_ptr() % 16 != 0
    compare(ops.selective_scan_2d, ops.selective_scan_2d_ref, x, dict(height=17, width=16), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [1, 37, 700])
def test_scan1d_matches_reference(L, dtype):
    x = make(2, 4, 8, L, dtype, options=True, seed=L)
    compare(ops.selective_scan_1d, ops.selective_scan_1d_ref, x, {}, TOL[dtype])


def make_m2d(batch, d, n, L, dtype, options, seed):
    a, b = make(batch, d, n, L, dtype, seed=seed), make(batch, d, n, L, dtype, seed=seed + 1)
    x = dict(u=a["u"], delta_h=a["delta"], delta_v=b["delta"], A_h=a["A"], A_v=b["A"], B_h=a["B"], B_v=b["B"],
             C=a["C"])
    if options:
        x.update(D=make(1, d, 1, 1, torch.float32, options=True, seed=seed)["D"], z=b["u"].clone(),
                 delta_softplus=True)
    return x


@pytest.mark.parametrize("options", [False, True], ids=["plain", "D-z-softplus"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("height,width", [(1, 1), (1, 37), (37, 1), (13, 29), (64, 64)])
def test_m2d_matches_reference(height, width, dtype, options):
    x = make_m2d(2, 3, 6, height * width, dtype, options, seed=height * width)
    compare(ops.wavefront_scan_m2d, ops.wavefront_scan_m2d_ref, x, dict(height=height, width=width), TOL[dtype])


def test_forward_keeps_no_per_state_tensor():
    """Saved for backward: inputs plus checkpoints of L*d*n/STRIP floats, not the (L, d, n) states."""
    x = make(1, 64, 16, 96 * 96, torch.bfloat16)
    leaves = {k: (v.requires_grad_() if k == "u" else v) for k, v in x.items()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = ops.selective_scan_2d(**leaves, height=96, width=96)
    held = torch.cuda.memory_allocated() - before
    states = 96 * 96 * 64 * 16 * 4
    assert held < states / 2, f"forward holds {held} bytes; all states would be {states}"
    y.float().sum().backward()


def test_backward_scratch_is_that_of_the_resident_blocks():
    """The backward's strip scratch is a slot per persistent block, not the states of every (channel, state): on a
    grid of at most one strip of rows, the latter is all the (L, d, n) states."""
    x = make(64, 384, 16, 14 * 14, torch.bfloat16)
    leaves = {k: (v.requires_grad_() if k in ("u", "delta") else v) for k, v in x.items()}
    y = ops.selective_scan_2d(**leaves, height=14, width=14)
    dout = torch.ones_like(y)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y.backward(dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    states = 64 * 384 * 16 * 14 * 14 * 4
    assert extra < states / 8, f"the backward took {extra} bytes more; all states would be {states}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [16, 32])
def test_scan2d_more_blocks_than_resident(n, dtype):
    """More blocks of work than the backward's persistent blocks (16 x 128 channels, 4 per warp, in one or two
    blocks of states): each persistent block takes several in turn, reusing its scratch slot and shared memory."""
    x = make(16, 128, n, 5 * 9, dtype, options=True, seed=n)
    compare(ops.selective_scan_2d, ops.selective_scan_2d_ref, x, dict(height=5, width=9), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height,width", [(11, 300), (11, 600)])
def test_scan2d_rows_of_several_tiles(height, width, dtype):
    """Rows of 2 tiles keep the lanes' horizontal carries in shared memory; rows of 3 (at 16 warps and K = 8) do
    not fit and rescan: both against the reference, over strips (11 rows)."""
    x = make(1, 4, 16, height * width, dtype, options=True, seed=width)
    compare(ops.selective_scan_2d, ops.selective_scan_2d_ref, x, dict(height=height, width=width), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height,width", [(9, 203), (5, 130), (1, 1001), (7, 101), (6, 100), (3, 37)])
def test_scan2d_rows_widened_to_16_bytes(height, width, dtype):
    """Rows whose width does not suit the lanes' wide loads (`ops.aligned_width`) run on a zero-widened grid,
    sliced back; 100 columns need none (4 per lane, 8-byte loads in 16-bit dtypes)."""
    x = make(1, 4, 8, height * width, dtype, options=True, seed=width)
    compare(ops.selective_scan_2d, ops.selective_scan_2d_ref, x, dict(height=height, width=width), TOL[dtype])


CONV_SHAPES = [(1, 1), (1, 37), (37, 1), (13, 29), (17, 70), (200, 200)]


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("height,width", CONV_SHAPES, ids=[f"{h}x{w}" for h, w in CONV_SHAPES])
def test_lattice_conv_silu_matches_reference(height, width, dtype, k):
    """The lattice conv + SiLU kernels (forward, and backward with the conv recomputed) against the reference in
    float64: output, x, weight and bias gradients; batch 2 over 3 channels, so a channel's weight row repeats."""
    g = torch.Generator(device="cuda").manual_seed(height * 31 + width + k)
    x = torch.randn(2, 3, height * width, generator=g, device="cuda").to(dtype)
    weight = torch.randn(3, 1, k, k, generator=g, device="cuda") / k
    bias = torch.randn(3, generator=g, device="cuda")
    for b in (bias, None):
        mine = [t.detach().clone().requires_grad_() for t in (x, weight)] + (
            [] if b is None else [b.detach().clone().requires_grad_()])
        ref = [t.detach().double().requires_grad_() for t in mine]
        out = ops.lattice_conv_silu(*mine, *([None] if b is None else []), height=height, width=width)
        expected = ops.lattice_conv_silu_ref(*ref, *([None] if b is None else []), height=height, width=width)
        assert out.dtype == dtype and out.shape == x.shape
        assert rel_err(out, expected) < TOL[dtype], f"output: {rel_err(out, expected):.2e}"
        dout = grad_out(expected.shape, dtype, g)
        out.backward(dout.to(dtype))
        expected.backward(dout)
        for name, got, want in zip(("x", "weight", "bias"), mine, ref):
            assert got.grad.dtype == got.dtype and got.grad.shape == got.shape, name
            assert rel_err(got.grad, want.grad) < TOL[dtype], f"d{name}: {rel_err(got.grad, want.grad):.2e}"


def test_lattice_conv_silu_falls_back_for_sizes_without_a_kernel():
    """Even or large kernel sizes, and float64, take the reference (same result as the reference itself)."""
    x = torch.randn(1, 2, 30, device="cuda")
    for weight in (torch.randn(2, 1, 9, 9, device="cuda"), torch.randn(2, 1, 3, 3, device="cuda").double()):
        got = ops.lattice_conv_silu(x.to(weight.dtype), weight, None, height=5, width=6)
        torch.testing.assert_close(got, ops.lattice_conv_silu_ref(x.to(weight.dtype), weight, None, height=5, width=6))


def test_bad_inputs_to_the_bindings_raise_their_message():
    """The bindings' checks end in a RuntimeError with sizes in the message (on the H100/H200 machine's torch 2.11,
    sizes formatted through std::ostream in extension code crashed the process instead)."""
    ext = selective_scan.extension()
    u = torch.zeros(1, 4, 64, device="cuda")
    B = torch.zeros(1, 1, 16, 64, device="cuda")
    with pytest.raises(RuntimeError, match=r"delta \[1, 4, 63\] must match u \[1, 4, 64\]"):
        ext.scan2d_fwd(u, u[..., :63].contiguous(), torch.zeros(4, 16, device="cuda"), B, B, None, None, None, False,
                       8, 8, selective_scan.STRIP)
    with pytest.raises(RuntimeError, match=r"got \[4, 1, 2, 2\]"):
        ext.lattice_conv_fwd(u, torch.zeros(4, 1, 2, 2, device="cuda"), None, 8, 8)
    with pytest.raises(RuntimeError, match="height\\*width = 8\\*9 must equal L = 64"):
        ext.lattice_conv_fwd(u, torch.zeros(4, 1, 3, 3, device="cuda"), None, 8, 9)


MIXER_SHAPES = [("2d", 13, 29), ("2d", 40, 200), ("2d", 9, 70), ("1d", 1, 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,height,width", MIXER_SHAPES, ids=[f"{k}-{h}x{w}" for k, h, w in MIXER_SHAPES])
def test_mamba_inner_matches_reference(kind, height, width, dtype):
    """Mamba's mixer as one node with the kernels (float32, or float32 weights and input under autocast to the
    16-bit dtypes, as the models run it) against the same function in float64 (the references): output, x and every
    weight's gradient. 9x70 runs widened to 72 columns."""
    from test_ops_reference import mixer_weights

    weights = mixer_weights(d_model=16, d_inner=32, n=16, kind=kind, dtype=torch.float32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(height * width)
    x = torch.randn(height * width, 16, generator=g, device="cuda")
    names = ["x", *weights]
    mine = [t.detach().clone().requires_grad_() for t in (x, *weights.values())]
    ref = [t.detach().double().requires_grad_() for t in mine]
    grid = dict(kind=kind, height=height, width=width)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = ops.mamba_inner(**dict(zip(names, mine)), **grid)
    expected = ops.mamba_inner(**dict(zip(names, ref)), **grid)
    tol = 2 * TOL[dtype]  # a chain of four projections (in the 16-bit dtype under autocast) around the scan
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, expected) < tol, f"output: {rel_err(out, expected):.2e}"
    dout = grad_out(expected.shape, dtype, g)
    out.backward(dout.to(dtype))
    expected.backward(dout)
    for name, got, want in zip(names, mine, ref):
        assert got.grad.dtype == torch.float32 and got.grad.shape == got.shape, name
        assert rel_err(got.grad, want.grad) < tol, f"d{name}: {rel_err(got.grad, want.grad):.2e}"


def captured_case(kind, dtype, seed):
    """(function, its keyword inputs) of a forward through one of the ops, inputs drawn from `seed`."""
    if kind == "mamba_inner":
        from test_ops_reference import mixer_weights

        weights = mixer_weights(d_model=16, d_inner=32, n=16, kind="2d", seed=seed, dtype=torch.float32, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = dict(x=torch.randn(9 * 70, 16, generator=g, device="cuda"), **weights)

        def fn(**k):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                return ops.mamba_inner(**k, kind="2d", height=9, width=70)
        return fn, x
    if kind == "lattice_conv":
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = dict(x=torch.randn(2, 8, 13 * 29, generator=g, device="cuda").to(dtype),
                 weight=torch.randn(8, 1, 3, 3, generator=g, device="cuda"),
                 bias=torch.randn(8, generator=g, device="cuda"))
        return (lambda **k: ops.lattice_conv_silu(**k, height=13, width=29)), x
    x = make(2, 8, 16, 13 * 29 if kind == "scan2d" else 300, dtype, options=True, seed=seed)
    if kind == "scan2d":
        return (lambda **k: ops.selective_scan_2d(**k, height=13, width=29)), x
    return ops.selective_scan_1d, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["scan2d", "scan1d", "lattice_conv", "mamba_inner"])
def test_forward_backward_replays_in_a_cuda_graph(kind, dtype):
    """A step's forward and backward through the ops, captured in a CUDA graph (`ops.graphs.capture`), replayed on
    new input values (copied into the captured tensors), gives the output and gradients of the eager step on those
    values (up to the order of the kernels' float atomics, which a 16-bit rounding after them can show)."""
    fn, static = captured_case(kind, dtype, seed=0)
    leaves = [v.requires_grad_() for v in static.values() if torch.is_tensor(v)]
    with torch.no_grad():  # (no autograd graph over the leaves may outlive the eager call: ops.graphs)
        dout = torch.randn_like(fn(**static))
    outs = []

    def step():
        outs.append(fn(**static))
        outs[-1].backward(dout)

    graph = ops.graphs.capture(step, grads_to_none=leaves)
    out, tol = outs[-1], 1e-5 if dtype == torch.float32 else 2e-3
    for seed in (1, 2):
        _, fresh = captured_case(kind, dtype, seed)
        with torch.no_grad():
            for k, v in fresh.items():
                if torch.is_tensor(v):
                    static[k].copy_(v)
        graph.replay()
        eager = {k: (v.detach().clone().requires_grad_() if torch.is_tensor(v) else v) for k, v in fresh.items()}
        want = fn(**eager)
        want.backward(dout)
        torch.cuda.synchronize()
        assert rel_err(out, want) < tol, f"output: {rel_err(out, want):.2e}"
        for k, v in static.items():
            if torch.is_tensor(v):
                assert rel_err(v.grad, eager[k].grad) < tol, f"d{k}: {rel_err(v.grad, eager[k].grad):.2e}"
