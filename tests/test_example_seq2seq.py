"""Smoke test of examples/seq2seq.py: both attention scorings, both cells, seqkern and torch layers."""
import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location("seq2seq_example", os.path.join(ROOT, "examples", "seq2seq.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("impl,cell,attention", [
    ("seqkern", "gru", "dot"), ("seqkern", "lstm", "additive"), ("torch", "gru", "additive")])
def test_quick_run(impl, cell, attention):
    ex = load_example()
    res = ex.main(["--quick", "--impl", impl, "--cell", cell, "--attention", attention])
    assert res["steps"] == 6
    assert all(math.isfinite(l) for l in res["losses"])
    assert 0.0 <= res["accuracy"] <= 1.0


def test_seqkern_model_learns():
    ex = load_example()
    # 40 steps at lr 1e-2 on strings of up to 4 digits: the loss falls ~4x (kept small for CI)
    res = ex.main(["--impl", "seqkern", "--steps", "40", "--lr", "1e-2", "--hidden", "32", "--emb", "16",
                   "--batch", "32", "--max-len", "4", "--log-every", "1000"])
    first, last = sum(res["losses"][:10]) / 10, sum(res["losses"][-10:]) / 10
    assert last < 0.6 * first, (first, last)
