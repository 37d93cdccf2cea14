"""Attention as real code uses torch's: cases found by an audit against torch 2.13 (CPU) that the other
attention tests did not cover. Each compares with torch itself on every backend that runs here."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqkern
from seqkern import functional as SF

from helpers import TOL, backend_param

BACKENDS = [backend_param(b) for b in ("reference", "cpu", "triton")]
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
FP32_MIN = torch.finfo(torch.float32).min


def _qkv(B=2, H=3, L=5, S=7, E=8, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, H, n, E, generator=g, dtype=dtype).requires_grad_(grad) for n in (L, S, S)]


def _compare(backend, q, k, v, mask=None, tol=TOL[torch.float32], **kw):
    """Output and the gradient of every input that requires one (the mask included) against torch."""
    def run(fn):
        ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in (q, k, v)]
        m = None if mask is None else mask.detach().clone().requires_grad_(mask.requires_grad)
        out = fn(*ins, attn_mask=m, **kw)
        leaves = [t for t in ins + [m] if t is not None and t.requires_grad]
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        return out, torch.autograd.grad((out * g).sum(), leaves) if leaves else ()

    want, want_g = run(F.scaled_dot_product_attention)
    got, got_g = run(lambda *a, **k_: SF.scaled_dot_product_attention(*a, **k_, backend=backend))
    torch.testing.assert_close(got, want, **tol)
    assert len(got_g) == len(want_g)
    for a, b in zip(got_g, want_g):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


# torch's default CPU kernel (and CUDA's memory-efficient one) apply attn_mask and is_causal together;
# only its math fallback refuses the pair
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(5, 5), (7, 4), (3, 9)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_and_is_causal_both_apply_like_torch(backend, L, S, kind):
    q, k, v = _qkv(L=L, S=S)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, L, S, generator=g) > 0.3 if kind == "bool" else torch.randn(L, S, generator=g)
    mask[..., 0] = True if kind == "bool" else 0.0  # torch gives NaN for dead rows (seqkern 0)
    _compare(backend, q, k, v, mask, is_causal=True)


# torch accepts a float32 attn_mask with any query dtype; generate_square_subsequent_mask gives float32
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_mask_with_fp64_query_and_its_gradient(backend):
    q, k, v = _qkv(L=6, S=6, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(6) + torch.randn(6, 6)
    _compare(backend, q, k, v, mask.requires_grad_(), tol=TOL[torch.float64])


@pytest.mark.parametrize("backend", [None, "reference", backend_param("triton")])
def test_float32_mask_with_fp16_query(backend):
    q, k, v = _qkv(dtype=torch.float16, grad=False)
    mask = torch.randn(5, 7)
    got = SF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    # torch adds the fp32 mask in fp32: the reference (fp32 accumulation) reproduces that exactly
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=2e-3, atol=2e-3)


def test_mask_of_another_low_dtype_is_refused_like_torch():
    q, k, v = _qkv(grad=False)
    for dt in (torch.float64, torch.float16, torch.int64):
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 7, dtype=dt))
        with pytest.raises(TypeError, match="attn_mask"):
            SF.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 7, dtype=dt))


# Hugging Face style masks: finfo(float32).min instead of -inf. A row masked everywhere with it is not
# dead for torch (it averages v uniformly), and the mask's gradient there is finite
@pytest.mark.parametrize("backend", BACKENDS)
def test_finfo_min_mask_rows_like_torch(backend):
    q, k, v = _qkv(L=6, S=6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, 0, :3] = FP32_MIN
    mask[1, ..., 2:] = FP32_MIN
    _compare(backend, q, k, v, mask.requires_grad_())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_head_dim_and_empty_keys(backend):
    q, k, v = torch.randn(2, 3, 4, 0), torch.randn(2, 3, 5, 0), torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(SF.scaled_dot_product_attention(q, k, v, backend=backend),
                               F.scaled_dot_product_attention(q, k, v))
    q, k, v = _qkv(S=0)
    out = SF.scaled_dot_product_attention(q, k, v, backend=backend)
    assert out.shape == (2, 3, 5, 8) and not out.any()
    for gr in torch.autograd.grad(out.sum(), (q, k, v)):  # zeros, as torch's, never None
        assert gr is not None and not gr.any()


# -- real models after replace_modules ------------------------------------------------------------

D, NH, B_, S_, T_ = 16, 4, 3, 7, 5


def _models(batch_first, norm_first):
    kw = dict(dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    return {
        "encoder_layer": lambda: nn.TransformerEncoderLayer(D, NH, 32, **kw),
        "encoder": lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(D, NH, 32, **kw), 2),
        "decoder_layer": lambda: nn.TransformerDecoderLayer(D, NH, 32, **kw),
        "transformer": lambda: nn.Transformer(D, NH, 1, 1, 32, **kw),
    }


def _call(name, m, batch_first):
    g = torch.Generator().manual_seed(4)
    src = torch.randn((B_, S_, D) if batch_first else (S_, B_, D), generator=g)
    tgt = torch.randn((B_, T_, D) if batch_first else (T_, B_, D), generator=g)
    kpm = torch.zeros(B_, S_, dtype=torch.bool)
    kpm[0, -3:] = True
    src_mask = nn.Transformer.generate_square_subsequent_mask(S_)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(T_)
    if name == "encoder_layer":
        return m(src, src_mask=src_mask, src_key_padding_mask=kpm)
    if name == "encoder":
        return m(src, src_key_padding_mask=kpm)
    if name == "decoder_layer":
        return m(tgt, src, tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=kpm)
    return m(src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=kpm, memory_key_padding_mask=kpm, tgt_is_causal=True)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("name", ["encoder_layer", "encoder", "decoder_layer", "transformer"])
def test_transformer_modules_after_replace_modules(name, batch_first, norm_first):
    torch.manual_seed(0)
    ref = _models(batch_first, norm_first)[name]()
    ours = seqkern.replace_modules(copy.deepcopy(ref))
    assert any(type(m).__module__.startswith("seqkern") for m in ours.modules())
    want = _call(name, ref, batch_first)
    got = _call(name, ours, batch_first)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * g).sum(), list(ours.parameters())),
                    torch.autograd.grad((want * g).sum(), list(ref.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ref.eval(), ours.eval()
    with torch.no_grad():  # torch's fused fast paths where they apply: the converted model gives the same
        torch.testing.assert_close(_call(name, ours, batch_first), _call(name, ref, batch_first))
    ref.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())


def test_encoder_nested_tensor_reaches_attention_when_the_layer_fast_path_is_off():
    """nn.TransformerEncoder packs a padded batch into a nested tensor in inference; a forward hook
    turns the layers' fast path off, so each layer calls self_attn with that nested tensor."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, NH, 32, dropout=0.0, batch_first=True), 2).eval()
    ours = seqkern.replace_modules(copy.deepcopy(ref))
    seen = []
    for m in (ref, ours):
        m.layers[0].self_attn.register_forward_hook(lambda mod, args, out: seen.append(args[0].is_nested))
    x = torch.randn(B_, S_, D)
    kpm = torch.zeros(B_, S_, dtype=torch.bool)
    kpm[0, -3:] = True
    with torch.no_grad():
        want, got = ref(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    assert seen == [True, True]
    torch.testing.assert_close(got, want)


# -- torch.func and forward-mode AD: the fused backends' autograd cannot be seen through, so automatic
# selection takes the reference (plain torch); an explicit fused backend says why

def test_torch_func_per_sample_grads_of_multihead_attention():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=True)
    ours = seqkern.replace_modules(copy.deepcopy(ref))
    x = torch.randn(4, 5, 8)

    def loss(params, xb, mod):
        xb = xb[None]
        return torch.func.functional_call(mod, params, (xb, xb, xb), dict(need_weights=False))[0].pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))
    got = per_sample(dict(ours.named_parameters()), x, ours)
    want = per_sample(dict(ref.named_parameters()), x, ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_torch_func_with_an_explicit_fused_backend_says_why():
    q, k, v = _qkv(grad=False)
    with pytest.raises(seqkern.BackendUnavailable, match="torch.func"):
        torch.func.grad(lambda q: SF.scaled_dot_product_attention(q, k, v, backend="cpu").sum())(q)


def test_forward_mode_ad_through_attention_and_rotary():
    import torch.autograd.forward_ad as fwad

    q, k, v = _qkv(dtype=torch.float64, grad=False)
    tq = torch.randn_like(q)
    cos, sin = seqkern.ops.rotary.rotary_cos_sin(5, 8, dtype=torch.float64)
    with fwad.dual_level():
        qd = fwad.make_dual(q, tq)
        got = fwad.unpack_dual(SF.scaled_dot_product_attention(qd, k, v, is_causal=True)).tangent
        # torch's CPU SDPA has no forward AD: its math, written out
        causal = torch.ones(5, 7, dtype=torch.bool).tril()
        scores = (qd @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~causal, float("-inf"))
        want = fwad.unpack_dual(torch.softmax(scores, -1) @ v).tangent
        rot = fwad.unpack_dual(SF.apply_rotary(qd, qd, cos, sin)[0]).tangent
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    # a rotation is linear: the tangent of the rotated q is the rotated tangent
    torch.testing.assert_close(rot, SF.apply_rotary(tq, tq, cos, sin, backend="reference")[0], **TOL[torch.float64])


@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_jit_script_of_a_converted_model(batch_first):
    """TorchScript cannot compile seqkern's forward: scripting hands torch's module the same parameters."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(D, NH, 32, dropout=0.0, batch_first=batch_first)
    ours = seqkern.replace_modules(copy.deepcopy(ref))
    scripted = torch.jit.script(ours)
    x = torch.randn((B_, S_, D) if batch_first else (S_, B_, D))
    kpm = torch.zeros(B_, S_, dtype=torch.bool)
    kpm[0, -2:] = True
    torch.testing.assert_close(scripted(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm))
    assert scripted.self_attn.in_proj_weight is ours.self_attn.in_proj_weight
    mha = seqkern.nn.MultiheadAttention(D, NH, backend="cpu")
    q = torch.randn(S_, B_, D)
    torch.testing.assert_close(torch.jit.script(mha)(q, q, q)[0], mha(q, q, q)[0])
    assert type(mha) is seqkern.nn.MultiheadAttention  # a module scripted directly stays seqkern's


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_laid_out_like_a_transposed_query(backend):
    """(B, L, H, E) projections viewed as (B, H, L, E) (GPT-style code): torch's output has the query's
    layout, so `o.transpose(1, 2).view(B, L, H * E)` works; on contiguous inputs it is contiguous."""
    B, L, H, E = 2, 5, 3, 8
    x = torch.randn(B, L, 3 * H * E, requires_grad=True)
    q, k, v = (t.view(B, L, H, E).transpose(1, 2) for t in x.split(H * E, dim=2))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = SF.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    assert got.stride() == want.stride()
    y = got.transpose(1, 2).view(B, L, H * E)
    torch.testing.assert_close(y, want.transpose(1, 2).view(B, L, H * E))
    gx, = torch.autograd.grad(y.pow(2).sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(want.pow(2).sum(), x)[0])
    q2, k2, v2 = torch.randn(3, B, H, L, E).unbind(0)
    assert SF.scaled_dot_product_attention(q2, k2, v2, backend=backend).is_contiguous()


def test_nested_jagged_inputs_get_a_clear_error():
    qn = torch.nested.nested_tensor([torch.randn(4, 3, 8), torch.randn(6, 3, 8)], layout=torch.jagged).transpose(1, 2)
    with pytest.raises(TypeError, match="query is a nested tensor"):
        SF.scaled_dot_product_attention(qn, qn, qn)
