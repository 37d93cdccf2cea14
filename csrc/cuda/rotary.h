// CUDA rotary kernels: raw pointers, no torch headers.
#pragma once
#include "cuda/common.h"

namespace seqkern::cuda {

// x, out: rows x D contiguous (row r is at position r % T); cos, sin: T x half, same dtype as x.
cudaError_t rotary(DType dtype, const void* x, void* out, const void* cos, const void* sin, int64_t rows, int64_t T,
                   int64_t D, int64_t half, bool interleaved, bool inverse, cudaStream_t stream);
}  // namespace seqkern::cuda
