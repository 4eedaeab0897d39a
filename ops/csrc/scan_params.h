// Kernel parameters and launchers of the scans, shared by the CUDA sources and the C++ binding.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>

namespace scan {

constexpr int kWarpsPerBlock = 16;  // states per block (one warp each); more states use more blocks
// rows per checkpoint strip (the forward keeps h of every kStrip-th row). v18: 16 rather than 8 (half the checkpoints
// and half the strips' phase switches in the backward, twice its strip scratch): kernel_ab, bf16 fwd+bwd,
// 1x256x200x200 1.586 -> 1.549 ms, 16x256x160x160 18.20 -> 17.68, 64x192x56x56 5.59 -> 5.53, 1x256x100x100 0.448 ->
// 0.443. The lanes' carries in shared memory (kStrip rows of 32 floats per warp and tile) then fit rows of one tile.
constexpr int kStrip = 16;

// Columns per lane: the smallest K in {1, 2, 4, 8} whose tile of 32 K columns covers the row; wider rows use
// several tiles (ops.aligned_width mirrors it in Python).
inline int cols_per_lane(int width) { return width <= 32 ? 1 : width <= 64 ? 2 : width <= 128 ? 4 : 8; }

struct Params {
  int batch, dim, dstate, groups, height, width;
  int strip, n_strips;  // rows per checkpoint strip, number of strips
  bool softplus;
  bool atomic_out;  // dstate > kWarpsPerBlock: several blocks per channel add their sums over states atomically
  const void *u, *delta, *B, *C;  // u, delta (batch, dim, L); B, C (batch, groups, dstate, L); all of type T
  const float *A, *delta_bias;    // A (dim, dstate); delta_bias (dim) or null
  const float* D;                 // (dim) or null
  const void* z;                  // (batch, dim, L) of T or null: out = (sum_n C h + D u) * silu(z)
  // forward
  void* out;     // (batch, dim, L) of T
  float* ypre;   // (batch, dim, L) sum_n C h + D u (kept for dz when z is given; the atomic sum when atomic_out)
  float* ckpt;   // (batch, dim, dstate, n_strips - 1, width) h at the last row of each strip but the last
  float* carry;  // (batch, dim, dstate, width) vertical carry when a row has several tiles
  // backward
  const void* dout;   // (batch, dim, L) of T: gradient of out
  void *du, *ddelta;  // (batch, dim, L): of T, or fp32 sums when atomic_out
  void* dz;           // (batch, dim, L) of T when z is given
  float *dA, *dB, *dC, *dD, *dbias;  // fp32 sums (dD, dbias null when D, delta_bias are)
  // strip scratch of the backward, a slot per persistent block (n_slots; each of the P x kWarpsPerBlock states of a
  // block; until v18, per (batch, dim, dstate), i.e. all the grid's states when height <= kStrip):
  float* hbuf;  // (n_slots, P, kWarpsPerBlock, strip - 1, width): recomputed h of a strip
  float* gbuf;  // (n_slots, P, kWarpsPerBlock, strip, n_tiles): horizontal carry at each tile start (unless
                //   lane_carries)
  bool lane_carries;  // set by the launcher: phase A keeps every lane's incoming horizontal state in shared memory
  int n_slots;        // the backward's persistent blocks (its grid), a slot of the strip scratch each (scratch_slots)
};

inline int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&value, attr, device);
  return value;
}

// How a scan runs (the same for every dtype's launchers, and reported to Python by the binding's scan_plan):
// P channels per warp, K columns per lane, and whether the kernels take their uniform-rows form (kU).
struct Plan {
  int P, K;
  bool uniform;
  int S;  // states per warp (v17)
};

// kU (v15) applies when every row is one tile of 32 K / P columns and a multiple of K wide, the rows suit the wide
// loads (16 bytes, or the lane's K values when fewer) of elem-byte inputs and of the fp32 scratch, and all blocks
// have kWarpsPerBlock warps: the per-step branches on scalar loads, tile carries and idle warps then compile out,
// and the drains' sums over warps unroll. Measured (kernel_ab, bf16, fwd+bwd): 1x256x200x200 2.25 -> 1.83 ms,
// 64x192x56x56 7.28 -> 5.85, 4x256x96x96 2.09 -> 1.66. K >= 4 only (the kernels' wide loads); the backward also
// needs the lanes' carries in shared memory, which one tile always leaves room for.
inline bool uniform_rows(const Params& p, int P, int K, int elem) {
  const int w = p.width;
  auto wide = [&](int bytes) { return w * bytes % std::min(16, K * bytes) == 0; };
  return K >= 4 && P * w <= 32 * K && w % K == 0 && wide(elem) && wide((int)sizeof(float)) &&
         p.dstate % kWarpsPerBlock == 0;  // (w % K == 0 at K >= 4 also keeps the dB/dC rows 16-byte aligned)
}

// Channels per warp (v6, v7, v14): P = 4 when a row fits in 8 lanes of K <= 8 columns (width <= 64), P = 2 when it
// fits in 16 (width <= 128), as long as the P channels stay inside one batch and one B/C group and the grid keeps
// enough blocks: the forward (two blocks per SM) at least 512, the backward (one block per SM) at least 15/16 of
// the SMs, so that at batch 1 (256 channels: 128 blocks at P = 2 on 132 SMs) only the backward packs. (Until v14,
// P = 4 only for K <= 2, P = 2 for K <= 4, and the backward as the forward. Measured with kernel_ab, bf16 fwd+bwd:
// packing at K = 8, 64x192x56x56 9.13 -> 7.93 ms, 4x256x100x100 2.90 -> 2.70; the backward alone at 128 blocks,
// 1x256x120x120 0.96 -> 0.80, 1x256x64x64 0.31 -> 0.25, 1x256x100x100 0.78 -> 0.72; at 64 blocks it was slower.
// Rows of 17-32 columns: 4 per warp (K = 4) made the forward faster, 64x192x24x24 0.57 -> 0.43 ms, and the backward
// slower than 2 per warp (K = 2), 1.52 -> 1.59, so the backward keeps 2 there.)
// v15: one channel per warp when that gives uniform rows and packing does not (a row of 100 columns is not a
// multiple of K = 8 packed, and is of K = 4 alone): 1x256x100x100 bf16 0.69 -> 0.55 ms, 16x256x100x100 9.79 -> 8.29.
inline Plan plan_of(const Params& p, bool fwd, int elem) {
  static const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const long channels = (long)p.batch * p.dim;
  const int per_group = p.dim / p.groups;
  auto enough = [&](int P) { return fwd ? channels / P >= 512 : channels / P * 16 >= (long)sms * 15; };
  const bool four = fwd || p.width <= 16 || p.width > 32;
  int P = 1;
  if (p.width <= 64 && four && per_group % 4 == 0 && enough(4)) P = 4;
  else if (p.width <= 128 && per_group % 2 == 0 && enough(2)) P = 2;
  Plan plan{P, cols_per_lane(P * p.width), false, 1};
  plan.uniform = uniform_rows(p, P, plan.K, elem);
  if (P > 1 && !plan.uniform && uniform_rows(p, 1, cols_per_lane(p.width), elem))
    plan = Plan{1, cols_per_lane(p.width), true, 1};
  // v17: the backward's uniform rows of K = 4 with one channel per warp take two states per warp (8 warps of up to
  // 128 registers: two blocks per SM). kernel_ab, bf16 backward: 1x256x100x100 0.448 -> 0.345 ms, 16x256x100x100
  // 6.67 -> 4.76, 2x256x124x124 1.12 -> 0.83; fp32 1x256x100x100 0.479 -> 0.349. Slower elsewhere: at K = 8 (one
  // block of 8 warps at ~230 registers) 1x256x200x200 1.33 -> 1.66 ms, 64x192x56x56 (K = 4, P = 2) 4.69 -> 5.90,
  // and in the forward (100x100 0.116 -> 0.127).
  if (plan.uniform && !fwd && plan.K == 4 && plan.P == 1) plan.S = 2;
  return plan;
}

// The backward's persistent blocks (v19), each with its slot of the strip scratch: kBlocksPerSM per SM, the most that
// are resident at once (its kernels use 64 or more registers per thread at 512 threads, or over 100 at 256: the
// register file holds two such blocks; where it holds one, the second half takes its turn after the first), and never
// more than the blocks of work (of P channels each: the backward's plan_of).
constexpr int kBlocksPerSM = 2;
inline int scratch_slots(const Params& p, int P) {
  static const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const long channel_blocks = (long)p.batch * p.dim / P;
  const long blocks = channel_blocks * ((p.dstate + kWarpsPerBlock - 1) / kWarpsPerBlock);
  return (int)std::min<long>((long)kBlocksPerSM * sms, blocks);
}

// One launcher pair per input dtype, each compiled in its own translation unit (they build in parallel).
void scan2d_fwd_f32(const Params& p, cudaStream_t stream);
void scan2d_fwd_f16(const Params& p, cudaStream_t stream);
void scan2d_fwd_bf16(const Params& p, cudaStream_t stream);
void scan2d_bwd_f32(const Params& p, cudaStream_t stream);
void scan2d_bwd_f16(const Params& p, cudaStream_t stream);
void scan2d_bwd_bf16(const Params& p, cudaStream_t stream);
// The forward's elementwise end when atomic_out: out and ypre from the complete sums in ypre.
void scan2d_finish_f32(const Params& p, cudaStream_t stream);
void scan2d_finish_f16(const Params& p, cudaStream_t stream);
void scan2d_finish_bf16(const Params& p, cudaStream_t stream);

}  // namespace scan
