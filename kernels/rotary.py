"""Triton rotary embedding: one program per block of rows, all pairs of a row in one tile."""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, rows, T, D, HALF,
                   INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows may pass 2^31
    j = tl.arange(0, BLOCK_H)
    keep = (r < rows)[:, None] & (j < HALF)[None, :]
    t = r % T
    c = tl.load(cos_ptr + t[:, None] * HALF + j[None, :], mask=keep, other=0.0).to(ACC)
    s = tl.load(sin_ptr + t[:, None] * HALF + j[None, :], mask=keep, other=0.0).to(ACC)
    if INVERSE:
        s = -s
    if INTERLEAVED:
        i1 = 2 * j
        i2 = 2 * j + 1
    else:
        i1 = j
        i2 = j + HALF
    base = r[:, None].to(tl.int64) * D
    x1 = tl.load(x_ptr + base + i1[None, :], mask=keep, other=0.0).to(ACC)
    x2 = tl.load(x_ptr + base + i2[None, :], mask=keep, other=0.0).to(ACC)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + base + i1[None, :], (x1 * c - x2 * s).to(ty), mask=keep)
    tl.store(out_ptr + base + i2[None, :], (x2 * c + x1 * s).to(ty), mask=keep)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool) -> torch.Tensor:
    """x (..., T, D); cos, sin (T, half). Returns a new contiguous tensor."""
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    D, T, half = x.shape[-1], x.shape[-2], cos.shape[1]
    # features past the rotary dims pass through: start from a copy only when there are any
    out = x.clone() if 2 * half < D else torch.empty_like(x)
    rows = x.numel() // D if D else 0
    if rows == 0 or half == 0:
        return out
    block_h = triton.next_power_of_2(half)
    block_r = max(1, min(64, 4096 // block_h))
    grid = (triton.cdiv(rows, block_r),)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32  # fp32 accumulation for half types
    _rotary_kernel[grid](x, out, cos, sin, rows, T, D, half, INTERLEAVED=interleaved, INVERSE=inverse, ACC=acc,
                         BLOCK_R=block_r, BLOCK_H=block_h)
    return out
