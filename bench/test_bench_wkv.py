"""RWKV-4 WKV recurrence: seqkern's backends against the reference loop (the baseline the
contract names; on a GPU the cuda backend follows the RWKV-4 CUDA kernel's design).

Shapes: issue 5. CPU: fp32, B=8, C=512, T up to 1024. GPU: fp32, B=8, C=1024, T up to 4096.
WKV is bound by memory traffic: the report compares GB/s with the measured copy bandwidth.
Bytes counted: forward reads k, v and writes y (3*B*T*C elements); the backward also reads
k, v and dy and writes dk, dv (5*B*T*C more).
"""
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


def cases(size, device):
    modes = ("fwd", "fwdbwd")
    if size == "quick":
        return [_case(2, 12, 8, m, device) for m in modes]
    if size == "cpu":
        return [_case(8, t, 512, m, device) for m in modes for t in (256, 1024)]
    # the shape first: a device check that runs out of time still has it
    return [_case(8, t, 1024, m, device) for t in (4096, 1024, 2048) for m in modes]


def impls(case):
    return ["reference"] + harness.seqkern_impls(case.device)


def inputs(case, dtype, device):
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
    return 8 * p["B"] * p["T"] * p["C"] * (40 if case.mode == "fwdbwd" else 8)


def forward(case, impl, inp):
    backend = harness.backend_of(impl)
    if backend is None:
        raise Unavailable(f"unknown implementation {impl}")
    from seqkern import functional as SF

    w, u, k, v = inp["time_decay"], inp["time_first"], inp["k"], inp["v"]

    def fn():
        # The gradient flows through y only: the state's max-exponent row is not differentiable
        # in a way backends must agree on.
        y, state = SF.wkv4(w, u, k, v, backend=backend)
        return y, state.detach()
    return fn, [w, u, k, v]


def test_wkv(bench, case, impl):
    bench(sys.modules[__name__], case, impl)
