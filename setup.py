"""Builds seqkern._C: the C++ CPU kernels always, the CUDA kernels when a CUDA
toolkit and a CUDA build of torch are present (SEQKERN_CUDA=0/1 forces it).

torch must be importable at build time: install with
`pip install --no-build-isolation -e .`.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted(torch, cuda_home):
    flag = os.environ.get("SEQKERN_CUDA")
    if flag is not None and flag.strip() != "":
        return flag.strip() not in ("0", "false", "False", "no")
    return torch.version.cuda is not None and cuda_home is not None


def ext_modules_and_cmdclass():
    if os.environ.get("SEQKERN_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # no torch at build time: pure-Python install, backends 'cpu'/'cuda' report unavailable
        print("seqkern: torch not importable at build time; building without seqkern._C")
        return [], {}

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    march = os.environ.get("SEQKERN_MARCH", "native")
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    if march:
        cxx.append(f"-march={march}")
    link = ["-fopenmp"]
    if os.environ.get("SEQKERN_ASAN") == "1":  # `make test-asan`: AddressSanitizer build of the C++ kernels
        cxx += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
        link += ["-fsanitize=address"]
    kwargs = dict(
        name="seqkern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    if _cuda_wanted(torch, CUDA_HOME):
        kwargs["sources"] += rel("csrc/cuda/*.cu")
        kwargs["define_macros"] = [("SEQKERN_WITH_CUDA", "1")]
        kwargs["extra_compile_args"]["cxx"].append("-DSEQKERN_WITH_CUDA=1")
        kwargs["extra_compile_args"]["nvcc"] = [
            "-O3", "--use_fast_math", "-lineinfo",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
            "-DSEQKERN_WITH_CUDA=1",
        ]
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    name="seqkern",
    version="0.1.0",
    description="Fused kernels for RNN, LSTM, GRU, attention and RWKV sequence models",
    packages=find_packages(include=["seqkern", "seqkern.*"]) + ["seqkern.kernels"],
    package_dir={"seqkern.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton"]},
    entry_points={"console_scripts": ["seqkern=seqkern.cli:main"]},
)
