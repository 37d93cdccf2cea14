"""RNN, LSTM and GRU (one layer, one direction, whole sequence): seqkern's backends against
torch.nn (oneDNN / native on CPU, cuDNN on GPU), inference (fwd) and a training step (fwdbwd).

Shapes: issue 3 (CPU: T=256, B=32, I=H=256, and batch 1 at T=1024; GPU: T=512, B=64, H=512
and B=8, H=256) plus T=100, B=64, H=512. The cells (one step per call, as a decoder runs them
token by token) at I=H=256, B=1 and B=32: seqkern.nn's cells against torch.nn's, module calls.
"""
import sys

import torch

import harness
from harness import Case, Unavailable

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1}
CELLS = {"lstm_cell": ("lstm", "LSTMCell"), "gru_cell": ("gru", "GRUCell"), "rnn_cell": ("rnn_tanh", "RNNCell")}


def _case(op, T, B, I, H, mode, device, dtype="float32"):
    G = GATES[op]
    fwd = 2.0 * T * B * (I + H) * G * H
    el = torch.finfo(getattr(torch, dtype)).bits // 8
    io = (T * B * (I + H) + G * H * (I + H + 2)) * el
    return Case("rnn", op, {"T": T, "B": B, "I": I, "H": H}, mode, dtype, device, baseline="torch",
                flops=fwd * (3.0 if mode == "fwdbwd" else 1.0), bytes=io * (3.0 if mode == "fwdbwd" else 1.0),
                bound="flops", grad_keys=("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"))


def _cell_case(op, B, I, H, mode, device, dtype="float32"):
    c = _case(CELLS[op][0], 1, B, I, H, mode, device, dtype)
    return Case("rnn", op, {"B": B, "I": I, "H": H}, mode, dtype, device, baseline="torch", flops=c.flops,
                bytes=c.bytes, bound="bytes" if B == 1 else "flops", grad_keys=c.grad_keys)


def cases(size, device):
    out = []
    if size == "quick":
        for op in GATES:
            for mode in ("fwd", "fwdbwd"):
                out.append(_case(op, 6, 2, 5, 8, mode, device))
        return out
    if size == "cpu":
        for op in GATES:
            for mode in ("fwd", "fwdbwd"):
                out.append(_case(op, 256, 32, 256, 256, mode, device))
            out.append(_case(op, 1024, 1, 256, 256, "fwd", device))
        for op in CELLS:  # per-call cost: Python dispatch and kernel setup count here
            for B in (1, 32):
                for mode in ("fwd", "fwdbwd"):
                    out.append(_cell_case(op, B, 256, 256, mode, device))
        return out  # the shapes only: `make bench` must finish in 10 minutes on 2 cores
    for op in ("lstm", "gru"):  # the training shapes of the issue first
        for B, H in ((64, 512), (8, 256)):
            for mode in ("fwdbwd", "fwd"):
                out.append(_case(op, 512, B, H, H, mode, device))
        out.append(_case(op, 1024, 1, 256, 256, "fwd", device))
    out.append(_case("rnn_tanh", 512, 64, 512, 512, "fwdbwd", device))
    return out


def impls(case):
    return ["torch"] + harness.seqkern_impls(case.device)


def _kind(case):
    return CELLS[case.op][0] if case.op in CELLS else case.op


def inputs(case, dtype, device):
    p = case.params
    T, B, I, H, G = p.get("T", 1), p["B"], p["I"], p["H"], GATES[_kind(case)]
    bound = H ** -0.5
    u = lambda *s: (torch.rand(*s, dtype=torch.float64) * 2 - 1) * bound  # torch.nn's init
    d = {"x": torch.randn(T, B, I, dtype=torch.float64), "h0": torch.randn(B, H, dtype=torch.float64) * 0.5,
         "w_ih": u(G * H, I), "w_hh": u(G * H, H), "b_ih": u(G * H), "b_hh": u(G * H)}
    if _kind(case) == "lstm":
        d["c0"] = torch.randn(B, H, dtype=torch.float64) * 0.5
    if case.op in CELLS:
        d["x"] = d["x"][0]
    return {k: v.to(device=device, dtype=dtype) for k, v in d.items()}


def ref_bytes(case):
    p = case.params
    return 8 * p.get("T", 1) * p["B"] * p["H"] * GATES[_kind(case)] * 6


def _torch_module(case, inp):
    p = case.params
    kw = dict(device=inp["x"].device, dtype=inp["x"].dtype)
    if case.op == "lstm":
        m = torch.nn.LSTM(p["I"], p["H"], **kw)
    elif case.op == "gru":
        m = torch.nn.GRU(p["I"], p["H"], **kw)
    else:
        m = torch.nn.RNN(p["I"], p["H"], nonlinearity="tanh", **kw)
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            torch_name = {"w_ih": "weight_ih_l0", "w_hh": "weight_hh_l0", "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0"}[name]
            getattr(m, torch_name).copy_(inp[name])
    m.flatten_parameters()
    return m


def _cell_forward(case, impl, inp):
    import seqkern.nn as snn

    p = case.params
    kind, cls = CELLS[case.op]
    kw = dict(device=inp["x"].device, dtype=inp["x"].dtype)
    if impl == "torch":
        m = getattr(torch.nn, cls)(p["I"], p["H"], **kw)
    else:
        backend = harness.backend_of(impl)
        if backend is None:
            raise Unavailable(f"unknown implementation {impl}")
        m = getattr(snn, cls)(p["I"], p["H"], backend=backend, **kw)
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            getattr(m, {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh"}[name]).copy_(
                inp[name])
    params = [m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh]
    x, h0 = inp["x"], inp["h0"]
    if kind == "lstm":
        c0 = inp["c0"]
        return (lambda: m(x, (h0, c0))), [x, h0, c0] + params
    return (lambda: (m(x, h0),)), [x, h0] + params


def forward(case, impl, inp):
    if case.op in CELLS:
        return _cell_forward(case, impl, inp)
    x, h0 = inp["x"], inp["h0"]
    lstm = case.op == "lstm"
    if impl == "torch":
        m = _torch_module(case, inp)
        params = [m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0]
        if lstm:
            c0 = inp["c0"]

            def fn():
                y, (h, c) = m(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
                return y, h[0], c[0]
            return fn, [x, h0, c0] + params

        def fn():
            y, h = m(x, h0.unsqueeze(0))
            return y, h[0]
        return fn, [x, h0] + params

    backend = harness.backend_of(impl)
    if backend is None:
        raise Unavailable(f"unknown implementation {impl}")
    from seqkern import functional as SF

    w = (inp["w_ih"], inp["w_hh"], inp["b_ih"], inp["b_hh"])
    if lstm:
        c0 = inp["c0"]

        def fn():
            y, (h, c) = SF.lstm(x, (h0, c0), *w, backend=backend)
            return y, h, c
        return fn, [x, h0, c0, *w]
    if case.op == "gru":
        def fn():
            y, h = SF.gru(x, h0, *w, backend=backend)
            return y, h
    else:
        def fn():
            y, h = SF.rnn(x, h0, *w, nonlinearity="tanh", backend=backend)
            return y, h
    return fn, [x, h0, *w]


def test_rnn(bench, case, impl):
    bench(sys.modules[__name__], case, impl)
