// Kernel parameters and launchers of the scans, shared by the CUDA sources and the C++ binding.
#pragma once
#include <cuda_runtime.h>

namespace scan {

constexpr int kWarpsPerBlock = 16;  // states per block (one warp each); more states use more blocks
constexpr int kStrip = 8;           // rows per checkpoint strip (the forward keeps h of every kStrip-th row)

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
  float* hbuf;  // (batch, dim, dstate, strip - 1, width): recomputed h of a strip
  float* gbuf;  // (batch, dim, dstate, strip, n_tiles): horizontal carry at each tile start (without lane_carries)
  bool lane_carries;  // set by the launcher: phase A keeps every lane's incoming horizontal state in shared memory
};

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
