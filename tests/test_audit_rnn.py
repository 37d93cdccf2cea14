"""The recurrent layers and cells used the way outside code uses torch.nn's: higher-order
gradients (gradient penalties, MAML), torch.func transforms over functional_call,
torch.jit.trace. Each compares with torch.nn holding the same weights."""
import pytest
import torch
from torch.func import functional_call

import seqkern
from seqkern import nn as snn

from helpers import TOL

F64 = torch.float64
I, H = 3, 4

LAYERS = {
    "lstm": (snn.LSTM, torch.nn.LSTM, {}),
    "lstm_proj": (snn.LSTM, torch.nn.LSTM, {"proj_size": 2}),
    "gru": (snn.GRU, torch.nn.GRU, {}),
    "rnn_relu": (snn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}
CELLS = {
    "lstm": (snn.LSTMCell, torch.nn.LSTMCell),
    "gru": (snn.GRUCell, torch.nn.GRUCell),
    "rnn": (snn.RNNCell, torch.nn.RNNCell),
}


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch):
    # these are about backend=None, the modules' default: the choice must be automatic
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)


def layer_pair(mode, **kw):
    ours, theirs, extra = LAYERS[mode]
    m = ours(I, H, **extra, **kw, dtype=F64)
    t = theirs(I, H, **extra, **kw, dtype=F64)
    t.load_state_dict(m.state_dict())
    return m, t


def cell_pair(mode):
    ours, theirs = CELLS[mode]
    m = ours(I, H, dtype=F64)
    t = theirs(I, H, dtype=F64)
    t.load_state_dict(m.state_dict())
    return m, t


def first(out):
    """The output tensor of a layer, or h of a cell."""
    return out[0]


def assert_grads_close(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, **TOL[F64], msg=lambda s: f"gradient {i}: {s}")


def penalty_grads(mod, x, hx):
    """A gradient penalty: || d loss / d x ||^2 differentiated again, w.r.t. the parameters,
    the input and the initial state."""
    out = mod(x) if hx is None else mod(x, hx)
    loss = first(out).pow(2).sum() + (out[1][0] if isinstance(out[1], tuple) else out[1]).sum()
    gx, = torch.autograd.grad(loss, x, create_graph=True)
    leaves = list(mod.parameters()) + [x] + ([] if hx is None else list(hx) if isinstance(hx, tuple) else [hx])
    return torch.autograd.grad(gx.pow(2).sum(), leaves, allow_unused=True, materialize_grads=True)


def leaf(*shape, seed):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("mode", list(LAYERS))
@pytest.mark.parametrize("with_hx", [False, True])
def test_layer_double_backward_like_torch(mode, with_hx):
    """torch.nn's RNNs differentiate twice; with the automatic backend seqkern's do too (the
    create_graph backward recomputes through the reference)."""
    m, t = layer_pair(mode, num_layers=2, bidirectional=True)
    P = 2 if mode == "lstm_proj" else H

    def inputs():
        x = leaf(5, 2, I, seed=1)
        if not with_hx:
            return x, None
        h = leaf(4, 2, P, seed=2)
        return x, ((h, leaf(4, 2, H, seed=3)) if mode.startswith("lstm") else h)

    assert_grads_close(penalty_grads(m, *inputs()), penalty_grads(t, *inputs()))
    assert seqkern.last_backend(mode.split("_")[0]) == "cpu"


@pytest.mark.parametrize("mode", list(CELLS))
def test_cell_double_backward_like_torch(mode):
    m, t = cell_pair(mode)

    def inputs():
        h = leaf(2, H, seed=2)
        return leaf(2, I, seed=1), ((h, leaf(2, H, seed=3)) if mode == "lstm" else h)

    assert_grads_close(penalty_grads(m, *inputs()), penalty_grads(t, *inputs()))


@pytest.mark.parametrize("kind", ["layer", "cell"])
def test_double_backward_with_inputs_computed_from_each_other(kind):
    """h0 and c0 computed from x (and c0 from h0): the create_graph backward must give each
    input's own partial derivative, the paths between them being the caller's graph."""
    m, t = layer_pair("lstm") if kind == "layer" else cell_pair("lstm")

    def grads(mod):
        x = leaf(*((5, 2, I) if kind == "layer" else (2, I)), seed=1)
        h = (x[0] if kind == "layer" else x)[:, :1].tanh() * leaf(*((1, 2, H) if kind == "layer" else (2, H)), seed=2)
        out = mod(x, (h, h * 0.5))
        loss = first(out).pow(2).sum() + out[1][1].sum()
        gx, = torch.autograd.grad(loss, x, create_graph=True)
        return (gx,) + torch.autograd.grad(gx.pow(2).sum(), [x] + list(mod.parameters()))

    assert_grads_close(grads(m), grads(t))


def test_explicit_fused_backend_still_refuses_double_backward():
    m = snn.GRU(I, H, dtype=F64, backend="cpu")
    x = leaf(5, 2, I, seed=1)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        gx, = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
        gx.sum().backward()


@pytest.mark.parametrize("kind", ["layer", "cell"])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_torch_func_grad_over_functional_call(kind, mode):
    """MAML-style: torch.func.grad of a loss of functional_call(module, params, x)."""
    m, t = layer_pair(mode) if kind == "layer" else cell_pair(mode)
    x = torch.randn(5, 2, I, dtype=F64) if kind == "layer" else torch.randn(2, I, dtype=F64)
    hx = torch.randn(1, 2, H, dtype=F64) if kind == "layer" else torch.randn(2, H, dtype=F64)
    hx = (hx, hx.flip(-1)) if mode == "lstm" else hx

    def loss(params, mod):
        out = functional_call(mod, params, (x, hx))
        return (out[0] if kind == "layer" else out if mode == "gru" else out[1]).pow(2).sum()

    params = {n: p.detach() for n, p in m.named_parameters()}
    got = torch.func.grad(loss)(params, m)
    want = torch.func.grad(loss)(params, t)
    assert_grads_close([got[n] for n in params], [want[n] for n in params])


def test_torch_func_with_explicit_fused_backend_says_why():
    m = snn.GRU(I, H, dtype=F64, backend="cpu")
    params = {n: p.detach() for n, p in m.named_parameters()}
    x = torch.randn(5, 2, I, dtype=F64)
    with pytest.raises(seqkern.BackendUnavailable, match="torch.func"):
        torch.func.grad(lambda p: functional_call(m, p, (x,))[0].sum())(params)


@pytest.mark.parametrize("mode", ["lstm_proj", "gru"])
def test_jit_trace_layer(mode):
    """torch.jit.trace checks its trace by rerunning it under no_grad: the traced graph must not
    depend on the grad mode, and the traced module must still differentiate."""
    m, t = layer_pair(mode, num_layers=2, bidirectional=True)
    traced = torch.jit.trace(m, (torch.randn(4, 2, I, dtype=F64),))
    x = leaf(4, 2, I, seed=1)
    x2 = x.detach().clone().requires_grad_()
    got, want = traced(x), t(x2)
    torch.testing.assert_close(got, want, **TOL[F64])
    first(got).sum().backward()
    first(want).sum().backward()
    assert_grads_close([x.grad] + [p.grad for p in m.parameters()], [x2.grad] + [p.grad for p in t.parameters()])


@pytest.mark.parametrize("mode", list(CELLS))
def test_jit_trace_cell(mode):
    m, t = cell_pair(mode)
    traced = torch.jit.trace(m, (torch.randn(2, I, dtype=F64),))
    x = leaf(2, I, seed=1)
    x2 = x.detach().clone().requires_grad_()
    got, want = traced(x), t(x2)
    torch.testing.assert_close(got, want, **TOL[F64])
    (got if mode != "lstm" else got[1]).sum().backward()
    (want if mode != "lstm" else want[1]).sum().backward()
    assert_grads_close([x.grad] + [p.grad for p in m.parameters()], [x2.grad] + [p.grad for p in t.parameters()])


def _error_cases():
    x = torch.randn(5, 2, I)
    h64 = torch.zeros(1, 2, H, dtype=F64)
    c = torch.zeros(1, 2, H)
    return [
        ("lstm", (x, (h64, c))),                         # h_0 of another dtype than the input
        ("lstm", (x, (c, c, c))),                        # three states
        ("lstm", (x, torch.zeros(2, 1, 2, H))),          # one tensor for the pair
        ("gru", (x, h64)),
        ("rnn_relu", (x, h64)),
        ("cell_lstm", (torch.randn(2, I, dtype=F64),)),  # input of another dtype than the weights
        ("cell_lstm", (torch.randn(2, I), (c[0], c[0], c[0]))),
        ("cell_gru", (torch.randn(2, I), h64[0])),
        ("cell_rnn", (torch.randn(2, I, dtype=F64),)),
    ]


@pytest.mark.parametrize("case", range(len(_error_cases())))
def test_bad_state_raises_what_torch_raises(case):
    """Code that catches torch's exception (pytest.raises(RuntimeError)) catches ours, which is
    also a TypeError (seqkern's rule for a wrong kind of argument)."""
    mode, args = _error_cases()[case]
    if mode.startswith("cell_"):
        ours, theirs = CELLS[mode[5:]]
        m, t = ours(I, H), theirs(I, H)
    else:
        ours, theirs, extra = LAYERS[mode]
        m, t = ours(I, H, **extra), theirs(I, H, **extra)
    with pytest.raises(Exception) as want:
        t(*args)
    with pytest.raises(type(want.value)) as got:
        m(*args)
    assert isinstance(got.value, TypeError)


class _Tagger(torch.nn.Module):
    """A model of the kind that gets scripted for deployment."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, I)
        self.rnn = torch.nn.LSTM(I, H, num_layers=2, batch_first=True, bidirectional=True)
        self.cell = torch.nn.GRUCell(2 * H, H)
        self.out = torch.nn.Linear(H, 3)

    def forward(self, tok):
        y, _ = self.rnn(self.emb(tok))
        return self.out(self.cell(y[:, -1]))


def test_jit_script_of_a_model_after_replace_modules():
    """torch.jit.script works on models holding seqkern's layers and cells as on torch's: the
    scripted model holds torch's modules with the same parameters."""
    ref = _Tagger().double()
    model = seqkern.replace_modules(_Tagger().double())
    model.load_state_dict(ref.state_dict())
    tok = torch.randint(0, 10, (2, 5))
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(tok), ref(tok), **TOL[F64])
    for mode in CELLS:  # a cell as the root
        m, t = cell_pair(mode)
        x = torch.randn(2, I, dtype=F64)
        torch.testing.assert_close(torch.jit.script(m)(x), t(x), **TOL[F64])


@pytest.mark.parametrize("kind", ["layer", "cell"])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_forward_mode_ad_like_torch(kind, mode):
    """torch.autograd.forward_ad dual inputs (fp64, where torch's LSTM takes its native path
    that supports forward AD): tangents like torch's, through the reference."""
    import torch.autograd.forward_ad as fwAD

    m, t = layer_pair(mode) if kind == "layer" else cell_pair(mode)
    x = torch.randn(*((5, 2, I) if kind == "layer" else (2, I)), dtype=F64)
    v = torch.randn_like(x)
    tangents = []
    for mod in (m, t):
        with fwAD.dual_level():
            out = mod(fwAD.make_dual(x, v))
            out = out[0] if isinstance(out, tuple) else out
            tangents.append(fwAD.unpack_dual(out).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], **TOL[F64])


@pytest.mark.parametrize("mode", list(LAYERS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_in_place_op_on_the_output_then_backward(mode, batch_first):
    """out, _ = rnn(x); F.relu(out, inplace=True): torch.nn's RNNs (fp64, native path) allow
    it; the output must not be something the backward reads."""
    m, t = layer_pair(mode, batch_first=batch_first)
    grads = []
    for mod in (m, t):
        x = leaf(2, 5, I, seed=1)
        out, state = mod(x)
        out.mul_(torch.linspace(0.5, 2, out.shape[-1], dtype=F64))
        torch.nn.functional.relu(out, inplace=True)
        (out.sum() + (state[0] if isinstance(state, tuple) else state).sum()).backward()
        grads.append([x.grad] + [p.grad for p in mod.parameters()])
    assert_grads_close(*grads)
