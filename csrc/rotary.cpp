// Op schema and bindings of the rotary family: checks, then the CPU or CUDA kernel.
#include <torch/library.h>

#include "checks.h"
#include "cpu/rotary.h"
#ifdef SEQKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/rotary.h"
#endif

namespace {

void check_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() >= 2, "q must have shape (..., T, D), got ", q.sizes());
  TORCH_CHECK(k.dim() >= 2, "k must have shape (..., T, D), got ", k.sizes());
  TORCH_CHECK(k.size(-1) == q.size(-1) && k.size(-2) == q.size(-2), "k must end in (T, D) like q ", q.sizes(),
              ", got ", k.sizes());
  SEQKERN_CHECK_DIM(cos, 2);
  TORCH_CHECK(sin.sizes() == cos.sizes(), "sin must have the shape of cos ", cos.sizes(), ", got ", sin.sizes());
  TORCH_CHECK(cos.size(0) == q.size(-2), "cos must have T=", q.size(-2), " rows, got ", cos.size(0));
  TORCH_CHECK(2 * cos.size(1) <= q.size(-1), "rotary dim 2*cos.size(1)=", 2 * cos.size(1), " exceeds head dim ",
              q.size(-1));
  SEQKERN_CHECK_FLOAT(q);
  SEQKERN_CHECK_SAME(k, q);
  SEQKERN_CHECK_SAME(cos, q);
  SEQKERN_CHECK_SAME(sin, q);
}

std::tuple<at::Tensor, at::Tensor> rotary_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                      const at::Tensor& sin, bool interleaved, bool inverse) {
  check_rotary(q, k, cos, sin);
  return {seqkern::cpu::rotary(q, cos, sin, interleaved, inverse), seqkern::cpu::rotary(k, cos, sin, interleaved, inverse)};
}

#ifdef SEQKERN_WITH_CUDA
at::Tensor rotary_one_cuda(const at::Tensor& x_, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                           bool inverse) {
  const at::Tensor x = x_.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t D = x.size(-1), T = x.size(-2);
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  const cudaError_t err = seqkern::cuda::rotary(cuda_dtype(x, "q"), x.data_ptr(), out.data_ptr(), cos.data_ptr(),
                                                sin.data_ptr(), rows, T, D, cos.size(1), interleaved, inverse,
                                                at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "seqkern rotary CUDA kernel failed: ", cudaGetErrorString(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor> rotary_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                       const at::Tensor& sin, bool interleaved, bool inverse) {
  check_rotary(q, k, cos, sin);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  return {rotary_one_cuda(q, c, s, interleaved, inverse), rotary_one_cuda(k, c, s, interleaved, inverse)};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqkern_C, m) {
  m.def("rotary_forward(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved, bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) { m.impl("rotary_forward", &rotary_forward_cpu); }

#ifdef SEQKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(seqkern_C, CUDA, m) { m.impl("rotary_forward", &rotary_forward_cuda); }
#endif
