// Kernels with the bugs the emulator must report (tests/test_cuda_emu.py::test_emulator_reports),
// and a few correct ones for the primitives no csrc kernel uses yet.
#include "cuda/common.h"

namespace {

__global__ void divergent_shuffle(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 2 == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 1);  // another call site: undefined on the GPU
  out[threadIdx.x] = v;
}

__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);  // names lanes that exited
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) __syncthreads();  // the other warps never arrive... at this one
  else __syncthreads();
  out[threadIdx.x] = 0.0f;
}

__global__ void barrier_deadlock(float* out) {
  if (threadIdx.x == 0) __syncthreads();  // waits for lanes that wait for it at the shuffle
  else out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f, 0);
}

__global__ void big_smem(float* out) {
  SK_DYNAMIC_SMEM(float, s);
  s[threadIdx.x] = 1.0f;
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void big_smem_optin(float* out) {
  SK_DYNAMIC_SMEM(float, s);
  s[threadIdx.x] = 1.0f;
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void static_shared_cooperative(float* out) {
  __shared__ float s[32];
  s[threadIdx.x] = 1.0f;
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void endless_spin(unsigned* flag) {
  while (*reinterpret_cast<volatile unsigned*>(flag) == 0) __nanosleep(100);
}

// correct: early exit of whole threads before a barrier, ballot/any/all, shfl_up, static shared
__global__ void primitives(int* out) {
  __shared__ int s[64];
  const int t = static_cast<int>(threadIdx.x);
  if (t >= 64) return;  // exited threads no longer count at __syncthreads
  s[t] = t;
  __syncthreads();
  const unsigned b = __ballot_sync(0xffffffffu, s[63 - t] % 3 == 0);
  const int up = __shfl_up_sync(0xffffffffu, t, 3);
  out[t * 4 + 0] = static_cast<int>(b);
  out[t * 4 + 1] = up;
  out[t * 4 + 2] = __any_sync(0xffffffffu, t == 40);
  out[t * 4 + 3] = __all_sync(0xffffffffu, t < 40);
}

// correct: block-wide reductions at a barrier, bit intrinsics, the active mask
__global__ void reductions(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  int* o = out + t * 8;
  o[0] = __syncthreads_count(t % 3 == 0);
  o[1] = __syncthreads_or(t == 95);
  o[2] = __syncthreads_and(t < 96);
  o[3] = __syncthreads_and(t < 95);
  o[4] = __popc(static_cast<unsigned>(t) * 2654435761u);
  o[5] = __clz(t) + 100 * __ffs(t);
  o[6] = static_cast<int>(__brev(static_cast<unsigned>(t)) >> 16);
  o[7] = static_cast<int>(__activemask() & 0x7fffffffu);
}

// a race between blocks: each block reads what the block before it writes in the same launch
__global__ void chained_blocks(int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = (blockIdx.x > 0 ? out[blockIdx.x - 1] : 0) + 1;
}

}  // namespace

extern "C" int emu_selftest(int which, void* out) {
  float* f = static_cast<float*>(out);
  switch (which) {
    case 0: SK_LAUNCH(1, 32, 0, nullptr, divergent_shuffle)(f); break;
    case 1: SK_LAUNCH(1, 32, 0, nullptr, shuffle_after_exit)(f); break;
    case 2: SK_LAUNCH(1, 64, 0, nullptr, divergent_barrier)(f); break;
    case 3: SK_LAUNCH(1, 32, 0, nullptr, barrier_deadlock)(f); break;
    case 4: SK_LAUNCH(1, 32, 64 * 1024, nullptr, big_smem)(f); break;  // > 48 KB without the attribute
    case 5: {
      if (cudaFuncSetAttribute(big_smem_optin, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) != cudaSuccess)
        return -1;
      SK_LAUNCH(1, 32, 64 * 1024, nullptr, big_smem_optin)(f);
      break;
    }
    case 6: {
      void* args[] = {&f};
      return cudaLaunchCooperativeKernel(static_shared_cooperative, dim3(2), dim3(32), args, 0, nullptr);
    }
    case 7: SK_LAUNCH(1, 32, 0, nullptr, endless_spin)(static_cast<unsigned*>(out)); break;
    case 8: SK_LAUNCH(1, 96, 0, nullptr, primitives)(static_cast<int*>(out)); break;
    case 9: SK_LAUNCH(0, 32, 0, nullptr, big_smem)(f); break;  // empty grid: invalid configuration
    case 10: SK_LAUNCH(1, 2048, 0, nullptr, big_smem)(f); break;
    case 11: SK_LAUNCH(1, 96, 0, nullptr, reductions)(static_cast<int*>(out)); break;
    case 12: SK_LAUNCH(8, 32, 0, nullptr, chained_blocks)(static_cast<int*>(out)); break;
  }
  return cudaGetLastError();
}
