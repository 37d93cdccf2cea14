"""Scaled dot-product attention with torch's signature and semantics.

    o = scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False, *, backend=None)

q: (..., Hq, L, E), k: (..., Hk, S, E), v: (..., Hk, S, Ev); leading dims broadcast as in
torch. ``attn_mask``: bool (True = takes part) or additive float of q's dtype or float32
(torch's rule), broadcastable to (..., Hq, L, S). ``is_causal``: query i sees keys j <= i
(top-left alignment when L != S, as torch); given with ``attn_mask``, both apply, as in torch's
default CPU (flash) and CUDA (memory-efficient) kernels (only its math fallback refuses the pair).
``enable_gqa``: Hq a multiple of Hk, query head h reads key/value head h // (Hq/Hk) (key and value
heads may differ, as in torch, each dividing Hq: both are then repeated to Hq). Bad input raises
``InputError`` (a ValueError) or ``InputTypeError`` (a TypeError), each also the RuntimeError torch
raises for it.

Differences from torch, on purpose (DESIGN.md "Numerics"): a row that every mask entry
excludes gives output 0 and gradient 0 (torch gives NaN).

Every backend computes the same thing: the log-sum-exp form of softmax, which never
overflows for large logits,

    lse_i = m_i + log sum_j exp(s_ij - m_i),  P_ij = exp(s_ij - lse_i),  O = (P * Z) V

where Z is the dropout mask scaled by 1/(1-p). Z is not drawn with torch's RNG but from a
counter-based hash of (seed, row, column) (:func:`dropout_keep`) that every backend evaluates
identically, so the backward regenerates the forward's mask bit for bit and backends agree.
The fused backends save only O and lse; their backward recomputes P from lse and uses
rowsum(dO * O) = rowsum(P * dP) (FlashAttention-2). The op's ``lse`` output is the pair
(B, H, L, 2) = (m, log l), lse = m + log l, with m the shift the forward subtracted: the backward
computes P = exp((s - m) - log l) from logits bit-identical to the forward's, so s - m cancels
exactly as in the forward (fp32 logits ~1e4 have ulp ~1e-3: exp(s - lse) would scale a whole row
of P by up to 1 + 5e-4). The triton backend keeps the pair in base 2 (it works with exp2).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends as B

OP = "scaled_dot_product_attention"
_CPU_DTYPES = (torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # fp64 accumulates in fp64
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the CUDA kernel accumulates in fp32: no fp64
MAX_HEAD_DIM = 256  # Triton/CUDA tile limit (cpu and reference have none)

# ---------------------------------------------------------------------------
# dropout mask shared by every backend
# ---------------------------------------------------------------------------
# The hash is lowbias32 (C. Wellons); constants and the keep rule are part of the contract
# between backends: csrc/cpu/attention.cpp, csrc/cuda/attention.cu and kernels/attention.py
# evaluate exactly these integer operations.
_M32 = 0xFFFFFFFF
HASH_C1 = 0x7FEB352D
HASH_C2 = 0x846CA68B


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2**32 for x < 2**32 in int64 without signed overflow: split c in 16-bit halves
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_C2)
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """A 24-bit draw u = hash >> 8 keeps its element when u >= this threshold."""
    return min(1 << 24, int(round(p * (1 << 24))))


def dropout_keep(seed: int, BH: int, L: int, S: int, device=None) -> Tensor:
    """Bool keep-mask (BH, L, S) of the element (row r = bh * L + i, column j):
    hash = mix32(mix32((r mod 2**32) ^ seed) ^ j); keep when (hash >> 8) >= dropout_threshold(p)
    -- returned here as the 24-bit draw so that callers compare with their threshold."""
    rows = torch.arange(BH * L, dtype=torch.int64, device=device) & _M32
    rh = _mix32(rows ^ (seed & _M32)).view(BH, L, 1)
    cols = torch.arange(S, dtype=torch.int64, device=device).view(1, 1, S)
    return _mix32(rh ^ cols) >> 8


# ---------------------------------------------------------------------------
# validation and canonical form (B, H, L, E)
# ---------------------------------------------------------------------------

class InputError(ValueError, RuntimeError):
    """Bad shapes, ranks, devices or values: a ValueError by seqkern's rule, and the RuntimeError
    torch's scaled_dot_product_attention raises for the same call, so ``except``/``pytest.raises``
    written for either catches it."""


class InputTypeError(TypeError, RuntimeError):
    """A wrong or mismatched tensor dtype: a TypeError by seqkern's rule, and torch's RuntimeError."""


def _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.is_nested:  # jagged (torch.nested) inputs: no backend takes ragged sequences
            raise TypeError(f"{name} is a nested tensor, which seqkern's attention does not take: pad the "
                            "sequences and pass an attn_mask that excludes the padding")
        if not t.is_floating_point():
            raise InputTypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.dim() < 2:
            raise InputError(f"{name} must have shape (..., L, E) with at least 2 dims, got {tuple(t.shape)}")
    for name, t in (("key", k), ("value", v)):
        if t.dtype != q.dtype:
            raise InputTypeError(f"{name} has dtype {t.dtype} but query has dtype {q.dtype}")
        if t.device != q.device:
            raise InputError(f"{name} is on {t.device} but query is on {q.device}")
    if k.shape[-1] != q.shape[-1]:
        raise InputError(f"key must have the embedding size E={q.shape[-1]} of query, got {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise InputError(f"value must have the sequence length S={k.shape[-2]} of key, got {tuple(v.shape)}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        # torch's rule: a float32 mask goes with any query dtype (masks are often built in the
        # default dtype, e.g. nn.Transformer.generate_square_subsequent_mask, for fp64/fp16 models)
        if attn_mask.dtype not in (torch.bool, q.dtype, torch.float32):
            raise InputTypeError(f"attn_mask must be bool, float32 or have query's dtype {q.dtype}, "
                                 f"got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise InputError(f"attn_mask is on {attn_mask.device} but query is on {q.device}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise InputError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")


def _broadcast(*shapes):
    """torch.broadcast_shapes, in plain Python when every size is an int: torch's version costs
    ~35 us a call, which made a one-token decoding step (~15 us in torch's SDPA) 8x slower."""
    if torch.compiler.is_compiling() or not all(type(d) is int for shape in shapes for d in shape):
        return torch.broadcast_shapes(*shapes)  # traced once; sizes may be symbolic
    n = max(len(shape) for shape in shapes)
    out = [1] * n
    for shape in shapes:
        for i, d in enumerate(shape, n - len(shape)):
            if d != 1 and out[i] != d:
                if out[i] != 1:
                    raise RuntimeError(f"shapes {shapes} do not broadcast")
                out[i] = d
    return torch.Size(out)


def _additive(m, q):
    if m.dtype == torch.bool:
        return torch.where(m, torch.zeros((), dtype=q.dtype, device=q.device),
                           torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
    return m


def _mask_to(mask, dtype):
    """A float32 mask for another query dtype: exact for fp64; for fp16/bf16 values past the dtype's
    range saturate (torch adds them in fp32, so a row masked everywhere with finfo(float32).min
    still averages there) while -inf stays -inf."""
    if dtype != torch.float64:
        fi = torch.finfo(dtype)
        mask = torch.where(torch.isinf(mask), mask, mask.clamp(fi.min, fi.max))
    return mask.to(dtype)


def _canonical(q, k, v, attn_mask, enable_gqa):
    """Views (Bf, Hq, L, E), (Bf, Hk, S, E), (Bf, Hk, S, Ev), the mask as a 4-D additive tensor whose
    dims are 1 or full (or None), and the output's shape."""
    if q.dim() == 4 and k.dim() == 4 and v.dim() == 4:
        # (B, H, L, E) inputs with nothing to broadcast (what modules pass, one decoding step at a
        # time) are already canonical: the general path below costs ~15 us, twice torch's whole SDPA
        # call at such sizes. Anything unusual (broadcast, odd heads, a mask that needs checking)
        # takes the general path, which also raises the errors.
        Bq, Hq, L, _ = q.shape
        Bk, Hk, S, _ = k.shape
        Bv, Hv, _, Ev = v.shape
        if Bq == Bk == Bv and Hk == Hv and (Hq == Hk or (enable_gqa and Hk != 0 and Hq % Hk == 0)):
            out_shape = (Bq, Hq, L, Ev)
            if attn_mask is None:
                return q, k, v, None, out_shape
            ms = attn_mask.shape
            nd = len(ms)
            if nd <= 4 and all(d == 1 or d == f for d, f in zip(ms, (Bq, Hq, L, S)[4 - nd:])):
                m = _additive(attn_mask, q)
                return q, k, v, (m if nd == 4 else m.reshape((1,) * (4 - nd) + tuple(ms))), out_shape
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    q3, k3, v3 = (t if t.dim() >= 3 else t.unsqueeze(0) for t in (q, k, v))
    try:
        batch = _broadcast(q3.shape[:-3], k3.shape[:-3], v3.shape[:-3])
    except RuntimeError:
        raise InputError(f"the batch dims of query {tuple(q.shape)}, key {tuple(k.shape)} and value "
                         f"{tuple(v.shape)} do not broadcast") from None
    Hq, Hk, Hv = q3.shape[-3], k3.shape[-3], v3.shape[-3]
    if enable_gqa:
        if Hk == 0 or Hv == 0 or Hq % Hk or Hq % Hv:
            raise InputError(f"enable_gqa: query heads {Hq} must be a multiple of the key heads {Hk} and of the "
                             f"value heads {Hv}")
        if Hk != Hv:
            # torch repeats key and value to the query's heads separately: nothing left to share
            k3, v3 = k3.repeat_interleave(Hq // Hk, -3), v3.repeat_interleave(Hq // Hv, -3)
            Hk = Hq
    else:
        try:
            H = _broadcast((Hq,), (Hk,), (Hv,))[0]
        except RuntimeError:
            raise InputError(f"the head dims of query ({Hq}), key ({Hk}) and value ({Hv}) differ "
                             "(pass enable_gqa=True for grouped-query attention)") from None
        Hq = Hk = H
    Bf = math.prod(batch)
    qc = q3.expand(*batch, Hq, L, E).reshape(Bf, Hq, L, E)
    kc = k3.expand(*batch, Hk, S, E).reshape(Bf, Hk, S, E)
    vc = v3.expand(*batch, Hk, S, Ev).reshape(Bf, Hk, S, Ev)
    lead = _broadcast(q.shape[:-2], k.shape[:-2] if not enable_gqa else q.shape[:-2],
                                  v.shape[:-2] if not enable_gqa else q.shape[:-2])
    out_shape = (*lead, L, Ev)
    mask = None
    if attn_mask is not None:
        full = (*batch, Hq, L, S)
        try:
            _broadcast(attn_mask.shape, full)
            if len(attn_mask.shape) > len(full):
                raise RuntimeError
        except RuntimeError:
            raise InputError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(..., L, S) = {full}") from None
        m = _additive(attn_mask, q)
        m = m.reshape((1,) * (len(full) - m.dim()) + tuple(m.shape))
        if all(d == 1 for d in m.shape[:-3]):
            mask = m.reshape(1, *m.shape[-3:])
        else:
            mask = m.expand(*batch, *m.shape[-3:]).reshape(Bf, *m.shape[-3:])
    return qc, kc, vc, mask, out_shape


# ---------------------------------------------------------------------------
# reference (plain PyTorch from the equations)
# ---------------------------------------------------------------------------

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q, k, mask, is_causal, scale):
    """s (B, Hq, L, S) in the accumulation dtype, -inf where excluded; GQA by repeating k heads."""
    acc = _acc_dtype(q.dtype)
    G = q.shape[1] // max(k.shape[1], 1)
    kk = k.to(acc).repeat_interleave(G, dim=1) if G > 1 else k.to(acc)
    s = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(acc)
    if is_causal:
        L, S = s.shape[-2], s.shape[-1]
        allowed = torch.ones(L, S, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def _dropout_scale(shape, dropout_p, seed, device, dtype):
    """Z = keep / (1 - p) of shape (B, H, L, S), or None without dropout."""
    if dropout_p <= 0.0:
        return None
    Bf, H, L, S = shape
    if dropout_p >= 1.0:
        return torch.zeros(shape, dtype=dtype, device=device)
    keep = dropout_keep(seed, Bf * H, L, S, device) >= dropout_threshold(dropout_p)
    return keep.view(shape).to(dtype) / (1.0 - dropout_p)


def _softmax_lse(s):
    """P and lse of scores s; rows with no finite score give P = 0 and lse = -inf."""
    if s.shape[-1] == 0:  # no keys (S = 0): every row is fully masked
        # s * 0 (empty) keeps q and k in the graph: their gradient is zeros, as torch's, not None
        return s * 0, s.new_full(s.shape[:-1], float("-inf")).detach()
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    P = p / torch.where(l > 0, l, torch.ones_like(l))
    lse = (m + torch.log(l)).squeeze(-1)
    return P, lse


def sdpa_reference_canonical(q, k, v, mask, dropout_p, is_causal, scale, seed):
    """Canonical-form reference: returns (O in q's dtype, lse in the accumulation dtype)."""
    acc = _acc_dtype(q.dtype)
    s = _scores(q, k, mask, is_causal, scale)
    P, lse = _softmax_lse(s)
    Z = _dropout_scale(P.shape, dropout_p, seed, q.device, acc)
    if Z is not None:
        P = P * Z
    G = q.shape[1] // max(k.shape[1], 1)
    vv = v.to(acc).repeat_interleave(G, dim=1) if G > 1 else v.to(acc)
    return torch.matmul(P, vv).to(q.dtype), lse


def sdpa_reference_backward(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, need_dmask=False):
    """The backward from the equations, P recomputed from lse (what the fused kernels do), or from the
    scores alone with ``lse=None``: a summed lse m + log l loses log l once |m| dwarfs it (a row masked
    everywhere with finfo(float32).min: m ~ -3.4e38), which would make that row's P all ones."""
    acc = _acc_dtype(q.dtype)
    s = _scores(q, k, mask, is_causal, scale)
    if lse is None:
        P = _softmax_lse(s)[0]
    else:
        lse_ = lse.to(acc).unsqueeze(-1)
        P = torch.where(torch.isfinite(lse_), torch.exp(s - torch.where(torch.isfinite(lse_), lse_, 0)), 0)
    Bf, Hk = k.shape[0], k.shape[1]
    Hq = q.shape[1]
    G = Hq // max(Hk, 1)
    kk = k.to(acc).repeat_interleave(G, dim=1) if G > 1 else k.to(acc)
    vv = v.to(acc).repeat_interleave(G, dim=1) if G > 1 else v.to(acc)
    do = dout.to(acc)
    Z = _dropout_scale(P.shape, dropout_p, seed, q.device, acc)
    dP = torch.matmul(do, vv.transpose(-1, -2))
    Pd = P
    if Z is not None:
        dP = dP * Z
        Pd = P * Z
    Drow = (do * out.to(acc)).sum(-1, keepdim=True)
    dS = P * (dP - Drow)
    dq = torch.matmul(dS, kk) * scale
    dk = torch.matmul(dS.transpose(-1, -2), q.to(acc)) * scale
    dv = torch.matmul(Pd.transpose(-1, -2), do)
    if G > 1:
        dk = dk.view(Bf, Hk, G, *dk.shape[2:]).sum(2)
        dv = dv.view(Bf, Hk, G, *dv.shape[2:]).sum(2)
    dmask = None
    if need_dmask:
        dims = [d for d in range(4) if mask.shape[d] == 1 and dS.shape[d] != 1]
        dmask = (dS.sum(dims, keepdim=True) if dims else dS).to(mask.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


def _scale(scale, E) -> float:
    """torch's default 1/sqrt(E); with E = 0 every logit is an empty sum, 0 at any finite scale
    (1/sqrt(0) would make it 0 * inf = NaN)."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(E) if E > 0 else 1.0


def _draw_seed(dropout_p) -> int:
    if dropout_p <= 0.0:
        return 0
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


def scaled_dot_product_attention_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                           scale=None, enable_gqa=False, *, seed: Optional[int] = None) -> Tensor:
    """Plain PyTorch from the equations (differentiable in every argument, twice)."""
    _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    q, k, v, mask, out_shape = _canonical(query, key, value, attn_mask, enable_gqa)
    sc = _scale(scale, query.shape[-1])
    seed = _draw_seed(dropout_p) if seed is None else seed
    out, _ = sdpa_reference_canonical(q, k, v, mask, float(dropout_p), is_causal, sc, seed)
    return out.reshape(out_shape)


# ---------------------------------------------------------------------------
# backend kernels: forward -> (O, lse), backward -> (dq, dk, dv)
# ---------------------------------------------------------------------------

# cos/sin (None: no rotary) are fused into the loads of q and k by the cpu and triton kernels;
# scaled_dot_product_attention rotates beforehand for cuda and reference (the cuda binding refuses
# cos/sin; the reference wrappers rotate if the op is called with them directly)

def _rotate(q, k, cos, sin):
    from .rotary import _rotate_reference

    return _rotate_reference(q, cos, sin, False), _rotate_reference(k, cos, sin, False)


def _cpu_fwd(q, k, v, mask, dropout_p, is_causal, scale, seed, cos=None, sin=None):
    return torch.ops.seqkern_C.sdpa_forward(q, k, v, mask, dropout_p, is_causal, scale, seed, cos, sin)


def _cpu_bwd(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, cos=None, sin=None):
    return torch.ops.seqkern_C.sdpa_backward(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed,
                                             cos, sin)


def _triton_fwd(q, k, v, mask, dropout_p, is_causal, scale, seed, cos=None, sin=None):
    from seqkern.kernels import attention as K

    return K.attention_forward(q, k, v, mask, dropout_p, is_causal, scale, seed, cos, sin)


def _triton_bwd(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, cos=None, sin=None):
    from seqkern.kernels import attention as K

    return K.attention_backward(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, cos, sin)


def _ref_fwd(q, k, v, mask, dropout_p, is_causal, scale, seed, cos=None, sin=None):
    if cos is not None:
        q, k = _rotate(q, k, cos, sin)
    out, lse = sdpa_reference_canonical(q, k, v, mask, dropout_p, is_causal, scale, seed)
    return out.contiguous(), torch.stack((lse, torch.zeros_like(lse)), -1)


def _ref_bwd(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, cos=None, sin=None):
    lse = None  # P from the scores (see sdpa_reference_backward): the reference saves only the summed lse
    if cos is not None:
        from .rotary import _rotate_reference

        qr, kr = _rotate(q, k, cos, sin)
        dq, dk, dv, _ = sdpa_reference_backward(dout, qr, kr, v, mask, out, lse, dropout_p, is_causal, scale, seed)
        dq = _rotate_reference(dq, cos, sin, False, inverse=True)
        dk = _rotate_reference(dk, cos, sin, False, inverse=True)
    else:
        dq, dk, dv, _ = sdpa_reference_backward(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


_FWD = {"reference": _ref_fwd, "cpu": _cpu_fwd, "cuda": _cpu_fwd, "triton": _triton_fwd}
_BWD = {"reference": _ref_bwd, "cpu": _cpu_bwd, "cuda": _cpu_bwd, "triton": _triton_bwd}


@torch.library.custom_op("seqkern::sdpa_forward", mutates_args=())
def _sdpa_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                  scale: float, seed: int, backend: str, cos: Optional[Tensor] = None,
                  sin: Optional[Tensor] = None, auto: bool = False) -> Tuple[Tensor, Tensor]:
    # auto: the backend was chosen automatically (not named by the caller), which lets a
    # create_graph backward fall back to the reference's differentiable recomputation
    out, lse = _FWD[backend](q, k, v, mask, dropout_p, is_causal, scale, seed, cos, sin)
    return out, lse


@_sdpa_forward.register_fake
def _(q, k, v, mask, dropout_p, is_causal, scale, seed, backend, cos=None, sin=None, auto=False):
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], 2, dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("seqkern::sdpa_backward", mutates_args=())
def _sdpa_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor, lse: Tensor,
                   dropout_p: float, is_causal: bool, scale: float, seed: int, backend: str,
                   cos: Optional[Tensor] = None, sin: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _BWD[backend](dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, cos, sin)
    return dq, dk, dv


@_sdpa_backward.register_fake
def _(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, backend, cos=None, sin=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _plain_eager(*tensors) -> bool:
    """Whether calling a backend's function directly is exactly what the custom op would run: not
    traced (torch.compile, AOT/make_fx, fake tensors), no dispatch or function mode, no functorch
    transform, no tensor subclass. Eagerly the op's dispatcher and its autograd wrapper cost ~25 us
    a call (plus ~30-60 us in torch's fill_defaults with grad), several times the kernel itself on
    decoding-size inputs; under any of those conditions the op must be seen, so it is used."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    return all(t is None or type(t) is Tensor for t in tensors)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, is_causal, scale, seed, backend, cos, sin, auto = inputs
    out, lse = output
    ctx.args = (dropout_p, is_causal, scale, seed, backend)
    ctx.auto = auto
    ctx.save_for_backward(q, k, v, mask, out, lse, cos, sin)


def _reference_grads(need, dout, q, k, v, mask, cos, sin, dropout_p, is_causal, scale, seed):
    """Gradients of q, k, v, mask (those ``need`` asks for) by autograd of the reference recomputed
    from aliases of the inputs, kept in the graph: a create_graph backward (gradient penalties, MAML)
    differentiates them again, as torch's SDPA allows. The dropout mask is the forward's (same seed)."""
    def fn(q, k, v, mask):
        if cos is not None:
            q, k = _rotate(q, k, cos, sin)
        return sdpa_reference_canonical(q, k, v, mask, dropout_p, is_causal, scale, seed)[:1]

    return B.reference_grads(fn, (q, k, v, mask), need, (dout,))


def _backward(ctx, dout, dlse):
    q, k, v, mask, out, lse, cos, sin = ctx.saved_tensors
    dropout_p, is_causal, scale, seed, backend = ctx.args
    if backend != "reference" and ctx.auto and B.wants_graph():
        dout = torch.zeros_like(out) if dout is None else dout
        need = list(ctx.needs_input_grad[:4])
        return (*_reference_grads(need, dout, q, k, v, mask, cos, sin, dropout_p, is_causal, scale, seed),
                None, None, None, None, None, None, None, None)
    if backend != "reference":
        B.check_no_double_backward(OP, backend)
    if dout is None:
        dout = torch.zeros_like(out)
    dout = dout.contiguous()
    # with grad enabled (create_graph) the op keeps its own behaviour, whatever that is
    if not torch.is_grad_enabled() and _plain_eager(dout, q, k, v, mask, out, lse, cos, sin):
        dq, dk, dv = _BWD[backend](dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, cos, sin)
    else:
        dq, dk, dv = _sdpa_backward(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, backend,
                                    cos, sin)
    dmask = None
    if mask is not None and ctx.needs_input_grad[3]:
        # the fused kernels never form dS; the rare gradient w.r.t. an additive mask comes from the equations
        qr, kr = (q, k) if cos is None else _rotate(q, k, cos, sin)
        dmask = sdpa_reference_backward(dout, qr, kr, v, mask, out, None, dropout_p, is_causal, scale, seed,
                                        need_dmask=True)[3]
    # cos/sin are constants of the fused rotary (scaled_dot_product_attention takes the separate,
    # differentiable rotary pass when they require grad)
    return dq, dk, dv, dmask, None, None, None, None, None, None, None, None


_sdpa_forward.register_autograd(_backward, setup_context=_setup_context)


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    # torch's count for its SDPA kernels: the two batched matmuls, causal or not
    Bsz, Hq, L, E = q
    return 2 * Bsz * Hq * L * k[2] * (E + v[3])


def _sdpa_backward_flops(dout, q, k, v, *args, out_shape=None, **kwargs) -> int:
    # torch's count: the scores recomputed, then dP, dV, dQ and dK
    Bsz, Hq, L, E = q
    return 2 * Bsz * Hq * L * k[2] * (3 * E + 2 * v[3])


B.register_flops(torch.ops.seqkern.sdpa_forward, _sdpa_flops)
B.register_flops(torch.ops.seqkern.sdpa_backward, _sdpa_backward_flops)


class _EagerSdpa(torch.autograd.Function):
    """The autograd node register_autograd builds for the op, without the op's dispatch around it
    (see _plain_eager): same setup_context, same backward, same inputs."""

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, is_causal, scale, seed, backend, cos, sin, auto):
        out, lse = _FWD[backend](q, k, v, mask, dropout_p, is_causal, scale, seed, cos, sin)
        _setup_context(ctx, (q, k, v, mask, dropout_p, is_causal, scale, seed, backend, cos, sin, auto), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse)


# ---------------------------------------------------------------------------
# what each backend supports (called with the canonical tensors)
# ---------------------------------------------------------------------------

def _ext_has_op() -> Tuple[bool, str]:
    # checked once at import (selection must stay traceable): an extension built before the
    # attention kernels existed has no such op
    try:
        return (B.extension() is not None and hasattr(torch.ops.seqkern_C, "sdpa_forward")), \
            "seqkern._C has no sdpa_forward (rebuild the extension)"
    except Exception as e:  # noqa: BLE001
        return False, f"seqkern._C lookup failed: {e}"


_EXT_OP, _EXT_OP_REASON = _ext_has_op()


def _supports_cpu(q, k, v, mask, dropout_p=0.0, is_causal=False):
    if not _EXT_OP:
        return False, _EXT_OP_REASON
    why = B.reference_only((q, k, v, mask))
    if why:
        return False, why
    if q.device.type != "cpu":
        return False, f"inputs are on {q.device.type}, this backend runs on cpu"
    if q.dtype not in _CPU_DTYPES:
        return False, f"dtype {q.dtype} not supported (supports float32, float64)"
    return True, ""


# CUDA launch limits: gridDim.x at most 2^31-1 blocks (gridDim.y/z: 65535). All attention launches,
# the cuda ones (csrc/cuda/attention*.cu, which refuse more than kAttnMaxGridX = 2^31-1 blocks with an
# error) and the Triton ones (kernels/attention.py), have 1-D grids with batch x heads folded into x,
# so any B * heads works while the block count fits. The Triton kernels' offsets into the tensors are
# int64; their row indices within a sequence are int32 for lengths under 2^31 (int64 past it).
# supports() declines what does not fit, so automatic selection falls through (the cpu kernel has no grid).
_GRID_X_MAX = 2**31 - 1
_CUDA_ROWS_PER_BLOCK = 8  # kWarps of attention.cu: its SIMT grids are larger than the opt-in mma ones
_TRITON_MIN_ROWS = 16  # the smallest BLOCK_M / BLOCK_N / BLOCK_R kernels/attention.py launches with
_TRITON_MAX_ROWS = 128  # the largest BLOCK_M / BLOCK_N: a block's int32 row index reaches L - 1 + that
_TRITON_MAX_LEN = 2**31 - 1 - _TRITON_MAX_ROWS


def _grid_too_large(backend: str, q: Tensor, k: Tensor) -> str:
    """Why the launch grids of ``backend`` cannot cover these shapes ("" when they can)."""
    Bsz, Hq, L = q.shape[0], q.shape[1], q.shape[2]
    Hk, S = k.shape[1], k.shape[2]
    if backend == "cuda":
        r = _CUDA_ROWS_PER_BLOCK  # forward/dq: B*Hq*ceil(L/r); dk/dv: B*Hk*ceil(S/r); delta: ceil(B*Hq*L/r)
        blocks = max(Bsz * Hq * -(-L // r), Bsz * Hk * -(-S // r))
        if blocks > _GRID_X_MAX:
            return (f"B={Bsz}, heads {Hq}/{Hk}, L={L}, S={S} need {blocks} blocks, over the CUDA kernel's "
                    f"grid limit of 2^31-1")
        return ""
    if _TRITON_MAX_LEN < max(L, S) < 2**31:
        # (a length of 2^31 or more reaches the kernels as an int64 and makes the row indices int64)
        return (f"L={L}, S={S}: within {_TRITON_MAX_ROWS} of 2^31 the last block's int32 row indices of the "
                f"Triton kernels overflow")
    r = _TRITON_MIN_ROWS  # forward/dq: B*Hq*ceil(L/r); dk/dv: B*Hk*ceil(S/r); delta: ceil(B*Hq*L/r)
    blocks = max(Bsz * Hq * -(-L // r), Bsz * Hk * -(-S // r))
    if blocks > _GRID_X_MAX:
        return (f"B={Bsz}, heads {Hq}/{Hk}, L={L}, S={S} need {blocks} programs, over the Triton grid limit "
                f"of 2^31-1")
    return ""


def _supports_gpu(device_types, dtypes):
    backend = "triton" if "cpu" in device_types else "cuda"

    def supports(q, k, v, mask, dropout_p=0.0, is_causal=False):
        if q.device.type not in device_types:
            return False, f"inputs are on {q.device.type}, this backend runs on {'/'.join(device_types)}"
        if "cpu" not in device_types and not _EXT_OP:
            return False, _EXT_OP_REASON
        why = B.reference_only((q, k, v, mask))
        if why:
            return False, why
        if q.dtype not in dtypes:
            why = "" if torch.float64 in dtypes else "; its kernel accumulates in fp32"
            return False, f"dtype {q.dtype} not supported (supports {', '.join(str(d)[6:] for d in dtypes)}{why})"
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            return False, "bf16 is computed wrongly by the Triton interpreter"
        if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
            return False, f"head dim {max(q.shape[-1], v.shape[-1])} over the limit {MAX_HEAD_DIM}"
        why = _grid_too_large(backend, q, k)
        return (False, why) if why else (True, "")
    return supports


B.register(OP, "reference", lambda *a, **kw: (True, ""))
B.register(OP, "cpu", _supports_cpu)
B.register(OP, "triton", _supports_gpu(("cuda", "cpu"), _TRITON_DTYPES))
B.register(OP, "cuda", _supports_gpu(("cuda",), _CUDA_DTYPES))


_any_requires_grad = torch._C._any_requires_grad


def _sdpa_eager(q, k, v, dropout_p, is_causal, scale, enable_gqa, backend):
    """The output for the common eager call on the cpu kernel, or None when this call is not that one:
    the cpu backend chosen (explicitly or automatically), plain 4-D cpu tensors (B, H, L, E) of one
    fp32/fp64 dtype with equal batch and heads, no mask, no dropout, and B.eager_cpu (not traced, no
    mode, transform, forward AD or autocast). Validation, canonical form and backend selection together cost more than
    a decoding step's attention (~10 us against torch's whole ~9 us call); any other call, every bad
    input included, returns None and takes the general path, which names the argument at fault."""
    P = B.PLAIN_TENSORS
    if (not _EXT_OP or type(q) not in P or type(k) not in P or type(v) not in P
            or enable_gqa is not False or (is_causal is not False and is_causal is not True)
            or type(dropout_p) not in (float, int) or dropout_p != 0
            or (scale is not None and type(scale) not in (float, int))):
        return None
    dt = q.dtype
    if (dt not in _CPU_DTYPES or k.dtype is not dt or v.dtype is not dt or not q.is_cpu or not k.is_cpu
            or not v.is_cpu or q.is_nested or k.is_nested or v.is_nested or not B.eager_cpu(backend)):
        return None
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    Bq, Hq, _, E = qs
    if ks[0] != Bq or vs[0] != Bq or ks[1] != Hq or vs[1] != Hq or ks[3] != E or vs[2] != ks[2]:
        return None
    sc = _scale(scale, E)
    B._LAST[OP] = "cpu"
    if torch.is_grad_enabled() and _any_requires_grad(q, k, v):
        out = _EagerSdpa.apply(q, k, v, None, 0.0, is_causal, sc, 0, "cpu", None, None, B.is_auto(backend))[0]
    else:
        out = _cpu_fwd(q, k, v, None, 0.0, is_causal, sc, 0)[0]
    return out if q.is_contiguous() or not _flash_layout(q, k, v, None, 0.0, False) else _in_query_order(out, q)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, rotary: Optional[Tuple[Tensor, Tensor]] = None,
                                 backend: Optional[str] = None) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention on a seqkern backend (see the module docstring).

    ``rotary=(cos, sin)`` (tables from ``seqkern.functional.rotary_cos_sin``, one row per query/key
    position, so L == S; rotate-half layout, ``interleaved=False``) rotates query and key before
    attention, as ``apply_rotary`` does. The ``cpu`` and ``triton`` kernels rotate q and k as they load
    them and never write the rotated tensors; their backward rotates dq and dk back. cos/sin are
    constants there: when either requires grad, and on ``cuda`` and ``reference``, the separate
    (differentiable) rotary pass runs first instead.

    Under ``torch.autocast`` it follows torch's rule for SDPA: floating inputs are cast to the autocast
    dtype (CPU bf16, CUDA fp16/bf16); fp64 stays fp64.
    """
    if rotary is None and attn_mask is None:
        out = _sdpa_eager(query, key, value, dropout_p, is_causal, scale, enable_gqa, backend)
        if out is not None:
            return out
    dev = query.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        cast = lambda t: t.to(low) if t is not None and t.dtype in (torch.float32, torch.float16,  # noqa: E731
                                                                    torch.bfloat16) else t
        if query.dtype != torch.float64:
            query, key, value = cast(query), cast(key), cast(value)
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = cast(attn_mask)
    cos = sin = None
    if rotary is not None:
        from . import rotary as R

        if not (isinstance(rotary, (tuple, list)) and len(rotary) == 2):
            raise TypeError(f"rotary must be a (cos, sin) pair of tensors, got {type(rotary).__name__}")
        cos, sin = rotary
        R._validate(query, key, cos, sin, False)
    _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    q, k, v, mask, out_shape = _canonical(query, key, value, attn_mask, enable_gqa)
    sc = _scale(scale, query.shape[-1])
    dropout_p = float(dropout_p)
    name = B.select(OP, backend, q, k, v, mask, dropout_p, is_causal)
    if mask is not None and mask.dtype != q.dtype and name not in ("reference", "triton"):
        mask = _mask_to(mask, q.dtype)  # the C++ bindings take the mask in q's dtype
    if cos is not None:
        if name in ("cpu", "triton") and not (cos.requires_grad or sin.requires_grad):
            tab = q.dtype if name == "cpu" else _acc_dtype(q.dtype)  # as the reference rotates
            cos, sin = cos.to(tab).contiguous(), sin.to(tab).contiguous()
        else:  # the separate rotary pass (differentiable in cos/sin too), then plain attention
            from .rotary import apply_rotary

            query, key = apply_rotary(query, key, cos, sin, backend=backend)
            q, k, v, mask, out_shape = _canonical(query, key, value, attn_mask, enable_gqa)
            cos = sin = None
    seed = _draw_seed(dropout_p)
    if name == "reference":
        out, _ = sdpa_reference_canonical(q, k, v, mask, dropout_p, is_causal, sc, seed)
    else:
        if not _plain_eager(q, k, v, mask, cos, sin):
            out, _ = _sdpa_forward(q, k, v, mask, dropout_p, is_causal, sc, seed, name, cos, sin, B.is_auto(backend))
        elif torch.is_grad_enabled() and torch._C._any_requires_grad(q, k, v, mask, cos, sin):
            out, _ = _EagerSdpa.apply(q, k, v, mask, dropout_p, is_causal, sc, seed, name, cos, sin,
                                      B.is_auto(backend))
        else:
            out, _ = _FWD[name](q, k, v, mask, dropout_p, is_causal, sc, seed, cos, sin)
    out = out.reshape(out_shape)
    if query.dim() == 4 and not query.is_contiguous() and _flash_layout(query, key, value, attn_mask, dropout_p,
                                                                        enable_gqa):
        out = _in_query_order(out, query)
    return out


def _flash_layout(query, key, value, attn_mask, dropout_p, enable_gqa) -> bool:
    """Whether torch's CPU SDPA gives this call an output laid out like the query (see _in_query_order):
    its flash kernel runs for 4-D q, k, v of one batch size, heads equal (or grouped with enable_gqa),
    one head dim, last dims of stride 1, keys, no dropout and no 3-D or differentiable mask (measured,
    torch 2.13). Every other call runs its math kernel, whose output is contiguous."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or dropout_p != 0 or key.shape[2] == 0:
        return False
    if not (query.shape[3] == key.shape[3] == value.shape[3] and query.shape[0] == key.shape[0] == value.shape[0]
            and key.shape[1] == value.shape[1] and (query.shape[1] == key.shape[1] or enable_gqa)):
        return False
    if query.stride(3) != 1 or key.stride(3) != 1 or value.stride(3) != 1:
        return False
    return attn_mask is None or (attn_mask.dim() in (2, 4) and not attn_mask.requires_grad)


def _layout_order(t: Tensor):
    """t's dims from outermost to innermost in the dense layout ``torch.empty_like(t)`` gives it
    (at::infer_dense_strides: an insertion sort by stride, larger size first on equal strides, a
    stride 0 comparing with nothing, so broadcast dims keep their place in the row-major order)."""
    sizes, strides = t.shape, t.stride()
    perm = list(range(t.dim() - 1, -1, -1))  # innermost first

    def after(d0, d1):  # 1: d0 is outside d1, -1: inside, 0: no order between them
        s0, s1 = strides[d0], strides[d1]
        if s0 == 0 or s1 == 0:
            return 0
        if s0 != s1:
            return 1 if s0 > s1 else -1
        return 1 if sizes[d0] > sizes[d1] else 0

    for i in range(1, len(perm)):
        d1 = i
        for d0 in range(i - 1, -1, -1):
            c = after(perm[d0], perm[d1])
            if c > 0:
                perm[d0], perm[d1] = perm[d1], perm[d0]
                d1 = d0
            elif c < 0:
                break
    return perm[::-1]


def _in_query_order(out, query):
    """out (B, H, L, Ev) laid out in the 4-D query's memory order, as torch does when _flash_layout
    holds (its flash kernel's output is ``torch.empty_like(query)``): a (B, H, L, E) view of
    (B, L, H, E) projections gives (B, L, H, Ev) memory, and code may follow with
    o.transpose(1, 2).view(...). The copy here is the one that the caller's .contiguous() or reshape
    then skips."""
    order = _layout_order(query)
    if order != [0, 1, 2, 3]:
        out = out.permute(*order).contiguous().permute(*(order.index(d) for d in range(4)))
    return out
