"""torch.compile(fullgraph=True), torch.export, autocast and double backward across the
families: recurrent layers and ops, attention (module and op), rotary, WKV.

Compile tests use the ``aot_eager`` compiler: Dynamo (graph breaks fail with
``fullgraph=True``) plus AOTAutograd (fake kernels and ``register_autograd`` of the
custom ops), which is everything seqkern contributes to a compiled graph; one test runs
the default Inductor compiler on a model using every family. On CPU the ``cpu`` and
``reference`` backends are compiled; Triton's compile test is cuda-marked (a
``triton_op`` cannot be compiled under the interpreter, DESIGN.md).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import seqkern
from seqkern import functional as SF, nn as snn

from helpers import TOL

D64 = torch.float64
CPU_BACKENDS = ["reference", "cpu"]


def need_layers():
    if snn.LSTM is None:  # seqkern/nn/rnn.py not on this branch yet
        pytest.skip("seqkern.nn recurrent layers not landed yet")


def kernel_built(op):
    """Whether seqkern._C has the C++ kernel of ``op`` (a family may land before its kernels)."""
    ext = seqkern.backends.extension()
    return ext is not None and hasattr(torch.ops.seqkern_C, _C_OP[op])


_C_OP = {"scaled_dot_product_attention": "sdpa_forward", "lstm": "rnn_forward", "gru": "rnn_forward",
         "lstm_cell": "rnn_forward", "wkv4": "wkv4_forward", "apply_rotary": "rotary_forward"}


def serve_or_skip(op, backend, *probe):
    """Skip (visibly) a backend whose kernel for ``op`` is not built here; its own test file fails for that."""
    ok, reason = seqkern.backends.explain(op, *probe)[backend]
    if ok and backend == "cpu" and not kernel_built(op):
        ok, reason = False, f"seqkern._C has no {_C_OP[op]}"
    if ok and backend == "triton" and importlib.util.find_spec(f"seqkern.kernels.{_KERNEL_MODULE[op]}") is None:
        ok, reason = False, f"kernels/{_KERNEL_MODULE[op]}.py is not there"
    if not ok:
        pytest.skip(f"{op} has no {backend} kernel here: {reason}")


_KERNEL_MODULE = {"scaled_dot_product_attention": "attention", "lstm": "rnn", "gru": "rnn", "rnn_tanh": "rnn",
                  "wkv4": "wkv", "apply_rotary": "rotary"}


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        res += _flat(o) if o is not None else []
    return res


def check_compiled(fn, inputs, params=(), compiler="aot_eager", dtype=D64):
    """Outputs and every gradient of ``fn`` compiled fullgraph equal eager."""
    torch._dynamo.reset()
    leaves = [t for t in list(inputs) + list(params) if isinstance(t, torch.Tensor) and t.requires_grad]

    def run(f):
        outs = _flat(f(*inputs))
        loss = sum((o.double() * (i + 1) / o.numel()).sum() for i, o in enumerate(outs) if o.is_floating_point())
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [o.detach() for o in outs], grads

    eager_out, eager_grads = run(fn)
    comp_out, comp_grads = run(torch.compile(fn, fullgraph=True, backend=compiler))
    tol = TOL[dtype]
    for a, b in zip(comp_out, eager_out):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(comp_grads, eager_grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **tol)


def rand(*shape, dtype=D64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# ---------------------------------------------------------------------------
# torch.compile: recurrent family
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_recurrent_layers_and_cells(backend):
    need_layers()
    serve_or_skip("lstm", backend, rand(3, 2, 4))
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = snn.LSTM(4, 5, bidirectional=True, batch_first=True, backend=backend)
            self.gru = snn.GRU(10, 4, backend=backend)
            self.rnn = snn.RNN(4, 4, nonlinearity="relu", backend=backend)
            self.cell = snn.LSTMCell(4, 4, backend=backend)
            self.gcell = snn.GRUCell(4, 4, backend=backend)
            self.rcell = snn.RNNCell(4, 4, backend=backend)

        def forward(self, x):
            y, _ = self.lstm(x)
            y, h = self.gru(y.transpose(0, 1))
            y, _ = self.rnn(y, h)
            h, c = None, None
            for t in range(y.shape[0]):
                h, c = self.cell(y[t], None if h is None else (h, c))
            return self.rcell(self.gcell(h), c)

    m = Model().double()
    check_compiled(m, (rand(2, 2, 4),), m.parameters())
    assert seqkern.last_backend("lstm") == backend


def test_compile_after_replace_modules_where_torch_graph_breaks():
    """torch.compile(fullgraph=True) refuses torch's own RNN modules (Dynamo: "Attempted to
    wrap RNN, GRU, or LSTM"); the same model after seqkern.replace_modules compiles."""
    need_layers()
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"lstm": torch.nn.LSTM(4, 4, batch_first=True),
                                 "mha": torch.nn.MultiheadAttention(4, 2, batch_first=True)}).double()

    def fn(x):
        y, _ = model["lstm"](x)
        return model["mha"](y, y, y, need_weights=False)[0]

    x = rand(2, 3, 4)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=False), pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(fn, fullgraph=True, backend="eager")(x)
    seqkern.replace_modules(model)
    check_compiled(fn, (x,), model.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_compile_packed_sequence(backend, enforce_sorted):
    need_layers()
    serve_or_skip("gru", backend, rand(3, 2, 4))
    m = snn.GRU(3, 4, bidirectional=True, backend=backend).double()
    # torch's pack_padded_sequence itself graph-breaks (Dynamo skips torch.nn.utils.rnn): pack outside
    lengths = torch.tensor([4, 3, 2] if enforce_sorted else [4, 2, 3])
    p = torch.nn.utils.rnn.pack_padded_sequence(rand(4, 3, 3, grad=False), lengths, enforce_sorted=enforce_sorted)
    x = p.data.requires_grad_()
    packed = torch.nn.utils.rnn.PackedSequence(x, p.batch_sizes, p.sorted_indices, p.unsorted_indices)

    def fn(packed):
        out, h = m(packed)
        return out.data, h

    check_compiled(fn, (packed,), [x] + list(m.parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_recurrent_ops(backend):
    serve_or_skip("lstm", backend, rand(3, 2, 4))
    x, h0, c0 = rand(5, 2, 3), rand(2, 4), rand(2, 4)
    w_ih, w_hh, b = rand(16, 3), rand(16, 4), rand(16)
    gw_ih, gw_hh = rand(12, 3), rand(12, 4)
    lengths = torch.tensor([5, 3])

    def fn(x, h0, c0):
        y, (h, c) = SF.lstm(x, (h0, c0), w_ih, w_hh, b, None, lengths=lengths, reverse=True, backend=backend)
        y2, h2 = SF.gru(x, h, gw_ih, gw_hh, None, None, backend=backend)
        return y, c, y2, h2

    check_compiled(fn, (x, h0, c0), (w_ih, w_hh, b, gw_ih, gw_hh))


# ---------------------------------------------------------------------------
# torch.compile: attention, rotary, WKV
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_compile_multihead_attention(backend, need_weights):
    serve_or_skip("scaled_dot_product_attention", backend, *([rand(1, 1, 2, 4)] * 3), None, 0.0, False)
    torch.manual_seed(0)
    m = snn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True, backend=backend).double()
    kpm = torch.tensor([[False] * 5 + [True], [False] * 6])
    am = torch.rand(4, 6) < 0.2

    def fn(q, kv):
        return m(q, kv, kv, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)

    check_compiled(fn, (rand(2, 4, 8), rand(2, 6, 8)), m.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_attention_dropout_in_training(backend):
    """Attention dropout in training compiles fullgraph (Dynamo captures the seed drawn from
    torch's generator as a symbolic int), and under aot_eager with the same torch.manual_seed the
    compiled model drops what eager drops (inductor has its own RNG, as for torch's dropout)."""
    serve_or_skip("scaled_dot_product_attention", backend, *([rand(1, 1, 2, 4)] * 3), None, 0.3, False)
    torch.manual_seed(0)
    m = snn.MultiheadAttention(8, 2, dropout=0.4, batch_first=True, backend=backend).double().train()

    def fn(q, kv):
        a, _ = m(q, kv, kv, need_weights=False)
        b = SF.scaled_dot_product_attention(q.view(2, 4, 2, 4).transpose(1, 2), kv.view(2, 6, 2, 4).transpose(1, 2),
                                            kv.view(2, 6, 2, 4).transpose(1, 2),
                                            dropout_p=0.5, backend=backend)
        return a, b

    q, kv = rand(2, 4, 8), rand(2, 6, 8)
    leaves = [q, kv, *m.parameters()]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled, compiled):
        torch.manual_seed(7)
        outs = f(q, kv)
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
        results.append([o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves)))
    for eager, comp in zip(results[0], results[1]):
        torch.testing.assert_close(comp, eager, **TOL[D64])
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[2]))
    torch.manual_seed(8)
    assert not torch.equal(compiled(q, kv)[1], results[1][1]), "the seed does not reach the dropout mask"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_sdpa_with_rotary(backend):
    q, k, v = rand(2, 4, 7, 8), rand(2, 2, 7, 8), rand(2, 2, 7, 8)
    serve_or_skip("scaled_dot_product_attention", backend, q, k, v, None, 0.0, True)
    cos, sin = SF.rotary_cos_sin(7, 8, dtype=D64)
    rope = snn.RotaryEmbedding(6).double()
    mask = torch.rand(7, 7) < 0.8

    def fn(q, k, v):
        qr, kr = SF.apply_rotary(q, k, cos, sin, backend=backend)
        a = SF.scaled_dot_product_attention(qr, kr, v, is_causal=True, enable_gqa=True, backend=backend)
        qr2, kr2 = rope(q, k)
        b = SF.scaled_dot_product_attention(qr2, kr2.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                            attn_mask=mask, backend=backend)
        # rotary fused into the attention kernels' loads (cos/sin reach the op)
        c = SF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, rotary=(cos, sin),
                                            backend=backend)
        return a, b, c

    check_compiled(fn, (q, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_wkv4(backend):
    k, v = rand(2, 6, 5), rand(2, 6, 5)
    serve_or_skip("wkv4", backend, rand(5), rand(5), k, v, None)
    w, u = rand(5), rand(5)

    def fn(w, u, k, v):
        y, state = SF.wkv4(w, u, k[:, :4], v[:, :4], backend=backend)
        y2, state2 = SF.wkv4(w, u, k[:, 4:], v[:, 4:], state, backend=backend)  # continues the sequence
        return y, y2, state2

    check_compiled(fn, (w, u, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_rwkv_block(backend):
    if snn.RWKV4Block is None:
        pytest.skip("seqkern.nn.RWKV4Block not landed yet")
    serve_or_skip("wkv4", backend, rand(5), rand(5), rand(2, 3, 8), rand(2, 3, 8), None)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([snn.RWKV4Block(8, 16, i) for i in range(2)]).double()
    for b in blocks:
        b.att.backend = backend if hasattr(b.att, "backend") else None

    def fn(x):
        state = None
        for b in blocks:
            x, state = b(x, state)
        return x

    check_compiled(fn, (rand(2, 5, 8),), blocks.parameters())


def test_inductor_model_using_every_family():
    """The default compiler (Inductor) on one model that uses each family's layer or op."""
    need_layers()
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = snn.LSTM(8, 8, batch_first=True)
            self.mha = snn.MultiheadAttention(8, 2, batch_first=True)
            self.rope = snn.RotaryEmbedding(4)
            self.w, self.u = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            y, _ = self.lstm(x)
            a, _ = self.mha(y, y, y, need_weights=False)
            q, k = self.rope(a[:, None], y[:, None])
            o = SF.scaled_dot_product_attention(q, k, k, is_causal=True)[:, 0]
            z, _ = SF.wkv4(self.w, self.u, o, y, backend=None if kernel_built("wkv4") else "reference")
            return z

    m = Model()
    check_compiled(m, (rand(2, 5, 8, dtype=torch.float32),), m.parameters(), compiler="inductor",
                   dtype=torch.float32)


@pytest.mark.cuda
def test_compile_triton_backends_on_gpu():
    dev = "cuda"
    torch.manual_seed(0)
    m = snn.LSTM(8, 16, batch_first=True, backend="triton").to(dev)
    mha = snn.MultiheadAttention(16, 2, batch_first=True, backend="triton").to(dev)

    def fn(x):
        y, _ = m(x)
        return mha(y, y, y, need_weights=False)[0]

    x = torch.randn(2, 9, 8, device=dev, requires_grad=True)
    check_compiled(fn, (x,), list(m.parameters()) + list(mha.parameters()), compiler="inductor", dtype=torch.float32)


# ---------------------------------------------------------------------------
# torch.export: one small model per op
# ---------------------------------------------------------------------------

def _export_cases():
    torch.manual_seed(0)
    d = D64
    w4, w3 = torch.randn(16, 3, dtype=d), torch.randn(12, 3, dtype=d)
    u4, u3, u1 = torch.randn(16, 4, dtype=d), torch.randn(12, 4, dtype=d), torch.randn(4, 4, dtype=d)
    cos, sin = SF.rotary_cos_sin(5, 4, dtype=d)
    x = torch.randn(5, 2, 3, dtype=d)
    return {
        "lstm": (lambda x: SF.lstm(x, None, w4, u4, backend="cpu")[0], (x,)),
        "gru": (lambda x: SF.gru(x, None, w3, u3, backend="cpu")[0], (x,)),
        "rnn": (lambda x: SF.rnn(x, None, w4[:4], u1, nonlinearity="relu", backend="cpu")[0], (x,)),
        "lstm_cell": (lambda x: SF.lstm_cell(x, None, w4, u4, backend="cpu")[1], (x[0],)),
        "gru_cell": (lambda x: SF.gru_cell(x, None, w3, u3, backend="cpu"), (x[0],)),
        "rnn_cell": (lambda x: SF.rnn_cell(x, None, w4[:4], u1, backend="cpu"), (x[0],)),
        "sdpa": (lambda q: SF.scaled_dot_product_attention(q, q, q, is_causal=True),
                 (torch.randn(2, 2, 5, 4, dtype=d),)),
        "apply_rotary": (lambda q: SF.apply_rotary(q, q * 2, cos, sin, backend="cpu")[1],
                         (torch.randn(2, 2, 5, 4, dtype=d),)),
        "wkv4": (lambda k: SF.wkv4(w4[0, :3], w4[1, :3], k, k.flip(1), backend="cpu")[0],
                 (torch.randn(2, 5, 3, dtype=d),)),
        "MultiheadAttention": (snn.MultiheadAttention(4, 2).double(), (torch.randn(5, 2, 4, dtype=d),) * 3),
        "LSTM": (snn.LSTM(3, 4, num_layers=2).double() if snn.LSTM is not None else None, (x,)),
    }


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("name", list(_export_cases()))
def test_export(name):
    if name == "LSTM":
        need_layers()
    fn, args = _export_cases()[name]
    if name == "wkv4" and not kernel_built("wkv4"):
        pytest.skip("seqkern._C has no wkv4_forward yet")
    mod = fn if isinstance(fn, torch.nn.Module) else _Wrap(fn)
    with torch.no_grad():
        ep = torch.export.export(mod, args)
        torch.testing.assert_close(_flat(ep.module()(*args)), _flat(mod(*args)), **TOL[D64])
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    if name not in ("sdpa", "MultiheadAttention"):  # those run the reference (plain aten ops) on CPU for now
        assert any("seqkern" in t for t in targets), f"no seqkern op in the exported graph: {sorted(targets)}"


# ---------------------------------------------------------------------------
# autocast (CPU bf16)
# ---------------------------------------------------------------------------

def _autocast_layers():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 4)
    return {
        "RNN": (lambda m: m(x)[0], "RNN"), "LSTM": (lambda m: m(x)[0], "LSTM"), "GRU": (lambda m: m(x)[0], "GRU"),
        "RNNCell": (lambda m: m(x[0]), "RNNCell"), "LSTMCell": (lambda m: m(x[0])[0], "LSTMCell"),
        "GRUCell": (lambda m: m(x[0]), "GRUCell"),
        "MultiheadAttention": (lambda m: m(x, x, x, need_weights=False)[0], "MultiheadAttention"),
        "MultiheadAttention-weights": (lambda m: m(x, x, x)[0], "MultiheadAttention"),
    }


@pytest.mark.parametrize("name", list(_autocast_layers()))
def test_autocast_cpu_bf16_layers(name):
    """Under CPU bf16 autocast every layer returns the dtype torch.nn's module returns (bf16 for
    RNN/LSTM/RNNCell/MultiheadAttention, fp32 for GRU/LSTMCell/GRUCell), close to fp32."""
    need_layers()
    call, cls = _autocast_layers()[name]
    args = (4, 2) if cls == "MultiheadAttention" else (4, 4)
    torch.manual_seed(1)
    m = getattr(snn, cls)(*args)
    expect = call(m)
    t = getattr(torch.nn, cls)(*args)
    t.load_state_dict(m.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = call(m), call(t)
    assert got.dtype == want.dtype, f"{name} under CPU bf16 autocast gave {got.dtype}, torch {want.dtype}"
    torch.testing.assert_close(got.float(), expect, rtol=0.05, atol=0.05)
    # fp64 is left alone by autocast
    m64 = getattr(snn, cls)(*args).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if cls == "MultiheadAttention":
            x = torch.randn(5, 2, 4, dtype=D64)
            out = m64(x, x, x)[0]
        elif "Cell" in cls:
            out = _flat(m64(torch.randn(2, 4, dtype=D64)))[0]
        else:
            out = m64(torch.randn(5, 2, 4, dtype=D64))[0]
    assert out.dtype == D64


def test_autocast_cpu_bf16_sdpa_matches_torch_rule():
    """torch's SDPA casts fp32 inputs to bf16 under CPU autocast; seqkern's must too."""
    q = torch.randn(2, 2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.scaled_dot_product_attention(q, q, q)
        got = SF.scaled_dot_product_attention(q, q, q)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("op", ["apply_rotary", "wkv4"])
def test_autocast_elementwise_ops_keep_input_dtype(op):
    """Ops without a torch counterpart that are not matmuls (rotary, the WKV recurrence) are
    not on autocast's lists: like torch's elementwise ops they run in their inputs' dtype."""
    if op == "apply_rotary":
        q = torch.randn(2, 2, 5, 8)
        cos, sin = SF.rotary_cos_sin(5, 8)
        fn = lambda: SF.apply_rotary(q, q, cos, sin)  # noqa: E731
    else:
        k = torch.randn(2, 5, 8)
        w, u = torch.randn(8), torch.randn(8)
        fn = lambda: SF.wkv4(w, u, k, k, backend=None if kernel_built("wkv4") else "reference")  # noqa: E731
    expect = fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn()
    for a, b in zip(got, expect):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------

def _double_backward_cases(backend):
    torch.manual_seed(0)
    w, u, b = rand(8, 3), rand(8, 2), rand(8)
    gw, gu = rand(6, 3), rand(6, 2)
    td, tf = rand(3) * 0.5, rand(3) * 0.5
    cos, sin = SF.rotary_cos_sin(3, 4, dtype=D64)
    return {
        "gru": (lambda x: SF.gru(x, None, gw, gu, backend=backend)[0], (rand(3, 2, 3),)),
        "lstm": (lambda x: SF.lstm(x, None, w, u, b, None, backend=backend)[0], (rand(3, 2, 3),)),
        "lstm_cell": (lambda x: SF.lstm_cell(x, None, w, u, b, b, backend=backend)[1], (rand(2, 3),)),
        "scaled_dot_product_attention": (
            lambda q, k: SF.scaled_dot_product_attention(q, k, k, is_causal=True, backend=backend),
            (rand(1, 2, 3, 4), rand(1, 2, 3, 4))),
        "wkv4": (lambda k: SF.wkv4(td, tf, k, k * 0.7, backend=backend)[0], (rand(1, 3, 3),)),
        "apply_rotary": (lambda q: SF.apply_rotary(q, q, cos, sin, backend=backend)[0], (rand(1, 3, 4),)),
    }


@pytest.mark.parametrize("op", list(_double_backward_cases("reference")))
def test_double_backward_reference(op):
    fn, args = _double_backward_cases("reference")[op]
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("op", ["gru", "lstm", "lstm_cell", "scaled_dot_product_attention", "wkv4"])
def test_double_backward_fused_backend_raises_clearly(op):
    fn, args = _double_backward_cases("cpu")[op]
    if not seqkern.backends.available("cpu")[0]:
        pytest.fail("the cpu backend must be built")
    if not kernel_built(op):
        pytest.skip(f"{op} has no cpu kernel here yet")
    out = fn(*args)
    # a first-order backward works
    torch.autograd.grad(out.sum(), args, retain_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        g = torch.autograd.grad(out.sum(), args, create_graph=True)
        torch.autograd.grad(sum(t.sum() for t in g), args)


def test_double_backward_rotary_every_backend():
    # rotary's backward is its own forward (a rotation's adjoint): differentiable twice on cpu too
    fn, args = _double_backward_cases("cpu")["apply_rotary"]
    assert torch.autograd.gradgradcheck(fn, args)
