"""The benchmark report's arithmetic on a fake result file, and one real tiny run of a suite
through `seqkern bench` (CLI -> seqkern.bench -> pytest bench/ -> harness -> report)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import harness  # noqa: E402
import report  # noqa: E402


def _bench(group, impl, median, *, op="sdpa", family="attention", baseline="torch", flops=4e9, bytes_=1e8,
           bound="flops", params=None, sweep="N", err=1e-7, mem=1000):
    params = params or {"B": 1, "N": 512}
    return {"group": group, "name": f"test[{impl}]", "stats": {"min": median * 0.9, "max": median * 1.2,
            "median": median, "mean": median, "rounds": 5, "iterations": 1, "iqr": 0.0},
            "extra_info": {"family": family, "op": op, "params": params, "mode": "fwd", "dtype": "float32",
                           "device": "cpu", "baseline": baseline, "flops": flops, "bytes": bytes_, "bound": bound,
                           "sweep": sweep, "group": group, "impl": impl, "err_abs": err, "err_rel": err,
                           "peak_mem_bytes": mem}}


def _fake(tmp_path):
    g1, g2, g3 = "sdpa fwd float32 N=512", "sdpa fwd float32 N=1024", "wkv4 fwd float32 T=64"
    data = {"machine_info": {"seqkern": {"device": "cpu", "torch": "x", "threads": 2, "size": "cpu",
                                         "peaks": {"matmul_flops_float32": 100e9, "copy_bytes_per_s": 10e9},
                                         "skipped": [{"family": "attention", "impl": "seqkern-triton",
                                                      "group": g1, "reason": "no GPU"}]}},
            "datetime": "2026-12-02T00:00:00", "commit_info": {"id": "abcdef1234567"},
            "benchmarks": [
                _bench(g1, "torch", 0.10), _bench(g1, "seqkern-cpu", 0.05),
                _bench(g2, "torch", 0.40, params={"B": 1, "N": 1024}),
                _bench(g2, "seqkern-cpu", 0.50, params={"B": 1, "N": 1024}, err=float("nan")),
                _bench(g3, "reference", 2.0, op="wkv4", family="wkv", baseline="reference", bound="bytes",
                       bytes_=4e9, params={"T": 64}, sweep="T"),
                _bench(g3, "seqkern-cpu", 0.02, op="wkv4", family="wkv", baseline="reference", bound="bytes",
                       bytes_=4e9, params={"T": 64}, sweep="T"),
            ]}
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_report_ratios_throughput_and_peaks(tmp_path):
    rows, metas = report.load([_fake(tmp_path)])
    cases = report.analyse(rows)
    assert [c["family"] for c in cases] == ["attention", "attention", "wkv"]
    by = {(c["group"], e["impl"]): e for c in cases for e in c["impls"]}
    ours = by[("sdpa fwd float32 N=512", "seqkern-cpu")]
    assert ours["speedup"] == pytest.approx(2.0)
    assert ours["gflops"] == pytest.approx(80.0)            # 4e9 flops in 50 ms
    assert ours["frac_peak"] == pytest.approx(0.8)          # of the 100 GFLOP/s matmul peak
    assert by[("sdpa fwd float32 N=1024", "seqkern-cpu")]["speedup"] == pytest.approx(0.8)
    wkv = by[("wkv4 fwd float32 T=64", "seqkern-cpu")]
    assert wkv["speedup"] == pytest.approx(100.0)
    assert wkv["gbps"] == pytest.approx(200.0) and wkv["frac_peak"] == pytest.approx(20.0)  # bytes-bound: copy peak
    assert cases[0]["best"] == "seqkern-cpu" and cases[0]["best_speedup"] == pytest.approx(2.0)
    md = report.markdown(cases, metas)
    assert "**2.00x**" in md and "**100.00x**" in md and "0.80x" in md
    assert "NaN" in md                                        # a NaN error is shown, never hidden
    assert "seqkern-triton: no GPU" in md
    assert "matmul float32 100 GFLOP/s" in md


def test_report_writes_markdown_json_and_plots(tmp_path):
    out = tmp_path / "out"
    summary = report.write_report([_fake(tmp_path)], str(out), echo=False)
    assert (out / "report.md").read_text().startswith("# seqkern speed report: cpu")
    assert json.loads((out / "summary.json").read_text())["cases"][2]["best_speedup"] == pytest.approx(100.0)
    names = sorted(os.path.basename(p) for p in summary["pngs"])
    assert names == ["sdpa_time_vs_N.png", "speedup.png", "wkv4_time_vs_T.png"]
    for n in names:
        assert (out / n).read_bytes()[:4] == b"\x89PNG"


def test_max_error_is_relative_per_tensor_and_propagates_nan():
    ref = ((torch.tensor([1.0, -4.0]),), (torch.tensor([100.0]),))
    got = ((torch.tensor([1.0, -3.0]),), (torch.tensor([101.0]),))
    abs_err, rel_err = harness.max_error(got, ref)
    assert abs_err == pytest.approx(1.0) and rel_err == pytest.approx(0.25)
    bad = ((torch.tensor([float("nan"), 0.0]),), (torch.tensor([100.0]),))
    assert math.isnan(harness.max_error(bad, ref)[1])


def test_cli_passes_bench_arguments_in_order(monkeypatch):
    from seqkern import bench, cli

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--family", "attention", "--device", "cpu", "-k", "fwd"]) == 0
    assert seen == [["--family", "attention", "--device", "cpu", "-k", "fwd"]]
    assert bench._families(["rnn,wkv", "rnn"]) == ["rnn", "wkv"]
    assert bench._families(["all"]) == list(bench.FAMILIES)
    with pytest.raises(SystemExit):
        bench._families(["lstm"])


def test_seqkern_bench_runs_a_suite_end_to_end(tmp_path):
    """One real (tiny) run: CI exercises the harness, the timing and the report."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "seqkern.cli", "bench", "--family", "rotary", "--size", "quick",
                           "--device", "cpu", "--max-time", "0.01", "--min-rounds", "2", "--out", str(out),
                           "--no-plots"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    infos = [b["extra_info"] for b in data["benchmarks"]]
    assert {(i["impl"], i["mode"]) for i in infos} >= {("torch", "fwd"), ("torch", "fwdbwd")}
    for i in infos:
        assert i["err_rel"] is not None and i["err_rel"] < 1e-5, i
        assert i["flops"] > 0 and i["bytes"] > 0
    assert data["machine_info"]["seqkern"]["peaks"]["copy_bytes_per_s"] > 0
    md = (out / "report.md").read_text()
    assert "rotary fwdbwd float32 B=1,H=2,T=16,D=8" in md
    assert "[##############################]" in proc.stderr   # the progress bar reached the end
