"""Machinery shared by the benchmark suites (bench/test_bench_*.py).

A *case* is one op at one shape, dtype and mode (``fwd`` or ``fwdbwd``); each
case is timed once per *implementation*: the baseline a user would otherwise
call (``torch``, its SDPA backends ``torch-flash``/``torch-cudnn``, or the
``reference`` loop for WKV) and every seqkern backend that can run on the
device (``seqkern-cpu``, ``seqkern-triton``, ``seqkern-cuda``).

A family module provides

    cases(size, device)            -> list[Case]
    impls(case)                    -> list of implementation names, baseline first
    inputs(case, dtype, device)    -> dict of tensors (the float leaves in case.grad_keys get gradients)
    forward(case, impl, inp)       -> (fn, grad_targets): fn() returns a tuple of output tensors;
                                      grad_targets are the tensors whose gradients fwdbwd computes,
                                      in the same order for every implementation
    ref_bytes(case)                -> rough memory the fp64 reference needs (error skipped above a budget)

and every test calls :func:`run` with pytest-benchmark's fixture. Each result
carries its case, flop and byte counts, error against the fp64 reference and
peak memory in ``extra_info``; bench/report.py turns the JSON into the report.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

SIZES = ("quick", "cpu", "gpu")
# fp64 references above this many bytes are not computed (the error column then says so).
REF_BUDGET = {"cpu": 3 * 2**30, "cuda": 24 * 2**30}


class Unavailable(Exception):
    """This implementation cannot run this case here; the message says why (becomes a skip)."""


@dataclasses.dataclass
class Case:
    family: str
    op: str
    params: Dict[str, object]
    mode: str                       # "fwd" or "fwdbwd"
    dtype: str                      # "float32", "bfloat16", ...
    device: str                     # "cpu" or "cuda"
    baseline: str
    flops: float = 0.0              # floating-point operations of one call (fwd, or fwd+bwd)
    bytes: float = 0.0              # fewest bytes one call must move
    bound: str = "flops"            # which of the two the "% of peak" column compares: "flops" or "bytes"
    sweep: Optional[str] = None     # the length parameter this case shares a time-vs-length plot on
    grad_keys: Tuple[str, ...] = ()

    @property
    def shape(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def group(self) -> str:
        return f"{self.op} {self.mode} {self.dtype} {self.shape}"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.mode}-{self.dtype}-" + "-".join(f"{k}{v}" for k, v in self.params.items())

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def info(self) -> dict:
        return {"family": self.family, "op": self.op, "params": dict(self.params), "mode": self.mode,
                "dtype": self.dtype, "device": self.device, "baseline": self.baseline, "flops": self.flops,
                "bytes": self.bytes, "bound": self.bound, "sweep": self.sweep, "group": self.group}


# ---------------------------------------------------------------------------
# which implementations a device offers
# ---------------------------------------------------------------------------

def seqkern_backends(device: str) -> List[str]:
    """seqkern backends worth timing on ``device``: interpreted Triton on a CPU is not a timing."""
    return ["cpu"] if device == "cpu" else ["cuda", "triton"]


def seqkern_impls(device: str) -> List[str]:
    return [f"seqkern-{b}" for b in seqkern_backends(device)]


def backend_of(impl: str) -> Optional[str]:
    """'seqkern-cpu' -> 'cpu'; 'reference' -> 'reference'; baselines -> None."""
    if impl.startswith("seqkern-"):
        return impl[len("seqkern-"):]
    return "reference" if impl == "reference" else None


def check_backend(backend: str) -> None:
    from seqkern import backends as B

    ok, reason = B.available(backend)
    if not ok:
        raise Unavailable(f"backend {backend!r} unavailable: {reason}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_size(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


# ---------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_call(fn: Callable[[], Sequence[torch.Tensor]], grad_targets: Sequence[torch.Tensor], mode: str,
              device: str, grad_outputs: Optional[List[torch.Tensor]] = None):
    """The function that is timed: one forward (under no_grad, as inference runs) or one forward
    plus the gradients of every target, synchronised with the device before it returns."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                out = fn()
            sync(device)
            return tuple(out), ()
        return call

    state = {"gy": grad_outputs}

    def call():
        out = tuple(fn())
        diff = [o for o in out if o.requires_grad]
        if state["gy"] is None:
            gen = torch.Generator(device="cpu").manual_seed(1)
            state["gy"] = [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device, o.dtype)
                           for o in diff]
        grads = torch.autograd.grad(diff, list(grad_targets), state["gy"], allow_unused=True)
        sync(device)
        return out, tuple(grads)
    call.state = state
    return call


def max_error(got: Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
              ref: Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]) -> Tuple[float, float]:
    """(largest absolute error, largest error relative to each tensor's magnitude) over
    outputs and gradients."""
    abs_err = rel_err = 0.0
    for g_list, r_list in zip(got, ref):
        for g, r in zip(g_list, r_list):
            if g is None or r is None:
                continue
            g64, r64 = g.detach().to(torch.float64), r.detach().to(device=g.device, dtype=torch.float64)
            if g64.shape != r64.shape:
                raise AssertionError(f"shape {tuple(g64.shape)} differs from the reference's {tuple(r64.shape)}")
            if g64.numel() == 0:
                continue
            d = (g64 - r64).abs().max().item()
            if math.isnan(d):
                return math.nan, math.nan
            scale = max(r64.abs().max().item(), 1e-30)
            abs_err, rel_err = max(abs_err, d), max(rel_err, d / scale)
    return abs_err, rel_err


def _cpu_peak_bytes(call) -> Optional[int]:
    """Peak of the CPU allocator's live bytes during one call, from the profiler's allocation
    records (each carries the running total); None where this torch does not expose them."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        allocs = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
                ef = node.extra_fields
                allocs.append((node.start_time_ns, ef.alloc_size, ef.total_allocated))
        if not allocs:
            return 0
        allocs.sort()
        start = allocs[0][2] - allocs[0][1]
        return int(max(a[2] for a in allocs) - start)
    except Exception:  # noqa: BLE001  (private profiler API: best effort)
        return None


def peak_memory(call, device: str) -> Optional[int]:
    """Bytes allocated at the peak of one call, above what was live before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        return int(torch.cuda.max_memory_allocated() - before)
    return _cpu_peak_bytes(call)


# ---------------------------------------------------------------------------
# machine peaks, measured once at the start of a run
# ---------------------------------------------------------------------------

def _best_time(f, reps: int, device: str) -> float:
    f()
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(device: str, quick: bool = False) -> dict:
    """Matmul FLOP/s per dtype (the best of a few shapes) and copy bandwidth (bytes read plus
    written), measured the way the cases are timed. These are the ceilings of the "% peak" column."""
    peaks: Dict[str, float] = {}
    reps = 2 if quick else 5
    if device == "cuda":
        shapes = [(2048, 2048, 2048)] if quick else [(4096, 4096, 4096), (8192, 8192, 8192)]
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
        copy_elems = (64 if quick else 512) * 2**20
    else:
        shapes = [(256, 256, 256)] if quick else [(1024, 1024, 1024), (2048, 2048, 2048), (8192, 512, 1024)]
        dtypes = [torch.float32]
        copy_elems = (4 if quick else 64) * 2**20
    for dt in dtypes:
        best = 0.0
        for m, k, n in shapes:
            a = torch.randn(m, k, device=device).to(dt)
            b = torch.randn(k, n, device=device).to(dt)
            t = _best_time(lambda: a @ b, reps, device)
            best = max(best, 2.0 * m * k * n / t)
            del a, b
        peaks[f"matmul_flops_{str(dt).replace('torch.', '')}"] = best
    src = torch.randn(copy_elems, device=device)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), reps, device)
    peaks["copy_bytes_per_s"] = 2.0 * src.numel() * src.element_size() / t
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return peaks


def machine_description(device: str) -> dict:
    import platform

    d = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:  # other processes' load skews CPU timings: the report says how busy the machine was
        d["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, cuda=torch.version.cuda, sm=f"{p.major}{p.minor}", sms=p.multi_processor_count)
    try:
        import seqkern

        d["backends"] = seqkern.backends()
    except Exception as e:  # noqa: BLE001
        d["backends"] = f"seqkern not importable: {e}"
    return d


# ---------------------------------------------------------------------------
# one benchmark
# ---------------------------------------------------------------------------

class _Cache:
    """Inputs and fp64 reference of the case being run: every implementation of a case reuses them
    (cases come in order, implementations innermost), and only the last case is kept alive."""

    def __init__(self):
        self.key = None
        self.inputs = None
        self.ref = None        # (outputs, grads), "unavailable: ..." or None until computed
        self.grad_outputs = None

    def reset(self, key):
        if key != self.key:
            self.key, self.inputs, self.ref, self.grad_outputs = key, None, None, None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


_CACHE = _Cache()
SKIPPED: List[dict] = []      # (case, impl, reason) of every skip, for the report
FAILED: List[dict] = []       # likewise for implementations that raised: a bug, shown in the report


def _with_grad(inp: dict, keys: Sequence[str], mode: str) -> dict:
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().requires_grad_(mode == "fwdbwd" and k in keys)
        out[k] = v
    return out


def _to64(inp: dict) -> dict:
    return {k: (v.detach().to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inp.items()}


def _reference(family, case: Case):
    """Outputs and gradients in fp64 from seqkern's reference backend, else from the baseline in fp64."""
    if _CACHE.ref is not None:
        return _CACHE.ref
    budget = REF_BUDGET.get(case.device, REF_BUDGET["cpu"])
    need = family.ref_bytes(case)
    if need > budget:
        _CACHE.ref = f"fp64 reference needs ~{need / 2**30:.1f} GiB (budget {budget / 2**30:.0f} GiB)"
        return _CACHE.ref
    inp64 = _with_grad(_to64(_CACHE.inputs), case.grad_keys, case.mode)
    gy = None if _CACHE.grad_outputs is None else [g.to(torch.float64) for g in _CACHE.grad_outputs]
    last = ""
    for impl in ("reference", case.baseline):
        try:
            fn, targets = family.forward(case, impl, inp64)
            res = make_call(fn, targets, case.mode, case.device, gy)()
            _CACHE.ref = (res, impl)
            return _CACHE.ref
        except (NotImplementedError, Unavailable, RuntimeError) as e:
            last = f"{impl}: {type(e).__name__}: {e}"
    _CACHE.ref = f"no fp64 reference ({last[:200]})"
    return _CACHE.ref


def _skip(case: Case, impl: str, reason: str):
    SKIPPED.append({"group": case.group, "family": case.family, "impl": impl, "reason": reason})
    pytest.skip(f"{impl}: {reason}")


def run(benchmark, family, case: Case, impl: str, config=None) -> None:
    """Time ``impl`` on ``case`` with pytest-benchmark and record everything the report needs."""
    _CACHE.reset((case.id, case.device))
    if case.device == "cuda" and not torch.cuda.is_available():
        _skip(case, impl, "no CUDA device")
    try:
        backend = backend_of(impl)
        if backend not in (None, "reference"):
            check_backend(backend)
        if _CACHE.inputs is None:
            torch.manual_seed(0)
            _CACHE.inputs = family.inputs(case, case.torch_dtype, case.device)
        inp = _with_grad(_CACHE.inputs, case.grad_keys, case.mode)
        fn, targets = family.forward(case, impl, inp)
        call = make_call(fn, targets, case.mode, case.device, _CACHE.grad_outputs)
        t0 = time.perf_counter()
        got = call()          # first call: compiles, autotunes, warms caches; also the error check
        first = time.perf_counter() - t0
    except Unavailable as e:
        _skip(case, impl, str(e))
    except NotImplementedError as e:
        _skip(case, impl, f"not implemented yet ({e})" if str(e) else "not implemented yet")
    except Exception as e:  # noqa: BLE001
        from seqkern import BackendUnavailable

        if isinstance(e, BackendUnavailable):
            _skip(case, impl, str(e))
        if isinstance(e, RuntimeError) and impl.startswith("torch-"):  # torch's own limits, not a seqkern bug
            _skip(case, impl, f"torch cannot run this case with this SDPA backend ({str(e).strip()[:160]})")
        if isinstance(e, torch.cuda.OutOfMemoryError if torch.cuda.is_available() else MemoryError):
            _skip(case, impl, "out of memory")
        FAILED.append({"group": case.group, "family": case.family, "impl": impl,
                       "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"})
        raise
    if case.mode == "fwdbwd" and _CACHE.grad_outputs is None:
        _CACHE.grad_outputs = call.state["gy"]

    ref = _reference(family, case)
    extra = case.info()
    extra["impl"] = impl
    extra["first_call_s"] = first
    if isinstance(ref, str):
        extra["err_abs"] = extra["err_rel"] = None
        extra["err_note"] = ref
    else:
        (ref_vals, ref_impl) = ref
        try:
            extra["err_abs"], extra["err_rel"] = max_error(got, ref_vals)
        except Exception as e:  # noqa: BLE001  (outputs that cannot be compared are a bug: fail, reported)
            FAILED.append({"group": case.group, "family": case.family, "impl": impl,
                           "reason": f"against the reference: {type(e).__name__}: {e}"[:240]})
            raise
        extra["err_ref"] = f"{ref_impl} fp64"
    del got
    extra["peak_mem_bytes"] = peak_memory(call, case.device)

    # Rounds from one warm call and pytest-benchmark's own --benchmark-max-time / -min-rounds;
    # a call far longer than the time budget needs no second look (the first call stands in).
    max_time, min_rounds = 1.0, 5
    if config is not None:
        max_time = float(config.getoption("benchmark_max_time", 1.0) or 1.0)
        min_rounds = int(config.getoption("benchmark_min_rounds", 5) or 5)
    one = first
    if first < 5 * max_time:
        t0 = time.perf_counter()
        call()
        one = max(time.perf_counter() - t0, 1e-7)
    iterations = 1 if one >= 1e-3 else max(1, int(1e-3 / one))
    rounds = max(min_rounds, min(1000, int(max_time / (one * iterations))))
    benchmark.group = case.group
    benchmark.extra_info.update(extra)
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)


def params(family_module, size: str, device: str):
    """pytest parameters, one per (case, implementation), cases outermost."""
    out = []
    for case in family_module.cases(size, device):
        for impl in family_module.impls(case):
            out.append(pytest.param(case, impl, id=f"{case.id}-{impl}"))
    return out


def env_size() -> Optional[str]:
    s = os.environ.get("SEQKERN_BENCH_SIZE")
    return s if s in SIZES else None
