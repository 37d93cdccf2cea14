"""Recurrent ops (rnn, lstm, gru and cells): the reference vs torch.nn with copied weights,
every backend vs the reference (outputs, final states, every gradient), gradcheck,
opcheck, lengths and reverse, errors."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkern
from seqkern import functional as SF
from seqkern.ops import rnn as R

from helpers import TOL, backend_param, require

F64 = torch.float64
# fused backends of this family that exist so far (cpu C++ and triton land next)
FUSED = [backend_param("cpu"), backend_param("triton")]
REF_CPU = ["reference"] + FUSED[:1]


def layer_weights(mod, suffix):
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return [getattr(mod, f"{n}_l0{suffix}", None) for n in names]


def call(kind, x, h0, c0, w, **kw):
    """Runs SF.<kind> with the weights list [w_ih, w_hh, b_ih, b_hh, w_hr]; returns (y, h_T, c_T or None)."""
    if kind == "lstm":
        y, (h, c) = SF.lstm(x, (h0, c0), *w[:4], w[4], **kw)
        return y, h, c
    if kind == "gru":
        y, h = SF.gru(x, h0, *w[:4], **kw)
        return y, h, None
    y, h = SF.rnn(x, h0, *w[:4], nonlinearity=kind.split("_")[1], **kw)
    return y, h, None


def torch_module(kind, I, H, **kw):
    if kind == "lstm":
        return torch.nn.LSTM(I, H, dtype=F64, **kw)
    if kind == "gru":
        return torch.nn.GRU(I, H, dtype=F64, **kw)
    return torch.nn.RNN(I, H, nonlinearity=kind.split("_")[1], dtype=F64, **kw)


KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


# ---------------------------------------------------------------------------
# reference vs torch.nn
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,proj", [("lstm", 0), ("lstm", 3), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_torch_bidirectional(kind, proj, bias):
    T, Bsz, I, H = 6, 3, 5, 7
    kw = dict(proj_size=proj) if proj else {}
    mod = torch_module(kind, I, H, bias=bias, bidirectional=True, **kw)
    P = proj or H
    x = torch.randn(T, Bsz, I, dtype=F64)
    h0 = torch.randn(2, Bsz, P, dtype=F64)
    c0 = torch.randn(2, Bsz, H, dtype=F64)
    with torch.no_grad():
        if kind == "lstm":
            yt, (ht, ct) = mod(x, (h0, c0))
        else:
            yt, ht = mod(x, h0)
        yf, hf, cf = call(kind, x, h0[0], c0[0], layer_weights(mod, ""), backend="reference")
        yb, hb, cb = call(kind, x, h0[1], c0[1], layer_weights(mod, "_reverse"), reverse=True, backend="reference")
    assert seqkern.last_backend(kind.split("_")[0]) == "reference"
    torch.testing.assert_close(torch.cat((yf, yb), -1), yt)
    torch.testing.assert_close(torch.stack((hf, hb)), ht)
    if kind == "lstm":
        torch.testing.assert_close(torch.stack((cf, cb)), ct)


@pytest.mark.parametrize("kind,proj", [("lstm", 0), ("lstm", 2), ("gru", 0), ("rnn_tanh", 0)])
@pytest.mark.parametrize("sorted_", [True, False])
def test_reference_lengths_match_packed_sequence(kind, proj, sorted_):
    T, I, H = 7, 4, 5
    lengths = torch.tensor([7, 5, 5, 2, 1]) if sorted_ else torch.tensor([3, 7, 1, 5, 2])
    Bsz = len(lengths)
    kw = dict(proj_size=proj) if proj else {}
    mod = torch_module(kind, I, H, bidirectional=True, **kw)
    P = proj or H
    x = torch.randn(T, Bsz, I, dtype=F64)
    h0, c0 = torch.randn(2, Bsz, P, dtype=F64), torch.randn(2, Bsz, H, dtype=F64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=sorted_)
    with torch.no_grad():
        out, hn = mod(packed, (h0, c0)) if kind == "lstm" else mod(packed, h0)
        yt, _ = pad_packed_sequence(out, total_length=T)
        yf, hf, cf = call(kind, x, h0[0], c0[0], layer_weights(mod, ""), lengths=lengths, backend="reference")
        yb, hb, cb = call(kind, x, h0[1], c0[1], layer_weights(mod, "_reverse"), lengths=lengths, reverse=True,
                          backend="reference")
    torch.testing.assert_close(torch.cat((yf, yb), -1), yt)
    if kind == "lstm":
        hn, cn = hn
        torch.testing.assert_close(torch.stack((cf, cb)), cn)
    torch.testing.assert_close(torch.stack((hf, hb)), hn)


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_reference_cells_match_torch(unbatched, with_state):
    I, H, Bsz = 4, 6, 3
    shape = (I,) if unbatched else (Bsz, I)
    sshape = (H,) if unbatched else (Bsz, H)
    x = torch.randn(shape, dtype=F64)
    h, c = torch.randn(sshape, dtype=F64), torch.randn(sshape, dtype=F64)
    lc, gc = torch.nn.LSTMCell(I, H, dtype=F64), torch.nn.GRUCell(I, H, dtype=F64)
    with torch.no_grad():
        w = lambda m: (m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh)  # noqa: E731
        got = SF.lstm_cell(x, (h, c) if with_state else None, *w(lc), backend="reference")
        want = lc(x, (h, c)) if with_state else lc(x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(SF.gru_cell(x, h if with_state else None, *w(gc), backend="reference"),
                                   gc(x, h) if with_state else gc(x))
        for nl in ("tanh", "relu"):
            rc = torch.nn.RNNCell(I, H, nonlinearity=nl, dtype=F64)
            torch.testing.assert_close(
                SF.rnn_cell(x, h if with_state else None, *w(rc), nonlinearity=nl, backend="reference"),
                rc(x, h) if with_state else rc(x))
    assert seqkern.last_backend("rnn_cell") == "reference"


# ---------------------------------------------------------------------------
# every backend against the reference
# ---------------------------------------------------------------------------

def make_inputs(kind, T, Bsz, I, H, proj=0, bias=True, dtype=F64, requires_grad=True, scale=0.5):
    G = R._GATES[kind]
    P = proj or H
    g = lambda *s: (torch.randn(*s, dtype=dtype) * scale).requires_grad_(requires_grad)  # noqa: E731
    x, h0 = g(T, Bsz, I), g(Bsz, P)
    c0 = g(Bsz, H) if kind == "lstm" else None
    w = [g(G * H, I), g(G * H, P), g(G * H) if bias else None, g(G * H) if bias else None,
         g(P, H) if proj else None]
    return x, h0, c0, w


CASES = [  # kind, T, B, I, H, proj, bias, lengths, reverse
    ("lstm", 5, 3, 4, 6, 0, True, None, False),
    ("lstm", 6, 4, 3, 5, 0, False, [6, 2, 0, 4], True),
    ("lstm", 4, 3, 5, 6, 2, True, [4, 1, 3], False),
    ("lstm", 5, 2, 3, 7, 3, True, [2, 5], True),
    ("gru", 5, 3, 4, 6, 0, True, None, True),
    ("gru", 6, 4, 3, 5, 0, True, [6, 2, 0, 4], False),
    ("gru", 4, 2, 5, 3, 0, False, [1, 4], True),
    ("rnn_tanh", 5, 3, 4, 6, 0, True, [5, 3, 1], True),
    ("rnn_relu", 6, 2, 3, 5, 0, True, None, False),
    ("rnn_relu", 4, 3, 3, 4, 0, False, [2, 4, 3], True),
    ("lstm", 5, 1, 4, 6, 0, False, [3], True),  # batch 1: its own fp32 forward
    ("rnn_tanh", 4, 1, 3, 5, 0, True, None, False),
]


def run_all(kind, inputs, lengths, reverse, backend):
    x, h0, c0, w = inputs
    L = None if lengths is None else torch.tensor(lengths)
    return call(kind, x, h0, c0, w, lengths=L, reverse=reverse, backend=backend)


def leaves(inputs):
    x, h0, c0, w = inputs
    return [t for t in [x, h0, c0, *w] if t is not None]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-p{c[5]}-b{int(c[6])}-L{int(c[7] is not None)}-r{int(c[8])}")
def test_backend_matches_reference_with_grads(backend, dtype, case):
    require(backend)
    kind, T, Bsz, I, H, proj, bias, lengths, reverse = case
    inputs = make_inputs(kind, T, Bsz, I, H, proj, bias, dtype)
    before = [t.detach().clone() for t in leaves(inputs)]
    got = run_all(kind, inputs, lengths, reverse, backend)
    assert seqkern.last_backend(kind.split("_")[0]) == backend
    want = run_all(kind, inputs, lengths, reverse, "reference")
    outs = [(a, b) for a, b in zip(got, want) if b is not None]
    for a, b in outs:
        torch.testing.assert_close(a, b, **TOL[dtype])
    cots = [torch.randn_like(b) for _, b in outs]
    ls = leaves(inputs)
    g1 = torch.autograd.grad([a for a, _ in outs], ls, cots)
    g2 = torch.autograd.grad([b for _, b in outs], ls, cots)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for b, a in zip(before, leaves(inputs)):
        assert torch.equal(b, a.detach()), "an input was modified"


# big enough that the cpu kernels split each step over threads (16-unit slices, one barrier
# per step); H = 200 leaves a partial last block; lengths 0..T and reverse included; lstm and
# rnn with B >= 8 take x inside the step GEMMs, B = 5 and gru a precomputed projection; the
# backward's dx is done inside the steps too, for gru only without lengths and reverse (plain)
SLICED = [("lstm", 32, 200, False), ("lstm", 5, 256, False), ("gru", 32, 200, False), ("gru", 32, 200, True),
          ("rnn_tanh", 64, 200, False), ("rnn_relu", 64, 200, False)]


def _sliced_run(kind, Bsz, H, dtype, threads, plain, T=6):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(7)
        inputs = make_inputs(kind, T, Bsz, 24, H, dtype=dtype, scale=0.3)
        lengths = None if plain else [(3 * b) % (T + 1) for b in range(Bsz)]
        got = run_all(kind, inputs, lengths, not plain, "cpu")
        outs = [o for o in got if o is not None]
        ls = leaves(inputs)
        grads = torch.autograd.grad(outs, ls, [torch.ones_like(o) * (i + 1) for i, o in enumerate(outs)])
        return inputs, lengths, [o.detach() for o in outs], list(grads)
    finally:
        torch.set_num_threads(old)


def _check_sliced(kind, Bsz, H, plain, T=6):
    inputs, lengths, outs, grads = _sliced_run(kind, Bsz, H, F64, 2, plain, T)
    want = [o for o in run_all(kind, inputs, lengths, not plain, "reference") if o is not None]
    wgrads = torch.autograd.grad(want, leaves(inputs), [torch.ones_like(o) * (i + 1) for i, o in enumerate(want)])
    for a, b in zip(outs + grads, [w.detach() for w in want] + list(wgrads)):
        torch.testing.assert_close(a, b, **TOL[F64])
    for dtype in (F64, torch.float32):  # every result bitwise the same whatever the thread count
        one = _sliced_run(kind, Bsz, H, dtype, 1, plain, T)
        two = _sliced_run(kind, Bsz, H, dtype, 2, plain, T)
        for a, b in zip(one[2] + one[3], two[2] + two[3]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind,Bsz,H,plain", SLICED, ids=[f"{c[0]}-B{c[1]}{'-plain' * c[3]}" for c in SLICED])
def test_cpu_sliced_steps_match_reference_and_thread_count(kind, Bsz, H, plain):
    require("cpu")
    _check_sliced(kind, Bsz, H, plain)


# batch 1 in fp32 has its own forward (matrix-vector steps, each slice projecting the input
# for its own gate columns): H = 300 is split over two threads (W_hh over 1 MiB) with a
# partial last block; lengths (0, part, all) and reverse; outputs and gradients against the
# fp64 reference, and bitwise the same on one thread and on two
B1 = [("lstm", None, False), ("lstm", 4, True), ("lstm", 0, False), ("lstm", 7, True), ("rnn_tanh", None, True),
      ("rnn_relu", 3, False)]


@pytest.mark.parametrize("kind,length,reverse", B1, ids=[f"{c[0]}-L{c[1]}-r{int(c[2])}" for c in B1])
def test_cpu_batch1_fp32_matches_reference_and_thread_count(kind, length, reverse):
    require("cpu")
    T, lengths = 7, None if length is None else [length]

    def run(threads):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(3)
            inputs = make_inputs(kind, T, 1, 24, 300, dtype=torch.float32, scale=0.05)
            outs = [o for o in run_all(kind, inputs, lengths, reverse, "cpu") if o is not None]
            grads = torch.autograd.grad(outs, leaves(inputs), [torch.ones_like(o) * (i + 1) for i, o in enumerate(outs)])
            return inputs, [o.detach() for o in outs] + list(grads)
        finally:
            torch.set_num_threads(old)

    inputs, one = run(1)
    _, two = run(2)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    # outputs against the fp64 reference, gradients against the fp32 one (as above: the
    # backward is not what this path changes, and its fp32 sums over 300 units drift further)
    x, h0, c0, w = inputs
    i64 = tuple(t.detach().double() if t is not None else None for t in (x, h0, c0))
    w64 = [t.detach().double() if t is not None else None for t in w]
    want = [o for o in run_all(kind, (*i64, w64), lengths, reverse, "reference") if o is not None]
    for a, b in zip(two, want):
        torch.testing.assert_close(a, b.float(), **TOL[torch.float32])
    want = [o for o in run_all(kind, inputs, lengths, reverse, "reference") if o is not None]
    wgrads = torch.autograd.grad(want, leaves(inputs), [torch.ones_like(o) * (i + 1) for i, o in enumerate(want)])
    for a, b in zip(two[len(want):], wgrads):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# the sliced backward adds the weight and bias gradients up in chunks of ceil(256 / B) steps (8 at
# B = 32): T = 19 gives two whole chunks and a partial one, T = 8 exactly one
CHUNKED = [("lstm", 19, True), ("lstm", 19, False), ("gru", 19, True), ("gru", 19, False), ("rnn_tanh", 19, False),
           ("lstm", 8, True), ("gru", 8, False)]


@pytest.mark.parametrize("kind,T,plain", CHUNKED, ids=[f"{c[0]}-T{c[1]}{'-plain' * c[2]}" for c in CHUNKED])
def test_cpu_weight_gradients_over_several_chunks(kind, T, plain):
    require("cpu")
    _check_sliced(kind, 32, 200, plain, T)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cpu_kept_workspace_is_lent_to_one_graph_at_a_time(kind):
    # the saving forward reuses one workspace buffer (over 4 MiB) once nothing holds it: two
    # graphs alive at once, a graph kept by retain_graph, and a workspace freed and reused
    # must all give the gradients of calls made one at a time, bit for bit
    require("cpu")
    T, Bsz, I, H = 64, 16, 32, 128
    assert R.workspace_numel(kind, T, Bsz, H, H, True) * 8 >= 1 << 22
    runs = [make_inputs(kind, T, Bsz, I, H, scale=0.3) for _ in range(3)]
    gys = [[torch.randn(T, Bsz, H, dtype=F64), torch.randn(Bsz, H, dtype=F64)] for _ in runs]

    def fwd(i):
        y, h, _ = run_all(kind, runs[i], None, False, "cpu")
        return [y, h]

    def grads(i, outs, **kw):
        return [o.detach().clone() for o in outs] + list(torch.autograd.grad(outs, leaves(runs[i]), gys[i], **kw))

    alone = [grads(i, fwd(i)) for i in range(3)]
    o0, o1 = fwd(0), fwd(1)  # both graphs alive: the second gets its own memory
    o2 = fwd(2)
    got = [grads(1, o1), grads(0, o0, retain_graph=True), grads(2, o2)]
    o1 = fwd(1)  # the first graph still holds its workspace
    got += [grads(0, o0), grads(1, o1)]
    for g, i in zip(got, [1, 0, 2, 0, 1]):
        for a, b in zip(g, alone[i]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", REF_CPU)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[7], CASES[9]],
                         ids=lambda c: f"{c[0]}-p{c[5]}")
def test_gradcheck_fp64(backend, case):
    require(backend)
    kind, T, Bsz, I, H, proj, bias, lengths, reverse = case
    inputs = make_inputs(kind, T, Bsz, I, H, proj, bias)
    n = len(leaves(inputs))
    x, h0, c0, w = inputs

    def f(*ts):
        ts = list(ts)
        xx, hh = ts.pop(0), ts.pop(0)
        cc = ts.pop(0) if kind == "lstm" else None
        ww = [None if t is None else ts.pop(0) for t in w]
        return tuple(o for o in run_all(kind, (xx, hh, cc, ww), lengths, reverse, backend) if o is not None)

    assert len(leaves(inputs)) == n
    assert torch.autograd.gradcheck(f, tuple(leaves(inputs)))


@pytest.mark.parametrize("backend", REF_CPU)
@pytest.mark.parametrize("kind", KINDS)
def test_cells_match_one_step_of_the_sequence_op(backend, kind):
    require(backend)
    x, h0, c0, w = make_inputs(kind, 1, 3, 4, 5, dtype=F64, requires_grad=False)
    y, h, c = call(kind, x, h0, c0, w, backend="reference")
    if kind == "lstm":
        hc, cc = SF.lstm_cell(x[0], (h0, c0), *w[:4], backend=backend)
        torch.testing.assert_close(cc, c)
    elif kind == "gru":
        hc = SF.gru_cell(x[0], h0, *w[:4], backend=backend)
    else:
        hc = SF.rnn_cell(x[0], h0, *w[:4], nonlinearity=kind[4:], backend=backend)
    torch.testing.assert_close(hc, h)
    torch.testing.assert_close(y[0], h)
    assert seqkern.last_backend(kind.split("_")[0] + "_cell") == backend



def _cell_call(kind, x, h, c, w, backend):
    if kind == "lstm":
        return SF.lstm_cell(x, (h, c), *w, backend=backend)
    if kind == "gru":
        return (SF.gru_cell(x, h, *w, backend=backend),)
    return (SF.rnn_cell(x, h, *w, nonlinearity=kind[4:], backend=backend),)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("Bsz", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("bias,dc_only", [(True, False), (False, False), (True, True)])
def test_cpu_cell_gradients_every_batch_path(kind, Bsz, bias, dc_only):
    # the cell backward sweeps the weights by hand up to 4 rows (I = 150: wide column blocks,
    # a 16-column one and single columns) and goes to BLAS past that; dc_only: no gradient into h'
    require("cpu")
    G = {"lstm": 4, "gru": 3}.get(kind, 1)
    I, H = 150, 21
    g = torch.Generator().manual_seed(Bsz)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    x, h, c = rnd(Bsz, I), rnd(Bsz, H), rnd(Bsz, H)
    w = [rnd(G * H, I) * 0.2, rnd(G * H, H) * 0.2] + ([rnd(G * H), rnd(G * H)] if bias else [None, None])
    ins = [x, h] + ([c] if kind == "lstm" else []) + [t for t in w if t is not None]
    grads = []
    for backend in ("reference", "cpu"):
        leaves = [t.clone().requires_grad_() for t in ins]
        it = iter(leaves)
        xx, hh = next(it), next(it)
        cc = next(it) if kind == "lstm" else None
        ww = [None if t is None else next(it) for t in w]
        out = _cell_call(kind, xx, hh, cc, ww, backend)
        if dc_only and kind == "lstm":
            out = out[1:]
        gy = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7), dtype=F64) for o in out]
        grads.append(torch.autograd.grad(out, leaves, gy, allow_unused=True))
        assert seqkern.last_backend(kind.split("_")[0] + "_cell") == backend
    for a, b in zip(*grads):
        if a is None:
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(b, a)

@pytest.mark.parametrize("kind", KINDS)
def test_cpu_cell_fp32_forward_on_the_tiles_every_block_shape(kind):
    """From 8 batch rows the cell forward runs on the register tiles, x and h packed in 16-row blocks
    and the result transposed back by 16 x 16 blocks (fp32, AVX-512): full and partial batch blocks,
    segments and gate columns not multiples of 16 (I = 21, H = 37; I = 130, H = 200, where the step's
    gate rows are split over 2 threads). Against the fp64 reference, and bitwise the same on 1 and 2
    threads."""
    require("cpu")
    G = {"lstm": 4, "gru": 3}.get(kind, 1)
    threads = torch.get_num_threads()
    try:
        for Bsz, I, H in [(b, 21, 37) for b in (8, 13, 16, 17, 32, 40)] + [(b, 130, 200) for b in (17, 32, 40)]:
            g = torch.Generator().manual_seed(Bsz)
            rnd = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
            x, h, c = rnd(Bsz, I), rnd(Bsz, H), rnd(Bsz, H)
            w = [rnd(G * H, I), rnd(G * H, H), rnd(G * H), rnd(G * H)]
            want = _cell_call(kind, x.double(), h.double(), c.double(), [t.double() for t in w], "reference")
            got = []
            for n in (1, 2):
                torch.set_num_threads(n)
                with torch.no_grad():
                    got.append(_cell_call(kind, x, h, c, w, "cpu"))
            for a, b, r in zip(*got, want):
                assert torch.equal(a, b), (Bsz, "1 vs 2 threads")
                torch.testing.assert_close(a, r.float(), **TOL[torch.float32])
    finally:
        torch.set_num_threads(threads)


def test_initial_state_none_means_zeros():
    x, h0, c0, w = make_inputs("lstm", 4, 2, 3, 5, proj=2, requires_grad=False)
    a = SF.lstm(x, None, *w[:4], w[4], backend="reference")
    b = SF.lstm(x, (torch.zeros_like(h0), torch.zeros_like(c0)), *w[:4], w[4], backend="reference")
    c = SF.lstm(x, (None, torch.zeros_like(c0)), *w[:4], w[4], backend="reference")
    for u, v in ((a, b), (a, c)):
        torch.testing.assert_close(u[0], v[0])
        torch.testing.assert_close(u[1][0], v[1][0])
        torch.testing.assert_close(u[1][1], v[1][1])
    x, h0, _, w = make_inputs("gru", 4, 2, 3, 5, requires_grad=False)
    torch.testing.assert_close(SF.gru(x, None, *w[:4])[0], SF.gru(x, torch.zeros_like(h0), *w[:4])[0])


@pytest.mark.parametrize("backend", REF_CPU)
def test_lengths_semantics_and_empty(backend):
    require(backend)
    x, h0, c0, w = make_inputs("lstm", 5, 3, 2, 4, requires_grad=False)
    L = torch.tensor([0, 5, 2])
    for rev in (False, True):
        y, (h, c) = SF.lstm(x, (h0, c0), *w[:4], lengths=L, reverse=rev, backend=backend)
        torch.testing.assert_close(h[0], h0[0])  # length 0: the state passes through
        torch.testing.assert_close(c[0], c0[0])
        assert torch.all(y[:, 0] == 0) and torch.all(y[2:, 2] == 0)
        # a sequence of length 2 equals the first 2 steps on their own
        y2, (h2, _) = SF.lstm(x[:2, 2:], (h0[2:], c0[2:]), *w[:4], reverse=rev, backend=backend)
        torch.testing.assert_close(y[:2, 2:], y2)
        torch.testing.assert_close(h[2:], h2)
    y, h = SF.gru(x[:0], h0, *make_inputs("gru", 1, 3, 2, 4)[3][:4], backend=backend)
    assert y.shape == (0, 3, 4)
    torch.testing.assert_close(h, h0)


@pytest.mark.parametrize("backend", REF_CPU)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_lengths_as_list_tuple_or_any_int_tensor(kind, backend):
    """lengths as torch users pass them to pack_padded_sequence: a list or tuple of ints, or a CPU
    tensor of any integer dtype, run exactly like an int64 tensor (outputs and gradients); the list
    itself is left as it was."""
    require(backend)
    x, h0, c0, w = make_inputs(kind, 5, 3, 2, 4)
    lengths = [0, 5, 2]
    forms = [lengths, tuple(lengths), torch.tensor(lengths, dtype=torch.int32),
             torch.tensor(lengths, dtype=torch.uint8), torch.tensor(lengths, dtype=torch.int16)]
    want = None
    for L in [torch.tensor(lengths)] + forms:
        outs = [o for o in call(kind, x, h0, c0, w, lengths=L, reverse=True, backend=backend) if o is not None]
        grads = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(outs)), (x, h0, w[0]))
        if want is None:
            want = outs + list(grads)
        else:
            for a, b in zip(outs + list(grads), want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert lengths == [0, 5, 2]
    empty = call(kind, x[:, :0], h0[:0], None if c0 is None else c0[:0], w, lengths=[], backend=backend)
    assert empty[0].shape == (5, 0, 4)


def test_reverse_equals_flipped_forward():
    x, h0, _, w = make_inputs("gru", 6, 2, 3, 4, requires_grad=False)
    yr, hr = SF.gru(x, h0, *w[:4], reverse=True, backend="reference")
    yf, hf = SF.gru(x.flip(0), h0, *w[:4], backend="reference")
    torch.testing.assert_close(yr, yf.flip(0))
    torch.testing.assert_close(hr, hf)


# ---------------------------------------------------------------------------
# registration: opcheck, compile
# ---------------------------------------------------------------------------

def op_args(kind, backend, save, lengths=None, reverse=False, proj=0, dtype=F64):
    x, h0, c0, w = make_inputs(kind, 4, 3, 3, 5, proj=proj, dtype=dtype, requires_grad=save)
    L = None if lengths is None else torch.tensor(lengths)
    return (kind, x, h0, c0, *w, L, reverse, save, backend)


@pytest.mark.parametrize("backend", REF_CPU)
@pytest.mark.parametrize("kind,proj,lengths,reverse", [
    ("lstm", 0, None, False), ("lstm", 2, [4, 0, 2], True), ("gru", 0, [1, 4, 3], False), ("rnn_relu", 0, None, True)])
def test_opcheck(backend, kind, proj, lengths, reverse):
    require(backend)
    for save in (True, False):
        torch.library.opcheck(torch.ops.seqkern.rnn_forward.default,
                              op_args(kind, backend, save, lengths, reverse, proj))
    if backend == "reference":
        return  # the reference's backward is autograd of its loop, not an op
    args = op_args(kind, backend, True, lengths, reverse, proj)
    y, h, c, ws = torch.ops.seqkern.rnn_forward(*args)
    _, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, L, rev, _, _ = args
    dc = torch.randn_like(c) if kind == "lstm" else None
    need = [True, True, kind == "lstm", True, True, True, True, proj > 0]
    bargs = (kind, torch.randn_like(y), torch.randn_like(h), dc, x.detach(), h0.detach(),
             None if c0 is None else c0.detach(), w_ih.detach(), w_hh.detach(), b_ih.detach(), b_hh.detach(),
             None if w_hr is None else w_hr.detach(), L, rev, ws.detach(), need, backend)
    torch.library.opcheck(torch.ops.seqkern.rnn_backward.default, bargs)


@pytest.mark.parametrize("backend", REF_CPU)
def test_compile_fullgraph(backend):
    require(backend)
    x, h0, c0, w = make_inputs("lstm", 5, 2, 3, 4, dtype=torch.float32)
    L = torch.tensor([5, 3])

    def f(x, h0, c0, *w):
        y, (h, c) = SF.lstm(x, (h0, c0), *w, lengths=L, reverse=True, backend=backend)
        return y.sum() + h.square().sum() + c.sum()

    args = (x, h0, c0, *w[:4])
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    want = f(*args)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, args)
    g2 = torch.autograd.grad(want, args)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

def _lstm_bad(**over):
    x, h0, c0, w = make_inputs("lstm", 3, 2, 4, 5, requires_grad=False)
    args = dict(x=x, h0=h0, c0=c0, w_ih=w[0], w_hh=w[1], b_ih=w[2], b_hh=w[3], w_hr=None, lengths=None)
    args.update(over)
    return lambda: SF.lstm(args["x"], (args["h0"], args["c0"]), args["w_ih"], args["w_hh"], args["b_ih"],
                           args["b_hh"], args["w_hr"], lengths=args["lengths"])


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=torch.randn(2, 4)), ValueError, "x must have shape"),
    (dict(x=torch.randn(3, 2, 3, dtype=F64)), ValueError, "w_ih"),
    (dict(h0=torch.randn(2, 4, dtype=F64)), ValueError, "h0"),
    (dict(h0=torch.randn(1, 2, 5, dtype=F64)), ValueError, "h0"),
    (dict(c0=torch.randn(3, 5, dtype=F64)), ValueError, "c0"),
    (dict(w_hh=torch.randn(19, 5, dtype=F64)), ValueError, "w_hh"),
    (dict(b_ih=torch.randn(7, dtype=F64)), ValueError, "b_ih"),
    (dict(b_hh=torch.randn(20)), TypeError, "b_hh"),
    (dict(x=torch.randn(3, 2, 4)), TypeError, "dtype"),
    (dict(x=torch.ones(3, 2, 4, dtype=torch.long)), TypeError, "x"),
    (dict(w_hr=torch.randn(5, 5, dtype=F64)), ValueError, "w_hr"),
    (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths"),
    (dict(lengths=torch.tensor([1, 2, 3])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([1, 4])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([-1, 2])), ValueError, "lengths"),
    (dict(h0=torch.randn(2, 5, dtype=F64, device="meta")), ValueError, "h0"),
    (dict(lengths=[1, 2, 3]), ValueError, "lengths"),
    (dict(lengths=(1, 4)), ValueError, "lengths"),
    (dict(lengths=[-1, 2]), ValueError, "lengths"),
    (dict(lengths=[[1, 2]]), ValueError, "lengths"),
    (dict(lengths=[1.0, 2.0]), TypeError, "lengths"),
    (dict(lengths=[True, False]), TypeError, "lengths"),
    (dict(lengths=["a", 1]), TypeError, "lengths"),
    (dict(lengths=[1, [2]]), TypeError, "lengths"),
    (dict(lengths=3), TypeError, "lengths"),
])
def test_bad_input_names_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _lstm_bad(**over)()


def test_bad_cell_and_mode_inputs():
    x, h0, _, w = make_inputs("gru", 1, 2, 4, 5, requires_grad=False)
    with pytest.raises(ValueError, match="x"):
        SF.gru_cell(x, h0, *w[:4])  # 3-d input to a cell
    with pytest.raises(ValueError, match="h"):
        SF.gru_cell(x[0, 0], h0, *w[:4])  # unbatched x with a batched state
    with pytest.raises(ValueError, match="nonlinearity"):
        SF.rnn(x, None, *make_inputs("rnn_tanh", 1, 2, 4, 5)[3][:4], nonlinearity="sigmoid")
    with pytest.raises(TypeError, match="hx"):
        SF.lstm(x, torch.zeros(2, 5, dtype=F64), *make_inputs("lstm", 1, 2, 4, 5)[3][:4])
    with pytest.raises(ValueError, match="backend"):
        SF.gru(x, h0, *w[:4], backend="nope")


def test_explicit_backend_that_cannot_serve_raises():
    x, h0, _, w = make_inputs("gru", 2, 2, 4, 5, dtype=torch.float16, requires_grad=False)
    with pytest.raises(seqkern.BackendUnavailable, match="cpu"):
        SF.gru(x, h0, *w[:4], backend="cpu")
    y, _ = SF.gru(x, h0, *w[:4])  # automatic choice falls through to the reference
    assert seqkern.last_backend("gru") == "reference" and y.dtype == torch.float16


# ---------------------------------------------------------------------------
# triton specifics (interpreted on the CPU here)
# ---------------------------------------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("kind,proj", [("lstm", 0), ("lstm", 2), ("gru", 0), ("rnn_tanh", 0)])
def test_triton_fp16_against_fp32_reference(kind, proj):
    require("triton")
    inputs = make_inputs(kind, 4, 3, 5, 6, proj, True, torch.float32, requires_grad=False)
    x, h0, c0, w = inputs
    half = lambda t: None if t is None else t.half()  # noqa: E731
    got = call(kind, half(x), half(h0), half(c0), [half(t) for t in w], lengths=torch.tensor([4, 1, 3]),
               reverse=True, backend="triton")
    want = call(kind, x, h0, c0, w, lengths=torch.tensor([4, 1, 3]), reverse=True, backend="reference")
    for a, b in zip(got, want):
        if b is not None:
            assert a.dtype == torch.float16
            torch.testing.assert_close(a.float(), b, **TOL[torch.float16])


@pytest.mark.parametrize("backend", REF_CPU + [backend_param("triton")])
@pytest.mark.parametrize("T,Bsz", [(0, 2), (3, 0)])
def test_empty_sequence_or_batch_with_grads(backend, T, Bsz):
    require(backend)
    inputs = make_inputs("lstm", T, Bsz, 3, 4, 2, True, F64)
    y, h, c = run_all("lstm", inputs, None, False, backend)
    assert y.shape == (T, Bsz, 2) and h.shape == (Bsz, 2) and c.shape == (Bsz, 4)
    if T == 0:
        torch.testing.assert_close(h, inputs[1])
    gs = torch.autograd.grad(y.sum() + h.sum() + c.sum(), leaves(inputs), allow_unused=True)
    for g, t in zip(gs, leaves(inputs)):
        assert g is None or g.shape == t.shape


@pytest.mark.triton
def test_triton_opcheck():
    require("triton")
    for save in (True, False):
        torch.library.opcheck(torch.ops.seqkern.rnn_forward.default,
                              op_args("gru", "triton", save, [4, 0, 2], True, dtype=torch.float32))


# ---------------------------------------------------------------------------
# GPU (cuda and triton backends; skipped without a GPU)
# ---------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,proj", [("lstm", 0), ("lstm", 16), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)])
@pytest.mark.parametrize("Bsz", [3, 40])  # 3: the persistent forward (cuda), 40: the per-step path
def test_gpu_backends_match_reference(backend, dtype, kind, proj, Bsz):
    require(backend)
    T, I, H = 7, 24, 48
    inputs = make_inputs(kind, T, Bsz, I, H, proj, True, torch.float32)
    x, h0, c0, w = [t for t in inputs[:3]] + [inputs[3]]
    dev = lambda t: None if t is None else t.detach().to("cuda", dtype).requires_grad_()  # noqa: E731
    gx, gh0, gc0, gw = dev(x), dev(h0), dev(c0), [dev(t) for t in w]
    L = torch.randint(0, T + 1, (Bsz,))
    for reverse in (False, True):
        got = call(kind, gx, gh0, gc0, gw, lengths=L, reverse=reverse, backend=backend)
        assert seqkern.last_backend(kind.split("_")[0]) == backend
        up = lambda t: None if t is None else t.detach().double().cpu().requires_grad_()  # noqa: E731
        rx, rh0, rc0, rw = up(gx), up(gh0), up(gc0), [up(t) for t in gw]
        want = call(kind, rx, rh0, rc0, rw, lengths=L, reverse=reverse, backend="reference")
        tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=3e-2, atol=3e-2)
        pairs = [(a, b) for a, b in zip(got, want) if b is not None]
        for a, b in pairs:
            torch.testing.assert_close(a.double().cpu(), b.detach(), **tol)
        cots = [torch.randn_like(b) for _, b in pairs]
        mine = [t for t in [gx, gh0, gc0, *gw] if t is not None]
        ref = [t for t in [rx, rh0, rc0, *rw] if t is not None]
        g1 = torch.autograd.grad([a for a, _ in pairs], mine, [c.to("cuda", dtype) for c in cots])
        g2 = torch.autograd.grad([b for _, b in pairs], ref, cots)
        scale = dict(rtol=1e-4, atol=1e-4) if dtype in (torch.float32, torch.float64) else dict(rtol=5e-2, atol=2e-1)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a.double().cpu(), b, **scale)


@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    x, h0, c0, w = make_inputs("lstm", 5, 2, 3, 4, dtype=torch.float32, requires_grad=False)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    args = (cuda(x), cuda(h0), cuda(c0), *[cuda(t) for t in w[:4]])
    f = torch.compile(lambda x, h, c, *w: SF.lstm(x, (h, c), *w, backend="cuda")[0], fullgraph=True)
    torch.testing.assert_close(f(*args), SF.lstm(args[0], args[1:3], *args[3:], backend="reference")[0])


def _triton_matches_reference(case):
    """Outputs and every gradient of the triton backend against the reference (fp64)."""
    kind, T, Bsz, I, H, proj, bias, lengths, reverse = case
    inputs = make_inputs(kind, T, Bsz, I, H, proj, bias, F64)
    got = run_all(kind, inputs, lengths, reverse, "triton")
    want = run_all(kind, inputs, lengths, reverse, "reference")
    outs = [(a, b) for a, b in zip(got, want) if b is not None]
    for a, b in outs:
        torch.testing.assert_close(a, b)
    cots = [torch.randn_like(b) for _, b in outs]
    g1 = torch.autograd.grad([a for a, _ in outs], leaves(inputs), cots)
    g2 = torch.autograd.grad([b for _, b in outs], leaves(inputs), cots)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.triton
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[7], CASES[8]], ids=lambda c: c[0])
def test_triton_per_step_path_matches_reference(case, monkeypatch):
    """The per-step gate kernels (taken for H > PERSISTENT_MAX_H; forced here)."""
    require("triton")
    from seqkern.kernels import rnn as K

    monkeypatch.setattr(K, "PERSISTENT_MAX_H", 0)
    _triton_matches_reference(case)


@pytest.mark.triton
@pytest.mark.parametrize("case", [
    ("lstm", 3, 5, 3, 37, 19, True, [3, 1, 0, 2, 3], True),
    ("gru", 3, 5, 4, 37, 0, True, None, False),
    ("rnn_tanh", 2, 7, 3, 33, 0, False, [2, 1, 2, 0, 1, 2, 2], False),
], ids=lambda c: c[0])
def test_triton_step_grids_cover_every_tile(case, monkeypatch):
    """The per-step kernels' grids are 1-D (kernels/rnn.py _tile: batch block x column block, so
    gridDim.y's 65535 never caps the columns): with small tiles forced (2 rows x 16 columns) there are
    several batch and column blocks, the last ones partial, for h, the gates and the projection; every
    output and gradient matches the reference (a program decoding its tile wrongly leaves rows unset)."""
    require("triton")
    from seqkern.kernels import rnn as K

    monkeypatch.setattr(K, "PERSISTENT_MAX_H", 0)
    monkeypatch.setattr(K, "_blocks", lambda B, n: (2, 16))
    _triton_matches_reference(case)


def test_triton_supports_declines_gate_rows_past_int32():
    """The Triton kernels' gate column index is int32: supports() declines w_hh with more than
    2^31-1-128 gate rows (reachable with a projection, P = 1), on shapes only (fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sup = seqkern.backends._SUPPORTS["lstm"]["triton"]
    with FakeTensorMode():
        x, h0, c0 = torch.empty(2, 1, 1), torch.empty(1, 1), torch.empty(1, 2**29)
        for rows, ok in ((2**31 - 1 - 128, True), (2**31 - 4, False)):
            w_ih, w_hh, w_hr = torch.empty(rows, 1), torch.empty(rows, 1), torch.empty(1, rows // 4)
            got = sup(x, h0, c0, w_ih, w_hh, None, None, w_hr)
            assert got[0] is ok, (rows, got)
            if not ok:
                assert "int32 column indices" in got[1] and str(rows) in got[1]


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("unbatched", [False, True])
def test_cell_gradcheck_fp64_cpu(kind, bias, unbatched, monkeypatch):
    # the eager cell's autograd node is C++ (seqkern_C::rnn_cell): first order on the named cpu
    # backend, second order (create_graph: its ATen equations) with automatic selection
    require("cpu")
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)
    G = {"lstm": 4, "gru": 3}.get(kind, 1)
    I, H, Bsz = 5, 3, 2
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    lead = () if unbatched else (Bsz,)
    x, h, c = rnd(*lead, I), rnd(*lead, H), rnd(*lead, H)
    w = [rnd(G * H, I), rnd(G * H, H)] + ([rnd(G * H), rnd(G * H)] if bias else [])
    ins = (x, h) + ((c,) if kind == "lstm" else ()) + tuple(w)

    def step(backend):
        def f(*ts):
            ts = list(ts)
            xx, hh = ts.pop(0), ts.pop(0)
            cc = ts.pop(0) if kind == "lstm" else None
            ww = ts + [None, None] if not bias else ts
            return _cell_call(kind, xx, hh, cc, ww, backend)
        return f

    assert torch.autograd.gradcheck(step("cpu"), ins)
    assert seqkern.last_backend(kind.split("_")[0] + "_cell") == "cpu"
    assert torch.autograd.gradgradcheck(step(None), ins)
    assert seqkern.last_backend(kind.split("_")[0] + "_cell") == "cpu"


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_cell_backward_past_the_sweep_rows_like_torch(kind, monkeypatch):
    """Above 4 batch rows the cell backward runs its four products on the register tiles (gate
    gradients transposed, x and h packed): odd sizes (I, H not multiples of 16: tail columns; B = 5,
    17, 33: partial row tiles), every subset of the inputs needing a gradient, against torch.nn's cell
    in fp64; and a gradcheck at B = 6."""
    require("cpu")
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)
    mod = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn_tanh": "RNNCell", "rnn_relu": "RNNCell"}[kind]
    kw = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    I, H = 20, 37
    g = torch.Generator().manual_seed(5)
    for Bsz in (5, 17, 33):
        ours, theirs = getattr(seqkern.nn, mod)(I, H, dtype=F64, **kw), getattr(torch.nn, mod)(I, H, dtype=F64, **kw)
        theirs.load_state_dict(ours.state_dict())
        x, h, c = (torch.randn(Bsz, n, generator=g, dtype=F64) for n in (I, H, H))
        cots = [torch.randn(Bsz, H, generator=g, dtype=F64) for _ in range(2)]
        for wants in ("x", "h", "c", "w", "xh", "xhcw"):
            if kind != "lstm" and wants == "c":
                continue
            grads = []
            for m in (ours, theirs):
                xx, hh, cc = (t.clone().requires_grad_(k in wants and (k != "c" or kind == "lstm"))
                              for t, k in ((x, "x"), (h, "h"), (c, "c")))
                for p in m.parameters():
                    p.requires_grad_("w" in wants)
                out = m(xx, (hh, cc)) if kind == "lstm" else (m(xx, hh),)
                wrt = [t for t in (xx, hh, cc) if t.requires_grad] + [p for p in m.parameters() if p.requires_grad]
                grads.append(torch.autograd.grad(out, wrt, cots[:len(out)]))
            assert seqkern.last_backend(kind.split("_")[0] + "_cell") == "cpu"
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, msg=lambda m: f"B={Bsz} {wants}: {m}")
    G = {"lstm": 4, "gru": 3}.get(kind, 1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    x, h, c = rnd(6, 17), rnd(6, 5), rnd(6, 5)
    w = [rnd(G * 5, 17), rnd(G * 5, 5), rnd(G * 5), rnd(G * 5)]
    ins = (x, h) + ((c,) if kind == "lstm" else ()) + tuple(w)

    def f(*ts):
        ts = list(ts)
        xx, hh = ts.pop(0), ts.pop(0)
        cc = ts.pop(0) if kind == "lstm" else None
        return _cell_call(kind, xx, hh, cc, ts, "cpu")

    assert torch.autograd.gradcheck(f, ins)
