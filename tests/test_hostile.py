"""Hostile inputs, table-driven, per op: wrong ranks, mismatched sizes, mixed
devices (the meta device stands in for a second one) and dtypes, integer tensors,
NaN and +-inf, huge magnitudes, zero-length sequences, lengths one past a block
size. Every backend that runs here either gives the reference's result (NaN where
the reference has NaN; gradients equal where the reference's are finite and
non-finite where they are not) or raises an error that names the argument; none
crashes, hangs or modifies an input. Huge magnitudes in fp32 ("reference-fp64") are
held to the fp64 reference, within twice the fp32 reference's own error.

Known bugs that the owner has not fixed yet are in KNOWN: strict xfails, so the fix
turns them into failures until the entry is removed."""
import re

import pytest
import torch

from seqkern import functional as SF

from reliability import Arg, assert_parity, assert_parity_vs_fp64, backends_for, require_family

ERRORS = (ValueError, TypeError, RuntimeError)


pytestmark = pytest.mark.usefixtures("watchdog")  # a kernel looping forever on NaN/inf must not hang CI


def names(arg):
    """Regex matching the argument's name as a word (so 'k' does not match 'backend')."""
    return rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])"


def run_case(family, op, build, expect, backend):
    require_family(family)
    call, args, dtype, *which = build()  # a builder may name the op it calls (gru in the rnn table)
    op = which[0] if which else op
    if expect == "reference":
        assert_parity(call, args, backend, dtype, op=op, loose_nonfinite_grads=True)
    elif expect == "reference-fp64":
        assert_parity_vs_fp64(call, args, backend, op=op)
    else:
        with pytest.raises(ERRORS, match=names(expect)):
            call({n: a.present() if isinstance(a, Arg) else a for n, a in args.items()}, backend)


# (op, case, backend) -> why it fails today
KNOWN: dict = {
    # open bugs found by this table (strict xfail: the mark must go when the fix lands)
    # fixed in csrc/cpu/wkv.cpp after this suite found it: ("wkv4", "nan-k", "cpu") -- a NaN k left the
    # state's max-exponent pp NaN for one step only where the reference keeps it NaN
}


def cases(table):
    """pytest params: one per (case, backend) for every backend that implements the op."""
    out = []
    for family, op, rows in table:
        for case_id, build, expect in rows:
            for be in backends_for(op):
                marks = [pytest.mark.triton] if be == "triton" else []
                if (op, case_id, be) in KNOWN:
                    marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[op, case_id, be]))
                out.append(pytest.param(family, op, build, expect, be, id=f"{op}-{case_id}-{be}", marks=marks))
    return out


def poke(x, value, idx=0):
    """x with one element set to value (a new tensor)."""
    x = x.clone()
    x.view(-1)[idx] = value
    return x


# ---------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------

def _rotary(q=None, k=None, T=5, D=8, R=8, dtype=torch.float32, grad=True, cos=None, sin=None):
    q = torch.randn(2, 3, T, D, dtype=dtype) if q is None else q
    k = torch.randn(2, 1, T, D, dtype=dtype) if k is None else k
    ang = torch.rand(T, R // 2, dtype=torch.float64) * 6
    cos = ang.cos().to(dtype) if cos is None else cos
    sin = ang.sin().to(dtype) if sin is None else sin
    args = dict(q=Arg(q, grad=grad and q.is_floating_point()), k=Arg(k, grad=grad and k.is_floating_point()),
                cos=Arg(cos), sin=Arg(sin))
    return (lambda a, be: SF.apply_rotary(a["q"], a["k"], a["cos"], a["sin"], backend=be)), args, dtype


ROTARY = [
    ("rank-q", lambda: _rotary(q=torch.randn(8)), "q"),
    ("rank-cos", lambda: _rotary(cos=torch.randn(5, 4, 1)), "cos"),
    ("size-k", lambda: _rotary(k=torch.randn(2, 1, 5, 6)), "k"),
    ("size-sin", lambda: _rotary(sin=torch.randn(5, 3)), "sin"),
    ("size-cos-T", lambda: _rotary(cos=torch.randn(4, 4), sin=torch.randn(4, 4)), "cos"),
    ("dtype-k", lambda: _rotary(k=torch.randn(2, 1, 5, 8, dtype=torch.float64)), "k"),
    ("int-q", lambda: _rotary(q=torch.ones(2, 3, 5, 8, dtype=torch.int64)), "q"),
    ("bool-cos", lambda: _rotary(cos=torch.ones(5, 4, dtype=torch.bool)), "cos"),
    ("device-k", lambda: _rotary(k=torch.randn(2, 1, 5, 8, device="meta")), "k"),
    ("nan-q", lambda: _rotary(q=poke(torch.randn(2, 3, 5, 8), float("nan"), 9)), "reference"),
    ("inf-k", lambda: _rotary(k=poke(poke(torch.randn(2, 1, 5, 8), float("inf"), 3), float("-inf"), 17)),
     "reference"),
    ("huge-q", lambda: _rotary(q=torch.randn(2, 3, 5, 8) * 1e30), "reference"),
    ("T0", lambda: _rotary(T=0), "reference"),
    ("T65-D130", lambda: _rotary(T=65, D=130, R=130, dtype=torch.float64), "reference"),
]


# ---------------------------------------------------------------------------
# rnn / lstm / gru and cells
# ---------------------------------------------------------------------------

def _lstm(T=4, Bsz=3, I=5, H=6, dtype=torch.float64, x=None, h0=None, c0=None, w_ih=None, w_hh=None, b_ih=None,
          lengths=None, reverse=False, mode="lstm"):
    G = {"lstm": 4, "gru": 3, "rnn": 1}[mode]
    x = torch.randn(T, Bsz, I, dtype=dtype) if x is None else x
    w_ih = torch.randn(G * H, I, dtype=dtype) * 0.4 if w_ih is None else w_ih
    w_hh = torch.randn(G * H, H, dtype=dtype) * 0.4 if w_hh is None else w_hh
    b_ih = torch.randn(G * H, dtype=dtype) if b_ih is None else b_ih
    h0 = torch.randn(Bsz, H, dtype=dtype) if h0 is None else h0
    c0 = torch.randn(Bsz, H, dtype=dtype) if c0 is None else c0
    args = {n: Arg(t, grad=t.is_floating_point()) for n, t in
            dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih).items()}
    if lengths is not None:
        args["lengths"] = Arg(lengths)

    def call(a, be):
        kw = dict(lengths=a.get("lengths"), reverse=reverse, backend=be)
        if mode == "lstm":
            return SF.lstm(a["x"], (a["h0"], a["c0"]), a["w_ih"], a["w_hh"], a["b_ih"], None, **kw)
        if mode == "gru":
            return SF.gru(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], None, **kw)
        return SF.rnn(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], None, nonlinearity="relu", **kw)
    return call, args, dtype, mode


def _cell(x=None, h=None, I=5, H=6, dtype=torch.float64):
    x = torch.randn(3, I, dtype=dtype) if x is None else x
    h = torch.randn(3, H, dtype=dtype) if h is None else h
    args = dict(x=Arg(x, grad=x.is_floating_point()), h=Arg(h, grad=h.is_floating_point()),
                w_ih=Arg(torch.randn(3 * H, I, dtype=dtype), grad=True),
                w_hh=Arg(torch.randn(3 * H, H, dtype=dtype), grad=True))
    return (lambda a, be: SF.gru_cell(a["x"], a["h"], a["w_ih"], a["w_hh"], backend=be)), args, dtype, "gru_cell"


NAN_X = poke(torch.randn(4, 3, 5, dtype=torch.float64), float("nan"), 7)
INF_H = poke(poke(torch.randn(3, 6, dtype=torch.float64), float("inf"), 2), float("-inf"), 9)
RNN_ROWS = [
    ("rank-x", lambda: _lstm(x=torch.randn(4, 5, dtype=torch.float64)), "x"),
    ("size-w_ih", lambda: _lstm(w_ih=torch.randn(24, 4, dtype=torch.float64)), "w_ih"),
    ("size-w_hh", lambda: _lstm(w_hh=torch.randn(24, 5, dtype=torch.float64)), "w_hh"),
    ("size-h0", lambda: _lstm(h0=torch.randn(2, 6, dtype=torch.float64)), "h0"),
    ("size-c0", lambda: _lstm(c0=torch.randn(3, 7, dtype=torch.float64)), "c0"),
    ("size-b_ih", lambda: _lstm(b_ih=torch.randn(23, dtype=torch.float64)), "b_ih"),
    ("dtype-w_hh", lambda: _lstm(w_hh=torch.randn(24, 6)), "w_hh"),
    ("int-x", lambda: _lstm(x=torch.ones(4, 3, 5, dtype=torch.int64)), "x"),
    ("device-w_ih", lambda: _lstm(w_ih=torch.randn(24, 5, dtype=torch.float64, device="meta")), "w_ih"),
    ("float-lengths", lambda: _lstm(lengths=torch.tensor([1.0, 2.0, 3.0])), "lengths"),
    ("long-lengths", lambda: _lstm(lengths=torch.tensor([1, 5, 2])), "lengths"),
    ("negative-lengths", lambda: _lstm(lengths=torch.tensor([1, -1, 2])), "lengths"),
    ("size-lengths", lambda: _lstm(lengths=torch.tensor([1, 2])), "lengths"),
    ("nan-x", lambda: _lstm(x=NAN_X), "reference"),
    ("nan-x-gru-reverse", lambda: _lstm(x=NAN_X, mode="gru", reverse=True, lengths=torch.tensor([4, 2, 0])),
     "reference"),
    ("inf-h0", lambda: _lstm(h0=INF_H), "reference"),
    ("inf-h0-gru", lambda: _lstm(h0=INF_H, mode="gru"), "reference"),
    ("huge-x", lambda: _lstm(x=torch.randn(4, 3, 5, dtype=torch.float64) * 1e4), "reference"),
    ("huge-x-gru", lambda: _lstm(x=torch.randn(4, 3, 5, dtype=torch.float64) * 1e4, mode="gru"), "reference"),
    # cancellation in x W_ih^T + h W_hh^T: two fp32 summation orders differ by more than rtol
    # (cpu too), so held to fp64 like the other huge-magnitude fp32 cases
    ("huge-x-relu-fp32", lambda: _lstm(x=torch.randn(4, 3, 5) * 1e18, mode="rnn", dtype=torch.float32),
     "reference-fp64"),
    ("T0", lambda: _lstm(T=0), "reference"),
    ("B0", lambda: _lstm(Bsz=0), "reference"),
    ("lengths-all-0", lambda: _lstm(lengths=torch.zeros(3, dtype=torch.int64), reverse=True), "reference"),
    ("H65-I65", lambda: _lstm(T=6, H=65, I=65, dtype=torch.float32, lengths=torch.tensor([6, 5, 1])),
     "reference"),
    ("cell-rank-x", lambda: _cell(x=torch.randn(1, 3, 5, dtype=torch.float64)), "x"),
    ("cell-rank-h", lambda: _cell(h=torch.randn(6, dtype=torch.float64)), "h"),
    ("cell-int-h", lambda: _cell(h=torch.ones(3, 6, dtype=torch.int32)), "h"),
    ("cell-nan-x", lambda: _cell(x=poke(torch.randn(3, 5, dtype=torch.float64), float("nan"))), "reference"),
]


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------

def _sdpa(q=None, k=None, v=None, mask=None, L=5, S=7, E=8, dtype=torch.float32, **kw):
    q = torch.randn(2, 4, L, E, dtype=dtype) if q is None else q
    k = torch.randn(2, 4, S, E, dtype=dtype) if k is None else k
    v = torch.randn(2, 4, S, E, dtype=dtype) if v is None else v
    args = dict(q=Arg(q, grad=q.is_floating_point()), k=Arg(k, grad=k.is_floating_point()),
                v=Arg(v, grad=v.is_floating_point()))
    if mask is not None:
        args["attn_mask"] = Arg(mask)
    return (lambda a, be: SF.scaled_dot_product_attention(a["q"], a["k"], a["v"], attn_mask=a.get("attn_mask"),
                                                          backend=be, **kw)), args, dtype


def _logits(scale, L=6, S=9, E=4):
    """q.k of magnitude ~scale: softmax must not overflow."""
    q = torch.randn(1, 2, L, E)
    return _sdpa(q=q * scale ** 0.5, k=torch.randn(1, 2, S, E) * scale ** 0.5, v=torch.randn(1, 2, S, E), L=L, S=S,
                 E=E)


ATTENTION = [
    ("rank-q", lambda: _sdpa(q=torch.randn(8)), "query"),
    ("size-k-E", lambda: _sdpa(k=torch.randn(2, 4, 7, 6)), "key"),
    ("size-v-S", lambda: _sdpa(v=torch.randn(2, 4, 6, 8)), "value"),
    ("heads-gqa", lambda: _sdpa(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8), enable_gqa=True), "key"),
    ("mask-shape", lambda: _sdpa(mask=torch.ones(5, 6, dtype=torch.bool)), "attn_mask"),
    ("mask-and-causal", lambda: _sdpa(mask=torch.rand(5, 7) > 0.3, is_causal=True), "reference"),
    ("mask-fp32-q-fp64", lambda: _sdpa(mask=torch.randn(5, 7), dtype=torch.float64), "reference"),
    ("mask-fp64-q-fp32", lambda: _sdpa(mask=torch.randn(5, 7, dtype=torch.float64)), "attn_mask"),
    ("dtype-v", lambda: _sdpa(v=torch.randn(2, 4, 7, 8, dtype=torch.float64)), "value"),
    ("int-q", lambda: _sdpa(q=torch.ones(2, 4, 5, 8, dtype=torch.int64)), "query"),
    ("int-mask", lambda: _sdpa(mask=torch.ones(5, 7, dtype=torch.int64)), "attn_mask"),
    ("device-k", lambda: _sdpa(k=torch.randn(2, 4, 7, 8, device="meta")), "key"),
    ("dropout-p", lambda: _sdpa(dropout_p=1.5), "dropout_p"),
    ("nan-q", lambda: _sdpa(q=poke(torch.randn(2, 4, 5, 8), float("nan"), 11)), "reference"),
    ("inf-k", lambda: _sdpa(k=poke(torch.randn(2, 4, 7, 8), float("inf"), 5)), "reference"),
    ("nan-mask", lambda: _sdpa(mask=poke(torch.zeros(5, 7), float("nan"), 3)), "reference"),
    ("all-masked", lambda: _sdpa(mask=torch.zeros(5, 7, dtype=torch.bool)), "reference"),
    ("all-minus-inf", lambda: _sdpa(mask=torch.full((2, 1, 5, 7), float("-inf"))), "reference"),
    ("logits-1e4", lambda: _logits(1e4), "reference-fp64"),
    ("logits-1e4-causal", lambda: _sdpa(q=torch.randn(1, 2, 9, 4) * 100, k=torch.randn(1, 2, 9, 4) * 100,
                                        v=torch.randn(1, 2, 9, 4), is_causal=True), "reference-fp64"),
    ("huge-v", lambda: _sdpa(v=torch.randn(2, 4, 7, 8) * 1e30), "reference-fp64"),
    ("S1", lambda: _sdpa(S=1, L=1), "reference"),
    ("L0", lambda: _sdpa(L=0), "reference"),
    ("S0", lambda: _sdpa(S=0), "reference"),
    ("causal-L>S", lambda: _sdpa(L=9, S=4, is_causal=True, dtype=torch.float64), "reference"),
    ("N65-E65", lambda: _sdpa(L=65, S=65, E=65, is_causal=True, dtype=torch.float64), "reference"),
    ("N129-E16", lambda: _sdpa(q=torch.randn(1, 1, 129, 16), k=torch.randn(1, 1, 129, 16),
                               v=torch.randn(1, 1, 129, 16)), "reference"),
]


# ---------------------------------------------------------------------------
# wkv4
# ---------------------------------------------------------------------------

def _wkv(Bsz=2, T=6, C=5, dtype=torch.float64, w=None, u=None, k=None, v=None, state="none"):
    w = torch.randn(C, dtype=dtype) - 1 if w is None else w
    u = torch.randn(C, dtype=dtype) if u is None else u
    k = torch.randn(Bsz, T, C, dtype=dtype) if k is None else k
    v = torch.randn(Bsz, T, C, dtype=dtype) if v is None else v
    args = dict(time_decay=Arg(w, grad=w.is_floating_point()), time_first=Arg(u, grad=u.is_floating_point()),
                k=Arg(k, grad=k.is_floating_point()), v=Arg(v, grad=v.is_floating_point()))
    if isinstance(state, torch.Tensor):
        args["state"] = Arg(state, grad=state.is_floating_point())
    return (lambda a, be: SF.wkv4(a["time_decay"], a["time_first"], a["k"], a["v"], a.get("state"), backend=be)), \
        args, dtype


def _state(Bsz=2, C=5, dtype=torch.float64, pp=None):
    st = torch.stack((torch.randn(Bsz, C), torch.rand(Bsz, C) + 0.1, torch.randn(Bsz, C)), 1).to(dtype)
    if pp is not None:
        st[:, 2] = pp
    return st


def _spiky_k(scale, T=40, dtype=torch.float32):
    k = torch.randn(2, T, 5, dtype=dtype)
    k[:, ::3] = scale
    k[:, 1::3] = -scale
    return k


WKV = [
    ("rank-k", lambda: _wkv(k=torch.randn(6, 5, dtype=torch.float64)), "k"),
    ("size-v", lambda: _wkv(v=torch.randn(2, 5, 5, dtype=torch.float64)), "v"),
    ("size-time_decay", lambda: _wkv(w=torch.randn(4, dtype=torch.float64)), "time_decay"),
    ("size-time_first", lambda: _wkv(u=torch.randn(1, 5, dtype=torch.float64)), "time_first"),
    ("size-state", lambda: _wkv(state=torch.randn(2, 2, 5, dtype=torch.float64)), "state"),
    ("dtype-v", lambda: _wkv(v=torch.randn(2, 6, 5)), "v"),
    ("int-k", lambda: _wkv(k=torch.ones(2, 6, 5, dtype=torch.int32)), "k"),
    ("int-state", lambda: _wkv(state=torch.ones(2, 3, 5, dtype=torch.int64)), "state"),
    ("device-v", lambda: _wkv(v=torch.randn(2, 6, 5, dtype=torch.float64, device="meta")), "v"),
    ("nan-k", lambda: _wkv(k=poke(torch.randn(2, 6, 5, dtype=torch.float64), float("nan"), 12)), "reference"),
    ("nan-state", lambda: _wkv(state=poke(_state(), float("nan"), 1)), "reference"),
    ("inf-v", lambda: _wkv(v=poke(torch.randn(2, 6, 5, dtype=torch.float64), float("inf"), 7)), "reference"),
    ("-inf-k", lambda: _wkv(k=poke(torch.randn(2, 6, 5, dtype=torch.float64), float("-inf"), 7)), "reference"),
    ("k-1e4-fp32", lambda: _wkv(k=_spiky_k(1e4), v=torch.randn(2, 40, 5), T=40, dtype=torch.float32),
     "reference-fp64"),
    ("k-1e4-fp64-state", lambda: _wkv(k=_spiky_k(1e4, dtype=torch.float64), T=40,
                                      state=_state(pp=torch.full((2, 5), 5e3, dtype=torch.float64))), "reference"),
    ("decay-huge", lambda: _wkv(w=torch.full((5,), 50.0, dtype=torch.float64)), "reference"),
    ("decay-none", lambda: _wkv(w=torch.full((5,), -1e4, dtype=torch.float64)), "reference"),
    ("T0", lambda: _wkv(T=0, state=_state()), "reference"),
    ("B0", lambda: _wkv(Bsz=0), "reference"),
    ("T65-C65", lambda: _wkv(T=65, C=65, dtype=torch.float32), "reference"),
]


TABLE = cases([("rotary", "apply_rotary", ROTARY), ("rnn", "lstm", RNN_ROWS),
               ("attention", "scaled_dot_product_attention", ATTENTION), ("wkv", "wkv4", WKV)])


@pytest.mark.parametrize("family,op,build,expect,backend", TABLE)
def test_hostile(family, op, build, expect, backend):
    run_case(family, op, build, expect, backend)
