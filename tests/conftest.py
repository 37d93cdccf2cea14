"""Test harness.

- Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be set
  before triton compiles anything: set here, before any test module imports
  seqkern.kernels.
- `cuda`-marked tests are skipped with a reason when no GPU is present.
- torch.compile's on-disk caches go to a directory named after seqkern's Python sources and
  op schemas: AOTAutograd's cache entry for a compiled forward holds the backward graph too,
  keyed on the forward graph alone, so a changed autograd formula or backward op schema would
  otherwise be served the stale backward of another checkout sharing /tmp.
"""
import faulthandler
import hashlib
import os
import pathlib
import tempfile


def _compile_cache_dir():
    root = pathlib.Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    sources = [*(root / "seqkern").rglob("*.py"), *(root / "kernels").glob("*.py"), *(root / "csrc").glob("*.cpp")]
    for p in sorted(sources):
        h.update(p.read_bytes())
    return os.path.join(tempfile.gettempdir(), f"seqkern-inductor-{h.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _compile_cache_dir())

if os.environ.get("SEQKERN_TEST_NO_INTERPRET") != "1":
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def watchdog():
    """For modules whose failure mode is a hang (a kernel looping on NaN/inf, a deadlock between
    threads): after 300 s dump every thread's stack and exit, instead of holding CI to its limit."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
