// The 2D/1D scan kernels for float inputs (one dtype per file so that they compile in parallel).
#include "scan2d.cuh"

namespace scan {
SCAN_DEFINE_LAUNCHERS(float, f32)
}  // namespace scan
