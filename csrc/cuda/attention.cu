// Flash-style attention on CUDA (SIMT, fp32 accumulation for every dtype). fp16/bf16 with head dims up to
// 128 go to the tensor-core kernels of attention_mma.cu instead when AttnParams::mma is set (opt-in through
// SEQKERN_ATTN_MMA=1 until a GPU run has verified them); this file stays the default and the fallback.
//
// Forward: one warp per query row, eight rows per block; keys stream through shared memory in tiles
// of 32, one key per lane: the lane computes its score, the warp does the online-softmax update with
// shuffles, and every lane accumulates its slice of the output row (dims lane, lane+32, ...).
// Backward (FlashAttention-2 split, no atomics): delta = rowsum(dO * O); dK/dV with one warp per key
// row looping over query tiles (and the GQA group's heads); dQ with one warp per query row looping
// over key tiles. P is recomputed from the saved log-sum-exp, never stored.
#include "cuda/attention.h"
#include "cuda/attention_dropout.h"

#include <type_traits>

namespace seqkern::cuda {
namespace {

constexpr int kWarps = 8;  // rows (queries or keys) per block, one warp each
constexpr int kTile = 32;  // keys (forward, dQ) or queries (dK/dV) per shared tile, one per lane
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// Scaled score of (i, j) given the dot product; -inf when masked out, causal-excluded or out of range.
template <typename T>
__device__ __forceinline__ float score(const AttnParams& p, float dot, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (j >= p.S || i >= p.L || (p.causal && j > i)) return -INFINITY;
  float s = dot * p.scale;
  if (p.mask != nullptr)
    s += to_f(static_cast<const T*>(p.mask)[b * p.mask_sb + h * p.mask_sh + i * p.mask_sl + j * p.mask_ss]);
  return s;
}

// rows x cols tile of a row-major (rows of `ld` elements) tensor into shared memory as fp32 with row
// pitch `pitch`; rows past `valid` are zero.
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int pitch, const T* src, int64_t ld, int rows, int64_t valid,
                                          int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx % cols;
    dst[r * pitch + c] = r < valid ? to_f(src[static_cast<int64_t>(r) * ld + c]) : 0.0f;
  }
}

template <typename T, int NT>
__global__ void fwd_kernel(AttnParams p, T* __restrict__ out, float* __restrict__ lse) {
  SK_DYNAMIC_SMEM(float, smem);
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  float* Ks = smem;                  // kTile x (E + 1)
  float* Vs = Ks + kTile * (E + 1);  // kTile x Ev
  float* Qs = Vs + kTile * Ev;       // kWarps x E
  const int64_t nblk = (p.L + kWarps - 1) / kWarps;
  const int64_t bh = blockIdx.x / nblk, row0 = (blockIdx.x % nblk) * kWarps;
  const int64_t b = bh / p.Hq, h = bh % p.Hq, bhk = b * p.Hk + h / (p.Hq / p.Hk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = row0 + warp;
  const T* q = static_cast<const T*>(p.q) + (bh * p.L + row0) * p.E;
  const T* k = static_cast<const T*>(p.k) + bhk * p.S * p.E;
  const T* v = static_cast<const T*>(p.v) + bhk * p.S * p.Ev;
  load_tile(Qs, E, q, p.E, kWarps, p.L - row0, E);

  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  const uint32_t rh = p.dropout ? row_hash(p, bh * p.L + i) : 0u;
  // causal: no row of this block sees a key at or past row0 + kWarps
  const int64_t j_end = p.causal ? min(p.S, row0 + kWarps) : p.S;
  for (int64_t j0 = 0; j0 < j_end; j0 += kTile) {
    __syncthreads();
    load_tile(Ks, E + 1, k + j0 * p.E, p.E, kTile, p.S - j0, E);
    load_tile(Vs, Ev, v + j0 * p.Ev, p.Ev, kTile, p.S - j0, Ev);
    __syncthreads();
    if (i >= p.L) continue;  // warp-uniform; the barriers above stay reached by every warp
    float dot = 0.0f;
    for (int e = 0; e < E; ++e) dot += Qs[warp * E + e] * Ks[lane * (E + 1) + e];
    const float s = score<T>(p, dot, b, h, i, j0 + lane);
    const float m_new = fmaxf(m, warp_max(s));
    if (m_new == -INFINITY) continue;  // nothing visible yet in this row
    const float alpha = __expf(m - m_new);
    const float pr = __expf(s - m_new);
    l = l * alpha + warp_sum(pr);
    m = m_new;
    const float pz = p.dropout ? pr * dropout_scale(p, rh, j0 + lane) : pr;
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] *= alpha;
    for (int c = 0; c < kTile; ++c) {
      const float pc = __shfl_sync(kFull, pz, c);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int e = lane + 32 * t;
        if (e < Ev) acc[t] += pc * Vs[c * Ev + e];
      }
    }
  }
  if (i >= p.L) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // fully masked rows: output 0, lse -inf
  T* o = out + (bh * p.L + i) * p.Ev;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int e = lane + 32 * t;
    if (e < Ev) o[e] = from_f<T>(acc[t] * inv);
  }
  if (lane == 0) lse[bh * p.L + i] = l > 0.0f ? m + __logf(l) : -INFINITY;
}

template <typename T>
__global__ void delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, float* __restrict__ delta,
                             int64_t rows, int64_t Ev) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  float s = 0.0f;
  for (int64_t e = lane; e < Ev; e += 32) s += to_f(dout[r * Ev + e]) * to_f(out[r * Ev + e]);
  s = warp_sum(s);
  if (lane == 0) delta[r] = s;
}

// P of (i, j) recomputed from lse (dead rows: lse = -inf gives 0).
__device__ __forceinline__ float prob(float s, float lse_i) {
  return (s == -INFINITY || lse_i == -INFINITY) ? 0.0f : __expf(s - lse_i);
}

template <typename T, int NT>
__global__ void dkdv_kernel(AttnParams p, const T* __restrict__ dout,
                                                           const float* __restrict__ lse,
                                                           const float* __restrict__ delta, T* __restrict__ dk,
                                                           T* __restrict__ dv) {
  SK_DYNAMIC_SMEM(float, smem);
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  float* Qs = smem;                    // kTile x (E + 1)
  float* dOs = Qs + kTile * (E + 1);   // kTile x (Ev + 1)
  float* Ks = dOs + kTile * (Ev + 1);  // kWarps x E
  float* Vs = Ks + kWarps * E;         // kWarps x Ev
  float* Ls = Vs + kWarps * Ev;        // kTile lse
  float* Ds = Ls + kTile;              // kTile delta
  const int64_t nblk = (p.S + kWarps - 1) / kWarps;
  const int64_t bhk = blockIdx.x / nblk, j0 = (blockIdx.x % nblk) * kWarps;
  const int64_t b = bhk / p.Hk, hk = bhk % p.Hk, G = p.Hq / p.Hk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = j0 + warp;
  load_tile(Ks, E, static_cast<const T*>(p.k) + (bhk * p.S + j0) * p.E, p.E, kWarps, p.S - j0, E);
  load_tile(Vs, Ev, static_cast<const T*>(p.v) + (bhk * p.S + j0) * p.Ev, p.Ev, kWarps, p.S - j0, Ev);
  float dk_acc[NT], dv_acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) dk_acc[t] = dv_acc[t] = 0.0f;
  // causal: query rows before j0 see none of this block's keys
  const int64_t i_start = p.causal ? (j0 / kTile) * kTile : 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g, bh = b * p.Hq + h;
    for (int64_t i0 = i_start; i0 < p.L; i0 += kTile) {
      __syncthreads();
      load_tile(Qs, E + 1, static_cast<const T*>(p.q) + (bh * p.L + i0) * p.E, p.E, kTile, p.L - i0, E);
      load_tile(dOs, Ev + 1, dout + (bh * p.L + i0) * p.Ev, p.Ev, kTile, p.L - i0, Ev);
      if (threadIdx.x < kTile) {
        const int64_t i = i0 + threadIdx.x;
        Ls[threadIdx.x] = i < p.L ? lse[bh * p.L + i] : -INFINITY;
        Ds[threadIdx.x] = i < p.L ? delta[bh * p.L + i] : 0.0f;
      }
      __syncthreads();
      if (j >= p.S) continue;
      const int64_t i = i0 + lane;
      float qk = 0.0f, dp = 0.0f;
      for (int e = 0; e < E; ++e) qk += Ks[warp * E + e] * Qs[lane * (E + 1) + e];
      for (int e = 0; e < Ev; ++e) dp += Vs[warp * Ev + e] * dOs[lane * (Ev + 1) + e];
      const float pr = prob(score<T>(p, qk, b, h, i, j), Ls[lane]);
      const float z = p.dropout && i < p.L ? dropout_scale(p, row_hash(p, bh * p.L + i), j) : 1.0f;
      const float ds = pr * (dp * z - Ds[lane]);
      const float pz = pr * z;
      for (int c = 0; c < kTile; ++c) {
        const float pc = __shfl_sync(kFull, pz, c), dc = __shfl_sync(kFull, ds, c);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int e = lane + 32 * t;
          if (e < Ev) dv_acc[t] += pc * dOs[c * (Ev + 1) + e];
          if (e < E) dk_acc[t] += dc * Qs[c * (E + 1) + e];
        }
      }
    }
  }
  if (j >= p.S) return;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int e = lane + 32 * t;
    if (e < E) dk[(bhk * p.S + j) * p.E + e] = from_f<T>(dk_acc[t] * p.scale);
    if (e < Ev) dv[(bhk * p.S + j) * p.Ev + e] = from_f<T>(dv_acc[t]);
  }
}

template <typename T, int NT>
__global__ void dq_kernel(AttnParams p, const T* __restrict__ dout,
                                                         const float* __restrict__ lse,
                                                         const float* __restrict__ delta, T* __restrict__ dq) {
  SK_DYNAMIC_SMEM(float, smem);
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  float* Ks = smem;                   // kTile x (E + 1)
  float* Vs = Ks + kTile * (E + 1);   // kTile x (Ev + 1)
  float* Qs = Vs + kTile * (Ev + 1);  // kWarps x E
  float* dOs = Qs + kWarps * E;       // kWarps x Ev
  const int64_t nblk = (p.L + kWarps - 1) / kWarps;
  const int64_t bh = blockIdx.x / nblk, row0 = (blockIdx.x % nblk) * kWarps;
  const int64_t b = bh / p.Hq, h = bh % p.Hq, bhk = b * p.Hk + h / (p.Hq / p.Hk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = row0 + warp;
  load_tile(Qs, E, static_cast<const T*>(p.q) + (bh * p.L + row0) * p.E, p.E, kWarps, p.L - row0, E);
  load_tile(dOs, Ev, dout + (bh * p.L + row0) * p.Ev, p.Ev, kWarps, p.L - row0, Ev);
  const float lse_i = i < p.L ? lse[bh * p.L + i] : -INFINITY;
  const float delta_i = i < p.L ? delta[bh * p.L + i] : 0.0f;
  const uint32_t rh = p.dropout ? row_hash(p, bh * p.L + i) : 0u;
  const T* k = static_cast<const T*>(p.k) + bhk * p.S * p.E;
  const T* v = static_cast<const T*>(p.v) + bhk * p.S * p.Ev;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  const int64_t j_end = p.causal ? min(p.S, row0 + kWarps) : p.S;
  for (int64_t j0 = 0; j0 < j_end; j0 += kTile) {
    __syncthreads();
    load_tile(Ks, E + 1, k + j0 * p.E, p.E, kTile, p.S - j0, E);
    load_tile(Vs, Ev + 1, v + j0 * p.Ev, p.Ev, kTile, p.S - j0, Ev);
    __syncthreads();
    if (i >= p.L) continue;
    float qk = 0.0f, dp = 0.0f;
    for (int e = 0; e < E; ++e) qk += Qs[warp * E + e] * Ks[lane * (E + 1) + e];
    for (int e = 0; e < Ev; ++e) dp += dOs[warp * Ev + e] * Vs[lane * (Ev + 1) + e];
    const int64_t j = j0 + lane;
    const float pr = prob(score<T>(p, qk, b, h, i, j), lse_i);
    const float z = p.dropout ? dropout_scale(p, rh, j) : 1.0f;
    const float ds = pr * (dp * z - delta_i);
    for (int c = 0; c < kTile; ++c) {
      const float dc = __shfl_sync(kFull, ds, c);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int e = lane + 32 * t;
        if (e < E) acc[t] += dc * Ks[c * (E + 1) + e];
      }
    }
  }
  if (i >= p.L) return;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int e = lane + 32 * t;
    if (e < E) dq[(bh * p.L + i) * p.E + e] = from_f<T>(acc[t] * p.scale);
  }
}

template <typename Kernel>
cudaError_t prepare(Kernel kernel, size_t smem) {
  // tiles of wide heads exceed the default 48 KB of dynamic shared memory
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <typename T, int NT>
cudaError_t forward_t(const AttnParams& p, void* out, float* lse, cudaStream_t stream) {
  const int64_t blocks = p.B * p.Hq * ((p.L + kWarps - 1) / kWarps);
  if (blocks == 0) return cudaSuccess;
  if (blocks > kAttnMaxGridX) return cudaErrorInvalidConfiguration;
  const size_t smem = sizeof(float) * (kTile * (p.E + 1) + kTile * p.Ev + kWarps * p.E);
  cudaError_t err = prepare(fwd_kernel<T, NT>, smem);
  if (err != cudaSuccess) return err;
  SK_LAUNCH(static_cast<unsigned>(blocks), kWarps * 32, smem, stream, fwd_kernel<T, NT>)(p, static_cast<T*>(out), lse);
  return cudaGetLastError();
}

template <typename T, int NT>
cudaError_t backward_t(const AttnParams& p, const void* dout_, const void* out_, const float* lse, float* delta,
                       void* dq, void* dk, void* dv, cudaStream_t stream) {
  const T* dout = static_cast<const T*>(dout_);
  const int64_t rows = p.B * p.Hq * p.L;
  if (rows > 0) {
    if ((rows + kWarps - 1) / kWarps > kAttnMaxGridX) return cudaErrorInvalidConfiguration;
    SK_LAUNCH(static_cast<unsigned>((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream, delta_kernel<T>)(
        dout, static_cast<const T*>(out_), delta, rows, p.Ev);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (attention_mma_fits(p)) return attention_backward_mma(p, dout, lse, delta, dq, dk, dv, stream);
  const int64_t kv_blocks = p.B * p.Hk * ((p.S + kWarps - 1) / kWarps);
  if (kv_blocks > 0) {
    if (kv_blocks > kAttnMaxGridX) return cudaErrorInvalidConfiguration;
    const size_t smem = sizeof(float) * (kTile * (p.E + 1) + kTile * (p.Ev + 1) + kWarps * (p.E + p.Ev) + 2 * kTile);
    cudaError_t err = prepare(dkdv_kernel<T, NT>, smem);
    if (err != cudaSuccess) return err;
    SK_LAUNCH(static_cast<unsigned>(kv_blocks), kWarps * 32, smem, stream, dkdv_kernel<T, NT>)(
        p, dout, lse, delta, static_cast<T*>(dk), static_cast<T*>(dv));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t q_blocks = p.B * p.Hq * ((p.L + kWarps - 1) / kWarps);
  if (q_blocks > 0) {
    if (q_blocks > kAttnMaxGridX) return cudaErrorInvalidConfiguration;
    const size_t smem = sizeof(float) * (kTile * (p.E + 1) + kTile * (p.Ev + 1) + kWarps * (p.E + p.Ev));
    cudaError_t err = prepare(dq_kernel<T, NT>, smem);
    if (err != cudaSuccess) return err;
    SK_LAUNCH(static_cast<unsigned>(q_blocks), kWarps * 32, smem, stream, dq_kernel<T, NT>)(p, dout, lse, delta,
                                                                                          static_cast<T*>(dq));
    return cudaGetLastError();
  }
  return cudaSuccess;
}

// NT = elements of a head row per lane: the smallest power of two with 32 * NT >= max(E, Ev)
template <typename T>
cudaError_t forward_d(const AttnParams& p, void* out, float* lse, cudaStream_t stream) {
  const int64_t d = p.E > p.Ev ? p.E : p.Ev;
  if (d <= 32) return forward_t<T, 1>(p, out, lse, stream);
  if (d <= 64) return forward_t<T, 2>(p, out, lse, stream);
  if (d <= 128) return forward_t<T, 4>(p, out, lse, stream);
  if (d <= kAttnMaxHeadDim) return forward_t<T, 8>(p, out, lse, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t backward_d(const AttnParams& p, const void* dout, const void* out, const float* lse, float* delta,
                       void* dq, void* dk, void* dv, cudaStream_t stream) {
  const int64_t d = p.E > p.Ev ? p.E : p.Ev;
  if (d <= 32) return backward_t<T, 1>(p, dout, out, lse, delta, dq, dk, dv, stream);
  if (d <= 64) return backward_t<T, 2>(p, dout, out, lse, delta, dq, dk, dv, stream);
  if (d <= 128) return backward_t<T, 4>(p, dout, out, lse, delta, dq, dk, dv, stream);
  if (d <= kAttnMaxHeadDim) return backward_t<T, 8>(p, dout, out, lse, delta, dq, dk, dv, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t attention_forward(const AttnParams& p, void* out, float* lse, cudaStream_t stream) {
  if (p.Hk <= 0 || p.Hq % p.Hk != 0) return cudaErrorInvalidValue;
  if (attention_mma_fits(p)) return attention_forward_mma(p, out, lse, stream);
  return dispatch(p.dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, double>) return cudaErrorInvalidValue;  // fp32 accumulation only
    else return forward_d<T>(p, out, lse, stream);
  });
}

cudaError_t attention_backward(const AttnParams& p, const void* dout, const void* out, const float* lse,
                               float* delta, void* dq, void* dk, void* dv, cudaStream_t stream) {
  if (p.Hk <= 0 || p.Hq % p.Hk != 0) return cudaErrorInvalidValue;
  return dispatch(p.dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, double>) return cudaErrorInvalidValue;
    else return backward_d<T>(p, dout, out, lse, delta, dq, dk, dv, stream);
  });
}

}  // namespace seqkern::cuda
