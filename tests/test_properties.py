"""Property-based parity: hypothesis draws shapes (1, primes, one past a block size,
empty batch), dtypes (fp32/fp64), memory layouts (non-contiguous, transposed,
expanded, storage offset) and options for every op, and every backend that runs
here (reference on strided views, cpu, triton under the interpreter on tiny
shapes) must give the reference's outputs and input gradients on contiguous
copies, without modifying its inputs.

Bounded for CI: few examples, no deadline, derandomized (the same examples on
every run), no example database."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from seqkern import functional as SF

from reliability import LAYOUTS, Arg, assert_parity, backends_for, require_family

# derandomize: CI sees the same examples every run; a failure is reproducible from its seed
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

DTYPES = st.sampled_from([torch.float32, torch.float64])
LAYOUT = st.sampled_from(LAYOUTS)
# 1, primes, and one past the power-of-two block sizes that kernels tile by
SIZES = [1, 2, 3, 5, 7, 13, 17, 33, 65]


def size(data, lo=1, hi=65, label="n"):
    return data.draw(st.sampled_from([s for s in SIZES if lo <= s <= hi]), label=label)


def seed(data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))


def cap(backend, n_cpu, n_triton):
    """Largest size drawn for a backend: the Triton interpreter runs tiny shapes only."""
    return n_triton if backend == "triton" else n_cpu


# ---------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_for("apply_rotary"))
@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_rotary(backend, data):
    seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    B = data.draw(st.sampled_from([0, 1, 2, 3]), label="B")
    H = size(data, 1, 3, "H")
    Hk = data.draw(st.sampled_from([1, H]), label="Hk")
    T = size(data, 1, cap(backend, 65, 17), "T")
    D = 2 * size(data, 1, cap(backend, 33, 17), "D/2")
    R = 2 * data.draw(st.integers(1, D // 2), label="R/2")
    il = data.draw(st.booleans(), label="interleaved")
    table_grad = data.draw(st.booleans(), label="table_grad")
    ang = torch.rand(T, R // 2, dtype=dtype) * 6.3
    args = dict(q=Arg(torch.randn(B, H, T, D, dtype=dtype), data.draw(LAYOUT, label="q_layout"), True),
                k=Arg(torch.randn(B, Hk, T, D, dtype=dtype), data.draw(LAYOUT, label="k_layout"), True),
                cos=Arg(ang.cos(), data.draw(LAYOUT, label="cos_layout"), table_grad),
                sin=Arg(ang.sin(), data.draw(LAYOUT, label="sin_layout"), table_grad))
    assert_parity(lambda a, be: SF.apply_rotary(a["q"], a["k"], a["cos"], a["sin"], interleaved=il, backend=be),
                  args, backend, dtype, op="apply_rotary")


# ---------------------------------------------------------------------------
# the machinery itself: layouts are what they claim, and the check catches what it must
# ---------------------------------------------------------------------------

def test_layouts_present_the_same_values_in_the_claimed_layout():
    x = torch.randn(3, 4, 5)
    for layout in LAYOUTS:
        a = Arg(x, layout, grad=True)
        v = a.present()
        want = x[:1].expand(3, 4, 5) if layout == "expanded" else x
        assert torch.equal(v, want), layout
        assert v.is_contiguous() == (layout in ("contiguous", "offset")), layout
        assert (v.storage_offset() == 3) == (layout == "offset"), layout
        (v * torch.arange(60.).view(3, 4, 5)).sum().backward()
        assert a.leaf.grad is not None and a.leaf.grad.shape == a.leaf.shape, layout
    assert Arg(x, "expanded").present().stride(0) == 0


def test_parity_check_catches_wrong_values_grads_and_mutation():
    args = dict(x=Arg(torch.randn(4, 3, dtype=torch.float64), "noncontig", grad=True))

    def fine(a, be):
        return a["x"].sin()

    def wrong_value(a, be):
        return a["x"].sin() + (be != "reference") * 1e-3

    def wrong_grad(a, be):
        y = a["x"].sin()
        return y if be == "reference" else y.detach() + a["x"] * 0

    def mutates(a, be):
        if be != "reference":
            a["x"].data.add_(1)
        return a["x"].detach().sin()

    assert_parity(fine, args, "cpu", torch.float64)
    for bad, match in ((wrong_value, "output"), (wrong_grad, "grad of x"), (mutates, "modified input x")):
        args = dict(x=Arg(torch.randn(4, 3, dtype=torch.float64), "offset", grad=True))
        with pytest.raises(AssertionError, match=match):
            assert_parity(bad, args, "cpu", torch.float64)


# ---------------------------------------------------------------------------
# rnn / lstm / gru and their cells
# ---------------------------------------------------------------------------

RNN_MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def rnn_call(mode, reverse):
    def call(a, be):
        common = dict(lengths=a.get("lengths"), reverse=reverse, backend=be)
        w = (a["w_ih"], a["w_hh"], a.get("b_ih"), a.get("b_hh"))
        if mode == "lstm":
            return SF.lstm(a["x"], (a.get("h0"), a.get("c0")), *w, a.get("w_hr"), **common)
        if mode == "gru":
            return SF.gru(a["x"], a.get("h0"), *w, **common)
        return SF.rnn(a["x"], a.get("h0"), *w, nonlinearity=mode[4:], **common)
    return call


def rnn_weights(data, mode, I, H, P, dtype, layout):
    G = GATES[mode]
    s = H ** -0.5
    args = dict(w_ih=Arg(torch.randn(G * H, I, dtype=dtype) * s, layout(), True),
                w_hh=Arg(torch.randn(G * H, P, dtype=dtype) * s, layout(), True))
    if data.draw(st.booleans(), label="bias"):
        args["b_ih"] = Arg(torch.randn(G * H, dtype=dtype) * s, layout(), True)
        args["b_hh"] = Arg(torch.randn(G * H, dtype=dtype) * s, layout(), True)
    return args


def rnn_ops():
    return [pytest.param(m, be, id=f"{m}-{be}") for m in RNN_MODES for be in backends_for(m[:3] if m != "lstm"
                                                                                        else "lstm")]


@pytest.mark.parametrize("mode,backend", rnn_ops())
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_rnn_sequence(mode, backend, data):
    require_family("rnn")
    seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    layout = lambda: data.draw(LAYOUT)  # noqa: E731
    T = data.draw(st.sampled_from([0] + [s for s in SIZES if s <= cap(backend, 33, 5)]), label="T")
    Bsz = data.draw(st.sampled_from([0, 1, 2, 3, 5]), label="B")
    I, H = size(data, 1, cap(backend, 17, 5), "I"), size(data, 1, cap(backend, 17, 7), "H")
    P = H
    if mode == "lstm" and H > 1 and data.draw(st.booleans(), label="proj"):
        P = data.draw(st.integers(1, H - 1), label="P")
    args = dict(x=Arg(torch.randn(T, Bsz, I, dtype=dtype), layout(), True))
    args.update(rnn_weights(data, mode, I, H, P, dtype, layout))
    if P < H:
        args["w_hr"] = Arg(torch.randn(P, H, dtype=dtype) * H ** -0.5, layout(), True)
    if data.draw(st.booleans(), label="h0"):
        args["h0"] = Arg(torch.randn(Bsz, P, dtype=dtype), layout(), True)
    if mode == "lstm" and data.draw(st.booleans(), label="c0"):
        args["c0"] = Arg(torch.randn(Bsz, H, dtype=dtype), layout(), True)
    if data.draw(st.booleans(), label="lengths"):
        lengths = data.draw(st.lists(st.integers(0, T), min_size=Bsz, max_size=Bsz), label="lengths")
        args["lengths"] = Arg(torch.tensor(lengths, dtype=data.draw(st.sampled_from([torch.int64, torch.int32]))),
                              layout())
    reverse = data.draw(st.booleans(), label="reverse")
    assert_parity(rnn_call(mode, reverse), args, backend, dtype, op=mode[:3] if mode != "lstm" else "lstm")


def cell_call(mode):
    def call(a, be):
        w = (a["w_ih"], a["w_hh"], a.get("b_ih"), a.get("b_hh"))
        if mode == "lstm":
            hx = (a["h"], a["c"]) if "h" in a else None
            return SF.lstm_cell(a["x"], hx, *w, backend=be)
        if mode == "gru":
            return SF.gru_cell(a["x"], a.get("h"), *w, backend=be)
        return SF.rnn_cell(a["x"], a.get("h"), *w, nonlinearity=mode[4:], backend=be)
    return call


def cell_ops():
    return [pytest.param(m, be, id=f"{m}-{be}") for m in RNN_MODES
            for be in backends_for((m[:3] if m != "lstm" else "lstm") + "_cell")]


@pytest.mark.parametrize("mode,backend", cell_ops())
@settings(max_examples=6, **SETTINGS)
@given(data=st.data())
def test_rnn_cell(mode, backend, data):
    require_family("rnn")
    seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    layout = lambda: data.draw(LAYOUT)  # noqa: E731
    Bsz = data.draw(st.sampled_from([None, 0, 1, 3, 5]), label="B (None: unbatched)")
    I, H = size(data, 1, cap(backend, 17, 5), "I"), size(data, 1, cap(backend, 17, 7), "H")
    lead = () if Bsz is None else (Bsz,)
    args = dict(x=Arg(torch.randn(*lead, I, dtype=dtype), layout(), True))
    args.update(rnn_weights(data, mode, I, H, H, dtype, layout))
    if data.draw(st.booleans(), label="state"):
        args["h"] = Arg(torch.randn(*lead, H, dtype=dtype), layout(), True)
        if mode == "lstm":
            args["c"] = Arg(torch.randn(*lead, H, dtype=dtype), layout(), True)
    assert_parity(cell_call(mode), args, backend, dtype, op=(mode[:3] if mode != "lstm" else "lstm") + "_cell")


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------

def attention_mask(data, kind, lead, L, S, dtype):
    """A bool or additive mask in one of the broadcastable shapes torch accepts, with
    fully masked rows now and then."""
    shape = data.draw(st.sampled_from(["LS", "1LS", "key-padding", "full"]), label="mask_shape")
    if shape == "LS" or not lead:
        mshape = (L, S)
    elif shape == "1LS":
        mshape = (1,) * len(lead) + (L, S)
    elif shape == "key-padding":
        mshape = (lead[0],) + (1,) * (len(lead) - 1) + (1, S) if len(lead) > 1 else (lead[0], 1, S)
    else:
        mshape = lead + (L, S)
    keep = torch.rand(mshape) < 0.7
    if data.draw(st.booleans(), label="fully_masked_row") and mshape[-2] > 0:
        keep[..., mshape[-2] // 2, :] = False
    if kind == "bool":
        return keep
    return torch.randn(mshape, dtype=dtype).masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("backend", backends_for("scaled_dot_product_attention"))
@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_attention(backend, data):
    require_family("attention")
    seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    if backend == "triton":
        dtype = torch.float32  # triton attention is fp32/fp16/bf16 only (fp64 raises BackendUnavailable)
    layout = lambda: data.draw(LAYOUT)  # noqa: E731
    Hk = data.draw(st.sampled_from([1, 2, 3]), label="Hk")
    gqa = data.draw(st.booleans(), label="enable_gqa")
    Hq = Hk * data.draw(st.sampled_from([1, 2, 3]), label="group") if gqa else Hk
    Bsz = data.draw(st.sampled_from([None, 0, 1, 2]), label="B (None: 3-d inputs)")
    if Bsz is None and gqa:
        Bsz = 1
    L, S = size(data, 1, cap(backend, 65, 17), "L"), size(data, 1, cap(backend, 65, 17), "S")
    E = data.draw(st.sampled_from([1, 3, 8, 16, 17, 40] if backend != "triton" else [1, 3, 8, 16]), label="E")
    Ev = data.draw(st.sampled_from([E, 5]), label="Ev")
    qlead = (Hq,) if Bsz is None else (Bsz, Hq)
    klead = (Hk,) if Bsz is None else (Bsz, Hk)
    args = dict(q=Arg(torch.randn(*qlead, L, E, dtype=dtype), layout(), True),
                k=Arg(torch.randn(*klead, S, E, dtype=dtype), layout(), True),
                v=Arg(torch.randn(*klead, S, Ev, dtype=dtype), layout(), True))
    mask_kind = data.draw(st.sampled_from(["none", "bool", "float"]), label="mask")
    causal = mask_kind == "none" and data.draw(st.booleans(), label="is_causal")
    if mask_kind != "none":
        mask = attention_mask(data, mask_kind, qlead, L, S, dtype)
        args["attn_mask"] = Arg(mask, layout(), mask_kind == "float" and data.draw(st.booleans(), label="mask_grad"))
    scale = data.draw(st.sampled_from([None, 0.3, 1.7]), label="scale")

    def call(a, be):
        return SF.scaled_dot_product_attention(a["q"], a["k"], a["v"], attn_mask=a.get("attn_mask"), is_causal=causal,
                                               scale=scale, enable_gqa=gqa, backend=be)
    assert_parity(call, args, backend, dtype, op="scaled_dot_product_attention")


# ---------------------------------------------------------------------------
# wkv4
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_for("wkv4"))
@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_wkv4(backend, data):
    require_family("wkv")
    seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    layout = lambda: data.draw(LAYOUT)  # noqa: E731
    Bsz = data.draw(st.sampled_from([0, 1, 2, 3]), label="B")
    T = data.draw(st.sampled_from([0] + [s for s in SIZES if s <= cap(backend, 65, 17)]), label="T")
    C = size(data, 1, cap(backend, 65, 17), "C")
    kscale = data.draw(st.sampled_from([1.0, 8.0, 40.0]), label="k_scale")
    args = dict(time_decay=Arg(torch.randn(C, dtype=dtype) - 1, layout(), True),
                time_first=Arg(torch.randn(C, dtype=dtype), layout(), True),
                k=Arg(torch.randn(Bsz, T, C, dtype=dtype) * kscale, layout(), True),
                v=Arg(torch.randn(Bsz, T, C, dtype=dtype), layout(), True))
    if data.draw(st.booleans(), label="state"):
        # a state some earlier chunk could have produced: aa any, bb > 0, pp any
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        st0 = torch.stack((torch.randn(Bsz, C), torch.rand(Bsz, C) + 0.1, torch.randn(Bsz, C) * kscale), 1)
        args["state"] = Arg(st0.to(acc), layout(), True)

    def call(a, be):
        return SF.wkv4(a["time_decay"], a["time_first"], a["k"], a["v"], a.get("state"), backend=be)
    assert_parity(call, args, backend, dtype, op="wkv4")
