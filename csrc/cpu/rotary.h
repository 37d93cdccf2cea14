#pragma once
#include <ATen/ATen.h>

namespace seqkern::cpu {
// Rotates the first 2*cos.size(1) features of every row of x (..., T, D) by the
// angles of its position t; `inverse` rotates by the opposite angles (the backward).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved, bool inverse);
}  // namespace seqkern::cpu
