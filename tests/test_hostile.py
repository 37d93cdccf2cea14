"""Hostile inputs, table-driven, per op: wrong ranks, mismatched sizes, mixed
devices (the meta device stands in for a second one) and dtypes, integer tensors,
NaN and +-inf, huge magnitudes, zero-length sequences, lengths one past a block
size. Every backend that runs here either gives the reference's result (NaN where
the reference has NaN, the same gradients) or raises an error that names the
argument; none crashes, hangs or modifies an input."""
import faulthandler
import re

import pytest
import torch

from seqkern import functional as SF

from reliability import Arg, assert_parity, backends_for, require_family

ERRORS = (ValueError, TypeError, RuntimeError)


@pytest.fixture(autouse=True)
def _watchdog():
    # a kernel that loops forever on NaN/inf would hang CI: dump the stacks and exit instead
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def names(arg):
    """Regex matching the argument's name as a word (so 'k' does not match 'backend')."""
    return rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])"


def run_case(family, op, build, expect, backend):
    require_family(family)
    call, args, dtype = build()
    if expect == "reference":
        assert_parity(call, args, backend, dtype, op=op)
    else:
        with pytest.raises(ERRORS, match=names(expect)):
            call({n: a.present() if isinstance(a, Arg) else a for n, a in args.items()}, backend)


def cases(table):
    """pytest params: one per (case, backend) for every backend that implements the op."""
    out = []
    for family, op, rows in table:
        for case_id, build, expect in rows:
            for be in backends_for(op):
                marks = [pytest.mark.triton] if be == "triton" else []
                out.append(pytest.param(family, op, build, expect, be, id=f"{op}-{case_id}-{be}", marks=marks))
    return out


def poke(x, value, idx=0):
    """x with one element set to value (a new tensor)."""
    x = x.clone()
    x.view(-1)[idx] = value
    return x


# ---------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------

def _rotary(q=None, k=None, T=5, D=8, R=8, dtype=torch.float32, grad=True, cos=None, sin=None):
    q = torch.randn(2, 3, T, D, dtype=dtype) if q is None else q
    k = torch.randn(2, 1, T, D, dtype=dtype) if k is None else k
    ang = torch.rand(T, R // 2, dtype=torch.float64) * 6
    cos = ang.cos().to(dtype) if cos is None else cos
    sin = ang.sin().to(dtype) if sin is None else sin
    args = dict(q=Arg(q, grad=grad and q.is_floating_point()), k=Arg(k, grad=grad and k.is_floating_point()),
                cos=Arg(cos), sin=Arg(sin))
    return (lambda a, be: SF.apply_rotary(a["q"], a["k"], a["cos"], a["sin"], backend=be)), args, dtype


ROTARY = [
    ("rank-q", lambda: _rotary(q=torch.randn(8)), "q"),
    ("rank-cos", lambda: _rotary(cos=torch.randn(5, 4, 1)), "cos"),
    ("size-k", lambda: _rotary(k=torch.randn(2, 1, 5, 6)), "k"),
    ("size-sin", lambda: _rotary(sin=torch.randn(5, 3)), "sin"),
    ("size-cos-T", lambda: _rotary(cos=torch.randn(4, 4), sin=torch.randn(4, 4)), "cos"),
    ("dtype-k", lambda: _rotary(k=torch.randn(2, 1, 5, 8, dtype=torch.float64)), "k"),
    ("int-q", lambda: _rotary(q=torch.ones(2, 3, 5, 8, dtype=torch.int64)), "q"),
    ("bool-cos", lambda: _rotary(cos=torch.ones(5, 4, dtype=torch.bool)), "cos"),
    ("device-k", lambda: _rotary(k=torch.randn(2, 1, 5, 8, device="meta")), "k"),
    ("nan-q", lambda: _rotary(q=poke(torch.randn(2, 3, 5, 8), float("nan"), 9)), "reference"),
    ("inf-k", lambda: _rotary(k=poke(poke(torch.randn(2, 1, 5, 8), float("inf"), 3), float("-inf"), 17)),
     "reference"),
    ("huge-q", lambda: _rotary(q=torch.randn(2, 3, 5, 8) * 1e30), "reference"),
    ("T0", lambda: _rotary(T=0), "reference"),
    ("T65-D130", lambda: _rotary(T=65, D=130, R=130, dtype=torch.float64), "reference"),
]


@pytest.mark.parametrize("family,op,build,expect,backend", cases([("rotary", "apply_rotary", ROTARY)]))
def test_hostile(family, op, build, expect, backend):
    run_case(family, op, build, expect, backend)
