// CUDA-on-CPU shim for tests (tests/test_cuda_emu.py): csrc/cuda/*.cu compile as host C++ against
// this header (placed first on the include path) with -DSEQKERN_CUDA_EMULATE. Every CUDA thread is
// a fiber; one OS thread runs them cooperatively, so a run is deterministic and the emulator itself
// has no data races. Warp collectives and __syncthreads are rendezvous points that check every
// participant reaches the same call site: what is undefined on a GPU is an error here.
// Not modelled: the memory model (every store is visible at once), real concurrency, timing, register
// and shared-memory bank limits, warp-synchronous code that skips __syncwarp.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotSupported = 801,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// A static __shared__ variable (in a function body) is a function-local static: one copy, which the
// blocks of a normal launch (run one after another) share harmlessly. The blocks of a cooperative
// launch run together, so there it is refused: use dynamic shared memory, which is per block.
// Dynamic shared memory goes through SK_DYNAMIC_SMEM (csrc/cuda/common.h): `extern __shared__`
// cannot be expressed in host C++.
#define __shared__ ::sk_emu::static_shared(); static
#define __constant__ static

namespace sk_emu {
struct Block;
struct Fiber {
  void* sp;
  char* stack;
  Block* blk;
  dim3 tid;
  int lane, warp;
  int state;               // 0 runnable, 1 waiting for *wait_on != wait_gen, 2 done
  const uint64_t* wait_on;
  uint64_t wait_gen;
  void* asan_fake;
};
extern Fiber* g_cur;
extern dim3 g_grid, g_block;

void* dynamic_smem();
void static_shared();
void syncthreads(int line);
uint64_t warp_exchange(int kind, unsigned mask, uint64_t bits, int src, int line);  // the value of lane `src`
void spin_yield();
int syncthreads_reduce(int pred, int line);  // the count of threads with pred != 0
unsigned warp_full_mask();
long long clock();
[[noreturn]] void fail(const char* what);

// SK_GRID_CAP(cap) of csrc/cuda/common.h: cap, or less after sk_emu_set_grid_cap(n) (n > 0), so that the
// tests reach the kernels' loops past a capped grid dimension at small shapes
int64_t grid_cap(int64_t cap);

// one launch: body(ctx) is run by every thread of every block
cudaError_t run(dim3 grid, dim3 block, size_t smem, const void* fn, bool cooperative, void (*body)(void*), void* ctx);
void set_error(cudaError_t e);

template <typename F> void thunk(void* f) { (*static_cast<F*>(f))(); }

template <typename... P>
struct Launch {
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);  // copied once, like kernel parameters
    auto body = [&] { std::apply(fn, args); };
    run(grid, block, smem, reinterpret_cast<const void*>(fn), false, thunk<decltype(body)>, &body);
  }
};
template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*fn)(P...)) {
  return Launch<P...>{fn, grid, block, smem};
}

template <typename T> uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
enum { kShfl = 1, kSyncWarp, kBallot };
}  // namespace sk_emu

#define threadIdx (::sk_emu::g_cur->tid)
#define blockIdx (::sk_emu::g_cur_block_idx())
#define blockDim (::sk_emu::g_block)
#define gridDim (::sk_emu::g_grid)
#define warpSize 32
namespace sk_emu {
const dim3& g_cur_block_idx();
}

inline void __syncthreads(int line = __builtin_LINE()) { sk_emu::syncthreads(line); }
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
  sk_emu::warp_exchange(sk_emu::kSyncWarp, mask, 0, 0, line);
}
template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32, int line = __builtin_LINE()) {
  const int lane = sk_emu::g_cur->lane;
  const int s = (lane & ~(width - 1)) + (src & (width - 1));
  return sk_emu::from_bits<T>(sk_emu::warp_exchange(sk_emu::kShfl, mask, sk_emu::to_bits(v), s, line));
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32, int line = __builtin_LINE()) {
  const int lane = sk_emu::g_cur->lane;
  const int s = (lane ^ m) < ((lane & ~(width - 1)) + width) ? (lane ^ m) : lane;
  return sk_emu::from_bits<T>(sk_emu::warp_exchange(sk_emu::kShfl, mask, sk_emu::to_bits(v), s, line));
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32, int line = __builtin_LINE()) {
  const int lane = sk_emu::g_cur->lane;
  const int s = (lane % width) + static_cast<int>(d) < width ? lane + static_cast<int>(d) : lane;
  return sk_emu::from_bits<T>(sk_emu::warp_exchange(sk_emu::kShfl, mask, sk_emu::to_bits(v), s, line));
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32, int line = __builtin_LINE()) {
  const int lane = sk_emu::g_cur->lane;
  const int s = (lane % width) >= static_cast<int>(d) ? lane - static_cast<int>(d) : lane;
  return sk_emu::from_bits<T>(sk_emu::warp_exchange(sk_emu::kShfl, mask, sk_emu::to_bits(v), s, line));
}
// the ballot of the whole warp: the exchange returns the OR of every lane's bit
inline unsigned __ballot_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
  return static_cast<unsigned>(sk_emu::warp_exchange(sk_emu::kBallot, mask, pred ? 1u : 0u, -1, line));
}
inline int __any_sync(unsigned mask, int pred, int line = __builtin_LINE()) { return __ballot_sync(mask, pred, line) != 0; }
inline int __all_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, line) == __ballot_sync(mask, 1, line);
}
// __syncthreads plus a block-wide count / or / and of `pred`
inline int __syncthreads_count(int pred, int line = __builtin_LINE()) { return sk_emu::syncthreads_reduce(pred, line); }
inline int __syncthreads_or(int pred, int line = __builtin_LINE()) { return sk_emu::syncthreads_reduce(pred, line) != 0; }
inline int __syncthreads_and(int pred, int line = __builtin_LINE()) {
  return sk_emu::syncthreads_reduce(pred, line) == sk_emu::syncthreads_reduce(1, line);
}
// every lane of a warp is converged here: collectives with a partial mask are refused anyway
inline unsigned __activemask() { return sk_emu::warp_full_mask(); }
inline void __nanosleep(unsigned) { sk_emu::spin_yield(); }
inline long long clock64() { return sk_emu::clock(); }
inline int clock() { return static_cast<int>(sk_emu::clock()); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// one OS thread runs every fiber: plain read-modify-writes are atomic here
template <typename T> T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <typename T> T atomicSub(T* p, T v) { const T old = *p; *p = old - v; return old; }
template <typename T> T atomicMax(T* p, T v) { const T old = *p; if (v > old) *p = v; return old; }
template <typename T> T atomicMin(T* p, T v) { const T old = *p; if (v < old) *p = v; return old; }
template <typename T> T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
template <typename T> T atomicCAS(T* p, T cmp, T v) { const T old = *p; if (old == cmp) *p = v; return old; }
template <typename T> T __ldg(const T* p) { return *p; }
template <typename T> T __ldcg(const T* p) { return *p; }
template <typename T> T __ldca(const T* p) { return *p; }
template <typename T> T __ldcs(const T* p) { return *p; }
template <typename T> void __stcg(T* p, T v) { *p = v; }
template <typename T> void __stcs(T* p, T v) { *p = v; }

// bit intrinsics
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return static_cast<int>((int64_t(a) * b) >> 32); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double d) { long long x; std::memcpy(&x, &d, 8); return x; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

// device math that host C++ lacks or names differently (the intrinsics are the accurate functions)
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
template <typename A, typename B> auto min(A a, B b) -> std::common_type_t<A, B> {
  return b < a ? std::common_type_t<A, B>(b) : std::common_type_t<A, B>(a);
}
template <typename A, typename B> auto max(A a, B b) -> std::common_type_t<A, B> {
  return a < b ? std::common_type_t<A, B>(b) : std::common_type_t<A, B>(a);
}

// host API used by the launchers: an H200-like device
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t);
// memory is host memory and streams run synchronously
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice,
                      cudaMemcpyDefault };
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemset(void* p, int v, size_t n) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memmove(d, s, n); return cudaSuccess; }
namespace sk_emu {
cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value);
cudaError_t occupancy(int* blocks, const void* fn, int threads, size_t smem);
}
template <typename T> cudaError_t cudaFuncSetAttribute(T* fn, cudaFuncAttribute attr, int value) {
  return sk_emu::func_set_attribute(reinterpret_cast<const void*>(fn), attr, value);
}
template <typename T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* fn, int threads, size_t smem) {
  return sk_emu::occupancy(blocks, reinterpret_cast<const void*>(fn), threads, smem);
}
// The typed overload only (as cuda_runtime.h's template one): the emulator needs the parameter
// types to unpack `args`.
namespace sk_emu {
template <typename... P, size_t... I>
cudaError_t cooperative(void (*fn)(P...), dim3 grid, dim3 block, void** args, size_t smem, std::index_sequence<I...>) {
  const std::tuple<std::decay_t<P>...> a(*static_cast<std::decay_t<P>*>(args[I])...);
  auto body = [&] { std::apply(fn, a); };
  return run(grid, block, smem, reinterpret_cast<const void*>(fn), true, thunk<decltype(body)>, &body);
}
}  // namespace sk_emu
template <typename... P>
cudaError_t cudaLaunchCooperativeKernel(void (*fn)(P...), dim3 grid, dim3 block, void** args, size_t smem = 0,
                                        cudaStream_t = nullptr) {
  return sk_emu::cooperative(fn, grid, block, args, smem, std::index_sequence_for<P...>{});
}
