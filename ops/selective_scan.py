"""Public scans with autograd: CUDA kernels on CUDA tensors, the pure-PyTorch reference otherwise.

The kernels compute the whole operator, elementwise ends included (delta_bias and softplus, D u, the silu(z)
gate), and every gradient; this module adapts dtypes, shapes and alignment. Backend choice: CUDA tensors of
float32/float16/bfloat16 use the kernels when the extension builds; `WSI_PIPELINE_SCAN=reference` forces the
reference; without nvcc, or when the build fails, the reference is used with one warning.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F

from . import build
from .reference import _output, selective_scan_1d_ref, selective_scan_2d_ref, wavefront_scan_m2d_ref

LOG = logging.getLogger(__name__)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STRIP = 16  # rows between two checkpointed state rows: the forward keeps L*dim*n/STRIP floats for the backward
_state: dict[str, object] = {}


def _fallback_once(reason: str) -> None:
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"wsi_pipeline ops: using the pure-PyTorch reference scan ({reason})", RuntimeWarning,
                      stacklevel=3)


def extension():
    """The compiled extension, or None (reference forced, no toolkit, or a failed build: warned once)."""
    if os.environ.get("WSI_PIPELINE_SCAN", "").lower() == "reference":
        return None
    if "module" not in _state:
        try:
            _state["module"] = build.load()
        except (build.BuildUnavailable, OSError, RuntimeError, ImportError) as err:
            LOG.warning("scan extension unavailable: %s", err)
            _state["module"] = None
            _fallback_once(f"CUDA extension unavailable: {err}")
    return _state["module"]


def _use_kernel(u: torch.Tensor) -> bool:
    """CUDA tensors of a kernel dtype with a working extension; CPU tensors and float64 take the reference."""
    return kernels_for(u.device, u.dtype)


def kernels_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels run tensors of `dtype` on `device` (warns once on the host without a CUDA device)."""
    if device.type != "cuda":
        if not torch.cuda.is_available():
            _fallback_once("no CUDA device")
        return False
    return dtype in KERNEL_DTYPES and extension() is not None


# The adapters below call a tensor method only when it changes something: a training step of one slide is bound by
# the host, and a `.to()` or `.reshape()` that returns its input still costs a dispatch (2-4 us of host time each;
# the wrappers' ~20 of them took 40 us per forward and 90 us per backward on the H200's host).


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _shaped(x: torch.Tensor, shape) -> torch.Tensor:
    return x if x.shape == shape else x.reshape(shape)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels read rows with 16-byte loads)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _grouped(x: torch.Tensor, dtype: torch.dtype, unbatched: bool) -> torch.Tensor:
    """B or C ((batch,) (groups,) n, L) as a contiguous, aligned (batch, groups, n, L) tensor of the kernel's dtype."""
    if unbatched:  # (n, L) or (groups, n, L)
        return _aligned(_cast(_shaped(x, (1,) * (4 - x.dim()) + tuple(x.shape)), dtype))
    return _aligned(_cast(x.unsqueeze(1) if x.dim() == 3 else x, dtype))


def _spec(x: torch.Tensor | None) -> tuple | None:
    return None if x is None else (x.shape, x.dtype)


def _as(grad: torch.Tensor | None, spec: tuple | None) -> torch.Tensor | None:
    """A gradient in the shape and dtype of its input."""
    return None if grad is None or spec is None else _cast(_shaped(grad, spec[0]), spec[1])


def _batch_of_one(u, delta, z):
    """Unbatched u, delta, z (d, L) as a batch of one (B and C: `_grouped`)."""
    return u.unsqueeze(0), delta.unsqueeze(0), None if z is None else z.unsqueeze(0)


def scan2d_forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, height: int, width: int):
    """The kernels' forward on rows already aligned (`aligned_width`), batched or unbatched (the batch dimension is
    then added here: views that record no autograd node). Returns out (sum_n <C, h> + D u) * silu(z) in u's dtype,
    with delta = softplus(delta + delta_bias), and what `scan2d_backward` needs: (tensors, meta)."""
    specs = tuple(map(_spec, (u, delta, A, B, C, D, z, delta_bias)))
    unbatched = u.dim() == 2
    if unbatched:
        u, delta, z = _batch_of_one(u, delta, z)
    dtype, f32 = u.dtype, torch.float32
    ins = (_aligned(u), _aligned(_cast(delta, dtype)), _cast(A, f32).contiguous(), _grouped(B, dtype, unbatched),
           _grouped(C, dtype, unbatched), None if D is None else _cast(D, f32).contiguous(),
           None if z is None else _aligned(_cast(z, dtype)),
           None if delta_bias is None else _cast(delta_bias, f32).contiguous())
    out, ypre, ckpt = extension().scan2d_fwd(*ins, softplus, height, width, STRIP)
    return out[0] if unbatched else out, ((*ins, ckpt, ypre), (softplus, height, width, specs))


def scan2d_backward(saved, dout, bc_as_summed: bool = False):
    """The kernels' backward: the gradients of u, delta, A, B, C, D, z, delta_bias, each in its input's shape and
    dtype (None for inputs not given). `bc_as_summed`: dB and dC as the kernel sums them, float32 (batch, groups,
    n, L), for a caller that copies them on anyway (`mamba_inner`: into its x_proj gradient; the casts cost ~20 us
    of host time each)."""
    (*ins, ckpt, ypre), (softplus, height, width, specs) = saved
    grads = extension().scan2d_bwd(*ins, softplus, height, width, STRIP, ckpt, ypre,
                                   _aligned(_cast(_shaped(dout, ins[0].shape), ins[0].dtype)))
    return tuple(g if bc_as_summed and k in (3, 4) else _as(g, spec)
                 for k, (g, spec) in enumerate(zip(grads, specs)))


class _Scan2d(torch.autograd.Function):
    """`scan2d_forward` / `scan2d_backward` as an autograd Function."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, height: int, width: int):
        out, (tensors, ctx.meta) = scan2d_forward(u, delta, A, B, C, D, z, delta_bias, softplus, height, width)
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, dout):
        return (*scan2d_backward((ctx.saved_tensors, ctx.meta), dout), None, None, None)


def selective_scan_2d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                      height: int, width: int):
    """2DMamba's scan (see `selective_scan_2d_ref` for the math); CUDA kernel with autograd on CUDA tensors.

    u, delta, B, C, z are used in u's dtype (fp32/fp16/bf16; states and sums in fp32); A, D, delta_bias in fp32.
    Unbatched inputs are taken too (u, delta, z of (d, L); B, C of (n, L) or (groups, n, L)), with an unbatched
    output: on CUDA without the views a caller would add (an autograd node each, in a host-bound training step).
    """
    if not _use_kernel(u):
        return _reference(selective_scan_2d_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                          height=height, width=width)
    if height * width != u.shape[-1]:
        raise ValueError(f"height*width = {height}*{width} = {height * width} does not match L = {u.shape[-1]}")
    pad = aligned_width(width, u.dtype) - width
    if pad:  # 16-byte rows for the wide loads (200x203 bf16 forward+backward: 5.27 ms unwidened, 2.75 widened)
        u, delta, B, C, z = (None if x is None else _widen(x, height, width, pad) for x in (u, delta, B, C, z))
    out = _Scan2d.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), int(height), int(width + pad))
    return out.unflatten(-1, (height, width + pad))[..., :width].flatten(-2) if pad else out


def aligned_width(width: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The row width the kernels read at full speed. A lane reads K = 1, 2, 4 or 8 consecutive columns (the
    smallest K whose 32 lanes cover the row, 8 beyond 128 columns) with one 8- or 16-byte load when K values
    fill one, which needs rows of a multiple of those bytes: for fp16/bf16, 4 columns from 65 to 128 and 8 above;
    for fp32, 2 columns from 33 to 64 and 4 above; other rows are read one value at a time. `selective_scan_2d`
    widens other rows itself (with copies); a caller that can build its grid at this width saves them
    (2DMambaMIL's lattice and block do). The default dtype's rule suits the 16-bit kernels and is enough for
    fp32's from 65 columns on."""
    size = dtype.itemsize
    lane_cols = 1 if width <= 32 else 2 if width <= 64 else 4 if width <= 128 else 8  # ops/csrc cols_per_lane
    load = lane_cols * size
    multiple = min(load, 16) // size if load % 16 == 0 or load == 8 else 1  # ops/csrc ldg's wide loads
    return width + (-width % multiple)


def _widen(x: torch.Tensor, height: int, width: int, pad: int) -> torch.Tensor:
    """(..., height * width) -> (..., height * (width + pad)), zeros in the new right-most columns. Exact for the
    row-first scan: h[i, j] depends only on the cells (i' <= i, j' <= j), so columns on the right never reach the
    original ones (forward or backward), and their outputs are sliced off."""
    return F.pad(x.unflatten(-1, (height, width)), (0, pad)).flatten(-2)


def _reference(ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus, **grid):
    """A reference scan, on unbatched inputs as a batch of one."""
    if u.dim() != 2:
        return ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, **grid)
    u, delta, z = _batch_of_one(u, delta, z)
    return ref(u, delta, A, B.unsqueeze(0), C.unsqueeze(0), D, z, delta_bias, delta_softplus, **grid)[0]


def selective_scan_1d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba's 1D selective scan over the sequence (MambaMIL): the 2D kernel on a grid of one row. Unbatched
    inputs as `selective_scan_2d`'s."""
    if not _use_kernel(u):
        return _reference(selective_scan_1d_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_2d(u, delta, A, B, C, D, z, delta_bias, delta_softplus, height=1, width=u.shape[-1])


class _WavefrontM2d(torch.autograd.Function):
    """y = sum_n <C, h> of the Mamba2D recurrence; all inputs fp32 and contiguous."""

    @staticmethod
    def forward(ctx, u, dh, dv, Ah, Av, Bh, Bv, C, height: int, width: int):
        (y,) = extension().m2d_fwd(u, dh, dv, Ah, Av, Bh, Bv, C, height, width)
        ctx.save_for_backward(u, dh, dv, Ah, Av, Bh, Bv, C)
        ctx.grid = (height, width)
        return y

    @staticmethod
    def backward(ctx, dy):
        grads = extension().m2d_bwd(*ctx.saved_tensors, *ctx.grid, dy.float().contiguous())
        return (*grads, None, None)


def wavefront_scan_m2d(u, delta_h, delta_v, A_h, A_v, B_h, B_v, C, D=None, z=None, delta_softplus=False, *,
                       height: int, width: int):
    """Mamba2D's wavefront scan (see `wavefront_scan_m2d_ref`); CUDA kernel with autograd on CUDA tensors.

    The kernel runs in fp32 (other dtypes are converted) and needs width <= 1024.
    """
    if not _use_kernel(u) or width > 1024:
        return wavefront_scan_m2d_ref(u, delta_h, delta_v, A_h, A_v, B_h, B_v, C, D, z, delta_softplus,
                                      height=height, width=width)
    if height * width != u.shape[-1]:
        raise ValueError(f"height*width = {height}*{width} = {height * width} does not match L = {u.shape[-1]}")
    dh, dv = delta_h.float(), delta_v.float()
    if delta_softplus:
        dh, dv = F.softplus(dh), F.softplus(dv)
    f32 = [x.float().contiguous() for x in (u, dh, dv, A_h, A_v)]
    grouped = [(x.unsqueeze(1) if x.dim() == 3 else x).float().contiguous() for x in (B_h, B_v, C)]
    y = _WavefrontM2d.apply(*f32, *grouped, int(height), int(width))
    return _output(u.float(), y, D, z, u.dtype)
