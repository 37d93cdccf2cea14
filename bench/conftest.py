"""pytest configuration of the benchmark suites.

    pytest bench/ --benchmark-json=out.json [--bench-size quick|cpu|gpu] [--bench-device cpu|cuda]

Each test module is a *family* (see harness.py): its cases x implementations are
generated here for the chosen size and device. The machine's peaks (matmul
FLOP/s, copy bandwidth) are measured once when the session starts and stored,
with the skipped implementations and their reasons, in the JSON's
``machine_info["seqkern"]``.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("seqkern bench")
    g.addoption("--bench-size", default=None, choices=harness.SIZES,
                help="shape preset: quick (tiny, CI), cpu (make bench on a CPU), gpu (the family issues' GPU "
                     "sizes); default: SEQKERN_BENCH_SIZE, else by device")
    g.addoption("--bench-device", default=None, choices=("cpu", "cuda"),
                help="device the cases run on (default: cuda when available, else cpu)")
    g.addoption("--bench-no-peaks", action="store_true", default=False,
                help="skip measuring the machine's matmul and copy peaks")


def _device(config):
    return config.getoption("bench_device") or os.environ.get("SEQKERN_BENCH_DEVICE") or harness.default_device()


def _size(config):
    return config.getoption("bench_size") or harness.env_size() or harness.default_size(_device(config))


def pytest_configure(config):
    config._seqkern_bench = {"device": _device(config), "size": _size(config), "peaks": {}}
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_sessionstart(session):
    cfg = session.config
    st = cfg._seqkern_bench
    if hasattr(os, "getloadavg"):
        st["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    if cfg.getoption("collectonly") or cfg.getoption("bench_no_peaks"):
        return
    if st["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            return
    st["peaks"] = harness.measure_peaks(st["device"], quick=st["size"] == "quick")


def pytest_generate_tests(metafunc):
    if {"case", "impl"} <= set(metafunc.fixturenames):
        st = metafunc.config._seqkern_bench
        metafunc.parametrize(("case", "impl"), harness.params(metafunc.module, st["size"], st["device"]))


def pytest_benchmark_update_machine_info(config, machine_info):
    st = config._seqkern_bench
    info = harness.machine_description(st["device"])
    info.update(size=st["size"], peaks=st["peaks"], loadavg_start=st.get("loadavg_start"), skipped=list(harness.SKIPPED), failed=list(harness.FAILED))
    machine_info["seqkern"] = info


@pytest.fixture
def bench(benchmark, request):
    """Runs one (case, implementation): ``bench(module, case, impl)``."""
    def run(module, case, impl):
        harness.run(benchmark, module, case, impl, request.config)
    return run
