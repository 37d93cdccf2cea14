"""Triton RNN / LSTM / GRU: the GEMMs through torch (cuBLAS), everything elementwise fused.

Per step: one recurrent GEMM, then one fused gate kernel (activations, cell update, the
masking by length, the output store at the step's time index). The backward walks the
steps in reverse with one fused gate-gradient kernel and one GEMM per step; the weight
and input gradients are then large GEMMs over all steps.

``lstm_persistent_forward`` runs a whole small LSTM (H <= 256) forward in one launch:
each program owns a block of batch rows and loops over every step itself, with W_hh read
through the cache on every step instead of a GEMM launch per step.

Semantics and the workspace layout are those of seqkern/ops/rnn.py (step s of row b
works on time index t = L_b - 1 - s when reversed and s < L_b, else s). This module
imports nothing from seqkern.
"""
import torch
import triton
import triton.language as tl

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_MODE = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _tile(B, n, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """(batch rows, columns), both int64, of this program's tile of (B, n). The grid is 1-D, the
    column block varying fastest: in a 2-D grid's y the column blocks would stop at 65535."""
    pid = tl.program_id(0)
    nj = tl.cdiv(n, BLOCK_H)
    rb = (pid // nj).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    j = (pid % nj).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    return rb, j


@triton.jit
def _rows(len_ptr, s, Tn, rb, bm, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr):
    """(active, t) of step s for rows rb: inside the sequence, and the time index."""
    if HAS_LEN:
        L = tl.load(len_ptr + rb, mask=bm, other=0).to(tl.int64)
    else:
        L = tl.zeros_like(rb).to(tl.int64) + Tn
    act = s < L
    if REVERSE:
        t = tl.where(act, L - 1 - s, s)
    else:
        t = tl.zeros_like(L) + s
    return act, t, L


@triton.jit
def _fwd_step(g_ptr, xw_ptr, len_ptr, hp_ptr, hx_ptr, cp_ptr, cn_ptr, hc_ptr, hn_ptr, bhn_ptr, y_ptr,
              s, Tn, B, H, P,
              MODE: tl.constexpr, G: tl.constexpr, PROJ: tl.constexpr, HAS_LEN: tl.constexpr,
              REVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rb, j = _tile(B, H, BLOCK_B, BLOCK_H)
    bm = rb < B
    m = bm[:, None] & (j < H)[None, :]
    act, t, L = _rows(len_ptr, s, Tn, rb, bm, HAS_LEN, REVERSE)
    a = act[:, None]
    rb64 = rb.to(tl.int64)[:, None]
    jj = j[None, :]
    grow = g_ptr + rb64 * (G * H) + jj
    xrow = xw_ptr + (t.to(tl.int64)[:, None] * B + rb64) * (G * H) + jj
    yrow = y_ptr + (t.to(tl.int64)[:, None] * B + rb64) * P + jj
    ty = y_ptr.dtype.element_ty
    if MODE == 0:
        i = _sigmoid(tl.load(grow, mask=m, other=0.0).to(ACC) + tl.load(xrow, mask=m, other=0.0).to(ACC))
        f = _sigmoid(tl.load(grow + H, mask=m, other=0.0).to(ACC) + tl.load(xrow + H, mask=m, other=0.0).to(ACC))
        g = _tanh(tl.load(grow + 2 * H, mask=m, other=0.0).to(ACC) + tl.load(xrow + 2 * H, mask=m, other=0.0).to(ACC))
        o = _sigmoid(tl.load(grow + 3 * H, mask=m, other=0.0).to(ACC) + tl.load(xrow + 3 * H, mask=m, other=0.0).to(ACC))
        cprev = tl.load(cp_ptr + rb64 * H + jj, mask=m, other=0.0).to(ACC)
        c = f * cprev + i * g
        h = o * _tanh(c)
        tl.store(grow, i.to(ty), mask=m)
        tl.store(grow + H, f.to(ty), mask=m)
        tl.store(grow + 2 * H, g.to(ty), mask=m)
        tl.store(grow + 3 * H, o.to(ty), mask=m)
        tl.store(cn_ptr + rb64 * H + jj, tl.where(a, c, cprev).to(ty), mask=m)
        if PROJ:
            tl.store(hc_ptr + rb64 * H + jj, tl.where(a, h, 0.0).to(ty), mask=m)
        else:
            hprev = tl.load(hp_ptr + rb64 * P + jj, mask=m, other=0.0).to(ACC)
            tl.store(hx_ptr + rb64 * P + jj, tl.where(a, h, hprev).to(ty), mask=m)
            tl.store(yrow, tl.where(a, h, 0.0).to(ty), mask=m)
    elif MODE == 1:
        r = _sigmoid(tl.load(grow, mask=m, other=0.0).to(ACC) + tl.load(xrow, mask=m, other=0.0).to(ACC))
        z = _sigmoid(tl.load(grow + H, mask=m, other=0.0).to(ACC) + tl.load(xrow + H, mask=m, other=0.0).to(ACC))
        hn = tl.load(grow + 2 * H, mask=m, other=0.0).to(ACC) + tl.load(bhn_ptr + jj, mask=m, other=0.0).to(ACC)
        n = _tanh(tl.load(xrow + 2 * H, mask=m, other=0.0).to(ACC) + r * hn)
        hprev = tl.load(hp_ptr + rb64 * H + jj, mask=m, other=0.0).to(ACC)
        h = (1.0 - z) * n + z * hprev
        tl.store(grow, r.to(ty), mask=m)
        tl.store(grow + H, z.to(ty), mask=m)
        tl.store(grow + 2 * H, n.to(ty), mask=m)
        tl.store(hn_ptr + rb64 * H + jj, tl.where(a, hn, 0.0).to(ty), mask=m)
        tl.store(hx_ptr + rb64 * H + jj, tl.where(a, h, hprev).to(ty), mask=m)
        tl.store(yrow, tl.where(a, h, 0.0).to(ty), mask=m)
    else:
        pre = tl.load(grow, mask=m, other=0.0).to(ACC) + tl.load(xrow, mask=m, other=0.0).to(ACC)
        if MODE == 2:
            h = _tanh(pre)
        else:
            h = tl.maximum(pre, 0.0)
        hprev = tl.load(hp_ptr + rb64 * H + jj, mask=m, other=0.0).to(ACC)
        tl.store(hx_ptr + rb64 * H + jj, tl.where(a, h, hprev).to(ty), mask=m)
        tl.store(yrow, tl.where(a, h, 0.0).to(ty), mask=m)


@triton.jit
def _proj_fwd_fix(hx_ptr, hp_ptr, y_ptr, len_ptr, s, Tn, B, P,
                  HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """After h = hc @ w_hr^T: rows past their end keep their state; the others are output."""
    rb, j = _tile(B, P, BLOCK_B, BLOCK_H)
    bm = rb < B
    m = bm[:, None] & (j < P)[None, :]
    act, t, L = _rows(len_ptr, s, Tn, rb, bm, HAS_LEN, REVERSE)
    a = act[:, None]
    rb64 = rb.to(tl.int64)[:, None]
    h = tl.load(hx_ptr + rb64 * P + j[None, :], mask=m, other=0.0)
    hp = tl.load(hp_ptr + rb64 * P + j[None, :], mask=m, other=0.0)
    tl.store(hx_ptr + rb64 * P + j[None, :], tl.where(a, h, hp), mask=m)
    tl.store(y_ptr + (t.to(tl.int64)[:, None] * B + rb64) * P + j[None, :], tl.where(a, h, 0.0), mask=m)


@triton.jit
def _proj_bwd_in(dr_ptr, dhh_ptr, dhT_ptr, dy_ptr, len_ptr, s, Tn, B, P,
                 HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Gradient of the projected h at step s (0 past the row's end)."""
    rb, j = _tile(B, P, BLOCK_B, BLOCK_H)
    bm = rb < B
    m = bm[:, None] & (j < P)[None, :]
    act, t, L = _rows(len_ptr, s, Tn, rb, bm, HAS_LEN, REVERSE)
    rb64 = rb.to(tl.int64)[:, None]
    off = rb64 * P + j[None, :]
    din = tl.where((s + 1 < L)[:, None], tl.load(dhh_ptr + off, mask=m, other=0.0), tl.load(dhT_ptr + off, mask=m, other=0.0))
    dyv = tl.load(dy_ptr + (t.to(tl.int64)[:, None] * B + rb64) * P + j[None, :], mask=m, other=0.0)
    tl.store(dr_ptr + off, tl.where(act[:, None], din + dyv, 0.0), mask=m)


@triton.jit
def _bwd_step(dgs_ptr, dgi_ptr, dhh_ptr, dhT_ptr, dy_ptr, dhc_ptr, dcc_ptr, len_ptr, gates_ptr, c_ptr, h_ptr, hn_ptr,
              s, Tn, B, H, P,
              MODE: tl.constexpr, G: tl.constexpr, PROJ: tl.constexpr, HAS_LEN: tl.constexpr,
              REVERSE: tl.constexpr, SEPARATE: tl.constexpr, ACC: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rb, j = _tile(B, H, BLOCK_B, BLOCK_H)
    bm = rb < B
    m = bm[:, None] & (j < H)[None, :]
    act, t, L = _rows(len_ptr, s, Tn, rb, bm, HAS_LEN, REVERSE)
    a = act[:, None]
    rb64 = rb.to(tl.int64)[:, None]
    t64 = t.to(tl.int64)[:, None]
    sB = (tl.zeros_like(rb64) + s) * B  # row offset of step s in the (T + 1, B, .) buffers, int64
    jj = j[None, :]
    ty = dgs_ptr.dtype.element_ty
    dsrow = dgs_ptr + rb64 * (G * H) + jj
    dtrow = dgi_ptr + (t64 * B + rb64) * (G * H) + jj
    if PROJ:
        dh = tl.load(dhc_ptr + rb64 * H + jj, mask=m, other=0.0).to(ACC)
    else:
        nxt = (s + 1 < L)[:, None]
        din = tl.where(nxt, tl.load(dhh_ptr + rb64 * P + jj, mask=m, other=0.0),
                       tl.load(dhT_ptr + rb64 * P + jj, mask=m, other=0.0)).to(ACC)
        dh = din + tl.load(dy_ptr + (t64 * B + rb64) * P + jj, mask=m, other=0.0).to(ACC)
    if MODE == 0:
        grow = gates_ptr + rb64 * (G * H) + jj
        i = tl.load(grow, mask=m, other=0.0).to(ACC)
        f = tl.load(grow + H, mask=m, other=0.0).to(ACC)
        g = tl.load(grow + 2 * H, mask=m, other=0.0).to(ACC)
        o = tl.load(grow + 3 * H, mask=m, other=0.0).to(ACC)
        cn = tl.load(c_ptr + (sB + B + rb64) * H + jj, mask=m, other=0.0).to(ACC)
        cp = tl.load(c_ptr + (sB + rb64) * H + jj, mask=m, other=0.0).to(ACC)
        dcold = tl.load(dcc_ptr + rb64 * H + jj, mask=m, other=0.0).to(ACC)
        tc = _tanh(cn)
        dc = dcold + dh * o * (1.0 - tc * tc)
        d0 = tl.where(a, dc * g * i * (1.0 - i), 0.0)
        d1 = tl.where(a, dc * cp * f * (1.0 - f), 0.0)
        d2 = tl.where(a, dc * i * (1.0 - g * g), 0.0)
        d3 = tl.where(a, dh * tc * o * (1.0 - o), 0.0)
        tl.store(dcc_ptr + rb64 * H + jj, tl.where(a, dc * f, dcold).to(ty), mask=m)
        tl.store(dsrow, d0.to(ty), mask=m)
        tl.store(dsrow + H, d1.to(ty), mask=m)
        tl.store(dsrow + 2 * H, d2.to(ty), mask=m)
        tl.store(dsrow + 3 * H, d3.to(ty), mask=m)
        if SEPARATE:
            tl.store(dtrow, d0.to(ty), mask=m)
            tl.store(dtrow + H, d1.to(ty), mask=m)
            tl.store(dtrow + 2 * H, d2.to(ty), mask=m)
            tl.store(dtrow + 3 * H, d3.to(ty), mask=m)
    elif MODE == 1:
        grow = gates_ptr + rb64 * (G * H) + jj
        r = tl.load(grow, mask=m, other=0.0).to(ACC)
        z = tl.load(grow + H, mask=m, other=0.0).to(ACC)
        n = tl.load(grow + 2 * H, mask=m, other=0.0).to(ACC)
        hn = tl.load(hn_ptr + rb64 * H + jj, mask=m, other=0.0).to(ACC)
        hp = tl.load(h_ptr + (sB + rb64) * H + jj, mask=m, other=0.0).to(ACC)
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dz = tl.where(a, dh * (hp - n) * z * (1.0 - z), 0.0)
        dr = tl.where(a, dn * hn * r * (1.0 - r), 0.0)
        dn = tl.where(a, dn, 0.0)
        tl.store(dsrow, dr.to(ty), mask=m)
        tl.store(dsrow + H, dz.to(ty), mask=m)
        # r of a step past the row's end came from its padding (NaN there must not reach dW_hh)
        tl.store(dsrow + 2 * H, tl.where(a, dn * r, 0.0).to(ty), mask=m)
        tl.store(dtrow, dr.to(ty), mask=m)
        tl.store(dtrow + H, dz.to(ty), mask=m)
        tl.store(dtrow + 2 * H, dn.to(ty), mask=m)
        # the direct path h_prev -> h; the GEMM then adds dgh @ W_hh
        tl.store(dhh_ptr + rb64 * P + jj, tl.where(a, dh * z, 0.0).to(ty), mask=m)
    else:
        hn = tl.load(h_ptr + (sB + B + rb64) * H + jj, mask=m, other=0.0).to(ACC)
        if MODE == 2:
            dpre = dh * (1.0 - hn * hn)
        else:
            dpre = tl.where(hn > 0.0, dh, 0.0)
        dpre = tl.where(a, dpre, 0.0)
        tl.store(dsrow, dpre.to(ty), mask=m)
        if SEPARATE:
            tl.store(dtrow, dpre.to(ty), mask=m)


@triton.jit
def _persistent_fwd(xw_ptr, w_ptr, bhn_ptr, len_ptr, h0_ptr, c0_ptr, y_ptr, hT_ptr, cT_ptr,
                    gates_ptr, c_ptr, h_ptr, hn_ptr, Tn, B, H,
                    MODE: tl.constexpr, G: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                    SAVE: tl.constexpr, F64: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The whole forward for BLOCK_B batch rows: h and c stay in registers over all steps,
    W_hh is re-read every step from the cache (loop-invariant, it stays on chip), and the
    recurrent GEMM of a step is a tl.dot per gate. No other program touches these rows,
    so the steps need no grid-wide synchronisation."""
    rb = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.arange(0, BLOCK_H)
    bm = rb < B
    jm = j < H
    m = bm[:, None] & jm[None, :]
    wm = jm[:, None] & jm[None, :]
    rb64 = rb.to(tl.int64)[:, None]
    jj = j[None, :]
    ty = y_ptr.dtype.element_ty
    # W_k^T tile: rows p (input unit), columns j (output unit) of gate k
    wt = w_ptr + j[None, :] * H + j[:, None]
    h = tl.load(h0_ptr + rb64 * H + jj, mask=m, other=0.0).to(ACC)
    c = tl.zeros([BLOCK_B, BLOCK_H], ACC)
    if MODE == 0:
        c = tl.load(c0_ptr + rb64 * H + jj, mask=m, other=0.0).to(ACC)
    if SAVE:
        tl.store(h_ptr + rb64 * H + jj, h.to(ty), mask=m)
        if MODE == 0:
            tl.store(c_ptr + rb64 * H + jj, c.to(ty), mask=m)
    if HAS_LEN:
        L = tl.load(len_ptr + rb, mask=bm, other=0).to(tl.int64)
    else:
        L = tl.zeros([BLOCK_B], tl.int64) + Tn
    bhn = tl.load(bhn_ptr + j, mask=jm, other=0.0).to(ACC)
    for s in range(0, Tn):
        sB = (tl.zeros_like(rb64) + s) * B  # row offset of step s in the saved buffers, int64
        act = s < L
        if REVERSE:
            t = tl.where(act, L - 1 - s, s)
        else:
            t = tl.zeros_like(L) + s
        a = act[:, None]
        xrow = xw_ptr + (t[:, None] * B + rb64) * (G * H) + jj
        hd = h.to(ACC)
        if F64:
            r0 = tl.dot(hd, tl.load(wt, mask=wm, other=0.0).to(ACC), out_dtype=tl.float64)
        else:
            r0 = tl.dot(hd, tl.load(wt, mask=wm, other=0.0).to(ACC), input_precision="ieee")
        x0 = tl.load(xrow, mask=m, other=0.0).to(ACC)
        srow = (sB + rb64) * (G * H) + jj
        if MODE == 0:
            if F64:
                r1 = tl.dot(hd, tl.load(wt + H * H, mask=wm, other=0.0).to(ACC), out_dtype=tl.float64)
                r2 = tl.dot(hd, tl.load(wt + 2 * H * H, mask=wm, other=0.0).to(ACC), out_dtype=tl.float64)
                r3 = tl.dot(hd, tl.load(wt + 3 * H * H, mask=wm, other=0.0).to(ACC), out_dtype=tl.float64)
            else:
                r1 = tl.dot(hd, tl.load(wt + H * H, mask=wm, other=0.0).to(ACC), input_precision="ieee")
                r2 = tl.dot(hd, tl.load(wt + 2 * H * H, mask=wm, other=0.0).to(ACC), input_precision="ieee")
                r3 = tl.dot(hd, tl.load(wt + 3 * H * H, mask=wm, other=0.0).to(ACC), input_precision="ieee")
            i = _sigmoid(r0 + x0)
            f = _sigmoid(r1 + tl.load(xrow + H, mask=m, other=0.0).to(ACC))
            g = _tanh(r2 + tl.load(xrow + 2 * H, mask=m, other=0.0).to(ACC))
            o = _sigmoid(r3 + tl.load(xrow + 3 * H, mask=m, other=0.0).to(ACC))
            cn = f * c + i * g
            hn_ = o * _tanh(cn)
            if SAVE:
                tl.store(gates_ptr + srow, i.to(ty), mask=m)
                tl.store(gates_ptr + srow + H, f.to(ty), mask=m)
                tl.store(gates_ptr + srow + 2 * H, g.to(ty), mask=m)
                tl.store(gates_ptr + srow + 3 * H, o.to(ty), mask=m)
            c = tl.where(a & jm[None, :], cn, c)
            if SAVE:
                tl.store(c_ptr + (sB + B + rb64) * H + jj, c.to(ty), mask=m)
        elif MODE == 1:
            if F64:
                r1 = tl.dot(hd, tl.load(wt + H * H, mask=wm, other=0.0).to(ACC), out_dtype=tl.float64)
                r2 = tl.dot(hd, tl.load(wt + 2 * H * H, mask=wm, other=0.0).to(ACC), out_dtype=tl.float64)
            else:
                r1 = tl.dot(hd, tl.load(wt + H * H, mask=wm, other=0.0).to(ACC), input_precision="ieee")
                r2 = tl.dot(hd, tl.load(wt + 2 * H * H, mask=wm, other=0.0).to(ACC), input_precision="ieee")
            r = _sigmoid(r0 + x0)
            z = _sigmoid(r1 + tl.load(xrow + H, mask=m, other=0.0).to(ACC))
            hh = r2 + bhn[None, :]
            n = _tanh(tl.load(xrow + 2 * H, mask=m, other=0.0).to(ACC) + r * hh)
            hn_ = (1.0 - z) * n + z * h
            if SAVE:
                tl.store(gates_ptr + srow, r.to(ty), mask=m)
                tl.store(gates_ptr + srow + H, z.to(ty), mask=m)
                tl.store(gates_ptr + srow + 2 * H, n.to(ty), mask=m)
                tl.store(hn_ptr + (sB + rb64) * H + jj, tl.where(a, hh, 0.0).to(ty), mask=m)
        elif MODE == 2:
            hn_ = _tanh(r0 + x0)
        else:
            hn_ = tl.maximum(r0 + x0, 0.0)
        tl.store(y_ptr + (t[:, None] * B + rb64) * H + jj, tl.where(a, hn_, 0.0).to(ty), mask=m)
        # padded columns (j >= H) stay 0: there the dot gives inf * 0 = NaN when h holds an inf,
        # and a NaN kept in h would reach every real column through the next step's dot
        h = tl.where(a & jm[None, :], hn_, h)
        if SAVE:
            tl.store(h_ptr + (sB + B + rb64) * H + jj, h.to(ty), mask=m)
    tl.store(hT_ptr + rb64 * H + jj, h.to(ty), mask=m)
    if MODE == 0:
        tl.store(cT_ptr + rb64 * H + jj, c.to(ty), mask=m)


# ---------------------------------------------------------------------------
# drivers
# ---------------------------------------------------------------------------

def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(B, n):
    bh = min(triton.next_power_of_2(max(n, 1)), 128)
    bb = min(triton.next_power_of_2(max(B, 1)), max(1, 2048 // bh), 16)
    return bb, bh


def _views(mode, ws, T, B, H, P, save):
    """Named views of the flat workspace (layout of seqkern/ops/rnn.py workspace_numel)."""
    out, off = {}, 0

    def take(name, *shape):
        nonlocal off
        n = 1
        for d in shape:
            n *= d
        out[name] = ws[off:off + n].view(*shape)
        off += n

    if mode == "lstm":
        take("gates", T, B, 4 * H)
        take("c", T + 1, B, H)
        take("h", T + 1, B, P)
        if P < H:
            take("hc", T, B, H)
    elif mode == "gru":
        take("gates", T, B, 3 * H)
        take("hn", T, B, H)
        take("h", T + 1, B, H)
    else:
        take("h", T + 1, B, H)
    return out


def _numel(mode, T, B, H, P):
    if mode == "lstm":
        return T * B * 4 * H + (T + 1) * B * (H + P) + (T * B * H if P < H else 0)
    if mode == "gru":
        return T * B * 4 * H + (T + 1) * B * H
    return (T + 1) * B * H


# the persistent forward serves hidden sizes up to this (the whole row of h per program)
PERSISTENT_MAX_H = 256


def _persistent_forward(mode, x, xw, h0, c0, w_hh, b_hn, lengths, reverse, save):
    G = _GATES[mode]
    T, B, _ = x.shape
    H = w_hh.shape[0] // G
    ws = x.new_empty(_numel(mode, T, B, H, H) if save else 0)
    v = _views(mode, ws, T, B, H, H, True) if save else {}
    y = x.new_empty(T, B, H)
    hT = x.new_empty(B, H)
    cT = x.new_empty(B, H) if mode == "lstm" else x.new_empty(0)
    if B == 0:
        return y, hT, cT, ws
    dummy = y
    block_h = max(16, triton.next_power_of_2(H))
    block_b = 16  # tl.dot needs at least 16 rows
    lens = lengths if lengths is not None else x.new_zeros(1, dtype=torch.int64)
    _persistent_fwd[(triton.cdiv(B, block_b),)](
        xw, w_hh.contiguous(), b_hn, lens, h0.contiguous(), c0.contiguous() if c0 is not None else dummy, y, hT,
        cT if mode == "lstm" else dummy, v.get("gates", dummy), v.get("c", dummy), v.get("h", dummy),
        v.get("hn", dummy), T, B, H, MODE=_MODE[mode], G=G, HAS_LEN=lengths is not None, REVERSE=reverse,
        SAVE=save, F64=x.dtype == torch.float64, ACC=_acc(x.dtype), BLOCK_B=block_b, BLOCK_H=block_h)
    return y, hT, cT, ws


def rnn_forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save):
    """(y, h_T, c_T or empty, workspace or empty); see seqkern/ops/rnn.py."""
    G = _GATES[mode]
    T, B, I = x.shape
    H = w_hh.shape[0] // G
    P = h0.shape[1]
    proj = w_hr is not None
    dt = x.dtype
    bias = None
    if b_ih is not None:
        bias = b_ih
    if b_hh is not None:
        bh = torch.cat((b_hh[: 2 * H], torch.zeros_like(b_hh[2 * H:]))) if mode == "gru" else b_hh
        bias = bh if bias is None else bias + bh
    x2 = x.reshape(T * B, I)
    xw = (torch.addmm(bias, x2, w_ih.t()) if bias is not None else x2 @ w_ih.t()).contiguous()
    b_hn = b_hh[2 * H:].contiguous() if (mode == "gru" and b_hh is not None) else x.new_zeros(H)
    if not proj and H <= PERSISTENT_MAX_H:
        return _persistent_forward(mode, x, xw, h0, c0, w_hh, b_hn, lengths, reverse, save)
    w_hh_t = w_hh.t()
    w_hr_t = w_hr.t() if proj else None
    if save:
        ws = x.new_empty(_numel(mode, T, B, H, P))
        v = _views(mode, ws, T, B, H, P, True)
        hbuf = v["h"]
        cbuf = v.get("c")
        gbuf = v.get("gates")
        hcbuf = v.get("hc")
        hnbuf = v.get("hn")
    else:
        ws = x.new_empty(0)
        hbuf = x.new_empty(2, B, P)
        cbuf = x.new_empty(2, B, H) if mode == "lstm" else None
        gbuf = x.new_empty(1, B, G * H) if mode in ("lstm", "gru") else None
        hcbuf = x.new_empty(1, B, H) if proj else None
        hnbuf = x.new_empty(1, B, H) if mode == "gru" else None
    idx = (lambda s: s) if save else (lambda s: s % 2)
    one = (lambda s: s) if save else (lambda s: 0)
    hbuf[0].copy_(h0)
    if cbuf is not None:
        cbuf[0].copy_(c0)
    y = x.new_empty(T, B, P)
    lens = lengths if lengths is not None else x.new_zeros(1, dtype=torch.int64)
    bb, bh = _blocks(B, H)
    bbp, bhp = _blocks(B, P)
    grid = (triton.cdiv(B, bb) * triton.cdiv(H, bh),)  # 1-D: see _tile
    gridp = (triton.cdiv(B, bbp) * triton.cdiv(P, bhp),)
    dummy = y
    for s in range(T if B > 0 else 0):
        hp, hx = hbuf[idx(s)], hbuf[idx(s + 1)]
        g = gbuf[one(s)] if gbuf is not None else hx
        torch.mm(hp, w_hh_t, out=g)
        cp = cbuf[idx(s)] if cbuf is not None else dummy
        cn = cbuf[idx(s + 1)] if cbuf is not None else dummy
        hc = hcbuf[one(s)] if proj else dummy
        hn = hnbuf[one(s)] if hnbuf is not None else dummy
        _fwd_step[grid](g, xw, lens, hp, hx, cp, cn, hc, hn, b_hn, y, s, T, B, H, P,
                        MODE=_MODE[mode], G=G, PROJ=proj, HAS_LEN=lengths is not None, REVERSE=reverse,
                        ACC=_acc(dt), BLOCK_B=bb, BLOCK_H=bh)
        if proj:
            torch.mm(hc, w_hr_t, out=hx)
            _proj_fwd_fix[gridp](hx, hp, y, lens, s, T, B, P, HAS_LEN=lengths is not None, REVERSE=reverse,
                                 BLOCK_B=bbp, BLOCK_H=bhp)
    hT = hbuf[idx(T)].clone()
    cT = cbuf[idx(T)].clone() if mode == "lstm" else x.new_empty(0)
    return y, hT, cT, ws


def rnn_backward(mode, dy, dhT, dcT, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, ws, need):
    """Gradients (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), empty where not needed."""
    G = _GATES[mode]
    T, B, I = x.shape
    H = w_hh.shape[0] // G
    P = h0.shape[1]
    GH = G * H
    proj = w_hr is not None
    dt = x.dtype
    v = _views(mode, ws, T, B, H, P, True)
    dy, dhT = dy.contiguous(), dhT.contiguous()
    separate = mode == "gru" or reverse
    dgh = x.new_empty(T, B, GH)
    dgi = x.new_empty(T, B, GH) if separate else dgh
    dhh = x.new_zeros(B, P)
    dcc = dcT.clone() if mode == "lstm" else dhh
    dr = x.new_empty(T, B, P) if proj else None
    dhc = x.new_empty(B, H) if proj else None
    lens = lengths if lengths is not None else x.new_zeros(1, dtype=torch.int64)
    has_len = lengths is not None
    bb, bh = _blocks(B, H)
    bbp, bhp = _blocks(B, P)
    grid = (triton.cdiv(B, bb) * triton.cdiv(H, bh),)  # 1-D: see _tile
    gridp = (triton.cdiv(B, bbp) * triton.cdiv(P, bhp),)
    gates = v.get("gates")
    hn = v.get("hn")
    dummy = dhh
    for s in range(T - 1 if B > 0 else -1, -1, -1):
        if proj:
            _proj_bwd_in[gridp](dr[s], dhh, dhT, dy, lens, s, T, B, P, HAS_LEN=has_len, REVERSE=reverse,
                                BLOCK_B=bbp, BLOCK_H=bhp)
            torch.mm(dr[s], w_hr, out=dhc)
        _bwd_step[grid](dgh[s], dgi, dhh, dhT, dy, dhc if proj else dummy, dcc, lens,
                        gates[s] if gates is not None else dummy, v.get("c", dummy), v["h"],
                        hn[s] if hn is not None else dummy, s, T, B, H, P,
                        MODE=_MODE[mode], G=G, PROJ=proj, HAS_LEN=has_len, REVERSE=reverse, SEPARATE=separate,
                        ACC=_acc(dt), BLOCK_B=bb, BLOCK_H=bh)
        if mode == "gru":
            dhh.addmm_(dgh[s], w_hh)  # dh * z written by the kernel, plus the path through W_hh
        else:
            torch.mm(dgh[s], w_hh, out=dhh)
    out = [x.new_empty(0) for _ in range(8)]
    dgi2, dgh2 = dgi.view(T * B, GH), dgh.view(T * B, GH)
    if need[0]:
        out[0] = (dgi2 @ w_ih).view(T, B, I)
    if need[1]:
        if lengths is None:
            out[1] = dhh.clone() if T > 0 else dhT.clone()
        else:
            out[1] = torch.where((lengths > 0)[:, None], dhh, dhT)
    if need[2] and mode == "lstm":
        out[2] = dcc
    if need[3]:
        out[3] = dgi2.t() @ x.reshape(T * B, I)
    if need[4]:
        hs = v["h"][:T]
        if lengths is not None:
            # the state a step past a row's end reads is not used (its gate gradients are 0): as the
            # reference, it must not reach dW_hh either, where a NaN/inf there would give 0 * NaN
            act = torch.arange(T, device=x.device)[:, None] < lengths[None, :]
            hs = torch.where(act[..., None], hs, 0.0)
        out[4] = dgh2.t() @ hs.reshape(T * B, P)
    if need[5] and b_ih is not None:
        out[5] = dgi2.sum(0)
    if need[6] and b_hh is not None:
        out[6] = dgh2.sum(0)
    if need[7] and proj:
        out[7] = dr.view(T * B, P).t() @ v["hc"].view(T * B, H)
    return tuple(out)
