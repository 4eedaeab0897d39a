// Depthwise k x k conv on a lattice with zero padding k / 2, then SiLU: out = silu(b + sum_o w[o] x[p + o]).
//
// One block per (channel, tile of kTH x kTW cells); the tile's inputs with their halo sit in shared memory in
// fp32. The backward recomputes the conv around its tile (a halo of 2r for x, r for the gradient g = gu silu'),
// writes gx[p] = sum_o w[o] g[p - o] and sums the weight and bias gradients over the tile's own cells, one
// atomic per value and block. PyTorch runs these as three kernels plus two for SiLU: at 256 channels x 200x200
// (2DMambaMIL's block on a slide) 0.53 ms forward+backward in bf16 on the H200, against 0.22 ms here
// (scripts/bench_conv.py).
#include "convert.cuh"
#include "lattice_conv_params.h"

namespace latconv {
namespace {

constexpr int kTH = 16, kTW = 32, kThreads = 256, kWarps = kThreads / 32;

using wsiops::from_float;
using wsiops::sigmoid;
using wsiops::to_float;

struct Tile {
  int channel, i0, j0;  // the tile's first cell
};

// Block b takes channel b mod channels: the blocks in flight at a time cover many channels, so the backward's
// atomics (one per weight and block) rarely meet on the same address.
__device__ __forceinline__ Tile tile_of(const Params& p) {
  const int tiles_w = (p.width + kTW - 1) / kTW, t = blockIdx.x / p.channels;
  return {static_cast<int>(blockIdx.x % p.channels), (t / tiles_w) * kTH, (t % tiles_w) * kTW};
}

// Cells of a ROWS x COLS region per thread (cell t = threadIdx.x + r kThreads of the region, row-major).
template <int ROWS, int COLS>
constexpr int kPerThread = (ROWS * COLS + kThreads - 1) / kThreads;

// The thread's cells of the ROWS x COLS region of channel `base`'s lattice from (i0, j0) into registers, zeros
// outside the lattice. Unrolled (compile-time sizes), so a thread's loads are all in flight before the first is used.
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void load_region(float (&v)[kPerThread<ROWS, COLS>], const T* src, long base, int i0,
                                            int j0, int H, int W) {
#pragma unroll
  for (int r = 0; r < kPerThread<ROWS, COLS>; ++r) {
    const int t = threadIdx.x + r * kThreads, i = i0 + t / COLS, j = j0 + t % COLS;
    v[r] = (t < ROWS * COLS && i >= 0 && i < H && j >= 0 && j < W) ? to_float(src[base + static_cast<long>(i) * W + j])
                                                                   : 0.f;
  }
}

// The same region into shared memory.
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void stage(float* dst, const T* src, long base, int i0, int j0, int H, int W) {
  float v[kPerThread<ROWS, COLS>];
  load_region<ROWS, COLS>(v, src, base, i0, j0, H, W);
#pragma unroll
  for (int r = 0; r < kPerThread<ROWS, COLS>; ++r) {
    const int t = threadIdx.x + r * kThreads;
    if (t < ROWS * COLS) dst[t] = v[r];
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) fwd_kernel(Params p) {
  constexpr int R = K / 2, SW = kTW + 2 * R;
  __shared__ float xs[(kTH + 2 * R) * SW];
  const Tile tile = tile_of(p);
  const int c = tile.channel % p.dim;
  const long base = static_cast<long>(tile.channel) * p.height * p.width;
  float w[K * K];
#pragma unroll
  for (int q = 0; q < K * K; ++q) w[q] = p.w[c * K * K + q];
  const float bias = p.b ? p.b[c] : 0.f;
  stage<kTH + 2 * R, SW>(xs, static_cast<const T*>(p.x), base, tile.i0 - R, tile.j0 - R, p.height, p.width);
  __syncthreads();
#pragma unroll
  for (int t = threadIdx.x; t < kTH * kTW; t += kThreads) {
    const int ti = t / kTW, tj = t % kTW, i = tile.i0 + ti, j = tile.j0 + tj;
    if (i >= p.height || j >= p.width) continue;
    float acc = bias;
#pragma unroll
    for (int di = 0; di < K; ++di)
#pragma unroll
      for (int dj = 0; dj < K; ++dj) acc += w[di * K + dj] * xs[(ti + di) * SW + tj + dj];
    const long at = base + static_cast<long>(i) * p.width + j;
    static_cast<T*>(p.out)[at] = from_float<T>(acc * sigmoid(acc));
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) bwd_kernel(Params p) {
  constexpr int R = K / 2, XW = kTW + 4 * R, GW = kTW + 2 * R, GH = kTH + 2 * R;
  __shared__ float xs[(kTH + 4 * R) * XW];
  __shared__ float gs[GH * GW];             // g = gu silu'(conv) around the tile, zero outside the lattice
  __shared__ float sums[kWarps][K * K + 1];  // the warps' weight and bias gradient sums
  const Tile tile = tile_of(p);
  const int c = tile.channel % p.dim, H = p.height, W = p.width;
  const long base = static_cast<long>(tile.channel) * H * W;
  float w[K * K];
#pragma unroll
  for (int q = 0; q < K * K; ++q) w[q] = p.w[c * K * K + q];
  const float bias = p.b ? p.b[c] : 0.f;
  constexpr int kG = kPerThread<GH, GW>;  // cells of the gradient region per thread
  float gv[kG];  // gu around the tile, loaded first: its loads and x's are in flight together
  load_region<GH, GW>(gv, static_cast<const T*>(p.gu), base, tile.i0 - R, tile.j0 - R, H, W);
  stage<kTH + 4 * R, XW>(xs, static_cast<const T*>(p.x), base, tile.i0 - 2 * R, tile.j0 - 2 * R, H, W);
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kG; ++r) {
    const int t = threadIdx.x + r * kThreads, gi = t / GW, gj = t % GW;
    if (t >= GH * GW) break;
    float acc = bias;
#pragma unroll
    for (int di = 0; di < K; ++di)
#pragma unroll
      for (int dj = 0; dj < K; ++dj) acc += w[di * K + dj] * xs[(gi + di) * XW + gj + dj];
    const float s = sigmoid(acc);
    gs[t] = gv[r] * s * (1.f + acc * (1.f - s));  // gv is zero outside the lattice
  }
  __syncthreads();
  float gw[K * K + 1] = {};  // the weight gradients, then the bias gradient
#pragma unroll
  for (int t = threadIdx.x; t < kTH * kTW; t += kThreads) {
    const int ti = t / kTW, tj = t % kTW, i = tile.i0 + ti, j = tile.j0 + tj;
    if (i >= H || j >= W) continue;
    float acc = 0.f;
    const float g = gs[(ti + R) * GW + tj + R];
#pragma unroll
    for (int di = 0; di < K; ++di)
#pragma unroll
      for (int dj = 0; dj < K; ++dj) {
        acc += w[di * K + dj] * gs[(ti + 2 * R - di) * GW + tj + 2 * R - dj];
        gw[di * K + dj] += g * xs[(ti + R + di) * XW + tj + R + dj];
      }
    gw[K * K] += g;
    const long at = base + static_cast<long>(i) * W + j;
    static_cast<T*>(p.gx)[at] = from_float<T>(acc);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int q = 0; q <= K * K; ++q) {
    float v = gw[q];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) sums[warp][q] = v;
  }
  __syncthreads();
  if (threadIdx.x <= K * K) {
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) v += sums[k][threadIdx.x];
    if (threadIdx.x < K * K) atomicAdd(p.gw + c * K * K + threadIdx.x, v);
    else if (p.gb) atomicAdd(p.gb + c, v);
  }
}

template <typename T, int K>
void launch(const Params& p, bool backward, cudaStream_t stream) {
  const long tiles = static_cast<long>((p.height + kTH - 1) / kTH) * ((p.width + kTW - 1) / kTW);
  const dim3 grid(static_cast<unsigned>(tiles * p.channels));
  if (backward) bwd_kernel<T, K><<<grid, kThreads, 0, stream>>>(p);
  else fwd_kernel<T, K><<<grid, kThreads, 0, stream>>>(p);
}

template <typename T>
void launch_k(const Params& p, bool backward, cudaStream_t stream) {
  switch (p.kernel) {
    case 1: return launch<T, 1>(p, backward, stream);
    case 3: return launch<T, 3>(p, backward, stream);
    case 5: return launch<T, 5>(p, backward, stream);
    case 7: return launch<T, 7>(p, backward, stream);
  }
}

void dispatch(const Params& p, bool backward, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kF32: return launch_k<float>(p, backward, stream);
    case DType::kF16: return launch_k<__half>(p, backward, stream);
    case DType::kBF16: return launch_k<__nv_bfloat16>(p, backward, stream);
  }
}

}  // namespace

bool supported(int kernel) { return kernel == 1 || kernel == 3 || kernel == 5 || kernel == 7; }
void forward(const Params& p, cudaStream_t stream) { dispatch(p, false, stream); }
void backward(const Params& p, cudaStream_t stream) { dispatch(p, true, stream); }

}  // namespace latconv
