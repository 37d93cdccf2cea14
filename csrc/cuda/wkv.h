// CUDA RWKV-4 WKV kernels: raw pointers, no torch headers.
#pragma once
#include "cuda/common.h"

namespace seqkern::cuda {

// k, v, y (and gy, gk, gv): B x T x C contiguous in `dtype`. Everything else is in the
// accumulation type (double for kFloat64, float otherwise): negw = -exp(time_decay) and
// u = time_first (C), state, state_out, gstate, gstate_out (B x 3 x C), saved (B x T x 3 x C,
// the state before every step; null to skip), gw_bc, gu_bc (B x C, summed over B by the caller).
cudaError_t wkv4_forward(DType dtype, const void* negw, const void* u, const void* k, const void* v,
                         const void* state, void* y, void* state_out, void* saved, int64_t B, int64_t T, int64_t C,
                         cudaStream_t stream);
// Needs `saved` and `state_T` from wkv4_forward on the same inputs.
cudaError_t wkv4_backward(DType dtype, const void* negw, const void* u, const void* k, const void* v,
                          const void* state, const void* saved, const void* state_T, const void* gy,
                          const void* gstate, void* gk, void* gv, void* gstate_out, void* gw_bc, void* gu_bc,
                          int64_t B, int64_t T, int64_t C, cudaStream_t stream);
}  // namespace seqkern::cuda
