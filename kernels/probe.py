"""A tiny Triton kernel whose only job is to prove the test harness runs Triton
(interpreted on CPU, compiled on GPU). Used by tests/test_triton_harness.py."""
import torch
import triton
import triton.language as tl


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    x = tl.load(x_ptr + offs, mask=keep)
    y = tl.load(y_ptr + offs, mask=keep)
    tl.store(out_ptr + offs, alpha * x + y, mask=keep)


def axpy(alpha: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    block = 128
    _axpy_kernel[(triton.cdiv(n, block),)](x, y, out, alpha, n, BLOCK=block)
    return out
