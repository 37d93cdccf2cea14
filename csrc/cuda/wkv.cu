// RWKV-4 WKV on CUDA: one thread per (batch, channel), consecutive threads on consecutive
// channels (coalesced), the time loop inside the thread, state in registers in fp32
// (fp64 for fp64). Of each pair e^{a - max}, e^{b - max} one is 1: one exp per pair.
// Backward: the forward saves the state before every step, then a reverse sweep with
// the adjoints in running-max form (equations: seqkern/ops/wkv.py, _reference_backward).
#include "cuda/wkv.h"

namespace seqkern::cuda {
namespace {

__device__ __forceinline__ float ex(float x) { return __expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }

template <typename T, typename A, bool kSave>
__global__ void __launch_bounds__(64) wkv4_fwd_kernel(const A* __restrict__ negw, const A* __restrict__ u,
                                                       const T* __restrict__ k, const T* __restrict__ v,
                                                       const A* __restrict__ s, T* __restrict__ y,
                                                       A* __restrict__ s_out, A* __restrict__ saved, int64_t B,
                                                       int64_t T_, int64_t C) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const A w = negw[c], uu = u[c];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
  A aa = s[b * 3 * C + c], bb = s[b * 3 * C + C + c], pp = s[b * 3 * C + 2 * C + c];
  const int64_t base = b * T_ * C + c;
  for (int64_t t = 0; t < T_; ++t) {
    if constexpr (kSave) {
      A* sv = saved + (b * T_ + t) * 3 * C + c;
      sv[0] = aa;
      sv[C] = bb;
      sv[2 * C] = pp;
    }
    const A kk = ld(k + base + t * C), vv = ld(v + base + t * C);
    A d = pp - (uu + kk);
    A e = ex(-fabs(d));
    A e1 = d >= A(0) ? A(1) : e, e2 = d >= A(0) ? e : A(1);
    st(y + base + t * C, (e1 * aa + e2 * vv) / (e1 * bb + e2));
    const A ww = pp + w;
    d = ww - kk;
    e = ex(-fabs(d));
    e1 = d < A(0) ? e : A(1);  // k is the new max when k > ww
    e2 = d < A(0) ? A(1) : e;
    aa = e1 * aa + e2 * vv;
    bb = e1 * bb + e2;
    pp = d != d ? d : (d < A(0) ? kk : ww);  // NaN in either operand gives NaN, as torch.maximum does
  }
  s_out[b * 3 * C + c] = aa;
  s_out[b * 3 * C + C + c] = bb;
  s_out[b * 3 * C + 2 * C + c] = pp;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(64) wkv4_bwd_kernel(
    const A* __restrict__ negw, const A* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const A* __restrict__ s, const A* __restrict__ saved, const A* __restrict__ sT, const T* __restrict__ gy,
    const A* __restrict__ gs, T* __restrict__ gk, T* __restrict__ gv, A* __restrict__ gs_out, A* __restrict__ gw_bc,
    A* __restrict__ gu_bc, int64_t B, int64_t T_, int64_t C) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const A w = negw[c], uu = u[c];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
  const int64_t so = b * 3 * C + c;
  // returned (aa, bb, pp) = (A e^{-pp}, B e^{-pp}, pp): split its gradient between A, B and pp
  A ga = gs[so], gb = gs[so + C];
  A gp = gs[so + 2 * C] - ga * sT[so] - gb * sT[so + C];
  A gq = -sT[so + 2 * C];
  A gw = A(0), gu = A(0);
  const int64_t base = b * T_ * C + c;
  for (int64_t t = T_ - 1; t >= 0; --t) {
    const A* sv = saved + (b * T_ + t) * 3 * C + c;
    const A a = sv[0], bt = sv[C], p = sv[2 * C];
    const A kk = ld(k + base + t * C), vv = ld(v + base + t * C), gyt = ld(gy + base + t * C);
    const A uk = uu + kk, d = p - uk;
    const A e = ex(-fabs(d));
    const A e1 = d >= A(0) ? A(1) : e, e2 = d >= A(0) ? e : A(1);
    const A m = d >= A(0) ? p : uk;
    const A inv = A(1) / (e1 * bt + e2);  // one division per step (fp64 division is a call)
    const A yy = (e1 * a + e2 * vv) * inv;
    const A gyd = gyt * inv;
    const A gcur = gyd * e2 * (vv - yy);
    gu += gcur;
    const A f = ex(kk + gq);  // e^{k_t} alpha_{t+1} = ga f; the exponent is <= 0
    const bool take_k = kk > p + w;
    st(gk + base + t * C, gcur + f * (ga * vv + gb) + (take_k ? gp : A(0)));
    st(gv + base + t * C, gyd * e2 + f * ga);
    gw -= ex(gq + p + w) * (ga * a + gb * bt) + (take_k ? A(0) : gp);
    gp = take_k ? A(0) : gp;
    const A x1 = gq + w, x2 = -m, dd = x1 - x2;
    const A sx = ex(-fabs(dd));
    const A s1 = dd >= A(0) ? A(1) : sx, s2 = dd >= A(0) ? sx : A(1);
    ga = s1 * ga + s2 * gyd;
    gb = s1 * gb - s2 * gyd * yy;
    gq = dd >= A(0) ? x1 : x2;
  }
  const A sc = ex(gq + s[so + 2 * C]);
  gs_out[so] = ga * sc;
  gs_out[so + C] = gb * sc;
  gs_out[so + 2 * C] = sc * (ga * s[so] + gb * s[so + C]) + gp;
  gw_bc[b * C + c] = gw;
  gu_bc[b * C + c] = gu;
  }
}

constexpr int kThreads = 64;  // small blocks: B*C threads must spread over every SM

// x: channel blocks, y: batch (a grid-stride loop past 65535); no 64-bit division in the kernels
inline dim3 grid_for(int64_t B, int64_t C) {
  const int64_t cap = SK_GRID_CAP(int64_t{65535});
  return dim3(static_cast<unsigned int>((C + kThreads - 1) / kThreads), static_cast<unsigned int>(B < cap ? B : cap));
}

template <typename T>
cudaError_t fwd(const void* negw, const void* u, const void* k, const void* v, const void* state, void* y,
                void* state_out, void* saved, int64_t B, int64_t T_, int64_t C, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (B * C == 0) return cudaSuccess;
  auto kernel = saved != nullptr ? wkv4_fwd_kernel<T, A, true> : wkv4_fwd_kernel<T, A, false>;
  SK_LAUNCH(grid_for(B, C), kThreads, 0, stream, kernel)(
      static_cast<const A*>(negw), static_cast<const A*>(u), static_cast<const T*>(k), static_cast<const T*>(v),
      static_cast<const A*>(state), static_cast<T*>(y), static_cast<A*>(state_out), static_cast<A*>(saved), B, T_, C);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const void* negw, const void* u, const void* k, const void* v, const void* state, const void* saved,
                const void* state_T, const void* gy, const void* gstate, void* gk, void* gv, void* gstate_out,
                void* gw_bc, void* gu_bc, int64_t B, int64_t T_, int64_t C, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (B * C == 0) return cudaSuccess;
  SK_LAUNCH(grid_for(B, C), kThreads, 0, stream, wkv4_bwd_kernel<T, A>)(
      static_cast<const A*>(negw), static_cast<const A*>(u), static_cast<const T*>(k), static_cast<const T*>(v),
      static_cast<const A*>(state), static_cast<const A*>(saved), static_cast<const A*>(state_T),
      static_cast<const T*>(gy), static_cast<const A*>(gstate), static_cast<T*>(gk), static_cast<T*>(gv),
      static_cast<A*>(gstate_out), static_cast<A*>(gw_bc), static_cast<A*>(gu_bc), B, T_, C);
  return cudaGetLastError();
}

}  // namespace

cudaError_t wkv4_forward(DType dtype, const void* negw, const void* u, const void* k, const void* v,
                         const void* state, void* y, void* state_out, void* saved, int64_t B, int64_t T, int64_t C,
                         cudaStream_t stream) {
  return dispatch(dtype, [&](auto t) {
    return fwd<decltype(t)>(negw, u, k, v, state, y, state_out, saved, B, T, C, stream);
  });
}

cudaError_t wkv4_backward(DType dtype, const void* negw, const void* u, const void* k, const void* v,
                          const void* state, const void* saved, const void* state_T, const void* gy,
                          const void* gstate, void* gk, void* gv, void* gstate_out, void* gw_bc, void* gu_bc,
                          int64_t B, int64_t T, int64_t C, cudaStream_t stream) {
  return dispatch(dtype, [&](auto t) {
    return bwd<decltype(t)>(negw, u, k, v, state, saved, state_T, gy, gstate, gk, gv, gstate_out, gw_bc, gu_bc, B, T,
                            C, stream);
  });
}

}  // namespace seqkern::cuda
