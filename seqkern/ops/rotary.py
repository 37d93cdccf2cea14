"""Rotary position embedding (Su et al. 2021), applied to q and k in one call.

    q_rot, k_rot = apply_rotary(q, k, cos, sin, *, interleaved=False, backend=None)

q: (..., T, D), k: (..., T, D) (leading dims may differ, e.g. fewer k/v heads);
cos, sin: (T, R/2) with R <= D even, from :func:`rotary_cos_sin`. The first R
features of every row at position t are rotated pairwise by the angles of row t;
features R..D pass through unchanged (partial rotary).

Pairs are (j, j + R/2) by default (rotate-half, GPT-NeoX / LLaMA layout) and
(2j, 2j + 1) with ``interleaved=True`` (GPT-J layout).

A rotation's adjoint is the rotation by the opposite angle, so the backward of
every backend is its own forward with ``inverse=True`` (and the op is therefore
differentiable twice).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import backends as B

OP = "apply_rotary"
_CPU_DTYPES = (torch.float32, torch.float64)
_GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def rotary_cos_sin(seq_len: int, dim: int, base: float = 10000.0, *, start: int = 0,
                   device=None, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """cos and sin tables of shape (seq_len, dim // 2) for positions start .. start + seq_len - 1.

    Angle of position p and pair j: p * base ** (-2j / dim), computed in fp64 and then cast,
    so a table built for a long context and sliced equals one built with ``start``.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even number, got {dim}")
    if seq_len < 0 or start < 0:
        raise ValueError(f"seq_len and start must be >= 0, got seq_len={seq_len}, start={start}")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    pos = torch.arange(start, start + seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(pos, inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

def _validate(q, k, cos, sin, interleaved):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    if q.dim() < 2:
        raise ValueError(f"q must have shape (..., T, D), got {tuple(q.shape)}")
    if k.dim() < 2:
        raise ValueError(f"k must have shape (..., T, D), got {tuple(k.shape)}")
    T, D = q.shape[-2], q.shape[-1]
    if k.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"k must end in (T, D) = {(T, D)} like q, got {tuple(k.shape)}")
    if cos.dim() != 2:
        raise ValueError(f"cos must have shape (T, R/2), got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if cos.shape[0] != T:
        raise ValueError(f"cos must have T={T} rows (q.size(-2)), got {cos.shape[0]}")
    if 2 * cos.shape[1] > D:
        raise ValueError(f"cos has {cos.shape[1]} columns: rotary dim {2 * cos.shape[1]} exceeds head dim D={D}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has dtype {q.dtype}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin has dtype {sin.dtype} but cos has dtype {cos.dtype}")


# ---------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------

def _rotate_reference(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool = False) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[-1]
    xr, rest = x[..., : 2 * half].to(acc), x[..., 2 * half:]
    c, s = cos.to(acc), sin.to(acc)
    if inverse:
        s = -s
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def apply_rotary_reference(q, k, cos, sin, *, interleaved=False):
    """Plain PyTorch from the definition; differentiable in every argument."""
    return _rotate_reference(q, cos, sin, interleaved), _rotate_reference(k, cos, sin, interleaved)


# ---------------------------------------------------------------------------
# backend kernels
# ---------------------------------------------------------------------------

def _cpu_rotary(q, k, cos, sin, interleaved, inverse):
    return torch.ops.seqkern_C.rotary_forward(q.contiguous(), k.contiguous(), cos.to(q.dtype).contiguous(),
                                              sin.to(q.dtype).contiguous(), interleaved, inverse)


_cuda_rotary = _cpu_rotary  # same C++ schema; the dispatcher picks the CUDA kernel for CUDA tensors


def _triton_rotary(q, k, cos, sin, interleaved, inverse):
    from seqkern.kernels import rotary as K

    return K.rotary(q, cos, sin, interleaved, inverse), K.rotary(k, cos, sin, interleaved, inverse)


def _reference_rotary(q, k, cos, sin, interleaved, inverse):
    return (_rotate_reference(q, cos, sin, interleaved, inverse),
            _rotate_reference(k, cos, sin, interleaved, inverse))


_IMPL = {"reference": _reference_rotary, "cpu": _cpu_rotary, "triton": _triton_rotary, "cuda": _cuda_rotary}


@torch.library.custom_op("seqkern::apply_rotary", mutates_args=())
def _rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool,
               backend: str) -> Tuple[Tensor, Tensor]:
    qo, ko = _IMPL[backend](q, k, cos, sin, interleaved, inverse)
    return qo, ko


@_rotary_op.register_fake
def _(q, k, cos, sin, interleaved, inverse, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, interleaved, inverse, backend = inputs
    ctx.interleaved, ctx.inverse, ctx.backend = interleaved, inverse, backend
    need_table = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ctx.save_for_backward(cos, sin, q if need_table else None, k if need_table else None)


def _table_grads(g, x, half, interleaved, inverse):
    """d/dcos and d/dsin of one rotated tensor, summed over the leading dims."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g, x = g[..., : 2 * half].to(acc), x[..., : 2 * half].to(acc)
    if interleaved:
        g1, g2, x1, x2 = g[..., 0::2], g[..., 1::2], x[..., 0::2], x[..., 1::2]
    else:
        g1, g2, x1, x2 = g[..., :half], g[..., half:], x[..., :half], x[..., half:]
    dc = g1 * x1 + g2 * x2
    ds = g2 * x1 - g1 * x2
    if inverse:
        ds = -ds
    lead = tuple(range(dc.dim() - 2))
    return dc.sum(lead), ds.sum(lead)


def _backward(ctx, gq, gk):
    cos, sin, q, k = ctx.saved_tensors
    gq = torch.zeros_like(q) if gq is None else gq
    gk = torch.zeros_like(k) if gk is None else gk
    dq, dk = _rotary_op(gq, gk, cos, sin, ctx.interleaved, not ctx.inverse, ctx.backend)
    dcos = dsin = None
    if q is not None:
        half = cos.shape[-1]
        c1, s1 = _table_grads(gq, q, half, ctx.interleaved, ctx.inverse)
        c2, s2 = _table_grads(gk, k, half, ctx.interleaved, ctx.inverse)
        dcos, dsin = (c1 + c2).to(cos.dtype), (s1 + s2).to(sin.dtype)
    return dq, dk, dcos, dsin, None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# what each backend supports
# ---------------------------------------------------------------------------

def _supports(dtypes, device_type):
    def supports(q, k, cos, sin, interleaved=False):
        if q.device.type != device_type:
            return False, f"inputs are on {q.device.type}, this backend runs on {device_type}"
        why = B.reference_only((q, k, cos, sin))
        if why:
            return False, why
        if q.dtype not in dtypes:
            return False, f"dtype {q.dtype} not supported (supports {', '.join(map(str, dtypes))})"
        return True, ""
    return supports


# kernels/rotary.py: a 1-D grid of blocks of rows, row offsets in int64
_GRID_X_MAX = 2**31 - 1


def _triton_supports(q, k, cos, sin, interleaved=False):
    why = B.reference_only((q, k, cos, sin))
    if why:
        return False, why
    if q.dtype not in _GPU_DTYPES:
        return False, f"dtype {q.dtype} not supported"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return False, "bf16 is computed wrongly by the Triton interpreter"
    half = cos.shape[1]
    rows_per = max(1, min(64, 4096 // (1 << max(half - 1, 0).bit_length())))  # kernels/rotary.py's BLOCK_R
    for name, t in (("q", q), ("k", k)):
        programs = -(-(t.numel() // max(t.shape[-1], 1)) // rows_per)
        if programs > _GRID_X_MAX:
            return False, (f"{name} of shape {tuple(t.shape)} needs {programs} programs, over the Triton grid "
                           f"limit of 2^31-1")
    return True, ""


B.register(OP, "reference", lambda *a, **kw: (True, ""))
B.register(OP, "cpu", _supports(_CPU_DTYPES, "cpu"))
B.register(OP, "cuda", _supports(_GPU_DTYPES, "cuda"))
B.register(OP, "triton", _triton_supports)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
                 backend: str | None = None) -> Tuple[Tensor, Tensor]:
    """Rotate q and k by the rotary angles of their positions (see the module docstring)."""
    _validate(q, k, cos, sin, interleaved)
    name = B.select(OP, backend, q, k, cos, sin, interleaved)
    if name == "reference":
        return apply_rotary_reference(q, k, cos, sin, interleaved=interleaved)
    return _rotary_op(q, k, cos, sin, interleaved, False, name)
