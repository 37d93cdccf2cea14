"""Recurrent layers and cells: vanilla RNN (tanh / relu), LSTM (optional projection) and GRU.

    y, (h_T, c_T) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr=None, *, lengths=None, reverse=False, backend=None)
    y, h_T        = gru(x, h0, w_ih, w_hh, b_ih, b_hh, *, lengths=None, reverse=False, backend=None)
    y, h_T        = rnn(x, h0, w_ih, w_hh, b_ih, b_hh, *, nonlinearity="tanh", lengths=None, reverse=False, backend=None)
    h, c = lstm_cell(x, (h, c), ...);  h = gru_cell(x, h, ...);  h = rnn_cell(x, h, ..., nonlinearity="tanh")

One layer, one direction, the whole sequence per call. x: (T, B, I). Weights as in
``torch.nn`` (gates in PyTorch's order: LSTM i,f,g,o; GRU r,z,n with ``b_hn`` inside
``r * (W_hn h + b_hn)``); biases may be None. LSTM with ``w_hr`` (P, H) projects the
hidden state, ``h = (o * tanh(c)) @ w_hr^T``, so h0, h_T and y have P features and c has H.

``h0`` / ``hx`` None (or ``(None, None)``, or one of the pair None) means zeros, as in
``torch.nn``. ``lengths`` (B,) integers (a tensor of any integer dtype on the CPU or x's
device, or a list/tuple of ints, as torch's pack_padded_sequence takes): steps at or past a sequence's length leave its
state unchanged and give output 0; ``reverse=True`` runs each sequence backwards within
its own length (what a PackedSequence's backward direction needs). Lengths of 0 are
allowed (the state passes through, every output is 0).

Cells take (B, I) or unbatched (I,) inputs, like torch's cells.

Every step ``s`` of the loop handles, for batch row b, time index
``t(s, b) = L_b - 1 - s`` when reversed and ``s < L_b``, else ``s``. That map is a
permutation of 0..T-1 and its own inverse, and the steps with ``s < L_b`` (the active
ones) are exactly the time indices ``t < L_b``: every backend uses it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends as B

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_CPU_DTYPES = (torch.float32, torch.float64)
_GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEQ_OPS = ("lstm", "gru", "rnn")
CELL_OPS = ("lstm_cell", "gru_cell", "rnn_cell")


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

def _check_tensor(name, t, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")


def _validate(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
    """Checks everything a kernel relies on; returns (T, B, I, H, P)."""
    G = _GATES[mode]
    _check_tensor("x", x)
    _check_tensor("w_ih", w_ih)
    _check_tensor("w_hh", w_hh)
    for name, t in (("b_ih", b_ih), ("b_hh", b_hh), ("w_hr", w_hr), ("h0", h0), ("c0", c0)):
        _check_tensor(name, t, optional=True)
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (T, B, I), got {tuple(x.shape)}")
    T, Bsz, I = x.shape
    if w_hh.dim() != 2 or w_hh.shape[0] % G or w_hh.shape[0] == 0:
        raise ValueError(f"w_hh must have shape ({G}*H, H or proj_size), got {tuple(w_hh.shape)}")
    H = w_hh.shape[0] // G
    if w_hr is not None:
        if mode != "lstm":
            raise ValueError("w_hr (projection) is only defined for lstm")
        if w_hr.dim() != 2 or w_hr.shape[1] != H or not 0 < w_hr.shape[0] < H:
            raise ValueError(f"w_hr must have shape (proj_size, H={H}) with 0 < proj_size < H, got {tuple(w_hr.shape)}")
    P = w_hr.shape[0] if w_hr is not None else H
    if tuple(w_hh.shape) != (G * H, P):
        raise ValueError(f"w_hh must have shape ({G * H}, {P}), got {tuple(w_hh.shape)}")
    if tuple(w_ih.shape) != (G * H, I):
        raise ValueError(f"w_ih must have shape ({G * H}, I={I}) (x.size(2) = I), got {tuple(w_ih.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and tuple(b.shape) != (G * H,):
            raise ValueError(f"{name} must have shape ({G * H},), got {tuple(b.shape)}")
    if h0 is not None and tuple(h0.shape) != (Bsz, P):
        raise ValueError(f"h0 must have shape (B, {'proj_size' if w_hr is not None else 'H'}) = {(Bsz, P)}, "
                         f"got {tuple(h0.shape)}")
    if c0 is not None and tuple(c0.shape) != (Bsz, H):
        raise ValueError(f"c0 must have shape (B, H) = {(Bsz, H)}, got {tuple(c0.shape)}")
    for name, t in (("h0", h0), ("c0", c0), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh),
                    ("w_hr", w_hr)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths must be a Tensor of integers or a list/tuple of ints, "
                            f"got {type(lengths).__name__}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
        if tuple(lengths.shape) != (Bsz,):
            raise ValueError(f"lengths must have shape (B,) = ({Bsz},), got {tuple(lengths.shape)}")
        if lengths.device.type != "cpu" and lengths.device != x.device:
            raise ValueError(f"lengths is on {lengths.device}; expected the CPU or x's device {x.device}")
        if not torch.compiler.is_compiling() and Bsz and bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"lengths must lie in [0, T={T}], got {lengths.tolist()}")
    return T, Bsz, I, H, P


# ---------------------------------------------------------------------------
# reference (plain PyTorch, from the equations)
# ---------------------------------------------------------------------------

def step_order(T: int, lengths: Optional[Tensor], reverse: bool, device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(tidx, active): tidx (T, B) time index of step s for row b (None: the identity),
    active (T, B) whether step s of row b is inside its sequence (None: all are)."""
    s = torch.arange(T, device=device)[:, None]
    if lengths is None:
        return ((T - 1 - s) if reverse else None), None
    L = lengths.to(device=device, dtype=torch.int64)[None, :]
    active = s < L
    tidx = torch.where(active, L - 1 - s, s) if reverse else None
    return tidx, active


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear(x, w, b):
    y = x @ w.t()
    return y if b is None else y + b


def reference(mode: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
              reverse: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Whole sequence by the textbook equations, one step at a time; differentiable in every tensor.

    h0 (and c0 for lstm) must be tensors here. Returns (y, h_T, c_T) with c_T None unless lstm.
    """
    out_dtype = x.dtype
    acc = _acc_dtype(x.dtype)
    cv = lambda t: None if t is None else t.to(acc)  # noqa: E731
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = map(cv, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    T, Bsz, I = x.shape
    tidx, active = step_order(T, lengths, reverse, x.device)
    xs = x if tidx is None else x.gather(0, tidx[..., None].expand(T, Bsz, I))
    gi_all = _linear(xs, w_ih, b_ih)  # the input half of every gate, all steps at once
    h, c = h0, c0
    outs = []
    for s in range(T):
        gi, h_in, c_in = gi_all[s], h, c
        if active is not None:
            # rows past their end compute from zeros: the result is discarded, and a NaN in the
            # state or in the padding must not leak into gradients through 0 * NaN
            m = active[s, :, None]
            gi, h_in = torch.where(m, gi, 0.0), torch.where(m, h, 0.0)
            c_in = None if c is None else torch.where(m, c, 0.0)
        gh = _linear(h_in, w_hh, b_hh)
        c_new = None
        if mode == "lstm":
            i, f, g, o = (gi + gh).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c_in + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_hr is not None:
                h_new = h_new @ w_hr.t()
        elif mode == "gru":
            ir, iz, in_ = gi.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            h_new = (1 - z) * n + z * h_in
        elif mode == "rnn_tanh":
            h_new = torch.tanh(gi + gh)
        else:
            h_new = torch.relu(gi + gh)
        if active is None:
            out = h_new
        else:
            m = active[s, :, None]
            h_new = torch.where(m, h_new, h)
            if c_new is not None:
                c_new = torch.where(m, c_new, c)
            out = torch.where(m, h_new, torch.zeros_like(h_new))
        outs.append(out)
        h, c = h_new, c_new
    if outs:
        y = torch.stack(outs)
    else:
        # no step: the outputs still hang off every input (through sums over empty tensors,
        # exactly 0), so they require grad exactly when the fused backends' outputs do
        tie = gi_all.sum() + _linear(h0[:0], w_hh, b_hh).sum()
        if w_hr is not None:
            tie = tie + (h0.new_zeros(0, w_hr.shape[1]) @ w_hr.t()).sum()
        y = x.new_zeros(0, Bsz, h0.shape[1]) + tie
        h = h0 + tie
        c = None if c is None else c + tie
    if tidx is not None:
        y = y.gather(0, tidx[..., None].expand_as(y))  # the step -> time map is its own inverse
    back = lambda t: None if t is None else t.to(out_dtype)  # noqa: E731
    return back(y), back(h), back(c)


# ---------------------------------------------------------------------------
# registered ops: forward and backward, dispatched to a backend inside
# ---------------------------------------------------------------------------

def workspace_numel(mode: str, T: int, Bsz: int, H: int, P: int, save: bool) -> int:
    """Size of the flat buffer a fused forward keeps for its backward (0 when not saving).

    Layout, every block in step (processing) order, shared by the cpu, triton and cuda kernels:
      lstm: gates (T,B,4H) after activation, c (T+1,B,H), h (T+1,B,P), o*tanh(c) (T,B,H) if P < H
      gru:  gates (T,B,3H) after activation, W_hn h + b_hn (T,B,H), h (T+1,B,H)
      rnn:  h (T+1,B,H)
    """
    if not save:
        return 0
    if mode == "lstm":
        return T * Bsz * 4 * H + (T + 1) * Bsz * H + (T + 1) * Bsz * P + (T * Bsz * H if P < H else 0)
    if mode == "gru":
        return T * Bsz * 4 * H + (T + 1) * Bsz * H
    return (T + 1) * Bsz * H


def _reference_fwd(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save):
    y, h, c = reference(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    c = x.new_empty(0) if c is None else c
    # the op's outputs must be fresh tensors (T == 0 passes the initial state through)
    return y, h.clone() if h is h0 else h, c.clone() if c is c0 else c, x.new_empty(0)


def _reference_grads(mode, dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, need,
                     create_graph=False):
    """Backward of the reference = autograd of the reference loop, recomputed. Runs in the op's
    autograd formula (not inside an op: below the autograd key nothing would be recorded).
    With ``create_graph`` the recomputation hangs off the inputs themselves (not detached
    copies), so the gradients it returns can be differentiated again."""
    def fn(*leaves):
        return reference(mode, *leaves, lengths, reverse)

    return B.reference_grads(fn, [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr], need, (dy, dh, dc), create_graph)


def _cpu_fwd(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save):
    return torch.ops.seqkern_C.rnn_forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save)


def _cpu_bwd(mode, dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, ws, need):
    return torch.ops.seqkern_C.rnn_backward(mode, dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                            reverse, ws, need)


def _triton_fwd(*args):
    from seqkern.kernels import rnn as K

    return K.rnn_forward(*args)


def _triton_bwd(*args):
    from seqkern.kernels import rnn as K

    return K.rnn_backward(*args)


_FWD = {"reference": _reference_fwd, "cpu": _cpu_fwd, "cuda": _cpu_fwd, "triton": _triton_fwd}
_BWD = {"cpu": _cpu_bwd, "cuda": _cpu_bwd, "triton": _triton_bwd}  # the reference differentiates its loop


@torch.library.custom_op("seqkern::rnn_forward", mutates_args=())
def _fwd_op(mode: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
            b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
            reverse: bool, save: bool, backend: str, auto: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # auto: the backend was chosen automatically (not named by the caller), which lets a
    # create_graph backward fall back to the reference's differentiable recomputation
    y, h, c, ws = _FWD[backend](mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save)
    return y, h, c, ws


@_fwd_op.register_fake
def _(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, backend, auto=False):
    T, Bsz = x.shape[0], x.shape[1]
    H = w_hh.shape[0] // _GATES[mode]
    P = h0.shape[1]
    n = 0 if backend == "reference" else workspace_numel(mode, T, Bsz, H, P, save)
    c = x.new_empty(Bsz, H) if mode == "lstm" else x.new_empty(0)
    return x.new_empty(T, Bsz, P), x.new_empty(Bsz, P), c, x.new_empty(n)


@torch.library.custom_op("seqkern::rnn_backward", mutates_args=())
def _bwd_op(mode: str, dy: Tensor, dh: Tensor, dc: Optional[Tensor], x: Tensor, h0: Tensor, c0: Optional[Tensor],
            w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor],
            lengths: Optional[Tensor], reverse: bool, ws: Tensor, need: List[bool],
            backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _BWD[backend](mode, dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, ws, need)
    return tuple(out)


@_bwd_op.register_fake
def _(mode, dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, ws, need, backend):
    ins = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    # the kernels return contiguous gradients whatever the inputs' strides (e.g. batch_first x)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if (n and t is not None)
                 else x.new_empty(0) for t, n in zip(ins, need))


def _setup_context(ctx, inputs, output):
    mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, backend, auto = inputs
    y, _, _, ws = output
    ctx.mode, ctx.reverse, ctx.backend, ctx.save, ctx.auto = mode, reverse, backend, save, auto
    # the workspace is no output to differentiate: without this autograd materialises a zero
    # gradient the size of every saved activation (tens of MiB filled per backward)
    ctx.set_materialize_grads(False)
    # y itself is not saved: no backward reads it (the workspace holds every step's state), and
    # saving it would make an in-place op on the layer's output (F.relu(y, inplace=True), an
    # in-place dropout) fail the backward's version check, where torch.nn's RNNs allow it
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, ws)


def _backward(ctx, dy, dh, dc, dws):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, ws = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[1:9]]
    if ctx.backend == "reference":
        grads = _reference_grads(ctx.mode, dy, dh, dc if ctx.mode == "lstm" else None, x, h0, c0, w_ih, w_hh, b_ih,
                                 b_hh, w_hr, lengths, ctx.reverse, need)
        return (None, *grads, None, None, None, None, None, None)
    if ctx.auto and _wants_graph():
        # create_graph (gradient penalties, MAML): torch.nn's RNNs differentiate twice, and an
        # automatically chosen backend must not turn that into an error: the gradients come
        # from the reference's recomputation, kept in the graph
        grads = _reference_grads(ctx.mode, dy, dh, dc if ctx.mode == "lstm" else None, x, h0, c0, w_ih, w_hh,
                                 b_ih, b_hh, w_hr, lengths, ctx.reverse, need, create_graph=True)
        return (None, *grads, None, None, None, None, None, None)
    if not ctx.save:
        raise RuntimeError("seqkern rnn: the forward ran without saving activations (no input required grad "
                           "or grad mode was off), so it cannot be differentiated")
    B.check_no_double_backward(f"seqkern {ctx.mode}", ctx.backend)
    dy = x.new_zeros(x.shape[0], x.shape[1], h0.shape[1]) if dy is None else dy.contiguous()
    dh = torch.zeros_like(h0) if dh is None else dh.contiguous()
    if ctx.mode == "lstm":
        dc = torch.zeros_like(c0) if dc is None else dc.contiguous()
    else:
        dc = None
    grads = _bwd_op(ctx.mode, dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, ctx.reverse, ws, need,
                    ctx.backend)
    res = [g if n else None for g, n in zip(grads, need)]
    return (None, *res, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _rnn_flops(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *args, out_shape=None, **kwargs) -> int:
    # the gate GEMMs of every step (input and recurrent) and the projection, as torch counts the
    # linear layers of its own step loop
    T, Bsz, I = x
    GH, P = w_hh
    return 2 * T * Bsz * GH * (I + P) + (2 * T * Bsz * w_hr[0] * w_hr[1] if w_hr is not None else 0)


def _rnn_backward_flops(mode, dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *args, out_shape=None,
                        **kwargs) -> int:
    return 2 * _rnn_flops(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)  # input and weight gradients


B.register_flops(torch.ops.seqkern.rnn_forward, _rnn_flops)
B.register_flops(torch.ops.seqkern.rnn_backward, _rnn_backward_flops)


_wants_graph = B.wants_graph


_reference_only = B.reference_only  # torch.func / forward-mode AD: see there


# ---------------------------------------------------------------------------
# what each backend supports
# ---------------------------------------------------------------------------

def _supports(dtypes, device_type):
    def supports(*tensors):
        why = _reference_only(tensors)
        if why:
            return False, why
        x = tensors[0]
        if x.device.type != device_type:
            return False, f"inputs are on {x.device.type}, this backend runs on {device_type}"
        return B.same_device_and_dtype(tensors, dtypes)
    return supports


# kernels/rnn.py: 1-D grids, batch rows and offsets in int64; a gate's column index (up to G * H plus
# a block) is int32. Its grids' program counts, about B * H / 2048, cannot reach 2^31 with the gate
# buffers of a step, B * G * H elements, in memory.
_TRITON_MAX_GATE_ROWS = 2**31 - 1 - 128  # 128: the widest column block


def _triton_supports(*tensors):
    why = _reference_only(tensors)
    if why:
        return False, why
    ok, reason = B.same_device_and_dtype(tensors, _GPU_DTYPES)
    if ok and tensors[0].device.type == "cpu" and tensors[0].dtype == torch.bfloat16:
        return False, "bf16 is computed wrongly by the Triton interpreter"
    w_hh = tensors[4] if len(tensors) > 4 else None  # (x, h0, c0, w_ih, w_hh, ...); a probe may pass fewer
    if ok and w_hh is not None and w_hh.shape[0] > _TRITON_MAX_GATE_ROWS:
        return False, (f"w_hh has {w_hh.shape[0]} gate rows (gates x hidden size): over "
                       f"{_TRITON_MAX_GATE_ROWS}, the Triton kernels' int32 column indices overflow")
    return ok, reason


def _has_cpu_kernels():
    # an extension built before the rnn kernels existed must not claim them
    return B.extension() is not None and hasattr(torch.ops.seqkern_C, "rnn_forward")


def _register_backends():
    for op in SEQ_OPS + CELL_OPS:
        B.register(op, "reference", lambda *a, **kw: (True, ""))
        if _has_cpu_kernels():
            B.register(op, "cpu", _supports(_CPU_DTYPES, "cpu"))
            B.register(op, "cuda", _supports(_GPU_DTYPES, "cuda"))
        B.register(op, "triton", _triton_supports)


_register_backends()
_CPU_REGISTERED = _has_cpu_kernels()


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def _lengths_tensor(lengths):
    """A list/tuple of ints (what torch's pack_padded_sequence takes) as a tensor; the rest of
    lengths' checks are _validate's."""
    if not isinstance(lengths, (list, tuple)):
        return lengths
    if not lengths:
        return torch.zeros(0, dtype=torch.int64)
    try:
        return torch.tensor(lengths)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"lengths must be a Tensor of integers or a list/tuple of ints, got {lengths!r} ({e})") \
            from None


def _run(op, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, backend):
    lengths = _lengths_tensor(lengths)
    T, Bsz, I, H, P = _validate(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    name = B.select(op, backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if h0 is None:
        h0 = x.new_zeros(Bsz, P)
    if mode == "lstm" and c0 is None:
        c0 = x.new_zeros(Bsz, H)
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int64).contiguous()
    if name == "reference":
        return reference(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    save = _save_activations(tensors)
    auto = _is_auto(backend)
    if (name == "cpu" and op in CELL_OPS and _rnn_cell_C is not None and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not B._dispatch_depth()):
        # a cell (one step) in eager mode: the registered op's Python layers (custom_op
        # dispatch, its autograd wrapper) cost more than the step's kernel at small batch. Not
        # under a dispatch mode (FakeTensorMode): the C++ op has no fake kernel, the registered one has
        if save:
            out = _rnn_cell_C(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, auto)
            h, c = out if mode == "lstm" else (out[0], None)
        else:
            _, h, c, _ = torch.ops.seqkern_C.rnn_forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, False,
                                                         False)
        return None, h, (c if mode == "lstm" else None)
    y, h, c, _ = _fwd_op(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, name, auto)
    return y, h, (c if mode == "lstm" else None)


_is_auto = B.is_auto  # whether B.select chose the backend itself (no argument, no SEQKERN_BACKEND)


def _save_activations(tensors) -> bool:
    needs = any(t is not None and t.requires_grad for t in tensors)
    if torch.jit.is_tracing():
        # the flag becomes a constant of the traced graph, and torch.jit.trace checks its
        # trace by rerunning it under no_grad: it must not depend on the grad mode there
        return needs
    return needs and torch.is_grad_enabled()


_rnn_forward_C = torch.ops.seqkern_C.rnn_forward if _CPU_REGISTERED else None
# one step with its autograd node in C++ (eager only: torch.compile traces the registered op);
# None with an extension built before it existed, which then takes the general path
_rnn_cell_C = getattr(torch.ops.seqkern_C, "rnn_cell", None) if _CPU_REGISTERED else None


def _split_hx(hx, name="hx"):
    if hx is None:
        return None, None
    if isinstance(hx, torch.Tensor) or not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"{name} must be a pair (h, c) of tensors or None, got {type(hx).__name__}")
    return hx[0], hx[1]


def _rnn_mode(nonlinearity):
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return "rnn_" + nonlinearity


def lstm(x: Tensor, hx, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
         w_hr: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None, reverse: bool = False,
         backend: Optional[str] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One LSTM layer in one direction over x (T, B, I); hx = (h0, c0) or None (zeros)."""
    h0, c0 = _split_hx(hx)
    y, h, c = _run("lstm", "lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, backend)
    return y, (h, c)


def gru(x: Tensor, h0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
        b_hh: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None, reverse: bool = False,
        backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One GRU layer in one direction over x (T, B, I); h0 None means zeros."""
    y, h, _ = _run("gru", "gru", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse, backend)
    return y, h


def rnn(x: Tensor, h0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
        b_hh: Optional[Tensor] = None, *, nonlinearity: str = "tanh", lengths: Optional[Tensor] = None,
        reverse: bool = False, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One Elman RNN layer (tanh or relu) in one direction over x (T, B, I); h0 None means zeros."""
    mode = _rnn_mode(nonlinearity)
    y, h, _ = _run("rnn", mode, x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, reverse, backend)
    return y, h


def _cell_input(x, name="x"):
    _check_tensor(name, x)
    if x.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape (B, I) or (I,), got {tuple(x.shape)}")
    return x.dim() == 1


def _cell_state(t, name, unbatched):
    if t is None:
        return None
    _check_tensor(name, t)
    want = 1 if unbatched else 2
    if t.dim() != want:
        raise ValueError(f"{name} must have {want} dimension(s) like x ({'unbatched' if unbatched else 'batched'}), "
                         f"got shape {tuple(t.shape)}")
    return t.unsqueeze(0) if unbatched else t


_RNN_MODES = {"tanh": "rnn_tanh", "relu": "rnn_relu"}
_CELL_OP = {"lstm": "lstm_cell", "gru": "gru_cell", "rnn_tanh": "rnn_cell", "rnn_relu": "rnn_cell"}
_FAST_OK = B._EXT is not None and _CPU_REGISTERED and _rnn_cell_C is not None
_any_requires_grad = torch._C._any_requires_grad


def cell_eager(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, backend):
    """One step on the cpu kernels for the common eager call, or None when this call is not that
    one: the cpu backend chosen (explicitly or automatically), plain cpu tensors of one fp32/fp64
    dtype with consistent shapes (x (B, I) or (I,), h and c like x or None), and B.eager_cpu (not
    traced, no mode, transform, forward AD or autocast). Then the general checks and backend
    selection, which cost more than the step at small batch, are skipped. Anything else, every bad
    input included, returns None and goes the general way, which names the argument at fault.
    Returns (h', c') (c' None unless lstm), unbatched when x is."""
    P = B.PLAIN_TENSORS
    if not _FAST_OK or type(x) not in P or type(w_ih) not in P or type(w_hh) not in P:
        return None
    dt = x.dtype
    if (dt not in _CPU_DTYPES or not x.is_cpu or w_ih.dtype is not dt or w_hh.dtype is not dt or not w_ih.is_cpu
            or not w_hh.is_cpu or not B.eager_cpu(backend)):
        return None
    xs, ws = x.shape, w_hh.shape
    if len(ws) != 2 or w_ih.dim() != 2:
        return None
    GH, H = ws
    nd = len(xs)
    if nd == 2:
        Bsz, I = xs
        sshape = (Bsz, H)
    elif nd == 1:
        Bsz, I = 1, xs[0]
        sshape = (H,)
    else:
        return None
    if GH != _GATES[mode] * H or H == 0 or w_ih.shape != (GH, I):
        return None
    lstm = mode == "lstm"
    for t, shape in ((b_ih, (GH,)), (b_hh, (GH,)), (h, sshape), (c, sshape)):
        if t is not None and not (type(t) in P and t.dtype is dt and t.is_cpu and t.shape == shape):
            return None
    h = x.new_zeros(Bsz, H) if h is None else (h if nd == 2 else h[None])
    if lstm:
        c = x.new_zeros(Bsz, H) if c is None else (c if nd == 2 else c[None])
    B._LAST[_CELL_OP[mode]] = "cpu"
    if torch.is_grad_enabled() and _any_requires_grad(x, h, c, w_ih, w_hh, b_ih, b_hh):
        out = _rnn_cell_C(mode, x if nd == 2 else x[None], h, c, w_ih, w_hh, b_ih, b_hh, _is_auto(backend))
        h1, c1 = out if lstm else (out[0], None)
    else:
        x3 = x[None] if nd == 2 else x[None, None]
        _, h1, c1, _ = _rnn_forward_C(mode, x3, h, c, w_ih, w_hh, b_ih, b_hh, None, None, False, False)
    if nd == 1:
        return h1[0], (c1[0] if lstm else None)
    return h1, (c1 if lstm else None)


def _cell(op, mode, x, h, c, w_ih, w_hh, b_ih, b_hh, backend):
    """One step of x (B, I) from h, c (B, H) or None: (h', c' or None)."""
    _, h1, c1 = _run(op, mode, x.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh, None, None, False, backend)
    return h1, c1


def lstm_cell(x: Tensor, hx, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One LSTM step: x (B, I) or (I,), hx = (h, c) or None; returns (h', c')."""
    if hx is None or (type(hx) in (tuple, list) and len(hx) == 2):
        h, c = (None, None) if hx is None else hx
        out = cell_eager("lstm", x, h, c, w_ih, w_hh, b_ih, b_hh, backend)
        if out is not None:
            return out
    unb = _cell_input(x)
    h, c = _split_hx(hx)
    h, c = _cell_state(h, "h", unb), _cell_state(c, "c", unb)
    h1, c1 = _cell("lstm_cell", "lstm", x.unsqueeze(0) if unb else x, h, c, w_ih, w_hh, b_ih, b_hh, backend)
    return (h1.squeeze(0), c1.squeeze(0)) if unb else (h1, c1)


def gru_cell(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """One GRU step: x (B, I) or (I,), h or None; returns h'."""
    out = cell_eager("gru", x, h, None, w_ih, w_hh, b_ih, b_hh, backend)
    if out is not None:
        return out[0]
    unb = _cell_input(x)
    h = _cell_state(h, "h", unb)
    h1, _ = _cell("gru_cell", "gru", x.unsqueeze(0) if unb else x, h, None, w_ih, w_hh, b_ih, b_hh, backend)
    return h1.squeeze(0) if unb else h1


def rnn_cell(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None, *, nonlinearity: str = "tanh", backend: Optional[str] = None) -> Tensor:
    """One Elman RNN step (tanh or relu): x (B, I) or (I,), h or None; returns h'."""
    mode = _RNN_MODES.get(nonlinearity) if type(nonlinearity) is str else None
    if mode is not None:
        out = cell_eager(mode, x, h, None, w_ih, w_hh, b_ih, b_hh, backend)
        if out is not None:
            return out[0]
    mode = _rnn_mode(nonlinearity)
    unb = _cell_input(x)
    h = _cell_state(h, "h", unb)
    h1, _ = _cell("rnn_cell", mode, x.unsqueeze(0) if unb else x, h, None, w_ih, w_hh, b_ih, b_hh, backend)
    return h1.squeeze(0) if unb else h1
