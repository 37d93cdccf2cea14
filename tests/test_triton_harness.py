"""The Triton harness: kernels run under TRITON_INTERPRET=1 on a machine without a GPU."""
import os

import pytest
import torch

pytestmark = pytest.mark.triton


def test_interpreter_is_on_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: Triton compiles for it instead of interpreting")
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_tiny_kernel_runs_and_is_right():
    from seqkern.kernels import probe

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1000, device=dev)
    y = torch.randn(1000, device=dev)
    out = probe.axpy(2.5, x, y)
    torch.testing.assert_close(out, 2.5 * x + y)
    # the mask on the last block: 1000 is not a multiple of the block size
    assert out.shape == (1000,)


def test_triton_backend_reported_available():
    import seqkern

    st = seqkern.backends()["triton"]
    assert st["available"], st["reason"]
