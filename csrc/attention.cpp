// Op schemas and bindings of the attention family: checks, then the CPU or CUDA kernel.
// Canonical shapes (seqkern/ops/attention.py builds them): q (B, Hq, L, E), k (B, Hk, S, E),
// v (B, Hk, S, Ev), Hq a multiple of Hk; mask additive, 4-D, every dim 1 or full.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "checks.h"
#include "cpu/attention.h"
#ifdef SEQKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/attention.h"
#endif

namespace {

void check_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& mask, double dropout_p) {
  SEQKERN_CHECK_DIM(q, 4);
  SEQKERN_CHECK_DIM(k, 4);
  SEQKERN_CHECK_DIM(v, 4);
  SEQKERN_CHECK_FLOAT(q);
  SEQKERN_CHECK_SAME(k, q);
  SEQKERN_CHECK_SAME(v, q);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "key and value must have the batch size ",
              q.size(0), " of query, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), "key must have the embedding size E=", q.size(3), " of query, got ",
              k.sizes());
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), "value must have the heads and length of key ",
              k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, "query heads ", q.size(1),
              " must be a multiple of key/value heads ", k.size(1));
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p must be in [0, 1], got ", dropout_p);
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& attn_mask = *mask;
    SEQKERN_CHECK_DIM(attn_mask, 4);
    SEQKERN_CHECK_SAME(attn_mask, q);
    const int64_t full[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    for (int d = 0; d < 4; ++d)
      TORCH_CHECK(attn_mask.size(d) == 1 || attn_mask.size(d) == full[d], "attn_mask of shape ", attn_mask.sizes(),
                  " does not broadcast to (B, H, L, S) = ", at::IntArrayRef(full, 4));
  }
}

// rotary tables fused into the cpu kernels: both or neither, (L, R/2) with L == S and R <= E, q's dtype
void check_rotary(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cos,
                  const std::optional<at::Tensor>& sin) {
  const bool has_cos = cos.has_value() && cos->defined(), has_sin = sin.has_value() && sin->defined();
  TORCH_CHECK(has_cos == has_sin, "cos and sin must be given together");
  if (!has_cos) return;
  SEQKERN_CHECK_DIM((*cos), 2);
  TORCH_CHECK(sin->sizes() == cos->sizes(), "sin must have the shape of cos ", cos->sizes(), ", got ", sin->sizes());
  TORCH_CHECK(q.size(2) == k.size(2) && cos->size(0) == q.size(2), "rotary needs L == S == cos.size(0), got L=",
              q.size(2), " S=", k.size(2), " and cos of shape ", cos->sizes());
  TORCH_CHECK(2 * cos->size(1) <= q.size(3), "cos has ", cos->size(1), " columns: rotary dim exceeds head dim E=",
              q.size(3));
  SEQKERN_CHECK_SAME((*cos), q);
  SEQKERN_CHECK_SAME((*sin), q);
}

std::tuple<at::Tensor, at::Tensor> sdpa_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& mask, double dropout_p,
                                                    bool is_causal, double scale, int64_t seed,
                                                    const std::optional<at::Tensor>& cos,
                                                    const std::optional<at::Tensor>& sin) {
  check_sdpa(q, k, v, mask, dropout_p);
  check_rotary(q, k, cos, sin);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "the cpu attention kernel supports float32 and float64, got query of dtype ", q.scalar_type());
  return seqkern::cpu::sdpa_forward(q, k, v, mask, dropout_p, is_causal, scale, seed, cos, sin);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    bool is_causal, double scale, int64_t seed, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin) {
  check_sdpa(q, k, v, mask, dropout_p);
  check_rotary(q, k, cos, sin);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "the cpu attention kernel supports float32 and float64, got query of dtype ", q.scalar_type());
  TORCH_CHECK(out.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), v.size(3)}),
              "out must have shape (B, Hq, L, Ev), got ", out.sizes());
  TORCH_CHECK(dout.sizes() == out.sizes(), "dout must have the shape of out ", out.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), 2}),
              "lse must have shape (B, Hq, L, 2) (the pair max, log-sum), got ", lse.sizes());
  SEQKERN_CHECK_SAME(dout, q);
  SEQKERN_CHECK_SAME(out, q);
  SEQKERN_CHECK_SAME(lse, q);
  return seqkern::cpu::sdpa_backward(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, cos, sin);
}

#ifdef SEQKERN_WITH_CUDA
seqkern::cuda::AttnParams cuda_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& mask, double dropout_p, bool is_causal, double scale,
                                      int64_t seed) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "the cuda attention kernel supports float32, float16 and bfloat16, got query of dtype ",
              q.scalar_type());
  TORCH_CHECK(q.size(3) <= seqkern::cuda::kAttnMaxHeadDim && v.size(3) <= seqkern::cuda::kAttnMaxHeadDim,
              "the cuda attention kernel supports head dims up to ", seqkern::cuda::kAttnMaxHeadDim,
              ", got query E=", q.size(3), " and value Ev=", v.size(3));
  seqkern::cuda::AttnParams p{};
  p.dtype = cuda_dtype(q, "query");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  if (mask.defined()) {
    p.mask = mask.data_ptr();
    p.mask_sb = mask.size(0) == 1 ? 0 : mask.stride(0);
    p.mask_sh = mask.size(1) == 1 ? 0 : mask.stride(1);
    p.mask_sl = mask.size(2) == 1 ? 0 : mask.stride(2);
    p.mask_ss = mask.size(3) == 1 ? 0 : mask.stride(3);
  }
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Hk = k.size(1);
  p.L = q.size(2);
  p.S = k.size(2);
  p.E = q.size(3);
  p.Ev = v.size(3);
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  p.dropout = dropout_p > 0.0;
  p.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffu);
  p.threshold = static_cast<uint32_t>(std::min(16777216.0, std::nearbyint(dropout_p * 16777216.0)));
  p.inv_keep = dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.0f;
  // the tensor-core kernels are opt-in until verified on a GPU; read at each call like SEQKERN_BACKEND
  const char* mma = std::getenv("SEQKERN_ATTN_MMA");
  p.mma = mma != nullptr && std::string(mma) == "1";
  return p;
}

std::tuple<at::Tensor, at::Tensor> sdpa_forward_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                     const at::Tensor& v_, const std::optional<at::Tensor>& mask_,
                                                     double dropout_p, bool is_causal, double scale, int64_t seed,
                                                     const std::optional<at::Tensor>& cos,
                                                     const std::optional<at::Tensor>& sin) {
  check_sdpa(q_, k_, v_, mask_, dropout_p);
  TORCH_CHECK(!cos.has_value() && !sin.has_value(),
              "the cuda attention kernel does not fuse rotary (seqkern applies it in a separate pass first)");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor mask = mask_.has_value() && mask_->defined() ? *mask_ : at::Tensor();
  const auto p = cuda_params(q, k, v, mask, dropout_p, is_causal, scale, seed);
  at::Tensor out = at::zeros({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::full({q.size(0), q.size(1), q.size(2)}, -INFINITY, q.options().dtype(at::kFloat));
  const cudaError_t err =
      seqkern::cuda::attention_forward(p, out.data_ptr(), lse.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "seqkern attention CUDA forward failed: ", cudaGetErrorString(err));
  // the op's lse is the pair (hi, lo) with lse = hi + lo; this kernel keeps the plain lse (lo = 0)
  return {out, at::stack({lse, at::zeros_like(lse)}, -1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cuda(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& mask_, const at::Tensor& out_, const at::Tensor& lse_, double dropout_p,
    bool is_causal, double scale, int64_t seed, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin) {
  check_sdpa(q_, k_, v_, mask_, dropout_p);
  TORCH_CHECK(!cos.has_value() && !sin.has_value(),
              "the cuda attention kernel does not fuse rotary (seqkern applies it in a separate pass first)");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor dout = dout_.contiguous(), out = out_.contiguous(), lse = lse_.sum(-1).to(at::kFloat).contiguous();
  TORCH_CHECK(dout.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), v.size(3)}),
              "dout and out must have shape (B, Hq, L, Ev), got ", dout.sizes(), " and ", out.sizes());
  SEQKERN_CHECK_SAME(dout, q);
  SEQKERN_CHECK_SAME(out, q);
  const at::Tensor mask = mask_.has_value() && mask_->defined() ? *mask_ : at::Tensor();
  const auto p = cuda_params(q, k, v, mask, dropout_p, is_causal, scale, seed);
  // zeros: when L or S is 0 the kernels launch no block for the other side
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const cudaError_t err = seqkern::cuda::attention_backward(p, dout.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                                                            delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                                                            dv.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "seqkern attention CUDA backward failed: ", cudaGetErrorString(err));
  return {dq, dk, dv};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqkern_C, m) {
  m.def("sdpa_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, float dropout_p, bool is_causal, float scale, "
        "int seed, Tensor? cos=None, Tensor? sin=None) -> (Tensor, Tensor)");
  m.def("sdpa_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor out, Tensor lse, "
        "float dropout_p, bool is_causal, float scale, int seed, Tensor? cos=None, Tensor? sin=None) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) {
  m.impl("sdpa_forward", &sdpa_forward_cpu);
  m.impl("sdpa_backward", &sdpa_backward_cpu);
}

#ifdef SEQKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(seqkern_C, CUDA, m) {
  m.impl("sdpa_forward", &sdpa_forward_cuda);
  m.impl("sdpa_backward", &sdpa_backward_cuda);
}
#endif
