"""Property-based parity: hypothesis draws shapes (1, primes, one past a block size,
empty batch), dtypes (fp32/fp64), memory layouts (non-contiguous, transposed,
expanded, storage offset) and options for every op, and every backend that runs
here (reference on strided views, cpu, triton under the interpreter on tiny
shapes) must give the reference's outputs and input gradients on contiguous
copies, without modifying its inputs.

Bounded for CI: few examples, no deadline, derandomized (the same examples on
every run), no example database."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from seqkern import functional as SF

from reliability import LAYOUTS, Arg, assert_parity, backends_for, require_family

# derandomize: CI sees the same examples every run; a failure is reproducible from its seed
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

DTYPES = st.sampled_from([torch.float32, torch.float64])
LAYOUT = st.sampled_from(LAYOUTS)
# 1, primes, and one past the power-of-two block sizes that kernels tile by
SIZES = [1, 2, 3, 5, 7, 13, 17, 33, 65]


def size(data, lo=1, hi=65, label="n"):
    return data.draw(st.sampled_from([s for s in SIZES if lo <= s <= hi]), label=label)


def seed(data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))


def cap(backend, n_cpu, n_triton):
    """Largest size drawn for a backend: the Triton interpreter runs tiny shapes only."""
    return n_triton if backend == "triton" else n_cpu


# ---------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_for("apply_rotary"))
@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_rotary(backend, data):
    seed(data)
    dtype = data.draw(DTYPES, label="dtype")
    B = data.draw(st.sampled_from([0, 1, 2, 3]), label="B")
    H = size(data, 1, 3, "H")
    Hk = data.draw(st.sampled_from([1, H]), label="Hk")
    T = size(data, 1, cap(backend, 65, 17), "T")
    D = 2 * size(data, 1, cap(backend, 33, 17), "D/2")
    R = 2 * data.draw(st.integers(1, D // 2), label="R/2")
    il = data.draw(st.booleans(), label="interleaved")
    table_grad = data.draw(st.booleans(), label="table_grad")
    ang = torch.rand(T, R // 2, dtype=dtype) * 6.3
    args = dict(q=Arg(torch.randn(B, H, T, D, dtype=dtype), data.draw(LAYOUT, label="q_layout"), True),
                k=Arg(torch.randn(B, Hk, T, D, dtype=dtype), data.draw(LAYOUT, label="k_layout"), True),
                cos=Arg(ang.cos(), data.draw(LAYOUT, label="cos_layout"), table_grad),
                sin=Arg(ang.sin(), data.draw(LAYOUT, label="sin_layout"), table_grad))
    assert_parity(lambda a, be: SF.apply_rotary(a["q"], a["k"], a["cos"], a["sin"], interleaved=il, backend=be),
                  args, backend, dtype, op="apply_rotary")


# ---------------------------------------------------------------------------
# the machinery itself: layouts are what they claim, and the check catches what it must
# ---------------------------------------------------------------------------

def test_layouts_present_the_same_values_in_the_claimed_layout():
    x = torch.randn(3, 4, 5)
    for layout in LAYOUTS:
        a = Arg(x, layout, grad=True)
        v = a.present()
        want = x[:1].expand(3, 4, 5) if layout == "expanded" else x
        assert torch.equal(v, want), layout
        assert v.is_contiguous() == (layout in ("contiguous", "offset")), layout
        assert (v.storage_offset() == 3) == (layout == "offset"), layout
        (v * torch.arange(60.).view(3, 4, 5)).sum().backward()
        assert a.leaf.grad is not None and a.leaf.grad.shape == a.leaf.shape, layout
    assert Arg(x, "expanded").present().stride(0) == 0


def test_parity_check_catches_wrong_values_grads_and_mutation():
    args = dict(x=Arg(torch.randn(4, 3, dtype=torch.float64), "noncontig", grad=True))

    def fine(a, be):
        return a["x"].sin()

    def wrong_value(a, be):
        return a["x"].sin() + (be != "reference") * 1e-3

    def wrong_grad(a, be):
        y = a["x"].sin()
        return y if be == "reference" else y.detach() + a["x"] * 0

    def mutates(a, be):
        if be != "reference":
            a["x"].data.add_(1)
        return a["x"].detach().sin()

    assert_parity(fine, args, "cpu", torch.float64)
    for bad, match in ((wrong_value, "output"), (wrong_grad, "grad of x"), (mutates, "modified input x")):
        args = dict(x=Arg(torch.randn(4, 3, dtype=torch.float64), "offset", grad=True))
        with pytest.raises(AssertionError, match=match):
            assert_parity(bad, args, "cpu", torch.float64)
