// Warp-level tensor-core wrappers (sm_80+): mma.sync m16n8k16 with fp32 accumulation, ldmatrix, cp.async
// and fp16/bf16 bit conversions. Operands are raw 32-bit registers holding two 16-bit elements (low half =
// lower column index), so the kernels never depend on cuda_fp16's class types.
//
// Under SEQKERN_CUDA_EMULATE (CUDA on the CPU, one fiber per thread) each instruction is rebuilt from the
// fragment layouts of the PTX ISA (section "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "ldmatrix") with __shfl_sync and plain loads only, so the emulation checks the kernels' use of the layouts
// rather than repeating it. Every lane of the warp must call these together (as on the hardware: .aligned).
//
// Layouts used below (g = lane / 4, t = lane % 4):
//   A 16x16 (row major): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B 16x8  (k x n):     reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C/D 16x8 fp32:       c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
//   ldmatrix .x4: lanes 8m..8m+7 give the 8 row addresses (16 bytes each) of matrix m; reg m of lane l gets
//   row l/4, elements 2(l%4), 2(l%4)+1 (.trans: elements (2(l%4), l/4) and (2(l%4)+1, l/4) of the rows).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef SEQKERN_CUDA_EMULATE
#include <deque>
#include <unordered_map>
#include <vector>
#endif

#ifndef SEQKERN_CUDA_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace seqkern::cuda::mma {

// ---- 16-bit float <-> fp32 ------------------------------------------------------------------------------
#ifdef SEQKERN_CUDA_EMULATE
__device__ __forceinline__ uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
__device__ __forceinline__ float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <bool BF16>
__device__ __forceinline__ float to_float(uint16_t h) {
  if (BF16) return bits_f32(static_cast<uint32_t>(h) << 16);
  const uint32_t s = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24 is exact in fp32
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return s ? -v : v;
  }
  if (e == 31) return bits_f32(s | 0x7f800000u | (m << 13));
  return bits_f32(s | ((e + 112u) << 23) | (m << 13));
}
template <bool BF16>
__device__ __forceinline__ uint16_t from_float(float f) {  // round to nearest even, as cvt.rn
  const uint32_t x = f32_bits(f);
  if (BF16) {
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  }
  const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // 65520 and up round to inf
  if (a >= 0x38800000u)                                                 // normal in fp16: rebias 127 -> 15
    return static_cast<uint16_t>(sign | ((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13));
  // subnormal (or rounds up to the smallest normal): multiples of 2^-24, scaling by 2^24 is exact
  float v = bits_f32(a) * 16777216.0f;
  uint32_t q = static_cast<uint32_t>(v);
  const float rem = v - static_cast<float>(q);
  if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}
#else
template <bool BF16>
__device__ __forceinline__ float to_float(uint16_t h) {
  if constexpr (BF16) return __uint_as_float(static_cast<uint32_t>(h) << 16);
  else return __half2float(__ushort_as_half(h));
}
template <bool BF16>
__device__ __forceinline__ uint16_t from_float(float f) {
  if constexpr (BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  else return __half_as_ushort(__float2half_rn(f));
}
#endif

// two fp32 values rounded into one register, lo in the low half (the lower column of a fragment)
template <bool BF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#ifdef SEQKERN_CUDA_EMULATE
  return static_cast<uint32_t>(from_float<BF16>(lo)) | (static_cast<uint32_t>(from_float<BF16>(hi)) << 16);
#else
  if constexpr (BF16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
#endif
}

// 2^x; the softmax of the kernels folds log2(e) into the scale so that this is one ex2 instruction
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef SEQKERN_CUDA_EMULATE
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

#ifdef SEQKERN_CUDA_EMULATE
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
// what the hardware faults on, reported as a launch failure by the emulator
__device__ __forceinline__ void require16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) & 15u) ::sk_emu::fail(what);
}
// a pointer crosses lanes as two 32-bit halves: the shuffle the shim provides is the 32-bit one
__device__ __forceinline__ const unsigned char* shfl_ptr(const void* p, int src) {
  const uint64_t u = reinterpret_cast<uint64_t>(p);
  const uint32_t lo = __shfl_sync(0xffffffffu, static_cast<uint32_t>(u), src);
  const uint32_t hi = __shfl_sync(0xffffffffu, static_cast<uint32_t>(u >> 32), src);
  return reinterpret_cast<const unsigned char*>((static_cast<uint64_t>(hi) << 32) | lo);
}
#endif

// ---- D += A * B, m16n8k16, fp16 or bf16 inputs, fp32 accumulators -------------------------------------
template <bool BF16>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef SEQKERN_CUDA_EMULATE
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
  // A rows g and g+8, all 16 k: lane 4g+s holds k = 2s, 2s+1 (regs 0/1) and 2s+8, 2s+9 (regs 2/3)
  float arow[2][16];
  for (int s = 0; s < 4; ++s) {
    const int src = 4 * g + s;
    for (int r = 0; r < 4; ++r) {
      const uint32_t v = __shfl_sync(0xffffffffu, a[r], src);
      const int row = r & 1, k = 2 * s + ((r >> 1) ? 8 : 0);
      arow[row][k] = to_float<BF16>(static_cast<uint16_t>(v & 0xffffu));
      arow[row][k + 1] = to_float<BF16>(static_cast<uint16_t>(v >> 16));
    }
  }
  // B columns 2t and 2t+1, all 16 k: lane 4n+s holds k = 2s, 2s+1 (reg 0) and 2s+8, 2s+9 (reg 1) of column n
  float bcol[2][16];
  for (int c = 0; c < 2; ++c) {
    for (int s = 0; s < 4; ++s) {
      const int src = 4 * (2 * t + c) + s;
      const uint32_t v0 = __shfl_sync(0xffffffffu, b0, src);
      const uint32_t v1 = __shfl_sync(0xffffffffu, b1, src);
      bcol[c][2 * s] = to_float<BF16>(static_cast<uint16_t>(v0 & 0xffffu));
      bcol[c][2 * s + 1] = to_float<BF16>(static_cast<uint16_t>(v0 >> 16));
      bcol[c][2 * s + 8] = to_float<BF16>(static_cast<uint16_t>(v1 & 0xffffu));
      bcol[c][2 * s + 9] = to_float<BF16>(static_cast<uint16_t>(v1 >> 16));
    }
  }
  for (int e = 0; e < 4; ++e) {
    float acc = 0.0f;
    for (int k = 0; k < 16; ++k) acc += arow[e >> 1][k] * bcol[e & 1][k];
    d[e] += acc;
  }
#else
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// ---- ldmatrix.x4 from shared memory: `row` is this lane's row address (16-byte aligned) ------------------
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
#ifdef SEQKERN_CUDA_EMULATE
  const int lane = lane_id();
  require16(row, "ldmatrix: a row address is not 16-byte aligned");
  for (int m = 0; m < 4; ++m) {
    const unsigned char* src = shfl_ptr(row, 8 * m + (lane >> 2));
    std::memcpy(&r[m], src + 4 * (lane & 3), 4);
  }
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
#ifdef SEQKERN_CUDA_EMULATE
  const int lane = lane_id();
  require16(row, "ldmatrix: a row address is not 16-byte aligned");
  for (int m = 0; m < 4; ++m) {
    // every lane shuffles (the warp stays converged), then keeps the two rows it needs
    const unsigned char* lo_row = shfl_ptr(row, 8 * m + 2 * (lane & 3));
    const unsigned char* hi_row = shfl_ptr(row, 8 * m + 2 * (lane & 3) + 1);
    uint16_t lo, hi;
    std::memcpy(&lo, lo_row + 2 * (lane >> 2), 2);
    std::memcpy(&hi, hi_row + 2 * (lane >> 2), 2);
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// ---- cp.async: 16 bytes global -> shared, completed by wait<N> (at most N groups left in flight) ----------
#ifdef SEQKERN_CUDA_EMULATE
// Deferred like the hardware's: a copy lands only when its own thread waits for its group (a __syncthreads
// completes nothing), and its destination reads as 0xFFFF (NaN in fp16 and bf16) until then, so a missing
// or short wait shows as a NaN where the hardware would race. Copies are done at the wait, from the source
// as it is then (the kernels copy inputs only). State per emulated thread (one OS thread runs the fibers).
struct CpAsyncCopy {
  void* dst;
  const void* src;
};
struct CpAsyncThread {
  const void* blk = nullptr;                      // the block it was issued in: a failed launch leaves stale ones
  std::vector<CpAsyncCopy> open;                  // issued, not yet committed
  std::deque<std::vector<CpAsyncCopy>> groups;    // committed, oldest first
};
inline CpAsyncThread& cp_async_state() {
  static std::unordered_map<const void*, CpAsyncThread> states;
  CpAsyncThread& st = states[::sk_emu::g_cur];
  if (st.blk != ::sk_emu::g_cur->blk) st = CpAsyncThread{::sk_emu::g_cur->blk};
  return st;
}
#endif

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifdef SEQKERN_CUDA_EMULATE
  require16(smem, "cp.async: shared address not 16-byte aligned");
  require16(gmem, "cp.async: global address not 16-byte aligned");
  std::memset(smem, 0xff, 16);
  cp_async_state().open.push_back({smem, gmem});
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef SEQKERN_CUDA_EMULATE
  CpAsyncThread& st = cp_async_state();
  st.groups.push_back(std::move(st.open));
  st.open.clear();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef SEQKERN_CUDA_EMULATE
  // the test build can shift every wait by one group, to check that the tests notice a short wait
#ifdef SEQKERN_EMU_CP_ASYNC_WAIT_SHIFT
  constexpr size_t kLeft = N + SEQKERN_EMU_CP_ASYNC_WAIT_SHIFT;
#else
  constexpr size_t kLeft = N;
#endif
  CpAsyncThread& st = cp_async_state();
  while (st.groups.size() > kLeft) {
    for (const CpAsyncCopy& c : st.groups.front()) std::memcpy(c.dst, c.src, 16);
    st.groups.pop_front();
  }
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace seqkern::cuda::mma
