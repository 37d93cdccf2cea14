"""Triton RWKV-4 WKV: one program per (batch, block of channels), the time loop inside the
kernel, the state in fp32 (fp64 for fp64 inputs) whatever the input dtype.

Backward: the forward kernel runs again and saves the state before every step
(B, T, 3, C) in the accumulation dtype; the backward kernel then sweeps time in reverse
with the adjoints of the numerator and denominator in running-max form (the equations
are written out in seqkern/ops/wkv.py, _reference_backward).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _batch_channels(C, BLOCK_C: tl.constexpr):
    """(batch row, channel indices), both int64, of this program. The grid is 1-D, the channel block
    varying fastest (a 2-D grid's y would cap one of them at 65535). Offsets are int64 throughout:
    2 * C, T * C and the channel index of the last block may pass 2^31 (the sums below add C twice
    to an int64 rather than 2 * C in int32)."""
    pid = tl.program_id(0)
    nc = tl.cdiv(C, BLOCK_C)
    return (pid // nc).to(tl.int64), (pid % nc).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)


@triton.jit
def _wkv4_fwd_kernel(negw_ptr, u_ptr, k_ptr, v_ptr, s_ptr, y_ptr, so_ptr, save_ptr, T, C,
                     SAVE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c = _batch_channels(C, BLOCK_C)
    mask = c < C
    negw = tl.load(negw_ptr + c, mask=mask, other=0.0)
    u = tl.load(u_ptr + c, mask=mask, other=0.0)
    sb = b * 3 * C
    aa = tl.load(s_ptr + sb + c, mask=mask, other=0.0)
    bb = tl.load(s_ptr + sb + C + c, mask=mask, other=0.0)
    pp = tl.load(s_ptr + sb + C + C + c, mask=mask, other=0.0)
    row = b * T * C  # int64: T * C may pass 2^31
    for t in range(T):
        off = row + c
        row += C
        if SAVE:
            so = (b * T + t) * 3 * C + c
            tl.store(save_ptr + so, aa, mask=mask)
            tl.store(save_ptr + so + C, bb, mask=mask)
            tl.store(save_ptr + so + C + C, pp, mask=mask)
        kk = tl.load(k_ptr + off, mask=mask, other=0.0).to(ACC)
        vv = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
        ww = u + kk
        p = tl.maximum(pp, ww, propagate_nan=tl.PropagateNan.ALL)
        e1 = tl.exp(pp - p)
        e2 = tl.exp(ww - p)
        tl.store(y_ptr + off, ((e1 * aa + e2 * vv) / (e1 * bb + e2)).to(y_ptr.dtype.element_ty), mask=mask)
        ww = pp + negw
        p = tl.maximum(ww, kk, propagate_nan=tl.PropagateNan.ALL)
        e1 = tl.exp(ww - p)
        e2 = tl.exp(kk - p)
        aa = e1 * aa + e2 * vv
        bb = e1 * bb + e2
        pp = p
    tl.store(so_ptr + sb + c, aa, mask=mask)
    tl.store(so_ptr + sb + C + c, bb, mask=mask)
    tl.store(so_ptr + sb + C + C + c, pp, mask=mask)


@triton.jit
def _wkv4_bwd_kernel(negw_ptr, u_ptr, k_ptr, v_ptr, s_ptr, save_ptr, sT_ptr, gy_ptr, gs_ptr,
                     gk_ptr, gv_ptr, gso_ptr, gw_ptr, gu_ptr, T, C,
                     ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c = _batch_channels(C, BLOCK_C)
    mask = c < C
    negw = tl.load(negw_ptr + c, mask=mask, other=0.0)
    u = tl.load(u_ptr + c, mask=mask, other=0.0)
    sb = b * 3 * C
    # returned (aa, bb, pp) = (A e^{-pp}, B e^{-pp}, pp): split its gradient between A, B and pp
    aT = tl.load(sT_ptr + sb + c, mask=mask, other=0.0)
    bT = tl.load(sT_ptr + sb + C + c, mask=mask, other=0.0)
    pT = tl.load(sT_ptr + sb + C + C + c, mask=mask, other=0.0)
    ga = tl.load(gs_ptr + sb + c, mask=mask, other=0.0)
    gb = tl.load(gs_ptr + sb + C + c, mask=mask, other=0.0)
    gp = tl.load(gs_ptr + sb + C + C + c, mask=mask, other=0.0) - ga * aT - gb * bT
    gq = -pT
    gw = tl.zeros_like(u)
    gu = tl.zeros_like(u)
    row = (b * T + T) * C  # int64: T * C may pass 2^31
    for i in range(T):
        t = T - 1 - i
        row -= C
        off = row + c
        so = (b * T + t) * 3 * C + c
        a = tl.load(save_ptr + so, mask=mask, other=0.0)
        bt = tl.load(save_ptr + so + C, mask=mask, other=0.0)
        p = tl.load(save_ptr + so + C + C, mask=mask, other=0.0)
        kk = tl.load(k_ptr + off, mask=mask, other=0.0).to(ACC)
        vv = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
        gyt = tl.load(gy_ptr + off, mask=mask, other=0.0).to(ACC)
        ww = u + kk
        m = tl.maximum(p, ww, propagate_nan=tl.PropagateNan.ALL)
        e1 = tl.exp(p - m)
        e2 = tl.exp(ww - m)
        d = e1 * bt + e2
        y = (e1 * a + e2 * vv) / d
        gyd = gyt / d
        gcur = gyd * e2 * (vv - y)
        gu += gcur
        f = tl.exp(kk + gq)  # e^{k_t} alpha_{t+1} = ga * f, exponent <= 0
        take_k = kk > p + negw
        gk = gcur + f * (ga * vv + gb) + tl.where(take_k, gp, 0.0)
        gv = gyd * e2 + f * ga
        tl.store(gk_ptr + off, gk.to(gk_ptr.dtype.element_ty), mask=mask)
        tl.store(gv_ptr + off, gv.to(gv_ptr.dtype.element_ty), mask=mask)
        gw -= tl.exp(gq + p + negw) * (ga * a + gb * bt) + tl.where(take_k, 0.0, gp)
        gp = tl.where(take_k, 0.0, gp)
        x1 = gq + negw
        q = tl.maximum(x1, -m, propagate_nan=tl.PropagateNan.ALL)
        s1 = tl.exp(x1 - q)
        s2 = tl.exp(-m - q)
        ga = s1 * ga + s2 * gyd
        gb = s1 * gb - s2 * gyd * y
        gq = q
    a0 = tl.load(s_ptr + sb + c, mask=mask, other=0.0)
    b0 = tl.load(s_ptr + sb + C + c, mask=mask, other=0.0)
    p0 = tl.load(s_ptr + sb + C + C + c, mask=mask, other=0.0)
    sc = tl.exp(gq + p0)
    tl.store(gso_ptr + sb + c, ga * sc, mask=mask)
    tl.store(gso_ptr + sb + C + c, gb * sc, mask=mask)
    tl.store(gso_ptr + sb + C + C + c, sc * (ga * a0 + gb * b0) + gp, mask=mask)
    tl.store(gw_ptr + b * C + c, gw, mask=mask)
    tl.store(gu_ptr + b * C + c, gu, mask=mask)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_cfg(C):
    # small channel blocks: B * C / BLOCK_C programs must fill the GPU's SMs (seqkern/ops/wkv.py's
    # supports() counts B * ceil(C / 64) programs against the 2^31-1 of a 1-D grid)
    block = min(64, triton.next_power_of_2(max(C, 1)))
    return block, (1 if block <= 32 else 2)


def _forward(time_decay, time_first, k, v, state, save):
    acc = _acc(k.dtype)
    k, v = k.contiguous(), v.contiguous()
    state = state.to(acc).contiguous()
    Bn, T, C = k.shape
    negw = (-torch.exp(time_decay.to(acc))).contiguous()
    u = time_first.to(acc).contiguous()
    y = torch.empty_like(k)
    st_out = torch.empty_like(state)
    saved = torch.empty(Bn, T, 3, C, dtype=acc, device=k.device) if save else st_out
    if Bn * C == 0:
        return y, st_out.copy_(state), saved
    block, warps = _launch_cfg(C)
    grid = (Bn * triton.cdiv(C, block),)
    _wkv4_fwd_kernel[grid](negw, u, k, v, state, y, st_out, saved, T, C, SAVE=save,
                           ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_C=block, num_warps=warps)
    return y, st_out, saved


def wkv4_forward(time_decay, time_first, k, v, state):
    """(y, final state); y in k's dtype, the state in fp32 (fp64 for fp64 k)."""
    y, st, _ = _forward(time_decay, time_first, k, v, state, False)
    return y, st


def wkv4_backward(time_decay, time_first, k, v, state, gy, gstate):
    """Gradients of (time_decay, time_first, k, v, state)."""
    acc = _acc(k.dtype)
    _, st_T, saved = _forward(time_decay, time_first, k, v, state, True)
    k, v = k.contiguous(), v.contiguous()
    state = state.to(acc).contiguous()
    gy = gy.to(k.dtype).contiguous()
    gstate = gstate.to(acc).contiguous()
    Bn, T, C = k.shape
    w = torch.exp(time_decay.to(acc))
    negw = (-w).contiguous()
    u = time_first.to(acc).contiguous()
    gk, gv = torch.empty_like(k), torch.empty_like(v)
    gs = torch.empty_like(state)
    gw = torch.zeros(Bn, C, dtype=acc, device=k.device)
    gu = torch.zeros(Bn, C, dtype=acc, device=k.device)
    if Bn * C > 0:
        block, warps = _launch_cfg(C)
        grid = (Bn * triton.cdiv(C, block),)
        _wkv4_bwd_kernel[grid](negw, u, k, v, state, saved, st_T, gy, gstate, gk, gv, gs, gw, gu, T, C,
                               ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_C=block,
                               num_warps=warps)
    return ((gw.sum(0) * w).to(time_decay.dtype), gu.sum(0).to(time_first.dtype), gk, gv, gs)
