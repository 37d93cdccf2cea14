// CUDA RNN / LSTM / GRU: fused per-step gate kernels (forward and backward) and a
// persistent cooperative forward for small batches. fp32 arithmetic for half types,
// fp64 for double. See csrc/cuda/rnn.h for the buffers.
#include "cuda/rnn.h"

namespace seqkern::cuda {
namespace {

__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigm(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

// Clamped to [0, T]: Python validates lengths except while torch.compile traces, and the binding does
// not (a check would sync the device); a length past T would index xw, y and dgi out of bounds.
__device__ __forceinline__ int64_t clamp_length(int64_t L, int64_t T) { return L < 0 ? 0 : (L > T ? T : L); }
__device__ __forceinline__ int64_t length_of(const RnnShape& d, int64_t b) {
  return d.lengths ? clamp_length(d.lengths[b], d.T) : d.T;
}
__device__ __forceinline__ int64_t time_of(int64_t s, int64_t L, bool reverse) {
  return (reverse && s < L) ? L - 1 - s : s;
}

constexpr int kThreads = 256;

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads, cap = SK_GRID_CAP(int64_t{65535} * 8);
  return static_cast<int>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

// ---------------------------------------------------------------------------
// forward step
// ---------------------------------------------------------------------------

template <typename T, int MODE, bool PROJ>
__global__ void forward_step_kernel(RnnShape d, int64_t s, RnnForwardStep a) {
  using A = typename Acc<T>::type;
  constexpr int G = MODE == 0 ? 4 : MODE == 1 ? 3 : 1;
  const int64_t H = d.H, P = d.P, B = d.B, GH = G * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * H;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx % H;
    const int64_t L = length_of(d, b);
    const bool act = s < L;
    const int64_t t = time_of(s, L, d.reverse);
    T* g = static_cast<T*>(a.g) + b * GH;
    const T* xr = static_cast<const T*>(a.xw) + (t * B + b) * GH;
    T* yr = static_cast<T*>(a.y) + (t * B + b) * P;
    if constexpr (MODE == 0) {
      const A i = sigm(ld(g + j) + ld(xr + j));
      const A f = sigm(ld(g + H + j) + ld(xr + H + j));
      const A gg = tanh_(ld(g + 2 * H + j) + ld(xr + 2 * H + j));
      const A o = sigm(ld(g + 3 * H + j) + ld(xr + 3 * H + j));
      const A cprev = ld(static_cast<const T*>(a.cp) + b * H + j);
      const A c = f * cprev + i * gg;
      const A h = o * tanh_(c);
      st(g + j, i);
      st(g + H + j, f);
      st(g + 2 * H + j, gg);
      st(g + 3 * H + j, o);
      st(static_cast<T*>(a.cn) + b * H + j, act ? c : cprev);
      if constexpr (PROJ) {
        st(static_cast<T*>(a.hc) + b * H + j, act ? h : A(0));
      } else {
        const A hprev = ld(static_cast<const T*>(a.hp) + b * P + j);
        st(static_cast<T*>(a.hx) + b * P + j, act ? h : hprev);
        st(yr + j, act ? h : A(0));
      }
    } else if constexpr (MODE == 1) {
      const A r = sigm(ld(g + j) + ld(xr + j));
      const A z = sigm(ld(g + H + j) + ld(xr + H + j));
      const A hn = ld(g + 2 * H + j) + ld(static_cast<const T*>(a.b_hn) + j);
      const A n = tanh_(ld(xr + 2 * H + j) + r * hn);
      const A hprev = ld(static_cast<const T*>(a.hp) + b * H + j);
      const A h = (A(1) - z) * n + z * hprev;
      st(g + j, r);
      st(g + H + j, z);
      st(g + 2 * H + j, n);
      st(static_cast<T*>(a.hn) + b * H + j, act ? hn : A(0));
      st(static_cast<T*>(a.hx) + b * H + j, act ? h : hprev);
      st(yr + j, act ? h : A(0));
    } else {
      const A pre = ld(g + j) + ld(xr + j);  // g is hx: the GEMM wrote the recurrent half there
      const A h = MODE == 2 ? tanh_(pre) : (pre > A(0) ? pre : A(0));
      const A hprev = ld(static_cast<const T*>(a.hp) + b * H + j);
      st(static_cast<T*>(a.hx) + b * H + j, act ? h : hprev);
      st(yr + j, act ? h : A(0));
    }
  }
}

template <typename T>
__global__ void proj_forward_fix_kernel(RnnShape d, int64_t s, T* hx, const T* hp, T* y) {
  const int64_t P = d.P, B = d.B;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * P;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / P, j = idx % P;
    const int64_t L = length_of(d, b);
    if (s < L) {
      y[(time_of(s, L, d.reverse) * B + b) * P + j] = hx[idx];
    } else {
      hx[idx] = hp[idx];
      y[(s * B + b) * P + j] = T(0.0f);
    }
  }
}

// ---------------------------------------------------------------------------
// backward step
// ---------------------------------------------------------------------------

template <typename T>
__global__ void proj_backward_in_kernel(RnnShape d, int64_t s, T* dr, const T* dhh, const T* dhT, const T* dy) {
  using A = typename Acc<T>::type;
  const int64_t P = d.P, B = d.B;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * P;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / P, j = idx % P;
    const int64_t L = length_of(d, b);
    if (s >= L) {
      st(dr + idx, A(0));
      continue;
    }
    const A din = ld((s + 1 < L ? dhh : dhT) + idx);
    st(dr + idx, din + ld(dy + (time_of(s, L, d.reverse) * B + b) * P + j));
  }
}

template <typename T, int MODE, bool PROJ>
__global__ void backward_step_kernel(RnnShape d, int64_t s, RnnBackwardStep a) {
  using A = typename Acc<T>::type;
  constexpr int G = MODE == 0 ? 4 : MODE == 1 ? 3 : 1;
  const int64_t H = d.H, P = d.P, B = d.B, GH = G * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * H;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx % H;
    const int64_t L = length_of(d, b);
    T* ds = static_cast<T*>(a.dgs) + b * GH;
    if (s >= L) {  // past the end: no gradient into this step; carried gradients pass unchanged
      T* dt = static_cast<T*>(a.dgi) + (s * B + b) * GH;
      for (int k = 0; k < G; ++k) {
        st(ds + k * H + j, A(0));
        if (a.separate) st(dt + k * H + j, A(0));
      }
      continue;
    }
    const int64_t t = time_of(s, L, d.reverse);
    T* dt = static_cast<T*>(a.dgi) + (t * B + b) * GH;
    A dh;
    if constexpr (PROJ) {
      dh = ld(static_cast<const T*>(a.dhc) + b * H + j);
    } else {
      const T* din = static_cast<const T*>(s + 1 < L ? a.dhh : a.dhT);
      dh = ld(din + b * P + j) + ld(static_cast<const T*>(a.dy) + (t * B + b) * P + j);
    }
    if constexpr (MODE == 0) {
      const T* gr = static_cast<const T*>(a.gates) + b * GH;
      const T* c = static_cast<const T*>(a.c);
      const A i = ld(gr + j), f = ld(gr + H + j), g = ld(gr + 2 * H + j), o = ld(gr + 3 * H + j);
      const A cn = ld(c + ((s + 1) * B + b) * H + j), cp = ld(c + (s * B + b) * H + j);
      T* dcc = static_cast<T*>(a.dcc) + b * H + j;
      const A tc = tanh_(cn);
      const A dc = ld(dcc) + dh * o * (A(1) - tc * tc);
      const A d0 = dc * g * i * (A(1) - i), d1 = dc * cp * f * (A(1) - f);
      const A d2 = dc * i * (A(1) - g * g), d3 = dh * tc * o * (A(1) - o);
      st(dcc, dc * f);
      st(ds + j, d0); st(ds + H + j, d1); st(ds + 2 * H + j, d2); st(ds + 3 * H + j, d3);
      if (a.separate) { st(dt + j, d0); st(dt + H + j, d1); st(dt + 2 * H + j, d2); st(dt + 3 * H + j, d3); }
    } else if constexpr (MODE == 1) {
      const T* gr = static_cast<const T*>(a.gates) + b * GH;
      const A r = ld(gr + j), z = ld(gr + H + j), n = ld(gr + 2 * H + j);
      const A hn = ld(static_cast<const T*>(a.hn) + b * H + j);
      const A hp = ld(static_cast<const T*>(a.h) + (s * B + b) * H + j);
      const A dn = dh * (A(1) - z) * (A(1) - n * n);
      const A dz = dh * (hp - n) * z * (A(1) - z);
      const A dr = dn * hn * r * (A(1) - r);
      st(ds + j, dr); st(ds + H + j, dz); st(ds + 2 * H + j, dn * r);
      st(dt + j, dr); st(dt + H + j, dz); st(dt + 2 * H + j, dn);
      st(static_cast<T*>(a.dhh) + b * P + j, dh * z);  // the direct path; the GEMM adds dgh @ W_hh
    } else {
      const A hn = ld(static_cast<const T*>(a.h) + ((s + 1) * B + b) * H + j);
      const A dp = MODE == 2 ? dh * (A(1) - hn * hn) : (hn > A(0) ? dh : A(0));
      st(ds + j, dp);
      if (a.separate) st(dt + j, dp);
    }
  }
}

// ---------------------------------------------------------------------------
// persistent forward
// ---------------------------------------------------------------------------

constexpr int kMaxPersistentBatch = 16;

// Loads through L2 only: the states are written by other blocks, and L1 is not coherent.
__device__ __forceinline__ float ld_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double ld_cg(const double* p) { return __ldcg(p); }

// Every block arrives, then waits until all have: the counter only grows, so barrier k
// waits for k * gridDim.x arrivals and nothing has to be reset inside the launch.
__device__ __forceinline__ void grid_barrier(unsigned int* counter, unsigned int target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
    while (*reinterpret_cast<volatile unsigned int*>(counter) < target) {
      __nanosleep(32);  // fewer polls of the L2 line the arriving blocks write to
    }
    __threadfence();
  }
  __syncthreads();
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) persistent_forward_kernel(RnnShape d, RnnPersistentForward a, int HB) {
  constexpr int G = MODE == 0 ? 4 : MODE == 1 ? 3 : 1;
  SK_DYNAMIC_SMEM(unsigned char, smem_raw);
  int64_t* lens = reinterpret_cast<int64_t*>(smem_raw);  // kMaxPersistentBatch
  T* w = reinterpret_cast<T*>(lens + kMaxPersistentBatch);  // this block's G * hb rows of W_hh, for every step
  T* pre = w + static_cast<int64_t>(G) * HB * d.P;  // (B, G * hb) recurrent half of the gates
  const int64_t H = d.H, P = d.P, B = d.B, GH = G * H;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * HB;
  const int hb = static_cast<int>(H - j0 < HB ? H - j0 : HB);
  const int rows = G * hb;
  const T* W = static_cast<const T*>(a.w_hh);
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>(rows) * P; e += blockDim.x) {
    const int64_t r = e / P, p = e % P;
    w[e] = W[((r / hb) * H + j0 + r % hb) * P + p];
  }
  if (threadIdx.x < B) lens[threadIdx.x] = length_of(d, threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  T* hs = static_cast<T*>(a.h);
  T* cs = static_cast<T*>(a.c);
  const T* xw = static_cast<const T*>(a.xw);
  for (int64_t s = 0; s < d.T; ++s) {
    const int64_t s0 = a.save ? s : (s & 1), s1 = a.save ? s + 1 : ((s + 1) & 1);
    const T* hp = hs + s0 * B * P;
    T* hx = hs + s1 * B * P;
    // recurrent half: one warp per (batch row, gate row) dot product of length P
    for (int pair = warp; pair < B * rows; pair += nwarps) {
      const int b = pair / rows, r = pair % rows;
      T acc = T(0);
      for (int64_t p = lane; p < P; p += 32) acc += w[r * P + p] * ld_cg(hp + b * P + p);
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
      if (lane == 0) pre[pair] = acc;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < B * hb; e += blockDim.x) {
      const int b = e / hb, u = e % hb;
      const int64_t j = j0 + u, L = lens[b];
      const bool act = s < L;
      const int64_t t = time_of(s, L, d.reverse);
      const T* xr = xw + (t * B + b) * GH;
      const T* pr = pre + b * rows;
      T* yr = static_cast<T*>(a.y) + (t * B + b) * P;
      T* gs = a.save ? static_cast<T*>(a.gates) + (s * B + b) * GH : nullptr;
      if constexpr (MODE == 0) {
        const T i = sigm(pr[u] + xr[j]), f = sigm(pr[hb + u] + xr[H + j]);
        const T g = tanh_(pr[2 * hb + u] + xr[2 * H + j]), o = sigm(pr[3 * hb + u] + xr[3 * H + j]);
        const T cprev = ld_cg(cs + (s0 * B + b) * H + j);
        const T c = f * cprev + i * g, h = o * tanh_(c);
        cs[(s1 * B + b) * H + j] = act ? c : cprev;
        hx[b * P + j] = act ? h : ld_cg(hp + b * P + j);
        yr[j] = act ? h : T(0);
        if (gs) { gs[j] = i; gs[H + j] = f; gs[2 * H + j] = g; gs[3 * H + j] = o; }
      } else if constexpr (MODE == 1) {
        const T r = sigm(pr[u] + xr[j]), z = sigm(pr[hb + u] + xr[H + j]);
        const T hn = pr[2 * hb + u] + static_cast<const T*>(a.b_hn)[j];
        const T n = tanh_(xr[2 * H + j] + r * hn);
        const T hprev = ld_cg(hp + b * P + j);
        const T h = (T(1) - z) * n + z * hprev;
        hx[b * P + j] = act ? h : hprev;
        yr[j] = act ? h : T(0);
        if (gs) {
          gs[j] = r; gs[H + j] = z; gs[2 * H + j] = n;
          static_cast<T*>(a.hn)[(s * B + b) * H + j] = act ? hn : T(0);
        }
      } else {
        const T x = pr[u] + xr[j];
        const T h = MODE == 2 ? tanh_(x) : (x > T(0) ? x : T(0));
        hx[b * P + j] = act ? h : ld_cg(hp + b * P + j);
        yr[j] = act ? h : T(0);
      }
    }
    grid_barrier(a.barrier, static_cast<unsigned int>((s + 1) * gridDim.x));
  }
}

// the kernel's compile-time (mode, projection) pair: f(Variant<MODE, PROJ>{})
template <int M, bool P> struct Variant {
  static constexpr int mode = M;
  static constexpr bool proj = P;
};

template <typename F>
cudaError_t by_variant(const RnnShape& d, F&& f) {
  switch (d.mode) {
    case 0: return d.proj ? f(Variant<0, true>{}) : f(Variant<0, false>{});
    case 1: return f(Variant<1, false>{});
    case 2: return f(Variant<2, false>{});
    case 3: return f(Variant<3, false>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int MODE>
cudaError_t launch_persistent(const RnnShape& d, const RnnPersistentForward& a, cudaStream_t stream) {
  constexpr int G = MODE == 0 ? 4 : MODE == 1 ? 3 : 1;
  int dev = 0, sms = 0, coop = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (!coop || sms <= 0) return cudaErrorNotSupported;
  int nb = static_cast<int>(d.H < sms ? d.H : sms);
  int HB = static_cast<int>((d.H + nb - 1) / nb);
  nb = static_cast<int>((d.H + HB - 1) / HB);
  const size_t smem = kMaxPersistentBatch * sizeof(int64_t) +
                      (static_cast<size_t>(G) * HB * d.P + static_cast<size_t>(d.B) * G * HB) * sizeof(T);
  if (smem > static_cast<size_t>(optin)) return cudaErrorNotSupported;
  auto fn = persistent_forward_kernel<T, MODE>;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (per_sm * sms < nb) return cudaErrorNotSupported;
  RnnShape dd = d;
  RnnPersistentForward aa = a;
  void* args[] = {&dd, &aa, &HB};
  return cudaLaunchCooperativeKernel(fn, dim3(nb), dim3(kThreads), args, smem, stream);
}

}  // namespace

cudaError_t rnn_forward_step(const RnnShape& d, int64_t s, const RnnForwardStep& a, cudaStream_t stream) {
  if (d.B * d.H == 0) return cudaSuccess;
  return dispatch(d.dtype, [&](auto t) {
    return by_variant(d, [&](auto v) {
      using V = decltype(v);
      SK_LAUNCH(grid_for(d.B * d.H), kThreads, 0, stream, forward_step_kernel<decltype(t), V::mode, V::proj>)(d, s, a);
      return cudaGetLastError();
    });
  });
}

cudaError_t rnn_backward_step(const RnnShape& d, int64_t s, const RnnBackwardStep& a, cudaStream_t stream) {
  if (d.B * d.H == 0) return cudaSuccess;
  return dispatch(d.dtype, [&](auto t) {
    return by_variant(d, [&](auto v) {
      using V = decltype(v);
      SK_LAUNCH(grid_for(d.B * d.H), kThreads, 0, stream, backward_step_kernel<decltype(t), V::mode, V::proj>)(d, s, a);
      return cudaGetLastError();
    });
  });
}

cudaError_t rnn_proj_forward_fix(const RnnShape& d, int64_t s, void* hx, const void* hp, void* y, cudaStream_t stream) {
  if (d.B * d.P == 0) return cudaSuccess;
  return dispatch(d.dtype, [&](auto t) {
    using T = decltype(t);
    SK_LAUNCH(grid_for(d.B * d.P), kThreads, 0, stream, proj_forward_fix_kernel<T>)(
        d, s, static_cast<T*>(hx), static_cast<const T*>(hp), static_cast<T*>(y));
    return cudaGetLastError();
  });
}

cudaError_t rnn_proj_backward_in(const RnnShape& d, int64_t s, void* dr, const void* dhh, const void* dhT,
                                 const void* dy, cudaStream_t stream) {
  if (d.B * d.P == 0) return cudaSuccess;
  return dispatch(d.dtype, [&](auto t) {
    using T = decltype(t);
    SK_LAUNCH(grid_for(d.B * d.P), kThreads, 0, stream, proj_backward_in_kernel<T>)(
        d, s, static_cast<T*>(dr), static_cast<const T*>(dhh), static_cast<const T*>(dhT), static_cast<const T*>(dy));
    return cudaGetLastError();
  });
}

bool rnn_persistent_supported(const RnnShape& d) {
  return !d.proj && d.B >= 1 && d.B <= kMaxPersistentBatch && d.T >= 1 && d.H <= 1024 &&
         (d.dtype == DType::kFloat32 || d.dtype == DType::kFloat64);
}

cudaError_t rnn_persistent_forward(const RnnShape& d, const RnnPersistentForward& a, cudaStream_t stream) {
  if (!rnn_persistent_supported(d)) return cudaErrorNotSupported;
  auto run = [&](auto t) {
    return by_variant(d, [&](auto v) { return launch_persistent<decltype(t), decltype(v)::mode>(d, a, stream); });
  };
  return d.dtype == DType::kFloat64 ? run(double{}) : run(float{});
}

}  // namespace seqkern::cuda
