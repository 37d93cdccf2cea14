"""Shared test utilities: available backends and tolerances."""
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
