"""The tensor-core attention kernels (csrc/cuda/attention_mma.cu, opt-in through SEQKERN_ATTN_MMA=1) run
on the CPU through the CUDA emulator of tests/test_cuda_emu.py, with csrc/cuda/mma.h's emulation of
mma.sync / ldmatrix (rebuilt from the PTX fragment layouts with warp shuffles) / cp.async (deferred to its
thread's wait_group, the destination poisoned until then), and are
compared with the fp64 reference and with the SIMT kernel in fp16 and bf16. This checks the kernels'
indexing, masking, softmax and fragment bookkeeping; the real instructions, timing and the memory
model are only exercised on a GPU (bench/gpu_check.sh)."""
import ctypes
import os

import pytest
import torch

from seqkern.ops import attention as A

from helpers import MMA_ATTN_CASES

try:  # the emulator's build and ctypes mirrors live with its own tests
    import test_cuda_emu as emu
except ImportError as e:  # pragma: no cover
    pytest.skip(f"the CUDA emulator (tests/test_cuda_emu.py) is not here: {e}", allow_module_level=True)


class MmaParams(ctypes.Structure):
    # emu.AttnParams plus the last field, which sits in the tail padding (a ctypes subclass would put it
    # after the padding)
    _fields_ = list(emu.AttnParams._fields_) + [("mma", ctypes.c_bool)]


@pytest.fixture(scope="module")
def lib():
    path = os.environ.get("SEQKERN_MMA_EMU_LIB") or emu._build()
    so = ctypes.CDLL(path)
    so.sk_emu_last_failure.restype = ctypes.c_char_p
    return so


def _call(lib, name, *args):
    rc = getattr(lib, name)(*args)
    assert rc == 0, f"{name} returned cudaError {rc}: {lib.sk_emu_last_failure().decode()}"


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _params(q, k, v, mask, causal, p, seed, mma):
    prm = MmaParams()
    prm.dtype = emu.DT[q.dtype]
    prm.q, prm.k, prm.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    if mask is not None:
        prm.mask = mask.data_ptr()
        prm.mask_sb, prm.mask_sh, prm.mask_sl, prm.mask_ss = (
            0 if mask.shape[d] == 1 else mask.stride(d) for d in range(4))
    prm.B, prm.Hq, prm.Hk, prm.L, prm.S = q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    prm.E, prm.Ev = q.shape[3], v.shape[3]
    prm.scale = q.shape[-1] ** -0.5
    prm.causal = causal
    prm.dropout = p > 0.0
    prm.seed = seed & 0xFFFFFFFF
    prm.threshold = A.dropout_threshold(p)
    prm.inv_keep = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    prm.mma = mma
    return prm


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _run(lib, q, k, v, mask, causal, p, dout, mma, seed=987654321):
    """out, lse, dq, dk, dv of the emulated CUDA kernels (every output starts as NaN)."""
    B, Hq, L, Ev = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    prm = _params(q, k, v, mask, causal, p, seed, mma)
    out, lse = _nan(B, Hq, L, Ev, dtype=q.dtype), _nan(B, Hq, L, dtype=torch.float32)
    _call(lib, "emu_attention_forward", ctypes.byref(prm), _ptr(out), _ptr(lse))
    dq, dk, dv = _nan(*q.shape, dtype=q.dtype), _nan(*k.shape, dtype=q.dtype), _nan(*v.shape, dtype=q.dtype)
    delta = _nan(B, Hq, L, dtype=torch.float32)
    _call(lib, "emu_attention_backward", ctypes.byref(prm), _ptr(dout), _ptr(out), _ptr(lse), _ptr(delta), _ptr(dq),
          _ptr(dk), _ptr(dv))
    return out, lse, dq, dk, dv


def _inputs(case, dtype):
    B, Hq, Hk, L, S, E, Ev, mask_kind, causal, p = case
    g = torch.Generator().manual_seed(sum(map(ord, repr(case))))
    q = torch.randn(B, Hq, L, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, S, E, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, S, Ev, generator=g, dtype=torch.float64)
    mask = None
    if mask_kind == "additive":  # broadcast over heads
        mask = torch.randn(B, 1, L, S, generator=g, dtype=torch.float64) * 2
    elif mask_kind == "keys":  # a boolean key mask as the binding passes it (0 / -inf), broadcast over b and i
        keep = torch.rand(1, Hq, 1, S, generator=g) > 0.3
        keep[..., 0] = True
        mask = torch.where(keep, 0.0, float("-inf")).to(torch.float64)
    elif mask_kind == "dead_rows":  # every third query row sees no key at all
        keep = torch.rand(B, 1, L, S, generator=g) > 0.5
        keep[:, :, ::3] = False
        mask = torch.where(keep, 0.0, float("-inf")).to(torch.float64)
    dout = torch.randn(B, Hq, L, Ev, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype).contiguous()
    return cast(q), cast(k), cast(v), cast(mask), causal, p, cast(dout)


# tests/helpers.py (the GPU runs those too, test_attention_cuda_mma.py), and a key mask with causal, which
# only the kernels take (the public op refuses a mask with is_causal, as torch does)
CASES = MMA_ATTN_CASES + [(1, 2, 2, 17, 40, 20, 36, "keys", True, 0.0)]


def _max_err(got, want):
    return (got.double() - want).abs().max().item() if got.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_mma_matches_reference(lib, case, dtype):
    q, k, v, mask, causal, p, dout = _inputs(case, dtype)
    seed = 987654321
    got = _run(lib, q, k, v, mask, causal, p, dout, mma=True, seed=seed)
    simt = _run(lib, q, k, v, mask, causal, p, dout, mma=False, seed=seed)
    for t, name in zip(got, ("out", "lse", "dq", "dk", "dv")):
        assert not torch.isnan(t).any(), f"{name}: NaN (an element not written, or a 0/0)"
    d64 = [None if t is None else t.double() for t in (q, k, v, mask)]
    scale = q.shape[-1] ** -0.5
    want, want_lse = A.sdpa_reference_canonical(*d64, p, causal, scale, seed)
    grads = A.sdpa_reference_backward(dout.double(), *d64, want, want_lse, p, causal, scale, seed)[:3]
    # the tensor-core path rounds P to the input dtype before P^T dO; its error may be a few times the
    # SIMT kernel's (fp32 P), never more than a small bound
    eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    for i, (name, w) in enumerate(zip(("out", "lse", "dq", "dk", "dv"), (want, want_lse) + grads)):
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(got[i]), finite), f"{name}: -inf where the reference has none, or back"
        if name == "lse":
            assert torch.equal(got[i][~finite], w[~finite].float())
        err_mma, err_simt = _max_err(got[i][finite], w[finite]), _max_err(simt[i][finite], w[finite])
        bound = max(4 * err_simt, 8 * eps * max(1.0, w[finite].abs().max().item() if finite.any() else 1.0))
        assert err_mma <= bound, f"{name}: max error {err_mma:.3g} (SIMT {err_simt:.3g}, bound {bound:.3g})"
    if mask is not None and torch.isinf(mask).all(-1).any():
        dead = torch.isinf(mask).all(-1).expand(q.shape[0], q.shape[1], q.shape[2])
        assert torch.isneginf(got[1][dead]).all() and (got[0][dead] == 0).all() and (got[2][dead] == 0).all()


# (B, Hq, Hk, L, S, E, Ev, causal): causal and not, L != S both ways, D 16/64/128, GQA
RULE_CASES = [
    (1, 2, 2, 70, 70, 64, 64, True),
    (1, 4, 2, 33, 100, 128, 128, False),
    (1, 2, 2, 100, 45, 16, 16, True),
    (1, 4, 1, 64, 130, 64, 64, False),
]


def _reference_with_grads(q, k, v, causal, dout, dtype):
    from seqkern import functional as SF
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    o = SF.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, backend="reference")
    o.backward(dout.to(dtype))
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("mma", [False, True], ids=["simt", "mma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", RULE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_half_error_at_most_twice_the_references_in_that_dtype(lib, case, dtype, mma):
    # DESIGN.md "Numerics", literally: error against the fp32 reference (on the upcast half inputs) at most
    # twice that of the same reference run in the half dtype; max abs error of O, dQ, dK, dV
    q, k, v, _, causal, p, dout = _inputs(case[:7] + (None, case[7], 0.0), dtype)
    r32 = _reference_with_grads(q, k, v, causal, dout, torch.float32)
    rh = _reference_with_grads(q, k, v, causal, dout, dtype)
    out, _, dq, dk, dv = _run(lib, q, k, v, None, causal, p, dout, mma=mma)
    for name, got, half, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), rh, r32):
        err, err_ref = _max_err(got, want), _max_err(half, want)
        assert err <= 2 * err_ref, f"{name}: error {err:.3g} = {err / err_ref:.2f}x the {dtype} reference's"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_dropout_mask_is_the_simt_one(lib, dtype):
    # q = 0 makes P uniform and v = I makes out = P o Z / rowsum: zeros of out are the dropped elements
    B, H, L, S, p = 1, 2, 70, 80, 0.3
    q = torch.zeros(B, H, L, 16, dtype=dtype)
    k = torch.randn(B, H, S, 16, dtype=torch.float64).to(dtype)
    v = torch.eye(S, dtype=dtype).expand(B, H, S, S).contiguous()
    dout = torch.randn(B, H, L, S, dtype=torch.float64).to(dtype)
    seed = 424242
    mma = _run(lib, q, k, v, None, False, p, dout, mma=True, seed=seed)
    simt = _run(lib, q, k, v, None, False, p, dout, mma=False, seed=seed)
    keep = (A.dropout_keep(seed, B * H, L, S) >= A.dropout_threshold(p)).view(B, H, L, S)
    assert torch.equal(mma[0] != 0, keep)
    assert torch.equal(simt[0] != 0, keep)
    # dv of a dropped (i, j) gets nothing from row i: both kernels agree on the gradients' support too
    torch.testing.assert_close(mma[4].float(), simt[4].float(), rtol=2e-2, atol=2e-2)


def test_mma_zero_lengths(lib):
    q = torch.randn(1, 2, 5, 32, dtype=torch.float64).half()
    k = torch.zeros(1, 2, 0, 32, dtype=torch.float16)
    v = torch.zeros(1, 2, 0, 32, dtype=torch.float16)
    dout = torch.randn(1, 2, 5, 32, dtype=torch.float64).half()
    out, lse, dq, dk, dv = _run(lib, q, k, v, None, False, 0.0, dout, mma=True)
    assert (out == 0).all() and torch.isneginf(lse).all() and (dq == 0).all()


# ---------------------------------------------------------------------------
# the wrappers alone (tests/cuda_emu_mma_wrappers.cu): one warp, layouts from the PTX ISA
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wlib(tmp_path_factory):
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    out = str(tmp_path_factory.mktemp("mma_wrappers") / "libmmaw.so")
    flags = emu.FLAGS + ["-I", os.path.join(os.path.dirname(here), "csrc")]
    srcs = [os.path.join(here, "cuda_emu_mma_wrappers.cu"), os.path.join(emu.EMU, "emu.cpp")]
    objs = []
    for s in srcs:
        o = out + "." + os.path.basename(s) + ".o"
        lang = ["-x", "c++"] if s.endswith(".cu") else []
        r = subprocess.run([emu.CXX] + lang + flags + ["-c", s, "-o", o], capture_output=True, text=True)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
        objs.append(o)
    subprocess.run([emu.CXX, "-shared", "-o", out] + objs + (["-fsanitize=address"] if emu.ASAN else []), check=True)
    return ctypes.CDLL(out)


def _bits(t):
    return t.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_wrapper_mma_product(wlib, dtype):
    g = torch.Generator().manual_seed(5)
    # small integers: every product and sum is exact in fp32, so the result is exact whatever the order
    A_ = torch.randint(-8, 9, (16, 16), generator=g).to(dtype)
    B_ = torch.randint(-8, 9, (16, 8), generator=g).to(dtype)
    D = torch.full((16, 8), float("nan"))
    assert wlib.mma_emu_product(int(dtype == torch.bfloat16), _ptr(A_), _ptr(B_), _ptr(D)) == 0
    assert torch.equal(D.double(), 2 * A_.double() @ B_.double())


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_wrapper_ldmatrix(wlib, trans):
    M = torch.arange(32 * 8, dtype=torch.int16).view(32, 8)  # value = 8 * row + col: where it came from
    out = torch.zeros(32, 4, dtype=torch.int32)
    assert wlib.mma_emu_ldmatrix(_ptr(M), _ptr(out), int(trans)) == 0
    for lane in range(32):
        for k in range(4):
            mat = M[8 * k:8 * k + 8]
            if trans:  # the lane holds (2 (lane % 4), lane / 4) and (2 (lane % 4) + 1, lane / 4)
                lo, hi = mat[2 * (lane % 4), lane // 4], mat[2 * (lane % 4) + 1, lane // 4]
            else:  # row lane / 4, columns 2 (lane % 4) and 2 (lane % 4) + 1
                lo, hi = mat[lane // 4, 2 * (lane % 4)], mat[lane // 4, 2 * (lane % 4) + 1]
            reg = int(out[lane, k]) & 0xFFFFFFFF
            assert (reg & 0xFFFF, reg >> 16) == (int(lo), int(hi)), (lane, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_wrapper_pack_rounds_like_torch(wlib, dtype):
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-9, 6, (4000,), generator=g),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0 ** -24, 2.0 ** -25,
                                 3 * 2.0 ** -26, 2.0 ** -14 - 2.0 ** -25, float("inf"), float("-inf"), 1e-40])])
    x = x[: x.numel() // 2 * 2].float().contiguous()
    out = torch.zeros(x.numel() // 2, dtype=torch.int32)
    wlib.mma_emu_pack(int(dtype == torch.bfloat16), _ptr(x), _ptr(out), ctypes.c_int64(out.numel()))
    want = _bits(x.to(dtype)).view(-1, 2)
    got = torch.stack([out & 0xFFFF, (out >> 16) & 0xFFFF], 1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("order,seed", [(1, 0), (2, 3)], ids=["descending", "shuffled"])
def test_mma_results_do_not_depend_on_the_schedule(lib, order, seed):
    # a missing barrier between the warps of a block shows as a result that changes with the thread order
    # (cp.async copies land at their thread's wait_group: test_a_short_cp_async_wait_shows)
    runs = []
    for o in (0, order):
        lib.sk_emu_set_schedule(o, seed)
        try:
            outs = []
            for case in (CASES[1], CASES[6], CASES[7]):
                q, k, v, mask, causal, p, dout = _inputs(case, torch.bfloat16)
                outs += _run(lib, q, k, v, mask, causal, p, dout, mma=True)
            runs.append(outs)
        finally:
            lib.sk_emu_set_schedule(0, 0)
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"output {i} differs between thread orders"


def test_a_short_cp_async_wait_shows(lib):
    # mma.h defers each cp.async to its thread's wait_group and poisons the destination until then; built
    # with every wait one group short, the kernels must read poison (NaN) or stale tiles somewhere
    short = ctypes.CDLL(emu._build(["-DSEQKERN_EMU_CP_ASYNC_WAIT_SHIFT=1"]))
    short.sk_emu_last_failure.restype = ctypes.c_char_p
    q, k, v, mask, causal, p, dout = _inputs(CASES[1], torch.float16)
    want = _run(lib, q, k, v, mask, causal, p, dout, mma=True)
    got = _run(short, q, k, v, mask, causal, p, dout, mma=True)
    assert not all(torch.equal(a, b) for a, b in zip(got, want))


def _offset_copy(t):
    """t's values in a view one element into a larger buffer: a base pointer that is not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_unaligned_inputs_take_the_scalar_loads(lib, dtype):
    # E, Ev multiples of 8 but the bases 2 bytes off: cp.async (16-byte chunks) must not be used
    case = (1, 2, 1, 70, 45, 64, 64, "additive", True, 0.0)
    q, k, v, mask, causal, p, dout = _inputs(case, dtype)
    want = _run(lib, q, k, v, mask, causal, p, dout, mma=True)
    got = _run(lib, *(_offset_copy(t) for t in (q, k, v)), mask, causal, p, _offset_copy(dout), mma=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i} differs with unaligned inputs"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_large_logits_stay_finite(lib, dtype):
    # scores of +-thousands: the running max keeps every exponent <= 0
    g = torch.Generator().manual_seed(11)
    q, k, v, dout = (torch.randn(1, 2, n, 32, generator=g, dtype=torch.float64) * s
                     for n, s in ((70, 30.0), (90, 30.0), (90, 1.0), (70, 1.0)))
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    got = _run(lib, q, k, v, None, False, 0.0, dout, mma=True)
    for i, t in enumerate(got):
        assert torch.isfinite(t).all(), f"output {i} has NaN or inf"
    want, want_lse = A.sdpa_reference_canonical(q.double(), k.double(), v.double(), None, 0.0, False,
                                                32 ** -0.5, 0)
    torch.testing.assert_close(got[1].double(), want_lse, rtol=1e-3, atol=1e-2)


def test_mma_refuses_a_grid_past_its_limit(lib):
    # as test_cuda_emu.test_attention_refuses_a_grid_past_its_limit, through the tensor-core launchers:
    # B = 2^32 + 1 (one block per (b, h) at L, S <= 64) is refused, not wrapped to one block
    q, k, v = (torch.randn(1, 1, 1, 16, dtype=torch.float64).half() for _ in range(3))
    prm = _params(q, k, v, None, False, 0.0, 0, mma=True)
    prm.B = (1 << 32) + 1
    out, lse = _nan(1, 1, 1, 16, dtype=torch.float16), _nan(1, 1, 1, dtype=torch.float32)
    assert lib.emu_attention_forward(ctypes.byref(prm), _ptr(out), _ptr(lse)) == 9  # cudaErrorInvalidConfiguration
    assert out.isnan().all() and lse.isnan().all()
    prm.L = 0
    dk, dv = _nan(1, 1, 1, 16, dtype=torch.float16), _nan(1, 1, 1, 16, dtype=torch.float16)
    assert lib.emu_attention_backward(ctypes.byref(prm), None, None, None, None, None, _ptr(dk), _ptr(dv)) == 9
    assert dk.isnan().all() and dv.isnan().all()

