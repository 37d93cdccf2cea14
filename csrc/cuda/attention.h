// CUDA attention kernels: raw pointers, no torch headers.
#pragma once
#include "cuda/common.h"

namespace seqkern::cuda {
constexpr int64_t kAttnMaxHeadDim = 256;
// The attention grids are 1-D, a block per few rows of each (batch, head): no cap and no loop, so a launch
// past gridDim.x's limit (B*Hq >= 2^31 for decode shapes, L <= 8) is refused with
// cudaErrorInvalidConfiguration before the count is cast to unsigned (from 2^32 on it would wrap to a few
// blocks and leave the rest of the output unwritten, with no error).
constexpr int64_t kAttnMaxGridX = 2147483647;

// Canonical contiguous q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), Hq % Hk == 0. The additive mask
// (same dtype, or null) is read at mask + b*mask_sb + h*mask_sh + i*mask_sl + j*mask_ss (strides 0 along
// broadcast dims). Dropout: keep element (row = (b*Hq + h)*L + i, j) when
// (mix32(mix32(row ^ seed) ^ j) >> 8) >= threshold, scaled by inv_keep (seqkern/ops/attention.py).
struct AttnParams {
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  const void* mask;
  int64_t mask_sb, mask_sh, mask_sl, mask_ss;
  int64_t B, Hq, Hk, L, S, E, Ev;
  float scale;
  bool causal;
  bool dropout;
  uint32_t seed, threshold;
  float inv_keep;
  // fp16/bf16 through the tensor-core kernels (attention_mma.cu) where they fit; off by default until a GPU
  // run has verified them: the binding sets it only when SEQKERN_ATTN_MMA=1
  bool mma;
};

// out (B, Hq, L, Ev) in the input dtype; lse (B, Hq, L) fp32, natural log, -inf for fully masked rows.
cudaError_t attention_forward(const AttnParams& p, void* out, float* lse, cudaStream_t stream);
// delta: fp32 workspace of B*Hq*L; dq, dk, dv in the input dtype, every element written.
cudaError_t attention_backward(const AttnParams& p, const void* dout, const void* out, const float* lse,
                               float* delta, void* dq, void* dk, void* dv, cudaStream_t stream);

// Tensor-core path (attention_mma.cu): mma.sync m16n8k16 for fp16/bf16 with E, Ev <= kAttnMmaMaxHeadDim,
// taken by the two entry points above when p.mma is set and attention_mma_fits(p).
constexpr int64_t kAttnMmaMaxHeadDim = 128;
bool attention_mma_fits(const AttnParams& p);
cudaError_t attention_forward_mma(const AttnParams& p, void* out, float* lse, cudaStream_t stream);
// dq, dk, dv from a delta = rowsum(dout * out) already computed
cudaError_t attention_backward_mma(const AttnParams& p, const void* dout, const float* lse, const float* delta,
                                   void* dq, void* dk, void* dv, cudaStream_t stream);
}  // namespace seqkern::cuda
