"""The speed report: pytest-benchmark JSON (from bench/test_bench_*.py) -> tables and plots.

    python bench/report.py RESULTS.json [MORE.json ...] [--out bench/results/<device>]

For every case (one op, shape, dtype and mode) and implementation: median time, speedup over
the case's baseline (baseline time / this time: above 1 is faster), GFLOP/s or GB/s and the
fraction of the machine's peak measured at the start of the run (matmul FLOP/s for
compute-bound ops, copy bandwidth for memory-bound ones), the largest error against the fp64
reference (relative to each tensor's largest magnitude) and peak memory of one call.

Writes report.md, summary.json and PNG plots (speedup per case; time against sequence length
for the ops that sweep it) to --out, and prints the tables.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

FAMILY_ORDER = ("rnn", "attention", "wkv", "rotary")


# ---------------------------------------------------------------------------
# loading and analysis
# ---------------------------------------------------------------------------

def load(paths: Sequence[str]):
    """Rows (one per benchmark) and the run descriptions of every file, in order."""
    rows, metas = [], []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        meta = dict(data.get("machine_info", {}).get("seqkern", {}))
        meta["datetime"] = data.get("datetime")
        meta["commit"] = (data.get("commit_info") or {}).get("id")
        meta["file"] = os.path.basename(path)
        metas.append(meta)
        peaks = meta.get("peaks") or {}
        for b in data.get("benchmarks", []):
            info = b.get("extra_info") or {}
            if "impl" not in info:
                continue
            st = b["stats"]
            it = st.get("iterations", 1) or 1
            row = dict(info)
            row.update(median=st["median"], min=st["min"], iqr=st.get("iqr"), rounds=st["rounds"], iterations=it,
                       peaks=peaks)
            rows.append(row)
    return rows, metas


def _peak_for(row) -> Optional[float]:
    peaks = row.get("peaks") or {}
    if row.get("bound") == "bytes":
        return peaks.get("copy_bytes_per_s")
    return peaks.get(f"matmul_flops_{row.get('dtype')}") or peaks.get("matmul_flops_float32")


def _is_baseline_variant(impl: str) -> bool:
    return not impl.startswith("seqkern-")


def analyse(rows: List[dict]) -> List[dict]:
    """Cases in family order, each with its implementations and their ratios."""
    cases: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        key = f"{r.get('device')}|{r['group']}"
        c = cases.setdefault(key, {k: r.get(k) for k in ("family", "op", "params", "mode", "dtype", "device",
                                                         "baseline", "group", "sweep", "bound")})
        c.setdefault("impls", OrderedDict())[r["impl"]] = r
    out = []
    for c in cases.values():
        impls = c["impls"]
        base = impls.get(c["baseline"])
        variants = [r["median"] for name, r in impls.items() if _is_baseline_variant(name)]
        best_base = min(variants) if variants else None
        entries = []
        for name, r in impls.items():
            t = r["median"]
            peak = _peak_for(r)
            rate = (r.get("bytes") if r.get("bound") == "bytes" else r.get("flops")) or 0.0
            e = {"impl": name, "median_s": t, "min_s": r["min"], "rounds": r["rounds"],
                 "speedup": (base["median"] / t) if base and t > 0 else None,
                 "vs_best_baseline": (best_base / t) if best_base and t > 0 else None,
                 "gflops": (r.get("flops") or 0) / t / 1e9 if t > 0 else None,
                 "gbps": (r.get("bytes") or 0) / t / 1e9 if t > 0 else None,
                 "frac_peak": (rate / t / peak) if (peak and rate and t > 0) else None,
                 "err_rel": r.get("err_rel"), "err_abs": r.get("err_abs"),
                 "err_note": r.get("err_note"), "peak_mem_bytes": r.get("peak_mem_bytes"),
                 "is_baseline": name == c["baseline"]}
            entries.append(e)
        c = {k: v for k, v in c.items() if k != "impls"}
        c["impls"] = entries
        ours = [e for e in entries if e["impl"].startswith("seqkern-")]
        best = max(ours, key=lambda e: e["speedup"] or 0.0) if ours else None
        c["best"] = best["impl"] if best else None
        c["best_speedup"] = best["speedup"] if best else None
        out.append(c)
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    out.sort(key=lambda c: rank.get(c["family"], len(rank)))  # stable: keeps run order inside a family
    return out


# ---------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------

def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def fmt_err(e: dict) -> str:
    if e.get("err_rel") is None:
        return "n/a"
    if isinstance(e["err_rel"], float) and math.isnan(e["err_rel"]):
        return "NaN"
    return f"{e['err_rel']:.1e}"


def _rate(c: dict, e: dict) -> str:
    if c.get("bound") == "bytes":
        return "-" if e["gbps"] is None else f"{e['gbps']:.3g} GB/s"
    return "-" if e["gflops"] is None else f"{e['gflops']:.4g} GFLOP/s"


def _frac(e: dict) -> str:
    return "-" if e["frac_peak"] is None else f"{100 * e['frac_peak']:.1f}%"


def _case_label(c: dict) -> str:
    p = c.get("params") or {}
    shape = ",".join(f"{k}={v}" for k, v in p.items())
    return f"{c['op']} {c['mode']} {c['dtype']} {shape}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _peaks_line(metas: List[dict]) -> str:
    parts = []
    for m in metas[:1]:
        for k, v in (m.get("peaks") or {}).items():
            if k.startswith("matmul_flops_"):
                parts.append(f"matmul {k[len('matmul_flops_'):]} {v / 1e9:.4g} GFLOP/s")
            elif k == "copy_bytes_per_s":
                parts.append(f"copy {v / 1e9:.3g} GB/s (read + write)")
    return ", ".join(parts) if parts else "not measured"


def markdown(cases: List[dict], metas: List[dict]) -> str:
    m0 = metas[0] if metas else {}
    when = m0.get("datetime") or _dt.datetime.now(_dt.timezone.utc).isoformat()
    dev = m0.get("gpu") or f"CPU ({m0.get('cpu', '?')}, {m0.get('cores', '?')} cores, {m0.get('threads', '?')} threads)"
    if m0.get("loadavg"):
        start = (m0.get("loadavg_start") or [None])[0]
        dev += f"; load average {start} at the start of the run, {m0['loadavg'][0]} at the end"
    lines = [f"# seqkern speed report: {m0.get('device', '?')}", "",
             f"- device: {dev}; torch {m0.get('torch', '?')}" + (f", CUDA {m0['cuda']}" if m0.get("cuda") else ""),
             f"- run: {when}" + (f", commit {m0['commit'][:10]}" if m0.get("commit") else "")
             + f", size preset `{m0.get('size', '?')}`",
             f"- measured peaks: {_peaks_line(metas)}",
             "- speedup = baseline median / implementation median (above 1: faster than the baseline); "
             "error = max |impl - fp64 reference| / max |reference| over outputs (and input gradients for fwdbwd)",
             ""]
    # headline: every case, baseline against the best seqkern backend
    lines += ["## Headline", ""]
    hl = []
    for c in cases:
        base = next((e for e in c["impls"] if e["is_baseline"]), None)
        best = next((e for e in c["impls"] if e["impl"] == c["best"]), None)
        hl.append([_case_label(c), c["baseline"], fmt_time(base["median_s"] if base else None),
                   c["best"] or "(none ran)", fmt_time(best["median_s"] if best else None),
                   f"**{fmt_ratio(c['best_speedup'])}**" if c["best_speedup"] else "-"])
    lines += _table(["case", "baseline", "baseline time", "best seqkern", "its time", "speedup"], hl) + [""]
    show_vs_best = any(sum(_is_baseline_variant(e["impl"]) for e in c["impls"]) > 1 for c in cases)
    for fam in [f for f in FAMILY_ORDER if any(c["family"] == f for c in cases)] + \
            sorted({c["family"] for c in cases} - set(FAMILY_ORDER)):
        lines += [f"## {fam}", ""]
        header = ["case", "impl", "median", "speedup"] + (["vs best torch"] if show_vs_best else []) + \
                 ["throughput", "% peak", "max err", "peak mem"]
        body = []
        for c in (c for c in cases if c["family"] == fam):
            for e in c["impls"]:
                row = [_case_label(c), e["impl"] + (" (baseline)" if e["is_baseline"] else ""),
                       fmt_time(e["median_s"]), fmt_ratio(e["speedup"])]
                if show_vs_best:
                    row.append(fmt_ratio(e["vs_best_baseline"]))
                row += [_rate(c, e), _frac(e), fmt_err(e), fmt_bytes(e["peak_mem_bytes"])]
                body.append(row)
        lines += _table(header, body) + [""]
    skipped = [s for m in metas for s in (m.get("skipped") or [])]
    if skipped:
        lines += ["## Not run", ""]
        seen = set()
        for s in skipped:
            key = (s["family"], s["impl"], s["reason"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {s['family']} / {s['impl']}: {s['reason']}")
        lines.append("")
    failed = [f for m in metas for f in (m.get("failed") or [])]
    if failed:
        lines += ["## Failed", ""]
        lines += [f"- {f['group']} / {f['impl']}: {f['reason']}" for f in failed]
        lines.append("")
    notes = sorted({e["err_note"] for c in cases for e in c["impls"] if e.get("err_note")})
    if notes:
        lines += ["Errors not measured where: " + "; ".join(notes), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------

def plots(cases: List[dict], out_dir: str) -> List[str]:
    """speedup.png (every seqkern implementation of every case against its baseline) and
    <op>_time_vs_<len>.png for the ops whose cases sweep a sequence length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"report: no plots ({type(e).__name__}: {e})", file=sys.stderr)
        return []
    written = []
    bars = [(f"{_case_label(c)} [{e['impl'][len('seqkern-'):]}]", e["speedup"])
            for c in cases for e in c["impls"] if e["impl"].startswith("seqkern-") and e["speedup"]]
    if bars:
        fig, ax = plt.subplots(figsize=(10, 0.32 * len(bars) + 1.5))
        labels, vals = zip(*bars)
        colors = ["tab:green" if v >= 1 else "tab:red" for v in vals]
        ax.barh(range(len(vals)), vals, color=colors)
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("speedup over baseline (log scale; >1 is faster)")
        ax.set_title("seqkern speedup per case")
        fig.tight_layout()
        path = os.path.join(out_dir, "speedup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    by_op: Dict[str, List[dict]] = OrderedDict()
    for c in cases:
        if c.get("sweep"):
            by_op.setdefault(c["op"], []).append(c)
    for op, cs in by_op.items():
        sweep = cs[0]["sweep"]
        series: Dict[str, Dict[str, list]] = OrderedDict()   # panel -> impl -> [(len, time)]
        for c in cs:
            fixed = ",".join(f"{k}={v}" for k, v in (c["params"] or {}).items() if k not in (sweep, "B"))
            panel = f"{c['mode']} {c['dtype']} {fixed}"
            for e in c["impls"]:
                series.setdefault(panel, OrderedDict()).setdefault(e["impl"], []).append(
                    (c["params"][sweep], e["median_s"]))
        n = len(series)
        cols = min(n, 2)
        rows_ = math.ceil(n / cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(6 * cols, 4 * rows_), squeeze=False)
        for ax, (panel, impls) in zip(axes.flat, series.items()):
            for impl, pts in impls.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(sweep)
            ax.set_ylabel("median time (ms)")
            ax.set_title(panel, fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"{op}: time against {sweep}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_time_vs_{sweep}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------

def write_report(json_paths: Sequence[str], out_dir: str, *, make_plots: bool = True, echo: bool = True) -> dict:
    rows, metas = load(json_paths)
    cases = analyse(rows)
    os.makedirs(out_dir, exist_ok=True)
    md = markdown(cases, metas)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(md + "\n")
    summary = {"runs": metas, "cases": cases}
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    pngs = plots(cases, out_dir) if make_plots else []
    if echo:
        print(md)
        print(f"report: wrote {os.path.join(out_dir, 'report.md')}, summary.json"
              + (", " + ", ".join(os.path.basename(p) for p in pngs) if pngs else ""))
    summary["pngs"] = pngs
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/report.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) from bench/")
    ap.add_argument("--out", default=None, help="output folder (default: bench/results/<device of the first file>)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    missing = [p for p in a.json if not os.path.isfile(p)]
    if missing:
        ap.error(f"no such file: {', '.join(missing)}")
    out = a.out
    if out is None:
        _, metas = load(a.json[:1])
        m = metas[0] if metas else {}
        dev = "cpu" if m.get("device", "cpu") == "cpu" else \
            ("h200" if "h200" in str(m.get("gpu", "")).lower() else "cuda")
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", dev)
    write_report(a.json, out, make_plots=not a.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
