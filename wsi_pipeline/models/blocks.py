"""Blocks the MIL models share: input embedding, gated attention pooling, the lattice, the Mamba block.

The Mamba block is parametrised by its scan kind (`"1d"`: causal conv + `ops.selective_scan_1d` over a
sequence; `"2d"`: depthwise 3x3 conv on the lattice + `ops.selective_scan_2d`), so MambaMIL and
2DMambaMIL share every line but the mixer. The scans are looked up in `ops` at call time, so the CUDA
kernels that replace the references behind the same names are picked up without touching this file.
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
        scores = self.w(self.v(h) * self.u(h)).squeeze(-1).float()
        if bias is not None:  # an addition: no kernel in the backward (a masked_fill costs two each way)
            scores = scores + bias
        weights = torch.softmax(scores, dim=0)
        return weights.to(h.dtype) @ h, weights


# ---------------------------------------------------------------------------------------------- lattice


@dataclass
class Lattice:
    """Where each input row sits on the (cropped, possibly coarsened) lattice of height x width cells."""

    cell: torch.Tensor  # (N,) int32, row-major cell index of each input row
    count: torch.Tensor  # (height * width,) int32, rows per cell
    background: torch.Tensor  # (height * width,) float32, 1 on cells without rows (padding), else 0
    score_bias: torch.Tensor  # (height * width,) float32, -inf on background, else 0: attention over tissue only
    height: int
    width: int
    stride: int  # lattice cells per side merged into one (1 = the slide's own lattice)
    merged: bool  # some cell holds several rows (their mean is taken)

    @property
    def occupied(self) -> torch.Tensor:
        return self.count > 0

    def to(self, device: torch.device | str) -> Lattice:
        """The lattice with its tensors on `device` (from the host: one copy that does not block)."""
        cell, count, background, score_bias = to_device_together(
            [self.cell, self.count, self.background, self.score_bias], torch.device(device))
        return replace(self, cell=cell, count=count, background=background, score_bias=score_bias)


def to_device_together(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Tensors onto `device`; host tensors onto a CUDA device in one copy that does not block: numpy writes them one
    after the other into one pinned buffer (each offset must suit its dtype's alignment: put the wider dtypes first),
    copied non-blocking and viewed back on the device. torch's own `cat` and `pin_memory` of a lattice's ~0.6 MB
    took 0.5 ms per call on the H200 machine's host (their copies go through the intra-op thread pool). The pinned
    buffer comes from torch's caching host allocator, which hands it out again only once its copy has run."""
    if device.type != "cuda" or any(t.device.type != "cpu" for t in tensors):
        return [t.to(device) for t in tensors]
    arrays = [t.detach().contiguous().numpy().reshape(-1).view(np.uint8) for t in tensors]
    flat = torch.empty(sum(a.nbytes for a in arrays), dtype=torch.uint8, pin_memory=True)
    host, start = flat.numpy(), 0
    for a in arrays:
        host[start:start + a.nbytes] = a
        start += a.nbytes
    flat, out, start = flat.to(device, non_blocking=True), [], 0
    for t, a in zip(tensors, arrays):
        out.append(flat[start:start + a.nbytes].view(t.dtype).view(t.shape))
        start += a.nbytes
    return out


def build_lattice(grid: torch.Tensor, max_cells: int, device: torch.device | str | None = None) -> Lattice:
    """Crop the patch lattice to the tissue bounding box; coarsen it by an integer stride until it has at most
    `max_cells` cells (huge slides: bounded memory; rows sharing a coarse cell are averaged); widen it with
    background on the right and at the bottom to sides the scan kernels read at full speed (`ops.aligned_width`:
    a multiple of 4 cells from 65 to 128, of 8 above) when that stays within `max_cells`. The added cells are padding like any
    other background cell, and the Mamba blocks then need no widening of their own (a copy each way).

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
    height, width = math.ceil(height / stride), math.ceil(width / stride)
    aligned = ops.aligned_width(height), ops.aligned_width(width)
    if aligned[0] * aligned[1] <= max_cells:  # else the blocks widen their rows
        height, width = aligned
    cell = (r * width + c).astype(np.int32)
    count = np.bincount(cell, minlength=height * width).astype(np.int32)
    empty = count == 0
    score_bias = np.zeros(len(count), np.float32)
    score_bias[empty] = -np.inf
    host = Lattice(*map(torch.from_numpy, (cell, count, empty.astype(np.float32), score_bias)), height, width, stride,
                   merged=bool(count.max() > 1))
    return host.to(grid.device if device is None else device)


def place_on_lattice(h: torch.Tensor, lattice: Lattice, pad: torch.Tensor) -> torch.Tensor:
    """(N, d) rows → (height * width, d) cells: mean of the rows in each cell, `pad` (d,) where there are none.

    Written for few kernels (a training step is bound by their launches): a sum into zeros in place, the mean only
    where cells merge rows, and the pad token added where there are none (its gradient: one product, one sum).
    """
    cells = h.new_zeros(lattice.height * lattice.width, h.shape[1]).index_add_(0, lattice.cell, h)
    if lattice.merged:
        cells = cells / lattice.count.clamp(min=1).to(h.dtype).unsqueeze(1)
    return torch.addcmul(cells, lattice.background.to(h.dtype).unsqueeze(1), pad.to(h.dtype))


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


class CausalConv1d(nn.Module):
    """Mamba's depthwise causal conv over the sequence (kernel k, left padding k - 1), then SiLU."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, padding=kernel - 1, groups=channels)

    def forward(self, u: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:  # u ([B,] C, L), channels first
        return F.silu(self.conv(u)[..., : u.shape[-1]])


class LatticeConv2d(nn.Module):
    """Depthwise k x k conv on the lattice (zero padding at the border), then SiLU: the 2D analogue of Mamba's
    conv, so a cell sees its 2D neighbours rather than its raster neighbours. `ops.lattice_conv_silu`: one CUDA
    kernel each way on the GPU (PyTorch's depthwise conv and SiLU take five)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)

    def forward(self, u: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:  # u ([B,] C, L), channels first
        return ops.lattice_conv_silu(u, self.conv.weight, self.conv.bias, height=shape[0], width=shape[1])


def _scan_1d(u, delta, A, B, C, D, z, delta_bias, shape):
    return ops.selective_scan_1d(u, delta, A, B, C, D, z, delta_bias, True)


def _scan_2d(u, delta, A, B, C, D, z, delta_bias, shape):
    return ops.selective_scan_2d(u, delta, A, B, C, D, z, delta_bias, True, height=shape[0], width=shape[1])


SCAN_KINDS = {"1d": (CausalConv1d, _scan_1d), "2d": (LatticeConv2d, _scan_2d)}


class MambaBlock(nn.Module):
    """x + out_proj(scan(SiLU(conv(in_x)), z gating)) after RMSNorm; Mamba's parametrisation and init. The conv
    modules apply the SiLU (the lattice conv fuses it into its kernels)."""

    def __init__(self, d_model: int, scan: str = "2d", d_state: int = 16, expand: int = 2, d_conv: int = 3,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        if scan not in SCAN_KINDS:
            raise ValueError(f"scan must be one of {sorted(SCAN_KINDS)}, not {scan!r}")
        conv, self._scan = SCAN_KINDS[scan]
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_state = d_state
        self.norm = nn.RMSNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv = conv(d_inner, d_conv)
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

    def forward(self, x: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, L, d_model), or one sequence (L, d_model) (MIL's slide: no batch views, each an autograd node in a
        step bound by the host); `shape` = (height, width) of the lattice for the 2D scan (None: a sequence).

        Rows (or a sequence) whose width the scan kernels cannot read with wide loads (`ops.aligned_width`) run
        widened with zero cells on the right, then are sliced back: once here on the block's input rather than
        inside the scan on each of its five inputs. Exact: a zero cell stays zero through RMSNorm and the
        bias-free in_proj, so the conv sees the zeros of its own padding; the scan (and the 1D causal conv) never
        carry right-hand cells into the ones on their left; out_proj and the residual are per cell.
        """
        height, width = shape if shape is not None else (1, x.shape[-2])
        wide = ops.aligned_width(width)
        if wide == width:
            return self._mix(x, shape)
        lead, d = x.shape[:-2], x.shape[-1]
        x = F.pad(x.view(*lead, height, width, d), (0, 0, 0, wide - width)).view(*lead, height * wide, d)
        out = self._mix(x, None if shape is None else (height, wide))
        return out.view(*lead, height, wide, d)[..., :width, :].reshape(*lead, height * width, d)

    def _mix(self, x: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
        """The block proper, x + out_proj(scan(...)), one sequence at a time (MIL's batch is one slide)."""
        if x.dim() == 2:
            return self._mix_one(x, shape)
        if x.shape[0] == 1:  # squeeze, not x[0]: a select's backward writes a whole zero tensor, then a copy
            return self._mix_one(x.squeeze(0), shape).unsqueeze(0)
        return torch.stack([self._mix_one(xb, shape) for xb in x])

    def _mix_one(self, x: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
        """x (L, d_model) → x + out_proj(scan(...)).

        The mixer runs channels first, (channels, L), the layout of the conv and the scan. The projections are
        plain 2D products of the nn.Linear weights with (transposed) activations, W @ x^T: cuBLAS reads transposed
        operands as they are, so no activation is copied into another layout (a batched 3D matmul would copy its
        input or output: three copies per forward, more in the backward).
        """
        xz = self.in_proj.weight @ self.norm(x).t()  # (2 d_inner, L)
        u, z = xz.chunk(2, dim=0)
        u = self.conv(u, shape)  # SiLU(conv(u)), (d_inner, L): the conv and the scans take unbatched inputs
        dt, B, C = (self.x_proj.weight @ u).split([self.dt_rank, self.d_state, self.d_state], dim=0)
        delta = self.dt_proj.weight @ dt
        y = self._scan(u, delta, -torch.exp(self.A_log.float()), B, C, self.D.float(), z, self.dt_proj.bias.float(),
                       shape)
        # No cast of y to x's dtype: under autocast out_proj would cast it straight back; x + ... promotes.
        return x + F.linear(y.t(), self.out_proj.weight)
