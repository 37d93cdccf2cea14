// Rotary embedding on the CPU: one pass over x, parallel over rows (batch x heads x T).
#include "cpu/rotary.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace seqkern::cpu {
namespace {

template <typename scalar_t, bool kInterleaved>
void rotate_rows(const scalar_t* x, scalar_t* out, const scalar_t* cos, const scalar_t* sin, int64_t rows,
                 int64_t T, int64_t D, int64_t half, scalar_t sign) {
  // grain: enough rows per task that a task moves tens of KB
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * D;
      scalar_t* o = out + r * D;
      const scalar_t* c = cos + (r % T) * half;
      const scalar_t* s = sin + (r % T) * half;
      if constexpr (kInterleaved) {
        for (int64_t j = 0; j < half; ++j) {
          const scalar_t x1 = xr[2 * j], x2 = xr[2 * j + 1], sj = sign * s[j];
          o[2 * j] = x1 * c[j] - x2 * sj;
          o[2 * j + 1] = x2 * c[j] + x1 * sj;
        }
      } else {
        // two contiguous halves: the compiler vectorises this loop
        const scalar_t* x2p = xr + half;
        scalar_t* o2 = o + half;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const scalar_t x1 = xr[j], x2 = x2p[j], sj = sign * s[j];
          o[j] = x1 * c[j] - x2 * sj;
          o2[j] = x2 * c[j] + x1 * sj;
        }
      }
      for (int64_t j = 2 * half; j < D; ++j) o[j] = xr[j];
    }
  });
}

}  // namespace

at::Tensor rotary(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, bool interleaved, bool inverse) {
  const at::Tensor x = x_.contiguous(), cos = cos_.contiguous(), sin = sin_.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t D = x.size(-1), T = x.size(-2), half = cos.size(1);
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqkern_rotary_cpu", [&] {
    const scalar_t sign = inverse ? scalar_t(-1) : scalar_t(1);
    if (interleaved)
      rotate_rows<scalar_t, true>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                                  sin.data_ptr<scalar_t>(), rows, T, D, half, sign);
    else
      rotate_rows<scalar_t, false>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                                   sin.data_ptr<scalar_t>(), rows, T, D, half, sign);
  });
  return out;
}

}  // namespace seqkern::cpu
