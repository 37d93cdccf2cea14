"""Determinism: two runs with the same inputs give bitwise identical outputs and
input gradients on `cpu` and `reference` (GPU backends: `cuda`-marked variants);
dropout is reproducible under torch.manual_seed."""
import pytest
import torch

from reliability import TYPICAL, backends_for, forward_backward, require_backend, require_family, require_layer


def assert_bitwise(run1, run2, who):
    (o1, g1), (o2, g2) = run1, run2
    assert len(o1) == len(o2) and len(g1) == len(g2)
    for i, (a, b) in enumerate(zip(o1 + g1, o2 + g2)):
        assert torch.equal(a, b), f"{who}: tensor {i} differs between two identical runs " \
                                  f"(max diff {(a - b).abs().max().item():.3g})"


def cpu_cases():
    return [pytest.param(op, be, dt, id=f"{op}-{be}-{str(dt)[6:]}") for op in TYPICAL
            for be in backends_for(op) if be in ("reference", "cpu") for dt in (torch.float32, torch.float64)]


@pytest.mark.parametrize("op,backend,dtype", cpu_cases())
def test_bitwise_rerun_cpu(op, backend, dtype):
    family, call, args = TYPICAL[op](dtype)
    require_family(family)
    assert_bitwise(forward_backward(call, args, backend), forward_backward(call, args, backend), f"{op}/{backend}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", list(TYPICAL))
def test_bitwise_rerun_gpu(op, backend):
    family, call, args = TYPICAL[op](torch.float32, "cuda")
    require_family(family)
    assert_bitwise(forward_backward(call, args, backend), forward_backward(call, args, backend), f"{op}/{backend}")


# ---------------------------------------------------------------------------
# dropout under torch.manual_seed
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_attention_dropout_reproducible_under_manual_seed(backend):
    require_family("attention")
    from seqkern import functional as SF

    if backend not in backends_for("scaled_dot_product_attention"):
        pytest.skip(f"{backend} does not run attention here")
    dtype = torch.float32 if backend == "triton" else torch.float64  # triton attention has no fp64 path
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, 9, 8, dtype=dtype)

    def run(seed):
        torch.manual_seed(seed)
        o = SF.scaled_dot_product_attention(q, k, v, dropout_p=0.4, backend=backend)
        return [o.detach()] + list(torch.autograd.grad(o, (q, k, v), do))

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        assert torch.equal(a, b), "same seed, different dropout result"
    assert not torch.equal(first[0], other[0]), "the seed does not reach the dropout mask"
    plain = SF.scaled_dot_product_attention(q, k, v, backend=backend)
    assert not torch.allclose(first[0], plain), "dropout_p=0.4 dropped nothing"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_rnn_layer_dropout_reproducible_under_manual_seed(backend):
    require_layer("LSTM")
    require_backend("lstm", backend)
    from seqkern import nn as snn

    torch.manual_seed(0)
    lstm = snn.LSTM(5, 6, num_layers=3, dropout=0.5, backend=backend).double().train()
    x = torch.randn(7, 3, 5, dtype=torch.float64)

    def run(seed):
        torch.manual_seed(seed)
        y, _ = lstm(x)
        return [y.detach()] + list(torch.autograd.grad(y.square().sum(), list(lstm.parameters())))

    first, again, other = run(3), run(3), run(4)
    for a, b in zip(first, again):
        assert torch.equal(a, b), "same seed, different dropout result"
    assert not torch.equal(first[0], other[0]), "the seed does not reach the dropout mask"
