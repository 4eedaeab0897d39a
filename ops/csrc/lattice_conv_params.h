// Depthwise k x k conv on a lattice, then SiLU (2DMambaMIL's conv): kernel parameters and launchers
// (lattice_conv.cu).
#pragma once
#include <cuda_runtime.h>

namespace latconv {

enum class DType { kF32, kF16, kBF16 };

// x, gu, out, gx: (channels, height * width) row-major lattices in `dtype`, channel c using weight row c % dim;
// w (dim, k * k), b (dim) or null, gw, gb: fp32. Sums in fp32.
struct Params {
  int channels, dim, height, width, kernel;
  DType dtype;
  const void *x, *gu;
  const float *w, *b;
  void *out, *gx;
  float *gw, *gb;
};

bool supported(int kernel);  // odd sizes 1 to 7
// out = silu(conv(x) + b).
void forward(const Params& p, cudaStream_t stream);
// gx, and gw, gb added atomically (zeroed by the caller), for the output gradient gu (the conv is recomputed).
void backward(const Params& p, cudaStream_t stream);

}  // namespace latconv
