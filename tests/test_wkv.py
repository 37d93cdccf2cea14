"""WKV (RWKV-4): every backend vs a direct O(T^2) evaluation of the defining sum and vs
the reference, state passing (chunked == whole), gradients incl. the state's,
extreme inputs, opcheck, errors."""
import pytest
import torch

import seqkern
from seqkern import functional as SF
from seqkern.ops.wkv import EMPTY_PP, wkv4_initial_state, wkv4_reference

from helpers import TOL, assert_unchanged, backend_param, require

BACKENDS = [backend_param(b) for b in ("reference", "cpu", "triton")]
LONG = [backend_param(b) for b in ("reference", "cpu")]  # the Triton interpreter is too slow for long loops
F64 = torch.float64


def direct(time_decay, time_first, k, v, state=None):
    """The defining sums evaluated term by term in fp64 (moderate inputs only): y and (S_T, Z_T)."""
    td, u, k, v = (t.double() for t in (time_decay, time_first, k, v))
    w = td.exp()
    Bn, T, C = k.shape
    if state is None:
        S0 = Z0 = torch.zeros(Bn, C, dtype=F64)
    else:
        st = state.double()
        S0, Z0 = st[:, 0] * st[:, 2].exp(), st[:, 1] * st[:, 2].exp()
    ys = []
    for t in range(T + 1):
        i = torch.arange(t, dtype=F64)
        e = torch.exp(-(t - 1 - i)[None, :, None] * w + k[:, :t])
        num = (e * v[:, :t]).sum(1) + torch.exp(-t * w) * S0
        den = e.sum(1) + torch.exp(-t * w) * Z0
        if t == T:
            return (torch.stack(ys, 1) if T else k.new_empty(Bn, 0, C)), (num, den)
        cur = torch.exp(u + k[:, t])
        ys.append((num + cur * v[:, t]) / (den + cur))


def make(Bn, T, C, dtype=F64, grad=False, state=False, scale=1.0):
    td = (torch.randn(C, dtype=dtype) * 0.5 - 1).requires_grad_(grad)
    tf = (torch.randn(C, dtype=dtype) * 0.5).requires_grad_(grad)
    k = (torch.randn(Bn, T, C, dtype=dtype) * scale).requires_grad_(grad)
    v = torch.randn(Bn, T, C, dtype=dtype).requires_grad_(grad)
    st = None
    if state:
        acc = torch.float64 if dtype == F64 else torch.float32
        st = torch.stack((torch.randn(Bn, C), torch.rand(Bn, C) + 1.0, torch.randn(Bn, C)), 1).to(acc)
        st.requires_grad_(grad)
    return td, tf, k, v, st


def split_state(st):
    """(S, Z) of a running-max state, fp64."""
    st = st.double()
    return st[:, 0] * st[:, 2].exp(), st[:, 1] * st[:, 2].exp()


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", [(2, 7, 5), (1, 1, 3), (3, 16, 4)])
def test_reference_matches_direct_sum(shape, with_state):
    td, tf, k, v, st = make(*shape, state=with_state)
    y, s = wkv4_reference(td, tf, k, v, st)
    y_d, (S, Z) = direct(td, tf, k, v, st)
    torch.testing.assert_close(y, y_d, **TOL[F64])
    S_got, Z_got = split_state(s)
    torch.testing.assert_close(S_got, S, **TOL[F64])
    torch.testing.assert_close(Z_got, Z, **TOL[F64])


def test_empty_state_is_none_and_zero_length_sequence():
    td, tf, k, v, _ = make(2, 5, 3)
    init = wkv4_initial_state(2, 3, dtype=F64)
    assert torch.equal(init[:, 2], torch.full((2, 3), EMPTY_PP, dtype=F64)) and not init[:, :2].any()
    for backend in ("reference", "cpu"):
        y0, s0 = SF.wkv4(td, tf, k, v, backend=backend)
        y1, s1 = SF.wkv4(td, tf, k, v, init, backend=backend)
        assert torch.equal(y0, y1) and torch.equal(s0, s1)
        ye, se = SF.wkv4(td, tf, k[:, :0], v[:, :0], s0, backend=backend)
        assert ye.shape == (2, 0, 3) and torch.equal(se, s0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 9, 5), (1, 1, 1), (3, 4, 37)])
@pytest.mark.parametrize("with_state", [False, True])
def test_backend_matches_reference_with_grads(backend, dtype, shape, with_state):
    ins = make(*shape, dtype=dtype, grad=True, state=with_state)
    before = [t.detach().clone() if t is not None else None for t in ins]
    y, s = SF.wkv4(*ins, backend=backend)
    assert seqkern.last_backend("wkv4") == backend
    assert y.dtype == dtype and s.dtype == dtype and s.shape == (shape[0], 3, shape[2])
    y_r, s_r = wkv4_reference(*ins)
    torch.testing.assert_close(y, y_r, **TOL[dtype])
    torch.testing.assert_close(s, s_r, **TOL[dtype])
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    leaves = [t for t in ins if t is not None]
    got = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), leaves)
    want = torch.autograd.grad((y_r * gy).sum() + (s_r * gs).sum(), leaves)
    for name, a, b in zip(("time_decay", "time_first", "k", "v", "state"), got, want):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad of {name}: {m}")
    assert_unchanged(before, [t.detach() if t is not None else None for t in ins])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_calls_equal_one_call(backend):
    td, tf, k, v, st = make(2, 13, 6, grad=True, state=True)
    y, s = SF.wkv4(td, tf, k, v, st, backend=backend)
    ys, sc = [], st
    for a, b in ((0, 4), (4, 5), (5, 13)):
        yc, sc = SF.wkv4(td, tf, k[:, a:b], v[:, a:b], sc, backend=backend)
        ys.append(yc)
    yc = torch.cat(ys, 1)
    torch.testing.assert_close(yc, y, **TOL[F64])
    torch.testing.assert_close(sc, s, **TOL[F64])
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    leaves = (td, tf, k, v, st)
    g1 = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), leaves)
    g2 = torch.autograd.grad((yc * gy).sum() + (sc * gs).sum(), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL[F64])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64_including_state(backend):
    ins = make(2, 5, 3, grad=True, state=True)
    assert torch.autograd.gradcheck(lambda *a: SF.wkv4(*a, backend=backend), ins)
    ins = make(1, 4, 2, grad=True)
    assert torch.autograd.gradcheck(lambda *a: SF.wkv4(*a, backend=backend), ins[:4])


def test_gradcheck_custom_op_reference_backend():
    # the registered op's own autograd (used by torch.compile) for the reference backend
    ins = make(2, 4, 3, grad=True, state=True)
    op = torch.ops.seqkern.wkv4.default
    assert torch.autograd.gradcheck(lambda *a: op(*a, "reference"), ins)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_registered_ops(backend):
    td, tf, k, v, st = make(2, 5, 4, dtype=torch.float32, state=True)
    torch.library.opcheck(torch.ops.seqkern.wkv4.default, (td, tf, k, v, st, backend))
    gy, gs = torch.randn_like(k), torch.randn_like(st)
    torch.library.opcheck(torch.ops.seqkern.wkv4_backward.default, (td, tf, k, v, st, gy, gs, backend))


@pytest.mark.parametrize("backend", LONG)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_no_overflow_huge_k_long_sequence(backend, dtype):
    # y is invariant to adding a constant to every k (with the empty state): with k ~ 1e4
    # any direct evaluation overflows, the running-max form must not.
    T = 1500
    td, tf, k, v, _ = make(2, T, 3, dtype=dtype)
    y0, s0 = SF.wkv4(td, tf, k, v, backend=backend)
    for shift in (1e4, -1e4):
        y, s = SF.wkv4(td, tf, k + shift, v, backend=backend)
        assert torch.isfinite(y).all() and torch.isfinite(s).all()
        # fp32 cannot hold 1e4 + k to better than ~1e-3 (the ulp at 1e4): that much is lost by any fp32 kernel
        tol = dict(rtol=0, atol=2e-2) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(y, y0, **tol)
        torch.testing.assert_close(s[:, 2], s0[:, 2] + shift, rtol=1e-6, atol=1e-2)
    # and with k itself ~ +-1e4 per token: y stays a convex combination of the v seen so far
    kb = torch.randn(2, T, 3, dtype=dtype) * 1e4
    y, s = SF.wkv4(td, tf, kb, v, backend=backend)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    lo, hi = v.cummin(1).values, v.cummax(1).values
    slack = 1e-5 if dtype == torch.float32 else 1e-12
    assert (y >= lo - slack).all() and (y <= hi + slack).all()


@pytest.mark.parametrize("bad,match", [
    (lambda td, tf, k, v, s: (td, tf, k[0], v[0], None), "k"),
    (lambda td, tf, k, v, s: (td, tf, k, v[:, :3], None), "v"),
    (lambda td, tf, k, v, s: (td[:2], tf, k, v, None), "time_decay"),
    (lambda td, tf, k, v, s: (td, tf[None], k, v, None), "time_first"),
    (lambda td, tf, k, v, s: (td, tf, k, v, s[:, :2]), "state"),
    (lambda td, tf, k, v, s: (td, tf, k, v, s[:1]), "state"),
    (lambda td, tf, k, v, s: (td, tf, k, v.double(), None), "v"),
    (lambda td, tf, k, v, s: (td.double(), tf, k, v, None), "time_decay"),
    (lambda td, tf, k, v, s: (td, tf, k, v, s.double()), "state"),
    (lambda td, tf, k, v, s: (td, tf, k.long(), v, None), "k"),
    (lambda td, tf, k, v, s: (td, tf, k, v, s.tolist()), "state"),
    (lambda td, tf, k, v, s: (td, tf, k, v.to("meta"), None), "v"),
])
def test_bad_input_names_the_argument(bad, match):
    td, tf, k, v, s = make(2, 5, 4, dtype=torch.float32, state=True)
    with pytest.raises((ValueError, TypeError), match=match):
        SF.wkv4(*bad(td, tf, k, v, s))


@pytest.mark.parametrize("backend", LONG[1:])
def test_fp32_long_sequence_accuracy_against_fp64(backend):
    td, tf, k, v, _ = make(2, 3000, 5, dtype=F64)
    td = td - 2  # slow decay: the whole history matters
    y64, s64 = wkv4_reference(td, tf, k, v)
    y, s = SF.wkv4(td.float(), tf.float(), k.float(), v.float(), backend=backend)
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s[:, 2].double(), s64[:, 2], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("backend", LONG[1:])
def test_long_sequence_gradients_match_reference(backend, dtype):
    # more than one checkpoint chunk in the fused backward, full SIMD blocks (64 fp32 / 32 fp64 lanes) and a tail
    ins = make(2, 150, 70, dtype=dtype, grad=True, state=True)
    y, s = SF.wkv4(*ins, backend=backend)
    y_r, s_r = wkv4_reference(*ins)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    got = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), ins)
    want = torch.autograd.grad((y_r * gy).sum() + (s_r * gs).sum(), ins)
    # fp32: sums over 150 steps and the batch, against the reference's own fp32 rounding
    tol = TOL[F64] if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_cpu_backward_refuses_double_backward_and_reference_allows_it():
    ins = make(1, 3, 2, grad=True)
    y, _ = SF.wkv4(*ins[:4], backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), ins[2], create_graph=True)
    assert torch.autograd.gradgradcheck(lambda *a: SF.wkv4(*a, backend="reference")[0], ins[:4])


def test_backend_unavailable_and_automatic_choice():
    td, tf, k, v, _ = make(1, 3, 2, dtype=torch.float16)
    with pytest.raises(seqkern.BackendUnavailable, match="cpu"):
        SF.wkv4(td, tf, k, v, backend="cpu")
    y, s = SF.wkv4(td, tf, k, v)
    assert seqkern.last_backend("wkv4") == "reference" and y.dtype == torch.float16 and s.dtype == torch.float32
    SF.wkv4(*make(1, 3, 2)[:4])
    assert seqkern.last_backend("wkv4") == "cpu"


def test_compile_fullgraph_cpu_forward_and_backward():
    ins = make(2, 6, 5, dtype=torch.float32, grad=True, state=True)
    f = torch.compile(lambda *a: SF.wkv4(*a, backend="cpu"), fullgraph=True)
    y, s = f(*ins)
    y_r, s_r = wkv4_reference(*ins)
    torch.testing.assert_close(y, y_r)
    got = torch.autograd.grad(y.sum() + s.sum(), ins)
    want = torch.autograd.grad(y_r.sum() + s_r.sum(), ins)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, F64])
def test_gpu_backends_match_reference(backend, dtype):
    td, tf, k, v, st = (t.cuda() if t is not None else None for t in make(3, 70, 130, dtype=F64, state=True))
    ins = [t.to(dtype).requires_grad_() for t in (td, tf, k, v)] + [st.to(torch.float64 if dtype == F64 else torch.float32).requires_grad_()]
    y, s = SF.wkv4(*ins, backend=backend)
    assert seqkern.last_backend("wkv4") == backend and y.dtype == dtype
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    y_r, s_r = wkv4_reference(*ref_ins)
    tol = TOL[dtype] if dtype in (F64, torch.float32) else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), y_r, **tol)
    torch.testing.assert_close(s.double(), s_r, **tol)
    gy, gs = torch.randn_like(y_r), torch.randn_like(s_r)
    got = torch.autograd.grad((y.double() * gy).sum() + (s.double() * gs).sum(), ins)
    want = torch.autograd.grad((y_r * gy).sum() + (s_r * gs).sum(), ref_ins)
    for name, a, b in zip(("time_decay", "time_first", "k", "v", "state"), got, want):
        scale = b.abs().max().clamp_min(1)  # time_decay/time_first grads are sums over B*T terms
        torch.testing.assert_close(a.double() / scale, b / scale, **tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_chunked_long_sequence_and_huge_k(backend):
    td, tf, k, v, _ = (t.cuda() if t is not None else None for t in make(2, 4000, 64, dtype=torch.float32))
    y, s = SF.wkv4(td, tf, k * 1e4, v, backend=backend)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y1, s1 = SF.wkv4(td, tf, k[:, :1500], v[:, :1500], backend=backend)
    y2, s2 = SF.wkv4(td, tf, k[:, 1500:], v[:, 1500:], s1, backend=backend)
    y0, s0 = SF.wkv4(td, tf, k, v, backend=backend)
    torch.testing.assert_close(torch.cat((y1, y2), 1), y0)
    torch.testing.assert_close(s2, s0)
    y64, _ = wkv4_reference(td.double(), tf.double(), k.double(), v.double())
    torch.testing.assert_close(y0.double(), y64, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_gpu_compile_fullgraph_cuda():
    ins = [t.cuda().requires_grad_() for t in make(2, 6, 5, dtype=torch.float32)[:4]]
    f = torch.compile(lambda *a: SF.wkv4(*a, backend="cuda"), fullgraph=True)
    y, s = f(*ins)
    y_r, _ = wkv4_reference(*ins)
    torch.testing.assert_close(y, y_r)


def test_cpu_fp32_simd_blocks_match_reference():
    # C = 64 + 6: one full 64-lane fp32 block (the vectorised path) and a scalar tail
    ins = make(2, 80, 70, dtype=torch.float32, grad=True, state=True)
    y, s = SF.wkv4(*ins, backend="cpu")
    y_r, s_r = wkv4_reference(*ins)
    torch.testing.assert_close(y, y_r, **TOL[torch.float32])
    torch.testing.assert_close(s, s_r, **TOL[torch.float32])
    got = torch.autograd.grad(y.sum() + s[:, :2].sum(), ins)
    want = torch.autograd.grad(y_r.sum() + s_r[:, :2].sum(), ins)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("poke", ["nan-k", "inf-v", "-inf-k", "inf-k", "k-100", "k+100", "nan-state"])
def test_cpu_simd_nonfinite_and_extreme(poke, dtype):
    # the SIMD blocks (fp32: C = 64 + 6, one AVX-512 block and a scalar tail): NaN/inf land where
    # the reference's do, exponents past the float range (|k| ~ 100) give 0 or the max, not inf/NaN
    td, tf, k, v, st = make(2, 40, 70, dtype=dtype, state=True)
    k, v, st = k.clone(), v.clone(), st.clone()
    for c in (3, 66):  # one channel in the block, one in the tail
        if poke == "nan-k":
            k[0, 5, c] = float("nan")
        elif poke == "inf-v":
            v[1, 7, c] = float("inf")
        elif poke == "-inf-k":
            k[0, 9, c] = float("-inf")
        elif poke == "inf-k":
            k[1, 2, c] = float("inf")
        elif poke == "k-100":
            k[:, :, c] -= 100
        elif poke == "k+100":
            k[:, 10:, c] += 100
        else:
            st[0, 2, c] = float("nan")
    ins = [t.requires_grad_() for t in (td, tf, k, v, st)]
    y, s = SF.wkv4(*ins, backend="cpu")
    y_r, s_r = wkv4_reference(*ins)
    torch.testing.assert_close(y, y_r, **TOL[dtype], equal_nan=True)
    torch.testing.assert_close(s, s_r, **TOL[dtype], equal_nan=True)
    # gradients (through y and the state's aa, bb): non-finite where the reference's are, the
    # finite entries close
    gy = torch.randn_like(y)
    got = torch.autograd.grad((y * gy).sum() + s[:, :2].sum(), ins)
    want = torch.autograd.grad((y_r * gy).sum() + s_r[:, :2].sum(), ins)
    for name, a, b in zip(("time_decay", "time_first", "k", "v", "state"), got, want):
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), f"grad of {name}: finite where the reference's is not, or back"
        torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-4, msg=lambda m: f"grad of {name}: {m}")


def test_cpu_fp32_simd_chunked_equals_whole_bitwise():
    td, tf, k, v, st = make(2, 50, 70, dtype=torch.float32, state=True)
    y, s = SF.wkv4(td, tf, k, v, st, backend="cpu")
    ys, sc = [], st
    for a, b in ((0, 17), (17, 18), (18, 50)):
        yc, sc = SF.wkv4(td, tf, k[:, a:b], v[:, a:b], sc, backend="cpu")
        ys.append(yc)
    assert torch.equal(torch.cat(ys, 1), y) and torch.equal(sc, s)


def test_cpu_fp32_large_output_streamed_equals_chunks_and_reference():
    # y of 8 MiB and more is written with non-temporal stores (csrc/cpu/wkv.cpp, kStreamBytes);
    # chunks of a quarter stay under that size: the two store paths must give the same bits.
    # C = 1024 + 6 keeps a scalar tail next to the streamed 64-lane blocks.
    td, tf, k, v, st = make(2, 1024, 1030, dtype=torch.float32, state=True)
    assert 2 * 1024 * 1030 * 4 >= 8 << 20
    y, s = SF.wkv4(td, tf, k, v, st, backend="cpu")
    ys, sc = [], st
    for a in range(0, 1024, 256):
        yc, sc = SF.wkv4(td, tf, k[:, a:a + 256], v[:, a:a + 256], sc, backend="cpu")
        ys.append(yc)
    assert torch.equal(torch.cat(ys, 1), y) and torch.equal(sc, s)
    y_r, s_r = wkv4_reference(td, tf, k[:, :64], v[:, :64], st)
    torch.testing.assert_close(y[:, :64], y_r, **TOL[torch.float32])


def test_torch_func_and_forward_ad_take_the_reference():
    """torch.func and forward-mode AD cannot see through the fused backends' autograd: automatic
    selection serves them with the reference (same values as plain autograd); an explicit fused
    backend says why it cannot."""
    import torch.autograd.forward_ad as fwad
    td, u, k, v, _ = make(2, 5, 3)

    def loss(k_):
        return SF.wkv4(td, u, k_, v)[0].pow(2).sum()

    kk = k.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(kk), [kk])
    torch.testing.assert_close(torch.func.grad(loss)(k), want)
    one = lambda kb, vb: SF.wkv4(td, u, kb[None], vb[None])[0].pow(2).sum()
    per_sample = torch.func.vmap(torch.func.grad(one))(k, v)
    torch.testing.assert_close(per_sample, want)  # batch rows are independent
    with pytest.raises(seqkern.BackendUnavailable, match="torch.func"):
        torch.func.grad(lambda k_: SF.wkv4(td, u, k_, v, backend="cpu")[0].sum())(k)

    tangent = torch.randn_like(k)
    with fwad.dual_level():
        y, _ = SF.wkv4(td, u, fwad.make_dual(k, tangent), v)
        jvp = fwad.unpack_dual(y).tangent
    want_jvp = torch.autograd.functional.jvp(lambda k_: wkv4_reference(td, u, k_, v)[0], k, tangent)[1]
    torch.testing.assert_close(jvp, want_jvp)


@pytest.mark.triton
def test_triton_grid_covers_every_batch_row_and_channel_block(monkeypatch):
    """The Triton grid is 1-D (batch row x channel block, the block fastest; a 2-D grid's y caps at
    65535): with 16-channel blocks forced, C = 37 is three blocks (the last partial) on each of 3 rows;
    values, the state and every gradient match the reference."""
    require("triton")
    from seqkern.kernels import wkv as K

    monkeypatch.setattr(K, "_launch_cfg", lambda C: (16, 1))
    ins = make(3, 4, 37, dtype=torch.float32, grad=True, state=True)
    y, s = SF.wkv4(*ins, backend="triton")
    y_r, s_r = wkv4_reference(*ins)
    torch.testing.assert_close(y, y_r, **TOL[torch.float32])
    torch.testing.assert_close(s, s_r, **TOL[torch.float32])
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    got = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), ins)
    want = torch.autograd.grad((y_r * gy).sum() + (s_r * gs).sum(), ins)
    for name, a, b in zip(("time_decay", "time_first", "k", "v", "state"), got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"grad of {name}: {m}")


def test_triton_supports_counts_the_programs_of_its_grid():
    """B * ceil(C / 64) programs on a 1-D grid: B past 65535 is served; past 2^31-1 programs supports()
    declines with why (shapes only: fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sup = seqkern.backends._SUPPORTS["wkv4"]["triton"]
    with FakeTensorMode():
        for Bn, C, ok in ((65536, 64, True), (2**31 - 1, 64, True), (2**31 - 1, 65, False), (2**24, 127 * 64, True),
                          (2**24, 127 * 64 + 1, False)):
            k = torch.empty(Bn, 1, C)
            got = sup(torch.empty(C), torch.empty(C), k, k)
            assert got[0] is ok, (Bn, C, got)
            if not ok:
                assert "grid limit of 2^31-1" in got[1]
