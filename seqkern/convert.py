"""One-line adoption: swap torch.nn's recurrent and attention modules for seqkern's.

    model = seqkern.replace_modules(model)                      # in place; returns the model
    model, summary = seqkern.replace_modules(model, return_summary=True)
    seqkern.restore_modules(model)                              # exactly undone

Every module whose type is exactly ``torch.nn.RNN``, ``LSTM``, ``GRU``, ``RNNCell``,
``LSTMCell``, ``GRUCell`` or ``MultiheadAttention`` becomes the seqkern module of the
same name. The seqkern modules subclass torch's and add nothing but ``forward`` and a
``backend`` attribute, so the swap changes the module's class in place: the module
object stays the same, and with it its parameter tensors (optimizers and ``state_dict``
keys still match), buffers, device, dtype, train/eval mode and every hook registered
on it or on its parents. This also works when the root module itself is one of those
classes, and for modules shared between several parents (swapped once).

A swapped RNN/LSTM/GRU is no longer an instance of ``torch.nn.LSTM`` (etc.), only of
``torch.nn.RNNBase`` (see ``seqkern.nn.rnn``): that is what lets Dynamo trace it, where
``torch.compile(fullgraph=True)`` refuses torch's own RNN modules.

Subclasses of the torch modules are left alone (their own ``forward`` may differ, and
their code may rely on torch's; the INFO log names them), as are modules that already
are seqkern's; a module with ``torch.nn.utils.parametrize``
parametrizations (whose class torch replaces by a generated ``Parametrized<Class>``) is
converted, its parametrizations kept.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
from torch.nn.utils import parametrize

from . import backends as B

log = logging.getLogger("seqkern")

_NAMES = ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "MultiheadAttention")
# marks a module this file converted, with the torch class to restore
_MARK = "_seqkern_replaced_from"


def _table() -> Dict[type, type]:
    from . import nn as snn

    return {getattr(torch.nn, n): getattr(snn, n) for n in _NAMES}


def _resolve_include(include) -> Tuple[type, ...]:
    if include is None:
        return tuple(getattr(torch.nn, n) for n in _NAMES)
    if isinstance(include, (str, type)):
        include = [include]
    out = []
    for item in include:
        name = item if isinstance(item, str) else getattr(item, "__name__", None)
        if isinstance(item, type) and item is not getattr(torch.nn, name or "", None):
            raise ValueError(f"include: {item!r} is not one of torch.nn.{{{', '.join(_NAMES)}}}")
        if name not in _NAMES:
            raise ValueError(f"include: expected torch.nn classes or names among {_NAMES}, got {item!r}")
        out.append(getattr(torch.nn, name))
    return tuple(out)


def _base_class(m: torch.nn.Module) -> type:
    """The class that decides a module's conversion: its own, or for a module with
    ``torch.nn.utils.parametrize`` parametrizations (``parametrizations.weight_norm``,
    ``orthogonal``, ``spectral_norm``; torch gives such a module a generated subclass
    ``Parametrized<Class>`` holding the parametrized attributes as properties) the class under it."""
    cls = type(m)
    if parametrize.is_parametrized(m) and len(cls.__bases__) == 1 and cls.__name__ == "Parametrized" + \
            cls.__bases__[0].__name__:
        return cls.__bases__[0]
    return cls


def _set_base_class(m: torch.nn.Module, base: type) -> None:
    """Gives ``m`` the class ``base``, or for a parametrized module a new ``Parametrized<Class>``
    over ``base`` with the same properties and methods (so parametrizations keep working, and
    ``remove_parametrizations`` leaves ``base``)."""
    cls = type(m)
    if cls is _base_class(m):
        m.__class__ = base
        return
    dct = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    m.__class__ = type(cls.__name__, (base,), dct)


def replace_modules(model: torch.nn.Module, *, include: Optional[Iterable[Union[type, str]]] = None,
                    backend: Optional[str] = None, return_summary: bool = False):
    """Swap, in place, torch.nn RNN/LSTM/GRU, their cells and MultiheadAttention in
    ``model`` (the root included) for the seqkern modules, keeping the very same
    parameter tensors.

    include: torch.nn classes (or their names, e.g. ``["LSTM", "MultiheadAttention"]``)
        to swap; None swaps all seven.
    backend: the ``backend`` attribute of the swapped modules (None: automatic choice).
    return_summary: also return ``{qualified module name: torch class name}`` of what
        was swapped (the root is ``""``). The summary is logged at INFO level on the
        ``seqkern`` logger either way.

    Returns ``model`` (the same object), or ``(model, summary)`` with ``return_summary``.
    Undo with :func:`restore_modules`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in B.BACKENDS:
        raise ValueError(f"backend must be one of {B.BACKENDS} or None, got {backend!r}")
    wanted = _resolve_include(include)
    table = _table()
    summary: Dict[str, str] = {}
    skipped = []
    ours = tuple(table.values())
    for name, m in model.named_modules():
        cls = _base_class(m)
        if cls not in wanted:
            if isinstance(m, wanted) and not isinstance(m, ours):
                skipped.append(f"{name or '<root>'} ({cls.__name__})")
            continue
        _set_base_class(m, table[cls])
        m.__dict__[_MARK] = cls
        m.backend = backend
        summary[name] = cls.__name__
    counts = Counter(summary.values())
    log.info("seqkern.replace_modules: replaced %d module(s)%s%s", len(summary),
             "" if not counts else " (" + ", ".join(f"{n} x{c}" for n, c in counts.items()) + ")",
             "" if not summary else ": " + ", ".join(n or "<root>" for n in summary))
    if skipped:  # a user's subclass may override forward or rely on it: say why it kept its class
        log.info("seqkern.replace_modules: left alone %d subclass(es) of torch.nn modules: %s", len(skipped),
                 ", ".join(skipped))
    return (model, summary) if return_summary else model


def restore_modules(model: torch.nn.Module, *, return_summary: bool = False):
    """Undo :func:`replace_modules`: every module it swapped becomes the torch.nn module
    it was (same object, same parameters); modules built as seqkern modules are kept.
    Returns ``model``, or ``(model, summary)`` with ``return_summary``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    summary: Dict[str, str] = {}
    for name, m in model.named_modules():
        original = m.__dict__.pop(_MARK, None)
        if original is None:
            continue
        m.__dict__.pop("backend", None)
        _set_base_class(m, original)
        summary[name] = original.__name__
    log.info("seqkern.restore_modules: restored %d module(s)", len(summary))
    return (model, summary) if return_summary else model

