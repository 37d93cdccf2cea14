"""Scaled dot-product attention: every CPU-runnable backend vs torch's F.scaled_dot_product_attention
and vs the reference, all three gradients, fully masked rows, large logits, dropout, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import seqkern
from seqkern import functional as SF
from seqkern.ops import attention as A

from helpers import TOL, backend_param, cpu_backends, require

BACKENDS = [backend_param(b) for b in ("reference", "cpu", "triton")]


def _dt(backend):
    """The dtype a backend's tests run in: fp32 for Triton (interpreted fp64 is slow; tests/test_hostile.py covers it)."""
    return torch.float32 if backend == "triton" else torch.float64


def _inputs(shape_q, shape_k, Ev=None, dtype=torch.float64, grad=True):
    q = torch.randn(shape_q, dtype=dtype)
    k = torch.randn(shape_k, dtype=dtype)
    v = torch.randn(*shape_k[:-1], Ev or shape_k[-1], dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _mask(kind, B, H, L, S, dtype):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(1)
    if kind == "bool_LS":
        m = torch.rand(L, S, generator=g) > 0.3
        m[:, 0] = True  # keep every row alive: torch gives NaN for dead rows
        return m
    if kind == "bool_full":
        m = torch.rand(B, H, L, S, generator=g) > 0.5
        m[..., -1] = True
        return m
    if kind == "bool_B11S":  # key padding mask
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[0, ..., S // 2 + 1:] = False
        return m
    if kind == "float_B1LS":
        return torch.randn(B, 1, L, S, generator=g, dtype=dtype)
    if kind == "float_H1S":
        return torch.randn(H, 1, S, generator=g, dtype=dtype)
    raise AssertionError(kind)


# (q shape, k shape, enable_gqa) -- Lq != Lk both ways, GQA, MQA, 3-D and 5-D inputs, odd sizes
SHAPES = [
    ((2, 3, 5, 8), (2, 3, 7, 8), False),
    ((2, 3, 9, 8), (2, 3, 4, 8), False),
    ((1, 4, 6, 16), (1, 2, 6, 16), True),
    ((2, 4, 5, 8), (2, 1, 9, 8), True),
    ((3, 17, 40), (3, 17, 40), False),
    ((2, 1, 2, 3, 4), (2, 1, 2, 5, 4), False),
]
MASKS = [None, "bool_LS", "bool_full", "bool_B11S", "float_B1LS", "float_H1S"]


def _compare(backend, dtype, sq, sk, gqa, mask_kind, causal, scale, Ev=None):
    q, k, v = _inputs(sq, sk, Ev, dtype)
    B, H, L, S = (sq[0] if len(sq) > 3 else 1), sq[-3], sq[-2], sk[-2]
    mask = _mask(mask_kind, B, H, L, S, dtype)
    if mask is not None and mask.dim() == 4 and len(sq) != 4:
        mask = mask[0]
    before = [t.detach().clone() for t in (q, k, v)]
    out = SF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=gqa, backend=backend)
    assert seqkern.last_backend(A.OP) == backend
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    tol = TOL[dtype] if dtype != torch.float64 else dict(rtol=1e-7, atol=1e-7)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, **tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref = torch.autograd.grad((want * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"d{name}: {m}")
    for b_, t in zip(before, (q, k, v)):
        assert torch.equal(b_, t.detach())


# attn_mask together with is_causal: test_mask_and_causal_together_apply_both, test_audit_attention.py
MASK_CAUSAL = [(m, False) for m in MASKS] + [(None, True)]


@pytest.mark.parametrize("mask_kind,causal", MASK_CAUSAL)
@pytest.mark.parametrize("sq,sk,gqa", SHAPES[:4])
def test_reference_matches_torch(sq, sk, gqa, mask_kind, causal):
    for scale in (None, 0.3):
        _compare("reference", torch.float64, sq, sk, gqa, mask_kind, causal, scale)


@pytest.mark.parametrize("sq,sk,gqa", SHAPES[4:])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_torch_other_ranks(sq, sk, gqa, causal):
    _compare("reference", torch.float64, sq, sk, gqa, None, causal, None)


@pytest.mark.parametrize("backend,dtype", [
    pytest.param(b, d, marks=p.marks, id=f"{b}-{str(d)[6:]}")
    for p in BACKENDS for b in p.values for d in (torch.float64, torch.float32) if d == torch.float32 or b != "triton"])
@pytest.mark.parametrize("case", [
    ((2, 3, 5, 8), (2, 3, 7, 8), False, "bool_LS", False, None),
    ((2, 3, 9, 8), (2, 3, 4, 8), False, None, True, 0.3),
    ((1, 4, 6, 16), (1, 2, 6, 16), True, "float_B1LS", False, None),
    ((2, 4, 5, 8), (2, 1, 9, 8), True, None, True, None),
    ((2, 2, 17, 40), (2, 2, 17, 40), False, "bool_B11S", False, None),
    ((1, 2, 33, 8), (1, 2, 70, 8), False, "float_H1S", False, None),
    ((1, 1, 1, 8), (1, 1, 1, 8), False, None, True, None),
])
def test_backend_matches_torch(backend, dtype, case):
    sq, sk, gqa, mask_kind, causal, scale = case
    _compare(backend, dtype, sq, sk, gqa, mask_kind, causal, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_dim_differs_from_query_dim(backend):
    _compare(backend, _dt(backend), (2, 2, 6, 8), (2, 2, 11, 8), False, "bool_LS", False, None, Ev=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_output_and_gradient(backend):
    q, k, v = _inputs((2, 2, 6, 8), (2, 2, 5, 8), dtype=_dt(backend))
    mask = torch.rand(2, 2, 6, 5) > 0.4
    mask[0, 1, 2] = False
    mask[1, :, 4] = False
    mask[..., 0, 0] = True
    dead = ~mask.any(-1)
    out = SF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[dead] == 0).all()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[~dead], want[~dead])
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad((out * g).sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert (dq[dead] == 0).all()
    # the live rows' gradients are torch's with the dead rows' upstream gradient zeroed
    g2 = g.masked_fill(dead[..., None], 0)
    ref = torch.autograd.grad((want.nan_to_num() * g2).sum(), (q, k, v))
    for a, b in zip((dq, dk, dv), ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_keys_masked_additive_and_empty_key_sequence(backend):
    q, k, v = _inputs((1, 2, 4, 8), (1, 2, 3, 8), dtype=_dt(backend))
    mask = torch.full((4, 3), float("-inf"), dtype=_dt(backend))
    out = SF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    assert all((t == 0).all() for t in torch.autograd.grad(out.sum(), (q, k, v)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_do_not_overflow(backend):
    q, k, v = _inputs((1, 2, 9, 16), (1, 2, 9, 16), dtype=torch.float32)
    with torch.no_grad():
        q.mul_(300.0)
        k.mul_(300.0)
    out = SF.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in g)


def test_reference_gradcheck_fp64_every_option():
    q, k, v = _inputs((1, 2, 3, 4), (1, 1, 5, 4))
    fmask = torch.randn(1, 1, 3, 5, dtype=torch.float64, requires_grad=True)
    bmask = torch.rand(3, 5) > 0.3
    bmask[:, 0] = True
    for kw in (dict(), dict(is_causal=True), dict(attn_mask=bmask, scale=0.7)):
        assert torch.autograd.gradcheck(
            lambda a, b, c: SF.scaled_dot_product_attention(a, b, c, enable_gqa=True, backend="reference", **kw),
            (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c, m: SF.scaled_dot_product_attention(a, b, c, attn_mask=m, enable_gqa=True,
                                                           backend="reference"), (q, k, v, fmask))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_op_gradcheck_fp64(backend):
    """gradcheck of the registered op (hand-written backward from lse) incl. dropout and GQA."""
    q, k, v = _inputs((1, 2, 3, 4), (1, 1, 5, 4))
    mask = torch.randn(1, 2, 3, 1, dtype=torch.float64)
    for m, p, causal in ((None, 0.0, True), (mask, 0.0, False), (None, 0.4, False), (mask, 0.3, False)):
        assert torch.autograd.gradcheck(
            lambda a, b, c: A._sdpa_forward(a, b, c, m, p, causal, 0.5, 1234, backend)[0], (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_registered_ops(backend):
    q, k, v = _inputs((2, 4, 5, 8), (2, 2, 6, 8), Ev=3, dtype=torch.float32)
    mask = torch.randn(2, 1, 5, 6)
    cases = ((mask, 0.0, False), (None, 0.25, True))
    for m, p, causal in cases[:1] if backend == "reference" else cases:
        torch.library.opcheck(A._sdpa_forward, (q, k, v, m, p, causal, 0.3, 7, backend))
        out, lse = A._sdpa_forward(q, k, v, m, p, causal, 0.3, 7, backend)
        do = torch.randn_like(out)
        torch.library.opcheck(A._sdpa_backward, (do, q.detach(), k.detach(), v.detach(), m, out.detach(),
                                                 lse.detach(), p, causal, 0.3, 7, backend))


def test_op_reference_backward_matches_autograd_of_the_equations():
    q, k, v = _inputs((2, 4, 6, 8), (2, 2, 9, 8))
    mask = torch.randn(2, 4, 6, 9, dtype=torch.float64)
    for m, p, causal in ((None, 0.3, True), (mask, 0.2, False)):
        o1, _ = A._sdpa_forward(q, k, v, m, p, causal, 0.4, 99, "reference")
        o2, _ = A.sdpa_reference_canonical(q, k, v, m, p, causal, 0.4, 99)
        torch.testing.assert_close(o1, o2)
        g = torch.randn_like(o1)
        for a, b in zip(torch.autograd.grad((o1 * g).sum(), (q, k, v)), torch.autograd.grad((o2 * g).sum(), (q, k, v))):
            torch.testing.assert_close(a, b)


def test_dropout_hash_is_uniform_and_keep_rate_matches_p():
    u = A.dropout_keep(12345, 6, 64, 128)
    assert u.min() >= 0 and u.max() < (1 << 24)
    for p in (0.1, 0.5, 0.9):
        rate = (u >= A.dropout_threshold(p)).double().mean().item()
        assert abs(rate - (1 - p)) < 0.01, (p, rate)
    # distinct seeds and distinct (row, column) give different masks
    assert not torch.equal(u, A.dropout_keep(12346, 6, 64, 128))
    assert (u[0, 0] != u[0, 1]).any() and (u[0] != u[1]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_mask_as_reference_and_unbiased(backend):
    dt = _dt(backend)
    q, k, v = _inputs((2, 2, 8, 8), (2, 2, 12, 8), dtype=dt)
    torch.manual_seed(5)
    out = SF.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(5)
    want = SF.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="reference")
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((want * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
    # uniform attention over ones: every output is the mean of the row's dropout scales, about 1
    ones = torch.ones(2, 4, 64, 4, dtype=dt)
    o = SF.scaled_dot_product_attention(torch.zeros(2, 4, 64, 4, dtype=dt), ones, ones,
                                        dropout_p=0.25, backend=backend)
    assert abs(o.mean().item() - 1.0) < 0.03
    assert o.std().item() > 0.05  # the mask actually varies
    zero = SF.scaled_dot_product_attention(q, k, v, dropout_p=1.0, backend=backend)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_mask_and_causal_together_apply_both():
    # as torch's default CPU/CUDA kernels (its math fallback refuses the pair); vs torch: test_audit_attention.py
    q, k, v = _inputs((1, 1, 3, 4), (1, 1, 3, 4))
    mask = torch.tensor([[True, False, True]] * 3)
    out = SF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    both = mask & torch.ones(3, 3, dtype=torch.bool).tril()
    torch.testing.assert_close(out, SF.scaled_dot_product_attention(q, k, v, attn_mask=both, backend="reference"))


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: dict(query=q[0, 0, 0]), "query"),
    (lambda q, k, v: dict(key=k[..., :3]), "key"),
    (lambda q, k, v: dict(value=v[..., :2, :]), "value"),
    (lambda q, k, v: dict(key=k.float()), "key"),
    (lambda q, k, v: dict(query=q.long()), "query"),
    (lambda q, k, v: dict(attn_mask=torch.ones(4, 4, dtype=torch.bool)), "attn_mask"),
    (lambda q, k, v: dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), "attn_mask"),
    (lambda q, k, v: dict(attn_mask=torch.ones(5, 6, dtype=torch.float16)), "attn_mask"),  # float32 goes (torch)
    (lambda q, k, v: dict(dropout_p=1.5), "dropout_p"),
    (lambda q, k, v: dict(dropout_p="0.1"), "dropout_p"),
    (lambda q, k, v: dict(scale="x"), "scale"),
    (lambda q, k, v: dict(is_causal=1), "is_causal"),
    (lambda q, k, v: dict(key=torch.randn(2, 3, 6, 8, dtype=torch.float64)), "head"),
    (lambda q, k, v: dict(key=k[:, :3], value=v[:, :3], enable_gqa=True), "enable_gqa"),
    (lambda q, k, v: dict(key=torch.randn(3, 4, 6, 8, dtype=torch.float64)), "broadcast"),
])
def test_bad_input_names_the_argument(bad, match):
    q, k, v = _inputs((2, 4, 5, 8), (2, 4, 6, 8), grad=False)
    kw = dict(query=q, key=k, value=v)
    kw.update(bad(q, k, v))
    with pytest.raises((ValueError, TypeError), match=match):
        SF.scaled_dot_product_attention(**kw)


@pytest.mark.parametrize("shapes", [
    [(2, 1, 3), (4, 3), (1,)], [(0,), (1,)], [(0, 1), (1, 5)], [(), (3, 2)], [(1, 1), ()],
    [(2,), (3,)], [(0,), (2,)], [(2, 0), (2, 3)], [(3, 1, 2), (4, 1)], [(7,), (7,), (1,)],
])
def test_broadcast_is_torch_broadcast_shapes(shapes):
    # the plain-Python shape broadcast of the dispatch path (torch's costs ~35 us a call)
    try:
        want = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            A._broadcast(*shapes)
        return
    got = A._broadcast(*shapes)
    assert isinstance(got, torch.Size) and got == want


def test_backend_unavailable_and_automatic_choice():
    q, k, v = _inputs((1, 2, 5, 8), (1, 2, 5, 8), dtype=torch.float16, grad=False)
    with pytest.raises(seqkern.BackendUnavailable, match="cpu"):
        SF.scaled_dot_product_attention(q, k, v, backend="cpu")
    SF.scaled_dot_product_attention(q, k, v)
    assert seqkern.last_backend(A.OP) == "reference"
    q, k, v = _inputs((1, 2, 5, 8), (1, 2, 5, 8), dtype=torch.float32, grad=False)
    SF.scaled_dot_product_attention(q, k, v)
    assert seqkern.last_backend(A.OP) == ("cpu" if seqkern.backends()["cpu"]["available"] else "reference")


@pytest.mark.parametrize("backend", ["cpu"])
def test_compile_fullgraph(backend):
    q, k, v = _inputs((2, 2, 7, 8), (2, 2, 7, 8), dtype=torch.float32)
    mask = torch.rand(7, 7) > 0.2
    f = torch.compile(lambda a, b, c: SF.scaled_dot_product_attention(a, b, c, attn_mask=mask, backend=backend),
                      fullgraph=True)
    out = f(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    live = mask.any(-1)
    torch.testing.assert_close(out[..., live, :], want[..., live, :])
    g = torch.autograd.grad(out.sum(), (q, k, v))
    w = torch.autograd.grad(want.nan_to_num().sum(), (q, k, v))
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal,mask", [(True, False), (False, True)])
def test_cpu_many_blocks_match_reference(causal, mask):
    """Lengths past the cpu kernel's tiles (128 queries x 128 keys), not multiples of them: the online
    softmax across key blocks, causal block skipping and the backward's block loops."""
    q, k, v = _inputs((1, 2, 300, 16), (1, 1, 1100, 16))
    m = (torch.rand(300, 1100) > 0.5) if mask else None
    out = SF.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True, backend="cpu")
    want = A.scaled_dot_product_attention_reference(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((want * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_fp32_vector_softmax_matches_reference(causal):
    """fp32 goes through the kernel's 16-lane exp/max/sum sweeps: key blocks whose length is no multiple
    of 16 (the masked tail), logits whose differences reach the clamp ends (-104: subnormal and 0 results)
    and -inf, additive -inf/-100/-90 entries, against the fp64 reference."""
    torch.manual_seed(3)
    q, k, v = _inputs((2, 2, 150, 24), (2, 2, 150 if causal else 301, 24), dtype=torch.float32)
    with torch.no_grad():
        q.mul_(torch.linspace(0.1, 6.0, 150).view(1, 1, -1, 1))  # rows from flat to very peaked
    m = None
    if not causal:
        m = torch.zeros(150, 301)
        m[:, 5::7] = float("-inf")
        m[:, 3::11] = -100.0
        m[:, 2::13] = -90.0
    out = SF.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, backend="cpu")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = A.scaled_dot_product_attention_reference(qd, kd, vd, attn_mask=None if m is None else m.double(),
                                                    is_causal=causal)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref = torch.autograd.grad((want * g.double()).sum(), (qd, kd, vd))
    for name, a, b in zip("qkv", got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4, msg=lambda s: f"d{name}: {s}")


@pytest.mark.parametrize("shape", [(1, 1, 40, 16), (3, 2, 300, 16)])
def test_cpu_task_counter_same_bits_for_any_thread_count(shape):
    """Tasks go to threads from a shared counter (csrc/cpu/attention.cpp, dynamic_tasks): fewer tasks than
    threads and many more, both equal to the reference; with many tasks the bits do not depend on the number
    of threads. (A single task runs outside any parallel region, where MKL may thread the block products
    itself and sum in another order.)"""
    q, k, v = _inputs(shape, shape, dtype=torch.float32)
    g = torch.randn(shape)
    runs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = SF.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
            runs.append((out, *torch.autograd.grad((out * g).sum(), (q, k, v))))
    finally:
        torch.set_num_threads(before)
    want = A.scaled_dot_product_attention_reference(q, k, v, is_causal=True)
    for run in runs:
        torch.testing.assert_close(run[0], want)
    if shape[0] * shape[1] > 1:
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b)


@pytest.mark.triton
@pytest.mark.parametrize("causal,mask_kind", [(True, None), (False, "float_B1LS")])
def test_triton_one_dimensional_grids_cover_every_block_and_head(monkeypatch, causal, mask_kind):
    """The Triton launches fold batch x heads into gridDim.x (gridDim.y would stop at 65535): each grid is
    1-D with one program per (sequence block, batch x head), the block index varying fastest. Several
    blocks along both sequences (not multiples of the 16-row tiles) and batch x heads not a multiple of
    anything, GQA: every output row and all three gradients match torch (a program decoding its indices
    wrongly would leave rows of torch.empty)."""
    require("triton")
    from seqkern.kernels import attention as KA

    grids = []
    run = KA._run

    def spy(kernel, kind, grid_fn, *rest):
        grids.append((kernel.fn.__name__, grid_fn(16, 16)))
        return run(kernel, kind, grid_fn, *rest)

    monkeypatch.setattr(KA, "_run", spy)
    B_, Hq, Hk, L, S = 3, 5, 1, 37, 41
    _compare("triton", torch.float32, (B_, Hq, L, 8), (B_, Hk, S, 8), True, mask_kind, causal, None)
    blocks = {"_fwd_kernel": -(-L // 16) * B_ * Hq, "_bwd_dq_kernel": -(-L // 16) * B_ * Hq,
              "_bwd_dkdv_kernel": -(-S // 16) * B_ * Hk}
    assert sorted(grids) == sorted((name, (n,)) for name, n in blocks.items())
