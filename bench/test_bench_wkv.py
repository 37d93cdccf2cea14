"""RWKV-4 WKV recurrence: seqkern's backends against the reference loop (the baseline the
contract names; on a GPU the cuda backend follows the RWKV-4 CUDA kernel's design).

Shapes: issue 5. CPU: fp32, B=8, C=512, T up to 1024. GPU: fp32, B=8, C=1024, T up to 4096.
WKV is bound by memory traffic: the report compares GB/s with the measured copy bandwidth.
Bytes counted: forward reads k, v and writes y (3*B*T*C elements); the backward also reads
k, v and dy and writes dk, dv (5*B*T*C more).

``rwkv4_step``: RNN-mode inference of a stack of RWKV4Blocks (issue 5: 6 layers, C=512), one
token at batch 1 after a context of 1k and of 16k tokens. The context is run once in parallel
mode to get the state; the timed call is one step of the whole stack. Its time is ms/token
(tokens/s is the inverse), its peak memory the same at 1k and 16k (the state does not grow);
bytes counted are the weights, which every token reads once. The baseline is the same stack
with the reference WKV: the blocks' other ops are the same torch ops in both.
"""
import functools
import sys

import torch

import harness
from harness import Case, Unavailable


def _case(B, T, C, mode, device, dtype="float32"):
    el = torch.finfo(getattr(torch, dtype)).bits // 8
    n = B * T * C
    moved = (8.0 if mode == "fwdbwd" else 3.0) * n * el
    return Case("wkv", "wkv4", {"B": B, "T": T, "C": C}, mode, dtype, device, baseline="reference",
                flops=(30.0 if mode == "fwdbwd" else 12.0) * n, bytes=moved, bound="bytes", sweep="T",
                grad_keys=("time_decay", "time_first", "k", "v"))


def _step_case(layers, C, context, device):
    # per token and layer: time mix key, value, receptance, output (C x C each); channel mix
    # key (C -> 4C), value (4C -> C), receptance (C x C)
    macs = layers * (4 * C * C + 2 * C * 4 * C + C * C)
    return Case("wkv", "rwkv4_step", {"layers": layers, "C": C, "context": context}, "fwd", "float32", device,
                baseline="reference", flops=2.0 * macs, bytes=4.0 * macs, bound="bytes")


def cases(size, device):
    modes = ("fwd", "fwdbwd")
    if size == "quick":
        return [_case(2, 12, 8, m, device) for m in modes] + [_step_case(2, 16, n, device) for n in (8, 32)]
    step = [_step_case(6, 512, n, device) for n in (1024, 16384)]
    if size == "cpu":
        return [_case(8, t, 512, m, device) for m in modes for t in (256, 1024)] + step
    # the shape first: a device check that runs out of time still has it
    return [_case(8, t, 1024, m, device) for t in (4096, 1024, 2048) for m in modes] + step


@functools.lru_cache(maxsize=4)
def _stack(layers, C, dtype, device, backend):
    """The same weights for every backend and dtype: built in fp32 from one seed, then cast."""
    from seqkern import nn as snn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        blocks = torch.nn.ModuleList(snn.RWKV4Block(C, 4 * C, i, layers, backend=backend) for i in range(layers))
    return blocks.to(device=device, dtype=dtype).eval()


def _step_inputs(case, dtype, device):
    p = case.params
    blocks = _stack(p["layers"], p["C"], dtype, device, None)
    states = []
    with torch.no_grad():
        h = torch.randn(1, p["context"], p["C"], dtype=dtype, device=device)
        for b in blocks:
            h, st = b(h)
            states.append(st)
    return {"x": torch.randn(1, 1, p["C"], dtype=dtype, device=device), "state": torch.stack(states)}


def impls(case):
    return ["reference"] + harness.seqkern_impls(case.device)


def inputs(case, dtype, device):
    if case.op == "rwkv4_step":
        return _step_inputs(case, dtype, device)
    p = case.params
    B, T, C = p["B"], p["T"], p["C"]
    # time_decay as RWKV-4 initialises it (a ramp over channels), so decays span fast to slow
    ramp = torch.arange(C, dtype=torch.float64) / max(C - 1, 1)
    d = {"time_decay": -5 + 8 * ramp ** 0.7 + 0.1 * torch.randn(C, dtype=torch.float64),
         "time_first": 0.5 * torch.randn(C, dtype=torch.float64) + 0.3,
         "k": torch.randn(B, T, C, dtype=torch.float64), "v": torch.randn(B, T, C, dtype=torch.float64)}
    return {k: v.to(device=device, dtype=dtype) for k, v in d.items()}


def ref_bytes(case):
    p = case.params
    if case.op == "rwkv4_step":
        return 4 * case.bytes
    return 8 * p["B"] * p["T"] * p["C"] * (40 if case.mode == "fwdbwd" else 8)


def forward(case, impl, inp):
    backend = harness.backend_of(impl)
    if backend is None:
        raise Unavailable(f"unknown implementation {impl}")
    from seqkern import functional as SF

    if case.op == "rwkv4_step":
        p, x, state = case.params, inp["x"], inp["state"]
        blocks = _stack(p["layers"], p["C"], x.dtype, x.device, backend)

        def step():
            h, new = x, []
            for b, st in zip(blocks, state):
                h, st = b(h, st)
                new.append(st)
            return h, torch.stack(new)
        return step, []

    w, u, k, v = inp["time_decay"], inp["time_first"], inp["k"], inp["v"]

    def fn():
        # The gradient flows through y only: the state's max-exponent row is not differentiable
        # in a way backends must agree on.
        y, state = SF.wkv4(w, u, k, v, backend=backend)
        return y, state.detach()
    return fn, [w, u, k, v]


def test_wkv(bench, case, impl):
    bench(sys.modules[__name__], case, impl)
