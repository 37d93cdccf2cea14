#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace seqkern::cpu {
// Canonical shapes: q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) with Hq % Hk == 0; mask: additive,
// 4-D, every dim 1 or full. Returns O (B, Hq, L, Ev) and the log-sum-exp of the scaled scores as the pair
// (B, Hq, L, 2) = (row max, log row sum) (-inf for rows that every key is masked out of).
// cos/sin (L, R/2), L == S, q's dtype: rotary (rotate-half) applied to q and k as they are loaded; the
// backward returns the gradients of the unrotated q and k (cos/sin get none).
std::tuple<at::Tensor, at::Tensor> sdpa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& mask, double dropout_p,
                                                bool is_causal, double scale, int64_t seed,
                                                const std::optional<at::Tensor>& cos,
                                                const std::optional<at::Tensor>& sin);
// dq, dk, dv from dO, the forward's O and lse; P recomputed blockwise, never stored.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const std::optional<at::Tensor>& mask,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             double dropout_p, bool is_causal, double scale,
                                                             int64_t seed, const std::optional<at::Tensor>& cos,
                                                             const std::optional<at::Tensor>& sin);
}  // namespace seqkern::cpu
