// Flash-style scaled dot-product attention on the CPU.
//
// Forward: one task per (batch, head, block of BQ queries); it walks the key blocks with an
// online softmax (running max m, running sum l, output accumulator rescaled when m grows),
// the two products of each block through BLAS, and saves lse = m + log l per row as the pair
// (m, log l), so that the backward subtracts m from bit-identical logits exactly as the forward.
// Backward: one task per (batch, key/value head), so the dK/dV of a key block and the dQ of
// every query row of its group of heads are written by one thread only (deterministic, no
// atomics); the probabilities come back from lse, and dS = P * (dP - rowsum(dO * O)).
// Nothing N x N is ever allocated: scratch is a few BQ x BK blocks per thread.
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_ps
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The Fortran BLAS that libtorch_cpu exports (MKL / OpenBLAS); weak, so a torch without it
// still loads this library and the kernels fall back to ATen's addmm.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace seqkern::cpu {
namespace {

inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* al,
                         const float* a, const int* lda, const float* b, const int* ldb, const float* be, float* c,
                         const int* ldc) {
  sgemm_(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}
inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* al,
                         const double* a, const int* lda, const double* b, const int* ldb, const double* be,
                         double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}

// Row-major C (M x N, ldc) = alpha * op(A) op(B) + beta * C through the column-major BLAS:
// a row-major matrix is its column-major transpose, so C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const bool have = std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (!have || K == 0) {  // no BLAS (or an empty sum, where BLAS checks leading dims): ATen on views
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                      : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
    at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                      : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
    at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
    c.addmm_(a, b, beta, alpha);
    return;
  }
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  fortran_gemm(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

// exp(x) for a whole row, written so that GCC vectorises it (libm's expf is a call per
// element): x = n ln2 + r with n rounded by the 1.5 * 2^23 trick, a degree-6 polynomial for
// e^r, 2^n through the exponent bits. exp(-inf) and anything below the float range is exactly
// 0 (masked entries must not leak into the row sum), anything above 88.376 is +inf (a +inf logit
// must overflow as in the reference; softmax arguments are <= 0 otherwise), NaN stays NaN.
// Relative error < 1e-7.
inline void exp_row(float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float xc = std::max(std::min(xi, 88.3762626f), -87.3365448f);
    const float t = xc * 1.44269504088896341f + 12582912.0f;
    const float fn = t - 12582912.0f;
    const int32_t ni = std::bit_cast<int32_t>(t) - 0x4B400000;
    const float r = xc - fn * 0.693359375f + fn * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const float e = y * std::bit_cast<float>((ni + 127) << 23);
    x[i] = xi < -87.3365448f ? 0.0f : (xi > 88.3762626f ? std::numeric_limits<float>::infinity() : (xi != xi ? xi : e));
  }
}

inline void exp_row(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

// The two sweeps of softmax over a row of logits: its max, then x = exp((x - hi) - lo) in place,
// returning the row sum. The forward passes lo = 0 (x - hi - 0 is x - hi exactly), the backward
// the (m, log l) pair of the forward.
template <typename T>
inline T row_max(const T* x, int64_t n) {
  T mx = static_cast<T>(-std::numeric_limits<double>::infinity());
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) mx = std::max(mx, x[c]);
  return mx;
}

template <typename T>
inline T exp_shift_sum(T* x, int64_t n, T hi, T lo) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) x[c] = (x[c] - hi) - lo;
  exp_row(x, n);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += x[c];
  return sum;
}

#if defined(__AVX512F__)
// exp_row's reduction and polynomial on 16 lanes, with 2^n applied by vscalefps, which also
// gives the range ends: arguments are clamped to [-104, 89], where e^x rounds to 0 and to +inf
// (subnormal results in between, as torch.exp), so exp(-inf) = 0 exactly and exp(+inf) = +inf;
// NaN passes both clamps (min/max return their second operand then). One sweep instead of
// exp_row's select chain: the score tile's exponentials were half the forward's time.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

template <>
inline float row_max<float>(const float* x, int64_t n) {
  // max(x, m) returns m when x is NaN: NaN logits are skipped, as std::max(mx, x) does
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) m = _mm512_max_ps(_mm512_loadu_ps(x + c), m);
  if (c < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - c)) - 1u);
    m = _mm512_mask_max_ps(m, k, _mm512_maskz_loadu_ps(k, x + c), m);
  }
  return _mm512_reduce_max_ps(m);
}

template <>
inline float exp_shift_sum<float>(float* x, int64_t n, float hi, float lo) {
  const __m512 h = _mm512_set1_ps(hi), l = _mm512_set1_ps(lo);
  const bool sub_lo = lo != 0.0f;  // the forward's lo = 0: (x - hi) - 0 is x - hi, one op fewer
  const auto arg = [&](__m512 v) {
    v = _mm512_sub_ps(v, h);
    return sub_lo ? _mm512_sub_ps(v, l) : v;
  };
  __m512 acc = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 e = exp16(arg(_mm512_loadu_ps(x + c)));
    _mm512_storeu_ps(x + c, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (c < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - c)) - 1u);
    const __m512 e = exp16(arg(_mm512_maskz_loadu_ps(k, x + c)));
    _mm512_mask_storeu_ps(x + c, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// The dropout hash shared with seqkern/ops/attention.py (dropout_keep), kernels/attention.py
// and csrc/cuda/attention.cu: row r = bh * L + i, h = mix(mix(r ^ seed) ^ j), kept iff
// (h >> 8) >= threshold.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  bool on = false;
  uint32_t seed = 0, threshold = 0;
  double inv_keep = 1.0;  // 1 / (1 - p), 0 when p == 1

  Dropout(double p, int64_t s) {
    on = p > 0.0;
    seed = static_cast<uint32_t>(static_cast<uint64_t>(s) & 0xFFFFFFFFu);
    // nearbyint rounds half to even like Python's round(): the threshold matches bit for bit
    const double t = std::nearbyint(p * 16777216.0);
    threshold = static_cast<uint32_t>(std::min(t, 16777216.0));
    inv_keep = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
  }
  uint32_t row_key(int64_t row) const { return mix32(static_cast<uint32_t>(row) ^ seed); }
  bool keep(uint32_t rk, int64_t j) const { return (mix32(rk ^ static_cast<uint32_t>(j)) >> 8) >= threshold; }
};

struct MaskView {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, ss = 0;
};

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Query blocks of at most this many rows take their logits and P V as direct dot products.
constexpr int64_t kDotRows = 4;

// sum_i a[i] b[i] in a fixed order (16 partial sums, then a fixed tree): the same bits wherever
// it runs
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int W = 16;
  T acc[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
#pragma omp simd
    for (int l = 0; l < W; ++l) acc[l] = std::fma(a[i + l], b[i + l], acc[l]);
  for (int l = 0; i + l < n; ++l) acc[l] = std::fma(a[i + l], b[i + l], acc[l]);
  for (int w = W / 2; w > 0; w /= 2)
#pragma omp simd
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

#if defined(__AVX512F__)
// one accumulator and a horizontal add: the generic version's reduction went through memory
// (~9 ns a key at E=32); consecutive keys' dot products overlap in the pipeline instead
template <>
inline float dot<float>(const float* __restrict a, const float* __restrict b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// ar[e] += sum_c p[c] V[c][e] for the nk rows of V (row stride Ev), each sum in c order
template <typename T>
inline void pv_row(T* __restrict ar, const T* __restrict p, const T* __restrict V, int64_t nk, int64_t Ev) {
  for (int64_t c = 0; c < nk; ++c) {
    const T pc = p[c];
    const T* vr = V + c * Ev;
#pragma omp simd
    for (int64_t e = 0; e < Ev; ++e) ar[e] = std::fma(pc, vr[e], ar[e]);
  }
}

#if defined(__AVX512F__)
// 64 columns at a time held in registers across the keys (the generic loop stores and reloads
// the accumulator row for every key)
template <>
inline void pv_row<float>(float* __restrict ar, const float* __restrict p, const float* __restrict V, int64_t nk,
                          int64_t Ev) {
  for (int64_t e0 = 0; e0 < Ev; e0 += 64) {
    __mmask16 k[4];
    __m512 a[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t rem = std::clamp<int64_t>(Ev - e0 - 16 * j, 0, 16);
      k[j] = static_cast<__mmask16>(rem == 16 ? 0xFFFFu : (1u << rem) - 1u);
      a[j] = _mm512_maskz_loadu_ps(k[j], ar + e0 + 16 * j);
    }
    for (int64_t c = 0; c < nk; ++c) {
      const __m512 pc = _mm512_set1_ps(p[c]);
      const float* vr = V + c * Ev + e0;
      for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(pc, _mm512_maskz_loadu_ps(k[j], vr + 16 * j), a[j]);
    }
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(ar + e0 + 16 * j, k[j], a[j]);
  }
}
#endif

// Logits of one (query block, key block): scale * Q K^T, plus the mask, -inf above the causal
// diagonal (top-left aligned: key j is visible to query i iff j <= i).
template <typename T>
void block_logits(T* s, int64_t ld, const T* Q, const T* K, int64_t nq, int64_t nk, int64_t E, T scale,
                  const MaskView& mv, int64_t b, int64_t h, int64_t i0, int64_t j0, bool causal) {
  if (nq <= kDotRows) {
    // a few query rows (decoding): direct dot products, without BLAS's per-call setup and
    // packing; the choice depends on nq alone, so the backward's recomputation takes the same
    // branch for the same block and sees the same bits
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0; c < nk; ++c) s[r * ld + c] = scale * dot(Q + r * E, K + c * E, E);
  } else {
    gemm_rm<T>(false, true, nq, nk, E, scale, Q, E, K, E, T(0), s, ld);
    if (E == 0)  // BLAS may leave C alone for an empty sum
      for (int64_t r = 0; r < nq; ++r) std::fill(s + r * ld, s + r * ld + nk, T(0));
  }
  if (mv.data != nullptr) {
    const T* m = static_cast<const T*>(mv.data) + b * mv.sb + h * mv.sh;
    for (int64_t r = 0; r < nq; ++r) {
      const T* mr = m + (i0 + r) * mv.sl + j0 * mv.ss;
      T* sr = s + r * ld;
      if (mv.ss == 1) {
#pragma omp simd
        for (int64_t c = 0; c < nk; ++c) sr[c] += mr[c];
      } else {
        for (int64_t c = 0; c < nk; ++c) sr[c] += mr[c * mv.ss];
      }
    }
  }
  if (causal) {
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t first_hidden = std::max<int64_t>(0, i0 + r + 1 - j0);
      if (first_hidden < nk) std::fill(s + r * ld + first_hidden, s + r * ld + nk, static_cast<T>(kNegInf));
    }
  }
}

// Rotary embedding fused into the loads (rotate-half layout of seqkern/ops/rotary.py): n rows of
// x at positions t0.. into dst (dst may be x), the first 2*half features pairwise (j, j + half)
// by the angles of the row's position, the rest copied. inverse rotates by the opposite angles
// (the adjoint: what the gradients of the rotated q/k need to become gradients of q/k).
template <typename T>
struct Rotary {
  const T* cos = nullptr;  // (L, half), contiguous; nullptr: no rotary
  const T* sin = nullptr;
  int64_t half = 0;
};

template <typename T>
void rotate_rows(T* dst, const T* x, int64_t n, int64_t E, const Rotary<T>& rot, int64_t t0, bool inverse) {
  const int64_t half = rot.half;
  for (int64_t r = 0; r < n; ++r) {
    const T* c = rot.cos + (t0 + r) * half;
    const T* sn = rot.sin + (t0 + r) * half;
    const T* xr = x + r * E;
    T* dr = dst + r * E;
    const T sg = inverse ? T(-1) : T(1);
    for (int64_t j = 0; j < half; ++j) {
      const T x1 = xr[j], x2 = xr[j + half], sj = sg * sn[j];
      dr[j] = x1 * c[j] - x2 * sj;
      dr[j + half] = x2 * c[j] + x1 * sj;
    }
    if (dr != xr) std::copy(xr + 2 * half, xr + E, dr + 2 * half);
  }
}

// Runs worker(next) on up to one thread per task; workers take task ids from the shared counter
// one at a time (next_task) instead of a contiguous share each, so a core slowed by other load on
// the machine takes fewer tasks instead of the whole call waiting for it. A task's result does not
// depend on the thread that runs it (deterministic).
// Calls of at most kInlineFlops run on the calling thread: waking the pool costs more than
// such a call's whole work (a decoding step, B=1 H=8 L=1 S=64 D=32, is 66 kflop).
constexpr int64_t kInlineFlops = int64_t(1) << 18;

template <typename F>
void dynamic_tasks(int64_t n, int64_t flops, const F& worker) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  if (flops <= kInlineFlops) {
    worker(next);
    return;
  }
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next); });
}
inline int64_t next_task(std::atomic<int64_t>& next) { return next.fetch_add(1, std::memory_order_relaxed); }

// the backward recomputes the logits with the very same tile products as the forward, so that
// exp(s - lse) sees bit-identical s even for huge logits
// 128 x 128 tiles: MKL packs both operands of every product, and 128 query rows halve the packing of
// each K/V block per flop against 64 (B=2 H=8 D=64 fp32 forward 0.95 -> 1.02x torch at N=2048 and 512)
constexpr int64_t kFwdBQ = 128, kFwdBK = 128;
constexpr int64_t kBwdBQ = 128, kBwdBK = 128;
// the backward's delta takes the diagonal of a BQ x BK product of a BK-row padded copy of O
static_assert(kBwdBQ <= kBwdBK, "delta's gemm needs a query block no taller than a key block");

template <typename T>
void forward_impl(const T* q, const T* k, const T* v, const MaskView& mv, T* out, T* lse, int64_t Bn, int64_t Hq,
                  int64_t Hk, int64_t L, int64_t S, int64_t E, int64_t Ev, T scale, bool causal, const Dropout& dp,
                  const Rotary<T>& rot) {
  const int64_t G = Hq / Hk, nqb = (L + kFwdBQ - 1) / kFwdBQ;
  const T ninf = static_cast<T>(kNegInf), inv_keep = static_cast<T>(dp.inv_keep);
  const int64_t ntasks = Bn * Hq * nqb;
  // scratch for the rows a block can have (L < kFwdBQ: L), left uninitialised: every entry read
  // is written first (a zero-filled 64 KiB logit block cost more than a decoding step's work)
  const int64_t rows = std::min(kFwdBQ, L);
  dynamic_tasks(ntasks, Bn * Hq * L * S * (E + Ev) * 2, [&](std::atomic<int64_t>& next) {
    std::unique_ptr<T[]> sbuf(new T[rows * kFwdBK]), acc(new T[rows * std::max<int64_t>(Ev, 1)]);
    std::vector<T> m(rows), l(rows), sh(rows);
    std::vector<T> qrot(rot.cos ? kFwdBQ * E : 0), krot(rot.cos ? kFwdBK * E : 0);  // rotated q/k blocks
    for (int64_t t; (t = next_task(next)) < ntasks;) {
      const int64_t bh = t / nqb, i0 = (t % nqb) * kFwdBQ, b = bh / Hq, h = bh % Hq;
      const int64_t nq = std::min(kFwdBQ, L - i0);
      const T* Q = q + (bh * L + i0) * E;
      if (rot.cos) {  // the query block once per task
        rotate_rows(qrot.data(), Q, nq, E, rot, i0, false);
        Q = qrot.data();
      }
      const T* K = k + (b * Hk + h / G) * S * E;
      const T* V = v + (b * Hk + h / G) * S * Ev;
      std::fill(m.begin(), m.end(), ninf);
      std::fill(sh.begin(), sh.end(), ninf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.get(), acc.get() + nq * Ev, T(0));
      const int64_t kend = causal ? std::min(S, i0 + nq) : S;  // key blocks past the diagonal are skipped
      for (int64_t j0 = 0; j0 < kend; j0 += kFwdBK) {
        const int64_t nk = std::min(kFwdBK, kend - j0);
        T* s = sbuf.get();
        const T* Kb = K + j0 * E;
        if (rot.cos) {  // each key block as it is loaded
          rotate_rows(krot.data(), Kb, nk, E, rot, j0, false);
          Kb = krot.data();
        }
        block_logits<T>(s, kFwdBK, Q, Kb, nq, nk, E, scale, mv, b, h, i0, j0, causal);
        for (int64_t r = 0; r < nq; ++r) {
          T* sr = s + r * kFwdBK;
          const T m_new = std::max(m[r], row_max(sr, nk));
          // the shift is the running max when finite, else 0 (as the reference: a +inf logit then
          // gives NaN exactly where the reference has NaN); sh[r] = -inf: nothing accumulated yet
          const T shift = std::isfinite(m_new) ? m_new : T(0);
          // an unchanged shift (the usual case once the row's max is found) rescales by exactly 1
          const T alpha = (sh[r] == ninf || l[r] == T(0)) ? T(0)
                          : sh[r] == shift               ? T(1)
                                                         : static_cast<T>(std::exp(sh[r] - shift));
          l[r] = l[r] * alpha + exp_shift_sum(sr, nk, shift, T(0));
          m[r] = m_new;
          sh[r] = shift;
          if (alpha != T(1)) {
            T* ar = acc.get() + r * Ev;
            for (int64_t c = 0; c < Ev; ++c) ar[c] *= alpha;
          }
          if (dp.on) {  // the normaliser l uses the undropped probabilities, the accumulator the dropped ones
            const uint32_t rk = dp.row_key(bh * L + i0 + r);
            for (int64_t c = 0; c < nk; ++c) sr[c] = dp.keep(rk, j0 + c) ? sr[c] * inv_keep : T(0);
          }
        }
        if (nq <= kDotRows) {  // acc += P V row by row, the rows of V streamed once per query row
          for (int64_t r = 0; r < nq; ++r) pv_row(acc.get() + r * Ev, s + r * kFwdBK, V + j0 * Ev, nk, Ev);
        } else {
          gemm_rm<T>(false, false, nq, Ev, nk, T(1), s, kFwdBK, V + j0 * Ev, Ev, T(1), acc.get(), Ev);
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        T* o = out + (bh * L + i0 + r) * Ev;
        const T* ar = acc.get() + r * Ev;
        T* st = lse + 2 * (bh * L + i0 + r);
        if (l[r] == T(0)) {  // every key excluded: output 0 (torch would give NaN)
          std::fill(o, o + Ev, T(0));
          st[0] = st[1] = ninf;
        } else {
          const T inv = T(1) / l[r];
          for (int64_t c = 0; c < Ev; ++c) o[c] = ar[c] * inv;
          // lse in two parts (see seqkern/ops/attention.py): the shift and log l
          st[0] = sh[r];
          st[1] = static_cast<T>(std::log(l[r]));
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* dout, const T* q, const T* k, const T* v, const MaskView& mv, const T* out, const T* lse,
                   T* dq, T* dk, T* dv, int64_t Bn, int64_t Hq, int64_t Hk, int64_t L, int64_t S, int64_t E, int64_t Ev,
                   T scale, bool causal, const Dropout& dp, const Rotary<T>& rot) {
  const int64_t G = Hq / Hk;
  const T ninf = static_cast<T>(kNegInf), inv_keep = static_cast<T>(dp.inv_keep);
  const int64_t ntasks = Bn * Hk;
  dynamic_tasks(ntasks, Bn * Hq * L * S * (2 * E + 2 * Ev) * 2, [&](std::atomic<int64_t>& next) {
    std::vector<T> pbuf(kBwdBQ * kBwdBK), dpbuf(kBwdBQ * kBwdBK), delta(G * L), rowdelta(kBwdBQ);
    std::vector<T> opad(kBwdBK * Ev, T(0)), vpad(kBwdBK * Ev, T(0));  // zero rows past the block
    std::vector<T> qrot(rot.cos ? kBwdBQ * E : 0), krot(rot.cos ? kBwdBK * E : 0);  // rotated q/k blocks
    for (int64_t t; (t = next_task(next)) < ntasks;) {
      const int64_t b = t / Hk, hk = t % Hk;
      const T* K = k + t * S * E;
      const T* V = v + t * S * Ev;
      T* dK = dk + t * S * E;
      T* dV = dv + t * S * Ev;
      // delta_i = rowsum(dO * O) = rowsum(P * dP), as the diagonal of dO O^T computed by a gemm of
      // the very shape of dP = dO V^T below (BK columns, rows padded), so that BLAS sums each entry
      // in the same order: where P is one-hot (O = that row of V) dP - delta is then exactly 0, as
      // the reference's dP - rowsum(P * dP) (otherwise ulp(|dO||v|) remains, which dq multiplies by
      // |k|: 4e-5 for logits ~1e4)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bh = b * Hq + hk * G + g;
        for (int64_t i0 = 0; i0 < L; i0 += kBwdBQ) {
          const int64_t nq = std::min(kBwdBQ, L - i0);
          T* dd = dpbuf.data();
          std::copy(out + (bh * L + i0) * Ev, out + (bh * L + i0 + nq) * Ev, opad.begin());
          gemm_rm<T>(false, true, nq, kBwdBK, Ev, T(1), dout + (bh * L + i0) * Ev, Ev, opad.data(), Ev, T(0), dd,
                     kBwdBK);
          for (int64_t r = 0; r < nq; ++r) delta[g * L + i0 + r] = Ev == 0 ? T(0) : dd[r * kBwdBK + r];
        }
      }
      for (int64_t j0 = 0; j0 < S; j0 += kBwdBK) {
        const int64_t nk = std::min(kBwdBK, S - j0);
        // dP's gemm always has BK columns (a short last block reads a zero-padded copy of V): the
        // shape of delta's gemm above
        const T* Vb = V + j0 * Ev;
        if (nk < kBwdBK) {
          std::copy(Vb, Vb + nk * Ev, vpad.begin());
          Vb = vpad.data();
        }
        const T* Kb = K + j0 * E;
        if (rot.cos) {
          rotate_rows(krot.data(), Kb, nk, E, rot, j0, false);
          Kb = krot.data();
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g, bh = b * Hq + h;
          // causal: query blocks entirely above the diagonal of this key block see none of it
          const int64_t istart = causal ? (j0 / kBwdBQ) * kBwdBQ : 0;
          for (int64_t i0 = istart; i0 < L; i0 += kBwdBQ) {
            const int64_t nq = std::min(kBwdBQ, L - i0);
            const T* Q = q + (bh * L + i0) * E;
            if (rot.cos) {
              rotate_rows(qrot.data(), Q, nq, E, rot, i0, false);
              Q = qrot.data();
            }
            const T* dO = dout + (bh * L + i0) * Ev;
            T* P = pbuf.data();
            T* dP = dpbuf.data();
            block_logits<T>(P, kBwdBK, Q, Kb, nq, nk, E, scale, mv, b, h, i0, j0, causal);
            T* dlt = rowdelta.data();
            for (int64_t r = 0; r < nq; ++r) {
              T* pr = P + r * kBwdBK;
              // P = exp((s - m) - log l): s is bit-identical to the forward's and m is the shift the
              // forward subtracted, so s - m cancels exactly (fp32 logits ~1e4 keep full precision)
              const T hi = lse[2 * (bh * L + i0 + r)], lo = lse[2 * (bh * L + i0 + r) + 1];
              dlt[r] = delta[g * L + i0 + r];
              if (std::isfinite(hi) && std::isfinite(lo)) {
                exp_shift_sum(pr, nk, hi, lo);
              } else if (lo != lo) {
                // a NaN logit: the reference's shift is 0 and it divides by 1, not l (NaN), so
                // autograd gives P = exp(s), dS = P * dP
                exp_row(pr, nk);
                dlt[r] = T(0);
              } else if (lo == -ninf) {
                // a +inf logit: P = exp(s) / inf, NaN there and 0 elsewhere (delta is NaN from O)
                exp_row(pr, nk);
                for (int64_t c = 0; c < nk; ++c) pr[c] *= T(0);
              } else {  // fully masked row: P = 0, so no gradient flows through it
                std::fill(pr, pr + nk, T(0));
              }
            }
            gemm_rm<T>(false, true, nq, kBwdBK, Ev, T(1), dO, Ev, Vb, Ev, T(0), dP, kBwdBK);
            if (Ev == 0)
              for (int64_t r = 0; r < nq; ++r) std::fill(dP + r * kBwdBK, dP + r * kBwdBK + nk, T(0));
            for (int64_t r = 0; r < nq; ++r) {
              T* pr = P + r * kBwdBK;
              T* dr = dP + r * kBwdBK;
              const T dl = dlt[r];
              if (dp.on) {  // dS = P * (Z dP - delta); dV takes Z P
                const uint32_t rk = dp.row_key(bh * L + i0 + r);
                for (int64_t c = 0; c < nk; ++c) {
                  const T z = dp.keep(rk, j0 + c) ? inv_keep : T(0);
                  dr[c] = pr[c] * (dr[c] * z - dl);
                  pr[c] *= z;
                }
              } else {
#pragma omp simd
                for (int64_t c = 0; c < nk; ++c) dr[c] = pr[c] * (dr[c] - dl);
              }
            }
            gemm_rm<T>(true, false, nk, Ev, nq, T(1), P, kBwdBK, dO, Ev, T(1), dV + j0 * Ev, Ev);
            gemm_rm<T>(true, false, nk, E, nq, scale, dP, kBwdBK, Q, E, T(1), dK + j0 * E, E);
            gemm_rm<T>(false, false, nq, E, nk, scale, dP, kBwdBK, Kb, E, T(1), dq + (bh * L + i0) * E, E);
          }
        }
      }
      if (rot.cos) {  // gradients of the rotated q/k -> of q/k; this task owns these rows
        rotate_rows(dK, dK, S, E, rot, 0, true);
        for (int64_t g = 0; g < G; ++g) {
          T* dQ = dq + (b * Hq + hk * G + g) * L * E;
          rotate_rows(dQ, dQ, L, E, rot, 0, true);
        }
      }
    }
  });
}

// contiguous cos/sin (the binding checked them), or undefined tensors without rotary
std::pair<at::Tensor, at::Tensor> rotary_tables(const std::optional<at::Tensor>& cos,
                                                const std::optional<at::Tensor>& sin) {
  if (!cos.has_value() || !cos->defined()) return {};
  return {cos->contiguous(), sin->contiguous()};
}

template <typename T>
Rotary<T> rotary_of(const at::Tensor& cos, const at::Tensor& sin) {
  Rotary<T> r;
  if (cos.defined()) {
    r.cos = cos.const_data_ptr<T>();
    r.sin = sin.const_data_ptr<T>();
    r.half = cos.size(1);
  }
  return r;
}

MaskView mask_view(const std::optional<at::Tensor>& mask, int64_t Bn, int64_t Hq, int64_t L, int64_t S) {
  MaskView mv;
  if (mask.has_value() && mask->defined()) {
    // broadcast dims get stride 0: the kernel reads the caller's small mask in place
    const at::Tensor m = mask->expand({Bn, Hq, L, S});
    mv.data = m.data_ptr();
    mv.sb = m.stride(0);
    mv.sh = m.stride(1);
    mv.sl = m.stride(2);
    mv.ss = m.stride(3);
  }
  return mv;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sdpa_forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                const std::optional<at::Tensor>& mask, double dropout_p,
                                                bool is_causal, double scale, int64_t seed,
                                                const std::optional<at::Tensor>& cos_,
                                                const std::optional<at::Tensor>& sin_) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const std::pair<at::Tensor, at::Tensor> rot = rotary_tables(cos_, sin_);
  const int64_t Bn = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3), Hk = k.size(1), S = k.size(2),
                Ev = v.size(3);
  at::Tensor out = at::empty({Bn, Hq, L, Ev}, q.options());
  at::Tensor lse = at::empty({Bn, Hq, L, 2}, q.options());
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const MaskView mv = mask_view(mask, Bn, Hq, L, S);
  const Dropout dp(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "seqkern_sdpa_forward", [&] {
    forward_impl<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                           mv, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), Bn, Hq, Hk, L, S, E, Ev,
                           static_cast<scalar_t>(scale), is_causal, dp, rotary_of<scalar_t>(rot.first, rot.second));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(const at::Tensor& dout_, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const std::optional<at::Tensor>& mask,
                                                             const at::Tensor& out_, const at::Tensor& lse_,
                                                             double dropout_p, bool is_causal, double scale,
                                                             int64_t seed, const std::optional<at::Tensor>& cos_,
                                                             const std::optional<at::Tensor>& sin_) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), dout = dout_.contiguous(),
                   out = out_.contiguous(), lse = lse_.contiguous();
  const std::pair<at::Tensor, at::Tensor> rot = rotary_tables(cos_, sin_);
  const int64_t Bn = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3), Hk = k.size(1), S = k.size(2),
                Ev = v.size(3);
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  if (L == 0 || S == 0 || Bn == 0 || Hk == 0) return {dq, dk, dv};
  const MaskView mv = mask_view(mask, Bn, Hq, L, S);
  const Dropout dp(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "seqkern_sdpa_backward", [&] {
    backward_impl<scalar_t>(dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                            k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), mv,
                            out.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                            dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), Bn, Hq, Hk, L, S, E, Ev,
                            static_cast<scalar_t>(scale), is_causal, dp, rotary_of<scalar_t>(rot.first, rot.second));
  });
  return {dq, dk, dv};
}

}  // namespace seqkern::cpu
