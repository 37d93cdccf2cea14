"""Rotary embedding of q and k: seqkern's fused backends against the plain PyTorch rotary a
model would otherwise carry (LLaMA's rotate_half with cached (T, D) cos/sin tables).
Memory bound: q and k read and written once each (forward), and again for the backward.
"""
import sys

import torch

import harness
from harness import Case, Unavailable


def _case(B, H, T, D, mode, device, dtype):
    el = torch.finfo(getattr(torch, dtype)).bits // 8
    n = B * H * T * D
    return Case("rotary", "rotary", {"B": B, "H": H, "T": T, "D": D}, mode, dtype, device, baseline="torch",
                flops=(12.0 if mode == "fwdbwd" else 6.0) * n, bytes=(8.0 if mode == "fwdbwd" else 4.0) * n * el,
                bound="bytes", grad_keys=("q", "k"))


def cases(size, device):
    modes = ("fwd", "fwdbwd")
    if size == "quick":
        return [_case(1, 2, 16, 8, m, device, "float32") for m in modes]
    if size == "cpu":
        return [_case(2, 8, 2048, 64, m, device, "float32") for m in modes]
    return [_case(8, 32, 4096, 128, m, device, "bfloat16") for m in modes]


def impls(case):
    return ["torch"] + harness.seqkern_impls(case.device)


def inputs(case, dtype, device):
    from seqkern.ops.rotary import rotary_cos_sin

    p = case.params
    shape = (p["B"], p["H"], p["T"], p["D"])
    cos, sin = rotary_cos_sin(p["T"], p["D"], device=device, dtype=dtype)
    return {"q": torch.randn(shape, device=device).to(dtype), "k": torch.randn(shape, device=device).to(dtype),
            "cos": cos, "sin": sin,
            # the tables a plain-PyTorch model caches: each half-table repeated to the full head dim
            "cos_full": torch.cat((cos, cos), dim=-1), "sin_full": torch.cat((sin, sin), dim=-1)}


def ref_bytes(case):
    p = case.params
    return 8 * p["B"] * p["H"] * p["T"] * p["D"] * 12


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def forward(case, impl, inp):
    q, k = inp["q"], inp["k"]
    if impl == "torch":
        c, s = inp["cos_full"], inp["sin_full"]
        return (lambda: (q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s)), [q, k]
    backend = harness.backend_of(impl)
    if backend is None:
        raise Unavailable(f"unknown implementation {impl}")
    from seqkern import functional as SF

    cos, sin = inp["cos"], inp["sin"]
    return (lambda: SF.apply_rotary(q, k, cos, sin, backend=backend)), [q, k]


def test_rotary(bench, case, impl):
    bench(sys.modules[__name__], case, impl)
