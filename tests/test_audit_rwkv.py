"""Contract audit of the RWKV-4 family and the API surface.

The RWKV-4 block here is written independently from the published RWKV-4 equations, in the
two forms the outside code uses: GPT mode over a whole (B, T, C) sequence with the WKV of the
RWKV-4 CUDA kernel (running max o, numerator p, denominator q), and RNN mode one token at a time
with the per-layer state of ChatRWKV's ``rwkv`` package (att_xx, aa, bb, pp = -1e30, ffn_xx).
Its weights come from a raw state_dict with checkpoint names and shapes (time_mix_* (1, 1, C),
time_decay/time_first (C,), bias-free Linears, ln0 only in block 0), loaded with strict=True.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import seqkern
from seqkern import functional as SF, nn as snn

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["reference", "cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else [])


def checkpoint_block(layer_id, C, Fd, gen):
    r = lambda *s, scale=0.3: torch.randn(*s, generator=gen, dtype=F64) * scale  # noqa: E731
    sd = {}
    for n in (["ln0"] if layer_id == 0 else []) + ["ln1", "ln2"]:
        sd[f"{n}.weight"], sd[f"{n}.bias"] = 1 + r(C), r(C)
    sd["att.time_decay"], sd["att.time_first"] = r(C, scale=1.0), r(C, scale=1.0)
    for m in "kvr":
        sd[f"att.time_mix_{m}"] = torch.rand(1, 1, C, generator=gen, dtype=F64)
    for m in ("key", "value", "receptance", "output"):
        sd[f"att.{m}.weight"] = r(C, C)
    for m in "kr":
        sd[f"ffn.time_mix_{m}"] = torch.rand(1, 1, C, generator=gen, dtype=F64)
    sd["ffn.key.weight"], sd["ffn.receptance.weight"], sd["ffn.value.weight"] = r(Fd, C), r(C, C), r(C, Fd)
    return sd


def _ln(x, sd, name):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"])


def _mix(x, prev, m):
    return x * m + prev * (1 - m)


def gpt_mode(sd, layer_id, x):
    if layer_id == 0:
        x = _ln(x, sd, "ln0")
    h = _ln(x, sd, "ln1")
    prev = torch.cat((torch.zeros_like(h[:, :1]), h[:, :-1]), 1)
    k = _mix(h, prev, sd["att.time_mix_k"]) @ sd["att.key.weight"].T
    v = _mix(h, prev, sd["att.time_mix_v"]) @ sd["att.value.weight"].T
    r = torch.sigmoid(_mix(h, prev, sd["att.time_mix_r"]) @ sd["att.receptance.weight"].T)
    w, u = -torch.exp(sd["att.time_decay"]), sd["att.time_first"]
    p = q = torch.zeros_like(k[:, 0])
    o = torch.full_like(p, -1e38)
    ys = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        no = torch.maximum(o, u + kt)
        a, b = torch.exp(o - no), torch.exp(u + kt - no)
        ys.append((a * p + b * vt) / (a * q + b))
        no = torch.maximum(w + o, kt)
        a, b = torch.exp(w + o - no), torch.exp(kt - no)
        p, q, o = a * p + b * vt, a * q + b, no
    x = x + (r * torch.stack(ys, 1)) @ sd["att.output.weight"].T
    h = _ln(x, sd, "ln2")
    prev = torch.cat((torch.zeros_like(h[:, :1]), h[:, :-1]), 1)
    kk = torch.relu(_mix(h, prev, sd["ffn.time_mix_k"]) @ sd["ffn.key.weight"].T).square()
    rr = torch.sigmoid(_mix(h, prev, sd["ffn.time_mix_r"]) @ sd["ffn.receptance.weight"].T)
    return x + rr * (kk @ sd["ffn.value.weight"].T)


def rnn_mode(sd, layer_id, x, st):
    """One token x (B, C); st = [att_xx, aa, bb, pp, ffn_xx], each (B, C)."""
    vec = lambda n: sd[n].reshape(-1)  # noqa: E731  (the rwkv package squeezes time_* tensors)
    if layer_id == 0:
        x = _ln(x, sd, "ln0")
    h = _ln(x, sd, "ln1")
    k = _mix(h, st[0], vec("att.time_mix_k")) @ sd["att.key.weight"].T
    v = _mix(h, st[0], vec("att.time_mix_v")) @ sd["att.value.weight"].T
    r = torch.sigmoid(_mix(h, st[0], vec("att.time_mix_r")) @ sd["att.receptance.weight"].T)
    aa, bb, pp = st[1:4]
    ww = sd["att.time_first"] + k
    m = torch.maximum(pp, ww)
    wkv = (torch.exp(pp - m) * aa + torch.exp(ww - m) * v) / (torch.exp(pp - m) * bb + torch.exp(ww - m))
    ww = pp - torch.exp(sd["att.time_decay"])
    m = torch.maximum(ww, k)
    aa, bb, pp = torch.exp(ww - m) * aa + torch.exp(k - m) * v, torch.exp(ww - m) * bb + torch.exp(k - m), m
    x = x + (r * wkv) @ sd["att.output.weight"].T
    h2 = _ln(x, sd, "ln2")
    kk = torch.relu(_mix(h2, st[4], vec("ffn.time_mix_k")) @ sd["ffn.key.weight"].T).square()
    rr = torch.sigmoid(_mix(h2, st[4], vec("ffn.time_mix_r")) @ sd["ffn.receptance.weight"].T)
    return x + rr * (kk @ sd["ffn.value.weight"].T), [h, aa, bb, pp, h2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_id", [0, 3])
def test_checkpoint_block_gpt_and_rnn_mode_and_gradients(backend, layer_id):
    gen = torch.Generator().manual_seed(layer_id)
    Bn, T, C, Fd = 2, 7, 8, 20
    sd = checkpoint_block(layer_id, C, Fd, gen)
    blk = snn.RWKV4Block(C, Fd, layer_id, n_layer=4, backend=backend, dtype=F64)
    blk.load_state_dict(sd, strict=True)
    x = torch.randn(Bn, T, C, generator=gen, dtype=F64)
    want = gpt_mode(sd, layer_id, x)
    y, st = blk(x)
    torch.testing.assert_close(y, want)
    # RNN mode: the rwkv package's state, token by token, against seqkern's T=1 steps
    ours, theirs, got = None, [torch.zeros(Bn, C, dtype=F64)] * 3 + [torch.full((Bn, C), -1e30, dtype=F64),
                                                                      torch.zeros(Bn, C, dtype=F64)], []
    for t in range(T):
        yt, theirs = rnn_mode(sd, layer_id, x[:, t], theirs)
        ys, ours = blk(x[:, t:t + 1], ours)
        torch.testing.assert_close(ys[:, 0], yt)
        got.append(yt)
    torch.testing.assert_close(torch.stack(got, 1), want)
    # the same (B, 5, C) layout: their state continues our sequence and ours theirs
    torch.testing.assert_close(torch.stack(theirs, 1), st)
    torch.testing.assert_close(ours, st)
    x2 = torch.randn(Bn, 3, C, generator=gen, dtype=F64)
    y2, _ = blk(x2, torch.stack(theirs, 1))
    for t in range(3):
        yt, theirs = rnn_mode(sd, layer_id, x2[:, t], theirs)
        torch.testing.assert_close(y2[:, t], yt)
    # gradients of the input and of every checkpoint tensor
    xg = x.clone().requires_grad_()
    sdg = {n: p.clone().requires_grad_() for n, p in sd.items()}
    out = gpt_mode(sdg, layer_id, xg)
    g_want = torch.autograd.grad((out * out.cos()).sum(), [xg, *sdg.values()])
    xg2 = x.clone().requires_grad_()
    out2, _ = blk(xg2)
    params = dict(blk.named_parameters())
    g_got = torch.autograd.grad((out2 * out2.cos()).sum(), [xg2, *(params[n] for n in sd)])
    for name, a, b in zip(["x", *sd], g_got, g_want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cls", ["RWKV4TimeMix", "RWKV4ChannelMix", "RWKV4Block"])
def test_zero_length_sequence_without_state(cls):
    """T = 0 is the identity on the state; without a state it returns the empty one (not IndexError)."""
    C = 6
    m = {"RWKV4TimeMix": lambda: snn.RWKV4TimeMix(C), "RWKV4ChannelMix": lambda: snn.RWKV4ChannelMix(C, 12),
         "RWKV4Block": lambda: snn.RWKV4Block(C, 12, 0)}[cls]()
    y, st = m(torch.randn(2, 0, C))
    _, st_one = m(torch.randn(2, 1, C))
    assert y.shape == (2, 0, C) and st.shape == st_one.shape
    if hasattr(m, "initial_state"):
        torch.testing.assert_close(st, m.initial_state(2))
    else:
        assert not st.any()
    y, st2 = m(torch.randn(2, 0, C), st_one)
    torch.testing.assert_close(st2, st_one)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wkv4_zero_length_backward(backend):
    k = torch.randn(2, 0, 4, dtype=F64, requires_grad=True)
    w = torch.randn(4, dtype=F64, requires_grad=True)
    y, st = SF.wkv4(w, torch.zeros(4, dtype=F64), k, k.detach(), backend=backend)
    y.sum().backward()
    assert k.grad.shape == k.shape and not k.grad.any()


def test_block_leaves_inputs_alone_with_non_contiguous_state_and_x():
    blk = snn.RWKV4Block(8, 16, 0, backend="cpu")
    x = torch.randn(5, 2, 8).transpose(0, 1)  # (B, T, C) with T-major strides
    st = torch.randn(2, 8, 5).transpose(1, 2)
    st[:, 2] = st[:, 2].abs() + 0.5  # bb > 0
    x0, st0 = x.clone(), st.clone()
    y, _ = blk(x, st)
    assert torch.equal(x, x0) and torch.equal(st, st0)
    torch.testing.assert_close(y, blk(x0.contiguous(), st0.contiguous())[0])


def test_every_layer_takes_backend():
    layers = {
        "RNN": lambda b: snn.RNN(4, 4, backend=b), "LSTM": lambda b: snn.LSTM(4, 4, backend=b),
        "GRU": lambda b: snn.GRU(4, 4, backend=b), "RNNCell": lambda b: snn.RNNCell(4, 4, backend=b),
        "LSTMCell": lambda b: snn.LSTMCell(4, 4, backend=b), "GRUCell": lambda b: snn.GRUCell(4, 4, backend=b),
        "MultiheadAttention": lambda b: snn.MultiheadAttention(4, 2, backend=b),
        "RWKV4TimeMix": lambda b: snn.RWKV4TimeMix(4, backend=b),
        "RWKV4ChannelMix": lambda b: snn.RWKV4ChannelMix(4, 8, backend=b),
        "RWKV4Block": lambda b: snn.RWKV4Block(4, 8, 0, backend=b),
        "SinusoidalPositionalEncoding": lambda b: snn.SinusoidalPositionalEncoding(4, backend=b),
        "RotaryEmbedding": lambda b: snn.RotaryEmbedding(4, backend=b),
    }
    assert set(layers) == set(snn.__all__)
    for name, make in layers.items():
        make(None), make("reference")
        with pytest.raises(ValueError, match="backend"):  # where it is written, as snn.LSTM does
            make("bogus")
    blk = snn.RWKV4Block(4, 8, 0, backend="reference")
    assert blk.backend == blk.ffn.backend == "reference"
    blk.backend = "cpu"  # settable afterwards, as on the RNN layers
    assert blk.att.backend == "cpu"
    with pytest.raises(ValueError, match="backend"):
        blk.backend = "bogus"


def test_env_backend_is_checked_and_forgiving(monkeypatch):
    w, k = torch.zeros(3), torch.zeros(1, 2, 3)
    monkeypatch.setenv("SEQKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SEQKERN_BACKEND.*bogus"):
        SF.wkv4(w, w, k, k)
    SF.wkv4(w, w, k, k, backend="reference")  # an explicit argument does not read the environment
    monkeypatch.setenv("SEQKERN_BACKEND", " Reference ")
    SF.wkv4(w, w, k, k)
    assert seqkern.last_backend("wkv4") == "reference"


def test_last_backend_takes_aliases_and_functions():
    w, k = torch.zeros(3), torch.zeros(1, 2, 3)
    SF.wkv4(w, w, k, k, backend="reference")
    assert seqkern.last_backend(SF.wkv4) == seqkern.last_backend("wkv") == "reference"
    q = torch.randn(1, 1, 2, 4)
    SF.scaled_dot_product_attention(q, q, q, backend="reference")
    assert seqkern.last_backend("sdpa") == seqkern.last_backend(SF.scaled_dot_product_attention) == "reference"


def test_python_dash_m_seqkern_info():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "seqkern", "info"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert torch.__version__ in out.stdout and "backends" in out.stdout
    out = subprocess.run([sys.executable, "-m", "seqkern", "--version"], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert out.returncode == 0 and seqkern.__version__ in out.stdout, out.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_under_cpu_autocast(dtype):
    """Autocast gives bf16/fp16 k and v but fp32 time_decay: the WKV runs in fp32 (was a TypeError)."""
    torch.manual_seed(0)
    blk = snn.RWKV4Block(8, 16, 0)
    x = torch.randn(2, 5, 8)
    want, want_state = blk(x)
    with torch.autocast("cpu", dtype=dtype):
        y, st = blk(x)
    assert st.dtype == torch.float32
    torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(st, want_state, atol=3e-2, rtol=3e-2)
    y.float().square().sum().backward()
    assert blk.att.time_decay.grad.dtype == torch.float32 and torch.isfinite(blk.att.time_decay.grad).all()
    if seqkern.backends()["cpu"]["available"]:
        assert seqkern.last_backend("wkv4") == "cpu"


def _imports(path):
    import ast

    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
            yield from ("." * node.level + (node.module + "." if node.module else "") + a.name for a in node.names)


def test_layering_ops_know_no_modules_and_modules_reach_kernels_through_ops():
    """DESIGN "Layout": seqkern/ops imports no seqkern.nn; nn/, functional.py and convert.py reach
    seqkern.kernels and seqkern._C only through ops (kernels/ and csrc/cuda have their own tests)."""
    pkg = os.path.join(ROOT, "seqkern")
    for fn in os.listdir(os.path.join(pkg, "ops")):
        if fn.endswith(".py"):
            src = open(os.path.join(pkg, "ops", fn)).read()
            assert "nn.Module" not in src, fn
            for name in _imports(os.path.join(pkg, "ops", fn)):
                assert not name.startswith(("..nn", "seqkern.nn")), (fn, name)
    upper = [os.path.join(pkg, "nn", f) for f in os.listdir(os.path.join(pkg, "nn")) if f.endswith(".py")]
    for path in upper + [os.path.join(pkg, "functional.py"), os.path.join(pkg, "convert.py")]:
        for name in _imports(path):
            assert not any(part in ("kernels", "_C") for part in name.replace(".", " ").split()), (path, name)
        assert "torch.ops.seqkern" not in open(path).read(), path
