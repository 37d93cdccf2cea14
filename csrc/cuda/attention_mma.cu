// Flash attention on tensor cores (FlashAttention-2 schedule, mma.sync m16n8k16, fp32 accumulation) for
// fp16 and bf16 with head dims up to 128. OPT-IN: attention_forward/attention_backward take this path only
// when AttnParams::mma is set, which the binding does only under SEQKERN_ATTN_MMA=1, until a GPU run has
// verified it (it has been checked on the CPU through the emulation of csrc/cuda/mma.h only).
//
// Blocks of 4 warps; each warp owns 16-row tiles of the block's rows (two tiles of 128 queries in the
// forward; one of 64 queries in dQ, of 64 keys in dK/dV), so the softmax statistics of a row stay within
// the 4 lanes of a quad (shuffles, no shared memory). Tiles live in shared memory as 16-bit values with a row pitch of D + 8 halves: rows stay
// 16-byte aligned for cp.async and ldmatrix, and the 8 rows of an ldmatrix land in distinct banks.
// Head dims are padded to multiples of 16 with zeros in shared memory; the k-loops skip whole steps past
// E or Ev (warp-uniform), so E = 40 costs 3 steps, not the 8 of the compiled D = 128.
// Scores are kept in log2 units (scale * log2 e folded in, the mask times log2 e) so each probability
// is one ex2; lse is stored in natural log as the SIMT kernel does.
// Backward: delta = rowsum(dO * O) comes from attention.cu; dK/dV per key block over every query tile of
// the GQA group's heads (P^T and dS^T recomputed from lse), dQ per query block over key tiles: no atomics.
#include <cmath>

#include "cuda/attention.h"
#include "cuda/attention_dropout.h"
#include "cuda/mma.h"

// csrc/cuda/common.h defines these (launches and dynamic shared memory that the CPU emulation of the
// tests can express); the plain CUDA spelling where it does not yet
#ifndef SK_LAUNCH
#define SK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
#ifndef SK_DYNAMIC_SMEM
#define SK_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif

namespace seqkern::cuda {
namespace {

using mma::cp_async16;
using mma::cp_async_commit;
using mma::cp_async_wait;
using mma::fast_exp2;
using mma::ldsm_x4;
using mma::ldsm_x4_trans;
using mma::mma16816;
using mma::pack2;

constexpr int kThreads = 128;  // 4 warps
constexpr int kRows = 64;      // rows of a block: 16 per warp
constexpr int kPad = 8;        // halves of padding per shared row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct alignas(16) Chunk {
  uint32_t w[4];
};

// rows x D tile of a row-major tensor (row pitch ld, `cols` meaningful columns, `valid` meaningful rows)
// into shared memory; the rest of the tile is zero so padded dot products and P V stay exact. With `vec`
// (every row start 16-byte aligned and cols % 8 == 0) rows go through cp.async, to be waited for.
template <int ROWS, int D>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* src, int64_t ld, int64_t valid, int cols,
                                          bool vec) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    uint16_t* d = dst + r * (D + kPad) + c;
    Chunk z{{0u, 0u, 0u, 0u}};
    if (r < valid && c < cols) {
      const uint16_t* s = src + r * ld + c;
      if (vec) {
        cp_async16(d, s);
        continue;
      }
      for (int e = 0; e < 8; e += 2) {
        const uint32_t lo = c + e < cols ? s[e] : 0u, hi = c + e + 1 < cols ? s[e + 1] : 0u;
        z.w[e / 2] = lo | (hi << 16);
      }
    }
    *reinterpret_cast<Chunk*>(d) = z;
  }
}

// Lane offsets of ldmatrix.x4 row addresses within a 16x16 block of a shared tile:
// "A" order (matrices: rows 0-7 | rows 8-15, then columns 8-15) serves A operands and transposed B operands;
// "B" order (columns 0-7 | 8-15 first, then rows 8-15) serves B operands stored n-major (K for Q K^T).
__device__ __forceinline__ int a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int a_col(int lane) { return (lane >> 4) * 8; }
__device__ __forceinline__ int b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__device__ __forceinline__ int b_col(int lane) { return ((lane >> 3) & 1) * 8; }

// Score of (i, j) in log2 units from the raw dot product; -inf when out of range, causal-excluded or
// masked to -inf.
template <bool BF16>
__device__ __forceinline__ float score2(const AttnParams& p, float dot, float scale2, int64_t b, int64_t h,
                                        int64_t i, int64_t j) {
  if (i >= p.L || j >= p.S || (p.causal && j > i)) return -INFINITY;
  float s = dot * scale2;
  if (p.mask != nullptr)
    s += kLog2e * mma::to_float<BF16>(static_cast<const uint16_t*>(
                      p.mask)[b * p.mask_sb + h * p.mask_sh + i * p.mask_sl + j * p.mask_ss]);
  return s;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// accumulator tiles c[2kk], c[2kk+1] (16 x 16, C layout) as the A operand of the next product
template <bool BF16>
__device__ __forceinline__ void to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<BF16>(c0[0], c0[1]);
  a[1] = pack2<BF16>(c0[2], c0[3]);
  a[2] = pack2<BF16>(c1[0], c1[1]);
  a[3] = pack2<BF16>(c1[2], c1[3]);
}

// the same tiles as hi + lo, both in the input dtype: hi * B + lo * B carries about twice the mantissa bits.
// DESIGN.md "Numerics" allows twice the error of the reference run in the input dtype (which rounds only
// its results); with dS rounded once before dS K, dQ measured up to 2.6x that in fp16, and with P rounded
// before P V, O's extra error reached dQ again through delta = rowsum(dO O) (2.0x). Split: dS in both
// backward kernels, P in the forward; P^T dO in dK/dV stays one product (dV at most 1.7x). Cost: one more
// mma per split one, same B fragments: forward 2 -> 3 products per tile, dK/dV 4 -> 5, dQ 3 -> 4.
template <bool BF16>
__device__ __forceinline__ float lo_half(uint32_t r) {
  return mma::to_float<BF16>(static_cast<uint16_t>(r & 0xffffu));
}
template <bool BF16>
__device__ __forceinline__ float hi_half(uint32_t r) {
  return mma::to_float<BF16>(static_cast<uint16_t>(r >> 16));
}
template <bool BF16>
__device__ __forceinline__ void to_a_split(uint32_t (&hi)[4], uint32_t (&lo)[4], const float (&c0)[4],
                                           const float (&c1)[4]) {
  to_a<BF16>(hi, c0, c1);
  lo[0] = pack2<BF16>(c0[0] - lo_half<BF16>(hi[0]), c0[1] - hi_half<BF16>(hi[0]));
  lo[1] = pack2<BF16>(c0[2] - lo_half<BF16>(hi[1]), c0[3] - hi_half<BF16>(hi[1]));
  lo[2] = pack2<BF16>(c1[0] - lo_half<BF16>(hi[2]), c1[1] - hi_half<BF16>(hi[2]));
  lo[3] = pack2<BF16>(c1[2] - lo_half<BF16>(hi[3]), c1[3] - hi_half<BF16>(hi[3]));
}

// d0 += (hi + lo) B[:, 0:8] and d1 += (hi + lo) B[:, 8:16] for an A split by to_a_split and one
// ldmatrix x4 fragment b of B: the low half reuses b, so the split costs mma issues, not shared loads
template <bool BF16>
__device__ __forceinline__ void mma_split_x2(float (&d0)[4], float (&d1)[4], const uint32_t (&hi)[4],
                                             const uint32_t (&lo)[4], const uint32_t (&b)[4]) {
  mma16816<BF16>(d0, hi, b[0], b[1]);
  mma16816<BF16>(d1, hi, b[2], b[3]);
  mma16816<BF16>(d0, lo, b[0], b[1]);
  mma16816<BF16>(d1, lo, b[2], b[3]);
}

// rows g and g+8 of a 16 x (NT*8) fp32 accumulator times `mul`, into a row-major (ld) tensor: rows
// below `rows`, columns below `cols`
template <bool BF16, int NT>
__device__ __forceinline__ void store_rows(uint16_t* dst, int64_t ld, int64_t rows, int cols, const float (&c)[NT][4],
                                           float mul0, float mul1) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool pairs = (ld % 2) == 0;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + 2 * t;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = g + 8 * r;
      const float mul = r ? mul1 : mul0;
      if (row >= rows || col >= cols) continue;
      uint16_t* o = dst + row * ld + col;
      if (pairs && col + 1 < cols) {
        *reinterpret_cast<uint32_t*>(o) = pack2<BF16>(c[nt][2 * r] * mul, c[nt][2 * r + 1] * mul);
      } else {
        o[0] = mma::from_float<BF16>(c[nt][2 * r] * mul);
        if (col + 1 < cols) o[1] = mma::from_float<BF16>(c[nt][2 * r + 1] * mul);
      }
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
}

// The `rows` queries of one (batch, head) that a forward or dQ block owns, and its K/V head (GQA).
struct QueryBlock {
  int64_t bh, q0, b, h;
  const uint16_t* k;
  const uint16_t* v;
};
__device__ __forceinline__ QueryBlock query_block(const AttnParams& p, int rows) {
  const int64_t nblk = (p.L + rows - 1) / rows;
  QueryBlock r;
  r.bh = blockIdx.x / nblk;
  r.q0 = (nblk - 1 - blockIdx.x % nblk) * rows;  // heavy causal blocks (late queries) are launched first
  r.b = r.bh / p.Hq;
  r.h = r.bh % p.Hq;
  const int64_t bhk = r.b * p.Hk + r.h / (p.Hq / p.Hk);
  r.k = static_cast<const uint16_t*>(p.k) + bhk * p.S * p.E;
  r.v = static_cast<const uint16_t*>(p.v) + bhk * p.S * p.Ev;
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// Forward: a block owns kFwdRows = 4 warps x MT x 16 queries. Two 16-row tiles per warp (MT = 2) make
// every K and V fragment read from shared memory feed two products: ldmatrix bandwidth, not the tensor
// cores, bounds an m16n8k16 loop with one row tile per warp. Q stays in shared memory (its fragments are
// re-read per k-step: registers go to the 2 x 16 x D output accumulators); K and V tiles of BN keys come
// through cp.async, the next K tile in flight while this tile's softmax and P V run.
template <bool BF16, int D, int MT, int BN>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_mma_kernel(const AttnParams p, const bool vec, uint16_t* __restrict__ out, float* __restrict__ lse) {
  SK_DYNAMIC_SMEM(unsigned char, smem_raw);
  constexpr int P = D + kPad, KD = D / 16, BM = kRows * MT;
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem_raw);  // BM x P
  uint16_t* Ks = Qs + BM * P;                           // BN x P
  uint16_t* Vs = Ks + BN * P;                           // BN x P
  const QueryBlock qb = query_block(p, BM);
  const int64_t bh = qb.bh, q0 = qb.q0, b = qb.b, h = qb.h;
  const uint16_t *k = qb.k, *v = qb.v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev), nkE = (E + 15) / 16, nkV = (Ev + 15) / 16;
  const float scale2 = p.scale * kLog2e;
  const int64_t w0 = q0 + warp * 16 * MT;  // the warp's first row; its tile mt holds rows w0 + 16 mt ...

  load_tile<BM, D>(Qs, static_cast<const uint16_t*>(p.q) + (bh * p.L + q0) * p.E, p.E, p.L - q0, E, vec);
  // causal: no row of this block sees a key at or past q0 + BM
  const int64_t j_end = p.causal ? min(p.S, q0 + BM) : p.S;
  if (j_end > 0) load_tile<BN, D>(Ks, k, p.E, p.S, E, vec);
  cp_async_commit();  // Q and the first K tile: one group

  int64_t i_r[MT][2];
  uint32_t rh[MT][2];
  float m_r[MT][2], l_r[MT][2];
  float o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    zero(o[mt]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      i_r[mt][r] = w0 + mt * 16 + g + 8 * r;
      rh[mt][r] = p.dropout ? row_hash(p, bh * p.L + i_r[mt][r]) : 0u;
      m_r[mt][r] = -INFINITY;
      l_r[mt][r] = 0.0f;
    }
  }
  for (int64_t j0 = 0; j0 < j_end; j0 += BN) {
    load_tile<BN, D>(Vs, v + j0 * p.Ev, p.Ev, p.S - j0, Ev, vec);
    cp_async_commit();
    cp_async_wait<1>();  // this K tile (and Q) have landed; V may still be in flight
    __syncthreads();
    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      if (kk >= nkE) break;
      uint32_t qf[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldsm_x4(qf[mt], Qs + (warp * 16 * MT + mt * 16 + a_row(lane)) * P + kk * 16 + a_col(lane));
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bf[4];
        ldsm_x4(bf, Ks + (np * 16 + b_row(lane)) * P + kk * 16 + b_col(lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<BF16>(s[mt][2 * np], qf[mt], bf[0], bf[1]);
          mma16816<BF16>(s[mt][2 * np + 1], qf[mt], bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with Ks: the next K tile may land there
    if (j0 + BN < j_end) load_tile<BN, D>(Ks, k + (j0 + BN) * p.E, p.E, p.S - j0 - BN, E, vec);
    cp_async_commit();

    // tiles wholly inside the mask-free, causal-visible, in-range region skip the per-element checks
    const bool plain = p.mask == nullptr && j0 + BN <= p.S && (!p.causal || j0 + BN - 1 <= w0);
    uint32_t pa[MT][BN / 16][4], plo[MT][BN / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx[2] = {m_r[mt][0], m_r[mt][1]};
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t j = j0 + nt * 8 + 2 * t + (e & 1);
          const float x = plain ? s[mt][nt][e] * scale2
                                : score2<BF16>(p, s[mt][nt][e], scale2, b, h, i_r[mt][e >> 1], j);
          s[mt][nt][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      float alpha[2], m_use[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = quad_max(mx[r]);
        m_use[r] = mx[r] == -INFINITY ? 0.0f : mx[r];  // nothing visible yet: keep exp2 away from -inf - -inf
        alpha[r] = fast_exp2(m_r[mt][r] - m_use[r]);
        m_r[mt][r] = mx[r];
        l_r[mt][r] *= alpha[r];
      }
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pr = fast_exp2(s[mt][nt][e] - m_use[e >> 1]);
          l_r[mt][e >> 1] += pr;
          s[mt][nt][e] = p.dropout ? pr * dropout_scale(p, rh[mt][e >> 1], j0 + nt * 8 + 2 * t + (e & 1)) : pr;
        }
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o[mt][nt][0] *= alpha[0];
        o[mt][nt][1] *= alpha[0];
        o[mt][nt][2] *= alpha[1];
        o[mt][nt][3] *= alpha[1];
      }
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        to_a_split<BF16>(pa[mt][kk], plo[mt][kk], s[mt][2 * kk], s[mt][2 * kk + 1]);
    }

    cp_async_wait<1>();  // V has landed (the next K may still be in flight)
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int dp = 0; dp < KD; ++dp) {
        if (dp >= nkV) break;
        uint32_t vf[4];
        ldsm_x4_trans(vf, Vs + (kk * 16 + a_row(lane)) * P + dp * 16 + a_col(lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_split_x2<BF16>(o[mt][2 * dp], o[mt][2 * dp + 1], pa[mt][kk], plo[mt][kk], vf);
        }
      }
    __syncthreads();  // every warp is done with Vs
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_r[mt][r] = quad_sum(l_r[mt][r]);
      inv[r] = l_r[mt][r] > 0.0f ? 1.0f / l_r[mt][r] : 0.0f;  // fully masked rows: output 0, lse -inf
    }
    const int64_t row0 = w0 + mt * 16;
    store_rows<BF16, D / 8>(out + (bh * p.L + row0) * p.Ev, p.Ev, p.L - row0, Ev, o[mt], inv[0], inv[1]);
    if (t == 0)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (i_r[mt][r] < p.L)
          lse[bh * p.L + i_r[mt][r]] =
              l_r[mt][r] > 0.0f ? (m_r[mt][r] + log2f(l_r[mt][r])) * kLn2 : -INFINITY;
  }
}

// lse in log2 units, +inf for rows with nothing visible (their P is then exp2(-inf) = 0 everywhere)
__device__ __forceinline__ float lse2_of(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// ---------------------------------------------------------------------------------------------------------
// dK, dV: a block owns 64 keys (16 per warp) and walks the query tiles (BM rows) of every head of its GQA
// group, the next tile's Q, dO, lse, delta and dropout row hashes loading into the other of two stages
// while this one is used. S^T = K Q^T and dP^T = V dO^T per warp; dV += (P o Z)^T dO, dK += dS^T Q.
template <int D, int BM>
struct QStage {  // one stage of the dK/dV kernel's query-side buffers
  static constexpr int kBytes = 2 * BM * (D + kPad) * 2 + 3 * BM * 4;
  static_assert(kBytes % 16 == 0, "the next stage's tiles must stay 16-byte aligned");
  uint16_t* q;
  uint16_t* dout;
  float* lse2;  // lse in log2 units (+inf: nothing visible, or past L)
  float* delta;
  uint32_t* rhash;
  __device__ __forceinline__ explicit QStage(unsigned char* base) {
    q = reinterpret_cast<uint16_t*>(base);
    dout = q + BM * (D + kPad);
    lse2 = reinterpret_cast<float*>(dout + BM * (D + kPad));
    delta = lse2 + BM;
    rhash = reinterpret_cast<uint32_t*>(delta + BM);
  }
  __device__ __forceinline__ void load(const AttnParams& p, const uint16_t* dout_g, const float* lse,
                                       const float* delta_g, int64_t bh, int64_t i0, bool vec) const {
    load_tile<BM, D>(q, static_cast<const uint16_t*>(p.q) + (bh * p.L + i0) * p.E, p.E, p.L - i0,
                     static_cast<int>(p.E), vec);
    load_tile<BM, D>(dout, dout_g + (bh * p.L + i0) * p.Ev, p.Ev, p.L - i0, static_cast<int>(p.Ev), vec);
    if (threadIdx.x < BM) {
      const int64_t i = i0 + threadIdx.x;
      lse2[threadIdx.x] = i < p.L ? lse2_of(lse[bh * p.L + i]) : INFINITY;
      delta[threadIdx.x] = i < p.L ? delta_g[bh * p.L + i] : 0.0f;
      rhash[threadIdx.x] = p.dropout ? row_hash(p, bh * p.L + i) : 0u;
    }
  }
};

template <bool BF16, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1)
    dkdv_mma_kernel(const AttnParams p, const bool vec, const uint16_t* __restrict__ dout,
                    const float* __restrict__ lse, const float* __restrict__ delta, uint16_t* __restrict__ dk,
                    uint16_t* __restrict__ dv) {
  SK_DYNAMIC_SMEM(unsigned char, smem_raw);
  constexpr int P = D + kPad, KD = D / 16;
  using Stage = QStage<D, BM>;
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem_raw);  // kRows x P
  uint16_t* Vs = Ks + kRows * P;                        // kRows x P
  unsigned char* stages = reinterpret_cast<unsigned char*>(Vs + kRows * P);  // 2 x Stage::kBytes
  const int64_t nblk = (p.S + kRows - 1) / kRows;
  const int64_t bhk = blockIdx.x / nblk, j0 = (blockIdx.x % nblk) * kRows;
  const int64_t b = bhk / p.Hk, hk = bhk % p.Hk, G = p.Hq / p.Hk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev), nkE = (E + 15) / 16, nkV = (Ev + 15) / 16;
  const float scale2 = p.scale * kLog2e;
  load_tile<kRows, D>(Ks, static_cast<const uint16_t*>(p.k) + (bhk * p.S + j0) * p.E, p.E, p.S - j0, E, vec);
  load_tile<kRows, D>(Vs, static_cast<const uint16_t*>(p.v) + (bhk * p.S + j0) * p.Ev, p.Ev, p.S - j0, Ev, vec);
  const int64_t j_r[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
  float dka[D / 8][4], dva[D / 8][4];
  zero(dka);
  zero(dva);
  // causal: query rows before j0 see none of this block's keys
  const int64_t i_start = p.causal ? (j0 / BM) * BM : 0;
  const int64_t n_i = i_start < p.L ? (p.L - i_start + BM - 1) / BM : 0, n_tiles = G * n_i;
  if (n_tiles > 0) Stage(stages).load(p, dout, lse, delta, b * p.Hq + hk * G, i_start, vec);
  cp_async_commit();  // K, V and the first query tile
  for (int64_t it = 0; it < n_tiles; ++it) {
    const int buf = static_cast<int>(it & 1);
    const int64_t h = hk * G + it / n_i, i0 = i_start + (it % n_i) * BM;
    if (it + 1 < n_tiles)
      Stage(stages + (buf ^ 1) * Stage::kBytes)
          .load(p, dout, lse, delta, b * p.Hq + hk * G + (it + 1) / n_i, i_start + ((it + 1) % n_i) * BM, vec);
    cp_async_commit();
    cp_async_wait<1>();  // all but the prefetch just issued have landed
    __syncthreads();
    const Stage st_(stages + buf * Stage::kBytes);
    const uint16_t* Qs = st_.q;
    const uint16_t* dOs = st_.dout;

    float st[BM / 8][4], dpt[BM / 8][4];
    zero(st);
    zero(dpt);
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t af[4];
      if (kk < nkE) {
        ldsm_x4(af, Ks + (warp * 16 + a_row(lane)) * P + kk * 16 + a_col(lane));
#pragma unroll
        for (int np = 0; np < BM / 16; ++np) {
          uint32_t bf[4];
          ldsm_x4(bf, Qs + (np * 16 + b_row(lane)) * P + kk * 16 + b_col(lane));
          mma16816<BF16>(st[2 * np], af, bf[0], bf[1]);
          mma16816<BF16>(st[2 * np + 1], af, bf[2], bf[3]);
        }
      }
      if (kk < nkV) {
        ldsm_x4(af, Vs + (warp * 16 + a_row(lane)) * P + kk * 16 + a_col(lane));
#pragma unroll
        for (int np = 0; np < BM / 16; ++np) {
          uint32_t bf[4];
          ldsm_x4(bf, dOs + (np * 16 + b_row(lane)) * P + kk * 16 + b_col(lane));
          mma16816<BF16>(dpt[2 * np], af, bf[0], bf[1]);
          mma16816<BF16>(dpt[2 * np + 1], af, bf[2], bf[3]);
        }
      }
    }
    // every key of this warp visible to every query of the tile, no mask, all in range
    const bool plain = p.mask == nullptr && i0 + BM <= p.L && j0 + kRows <= p.S &&
                       (!p.causal || j0 + warp * 16 + 15 <= i0);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ic = nt * 8 + 2 * t + (e & 1);
        const int64_t i = i0 + ic, j = j_r[e >> 1];
        const float x = plain ? st[nt][e] * scale2 : score2<BF16>(p, st[nt][e], scale2, b, h, i, j);
        const float pr = fast_exp2(x - st_.lse2[ic]);
        const float z = p.dropout ? dropout_scale(p, st_.rhash[ic], j) : 1.0f;  // rows past L: pr = 0
        st[nt][e] = pr * z;
        dpt[nt][e] = pr * (dpt[nt][e] * z - st_.delta[ic]);
      }
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t pa[4], da[4], dlo[4];
      to_a<BF16>(pa, st[2 * kk], st[2 * kk + 1]);
      to_a_split<BF16>(da, dlo, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < KD; ++dp) {
        uint32_t bf[4];
        if (dp < nkV) {
          ldsm_x4_trans(bf, dOs + (kk * 16 + a_row(lane)) * P + dp * 16 + a_col(lane));
          mma16816<BF16>(dva[2 * dp], pa, bf[0], bf[1]);
          mma16816<BF16>(dva[2 * dp + 1], pa, bf[2], bf[3]);
        }
        if (dp < nkE) {
          ldsm_x4_trans(bf, Qs + (kk * 16 + a_row(lane)) * P + dp * 16 + a_col(lane));
          mma_split_x2<BF16>(dka[2 * dp], dka[2 * dp + 1], da, dlo, bf);
        }
      }
    }
    __syncthreads();  // this stage is free for the prefetch of the next iteration
  }
  cp_async_wait<0>();  // L = 0: the K/V tile loads still complete before the block exits
  const int64_t row0 = j0 + warp * 16;
  store_rows<BF16, D / 8>(dk + (bhk * p.S + row0) * p.E, p.E, p.S - row0, E, dka, p.scale, p.scale);
  store_rows<BF16, D / 8>(dv + (bhk * p.S + row0) * p.Ev, p.Ev, p.S - row0, Ev, dva, 1.0f, 1.0f);
}

// ---------------------------------------------------------------------------------------------------------
// dQ: a block owns 64 queries (16 per warp, Q and dO fragments in registers) and walks key tiles of BN,
// the next K/V tile loading into the other of two stages while this one is used.
template <bool BF16, int D, int BN>
// 2 blocks per SM as before the dS split; without the bound ptxas aimed at 3 and spilled
__global__ void __launch_bounds__(kThreads, 2)
    dq_mma_kernel(const AttnParams p, const bool vec, const uint16_t* __restrict__ dout, const float* __restrict__ lse,
                  const float* __restrict__ delta, uint16_t* __restrict__ dq) {
  SK_DYNAMIC_SMEM(unsigned char, smem_raw);
  constexpr int P = D + kPad, KD = D / 16;
  static_assert(4 * BN >= 2 * kRows, "the Q and dO tiles are staged where the K/V stages go");
  uint16_t* base = reinterpret_cast<uint16_t*>(smem_raw);  // Q, dO (kRows x P each) first; then 2 x (K, V)
  const QueryBlock qb = query_block(p, kRows);
  const int64_t bh = qb.bh, q0 = qb.q0, b = qb.b, h = qb.h;
  const uint16_t *k = qb.k, *v = qb.v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev), nkE = (E + 15) / 16, nkV = (Ev + 15) / 16;
  const float scale2 = p.scale * kLog2e;

  load_tile<kRows, D>(base, static_cast<const uint16_t*>(p.q) + (bh * p.L + q0) * p.E, p.E, p.L - q0, E, vec);
  load_tile<kRows, D>(base + kRows * P, dout + (bh * p.L + q0) * p.Ev, p.Ev, p.L - q0, Ev, vec);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[KD][4], df[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
    qf[kk][0] = qf[kk][1] = qf[kk][2] = qf[kk][3] = 0u;
    df[kk][0] = df[kk][1] = df[kk][2] = df[kk][3] = 0u;
    if (kk < nkE) ldsm_x4(qf[kk], base + (warp * 16 + a_row(lane)) * P + kk * 16 + a_col(lane));
    if (kk < nkV) ldsm_x4(df[kk], base + (kRows + warp * 16 + a_row(lane)) * P + kk * 16 + a_col(lane));
  }
  __syncthreads();  // Q and dO are in registers: the stages may overwrite them
  const int64_t i_r[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float lse2[2], dl[2];
  uint32_t rh[2] = {0u, 0u};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = i_r[r] < p.L;
    lse2[r] = in ? lse2_of(lse[bh * p.L + i_r[r]]) : INFINITY;
    dl[r] = in ? delta[bh * p.L + i_r[r]] : 0.0f;
    if (p.dropout) rh[r] = row_hash(p, bh * p.L + i_r[r]);
  }
  float dqa[D / 8][4];
  zero(dqa);
  const int64_t j_end = p.causal ? min(p.S, q0 + kRows) : p.S;
  const int64_t n_j = (j_end + BN - 1) / BN;
  // stage s: K at base + 2 s BN P, V right after it
  if (n_j > 0) {
    load_tile<BN, D>(base, k, p.E, p.S, E, vec);
    load_tile<BN, D>(base + BN * P, v, p.Ev, p.S, Ev, vec);
  }
  cp_async_commit();
  for (int64_t jt = 0; jt < n_j; ++jt) {
    const int buf = static_cast<int>(jt & 1);
    const int64_t j0 = jt * BN;
    if (jt + 1 < n_j) {
      uint16_t* nk = base + (buf ^ 1) * 2 * BN * P;
      load_tile<BN, D>(nk, k + (j0 + BN) * p.E, p.E, p.S - j0 - BN, E, vec);
      load_tile<BN, D>(nk + BN * P, v + (j0 + BN) * p.Ev, p.Ev, p.S - j0 - BN, Ev, vec);
    }
    cp_async_commit();
    cp_async_wait<1>();  // all but the prefetch just issued have landed
    __syncthreads();
    const uint16_t* Ks = base + buf * 2 * BN * P;
    const uint16_t* Vs = Ks + BN * P;
    float s[BN / 8][4], dpv[BN / 8][4];
    zero(s);
    zero(dpv);
#pragma unroll
    for (int kk = 0; kk < KD; ++kk)
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bf[4];
        if (kk < nkE) {
          ldsm_x4(bf, Ks + (np * 16 + b_row(lane)) * P + kk * 16 + b_col(lane));
          mma16816<BF16>(s[2 * np], qf[kk], bf[0], bf[1]);
          mma16816<BF16>(s[2 * np + 1], qf[kk], bf[2], bf[3]);
        }
        if (kk < nkV) {
          ldsm_x4(bf, Vs + (np * 16 + b_row(lane)) * P + kk * 16 + b_col(lane));
          mma16816<BF16>(dpv[2 * np], df[kk], bf[0], bf[1]);
          mma16816<BF16>(dpv[2 * np + 1], df[kk], bf[2], bf[3]);
        }
      }
    const bool plain = p.mask == nullptr && j0 + BN <= p.S && (!p.causal || j0 + BN - 1 <= q0 + warp * 16);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t j = j0 + nt * 8 + 2 * t + (e & 1);
        const float x = plain ? s[nt][e] * scale2 : score2<BF16>(p, s[nt][e], scale2, b, h, i_r[r], j);
        const float pr = fast_exp2(x - lse2[r]);
        const float z = p.dropout ? dropout_scale(p, rh[r], j) : 1.0f;
        s[nt][e] = pr * (dpv[nt][e] * z - dl[r]);
      }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t da[4], dlo[4];
      to_a_split<BF16>(da, dlo, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < KD; ++dp) {
        if (dp >= nkE) break;
        uint32_t bf[4];
        ldsm_x4_trans(bf, Ks + (kk * 16 + a_row(lane)) * P + dp * 16 + a_col(lane));
        mma_split_x2<BF16>(dqa[2 * dp], dqa[2 * dp + 1], da, dlo, bf);
      }
    }
    __syncthreads();  // this stage is free for the prefetch of the next iteration
  }
  cp_async_wait<0>();
  const int64_t row0 = q0 + warp * 16;
  store_rows<BF16, D / 8>(dq + (bh * p.L + row0) * p.E, p.E, p.L - row0, E, dqa, p.scale, p.scale);
}

// ---------------------------------------------------------------------------------------------------------
bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// every tile row starts on 16 bytes when rows are multiples of 8 halves and the bases are aligned
bool vec_ok(const AttnParams& p, const void* dout) {
  return p.E % 8 == 0 && p.Ev % 8 == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.v) &&
         (dout == nullptr || aligned16(dout));
}

template <typename Kernel>
cudaError_t launch_prep(Kernel kernel, size_t smem) {
  // tiles of wide heads exceed the default 48 KB of dynamic shared memory
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <bool BF16, int D>
cudaError_t forward_mma_t(const AttnParams& p, void* out, float* lse, cudaStream_t stream) {
  // 128 queries per block; 64 keys a tile, 32 for 128-wide heads, whose 2 x 16 x 128 fp32 output
  // accumulators leave no room for 2 x 16 x 64 scores within 255 registers
  constexpr int MT = 2, BN = D > 64 ? 32 : 64;
  const int64_t blocks = p.B * p.Hq * ((p.L + kRows * MT - 1) / (kRows * MT));
  if (blocks == 0) return cudaSuccess;
  if (blocks > kAttnMaxGridX) return cudaErrorInvalidConfiguration;
  const size_t smem = sizeof(uint16_t) * (kRows * MT + 2 * BN) * (D + kPad);
  cudaError_t err = launch_prep(fwd_mma_kernel<BF16, D, MT, BN>, smem);
  if (err != cudaSuccess) return err;
  SK_LAUNCH(static_cast<unsigned>(blocks), kThreads, smem, stream, fwd_mma_kernel<BF16, D, MT, BN>)(
      p, vec_ok(p, nullptr), static_cast<uint16_t*>(out), lse);
  return cudaGetLastError();
}

template <bool BF16, int D>
cudaError_t backward_mma_t(const AttnParams& p, const void* dout_, const float* lse, const float* delta, void* dq,
                           void* dk, void* dv, cudaStream_t stream) {
  // 128-wide heads take narrower query (dK/dV) and key (dQ) tiles: the fp32 accumulators of two 16 x 128
  // products per warp already hold 128 registers
  constexpr int BT = D > 64 ? 32 : 64;
  const uint16_t* dout = static_cast<const uint16_t*>(dout_);
  const bool vec = vec_ok(p, dout_);
  const int64_t kv_blocks = p.B * p.Hk * ((p.S + kRows - 1) / kRows);
  if (kv_blocks > 0) {
    if (kv_blocks > kAttnMaxGridX) return cudaErrorInvalidConfiguration;
    const size_t smem = sizeof(uint16_t) * 2 * kRows * (D + kPad) + 2 * QStage<D, BT>::kBytes;
    cudaError_t err = launch_prep(dkdv_mma_kernel<BF16, D, BT>, smem);
    if (err != cudaSuccess) return err;
    SK_LAUNCH(static_cast<unsigned>(kv_blocks), kThreads, smem, stream, dkdv_mma_kernel<BF16, D, BT>)(
        p, vec, dout, lse, delta, static_cast<uint16_t*>(dk), static_cast<uint16_t*>(dv));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t q_blocks = p.B * p.Hq * ((p.L + kRows - 1) / kRows);
  if (q_blocks > 0) {
    if (q_blocks > kAttnMaxGridX) return cudaErrorInvalidConfiguration;
    const size_t smem = sizeof(uint16_t) * 4 * BT * (D + kPad);  // two K/V stages (Q, dO staged there first)
    cudaError_t err = launch_prep(dq_mma_kernel<BF16, D, BT>, smem);
    if (err != cudaSuccess) return err;
    SK_LAUNCH(static_cast<unsigned>(q_blocks), kThreads, smem, stream, dq_mma_kernel<BF16, D, BT>)(
        p, vec, dout, lse, delta, static_cast<uint16_t*>(dq));
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

bool attention_mma_fits(const AttnParams& p) {
  return p.mma && (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && p.E >= 1 && p.Ev >= 1 &&
         p.E <= kAttnMmaMaxHeadDim && p.Ev <= kAttnMmaMaxHeadDim && p.Hk > 0 && p.Hq % p.Hk == 0;
}

cudaError_t attention_forward_mma(const AttnParams& p, void* out, float* lse, cudaStream_t stream) {
  if (!attention_mma_fits(p)) return cudaErrorInvalidValue;
  // the compiled tile width is the smallest of 64, 128 that holds max(E, Ev)
  const bool wide = p.E > 64 || p.Ev > 64;
  if (p.dtype == DType::kBFloat16)
    return wide ? forward_mma_t<true, 128>(p, out, lse, stream) : forward_mma_t<true, 64>(p, out, lse, stream);
  return wide ? forward_mma_t<false, 128>(p, out, lse, stream) : forward_mma_t<false, 64>(p, out, lse, stream);
}

cudaError_t attention_backward_mma(const AttnParams& p, const void* dout, const float* lse, const float* delta,
                                   void* dq, void* dk, void* dv, cudaStream_t stream) {
  if (!attention_mma_fits(p)) return cudaErrorInvalidValue;
  const bool wide = p.E > 64 || p.Ev > 64;
  if (p.dtype == DType::kBFloat16)
    return wide ? backward_mma_t<true, 128>(p, dout, lse, delta, dq, dk, dv, stream)
                : backward_mma_t<true, 64>(p, dout, lse, delta, dq, dk, dv, stream);
  return wide ? backward_mma_t<false, 128>(p, dout, lse, delta, dq, dk, dv, stream)
              : backward_mma_t<false, 64>(p, dout, lse, delta, dq, dk, dv, stream);
}

}  // namespace seqkern::cuda
