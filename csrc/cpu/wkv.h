#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace seqkern::cpu {
// RWKV-4 WKV over k, v (B, T, C) from state (B, 3, C) = (aa, bb, pp); see seqkern/ops/wkv.py.
// All tensors contiguous, one dtype (fp32 or fp64). Returns (y, final state).
std::tuple<at::Tensor, at::Tensor> wkv4_forward(const at::Tensor& time_decay, const at::Tensor& time_first,
                                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& state);
// Gradients (time_decay, time_first, k, v, state) given gy (B, T, C) and gstate (B, 3, C).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_backward(
    const at::Tensor& time_decay, const at::Tensor& time_first, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& gy, const at::Tensor& gstate);
}  // namespace seqkern::cpu
