// Op schemas and bindings of the WKV family: checks, then the CPU (or CUDA) kernel.
#include <torch/library.h>

#include "checks.h"
#include "cpu/wkv.h"
#ifdef SEQKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/wkv.h"
#endif

namespace {

void check_wkv(const at::Tensor& time_decay, const at::Tensor& time_first, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& state) {
  SEQKERN_CHECK_DIM(k, 3);
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t Bn = k.size(0), C = k.size(2);
  SEQKERN_CHECK_DIM(time_decay, 1);
  SEQKERN_CHECK_SIZE(time_decay, 0, C);
  SEQKERN_CHECK_DIM(time_first, 1);
  SEQKERN_CHECK_SIZE(time_first, 0, C);
  SEQKERN_CHECK_DIM(state, 3);
  TORCH_CHECK(state.size(0) == Bn && state.size(1) == 3 && state.size(2) == C, "state must have shape (B, 3, C) = (",
              Bn, ", 3, ", C, "), got ", state.sizes());
  SEQKERN_CHECK_FLOAT(k);
  SEQKERN_CHECK_SAME(v, k);
  SEQKERN_CHECK_SAME(time_decay, k);
  SEQKERN_CHECK_SAME(time_first, k);
  TORCH_CHECK(state.device() == k.device(), "state is on ", state.device(), " but k is on ", k.device());
  const auto acc = k.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(state.scalar_type() == acc, "state must have dtype ", acc, " (the accumulation dtype of k's ",
              k.scalar_type(), "), got ", state.scalar_type());
}

void check_cpu_dtype(const at::Tensor& k) {
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kDouble,
              "the cpu wkv4 kernel supports float32 and float64, got k of dtype ", k.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> wkv4_forward_cpu(const at::Tensor& time_decay, const at::Tensor& time_first,
                                                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& state) {
  check_wkv(time_decay, time_first, k, v, state);
  check_cpu_dtype(k);
  return seqkern::cpu::wkv4_forward(time_decay, time_first, k, v, state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_backward_cpu(
    const at::Tensor& time_decay, const at::Tensor& time_first, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& gy, const at::Tensor& gstate) {
  check_wkv(time_decay, time_first, k, v, state);
  check_cpu_dtype(k);
  TORCH_CHECK(gy.sizes() == k.sizes(), "gy must have the shape of k ", k.sizes(), ", got ", gy.sizes());
  TORCH_CHECK(gstate.sizes() == state.sizes(), "gstate must have the shape of state ", state.sizes(), ", got ",
              gstate.sizes());
  SEQKERN_CHECK_SAME(gy, k);
  SEQKERN_CHECK_SAME(gstate, state);
  return seqkern::cpu::wkv4_backward(time_decay, time_first, k, v, state, gy, gstate);
}

#ifdef SEQKERN_WITH_CUDA
// (y, final state, states before every step or an undefined tensor)
std::tuple<at::Tensor, at::Tensor, at::Tensor> wkv4_forward_cuda_impl(const at::Tensor& time_decay,
                                                                      const at::Tensor& time_first,
                                                                      const at::Tensor& k_, const at::Tensor& v_,
                                                                      const at::Tensor& state_, bool save) {
  const c10::cuda::CUDAGuard guard(k_.device());
  const at::Tensor k = k_.contiguous(), v = v_.contiguous(), state = state_.contiguous();
  const int64_t Bn = k.size(0), T = k.size(1), C = k.size(2);
  const at::Tensor negw = time_decay.to(state.scalar_type()).exp().neg().contiguous();
  const at::Tensor u = time_first.to(state.scalar_type()).contiguous();
  at::Tensor y = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor st_out = at::empty_like(state, at::MemoryFormat::Contiguous);
  at::Tensor saved = save ? at::empty({Bn, T, 3, C}, state.options()) : at::Tensor();
  const cudaError_t err = seqkern::cuda::wkv4_forward(
      cuda_dtype(k, "k"), negw.data_ptr(), u.data_ptr(), k.data_ptr(), v.data_ptr(), state.data_ptr(), y.data_ptr(),
      st_out.data_ptr(), save ? saved.data_ptr() : nullptr, Bn, T, C, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "seqkern wkv4 CUDA forward kernel failed: ", cudaGetErrorString(err));
  return {y, st_out, saved};
}

std::tuple<at::Tensor, at::Tensor> wkv4_forward_cuda(const at::Tensor& time_decay, const at::Tensor& time_first,
                                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& state) {
  check_wkv(time_decay, time_first, k, v, state);
  auto [y, st, unused] = wkv4_forward_cuda_impl(time_decay, time_first, k, v, state, false);
  (void)unused;
  return {y, st};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_backward_cuda(
    const at::Tensor& time_decay, const at::Tensor& time_first, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& state_, const at::Tensor& gy_, const at::Tensor& gstate_) {
  check_wkv(time_decay, time_first, k_, v_, state_);
  TORCH_CHECK(gy_.sizes() == k_.sizes(), "gy must have the shape of k ", k_.sizes(), ", got ", gy_.sizes());
  TORCH_CHECK(gstate_.sizes() == state_.sizes(), "gstate must have the shape of state ", state_.sizes(), ", got ",
              gstate_.sizes());
  SEQKERN_CHECK_SAME(gy_, k_);
  SEQKERN_CHECK_SAME(gstate_, state_);
  auto [unused_y, st_T, saved] = wkv4_forward_cuda_impl(time_decay, time_first, k_, v_, state_, true);
  (void)unused_y;
  const c10::cuda::CUDAGuard guard(k_.device());
  const at::Tensor k = k_.contiguous(), v = v_.contiguous(), state = state_.contiguous();
  const at::Tensor gy = gy_.contiguous(), gstate = gstate_.contiguous();
  const int64_t Bn = k.size(0), T = k.size(1), C = k.size(2);
  const at::Tensor w = time_decay.to(state.scalar_type()).exp().contiguous();
  const at::Tensor negw = w.neg(), u = time_first.to(state.scalar_type()).contiguous();
  at::Tensor gk = at::empty_like(k, at::MemoryFormat::Contiguous), gv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor gs = at::empty_like(state, at::MemoryFormat::Contiguous);
  at::Tensor gw_bc = at::empty({Bn, C}, state.options()), gu_bc = at::empty({Bn, C}, state.options());
  const cudaError_t err = seqkern::cuda::wkv4_backward(
      cuda_dtype(k, "k"), negw.data_ptr(), u.data_ptr(), k.data_ptr(), v.data_ptr(), state.data_ptr(), saved.data_ptr(),
      st_T.data_ptr(), gy.data_ptr(), gstate.data_ptr(), gk.data_ptr(), gv.data_ptr(), gs.data_ptr(),
      gw_bc.data_ptr(), gu_bc.data_ptr(), Bn, T, C, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "seqkern wkv4 CUDA backward kernel failed: ", cudaGetErrorString(err));
  return {(gw_bc.sum(0) * w).to(time_decay.scalar_type()), gu_bc.sum(0).to(time_first.scalar_type()), gk, gv, gs};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqkern_C, m) {
  m.def("wkv4_forward(Tensor time_decay, Tensor time_first, Tensor k, Tensor v, Tensor state) -> (Tensor, Tensor)");
  m.def("wkv4_backward(Tensor time_decay, Tensor time_first, Tensor k, Tensor v, Tensor state, Tensor gy, "
        "Tensor gstate) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) {
  m.impl("wkv4_forward", &wkv4_forward_cpu);
  m.impl("wkv4_backward", &wkv4_backward_cpu);
}

#ifdef SEQKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(seqkern_C, CUDA, m) {
  m.impl("wkv4_forward", &wkv4_forward_cuda);
  m.impl("wkv4_backward", &wkv4_backward_cuda);
}
#endif
