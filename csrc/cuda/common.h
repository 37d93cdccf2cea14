// What every CUDA family shares: the dtype tag the bindings pass across the torch-free boundary
// and, for nvcc only, the load/store conversions and the dtype dispatch of the launchers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace seqkern::cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

}  // namespace seqkern::cuda

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace seqkern::cuda {

// arithmetic type: fp64 for fp64, fp32 for everything else (half types accumulate in fp32)
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// load/store in the arithmetic type (no round trip through fp32 for fp64)
template <typename T> __device__ __forceinline__ typename Acc<T>::type ld(const T* p) { return to_f(*p); }
template <> __device__ __forceinline__ double ld<double>(const double* p) { return *p; }
template <typename T> __device__ __forceinline__ void st(T* p, typename Acc<T>::type v) { *p = from_f<T>(v); }
template <> __device__ __forceinline__ void st<double>(double* p, double v) { *p = v; }

// f(T{}) for the element type T of dtype: one switch instead of one per launcher
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace seqkern::cuda
#endif
