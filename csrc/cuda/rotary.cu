// Rotary embedding on CUDA: one thread per rotated pair (or passed-through tail
// element); fp32 arithmetic for half types.
#include "cuda/rotary.h"

namespace seqkern::cuda {
namespace {
template <typename T> __device__ __forceinline__ typename Acc<T>::type load(const T* p) { return to_f(*p); }
template <> __device__ __forceinline__ double load<double>(const double* p) { return *p; }
template <typename T> __device__ __forceinline__ void store(T* p, typename Acc<T>::type v) { *p = from_f<T>(v); }
template <> __device__ __forceinline__ void store<double>(double* p, double v) { *p = v; }

template <typename T>
__global__ void rotary_kernel(const T* __restrict__ x, T* __restrict__ out, const T* __restrict__ cos,
                              const T* __restrict__ sin, int64_t rows, int64_t T_, int64_t D, int64_t half,
                              bool interleaved, bool inverse) {
  using A = typename Acc<T>::type;
  // each row has `half` pairs plus D - 2*half pass-through elements
  const int64_t per_row = half + (D - 2 * half);
  const int64_t total = rows * per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / per_row, j = idx % per_row;
    const T* xr = x + r * D;
    T* o = out + r * D;
    if (j >= half) {  // tail beyond the rotary dims
      const int64_t col = 2 * half + (j - half);
      o[col] = xr[col];
      continue;
    }
    const int64_t t = r % T_;
    const A c = load(cos + t * half + j);
    const A s = inverse ? -load(sin + t * half + j) : load(sin + t * half + j);
    const int64_t i1 = interleaved ? 2 * j : j, i2 = interleaved ? 2 * j + 1 : j + half;
    const A x1 = load(xr + i1), x2 = load(xr + i2);
    store(o + i1, x1 * c - x2 * s);
    store(o + i2, x2 * c + x1 * s);
  }
}

template <typename T>
cudaError_t launch(const void* x, void* out, const void* cos, const void* sin, int64_t rows, int64_t T_, int64_t D,
                   int64_t half, bool interleaved, bool inverse, cudaStream_t stream) {
  const int64_t total = rows * (D - half);
  if (total <= 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const int64_t cap = SK_GRID_CAP(int64_t{65535} * 16);
  const int grid = static_cast<int>(blocks < cap ? blocks : cap);
  SK_LAUNCH(grid, threads, 0, stream, rotary_kernel<T>)(static_cast<const T*>(x), static_cast<T*>(out),
                                                 static_cast<const T*>(cos), static_cast<const T*>(sin), rows, T_, D,
                                                 half, interleaved, inverse);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rotary(DType dtype, const void* x, void* out, const void* cos, const void* sin, int64_t rows, int64_t T,
                   int64_t D, int64_t half, bool interleaved, bool inverse, cudaStream_t stream) {
  return dispatch(dtype, [&](auto t) {
    return launch<decltype(t)>(x, out, cos, sin, rows, T, D, half, interleaved, inverse, stream);
  });
}

}  // namespace seqkern::cuda
