"""examples/lineage.py: every architecture trains, generation by state/KV cache equals the full forward,
and the measured state is constant for the recurrent models while the KV cache grows with the context."""
import importlib.util
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location("lineage_example", os.path.join(ROOT, "examples", "lineage.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_by_step_generation_equals_full_forward():
    L = load_example()
    torch.manual_seed(0)
    x = torch.randint(0, L.VOCAB, (2, 9))
    for kind in ("rnn", "lstm", "gru", "transformer", "rwkv"):
        model = L.build(kind, 8_000, "rotary").double().eval()
        with torch.no_grad():
            full = model(x)[0]
            state = None
            for t in range(x.shape[1]):
                logits, state = model.step(x[:, t], state)
                torch.testing.assert_close(logits, full[:, t], msg=lambda m: f"{kind} step {t}: {m}")


def test_quick_run_writes_table_and_plots(tmp_path):
    L = load_example()
    results = L.main(["--quick", "--seconds", "0.3", "--out", str(tmp_path)])
    assert set(results) == {"rnn", "lstm", "gru", "transformer", "rwkv"}
    for kind, r in results.items():
        assert r["train"]["steps"] > 0 and math.isfinite(r["train"]["val_loss"]), kind
        small, large = (g["state_bytes"] for g in r["generation"])
        if kind == "transformer":
            assert large > 3 * small  # the KV cache grows with the context (64 -> 256 tokens)
        else:
            assert large == small > 0, kind  # a recurrent state does not
    md = (tmp_path / "lineage.md").read_text()
    for kind in results:
        assert f"| {kind} |" in md
    assert (tmp_path / "lineage_loss.png").stat().st_size > 0
    assert (tmp_path / "lineage_generation.png").stat().st_size > 0
