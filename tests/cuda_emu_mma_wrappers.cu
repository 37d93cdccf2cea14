// One warp driving the wrappers of csrc/cuda/mma.h alone, for tests/test_cuda_emu_mma.py under the CUDA
// emulator: fragments are built and read back with the PTX ISA's formulas written out here, separately
// from the kernels' use of them, so the emulation is checked against the documented layouts.
#include "cuda/common.h"
#include "cuda/mma.h"

namespace {
namespace m = seqkern::cuda::mma;

__device__ uint32_t pair(const uint16_t* x, int i0, int i1) {
  return static_cast<uint32_t>(x[i0]) | (static_cast<uint32_t>(x[i1]) << 16);
}

// D (16x8, row major) = A (16x16, row major) B (16x8, row major)
template <bool BF16>
__global__ void mma_kernel(const uint16_t* A, const uint16_t* B, float* D) {
  const int lane = static_cast<int>(threadIdx.x), g = lane >> 2, t = lane & 3;
  uint16_t a[8], b[4];
  for (int i = 0; i < 8; ++i) {  // "row = groupID for ai where 0 <= i < 2 || 4 <= i < 6, else groupID + 8"
    const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
    const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    a[i] = A[row * 16 + col];
  }
  for (int i = 0; i < 4; ++i) {  // "row = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 2), col = groupID"
    const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
    b[i] = B[row * 8 + g];
  }
  const uint32_t ar[4] = {pair(a, 0, 1), pair(a, 2, 3), pair(a, 4, 5), pair(a, 6, 7)};
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  m::mma16816<BF16>(d, ar, pair(b, 0, 1), pair(b, 2, 3));
  m::mma16816<BF16>(d, ar, pair(b, 0, 1), pair(b, 2, 3));  // accumulates: D = 2 A B
  for (int i = 0; i < 4; ++i) D[(i < 2 ? g : g + 8) * 8 + t * 2 + (i & 1)] = d[i];
}

// M: four 8x8 matrices of 16-bit values, matrix k = rows 8k..8k+7 of a 32x8 array; staged in shared memory
// with a row pitch of 16 values (rows 32 bytes apart); out[lane * 4 + k] = register k of the lane
__global__ void ldsm_kernel(const uint16_t* M, uint32_t* out, bool trans) {
  SK_DYNAMIC_SMEM(uint16_t, sm);
  const int lane = static_cast<int>(threadIdx.x);
  for (int c = 0; c < 8; ++c) sm[lane * 16 + c] = M[lane * 8 + c];
  __syncthreads();
  uint32_t r[4];
  if (trans) m::ldsm_x4_trans(r, sm + lane * 16);
  else m::ldsm_x4(r, sm + lane * 16);
  for (int k = 0; k < 4; ++k) out[lane * 4 + k] = r[k];
}

}  // namespace

extern "C" {
int mma_emu_product(int bf16, const uint16_t* A, const uint16_t* B, float* D) {
  if (bf16) SK_LAUNCH(1, 32, 0, nullptr, mma_kernel<true>)(A, B, D);
  else SK_LAUNCH(1, 32, 0, nullptr, mma_kernel<false>)(A, B, D);
  return static_cast<int>(cudaGetLastError());
}
int mma_emu_ldmatrix(const uint16_t* M, uint32_t* out, int trans) {
  SK_LAUNCH(1, 32, 32 * 16 * sizeof(uint16_t), nullptr, ldsm_kernel)(M, out, trans != 0);
  return static_cast<int>(cudaGetLastError());
}
// n pairs (x[2i], x[2i+1]) rounded into n registers
void mma_emu_pack(int bf16, const float* x, uint32_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = bf16 ? m::pack2<true>(x[2 * i], x[2 * i + 1]) : m::pack2<false>(x[2 * i], x[2 * i + 1]);
}
}
