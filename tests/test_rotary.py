"""Rotary embedding: every backend vs the reference and vs a direct evaluation of the
formula (complex multiplication), gradients, KV-cache offsets, modules, errors."""
import math

import pytest
import torch

import seqkern
from seqkern import functional as SF, nn as snn
from seqkern.ops.rotary import apply_rotary_reference, rotary_cos_sin

from helpers import TOL, backend_param, cpu_backends

BACKENDS = [backend_param(b) for b in ("reference", "cpu", "triton")]


def direct(x, pos0, rdim, base, interleaved):
    """x (..., T, D) rotated by e^{i p theta_j} written as complex numbers, fp64."""
    T, D = x.shape[-2], x.shape[-1]
    half = rdim // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / rdim)
    ang = (pos0 + torch.arange(T, dtype=torch.float64))[:, None] * theta
    rot = torch.polar(torch.ones_like(ang), ang)
    xr = x[..., :rdim].double()
    if interleaved:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2]) * rot
        out = torch.stack((z.real, z.imag), -1).flatten(-2)
    else:
        z = torch.complex(xr[..., :half], xr[..., half:]) * rot
        out = torch.cat((z.real, z.imag), -1)
    return torch.cat((out, x[..., rdim:].double()), -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rdim", [8, 6])
def test_reference_matches_formula(interleaved, rdim):
    q = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    k = torch.randn(2, 1, 7, 8, dtype=torch.float64)
    cos, sin = rotary_cos_sin(7, rdim, 500.0, start=3, dtype=torch.float64)
    qo, ko = apply_rotary_reference(q, k, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(qo, direct(q, 3, rdim, 500.0, interleaved))
    torch.testing.assert_close(ko, direct(k, 3, rdim, 500.0, interleaved))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape,rdim", [((2, 4, 9, 16), 16), ((1, 2, 5, 10), 6), ((3, 1, 1, 4), 4)])
def test_backend_matches_reference_with_grads(backend, dtype, interleaved, shape, rdim):
    q = torch.randn(shape, dtype=dtype, requires_grad=True)
    k = torch.randn(shape[0], 1, *shape[2:], dtype=dtype, requires_grad=True)
    cos, sin = rotary_cos_sin(shape[2], rdim, dtype=dtype)
    q0, k0 = q.detach().clone(), k.detach().clone()
    qo, ko = SF.apply_rotary(q, k, cos, sin, interleaved=interleaved, backend=backend)
    assert seqkern.last_backend("apply_rotary") == backend
    qr, kr = apply_rotary_reference(q, k, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(qo, qr, **TOL[dtype])
    torch.testing.assert_close(ko, kr, **TOL[dtype])
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    got = torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), (q, k))
    want = torch.autograd.grad((qr * gq).sum() + (kr * gk).sum(), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64_including_tables(backend):
    q = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary_cos_sin(4, 4, dtype=torch.float64)
    cos.requires_grad_(); sin.requires_grad_()
    for il in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a: SF.apply_rotary(*a, interleaved=il, backend=backend), (q, k, cos, sin))


def test_cpu_double_backward_through_the_inverse_rotation():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary_cos_sin(3, 4, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda a, b: SF.apply_rotary(a, b, cos, sin, backend="cpu"), (q, k))


def test_opcheck_registered_op():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    cos, sin = rotary_cos_sin(5, 8)
    for il in (False, True):
        torch.library.opcheck(torch.ops.seqkern.apply_rotary.default, (q, k, cos, sin, il, False, "cpu"))


def test_compile_fullgraph_cpu():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    cos, sin = rotary_cos_sin(5, 8)
    f = torch.compile(lambda a, b: SF.apply_rotary(a, b, cos, sin, backend="cpu"), fullgraph=True)
    got = f(q, k)
    want = apply_rotary_reference(q, k, cos, sin)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("backend", cpu_backends())
def test_kv_cache_offset_equals_full_sequence(backend):
    rope = snn.RotaryEmbedding(8, max_seq_len=4, backend=backend)  # grows its cache past 4
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    qf, kf = rope(q, k)
    for start in (0, 5, 11):
        qs, ks = rope(q[..., start:start + 1, :], k[..., start:start + 1, :], start=start)
        torch.testing.assert_close(qs, qf[..., start:start + 1, :])
        torch.testing.assert_close(ks, kf[..., start:start + 1, :])


def test_rotation_preserves_norm_and_relative_position():
    # <R_m q, R_n k> depends only on m - n: the property rotary is built for
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    cos, sin = rotary_cos_sin(20, 8, dtype=torch.float64)
    Q, K = SF.apply_rotary(q.expand(20, 8), k.expand(20, 8), cos, sin, backend="cpu")
    torch.testing.assert_close(Q.norm(dim=-1), q.norm().expand(20))
    torch.testing.assert_close(Q[7] @ K[3], Q[14] @ K[10])


def test_sinusoidal_encoding_formula_and_start():
    pe = snn.SinusoidalPositionalEncoding(6, max_len=3)
    x = torch.zeros(10, 2, 6)
    y = pe(x)  # longer than max_len: the table grows
    p, i = 7, 1
    assert math.isclose(y[p, 0, 2 * i].item(), math.sin(p / 10000 ** (2 * i / 6)), rel_tol=1e-6)
    assert math.isclose(y[p, 1, 2 * i + 1].item(), math.cos(p / 10000 ** (2 * i / 6)), rel_tol=1e-6)
    torch.testing.assert_close(pe(x[:4], start=6), y[6:10])
    bf = snn.SinusoidalPositionalEncoding(6, batch_first=True)
    torch.testing.assert_close(bf(x.transpose(0, 1)), y.transpose(0, 1))
    assert "pe" not in pe.state_dict()


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, c, s: (q[0, 0, 0], k, c, s), "q"),
    (lambda q, k, c, s: (q, k[..., :4], c, s), "k"),
    (lambda q, k, c, s: (q, k, c[:3], s[:3]), "cos"),
    (lambda q, k, c, s: (q, k, c, s[:, :2]), "sin"),
    (lambda q, k, c, s: (q, k, torch.ones(5, 5), torch.ones(5, 5)), "rotary dim"),
    (lambda q, k, c, s: (q, k.double(), c, s), "k"),
    (lambda q, k, c, s: (q.long(), k, c, s), "q"),
])
def test_bad_input_names_the_argument(bad, match):
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = rotary_cos_sin(5, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        SF.apply_rotary(*bad(q, k, cos, sin))


def test_backend_unavailable_for_wrong_device_or_dtype():
    q, k = torch.randn(1, 2, 5, 8, dtype=torch.float16), torch.randn(1, 2, 5, 8, dtype=torch.float16)
    cos, sin = rotary_cos_sin(5, 8, dtype=torch.float16)
    with pytest.raises(seqkern.BackendUnavailable, match="cpu"):
        SF.apply_rotary(q, k, cos, sin, backend="cpu")
    # automatic choice falls through to the reference for fp16 on CPU
    SF.apply_rotary(q, k, cos, sin)
    assert seqkern.last_backend("apply_rotary") == "reference"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends(backend, dtype):
    q = torch.randn(2, 4, 33, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 33, 64, device="cuda", dtype=dtype, requires_grad=True)
    cos, sin = rotary_cos_sin(33, 48, device="cuda", dtype=dtype)
    for il in (False, True):
        qo, ko = SF.apply_rotary(q, k, cos, sin, interleaved=il, backend=backend)
        qr, kr = apply_rotary_reference(q.float(), k.float(), cos.float(), sin.float(), interleaved=il)
        tol = TOL.get(dtype, dict(rtol=2e-2, atol=2e-2))
        torch.testing.assert_close(qo.float(), qr, **tol)
        torch.testing.assert_close(ko.float(), kr, **tol)
        g = torch.autograd.grad(qo.float().sum() + ko.float().square().sum(), (q, k))
        w = torch.autograd.grad(qr.sum() + kr.square().sum(), (q, k), allow_unused=True)
        for a, b in zip(g, w):
            torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_compile_fullgraph(backend):
    q, k = torch.randn(2, 3, 17, 32, device="cuda"), torch.randn(2, 3, 17, 32, device="cuda")
    cos, sin = rotary_cos_sin(17, 32, device="cuda")
    f = torch.compile(lambda a, b: SF.apply_rotary(a, b, cos, sin, backend=backend), fullgraph=True)
    got, want = f(q, k), apply_rotary_reference(q, k, cos, sin)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_triton_supports_counts_the_programs_of_its_grid():
    """One program per block of rows (64 rows up to 64 rotated pairs, fewer for wider ones), a 1-D
    grid with int64 row offsets: supports() declines only past 2^31-1 programs (fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sup = seqkern.backends._SUPPORTS["apply_rotary"]["triton"]
    with FakeTensorMode():
        for rows, D, half, ok in ((2**31 + 5, 8, 4, True), ((2**31 - 1) * 64, 8, 4, True),
                                  ((2**31 - 1) * 64 + 1, 8, 4, False), ((2**31 - 1) * 16, 512, 256, True),
                                  ((2**31 - 1) * 16 + 1, 512, 256, False)):
            q = torch.empty(rows, 1, D)
            cs = torch.empty(1, half)
            got = sup(q, q, cs, cs)
            assert got[0] is ok, (rows, D, got)
            if not ok:
                assert "grid limit of 2^31-1" in got[1]
