"""Drop-in recurrent layers and cells (seqkern.nn.RNN/LSTM/GRU/RNNCell/LSTMCell/GRUCell)
against torch.nn with the same weights: every constructor combination, every input form,
all gradients, state_dict both ways, dropout, autocast, errors and torch.compile."""
import copy
import io
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkern
from seqkern import backends as B, nn as snn

from helpers import TOL, backend_param, flat

F64 = torch.float64


def _seq_backends():
    """Backends to test the layers on: those that can serve the rnn ops on CPU here."""
    x = torch.zeros(1, 1, 1)
    out = []
    for name in ("reference", "cpu", "triton"):
        ok, _ = B.explain("lstm", x, None, None, x[0], x[0])[name]
        if ok or name == "cpu":  # cpu must work: a missing one fails loudly
            out.append(backend_param(name))
    return out


BACKENDS = _seq_backends()
# the interpreted Triton backend is slow: it runs one representative case of each test
EAGER = [p for p in BACKENDS if p.id != "triton"]


def cases(modes, first, rest, triton_modes):
    """(mode, backend, *case) params: every case of every mode on the eager CPU backends, the
    first case of ``triton_modes`` on triton."""
    out = [pytest.param(m, p.values[0], *c, marks=p.marks, id=f"{m}-{p.id}-{i}")
           for m in modes for p in EAGER for i, c in enumerate([first] + rest)]
    out += [pytest.param(m, p.values[0], *first, marks=p.marks, id=f"{m}-{p.id}-0")
            for m in triton_modes for p in BACKENDS if p.id == "triton"]
    return out

# (seqkern class, torch class, extra constructor kwargs)
MODES = {
    "rnn_tanh": (snn.RNN, torch.nn.RNN, {}),
    "rnn_relu": (snn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    "gru": (snn.GRU, torch.nn.GRU, {}),
    "lstm": (snn.LSTM, torch.nn.LSTM, {}),
    "lstm_proj": (snn.LSTM, torch.nn.LSTM, {"proj_size": 3}),
}
CELLS = {
    "rnn_tanh": (snn.RNNCell, torch.nn.RNNCell, {}),
    "rnn_relu": (snn.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
    "gru": (snn.GRUCell, torch.nn.GRUCell, {}),
    "lstm": (snn.LSTMCell, torch.nn.LSTMCell, {}),
}
I, H = 4, 5


def pair(mode, backend=None, dtype=F64, cell=False, **kw):
    """A seqkern layer (or cell) and a torch one holding the same weights."""
    ours, theirs, extra = CELLS[mode] if cell else MODES[mode]
    m = ours(I, H, **extra, **kw, dtype=dtype, backend=backend)
    t = theirs(I, H, **extra, **kw, dtype=dtype)
    t.load_state_dict(m.state_dict())
    return m, t


def make_hx(mode, L, Bsz, dtype=F64, batched=True, proj=3):
    P = proj if mode == "lstm_proj" else H
    shape = (L, Bsz) if batched else (L,)
    h = torch.randn(*shape, P, dtype=dtype, requires_grad=True)
    if mode.startswith("lstm"):
        return (h, torch.randn(*shape, H, dtype=dtype, requires_grad=True))
    return h


def hx_leaves(hx):
    return [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]


def compare(m, t, args_ours, args_theirs, leaves_ours, leaves_theirs, tol):
    """Forward of both modules, then gradients of a random projection of every output
    w.r.t. the parameters and the given input leaves."""
    got, want = flat(m(*args_ours)), flat(t(*args_theirs))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    ws = [torch.randn_like(w) for w in want]
    g1 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, ws)), list(m.parameters()) + leaves_ours)
    g2 = torch.autograd.grad(sum((b * w).sum() for b, w in zip(want, ws)), list(t.parameters()) + leaves_theirs)
    names = [n for n, _ in m.named_parameters()] + [f"input{i}" for i in range(len(leaves_ours))]
    for n, a, b in zip(names, g1, g2):
        torch.testing.assert_close(a, b, **tol, msg=lambda s: f"gradient of {n}: {s}")


def clone_leaves(x):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(clone_leaves(v) for v in x)
    return x.detach().clone().requires_grad_(x.requires_grad)


# ---------------------------------------------------------------------------
# construction: torch's parameters, init, repr, state_dict
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES) + [f"cell_{c}" for c in CELLS])
@pytest.mark.parametrize("num_layers,bias,bidirectional", [(1, True, False), (2, False, True), (3, True, True)])
def test_parameters_init_and_state_dict_are_torchs(mode, num_layers, bias, bidirectional):
    if mode.startswith("cell_"):
        ours, theirs, extra = CELLS[mode[5:]]
        kw = dict(bias=bias)
    else:
        ours, theirs, extra = MODES[mode]
        kw = dict(num_layers=num_layers, bias=bias, bidirectional=bidirectional, batch_first=True,
                  dropout=0.25 if num_layers > 1 else 0.0)
    torch.manual_seed(3)
    m = ours(I, H, **extra, **kw)
    torch.manual_seed(3)
    t = theirs(I, H, **extra, **kw)
    assert [(n, p.shape) for n, p in m.named_parameters()] == [(n, p.shape) for n, p in t.named_parameters()]
    for (n, a), (_, b) in zip(m.named_parameters(), t.named_parameters()):
        assert torch.equal(a, b), f"init of {n} differs from torch's"
    assert m.extra_repr() == t.extra_repr()
    assert repr(m).split("(", 1)[1] == repr(t).split("(", 1)[1]
    assert m.backend is None
    # state_dict both ways, including strict loading of the other class's keys
    t2 = theirs(I, H, **extra, **kw)
    t2.load_state_dict(m.state_dict())
    m2 = ours(I, H, **extra, **kw, backend="reference")
    m2.load_state_dict(t.state_dict())
    for a, b in zip(m2.state_dict().values(), t2.state_dict().values()):
        assert torch.equal(a, b)
    assert "backend='reference'" in repr(m2)
    if not mode.startswith("cell_"):
        m.flatten_parameters()  # exists and is harmless
        assert m._flat_weights_names == t._flat_weights_names
        assert isinstance(m, torch.nn.RNNBase)
    else:
        assert isinstance(m, theirs)


def test_constructor_arguments_like_torch():
    m = snn.RNN(I, H, 2, "relu", False, True, 0.0, True)  # torch's positional order
    t = torch.nn.RNN(I, H, 2, "relu", False, True, 0.0, True)
    assert m.extra_repr() == t.extra_repr() and m.nonlinearity == "relu" and m.mode == "RNN_RELU"
    for bad in (lambda c: c(I, H, proj_size=2), ):
        for ours, theirs in ((snn.RNN, torch.nn.RNN), (snn.GRU, torch.nn.GRU)):
            with pytest.raises(ValueError, match="proj_size"):
                bad(theirs)
            with pytest.raises(ValueError, match="proj_size"):
                bad(ours)
    with pytest.raises(ValueError, match="nonlinearity"):
        snn.RNN(I, H, nonlinearity="gelu")
    with pytest.raises(ValueError, match="dropout"):
        snn.LSTM(I, H, dropout=1.5)
    for cls in (snn.LSTM, snn.GRU, snn.RNN, snn.LSTMCell, snn.GRUCell, snn.RNNCell):
        with pytest.raises(ValueError, match="backend"):
            cls(I, H, backend="nope")
    m = snn.LSTM(I, H, dtype=F64, device="cpu")
    assert m.weight_ih_l0.dtype == F64


def test_pickle_deepcopy_to_and_functional_call():
    m = snn.LSTM(I, H, num_layers=2, proj_size=2, backend="cpu")
    x = torch.randn(5, 2, I)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    m3 = copy.deepcopy(m)
    ref = m(x)[0]
    assert m2.backend == "cpu" and torch.equal(m2(x)[0], ref) and torch.equal(m3(x)[0], ref)
    m4 = copy.deepcopy(m).double()
    torch.testing.assert_close(m4(x.double())[0], ref.double(), rtol=1e-5, atol=1e-6)
    # functional_call swaps parameters: forward must use the swapped ones
    zeros = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    out = torch.func.functional_call(m, zeros, (x,))[0]
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------
# layers vs torch.nn: every constructor combination, batched input
# ---------------------------------------------------------------------------

# every combination of the constructor flags, initial state given in half of them; the
# interpreted Triton backend (slow) gets one combination that has every feature on
FLAGS = [(n, b, f, d, (n == 2) != d) for n, b, f, d in itertools.product((1, 2), (True, False), (False, True),
                                                                         (False, True))]
LAYER_CASES = cases(list(MODES), (2, True, True, True, True), [f for f in FLAGS if f != (2, True, True, True, True)],
                    ["lstm_proj", "gru", "rnn_relu"])


@pytest.mark.parametrize("mode,backend,num_layers,bias,batch_first,bidirectional,with_hx", LAYER_CASES)
def test_layer_matches_torch_fp64(backend, mode, num_layers, bias, batch_first, bidirectional, with_hx):
    m, t = pair(mode, backend, num_layers=num_layers, bias=bias, batch_first=batch_first,
                bidirectional=bidirectional)
    T, Bsz = 5, 3
    x = torch.randn(*((Bsz, T) if batch_first else (T, Bsz)), I, dtype=F64, requires_grad=True)
    hx = make_hx(mode, num_layers * (2 if bidirectional else 1), Bsz) if with_hx else None
    x0, hx0 = x.detach().clone(), clone_leaves(hx)
    x2, hx2 = clone_leaves(x), clone_leaves(hx)
    args, args2 = ((x,) if hx is None else (x, hx)), ((x2,) if hx is None else (x2, hx2))
    compare(m, t, args, args2, [x] + hx_leaves(hx), [x2] + hx_leaves(hx2), TOL[F64])
    assert seqkern.last_backend(mode.split("_")[0]) == backend
    assert torch.equal(x.detach(), x0)
    for a, b in zip(hx_leaves(hx), hx_leaves(hx0)):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("backend", EAGER)
@pytest.mark.parametrize("mode", ["lstm_proj", "gru", "rnn_relu"])
def test_layer_matches_torch_fp32(backend, mode):
    m, t = pair(mode, backend, torch.float32, num_layers=2, bidirectional=True)
    x = torch.randn(7, 4, I, requires_grad=True)
    x2 = clone_leaves(x)
    compare(m, t, (x,), (x2,), [x], [x2], TOL[torch.float32])


# ---------------------------------------------------------------------------
# other input forms: unbatched, PackedSequence
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", EAGER)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("batch_first,with_hx", [(False, False), (True, True), (False, True)])
def test_unbatched_input(backend, mode, batch_first, with_hx):
    m, t = pair(mode, backend, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(6, I, dtype=F64, requires_grad=True)
    hx = make_hx(mode, 4, None, batched=False) if with_hx else None
    x2, hx2 = clone_leaves(x), clone_leaves(hx)
    args, args2 = ((x,) if hx is None else (x, hx)), ((x2,) if hx is None else (x2, hx2))
    compare(m, t, args, args2, [x] + hx_leaves(hx), [x2] + hx_leaves(hx2), TOL[F64])


@pytest.mark.parametrize("mode,backend,enforce_sorted,with_hx,bidirectional",
                         cases(list(MODES), (False, True, True), [(True, False, True), (False, False, False)],
                               ["lstm", "gru"]))
def test_packed_sequence(backend, mode, enforce_sorted, with_hx, bidirectional):
    m, t = pair(mode, backend, num_layers=2, bidirectional=bidirectional, batch_first=True)
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([2, 6, 1, 4])
    padded = torch.randn(4, 6, I, dtype=F64, requires_grad=True)
    padded2 = clone_leaves(padded)
    hx = make_hx(mode, 2 * (2 if bidirectional else 1), 4) if with_hx else None
    hx2 = clone_leaves(hx)
    p = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    p2 = pack_padded_sequence(padded2, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    args, args2 = ((p,) if hx is None else (p, hx)), ((p2,) if hx is None else (p2, hx2))
    out = m(*args)[0]
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, p.batch_sizes)
    if not enforce_sorted:
        assert torch.equal(out.sorted_indices, p.sorted_indices)
        assert torch.equal(out.unsorted_indices, p.unsorted_indices)
    y, ly = pad_packed_sequence(out, batch_first=True)
    assert torch.equal(ly, lengths)
    compare(m, t, args, args2, [padded] + hx_leaves(hx), [padded2] + hx_leaves(hx2), TOL[F64])


def test_packed_equals_padded_runs_per_sequence():
    """Each packed sequence gives what the layer gives on that sequence alone."""
    m = snn.GRU(I, H, num_layers=2, bidirectional=True, dtype=F64, backend="cpu")
    seqs = [torch.randn(n, I, dtype=F64) for n in (3, 7, 1, 5)]
    p = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    y, h = m(p)
    y, _ = pad_packed_sequence(y)
    for b, s in enumerate(seqs):
        yb, hb = m(s)  # unbatched, one sequence
        torch.testing.assert_close(y[: len(s), b], yb, **TOL[F64])
        assert torch.all(y[len(s):, b] == 0)
        torch.testing.assert_close(h[:, b], hb, **TOL[F64])


# ---------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_dropout_in_training_matches_torch_with_the_same_seed(mode, dtype):
    """Inter-layer dropout is F.dropout on each layer's whole output, in torch's order, so the
    same seed drops the same units as torch."""
    m, t = pair(mode, "cpu", dtype, num_layers=3, bidirectional=True, dropout=0.5)
    x = torch.randn(5, 3, I, dtype=dtype)
    torch.manual_seed(7)
    a = flat(m(x))
    torch.manual_seed(7)
    b = flat(t(x))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **TOL[dtype])
    torch.manual_seed(8)
    assert not torch.allclose(flat(m(x))[0], a[0])  # another seed, other units
    m.eval(), t.eval()
    for u, v in zip(flat(m(x)), flat(t(x))):  # eval: no dropout at all
        torch.testing.assert_close(u, v, **TOL[dtype])


@pytest.mark.parametrize("mode", ["lstm_proj", "gru"])
def test_dropout_packed_matches_torch_with_the_same_seed(mode):
    """torch drops units of the packed rows (N, D), not of a padded tensor: same seed, same units."""
    m, t = pair(mode, "cpu", F64, num_layers=3, bidirectional=True, dropout=0.5, batch_first=True)
    seqs = [torch.randn(n, I, dtype=F64) for n in (3, 6, 1, 4)]
    grads = []
    for mod in (m, t):
        leaves = [s.clone().requires_grad_() for s in seqs]
        torch.manual_seed(11)
        out = flat(mod(torch.nn.utils.rnn.pack_sequence(leaves, enforce_sorted=False)))
        sum(o.sum() for o in out).backward()
        grads.append(out + [s.grad for s in leaves] + [p.grad for p in mod.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[F64])


def test_dropout_packed_is_deterministic_and_drops():
    m = snn.LSTM(I, H, num_layers=2, dropout=0.5, dtype=F64, backend="cpu")
    p = torch.nn.utils.rnn.pack_sequence([torch.randn(n, I, dtype=F64) for n in (4, 6, 2)], enforce_sorted=False)
    torch.manual_seed(1)
    a = m(p)[0].data
    torch.manual_seed(1)
    b = m(p)[0].data
    assert torch.equal(a, b)
    m.eval()
    assert not torch.allclose(a, m(p)[0].data)


# ---------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode,backend,batched,with_hx,bias",
                         cases(list(CELLS), (True, True, True), [(True, False, False), (False, True, True),
                                                                 (False, False, True)], list(CELLS)))
def test_cell_matches_torch(backend, mode, batched, with_hx, bias):
    m, t = pair(mode, backend, bias=bias, cell=True)
    x = torch.randn(*((3,) if batched else ()), I, dtype=F64, requires_grad=True)
    hx = None
    if with_hx:
        shape = (3, H) if batched else (H,)
        hx = tuple(torch.randn(*shape, dtype=F64, requires_grad=True) for _ in range(2 if mode == "lstm" else 1))
        hx = hx if mode == "lstm" else hx[0]
    x2, hx2 = clone_leaves(x), clone_leaves(hx)
    args, args2 = ((x,) if hx is None else (x, hx)), ((x2,) if hx is None else (x2, hx2))
    compare(m, t, args, args2, [x] + hx_leaves(hx), [x2] + hx_leaves(hx2), TOL[F64])
    assert seqkern.last_backend(mode.split("_")[0] + "_cell") == backend


# ---------------------------------------------------------------------------
# errors: torch's exception types (and messages) for bad inputs
# ---------------------------------------------------------------------------

def _raises_like_torch(m, t, *args):
    with pytest.raises(Exception) as want:
        t(*args)
    with pytest.raises(type(want.value)) as got:
        m(*args)
    return str(got.value), str(want.value)


@pytest.mark.parametrize("mode", list(MODES))
def test_layer_errors_like_torch(mode):
    m, t = pair(mode, "cpu", torch.float32, num_layers=2)
    lstm = mode.startswith("lstm")
    P = 3 if mode == "lstm_proj" else H

    def hx(shape_h, shape_c=(2, 3, H)):
        return (torch.randn(shape_h), torch.randn(shape_c)) if lstm else torch.randn(shape_h)

    cases = [
        (torch.randn(5, 3, I + 1),),                     # wrong feature size
        (torch.randn(5, 3, I, 2),),                      # 4-D input
        (torch.randn(5, 3, I), hx((2, 4, P))),           # wrong batch in h0
        (torch.randn(5, 3, I), hx((1, 3, P))),           # wrong layers in h0
        (torch.randn(5, 3, I), hx((3, P))),              # 2-D hx for batched input
        (torch.randn(5, I), hx((2, 1, P), (2, 1, H))),   # 3-D hx for unbatched input
        (torch.randn(5, 3, I, dtype=F64),),              # dtype differs from the weights
        (torch.randn(0, 3, I),),                         # empty sequence
    ]
    if lstm:
        cases.append((torch.randn(5, 3, I), hx((2, 3, P), (2, 3, H + 1))))  # wrong c0
    for args in cases:
        got, want = _raises_like_torch(m, t, *args)
        if "size" in want or "dimensions" in want or "dtype" in want or "larger" in want:
            assert got == want


@pytest.mark.parametrize("mode", list(CELLS))
def test_cell_errors_like_torch(mode):
    m, t = pair(mode, "cpu", torch.float32, cell=True)
    lstm = mode == "lstm"

    def hx(*shape):
        return (torch.randn(*shape), torch.randn(*shape)) if lstm else torch.randn(*shape)

    cases = [
        (torch.randn(3, I + 1),),            # wrong feature size
        (torch.randn(3, I, 1),),             # 3-D input
        (torch.randn(3, I), hx(4, H)),       # batch mismatch
        (torch.randn(3, I), hx(3, H + 1)),   # wrong hidden size
        (torch.randn(3, I), hx(3, H, 1)),    # 3-D state
    ]
    for args in cases:
        got, want = _raises_like_torch(m, t, *args)
        if "inconsistent" in want or "Expected" in want or "doesn't match" in want:
            assert got == want
    with pytest.raises((TypeError, ValueError, RuntimeError), match="dtype"):
        m(torch.randn(3, I, dtype=F64))


def test_explicit_backend_that_cannot_serve_raises():
    m = snn.GRU(I, H, backend="cpu").bfloat16()
    with pytest.raises(seqkern.BackendUnavailable, match="cpu"):
        m(torch.randn(3, 2, I, dtype=torch.bfloat16))
    m.backend = None  # automatic choice falls through to the reference
    assert m(torch.randn(3, 2, I, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES) + [f"cell_{c}" for c in CELLS])
def test_cpu_bf16_autocast(mode):
    """Under CPU autocast the outputs have the dtypes of torch's module under the same autocast
    (bf16 for RNN/LSTM/RNNCell, fp32 for GRU/LSTMCell/GRUCell, an LSTM projection's c_n fp32),
    the values close to torch's, and the grads reach fp32 weights."""
    cell = mode.startswith("cell_")
    m, t = pair(mode[5:] if cell else mode, None, torch.float32, cell=cell, **({} if cell else {"num_layers": 2}))
    x = torch.randn(*((3,) if cell else (6, 3)), I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = flat(m(x)), flat(t(x))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.03)
    sum(a.float().sum() for a in got).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


# ---------------------------------------------------------------------------
# torch.compile (fullgraph) on the CPU backends
# ---------------------------------------------------------------------------

class _Model(torch.nn.Module):
    def __init__(self, backend, num_layers):
        super().__init__()
        self.lstm = snn.LSTM(I, H, num_layers=num_layers, bidirectional=True, batch_first=True, proj_size=3,
                             backend=backend)
        self.gru = snn.GRU(6, H, backend=backend)
        self.cell = snn.RNNCell(H, 4, nonlinearity="relu", backend=backend)

    def forward(self, x, h0):
        y, (h, c) = self.lstm(x)
        z, hg = self.gru(y.transpose(0, 1), h0)
        return self.cell(z[-1]), h, c, hg


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_fullgraph_matches_eager(backend):
    """Dynamo traces the layers without graph breaks (fullgraph) and with no configuration;
    aot_eager runs the fake kernels and the autograd formulas (inductor adds only codegen time)."""
    torch._dynamo.reset()
    # no Dynamo configuration needed (allow_rnn stays off: seqkern's layers are not nn.LSTM instances)
    # the reference backend traces its Python loop step by step: a shorter model
    model = _Model(backend, 2 if backend == "cpu" else 1)
    x, h0 = torch.randn(2, 4 if backend == "cpu" else 2, I), torch.randn(1, 2, H)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(allow_rnn=False):
        got = compiled(x, h0)
    want = model(x, h0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    g1 = torch.autograd.grad(sum(o.sum() for o in got), list(model.parameters()))
    g2 = torch.autograd.grad(sum(o.sum() for o in want), list(model.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_packed_sequence():
    torch._dynamo.reset()
    m = snn.LSTM(I, H, bidirectional=True, backend="cpu")

    def f(p):
        out, (h, c) = m(p)
        return out.data, h, c

    p = pack_padded_sequence(torch.randn(5, 3, I), torch.tensor([2, 5, 3]), enforce_sorted=False)
    got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(p), f(p)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# GPU: against cuDNN, and CUDA fp16 autocast
# ---------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_layer_matches_cudnn(mode):
    m, t = pair(mode, None, torch.float32, num_layers=2, bidirectional=True, batch_first=True)
    m, t = m.cuda(), t.cuda()
    x = torch.randn(4, 9, I, device="cuda", requires_grad=True)
    x2 = clone_leaves(x)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        compare(m, t, (x,), (x2,), [x], [x2], dict(rtol=1e-4, atol=1e-5))
        p = pack_padded_sequence(x.detach(), torch.tensor([9, 2, 5, 1]), batch_first=True, enforce_sorted=False)
        for a, b in zip(flat(m(p)), flat(t(p))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        with torch.autocast("cuda", dtype=torch.float16):
            got, want = flat(m(x)), flat(t(x))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float16
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", list(CELLS))
def test_cuda_cell_matches_torch(mode):
    m, t = pair(mode, None, torch.float32, cell=True)
    m, t = m.cuda(), t.cuda()
    x = torch.randn(3, I, device="cuda", requires_grad=True)
    x2 = clone_leaves(x)
    compare(m, t, (x,), (x2,), [x], [x2], dict(rtol=1e-4, atol=1e-5))
    with torch.autocast("cuda", dtype=torch.float16):
        got, want = flat(m(x)), flat(t(x))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float16
