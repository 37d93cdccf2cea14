"""Backend registry: which implementation of an op runs for a given call.

Four backends (DESIGN.md, "Backends"):

    reference  plain PyTorch, any device, the ground truth
    cpu        C++ kernels in seqkern._C, CPU tensors
    triton     Triton kernels in seqkern.kernels, CUDA tensors (CPU only under TRITON_INTERPRET=1)
    cuda       CUDA kernels in seqkern._C, CUDA tensors

Each op family registers, per backend, a ``supports(*args, **kwargs) -> (ok, reason)``
function with :func:`register`. :func:`select` resolves ``backend=None`` (the
``SEQKERN_BACKEND`` environment variable, read at each call, else automatic
choice) and raises :class:`BackendUnavailable` for an explicit backend that
cannot serve the call.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import types
from typing import Callable, Dict, Optional, Tuple

import torch

log = logging.getLogger("seqkern")

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Automatic choice, in order of preference, per device type of the inputs.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


Supports = Callable[..., Tuple[bool, str]]
_SUPPORTS: Dict[str, Dict[str, Supports]] = {}
_LAST: Dict[str, str] = {}


def register(op: str, backend: str, supports: Supports) -> None:
    """Declare that ``backend`` implements ``op``; ``supports`` says whether it can serve given inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _SUPPORTS.setdefault(op, {})[backend] = supports


# ---------------------------------------------------------------------------
# availability of each backend, independent of any op
# ---------------------------------------------------------------------------

def _load_extension():
    try:
        mod = importlib.import_module("seqkern._C")
    except Exception as e:  # ImportError, OSError (undefined symbol), ...
        return None, f"seqkern._C failed to import ({type(e).__name__}: {e}); reinstall with `pip install --no-build-isolation -e .`"
    return mod, ""


def _find_triton():
    # find_spec, not import: importing triton costs a second and kernels import it lazily
    try:
        found = importlib.util.find_spec("triton") is not None
    except Exception as e:  # noqa: BLE001
        return False, f"triton lookup failed ({type(e).__name__}: {e})"
    return found, ("" if found else "triton is not installed")


# Loaded once, at import: a missing or broken extension never breaks `import seqkern`,
# and select() stays traceable by torch.compile (no imports inside it).
_EXT, _EXT_REASON = _load_extension()
_EXT_CUDA = bool(_EXT is not None and _EXT.with_cuda())
_TRITON_OK, _TRITON_REASON = _find_triton()


def _extension():
    return _EXT, _EXT_REASON


def extension():
    """The compiled extension module, or None."""
    return _EXT


def extension_has_cuda() -> bool:
    return _EXT_CUDA


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_import():
    return _TRITON_OK, _TRITON_REASON


def available(name: str) -> Tuple[bool, str]:
    """Whether backend ``name`` can run at all on this machine, and why not."""
    if name == "reference":
        return True, ""
    if name == "cpu":
        mod, reason = _extension()
        return (mod is not None), reason
    if name == "cuda":
        mod, reason = _extension()
        if mod is None:
            return False, reason
        if not extension_has_cuda():
            return False, "seqkern._C was built without CUDA kernels (no CUDA toolkit or CPU-only torch at build time; SEQKERN_CUDA=1 forces them)"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
        return True, ""
    if name == "triton":
        ok, reason = _triton_import()
        if not ok:
            return False, reason
        if not (torch.cuda.is_available() or triton_interpreted()):
            return False, "no CUDA device (Triton runs on CPU only under TRITON_INTERPRET=1)"
        return True, ""
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backends() -> Dict[str, Dict[str, object]]:
    """For each backend: ``{"available": bool, "reason": str}``."""
    out = {}
    for name in BACKENDS:
        ok, reason = available(name)
        out[name] = {"available": ok, "reason": reason}
    return out


# ---------------------------------------------------------------------------
# per-call selection
# ---------------------------------------------------------------------------

def _device_type(args, kwargs) -> str:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (tuple, list)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b.device.type
    return "cpu"


def reference_only(tensors) -> Optional[str]:
    """For the ops' ``supports``: why only the reference can serve these inputs (None when any backend
    may): torch.func transforms (grad, vmap, jacrev, ...) and forward-mode AD cannot see through the
    fused backends' autograd (torch raises "must override the setup_context staticmethod" / "must
    implement the jvp function"), while the reference is plain differentiable PyTorch."""
    if torch.compiler.is_compiling():
        return None
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform (grad, vmap, jacrev, ...) is active; only the reference runs under one"
    fwad = torch.autograd.forward_ad
    if fwad._current_level >= 0 and any(t is not None and fwad.unpack_dual(t).tangent is not None for t in tensors):
        return "an input is a forward-mode AD dual tensor; only the reference computes its tangent"
    return None


def _can_serve(op: str, name: str, args, kwargs) -> Tuple[bool, str]:
    ok, reason = available(name)
    if not ok:
        return False, reason
    table = _SUPPORTS.get(op, {})
    if name not in table:
        return False, f"backend {name!r} has no implementation of {op}"
    if name == "triton" and _device_type(args, kwargs) == "cpu" and not triton_interpreted():
        return False, "inputs are on the CPU and TRITON_INTERPRET is not set"
    return table[name](*args, **kwargs)


def select(op: str, backend: str | None, *args, **kwargs) -> str:
    """Name of the backend that runs ``op`` for these inputs.

    ``backend`` (else ``SEQKERN_BACKEND``) names one explicitly: it must serve the
    call or :class:`BackendUnavailable` is raised. Otherwise the first backend of
    the automatic order for the inputs' device that supports them is chosen.
    """
    explicit = backend
    if explicit is None:
        env = os.environ.get("SEQKERN_BACKEND", "").strip()
        if env:
            # an environment value is typed by hand (export SEQKERN_BACKEND=CPU): case and spaces do not matter
            explicit = env.lower()
            if explicit not in BACKENDS:
                raise ValueError(f"SEQKERN_BACKEND={env!r} is not a backend; expected one of {BACKENDS} "
                                 f"(or unset/empty for automatic choice)")
    if explicit is not None:
        if not isinstance(explicit, str) or explicit not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {explicit!r}")
        ok, reason = _can_serve(op, explicit, args, kwargs)
        if not ok:
            raise BackendUnavailable(f"backend {explicit!r} cannot run {op}: {reason}")
        chosen = explicit
    else:
        order = _AUTO_ORDER.get(_device_type(args, kwargs), ("reference",))
        chosen = "reference"
        tried = []
        for name in order:
            ok, reason = _can_serve(op, name, args, kwargs)
            if ok:
                chosen = name
                break
            tried.append(f"{name}: {reason}")
        if tried and not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
            log.debug("%s: passed over %s", op, "; ".join(tried))
    _LAST[op] = chosen
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        log.debug("%s ran on backend %r", op, chosen)
    return chosen


def check_backend_name(backend):
    """For layer constructors: a wrong ``backend=`` fails where it is written, not at the first call."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


# Parameter disables __torch_function__: as plain as a Tensor for the direct paths below
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch.jit.is_tracing
_dispatch_depth = torch._C._len_torch_dispatch_stack
_function_mode = torch._C._is_torch_function_mode_enabled
_functorch_level = torch._C._functorch.peek_interpreter_stack
_autocast_on = torch.is_autocast_enabled
_forward_ad = torch.autograd.forward_ad


def eager_cpu(backend) -> bool:
    """Whether a call with these settings may run a cpu kernel directly, skipping select() and the
    registered op: the cpu backend asked for (or automatic with SEQKERN_BACKEND unset or "cpu"), not
    traced (compile, jit.trace), no dispatch or function mode, no torch.func transform, no forward-AD
    level (see reference_only), no CPU autocast, no debug log (it reports each selection). The
    caller still checks its tensors (plain cpu ones of a cpu dtype)."""
    if backend is None:
        env = os.environ.get("SEQKERN_BACKEND", "").strip().lower()  # as select() reads it
        if env and env != "cpu":
            return False
    elif backend != "cpu":
        return False
    return not (_EXT is None or _is_compiling() or _is_tracing() or _dispatch_depth() or _function_mode()
                or _functorch_level() is not None or _forward_ad._current_level >= 0 or _autocast_on("cpu")
                or log.isEnabledFor(logging.DEBUG))


def register_flops(op, formula: Callable[..., int]) -> None:
    """Tells ``torch.utils.flop_counter.FlopCounterMode`` how many flops a call of the custom op
    ``op`` (``torch.ops.seqkern.<name>``) does, as torch's own SDPA and matmuls are counted.
    ``formula`` gets the op's arguments with tensors replaced by their shapes. Never fails: an
    older torch without the registry only loses the count."""
    try:
        from torch.utils.flop_counter import flop_registry, register_flop_formula
    except ImportError:
        return
    if op not in flop_registry:
        register_flop_formula(op)(formula)


def explain(op: str, *args, **kwargs) -> Dict[str, Tuple[bool, str]]:
    """For each backend, whether it could serve ``op`` on these inputs and why not."""
    return {name: _can_serve(op, name, args, kwargs) for name in BACKENDS}


# Other names a user may give an op: the family and the short name of attention.
_ALIASES = {"sdpa": "scaled_dot_product_attention", "attention": "scaled_dot_product_attention",
            "wkv": "wkv4", "rotary": "apply_rotary"}


def last_backend(op) -> str | None:
    """The backend that ran the last call of ``op`` in this process (None before the first).

    ``op`` is the op's name (``"lstm"``, ``"wkv4"``, ``"scaled_dot_product_attention"``; also
    ``"sdpa"``/``"attention"``, ``"wkv"``, ``"rotary"``) or the public function itself (``SF.wkv4``).
    """
    if callable(op) and not isinstance(op, str):
        op = getattr(op, "__name__", op)
    if not isinstance(op, str):
        raise TypeError(f"op must be an op name or a seqkern op, got {type(op).__name__}")
    return _LAST.get(_ALIASES.get(op, op))


def is_auto(backend) -> bool:
    """Whether :func:`select` chooses the backend itself for this ``backend`` argument (None and no
    ``SEQKERN_BACKEND``): an automatically chosen fused backend lets a create_graph backward fall
    back to the reference's differentiable recomputation, as torch's own ops differentiate twice."""
    return backend is None and not os.environ.get("SEQKERN_BACKEND", "").strip()


def wants_graph() -> bool:
    """Inside a backward: whether it runs with create_graph (grad mode on), eagerly."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def reference_grads(fn, ins, need, grad_outputs, create_graph: bool = True):
    """Gradients of ``ins`` (those ``need`` asks for, zeros when unused, None for the others) by
    autograd of ``fn(*ins)`` (a reference implementation returning a tuple of outputs) recomputed
    against ``grad_outputs``. With ``create_graph`` the recomputation hangs off aliases of the inputs
    themselves, so the gradients stay in the caller's graph (a create_graph backward differentiates
    them again) and each is its input's own partial derivative, not also the paths through other
    inputs computed from it; without, off detached copies."""
    with torch.enable_grad():
        if create_graph:
            leaves = [None if t is None else t.view_as(t) for t in ins]
        else:
            leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(ins, need)]
        outs = fn(*leaves)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if o is not None and g is not None and o.requires_grad]
        wrt = [t for t, n in zip(leaves, need) if n and t is not None]
        got = [None] * len(wrt)
        if wrt and pairs:
            got = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True,
                                           create_graph=create_graph))
    res = []
    for t, n in zip(leaves, need):
        if n and t is not None:
            g = got.pop(0)
            res.append(torch.zeros_like(t) if g is None else g)
        else:
            res.append(None)
    return res


def check_no_double_backward(op: str, backend: str) -> None:
    """Called at the top of a fused backend's backward: that backward is a kernel, not a
    graph of differentiable ops, so higher-order gradients must come from the reference."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{op}: backend {backend!r} does not support double backward (its backward is a fused kernel); "
            f"call it with backend='reference' for higher-order gradients")


# ---------------------------------------------------------------------------
# small shared checks used by the families' supports() functions
# ---------------------------------------------------------------------------

def same_device_and_dtype(tensors, dtypes) -> Tuple[bool, str]:
    ts = [t for t in tensors if t is not None]
    if not ts:
        return True, ""
    dev, dt = ts[0].device, ts[0].dtype
    for t in ts:
        if t.device != dev:
            return False, f"tensors on different devices ({dev} and {t.device})"
        if t.dtype != dt:
            return False, f"tensors of different dtypes ({dt} and {t.dtype})"
    if dt not in dtypes:
        return False, f"dtype {dt} not supported (supports {', '.join(str(d) for d in dtypes)})"
    return True, ""


# `seqkern.backends()` (the function above) and `seqkern.backends` (this module, the
# registry that ops import) share one name: make the module callable so both work.
class _CallableModule(types.ModuleType):
    def __call__(self):
        return backends()


sys.modules[__name__].__class__ = _CallableModule
