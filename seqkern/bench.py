"""`seqkern bench` (and `make bench`): run the benchmark suites of bench/ and print the report.

    seqkern bench [--family rnn|attention|wkv|rotary|all] [--device auto|cpu|cuda]
                  [--size quick|cpu|gpu] [--out DIR] [--max-time S] [--min-rounds N] [--threads N] [-k EXPR]

Runs ``pytest bench/test_bench_<family>.py`` in this process with a progress bar, writes the
pytest-benchmark JSON (bench.json) next to the report, then bench/report.py's tables and plots
into bench/results/<device>/ (``cpu``, or the GPU's short name such as ``h200``).
The suites live in the source tree (bench/ beside the package): run from a checkout.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

FAMILIES = ("rnn", "attention", "wkv", "rotary")


def repo_bench_dir() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(root, "bench")
    return d if os.path.isfile(os.path.join(d, "conftest.py")) else None


def device_dir_name(device: str) -> str:
    """'cpu', or the GPU's short model name ('h200' for 'NVIDIA H200')."""
    if device != "cuda":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(0).lower()
    for short in ("h200", "h100", "a100", "l40s", "l4", "a10g", "b200"):
        if short in name:
            return short
    return "".join(ch if ch.isalnum() else "_" for ch in name.replace("nvidia", "").strip()) or "cuda"


def _families(spec: List[str]) -> List[str]:
    out: List[str] = []
    for item in spec:
        for f in item.split(","):
            f = f.strip()
            if not f:
                continue
            if f == "all":
                out += [x for x in FAMILIES if x not in out]
            elif f in FAMILIES:
                if f not in out:
                    out.append(f)
            else:
                raise SystemExit(f"seqkern bench: unknown family {f!r}; expected one of {FAMILIES + ('all',)}")
    return out or list(FAMILIES)


class Progress:
    """A pytest plugin: one progress line per benchmark (a redrawn bar on a terminal), and the
    failures with their error, since the usual terminal output is switched off."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.total = 0
        self.done = 0
        self.counts = {"passed": 0, "skipped": 0, "failed": 0}
        self.failures: List[str] = []
        self.t0 = time.time()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def pytest_collection_finish(self, session):
        self.total = len(session.items)
        self.t0 = time.time()
        self.stream.write(f"seqkern bench: {self.total} benchmarks\n")
        self.stream.flush()

    def pytest_collectreport(self, report):
        if report.failed:
            self.failures.append(f"collection of {report.nodeid}: {report.longreprtext[-2000:]}")

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.counts["failed"] += 1
            self.failures.append(f"{report.nodeid} ({report.when}):\n{report.longreprtext[-3000:]}")
        elif report.skipped:
            self.counts["skipped"] += 1
        elif report.when == "call":
            self.counts["passed"] += 1
        if report.when != "teardown":
            return
        self.done += 1
        self._draw(report.nodeid.split("[", 1)[-1].rstrip("]"))

    def _draw(self, name: str):
        width = 30
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        el = time.time() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else 0.0
        line = (f"[{bar}] {self.done}/{self.total} {el:5.0f}s elapsed, ~{eta:4.0f}s left  "
                f"({self.counts['skipped']} skipped, {self.counts['failed']} failed)  {name}")
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def summary(self) -> str:
        for f in self.failures:
            self.stream.write("\nFAILED " + f + "\n")
        return (f"{self.counts['passed']} timed, {self.counts['skipped']} skipped, {self.counts['failed']} failed "
                f"in {time.time() - self.t0:.0f}s")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="seqkern bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", default=[],
                    help="rnn, attention, wkv, rotary or all (repeatable or comma-separated; default all)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--size", choices=("quick", "cpu", "gpu"), default=None,
                    help="shape preset (default: cpu on a CPU, gpu on a GPU; quick is tiny)")
    ap.add_argument("--out", default=None, help="report folder (default bench/results/<device>)")
    ap.add_argument("--json", default=None, help="pytest-benchmark JSON path (default <out>/bench.json)")
    ap.add_argument("--max-time", type=float, default=None,
                    help="seconds of timed rounds per benchmark (default 0.4 on CPU, 0.2 on GPU)")
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default torch's; on a loaded machine 1 is steadier)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select cases")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-report", action="store_true", help="only run the suites and write the JSON")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    bench_dir = repo_bench_dir()
    if bench_dir is None:
        print("seqkern bench: the suites live in the source tree's bench/ folder, which is not beside this "
              "installation; run from a checkout (pip install --no-build-isolation -e .)", file=sys.stderr)
        return 2
    import pytest
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("seqkern bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    size = a.size or ("gpu" if device == "cuda" else "cpu")
    fams = _families(a.family)
    out = a.out or os.path.join(bench_dir, "results", device_dir_name(device))
    os.makedirs(out, exist_ok=True)
    json_path = a.json or os.path.join(out, "bench.json")
    max_time = a.max_time if a.max_time is not None else (0.2 if device == "cuda" else 0.4)

    files = [os.path.join(bench_dir, f"test_bench_{f}.py") for f in fams]
    args = files + ["-p", "no:terminal", "-p", "no:cacheprovider", f"--rootdir={bench_dir}",
                    "-o", "addopts=", "--benchmark-json", json_path,
                    "--benchmark-max-time", str(max_time), "--benchmark-min-rounds", str(a.min_rounds),
                    "--bench-size", size, "--bench-device", device]
    if a.keyword:
        args += ["-k", a.keyword]
    progress = Progress()
    print(f"seqkern bench: families {', '.join(fams)} on {device} (size {size}); JSON -> {json_path}", flush=True)
    rc = pytest.main(args, plugins=[progress])
    print("seqkern bench: " + progress.summary(), flush=True)
    if not os.path.isfile(json_path):
        print(f"seqkern bench: pytest exited with {int(rc)} and no results were written", file=sys.stderr)
        return int(rc) or 1
    if rc not in (0, 1):  # interrupted (a time limit's SIGINT): report what was measured
        print(f"seqkern bench: pytest exited with {int(rc)}; reporting the benchmarks that finished", file=sys.stderr)
    if not a.no_report:
        sys.path.insert(0, bench_dir)
        try:
            import report
        finally:
            sys.path.remove(bench_dir)
        report.write_report([json_path], out, make_plots=not a.no_plots)
    return 0 if rc == 0 else (1 if rc == 1 else int(rc))
