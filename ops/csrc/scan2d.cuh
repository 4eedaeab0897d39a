// The 2D selective scan (and the 1D scan as its one-row case): forward and backward kernels.
//
// Layout of the work. One thread block per (channel c = b*dim + d, group of up to 16 states); one warp per
// state n. A warp walks the grid row by row; a row is cut into tiles of 32*K columns, lane l owning K
// consecutive columns of the tile, so the horizontal scan of a row is a sequential scan over K values per lane
// plus a 5-step shuffle scan across the warp (chained over tiles when the row is wider than one tile).
// The vertical scan is elementwise per column: its carry lives in registers (one tile per row) or in a
// per-(c, n) scratch row (wider rows). y = sum_n C h needs a sum over the warps of the block: each warp
// stores its share in its own slice of shared memory (no atomics: float atomics on shared memory are
// compare-and-swap loops, slow under contention); every kWindow steps the block sums the slices and writes
// the sums out (coalesced). The per-position inputs shared by the 16 warps (delta after bias and softplus,
// delta*u, and dy in the backward) are computed once per block into shared memory for the same windows.
// dB and dC (sums over channels, i.e. over blocks) use 16-byte global atomics.
// Small grids (v6, v7): when a row fits in a half or a quarter of a warp, each warp packs P = 2 or 4 channels
// (segments of 32 / P lanes, same state, adjacent channels of one B/C group), with segmented shuffle scans;
// the segments' dB, dC are summed by shuffles before the atomics. A block is then (P channels, 16 states).
// The forward keeps h only at strip boundaries (every `strip` rows, the checkpoints); the backward walks the
// strips bottom-up, recomputes the strip's states from its checkpoint, then runs the adjoint recurrences.
// The elementwise ends are fused (v9): the forward's drain writes out = (sum_n C h + D u) * silu(z) in the input
// dtype; the backward stages dy = dout * silu(z) and its drain writes du (+ D dy), d delta (times softplus'), dz,
// and sums dD and d delta_bias per thread, added once per block at the end. Phase A of the backward keeps each
// lane's incoming horizontal state in shared memory when it fits (v10), so phase B needs no second scan for it.
// The staging computes every per-position factor the drains need (v12): the gate silu(z) in the forward; dy,
// softplus' in the backward, which also writes dz and sums dy u for dD there. Staged slots are double-buffered
// (two windows), so a drain reads its window's factors while the next window is staged.
// Uniform rows (v15, kU): when every row is one tile, a multiple of K wide and suited to the wide loads, and every
// block has all its warps, both kernels take a form without the per-step branches for the other cases.
// Whole-sector atomics (v16): there, at K = 8 and one channel per warp, lane pairs trade halves of their dB and dC
// values before the 16-byte atomics, so that each atomic instruction of a warp adds whole 32-byte sectors.
// v17: the backward's uniform rows of K = 4 with one channel per warp run S = 2 states per warp (8 warps, two blocks
// per SM): the warp's two states share the staged loads and sum their du, d delta shares before the shared-memory
// partials, and their warp scans run in step. The staging asks L2 for the next window's inputs; at K = 8 with one
// channel per warp, phase A keeps h of the row above in registers.
// v18: checkpoint strips of 16 rows; one-tile rows' warp scans without carries; drains of 2 columns per thread;
// predicated dB/dC atomics; dC added in phase A, where h is recomputed, rather than in phase B.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "convert.cuh"
#include "scan_params.h"

namespace scan {

constexpr int kWindow = 4;  // steps (row tiles) staged and summed in shared memory between two barriers
constexpr int kStaged = 2 * kWindow;  // staged slots: two windows, so that one drains while the next is staged
constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

using wsiops::from_float;
using wsiops::sigmoid;
using wsiops::softplus;
using wsiops::to_float;

// Step s of a walk over rows of nt tiles: (row, tile), without a division when a row is one tile.
__device__ __forceinline__ int2 split_step(int s, int nt) {
  if (nt == 1) return make_int2(s, 0);
  const int i = s / nt;
  return make_int2(i, s - i * nt);
}

// 4 floats of padding per 32 columns: a lane's K <= 8 values stay contiguous and 16-byte aligned, and neither
// 16-byte accesses by lanes (K values each) nor 4-byte accesses by consecutive threads conflict on banks.
__device__ __forceinline__ int padded(int col) { return col + ((col >> 5) << 2); }

// Per-warp view of one (channel, state) problem. With S states per warp (v17) it is the view of the warp's first
// state n; state n + q is q rows further in B and C (and dB, dC), at A[d, n + q] and cn + q in the scratch.
template <typename T>
struct Channel {
  int c, b, d, n, W, H, ntiles, seg;  // seg: the lane's segment (channel bx * P + seg)
  bool active;
  bool states0;  // the block takes states 0-15 (by == 0): it adds the terms that do not depend on the states
  long L;
  const T *u, *delta, *B, *C;
  float a2, bias;  // A * log2(e) (dA = exp2(delta * a2)), delta_bias[d]
  long cn;         // (c, n) index into per-state scratch

  // the block (bx, by): channels bx * P.., states by * kWarpsPerBlock..; by default the launched block's
  __device__ Channel(const Params& p, int tile, int P, int S = 1) : Channel(p, tile, P, S, blockIdx.x, blockIdx.y) {}
  __device__ Channel(const Params& p, int tile, int P, int S, int bx, int by) {
    seg = (threadIdx.x & 31) / (32 / P);
    c = bx * P + seg;
    states0 = by == 0;
    b = c / p.dim;
    d = c - b * p.dim;
    n = by * kWarpsPerBlock + (threadIdx.x >> 5) * S;
    active = n < p.dstate;
    if (!active) n = 0;
    W = p.width;
    H = p.height;
    L = (long)H * W;
    ntiles = (W + tile - 1) / tile;
    const int g = d / (p.dim / p.groups);
    u = (const T*)p.u + (long)c * L;
    delta = (const T*)p.delta + (long)c * L;
    const long bc = ((long)(b * p.groups + g) * p.dstate + n) * L;
    B = (const T*)p.B + bc;
    C = (const T*)p.C + bc;
    a2 = p.A[d * p.dstate + n] * kLog2e;
    bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    cn = (long)c * p.dstate + n;
  }
};

// Shared memory of a block: NSTAGE staged per-position arrays, each for the 2 kWindow steps of two windows, and
// NPART per-warp partial sums (NW warps) for the kWindow steps of one, all rows of 32*K columns (padded against bank
// conflicts). Both are indexed by the step s: its slots are s mod 2 kWindow and s mod kWindow.
template <int K, int NSTAGE, int NPART, int NW = kWarpsPerBlock>
struct Smem {
  static constexpr int kRow = 36 * K;
  float* base;
  __device__ float* stage_ptr(int a, int s, int col) const { return &stage(a, s, col); }
  __device__ float& stage(int a, int s, int col) const {
    return base[(a * kStaged + (s & (kStaged - 1))) * kRow + padded(col)];
  }
  __device__ float& part(int a, int s, int warp, int col) const {
    return base[(NSTAGE * kStaged + (a * kWindow + (s & (kWindow - 1))) * NW + warp) * kRow + padded(col)];
  }
  // The sums over the warps of N = 1 or 4 consecutive columns from col (a multiple of N: 16-byte aligned,
  // unpadded).
  // kAll: the block has all NW warps (then the loop unrolls, with constant offsets).
  template <int N, bool kAll = false>
  __device__ void sum(int a, int s, int col, int nwarps, float (&v)[N]) const {
#pragma unroll
    for (int q = 0; q < N; ++q) v[q] = 0.f;
    if constexpr (kAll) {
#pragma unroll
      for (int w = 0; w < NW; ++w) add<N>(a, s, w, col, v);
    } else {
      for (int w = 0; w < nwarps; ++w) add<N>(a, s, w, col, v);
    }
  }
  template <int N>
  __device__ __forceinline__ void add(int a, int s, int w, int col, float (&v)[N]) const {
    if constexpr (N == 4) {
      const float4 x = *reinterpret_cast<const float4*>(&part(a, s, w, col));
      v[0] += x.x, v[1] += x.y, v[2] += x.z, v[3] += x.w;
    } else if constexpr (N == 2) {
      const float2 x = *reinterpret_cast<const float2*>(&part(a, s, w, col));
      v[0] += x.x, v[1] += x.y;
    } else {
      v[0] += part(a, s, w, col);
    }
  }
  __host__ __device__ static constexpr size_t bytes() {
    return sizeof(float) * kRow * (NSTAGE * kStaged + NPART * kWindow * NW);
  }
};

template <int P>
__device__ __forceinline__ void add_to(float (&acc)[P], int seg, float v) {
#pragma unroll
  for (int q = 0; q < P; ++q)
    if (q == seg) acc[q] += v;
}

// What a window stages per position, besides delta (after bias and softplus, array 0) and u (array 1):
//   kForward: 2 the gate silu(z) (1 without z);
//   kRecompute (the backward's phase A): 2 dy = dout * silu(z) (v18: phase A adds dC = sum dy h);
//   kAdjoint (phase B): 2 dy = dout * silu(z), 3 softplus'(delta + bias) (1 without softplus); it also writes dz
//   (which needs no scan) and adds dy u to the thread's dD shares (acc).
// So the drains read their per-position factors from shared memory rather than from global memory.
enum class Staged { kForward, kRecompute, kAdjoint };
template <Staged kKind>
constexpr int n_staged() { return kKind == Staged::kAdjoint ? 4 : 3; }

// Asks L2 for the inputs the staging of the window from s0 will read (v17): issued by the staging of the window
// before, so that those loads find L2 rather than DRAM a window's steps later. One prefetch per 32-byte sector.
// Measured with kernel_ab, bf16 backward (with v17's h row in registers below):
// 1x256x200x200 1.334 -> 1.257 ms, 16x256x160x160 15.41 -> 14.46, 64x192x56x56 4.74 -> 4.50; not below K = 4,
// where it slowed the forward at 14x14 by 7%.
template <typename T, int K, int P, Staged kKind, class Where>
__device__ __forceinline__ void prefetch_window(const Params& p, const Channel<T>& ch, int s0, Where where) {
  constexpr int TILE = 32 * K, SEGT = TILE / P, C = 32 / sizeof(T);  // C columns of T per sector
  for (int idx = threadIdx.x * C; idx < kWindow * TILE; idx += blockDim.x * C) {
    const int slot = idx / TILE, col = idx - slot * TILE, seg = col / SEGT;
    int i, t;
    where(s0 + slot, i, t);
    const int j = t * SEGT + col - seg * SEGT;
    if (i < 0 || j >= ch.W) continue;
    const long l = (long)i * ch.W + j + (seg - ch.seg) * ch.L, m = (long)ch.c * ch.L + l;
    auto l2 = [](const void* a) { asm volatile("prefetch.global.L2 [%0];" ::"l"(a)); };
    l2(ch.delta + l);
    l2(ch.u + l);
    if (p.z) l2(static_cast<const T*>(p.z) + m);
    if (kKind != Staged::kForward) l2(static_cast<const T*>(p.dout) + m);
    if (kKind == Staged::kAdjoint) {
      if (p.z)
        for (int o = 0; o < C; o += 8) l2(p.ypre + m + o);
    }
  }
}

// Stages the kWindow steps from s0; where(s, i, t) gives step s's row and tile (i < 0: past the end). Called by
// the whole block. With P channels per warp, shared column col belongs to segment col / (TILE / P) (the channel
// ch's first + segment; the P channels are consecutive within one batch).
template <typename T, int K, int P, Staged kKind, class S, class Where>
__device__ __forceinline__ void stage_window(const Params& p, const Channel<T>& ch, const S& sm, int s0, Where where,
                                             float (&acc)[P]) {
  constexpr int TILE = 32 * K, SEGT = TILE / P;
  const T* __restrict__ dout = static_cast<const T*>(p.dout);
  const T* __restrict__ z = static_cast<const T*>(p.z);
  if constexpr (K >= 4) prefetch_window<T, K, P, kKind>(p, ch, s0 + kWindow, where);
  for (int idx = threadIdx.x; idx < kWindow * TILE; idx += blockDim.x) {
    const int slot = idx / TILE, col = idx - slot * TILE, seg = col / SEGT, ds = seg - ch.seg, s = s0 + slot;
    int i, t;
    where(s, i, t);
    const int j = t * SEGT + col - seg * SEGT;
    float dt = 0.f, uu = 0.f, x2 = kKind == Staged::kForward ? 1.f : 0.f, x3 = 1.f;
    if (i >= 0 && j < ch.W) {
      const long l = (long)i * ch.W + j + ds * ch.L;  // ch's pointers moved to the column's channel
      const long m = (long)ch.c * ch.L + l;           // the element in the (batch, dim, L) tensors
      const float raw = to_float(__ldg(ch.delta + l)) +
                        (P == 1 ? ch.bias : p.delta_bias ? p.delta_bias[ch.d + ds] : 0.f);
      dt = p.softplus ? softplus(raw) : raw;
      uu = to_float(__ldg(ch.u + l));
      if constexpr (kKind == Staged::kForward) {
        if (p.z) {
          const float zz = to_float(__ldg(z + m));
          x2 = zz * sigmoid(zz);
        }
      } else {
        const float g = to_float(__ldg(dout + m));
        x2 = g;
        if (p.z) {
          const float zz = to_float(__ldg(z + m)), sg = sigmoid(zz);
          x2 = g * zz * sg;
          if (kKind == Staged::kAdjoint && ch.states0)
            static_cast<T*>(p.dz)[m] = from_float<T>(g * __ldg(p.ypre + m) * sg * (1.f + zz * (1.f - sg)));
        }
        if constexpr (kKind == Staged::kAdjoint) {
          if (p.softplus) x3 = sigmoid(raw);
          if (p.D && ch.states0) add_to<P>(acc, seg, x2 * uu);
        }
      }
    }
    sm.stage(0, s, col) = dt;  // zero past the row's end: dA = 1 and dBu = 0 there (identity); dy zero too
    sm.stage(1, s, col) = uu;
    sm.stage(2, s, col) = x2;
    if constexpr (kKind == Staged::kAdjoint) sm.stage(3, s, col) = x3;
  }
}

// Runs nsteps steps in windows of kWindow: drain(previous window) and stage(this window) by the whole block,
// a barrier, step(s) for each step s of the window by every warp, a barrier.
template <class Stage, class Step, class Drain>
__device__ __forceinline__ void windows(int nsteps, Stage stage, Step step, Drain drain) {
  for (int s0 = 0;; s0 += kWindow) {
    if (s0 > 0) drain(s0 - kWindow, min(kWindow, nsteps - (s0 - kWindow)));
    if (s0 < nsteps) stage(s0);
    __syncthreads();
    if (s0 >= nsteps) break;
    const int count = min(kWindow, nsteps - s0);
    for (int s = s0; s < s0 + count; ++s) step(s);
    __syncthreads();
  }
}

// The drain of a window: for each of the count steps from s0 (at (row, tile) = where(step)) and each group of N
// columns of its tile that starts inside the row, emit(s, col, seg, l, q_end): shared column col, segment
// seg, l the index of the group's first column within the segment's channel (row-major), q_end <= N the
// group's columns inside the row. Called by the whole block; N = 4 columns per thread for 16-byte reads of the
// partials where registers allow.
template <int K, int P, int N, class Where, class Emit>
__device__ __forceinline__ void drain_window(int s0, int count, int W, Where where, Emit emit) {
  constexpr int TILE = 32 * K, SEGT = TILE / P, GROUPS = TILE / N;
  for (int idx = threadIdx.x; idx < count * GROUPS; idx += blockDim.x) {
    const int slot = idx / GROUPS, col = (idx - slot * GROUPS) * N, seg = col / SEGT;
    const int2 it = where(s0 + slot);
    const int j = it.y * SEGT + col - seg * SEGT;
    if (j < W) emit(s0 + slot, col, seg, (long)it.x * W + j, min(N, W - j));
  }
}

// Inclusive warp scans of the affine maps x -> a x + b (left to right), S independent ones in step (v17: the S
// states of a warp, so that their shuffles' latencies overlap); sets in[q] to the lane's incoming value given the
// value carry[q] entering the tile, and carry[q] to the value leaving the tile.
// Segmented by SEG lanes (32 / P): each segment scans on its own.
// kFresh (rows of one tile, the kU kernels): every scan starts from zero and its outgoing value is not wanted, so
// in[q] is the exclusive scan's b alone and carry is left as it is: the last level's shuffle of a and the shuffle
// of a for in drop (two of twelve shuffles, on the step's critical path), with in[q] unchanged to the bit.
template <int SEG, int S, bool kFresh = false>
__device__ __forceinline__ void warp_scans_in(float (&a)[S], float (&b)[S], float (&carry)[S], float (&in)[S]) {
  const int lane = threadIdx.x & (SEG - 1);
#pragma unroll
  for (int off = 1; off < SEG; off <<= 1) {
#pragma unroll
    for (int q = 0; q < S; ++q) {
      const bool need_a = !kFresh || 2 * off < SEG;
      const float pb = __shfl_up_sync(kFull, b[q], off, SEG);
      const float pa = need_a ? __shfl_up_sync(kFull, a[q], off, SEG) : 1.f;
      if (lane >= off) {
        b[q] = a[q] * pb + b[q];
        a[q] = a[q] * pa;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < S; ++q) {
    const float eb = __shfl_up_sync(kFull, b[q], 1, SEG);
    if constexpr (kFresh) {
      in[q] = lane == 0 ? 0.f : eb;
    } else {
      float ea = __shfl_up_sync(kFull, a[q], 1, SEG), e = eb;
      if (lane == 0) ea = 1.f, e = 0.f;
      in[q] = ea * carry[q] + e;
      carry[q] = __shfl_sync(kFull, a[q], SEG - 1, SEG) * carry[q] + __shfl_sync(kFull, b[q], SEG - 1, SEG);
    }
  }
}
template <int SEG = 32, bool kFresh = false>
__device__ __forceinline__ float warp_scan_in(float a, float b, float& carry) {
  float as[1] = {a}, bs[1] = {b}, cs[1] = {carry}, in[1];
  warp_scans_in<SEG, 1, kFresh>(as, bs, cs, in);
  carry = cs[0];
  return in[0];
}

// The mirror image (right to left): x_lane = b + a * x_{lane+1}; in[q] is the lane's incoming value from the right.
template <int SEG, int S, bool kFresh = false>
__device__ __forceinline__ void warp_scans_rev_in(float (&a)[S], float (&b)[S], float (&carry)[S], float (&in)[S]) {
  const int lane = threadIdx.x & (SEG - 1);
#pragma unroll
  for (int off = 1; off < SEG; off <<= 1) {
#pragma unroll
    for (int q = 0; q < S; ++q) {
      const bool need_a = !kFresh || 2 * off < SEG;
      const float nb = __shfl_down_sync(kFull, b[q], off, SEG);
      const float na = need_a ? __shfl_down_sync(kFull, a[q], off, SEG) : 1.f;
      if (lane + off < SEG) {
        b[q] = b[q] + a[q] * nb;
        a[q] = a[q] * na;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < S; ++q) {
    const float xb = __shfl_down_sync(kFull, b[q], 1, SEG);
    if constexpr (kFresh) {
      in[q] = lane == SEG - 1 ? 0.f : xb;
    } else {
      float xa = __shfl_down_sync(kFull, a[q], 1, SEG), x = xb;
      if (lane == SEG - 1) xa = 1.f, x = 0.f;
      in[q] = x + xa * carry[q];
      carry[q] = __shfl_sync(kFull, b[q], 0, SEG) + __shfl_sync(kFull, a[q], 0, SEG) * carry[q];
    }
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The 16-byte atomic add (red.global.add.v4.f32, as atomicAdd(float4*) compiles) under a predicate rather than in a
// branch, whose BSSY / BRA / BSYNC the step paid for each of its four atomics (v18). 16-byte aligned `at`.
__device__ __forceinline__ void red_add_v4(float* at, float a, float b, float c, float d, bool on) {
  asm volatile(
      "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %5, 0;\n\t@p red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n\t}" ::"l"(at),
      "f"(a), "f"(b), "f"(c), "f"(d), "r"((int)on));
}
#endif

// Adds vals to out[l0 .. l0+K) (K consecutive columns, the first `valid` of them inside the row), with 16-byte
// atomics where the row layout keeps them aligned (vec4), else one float at a time. `halves`: K = 8 values
// rearranged by pair_halves, whose offsets it is (then vec4).
template <int K>
__device__ __forceinline__ void atomic_add_row(float* out, long l0, int valid, const float (&vals)[K], bool vec4,
                                               int2 halves = make_int2(0, 4)) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (K >= 4) {
    if (vec4) {
#pragma unroll
      for (int q = 0; q < K / 4; ++q) {
        const int off = K == 8 ? (q == 0 ? halves.x : halves.y) : 4 * q;
        red_add_v4(out + l0 + off, vals[4 * q], vals[4 * q + 1], vals[4 * q + 2], vals[4 * q + 3], off < valid);
      }
      return;
    }
  }
#endif
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (k < valid) atomicAdd(out + l0 + k, vals[k]);
}

// The 16-byte atomics of a K = 8 lane: with its 8 columns as two 16-byte halves, each atomic instruction of a warp
// would add half-sectors at a 32-byte stride (two L2 transactions per 32-byte sector, one per instruction). Lane pairs
// (2m, 2m+1) trade halves first (one shuffle per value) so that the lane's first half goes to the pair's first 8
// columns (even lane: its own first half; odd lane: the even lane's second half) and its second half to the pair's
// last 8: then each instruction fills whole sectors. Returns the columns' offsets from the lane's own first column.
// Called by every lane of the warp.
__device__ __forceinline__ int2 pair_halves(float (&v)[8]) {
  const bool odd = threadIdx.x & 1;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float lo = __shfl_xor_sync(kFull, v[q], 1), hi = __shfl_xor_sync(kFull, v[4 + q], 1);
    if (odd) v[q] = hi;
    else v[4 + q] = lo;
  }
  return odd ? make_int2(-4, 4) : make_int2(0, 8);
}

// Adds a lane's K values of row i of a sum over channels (dB, dC) to out at l0 (`valid` of them inside the row):
// the P channels of a warp share B and C, so their segments are summed by shuffles first and the first segment's
// lanes add (when `add`). v16: whole-sector atomics at K = 8 (pair_halves; 200x200 bf16 backward 1.48 -> 1.33 ms);
// not in the general kernels (20 more bytes of spills, 132x132 bf16 4.6% slower) nor with packed channels, where only
// the first segment's lanes add (64x192x56x56 bf16 2.3% slower).
template <int K, int P, bool kU>
__device__ __forceinline__ void add_over_channels(float* out, long l0, int valid, float (&v)[K], bool vec4,
                                                  bool add) {
#pragma unroll
  for (int off = 32 / P; off < 32; off <<= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_down_sync(kFull, v[k], off);
  }
  int2 halves = make_int2(0, 4);
  if constexpr (K == 8 && kU && P == 1) halves = pair_halves(v);
  if (add) atomic_add_row<K>(out, l0, valid, v, vec4, halves);
}

// K consecutive floats of shared memory (16-byte aligned when K >= 4) into / from registers.
template <int K>
__device__ __forceinline__ void lds(const float* src, float (&v)[K]) {
  if constexpr (K >= 4) {
#pragma unroll
    for (int q = 0; q < K / 4; ++q) {
      const float4 x = reinterpret_cast<const float4*>(src)[q];
      v[4 * q] = x.x, v[4 * q + 1] = x.y, v[4 * q + 2] = x.z, v[4 * q + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = src[k];
  }
}
template <int K>
__device__ __forceinline__ void sts(float* dst, const float (&v)[K]) {
  if constexpr (K >= 4) {
#pragma unroll
    for (int q = 0; q < K / 4; ++q)
      reinterpret_cast<float4*>(dst)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) dst[k] = v[k];
  }
}

// row[j0 .. j0+K) of global memory as floats, zero past `valid` (= the row's width - j0). One wide load when
// `vec` (the caller checked the row's alignment) and the K values are all inside the row; lanes wholly past the
// row's end (valid <= 0) take the same wide load from the row's start and zero it, so a row whose width is a
// multiple of K loads without divergence (v9; before, those lanes ran the scalar path beside the others).
// kReadOnly: through the non-coherent cache, only for tensors no thread of the kernel writes.
// kWhole (the kU kernels): the caller guarantees vec and that valid is >= K or <= 0 (rows a multiple of K wide): no
// scalar path, and lanes past the row's end keep the row start's values instead of zeros (8 selects per load
// fewer). Those kernels need no zeros there: the staged delta, u and dy are zero past the row's end, and every term
// such a lane adds to a sum or a scan has one of them as a factor (its B, C and h row are finite values of the row's
// first columns).
template <typename T, int K, bool kReadOnly = true, bool kWhole = false>
__device__ __forceinline__ void ldg(const T* row, int j0, int valid, bool vec, float (&v)[K]) {
  constexpr int kBytes = K * sizeof(T);
  static_assert(!kWhole || kBytes % 16 == 0 || kBytes == 8, "kWhole needs a wide load");
  if constexpr (kBytes % 16 == 0 || kBytes == 8) {
    if (kWhole || (vec && (valid >= K || valid <= 0))) {
      const T* src = row + (valid > 0 ? j0 : 0);
      const bool keep = valid > 0;
      if constexpr (kBytes % 16 == 0) {
        uint4 raw[kBytes / 16];
#pragma unroll
        for (int q = 0; q < kBytes / 16; ++q)
          raw[q] = kReadOnly ? __ldg(reinterpret_cast<const uint4*>(src) + q) : reinterpret_cast<const uint4*>(src)[q];
        const T* t = reinterpret_cast<const T*>(raw);
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = kWhole || keep ? to_float(t[k]) : 0.f;
      } else {
        const uint2 raw = kReadOnly ? __ldg(reinterpret_cast<const uint2*>(src)) : *reinterpret_cast<const uint2*>(src);
        const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = kWhole || keep ? to_float(t[k]) : 0.f;
      }
      return;
    }
  }
  if constexpr (!kWhole) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = k < valid ? to_float(row[j0 + k]) : 0.f;
  }
}

// K floats to global memory, the first `valid` of them; 16-byte stores when `vec` and all K are inside the row.
template <int K, bool kWhole = false>
__device__ __forceinline__ void stg(float* dst, int valid, bool vec, const float (&v)[K]) {
  if constexpr (K >= 4) {
    if (kWhole || (vec && valid >= K)) {
      if (kWhole && valid <= 0) return;
#pragma unroll
      for (int q = 0; q < K / 4; ++q)
        reinterpret_cast<float4*>(dst)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
      return;
    }
  }
  if constexpr (!kWhole || K < 4) {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < valid) dst[k] = v[k];
  }
}

// K values of a row of T read one step ahead into registers (one 16-byte load), converted when used: the load's
// latency then passes behind a step's work (v13). Lanes the wide load does not suit (a partial last group) read at
// use. On for 8 columns of 16-bit values (the backward at rows over 128 columns: 1.94 -> 1.80 ms at 200x200 bf16)
// with one channel per warp: the packed backward (P = 2, 4) spilled 92-140 bytes with it and ran 7-10% slower
// (64x192x56x56 bf16: 6.53 ms with, 5.91 without). Where it is off, get() is the plain load at the same place.
// The uniform-rows forward reads its B and C with it too (v20).
template <typename T, int K, int P, bool kWhole = false>
struct Ahead {
  static constexpr bool kOn = K == 8 && sizeof(T) == 2 && P == 1;
  uint4 raw;
  bool held;
  __device__ __forceinline__ void fetch(const T* row, int j0, int valid, bool vec) {
    held = kOn && (kWhole || (vec && (valid >= K || valid <= 0)));
    if (held) raw = __ldg(reinterpret_cast<const uint4*>(row + (valid > 0 ? j0 : 0)));
  }
  __device__ __forceinline__ void get(const T* row, int j0, int valid, bool vec, float (&v)[K]) const {
    if (kOn && held) {
      const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = kWhole || valid > 0 ? to_float(t[k]) : 0.f;
    } else {
      ldg<T, K, true, kWhole>(row, j0, valid, vec, v);
    }
  }
};

// Whether K consecutive values of a row may be read with one wide load: rows of `width` values of T keep that
// alignment (the tensors themselves are 16-byte aligned, checked by the binding).
template <typename T, int K>
__host__ __device__ constexpr int wide_bytes() { return K * sizeof(T) >= 16 ? 16 : K * sizeof(T); }
template <typename T, int K>
__device__ __forceinline__ bool wide_ok(int width) { return (width * (int)sizeof(T)) % wide_bytes<T, K>() == 0; }

// dA = exp(delta A) and dBu = delta u B for the lane's K columns of one state, given the staged delta and u and B
// in bu (zero past the row's end), and the lane's composed map x -> a x + b over them, returned as (a, b).
template <int K>
__device__ __forceinline__ float2 discretise(const float (&dt)[K], const float (&uu)[K], float a2, float (&dA)[K],
                                             float (&bu)[K]) {
  float a = 1.f, b = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    dA[k] = exp2f(dt[k] * a2);
    bu[k] *= dt[k] * uu[k];
    b = dA[k] * b + bu[k];
    a *= dA[k];
  }
  return make_float2(a, b);
}

// The forward's elementwise end at element l of the (batch, dim, L) tensors, channel d, given sum_n C h, u and
// the gate silu(z) (1 without z).
template <typename T>
__device__ __forceinline__ void finish_forward(const Params& p, int d, long l, float ysum, float u, float gate) {
  const float v = p.D ? ysum + p.D[d] * u : ysum;
  if (p.z) p.ypre[l] = v;
  static_cast<T*>(p.out)[l] = from_float<T>(v * gate);
}

// With atomic_out the blocks of a channel have added their sums into ypre; this writes out (and ypre).
template <typename T>
__global__ void scan2d_finish_kernel(Params p) {
  const long L = (long)p.height * p.width, total = (long)p.batch * p.dim * L;
  for (long l = blockIdx.x * (long)blockDim.x + threadIdx.x; l < total; l += (long)gridDim.x * blockDim.x) {
    const float zz = p.z ? to_float(static_cast<const T*>(p.z)[l]) : 0.f;
    finish_forward<T>(p, (int)((l / L) % p.dim), l, p.ypre[l], to_float(static_cast<const T*>(p.u)[l]),
                      p.z ? zz * sigmoid(zz) : 1.f);
  }
}

template <typename T, int K, int P, bool kU>  // kU: as the backward's (below)
__global__ void __launch_bounds__(32 * kWarpsPerBlock, 2) scan2d_fwd_kernel(Params p) {
  constexpr int TILE = 32 * K, SEG = 32 / P, SEGT = TILE / P;  // shared row width; lanes, columns per channel
  extern __shared__ float smem[];
  const Smem<K, n_staged<Staged::kForward>(), 1> sm{smem};
  const Channel<T> ch(p, SEGT, P);
  const int lane = threadIdx.x & 31, slane = lane & (SEG - 1), warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int W = ch.W, H = ch.H, nt = kU ? 1 : ch.ntiles, steps = H * nt;
  const long c0 = (long)blockIdx.x * P;  // the block's first channel
  const int d0 = (int)(c0 % p.dim);
  const bool active = kU || ch.active;
  float* carry = p.carry + ch.cn * W;
  float* ckpt = p.ckpt + ch.cn * (p.n_strips - 1) * W;
  float hv[K];
#pragma unroll
  for (int k = 0; k < K; ++k) hv[k] = 0.f;
  float gc = 0.f;  // horizontal carry between the tiles of a row
  float no_sums[P];  // the forward's staging sums nothing (the backward's sums dy u for dD)
  auto stage = [&](int s0) {
    stage_window<T, K, P, Staged::kForward>(p, ch, sm, s0, [&](int s, int& i, int& t) {
      const int2 it = split_step(s, nt);
      i = s < steps ? it.x : -1;
      t = it.y;
    }, no_sums);
  };
  auto drain = [&](int s0, int count) {
    // 2 columns per thread (v18; 4 since v10): twice the threads share a window's sums, each half the adds in
    // sequence (kernel_ab, bf16 forward: 16x256x160x160 3.72 -> 3.61 ms, 64x192x56x56 1.055 -> 1.034; 1 was slower)
    constexpr int N = 2;
    drain_window<K, P, N>(s0, count, W, [&](int s) { return split_step(s, nt); },
                          [&](int s, int col, int seg, long l, int q_end) {
      float v[N];
      sm.template sum<N, kU>(0, s, col, nwarps, v);
      l += (c0 + seg) * ch.L;
#pragma unroll
      for (int q = 0; q < N; ++q) {
        if (q >= q_end) break;
        if (p.atomic_out) atomicAdd(p.ypre + l + q, v[q]);
        else finish_forward<T>(p, d0 + seg, l + q, v[q], sm.stage(1, s, col + q), sm.stage(2, s, col + q));
      }
    });
  };
  const bool vec = kU || wide_ok<T, K>(W), vecf = kU || wide_ok<float, K>(W);
  // v20: B and C of the next step read ahead in the uniform-rows kernels (Ahead: 8 columns of 16-bit values, one
  // channel per warp). kernel_ab, bf16 forward: 1x256x200x200 0.339 -> 0.332 ms, 16x256x160x160 3.624 -> 3.522
  // (64 registers, no spills); not in the general kernels, where the 1D scan's rows of several tiles slowed
  // (1x256x1x40000 0.388 -> 0.409).
  constexpr bool kAhead = kU && Ahead<T, K, P, kU>::kOn;
  Ahead<T, K, P, kU> aheadB, aheadC;
  auto fetch = [&](int s) {
    const int2 it = split_step(s, nt);
    const int j0 = it.y * SEGT + slane * K, valid = active ? W - j0 : 0;
    aheadB.fetch(ch.B + it.x * W, j0, valid, vec);
    aheadC.fetch(ch.C + it.x * W, j0, valid, vec);
  };
  if constexpr (kAhead) fetch(0);
  auto step = [&](int s) {
    const int2 it = split_step(s, nt);
    const int i = it.x, t = it.y, j0 = t * SEGT + slane * K;
    const int valid = active ? W - j0 : 0;
    if (t == 0) gc = 0.f;
    float dt[K], uu[K], dA[K], bu[K], cc[K];
    if constexpr (kAhead) {
      aheadC.get(ch.C + i * W, j0, valid, vec, cc);
      aheadB.get(ch.B + i * W, j0, valid, vec, bu);
      if (s + 1 < steps) fetch(s + 1);
    } else {
      ldg<T, K, true, kU>(ch.C + i * W, j0, valid, vec, cc);
    }
    lds<K>(sm.stage_ptr(0, s, lane * K), dt);
    lds<K>(sm.stage_ptr(1, s, lane * K), uu);
    if constexpr (!kAhead) ldg<T, K, true, kU>(ch.B + i * W, j0, valid, vec, bu);
    const float2 ab = discretise<K>(dt, uu, ch.a2, dA, bu);
    float g = warp_scan_in<SEG, kU>(ab.x, ab.y, gc);
    if (nt > 1) {
      if (i > 0) ldg<float, K, false>(carry, j0, valid, vecf, hv);
      else for (int k = 0; k < K; ++k) hv[k] = 0.f;
    }
    float yv[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      g = dA[k] * g + bu[k];
      hv[k] = dA[k] * hv[k] + g;
      yv[k] = cc[k] * hv[k];
    }
    sts<K>(&sm.part(0, s, warp, lane * K), yv);
    if (i + 1 < H) {
      if ((i + 1) % kStrip == 0) stg<K, kU>(ckpt + ((i + 1) / kStrip - 1) * W + j0, valid, vecf, hv);
      if (nt > 1) stg<K>(carry + j0, valid, vecf, hv);
    }
  };
  windows(steps, stage, step, drain);
}

// The backward's elementwise end at element l, channel d (segment seg of the block), given the sums over the
// block's states of d(sum_n C h)/du and /d(delta after softplus), and the staged dy and softplus': writes du
// (+ D dy) and d delta (times softplus'), adds d delta to the segment's d delta_bias sum. The block of states
// 0-15 (states0) adds the terms that do not depend on the states (dz and dD are the stage's).
template <typename T, int P>
__device__ __forceinline__ void finish_backward(const Params& p, bool states0, int d, long l, float du, float dd,
                                                float dy, float dsoftplus, int seg, float (&accB)[P]) {
  if (p.D && states0) du += p.D[d] * dy;
  dd *= dsoftplus;
  add_to<P>(accB, seg, dd);
  if (p.atomic_out) {
    atomicAdd(static_cast<float*>(p.du) + l, du);
    atomicAdd(static_cast<float*>(p.ddelta) + l, dd);
  } else {
    static_cast<T*>(p.du)[l] = from_float<T>(du);
    static_cast<T*>(p.ddelta)[l] = from_float<T>(dd);
  }
}

// Backward. Adjoints: lh = dL/dh (vertical recurrence, bottom-up), lg = dL/dg (horizontal, right to left):
//   lh[i,j] = dy[i,j] C[i,j] + dA[i+1,j] lh[i+1,j];   lg[i,j] = lh[i,j] + dA[i,j+1] lg[i,j+1]
//   d dA[i,j] = lg[i,j] g[i,j-1] + lh[i,j] h[i-1,j];  d dBu[i,j] = lg[i,j].
// kU (uniform rows, scan_params.h's `uniform_rows`): every row is one tile and a multiple of K wide, the wide loads
// suit it, all kWarpsPerBlock warps are active and lane_carries is set, so the per-step branches on these (scalar
// loads, tile carries in global memory, idle warps) compile out of the step.
// One block's work: channels bx * P.., states by * kWarpsPerBlock.., with its strip scratch in slot `slot`.
template <typename T, int K, int P, bool kU, int S>
__device__ __forceinline__ void scan2d_bwd_block(const Params& p, int bx, int by, int slot) {
  constexpr int TILE = 32 * K, SEG = 32 / P, SEGT = TILE / P;  // shared row width; lanes, columns per channel
  constexpr int NW = kWarpsPerBlock / S;
  extern __shared__ float smem[];
  using Shared = Smem<K, n_staged<Staged::kAdjoint>(), 2, NW>;  // partials: du, ddelta
  const Shared sm{smem};
  const Channel<T> ch(p, SEGT, P, S, bx, by);
  const int lane = threadIdx.x & 31, slane = lane & (SEG - 1), warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int W = ch.W, H = ch.H, nt = kU ? 1 : ch.ntiles;
  const long L = ch.L;
  const bool vec4 = kU || W % 4 == 0;  // then every 4 consecutive columns of a lane are 16-byte aligned in dB, dC
  const bool vec = kU || wide_ok<T, K>(W), vecf = kU || wide_ok<float, K>(W);
  const bool active = kU || ch.active, lane_carries = kU || p.lane_carries;
  const long c0 = (long)bx * P;  // the block's first channel
  const int d0 = (int)(c0 % p.dim);
  float accD[P], accB[P];  // this thread's shares of dD and d delta_bias, per segment
#pragma unroll
  for (int q = 0; q < P; ++q) accD[q] = accB[q] = 0.f;
  // per-state scratch, of the warp's first state (state q: q rows of each further); the strip scratch in the
  // block's slot
  const int sn = (slot * P + ch.seg) * kWarpsPerBlock + warp * S;
  const long ckpt_rows = (long)(p.n_strips - 1) * W, hbuf_rows = (long)(p.strip - 1) * W, gbuf_rows = p.strip * nt;
  const float* ckpt = p.ckpt + ch.cn * ckpt_rows;
  float* hbuf = p.hbuf + sn * hbuf_rows;
  float* gbuf = p.gbuf + sn * gbuf_rows;
  // v10: with lane_carries, g[i, j0 - 1] (the horizontal state entering each lane's columns) of every step of the
  // strip, behind the window buffers: written by phase A, read by the same lane in phase B (no barrier needed)
  constexpr int kGlane = kStrip * 32;  // per state and tile
  float* glane = smem + Shared::bytes() / sizeof(float) + warp * S * kGlane * nt + lane;
  float* lcarry = p.carry + ch.cn * W;
  float* dB = p.dB + (ch.B - (const T*)p.B);
  float* dC = p.dC + (ch.C - (const T*)p.C);
  float a2[S], Aq[S], dA_sum[S];  // A[d, n + q] * log2(e), A[d, n + q]
  float lv[S][K];  // dA[i+1,j] lh[i+1,j]: the vertical adjoint entering row i
#pragma unroll
  for (int q = 0; q < S; ++q) {
    a2[q] = q == 0 ? ch.a2 : p.A[ch.d * p.dstate + ch.n + q] * kLog2e;
    Aq[q] = a2[q] / kLog2e;
    dA_sum[q] = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) lv[q][k] = 0.f;
  }
  for (int strip = p.n_strips - 1; strip >= 0; --strip) {
    const int r0 = strip * p.strip, r1 = min(H, r0 + p.strip) - 1;
    auto h_above = [&](int q, int i, int j0, int valid, float (&hp)[K]) {  // h[i-1, j0..j0+K) for r0 <= i <= r1
      if constexpr (kU) {  // one load from the strip's scratch or the checkpoint (a select, not a branch)
        const float* src = i > r0 ? hbuf + q * hbuf_rows + (i - r0 - 1) * W : ckpt + q * ckpt_rows + (strip - 1) * W;
        if (i > 0) ldg<float, K, false, kU>(src, j0, valid, vecf, hp);
        else for (int k = 0; k < K; ++k) hp[k] = 0.f;
      } else {
        if (i > r0) ldg<float, K, false>(hbuf + q * hbuf_rows + (i - r0 - 1) * W, j0, valid, vecf, hp);
        else if (strip > 0) ldg<float, K>(ckpt + q * ckpt_rows + (strip - 1) * W, j0, valid, vecf, hp);
        else for (int k = 0; k < K; ++k) hp[k] = 0.f;
      }
    };
    // Phase A: recompute h over rows r0..r1 from the checkpoint (into hbuf, but for the last row) and the horizontal
    // carries: every lane's incoming g (lane_carries) or every tile's; and add dC = sum over channels of dy h (v18:
    // moved here from phase B, which carries the more instructions and the other atomics).
    {
      float gc[S];
#pragma unroll
      for (int q = 0; q < S; ++q) gc[q] = 0.f;
      const int nsteps = (r1 - r0 + 1) * nt;  // the last row for its carries and its dC
      auto where = [&](int s) {
        const int2 it = split_step(s, nt);
        return make_int2(r0 + it.x, it.y);
      };
      auto stage = [&](int s0) {
        stage_window<T, K, P, Staged::kRecompute>(p, ch, sm, s0, [&](int s, int& i, int& t) {
          const int2 it = where(s);
          i = s < nsteps ? it.x : -1;
          t = it.y;
        }, accD);
      };
      Ahead<T, K, P, kU> aheadB[S];  // B of the next step
      // v17: at K = 8 with one channel per warp, h of a row stays in registers for the next row instead of being
      // read back from hbuf (kernel_ab, bf16 backward, with the prefetch above: 1x256x200x200 1.316 -> 1.257 ms,
      // 16x256x160x160 15.47 -> 14.46; at K = 4 with P = 2 slower, 64x192x56x56 4.50 -> 4.89)
      constexpr bool kHrow = kU && K == 8 && P == 1;
      float hrow[S][K];  // h of the row above, then of this row
      auto fetch = [&](int s) {
        const int2 it = where(s);
        const int j0 = it.y * SEGT + slane * K;
#pragma unroll
        for (int q = 0; q < S; ++q) aheadB[q].fetch(ch.B + q * L + it.x * W, j0, active ? W - j0 : 0, vec);
      };
      fetch(0);
      auto step = [&](int s) {
        const int2 it = where(s);
        const int i = it.x, t = it.y, j0 = t * SEGT + slane * K, valid = active ? W - j0 : 0;
        float dt[K], uu[K], dA[S][K], bu[S][K], g[S];
        lds<K>(sm.stage_ptr(0, s, lane * K), dt);
        lds<K>(sm.stage_ptr(1, s, lane * K), uu);
#pragma unroll
        for (int q = 0; q < S; ++q) {
          if (t == 0) gc[q] = 0.f;
          if (!lane_carries && slane == 0 && active) gbuf[q * gbuf_rows + (i - r0) * nt + t] = gc[q];
          aheadB[q].get(ch.B + q * L + i * W, j0, valid, vec, bu[q]);
        }
        if (s + 1 < nsteps) fetch(s + 1);
        float ma[S], mb[S];  // the lane's composed maps
#pragma unroll
        for (int q = 0; q < S; ++q) {
          const float2 ab = discretise<K>(dt, uu, a2[q], dA[q], bu[q]);
          ma[q] = ab.x, mb[q] = ab.y;
        }
        warp_scans_in<SEG, S, kU>(ma, mb, gc, g);
#pragma unroll
        for (int q = 0; q < S; ++q)
          if (lane_carries) glane[q * kGlane * nt + ((i - r0) * nt + t) * 32] = g[q];
        float dyk[K];
        lds<K>(sm.stage_ptr(2, s, lane * K), dyk);
#pragma unroll
        for (int q = 0; q < S; ++q) {
          // h of the row above: in kHrow kernels the previous step's, whose lane had the same columns
          if (!kHrow || i == r0) h_above(q, i, j0, valid, hrow[q]);
          float vC[K];  // dC = sum over channels of dy h (v18: here rather than in phase B)
#pragma unroll
          for (int k = 0; k < K; ++k) {
            g[q] = dA[q][k] * g[q] + bu[q][k];
            hrow[q][k] = dA[q][k] * hrow[q][k] + g[q];
            vC[k] = dyk[k] * hrow[q][k];
          }
          if (i < r1) stg<K, kU>(hbuf + q * hbuf_rows + (i - r0) * W + j0, valid, vecf, hrow[q]);
          add_over_channels<K, P, kU>(dC + q * L, (long)i * W + j0, W - j0, vC, vec4, active && ch.seg == 0);
        }
      };
      windows(nsteps, stage, step, [](int, int) {});
    }
    // Phase B: the adjoint sweep over the strip, bottom-up, right to left.
    {
      float lgc[S], dA_right[S];  // lg and dA at the first column of the tile to the right
      const int nsteps = (r1 - r0 + 1) * nt;
      auto where = [&](int s) {
        const int2 it = split_step(s, nt);
        return make_int2(r1 - it.x, nt - 1 - it.y);
      };
      auto stage = [&](int s0) {
        stage_window<T, K, P, Staged::kAdjoint>(p, ch, sm, s0, [&](int s, int& i, int& t) {
          const int2 it = where(s);
          i = s < nsteps ? it.x : -1;
          t = it.y;
        }, accD);
      };
      auto drain = [&](int s0, int count) {
        // 2 columns per thread at K >= 4 (v18: one round of the block's threads for a window of 256-column rows
        // instead of two), one at K <= 2, where more spill; 4 measured no faster
        constexpr int N = K >= 4 ? 2 : 1;
        drain_window<K, P, N>(s0, count, W, where, [&](int s, int col, int seg, long l, int q_end) {
          float du[N], dd[N];
          sm.template sum<N, kU>(0, s, col, nwarps, du);
          sm.template sum<N, kU>(1, s, col, nwarps, dd);
          l += (c0 + seg) * ch.L;
#pragma unroll
          for (int q = 0; q < N; ++q) {
            if (q >= q_end) break;
            finish_backward<T, P>(p, ch.states0, d0 + seg, l + q, du[q], dd[q], sm.stage(2, s, col + q),
                                  sm.stage(3, s, col + q), seg, accB);
          }
        });
      };
      Ahead<T, K, P, kU> aheadB[S], aheadC[S];  // B, C of the next step
      auto fetch = [&](int s) {
        const int2 it = where(s);
        const int j0 = it.y * SEGT + slane * K, valid = active ? W - j0 : 0;
#pragma unroll
        for (int q = 0; q < S; ++q) {
          aheadB[q].fetch(ch.B + q * L + it.x * W, j0, valid, vec);
          aheadC[q].fetch(ch.C + q * L + it.x * W, j0, valid, vec);
        }
      };
      fetch(0);
      auto step = [&](int s) {
        const int2 it = where(s);
        const int i = it.x, t = it.y, j0 = t * SEGT + slane * K;
        const int valid = active ? W - j0 : 0;
        float dt[K], uu[K], dyk[K], bb[S][K], lh[S][K], hp[S][K], pdu[K], pdd[K];
#pragma unroll
        for (int q = 0; q < S; ++q) {
          if (t == nt - 1) lgc[q] = 0.f, dA_right[q] = 0.f;
          if (nt > 1) {
            if (i + 1 < H) ldg<float, K, false>(lcarry + q * W, j0, valid, vecf, lv[q]);
            else for (int k = 0; k < K; ++k) lv[q][k] = 0.f;
          }
        }
        lds<K>(sm.stage_ptr(0, s, lane * K), dt);
        lds<K>(sm.stage_ptr(1, s, lane * K), uu);
        lds<K>(sm.stage_ptr(2, s, lane * K), dyk);
#pragma unroll
        for (int q = 0; q < S; ++q) {
          aheadB[q].get(ch.B + q * L + i * W, j0, valid, vec, bb[q]);
          aheadC[q].get(ch.C + q * L + i * W, j0, valid, vec, lh[q]);
        }
        if (s + 1 < nsteps) fetch(s + 1);
#pragma unroll
        for (int q = 0; q < S; ++q) h_above(q, i, j0, valid, hp[q]);
        // lg: right-to-left scan of lh with multipliers m_j = dA[i, j+1], the S states' warp scans in step.
        float dA[S][K], m_last[S], ra[S], rb[S], lg_in[S];
#pragma unroll
        for (int q = 0; q < S; ++q) {
          // (dy is staged as zero past the row's end and C, lv load as zero there: lh is zero there too)
#pragma unroll
          for (int k = 0; k < K; ++k) {
            dA[q][k] = exp2f(dt[k] * a2[q]);
            lh[q][k] = dyk[k] * lh[q][k] + lv[q][k];
          }
          const float dA_next_lane = __shfl_down_sync(kFull, dA[q][0], 1, SEG);
          m_last[q] = slane == SEG - 1 ? dA_right[q] : dA_next_lane;
          ra[q] = 1.f, rb[q] = 0.f;
#pragma unroll
          for (int k = K - 1; k >= 0; --k) {
            const float m = k == K - 1 ? m_last[q] : dA[q][k + 1];
            rb[q] = lh[q][k] + m * rb[q];
            ra[q] *= m;
          }
        }
        warp_scans_rev_in<SEG, S, kU>(ra, rb, lgc, lg_in);
#pragma unroll
        for (int q = 0; q < S; ++q) {
          dA_right[q] = __shfl_sync(kFull, dA[q][0], 0, SEG);
          float lg[K];
#pragma unroll
          for (int k = K - 1; k >= 0; --k) {
            const float m = k == K - 1 ? m_last[q] : dA[q][k + 1];
            lg_in[q] = lh[q][k] + m * lg_in[q];
            lg[k] = lg_in[q];
          }
          // g[i, j0 - 1] from phase A (or the horizontal scan again); then all the gradients of this position.
          float gp;
          if (lane_carries) {
            gp = glane[q * kGlane * nt + ((i - r0) * nt + t) * 32];
          } else {
            float a = 1.f, b = 0.f;
#pragma unroll
            for (int k = 0; k < K; ++k) {
              b = dA[q][k] * b + dt[k] * uu[k] * bb[q][k];
              a *= dA[q][k];
            }
            float gcarry = (nt > 1 && t > 0) ? gbuf[q * gbuf_rows + (i - r0) * nt + t] : 0.f;
            gp = warp_scan_in<SEG>(a, b, gcarry);
          }
          float vB[K];
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const float g = dA[q][k] * gp + dt[k] * uu[k] * bb[q][k];
            const float ddA = lg[k] * gp + lh[q][k] * hp[q][k];  // lg, lh, dy are zero past the row's end
            gp = g;
            const float dd = ddA * dA[q][k] * Aq[q] + lg[k] * bb[q][k] * uu[k], du = lg[k] * bb[q][k] * dt[k];
            pdd[k] = q == 0 ? dd : pdd[k] + dd;  // (the sums over the warp's states)
            pdu[k] = q == 0 ? du : pdu[k] + du;
            vB[k] = lg[k] * dt[k] * uu[k];
            dA_sum[q] += ddA * dA[q][k] * dt[k];
            lv[q][k] = dA[q][k] * lh[q][k];
          }
          if (q == S - 1) {  // (before the atomics, which need vB in registers)
            sts<K>(&sm.part(0, s, warp, lane * K), pdu);
            sts<K>(&sm.part(1, s, warp, lane * K), pdd);
          }
          if (nt > 1 && i > 0) stg<K>(lcarry + q * W + j0, valid, vecf, lv[q]);
          add_over_channels<K, P, kU>(dB + q * L, (long)i * W + j0, W - j0, vB, vec4, active && ch.seg == 0);
        }
      };
      windows(nsteps, stage, step, drain);
    }
  }
#pragma unroll
  for (int q = 0; q < S; ++q) {
    float v = dA_sum[q];
#pragma unroll
    for (int off = SEG / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
    if (slane == 0 && active) atomicAdd(p.dA + ch.d * p.dstate + ch.n + q, v);
  }
#pragma unroll
  for (int q = 0; q < P; ++q) {
    float a = accD[q], b = accB[q];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_xor_sync(kFull, a, off);
      b += __shfl_xor_sync(kFull, b, off);
    }
    if (lane == 0) {
      if (p.dD && ch.states0) atomicAdd(p.dD + d0 + q, a);
      if (p.dbias) atomicAdd(p.dbias + d0 + q, b);
    }
  }
}

// v19: the backward's blocks are persistent: p.n_slots of them (scratch_slots: two per SM at most), each taking the
// blocks of work blockIdx.x, + gridDim.x, ... in turn with its own slot of the strip scratch, so that the scratch is
// of those blocks, not of every (channel, state) of the grid (on grids of at most kStrip rows, all the states). Peak
// memory of forward+backward, bf16: 64x384x16x14x14 352 -> 69 MiB, 64x192x16x56x56 1235 -> 649. The loop costs
// the backward ~1% (kernel_ab, bf16: 1x256x16x200x200 1.181 -> 1.191 ms, 64x384x16x14x14 1.016 -> 1.030,
// 64x192x16x56x56 4.336 -> 4.350, 1x256x16x100x100 0.321 -> 0.331): its loop-invariant values, hoisted, take more
// registers. (Not kept: slots taken and freed with atomics by blocks of the whole grid, 14x14 1.019 -> 1.129 ms.)
template <typename T, int K, int P, bool kU, int S>
__global__ void __launch_bounds__(32 * kWarpsPerBlock / S, K <= 2 ? 2 : 1) scan2d_bwd_kernel(Params p) {
  const int nx = p.batch * p.dim / P, blocks = nx * ((p.dstate + kWarpsPerBlock - 1) / kWarpsPerBlock);
  for (int b = blockIdx.x; b < blocks; b += gridDim.x) {
    scan2d_bwd_block<T, K, P, kU, S>(p, b % nx, b / nx, blockIdx.x);
    __syncthreads();  // (the next block's staging reuses the shared memory)
  }
}

// A block per P channels and kWarpsPerBlock states; or, persistent (the backward), p.n_slots blocks in one dimension.
template <typename Kernel>
void launch(Kernel kernel, const Params& p, size_t smem, cudaStream_t stream, int P, int S, bool persistent = false) {
  const int state_blocks = (p.dstate + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const dim3 grid = persistent ? dim3(p.n_slots) : dim3(p.batch * p.dim / P, state_blocks);
  const int threads = 32 * (p.dstate < kWarpsPerBlock ? p.dstate : kWarpsPerBlock) / S;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  kernel<<<grid, threads, smem, stream>>>(p);
}

inline int max_smem_per_block() {
  static const int bytes = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  return bytes;
}

// The kernel of a plan with S states per warp: kU (uniform rows) only for K >= 4, where the wide loads it assumes
// exist, and S = 2 only there.
template <typename T, bool kFwd, int K, int P, bool kU, int S>
void launch_s(const Params& p, cudaStream_t stream) {
  constexpr int NW = kWarpsPerBlock / S;
  if constexpr (kFwd) {
    static_assert(S == 1, "the forward takes one state per warp");
    launch(scan2d_fwd_kernel<T, K, P, kU>, p, Smem<K, n_staged<Staged::kForward>(), 1>::bytes(), stream, P, S);
  } else {
    // the lanes' horizontal carries of a strip in shared memory when they fit (at K = 8: rows of up to 2 tiles)
    Params q = p;
    const int nt = (p.width + 32 * K / P - 1) / (32 * K / P);
    const size_t carries = sizeof(float) * kWarpsPerBlock * kStrip * nt * 32;
    const size_t base = Smem<K, n_staged<Staged::kAdjoint>(), 2, NW>::bytes();
    q.lane_carries = base + carries <= (size_t)max_smem_per_block();
    if (kU && !q.lane_carries) return launch_s<T, kFwd, K, P, false, 1>(p, stream);
    launch(scan2d_bwd_kernel<T, K, P, kU, S>, q, base + (q.lane_carries ? carries : 0), stream, P, S, true);
  }
}

template <typename T, bool kFwd, int K, int P>
void launch_one(const Plan& plan, const Params& p, cudaStream_t stream) {
  if constexpr (K >= 4) {
    if constexpr (!kFwd && K == 4 && P == 1) {
      if (plan.uniform && plan.S == 2) return launch_s<T, kFwd, K, P, true, 2>(p, stream);
    }
    if (plan.uniform) return launch_s<T, kFwd, K, P, true, 1>(p, stream);
  }
  launch_s<T, kFwd, K, P, false, 1>(p, stream);
}

template <typename T, bool kFwd>
void dispatch(const Params& p, cudaStream_t stream) {
  const Plan plan = plan_of(p, kFwd, sizeof(T));
  auto with_k = [&](auto packed) {
    constexpr int P = decltype(packed)::value;
    switch (plan.K) {
      case 1: return launch_one<T, kFwd, 1, P>(plan, p, stream);
      case 2: return launch_one<T, kFwd, 2, P>(plan, p, stream);
      case 4: return launch_one<T, kFwd, 4, P>(plan, p, stream);
      default: return launch_one<T, kFwd, 8, P>(plan, p, stream);
    }
  };
  switch (plan.P) {
    case 4: return with_k(std::integral_constant<int, 4>{});  // 8 lanes of K columns per channel
    case 2: return with_k(std::integral_constant<int, 2>{});  // 16 lanes
    default: return with_k(std::integral_constant<int, 1>{});
  }
}

template <typename T>
void finish(const Params& p, cudaStream_t stream) {
  const long total = (long)p.batch * p.dim * p.height * p.width;
  const int threads = 256, blocks = (int)std::min<long>((total + threads - 1) / threads, 8192);
  scan2d_finish_kernel<T><<<blocks, threads, 0, stream>>>(p);
}

#define SCAN_DEFINE_LAUNCHERS(T, SUFFIX)                                                                   \
  void scan2d_fwd_##SUFFIX(const Params& p, cudaStream_t stream) { dispatch<T, true>(p, stream); }       \
  void scan2d_bwd_##SUFFIX(const Params& p, cudaStream_t stream) { dispatch<T, false>(p, stream); }      \
  void scan2d_finish_##SUFFIX(const Params& p, cudaStream_t stream) { finish<T>(p, stream); }

}  // namespace scan
