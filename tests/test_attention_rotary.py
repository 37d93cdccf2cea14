"""scaled_dot_product_attention(..., rotary=(cos, sin)): equals rotating q and k first, values and gradients."""
import pytest
import torch

from seqkern import functional as SF
from helpers import TOL, backend_param, cpu_backends


@pytest.mark.parametrize("backend", [backend_param(b) for b in cpu_backends()])
@pytest.mark.parametrize("causal", [False, True])
def test_rotary_option_equals_rotate_then_attend(backend, causal):
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    cos, sin = SF.rotary_cos_sin(11, 16, dtype=dtype)
    got = SF.scaled_dot_product_attention(q, k, v, is_causal=causal, rotary=(cos, sin), backend=backend)
    qr, kr = SF.apply_rotary(q, k, cos, sin, backend="reference")
    want = SF.scaled_dot_product_attention(qr, kr, v, is_causal=causal, backend="reference")
    torch.testing.assert_close(got, want, **TOL[dtype])
    do = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (q, k, v), do)
    g_want = torch.autograd.grad(want, (q, k, v), do)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_rotary_option_rejects_a_non_pair():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="rotary"):
        SF.scaled_dot_product_attention(q, q, q, rotary=torch.ones(4, 4))
