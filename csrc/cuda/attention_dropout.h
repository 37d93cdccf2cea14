// The attention dropout draw shared by the SIMT and tensor-core kernels (seqkern/ops/attention.py defines
// it): keep (row, j) when (mix32(mix32(row ^ seed) ^ j) >> 8) >= threshold. For .cu files only.
#pragma once
#include "cuda/attention.h"

namespace seqkern::cuda {

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
__device__ __forceinline__ uint32_t row_hash(const AttnParams& p, int64_t row) {
  return mix32(static_cast<uint32_t>(static_cast<uint64_t>(row)) ^ p.seed);
}
__device__ __forceinline__ float dropout_scale(const AttnParams& p, uint32_t rh, int64_t j) {
  return (mix32(rh ^ static_cast<uint32_t>(j)) >> 8) >= p.threshold ? p.inv_keep : 0.0f;
}

}  // namespace seqkern::cuda
