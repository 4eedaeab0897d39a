// The 2D/1D scan kernels for __half inputs (one dtype per file so that they compile in parallel).
#include "scan2d.cuh"

namespace scan {
SCAN_DEFINE_LAUNCHERS(__half, f16)
}  // namespace scan
