// The Mamba2D wavefront scan (mamba2d-paper eq. 14): kernel parameters and launcher (m2d.cu).
#pragma once
#include <cuda_runtime.h>

namespace m2d {

// All fp32 and contiguous: u, dh, dv (batch, dim, L); Ah, Av (dim, n); Bh, Bv, C (batch, groups, n, L).
struct Params {
  int dim, dstate, groups, height, width;
  const float *u, *dh, *dv, *Ah, *Av, *Bh, *Bv, *C, *dy;
  float *y, *hall;                                // forward output; all states (backward only)
  float *du, *ddh, *ddv, *dAh, *dAv, *dBh, *dBv, *dC;
};

// Forward: y += sum_n C h (y zeroed by the caller), and every state into hall when hall is set.
// Backward: accumulates du, ddh, ddv (zeroed) and atomically dAh, dAv, dBh, dBv, dC from dy and hall.
void launch(const Params& p, int channels, bool backward, cudaStream_t stream);

}  // namespace m2d
