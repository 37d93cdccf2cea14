"""Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90, warning-free, with no
register spills reported by ptxas. Nothing built here runs: there is no GPU."""
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/cuda/ holds no .cu file"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_nvcc_compiles_for_sm80_and_sm90(path, tmp_path):
    # one nvcc call for both targets: the front end runs once (CI has 2 cores)
    cmd = [NVCC, "-std=c++17", "-O3", "-c", path, "-o", str(tmp_path / "k.o"),
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-Xptxas", "-v", "-Werror", "all-warnings", "-I", os.path.join(ROOT, "csrc")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "sm_80" in out and "sm_90" in out, out  # ptxas reported on both targets
    assert "warning" not in out.lower(), out
    spills = [l for l in out.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", l)]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_cuda_sources_include_no_torch_header():
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*")):
        with open(path) as f:
            text = f.read()
        for bad in ("<torch/", "<ATen/", "<c10/"):
            assert bad not in text, f"{path} includes {bad}: csrc/cuda must compile without torch headers"


# The CUDA halves of the bindings (csrc/*.cpp under SEQKERN_WITH_CUDA) are built only where torch
# has CUDA, so nothing here ever compiled them. Type-check them against torch's CUDA headers; the
# CPU wheel ships those but not the CUDA math libraries' headers they include, so opaque stand-ins
# are written for the few handle and status types the headers name.
_STUBS = {
    "cublas_v2.h": "#include <cuda_runtime.h>\ntypedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "#pragma once\n",
}
BINDINGS = [p for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
            if "SEQKERN_WITH_CUDA" in open(p).read()]


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit's headers) is not installed")
def test_cuda_bindings_typecheck(tmp_path):
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    assert BINDINGS, "no csrc/*.cpp has a SEQKERN_WITH_CUDA part"
    for name, text in _STUBS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    from torch.utils.cpp_extension import CUDA_HOME

    homes = [CUDA_HOME, os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    found = [os.path.join(h, "include") for h in homes
             if h and os.path.exists(os.path.join(h, "include", "cuda_runtime_api.h"))]
    assert found, f"no CUDA include folder with cuda_runtime_api.h under {homes}"
    cuda_include = found[0]
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-fsyntax-only", "-DSEQKERN_WITH_CUDA=1",
           "-I", os.path.join(ROOT, "csrc"), "-I", str(tmp_path), "-I", cuda_include,
           "-I", sysconfig.get_paths()["include"]]
    for p in include_paths():
        cmd += ["-I", p]
    proc = subprocess.run(cmd + BINDINGS, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
