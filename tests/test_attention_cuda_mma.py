"""On a GPU: the tensor-core attention kernels (csrc/cuda/attention_mma.cu, opt-in through
SEQKERN_ATTN_MMA=1) through the public op against the fp64 reference and against the default SIMT
kernel, fp16 and bf16, every gradient. The same cases run on the CPU through the CUDA emulator in
tests/test_cuda_emu_mma.py; this is where the real instructions, cp.async and the memory model are
exercised (bench/gpu_check.sh runs it)."""
import pytest
import torch

import seqkern.functional as SF
from seqkern.ops import attention as A

from helpers import MMA_ATTN_CASES, require

pytestmark = pytest.mark.cuda

# the cases the emulator runs (tests/helpers.py), and two larger shapes with many tiles per block
CASES = MMA_ATTN_CASES + [
    (2, 8, 2, 1000, 1000, 128, 128, None, True, 0.0),
    (1, 4, 4, 513, 1031, 64, 64, "additive", False, 0.1),
]


def _inputs(case, dtype):
    B, Hq, Hk, L, S, E, Ev, mask_kind, causal, p = case
    g = torch.Generator().manual_seed(sum(map(ord, repr(case))))
    q = torch.randn(B, Hq, L, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, S, E, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, S, Ev, generator=g, dtype=torch.float64)
    mask = None
    if mask_kind == "additive":
        mask = torch.randn(B, 1, L, S, generator=g, dtype=torch.float64) * 2
    elif mask_kind == "keys":  # boolean, True keeps
        mask = torch.rand(1, Hq, 1, S, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "dead_rows":  # every third query row sees nothing
        mask = torch.rand(B, 1, L, S, generator=g) > 0.5
        mask[:, :, ::3] = False
    dout = torch.randn(B, Hq, L, Ev, generator=g, dtype=torch.float64)
    rt = lambda t: t.to(dtype).double()  # what the kernels see, in fp64 for the reference
    return [rt(t) for t in (q, k, v)], mask, causal, p, rt(dout)


def _grads(q, k, v, mask, causal, p, dout, backend, device, dtype):
    args = [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_() for t in (q, k, v)]
    m = None if mask is None else (mask.to(device) if mask.dtype == torch.bool else mask.to(device, dtype))
    torch.manual_seed(1234)  # the dropout seed is drawn from torch's generator: the same for every run
    out = SF.scaled_dot_product_attention(*args, attn_mask=m, dropout_p=p, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1], backend=backend)
    out.backward(dout.to(device=device, dtype=dtype))
    return [t.detach().double().cpu() for t in (out, *(a.grad for a in args))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_mma_matches_reference_and_simt(case, dtype, monkeypatch):
    require("cuda")
    (q, k, v), mask, causal, p, dout = _inputs(case, dtype)
    want = _grads(q, k, v, mask, causal, p, dout, "reference", "cpu", torch.float64)
    monkeypatch.setenv("SEQKERN_ATTN_MMA", "0")
    simt = _grads(q, k, v, mask, causal, p, dout, "cuda", "cuda", dtype)
    monkeypatch.setenv("SEQKERN_ATTN_MMA", "1")
    mma = _grads(q, k, v, mask, causal, p, dout, "cuda", "cuda", dtype)
    eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    for name, g, s, w in zip(("out", "dq", "dk", "dv"), mma, simt, want):
        assert torch.isfinite(g).all(), f"{name}: NaN or inf"
        err, err_simt = (g - w).abs().max().item(), (s - w).abs().max().item()
        # P and dS are rounded to the input dtype before their products (as in FlashAttention)
        bound = max(4 * err_simt, 8 * eps * max(1.0, w.abs().max().item()))
        assert err <= bound, f"{name}: max error {err:.3g} (SIMT {err_simt:.3g}, bound {bound:.3g})"
    if mask is not None and mask.dtype == torch.bool and (~mask).all(-1).any():
        dead = (~mask).all(-1).expand(q.shape[0], q.shape[1], q.shape[2])
        assert (mma[0][dead] == 0).all() and (mma[1][dead] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_mma_dropout_mask_is_the_simt_one(dtype, monkeypatch):
    require("cuda")
    # q = 0: P uniform; v = I: out = P o Z, zero exactly where an element was dropped
    B, H, L, S = 2, 3, 200, 96
    q = torch.zeros(B, H, L, 32, device="cuda", dtype=dtype)
    k = torch.randn(B, H, S, 32, device="cuda").to(dtype)
    v = torch.eye(S, device="cuda", dtype=dtype).expand(B, H, S, S).contiguous()
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("SEQKERN_ATTN_MMA", flag)
        torch.manual_seed(99)
        outs.append(SF.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="cuda"))
    assert torch.equal(outs[0] != 0, outs[1] != 0)
    assert 0.6 < (outs[1] != 0).float().mean().item() < 0.8
