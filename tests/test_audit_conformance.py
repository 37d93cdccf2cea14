"""Conformance audit against torch 2.13 (CPU): what a user's code written for torch does with
seqkern's ops and modules (the automatic backend, as a drop-in gets it). Each case here differed
from torch before its fix."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqkern
from seqkern import functional as SF, nn as snn

F64 = torch.float64


def _leaves(*shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, dtype=F64, generator=g).requires_grad_() for s in shapes]


def _penalty_grads(fn, ins):
    """A gradient penalty (WGAN-GP, MAML): the first gradient with create_graph, then the
    gradient of its norm with respect to every input."""
    out = fn(*ins)
    g = torch.autograd.grad((out * out.detach().cos()).sum(), ins, create_graph=True)
    return g + torch.autograd.grad(sum(x.pow(2).sum() for x in g), ins)


# ---------------------------------------------------------------------------
# double backward through attention and WKV with the automatic backend
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "causal", "float_mask", "gqa", "scale"])
def test_sdpa_double_backward_like_torch(case):
    """torch's SDPA differentiates twice on the CPU; the automatically chosen backend (the fused
    cpu kernel) must not turn a create_graph backward into an error (the RNN ops already fall back
    to the reference's recomputation there)."""
    shapes = [(2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 6)]
    kw = {}
    if case == "causal":
        kw["is_causal"] = True
    if case == "gqa":
        shapes = [(2, 6, 4, 8), (2, 2, 5, 8), (2, 2, 5, 6)]
        kw["enable_gqa"] = True
    if case == "float_mask":
        shapes.append((4, 5))
    if case == "scale":
        kw["scale"] = 0.3

    def run(fn):
        ins = _leaves(*shapes, seed=1)
        if case == "float_mask":
            return _penalty_grads(lambda q, k, v, m: fn(q, k, v, attn_mask=m, **kw), ins)
        return _penalty_grads(lambda q, k, v: fn(q, k, v, **kw), ins)

    want = run(F.scaled_dot_product_attention)
    got = run(SF.scaled_dot_product_attention)
    assert seqkern.last_backend("scaled_dot_product_attention") == "cpu"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_sdpa_double_backward_with_dropout_matches_the_reference():
    """With dropout the mask is seqkern's (not torch's RNG): the create_graph gradients of the
    automatic backend equal the reference's, which uses the same mask."""
    torch.manual_seed(3)
    ins = _leaves((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 8), seed=2)

    def run(backend):
        torch.manual_seed(7)
        return _penalty_grads(lambda q, k, v: SF.scaled_dot_product_attention(q, k, v, dropout_p=0.4,
                                                                              backend=backend), ins)

    for a, b in zip(run(None), run("reference")):
        torch.testing.assert_close(a, b)


def test_sdpa_explicit_fused_backend_still_refuses_double_backward():
    q, k, v = _leaves((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 8), seed=1)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(SF.scaled_dot_product_attention(q, k, v, backend="cpu").sum(), q, create_graph=True)


def test_multihead_attention_gradient_penalty_like_torch():
    """A gradient penalty on the input of the module, with need_weights=False (seqkern's fused
    kernels) against torch's with need_weights=True (its explicit softmax; torch's own
    need_weights=False path runs its CPU flash kernel, which has no double backward when the head
    dims agree, and the math kernel, which has, otherwise)."""
    torch.manual_seed(0)
    t = nn.MultiheadAttention(8, 2, dtype=F64, batch_first=True)
    s = snn.MultiheadAttention(8, 2, dtype=F64, batch_first=True)
    s.load_state_dict(t.state_dict())

    def run(m, need_weights):
        x, = _leaves((2, 5, 8), seed=4)
        return _penalty_grads(lambda x: m(x, x, x, need_weights=need_weights)[0], [x])

    for a, b in zip(run(s, False), run(t, True)):
        torch.testing.assert_close(a, b)


def test_wkv4_double_backward_with_the_automatic_backend():
    ins = _leaves((6,), (6,), (2, 5, 6), (2, 5, 6), seed=5)
    want = _penalty_grads(lambda w, u, k, v: SF.wkv4(w, u, k, v, backend="reference")[0], ins)
    got = _penalty_grads(lambda w, u, k, v: SF.wkv4(w, u, k, v)[0], ins)
    assert seqkern.last_backend("wkv4") == "cpu"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(SF.wkv4(*ins, backend="cpu")[0].sum(), ins[2], create_graph=True)


# ---------------------------------------------------------------------------
# SDPA output layout
# ---------------------------------------------------------------------------

def _bhle(B, H, L, E, dtype=torch.float32):
    """(B, H, L, E) as a view of (B, L, H, E) memory (GPT-style projections)."""
    return torch.randn(B, L, H, E, dtype=dtype).transpose(1, 2)


_LAYOUT_CASES = {
    # torch's CPU flash kernel: the output is laid out like the query (torch.empty_like(query))
    "flash": lambda: ((_bhle(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)), {}),
    "flash_mask4d": lambda: ((_bhle(2, 3, 4, 8), _bhle(2, 3, 5, 8), torch.randn(2, 3, 5, 8)),
                             dict(attn_mask=torch.randn(2, 3, 4, 5))),
    "flash_gqa": lambda: ((_bhle(2, 6, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)),
                          dict(enable_gqa=True)),
    "flash_query_with_gaps": lambda: ((torch.randn(4, 2, 6, 8)[:, :, :3].permute(1, 2, 0, 3), torch.randn(2, 3, 4, 8),
                                       torch.randn(2, 3, 4, 8)), {}),
    "flash_query_batch_broadcast": lambda: ((torch.randn(1, 4, 3, 8).expand(2, 4, 3, 8).transpose(1, 2),
                                             torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)), {}),
    # everything else is its math kernel, whose output is contiguous whatever the query's layout
    "value_dim_differs": lambda: ((_bhle(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 6)), {}),
    "dropout": lambda: ((_bhle(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)), dict(dropout_p=0.3)),
    "key_batch_broadcast": lambda: ((_bhle(2, 3, 4, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8)), {}),
    "mask3d": lambda: ((_bhle(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)),
                       dict(attn_mask=torch.randn(3, 4, 5))),
    "mask_requires_grad": lambda: ((_bhle(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)),
                                   dict(attn_mask=torch.randn(4, 5, requires_grad=True))),
    "key_last_dim_strided": lambda: ((_bhle(2, 3, 4, 8), torch.randn(2, 3, 5, 16)[..., ::2], torch.randn(2, 3, 5, 8)),
                                     {}),
    "query_last_dim_strided": lambda: ((torch.randn(2, 4, 8, 3).permute(0, 3, 1, 2), torch.randn(2, 3, 5, 8),
                                        torch.randn(2, 3, 5, 8)), {}),
    "query_expanded_batch": lambda: ((torch.randn(1, 3, 4, 8).expand(2, 3, 4, 8), torch.randn(2, 3, 5, 8),
                                      torch.randn(2, 3, 5, 8)), {}),
    "query_expanded_heads": lambda: ((torch.randn(2, 1, 4, 8).expand(2, 3, 4, 8), torch.randn(2, 3, 5, 8),
                                      torch.randn(2, 3, 5, 8)), {}),
    "no_keys": lambda: ((_bhle(2, 3, 4, 8), torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 8)), {}),
}


@pytest.mark.parametrize("backend", [None, "reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("case", list(_LAYOUT_CASES))
def test_sdpa_output_strides_like_torch(case, backend):
    """The output's memory layout is torch's: code follows SDPA with views (``o.transpose(1, 2).view``
    after a flash-style call, ``o.view(B, -1)`` after a math-style one) that need it."""
    (q, k, v), kw = _LAYOUT_CASES[case]()
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    if kw.get("dropout_p"):
        kw = dict(kw, dropout_p=0.3)
    got = SF.scaled_dot_product_attention(q, k, v, **kw, backend=backend)
    assert got.shape == want.shape
    assert got.stride() == want.stride()
    if not kw.get("dropout_p"):
        torch.testing.assert_close(got, want.detach())


# ---------------------------------------------------------------------------
# SDPA: torch's exception types, GQA with different key and value heads
# ---------------------------------------------------------------------------

def _r(*s, dtype=torch.float32):
    return torch.randn(*s, dtype=dtype)


_SDPA_ERRORS = {
    "gqa_heads_do_not_divide": lambda: ((_r(2, 5, 4, 8), _r(2, 2, 5, 8), _r(2, 2, 5, 8)), dict(enable_gqa=True)),
    "gqa_more_key_heads": lambda: ((_r(2, 2, 4, 8), _r(2, 4, 5, 8), _r(2, 4, 5, 8)), dict(enable_gqa=True)),
    "heads_differ_without_gqa": lambda: ((_r(2, 6, 4, 8), _r(2, 2, 5, 8), _r(2, 2, 5, 8)), {}),
    "batch_mismatch": lambda: ((_r(2, 3, 4, 8), _r(3, 3, 5, 8), _r(3, 3, 5, 8)), {}),
    "embed_dim_mismatch": lambda: ((_r(2, 3, 4, 8), _r(2, 3, 5, 7), _r(2, 3, 5, 8)), {}),
    "seq_len_mismatch": lambda: ((_r(2, 3, 4, 8), _r(2, 3, 5, 8), _r(2, 3, 6, 6)), {}),  # E == Ev: torch says nothing
    "one_dim": lambda: ((_r(8), _r(8), _r(8)), {}),
    "dtype_mismatch": lambda: ((_r(2, 3, 4, 8, dtype=F64), _r(2, 3, 5, 8), _r(2, 3, 5, 8, dtype=F64)), {}),
    "integer_query": lambda: ((torch.ones(2, 3, 4, 8, dtype=torch.long), _r(2, 3, 5, 8), _r(2, 3, 5, 8)), {}),
    "mask_dtype": lambda: ((_r(2, 3, 4, 8), _r(2, 3, 5, 8), _r(2, 3, 5, 8)),
                           dict(attn_mask=torch.ones(4, 5, dtype=torch.long))),
    "mask_shape": lambda: ((_r(2, 3, 4, 8), _r(2, 3, 5, 8), _r(2, 3, 5, 8)),
                           dict(attn_mask=torch.ones(3, 5, dtype=torch.bool))),
    "mask_rank_5": lambda: ((_r(2, 3, 4, 8), _r(2, 3, 5, 8), _r(2, 3, 5, 8)),
                            dict(attn_mask=torch.ones(1, 1, 1, 4, 5, dtype=torch.bool))),
    "dropout_over_1": lambda: ((_r(2, 3, 4, 8), _r(2, 3, 5, 8), _r(2, 3, 5, 8)), dict(dropout_p=1.5)),
    "scale_str": lambda: ((_r(2, 3, 4, 8), _r(2, 3, 5, 8), _r(2, 3, 5, 8)), dict(scale="a")),
    "is_causal_int": lambda: ((_r(2, 3, 4, 8), _r(2, 3, 5, 8), _r(2, 3, 5, 8)), dict(is_causal=1)),
}


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("case", list(_SDPA_ERRORS))
def test_sdpa_errors_are_torchs_exception_types(case, backend):
    """What torch raises (RuntimeError for shapes and dtypes, TypeError for argument kinds), so
    code written for torch catches it; still a ValueError/TypeError naming the argument (DESIGN)."""
    args, kw = _SDPA_ERRORS[case]()
    with pytest.raises(Exception) as want:
        F.scaled_dot_product_attention(*args, **kw)
    with pytest.raises(type(want.value)) as got:
        SF.scaled_dot_product_attention(*args, **kw, backend=backend)
    assert isinstance(got.value, (ValueError, TypeError))


@pytest.mark.parametrize("backend", [None, "reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("heads", [(6, 2, 3), (6, 3, 1), (4, 1, 2)])
def test_sdpa_gqa_with_different_key_and_value_heads_like_torch(heads, backend):
    """torch's enable_gqa repeats key and value to the query's heads separately, so their head counts
    need only divide the query's."""
    Hq, Hk, Hv = heads
    q, k, v = _leaves((2, Hq, 4, 8), (2, Hk, 5, 8), (2, Hv, 5, 6), seed=6)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    got = SF.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend=backend)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# recurrent layers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_input_dtype_error_is_torchs_type(mode, packed):
    """An fp64 input to an fp32 layer: torch raises ValueError for a tensor and RuntimeError (its
    matmul's) for a PackedSequence; seqkern's error is both, naming the dtypes either way."""
    t, s = getattr(nn, mode)(3, 4), getattr(snn, mode)(3, 4)
    x = torch.randn(5, 2, 3, dtype=F64)
    if packed:
        x = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]))
    with pytest.raises(Exception) as want:
        t(x)
    with pytest.raises(type(want.value), match="float64"):
        s(x)
