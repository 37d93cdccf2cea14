"""Shared test utilities: available backends, tolerances and case tables."""
import pytest
import torch

import seqkern
from seqkern import backends as B

# fp64 parity against the reference, and torch.testing defaults for fp32.
TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),  # torch.testing defaults (DESIGN.md)
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def cpu_backends():
    """Backends that can run on CPU tensors here (triton only under the interpreter)."""
    names = ["reference"]
    for n in ("cpu", "triton"):
        if B.available(n)[0]:
            names.append(n)
    return names


def backend_param(name):
    """pytest.param for a backend, marked so a missing one is visible as a skip with the reason."""
    marks = [pytest.mark.triton] if name == "triton" else [pytest.mark.cuda] if name == "cuda" else []
    return pytest.param(name, marks=marks, id=name)


def require(name):
    ok, reason = B.available(name)
    if not ok:
        pytest.fail(f"backend {name} unavailable: {reason}") if name in ("cpu",) else pytest.skip(reason)


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        if isinstance(b, torch.Tensor):
            assert torch.equal(b, a), "an input tensor was modified"


# The tensor-core attention kernels (csrc/cuda/attention_mma.cu), emulated on the CPU
# (test_cuda_emu_mma.py, which adds a mask with causal; the public op takes that pair too, as torch's
# default kernels do) and on a GPU through the public op (test_attention_cuda_mma.py, which adds larger shapes):
# (B, Hq, Hk, L, S, E, Ev, mask, causal, dropout_p). Lengths 1/17/70/130 against the 64-row blocks and
# 64- or 32-key tiles, GQA, L != S both ways, head dims 16/40/64/72/128 (both compiled widths, padded
# k-steps, E % 8 != 0 through the scalar tile loads), masks broadcast, causal, dropout, dead rows.
# mask: None; "additive" (B, 1, L, S); "keys" (1, Hq, 1, S) keep/drop, key 0 always kept; "dead_rows"
# (B, 1, L, S) keep/drop with every third query row seeing no key.
MMA_ATTN_CASES = [
    (1, 2, 2, 17, 17, 16, 16, None, False, 0.0),
    (1, 2, 1, 70, 33, 64, 64, "additive", False, 0.0),
    (2, 4, 2, 1, 70, 40, 40, "keys", False, 0.0),
    (1, 2, 2, 70, 70, 72, 72, None, True, 0.0),
    (1, 1, 1, 130, 70, 128, 128, None, True, 0.0),
    (1, 2, 2, 33, 130, 128, 96, "additive", False, 0.0),
    (1, 2, 1, 70, 70, 64, 64, None, True, 0.25),
    (1, 1, 1, 40, 70, 24, 40, "dead_rows", False, 0.2),
    (1, 4, 2, 70, 45, 128, 80, "additive", False, 0.1),
    (1, 4, 2, 100, 100, 96, 128, None, True, 0.0),
]


def flat(out):
    """Every tensor of a recurrent layer's or cell's output (output or packed data, h_n, c_n) in order;
    None entries (a state not returned) are left out."""
    res = []
    for o in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(o, torch.nn.utils.rnn.PackedSequence):
            res.append(o.data)
        elif isinstance(o, (tuple, list)):
            res.extend(flat(o))
        elif o is not None:
            res.append(o)
    return res
