// RNN / LSTM / GRU on the CPU.
//
// Forward: the input half of every gate for all steps is one GEMM (biases folded in);
// then per step one recurrent GEMM (BLAS straight into a preallocated buffer, no ATen
// dispatch in the loop) and one fused gate kernel, parallel over batch rows. Batch 1 in fp32
// (lstm, rnn) has its own loop, the steps being matrix-vector products (forward_gemv).
// Backward walks the steps in reverse: per step one fused gate-gradient kernel and one
// GEMM back through W_hh; without a projection dx and the weight and bias gradients are
// computed inside the loop every few steps (a chunk) from the cache-hot gate gradients; with
// a projection they are large GEMMs over all steps and column sums after it (either way no
// atomics, deterministic).
//
// Step s of batch row b works on time index t(s, b) (reverse / lengths; see
// seqkern/ops/rnn.py). Everything the backward needs is stored in step order, so each
// step's rows are contiguous for the GEMMs; y and the input projection are in time order.
#include "cpu/rnn.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// MKL / OpenBLAS export the Fortran BLAS from libtorch_cpu on most builds. Weak, so an
// extension loads everywhere; when absent the GEMMs go through ATen (slower per call).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace seqkern::cpu {
namespace {

// ---------------------------------------------------------------------------
// GEMM on row-major raw pointers: C (MxN) = alpha * op(A) (MxK) @ op(B) (KxN) + beta * C
// ---------------------------------------------------------------------------

template <typename T>
void gemm_aten(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
               int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t r, int64_t c, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {r, c}, {ld, 1}, opt);
  };
  at::Tensor a = ta ? view(A, K, M, lda).t() : view(A, M, K, lda);
  at::Tensor b = tb ? view(B, N, K, ldb).t() : view(B, K, N, ldb);
  at::Tensor c = view(C, M, N, ldc);
  c.addmm_(a, b, beta, alpha);  // beta == 0 ignores C, NaNs included
}

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
void blas_gemm<double>(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                       const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                       const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  return dgemm_ != nullptr;
}

template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
          T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // empty sum: BLAS would still read A/B leading dimensions; do it by hand
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const int64_t big = std::max({M, N, K, lda, ldb, ldc});
  if (!have_blas<T>() || big > INT_MAX) {
    gemm_aten(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  // row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  blas_gemm<T>(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

// ---------------------------------------------------------------------------
// activations that vectorise: fp32 uses a polynomial exp (Cephes, ~1 ulp) that the
// compiler turns into SIMD code inside `omp simd` loops; fp64 keeps libm for accuracy.
// ---------------------------------------------------------------------------

inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // round to nearest by adding 1.5 * 2^23: plain arithmetic, so the loop vectorises
  // (std::floor keeps it scalar unless -fno-trapping-math)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline float tanh_(float x) { return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f); }
inline double tanh_(double x) { return std::tanh(x); }

// ---------------------------------------------------------------------------
// shapes, step order, workspace layout
// ---------------------------------------------------------------------------

struct Shape {
  Cell cell;
  int64_t T, B, I, H, P, G;
  bool proj() const { return P < H; }
  int64_t GH() const { return G * H; }
};

inline int64_t time_of(int64_t s, int64_t L, bool reverse) { return (reverse && s < L) ? L - 1 - s : s; }

// Pointers into the flat workspace (DESIGN of the layout: seqkern/ops/rnn.py workspace_numel).
template <typename T>
struct Workspace {
  T* gates = nullptr;  // (T, B, G*H) after activation (lstm, gru)
  T* c = nullptr;      // (T+1, B, H) lstm cell states
  T* h = nullptr;      // (T+1, B, P) hidden states, h[0] = h0
  T* hc = nullptr;     // (T, B, H) lstm o*tanh(c) when projecting
  T* hn = nullptr;     // (T, B, H) gru W_hn h + b_hn
  Workspace(const Shape& d, T* base) {
    const int64_t TB = d.T * d.B, B = d.B;
    T* p = base;
    if (d.cell == Cell::kLSTM) {
      gates = p; p += TB * 4 * d.H;
      c = p; p += (d.T + 1) * B * d.H;
      h = p; p += (d.T + 1) * B * d.P;
      if (d.proj()) { hc = p; p += TB * d.H; }
    } else if (d.cell == Cell::kGRU) {
      gates = p; p += TB * 3 * d.H;
      hn = p; p += TB * d.H;
      h = p; p += (d.T + 1) * B * d.H;
    } else {
      h = p; p += (d.T + 1) * B * d.H;
    }
  }
};

int64_t numel_of(const Shape& d, bool save) {
  if (!save) return 0;
  const int64_t TB = d.T * d.B, T1B = (d.T + 1) * d.B;
  if (d.cell == Cell::kLSTM) return TB * 4 * d.H + T1B * d.H + T1B * d.P + (d.proj() ? TB * d.H : 0);
  if (d.cell == Cell::kGRU) return TB * 4 * d.H + T1B * d.H;
  return T1B * d.H;
}

int64_t row_grain(const Shape& d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d.GH())); }

// Big buffers written once per call (workspace, gate gradients) come fresh from mmap each
// time: ask for 2 MiB pages on the whole-page interior, so the first writes take a few
// hundred page faults instead of one per 4 KiB.
inline void advise_huge(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // advice only: failure is harmless
#else
  (void)p; (void)bytes;
#endif
}

// The saving forward's workspace (tens of MiB for a training-size layer) is kept after the
// call and handed to the next call of the same size once nothing holds it any more (autograd
// drops it when its backward has run): a fresh mapping costs the kernel's zeroing of every
// page at its first touch, and those faults, taken inside the step loop, stall both threads
// at the next barrier. One buffer per process: a training loop's layer reuses the previous
// iteration's; a call that finds it busy gets fresh memory. The buffer is lent as a tensor
// whose deleter marks it free, so whatever keeps the tensor or a view of it (saved for
// backward, retain_graph, a Python reference) keeps it busy. Each loan is reported to the
// profiler's memory events as an allocation and its return as a free, so peak-memory
// measurements see it as they see any other allocation.
struct KeptBuffer {
  std::mutex mu;
  void* mem = nullptr;
  size_t bytes = 0;
  bool busy = false;
};

// Lends kb's memory as a tensor of n elements, or fresh memory when kb is busy or the size is
// over `cap`. exact: kb is remade unless its size matches (the workspace: one size per layer);
// else it only grows (scratch of calls of different lengths).
at::Tensor kept_alloc(KeptBuffer& kb, int64_t n, const at::TensorOptions& opt, size_t elem, bool exact, size_t cap) {
  const size_t bytes = size_t(n) * elem;
  if (bytes <= cap) {
    std::lock_guard<std::mutex> lock(kb.mu);
    if (!kb.busy) {
      if (exact ? kb.bytes != bytes : kb.bytes < bytes) {
        c10::free_cpu(kb.mem);
        kb.mem = nullptr;
        kb.bytes = 0;
        kb.mem = c10::alloc_cpu(bytes);
        kb.bytes = bytes;
        advise_huge(kb.mem, bytes);
      }
      kb.busy = true;
      c10::profiledCPUMemoryReporter().New(kb.mem, bytes);
      return at::from_blob(kb.mem, {n}, [&kb](void* p) {
        c10::profiledCPUMemoryReporter().Delete(p);
        std::lock_guard<std::mutex> lock(kb.mu);
        kb.busy = false;
      }, opt);
    }
  }
  at::Tensor t = at::empty({n}, opt);
  advise_huge(t.data_ptr(), bytes);
  return t;
}

at::Tensor workspace_alloc(int64_t n, const at::TensorOptions& opt, size_t elem) {
  if (size_t(n) * elem < (size_t(1) << 22)) return at::empty({n}, opt);  // small: malloc's heap serves it
  static KeptBuffer& kb = *new KeptBuffer();  // never destroyed: a lent buffer may come back at exit
  return kept_alloc(kb, n, opt, elem, true, SIZE_MAX);
}

template <typename T>
inline void copy_row(T* dst, const T* src, int64_t n) { std::memcpy(dst, src, n * sizeof(T)); }
template <typename T>
inline void zero_row(T* dst, int64_t n) { std::memset(dst, 0, n * sizeof(T)); }

// Gate gradients of step s, batch row b, hidden units [j0, j0 + nj): one body for the whole-row
// backward and the thread-sliced one. dh = da + db (two rows, so the loop has no branch); dg: the
// step's gradients of the pre-activations (a G*H row); dgt: the same in time order (gru: its n gate
// without r; the other cells copy dg when `separate`); dc: lstm cell-gradient row, updated in place;
// dnext: gru's direct term dh * z. Every row pointer is at unit 0 of its row.
template <typename T>
void gate_grads(const Shape& d, const Workspace<T>& ws, int64_t s, int64_t b, const T* da, const T* db, T* dg,
                T* dgt, bool separate, T* dc, T* dnext, int64_t j0, int64_t nj) {
  const int64_t H = d.H, B = d.B, GH = d.GH(), j1 = j0 + nj;
  if (d.cell == Cell::kLSTM) {
    const T* gr = ws.gates + (s * B + b) * GH;
    const T* cn = ws.c + ((s + 1) * B + b) * H;
    const T* cp = ws.c + (s * B + b) * H;
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      const T dhv = da[j] + db[j];
      const T i = gr[j], f = gr[H + j], g = gr[2 * H + j], o = gr[3 * H + j];
      const T tc = tanh_(cn[j]);
      const T dcv = dc[j] + dhv * o * (T(1) - tc * tc);
      dg[j] = dcv * g * i * (T(1) - i);
      dg[H + j] = dcv * cp[j] * f * (T(1) - f);
      dg[2 * H + j] = dcv * i * (T(1) - g * g);
      dg[3 * H + j] = dhv * tc * o * (T(1) - o);
      dc[j] = dcv * f;
    }
  } else if (d.cell == Cell::kGRU) {
    const T* gr = ws.gates + (s * B + b) * GH;
    const T* hnr = ws.hn + (s * B + b) * H;
    const T* hp = ws.h + (s * B + b) * H;
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      const T dhv = da[j] + db[j];
      const T r = gr[j], z = gr[H + j], n = gr[2 * H + j];
      const T dn = dhv * (T(1) - z) * (T(1) - n * n);
      const T dz = dhv * (hp[j] - n) * z * (T(1) - z);
      const T dr = dn * hnr[j] * r * (T(1) - r);
      dg[j] = dr; dg[H + j] = dz; dg[2 * H + j] = dn * r;
      dgt[j] = dr; dgt[H + j] = dz; dgt[2 * H + j] = dn;
      dnext[j] = dhv * z;
    }
    return;  // dgt written above
  } else {
    const T* hn = ws.h + ((s + 1) * B + b) * H;
    if (d.cell == Cell::kRNNTanh) {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) dg[j] = (da[j] + db[j]) * (T(1) - hn[j] * hn[j]);
    } else {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) dg[j] = hn[j] > T(0) ? da[j] + db[j] : T(0);
    }
  }
  if (separate)
    for (int64_t g = 0; g < d.G; ++g) copy_row(dgt + g * H + j0, dg + g * H + j0, nj);
}

// One GRU row: gates (in place, pre-activation in, activations out), W_hn h + b_hn, new h.
// A free function with plain pointer arguments: inside the lambda gcc would not vectorise it.
template <typename T>
void gru_gates(T* __restrict gr, const T* __restrict xr, const T* __restrict hp, const T* __restrict b_hn,
               T* __restrict hn_out, T* __restrict h_out, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid(gr[j] + xr[j]);
    const T z = sigmoid(gr[H + j] + xr[H + j]);
    const T hn = gr[2 * H + j] + b_hn[j];
    const T n = tanh_(xr[2 * H + j] + r * hn);
    gr[j] = r; gr[H + j] = z; gr[2 * H + j] = n;
    hn_out[j] = hn;
    h_out[j] = (T(1) - z) * n + z * hp[j];
  }
}

// ---------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------

// Per-step buffers: the workspace when saving, else small rolling buffers.
template <typename T>
struct StepBuffers {
  const Shape& d;
  bool save;
  Workspace<T> ws;
  at::Tensor own;  // rolling storage when not saving
  T *g1 = nullptr, *hc1 = nullptr, *hn1 = nullptr, *h2 = nullptr, *c2 = nullptr;
  StepBuffers(const Shape& d_, bool save_, T* base, const at::TensorOptions& opt)
      : d(d_), save(save_), ws(d_, base) {
    if (save) return;
    const int64_t B = d.B, H = d.H;
    own = at::empty({B * d.GH() + 2 * B * H + 2 * B * d.P + 2 * B * H}, opt);
    T* p = own.data_ptr<T>();
    g1 = p; p += B * d.GH();
    hc1 = p; p += B * H;
    hn1 = p; p += B * H;
    h2 = p; p += 2 * B * d.P;
    c2 = p;
  }
  T* gates(int64_t s) { return save ? ws.gates + s * d.B * d.GH() : g1; }
  T* h(int64_t s) { return save ? ws.h + s * d.B * d.P : h2 + (s & 1) * d.B * d.P; }
  T* c(int64_t s) { return save ? ws.c + s * d.B * d.H : c2 + (s & 1) * d.B * d.H; }
  T* hc(int64_t s) { return save ? ws.hc + s * d.B * d.H : hc1; }
  T* hn(int64_t s) { return save ? ws.hn + s * d.B * d.H : hn1; }
};

// ---------------------------------------------------------------------------
// persistent step loop (no projection): one team of threads runs all steps. Each thread
// owns a slice of hidden units, 16 at a time, and everything of those units: the gate
// columns of its units (so the gate fusion needs nothing of the others) and, in the
// backward, the columns of dh for its units. Its slice of W_hh is packed once and stays in
// its L2 across steps; the only sync per step is one spin barrier (all of h, or of the
// gate gradients, is read by every thread). The per-step GEMMs are the tile kernels below:
// each output column is one sequential fused multiply-add chain over k, whatever the slice
// or tile it falls in, so the results do not depend on the number of threads.
// ---------------------------------------------------------------------------

constexpr int64_t kLanes = 16;  // columns per packed block: one zmm of fp32

// One 16-column block of a tile: weights (K rows of 16, ldw apart: packed, or 16 columns of a
// row-major matrix), output and optional addend (both with the tile's ldc; the addend is read
// before the output is written, so they may alias), valid columns n (<= 16; lanes past n are
// read, so the 16 columns must lie inside the allocation, and are never stored).
template <typename T>
struct Blk {
  const T* w;
  T* c;
  const T* add;
  int n;
  int64_t ldw = kLanes;
};

// The left operand of a tile: rows of A1 (K1 columns) then rows of A2 (K2 columns), as if
// side by side (the forward's [x_t | h] against the packed [W_ih | W_hh] rows). Element (r, k)
// of a segment is at r * ld + k * ks: ks > 1 reads a transposed matrix (the weight gradients'
// features are the columns of x and h).
template <typename T>
struct Lhs {
  const T* a1;
  int64_t ld1, k1;
  const T* a2;
  int64_t ld2, k2;
  int64_t ks = 1;
  Lhs rows_from(int64_t r) const { return {a1 + r * ld1, ld1, k1, a2 + r * ld2, ld2, k2, ks}; }
};

// C[r][col] = add[r][col] + sum_k A[r][k] * W[k][col] for R rows and NB blocks, in registers.
template <typename T, int R, int NB>
void tile(const Lhs<T>& A, const Blk<T>* blk, int64_t ldc) {
  T acc[R][NB][kLanes];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NB; ++q)
      for (int l = 0; l < kLanes; ++l)
        acc[r][q][l] = (blk[q].add && l < blk[q].n) ? blk[q].add[r * ldc + l] : T(0);
  for (int seg = 0; seg < 2; ++seg) {
    const T* a = seg ? A.a2 : A.a1;
    const int64_t lda = seg ? A.ld2 : A.ld1, K = seg ? A.k2 : A.k1, k0 = seg ? A.k1 : 0;
    for (int64_t k = 0; k < K; ++k)
      for (int q = 0; q < NB; ++q) {
        const T* w = blk[q].w + (k0 + k) * blk[q].ldw;
        for (int r = 0; r < R; ++r) {
          const T av = a[r * lda + k * A.ks];
#pragma omp simd
          for (int l = 0; l < kLanes; ++l) acc[r][q][l] = std::fma(av, w[l], acc[r][q][l]);
        }
      }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NB; ++q)
      for (int l = 0; l < blk[q].n; ++l) blk[q].c[r * ldc + l] = acc[r][q][l];
}

#if defined(__AVX512F__)
// fp32 with AVX-512: the same chain per column (fma == _mm512_fmadd_ps), accumulators
// pinned in zmm registers (R * NB <= 24), the row value broadcast from memory.
// Packed: the strides of the per-step GEMMs, fixed at compile time; else those given (the
// weight gradients). Always inlined: out of line the accumulators would live in memory (the
// per-step GEMMs ran at half speed when the two instances stopped being inlined).
// The rows are read off one pointer per 3 rows, row 3j + m at p[j] + m * lda bytes (the
// scaled-index address): 4 pointers and one stride for 12 rows. Written as A[r * lda + k],
// the compiler kept one pointer per row and, short of registers, reloaded 8-12 of them from
// the stack every k.
template <int R, int NB, bool Packed>
__attribute__((always_inline)) inline void tile_f32_seg(const float* __restrict A, int64_t lda, int64_t ks_, int64_t K,
                                                        const float* const* w, int64_t ldw_, __m512 (&acc)[R][NB]) {
  const int64_t ks = Packed ? 1 : ks_, ldw = Packed ? kLanes : ldw_;
  constexpr int NP = (R + 2) / 3;
  const char* p[NP];
  for (int j = 0; j < NP; ++j) p[j] = reinterpret_cast<const char*>(A + 3 * j * lda);
  const int64_t L = lda * int64_t(sizeof(float)), step = ks * int64_t(sizeof(float));
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NB];
    for (int q = 0; q < NB; ++q) wv[q] = _mm512_loadu_ps(w[q] + k * ldw);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(*reinterpret_cast<const float*>(p[r / 3] + (r % 3) * L));
      for (int q = 0; q < NB; ++q) acc[r][q] = _mm512_fmadd_ps(a, wv[q], acc[r][q]);
    }
    for (int j = 0; j < NP; ++j) p[j] += step;
  }
}

template <int R, int NB>
void tile_f32(const Lhs<float>& A, const Blk<float>* blk, int64_t ldc) {
  __m512 acc[R][NB];
  __mmask16 m[NB];
  const float* w[NB];
  for (int q = 0; q < NB; ++q) {
    m[q] = static_cast<__mmask16>((1u << blk[q].n) - 1u);
    w[q] = blk[q].w;
    for (int r = 0; r < R; ++r)
      acc[r][q] = blk[q].add ? _mm512_maskz_loadu_ps(m[q], blk[q].add + r * ldc) : _mm512_setzero_ps();
  }
  const int64_t ldw = blk[0].ldw;  // one stride for the tile's blocks
  if (ldw == kLanes && A.ks == 1) {
    if (A.k1 > 0) {
      tile_f32_seg<R, NB, true>(A.a1, A.ld1, 1, A.k1, w, kLanes, acc);
      for (int q = 0; q < NB; ++q) w[q] += A.k1 * kLanes;
    }
    tile_f32_seg<R, NB, true>(A.a2, A.ld2, 1, A.k2, w, kLanes, acc);
  } else {
    tile_f32_seg<R, NB, false>(A.a1, A.ld1, A.ks, A.k1, w, ldw, acc);
    for (int q = 0; q < NB; ++q) w[q] += A.k1 * ldw;
    tile_f32_seg<R, NB, false>(A.a2, A.ld2, A.ks, A.k2, w, ldw, acc);
  }
  for (int q = 0; q < NB; ++q)
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(blk[q].c + r * ldc, m[q], acc[r][q]);
}
#endif

template <typename T, int R, int NB>
inline void tile_any(const Lhs<T>& A, const Blk<T>* blk, int64_t ldc) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) tile_f32<R, NB>(A, blk, ldc);
  else tile<T, R, NB>(A, blk, ldc);
#else
  tile<T, R, NB>(A, blk, ldc);
#endif
}

constexpr int kMaxRows = 12;  // rows per tile: 12 x 2 blocks = 24 accumulators

template <typename T, int NB>
void tile_rows(int R, const Lhs<T>& A, const Blk<T>* blk, int64_t ldc) {
  switch (R) {
#define SEQKERN_TILE_CASE(r) \
  case r: tile_any<T, r, NB>(A, blk, ldc); break;
    SEQKERN_TILE_CASE(1) SEQKERN_TILE_CASE(2) SEQKERN_TILE_CASE(3) SEQKERN_TILE_CASE(4)
    SEQKERN_TILE_CASE(5) SEQKERN_TILE_CASE(6) SEQKERN_TILE_CASE(7) SEQKERN_TILE_CASE(8)
    SEQKERN_TILE_CASE(9) SEQKERN_TILE_CASE(10) SEQKERN_TILE_CASE(11) SEQKERN_TILE_CASE(12)
#undef SEQKERN_TILE_CASE
    default: TORCH_CHECK(false, "seqkern rnn: bad tile height ", R);
  }
}

// C (M rows, the columns of blk) = A (M x K) @ packed blocks (+ addend). Chunks of 4 blocks,
// each swept over all row tiles while its weights are in cache. Few rows get 4 blocks per
// tile (a 1-row tile needs 4 independent chains to hide the FMA latency).
template <typename T>
void tiles(const Lhs<T>& A, int64_t M, const std::vector<Blk<T>>& blk, int64_t ldc) {
  const int64_t nb = static_cast<int64_t>(blk.size());
  for (int64_t q0 = 0; q0 < nb; q0 += 4) {
    const int64_t q1 = std::min(nb, q0 + 4);
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
      const int R = static_cast<int>(std::min<int64_t>(kMaxRows, M - r0));
      const Lhs<T> a = A.rows_from(r0);
      Blk<T> b[4];
      for (int64_t q = q0; q < q1; ++q) {
        b[q - q0] = blk[q];
        b[q - q0].c += r0 * ldc;
        if (b[q - q0].add) b[q - q0].add += r0 * ldc;
      }
      int64_t q = 0;
      const int64_t n = q1 - q0;
      if (R <= 6 && n == 4) {
        switch (R) {
          case 1: tile_any<T, 1, 4>(a, b, ldc); break;
          case 2: tile_any<T, 2, 4>(a, b, ldc); break;
          case 3: tile_any<T, 3, 4>(a, b, ldc); break;
          case 4: tile_any<T, 4, 4>(a, b, ldc); break;
          case 5: tile_any<T, 5, 4>(a, b, ldc); break;
          default: tile_any<T, 6, 4>(a, b, ldc); break;
        }
        q = 4;
      }
      for (; q + 2 <= n; q += 2) tile_rows<T, 2>(R, a, &b[q], ldc);
      for (; q < n; ++q) tile_rows<T, 1>(R, a, &b[q], ldc);
    }
  }
}

// Barrier for the threads of one call, in two halves: arrive() says this thread's share of
// the step is written, wait() returns once every thread has arrived, so a thread can do work
// that needs nothing of the others between the two instead of spinning (a split barrier: a
// partner that is late by less than that work costs nothing). A thread that runs several
// slices arrives once with their count, so a team smaller than the slice count (or a
// nested, serial call) still meets. Spins briefly, then yields: the machine may have more
// threads than cores.
struct SpinBarrier {
  alignas(64) std::atomic<int64_t> count{0};
  alignas(64) std::atomic<int64_t> gen{0};
  int64_t total;
  explicit SpinBarrier(int64_t n) : total(n) {}
  // returns the generation to wait() on
  int64_t arrive(int64_t w) {
    const int64_t g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(w, std::memory_order_acq_rel) + w == total) {
      count.store(0, std::memory_order_relaxed);
      gen.fetch_add(1, std::memory_order_release);
    }
    return g;
  }
  void wait(int64_t g) const {
    for (int spins = 0; gen.load(std::memory_order_acquire) == g; ++spins) {
      if (spins < 1000) {
#if defined(__x86_64__)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
};

// Unit slices: 16-unit blocks split evenly over the threads. A step of little work (small
// batch) runs on one thread: its barrier would cost more than the split saves, and far
// more when the cores are shared (a descheduled partner stalls every step), unless the
// packed weights are too big for one core's L2 (then a step streams them from L3).
struct Slices {
  int64_t nub, ns;
  Slices(int64_t H, int64_t step_flops, int64_t weight_bytes) : nub((H + kLanes - 1) / kLanes) {
    const int64_t by_work = std::max({int64_t(1), step_flops >> 21, weight_bytes >> 19});
    ns = std::max<int64_t>(1, std::min({int64_t(at::get_num_threads()), nub, by_work}));
  }
  int64_t u0(int64_t i) const { return i * nub / ns; }
  int64_t u1(int64_t i) const { return (i + 1) * nub / ns; }
  int64_t max_units() const { return (nub + ns - 1) / ns * kLanes; }
};

// For every step: pre(slice, step) for all slices, arrive at the barrier, mid(slice, step)
// (work that needs nothing the other slices write in this step), wait for the others, then
// post(slice, step); last, mid(slice, steps), no barrier after it.
template <typename F1, typename F2, typename F3>
void run_slices(const Slices& sl, int64_t steps, const F1& pre, const F2& mid, const F3& post) {
  SpinBarrier bar(sl.ns);
  at::parallel_for(0, sl.ns, 1, [&](int64_t i0, int64_t i1) {
    const bool meet = i1 - i0 < sl.ns;
    for (int64_t s = 0; s < steps; ++s) {
      for (int64_t i = i0; i < i1; ++i) pre(i, s);
      const int64_t g = meet ? bar.arrive(i1 - i0) : 0;
      for (int64_t i = i0; i < i1; ++i) mid(i, s);
      if (meet) bar.wait(g);
      for (int64_t i = i0; i < i1; ++i) post(i, s);
    }
    for (int64_t i = i0; i < i1; ++i) mid(i, steps);
  });
}

// Forward packing: block (u, g) holds the rows g*H + 16u + l (zero rows past H) of W_ih
// (I columns; I = 0 when the input projection is done beforehand) then of W_hh (P columns).
template <typename T>
at::Tensor pack_forward(const T* w_ih, int64_t I, const T* w_hh, int64_t G, int64_t H, int64_t P, int64_t nub,
                        const at::TensorOptions& opt) {
  const int64_t K = I + P;
  at::Tensor out = at::empty({nub * G * kLanes * K}, opt);
  T* o = out.data_ptr<T>();
  at::parallel_for(0, nub * G, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t u = q / G, g = q % G;
      T* ob = o + q * K * kLanes;
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t j = u * kLanes + l;
        for (int64_t k = 0; k < I; ++k) ob[k * kLanes + l] = j < H ? w_ih[(g * H + j) * I + k] : T(0);
        for (int64_t k = 0; k < P; ++k) ob[(I + k) * kLanes + l] = j < H ? w_hh[(g * H + j) * P + k] : T(0);
      }
    }
  });
  return out;
}

// Backward packing: block u holds W_hh columns 16u + l (zero past P), K = G*H.
template <typename T>
at::Tensor pack_backward(const T* w_hh, int64_t GH, int64_t P, int64_t nub, const at::TensorOptions& opt) {
  at::Tensor out = at::empty({nub * kLanes * GH}, opt);
  T* o = out.data_ptr<T>();
  at::parallel_for(0, nub, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      T* ob = o + u * GH * kLanes;
      for (int64_t k = 0; k < GH; ++k)
        for (int64_t l = 0; l < kLanes; ++l) {
          const int64_t j = u * kLanes + l;
          ob[k * kLanes + l] = j < P ? w_hh[k * P + j] : T(0);
        }
    }
  });
  return out;
}

// Gate fusions of n units of one row; a: the GEMM's gate columns (stride sa between gates),
// x: the input projection's (stride sx), gs: where the activations are kept (stride sg).
template <typename T>
void lstm_fuse(const T* __restrict a, int64_t sa, const T* __restrict x, int64_t sx, T* __restrict gs, int64_t sg,
               const T* __restrict cp, T* __restrict cn, T* __restrict h, T* __restrict yo, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T i = sigmoid(a[j] + x[j]);
    const T f = sigmoid(a[sa + j] + x[sx + j]);
    const T g = tanh_(a[2 * sa + j] + x[2 * sx + j]);
    const T o = sigmoid(a[3 * sa + j] + x[3 * sx + j]);
    const T c = f * cp[j] + i * g;
    const T hv = o * tanh_(c);
    gs[j] = i; gs[sg + j] = f; gs[2 * sg + j] = g; gs[3 * sg + j] = o;
    cn[j] = c;
    h[j] = hv;
    yo[j] = hv;
  }
}

template <typename T>
void gru_fuse(const T* __restrict a, int64_t sa, const T* __restrict x, int64_t sx, T* __restrict gs, int64_t sg,
              const T* __restrict b_hn, const T* __restrict hp, T* __restrict hn_out, T* __restrict h,
              T* __restrict yo, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T r = sigmoid(a[j] + x[j]);
    const T z = sigmoid(a[sa + j] + x[sx + j]);
    const T hn = a[2 * sa + j] + b_hn[j];
    const T nn = tanh_(x[2 * sx + j] + r * hn);
    const T hv = (T(1) - z) * nn + z * hp[j];
    gs[j] = r; gs[sg + j] = z; gs[2 * sg + j] = nn;
    hn_out[j] = hn;
    h[j] = hv;
    yo[j] = hv;
  }
}

template <typename T>
void rnn_fuse(const T* __restrict a, const T* __restrict x, T* __restrict h, T* __restrict yo, int64_t n, bool relu) {
  if (relu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h[j] = yo[j] = std::max(a[j] + x[j], T(0));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h[j] = yo[j] = tanh_(a[j] + x[j]);
  }
}

// xw: the input projection of all steps (biases in), or null: then each step's GEMM takes
// [x_t | h] against [W_ih | W_hh] (fused: the (T, B, G*H) projection never goes through
// memory), and `bias` (G*H) is added in the gate fusion.
template <typename T>
void forward_persistent(const Shape& d, const T* xw, const T* x, const T* w_ih, const T* bias, const T* w_hh,
                        const T* b_hn, const int64_t* len, bool reverse, StepBuffers<T>& buf, T* y,
                        const at::TensorOptions& opt) {
  const int64_t B = d.B, H = d.H, G = d.G, GH = d.GH(), Tn = d.T;
  const int64_t I = xw ? 0 : d.I;
  const Slices sl(H, 2 * B * GH * (H + I), GH * (H + I) * int64_t(sizeof(T)));
  const at::Tensor packed = pack_forward(w_ih, I, w_hh, G, H, H, sl.nub, opt);
  const T* wp = packed.data_ptr<T>();
  const int64_t su = sl.max_units(), ldl = G * su;
  const at::Tensor local_t = at::empty({sl.ns * B * ldl}, opt);  // each slice's gate columns
  T* local = local_t.data_ptr<T>();
  // rows of x_t gathered per slice when lengths or reverse give each row its own time
  const bool gather = I > 0 && (len || reverse);
  const at::Tensor xg_t = at::empty({gather ? sl.ns * B * I : 0}, opt);
  // blocks of slice i; k0: the first packed row (I: the W_hh half), add: the step's x half
  auto blocks = [&](int64_t i, int64_t k0, bool add) {
    const int64_t u0 = sl.u0(i), u1 = sl.u1(i);
    T* gl = local + i * B * ldl;
    std::vector<Blk<T>> blk;
    blk.reserve((u1 - u0) * G);
    for (int64_t u = u0; u < u1; ++u)
      for (int64_t g = 0; g < G; ++g) {
        T* c = gl + g * su + (u - u0) * kLanes;
        blk.push_back({wp + ((u * G + g) * (I + H) + k0) * kLanes, c, add ? c : nullptr, int(kLanes)});
      }
    return blk;
  };
  // the x half of step s's gate columns (needs nothing of the recurrence): run while the
  // other slices finish step s - 1. Same chains as one pass over [x_t | h]: the partial sums
  // go through memory exactly.
  auto input_half = [&](int64_t i, int64_t s) {
    if (I == 0 || s >= Tn) return;
    const T* xs = x + s * B * I;
    if (gather) {
      T* xg = xg_t.data_ptr<T>() + i * B * I;
      for (int64_t b = 0; b < B; ++b) copy_row(xg + b * I, x + (time_of(s, len ? len[b] : Tn, reverse) * B + b) * I, I);
      xs = xg;
    }
    tiles<T>(Lhs<T>{xs, I, I, nullptr, 0, 0}, B, blocks(i, 0, false), ldl);
  };
  run_slices(sl, Tn, [&](int64_t i, int64_t s) {
    const int64_t u0 = sl.u0(i), u1 = sl.u1(i), j0 = u0 * kLanes, nj = std::min(H, u1 * kLanes) - j0;
    T* gl = local + i * B * ldl;
    const T* hp = buf.h(s);
    T* hx = buf.h(s + 1);
    if (s == 0) input_half(i, 0);
    tiles<T>(Lhs<T>{nullptr, 0, 0, hp, H, H}, B, blocks(i, I, I > 0), ldl);
    T* gs = d.cell == Cell::kLSTM || d.cell == Cell::kGRU ? buf.gates(s) : nullptr;
    T* cp = d.cell == Cell::kLSTM ? buf.c(s) : nullptr;
    T* cn = d.cell == Cell::kLSTM ? buf.c(s + 1) : nullptr;
    T* hns = d.cell == Cell::kGRU ? buf.hn(s) : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = len ? len[b] : Tn;
      const int64_t t = time_of(s, L, reverse);
      T* yr = y + (t * B + b) * H + j0;
      const int64_t o = b * H + j0;
      if (s >= L) {  // past this sequence's end: state unchanged, output 0, workspace defined
        if (cn) copy_row(cn + o, cp + o, nj);
        if (hns) zero_row(hns + o, nj);
        if (gs) for (int64_t g = 0; g < G; ++g) zero_row(gs + b * GH + g * H + j0, nj);
        copy_row(hx + o, hp + o, nj);
        zero_row(yr, nj);
        continue;
      }
      const T* a = gl + b * ldl;
      const T* xr = (xw ? xw + (t * B + b) * GH : bias) + j0;
      if (d.cell == Cell::kLSTM)
        lstm_fuse(a, su, xr, H, gs + b * GH + j0, H, cp + o, cn + o, hx + o, yr, nj);
      else if (d.cell == Cell::kGRU)
        gru_fuse(a, su, xr, H, gs + b * GH + j0, H, b_hn + j0, hp + o, hns + o, hx + o, yr, nj);
      else
        rnn_fuse(a, xr, hx + o, yr, nj, d.cell == Cell::kRNNRelu);
    }
  }, [&](int64_t i, int64_t s) { input_half(i, s + 1); }, [](int64_t, int64_t) {});
}

#if defined(__AVX512F__)
// ---------------------------------------------------------------------------
// batch 1 (fp32, lstm and rnn, no projection): a step is a matrix-vector product, so its
// time is the time to stream each thread's slice of W_hh (512 KiB per core at H=256) out of
// L2, not FMAs: the FMA units are idle half the time. The input projection runs in those
// slots: each group of the product (up to 8 blocks, bias + W_hh h) shares its k loop with one
// tile of the projection (8 steps' x rows against one 16-column block of W_ih, operands
// in L1), so a step also projects 1/8 of the next 8 steps' inputs of the slice's columns into
// a ring of 2 chunks of 8 rows (the first chunk is projected before the steps). The slice of
// W_hh is packed in the order the step reads it, the blocks of each group side by side per k
// (one sequential stream for the prefetchers; 8 chains hide the FMA latency), and the
// threads meet through one flag per slice instead of a shared counter. Per column the chains
// are fixed (bias + W_hh h in k order; W_ih x in k order from 0), so results do not depend
// on the thread count.
// ---------------------------------------------------------------------------

constexpr int kGroup = 8;  // blocks per matrix-vector group
constexpr int kChunk = 8;  // steps per chunk of the input projection (rows of its tile)

// One group of NB blocks of the product (w: packed, off: where each block's 16 columns sit in
// bias and out) and, when P, the tile of x rows xp ([k][8]) against the packed W_ih block wi
// into po (rows ldo apart).
template <int NB, bool P>
__attribute__((always_inline)) inline void step_group(const float* __restrict h, int64_t H, const float* __restrict w,
                                                      const int64_t* off, const float* __restrict bias,
                                                      float* __restrict out, const float* __restrict xp, int64_t I,
                                                      const float* __restrict wi, float* __restrict po, int64_t ldo) {
  __m512 acc[NB], pa[kChunk];
  for (int q = 0; q < NB; ++q) acc[q] = _mm512_loadu_ps(bias + off[q]);
  for (int r = 0; r < kChunk; ++r) pa[r] = _mm512_setzero_ps();
  auto gemv_k = [&](int64_t k) {
    const __m512 a = _mm512_set1_ps(h[k]);
    for (int q = 0; q < NB; ++q) acc[q] = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + (k * NB + q) * kLanes), acc[q]);
  };
  auto proj_k = [&](int64_t k) {
    const __m512 v = _mm512_loadu_ps(wi + k * kLanes);
    for (int r = 0; r < kChunk; ++r) pa[r] = _mm512_fmadd_ps(_mm512_set1_ps(xp[k * kChunk + r]), v, pa[r]);
  };
  const int64_t K = P ? std::min(H, I) : 0;
  for (int64_t k = 0; k < K; ++k) {
    gemv_k(k);
    proj_k(k);
  }
  for (int64_t k = K; k < H; ++k) gemv_k(k);
  for (int q = 0; q < NB; ++q) _mm512_storeu_ps(out + off[q], acc[q]);
  if constexpr (P) {
    for (int64_t k = K; k < I; ++k) proj_k(k);
    for (int r = 0; r < kChunk; ++r) _mm512_storeu_ps(po + r * ldo, pa[r]);
  }
}

// The projection tile alone (the chunk before the first step).
inline void proj_tile(const float* __restrict xp, int64_t I, const float* __restrict wi, float* __restrict po,
                      int64_t ldo) {
  __m512 pa[kChunk];
  for (int r = 0; r < kChunk; ++r) pa[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < I; ++k) {
    const __m512 v = _mm512_loadu_ps(wi + k * kLanes);
    for (int r = 0; r < kChunk; ++r) pa[r] = _mm512_fmadd_ps(_mm512_set1_ps(xp[k * kChunk + r]), v, pa[r]);
  }
  for (int r = 0; r < kChunk; ++r) _mm512_storeu_ps(po + r * ldo, pa[r]);
}

template <bool P>
void step_group_n(int n, const float* h, int64_t H, const float* w, const int64_t* off, const float* bias, float* out,
                  const float* xp, int64_t I, const float* wi, float* po, int64_t ldo) {
  switch (n) {
    case 8: step_group<8, P>(h, H, w, off, bias, out, xp, I, wi, po, ldo); break;
    case 7: step_group<7, P>(h, H, w, off, bias, out, xp, I, wi, po, ldo); break;
    case 6: step_group<6, P>(h, H, w, off, bias, out, xp, I, wi, po, ldo); break;
    case 5: step_group<5, P>(h, H, w, off, bias, out, xp, I, wi, po, ldo); break;
    case 4: step_group<4, P>(h, H, w, off, bias, out, xp, I, wi, po, ldo); break;
    case 3: step_group<3, P>(h, H, w, off, bias, out, xp, I, wi, po, ldo); break;
    case 2: step_group<2, P>(h, H, w, off, bias, out, xp, I, wi, po, ldo); break;
    default: step_group<1, P>(h, H, w, off, bias, out, xp, I, wi, po, ldo); break;
  }
}

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_ps
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Packing (data movement only: the packed values are the source's, bit for bit) by
// in-register transposes, a full vector per store.

// r[l][k] -> r[k][l] for a 16x16 tile of floats.
__attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);  // per 128-bit lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + j] lane L: rows i..i+3 of column 4L + j
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 2]);
    const __m512d c = _mm512_castps_pd(t[i + 1]), e = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, e));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, e));
  }
  for (int j = 0; j < 4; ++j) {  // gather lane L of r[j], r[4 + j], r[8 + j], r[12 + j] into column 4L + j
    const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 v0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    t[j] = _mm512_shuffle_f32x4(u0, v0, 0x88);
    t[8 + j] = _mm512_shuffle_f32x4(u0, v0, 0xDD);
    t[4 + j] = _mm512_shuffle_f32x4(u1, v1, 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(u1, v1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// One packed block: dst[k * ds + l] = src[l * ld + k] for k < K, l < 16 (0 for l >= rows).
void pack_block(const float* __restrict src, int64_t ld, int64_t rows, int64_t K, float* __restrict dst, int64_t ds) {
  for (int64_t k = 0; k < K; k += kLanes) {
    const int64_t nk = std::min<int64_t>(kLanes, K - k);
    const __mmask16 m = __mmask16((1u << nk) - 1);
    __m512 r[16];
    for (int l = 0; l < 16; ++l) r[l] = l < rows ? _mm512_maskz_loadu_ps(m, src + l * ld + k) : _mm512_setzero_ps();
    transpose16(r);
    for (int64_t kk = 0; kk < nk; ++kk) _mm512_storeu_ps(dst + (k + kk) * ds, r[kk]);
  }
}

// One chunk of x rows, k-major: dst[k * 8 + r] = xr[r][k] (0 where xr[r] is null).
void pack_chunk(const float* const* xr, int64_t I, float* __restrict dst) {
  static_assert(kChunk == 8, "pack_chunk transposes 8x8");
  for (int64_t k = 0; k < I; k += 8) {
    const int64_t nk = std::min<int64_t>(8, I - k);
    const __mmask8 m = __mmask8((1u << nk) - 1);
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = xr[i] ? _mm256_maskz_loadu_ps(m, xr[i] + k) : _mm256_setzero_ps();
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // r[i + j] lane L: rows i..i+3 of column 4L + j
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      t[j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x20);
      t[4 + j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x31);
    }
    for (int64_t kk = 0; kk < nk; ++kk) _mm256_storeu_ps(dst + (k + kk) * kChunk, t[kk]);
  }
}
#pragma GCC diagnostic pop

// One cache line per slice: the number of steps it has finished.
struct alignas(64) StepFlag {
  std::atomic<int64_t> done{0};
};

void forward_gemv(const Shape& d, const float* x, const float* w_ih, const float* b_ih, const float* b_hh,
                  const float* w_hh, const int64_t* len, bool reverse, StepBuffers<float>& buf, float* y,
                  const at::TensorOptions& opt) {
  const int64_t H = d.H, I = d.I, G = d.G, GH = d.GH(), Tn = d.T;
  const Slices sl(H, 2 * GH * H, GH * H * int64_t(sizeof(float)));
  const int64_t su = sl.max_units(), ldl = G * su, nbmax = (su / kLanes) * G;
  const int64_t L = len ? std::min<int64_t>(len[0], Tn) : Tn;
  const int64_t nchunk = (L + kChunk - 1) / kChunk, nwb = sl.ns * nbmax;
  // one scratch buffer, kept across calls (up to 64 MiB): fresh memory would cost a page
  // fault per 4 KiB of it at its first touch, every call. Its parts (floats, 64-byte aligned):
  // per slice the step's gate pre-activations and the summed biases, and the projection's
  // ring (2 chunks of rows of the slice's gate columns); W_ih and W_hh packed per slice; x's
  // rows of the steps [0, L) in step order, packed per chunk k-major ([chunk][k][8])
  const int64_t sizes[5] = {sl.ns * 2 * ldl, sl.ns * 2 * kChunk * ldl, nwb * I * kLanes, nwb * H * kLanes,
                            nchunk * kChunk * I};
  int64_t total = 0;
  for (const int64_t n : sizes) total += (n + kLanes - 1) / kLanes * kLanes;
  static KeptBuffer& kept = *new KeptBuffer();  // never destroyed: a lent buffer may come back at exit
  const at::Tensor scratch = kept_alloc(kept, total, opt, sizeof(float), false, size_t(64) << 20);
  float* parts[5];
  float* p = scratch.data_ptr<float>();
  for (int q = 0; q < 5; ++q) {
    parts[q] = p;
    p += (sizes[q] + kLanes - 1) / kLanes * kLanes;
  }
  float *local = parts[0], *ring = parts[1], *wih = parts[2], *whh = parts[3], *xpk = parts[4];
  std::vector<int64_t> offs(nwb);
  at::parallel_for(0, nwb + nchunk, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t it = q0; it < q1; ++it) {
      if (it >= nwb) {
        const int64_t s0 = (it - nwb) * kChunk;
        const float* xr[kChunk];
        for (int64_t r = 0; r < kChunk; ++r) xr[r] = s0 + r < L ? x + time_of(s0 + r, L, reverse) * I : nullptr;
        pack_chunk(xr, I, xpk + s0 * I);
        continue;
      }
      const int64_t i = it / nbmax, q = it % nbmax, u = sl.u0(i) + q / G, g = q % G;
      if (u >= sl.u1(i)) continue;
      pack_block(w_ih + (g * H + u * kLanes) * I, I, std::min(kLanes, H - u * kLanes), I, wih + it * I * kLanes, kLanes);
    }
  });
  std::vector<StepFlag> flags(sl.ns);
  at::parallel_for(0, sl.ns, 1, [&](int64_t i0, int64_t i1) {
    // pack W_hh of the slices of this thread (into its L2), their biases and offsets, and
    // project the first chunk
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u0 = sl.u0(i), nb = (sl.u1(i) - u0) * G;
      float* wh = whh + i * nbmax * H * kLanes;
      float* bl = local + i * 2 * ldl + ldl;
      int64_t* off = offs.data() + i * nbmax;
      std::fill(bl, bl + ldl, 0.f);
      for (int64_t q0 = 0; q0 < nb; q0 += kGroup) {
        const int64_t n = std::min<int64_t>(kGroup, nb - q0);
        for (int64_t qq = 0; qq < n; ++qq) {
          const int64_t q = q0 + qq, u = u0 + q / G, g = q % G;
          off[q] = g * su + (u - u0) * kLanes;
          const int64_t nl = std::min(kLanes, H - u * kLanes);
          pack_block(w_hh + (g * H + u * kLanes) * H, H, nl, H, wh + (q0 * H + qq) * kLanes, n * kLanes);
          for (int64_t l = 0; l < nl; ++l) {
            const int64_t j = u * kLanes + l;
            bl[off[q] + l] = (b_ih ? b_ih[g * H + j] : 0.f) + (b_hh ? b_hh[g * H + j] : 0.f);
          }
        }
      }
      if (L > 0)
        for (int64_t q = 0; q < nb; ++q)
          proj_tile(xpk, I, wih + (i * nbmax + q) * I * kLanes, ring + i * 2 * kChunk * ldl + off[q], ldl);
    }
    for (int64_t s = 0; s < Tn; ++s) {
      const int64_t t = time_of(s, L, reverse);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t u0 = sl.u0(i), nb = (sl.u1(i) - u0) * G, j0 = u0 * kLanes;
        const int64_t nj = std::min(H, sl.u1(i) * kLanes) - j0;
        float* gl = local + i * 2 * ldl;
        const float* hp = buf.h(s);
        float* hx = buf.h(s + 1) + j0;
        float* gs = d.cell == Cell::kLSTM ? buf.gates(s) + j0 : nullptr;
        const float* cp = d.cell == Cell::kLSTM ? buf.c(s) + j0 : nullptr;
        float* cn = d.cell == Cell::kLSTM ? buf.c(s + 1) + j0 : nullptr;
        float* yr = y + t * H + j0;
        if (s >= L) {  // past the sequence's end: state unchanged, output 0, workspace defined
          if (cn) copy_row(cn, cp, nj);
          if (gs) for (int64_t g = 0; g < G; ++g) zero_row(gs + g * H, nj);
          copy_row(hx, hp + j0, nj);
          zero_row(yr, nj);
        } else {
          // all of h at once (half of it was just written by the other core: one round of
          // transfers, not one per line as the k loop reaches it)
          for (int64_t k = 0; k < H; k += kLanes) _mm_prefetch(reinterpret_cast<const char*>(hp + k), _MM_HINT_T0);
          // this step's share of the next chunk's projection: block q of the slice with group
          // q - pb0 (8 steps x ceil(nb / 8) groups cover the nb blocks)
          const int64_t c = s / kChunk, ng = (nb + kGroup - 1) / kGroup;
          const bool proj = (c + 1) * kChunk < L;
          const int64_t pb0 = (s % kChunk) * ng;
          const float* xp = xpk + (c + 1) * kChunk * I;
          float* pr = ring + (i * 2 + (c + 1) % 2) * kChunk * ldl;
          const float* wh = whh + i * nbmax * H * kLanes;
          const int64_t* off = offs.data() + i * nbmax;
          for (int64_t q0 = 0, gi = 0; q0 < nb; q0 += kGroup, ++gi) {
            const int n = int(std::min<int64_t>(kGroup, nb - q0));
            const int64_t pb = pb0 + gi;
            if (proj && pb < nb)
              step_group_n<true>(n, hp, H, wh + q0 * H * kLanes, off + q0, gl + ldl, gl, xp, I,
                                 wih + (i * nbmax + pb) * I * kLanes, pr + off[pb], ldl);
            else
              step_group_n<false>(n, hp, H, wh + q0 * H * kLanes, off + q0, gl + ldl, gl, nullptr, I, nullptr,
                                  nullptr, 0);
          }
          const float* xr = ring + (i * 2 + c % 2) * kChunk * ldl + (s % kChunk) * ldl;
          if (d.cell == Cell::kLSTM) lstm_fuse(gl, su, xr, su, gs, H, cp, cn, hx, yr, nj);
          else rnn_fuse(gl, xr, hx, yr, nj, d.cell == Cell::kRNNRelu);
        }
        flags[i].done.store(s + 1, std::memory_order_release);
      }
      // wait for the other slices' halves of h; spin briefly, then yield (the cores may be shared)
      for (int64_t j = 0; j < sl.ns; ++j) {
        if (j >= i0 && j < i1) continue;
        for (int spins = 0; flags[j].done.load(std::memory_order_acquire) <= s; ++spins) {
          if (spins < 4000) _mm_pause();
          else std::this_thread::yield();
        }
      }
    }
  });
}
#endif

// Backward steps (no projection). Per step: the gate gradients of the slice's units (they
// need only dh of those units, which the slice computed itself), a barrier, then dh of the
// slice's units = the step's gate gradients (all units) @ W_hh[:, slice] (+ dh * z for gru).
// The gate gradients live in a ring of 2 C steps, in step order, not in a (T, B, G*H) buffer:
// when the C steps of a chunk are done each slice computes its share of dx's columns for the
// chunk's rows (its packed slice of W_ih read once a chunk, not once a step), and adds the
// weight gradients of its own gate columns, their gradients over the chunk's rows, transposed, @ [x | h] of those rows, to
// their rows of dW, and their column sums to the bias gradients. Its own columns only: no
// barrier, and every value is summed in the same order (chunks from the last, rows in step
// order) whatever the slicing, so the results do not depend on the thread count.
// dwi (G*H x I), dwh (G*H x H), dbi, dbh (G*H): zero on entry, null when not wanted; dbh ==
// dbi but for gru (whose n gate has r in on the recurrent side, not on the input side).
template <typename T>
void backward_persistent(const Shape& d, const Workspace<T>& ws, const T* w_hh, const T* w_ih, const T* x,
                         const int64_t* len, bool reverse, const T* dyp, const T* dhTp, T* dhh, T* dcc, T* dx,
                         T* dwi, T* dwh, T* dbi, T* dbh, const at::TensorOptions& opt) {
  const int64_t Tn = d.T, B = d.B, H = d.H, GH = d.GH(), I = d.I, Ix = dx ? I : 0;
  const bool lstm = d.cell == Cell::kLSTM, gru = d.cell == Cell::kGRU;
  const Slices sl(H, 2 * B * GH * (H + Ix), GH * (H + Ix) * int64_t(sizeof(T)));
  const at::Tensor packed = pack_backward(w_hh, GH, H, sl.nub, opt);
  const T* wp = packed.data_ptr<T>();
  const int64_t nvb = (Ix + kLanes - 1) / kLanes;  // dx's 16-column blocks
  const at::Tensor packed_x = pack_backward(w_ih, GH, Ix, nvb, opt);
  const T* wpx = packed_x.data_ptr<T>();
  const bool perm = len || reverse;  // rows of a step belong to different times
  // chunks of about 256 rows: the weight-gradient tiles run long over k, the ring stays small
  const int64_t C = std::max<int64_t>(2, (256 + B - 1) / B);
  // rows of a chunk go to dx at their own times under lengths or reverse: through a buffer
  const at::Tensor xbuf_t = at::empty({perm && Ix > 0 ? sl.ns * C * B * I : 0}, opt);
  // rows padded by 16: a 4 KiB row stride (G*H = 1024 fp32) would put the rows that a step's
  // GEMM tile reads together into the same L1 cache set
  const int64_t ldg = GH + kLanes;
  // two chunks of steps: a chunk's weight gradients are added while the next chunk's first
  // step is being written (see below)
  const int64_t R = 2 * C;
  const at::Tensor ring_t = at::empty({(gru ? 2 : 1) * R * B * ldg}, opt);
  T* ringh = ring_t.data_ptr<T>();
  T* ringi = gru ? ringh + R * B * ldg : ringh;  // input side: gru's n gate without r
  // the chunk's [x | h] rows in step order, per slice: under lengths or reverse x's rows come
  // from their own times, and the row stride is padded (x's 1 KiB stride would put the rows
  // that one tile reads into 4 of the 64 L1 sets)
  const int64_t ldf = I + H + kLanes;
  const at::Tensor xh_t = at::empty({dwi || dwh ? sl.ns * C * B * ldf : 0}, opt);
  // Step s: pre = the gate gradients of the slice's units; post (once every slice's are
  // written) = dh of its units, the recurrence. When s starts a chunk, the chunk's dx, weight
  // and bias gradients need nothing of step s - 1: they run in that step's mid, between
  // arriving at its barrier and waiting on it, so a partner that is late costs that work
  // instead of spinning. The ring holds two chunks, so the chunk being summed is not the one
  // whose slots step s - 1 writes.
  run_slices(sl, Tn, [&](int64_t i, int64_t step) {
    const int64_t s = Tn - 1 - step;
    const int64_t u0 = sl.u0(i), u1 = sl.u1(i), j0 = u0 * kLanes, nj = std::min(H, u1 * kLanes) - j0;
    T* dgs = ringh + (s % R) * B * ldg;
    T* dis = ringi + (s % R) * B * ldg;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = len ? len[b] : Tn;
      if (s >= L) {
        for (int64_t g = 0; g < d.G; ++g) {
          zero_row(dgs + b * ldg + g * H + j0, nj);
          if (gru) zero_row(dis + b * ldg + g * H + j0, nj);
        }
        continue;
      }
      const int64_t t = time_of(s, L, reverse);
      gate_grads<T>(d, ws, s, b, (s + 1 < L ? dhh : dhTp) + b * H, dyp + (t * B + b) * H, dgs + b * ldg,
                    dis + b * ldg, false, lstm ? dcc + b * H : nullptr, dhh + b * H, j0, nj);
    }
  }, [&](int64_t i, int64_t step) {
    const int64_t s = Tn - step;  // the step done before this one (Tn: none; called with step Tn last)
    if (s >= Tn) return;
    const int64_t u0 = sl.u0(i), u1 = sl.u1(i);
    if (s % C) return;
    // the chunk of steps s .. s + n - 1 is complete: its rows are consecutive in the ring
    const int64_t rows = (std::min(Tn, s + C) - s) * B;
    std::vector<Blk<T>> blk;
    blk.reserve(std::max((u1 - u0) * d.G, nvb));
    const int64_t v0 = i * nvb / sl.ns, v1 = (i + 1) * nvb / sl.ns;
    if (v0 < v1) {  // the slice's dx columns of the chunk: W_ih's slice read once a chunk, not a step
      T* cx = perm ? xbuf_t.data_ptr<T>() + i * C * B * I : dx + s * B * I;
      for (int64_t v = v0; v < v1; ++v)
        blk.push_back({wpx + v * GH * kLanes, cx + v * kLanes, nullptr, int(std::min(kLanes, I - v * kLanes))});
      tiles<T>(Lhs<T>{nullptr, 0, 0, ringi + (s % R) * B * ldg, ldg, GH}, rows, blk, I);
      if (perm) {
        const int64_t c0 = v0 * kLanes, nc = std::min(I, v1 * kLanes) - c0;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t b = r % B;
          copy_row(dx + (time_of(s + r / B, len ? len[b] : Tn, reverse) * B + b) * I + c0, cx + r * I + c0, nc);
        }
      }
    }
    const T* ch = ringh + (s % R) * B * ldg;
    const T* ci = ringi + (s % R) * B * ldg;
    // dW rows of the slice's gate columns (each gate's run of them in turn) += the chunk's
    // gradients of those columns, transposed, @ its features: [x | h] rows, 16 features a block
    auto weight_grads = [&](const T* feat, int64_t nf, int64_t ldf, const T* ring, T* dw) {
      const int64_t c0 = u0 * kLanes, nc = std::min(H, u1 * kLanes) - c0;
      blk.clear();
      for (int64_t f = 0; f < nf; f += kLanes)
        blk.push_back({feat + f, dw + c0 * nf + f, dw + c0 * nf + f, int(std::min(kLanes, nf - f)), ldf});
      for (int64_t g = 0; g < d.G; ++g) {
        tiles<T>(Lhs<T>{nullptr, 0, 0, ring + g * H + c0, 1, rows, ldg}, nc, blk, nf);
        for (auto& q : blk) { q.c += H * nf; q.add += H * nf; }
      }
    };
    if (dwi || dwh) {
      T* xh = xh_t.data_ptr<T>() + i * C * B * ldf;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r % B;
        if (dwi) copy_row(xh + r * ldf, x + (time_of(s + r / B, len ? len[b] : Tn, reverse) * B + b) * I, I);
        if (dwh) copy_row(xh + r * ldf + I, ws.h + (s * B + r) * H, H);
      }
      if (dwi) weight_grads(xh, I, ldf, ci, dwi);
      if (dwh) weight_grads(xh + I, H, ldf, ch, dwh);
    }
    auto bias_grads = [&](const T* ring, T* db) {
      for (int64_t g = 0; g < d.G; ++g) {
        T* o = db + g * H + u0 * kLanes;
        const int64_t n = std::min(H, u1 * kLanes) - u0 * kLanes;
        for (int64_t r = 0; r < rows; ++r) {
          const T* a = ring + r * ldg + g * H + u0 * kLanes;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) o[j] += a[j];
        }
      }
    };
    if (dbi) bias_grads(ci, dbi);
    if (dbh && dbh != dbi) bias_grads(ch, dbh);
  }, [&](int64_t i, int64_t step) {
    const int64_t s = Tn - 1 - step;
    const int64_t u0 = sl.u0(i), u1 = sl.u1(i);
    const T* dgs = ringh + (s % R) * B * ldg;
    std::vector<Blk<T>> blk;
    blk.reserve(u1 - u0);
    for (int64_t u = u0; u < u1; ++u) {
      T* c = dhh + u * kLanes;
      blk.push_back({wp + u * GH * kLanes, c, gru ? c : nullptr, int(std::min(kLanes, H - u * kLanes))});
    }
    tiles<T>(Lhs<T>{nullptr, 0, 0, dgs, ldg, GH}, B, blk, H);
  });
}

template <typename T>
void forward_loop(const Shape& d, const T* xw, const T* w_hh, const T* b_hn, const T* w_hr, const int64_t* len,
                  bool reverse, StepBuffers<T>& buf, T* y) {
  const int64_t B = d.B, H = d.H, P = d.P, GH = d.GH(), Tn = d.T;
  const bool proj = d.proj();
  for (int64_t s = 0; s < Tn; ++s) {
    T* hp = buf.h(s);
    T* hx = buf.h(s + 1);
    // recurrent half of the gates; the rnn writes it straight into the next state
    T* g = d.cell == Cell::kLSTM || d.cell == Cell::kGRU ? buf.gates(s) : hx;
    gemm<T>(false, true, B, GH, P, T(1), hp, P, w_hh, P, T(0), g, GH);
    T* cp = d.cell == Cell::kLSTM ? buf.c(s) : nullptr;
    T* cn = d.cell == Cell::kLSTM ? buf.c(s + 1) : nullptr;
    T* hcs = proj ? buf.hc(s) : nullptr;
    T* hns = d.cell == Cell::kGRU ? buf.hn(s) : nullptr;
    at::parallel_for(0, B, row_grain(d), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t L = len ? len[b] : Tn;
        const int64_t t = time_of(s, L, reverse);
        T* yr = y + (t * B + b) * P;
        if (s >= L) {  // past this sequence's end: state unchanged, output 0
          if (cn) copy_row(cn + b * H, cp + b * H, H);
          if (hcs) zero_row(hcs + b * H, H);  // the workspace is fully defined (and finite for the GEMMs)
          if (hns) zero_row(hns + b * H, H);
          copy_row(hx + b * P, hp + b * P, P);
          zero_row(yr, P);
          continue;
        }
        const T* xr = xw + (t * B + b) * GH;
        T* gr = g + b * GH;
        if (d.cell == Cell::kLSTM) {
          const T* cpr = cp + b * H;
          T* cnr = cn + b * H;
          T* hout = proj ? hcs + b * H : hx + b * H;
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) {
            const T i = sigmoid(gr[j] + xr[j]);
            const T f = sigmoid(gr[H + j] + xr[H + j]);
            const T gg = tanh_(gr[2 * H + j] + xr[2 * H + j]);
            const T o = sigmoid(gr[3 * H + j] + xr[3 * H + j]);
            const T c = f * cpr[j] + i * gg;
            const T hv = o * tanh_(c);
            gr[j] = i; gr[H + j] = f; gr[2 * H + j] = gg; gr[3 * H + j] = o;
            cnr[j] = c;
            hout[j] = hv;
          }
          if (!proj) copy_row(yr, hout, H);
        } else if (d.cell == Cell::kGRU) {
          const T* hpr = hp + b * H;
          T* hxr = hx + b * H;
          T* hnr = hns + b * H;
          gru_gates(gr, xr, hpr, b_hn, hnr, hxr, H);
          copy_row(yr, hxr, H);
        } else {
          T* hxr = hx + b * H;
          if (d.cell == Cell::kRNNTanh) {
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) hxr[j] = tanh_(hxr[j] + xr[j]);
          } else {
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) hxr[j] = std::max(hxr[j] + xr[j], T(0));
          }
          copy_row(yr, hxr, H);
        }
      }
    });
    if (proj) {  // h = (o * tanh(c)) @ w_hr^T, then rows past their end keep their state
      gemm<T>(false, true, B, P, H, T(1), hcs, H, w_hr, H, T(0), hx, P);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t L = len ? len[b] : Tn;
        if (s < L) copy_row(y + (time_of(s, L, reverse) * B + b) * P, hx + b * P, P);
        else copy_row(hx + b * P, hp + b * P, P);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// one step without lengths or projection (the cells, and a layer fed one token at a time):
// the step loop's setup (packing the weights, the thread team, the workspace advice) costs
// more than the step itself, so the gate pre-activations come from the weights as they
// lie, then the same gate fusions.
// ---------------------------------------------------------------------------

// Threads for one step: weights past ~512 KiB are split so that each core's share stays in
// its own L2 from call to call; less work runs inline (a parallel region costs more than it
// saves, and far more when the other core is busy).
inline int64_t cell_threads(int64_t flops, int64_t weight_bytes, int64_t max_chunks) {
  const int64_t by_work = std::max({int64_t(1), flops >> 21, weight_bytes >> 19});
  return std::max<int64_t>(1, std::min({int64_t(at::get_num_threads()), by_work, max_chunks}));
}

template <typename F>
void run_chunks(int64_t n, const F& f) {
  if (n == 1) {
    f(0);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) f(i);
  });
}

// One GEMM of a step: pre (B, ldp) = a1 @ w1^T + a2 @ w2^T (+ bias), a: batch rows, w: weight
// rows as they lie; the second operand pair may be empty (k2 = 0).
template <typename T>
struct CellGemm {
  const T *a1, *w1;
  int64_t k1;
  const T *a2, *w2;
  int64_t k2;
  const T* bias;
  T* pre;
  int64_t ldp;
  const T* xp = nullptr;  // tile path: [a1 | a2]^T in 16-lane blocks of batch rows,
  int64_t xps = 0;        // xps apart
  T* preT = nullptr;      // tile path: the result transposed (rows, ldt)
  int64_t ldt = 0;
};

// Few batch rows: 4 weight rows at a time against NB batch rows from b0 (4 * NB independent
// 16-lane chains hide the FMA latency; each weight row is read once for the NB rows). The
// lanes of a chain are added in a fixed tree, so a value does not depend on how the rows
// are split over threads.
template <typename T, int NB>
void cell_dots(const CellGemm<T>& g, int64_t b0, int64_t j0, int64_t j1) {
  constexpr int RJ = 4;
  for (int64_t j = j0; j < j1; j += RJ) {
    T acc[RJ][NB][kLanes] = {};
    for (int seg = 0; seg < 2; ++seg) {
      const int64_t K = seg ? g.k2 : g.k1;
      if (K == 0) continue;
      const T* a = (seg ? g.a2 : g.a1) + b0 * K;
      const T* wr[RJ];
      for (int r = 0; r < RJ; ++r) wr[r] = (seg ? g.w2 : g.w1) + std::min(j + r, j1 - 1) * K;  // tail: a row again
      int64_t k = 0;
      for (; k + kLanes <= K; k += kLanes)
        for (int r = 0; r < RJ; ++r)
          for (int b = 0; b < NB; ++b) {
#pragma omp simd
            for (int l = 0; l < kLanes; ++l) acc[r][b][l] = std::fma(wr[r][k + l], a[b * K + k + l], acc[r][b][l]);
          }
      for (int r = 0; r < RJ; ++r)
        for (int b = 0; b < NB; ++b)
          for (int64_t l = 0; k + l < K; ++l) acc[r][b][l] = std::fma(wr[r][k + l], a[b * K + k + l], acc[r][b][l]);
    }
    for (int r = 0; r < RJ && j + r < j1; ++r)
      for (int b = 0; b < NB; ++b) {
        T* v = acc[r][b];
        for (int w = kLanes / 2; w > 0; w /= 2)
#pragma omp simd
          for (int l = 0; l < w; ++l) v[l] += v[l + w];
        g.pre[(b0 + b) * g.ldp + j + r] = g.bias ? v[0] + g.bias[j + r] : v[0];
      }
  }
}

// Rows [j0, j1) of the step's GEMM for all B batch rows.
template <typename T>
void cell_gemm_rows(const CellGemm<T>& g, int64_t B, int64_t j0, int64_t j1) {
  if (!g.xp) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) cell_dots<T, 4>(g, b, j0, j1);
    switch (B - b) {
      case 3: cell_dots<T, 3>(g, b, j0, j1); break;
      case 2: cell_dots<T, 2>(g, b, j0, j1); break;
      case 1: cell_dots<T, 1>(g, b, j0, j1); break;
      default: break;
    }
    return;
  }
  // more rows: the step tiles with the roles swapped, the weight rows as the tiles' left
  // operand (read where they lie) against the few KiB of packed batch rows; each value is
  // one FMA chain over k in [a1 | a2] order, as in the step loop
  const int64_t nbb = (B + kLanes - 1) / kLanes;
  std::vector<Blk<T>> blk;
  for (int64_t q = 0; q < nbb; ++q)
    blk.push_back({g.xp + q * g.xps, g.preT + j0 * g.ldt + q * kLanes, nullptr,
                   int(std::min(kLanes, B - q * kLanes))});
  tiles<T>(Lhs<T>{g.w1 + j0 * g.k1, g.k1, g.k1, g.w2 ? g.w2 + j0 * g.k2 : g.w1, g.k2, g.k2}, j1 - j0, blk, g.ldt);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {  // back to batch rows by 16 x 16 transposes (reads 128 B apart else)
    for (int64_t q = 0; q < nbb; ++q)
      for (int64_t jc = j0; jc < j1; jc += kLanes) {
        const int n = static_cast<int>(std::min(kLanes, j1 - jc));
        const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
        __m512 r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = i < n ? _mm512_loadu_ps(g.preT + (jc + i) * g.ldt + q * kLanes) : _mm512_setzero_ps();
        transpose16(r);
        const __m512 bv = g.bias ? _mm512_maskz_loadu_ps(m, g.bias + jc) : _mm512_setzero_ps();
        for (int l = 0; l < 16 && q * kLanes + l < B; ++l)
          _mm512_mask_storeu_ps(g.pre + (q * kLanes + l) * g.ldp + jc, m, g.bias ? _mm512_add_ps(r[l], bv) : r[l]);
      }
    return;
  }
#endif
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = j0; j < j1; ++j) g.pre[b * g.ldp + j] = g.bias ? g.preT[j * g.ldt + b] + g.bias[j]
                                                                     : g.preT[j * g.ldt + b];
}

// The batch rows of [a1 | a2] transposed into 16-lane blocks (zero lanes past B).
template <typename T>
void cell_pack(const T* a1, int64_t k1, const T* a2, int64_t k2, int64_t B, T* xp) {
  const int64_t K = k1 + k2, nbb = (B + kLanes - 1) / kLanes;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {  // by 16 x 16 transposes (one strided store per element else)
    for (int64_t q = 0; q < nbb; ++q) {
      const int64_t rows = std::min(kLanes, B - q * kLanes);
      pack_block(a1 + q * kLanes * k1, k1, rows, k1, xp + q * K * kLanes, kLanes);
      if (k2 > 0) pack_block(a2 + q * kLanes * k2, k2, rows, k2, xp + (q * K + k1) * kLanes, kLanes);
    }
    return;
  }
#endif
  for (int64_t q = 0; q < nbb; ++q)
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t b = q * kLanes + l;
      T* o = xp + q * K * kLanes + l;
      for (int64_t k = 0; k < K; ++k) o[k * kLanes] = b >= B ? T(0) : k < k1 ? a1[b * k1 + k] : a2[b * k2 + k - k1];
    }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cell(
    const Shape& d, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, bool save) {
  const auto opt = x.options();
  const int64_t B = d.B, H = d.H, I = d.I, GH = d.GH(), K = I + H;
  const bool lstm = d.cell == Cell::kLSTM, gru = d.cell == Cell::kGRU;
  at::Tensor ws = at::empty({numel_of(d, save)}, opt);
  StepBuffers<T> buf(d, save, ws.data_ptr<T>(), opt);
  // few batch rows take dot products along the weight rows; from 8 the tiles fill their lanes
  const bool tile = B >= 8;
  const int64_t nbb = (B + kLanes - 1) / kLanes, ldt = nbb * kLanes;
  // scratch: pre-activations (gru: the input and the recurrent side apart, its n gate needs
  // r * (W_hn h + b_hn)), the summed biases, b_hn, and for the tiles their operands
  const int64_t npre = (gru ? 2 : 1) * B * GH;
  at::Tensor scratch_t = at::empty({npre + GH + H + (tile ? nbb * K * kLanes + (gru ? 2 : 1) * GH * ldt : 0)}, opt);
  T* pre = scratch_t.data_ptr<T>();
  T* bias = pre + npre;
  T* b_hn = bias + GH;
  T* xp = tile ? b_hn + H : nullptr;
  T* preT = tile ? xp + nbb * K * kLanes : nullptr;
  const T* bi = b_ih.defined() ? b_ih.data_ptr<T>() : nullptr;
  const T* bh = b_hh.defined() ? b_hh.data_ptr<T>() : nullptr;
  for (int64_t j = 0; j < GH; ++j) bias[j] = (bi ? bi[j] : T(0)) + (bh && !(gru && j >= 2 * H) ? bh[j] : T(0));
  for (int64_t j = 0; j < H; ++j) b_hn[j] = gru && bh ? bh[2 * H + j] : T(0);
  const T* xq = x.data_ptr<T>();
  const T* hp = h0.data_ptr<T>();
  const T* wi = w_ih.data_ptr<T>();
  const T* wh = w_hh.data_ptr<T>();
  if (tile) cell_pack(xq, I, hp, H, B, xp);
  // gru: the input side with the biases (rows of x against W_ih), the recurrent side apart
  CellGemm<T> g1{xq, wi, I, hp, wh, gru ? 0 : H, gru ? bias : nullptr, pre, GH, xp, K * kLanes, preT, ldt};
  CellGemm<T> g2{hp, wh, H, nullptr, nullptr, 0, nullptr, pre + B * GH, GH, xp ? xp + I * kLanes : nullptr,
                 K * kLanes, preT ? preT + GH * ldt : nullptr, ldt};
  const int64_t ns = cell_threads(2 * B * GH * K, GH * K * int64_t(sizeof(T)), (GH + 47) / 48);
  const int64_t al = tile ? kMaxRows : 4;  // chunk edges on whole tiles / dot groups
  run_chunks(ns, [&](int64_t i) {
    const int64_t j0 = i * GH / ns / al * al, j1 = i + 1 == ns ? GH : (i + 1) * GH / ns / al * al;
    cell_gemm_rows(g1, B, j0, j1);
    if (gru) cell_gemm_rows(g2, B, j0, j1);
  });
  const T* pa = gru ? pre + B * GH : pre;  // the fusions' recurrent side
  const T* px = gru ? pre : bias;          // and their input side
  const int64_t sx = gru ? GH : 0;         // row stride of the input side
  copy_row(buf.h(0), hp, B * H);
  if (lstm) copy_row(buf.c(0), c0.data_ptr<T>(), B * H);
  at::Tensor y = at::empty({1, B, H}, opt);
  T* yp = y.data_ptr<T>();
  T* hx = buf.h(1);
  for (int64_t b = 0; b < B; ++b) {
    const T* a = pa + b * GH;
    const T* xr = px + b * sx;
    const int64_t o = b * H;
    if (lstm)
      lstm_fuse(a, H, xr, H, buf.gates(0) + b * GH, H, buf.c(0) + o, buf.c(1) + o, hx + o, yp + o, H);
    else if (gru)
      gru_fuse(a, H, xr, H, buf.gates(0) + b * GH, H, b_hn, hp + o, buf.hn(0) + o, hx + o, yp + o, H);
    else
      rnn_fuse(a, xr, hx + o, yp + o, H, d.cell == Cell::kRNNRelu);
  }
  at::Tensor hT = at::empty({B, H}, opt);
  copy_row(hT.data_ptr<T>(), hx, B * H);
  at::Tensor cT = lstm ? at::empty({B, H}, opt) : at::empty({0}, opt);
  if (lstm) copy_row(cT.data_ptr<T>(), buf.c(1), B * H);
  return {y, hT, cT, ws};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_typed(
    const Shape& d, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_hr,
    const at::Tensor& lengths, bool reverse, bool save) {
  if (d.T == 1 && !d.proj() && !lengths.defined() && d.B > 0)
    return forward_cell<T>(d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, save);
  const auto opt = x.options();
  const int64_t B = d.B, H = d.H, P = d.P;
  // input projection of all steps, with every bias that is not inside r * (...) folded in
  at::Tensor bias;
  if (b_ih.defined()) bias = b_ih;
  if (b_hh.defined()) {
    at::Tensor bh = b_hh;
    if (d.cell == Cell::kGRU) bh = at::cat({b_hh.narrow(0, 0, 2 * H), at::zeros({H}, opt)});
    bias = bias.defined() ? bias + bh : bh;
  }
  // lstm and rnn with a batch that fills the tiles take x inside the step GEMMs; gru's n
  // gate needs its input half apart (r * (W_hn h + b_hn)), small batches are better served
  // by one big GEMM (a step would stream W_ih for a few rows)
  const bool fused = !d.proj() && d.cell != Cell::kGRU && B >= 8;
#if defined(__AVX512F__)
  const bool gemv = std::is_same_v<T, float> && B == 1 && !d.proj() && d.cell != Cell::kGRU;
#else
  const bool gemv = false;
#endif
  at::Tensor xw;
  if (gemv) {  // forward_gemv projects the input itself
  } else if (!fused) {
    const at::Tensor x2 = x.reshape({d.T * B, d.I});
    xw = bias.defined() ? at::addmm(bias, x2, w_ih.t()) : at::mm(x2, w_ih.t());
    xw = xw.contiguous();
  } else {
    bias = bias.defined() ? bias.contiguous() : at::zeros({d.GH()}, opt);
  }

  at::Tensor ws = workspace_alloc(numel_of(d, save), opt, sizeof(T));
  StepBuffers<T> buf(d, save, ws.data_ptr<T>(), opt);
  copy_row(buf.h(0), h0.data_ptr<T>(), B * P);
  if (d.cell == Cell::kLSTM) copy_row(buf.c(0), c0.data_ptr<T>(), B * H);
  at::Tensor y = at::empty({d.T, B, P}, opt);
  advise_huge(y.data_ptr(), y.numel() * sizeof(T));
  // b_hn sits inside r * (W_hn h + b_hn); a zero row when absent keeps the gate loop branch-free
  const at::Tensor b_hn_t = (d.cell == Cell::kGRU && b_hh.defined()) ? b_hh.narrow(0, 2 * H, H) : at::zeros({H}, opt);
  const T* b_hn = b_hn_t.data_ptr<T>();
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  if (gemv) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>)
      forward_gemv(d, x.data_ptr<float>(), w_ih.data_ptr<float>(), b_ih.defined() ? b_ih.data_ptr<float>() : nullptr,
                   b_hh.defined() ? b_hh.data_ptr<float>() : nullptr, w_hh.data_ptr<float>(), len, reverse, buf,
                   y.data_ptr<float>(), opt);
#endif
  } else if (!d.proj() && B > 0)
    forward_persistent<T>(d, fused ? nullptr : xw.data_ptr<T>(), x.data_ptr<T>(), w_ih.data_ptr<T>(),
                          fused ? bias.data_ptr<T>() : nullptr, w_hh.data_ptr<T>(), b_hn, len, reverse,
                          buf, y.data_ptr<T>(), opt);
  else
    forward_loop<T>(d, xw.data_ptr<T>(), w_hh.data_ptr<T>(), b_hn, w_hr.defined() ? w_hr.data_ptr<T>() : nullptr, len,
                    reverse, buf, y.data_ptr<T>());
  at::Tensor hT = at::empty({B, P}, opt);
  copy_row(hT.data_ptr<T>(), buf.h(d.T), B * P);
  at::Tensor cT = at::empty({d.cell == Cell::kLSTM ? B : 0, H}, opt);
  if (d.cell == Cell::kLSTM) copy_row(cT.data_ptr<T>(), buf.c(d.T), B * H);
  else cT = at::empty({0}, opt);
  return {y, hT, cT, ws};
}

// ---------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------

// Column sums of a (rows, cols) matrix, parallel over columns: each column is summed in
// row order by one thread, so the result does not depend on the thread count.
template <typename T>
void column_sum(const T* a, int64_t rows, int64_t cols, int64_t lda, T* out) {
  // a few rows (one step of a cell) take less time than waking the other threads
  const int64_t grain = rows * cols < (int64_t(1) << 16) ? std::max<int64_t>(cols, 1) : 256;
  at::parallel_for(0, cols, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) out[c] = T(0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* ar = a + r * lda;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) out[c] += ar[c];
    }
  });
}

// Backward with a projection (or an empty batch): per step, parallel over rows, the gate
// gradients of all steps kept whole; then the weight and input gradients as GEMMs over all
// steps, the bias gradients column sums.
template <typename T>
void backward_loop(const Shape& d, const Workspace<T>& ws, const T* dyp, const T* dhTp, const at::Tensor& x,
                   const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& b_ih,
                   const at::Tensor& b_hh, const int64_t* len, bool reverse, T* dhh, T* dcc,
                   const std::vector<bool>& need, const at::Tensor& dx_t, std::vector<at::Tensor>& out) {
  const auto opt = x.options();
  const int64_t Tn = d.T, B = d.B, H = d.H, P = d.P, GH = d.GH(), TB = Tn * B;
  const bool proj = d.proj(), lstm = d.cell == Cell::kLSTM, gru = d.cell == Cell::kGRU;
  // gradients of the gates' pre-activations: step order (for W_hh) and time order (for
  // W_ih and x); the same buffer unless they differ (gru's n gate, or reversed order)
  const int64_t ldg = GH + kLanes;
  at::Tensor dgh_t = at::empty({TB * ldg}, opt);
  at::Tensor dgi_t = (gru || reverse) ? at::empty({TB * ldg}, opt) : dgh_t;
  T* dgh = dgh_t.data_ptr<T>();
  T* dgi = dgi_t.data_ptr<T>();
  const bool separate = dgi != dgh;
  at::Tensor dr_t = proj ? at::empty({TB, P}, opt) : at::Tensor();
  at::Tensor dhc_t = proj ? at::empty({B, H}, opt) : at::Tensor();
  const T* w_hr_p = proj ? w_hr.data_ptr<T>() : nullptr;
  const at::Tensor zeros_t = at::zeros({H}, opt);
  const T* zrow = zeros_t.data_ptr<T>();
  for (int64_t s = Tn - 1; s >= 0; --s) {
    T* dgs = dgh + s * B * ldg;
    T* drs = proj ? dr_t.data_ptr<T>() + s * B * P : nullptr;
    if (proj) {  // gradient of h (the projection's output), then back through w_hr
      for (int64_t b = 0; b < B; ++b) {
        const int64_t L = len ? len[b] : Tn;
        T* dr = drs + b * P;
        if (s >= L) { zero_row(dr, P); continue; }
        const T* din = (s + 1 < L ? dhh : dhTp) + b * P;
        const T* dyr = dyp + (time_of(s, L, reverse) * B + b) * P;
        for (int64_t j = 0; j < P; ++j) dr[j] = din[j] + dyr[j];
      }
      gemm<T>(false, false, B, H, P, T(1), drs, P, w_hr_p, H, T(0), dhc_t.data_ptr<T>(), H);
    }
    const T* dhc = proj ? dhc_t.data_ptr<T>() : nullptr;
    at::parallel_for(0, B, row_grain(d), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t L = len ? len[b] : Tn;
        T* dg = dgs + b * ldg;
        if (s >= L) {
          zero_row(dg, GH);
          if (separate) zero_row(dgi + (s * B + b) * ldg, GH);
          continue;
        }
        const int64_t t = time_of(s, L, reverse);
        const T* din = (s + 1 < L ? dhh : dhTp) + b * P;
        const T* dyr = dyp + (t * B + b) * P;
        // lstm with a projection: dh = dhc (the gradient through w_hr), else din + dy
        gate_grads<T>(d, ws, s, b, proj ? dhc + b * H : din, proj ? zrow : dyr, dg, dgi + (t * B + b) * ldg,
                      separate, lstm ? dcc + b * H : nullptr, dhh + b * H, 0, H);
      }
    });
    // gru keeps the direct term dh * z written above (beta = 1); the first step's product is
    // dh0 alone, skipped when not wanted (a cell whose state needs no gradient: its only read of W_hh)
    if (s > 0 || need[1])
      gemm<T>(false, false, B, P, GH, T(1), dgs, ldg, w_hh.data_ptr<T>(), P, gru ? T(1) : T(0), dhh, P);
  }

  if (need[0]) {
    out[0] = dx_t;
    gemm<T>(false, false, TB, d.I, GH, T(1), dgi, ldg, w_ih.data_ptr<T>(), d.I, T(0), dx_t.data_ptr<T>(), d.I);
  }
  if (need[3]) {
    out[3] = at::empty({GH, d.I}, opt);
    gemm<T>(true, false, GH, d.I, TB, T(1), dgi, ldg, x.data_ptr<T>(), d.I, T(0), out[3].data_ptr<T>(), d.I);
  }
  if (need[4]) {
    out[4] = at::empty({GH, P}, opt);
    gemm<T>(true, false, GH, P, TB, T(1), dgh, ldg, ws.h, P, T(0), out[4].data_ptr<T>(), P);
  }
  if (need[5] && b_ih.defined()) {
    out[5] = at::empty({GH}, opt);
    column_sum(dgi, TB, GH, ldg, out[5].data_ptr<T>());
  }
  if (need[6] && b_hh.defined()) {
    out[6] = at::empty({GH}, opt);
    if (!gru && need[5] && b_ih.defined()) out[6].copy_(out[5]);  // same values for lstm and rnn
    else column_sum(dgh, TB, GH, ldg, out[6].data_ptr<T>());
  }
  if (need[7] && proj) {
    out[7] = at::empty({P, H}, opt);
    gemm<T>(true, false, P, H, TB, T(1), dr_t.data_ptr<T>(), P, ws.hc, H, T(0), out[7].data_ptr<T>(), H);
  }
}

template <typename T>
std::vector<at::Tensor> backward_typed(const Shape& d, const at::Tensor& dy, const at::Tensor& dhT,
                                       const at::Tensor& dcT, const at::Tensor& x, const at::Tensor& w_ih,
                                       const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh,
                                       const at::Tensor& w_hr, const at::Tensor& lengths, bool reverse,
                                       const at::Tensor& ws_t, const std::vector<bool>& need) {
  const auto opt = x.options();
  const int64_t Tn = d.T, B = d.B, H = d.H, P = d.P, GH = d.GH();
  const bool proj = d.proj(), lstm = d.cell == Cell::kLSTM, gru = d.cell == Cell::kGRU;
  Workspace<T> ws(d, ws_t.data_ptr<T>());
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  const T* dyp = dy.data_ptr<T>();
  const T* dhTp = dhT.data_ptr<T>();

  at::Tensor dhh_t = at::zeros({B, P}, opt);  // gradient into h from the step after
  T* dhh = dhh_t.data_ptr<T>();
  at::Tensor dcc_t = lstm ? dcT.clone() : at::Tensor();
  T* dcc = lstm ? dcc_t.data_ptr<T>() : nullptr;
  at::Tensor dx_t = need[0] ? at::empty({Tn, B, d.I}, opt) : at::Tensor();
  if (need[0]) advise_huge(dx_t.data_ptr(), dx_t.numel() * sizeof(T));
  std::vector<at::Tensor> out(8);
  for (auto& t : out) t = at::empty({0}, opt);  // distinct tensors: outputs of an op may not alias
  const bool gbi = need[5] && b_ih.defined(), gbh = need[6] && b_hh.defined();
  // one step (cells): the loop's per-call packing of W_hh and W_ih would cost more than the
  // step; the GEMMs over all steps of the plain loop are then just the step's own
  if (!proj && B > 0 && Tn > 1) {  // everything inside the step loop
    at::Tensor dwi_t = need[3] ? at::zeros({GH, d.I}, opt) : at::Tensor();
    at::Tensor dwh_t = need[4] ? at::zeros({GH, H}, opt) : at::Tensor();
    // lstm and rnn: the same gradients on both sides, so one sum serves both biases
    at::Tensor dbi_t = (gbi || (gbh && !gru)) ? at::zeros({GH}, opt) : at::Tensor();
    at::Tensor dbh_t = gru ? (gbh ? at::zeros({GH}, opt) : at::Tensor()) : dbi_t;
    auto ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    backward_persistent<T>(d, ws, w_hh.data_ptr<T>(), w_ih.data_ptr<T>(), x.data_ptr<T>(), len, reverse, dyp, dhTp,
                           dhh, dcc, ptr(dx_t), ptr(dwi_t), ptr(dwh_t), ptr(dbi_t), ptr(dbh_t), opt);
    if (need[0]) out[0] = dx_t;
    if (need[3]) out[3] = dwi_t;
    if (need[4]) out[4] = dwh_t;
    if (gbi) out[5] = dbi_t;
    if (gbh) out[6] = gru || !gbi ? dbh_t : dbh_t.clone();
  } else {
    backward_loop<T>(d, ws, dyp, dhTp, x, w_ih, w_hh, w_hr, b_ih, b_hh, len, reverse, dhh, dcc, need, dx_t, out);
  }
  if (need[1]) {  // rows whose sequence is empty pass dh_T straight through
    out[1] = at::empty({B, P}, opt);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = len ? len[b] : Tn;
      copy_row(out[1].data_ptr<T>() + b * P, (L > 0 ? dhh : dhTp) + b * P, P);
    }
  }
  if (need[2] && lstm) out[2] = dcc_t;
  return out;
}

// ---------------------------------------------------------------------------
// backward of one step without lengths or projection (the cells): the gradients from dh (and
// dc) directly, no (T, B, P) dy. Few batch rows take each weight in one sweep of its rows that
// also writes the weight's gradient (at B = 1 those are outer products, which BLAS serves
// poorly); more rows go to the register tiles (four products of a cell's size cost BLAS more in
// per-call setup and threading than in FMAs).
// ---------------------------------------------------------------------------

// Columns [k, k + CW) of one weight W (GH x K, rows as they lie) and its input a (NB x K):
// dw[:, k..] = dg^T @ a[:, k..] and da[:, k..] = add + dg @ W[:, k..] in one sweep of W's rows,
// the da columns held in registers across it. Each da value is one sequential chain over j and
// each dw value one over b, so the results do not depend on how columns are split.
template <typename T, int NB, int CW>
inline void cell_wblock(const T* dg, int64_t ldg, const T* a, const T* w, const T* add, int64_t GH, int64_t K, T* dw,
                        T* da, int64_t k) {
  T acc[NB][CW], av[NB][CW];
  for (int b = 0; b < NB; ++b)
#pragma omp simd
    for (int l = 0; l < CW; ++l) {
      acc[b][l] = add ? add[b * K + k + l] : T(0);
      av[b][l] = a[b * K + k + l];
    }
  if (da && dw) {
    for (int64_t j = 0; j < GH; ++j) {
      const T* wr = w + j * K + k;
      T* dr = dw + j * K + k;
      T g[NB];
      for (int b = 0; b < NB; ++b) g[b] = dg[b * ldg + j];
      for (int b = 0; b < NB; ++b)
#pragma omp simd
        for (int l = 0; l < CW; ++l) acc[b][l] = std::fma(g[b], wr[l], acc[b][l]);
#pragma omp simd
      for (int l = 0; l < CW; ++l) {
        T s = g[0] * av[0][l];
        for (int b = 1; b < NB; ++b) s = std::fma(g[b], av[b][l], s);
        dr[l] = s;
      }
    }
  } else if (da) {
    for (int64_t j = 0; j < GH; ++j) {
      const T* wr = w + j * K + k;
      for (int b = 0; b < NB; ++b) {
        const T g = dg[b * ldg + j];
#pragma omp simd
        for (int l = 0; l < CW; ++l) acc[b][l] = std::fma(g, wr[l], acc[b][l]);
      }
    }
  } else {
    for (int64_t j = 0; j < GH; ++j) {
      T* dr = dw + j * K + k;
      T g[NB];
      for (int b = 0; b < NB; ++b) g[b] = dg[b * ldg + j];
#pragma omp simd
      for (int l = 0; l < CW; ++l) {
        T s = g[0] * av[0][l];
        for (int b = 1; b < NB; ++b) s = std::fma(g[b], av[b][l], s);
        dr[l] = s;
      }
    }
  }
  if (da)
    for (int b = 0; b < NB; ++b)
#pragma omp simd
      for (int l = 0; l < CW; ++l) da[b * K + k + l] = acc[b][l];
}

// Columns [k0, k1) of one weight's sweep (see cell_wblock): wide blocks, then 16-column ones,
// then the last few columns one at a time (same chains).
template <typename T, int NB>
void cell_wsweep(const T* dg, int64_t ldg, const T* a, const T* w, const T* add, int64_t GH, int64_t K, T* dw, T* da,
                 int64_t k0, int64_t k1) {
  // about 16 vector registers of accumulators and as many of a's columns
  constexpr int CW = std::max<int>(16, int(512 / sizeof(T) / NB) / 16 * 16);
  int64_t k = k0;
  for (; k + CW <= k1; k += CW) cell_wblock<T, NB, CW>(dg, ldg, a, w, add, GH, K, dw, da, k);
  for (; k + 16 <= k1; k += 16) cell_wblock<T, NB, 16>(dg, ldg, a, w, add, GH, K, dw, da, k);
  for (; k < k1; ++k) {
    T acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = add ? add[b * K + k] : T(0);
    for (int64_t j = 0; j < GH; ++j) {
      const T wv = w[j * K + k];
      T s = dg[j] * a[k];
      for (int b = 0; b < NB; ++b) {
        acc[b] = std::fma(dg[b * ldg + j], wv, acc[b]);
        if (b) s = std::fma(dg[b * ldg + j], a[b * K + k], s);
      }
      if (dw) dw[j * K + k] = s;
    }
    if (da)
      for (int b = 0; b < NB; ++b) da[b * K + k] = acc[b];
  }
}

template <typename T>
void cell_wsweep_any(int64_t B, const T* dg, int64_t ldg, const T* a, const T* w, const T* add, int64_t GH, int64_t K,
                     T* dw, T* da, int64_t k0, int64_t k1) {
  if (k1 <= k0 || (!dw && !da)) return;
  switch (B) {
    case 1: cell_wsweep<T, 1>(dg, ldg, a, w, add, GH, K, dw, da, k0, k1); break;
    case 2: cell_wsweep<T, 2>(dg, ldg, a, w, add, GH, K, dw, da, k0, k1); break;
    case 3: cell_wsweep<T, 3>(dg, ldg, a, w, add, GH, K, dw, da, k0, k1); break;
    default: cell_wsweep<T, 4>(dg, ldg, a, w, add, GH, K, dw, da, k0, k1); break;
  }
}

constexpr int64_t kCellSweepRows = 4;  // batch rows up to which the weights are swept by hand

// o (cols x rows) = a (rows x cols)^T
template <typename T>
void transpose_rows(const T* __restrict a, int64_t rows, int64_t cols, T* __restrict o) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict ar = a + r * cols;
    for (int64_t c = 0; c < cols; ++c) o[c * rows + r] = ar[c];
  }
}

// a (rows x K) as 16-column blocks, each rows x 16 contiguous, zero lanes past K
template <typename T>
void pack_blocks(const T* __restrict a, int64_t rows, int64_t K, T* __restrict o) {
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    const int64_t n = std::min(kLanes, K - k0);
    for (int64_t r = 0; r < rows; ++r, o += kLanes) {
      const T* __restrict ar = a + r * K + k0;
      if (n == kLanes) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) o[l] = ar[l];
      } else {
        for (int64_t l = 0; l < kLanes; ++l) o[l] = l < n ? ar[l] : T(0);
      }
    }
  }
}

// Columns [n0, n1) (n0 on a 16-column edge) of C (M x N, ldc) = add + A (M x K, one segment) @ W
// (K x N, rows ldw apart, read where they lie) on the register tiles of the step loop. The last
// columns short of a whole block are plain chains in the same k order: a tile reads all 16 lanes
// of each W row, past the end of W's last row there.
template <typename T>
void cell_tiles(const Lhs<T>& A, int64_t M, const T* w, int64_t ldw, T* c, int64_t ldc, const T* add, int64_t n0,
                int64_t n1) {
  if (M <= 0 || n1 <= n0) return;
  std::vector<Blk<T>> blk;
  int64_t n = n0;
  for (; n + kLanes <= n1; n += kLanes) blk.push_back({w + n, c + n, add ? add + n : nullptr, int(kLanes), ldw});
  if (!blk.empty()) tiles<T>(A, M, blk, ldc);
  for (; n < n1; ++n)
    for (int64_t r = 0; r < M; ++r) {
      T acc = add ? add[r * ldc + n] : T(0);
      for (int64_t k = 0; k < A.k1; ++k) acc = std::fma(A.a1[r * A.ld1 + k * A.ks], w[k * ldw + n], acc);
      c[r * ldc + n] = acc;
    }
}

// Gradients (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) of one step from dh and dc (either may be
// undefined: zeros), x (B, I) or (1, B, I), the forward's workspace. An entry not needed (or
// whose input is absent) is an empty tensor.
template <typename T>
std::vector<at::Tensor> backward_cell(const Shape& d, const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& x,
                                      const at::Tensor& w_ih, const at::Tensor& w_hh, bool has_bi, bool has_bh,
                                      const at::Tensor& ws_t, const std::vector<bool>& need) {
  const auto opt = x.options();
  const int64_t B = d.B, H = d.H, I = d.I, GH = d.GH();
  const bool lstm = d.cell == Cell::kLSTM, gru = d.cell == Cell::kGRU;
  Workspace<T> ws(d, ws_t.data_ptr<T>());
  std::vector<at::Tensor> out(8);
  for (auto& t : out) t = at::empty({0}, opt);  // distinct tensors: outputs of an op may not alias
  // scratch: gate gradients (gru: also its time-side ones, n without r), gru's dh * z, zeros
  at::Tensor scratch_t = at::empty({(gru ? 2 : 1) * B * GH + (gru ? B * H : 0) + H}, opt);
  T* dg = scratch_t.data_ptr<T>();
  T* dgt = gru ? dg + B * GH : dg;
  T* dnext = gru ? dgt + B * GH : nullptr;
  T* zrow = (gru ? dnext + B * H : dg + B * GH);
  zero_row(zrow, H);
  at::Tensor dcc_t;
  if (lstm) dcc_t = dc.defined() ? dc.clone() : at::zeros({B, H}, opt);
  T* dcc = lstm ? dcc_t.data_ptr<T>() : nullptr;
  const T* dhp = dh.defined() ? dh.data_ptr<T>() : nullptr;
  for (int64_t b = 0; b < B; ++b)
    gate_grads<T>(d, ws, 0, b, dhp ? dhp + b * H : zrow, zrow, dg + b * GH, dgt + b * GH, false,
                  lstm ? dcc + b * H : nullptr, gru ? dnext + b * H : nullptr, 0, H);
  const bool gx = need[0], gh = need[1], gwi = need[3], gwh = need[4];
  if (gx) out[0] = at::empty(x.sizes(), opt);
  if (gh) out[1] = at::empty({B, H}, opt);
  if (gwi) out[3] = at::empty({GH, I}, opt);
  if (gwh) out[4] = at::empty({GH, H}, opt);
  auto p = [&](int i, bool on) { return on ? out[i].data_ptr<T>() : nullptr; };
  T *dx = p(0, gx), *dh0 = p(1, gh), *dwi = p(3, gwi), *dwh = p(4, gwh);
  const T* xq = x.data_ptr<T>();
  const T* wi = w_ih.data_ptr<T>();
  const T* wh = w_hh.data_ptr<T>();
  if (B == 0) {  // no rows: the weight gradients are empty sums
    if (gwi) zero_row(dwi, GH * I);
    if (gwh) zero_row(dwh, GH * H);
  } else if (B <= kCellSweepRows) {
    // columns of both sweeps split alike (on 16-column edges) when the weights are worth two cores
    const int64_t nbi = (I + 15) / 16, nbh = (H + 15) / 16;
    const int64_t ns = cell_threads(4 * B * GH * (I + H), GH * (I + H) * int64_t(sizeof(T)), std::max(nbi, nbh));
    run_chunks(ns, [&](int64_t i) {
      const auto edge = [&](int64_t nb, int64_t K, int64_t q) { return std::min(K, q * nb / ns * 16); };
      cell_wsweep_any<T>(B, dgt, GH, xq, wi, nullptr, GH, I, dwi, dx, edge(nbi, I, i),
                         i + 1 == ns ? I : edge(nbi, I, i + 1));
      cell_wsweep_any<T>(B, dg, GH, ws.h, wh, dnext, GH, H, dwh, dh0, edge(nbh, H, i),
                         i + 1 == ns ? H : edge(nbh, H, i + 1));
    });
  } else {
    // the four products on the register tiles, each thread a share of every one: columns of
    // dx = dgt @ W_ih and dh0 = dg @ W_hh (+ dh * z), rows of dW_ih = dgt^T @ x and dW_hh =
    // dg^T @ h. At a cell's sizes (B = 32, 256 x 256) BLAS spends more on each call's setup
    // and threading than on the FMAs. Rows of 256 floats lie 1 KiB apart, so a tile reading
    // 12 of them (or x's rows for every weight-gradient tile) keeps them in 4 of L1's 64 sets
    // and misses all the time: the gate gradients are transposed first (G*H x B: a tile's 12
    // rows for one k are one run of floats) and x and h packed in 16-column blocks (B x 16,
    // zero lanes past the end). Every value is one chain over k, whatever the split.
    const int64_t nbi = (I + kLanes - 1) / kLanes, nbh = (H + kLanes - 1) / kLanes;
    at::Tensor pk_t = at::empty({(gru ? 2 : 1) * GH * B + (nbi + nbh) * B * kLanes}, opt);
    T* dgT = pk_t.data_ptr<T>();
    T* dgtT = gru ? dgT + GH * B : dgT;
    T* xpk = dgtT + GH * B;
    T* hpk = xpk + nbi * B * kLanes;
    if (gh || gwh || (!gru && (gx || gwi))) transpose_rows(dg, B, GH, dgT);
    if (gru && (gx || gwi)) transpose_rows(dgt, B, GH, dgtT);
    if (gwi) pack_blocks(xq, B, I, xpk);
    if (gwh) pack_blocks(ws.h, B, H, hpk);
    const int64_t ns = cell_threads(4 * B * GH * (I + H), GH * (I + H) * int64_t(sizeof(T)), std::max(nbi, nbh));
    run_chunks(ns, [&](int64_t i) {
      const auto col = [&](int64_t N, int64_t nb, int64_t q) { return q == ns ? N : q * nb / ns * kLanes; };
      // dx, dh0: rows b, k = gate column j at dgT[j * B + b]
      const Lhs<T> ai{dgtT, 1, GH, dgtT, 1, 0, B}, ah{dgT, 1, GH, dgT, 1, 0, B};
      if (gx) cell_tiles<T>(ai, B, wi, I, dx, I, nullptr, col(I, nbi, i), col(I, nbi, i + 1));
      if (gh) cell_tiles<T>(ah, B, wh, H, dh0, H, gru ? dnext : nullptr, col(H, nbh, i), col(H, nbh, i + 1));
      // dW: rows j, k = b at dgT[j * B + b], against the packed blocks of x / h
      const int64_t j0 = i * GH / ns, j1 = (i + 1) * GH / ns;
      const auto wgrad = [&](const T* aT, const T* apk, int64_t K, int64_t nb, T* dw) {
        std::vector<Blk<T>> blk;
        for (int64_t q = 0; q < nb; ++q)
          blk.push_back({apk + q * B * kLanes, dw + j0 * K + q * kLanes, nullptr,
                         int(std::min(kLanes, K - q * kLanes)), kLanes});
        if (j1 > j0) tiles<T>(Lhs<T>{aT + j0 * B, B, B, aT, B, 0}, j1 - j0, blk, K);
      };
      if (gwi) wgrad(dgtT, xpk, I, nbi, dwi);
      if (gwh) wgrad(dgT, hpk, H, nbh, dwh);
    });
  }
  const auto colsum = [&](const T* a, T* o) {
    if (B == 0) zero_row(o, GH);
    else copy_row(o, a, GH);
    for (int64_t b = 1; b < B; ++b) {
      const T* ar = a + b * GH;
#pragma omp simd
      for (int64_t j = 0; j < GH; ++j) o[j] += ar[j];
    }
  };
  const bool gbi = need[5] && has_bi, gbh = need[6] && has_bh;
  if (gbi) {
    out[5] = at::empty({GH}, opt);
    colsum(dgt, out[5].data_ptr<T>());
  }
  if (gbh) {
    out[6] = at::empty({GH}, opt);
    if (!gru && gbi) copy_row(out[6].data_ptr<T>(), out[5].data_ptr<T>(), GH);
    else colsum(dg, out[6].data_ptr<T>());
  }
  if (need[2] && lstm) out[2] = dcc_t;
  return out;
}

Shape shape_of(Cell cell, const at::Tensor& x, const at::Tensor& w_hh, const at::Tensor& h0) {
  const int64_t G = cell == Cell::kLSTM ? 4 : cell == Cell::kGRU ? 3 : 1;
  return Shape{cell, x.size(0), x.size(1), x.size(2), w_hh.size(0) / G, h0.size(1), G};
}

at::Tensor contig(const at::Tensor& t) { return t.defined() ? t.contiguous() : t; }

}  // namespace

int64_t workspace_numel(Cell cell, int64_t T, int64_t B, int64_t H, int64_t P, bool save) {
  const int64_t G = cell == Cell::kLSTM ? 4 : cell == Cell::kGRU ? 3 : 1;
  return numel_of(Shape{cell, T, B, 0, H, P, G}, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_forward(
    Cell cell, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_hr,
    const at::Tensor& lengths, bool reverse, bool save) {
  const Shape d = shape_of(cell, x, w_hh, h0);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqkern_rnn_forward_cpu", [&] {
    out = forward_typed<scalar_t>(d, x.contiguous(), h0.contiguous(), contig(c0), w_ih.contiguous(),
                                  w_hh.contiguous(), contig(b_ih), contig(b_hh), contig(w_hr), contig(lengths),
                                  reverse, save);
  });
  return out;
}

std::vector<at::Tensor> rnn_backward(Cell cell, const at::Tensor& dy, const at::Tensor& dh, const at::Tensor& dc,
                                     const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                                     const at::Tensor& b_hh, const at::Tensor& w_hr, const at::Tensor& lengths,
                                     bool reverse, const at::Tensor& ws, const std::vector<bool>& need) {
  (void)c0;
  const Shape d = shape_of(cell, x, w_hh, h0);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqkern_rnn_backward_cpu", [&] {
    out = backward_typed<scalar_t>(d, dy.contiguous(), dh.contiguous(), contig(dc), x.contiguous(),
                                   w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh, contig(w_hr), contig(lengths),
                                   reverse, ws.contiguous(), need);
  });
  return out;
}

std::vector<at::Tensor> rnn_cell_backward(Cell cell, const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& x,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh, bool has_b_ih, bool has_b_hh,
                                          const at::Tensor& ws, const std::vector<bool>& need) {
  const int64_t G = cell == Cell::kLSTM ? 4 : cell == Cell::kGRU ? 3 : 1;
  const int64_t H = w_hh.size(0) / G;
  const Shape d{cell, 1, x.size(-2), x.size(-1), H, H, G};
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqkern_rnn_cell_backward_cpu", [&] {
    out = backward_cell<scalar_t>(d, contig(dh), contig(dc), x.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
                                  has_b_ih, has_b_hh, ws.contiguous(), need);
  });
  return out;
}

}  // namespace seqkern::cpu
