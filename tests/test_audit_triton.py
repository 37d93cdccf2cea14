"""The triton backend of every op under the interpreter, against the reference (fp64 parity, every
gradient, inputs unchanged): cases from an audit against DESIGN.md that the family tests did not
have. Small shapes: the interpreter's cost grows with programs x loop steps."""
import pytest
import torch

import seqkern
from seqkern import functional as SF
from seqkern.ops.rotary import rotary_cos_sin

from helpers import TOL, require

pytestmark = pytest.mark.triton
F64 = torch.float64
_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@pytest.fixture(autouse=True)
def _triton():
    require("triton")


def _close(got, want, dtype):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None, i
            continue
        assert not a.isnan().any(), f"result {i} holds NaN"
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype], msg=lambda m: f"result {i}: {m}")


# ---------------------------------------------------------------------------
# recurrent ops
# ---------------------------------------------------------------------------

def _rnn_inputs(kind, T, Bsz, I, H, P=0, bias=True, dtype=F64, gen=0):
    g = torch.Generator().manual_seed(gen)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=F64) * sc).to(dtype)  # noqa: E731
    G, Hp, ws = _GATES[kind], P or H, 1.5 / H ** 0.5
    return [r(T, Bsz, I), r(Bsz, Hp, sc=0.5), r(Bsz, H, sc=0.5) if kind == "lstm" else None, r(G * H, I, sc=ws),
            r(G * H, Hp, sc=ws), r(G * H, sc=0.1) if bias else None, r(G * H, sc=0.1) if bias else None,
            r(P, H, sc=ws) if P else None]


def _rnn_run(kind, ts, backend, **kw):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = ts
    if kind == "lstm":
        y, (h, c) = SF.lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr, backend=backend, **kw)
        return [y, h, c]
    if kind == "gru":
        return list(SF.gru(x, h0, w_ih, w_hh, b_ih, b_hh, backend=backend, **kw))
    return list(SF.rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity=kind[4:], backend=backend, **kw))


def _rnn_grads(kind, ts, backend, dtype, **kw):
    """Outputs and the gradient of every given tensor, the inputs cast to dtype."""
    ins = [None if t is None else t.detach().to(dtype).requires_grad_() for t in ts]
    before = [None if t is None else t.detach().clone() for t in ins]
    out = _rnn_run(kind, ins, backend, **kw)
    g = torch.Generator().manual_seed(9)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in out)
    leaves = [t for t in ins if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    for t, b in zip(ins, before):
        assert t is None or torch.equal(t.detach(), b), "an input was modified"
    return out + list(grads)


RNN_CASES = [  # kind, T, B, I, H, P, bias, lengths, reverse
    ("lstm", 4, 3, 5, 7, 3, True, [2, 0, 4], True),    # projection, unsorted lengths with a zero
    ("lstm", 4, 3, 5, 7, 0, False, [0, 4, 1], False),  # no biases
    ("gru", 4, 3, 5, 7, 0, False, [2, 0, 4], True),
    ("rnn_relu", 4, 3, 5, 7, 0, True, [0, 4, 1], True),
    ("gru", 1, 1, 3, 5, 0, True, None, False),         # T = 1, B = 1
    ("lstm", 3, 17, 3, 5, 0, True, [i % 4 for i in range(17)], True),  # B past one 16-row block
]


@pytest.mark.parametrize("case", RNN_CASES, ids=lambda c: f"{c[0]}-P{c[5]}-b{int(c[6])}-r{int(c[8])}-B{c[2]}")
def test_rnn_every_output_and_gradient(case):
    kind, T, Bsz, I, H, P, bias, lengths, reverse = case
    ts = _rnn_inputs(kind, T, Bsz, I, H, P, bias)
    kw = dict(lengths=None if lengths is None else torch.tensor(lengths), reverse=reverse)
    _close(_rnn_grads(kind, ts, "triton", F64, **kw), _rnn_grads(kind, ts, "reference", F64, **kw), F64)


@pytest.mark.parametrize("kind,H", [("lstm", 256), ("gru", 257)])  # either side of the persistent kernel's limit
def test_rnn_hidden_size_at_the_persistent_limit_fp32(kind, H):
    ts = _rnn_inputs(kind, 2, 2, 3, H)
    kw = dict(lengths=torch.tensor([1, 2]), reverse=True)
    got = _rnn_grads(kind, ts, "triton", torch.float32, **kw)
    _close(got, _rnn_grads(kind, ts, "reference", F64, **kw), torch.float32)


def test_rnn_noncontiguous_inputs_and_fp16_with_lengths():
    x = torch.randn(2, 3, 4, dtype=F64).transpose(0, 1)  # (T=3, B=2, I=4) seen through strides
    w_hh = torch.randn(6, 18, dtype=F64).t() * 0.4
    ts = [x, torch.randn(2, 6, dtype=F64), None, torch.randn(18, 4, dtype=F64) * 0.4, w_hh, None,
          torch.randn(18, dtype=F64), None]
    _close(_rnn_grads("gru", ts, "triton", F64), _rnn_grads("gru", ts, "reference", F64), F64)
    kw = dict(lengths=torch.tensor([3, 1]), reverse=True)
    ts = _rnn_inputs("lstm", 3, 2, 4, 6, dtype=F64)
    _close(_rnn_grads("lstm", ts, "triton", torch.float16, **kw), _rnn_grads("lstm", ts, "reference", F64, **kw),
           torch.float16)


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn_tanh"])
@pytest.mark.parametrize("per_step", [False, True], ids=["persistent", "per_step"])
def test_rnn_nan_past_the_end_stays_out_of_the_recurrent_gradients(kind, per_step, monkeypatch):
    """NaN in the padding of a row past its length, and in the initial state of a row of length 0:
    the reference discards those steps (its docstring: no 0 * NaN into gradients), so the gradients of
    w_hh and the biases stay finite. The triton GRU's backward wrote dn * r for such steps (r from the
    NaN padding) into the gate gradient of W_hn's GEMM, and the recurrent weight gradient multiplied
    the kept state of a finished row by its zero gate gradients."""
    if per_step:
        from seqkern.kernels import rnn as K

        monkeypatch.setattr(K, "PERSISTENT_MAX_H", 0)
    ts = _rnn_inputs(kind, 4, 2, 3, 5)
    ts[0][3, 1] = float("nan")  # row 1 (length 2) padding
    ts[1][0] = float("nan")  # row 0 (length 0) initial state
    if ts[2] is not None:
        ts[2][0] = float("nan")
    names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]
    res = {}
    for be in ("triton", "reference"):
        ins = [None if t is None else t.clone().requires_grad_() for t in ts]
        out = _rnn_run(kind, ins, be, lengths=torch.tensor([0, 2]))
        loss = sum(o[:, 1].sum() if o.dim() == 3 else o[1].sum() for o in out)  # row 1 only
        leaves = [(n, t) for n, t in zip(names, ins) if t is not None]
        res[be] = dict(zip([n for n, _ in leaves], torch.autograd.grad(loss, [t for _, t in leaves])))
    for n in ("w_hh", "b_ih", "b_hh"):
        assert not res["reference"][n].isnan().any()
        torch.testing.assert_close(res["triton"][n], res["reference"][n], **TOL[F64], msg=n)


def test_rnn_cells_batched_and_unbatched():
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64) * 0.5  # noqa: E731
    x, h, c = r(3, 4), r(3, 5), r(3, 5)
    for fn, G in ((SF.lstm_cell, 4), (SF.gru_cell, 3), (SF.rnn_cell, 1)):
        w_ih, w_hh, b = r(G * 5, 4), r(G * 5, 5), r(G * 5)
        for unb in (False, True):
            res = {}
            for be in ("triton", "reference"):
                ins = [t.clone().requires_grad_() for t in ((x[0], h[0], c[0]) if unb else (x, h, c))]
                ws = [w_ih.clone().requires_grad_(), w_hh.clone().requires_grad_()]
                hx = (ins[1], ins[2]) if fn is SF.lstm_cell else ins[1]
                o = fn(ins[0], hx, *ws, None, b, backend=be)
                o = list(o) if isinstance(o, tuple) else [o]
                leaves = ins[:2] + ([ins[2]] if fn is SF.lstm_cell else []) + ws
                res[be] = o + list(torch.autograd.grad(sum((t * t).sum() for t in o), leaves))
            _close(res["triton"], res["reference"], F64)


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------

def _attn(backend, q, k, v, mask=None, dtype=F64, **kw):
    """Output and the gradients of q, k, v (and of a floating mask that requires grad)."""
    ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = mask
    if mask is not None and mask.requires_grad:
        m = mask.detach().clone().requires_grad_()
        ins.append(m)
    before = [t.detach().clone() for t in ins]
    torch.manual_seed(11)  # the dropout seed
    out = SF.scaled_dot_product_attention(*ins[:3], attn_mask=m, backend=backend, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=F64).to(out.dtype)
    grads = torch.autograd.grad(out, ins, g)
    for t, b in zip(ins, before):
        assert torch.equal(t.detach(), b), "an input was modified"
    return [out, *grads]


def _qkv(qs, ks, vs=None, gen=1):
    g = torch.Generator().manual_seed(gen)
    return [torch.randn(*s, generator=g, dtype=F64) for s in (qs, ks, vs or ks)]


@pytest.mark.parametrize("E,Ev", [(17, 17), (40, 40), (72, 72), (96, 96), (256, 256), (16, 24), (24, 8)])
def test_attention_head_dims(E, Ev):
    q, k, v = _qkv((1, 2, 5, E), (1, 2, 7, E), (1, 2, 7, Ev))
    _close(_attn("triton", q, k, v), _attn("reference", q, k, v), F64)


@pytest.mark.parametrize("L,S", [(1, 1), (1, 17), (17, 1), (17, 33), (33, 17), (129, 20)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_lengths_and_causal_with_lq_ne_lk(L, S, causal):
    q, k, v = _qkv((1, 1, L, 16), (1, 1, S, 16))
    _close(_attn("triton", q, k, v, is_causal=causal), _attn("reference", q, k, v, is_causal=causal), F64)


MASK_SHAPES = [(5, 7), (1, 7), (5, 1), (3, 5, 7), (1, 1, 7), (2, 1, 5, 7), (2, 3, 1, 7), (1, 3, 5, 1),
               (2, 3, 5, 7), (7,), (2, 1, 1, 1)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_attention_masks_of_every_broadcastable_shape(shape):
    q, k, v = _qkv((2, 3, 5, 16), (2, 3, 7, 16))
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(*shape, generator=g) > 0.3
    add = torch.randn(*shape, generator=g, dtype=F64).requires_grad_()
    for m in (keep, add):
        _close(_attn("triton", q, k, v, m), _attn("reference", q, k, v, m), F64)


def test_attention_gqa_mqa_scale_and_dropout_share_the_reference_mask():
    for kh, kw in ((2, dict(enable_gqa=True)), (1, dict(enable_gqa=True, is_causal=True, scale=0.3)),
                   (2, dict(enable_gqa=True, dropout_p=0.4)), (1, dict(enable_gqa=True, dropout_p=0.4, is_causal=True))):
        q, k, v = _qkv((2, 4, 9, 16), (2, kh, 7, 16))
        _close(_attn("triton", q, k, v, **kw), _attn("reference", q, k, v, **kw), F64)
    q, k, v = _qkv((2, 3, 5, 16), (2, 3, 7, 16))
    m = torch.randn(2, 1, 5, 7, dtype=F64)
    _close(_attn("triton", q, k, v, m, dropout_p=1.0), _attn("reference", q, k, v, m, dropout_p=1.0), F64)


@pytest.mark.parametrize("dtype", [F64, torch.float16])
def test_attention_dead_rows_zero_output_and_gradients(dtype):
    q, k, v = _qkv((1, 2, 5, 16), (1, 2, 7, 16))
    keep = torch.ones(5, 7, dtype=torch.bool)
    keep[1] = keep[3] = False
    out, dq, dk, dv = _attn("triton", q, k, v, keep, dtype=dtype)
    assert not any(t.isnan().any() for t in (out, dq, dk, dv))
    assert out[:, :, [1, 3]].abs().max() == 0 and dq[:, :, [1, 3]].abs().max() == 0
    add = torch.zeros(5, 7, dtype=F64)
    add[2] = float("-inf")
    add.requires_grad_()
    _close(_attn("triton", q, k, v, add), _attn("reference", q, k, v, add), F64)


def test_attention_fp16_error_at_most_twice_the_references():
    q, k, v = _qkv((2, 2, 17, 40), (2, 2, 19, 40))
    q = q * 3  # sharper softmax
    want = _attn("reference", q, k, v, dtype=torch.float32)
    ref16 = _attn("reference", q, k, v, dtype=torch.float16)
    got = _attn("triton", q, k, v, dtype=torch.float16)
    for name, a, r, w in zip(("out", "dq", "dk", "dv"), got, ref16, want):
        err, ref_err = (a.float() - w).abs().max(), (r.float() - w).abs().max()
        assert err <= 2 * ref_err + 1e-6, f"{name}: {err} against the reference's own fp16 error {ref_err}"


def test_attention_fused_rotary_gqa_partial_and_tables_requiring_grad():
    cos, sin = rotary_cos_sin(9, 24, dtype=torch.float32)
    q, k, v = _qkv((2, 4, 9, 40), (2, 2, 9, 40), (2, 2, 9, 24))
    kw = dict(rotary=(cos, sin), enable_gqa=True, is_causal=True)
    _close(_attn("triton", q, k, v, **kw), _attn("reference", q, k, v, **kw), F64)
    res = {}
    for be in ("triton", "reference"):
        c, s = cos.double().requires_grad_(), sin.double().requires_grad_()
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = SF.scaled_dot_product_attention(*ins, rotary=(c, s), enable_gqa=True, backend=be)
        res[be] = [out, *torch.autograd.grad(out.sum(), ins + [c, s])]
    _close(res["triton"], res["reference"], F64)


# ---------------------------------------------------------------------------
# rotary, WKV, errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("R", [16, 6])
def test_apply_rotary_noncontiguous_and_partial(interleaved, R):
    cos, sin = rotary_cos_sin(9, R, dtype=F64)
    q = torch.randn(2, 9, 3, 16, dtype=F64).transpose(1, 2)
    k = torch.randn(2, 1, 9, 16, dtype=F64)
    res = {}
    for be in ("triton", "reference"):
        ins = [q.clone().requires_grad_(), k.clone().requires_grad_()]
        out = SF.apply_rotary(*ins, cos, sin, interleaved=interleaved, backend=be)
        res[be] = [*out, *torch.autograd.grad(out, ins, [torch.ones_like(out[0]), 2 * torch.ones_like(out[1])])]
    _close(res["triton"], res["reference"], F64)


@pytest.mark.parametrize("B,T,C,kscale,state", [(2, 5, 7, 1.0, True), (1, 1, 3, 1.0, True), (2, 1, 5, 1.0, False),
                                                 (2, 5, 7, 300.0, True), (2, 5, 70, 1e4, False)])
def test_wkv4_state_large_k_and_every_gradient(B, T, C, kscale, state):
    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    ins = [r(C), r(C), r(B, T, C) * kscale, r(B, T, C)]
    if state:
        ins.append(torch.stack([r(B, C), torch.rand(B, C, generator=g, dtype=F64) + 0.5, r(B, C)], 1))
    gy, gs = r(B, T, C), r(B, 3, C)
    res = {}
    for be in ("triton", "reference"):
        ts = [t.clone().requires_grad_() for t in ins]
        y, so = SF.wkv4(*ts[:4], ts[4] if state else None, backend=be)
        res[be] = [y, so, *torch.autograd.grad([y, so], ts, [gy, gs])]
    _close(res["triton"], res["reference"], F64)


def test_bf16_and_oversized_heads_are_refused_by_name():
    bf = torch.bfloat16
    q = torch.randn(1, 1, 4, 16, dtype=bf)
    calls = [("scaled_dot_product_attention", lambda: SF.scaled_dot_product_attention(q, q, q, backend="triton")),
             ("rnn", lambda: SF.rnn(torch.randn(2, 1, 3, dtype=bf), None, torch.randn(1, 3, dtype=bf),
                                    torch.randn(1, 1, dtype=bf), backend="triton")),
             ("wkv4", lambda: SF.wkv4(torch.randn(3, dtype=bf), torch.randn(3, dtype=bf), torch.randn(1, 2, 3, dtype=bf),
                                      torch.randn(1, 2, 3, dtype=bf), backend="triton"))]
    for op, fn in calls:
        with pytest.raises(seqkern.BackendUnavailable, match=f"triton.*{op}.*bf16"):
            fn()
    big = torch.randn(1, 1, 4, 512)
    with pytest.raises(seqkern.BackendUnavailable, match="triton.*head dim 512 over the limit 256"):
        SF.scaled_dot_product_attention(big, big, big, backend="triton")
