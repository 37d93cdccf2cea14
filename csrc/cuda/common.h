// What every CUDA family shares: the dtype tag the bindings pass across the torch-free boundary
// and, for device code, the load/store conversions, the dtype dispatch of the launchers and the
// launch macros. Device code also compiles as host C++ against the CUDA emulator of the tests
// (tests/cuda_emu, -DSEQKERN_CUDA_EMULATE), which cannot parse `<<<...>>>` or `extern __shared__`:
// launch with SK_LAUNCH and declare dynamic shared memory with SK_DYNAMIC_SMEM.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace seqkern::cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

}  // namespace seqkern::cuda

#if defined(__CUDACC__) || defined(SEQKERN_CUDA_EMULATE)
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

// SK_LAUNCH(grid, block, smem, stream, kernel)(args...): `kernel` last, so that template arguments
// with commas need no parentheses.
// SK_DYNAMIC_SMEM(T, name): `name` points at the launch's dynamic shared memory, 16-byte aligned.
// SK_GRID_CAP(n): n, the most blocks a launcher puts along a grid dimension whose kernel strides past it
// (gridDim.y stops at 65535; the 1-D grid-stride launchers at a multiple of it). Such loops would only run
// at shapes far too large for the emulator, so there the tests may lower every cap at run time
// (sk_emu_set_grid_cap); the CUDA build sees the constant.
#ifdef SEQKERN_CUDA_EMULATE
#define SK_LAUNCH(grid, block, smem, stream, ...) ::sk_emu::launch(grid, block, smem, stream, __VA_ARGS__)
#define SK_DYNAMIC_SMEM(T, name) T* const name = static_cast<T*>(::sk_emu::dynamic_smem())
#define SK_GRID_CAP(n) ::sk_emu::grid_cap(n)
#else
#define SK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define SK_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
#define SK_GRID_CAP(n) (n)
#endif
#endif
