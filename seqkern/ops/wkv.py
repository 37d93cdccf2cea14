"""RWKV-4 WKV recurrence (Peng et al. 2023) with state in and out.

    y, state = wkv4(time_decay, time_first, k, v, state=None, *, backend=None)

time_decay, time_first: (C,); k, v: (B, T, C); state: (B, 3, C) or None.
With w = exp(time_decay) (a per-channel decay rate) and u = time_first,

    y_t = (S_t + e^{u + k_t} v_t) / (Z_t + e^{u + k_t})
    S_t = sum_{i<t} e^{-(t-1-i) w + k_i} v_i  (+ e^{-t w} S_0),  Z_t likewise without v.

The state holds (S, Z) in the running-max form: state[:, 0] = aa, state[:, 1] = bb,
state[:, 2] = pp with S = aa e^{pp}, Z = bb e^{pp}, pp the largest exponent seen, so
nothing overflows for any finite k and any T. ``state=None`` is the empty sequence:
aa = bb = 0, pp = -1e38 (see :func:`wkv4_initial_state`). Feeding the returned state
into the next call continues the sequence: chunked calls equal one call.

The state is kept in the accumulation dtype: fp64 for fp64 inputs, fp32 otherwise
(fp16/bf16 k and v on GPU). y has the dtype of k.

Backward of the fused backends is a reverse sweep (see csrc/cpu/wkv.cpp): the adjoints of
S and Z are themselves kept in running-max form, and every exponential it takes has a
non-positive argument, so it cannot overflow either.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends as B

OP = "wkv4"
EMPTY_PP = -1e38  # "no terms yet": exp(EMPTY_PP - anything finite) == 0, and fits fp32
_CPU_DTYPES = (torch.float32, torch.float64)
_GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the state (and of all arithmetic) for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def wkv4_initial_state(batch: int, channels: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The state of the empty sequence, (batch, 3, channels): aa = bb = 0, pp = -1e38."""
    st = torch.zeros(batch, 3, channels, dtype=acc_dtype(dtype), device=device)
    st[:, 2] = EMPTY_PP
    return st


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

def _validate(time_decay, time_first, k, v, state):
    for name, t in (("time_decay", time_decay), ("time_first", time_first), ("k", k), ("v", v), ("state", state)):
        if name == "state" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if k.dim() != 3:
        raise ValueError(f"k must have shape (B, T, C), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    Bn, _, C = k.shape
    for name, t in (("time_decay", time_decay), ("time_first", time_first)):
        if t.shape != (C,):
            raise ValueError(f"{name} must have shape (C,) = ({C},) (C = k.size(2)), got {tuple(t.shape)}")
    if state is not None and state.shape != (Bn, 3, C):
        raise ValueError(f"state must have shape (B, 3, C) = ({Bn}, 3, {C}), got {tuple(state.shape)}")
    for name, t in (("v", v), ("time_decay", time_decay), ("time_first", time_first), ("state", state)):
        if t is not None and t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
    for name, t in (("v", v), ("time_decay", time_decay), ("time_first", time_first)):
        if t.dtype != k.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but k has dtype {k.dtype}")
    if state is not None and state.dtype not in (k.dtype, acc_dtype(k.dtype)):
        raise TypeError(f"state must have dtype {acc_dtype(k.dtype)} (the accumulation dtype of k's {k.dtype}), "
                        f"got {state.dtype}")


# ---------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------

def wkv4_reference(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor,
                   state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The recurrence one step at a time in plain PyTorch; differentiable in every argument."""
    acc = acc_dtype(k.dtype)
    Bn, T, C = k.shape
    neg_w = -torch.exp(time_decay.to(acc))
    u = time_first.to(acc)
    if state is None:
        state = wkv4_initial_state(Bn, C, dtype=k.dtype, device=k.device)
    aa, bb, pp = state.to(acc).unbind(1)
    kk, vv = k.to(acc), v.to(acc)
    ys = []
    for t in range(T):
        kt, vt = kk[:, t], vv[:, t]
        # output: past terms and the current token (bonus u), scaled by their largest exponent
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        # state: decay the past by one step, add the current token
        ww = pp + neg_w
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    # T = 0: an empty y still hangs off k and v, as the fused backends' does, so backward() works
    y = torch.stack(ys, 1) if T else (kk + vv)[:, :0]
    return y.to(k.dtype), torch.stack((aa, bb, pp), 1)


def _reference_forward(time_decay, time_first, k, v, state):
    with torch.no_grad():
        return wkv4_reference(time_decay, time_first, k, v, state)


def _reference_backward(time_decay, time_first, k, v, state, gy, gstate):
    """The reverse sweep of the fused kernels, in PyTorch (the C++/Triton/CUDA backwards mirror it).

    With A_t, B_t the true numerator and denominator before step t and D_t = B_t + e^{u+k_t}:
    alpha_t = dL/dA_t = gy_t / D_t + e^{-w} alpha_{t+1}, beta_t = -gy_t y_t / D_t + e^{-w} beta_{t+1}.
    (alpha, beta) are kept as (ga, gb) e^{gq} with gq the largest exponent, like the forward's state.
    The returned pp is max(pp_0 - T w, max_i k_i - (T-1-i) w): its gradient goes to the argmax.
    """
    acc = acc_dtype(k.dtype)
    T = k.shape[1]
    w = torch.exp(time_decay.to(acc))
    u = time_first.to(acc)
    kk, vv, gyy = k.to(acc), v.to(acc), gy.to(acc)
    st0 = state.to(acc)
    aa, bb, pp = st0.unbind(1)
    before = []
    for t in range(T):  # the forward again, keeping the state before each step
        before.append((aa, bb, pp))
        ww = pp - w
        p = torch.maximum(ww, kk[:, t])
        e1, e2 = torch.exp(ww - p), torch.exp(kk[:, t] - p)
        aa, bb, pp = e1 * aa + e2 * vv[:, t], e1 * bb + e2, p
    gaa, gbb, gpp = gstate.to(acc).unbind(1)
    # returned (aa, bb, pp) = (A e^{-pp}, B e^{-pp}, pp): split the gradient between A, B and pp
    ga, gb, gq = gaa, gbb, -pp
    gp = gpp - gaa * aa - gbb * bb
    gw = torch.zeros_like(aa)
    gu = torch.zeros_like(aa)
    gk, gv = torch.empty_like(kk), torch.empty_like(vv)
    for t in reversed(range(T)):
        a_t, b_t, p_t = before[t]
        kt, vt = kk[:, t], vv[:, t]
        ww = u + kt
        m = torch.maximum(p_t, ww)
        e1, e2 = torch.exp(p_t - m), torch.exp(ww - m)
        d = e1 * b_t + e2
        y = (e1 * a_t + e2 * vt) / d
        gyd = gyy[:, t] / d
        g_cur = gyd * e2 * (vt - y)  # through the current token's e^{u+k_t}
        gu = gu + g_cur
        f = torch.exp(kt + gq)  # e^{k_t} alpha_{t+1} = ga * f
        take_k = kt > p_t - w
        gk[:, t] = g_cur + f * (ga * vt + gb) + torch.where(take_k, gp, 0.0)
        gv[:, t] = gyd * e2 + f * ga
        gw = gw - torch.exp(gq + p_t - w) * (ga * a_t + gb * b_t) - torch.where(take_k, 0.0, gp)
        gp = torch.where(take_k, 0.0, gp)
        q = torch.maximum(gq - w, -m)
        s1, s2 = torch.exp(gq - w - q), torch.exp(-m - q)
        ga, gb, gq = s1 * ga + s2 * gyd, s1 * gb - s2 * gyd * y, q
    aa0, bb0, pp0 = st0.unbind(1)
    sc = torch.exp(gq + pp0)
    gstate0 = torch.stack((ga * sc, gb * sc, sc * (ga * aa0 + gb * bb0) + gp), 1)
    return ((gw.sum(0) * w).to(time_decay.dtype), gu.sum(0).to(time_first.dtype), gk.to(k.dtype), gv.to(v.dtype),
            gstate0.to(state.dtype))


# ---------------------------------------------------------------------------
# backend kernels
# ---------------------------------------------------------------------------

def _c_forward(time_decay, time_first, k, v, state):
    return torch.ops.seqkern_C.wkv4_forward(time_decay.contiguous(), time_first.contiguous(), k.contiguous(),
                                            v.contiguous(), state.contiguous())


def _c_backward(time_decay, time_first, k, v, state, gy, gstate):
    return torch.ops.seqkern_C.wkv4_backward(time_decay.contiguous(), time_first.contiguous(), k.contiguous(),
                                             v.contiguous(), state.contiguous(), gy.contiguous(), gstate.contiguous())


def _triton_forward(time_decay, time_first, k, v, state):
    from seqkern.kernels import wkv as K

    return K.wkv4_forward(time_decay, time_first, k, v, state)


def _triton_backward(time_decay, time_first, k, v, state, gy, gstate):
    from seqkern.kernels import wkv as K

    return K.wkv4_backward(time_decay, time_first, k, v, state, gy, gstate)


# cpu and cuda share the C++ schema: the dispatcher picks the kernel by device
_FWD = {"reference": _reference_forward, "cpu": _c_forward, "cuda": _c_forward, "triton": _triton_forward}
_BWD = {"reference": _reference_backward, "cpu": _c_backward, "cuda": _c_backward, "triton": _triton_backward}


@torch.library.custom_op("seqkern::wkv4", mutates_args=())
def _wkv4_op(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state: Tensor,
             backend: str, auto: bool = False) -> Tuple[Tensor, Tensor]:
    # auto: the backend was chosen automatically (not named by the caller), which lets a
    # create_graph backward fall back to the reference's differentiable recomputation
    y, st = _FWD[backend](time_decay, time_first, k, v, state)
    return y, st


@_wkv4_op.register_fake
def _(time_decay, time_first, k, v, state, backend, auto=False):
    return (torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(state, memory_format=torch.contiguous_format))


@torch.library.custom_op("seqkern::wkv4_backward", mutates_args=())
def _wkv4_backward_op(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state: Tensor, gy: Tensor,
                      gstate: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gw, gu, gk, gv, gs = _BWD[backend](time_decay, time_first, k, v, state, gy, gstate)
    return gw, gu, gk, gv, gs


@_wkv4_backward_op.register_fake
def _(time_decay, time_first, k, v, state, gy, gstate, backend):
    e = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return e(time_decay), e(time_first), e(k), e(v), e(state)


def _setup_context(ctx, inputs, output):
    time_decay, time_first, k, v, state, backend, auto = inputs
    ctx.backend, ctx.auto = backend, auto
    ctx.save_for_backward(time_decay, time_first, k, v, state)


def _backward(ctx, gy, gstate):
    time_decay, time_first, k, v, state = ctx.saved_tensors
    gy = torch.zeros_like(k) if gy is None else gy
    gstate = torch.zeros_like(state) if gstate is None else gstate
    if ctx.backend != "reference":
        if ctx.auto and B.wants_graph():  # torch-style double backward with the automatic backend
            return (*B.reference_grads(wkv4_reference, ctx.saved_tensors, ctx.needs_input_grad[:5], (gy, gstate)),
                    None, None)
        B.check_no_double_backward(OP, ctx.backend)
    gw, gu, gk, gv, gs = _wkv4_backward_op(time_decay, time_first, k, v, state, gy, gstate, ctx.backend)
    return gw, gu, gk, gv, gs, None, None


_wkv4_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# what each backend supports
# ---------------------------------------------------------------------------

def _supports(dtypes, device_type):
    def supports(time_decay, time_first, k, v, state=None):
        if k.device.type != device_type:
            return False, f"inputs are on {k.device.type}, this backend runs on {device_type}"
        why = B.reference_only((time_decay, time_first, k, v, state))
        if why:
            return False, why
        return B.same_device_and_dtype((time_decay, time_first, k, v), dtypes)
    return supports


# kernels/wkv.py launches one program per (batch row, block of at most 64 channels) on a 1-D grid
_TRITON_WKV_BLOCK, _GRID_X_MAX = 64, 2**31 - 1


def _triton_supports(time_decay, time_first, k, v, state=None):
    ok, reason = B.same_device_and_dtype((time_decay, time_first, k, v), _GPU_DTYPES)
    if not ok:
        return ok, reason
    why = B.reference_only((time_decay, time_first, k, v, state))
    if why:
        return False, why
    if k.device.type == "cpu" and k.dtype == torch.bfloat16:
        return False, "bf16 is computed wrongly by the Triton interpreter"
    Bn, C = k.shape[0], k.shape[-1]
    programs = Bn * -(-C // _TRITON_WKV_BLOCK)
    if programs > _GRID_X_MAX:
        return False, f"B={Bn}, C={C} need {programs} programs, over the Triton grid limit of 2^31-1"
    return True, ""


B.register(OP, "reference", lambda *a, **kw: (True, ""))
B.register(OP, "cpu", _supports(_CPU_DTYPES, "cpu"))
B.register(OP, "cuda", _supports(_GPU_DTYPES, "cuda"))
B.register(OP, "triton", _triton_supports)


def wkv4(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state: Optional[Tensor] = None, *,
         backend: str | None = None) -> Tuple[Tensor, Tensor]:
    """RWKV-4 WKV over a whole sequence (see the module docstring). Returns (y, state)."""
    _validate(time_decay, time_first, k, v, state)
    name = B.select(OP, backend, time_decay, time_first, k, v, state)
    if name == "reference":
        return wkv4_reference(time_decay, time_first, k, v, state)
    acc = acc_dtype(k.dtype)
    if state is None:
        state = wkv4_initial_state(k.shape[0], k.shape[2], dtype=k.dtype, device=k.device)
    return _wkv4_op(time_decay, time_first, k, v, state.to(acc), name, B.is_auto(backend))
