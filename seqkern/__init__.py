"""seqkern: fused kernels for RNN, LSTM, GRU, attention and RWKV.

    import seqkern
    from seqkern import functional as SF, nn as snn

See DESIGN.md for the contract and README.md for what runs where.
"""
import os as _os

# Running from a source tree without `pip install -e .`: the Triton kernels live in
# <repo>/kernels and are installed as seqkern.kernels (setup.py's package_dir).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (makes seqkern.kernels resolve to <repo>/kernels)

from . import backends  # noqa: E402  (a callable module: seqkern.backends() lists the backends)
from .backends import BACKENDS, BackendUnavailable, last_backend  # noqa: E402
from . import ops  # noqa: E402,F401
from . import functional  # noqa: E402,F401
from . import nn  # noqa: E402,F401
from .convert import replace_modules, restore_modules  # noqa: E402,F401

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailable", "backends", "last_backend",
    "functional", "nn", "replace_modules", "restore_modules", "__version__",
]
