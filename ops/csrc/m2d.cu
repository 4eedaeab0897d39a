// The Mamba2D wavefront scan: h[i,j] = 1/2 (dAv h[i-1,j] + dAh h[i,j-1] + (dv Bv + dh Bh) u), with
// dAv = exp(dv Av), dAh = exp(dh Ah) (mamba's discretisation per axis), y = sum_n C h.
//
// One block per channel, one thread per column. Anti-diagonal t holds the cells i + j = t; thread j handles
// row t - j, reads its own column's previous row from a register and its left neighbour's value of the
// previous diagonal from shared memory (double-buffered, one barrier per diagonal). kStates states run
// together; more states repeat the sweep. The backward recomputes all states into a scratch tensor
// (O(L * dim * n) floats, transient) and runs the adjoint wavefront in reverse.

#include "m2d_params.h"

namespace m2d {
namespace {

constexpr int kStates = 4;
constexpr unsigned kFull = 0xffffffffu;


struct Cell {  // what one thread needs of channel c at position l
  long bc;     // offset of (b, group, state 0) in B/C
  float u, dh, dv;
};

__device__ __forceinline__ Cell load_cell(const Params& p, int c, long L, long l) {
  const int b = c / p.dim, d = c - b * p.dim, g = d / (p.dim / p.groups);
  return {(long)(b * p.groups + g) * p.dstate * L, p.u[c * L + l], p.dh[c * L + l], p.dv[c * L + l]};
}

// Thread j's cell on anti-diagonal t (row t - j), and the halves of the double-buffered shared row that this
// diagonal writes and the previous one wrote.
struct Diagonal {
  float* cur;
  const float* prev;
  int i;
  bool inside;
};

__device__ __forceinline__ Diagonal diagonal(float* sh, int t, int j, int H, int W) {
  const int i = t - j;
  return {sh + (t & 1) * kStates * W, sh + ((t + 1) & 1) * kStates * W, i, j < W && i >= 0 && i < H};
}

__global__ void m2d_fwd_kernel(Params p) {
  extern __shared__ float sh[];  // [2][kStates][width]
  const int c = blockIdx.x, j = threadIdx.x, W = p.width, H = p.height, d = c % p.dim;
  const long L = (long)H * W;
  for (int n0 = 0; n0 < p.dstate; n0 += kStates) {
    float hc[kStates] = {};
    for (int t = 0; t < H + W - 1; ++t) {
      const auto [cur, prev, i, inside] = diagonal(sh, t, j, H, W);
      if (inside) {
        const long l = (long)i * W + j;
        const Cell x = load_cell(p, c, L, l);
        float yv = 0.f;
#pragma unroll
        for (int s = 0; s < kStates; ++s) {
          const int n = n0 + s;
          if (n >= p.dstate) break;
          const long bl = x.bc + n * L + l;
          const float dAh = __expf(x.dh * p.Ah[d * p.dstate + n]), dAv = __expf(x.dv * p.Av[d * p.dstate + n]);
          const float left = j > 0 ? prev[s * W + j - 1] : 0.f;
          const float h = 0.5f * (dAv * hc[s] + dAh * left + (x.dv * p.Bv[bl] + x.dh * p.Bh[bl]) * x.u);
          hc[s] = h;
          cur[s * W + j] = h;
          yv += p.C[bl] * h;
          if (p.hall) p.hall[((long)c * p.dstate + n) * L + l] = h;
        }
        if (p.y) p.y[c * L + l] += yv;  // this thread alone owns column j
      }
      __syncthreads();
    }
  }
}

__global__ void m2d_bwd_kernel(Params p) {
  extern __shared__ float sh[];  // [2][kStates][width]: 1/2 dAh[i,j] lam[i,j], read by column j-1
  const int c = blockIdx.x, j = threadIdx.x, W = p.width, H = p.height, d = c % p.dim;
  const long L = (long)H * W;
  for (int n0 = 0; n0 < p.dstate; n0 += kStates) {
    float pv[kStates] = {}, gAh[kStates] = {}, gAv[kStates] = {};  // pv: 1/2 dAv[i+1,j] lam[i+1,j]
    for (int t = H + W - 2; t >= 0; --t) {
      const auto [cur, prev, i, inside] = diagonal(sh, t, j, H, W);
      if (inside) {
        const long l = (long)i * W + j;
        const Cell x = load_cell(p, c, L, l);
        const float dy = p.dy[c * L + l];
        float du = 0.f, ddh = 0.f, ddv = 0.f;
#pragma unroll
        for (int s = 0; s < kStates; ++s) {
          const int n = n0 + s;
          if (n >= p.dstate) break;
          const long bl = x.bc + n * L + l, hl = ((long)c * p.dstate + n) * L + l;
          const float ah = p.Ah[d * p.dstate + n], av = p.Av[d * p.dstate + n];
          const float dAh = __expf(x.dh * ah), dAv = __expf(x.dv * av);
          const float right = j + 1 < W ? prev[s * W + j + 1] : 0.f;
          const float half = 0.5f * (p.C[bl] * dy + pv[s] + right);
          const float hup = i > 0 ? p.hall[hl - W] : 0.f, hleft = j > 0 ? p.hall[hl - 1] : 0.f;
          const float bh = p.Bh[bl], bv = p.Bv[bl];
          ddh += half * hleft * dAh * ah + half * bh * x.u;
          ddv += half * hup * dAv * av + half * bv * x.u;
          du += half * (x.dv * bv + x.dh * bh);
          atomicAdd(p.dBh + bl, half * x.dh * x.u);
          atomicAdd(p.dBv + bl, half * x.dv * x.u);
          atomicAdd(p.dC + bl, dy * p.hall[hl]);
          gAh[s] += half * hleft * dAh * x.dh;
          gAv[s] += half * hup * dAv * x.dv;
          pv[s] = half * dAv;
          cur[s * W + j] = half * dAh;
        }
        p.du[c * L + l] += du;
        p.ddh[c * L + l] += ddh;
        p.ddv[c * L + l] += ddv;
      }
      __syncthreads();
    }
#pragma unroll
    for (int s = 0; s < kStates; ++s) {
      const int n = n0 + s;
      float a = gAh[s], b = gAv[s];
      for (int off = 16; off > 0; off >>= 1) {
        a += __shfl_xor_sync(kFull, a, off);
        b += __shfl_xor_sync(kFull, b, off);
      }
      if ((j & 31) == 0 && n < p.dstate) {
        atomicAdd(p.dAh + d * p.dstate + n, a);
        atomicAdd(p.dAv + d * p.dstate + n, b);
      }
    }
  }
}

}  // namespace

void launch(const Params& p, int channels, bool backward, cudaStream_t stream) {
  const int threads = (p.width + 31) / 32 * 32;
  const size_t smem = 2 * kStates * p.width * sizeof(float);
  if (backward) m2d_bwd_kernel<<<channels, threads, smem, stream>>>(p);
  else m2d_fwd_kernel<<<channels, threads, smem, stream>>>(p);
}

}  // namespace m2d
