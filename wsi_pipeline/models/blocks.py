"""Blocks the MIL models share: input embedding, gated attention pooling, the lattice, the Mamba block.

The Mamba block is parametrised by its scan kind (`"1d"`: causal conv + the 1D selective scan over a
sequence; `"2d"`: depthwise 3x3 conv on the lattice + the 2D selective scan), so MambaMIL and 2DMambaMIL share
every line but the mixer, which is `ops.mamba_inner` of that kind.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ops


class MILOutput:
    """logits (n_classes,): class logits, or hazard logits for survival; attention (N,): one weight per input row,
    softmax-normalised over tissue. `attention` may be given as a function, called on first access: a model that
    maps its weights back to rows (2DMambaMIL) then spends nothing on it in a training step, which never reads it.
    """

    def __init__(self, logits: torch.Tensor, attention: torch.Tensor | Callable[[], torch.Tensor]):
        self.logits = logits
        self._attention = attention

    @property
    def attention(self) -> torch.Tensor:
        if callable(self._attention):
            self._attention = self._attention()
        return self._attention


def survival_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Discrete-time survival head: hazards h = sigmoid(logits), S = cumprod(1 - h), risk = -sum(S)."""
    hazards = torch.sigmoid(logits)
    surv = torch.cumprod(1 - hazards, dim=-1)
    return hazards, surv, -surv.sum(dim=-1)


def embed(in_dim: int, d_model: int, dropout: float) -> nn.Sequential:
    """Frozen-encoder features to the model width: Linear + GELU + dropout."""
    return nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))


class GatedAttentionPool(nn.Module):
    """Ilse et al.'s gated attention: a = w^T (tanh(V h) * sigmoid(U h)); pooled = sum softmax(a) h.

    `bias` (L,) is added to the scores: -inf keeps a (padding) cell out of the softmax; without it every row
    takes part.
    """

    def __init__(self, d_model: int, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(d_model, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = h.to(ops.compute_dtype(h))  # once: under autocast each of the three products would cast a float32 h
        scores = self.w(self.v(h) * self.u(h)).squeeze(-1).float()
        if bias is not None:  # an addition: no kernel in the backward (a masked_fill costs two each way)
            scores = scores + bias
        weights = torch.softmax(scores, dim=0)
        return weights.to(h.dtype) @ h, weights


# ---------------------------------------------------------------------------------------------- lattice


class Packed:
    """Host tensors in one flat host buffer, each a view of it: one pin (`pin_memory`, which the trainer's data loader
    calls on what it hands over) and one copy move them all to a device (`to`), where each is a view again. The
    models' host work on a slide's grid (`grid_prep`) returns its tensors packed, so the training step spends one
    copy on them. (Each tensor's offset must suit its dtype: put the wider dtypes first.)"""

    def __init__(self, tensors: list[torch.Tensor], flat: torch.Tensor | None = None, pinned: bool = False):
        self.specs = [(t.dtype, t.shape) for t in tensors]
        if flat is None:
            arrays = [t.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint8) for t in tensors]
            flat = torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros(0, np.uint8))
        # Whether `flat` is pinned, as made by pin_memory: flat.is_pinned() asks the CUDA driver, ~0.1 ms of host
        # time in a training step that the host bounds (and a CUDA call in a loader worker)
        self.flat, self.pinned = flat, pinned
        self.tensors = self._cut(flat)

    def _cut(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The tensors as views of `flat`: one split, then each piece seen as its dtype (and shape, if not 1-D). Few
        ops: on the device this runs in every training step, whose host time bounds it."""
        sizes = [dtype.itemsize * math.prod(shape) for dtype, shape in self.specs]
        pieces = flat.split(sizes) if len(sizes) > 1 else [flat]
        return [piece.view(dtype) if len(shape) == 1 else piece.view(dtype).view(shape)
                for piece, (dtype, shape) in zip(pieces, self.specs)]

    def pin_memory(self) -> Packed:
        return self if self.pinned else Packed(self.tensors, self.flat.pin_memory(), pinned=True)

    def to(self, device: torch.device | str) -> list[torch.Tensor]:
        """The tensors on `device`: one copy of the buffer, which does not block when it is pinned."""
        device = torch.device(device)
        if device.type == "cpu":
            return list(self.tensors)
        return self._cut(self.flat.to(device, non_blocking=self.pinned))


@dataclass
class Lattice:
    """Where each input row sits on the (cropped, possibly coarsened) lattice of height x width cells."""

    cell: torch.Tensor  # (N,) int32, row-major cell index of each input row
    count: torch.Tensor  # (height * width,) int32, rows per cell
    background: torch.Tensor  # (height * width,) float32, 1 on the box's cells without rows (padding), else 0
    score_bias: torch.Tensor  # (height * width,) float32, -inf on cells without rows, else 0: attention over tissue
    inside: torch.Tensor  # (height * width,) float32, 1 in the tissue's box, 0 on the cells widening added
    height: int
    width: int
    stride: int  # lattice cells per side merged into one (1 = the slide's own lattice)
    merged: bool  # some cell holds several rows (their mean is taken)
    widened: bool = False  # cells were added on the right or at the bottom (`inside` is 0 there)
    packed: Packed | None = None  # on the host: the tensors above, packed (they are its views)

    @property
    def occupied(self) -> torch.Tensor:
        return self.count > 0

    def pin_memory(self) -> Lattice:
        """The lattice with its host tensors in pinned memory (its copies to the GPU then do not block)."""
        if self.packed is None:
            return self
        packed = self.packed.pin_memory()
        return self._with(packed.tensors, packed)

    def to(self, device: torch.device | str) -> Lattice:
        """The lattice with its tensors on `device` (from the host: one copy, which does not block when pinned)."""
        device = torch.device(device)
        if self.packed is None:  # built on a device
            return self._with([getattr(self, name).to(device) for name in LATTICE_TENSORS], None)
        if device.type == "cpu":
            return self
        return self._with(self.packed.to(device), None)

    def _with(self, tensors: list[torch.Tensor], packed: Packed | None) -> Lattice:
        """This lattice with `tensors` as its LATTICE_TENSORS, in that order."""
        return replace(self, **dict(zip(LATTICE_TENSORS, tensors)), packed=packed)


LATTICE_TENSORS = ("cell", "count", "background", "score_bias", "inside")


def build_lattice(grid: torch.Tensor, max_cells: int, device: torch.device | str | None = None) -> Lattice:
    """Crop the patch lattice to the tissue bounding box; coarsen it by an integer stride until it has at most
    `max_cells` cells (huge slides: bounded memory; rows sharing a coarse cell are averaged); widen it on the right
    and at the bottom to sides the 16-bit scan kernels read at full speed
    (`ops.aligned_width`: a multiple of 4 cells from 65 to 128, of 8 above) when that stays within `max_cells`, so
    that the Mamba blocks under bf16 autocast need no widening of their own (a copy each way; in fp32, rows of 33-64
    cells are still widened by `ops.mamba_inner`). The added cells are outside the box, not padding (`inside` is 0
    there): they hold zeros, which stay zero through every Mamba block (in_proj and out_proj have no bias and the
    gate silu(z) is 0 there), which the conv sees as its own zero padding and the row-first scan never carries
    back into the box; and they take no attention. So a model's output does not depend on whether the widened
    lattice fitted `max_cells` (tested).

    The lattice's sides are Python ints (the scan's shape): built from a grid on the host this costs no device
    synchronisation, and its tensors go to `device` (default: the grid's) in one copy that does not block.
    Built with numpy: torch's per-op overhead on these host tensors cost 0.7 ms per call (200 x 200 lattice). In
    training, the data loader's workers build it on the host (2DMambaMIL's `grid_prep`), off the training step.
    """
    if len(grid) == 0:
        raise ValueError("a slide without patches (an empty grid) has no lattice")
    # (2, N): rows then columns, each contiguous (numpy reduces a column of an (N, 2) array 30x slower)
    r, c = grid.detach().cpu().numpy().T.astype(np.int64)  # a device sync only for a device grid
    r, c = r - r.min(), c - c.min()
    height, width = int(r.max()) + 1, int(c.max()) + 1
    stride = 1
    while math.ceil(height / stride) * math.ceil(width / stride) > max_cells:
        stride += 1
    if stride > 1:
        r, c = r // stride, c // stride
    box = height, width = math.ceil(height / stride), math.ceil(width / stride)
    aligned = ops.aligned_width(height), ops.aligned_width(width)
    if aligned[0] * aligned[1] <= max_cells:  # else the blocks widen their rows
        height, width = aligned
    cell = (r * width + c).astype(np.int32)
    count = np.bincount(cell, minlength=height * width).astype(np.int32)
    inside = np.zeros((height, width), np.float32)
    inside[:box[0], :box[1]] = 1
    inside = inside.reshape(-1)
    empty = count == 0
    score_bias = np.zeros(len(count), np.float32)
    score_bias[empty] = -np.inf
    background = (empty & (inside > 0)).astype(np.float32)
    packed = Packed([torch.from_numpy(a) for a in (cell, count, background, score_bias, inside)])
    host = Lattice(*packed.tensors, height, width, stride, merged=bool(count.max() > 1),
                   widened=(height, width) != box, packed=packed)
    return host.to(grid.device if device is None else device)


def place_on_lattice(h: torch.Tensor, lattice: Lattice, pad: torch.Tensor) -> torch.Tensor:
    """(N, d) rows -> (height * width, d) cells in pad's dtype: the mean of the rows in each cell, `pad` (d,) where
    there are none. One autograd node (`_PlaceOnLattice`): the step is bound by the host issuing kernels."""
    return _PlaceOnLattice.apply(h, pad, lattice)


class _PlaceOnLattice(torch.autograd.Function):
    """Forward: the pad token on background cells (an outer product), the rows summed into their cells, divided by
    the count only where cells merge rows. Backward: each row takes its cell's gradient (/ count), the pad token the
    sum of the background cells' gradients as one matrix-vector product (PyTorch's column sum over the ~40 000 cells
    of a 200 x 200 lattice took 35 us of GPU time, on the step's critical path)."""

    @staticmethod
    def forward(ctx, h, pad, lattice: Lattice):
        cells = torch.outer(lattice.background.to(pad.dtype), pad).index_add_(0, lattice.cell, h.to(pad.dtype))
        if lattice.merged:
            cells /= lattice.count.clamp(min=1).to(pad.dtype).unsqueeze(1)
        ctx.lattice, ctx.h_dtype = lattice, h.dtype
        return cells

    @staticmethod
    def backward(ctx, grad):
        lattice = ctx.lattice
        rows = grad.index_select(0, lattice.cell)
        if lattice.merged:
            rows /= lattice.count[lattice.cell].to(grad.dtype).unsqueeze(1)
        grad_pad = lattice.background.to(grad.dtype) @ grad if ctx.needs_input_grad[1] else None
        return rows.to(ctx.h_dtype), grad_pad, None


def row_attention(cell_weights: torch.Tensor, lattice: Lattice) -> torch.Tensor:
    """Cell weights → one weight per input row (a cell's weight shared by its rows), renormalised to sum 1."""
    rows = cell_weights[lattice.cell] / lattice.count[lattice.cell]
    return rows / rows.sum().clamp(min=torch.finfo(rows.dtype).tiny)


def raster_order(grid: torch.Tensor, column_major: bool = False) -> torch.Tensor:
    """Permutation putting rows in raster order of the lattice (row by row, or column by column), on grid's
    device (on the host: no device synchronisation)."""
    g = grid.long() - grid.long().min(dim=0).values
    major, minor = (g[:, 1], g[:, 0]) if column_major else (g[:, 0], g[:, 1])
    return torch.argsort(major * (int(minor.max()) + 1) + minor)


def raster_orders(grid: torch.Tensor, directions: int) -> list[torch.Tensor]:
    """The scan orders of MambaMIL's `directions` (1: raster; 4: rows and columns, each both ways) on grid's device;
    on the host, the data loader's workers compute them in training (MambaMIL's `grid_prep`)."""
    rows = raster_order(grid)
    if directions == 1:  # the column order is only sorted for the cross-scan
        return [rows]
    cols = raster_order(grid, column_major=True)
    return [rows, rows.flip(0), cols, cols.flip(0)]


# ---------------------------------------------------------------------------------------------- mamba


CONVS = {"1d": nn.Conv1d, "2d": nn.Conv2d}  # the mixer's depthwise conv per scan kind (ops.mamba_inner's kinds)


class MambaBlock(nn.Module):
    """x + out_proj(scan(SiLU(conv(in_x)), z gating)) after RMSNorm; Mamba's parametrisation and init. The mixer
    runs as one autograd node, `ops.mamba_inner` (the CUDA conv and scan kernels on the GPU, the references
    elsewhere): a MIL training step is bound by the host issuing kernels."""

    def __init__(self, d_model: int, scan: str = "2d", d_state: int = 16, expand: int = 2, d_conv: int = 3,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        if scan not in CONVS:
            raise ValueError(f"scan must be one of {sorted(CONVS)}, not {scan!r}")
        self.scan = scan
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_state = d_state
        self.norm = nn.RMSNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        # depthwise; padding is the mixer's (zero padding k // 2 on the lattice, k - 1 on the left of a sequence)
        self.conv = CONVS[scan](d_inner, d_inner, d_conv, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # Mamba's init: S4D-real A = -(1..N), D = 1, dt log-uniform in [dt_min, dt_max] through softplus^-1.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.register_load_state_dict_pre_hook(_conv_one_level_up)

    def forward(self, x: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, L, d_model), or one sequence (L, d_model) (MIL's slide: no batch views, each an autograd node in a
        step bound by the host); `shape` = (height, width) of the lattice for the 2D scan (None: a sequence)."""
        if x.dim() == 2:
            return self._mix(x, shape)
        if x.shape[0] == 1:  # squeeze, not x[0]: a select's backward writes a whole zero tensor, then a copy
            return self._mix(x.squeeze(0), shape).unsqueeze(0)
        return torch.stack([self._mix(xb, shape) for xb in x])

    def _mix(self, x: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
        """x (L, d_model) -> x + mixer(RMSNorm(x)). The norm's weight goes to the mixer, which folds it into in_proj
        (`ops.mamba_inner`'s in_scale). No cast of the mixer's output to x's dtype: x + ... promotes."""
        height, width = shape if shape is not None else (1, x.shape[0])
        normed = F.rms_norm(x, self.norm.normalized_shape, None, self.norm.eps)
        return x + ops.mamba_inner(normed, self.in_proj.weight, self.conv.weight, self.conv.bias, self.x_proj.weight,
                                   self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D, self.out_proj.weight,
                                   kind=self.scan, height=height, width=width, in_scale=self.norm.weight)


def _conv_one_level_up(module, state_dict, prefix, *args) -> None:
    """Checkpoints (model.pt, resume.pt) written before the mixer became `ops.mamba_inner` held the block's conv one
    module deeper (`conv.conv.weight`): load them under today's names, so a run resumes across that change."""
    for name in ("weight", "bias"):
        old = f"{prefix}conv.conv.{name}"
        if old in state_dict:
            state_dict[f"{prefix}conv.{name}"] = state_dict.pop(old)
