"""Command line: `seqkern info` and `seqkern bench`."""
from __future__ import annotations

import argparse
import platform
import sys


def _info() -> int:
    import torch

    import seqkern
    from seqkern import backends as B

    print(f"seqkern {seqkern.__version__}")
    print(f"python  {platform.python_version()} ({sys.executable})")
    print(f"torch   {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton  {triton.__version__}" + (" (TRITON_INTERPRET=1)" if B.triton_interpreted() else ""))
    except Exception as e:  # noqa: BLE001
        print(f"triton  not importable ({type(e).__name__})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device  cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        print(f"device  cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (no CUDA device)")
    ext = B.extension()
    print(f"_C      {'built' if ext is not None else 'missing'}" + (" with CUDA kernels" if B.extension_has_cuda() else ""))
    print("backends:")
    for name, st in seqkern.backends().items():
        mark = "yes" if st["available"] else "no "
        print(f"  {name:<10} {mark}  {st['reason']}")
    return 0


def _version() -> str:
    from seqkern import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqkern", description=__doc__)
    parser.add_argument("--version", action="version", version=f"seqkern {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device and each backend's availability")
    pb = sub.add_parser("bench", help="run the speed report (bench/report.py); extra arguments pass through",
                        add_help=False)
    pb.add_argument("rest", nargs=argparse.REMAINDER)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # Everything after `bench` goes to seqkern.bench in its own order: argparse's REMAINDER
        # splits `--family all` into unknown `--family` and rest `all`, and rejoining them reorders.
        from seqkern import bench

        return bench.main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return _info()
    return 2


if __name__ == "__main__":
    sys.exit(main())
