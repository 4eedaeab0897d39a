// The 2D/1D scan kernels for __nv_bfloat16 inputs (one dtype per file so that they compile in parallel).
#include "scan2d.cuh"

namespace scan {
SCAN_DEFINE_LAUNCHERS(__nv_bfloat16, bf16)
}  // namespace scan
