"""The backend registry: availability, automatic choice, SEQKERN_BACKEND, explicit
backends that cannot serve, last_backend, and the `seqkern info` CLI."""
import ast
import os
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
