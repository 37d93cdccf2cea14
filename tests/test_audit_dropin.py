"""Drop-in audit from a user's chair: what a PyTorch user gets from torch.nn (autocast dtypes,
module API surface, replace_modules, functional signatures), compared with real torch in the
same process."""
import copy
import inspect
import io
import pickle

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqkern
from seqkern import functional as SF, nn as snn

from helpers import flat

F64 = torch.float64
I, H = 3, 4

LAYERS = {
    "rnn": (snn.RNN, torch.nn.RNN, {}),
    "lstm": (snn.LSTM, torch.nn.LSTM, {}),
    "lstm_proj": (snn.LSTM, torch.nn.LSTM, {"proj_size": 2}),
    "gru": (snn.GRU, torch.nn.GRU, {}),
}
CELLS = {
    "rnn": (snn.RNNCell, torch.nn.RNNCell),
    "lstm": (snn.LSTMCell, torch.nn.LSTMCell),
    "gru": (snn.GRUCell, torch.nn.GRUCell),
}


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch):
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)


def layer_pair(mode, dtype=torch.float32, **kw):
    ours, theirs, extra = LAYERS[mode]
    t = theirs(I, H, **extra, **kw, dtype=dtype)
    m = ours(I, H, **extra, **kw, dtype=dtype)
    m.load_state_dict(t.state_dict())
    return m, t


def cell_pair(mode, dtype=torch.float32):
    ours, theirs = CELLS[mode]
    t = theirs(I, H, dtype=dtype)
    m = ours(I, H, dtype=dtype)
    m.load_state_dict(t.state_dict())
    return m, t


def assert_like_torch(got, want, rtol=0.05, atol=0.03):
    got, want = flat(got), flat(want)
    assert [a.dtype for a in got] == [b.dtype for b in want]
    assert [a.shape for a in got] == [b.shape for b in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# 1. autocast
# ---------------------------------------------------------------------------

def _layer_input(mode, form, low):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, I, generator=g)
    P = 2 if mode == "lstm_proj" else H
    h, c = torch.randn(2, 2, P, generator=g), torch.randn(2, 2, H, generator=g)
    hx = (h, c) if mode.startswith("lstm") else h
    if form == "batched":
        return (x,)
    if form == "unbatched":
        return (x[:, 0],)
    if form == "packed":
        return (pack_padded_sequence(x, torch.tensor([5, 3])),)
    if form == "hx":
        return (x, hx)
    if form == "hx_low":
        return (x, tuple(t.to(low) for t in hx) if isinstance(hx, tuple) else hx.to(low))
    if form == "low_input":
        return (x.to(low),)
    raise AssertionError(form)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["batched", "unbatched", "packed", "hx", "hx_low", "low_input"])
@pytest.mark.parametrize("mode", list(LAYERS))
def test_layer_under_cpu_autocast_like_torch(mode, form, low):
    """torch's CPU autocast casts only the matmuls: GRU, a packed LSTM and an LSTM projection's
    cell state come out fp32 (from fp32 inputs/states), RNN and oneDNN's LSTM in the low dtype."""
    m, t = layer_pair(mode, num_layers=2)
    args = _layer_input(mode, form, low)
    with torch.autocast("cpu", dtype=low):
        got = m(*args)
        try:
            want = t(*args)
        except RuntimeError as e:  # oneDNN's fp16 LSTM is missing on CPUs without AVX512-FP16
            assert mode == "lstm" and low == torch.float16, e
            assert all(a.dtype == low for a in flat(got))
            return
    assert_like_torch(got, want)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["batched", "unbatched", "hx", "low_input"])
@pytest.mark.parametrize("mode", list(CELLS))
def test_cell_under_cpu_autocast_like_torch(mode, form, low):
    m, t = cell_pair(mode)
    g = torch.Generator().manual_seed(0)
    x, h, c = (torch.randn(2, n, generator=g) for n in (I, H, H))
    args = {"batched": (x,), "unbatched": (x[0],), "low_input": (x.to(low),),
            "hx": (x, (h, c) if mode == "lstm" else h)}[form]
    with torch.autocast("cpu", dtype=low):
        got, want = m(*args), t(*args)
    assert_like_torch(got, want)
    if form == "batched":
        sum(a.float().sum() for a in flat(got)).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn"])
def test_autocast_nested_disabled_and_onednn_off_like_torch(mode):
    m, t = layer_pair(mode)
    x = torch.randn(5, 2, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            got, want = m(x), t(x)
        assert all(a.dtype == torch.float32 for a in flat(got))
        assert_like_torch(got, want, rtol=1.3e-6, atol=1e-5)
        with torch.backends.mkldnn.flags(enabled=False):  # torch's native LSTM: state kept fp32
            assert_like_torch(m(x), t(x))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_under_cpu_autocast_like_torch(low, need_weights):
    t = torch.nn.MultiheadAttention(8, 2)
    m = snn.MultiheadAttention(8, 2)
    m.load_state_dict(t.state_dict())
    x = torch.randn(5, 2, 8)
    with torch.autocast("cpu", dtype=low):
        got = m(x, x, x, need_weights=need_weights, average_attn_weights=False)
        want = t(x, x, x, need_weights=need_weights, average_attn_weights=False)
    assert (got[1] is None) == (want[1] is None)
    assert_like_torch(got, want, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(LAYERS) + [f"cell_{c}" for c in CELLS])
def test_low_precision_module_weights_on_cpu(kind, low):
    """module.to(bf16/fp16) runs on CPU in torch: so it does here (the reference serves it)."""
    cell = kind.startswith("cell_")
    m, t = cell_pair(kind[5:]) if cell else layer_pair(kind)
    m.to(low), t.to(low)
    x = torch.randn(*((2,) if cell else (5, 2)), I).to(low)
    assert_like_torch(m(x), t(x), rtol=0.02, atol=0.02)
    if not cell:
        packed = pack_padded_sequence(x, torch.tensor([5, 3]))
        assert_like_torch(m(packed), t(packed), rtol=0.02, atol=0.02)


# ---------------------------------------------------------------------------
# 2. module API surface
# ---------------------------------------------------------------------------

def _mha_error_cases():
    E, L, S, Bsz = 8, 5, 6, 3
    q, k, v = torch.randn(L, Bsz, E), torch.randn(S, Bsz, E), torch.randn(S, Bsz, E)
    return {
        "integer query": (q.long(), k, v),
        "4-D query": (q[None], k[None], v[None]),
        "2-D key for a 3-D query": (q, k[:, 0], v[:, 0]),
        "query features": (q[..., :7], k, v),
        "key features": (q, k[..., :7], v[..., :7]),
        "key/value lengths": (q, k, v[:4]),
        "key batch": (q, k[:, :2], v[:, :2]),
        "1-D key_padding_mask": (q, k, v, torch.zeros(S, dtype=torch.bool)),
        "key_padding_mask shape": (q, k, v, torch.zeros(Bsz, S + 1, dtype=torch.bool)),
        "integer key_padding_mask": (q, k, v, torch.zeros(Bsz, S, dtype=torch.long)),
        "4-D attn_mask": (q, k, v, None, True, torch.zeros(1, 1, L, S)),
        "2-D attn_mask shape": (q, k, v, None, True, torch.zeros(L, S + 1)),
        "3-D attn_mask shape": (q, k, v, None, True, torch.zeros(Bsz, L, S)),
        "integer attn_mask": (q, k, v, None, True, torch.zeros(L, S, dtype=torch.long)),
    }


@pytest.mark.parametrize("case", list(_mha_error_cases()))
def test_multihead_attention_errors_are_torchs_exception_types(case):
    """torch.nn.MultiheadAttention asserts most of its checks (AssertionError) and raises
    RuntimeError for others: code catching those catches seqkern's ValueError/TypeError too."""
    args = _mha_error_cases()[case]
    with pytest.raises(Exception) as want:
        torch.nn.MultiheadAttention(8, 2)(*args)
    with pytest.raises(type(want.value)) as got:
        snn.MultiheadAttention(8, 2)(*args)
    assert isinstance(got.value, (ValueError, TypeError))


MASK_DTYPES = [None, torch.bool, torch.float16, torch.bfloat16, torch.float32, F64]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("setting", ["fp32", "fp64", "fp32_autocast_bf16", "fp32_autocast_fp16"])
def test_multihead_attention_mask_dtypes_like_torch(setting, need_weights):
    """torch.nn.MultiheadAttention turns a bool mask into one of the query's dtype, keeps a float
    mask's dtype, adds the two masks (type promotion) and raises RuntimeError unless the result is
    the query's dtype (need_weights) or that or float32 (SDPA); autocast first casts a merged mask
    that is not float64. Each mix of key_padding_mask/attn_mask dtypes raises (torch's type, a
    TypeError naming the argument) exactly when torch does, and computes what torch does otherwise."""
    E, L, S, Bsz = 8, 5, 6, 3
    qdt = F64 if setting == "fp64" else torch.float32
    low = {"fp32_autocast_bf16": torch.bfloat16, "fp32_autocast_fp16": torch.float16}.get(setting)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(L, Bsz, E, generator=g, dtype=qdt), torch.randn(S, Bsz, E, generator=g, dtype=qdt)
    ours, theirs = snn.MultiheadAttention(E, 2, dtype=qdt), torch.nn.MultiheadAttention(E, 2, dtype=qdt)
    ours.load_state_dict(theirs.state_dict())

    def mask(shape, dt):
        if dt is None:
            return None
        if dt == torch.bool:
            m = torch.rand(shape, generator=g) > 0.6
            m[..., 0] = False  # no row masked everywhere (torch gives NaN there, seqkern 0)
            return m
        return torch.randn(shape, generator=g).to(dt)

    refused = 0
    for kd in MASK_DTYPES:
        for ad in MASK_DTYPES:
            kpm, am = mask((Bsz, S), kd), mask((L, S), ad)
            with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
                try:
                    want = theirs(q, k, k, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
                except RuntimeError as e:
                    with pytest.raises(type(e)) as got:
                        ours(q, k, k, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
                    assert isinstance(got.value, TypeError)
                    fine = (torch.bool, qdt) + ((torch.float16, torch.bfloat16, torch.float32) if low else ())
                    named = [n for n, m in (("key_padding_mask", kpm), ("attn_mask", am))
                             if m is not None and m.dtype not in fine]
                    assert named and all(n in str(got.value) for n in named), (kd, ad, str(got.value))
                    refused += 1
                    continue
                got = ours(q, k, k, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
            tol = 1e-5 if low is None else 3e-2
            for w, o in zip(want, got):
                if w is not None or o is not None:
                    assert o.dtype == w.dtype, (kd, ad)
                    torch.testing.assert_close(o, w, rtol=tol, atol=tol, msg=lambda m: f"{kd} {ad}: {m}")
    assert refused > 0


def test_rnn_layer_follows_its_mode_like_torch():
    """torch.nn.RNN.forward runs by ``mode`` (set at construction), not by the ``nonlinearity``
    attribute; a cell reads ``nonlinearity`` at each call and refuses an unknown one (RuntimeError)."""
    x = torch.randn(5, 2, I, dtype=F64)
    for cls in (snn.RNN, torch.nn.RNN):
        m = cls(I, H, dtype=F64)
        before = m(x)[0]
        m.nonlinearity = "relu"
        torch.testing.assert_close(m(x)[0], before, rtol=0, atol=0)
    m, t = cell_pair("rnn", F64)
    m.nonlinearity = t.nonlinearity = "relu"
    torch.testing.assert_close(m(x[0]), t(x[0]))
    m.nonlinearity = t.nonlinearity = "gelu"
    with pytest.raises(RuntimeError, match="Unknown nonlinearity"):
        t(x[0])
    with pytest.raises(RuntimeError, match="Unknown nonlinearity"):
        m(x[0])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "layer"])
def test_shapes_under_fake_tensor_mode_like_torch(kind):
    """FakeTensorMode (shape inference, memory estimates, export tooling): torch's modules run
    under it, forward and backward; so do seqkern's, the cells included (their direct C++ call
    has no fake kernel: under a dispatch mode they take the registered op)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = []
    for cls in ((snn.LSTM, torch.nn.LSTM) if kind == "layer" else CELLS[kind]):
        with FakeTensorMode():
            m = cls(I, H)
            x = torch.randn(*((5, 2) if kind == "layer" else (2,)), I, requires_grad=True)
            out = flat(m(x))
            sum(o.sum() for o in out).backward()
            shapes.append([tuple(o.shape) for o in out] + [tuple(x.grad.shape)])
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("kind", ["sdpa", "gqa", "gru", "rnn", "lstm_proj", "cell_lstm", "cell_gru", "cell_rnn"])
def test_flop_counter_counts_like_torch(kind):
    """torch.utils.flop_counter.FlopCounterMode (MFU estimates in training scripts) counts
    torch's SDPA and the matmuls of its RNN step loops: seqkern's ops count the same forward
    flops, and their backward is counted too."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    torch.manual_seed(0)
    if kind in ("sdpa", "gqa"):
        q = torch.randn(2, 4, 9, 16, requires_grad=True)
        k, v = (torch.randn(2, 2 if kind == "gqa" else 4, 11, d, requires_grad=True) for d in (16, 8))
        theirs, ours = (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                        lambda: SF.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    else:
        cell = kind.startswith("cell_")
        m, t = cell_pair(kind[5:]) if cell else layer_pair(kind)
        x = torch.randn(*((2,) if cell else (5, 2)), I, requires_grad=True)
        theirs, ours = (lambda: flat(t(x))[0]), (lambda: flat(m(x))[0])
    assert count(ours) == count(theirs) > 0
    assert count(lambda: ours().sum().backward()) > 2 * count(ours)


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "cell_lstm"])
def test_compiled_module_under_cpu_autocast_gives_torchs_dtypes(kind):
    """The autocast rule is traced by Dynamo (fullgraph) without reading oneDNN's flag, which it refuses."""
    cell = kind.startswith("cell_")
    m, t = cell_pair(kind[5:]) if cell else layer_pair(kind)
    x = torch.randn(*((2,) if cell else (5, 2)), I)
    f = torch.compile(m, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_like_torch(f(x), t(x))


@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "cell_lstm", "cell_gru"])
def test_frozen_weights_pruning_and_meta_init_like_torch(kind):
    """Everyday module plumbing: some weights frozen (requires_grad_(False)), torch.nn.utils.prune
    (the weight becomes a plain attribute recomputed by a pre-hook), and meta-device construction
    then load_state_dict(assign=True): outputs and the remaining gradients equal torch's."""
    from torch.nn.utils import prune

    cell = kind.startswith("cell_")
    m, t = cell_pair(kind[5:], F64) if cell else layer_pair(kind, F64)
    w = "weight_hh" if cell else "weight_hh_l0"
    for mod in (m, t):
        getattr(mod, "bias_ih" if cell else "bias_ih_l0").requires_grad_(False)
        prune.l1_unstructured(mod, w, 0.5)
    x = torch.randn(*((2,) if cell else (5, 2)), I, dtype=F64)
    got, want = flat(m(x)), flat(t(x))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    params = [p for p in t.parameters() if p.requires_grad]
    ours = [p for p in m.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(sum(o.sum() for o in got), ours),
                    torch.autograd.grad(sum(o.sum() for o in want), params)):
        torch.testing.assert_close(a, b)
    ours_cls = type(m)
    with torch.device("meta"):
        fresh = ours_cls(I, H, **({} if cell else LAYERS[kind][2]), dtype=F64)
    t2 = cell_pair(kind[5:], F64)[1] if cell else layer_pair(kind, F64)[1]
    fresh.load_state_dict(t2.state_dict(), assign=True)
    for a, b in zip(flat(fresh(x)), flat(t2(x))):
        torch.testing.assert_close(a, b)
