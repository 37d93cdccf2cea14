// Flash-style attention on the CPU: blocks of queries x blocks of keys through BLAS, online softmax
// in the forward (saving lse), P recomputed from lse in the backward. Memory is linear in the
// sequence lengths: the largest temporaries are a few (query block x key block) tiles per thread.
#include "cpu/attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

// MKL / OpenBLAS Fortran entry points exported by libtorch_cpu. Weak, so that a torch built
// without them still loads this library; the kernels then fall back to at::mm_out.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // the C interface (by value)
}

namespace seqkern::cpu {
namespace {

// Tile sizes: large enough that the BLAS calls run near peak, small enough that a thread's tiles
// (a few kBlockQ x kBlockK score tiles) stay in L2. SEQKERN_ATTN_BLOCK_Q / _K override them (tuning).
int64_t env_block(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  const int64_t x = v ? std::atoll(v) : 0;
  return x > 0 ? x : dflt;
}
const int64_t kBlockQDefault = env_block("SEQKERN_ATTN_BLOCK_Q", 256);
const int64_t kBlockK = env_block("SEQKERN_ATTN_BLOCK_K", 512);

template <typename T>
void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const T* alpha, const T* a,
               const int* lda, const T* b, const int* ldb, const T* beta, T* c, const int* ldc);
template <>
void blas_gemm<float>(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
void blas_gemm<double>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
// Each task already runs on its own thread: MKL spawning threads for its tile-sized GEMMs
// oversubscribes the cores (measured: 2-thread MKL on these tiles was 10x slower than 1).
struct SingleThreadedBlas {
  int prev = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
};

template <typename T>
bool have_blas() {
  return std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
}

// Row-major C (M x N) = alpha * op(A) op(B) + beta * C. BLAS is column-major: a row-major
// matrix read column-major is its transpose, so C^T = op(B)^T op(A)^T is the same call with
// A and B swapped.
template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (have_blas<T>()) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    blas_gemm<T>(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = at::from_blob(const_cast<T*>(A), ta ? at::IntArrayRef{K, M} : at::IntArrayRef{M, K},
                               {lda, 1}, opts);
  at::Tensor b = at::from_blob(const_cast<T*>(B), tb ? at::IntArrayRef{N, K} : at::IntArrayRef{K, N},
                               {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  at::Tensor prod = at::mm(ta ? a.t() : a, tb ? b.t() : b);
  if (beta == T(0)) c.copy_(prod.mul_(alpha)); else c.mul_(beta).add_(prod, alpha);
}

// exp for float written so that GCC vectorises the loops calling it (std::exp does not):
// Cephes' degree-6 polynomial on x - n ln2, 2^n built in the exponent bits; about 1 ulp.
// exp(-inf) and anything below the denormal range give exactly 0 (masked scores).
inline float exp_approx(float x) {
  constexpr float kHi = 88.3762626647949f, kLo = -87.3365447504f;
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float p2;
  std::memcpy(&p2, &bits, sizeof(p2));
  return x < kLo ? 0.0f : y * p2;
}
inline double exp_approx(double x) { return std::exp(x); }

// Row kernels as separate functions: inside the templated lambdas below GCC kept them scalar,
// standalone it vectorises them (checked with -fopt-info-vec).
template <typename T>
__attribute__((noinline)) T row_max(const T* row, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) mx = std::max(mx, row[c]);
  return mx;
}
// row <- exp(row - m); returns the sum
template <typename T>
__attribute__((noinline)) T exp_sum_row(T* row, int64_t n, T m) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const T p = exp_approx(row[c] - m);
    row[c] = p;
    sum += p;
  }
  return sum;
}

// Dropout mask shared with seqkern/ops/attention.py (dropout_keep), the Triton and CUDA kernels.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  bool on = false;
  uint32_t seed = 0, threshold = 0;
  double inv_keep = 1.0;  // 1 / (1 - p), 0 when p == 1
  Dropout(double p, int64_t seed_) {
    on = p > 0.0;
    seed = static_cast<uint32_t>(static_cast<uint64_t>(seed_) & 0xffffffffu);
    // nearbyint rounds half to even like Python's round() in dropout_threshold
    threshold = static_cast<uint32_t>(std::min(16777216.0, std::nearbyint(p * 16777216.0)));
    inv_keep = p < 1.0 ? 1.0 / (1.0 - p) : 0.0;
  }
  uint32_t row_hash(int64_t row) const { return mix32(static_cast<uint32_t>(static_cast<uint64_t>(row)) ^ seed); }
  bool keep(uint32_t rh, int64_t col) const {
    return (mix32(rh ^ static_cast<uint32_t>(col)) >> 8) >= threshold;
  }
};

struct Shapes {
  int64_t B, Hq, Hk, G, L, S, E, Ev;
  // strides of the additive mask broadcast to (B, Hq, L, S): 0 along broadcast dims
  const void* mask = nullptr;
  int64_t mb = 0, mh = 0, ml = 0, ms = 0;
};

Shapes shapes_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(1) / std::max<int64_t>(k.size(1), 1), q.size(2),
           k.size(2), q.size(3), v.size(3)};
  if (mask.defined()) {
    s.mask = mask.data_ptr();
    s.mb = mask.size(0) == 1 ? 0 : mask.stride(0);
    s.mh = mask.size(1) == 1 ? 0 : mask.stride(1);
    s.ml = mask.size(2) == 1 ? 0 : mask.stride(2);
    s.ms = mask.size(3) == 1 ? 0 : mask.stride(3);
  }
  return s;
}

// Query tile: smaller for short sequences so that B x H x query blocks still feeds every thread.
int64_t block_q(const Shapes& sh) {
  int64_t bq = kBlockQDefault;
  while (bq > 32 && sh.B * sh.Hq * ((sh.L + bq - 1) / bq) < 4 * at::get_num_threads()) bq /= 2;
  return bq;
}

// Scaled scores of one tile, with the mask added and causal positions set to -inf.
template <typename T>
void mask_tile(const Shapes& sh, T* s, int64_t nq, int64_t nk, int64_t b, int64_t h, int64_t i0, int64_t j0,
               bool causal) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < nq; ++r) {
    T* row = s + r * nk;
    if (sh.mask) {
      const T* m = static_cast<const T*>(sh.mask) + b * sh.mb + h * sh.mh + (i0 + r) * sh.ml + j0 * sh.ms;
      if (sh.ms == 1) {
#pragma omp simd
        for (int64_t c = 0; c < nk; ++c) row[c] += m[c];
      } else {
        for (int64_t c = 0; c < nk; ++c) row[c] += m[c * sh.ms];
      }
    }
    if (causal) {
      // key j is visible from query i when j <= i (top-left alignment)
      for (int64_t c = std::max<int64_t>(0, i0 + r + 1 - j0); c < nk; ++c) row[c] = kNegInf;
    }
  }
}

template <typename T>
void forward_kernel(const Shapes& sh, const T* q, const T* k, const T* v, T* out, T* lse, bool causal, T scale,
                    const Dropout& drop) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t kBlockQ = block_q(sh);
  const int64_t nqb = (sh.L + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, sh.B * sh.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas one_blas_thread;
    std::vector<T> sbuf(kBlockQ * kBlockK), oacc(kBlockQ * sh.Ev), mrow(kBlockQ), lrow(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kBlockQ;
      const int64_t b = bh / sh.Hq, h = bh % sh.Hq, hk = h / sh.G;
      const int64_t nq = std::min(kBlockQ, sh.L - i0);
      const T* Q = q + (bh * sh.L + i0) * sh.E;
      const T* K = k + (b * sh.Hk + hk) * sh.S * sh.E;
      const T* V = v + (b * sh.Hk + hk) * sh.S * sh.Ev;
      std::fill(oacc.begin(), oacc.begin() + nq * sh.Ev, T(0));
      std::fill(mrow.begin(), mrow.end(), kNegInf);
      std::fill(lrow.begin(), lrow.end(), T(0));
      // causal: no query of this block sees a key at or past i0 + nq
      const int64_t j_end = causal ? std::min(sh.S, i0 + nq) : sh.S;
      for (int64_t j0 = 0; j0 < j_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, j_end - j0);
        T* s = sbuf.data();
        gemm<T>(false, true, nq, nk, sh.E, scale, Q, sh.E, K + j0 * sh.E, sh.E, T(0), s, nk);
        mask_tile(sh, s, nq, nk, b, h, i0, j0, causal && j0 + nk > i0);
        for (int64_t r = 0; r < nq; ++r) {
          T* row = s + r * nk;
          const T mx = row_max(row, nk);
          const T m_new = std::max(mrow[r], mx);
          if (m_new == kNegInf) {  // nothing visible yet in this row
            std::fill(row, row + nk, T(0));
            continue;
          }
          const T alpha = exp_approx(mrow[r] - m_new);  // 0 when the old max was -inf
          const T sum = exp_sum_row(row, nk, m_new);
          lrow[r] = lrow[r] * alpha + sum;
          mrow[r] = m_new;
          if (alpha != T(1)) {
            T* o = oacc.data() + r * sh.Ev;
            for (int64_t e = 0; e < sh.Ev; ++e) o[e] *= alpha;
          }
          if (drop.on) {
            const uint32_t rh = drop.row_hash(bh * sh.L + i0 + r);
            const T keep = static_cast<T>(drop.inv_keep);
            for (int64_t c = 0; c < nk; ++c) row[c] = drop.keep(rh, j0 + c) ? row[c] * keep : T(0);
          }
        }
        gemm<T>(false, false, nq, sh.Ev, nk, T(1), s, nk, V + j0 * sh.Ev, sh.Ev, T(1), oacc.data(), sh.Ev);
      }
      T* O = out + (bh * sh.L + i0) * sh.Ev;
      T* LSE = lse + bh * sh.L + i0;
      for (int64_t r = 0; r < nq; ++r) {
        const T l = lrow[r];
        const T inv = l > T(0) ? T(1) / l : T(0);  // fully masked rows: output 0, lse -inf
        for (int64_t e = 0; e < sh.Ev; ++e) O[r * sh.Ev + e] = oacc[r * sh.Ev + e] * inv;
        LSE[r] = l > T(0) ? mrow[r] + std::log(l) : kNegInf;
      }
    }
  });
}

// One task per (batch, key/value head): it owns dK, dV of that head and dQ of its G query heads,
// so every accumulation is a plain += in one thread (deterministic, no atomics).
template <typename T>
void backward_kernel(const Shapes& sh, const T* dout, const T* q, const T* k, const T* v, const T* out,
                     const T* lse, T* dq, T* dk, T* dv, bool causal, T scale, const Dropout& drop) {
  const int64_t kBlockQ = block_q(sh);
  at::parallel_for(0, sh.B * sh.Hk, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas one_blas_thread;
    std::vector<T> pbuf(kBlockQ * kBlockK), dpbuf(kBlockQ * kBlockK), pdbuf(drop.on ? kBlockQ * kBlockK : 0);
    std::vector<T> delta(sh.G * sh.L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / sh.Hk, hk = task % sh.Hk;
      const T* K = k + task * sh.S * sh.E;
      const T* V = v + task * sh.S * sh.Ev;
      T* dK = dk + task * sh.S * sh.E;
      T* dV = dv + task * sh.S * sh.Ev;
      // delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i)
      for (int64_t g = 0; g < sh.G; ++g) {
        const int64_t bh = b * sh.Hq + hk * sh.G + g;
        for (int64_t i = 0; i < sh.L; ++i) {
          const T* a = dout + (bh * sh.L + i) * sh.Ev;
          const T* o = out + (bh * sh.L + i) * sh.Ev;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t e = 0; e < sh.Ev; ++e) acc += a[e] * o[e];
          delta[g * sh.L + i] = acc;
        }
      }
      for (int64_t j0 = 0; j0 < sh.S; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, sh.S - j0);
        for (int64_t g = 0; g < sh.G; ++g) {
          const int64_t h = hk * sh.G + g, bh = b * sh.Hq + h;
          // causal: rows before j0 see none of these keys
          for (int64_t i0 = causal ? j0 : 0; i0 < sh.L; i0 += kBlockQ) {
            const int64_t nq = std::min(kBlockQ, sh.L - i0);
            const T* Q = q + (bh * sh.L + i0) * sh.E;
            const T* dO = dout + (bh * sh.L + i0) * sh.Ev;
            const T* LSE = lse + bh * sh.L + i0;
            const T* D = delta.data() + g * sh.L + i0;
            T* P = pbuf.data();
            T* dP = dpbuf.data();
            gemm<T>(false, true, nq, nk, sh.E, scale, Q, sh.E, K + j0 * sh.E, sh.E, T(0), P, nk);
            mask_tile(sh, P, nq, nk, b, h, i0, j0, causal && j0 + nk > i0);
            for (int64_t r = 0; r < nq; ++r) {
              T* row = P + r * nk;
              const T m = LSE[r];
              if (std::isinf(m)) {  // fully masked row: P = 0, no gradient
                std::fill(row, row + nk, T(0));
                continue;
              }
              exp_sum_row(row, nk, m);
            }
            gemm<T>(false, true, nq, nk, sh.Ev, T(1), dO, sh.Ev, V + j0 * sh.Ev, sh.Ev, T(0), dP, nk);
            const T* Pv = P;  // P with dropout applied, for dV
            if (drop.on) {
              T* Pd = pdbuf.data();
              const T keep = static_cast<T>(drop.inv_keep);
              for (int64_t r = 0; r < nq; ++r) {
                const uint32_t rh = drop.row_hash(bh * sh.L + i0 + r);
                for (int64_t c = 0; c < nk; ++c) {
                  const T z = drop.keep(rh, j0 + c) ? keep : T(0);
                  Pd[r * nk + c] = P[r * nk + c] * z;
                  dP[r * nk + c] *= z;
                }
              }
              Pv = Pd;
            }
            // dS = P * (dP - delta), stored over dP
            for (int64_t r = 0; r < nq; ++r) {
              const T d = D[r];
              const T* pr = P + r * nk;
              T* dr = dP + r * nk;
#pragma omp simd
              for (int64_t c = 0; c < nk; ++c) dr[c] = pr[c] * (dr[c] - d);
            }
            gemm<T>(true, false, nk, sh.Ev, nq, T(1), Pv, nk, dO, sh.Ev, T(1), dV + j0 * sh.Ev, sh.Ev);
            gemm<T>(true, false, nk, sh.E, nq, scale, dP, nk, Q, sh.E, T(1), dK + j0 * sh.E, sh.E);
            gemm<T>(false, false, nq, sh.E, nk, scale, dP, nk, K + j0 * sh.E, sh.E, T(1),
                    dq + (bh * sh.L + i0) * sh.E, sh.E);
          }
        }
      }
    }
  });
}

at::Tensor mask_or_undefined(const std::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() ? *mask : at::Tensor();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sdpa_forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                const std::optional<at::Tensor>& mask_, double dropout_p,
                                                bool is_causal, double scale, int64_t seed) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor mask = mask_or_undefined(mask_);
  const Shapes sh = shapes_of(q, k, v, mask);
  at::Tensor out = at::empty({sh.B, sh.Hq, sh.L, sh.Ev}, q.options());
  at::Tensor lse = at::empty({sh.B, sh.Hq, sh.L}, q.options());
  const Dropout drop(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "seqkern_sdpa_forward_cpu", [&] {
    forward_kernel<scalar_t>(sh, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), is_causal,
                             static_cast<scalar_t>(scale), drop);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(const at::Tensor& dout_, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const std::optional<at::Tensor>& mask_,
                                                             const at::Tensor& out_, const at::Tensor& lse_,
                                                             double dropout_p, bool is_causal, double scale,
                                                             int64_t seed) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor dout = dout_.contiguous(), out = out_.contiguous(), lse = lse_.contiguous();
  const at::Tensor mask = mask_or_undefined(mask_);
  const Shapes sh = shapes_of(q, k, v, mask);
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const Dropout drop(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "seqkern_sdpa_backward_cpu", [&] {
    backward_kernel<scalar_t>(sh, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                              dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                              is_causal, static_cast<scalar_t>(scale), drop);
  });
  return {dq, dk, dv};
}

}  // namespace seqkern::cpu
