// RWKV-4 WKV on the CPU. Tasks are (batch, block of W channels); inside a task the time
// loop is sequential and the W channels are SIMD lanes (channels are contiguous in
// (B, T, C)). Every exponential has a non-positive argument (x - max), and of each pair
// e^{a - max(a, b)}, e^{b - max(a, b)} one is 1, so a step costs one exp per pair.
// Backward: the forward again storing a checkpoint every kChunk steps, then chunks in
// reverse: recompute the chunk's states, sweep them backwards (see seqkern/ops/wkv.py,
// _reference_backward, for the equations).
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_ps
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/wkv.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// float->int conversion and floor in fast_exp only vectorise without trapping-math;
// nothing here relies on FP exceptions. After the includes so torch code is untouched.
#pragma GCC optimize("no-trapping-math")

namespace seqkern::cpu {
namespace {

constexpr int64_t kChunk = 64;
constexpr size_t kStreamBytes = size_t(8) << 20;

// exp for float, vectorisable (Cody-Waite reduction + degree-6 polynomial, ~1 ulp);
// 0 below -87 (where float exp is subnormal or 0), NaN stays NaN.
inline float fast_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float fx = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);
  const float out = p * __builtin_bit_cast(float, (n + 127) << 23);
  return x != x ? x : (x < -87.0f ? 0.0f : out);
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename T> inline T neg_abs(T x) { return x < T(0) ? x : -x; }
// e^{m - m} for the larger exponent m, as the reference takes it: 1, but NaN when m is
// infinite (k = +inf, or pp and u + k both -inf)
template <typename T> inline T inf_nan(T m) { return (m - m) + T(1); }

#if defined(__AVX512F__)
// fp32 steps on 16 channels per AVX-512 vector, the state in registers over the time loop
// (GCC's vectorisation of step_forward kept it in memory and used a slower exp).
// exp(x) for x <= 0 (the only arguments taken here), ~2 ulp: x = (n + j/16) ln2 + r with
// |r| <= ln2/32, 2^(j/16) from a 16-entry table in one register (vpermps takes j from the low
// 4 bits of n16 = 16 n + j), e^r by a cubic, 2^n by vscalefps (which floors n16/16).
// Clamped at -104, where the result rounds to 0 (between -104 and -87 it is subnormal, as
// torch.exp's); NaN passes through max (it returns its second operand then).
inline __m512 exp16(__m512 x) {
  const __m512 tab = _mm512_setr_ps(1.0f, 1.04427378242741384f, 1.09050773266525766f, 1.13878863475669165f,
                                    1.18920711500272107f, 1.24185781207348405f, 1.29683955465100967f,
                                    1.35425554693689273f, 1.41421356237309505f, 1.47682614593949931f,
                                    1.54221082540794082f, 1.61049033194925430f, 1.68179283050742908f,
                                    1.75625216037329948f, 1.83400808640934246f, 1.91520656139714729f);
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n16 = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(23.0831206542234f)),  // 16 / ln2
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n16 ln2/16, ln2/16 split in two so that the first product is exact
  __m512 r = _mm512_fnmadd_ps(n16, _mm512_set1_ps(0.04332160949707031f), xc);
  r = _mm512_fnmadd_ps(n16, _mm512_set1_ps(8.9287926269338577e-08f), r);
  const __m512 t = _mm512_permutexvar_ps(_mm512_cvtps_epi32(n16), tab);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(1.6666666666666666e-1f), r, _mm512_set1_ps(0.5f));
  q = _mm512_mul_ps(_mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f)), r);  // e^r - 1
  return _mm512_scalef_ps(_mm512_fmadd_ps(t, q, t), _mm512_mul_ps(n16, _mm512_set1_ps(0.0625f)));
}

// step_forward on one vector (same selects and NaN rules); y stored when not null,
// with a non-temporal store when kStream (yt then 64-byte aligned)
template <bool kStream = false>
inline void step16(__m512& aa, __m512& bb, __m512& pp, const float* kt, const float* vt, float* yt, __m512 u,
                   __m512 negw) {
  const __m512 ones = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps(), sign = _mm512_set1_ps(-0.0f);
  const __m512 kk = _mm512_loadu_ps(kt), vv = _mm512_loadu_ps(vt), a = aa, b = bb, p = pp;
  if (yt) {
    const __m512 uk = _mm512_add_ps(u, kk), d = _mm512_sub_ps(p, uk);
    const __m512 e = exp16(_mm512_or_ps(d, sign));  // e^{-|d|}
    const __mmask16 ge = _mm512_cmp_ps_mask(d, zero, _CMP_GE_OQ);
    const __m512 m = _mm512_mask_blend_ps(ge, uk, p);
    const __m512 one = _mm512_add_ps(_mm512_sub_ps(m, m), ones);  // inf_nan
    const __m512 e1 = _mm512_mask_blend_ps(ge, e, one), e2 = _mm512_mask_blend_ps(ge, one, e);
    const __m512 num = _mm512_fmadd_ps(e1, a, _mm512_mul_ps(e2, vv));
    const __m512 y = _mm512_div_ps(num, _mm512_fmadd_ps(e1, b, e2));
    if constexpr (kStream)
      _mm512_stream_ps(yt, y);
    else
      _mm512_storeu_ps(yt, y);
  }
  const __m512 ww = _mm512_add_ps(p, negw);
  const __m512 d = _mm512_sub_ps(ww, kk);
  const __m512 e = exp16(_mm512_or_ps(d, sign));
  const __mmask16 take_k = _mm512_cmp_ps_mask(d, zero, _CMP_LT_OQ);
  const __m512 m = _mm512_mask_blend_ps(take_k, ww, kk);
  const __m512 one = _mm512_add_ps(_mm512_sub_ps(m, m), ones);
  const __m512 e1 = _mm512_mask_blend_ps(take_k, one, e), e2 = _mm512_mask_blend_ps(take_k, e, one);
  aa = _mm512_fmadd_ps(e1, a, _mm512_mul_ps(e2, vv));
  bb = _mm512_fmadd_ps(e1, b, e2);
  pp = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q), m, d);
}

// One reverse step of backward_task's sweep on 16 lanes: the scalar loop's formulas.
// a, b, p: the state before the step; ga..gu: that loop's per-lane adjoints, updated.
inline void back16(const float* kt, const float* vt, const float* gyt, float* gkt, float* gvt, const float* a_,
                   const float* b_, const float* p_, const float* u_, const float* nw_, float* ga_, float* gb_,
                   float* gq_, float* gp_, float* gw_, float* gu_) {
  const __m512 zero = _mm512_setzero_ps(), ones = _mm512_set1_ps(1.0f), sign = _mm512_set1_ps(-0.0f);
  const __m512 kk = _mm512_loadu_ps(kt), vv = _mm512_loadu_ps(vt), a = _mm512_loadu_ps(a_);
  const __m512 b = _mm512_loadu_ps(b_), p = _mm512_loadu_ps(p_), nw = _mm512_loadu_ps(nw_);
  const __m512 ga = _mm512_loadu_ps(ga_), gb = _mm512_loadu_ps(gb_), gq = _mm512_loadu_ps(gq_);
  const __m512 gp = _mm512_loadu_ps(gp_);
  const __m512 uk = _mm512_add_ps(_mm512_loadu_ps(u_), kk);
  const __m512 d = _mm512_sub_ps(p, uk);
  const __m512 e = exp16(_mm512_or_ps(d, sign));
  const __mmask16 ge = _mm512_cmp_ps_mask(d, zero, _CMP_GE_OQ);
  const __m512 e1 = _mm512_mask_blend_ps(ge, e, ones), e2 = _mm512_mask_blend_ps(ge, ones, e);
  const __m512 m = _mm512_mask_blend_ps(ge, uk, p);
  const __m512 den = _mm512_fmadd_ps(e1, b, e2);
  const __m512 yy = _mm512_div_ps(_mm512_fmadd_ps(e1, a, _mm512_mul_ps(e2, vv)), den);
  const __m512 gyd = _mm512_div_ps(_mm512_loadu_ps(gyt), den);
  const __m512 gcur = _mm512_mul_ps(_mm512_mul_ps(gyd, e2), _mm512_sub_ps(vv, yy));
  _mm512_storeu_ps(gu_, _mm512_add_ps(_mm512_loadu_ps(gu_), gcur));
  const __m512 f = exp16(_mm512_add_ps(kk, gq));  // e^{k_t} alpha_{t+1} = ga f
  const __mmask16 take_k = _mm512_cmp_ps_mask(kk, _mm512_add_ps(p, nw), _CMP_GT_OQ);
  const __m512 gk = _mm512_fmadd_ps(f, _mm512_fmadd_ps(ga, vv, gb), gcur);
  _mm512_storeu_ps(gkt, _mm512_add_ps(gk, _mm512_maskz_mov_ps(take_k, gp)));
  _mm512_storeu_ps(gvt, _mm512_fmadd_ps(gyd, e2, _mm512_mul_ps(f, ga)));
  const __m512 ew = exp16(_mm512_add_ps(_mm512_add_ps(gq, p), nw));
  const __m512 gp_w = _mm512_mask_blend_ps(take_k, gp, zero);  // gp stays with the decayed past
  const __m512 dw = _mm512_fmadd_ps(ew, _mm512_fmadd_ps(ga, a, _mm512_mul_ps(gb, b)), gp_w);
  _mm512_storeu_ps(gw_, _mm512_sub_ps(_mm512_loadu_ps(gw_), dw));
  _mm512_storeu_ps(gp_, gp_w);
  // alpha_t = gy_t / D_t + e^{-w} alpha_{t+1}, in running-max form
  const __m512 x1 = _mm512_add_ps(gq, nw), x2 = _mm512_xor_ps(m, sign), dd = _mm512_sub_ps(x1, x2);
  const __m512 sx = exp16(_mm512_or_ps(dd, sign));
  const __mmask16 ge2 = _mm512_cmp_ps_mask(dd, zero, _CMP_GE_OQ);
  const __m512 s1 = _mm512_mask_blend_ps(ge2, sx, ones), s2 = _mm512_mask_blend_ps(ge2, ones, sx);
  const __m512 s2g = _mm512_mul_ps(s2, gyd);
  _mm512_storeu_ps(ga_, _mm512_fmadd_ps(s1, ga, s2g));
  _mm512_storeu_ps(gb_, _mm512_fnmadd_ps(s2g, yy, _mm512_mul_ps(s1, gb)));
  _mm512_storeu_ps(gq_, _mm512_mask_blend_ps(ge2, x2, x1));
}
#endif

// Per-lane state of one task.
template <typename T, int W>
struct Lanes {
  T aa[W], bb[W], pp[W];
};

// One forward step of W lanes: y (may be null) and the state update.
template <typename T, int W, bool kY>
inline void step_forward(Lanes<T, W>& s, const T* kt, const T* vt, T* yt, const T* u, const T* negw) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && W % 16 == 0) {
    // the backward's recomputed states must equal the forward's: the same vector step
    for (int i = 0; i < W; i += 16) {
      __m512 a = _mm512_loadu_ps(s.aa + i), b = _mm512_loadu_ps(s.bb + i), p = _mm512_loadu_ps(s.pp + i);
      step16(a, b, p, kt + i, vt + i, kY ? yt + i : nullptr, _mm512_loadu_ps(u + i), _mm512_loadu_ps(negw + i));
      _mm512_storeu_ps(s.aa + i, a);
      _mm512_storeu_ps(s.bb + i, b);
      _mm512_storeu_ps(s.pp + i, p);
    }
    return;
  }
#endif
#pragma omp simd
  for (int j = 0; j < W; ++j) {
    const T kk = kt[j], vv = vt[j], a = s.aa[j], b = s.bb[j], p = s.pp[j];
    if constexpr (kY) {
      const T uk = u[j] + kk, d = p - uk;
      const T e = fast_exp(neg_abs(d));
      const T one = inf_nan(d >= T(0) ? p : uk);
      const T e1 = d >= T(0) ? one : e, e2 = d >= T(0) ? e : one;
      yt[j] = (e1 * a + e2 * vv) / (e1 * b + e2);
    }
    const T ww = p + negw[j];
    // the new max is k when k > ww (torch.maximum agrees off ties)
    const T d = ww - kk;
    const T e = fast_exp(neg_abs(d));
    const bool take_k = d < T(0);
    const T one = inf_nan(take_k ? kk : ww);
    const T e1 = take_k ? e : one, e2 = take_k ? one : e;
    s.aa[j] = e1 * a + e2 * vv;
    s.bb[j] = e1 * b + e2;
    s.pp[j] = d != d ? d : (take_k ? kk : ww);  // NaN in either operand gives NaN, as torch.maximum does
  }
}

template <typename T, int W>
inline void load_state(Lanes<T, W>& s, const T* st, int64_t C) {
  for (int j = 0; j < W; ++j) {
    s.aa[j] = st[j];
    s.bb[j] = st[C + j];
    s.pp[j] = st[2 * C + j];
  }
}

template <typename T, int W>
inline void store_state(const Lanes<T, W>& s, T* st, int64_t C) {
  for (int j = 0; j < W; ++j) {
    st[j] = s.aa[j];
    st[C + j] = s.bb[j];
    st[2 * C + j] = s.pp[j];
  }
}

// k, v, y point at [b, 0, c0]; st, st_out at [b, 0, c0]; u, negw at [c0].
template <typename T, int W, bool kStream = false>
void forward_task(const T* k, const T* v, T* y, const T* st, T* st_out, const T* u, const T* negw, int64_t T_,
                  int64_t C) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && W % 16 == 0) {
    constexpr int NV = W / 16;
    __m512 aa[NV], bb[NV], pp[NV], uu[NV], nw[NV];
    for (int i = 0; i < NV; ++i) {
      aa[i] = _mm512_loadu_ps(st + 16 * i);
      bb[i] = _mm512_loadu_ps(st + C + 16 * i);
      pp[i] = _mm512_loadu_ps(st + 2 * C + 16 * i);
      uu[i] = _mm512_loadu_ps(u + 16 * i);
      nw[i] = _mm512_loadu_ps(negw + 16 * i);
    }
    // k and v rows are C apart, a new page every few steps, where the hardware prefetcher
    // stops: fetch kAhead steps ahead
    constexpr int64_t kAhead = 8;
    for (int64_t t = 0; t < T_; ++t) {
      const T *kt = k + t * C, *vt = v + t * C;
      if (t + kAhead < T_) {
        for (int i = 0; i < W; i += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(kt + kAhead * C + i), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(vt + kAhead * C + i), _MM_HINT_T0);
        }
      }
      for (int i = 0; i < NV; ++i)
        step16<kStream>(aa[i], bb[i], pp[i], kt + 16 * i, vt + 16 * i, y + t * C + 16 * i, uu[i], nw[i]);
    }
    if constexpr (kStream) _mm_sfence();
    for (int i = 0; i < NV; ++i) {
      _mm512_storeu_ps(st_out + 16 * i, aa[i]);
      _mm512_storeu_ps(st_out + C + 16 * i, bb[i]);
      _mm512_storeu_ps(st_out + 2 * C + 16 * i, pp[i]);
    }
    return;
  }
#endif
  Lanes<T, W> s;
  load_state(s, st, C);
  for (int64_t t = 0; t < T_; ++t) step_forward<T, W, true>(s, k + t * C, v + t * C, y + t * C, u, negw);
  store_state(s, st_out, C);
}

// Gradient outputs of one task; gw, gu per (b, c), summed over b by the caller.
template <typename T, int W>
void backward_task(const T* k, const T* v, const T* gy, const T* st, const T* gst, T* gk, T* gv, T* gst_out, T* gw_bc,
                   T* gu_bc, const T* u, const T* negw, int64_t T_, int64_t C) {
  const int64_t n_chunks = (T_ + kChunk - 1) / kChunk;
  std::vector<Lanes<T, W>> ck(static_cast<size_t>(n_chunks + 1));
  std::vector<Lanes<T, W>> buf(static_cast<size_t>(kChunk));
  Lanes<T, W> s;
  load_state(s, st, C);
  for (int64_t t = 0; t < T_; ++t) {
    if (t % kChunk == 0) ck[t / kChunk] = s;
    step_forward<T, W, false>(s, k + t * C, v + t * C, nullptr, u, negw);
  }
  // terminal adjoints: returned (aa, bb, pp) = (A e^{-pp}, B e^{-pp}, pp)
  T ga[W], gb[W], gq[W], gp[W], gw[W], gu[W];
  for (int j = 0; j < W; ++j) {
    const T gaa = gst[j], gbb = gst[C + j], gpp = gst[2 * C + j];
    ga[j] = gaa;
    gb[j] = gbb;
    gq[j] = -s.pp[j];
    gp[j] = gpp - gaa * s.aa[j] - gbb * s.bb[j];
    gw[j] = T(0);
    gu[j] = T(0);
  }
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, t1 = std::min(T_, t0 + kChunk);
    Lanes<T, W> r = ck[c];
    for (int64_t t = t0; t < t1; ++t) {
      buf[t - t0] = r;
      if (t + 1 < t1) step_forward<T, W, false>(r, k + t * C, v + t * C, nullptr, u, negw);
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const Lanes<T, W>& b4 = buf[t - t0];
      const T *kt = k + t * C, *vt = v + t * C, *gyt = gy + t * C;
      T *gkt = gk + t * C, *gvt = gv + t * C;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float> && W % 16 == 0) {
        for (int i = 0; i < W; i += 16)
          back16(kt + i, vt + i, gyt + i, gkt + i, gvt + i, b4.aa + i, b4.bb + i, b4.pp + i, u + i, negw + i, ga + i,
                 gb + i, gq + i, gp + i, gw + i, gu + i);
        continue;
      }
#endif
#pragma omp simd
      for (int j = 0; j < W; ++j) {
        const T kk = kt[j], vv = vt[j], a = b4.aa[j], b = b4.bb[j], p = b4.pp[j];
        const T uk = u[j] + kk;
        const T d = p - uk;
        const T e = fast_exp(neg_abs(d));
        const T e1 = d >= T(0) ? T(1) : e, e2 = d >= T(0) ? e : T(1);
        const T m = d >= T(0) ? p : uk;
        const T den = e1 * b + e2;
        const T yy = (e1 * a + e2 * vv) / den;
        const T gyd = gyt[j] / den;
        const T gcur = gyd * e2 * (vv - yy);
        gu[j] += gcur;
        const T f = fast_exp(kk + gq[j]);  // e^{k_t} alpha_{t+1} = ga f; the exponent is <= 0
        const bool take_k = kk > p + negw[j];
        const T gpk = take_k ? gp[j] : T(0);
        gkt[j] = gcur + f * (ga[j] * vv + gb[j]) + gpk;
        gvt[j] = gyd * e2 + f * ga[j];
        gw[j] -= fast_exp(gq[j] + p + negw[j]) * (ga[j] * a + gb[j] * b) + (take_k ? T(0) : gp[j]);
        gp[j] = take_k ? T(0) : gp[j];
        // alpha_t = gy_t / D_t + e^{-w} alpha_{t+1}, in running-max form
        const T x1 = gq[j] + negw[j], x2 = -m, dd = x1 - x2;
        const T sx = fast_exp(neg_abs(dd));
        const T s1 = dd >= T(0) ? T(1) : sx, s2 = dd >= T(0) ? sx : T(1);
        ga[j] = s1 * ga[j] + s2 * gyd;
        gb[j] = s1 * gb[j] - s2 * gyd * yy;
        gq[j] = dd >= T(0) ? x1 : x2;
      }
    }
  }
  for (int j = 0; j < W; ++j) {
    const T aa0 = st[j], bb0 = st[C + j], pp0 = st[2 * C + j];
    const T sc = fast_exp(gq[j] + pp0);
    gst_out[j] = ga[j] * sc;
    gst_out[C + j] = gb[j] * sc;
    gst_out[2 * C + j] = sc * (ga[j] * aa0 + gb[j] * bb0) + gp[j];
    gw_bc[j] = gw[j];
    gu_bc[j] = gu[j];
  }
}

// Tasks: for each b, full blocks of W channels, then the remaining channels one by one.
// Handed out one at a time from a counter, not in fixed shares: on a shared machine a thread
// that the OS parks then holds up one task instead of half of them. Every task writes its
// own outputs, so the results do not depend on which thread ran it.
template <int W, typename F>
void for_tasks(int64_t Bn, int64_t C, int64_t work_per_task, const F& f) {
  const int64_t full = C / W, tail = C - full * W, per_b = full + tail, n = Bn * per_b;
  const auto run = [&](int64_t i) {
    const int64_t b = i / per_b, r = i % per_b;
    if (r < full)
      f(b, r * W, std::integral_constant<int, W>());
    else
      f(b, full * W + (r - full), std::integral_constant<int, 1>());
  };
  // as many workers as the work is worth (about 32768 lane-steps each), at most one per thread
  const int64_t worth = n * std::max<int64_t>(work_per_task, 1) / 32768;
  const int64_t workers = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), worth, n});
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) run(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) run(i);
  });
}

// 4 AVX-512 (8 AVX2) vectors per task: the time recurrence is latency-bound, independent lanes hide it
template <typename T> constexpr int lanes() { return sizeof(T) == 4 ? 64 : 32; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> wkv4_forward(const at::Tensor& time_decay, const at::Tensor& time_first,
                                                const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& state_) {
  const at::Tensor k = k_.contiguous(), v = v_.contiguous(), state = state_.contiguous();
  const int64_t Bn = k.size(0), T_ = k.size(1), C = k.size(2);
  at::Tensor y = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor st_out = at::empty_like(state, at::MemoryFormat::Contiguous);
  const at::Tensor negw = time_decay.exp().neg().contiguous(), u = time_first.contiguous();
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "seqkern_wkv4_forward_cpu", [&] {
    using T = scalar_t;
    const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *sp = state.data_ptr<T>();
    const T *up = u.data_ptr<T>(), *wp = negw.data_ptr<T>();
    T *yp = y.data_ptr<T>(), *so = st_out.data_ptr<T>();
    // y bigger than about half the L3 would be evicted before anyone reads it: store it
    // non-temporally, which also saves reading its lines in first (a third of the traffic)
    const bool stream = std::is_same_v<T, float> && y.nbytes() >= kStreamBytes && C % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(yp) % 64 == 0;
    for_tasks<lanes<T>()>(Bn, C, T_ * lanes<T>(), [&](int64_t b, int64_t c0, auto w) {
      constexpr int W = decltype(w)::value;
      const int64_t o = b * T_ * C + c0;
      if (W > 1 && stream)
        forward_task<T, W, true>(kp + o, vp + o, yp + o, sp + b * 3 * C + c0, so + b * 3 * C + c0, up + c0, wp + c0,
                                 T_, C);
      else
        forward_task<T, W>(kp + o, vp + o, yp + o, sp + b * 3 * C + c0, so + b * 3 * C + c0, up + c0, wp + c0, T_, C);
    });
  });
  return {y, st_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_backward(
    const at::Tensor& time_decay, const at::Tensor& time_first, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& state_, const at::Tensor& gy_, const at::Tensor& gstate_) {
  const at::Tensor k = k_.contiguous(), v = v_.contiguous(), state = state_.contiguous();
  const at::Tensor gy = gy_.contiguous(), gstate = gstate_.contiguous();
  const int64_t Bn = k.size(0), T_ = k.size(1), C = k.size(2);
  at::Tensor gk = at::empty_like(k, at::MemoryFormat::Contiguous), gv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor gst = at::empty_like(state, at::MemoryFormat::Contiguous);
  at::Tensor gw_bc = at::empty({Bn, C}, k.options()), gu_bc = at::empty({Bn, C}, k.options());
  const at::Tensor w = time_decay.exp().contiguous();
  const at::Tensor negw = w.neg(), u = time_first.contiguous();
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "seqkern_wkv4_backward_cpu", [&] {
    using T = scalar_t;
    const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *sp = state.data_ptr<T>();
    const T *gyp = gy.data_ptr<T>(), *gsp = gstate.data_ptr<T>();
    const T *up = u.data_ptr<T>(), *wp = negw.data_ptr<T>();
    T *gkp = gk.data_ptr<T>(), *gvp = gv.data_ptr<T>(), *gso = gst.data_ptr<T>();
    T *gwp = gw_bc.data_ptr<T>(), *gup = gu_bc.data_ptr<T>();
    for_tasks<lanes<T>()>(Bn, C, 3 * T_ * lanes<T>(), [&](int64_t b, int64_t c0, auto lanes_c) {
      constexpr int W = decltype(lanes_c)::value;
      const int64_t o = b * T_ * C + c0, os = b * 3 * C + c0;
      backward_task<T, W>(kp + o, vp + o, gyp + o, sp + os, gsp + os, gkp + o, gvp + o, gso + os, gwp + b * C + c0,
                          gup + b * C + c0, up + c0, wp + c0, T_, C);
    });
  });
  // d/dtime_decay = d/dw * w; the sum over the batch is a separate, deterministic reduction
  return {gw_bc.sum(0) * w, gu_bc.sum(0), gk, gv, gst};
}

}  // namespace seqkern::cpu
