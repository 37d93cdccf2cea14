"""Triton attention, FlashAttention-2 style (Dao 2023).

Forward: one program per (query block, batch x head); online softmax over key blocks in base 2
(scale * log2(e) folded into one multiplier, exp2), causal blocks past the diagonal skipped, the
log-sum-exp saved in base 2 as the pair (m, log2 l): the backward's exp2((s - m) - log2 l) then
subtracts m from bit-identical logits exactly as the forward did. NaN and inf follow the
reference: the shift is the row max when finite, else 0; a row whose pair is not finite has P = 0
in the backward. fp64 inputs run in fp64 throughout (ACC), with the scalars read from a small
tensor of that dtype (a Python float argument would be fp32). Backward: delta = rowsum(dO * O) first; then dK/dV in one pass over
the query blocks (one program per key block and key/value head, summing its GQA group), and dQ in a
separate kernel (one program per query block): no atomics, deterministic.

Canonical shapes as in seqkern/ops/attention.py: q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev);
head dims padded to a power of two inside the tiles; the additive mask is read through strides
(0 along broadcast dims). Dropout uses the counter hash shared with the other backends
(lowbias32 of (row, column) with row = bh * L + i), so the mask never exists in memory.
Rotary (``cos``/``sin`` given, rotate-half layout): q and k tiles are rotated as they are loaded
(their partner columns loaded beside them), never written back; the backward rotates each dq/dk
tile back at the end of the program that owns it.
Imports nothing from seqkern.
"""
import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _dropout_scale(bh, L, offs_m, offs_n, seed, threshold, inv_keep):
    """(BLOCK_M, BLOCK_N) tile of keep / (1 - p) for rows offs_m and columns offs_n."""
    row = ((bh.to(tl.int64) * L + offs_m) & 0xFFFFFFFF).to(tl.uint32)
    rh = _mix32(row ^ seed.to(tl.uint32))
    h = _mix32(rh[:, None] ^ offs_n.to(tl.uint32)[None, :])
    keep = (h >> 8) >= threshold.to(tl.uint32)
    return tl.where(keep, inv_keep, 0.0)


@triton.jit
def _rotate(x, base, row, col, E, HALF, cos_ptr, sin_ptr, valid, INVERSE: tl.constexpr, ACC: tl.constexpr):
    """Rotary (rotate-half layout) of the tile x = base[row, col] (row: position, col: feature; 2-D
    broadcastable index tiles): its partner columns col +- HALF are loaded and combined with the
    cos/sin of the row's position in ACC, then rounded to x's dtype as the separate rotary pass
    does. INVERSE rotates by the opposite angle (the adjoint, for dq/dk)."""
    first = col < HALF
    rot = valid & (col < 2 * HALF)
    partner = tl.where(first, col + HALF, col - HALF)
    j = tl.where(first, col, col - HALF)
    r64 = row.to(tl.int64)
    xp = tl.load(base + r64 * E + partner, mask=rot, other=0.0).to(ACC)
    c = tl.load(cos_ptr + r64 * HALF + j, mask=rot, other=1.0).to(ACC)
    sn = tl.load(sin_ptr + r64 * HALF + j, mask=rot, other=0.0).to(ACC)
    if INVERSE:
        sn = tl.where(first, sn, -sn)
    else:
        sn = tl.where(first, -sn, sn)
    return (x.to(ACC) * c + xp * sn).to(x.dtype)


@triton.jit
def _split_pid(n, BLOCK: tl.constexpr):
    """(block index along a sequence of length n, batch x head index in int64) of this program.
    The grids are 1-D, the block index varying fastest: batch x heads in gridDim.y would cap it
    at 65535; gridDim.x takes 2^31 - 1 programs."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(n, BLOCK)
    return pid % nblk, (pid // nblk).to(tl.int64)


@triton.jit
def _scores(q, k_tile_t, qk_scale, log2e, bh, b, h, offs_m, offs_n, L, S, mask_ptr, smb, smh, sml, sms,
            HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """Scores of one tile in base 2 (s * log2 e), -inf where masked or out of range."""
    if IEEE:
        s = tl.dot(q, k_tile_t, input_precision="ieee")
    else:
        s = tl.dot(q, k_tile_t)
    s = s.to(ACC) * qk_scale
    if HAS_MASK:
        mp = mask_ptr + b * smb + h * smh + offs_m[:, None].to(tl.int64) * sml + offs_n[None, :].to(tl.int64) * sms
        am = tl.load(mp, mask=(offs_m[:, None] < L) & (offs_n[None, :] < S), other=0.0).to(ACC)
        # finite masks past +-2.3e38 (HF-style finfo(float32).min) would overflow to -inf once in
        # base 2, turning a row masked everywhere with them into a dead row (0) where torch averages;
        # +-inf and NaN pass as they are
        am = tl.where((am < -2.3e38) & (am != float("-inf")), -2.3e38, am)
        am = tl.where((am > 2.3e38) & (am != float("inf")), 2.3e38, am)
        s = s + am * log2e
    valid = offs_n[None, :] < S
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(valid, s, float("-inf"))


@triton.jit(do_not_specialize=["seed", "threshold"])
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr, smb, smh, sml, sms,
                Hq, G, L, S, E, EV, c_ptr, seed, threshold, cos_ptr, sin_ptr, HALF,
                HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                ACC: tl.constexpr, ROTARY: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    qk_scale = tl.load(c_ptr)
    inv_keep = tl.load(c_ptr + 2)
    log2e = tl.load(c_ptr + 3)
    pid_m, bh = _split_pid(L, BLOCK_M)
    b = bh // Hq
    h = bh % Hq
    bhk = b * (Hq // G) + h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rn = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + (bh * L + offs_m[:, None]).to(tl.int64) * E + offs_d[None, :],
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < E), other=0.0)
    if ROTARY:
        q = _rotate(q, q_ptr + bh * L * E, offs_m[:, None], offs_d[None, :], E, HALF, cos_ptr, sin_ptr,
                    offs_m[:, None] < L, False, ACC)
    k_base = k_ptr + bhk.to(tl.int64) * S * E
    v_base = v_ptr + bhk.to(tl.int64) * S * EV
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    sh_i = tl.full((BLOCK_M,), float("-inf"), ACC)  # shift subtracted so far; -inf: none yet
    l_i = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC)
    n_end = S
    if CAUSAL:
        n_end = tl.minimum(S, (pid_m + 1) * BLOCK_M)  # blocks past the diagonal see nothing
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + rn
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * E + offs_d[:, None],
                     mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0)
        if ROTARY:
            kt = _rotate(kt, k_base, offs_n[None, :], offs_d[:, None], E, HALF, cos_ptr, sin_ptr, offs_n[None, :] < S,
                         False, ACC)
        s = _scores(q, kt, qk_scale, log2e, bh, b, h, offs_m, offs_n, L, S, mask_ptr, smb, smh, sml, sms,
                    HAS_MASK, CAUSAL, IEEE, ACC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # the shift is the running max when finite, else 0 (as the reference: nothing visible yet
        # gives exp2(-inf) = 0, a +inf or NaN logit gives NaN where the reference has it)
        sh_new = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
        p = tl.exp2(s - sh_new[:, None])
        # nothing accumulated yet: alpha 0 (exp2 of a stale shift could overflow)
        alpha = tl.where(l_i == 0.0, 0.0, tl.exp2(sh_i - sh_new))
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = p * _dropout_scale(bh, L, offs_m, offs_n, seed, threshold, inv_keep)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * EV + offs_dv[None, :],
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < EV), other=0.0)
        acc = acc * alpha[:, None]
        if IEEE:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee").to(ACC)
        else:
            acc += tl.dot(p.to(v.dtype), v).to(ACC)
        m_i = m_new
        sh_i = sh_new
    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]  # fully masked rows: 0
    hi = tl.where(dead, float("-inf"), sh_i)
    lo = tl.where(dead, float("-inf"), tl.log2(tl.where(dead, 1.0, l_i)))
    tl.store(o_ptr + (bh * L + offs_m[:, None]).to(tl.int64) * EV + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < L) & (offs_dv[None, :] < EV))
    lp = lse_ptr + (bh.to(tl.int64) * L + offs_m) * 2
    tl.store(lp, hi.to(lse_ptr.dtype.element_ty), mask=offs_m < L)
    tl.store(lp + 1, lo.to(lse_ptr.dtype.element_ty), mask=offs_m < L)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, rows, EV, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) as the diagonal of dO O^T: the same dot as the backward's dP = dO V^T,
    so that where P is one-hot (O = that row of V) dP - delta is exactly 0 as in the reference's
    dP - rowsum(P * dP) (a differently ordered sum leaves ulp(|dO||v|), times |k| in dq)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # B*Hq*L may pass 2^31
    d = tl.arange(0, BLOCK_DV)
    msk = (r[:, None] < rows) & (d[None, :] < EV)
    off = r[:, None].to(tl.int64) * EV + d[None, :]
    o = tl.load(o_ptr + off, mask=msk, other=0.0)
    do = tl.load(do_ptr + off, mask=msk, other=0.0)
    if IEEE:
        prod = tl.dot(do, tl.trans(o), input_precision="ieee")
    else:
        prod = tl.dot(do, tl.trans(o))
    eye = tl.arange(0, BLOCK_R)[:, None] == tl.arange(0, BLOCK_R)[None, :]
    delta = tl.sum(tl.where(eye, prod.to(delta_ptr.dtype.element_ty), 0.0), 1)
    tl.store(delta_ptr + r, delta, mask=r < rows)


@triton.jit
def _load_lse(lse_ptr, delta_ptr, bh, offs_m, L):
    """Per row of offs_m: the forward's pair (hi, lo) = (m, log2 l) as the backward uses it, a
    factor z and delta, such that P = exp2((s - hi) - lo) * z and dS = P * (dP - delta) are what
    autograd of the reference gives (its shift is 0 when the row max is not finite):
      finite pair: the normal case (z = 1);
      lo NaN (a NaN logit): the reference divides by 1, not l: P = exp2(s), dS = P * dP (delta 0);
      lo +inf (a +inf logit): P = exp2(s) / inf (NaN where s = +inf, else 0), delta NaN from O;
      lo -inf (fully masked) and padding rows: P = 0."""
    rmask = offs_m < L
    lp = lse_ptr + (bh.to(tl.int64) * L + offs_m) * 2
    hi = tl.load(lp, mask=rmask, other=float("-inf"))
    lo = tl.load(lp + 1, mask=rmask, other=float("-inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * L + offs_m, mask=rmask, other=0.0)
    ok = (tl.abs(hi) < float("inf")) & (tl.abs(lo) < float("inf"))
    nan_row = lo != lo
    z = tl.where(ok | nan_row, 1.0, 0.0)
    return tl.where(ok, hi, 0.0), tl.where(ok, lo, 0.0), z, tl.where(nan_row, 0.0, delta)


@triton.jit
def _p_tile(q, kt, qk_scale, log2e, hi, lo, z, bh, b, h, offs_m, offs_n, L, S, mask_ptr, smb, smh, sml, sms,
            HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    s = _scores(q, kt, qk_scale, log2e, bh, b, h, offs_m, offs_n, L, S, mask_ptr, smb, smh, sml, sms,
                HAS_MASK, CAUSAL, IEEE, ACC)
    return tl.exp2((s - hi[:, None]) - lo[:, None]) * z[:, None]


@triton.jit(do_not_specialize=["seed", "threshold"])
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                     mask_ptr, smb, smh, sml, sms, Hq, G, L, S, E, EV, c_ptr, seed, threshold, cos_ptr, sin_ptr,
                     HALF, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                     ACC: tl.constexpr, ROTARY: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr):
    qk_scale = tl.load(c_ptr)
    scale = tl.load(c_ptr + 1)
    inv_keep = tl.load(c_ptr + 2)
    log2e = tl.load(c_ptr + 3)
    pid_n, bhk = _split_pid(S, BLOCK_N)
    Hk = Hq // G
    b = bhk // Hk
    hk = bhk % Hk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rm = tl.arange(0, BLOCK_M)
    kt = tl.load(k_ptr + (bhk * S + offs_n[None, :]).to(tl.int64) * E + offs_d[:, None],
                 mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0)
    if ROTARY:
        kt = _rotate(kt, k_ptr + bhk * S * E, offs_n[None, :], offs_d[:, None], E, HALF, cos_ptr, sin_ptr,
                     offs_n[None, :] < S, False, ACC)
    vt = tl.load(v_ptr + (bhk * S + offs_n[None, :]).to(tl.int64) * EV + offs_dv[:, None],
                 mask=(offs_n[None, :] < S) & (offs_dv[:, None] < EV), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    m_begin = 0
    if CAUSAL:
        m_begin = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier query rows see none of these keys
    for g in range(0, G):
        h = hk * G + g
        bh = b * Hq + h
        for start_m in range(m_begin, L, BLOCK_M):
            offs_m = start_m + rm
            rmask = offs_m < L
            q = tl.load(q_ptr + (bh * L + offs_m[:, None]).to(tl.int64) * E + offs_d[None, :],
                        mask=rmask[:, None] & (offs_d[None, :] < E), other=0.0)
            if ROTARY:
                q = _rotate(q, q_ptr + bh * L * E, offs_m[:, None], offs_d[None, :], E, HALF, cos_ptr, sin_ptr,
                            rmask[:, None], False, ACC)
            do = tl.load(do_ptr + (bh * L + offs_m[:, None]).to(tl.int64) * EV + offs_dv[None, :],
                         mask=rmask[:, None] & (offs_dv[None, :] < EV), other=0.0)
            hi, lo, z, delta = _load_lse(lse_ptr, delta_ptr, bh, offs_m, L)
            p = _p_tile(q, kt, qk_scale, log2e, hi, lo, z, bh, b, h, offs_m, offs_n, L, S, mask_ptr, smb, smh, sml,
                        sms, HAS_MASK, CAUSAL, IEEE, ACC)
            if IEEE:
                dp = tl.dot(do, vt, input_precision="ieee").to(ACC)
            else:
                dp = tl.dot(do, vt).to(ACC)
            pv = p
            if DROPOUT:
                z = _dropout_scale(bh, L, offs_m, offs_n, seed, threshold, inv_keep)
                pv = p * z
                dp = dp * z
            ds = p * (dp - delta[:, None])
            if IEEE:
                dv += tl.dot(tl.trans(pv.to(do.dtype)), do, input_precision="ieee").to(ACC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee").to(ACC)
            else:
                dv += tl.dot(tl.trans(pv.to(do.dtype)), do).to(ACC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q).to(ACC)
    dk = dk * scale
    dk_ptrs = dk_ptr + (bhk * S + offs_n[:, None]).to(tl.int64) * E + offs_d[None, :]
    dk_mask = (offs_n[:, None] < S) & (offs_d[None, :] < E)
    if ROTARY:  # dk of the rotated k -> of k: the partner columns go through memory (this program's rows)
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=dk_mask)
        tl.debug_barrier()
        dk = _rotate(dk, dk_ptr + bhk * S * E, offs_n[:, None], offs_d[None, :], E, HALF, cos_ptr, sin_ptr,
                     offs_n[:, None] < S, True, ACC)
        tl.debug_barrier()
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptr + (bhk * S + offs_n[:, None]).to(tl.int64) * EV + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_dv[None, :] < EV))


@triton.jit(do_not_specialize=["seed", "threshold"])
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                   mask_ptr, smb, smh, sml, sms, Hq, G, L, S, E, EV, c_ptr, seed, threshold, cos_ptr, sin_ptr,
                   HALF, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                   ACC: tl.constexpr, ROTARY: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    qk_scale = tl.load(c_ptr)
    scale = tl.load(c_ptr + 1)
    inv_keep = tl.load(c_ptr + 2)
    log2e = tl.load(c_ptr + 3)
    pid_m, bh = _split_pid(L, BLOCK_M)
    b = bh // Hq
    h = bh % Hq
    bhk = b * (Hq // G) + h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rn = tl.arange(0, BLOCK_N)
    rmask = offs_m < L
    q = tl.load(q_ptr + (bh * L + offs_m[:, None]).to(tl.int64) * E + offs_d[None, :],
                mask=rmask[:, None] & (offs_d[None, :] < E), other=0.0)
    if ROTARY:
        q = _rotate(q, q_ptr + bh * L * E, offs_m[:, None], offs_d[None, :], E, HALF, cos_ptr, sin_ptr,
                    rmask[:, None], False, ACC)
    do = tl.load(do_ptr + (bh * L + offs_m[:, None]).to(tl.int64) * EV + offs_dv[None, :],
                 mask=rmask[:, None] & (offs_dv[None, :] < EV), other=0.0)
    hi, lo, z, delta = _load_lse(lse_ptr, delta_ptr, bh, offs_m, L)
    k_base = k_ptr + bhk.to(tl.int64) * S * E
    v_base = v_ptr + bhk.to(tl.int64) * S * EV
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    n_end = S
    if CAUSAL:
        n_end = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + rn
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * E + offs_d[:, None],
                     mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0)
        if ROTARY:
            kt = _rotate(kt, k_base, offs_n[None, :], offs_d[:, None], E, HALF, cos_ptr, sin_ptr, offs_n[None, :] < S,
                         False, ACC)
        vt = tl.load(v_base + offs_n[None, :].to(tl.int64) * EV + offs_dv[:, None],
                     mask=(offs_n[None, :] < S) & (offs_dv[:, None] < EV), other=0.0)
        p = _p_tile(q, kt, qk_scale, log2e, hi, lo, z, bh, b, h, offs_m, offs_n, L, S, mask_ptr, smb, smh, sml,
                    sms, HAS_MASK, CAUSAL, IEEE, ACC)
        if IEEE:
            dp = tl.dot(do, vt, input_precision="ieee").to(ACC)
        else:
            dp = tl.dot(do, vt).to(ACC)
        if DROPOUT:
            dp = dp * _dropout_scale(bh, L, offs_m, offs_n, seed, threshold, inv_keep)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee").to(ACC)
        else:
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt)).to(ACC)
    dq = dq * scale
    dq_ptrs = dq_ptr + (bh * L + offs_m[:, None]).to(tl.int64) * E + offs_d[None, :]
    dq_mask = rmask[:, None] & (offs_d[None, :] < E)
    if ROTARY:  # dq of the rotated q -> of q, as for dk
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=dq_mask)
        tl.debug_barrier()
        dq = _rotate(dq, dq_ptr + bh * L * E, offs_m[:, None], offs_d[None, :], E, HALF, cos_ptr, sin_ptr,
                     rmask[:, None], True, ACC)
        tl.debug_barrier()
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=dq_mask)


# ---------------------------------------------------------------------------
# launch configuration: autotuned per head dim on a GPU, one small config when interpreted
# ---------------------------------------------------------------------------

def _interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(block_d, kind):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates; smaller tiles for wide heads."""
    if _interpreted():
        return [(16, 16, 1, 1)]
    if block_d <= 64:
        cands = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)]
    elif block_d <= 128:
        cands = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 2)]
    else:
        cands = [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2)]
    if kind == "bwd":  # the backward holds more tiles: halve the larger block
        cands = [(min(m, 64), min(n, 128), w, min(s, 2)) for m, n, w, s in cands]
    return list(dict.fromkeys(cands))


_TUNED = {}


def _run(kernel, kind, grid_fn, args, consts, block_d, sizes):
    """Launch ``kernel``; on a GPU, time each candidate config once per (kernel, options, head dim,
    power-of-two bucket of the sizes) and keep the best."""
    cands = _configs(block_d, kind)
    shape_key = (kernel.fn.__name__, str(args[0].dtype), block_d, tuple(sorted(consts.items())),
                 tuple(triton.next_power_of_2(max(int(n), 1)) for n in sizes))

    def launch(cfg):
        bm, bn, w, s = cfg
        kernel[grid_fn(bm, bn)](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)

    if len(cands) == 1:
        launch(cands[0])
        return
    best = _TUNED.get(shape_key)
    if best is None:
        from triton.testing import do_bench

        times = []
        for cfg in cands:
            try:
                times.append((do_bench(lambda: launch(cfg), warmup=5, rep=20), cfg))
            except Exception:  # noqa: BLE001 -- a config that does not fit (shared memory) is skipped
                continue
        best = min(times)[1]
        _TUNED[shape_key] = best
    launch(best)


def _mask_args(mask, B, Hq, L, S, q):
    if mask is None:
        return q, 0, 0, 0, 0, False  # any pointer; never read
    st = [0 if mask.shape[d] == 1 else mask.stride(d) for d in range(4)]
    return mask, st[0], st[1], st[2], st[3], True


def _dropout_args(dropout_p, seed):
    threshold = min(1 << 24, int(round(dropout_p * (1 << 24))))
    inv_keep = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return seed & 0x7FFFFFFF, threshold, inv_keep, dropout_p > 0.0


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _consts(q, scale, inv_keep):
    """The kernels' float scalars (scale * log2 e, scale, 1 / (1 - p), log2 e) as a tensor of the
    accumulation dtype: a Python float argument would reach the kernel as fp32."""
    return _consts_cached(float(scale), float(inv_keep), _acc(q.dtype), q.device)


@functools.lru_cache(maxsize=64)
def _consts_cached(scale, inv_keep, dtype, device):
    # cached: building it is a host-to-device copy, which would stall every launch on a GPU (a model
    # uses a handful of (scale, dropout) pairs); the kernels only read it
    return torch.tensor([scale * LOG2E, scale, inv_keep, LOG2E], dtype=dtype, device=device)


def _rotary_args(q, cos, sin):
    """(cos, sin, R/2) for the kernels; any pointer and 0 without rotary."""
    if cos is None:
        return q, q, 0
    return cos.contiguous(), sin.contiguous(), cos.shape[1]


def attention_forward(q, k, v, mask, dropout_p, is_causal, scale, seed, cos=None, sin=None):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Hq, L, E = q.shape
    Hk, S, EV = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // max(Hk, 1)
    out = torch.empty(B, Hq, L, EV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, L, 2, device=q.device, dtype=_acc(q.dtype))  # (m, log2 l), base 2
    if out.numel() == 0 or lse.numel() == 0:
        lse.fill_(float("-inf"))
        out.zero_()
        return out, lse
    if S == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    mp, smb, smh, sml, sms, has_mask = _mask_args(mask, B, Hq, L, S, q)
    sd, thr, inv_keep, drop = _dropout_args(dropout_p, seed)
    bd, bdv = max(16, triton.next_power_of_2(E)), max(16, triton.next_power_of_2(EV))
    consts = dict(HAS_MASK=has_mask, CAUSAL=is_causal, DROPOUT=drop, IEEE=q.dtype in (torch.float32, torch.float64),
                  ACC=tl.float64 if q.dtype == torch.float64 else tl.float32, ROTARY=cos is not None,
                  BLOCK_D=bd, BLOCK_DV=bdv)
    args = (q, k, v, out, lse, mp, smb, smh, sml, sms, Hq, G, L, S, E, EV, _consts(q, scale, inv_keep), sd, thr,
            *_rotary_args(q, cos, sin))
    _run(_fwd_kernel, "fwd", lambda bm, bn: (triton.cdiv(L, bm) * B * Hq,), args, consts, max(bd, bdv), (B * Hq, L, S))
    return out, lse


def attention_backward(dout, q, k, v, mask, out, lse, dropout_p, is_causal, scale, seed, cos=None, sin=None):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    B, Hq, L, E = q.shape
    Hk, S, EV = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // max(Hk, 1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if L == 0 or S == 0 or B * Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(B, Hq, L, device=q.device, dtype=_acc(q.dtype))
    bdv = max(16, triton.next_power_of_2(EV))
    rows = B * Hq * L
    block_r = 16 if _interpreted() else max(16, min(64, 4096 // bdv))
    _delta_kernel[(triton.cdiv(rows, block_r),)](out, dout, delta, rows, EV, IEEE=q.dtype in (torch.float32, torch.float64),
                                                 BLOCK_R=block_r, BLOCK_DV=bdv)
    mp, smb, smh, sml, sms, has_mask = _mask_args(mask, B, Hq, L, S, q)
    sd, thr, inv_keep, drop = _dropout_args(dropout_p, seed)
    bd = max(16, triton.next_power_of_2(E))
    consts = dict(HAS_MASK=has_mask, CAUSAL=is_causal, DROPOUT=drop, IEEE=q.dtype in (torch.float32, torch.float64),
                  ACC=tl.float64 if q.dtype == torch.float64 else tl.float32, ROTARY=cos is not None,
                  BLOCK_D=bd, BLOCK_DV=bdv)
    common = (mp, smb, smh, sml, sms, Hq, G, L, S, E, EV, _consts(q, scale, inv_keep), sd, thr,
              *_rotary_args(q, cos, sin))
    _run(_bwd_dkdv_kernel, "bwd", lambda bm, bn: (triton.cdiv(S, bn) * B * Hk,),
         (q, k, v, dout, lse, delta, dk, dv) + common, consts, max(bd, bdv), (B * Hq, L, S))
    _run(_bwd_dq_kernel, "bwd", lambda bm, bn: (triton.cdiv(L, bm) * B * Hq,),
         (q, k, v, dout, lse, delta, dq) + common, consts, max(bd, bdv), (B * Hq, L, S))
    return dq, dk, dv
