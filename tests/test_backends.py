"""The backend registry: availability, automatic choice, SEQKERN_BACKEND, explicit
backends that cannot serve, last_backend, and the `seqkern info` CLI."""
import ast
import os
import re
import subprocess
import sys

import pytest
import torch

import seqkern
from seqkern import backends as B

OP = "test_only_op"


@pytest.fixture(autouse=True)
def _fake_op(monkeypatch):
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)
    B.register(OP, "reference", lambda x: (True, ""))
    B.register(OP, "cpu", lambda x: (x.dtype in (torch.float32, torch.float64), f"dtype {x.dtype} not supported"))
    B.register(OP, "triton", lambda x: (True, ""))
    B.register(OP, "cuda", lambda x: (True, ""))
    yield
    B._SUPPORTS.pop(OP, None)


def test_backends_lists_all_four_with_reasons():
    st = seqkern.backends()
    assert list(st) == ["reference", "cpu", "triton", "cuda"]
    assert st["reference"]["available"] is True
    for name, s in st.items():
        assert isinstance(s["available"], bool)
        if not s["available"]:
            assert s["reason"], f"{name} unavailable without a reason"


def test_cpu_backend_is_built():
    # CI builds the extension: a missing one must be loud, not a silent fallback.
    ok, reason = B.available("cpu")
    assert ok, reason


def test_cuda_unavailable_without_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    ok, reason = B.available("cuda")
    assert not ok and reason


def test_auto_on_cpu_prefers_cpu_then_reference():
    x = torch.ones(3)
    assert B.select(OP, None, x) == "cpu"
    assert seqkern.last_backend(OP) == "cpu"
    # cpu cannot serve int tensors: automatic choice falls through without raising
    assert B.select(OP, None, torch.ones(3, dtype=torch.int32)) == "reference"
    assert seqkern.last_backend(OP) == "reference"


def test_auto_never_picks_triton_for_cpu_tensors():
    assert B.select(OP, None, torch.ones(3)) != "triton"


def test_explicit_backend_that_cannot_serve_raises_with_reason():
    with pytest.raises(seqkern.BackendUnavailable, match=r"'cpu'.*dtype"):
        B.select(OP, "cpu", torch.ones(3, dtype=torch.int32))
    if not torch.cuda.is_available():
        with pytest.raises(seqkern.BackendUnavailable, match="'cuda'"):
            B.select(OP, "cuda", torch.ones(3))


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        B.select(OP, "tpu", torch.ones(3))


def test_env_override_read_at_each_call(monkeypatch):
    x = torch.ones(3)
    monkeypatch.setenv("SEQKERN_BACKEND", "reference")
    assert B.select(OP, None, x) == "reference"
    monkeypatch.setenv("SEQKERN_BACKEND", "cpu")
    assert B.select(OP, None, x) == "cpu"
    # an explicit argument beats the environment
    assert B.select(OP, "reference", x) == "reference"
    monkeypatch.setenv("SEQKERN_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(seqkern.BackendUnavailable):
            B.select(OP, None, x)


def test_op_without_backend_implementation():
    B._SUPPORTS[OP].pop("cuda")
    ok, reason = B.explain(OP, torch.ones(3))["cuda"]
    assert not ok and reason


def test_triton_on_cpu_only_when_interpreted(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(seqkern.BackendUnavailable, match="TRITON_INTERPRET|CUDA"):
            B.select(OP, "triton", torch.ones(3))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert B.select(OP, "triton", torch.ones(3)) == "triton"


def test_cli_info_prints_versions_and_backends():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "seqkern.cli", "info"], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "reference", "cpu", "cuda", "device"):
        assert word in out.stdout
    assert torch.__version__ in out.stdout


def test_public_api_names():
    from seqkern import functional as SF, nn as snn

    for name in ("rnn", "lstm", "gru", "rnn_cell", "lstm_cell", "gru_cell", "scaled_dot_product_attention", "wkv4"):
        assert callable(getattr(SF, name))
    for name in ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "MultiheadAttention",
                 "RWKV4TimeMix", "RWKV4ChannelMix", "RWKV4Block"):
        assert issubclass(getattr(snn, name), torch.nn.Module)
    assert callable(seqkern.replace_modules)


def test_kernels_are_leaves():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for fn in os.listdir(os.path.join(root, "kernels")):
        if fn.endswith(".py"):
            tree = ast.parse(open(os.path.join(root, "kernels", fn)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    assert not any(a.name.split(".")[0] == "seqkern" for a in node.names), fn
                elif isinstance(node, ast.ImportFrom):
                    assert node.level == 0 and (node.module or "").split(".")[0] != "seqkern", fn


ATTN = "scaled_dot_product_attention"


def _fake_qkv(device, B, Hq, L, S, Hk=None, E=16):
    """Shapes only: fake tensors allocate nothing (and need no GPU for device="cuda")."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return (torch.empty(B, Hq, L, E, device=device), torch.empty(B, Hk or Hq, S, E, device=device),
                torch.empty(B, Hk or Hq, S, E, device=device))


def test_attention_grids_past_the_launch_limits_are_declined(monkeypatch):
    """The cuda and Triton launches fold batch x heads into gridDim.x (at most 2^31-1 blocks): any B * heads
    is served while the block count fits (B*heads*ceil(rows/8) for cuda, /16 for Triton's smallest tiles);
    past it, and where the Triton kernels' int32 row indices would overflow (a sequence within 128 of
    2^31), supports() declines, so automatic selection falls through (cuda -> triton -> reference) and an
    explicit backend raises BackendUnavailable with why."""
    sup = B._SUPPORTS[ATTN]
    cases = {  # (B, Hq, L, S, Hk): (cuda serves, triton serves)
        (65535, 1, 1, 1, None): (True, True),
        (65536, 1, 1, 1, None): (True, True),  # past gridDim.y: batch x heads is in x
        (4096, 4096, 16, 16, None): (True, True),  # 2^24 batch x heads
        (2**31 - 1, 1, 8, 8, None): (True, True),  # exactly 2^31-1 blocks of 8 rows / programs of 16
        (2**31 - 1, 1, 17, 8, None): (False, False),  # 2 x (2^31-1) forward/dq blocks
        (2**31, 1, 1, 1, None): (False, False),
        (2**28, 8, 8, 1, 1): (False, False),  # the forward/dq grid
        (2**27, 8, 8, 1, 1): (True, True),
        (2**25, 1, 1, 16 * 64 + 1, None): (False, False),  # the dk/dv grid
        (2**26, 4, 16, 16, 2): (True, True),  # GQA: the dk/dv grid counts key/value heads
        (1, 1, 1, 2**34 + 1, None): (False, True),  # the dk/dv grid; 2^30+1 programs of 16 keys for Triton
        (1, 1, 2**34, 16, None): (False, True),  # 2^31 blocks of 8 queries; 2^30 of 16 for Triton
        (1, 1, 16, 2**35 + 1, None): (False, False),  # over 2^31-1 programs of 16 keys too
        (1, 1, 2**31 - 1, 16, None): (True, False),  # Triton: int32 query indices of the last block overflow
        (1, 1, 16, 2**31 - 100, None): (True, False),  # the same for keys
        (1, 1, 16, 2**31 - 129, None): (True, True),
        (1, 1, 2**31, 16, None): (True, True),  # lengths of 2^31 reach the kernels as int64
    }
    for (Bsz, Hq, L, S, Hk), want in cases.items():
        q, k, v = _fake_qkv("cuda", Bsz, Hq, L, S, Hk)
        got = tuple(sup[name](q, k, v, None)[0] for name in ("cuda", "triton"))
        assert got == want, ((Bsz, Hq, L, S, Hk), got)
        for name, ok in zip(("cuda", "triton"), got):
            if not ok:
                assert re.search("grid limit of 2\\^31-1|int32 row indices", sup[name](q, k, v, None)[1])
    # selection, as on a machine where both GPU backends are available
    monkeypatch.setattr(B, "available", lambda name: (True, ""))
    monkeypatch.delenv("SEQKERN_BACKEND", raising=False)
    q, k, v = _fake_qkv("cuda", 1, 1, 2**34, 16)
    assert B.select(ATTN, None, q, k, v, None, 0.0, False) == "triton"
    q, k, v = _fake_qkv("cuda", 2**31, 1, 1, 1)
    assert B.select(ATTN, None, q, k, v, None, 0.0, False) == "reference"
    for name in ("cuda", "triton"):
        with pytest.raises(seqkern.BackendUnavailable, match=f"{name}.*grid limit of 2\\^31-1"):
            B.select(ATTN, name, q, k, v, None, 0.0, False)
    q, k, v = _fake_qkv("cuda", 1, 1, 2**31 - 1, 16)
    assert B.select(ATTN, None, q, k, v, None, 0.0, False) == "cuda"
    with pytest.raises(seqkern.BackendUnavailable, match="triton.*int32 row indices"):
        B.select(ATTN, "triton", q, k, v, None, 0.0, False)
    q, k, v = _fake_qkv("cuda", 4, 2, 3, 5)
    assert B.select(ATTN, None, q, k, v, None, 0.0, False) == "cuda"


def test_attention_triton_serves_batch_heads_past_65535_under_the_interpreter(monkeypatch):
    """Through the public function (CPU tensors, the Triton interpreter): B * heads past gridDim.y's 65535
    is served by backend="triton" (batch x heads is folded into gridDim.x); a grid past 2^31-1 programs
    raises BackendUnavailable before any launch, and automatic selection runs cpu."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with FakeTensorMode():
        q, k, v = (torch.empty(65536, 1, 1, 16) for _ in range(3))
        assert B.explain(ATTN, q, k, v, None)["triton"] == (True, "")
        q, k, v = (torch.empty(2**31, 1, 1, 16) for _ in range(3))
        with pytest.raises(seqkern.BackendUnavailable, match="triton.*grid limit of 2\\^31-1"):
            seqkern.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(1, 1), backend="triton")
        assert B.explain(ATTN, q, k, v, None)["triton"][0] is False


