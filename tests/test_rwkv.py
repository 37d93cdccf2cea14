"""RWKV-4 layers: checkpoint parameter names, the official forward (written out here
independently), parallel mode == step mode, continuing from a saved state, gradients."""
import pytest
import torch
import torch.nn.functional as F

from seqkern import nn as snn

from helpers import TOL

F64 = torch.float64


def block_names(n_embd, dim_ffn, layer0):
    C, Fd = n_embd, dim_ffn
    names = {
        "ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
        "att.time_decay": (C,), "att.time_first": (C,), "att.time_mix_k": (1, 1, C), "att.time_mix_v": (1, 1, C),
        "att.time_mix_r": (1, 1, C), "att.key.weight": (C, C), "att.value.weight": (C, C),
        "att.receptance.weight": (C, C), "att.output.weight": (C, C),
        "ffn.time_mix_k": (1, 1, C), "ffn.time_mix_r": (1, 1, C), "ffn.key.weight": (Fd, C),
        "ffn.receptance.weight": (C, C), "ffn.value.weight": (C, Fd),
    }
    if layer0:
        names.update({"ln0.weight": (C,), "ln0.bias": (C,)})
    return names


@pytest.mark.parametrize("layer_id", [0, 2])
def test_checkpoint_names_and_shapes_load(layer_id):
    blk = snn.RWKV4Block(16, 48, layer_id, n_layer=3)
    sd = blk.state_dict()
    want = block_names(16, 48, layer_id == 0)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    # a checkpoint's blocks.{i}.* tensors load by name
    ckpt = {f"blocks.{layer_id}.{k}": torch.randn(s) for k, s in want.items()}
    ckpt["emb.weight"] = torch.randn(10, 16)
    prefix = f"blocks.{layer_id}."
    blk.load_state_dict({k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)})
    assert torch.equal(blk.att.time_decay, ckpt[prefix + "att.time_decay"])


def test_init_follows_rwkv4():
    blk = snn.RWKV4Block(8, 32, 1, n_layer=4)
    tm = blk.att
    assert torch.all((tm.time_mix_k >= 0) & (tm.time_mix_k <= 1))
    torch.testing.assert_close(tm.time_decay[0], torch.tensor(-5.0))
    torch.testing.assert_close(tm.time_decay[-1], torch.tensor(3.0))
    torch.testing.assert_close(tm.time_mix_v - tm.time_mix_k, torch.full((1, 1, 8), 0.1))  # 0.3 * 1/3


def official_wkv(w, u, k, v):
    """RWKV-4's WKV as the direct sum (w = -exp(time_decay)), fp64, from an empty state."""
    B, T, C = k.shape
    out = torch.empty_like(k)
    for t in range(T):
        i = torch.arange(t, dtype=k.dtype)
        e = torch.exp((t - 1 - i)[None, :, None] * w + k[:, :t])
        cur = torch.exp(u + k[:, t])
        out[:, t] = ((e * v[:, :t]).sum(1) + cur * v[:, t]) / (e.sum(1) + cur)
    return out


def official_block(blk, x):
    """RWKV-v4neo Block.forward from its equations (time_shift = ZeroPad2d((0, 0, 1, -1)))."""
    shift = lambda z: F.pad(z, (0, 0, 1, -1))  # noqa: E731
    if blk.layer_id == 0:
        x = blk.ln0(x)
    a, f = blk.att, blk.ffn
    h = blk.ln1(x)
    xx = shift(h)
    xk = h * a.time_mix_k + xx * (1 - a.time_mix_k)
    xv = h * a.time_mix_v + xx * (1 - a.time_mix_v)
    xr = h * a.time_mix_r + xx * (1 - a.time_mix_r)
    sr = torch.sigmoid(a.receptance(xr))
    x = x + a.output(sr * official_wkv(-torch.exp(a.time_decay), a.time_first, a.key(xk), a.value(xv)))
    h = blk.ln2(x)
    xx = shift(h)
    xk = h * f.time_mix_k + xx * (1 - f.time_mix_k)
    xr = h * f.time_mix_r + xx * (1 - f.time_mix_r)
    return x + torch.sigmoid(f.receptance(xr)) * f.value(torch.square(torch.relu(f.key(xk))))


def randomise(blk):
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return blk


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("layer_id", [0, 1])
def test_block_matches_official_forward(backend, layer_id):
    blk = randomise(snn.RWKV4Block(12, 24, layer_id, n_layer=2, backend=backend, dtype=F64))
    x = torch.randn(2, 9, 12, dtype=F64)
    y, _ = blk(x)
    torch.testing.assert_close(y, official_block(blk, x), **TOL[F64])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_parallel_mode_equals_step_mode_and_states_continue(backend, dtype):
    blk = randomise(snn.RWKV4Block(10, 20, 0, backend=backend, dtype=dtype))
    x = torch.randn(3, 11, 10, dtype=dtype)
    y, st = blk(x)
    assert st.shape == (3, 5, 10)
    # token by token
    ys, s = [], None
    for t in range(11):
        yt, s = blk(x[:, t:t + 1], s)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 1), y, **TOL[dtype])
    torch.testing.assert_close(s, st, **TOL[dtype])
    # a prefix in parallel mode, then the rest from its state
    y1, s1 = blk(x[:, :4])
    y2, s2 = blk(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat((y1, y2), 1), y, **TOL[dtype])
    torch.testing.assert_close(s2, st, **TOL[dtype])
    # the explicit empty state is what None means
    y0, _ = blk(x, blk.initial_state(3, dtype=dtype))
    torch.testing.assert_close(y0, y, **TOL[dtype])


def test_cpu_gradients_match_reference_for_every_parameter():
    torch.manual_seed(1)
    a = randomise(snn.RWKV4Block(8, 16, 0, backend="cpu", dtype=F64))
    b = snn.RWKV4Block(8, 16, 0, backend="reference", dtype=F64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 7, 8, dtype=F64, requires_grad=True)
    st = a.initial_state(2, dtype=F64)
    st[:, 1:4] = torch.stack((torch.randn(2, 8), torch.rand(2, 8) + 1, torch.randn(2, 8)), 1).double()
    st.requires_grad_()
    ya, sa = a(x, st)
    yb, sb = b(x, st)
    ga = torch.autograd.grad(ya.square().sum() + sa.sum(), [x, st, *a.parameters()])
    gb = torch.autograd.grad(yb.square().sum() + sb.sum(), [x, st, *b.parameters()])
    for (name, _), g1, g2 in zip([("x", 0), ("state", 0), *a.named_parameters()], ga, gb):
        torch.testing.assert_close(g1, g2, **TOL[F64], msg=lambda m: f"{name}: {m}")


def test_time_and_channel_mix_standalone_states():
    tm = snn.RWKV4TimeMix(6, backend="cpu")
    cm = snn.RWKV4ChannelMix(6, 12)
    x = torch.randn(2, 5, 6)
    y, s = tm(x)
    assert y.shape == x.shape and s.shape == (2, 4, 6)
    y1, s1 = tm(x[:, :2])
    y2, s2 = tm(x[:, 2:], s1)
    torch.testing.assert_close(torch.cat((y1, y2), 1), y)
    z, c = cm(x)
    assert z.shape == x.shape and c.shape == (2, 1, 6) and torch.equal(c[:, 0], x[:, -1])


@pytest.mark.parametrize("bad,match", [
    (lambda x, s: (x[0], None), "x"),
    (lambda x, s: (x[..., :4], None), "x"),
    (lambda x, s: (x, s[:, :4]), "state"),
    (lambda x, s: (x, s[:1]), "state"),
    (lambda x, s: (x, [1, 2]), "state"),
])
def test_block_bad_input(bad, match):
    blk = snn.RWKV4Block(8, 16, 0)
    x = torch.randn(2, 3, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        blk(*bad(x, blk.initial_state(2)))
    with pytest.raises(ValueError, match="n_layer"):
        snn.RWKV4Block(8, 16, 3, n_layer=2)


def test_example_rwkv_lm_smoke():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "rwkv_lm.py")
    spec = importlib.util.spec_from_file_location("rwkv_lm_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--steps", "12", "--seed", "0"])
    assert out["last"] < out["first"] - 0.3, out["losses"]
    assert out["step_vs_parallel"] < 1e-4
    assert len(out["sample"]) == 20
