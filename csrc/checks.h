// Argument checks shared by the bindings in csrc/<family>.cpp. Each message names
// the argument, what was expected and what came (DESIGN.md, "Errors").
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define SEQKERN_CHECK_DIM(t, n)                                                              \
  TORCH_CHECK((t).dim() == (n), #t " must have " #n " dimensions, got shape ", (t).sizes())
#define SEQKERN_CHECK_SIZE(t, d, n)                                                          \
  TORCH_CHECK((t).size(d) == (n), #t ".size(" #d ") must be ", (n), ", got shape ", (t).sizes())
#define SEQKERN_CHECK_SAME(t, ref)                                                           \
  do {                                                                                       \
    TORCH_CHECK((t).device() == (ref).device(), #t " is on ", (t).device(), " but " #ref     \
                " is on ", (ref).device());                                                  \
    TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), #t " has dtype ",                  \
                (t).scalar_type(), " but " #ref " has dtype ", (ref).scalar_type());         \
  } while (0)
#ifdef SEQKERN_WITH_CUDA
#include "cuda/common.h"

// the dtype tag of the torch-free CUDA kernels; `name` is the argument named if it has none
inline seqkern::cuda::DType cuda_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return seqkern::cuda::DType::kFloat32;
    case at::kDouble: return seqkern::cuda::DType::kFloat64;
    case at::kHalf: return seqkern::cuda::DType::kFloat16;
    case at::kBFloat16: return seqkern::cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": the CUDA kernels do not support dtype ", t.scalar_type());
  }
}
#endif

#define SEQKERN_CHECK_FLOAT(t)                                                               \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble ||         \
                  (t).scalar_type() == at::kHalf || (t).scalar_type() == at::kBFloat16,      \
              #t " must be a floating tensor, got ", (t).scalar_type())
