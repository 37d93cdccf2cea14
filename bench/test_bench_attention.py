"""Scaled dot-product attention: seqkern's backends against F.scaled_dot_product_attention
(its default choice, and on a GPU its flash and cuDNN backends each forced with sdpa_kernel).

Shapes: issue 4. CPU: fp32, B=2, H=8, D=64, N up to 2048, causal and not. GPU: bf16,
D=64 and 128, N=1k..16k at 16k tokens per batch (B = 16384/N) and H*D = 2048.
FLOPs as FlashAttention counts them: 4*B*H*N^2*D forward, halved when causal; backward 2.5x forward.
"""
import sys

import torch
import torch.nn.functional as F

import harness
from harness import Case, Unavailable


def _case(B, H, N, D, causal, mode, device, dtype):
    fwd = 4.0 * B * H * N * N * D / (2.0 if causal else 1.0)
    el = torch.finfo(getattr(torch, dtype)).bits // 8
    io = B * H * N * D * el
    return Case("attention", "sdpa", {"B": B, "H": H, "N": N, "D": D, "causal": int(causal)}, mode, dtype, device,
                baseline="torch", flops=fwd * (3.5 if mode == "fwdbwd" else 1.0),
                bytes=io * (12.0 if mode == "fwdbwd" else 4.0), bound="flops", sweep="N",
                grad_keys=("q", "k", "v"))


def cases(size, device):
    out = []
    modes = ("fwd", "fwdbwd")
    if size == "quick":
        return [_case(1, 2, 40, 16, c, m, device, "float32") for c in (False, True) for m in modes]
    if size == "cpu":
        return [_case(2, 8, n, 64, c, m, device, "float32")
                for c in (False, True) for m in modes for n in (512, 2048)]
    # D=128 first and N=8k (the goal shape) first within it: a device check that runs
    # out of time still has the cases that matter most
    for d in (128, 64):
        for n in (8192, 16384, 1024, 4096):
            for c in (False, True):
                for m in modes:
                    out.append(_case(16384 // n, 2048 // d, n, d, c, m, device, "bfloat16"))
    return out


def impls(case):
    base = ["torch"]
    if case.device == "cuda":
        base += ["torch-flash", "torch-cudnn"]
    return base + harness.seqkern_impls(case.device)


def inputs(case, dtype, device):
    p = case.params
    shape = (p["B"], p["H"], p["N"], p["D"])
    return {n: torch.randn(shape, device=device, dtype=torch.float32).to(dtype) for n in ("q", "k", "v")}


def ref_bytes(case):
    p = case.params
    scores = 8 * p["B"] * p["H"] * p["N"] * p["N"]
    return scores * (5 if case.mode == "fwdbwd" else 2)


def _sdpa_backend(impl):
    from torch.nn.attention import SDPBackend

    name = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION"}[impl]
    if not hasattr(SDPBackend, name):
        raise Unavailable(f"this torch has no SDPBackend.{name}")
    return getattr(SDPBackend, name)


def forward(case, impl, inp):
    q, k, v = inp["q"], inp["k"], inp["v"]
    causal = bool(case.params["causal"])
    if impl == "torch":
        return (lambda: (F.scaled_dot_product_attention(q, k, v, is_causal=causal),)), [q, k, v]
    if impl.startswith("torch-"):
        from torch.nn.attention import sdpa_kernel

        which = _sdpa_backend(impl)

        def fn():
            # The backward kernel follows the forward's choice (it is recorded in the autograd node).
            with sdpa_kernel([which]):
                return (F.scaled_dot_product_attention(q, k, v, is_causal=causal),)
        return fn, [q, k, v]
    backend = harness.backend_of(impl)
    if backend is None:
        raise Unavailable(f"unknown implementation {impl}")
    from seqkern import functional as SF

    return (lambda: (SF.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend),)), [q, k, v]


def test_attention(bench, case, impl):
    bench(sys.modules[__name__], case, impl)
