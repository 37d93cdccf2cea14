# The two commands of the README: `make test` and `make bench`.
# Both create .venv if absent, install the pinned dependencies, build seqkern._C
# in place and then run the tests / the speed report.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# ninja (from the venv) must be on PATH for torch's BuildExtension to find it.
export PATH := $(abspath $(VENV))/bin:$(PATH)
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS

.PHONY: setup build test bench test-asan test-cuda-emu-asan clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.deps

build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import seqkern, json; print(json.dumps(seqkern.backends(), indent=1))"

# pytest's own exit code is kept in .pytest-rc (make itself exits 2 on any failure),
# so that .ci/run can tell "no tests collected" (5) from failures (1).
test: build
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15; rc=$$?; echo $$rc > .pytest-rc; exit $$rc

bench: build
	$(PY) -m seqkern.cli bench --family all

# The C++ kernels under AddressSanitizer (not in CI: slow). Rebuilds seqkern._C with
# -fsanitize=address, runs the cpu-backend tests with libasan preloaded, then rebuilds normally.
# The emulated CUDA kernels (tests/test_cuda_emu.py) run there too, their library built with ASan.
ASAN_LIB = $(shell $(CXX) -print-file-name=libasan.so)
ASAN_RUN = LD_PRELOAD="$(ASAN_LIB) $(shell $(CXX) -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 SEQKERN_EMU_ASAN=1
test-asan: setup
	rm -rf build/asan && SEQKERN_ASAN=1 $(PY) setup.py build_ext --inplace --force --build-temp build/asan
	$(ASAN_RUN) \
		$(PY) -m pytest tests -q -p no:cacheprovider -k "not triton and not nvcc and not example and not distributed"; \
		rc=$$?; rm -rf build/asan; $(PY) setup.py build_ext --inplace --force >/dev/null; exit $$rc

# Only the emulated CUDA kernels under AddressSanitizer (~1.5 min; the -s shows ASan's report,
# which an abort would otherwise lose in pytest's capture).
test-cuda-emu-asan: build
	$(ASAN_RUN) $(PY) -m pytest tests/test_cuda_emu.py tests/test_cuda_emu_mma.py -q -s -p no:cacheprovider

clean:
	rm -rf build *.egg-info seqkern/_C*.so
