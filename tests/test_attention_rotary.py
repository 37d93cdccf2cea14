"""scaled_dot_product_attention(..., rotary=(cos, sin)): equals rotating q and k first (the separate
rotary pass), values and the gradients of q, k and v, on every backend; the cpu and triton kernels
rotate inside their loads (the op receives cos/sin), the others rotate first."""
import pytest
import torch

import seqkern
from seqkern import functional as SF
from seqkern.ops import attention as A
from helpers import TOL, backend_param, cpu_backends


def _case(dtype, Hq=3, Hk=3, T=11, D=16, R=16, B=2):
    q = torch.randn(B, Hq, T, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hk, T, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hk, T, D, dtype=dtype, requires_grad=True)
    cos, sin = SF.rotary_cos_sin(T, R, dtype=dtype)
    return q, k, v, cos, sin


def _check(backend, dtype, causal=False, mask=None, **shape):
    q, k, v, cos, sin = _case(dtype, **shape)
    gqa = q.shape[1] != k.shape[1]
    got = SF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                                          rotary=(cos, sin), backend=backend)
    assert seqkern.last_backend(A.OP) == backend
    qr, kr = SF.apply_rotary(q, k, cos, sin, backend="reference")
    want = SF.scaled_dot_product_attention(qr, kr, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                                           backend="reference")
    torch.testing.assert_close(got, want, **TOL[dtype])
    do = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (q, k, v), do)
    g_want = torch.autograd.grad(want, (q, k, v), do)
    for name, a, b in zip("qkv", g_got, g_want):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", [backend_param(b) for b in cpu_backends()])
@pytest.mark.parametrize("causal", [False, True])
def test_rotary_option_equals_rotate_then_attend(backend, causal):
    dtype = torch.float32 if backend == "triton" else torch.float64
    _check(backend, dtype, causal)


# GQA, partial rotary (R < D), odd lengths and head dims, more than one block of the cpu kernels
# (64 queries x 128 keys) and of the interpreted triton ones (16 x 16)
SHAPES = [dict(Hq=4, Hk=2, T=13, D=8, R=8), dict(Hq=2, Hk=1, T=19, D=12, R=6), dict(Hq=1, Hk=1, T=37, D=20, R=16)]
CPU_SHAPES = [dict(Hq=4, Hk=2, T=150, D=24, R=16, B=1), dict(Hq=2, Hk=2, T=129, D=6, R=6, B=1)]


@pytest.mark.parametrize("backend", [backend_param(b) for b in cpu_backends() if b != "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_rotary_fused_gqa_partial_odd(backend, shape, causal):
    _check(backend, torch.float32 if backend == "triton" else torch.float64, causal, **shape)


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_rotary_fused_cpu_many_blocks(shape, causal):
    if "cpu" not in cpu_backends():
        pytest.skip("no cpu backend")
    _check("cpu", torch.float64, causal, **shape)


@pytest.mark.parametrize("backend", [backend_param(b) for b in cpu_backends() if b != "reference"])
def test_rotary_fused_with_mask_and_dropout_in_fp32(backend):
    T = 10
    mask = torch.randn(T, T)
    _check(backend, torch.float32, mask=mask, T=T, Hq=2, Hk=2)
    q, k, v, cos, sin = _case(torch.float32, T=T)
    qr, kr = SF.apply_rotary(q, k, cos, sin, backend="reference")
    torch.manual_seed(3)
    got = SF.scaled_dot_product_attention(q, k, v, dropout_p=0.3, rotary=(cos, sin), backend=backend)
    torch.manual_seed(3)
    want = SF.scaled_dot_product_attention(qr, kr, v, dropout_p=0.3, backend="reference")
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", [backend_param(b) for b in cpu_backends() if b != "reference"])
def test_rotary_fused_passes_the_tables_to_the_kernel(backend, monkeypatch):
    """The fused path hands cos/sin to the op (no separate rotary pass), and rotates nothing in place."""
    from seqkern.ops import rotary as R

    def boom(*a, **kw):
        raise AssertionError("the separate rotary pass ran")

    monkeypatch.setattr(R, "apply_rotary", boom)
    q, k, v, cos, sin = _case(torch.float32, T=7)
    before = [t.detach().clone() for t in (q, k, v)]
    SF.scaled_dot_product_attention(q, k, v, rotary=(cos, sin), backend=backend)
    for b, t in zip(before, (q, k, v)):
        assert torch.equal(b, t)


def test_rotary_tables_that_require_grad_take_the_separate_pass():
    """cos/sin get no gradient from the fused kernels: with requires_grad the differentiable pass runs."""
    q, k, v, cos, sin = _case(torch.float64, T=6)
    cos.requires_grad_(True)
    sin.requires_grad_(True)
    for be in [b for b in cpu_backends() if b != "triton"]:
        out = SF.scaled_dot_product_attention(q, k, v, rotary=(cos, sin), backend=be)
        gc, gs = torch.autograd.grad(out.sum(), (cos, sin))
        qr, kr = SF.apply_rotary(q, k, cos, sin, backend="reference")
        want = SF.scaled_dot_product_attention(qr, kr, v, backend="reference")
        wc, ws = torch.autograd.grad(want.sum(), (cos, sin))
        torch.testing.assert_close(gc, wc)
        torch.testing.assert_close(gs, ws)


def test_rotary_option_rejects_a_non_pair():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="rotary"):
        SF.scaled_dot_product_attention(q, q, q, rotary=torch.ones(4, 4))


def test_rotary_option_checks_the_tables():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="cos"):
        SF.scaled_dot_product_attention(q, q, q, rotary=(torch.ones(5, 4), torch.ones(5, 4)))


@pytest.mark.parametrize("backend", [backend_param(b) for b in cpu_backends() if b != "reference"])
def test_rotary_op_gradcheck_and_opcheck(backend):
    """The registered ops with cos/sin: fp64 gradcheck of the hand-written backward (dq/dk rotated
    back), and opcheck (schema, fake kernel, autograd registration) of forward and backward."""
    torch.manual_seed(1)
    q, k, v, cos, sin = _case(torch.float64, B=1, Hq=2, Hk=1, T=5, D=6, R=4)
    for causal in (False, True):
        torch.autograd.gradcheck(
            lambda a, b, c: A._sdpa_forward(a, b, c, None, 0.0, causal, 0.5, 0, backend, cos, sin)[0], (q, k, v))
    torch.library.opcheck(A._sdpa_forward, (q, k, v, None, 0.0, True, 0.5, 0, backend, cos, sin))
    out, lse = A._sdpa_forward(q, k, v, None, 0.0, True, 0.5, 0, backend, cos, sin)
    torch.library.opcheck(A._sdpa_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), None,
                                             out.detach(), lse.detach(), 0.0, True, 0.5, 0, backend, cos, sin))
