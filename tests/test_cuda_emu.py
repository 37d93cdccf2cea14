"""The CUDA kernels of csrc/cuda/*.cu run on the CPU: compiled as host C++ against the emulator in
tests/cuda_emu (one fiber per CUDA thread, warp collectives and barriers as checked rendezvous) and
compared with the reference backend. No GPU has ever run them; this is where their logic is tested.
The library is built on first use into build/cuda_emu/<hash of the sources and flags>.
SEQKERN_EMU_ASAN=1 builds it with AddressSanitizer (libasan must then be preloaded, see
test_emulated_kernels_under_asan)."""
import contextlib
import ctypes
import hashlib
import glob
import os
import subprocess
import sys

import pytest
import torch

from seqkern.ops import attention as A
from seqkern.ops import rnn as R
from seqkern.ops.rotary import _rotate_reference
from seqkern.ops.wkv import _reference_backward as wkv_ref_backward
from seqkern.ops.wkv import wkv4_initial_state, wkv4_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
ASAN = os.environ.get("SEQKERN_EMU_ASAN") == "1"
CXX = os.environ.get("CXX", "g++")
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) + [
    os.path.join(EMU, "emu.cpp"), os.path.join(EMU, "api.cpp"), os.path.join(EMU, "selftest.cu")]
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-DSEQKERN_CUDA_EMULATE", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
         "-I", os.path.join(EMU, "include"), "-I", os.path.join(ROOT, "csrc")]
if ASAN:
    FLAGS += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]

DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _build(extra=()):
    """extra: more compiler flags (a mutated variant of the kernels, built into its own directory)."""
    flags = FLAGS + list(extra)
    h = hashlib.sha256(" ".join([CXX] + flags).encode())
    deps = SOURCES + sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h")) +
                            glob.glob(os.path.join(EMU, "include", "*.h")))
    for p in deps:
        with open(p, "rb") as f:
            h.update(p.encode() + f.read())
    out = os.path.join(ROOT, "build", "cuda_emu", h.hexdigest()[:16])
    lib = os.path.join(out, "libskemu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out, exist_ok=True)
    objs, procs = [], []
    for src in SOURCES:
        obj = os.path.join(out, os.path.basename(src) + f".{os.getpid()}.o")
        lang = ["-x", "c++"] if src.endswith(".cu") else []
        procs.append((src, subprocess.Popen([CXX] + lang + flags + ["-c", src, "-o", obj], stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)))
        objs.append(obj)
    for src, p in procs:
        log = p.communicate()[0]
        assert p.returncode == 0 and "warning" not in log, f"{src}:\n{log}"
    tmp = lib + f".{os.getpid()}"
    subprocess.run([CXX, "-shared", "-o", tmp] + objs + (["-fsanitize=address"] if ASAN else []), check=True)
    os.replace(tmp, lib)  # atomic: a concurrent run sees the whole library or none
    for o in objs:
        os.remove(o)
    return lib


# ---------------------------------------------------------------------------
# ctypes mirrors of csrc/cuda/*.h (checked against the C++ layouts in test_struct_layouts)
# ---------------------------------------------------------------------------

P = ctypes.c_void_p
I64 = ctypes.c_int64


class AttnParams(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("q", P), ("k", P), ("v", P), ("mask", P),
                ("mask_sb", I64), ("mask_sh", I64), ("mask_sl", I64), ("mask_ss", I64),
                ("B", I64), ("Hq", I64), ("Hk", I64), ("L", I64), ("S", I64), ("E", I64), ("Ev", I64),
                ("scale", ctypes.c_float), ("causal", ctypes.c_bool), ("dropout", ctypes.c_bool),
                ("seed", ctypes.c_uint32), ("threshold", ctypes.c_uint32), ("inv_keep", ctypes.c_float)]


class RnnShape(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int), ("dtype", ctypes.c_int), ("T", I64), ("B", I64), ("H", I64), ("P", I64),
                ("proj", ctypes.c_bool), ("reverse", ctypes.c_bool), ("lengths", P)]


class RnnForwardStep(ctypes.Structure):
    _fields_ = [(n, P) for n in ("g", "xw", "hp", "hx", "cp", "cn", "hc", "hn", "b_hn", "y")]


class RnnBackwardStep(ctypes.Structure):
    _fields_ = [(n, P) for n in ("dgs", "dgi", "dhh", "dhT", "dy", "dhc", "dcc", "gates", "c", "h", "hn")] + [
        ("separate", ctypes.c_bool)]


class RnnPersistentForward(ctypes.Structure):
    _fields_ = [(n, P) for n in ("xw", "w_hh", "b_hn", "h", "c", "gates", "hn", "y")] + [
        ("barrier", P), ("save", ctypes.c_bool)]


@pytest.fixture(scope="module")
def lib():
    so = ctypes.CDLL(_build())
    so.emu_last_failure = so.sk_emu_last_failure
    so.emu_last_failure.restype = ctypes.c_char_p
    return so


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def call(lib, name, *args):
    rc = getattr(lib, name)(*args)
    assert rc == 0, f"{name} returned cudaError {rc}: {lib.emu_last_failure().decode()}"


def poisoned(*shape, dtype):
    """An output buffer full of NaN: an element the kernel should write but does not shows."""
    return torch.full(shape, float("nan"), dtype=dtype)


def close(got, want, dtype, what, scale=1.0):
    tol = scale * {torch.float64: 1e-10, torch.float32: 3e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    # half types: errors scale with the largest magnitude (a gradient summed over many rounded terms)
    atol = tol * max(1.0, want.abs().max().item()) if dtype in (torch.float16, torch.bfloat16) and want.numel() else tol
    torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("which,code,message", [
    (0, 719, "divergent warp collective"),
    (1, 719, "exited"),
    (2, 719, "__syncthreads reached at different lines"),
    (3, 719, "deadlock"),
    (4, 1, ""),  # cudaErrorInvalidValue: more dynamic shared memory than the kernel's attribute allows
    (5, 0, ""),
    (6, 719, "static __shared__ variable in a cooperative kernel"),
    (7, 719, "spin loop that never ends"),
    (9, 9, ""),  # cudaErrorInvalidConfiguration
    (10, 9, ""),
])
def test_emulator_reports(lib, which, code, message):
    """The emulator turns what is undefined or fails on a GPU into an error with a message."""
    buf = torch.zeros(1024)
    assert lib.emu_selftest(which, ptr(buf)) == code
    assert message in lib.emu_last_failure().decode()
    assert lib.emu_selftest(5, ptr(buf)) == 0  # and the next launch runs normally


def test_emulator_primitives(lib):
    out = torch.full((64, 4), -1, dtype=torch.int32)
    assert lib.emu_selftest(8, ptr(out)) == 0
    t = torch.arange(64)
    bits = ((63 - t) % 3 == 0).view(2, 32)  # per warp: bit lane of (63 - lane') % 3 == 0
    ballot = [sum(1 << i for i in range(32) if bits[w, i]) for w in range(2)]
    want_ballot = torch.tensor([ballot[i // 32] for i in range(64)], dtype=torch.int64).to(torch.int32)
    assert torch.equal(out[:, 0], want_ballot)
    assert torch.equal(out[:, 1], torch.where(t % 32 >= 3, t - 3, t).to(torch.int32))
    assert torch.equal(out[:, 2], torch.tensor([0] * 32 + [1] * 32, dtype=torch.int32))
    assert torch.equal(out[:, 3], torch.tensor([1] * 32 + [0] * 32, dtype=torch.int32))


def test_emulator_block_reductions_and_bit_intrinsics(lib):
    out = torch.full((96, 8), -1, dtype=torch.int32)
    assert lib.emu_selftest(11, ptr(out)) == 0
    assert (out[:, 0] == 32).all() and (out[:, 1] == 1).all() and (out[:, 2] == 1).all() and (out[:, 3] == 0).all()
    popc = [bin((i * 2654435761) & 0xFFFFFFFF).count("1") for i in range(96)]
    clz_ffs = [(32 - i.bit_length()) + 100 * ((i & -i).bit_length()) for i in range(96)]
    brev = [int(f"{i:032b}"[::-1], 2) >> 16 for i in range(96)]
    assert out[:, 4].tolist() == popc and out[:, 5].tolist() == clz_ffs and out[:, 6].tolist() == brev
    assert (out[:, 7] == 0x7FFFFFFF).all()


def test_half_conversions_round_to_nearest_even(lib):
    # every fp32 bit pattern class: subnormal/normal/overflow boundaries, ties, NaN, inf
    x = torch.cat((torch.randn(20000) * torch.logspace(-9, 5, 20000), torch.tensor(
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14,
         1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, float("inf"), float("-inf"), float("nan"), 3.4e38])))
    for dt in (torch.float16, torch.bfloat16):
        got = torch.empty(x.shape, dtype=dt)
        back = torch.empty(x.shape, dtype=torch.float32)
        lib.emu_convert(DT[dt], ptr(x), ptr(got), ptr(back), I64(x.numel()))
        want = x.to(dt)
        assert torch.equal(got.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()]), dt
        assert got.isnan().equal(want.isnan())
        assert torch.equal(back, want.float()) or torch.equal(back.isnan(), want.isnan())


def test_struct_layouts(lib):
    got = (ctypes.c_int64 * 10)()
    lib.emu_layouts(got)
    want = []
    for cls, last in ((AttnParams, "inv_keep"), (RnnShape, "lengths"), (RnnForwardStep, "y"),
                      (RnnBackwardStep, "separate"), (RnnPersistentForward, "save")):
        want += [ctypes.sizeof(cls), getattr(cls, last).offset]
    assert list(got) == want


# ---------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved,inverse", [(False, False), (True, False), (False, True), (True, True)])
def test_rotary(lib, dtype, interleaved, inverse):
    _rotary(lib, dtype, interleaved, inverse)


def _rotary(lib, dtype, interleaved, inverse):
    rows_per_t, T, D, half = 3, 37, 20, 7  # 6 pass-through dims; 3*37*13 threads span several blocks
    g = torch.Generator().manual_seed(4)
    x = torch.randn(rows_per_t, T, D, generator=g).to(dtype)
    ang = torch.randn(T, half, generator=g, dtype=torch.float64)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    out = poisoned(rows_per_t, T, D, dtype=dtype)
    call(lib, "emu_rotary", DT[dtype], ptr(x), ptr(out), ptr(cos), ptr(sin), I64(rows_per_t * T), I64(T), I64(D),
         I64(half), ctypes.c_bool(interleaved), ctypes.c_bool(inverse))
    want = _rotate_reference(x, cos, sin, interleaved, inverse)
    close(out, want, dtype, "rotary")
    assert torch.equal(out[..., 2 * half:], x[..., 2 * half:])
    return out


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------

# (B, Hq, Hk, L, S, E, Ev, mask, causal, dropout_p); lengths not multiples of the 8-row blocks or the
# 32-key tiles, GQA, L != S both ways, head dims 16..256 (every NT), masks broadcast along some dims
ATTN_CASES = [
    (1, 2, 2, 17, 33, 40, 40, None, False, 0.0),
    (2, 2, 1, 33, 17, 72, 72, "additive", False, 0.0),
    (1, 4, 2, 1, 33, 64, 48, "bool", False, 0.0),
    (1, 1, 1, 9, 20, 256, 200, None, False, 0.0),
    (1, 2, 2, 33, 33, 32, 32, None, True, 0.3),
    (2, 1, 1, 17, 40, 16, 24, "bool", True, 0.0),
    (1, 2, 1, 40, 17, 24, 16, None, True, 0.0),
    (1, 2, 2, 20, 36, 40, 40, "dead_rows", False, 0.2),
    (1, 8, 1, 3, 5, 1, 1, "key_independent", True, 0.5),  # G = 8, one-element heads, mask (B, H, L, 1)
    (1, 1, 1, 1, 1, 256, 8, None, False, 0.0),
]


def _attn_inputs(case, dtype):
    B, Hq, Hk, L, S, E, Ev, mask_kind, causal, p = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    q = torch.randn(B, Hq, L, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, S, E, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, S, Ev, generator=g, dtype=torch.float64)
    mask = None
    if mask_kind == "additive":
        mask = torch.randn(B, 1, L, S, generator=g, dtype=torch.float64)
    elif mask_kind == "bool":  # the binding's conversion: True keeps (0), False drops (-inf)
        keep = torch.rand(1, Hq, 1, S, generator=g) > 0.3
        keep[..., 0] = True
        mask = torch.where(keep, 0.0, float("-inf")).to(torch.float64)
    elif mask_kind == "key_independent":  # stride 0 along the keys
        mask = torch.randn(B, Hq, L, 1, generator=g, dtype=torch.float64)
    elif mask_kind == "dead_rows":
        keep = torch.rand(B, 1, L, S, generator=g) > 0.5
        keep[:, :, ::3] = False  # every third query row sees no key at all
        mask = torch.where(keep, 0.0, float("-inf")).to(torch.float64)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = None if mask is None else mask.to(dtype)
    return q, k, v, mask, causal, p


def _attn_params(q, k, v, mask, causal, p, seed, dtype):
    prm = AttnParams()
    prm.dtype = DT[dtype]
    prm.q, prm.k, prm.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    if mask is not None:
        prm.mask = mask.data_ptr()
        prm.mask_sb, prm.mask_sh, prm.mask_sl, prm.mask_ss = (
            0 if mask.shape[d] == 1 else mask.stride(d) for d in range(4))
    prm.B, prm.Hq, prm.Hk, prm.L, prm.S, prm.E = q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    prm.Ev = v.shape[3]
    prm.scale = q.shape[-1] ** -0.5
    prm.causal = causal
    prm.dropout = p > 0.0
    prm.seed = seed & 0xFFFFFFFF
    prm.threshold = A.dropout_threshold(p)
    prm.inv_keep = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    return prm


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_forward_backward(lib, case):
    _attention(lib, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [ATTN_CASES[1], ATTN_CASES[7]], ids=["gqa-additive", "dead-rows-dropout"])
def test_attention_half_types(lib, case, dtype):
    _attention(lib, case, dtype)


def _cpu_op():
    import seqkern  # noqa: F401  (loads seqkern._C when built)

    if not hasattr(torch.ops.seqkern_C, "sdpa_forward"):
        pytest.skip("seqkern._C is not built")
    return torch.ops.seqkern_C


@pytest.mark.parametrize("case", [ATTN_CASES[4], ATTN_CASES[7]], ids=["causal", "dead-rows"])
def test_attention_dropout_matches_cpu_backend(lib, case):
    """The same seed drops the same elements as the cpu backend (both hash (row, column))."""
    ops = _cpu_op()
    q, k, v, mask, causal, p = _attn_inputs(case, torch.float32)
    seed = (1 << 40) + 977  # past 32 bits: both sides keep the low 32
    scale = q.shape[-1] ** -0.5
    out_cpu, lse_cpu = ops.sdpa_forward(q, k, v, mask, p, causal, scale, seed)
    emu_out, emu_lse, dq, dk, dv = _attention_run(lib, q, k, v, mask, causal, p, seed)
    close(emu_out, out_cpu, torch.float32, "out")
    close(emu_lse, lse_cpu.sum(-1), torch.float32, "lse")
    dout = torch.randn(out_cpu.shape, generator=torch.Generator().manual_seed(9))
    gq, gk, gv = ops.sdpa_backward(dout, q, k, v, mask, out_cpu, lse_cpu, p, causal, scale, seed)
    for got, want, name in ((dq, gq, "dq"), (dk, gk, "dk"), (dv, gv, "dv")):
        close(got, want, torch.float32, name)


def _attention_run(lib, q, k, v, mask, causal, p, seed):
    B, Hq, L, Ev = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    prm = _attn_params(q, k, v, mask, causal, p, seed, q.dtype)
    out, lse = poisoned(B, Hq, L, Ev, dtype=q.dtype), poisoned(B, Hq, L, dtype=torch.float32)
    call(lib, "emu_attention_forward", ctypes.byref(prm), ptr(out), ptr(lse))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(q.dtype)
    dq, dk, dv = (poisoned(*t.shape, dtype=q.dtype) for t in (q, k, v))
    delta = poisoned(B, Hq, L, dtype=torch.float32)
    call(lib, "emu_attention_backward", ctypes.byref(prm), ptr(dout), ptr(out), ptr(lse), ptr(delta), ptr(dq),
         ptr(dk), ptr(dv))
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("L,S", [(5, 0), (0, 7)])
def test_attention_empty_side(lib, L, S):
    """No keys: out 0, lse -inf, dq 0; no queries: dk, dv 0 (the kernels launch for one side only)."""
    q, k, v = torch.randn(1, 2, L, 8), torch.randn(1, 2, S, 8), torch.randn(1, 2, S, 8)
    prm = _attn_params(q, k, v, None, False, 0.0, 0, torch.float32)
    out, lse = poisoned(1, 2, L, 8, dtype=torch.float32), poisoned(1, 2, L, dtype=torch.float32)
    call(lib, "emu_attention_forward", ctypes.byref(prm), ptr(out), ptr(lse))
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = poisoned(*q.shape, dtype=torch.float32), poisoned(*k.shape, dtype=torch.float32), poisoned(
        *v.shape, dtype=torch.float32)
    dout, delta = torch.randn(1, 2, L, 8), torch.empty(1, 2, L)  # held: ptr() keeps no reference
    call(lib, "emu_attention_backward", ctypes.byref(prm), ptr(dout), ptr(out), ptr(lse), ptr(delta), ptr(dq),
         ptr(dk), ptr(dv))
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def _attention(lib, case, dtype):
    q, k, v, mask, causal, p = _attn_inputs(case, dtype)
    seed = 1234567
    B, Hq, L, Ev, S = q.shape[0], q.shape[1], q.shape[2], v.shape[3], k.shape[2]
    prm = _attn_params(q, k, v, mask, causal, p, seed, dtype)
    out, lse = poisoned(B, Hq, L, Ev, dtype=dtype), poisoned(B, Hq, L, dtype=torch.float32)
    call(lib, "emu_attention_forward", ctypes.byref(prm), ptr(out), ptr(lse))
    d64 = [None if t is None else t.double() for t in (q, k, v, mask)]
    want, want_lse = A.sdpa_reference_canonical(*d64, p, causal, prm.scale, seed)
    close(out, want, dtype, "out")
    close(lse, want_lse, dtype, "lse")
    dout = torch.randn(B, Hq, L, Ev, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    dq, dk, dv = poisoned(*q.shape, dtype=dtype), poisoned(*k.shape, dtype=dtype), poisoned(*v.shape, dtype=dtype)
    delta = poisoned(B, Hq, L, dtype=torch.float32)
    call(lib, "emu_attention_backward", ctypes.byref(prm), ptr(dout), ptr(out), ptr(lse), ptr(delta), ptr(dq),
         ptr(dk), ptr(dv))
    gq, gk, gv, _ = A.sdpa_reference_backward(dout.double(), *d64, want, want_lse, p, causal, prm.scale, seed)
    close(dq, gq, dtype, "dq")
    close(dk, gk, dtype, "dk")
    close(dv, gv, dtype, "dv")
    if mask is not None and torch.isinf(mask).all(-1).any():
        dead = torch.isinf(mask).all(-1).expand(B, Hq, L)
        assert torch.isneginf(lse[dead]).all() and (out[dead] == 0).all() and (dq[dead] == 0).all()
    return out, lse, dq, dk, dv


def test_attention_rejects_fp64(lib):
    q, k, v, mask, causal, p = _attn_inputs(ATTN_CASES[0], torch.float64)
    prm = _attn_params(q, k, v, mask, causal, p, 0, torch.float64)
    out, lse = torch.zeros(1, 2, 17, 40, dtype=torch.float64), torch.zeros(1, 2, 17)
    assert lib.emu_attention_forward(ctypes.byref(prm), ptr(out), ptr(lse)) == 1  # cudaErrorInvalidValue


# ---------------------------------------------------------------------------
# wkv4 (what csrc/wkv.cpp's CUDA half does around the kernels)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv4(lib, dtype, with_state):
    _wkv4(lib, dtype, with_state, 2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wkv4_huge_keys(lib, dtype):
    # k ~ 1e3: every exponent is taken relative to a running maximum, nothing overflows; in fp32 an
    # exponent near 1e3 carries ~6e-5 absolute rounding, hence the wider tolerance
    _wkv4(lib, dtype, True, 1000.0, tol_scale=20.0)


def _wkv4(lib, dtype, with_state, kscale, tol_scale=1.0, B=3):
    T, C = 9, 70  # 70 channels: two 64-thread blocks, the second partly idle
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(5)
    td = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    tf = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    k = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * kscale).to(dtype)
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64).to(dtype)
    if with_state:
        state = torch.stack((torch.randn(B, C, generator=g, dtype=torch.float64),
                             torch.rand(B, C, generator=g, dtype=torch.float64) + 0.5,
                             torch.randn(B, C, generator=g, dtype=torch.float64)), 1).to(acc)
    else:
        state = wkv4_initial_state(B, C, dtype=acc)
    negw, u = (-td.exp()).contiguous(), tf.contiguous()
    y, st_out, saved = poisoned(B, T, C, dtype=dtype), poisoned(B, 3, C, dtype=acc), poisoned(B, T, 3, C, dtype=acc)
    call(lib, "emu_wkv4_forward", DT[dtype], ptr(negw), ptr(u), ptr(k), ptr(v), ptr(state), ptr(y), ptr(st_out),
         ptr(saved), I64(B), I64(T), I64(C))
    want_y, want_st = wkv4_reference(td.double(), tf.double(), k.double(), v.double(), state.double())
    close(y, want_y, dtype, "y", tol_scale)
    close(st_out, want_st, dtype, "state", tol_scale)
    y2 = poisoned(B, T, C, dtype=dtype)  # without `saved`: the other instantiation
    call(lib, "emu_wkv4_forward", DT[dtype], ptr(negw), ptr(u), ptr(k), ptr(v), ptr(state), ptr(y2), ptr(st_out),
         None, I64(B), I64(T), I64(C))
    assert torch.equal(y2, y)

    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64).to(dtype)
    gstate = torch.randn(B, 3, C, generator=g, dtype=torch.float64).to(acc)
    gk, gv = poisoned(B, T, C, dtype=dtype), poisoned(B, T, C, dtype=dtype)
    gs, gw_bc, gu_bc = poisoned(B, 3, C, dtype=acc), poisoned(B, C, dtype=acc), poisoned(B, C, dtype=acc)
    call(lib, "emu_wkv4_backward", DT[dtype], ptr(negw), ptr(u), ptr(k), ptr(v), ptr(state), ptr(saved), ptr(st_out),
         ptr(gy), ptr(gstate), ptr(gk), ptr(gv), ptr(gs), ptr(gw_bc), ptr(gu_bc), I64(B), I64(T), I64(C))
    want = wkv_ref_backward(td.double(), tf.double(), k.double(), v.double(), state.double(), gy.double(),
                            gstate.double())
    close((gw_bc.sum(0) * td.exp()), want[0], dtype, "gw", tol_scale)
    close(gu_bc.sum(0), want[1], dtype, "gu", tol_scale)
    close(gk, want[2], dtype, "gk", tol_scale)
    close(gv, want[3], dtype, "gv", tol_scale)
    close(gs, want[4], dtype, "gstate", tol_scale)
    return y, st_out, saved, gk, gv, gs, gw_bc, gu_bc


# ---------------------------------------------------------------------------
# rnn: csrc/rnn.cpp's CUDA half (rnn_forward_cuda / rnn_backward_cuda) in Python, the GEMMs by torch
# on the CPU, the kernels emulated; same call order, buffers and slots
# ---------------------------------------------------------------------------

CELL = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _ws_views(mode, ws, T, B, H, P):
    off = 0
    v = {}

    def take(name, *shape):
        nonlocal off
        n = math_prod(shape)
        v[name] = ws.narrow(0, off, n).view(shape)
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
    return v


def math_prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _shape(mode, dtype, T, B, H, P, proj, reverse, lengths):
    return RnnShape(CELL[mode], DT[dtype], T, B, H, P, proj, reverse, None if lengths is None else lengths.data_ptr())


def cuda_rnn_forward(lib, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, persistent):
    T, B, I = x.shape
    G = GATES[mode]
    H = w_hh.shape[0] // G
    P = w_hr.shape[0] if w_hr is not None else H
    proj, gru, dtype = w_hr is not None, mode == "gru", x.dtype
    bias = b_ih
    if b_hh is not None:
        bh = torch.cat((b_hh[: 2 * H], torch.zeros(H, dtype=dtype))) if gru else b_hh
        bias = bh if bias is None else bias + bh
    xw = x.reshape(T * B, I) @ w_ih.t()
    xw = (xw if bias is None else xw + bias).contiguous()
    b_hn = b_hh[2 * H:].contiguous() if gru and b_hh is not None else torch.zeros(H, dtype=dtype)
    ws = poisoned(R.workspace_numel(mode, T, B, H, P, save), dtype=dtype)
    if save:
        v = _ws_views(mode, ws, T, B, H, P)
        hbuf, cbuf, gbuf, hcbuf, hnbuf = v["h"], v.get("c"), v.get("gates"), v.get("hc"), v.get("hn")
    else:
        hbuf = poisoned(2, B, P, dtype=dtype)
        cbuf = poisoned(2, B, H, dtype=dtype) if mode == "lstm" else None
        gbuf = poisoned(1, B, G * H, dtype=dtype) if mode in ("lstm", "gru") else None
        hcbuf = poisoned(1, B, H, dtype=dtype) if proj else None
        hnbuf = poisoned(1, B, H, dtype=dtype) if gru else None
    hbuf[0].copy_(h0)
    if cbuf is not None:
        cbuf[0].copy_(c0)
    y = poisoned(T, B, P, dtype=dtype)
    slot = (lambda s: s) if save else (lambda s: s & 1)
    one = (lambda s: s) if save else (lambda s: 0)
    shape = _shape(mode, dtype, T, B, H, P, proj, reverse, lengths)
    if persistent:
        assert lib.emu_rnn_persistent_supported(ctypes.byref(shape))
        barrier = torch.zeros(1, dtype=torch.int32)
        a = RnnPersistentForward(xw.data_ptr(), w_hh.data_ptr(), b_hn.data_ptr(), hbuf.data_ptr(),
                                 None if cbuf is None else cbuf.data_ptr(),
                                 gbuf.data_ptr() if save and gbuf is not None else None,
                                 hnbuf.data_ptr() if save and hnbuf is not None else None, y.data_ptr(),
                                 barrier.data_ptr(), save)
        call(lib, "emu_rnn_persistent_forward", ctypes.byref(shape), ctypes.byref(a))
        assert barrier.item() == T * _persistent_blocks(H)
    else:
        for s in range(T):
            hp, hx = hbuf[slot(s)], hbuf[slot(s + 1)]
            g = gbuf[one(s)] if gbuf is not None else hx
            torch.mm(hp, w_hh.t(), out=g)
            hc = hcbuf[one(s)] if proj else None
            a = RnnForwardStep(g.data_ptr(), xw.data_ptr(), hp.data_ptr(), hx.data_ptr(),
                               None if cbuf is None else cbuf[slot(s)].data_ptr(),
                               None if cbuf is None else cbuf[slot(s + 1)].data_ptr(),
                               None if hc is None else hc.data_ptr(),
                               None if hnbuf is None else hnbuf[one(s)].data_ptr(), b_hn.data_ptr(), y.data_ptr())
            call(lib, "emu_rnn_forward_step", ctypes.byref(shape), I64(s), ctypes.byref(a))
            if proj:
                torch.mm(hc, w_hr.t(), out=hx)
                call(lib, "emu_rnn_proj_forward_fix", ctypes.byref(shape), I64(s), ptr(hx), ptr(hp), ptr(y))
    hT = hbuf[slot(T)].clone()
    cT = cbuf[slot(T)].clone() if mode == "lstm" else None
    return y, hT, cT, ws


def _persistent_blocks(H):
    nb = min(H, 132)
    hb = -(-H // nb)
    return -(-H // hb)


def cuda_rnn_backward(lib, mode, dy, dhT, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, ws):
    T, B, I = x.shape
    G = GATES[mode]
    H = w_hh.shape[0] // G
    P = w_hr.shape[0] if w_hr is not None else H
    proj, gru, dtype = w_hr is not None, mode == "gru", x.dtype
    GH = G * H
    v = _ws_views(mode, ws, T, B, H, P)
    separate = gru or reverse
    dgh = poisoned(T, B, GH, dtype=dtype)
    dgi = poisoned(T, B, GH, dtype=dtype) if separate else dgh
    dhh = torch.zeros(B, P, dtype=dtype)
    dcc = dc.contiguous().clone() if mode == "lstm" else None
    dr = poisoned(T, B, P, dtype=dtype) if proj else None
    dhc = poisoned(B, H, dtype=dtype) if proj else None
    shape = _shape(mode, dtype, T, B, H, P, proj, reverse, lengths)
    for s in range(T - 1, -1, -1):
        if proj:
            call(lib, "emu_rnn_proj_backward_in", ctypes.byref(shape), I64(s), ptr(dr[s]), ptr(dhh), ptr(dhT), ptr(dy))
            torch.mm(dr[s], w_hr, out=dhc)
        dgs = dgh[s]
        a = RnnBackwardStep(dgs.data_ptr(), dgi.data_ptr(), dhh.data_ptr(), dhT.data_ptr(), dy.data_ptr(),
                            None if dhc is None else dhc.data_ptr(), None if dcc is None else dcc.data_ptr(),
                            v["gates"][s].data_ptr() if "gates" in v else None,
                            v["c"].data_ptr() if "c" in v else None, v["h"].data_ptr(),
                            v["hn"][s].data_ptr() if "hn" in v else None, separate)
        call(lib, "emu_rnn_backward_step", ctypes.byref(shape), I64(s), ctypes.byref(a))
        if gru:
            dhh.addmm_(dgs, w_hh)
        else:
            torch.mm(dgs, w_hh, out=dhh)
    dgi2, dgh2 = dgi.view(T * B, GH), dgh.view(T * B, GH)
    dx = (dgi2 @ w_ih).view(T, B, I)
    if lengths is not None:
        dh0 = torch.where((lengths > 0).unsqueeze(1), dhh, dhT)
    else:
        dh0 = dhh if T > 0 else dhT.clone()
    grads = {"x": dx, "h0": dh0, "w_ih": dgi2.t() @ x.reshape(T * B, I),
             "w_hh": dgh2.t() @ v["h"][:T].reshape(T * B, P), "b_ih": dgi2.sum(0), "b_hh": dgh2.sum(0)}
    if mode == "lstm":
        grads["c0"] = dcc
    if proj:
        grads["w_hr"] = dr.view(T * B, P).t() @ v["hc"].reshape(T * B, H)
    return grads


# (mode, lengths, reverse, proj); lengths with a 0 and a full row; B*H spans two 256-thread blocks
RNN_CASES = [(m, None, False, False) for m in CELL] + [(m, [5, 0, 3, 5, 1], True, False) for m in CELL] + [
    ("lstm", [5, 2, 0, 4, 5], False, True), ("lstm", [3, 5, 0, 1, 5], True, True), ("gru", [2, 5, 4, 0, 3], False, False)]


def _rnn_inputs(mode, lengths, proj, dtype, T=5, B=5, I=7, H=60, P=40):
    g = torch.Generator().manual_seed(11)
    G = GATES[mode]
    Pp = P if proj else H
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(dtype)  # noqa: E731
    x, h0 = r(T, B, I), r(B, Pp)
    c0 = r(B, H) if mode == "lstm" else None
    w_ih, w_hh, b_ih, b_hh = r(G * H, I), r(G * H, Pp), r(G * H), r(G * H)
    w_hr = r(P, H) if proj else None
    lens = None if lengths is None else torch.tensor([min(n, T) for n in lengths[:B]], dtype=torch.int64)
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens


def _rnn_check(lib, mode, lengths, reverse, proj, dtype, persistent, scale=1.0, **dims):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens = _rnn_inputs(mode, lengths, proj, dtype, **dims)
    ins64 = [None if t is None else t.double().clone() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)]
    leaves = [None if t is None else t.requires_grad_() for t in ins64]
    yr, hr, cr = R.reference(mode, *leaves, lens, reverse)
    y, hT, cT, ws = cuda_rnn_forward(lib, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, reverse, True,
                                     persistent)
    close(y, yr.detach(), dtype, "y")
    close(hT, hr.detach(), dtype, "h_T")
    if mode == "lstm":
        close(cT, cr.detach(), dtype, "c_T")
    # without saving: the two-slot ping-pong buffers
    y2, hT2, cT2, _ = cuda_rnn_forward(lib, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, reverse, False,
                                       persistent)
    assert torch.equal(y2, y) and torch.equal(hT2, hT)
    if persistent:
        return y
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    dh = torch.randn(hT.shape, generator=g, dtype=torch.float64).to(dtype)
    dc = torch.randn(cT.shape, generator=g, dtype=torch.float64).to(dtype) if mode == "lstm" else None
    got = cuda_rnn_backward(lib, mode, dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, reverse, ws)
    outs = [(yr, dy), (hr, dh)] + ([(cr, dc)] if mode == "lstm" else [])
    names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    want = torch.autograd.grad([o for o, _ in outs], [t for t in leaves if t is not None],
                               [gg.double() for _, gg in outs], allow_unused=True)
    want = dict(zip([n for n, t in zip(names, leaves) if t is not None], want))
    for name, w in want.items():
        close(got[name], torch.zeros_like(ins64[names.index(name)]) if w is None else w, dtype, f"d{name}", scale)
    return y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", RNN_CASES, ids=lambda c: f"{c[0]}-{'len' if c[1] else 'full'}-"
                         f"{'rev' if c[2] else 'fwd'}{'-proj' if c[3] else ''}")
def test_rnn_steps(lib, case, dtype):
    _rnn_check(lib, *case, dtype, persistent=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [RNN_CASES[4], RNN_CASES[5], RNN_CASES[8]], ids=["lstm", "gru", "lstm-proj"])
def test_rnn_steps_half_types(lib, case, dtype):
    # bf16 with a projection: the gate gradients, h before the projection and the projection's
    # GEMMs are all rounded to bf16, so the weight gradients sit up to ~10% of their largest
    # element off fp64; torch.nn.LSTM itself is further off (test_rnn_proj_half_types_vs_torch)
    _rnn_check(lib, *case, dtype, persistent=False, scale=2.0 if case[3] and dtype == torch.bfloat16 else 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rnn_proj_half_types_vs_torch(lib, dtype):
    """LSTM with a projection in a half type: the kernels' error against fp64 is no larger than
    that of torch.nn.LSTM run in the same dtype (what a user would otherwise get), for the
    output, the final states and every gradient."""
    import warnings
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens = _rnn_inputs("lstm", None, True, dtype)
    leaves = [t.double().clone().requires_grad_() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)]
    yr, hr, cr = R.reference("lstm", *leaves, None, False)
    g = torch.Generator().manual_seed(3)
    dy, dh, dc = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in (yr, hr, cr))
    want = torch.autograd.grad([yr, hr, cr], leaves, [dy.double(), dh.double(), dc.double()])
    y, hT, cT, ws = cuda_rnn_forward(lib, "lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, None, False, True, False)
    got = cuda_rnn_backward(lib, "lstm", dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, None, False, ws)
    m = torch.nn.LSTM(x.shape[-1], w_hh.shape[0] // 4, proj_size=w_hr.shape[0]).to(dtype)
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0"]
    with torch.no_grad():
        for n, t in zip(names, (w_ih, w_hh, b_ih, b_hh, w_hr)):
            getattr(m, n).copy_(t)
    xx, hh, cc = x.clone().requires_grad_(), h0[None].clone().requires_grad_(), c0[None].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "LSTM with projections is not supported with oneDNN"
        yt, (ht, ct) = m(xx, (hh, cc))
        gt = torch.autograd.grad([yt, ht, ct], [xx, hh, cc] + [getattr(m, n) for n in names], [dy, dh[None], dc[None]])
    err = lambda a, b: (a.double().reshape(b.shape) - b).abs().max().item()  # noqa: E731
    ours = [err(y, yr), err(hT, hr), err(cT, cr)] + [err(got[n], w) for n, w in zip(
        ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"], want)]
    theirs = [err(yt, yr), err(ht, hr), err(ct, cr)] + [err(a, w) for a, w in zip(gt, want)]
    what = ["y", "h_T", "c_T", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"]
    # 5% slack: both round their outputs to the dtype, so equal-quality results can differ slightly
    worse = [(n, o, t) for n, o, t in zip(what, ours, theirs) if o > t * 1.05 + 1e-6]
    assert not worse, f"kernel error above torch.nn.LSTM's in {dtype}: {worse}"


@pytest.mark.parametrize("case", [c for c in RNN_CASES if not c[3]], ids=lambda c: f"{c[0]}-{'len' if c[1] else 'full'}-"
                         f"{'rev' if c[2] else 'fwd'}")
def test_rnn_persistent(lib, case):
    dims = dict(T=4, B=5, I=5, H=20)
    y = _rnn_check(lib, *case, torch.float32, persistent=True, **dims)
    y_steps = _rnn_check(lib, *case, torch.float32, persistent=False, **dims)
    close(y, y_steps, torch.float32, "persistent vs steps")


def test_rnn_persistent_large_shared_memory(lib):
    # fp64 LSTM H=600: 120 blocks of 5 units, 96 KB of W_hh each: past the 48 KB default, so the
    # launcher must raise the kernel's limit first (the emulator refuses the launch otherwise)
    _rnn_check(lib, "lstm", None, False, False, torch.float64, persistent=True, T=2, B=1, I=2, H=600)


def test_rnn_persistent_declines_what_does_not_fit(lib):
    # fp64 LSTM H=1024 B=16: 8 units per block need 266 KB of shared memory (227 KB on the device)
    T, B, H = 2, 16, 1024
    shape = _shape("lstm", torch.float64, T, B, H, H, False, False, None)
    assert lib.emu_rnn_persistent_supported(ctypes.byref(shape))
    a = RnnPersistentForward()
    assert lib.emu_rnn_persistent_forward(ctypes.byref(shape), ctypes.byref(a)) == 801  # cudaErrorNotSupported


def test_rnn_persistent_uneven_blocks(lib):
    # H = 137 > 132 SMs: 69 blocks of 2 hidden units, the last with 1; fp64
    _rnn_check(lib, "lstm", [3, 1], True, False, torch.float64, persistent=True, T=3, B=2, I=3, H=137)


# ---------------------------------------------------------------------------
# races: the emulator runs each thread from one barrier to the next in one go, in the order set
# here; a result that changes with the order reads shared or global memory that another thread
# writes without a barrier in between
# ---------------------------------------------------------------------------

def _schedule_probe(lib):
    outs = [torch.zeros(8, dtype=torch.int32)]
    lib.emu_selftest(12, ptr(outs[0]))  # a planted race between blocks: must differ (checked below)
    for case in (ATTN_CASES[1], ATTN_CASES[4], ATTN_CASES[7]):
        outs += _attention(lib, case, torch.float32)
    outs.append(_rnn_check(lib, "lstm", [4, 1, 0, 3, 2], True, False, torch.float32, persistent=True,
                           T=4, B=5, I=5, H=20))
    outs.append(_rnn_check(lib, "gru", None, False, False, torch.float32, persistent=True, T=3, B=2, I=3, H=137))
    outs.append(_rnn_check(lib, "lstm", [3, 5, 0, 1, 5], True, True, torch.float32, persistent=False))
    return outs


@pytest.mark.parametrize("order,seed", [(1, 0), (2, 1), (2, 2)], ids=["descending", "shuffled1", "shuffled2"])
def test_results_do_not_depend_on_the_schedule(lib, order, seed):
    runs = []
    for o in (0, order):
        lib.sk_emu_set_schedule(o, seed)
        try:
            runs.append(_schedule_probe(lib))
        finally:
            lib.sk_emu_set_schedule(0, 0)
    assert not torch.equal(runs[0][0], runs[1][0]), "the planted race between blocks went unseen"
    for i, (a, b) in enumerate(zip(runs[0][1:], runs[1][1:])):
        assert torch.equal(a, b), f"output {i} differs between thread orders"


@pytest.mark.parametrize("persistent", [False, True], ids=["steps", "persistent"])
def test_rnn_lengths_out_of_range_stay_in_bounds(lib, persistent):
    """Python validates lengths, but not while torch.compile traces, and the CUDA binding does not
    (a check would sync): the kernels clamp each length to [0, T] so that a bad one cannot index
    past xw / y / dgi. Same results as the clamped lengths (and no AddressSanitizer report)."""
    T, B, I, H = 4, 3, 3, 20
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _, _ = _rnn_inputs("lstm", None, False, torch.float32, T=T, B=B, I=I, H=H)
    runs = []
    for lens in ([T + 3, -2, 2], [T, 0, 2]):
        lens = torch.tensor(lens, dtype=torch.int64)
        y, hT, cT, ws = cuda_rnn_forward(lib, "lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lens, True, True,
                                         persistent)
        g = torch.Generator().manual_seed(1)
        dy, dh, dc = (torch.randn(t.shape, generator=g) for t in (y, hT, cT))
        grads = cuda_rnn_backward(lib, "lstm", dy, dh, dc, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lens, True, ws)
        runs.append([y, hT, cT] + [grads[k] for k in sorted(grads)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_wkv4_batch_past_the_grid_limit(lib):
    # B > 65535: the grid's y extent is capped and each block loops over b, b + 65535, ...
    B, T, C = 65535 + 3, 2, 1
    g = torch.Generator().manual_seed(2)
    td, tf = torch.randn(C, generator=g), torch.randn(C, generator=g)
    k, v = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    state = wkv4_initial_state(B, C, dtype=torch.float32)
    negw = -td.exp()
    y, st_out = poisoned(B, T, C, dtype=torch.float32), poisoned(B, 3, C, dtype=torch.float32)
    call(lib, "emu_wkv4_forward", DT[torch.float32], ptr(negw), ptr(tf), ptr(k), ptr(v), ptr(state), ptr(y),
         ptr(st_out), None, I64(B), I64(T), I64(C))
    want_y, want_st = wkv4_reference(td, tf, k, v, state)
    close(y, want_y, torch.float32, "y")
    close(st_out, want_st, torch.float32, "state")


# ---------------------------------------------------------------------------
# capped grids: the launchers cap a grid dimension and the kernels loop past it (wkv4: gridDim.y <= 65535
# batch rows; the rnn step/projection and rotary kernels: 1-D grid-stride launches of at most 65535 * 8
# and 65535 * 16 blocks). Shapes that reach those caps are far too large to emulate, so the emulator lowers
# every cap at run time (SK_GRID_CAP in csrc/cuda/common.h) to a few blocks, below these shapes.
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def grid_cap(lib, n):
    lib.sk_emu_set_grid_cap(I64(n))
    try:
        yield
    finally:
        lib.sk_emu_set_grid_cap(I64(0))


def last_grid(lib):
    g = (ctypes.c_int64 * 3)()
    lib.sk_emu_last_grid(g)
    return tuple(g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved,inverse", [(False, False), (True, True)])
def test_rotary_past_the_grid_cap(lib, dtype, interleaved, inverse):
    # 3*37*13 = 1443 threads' work on 2 blocks of 256: every thread takes 2 or 3 turns of the grid-stride loop
    want = _rotary(lib, dtype, interleaved, inverse)
    with grid_cap(lib, 2):
        got = _rotary(lib, dtype, interleaved, inverse)
        assert last_grid(lib) == (2, 1, 1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wkv4_past_the_grid_cap(lib, dtype):
    # B = 7 batch rows on gridDim.y = 3: each block takes b, b + 3 (and b + 6), forward (both instantiations)
    # and backward, each compared with the reference inside _wkv4 and bit for bit with the uncapped grid
    want = _wkv4(lib, dtype, True, 2.0, B=7)
    with grid_cap(lib, 3):
        got = _wkv4(lib, dtype, True, 2.0, B=7)
        assert last_grid(lib) == (2, 3, 1)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i} differs with the capped grid"


# B*H = 9*70 = 630 and B*P = 9*60 = 540 elements on 2 blocks of 256: the forward and backward step kernels
# and both projection kernels take a second turn of their grid-stride loops; lengths and reverse included
@pytest.mark.parametrize("case,dtype", [
    (("lstm", [5, 2, 0, 4, 5, 1, 3, 5, 2], True, True), torch.float64),
    (("lstm", None, False, False), torch.float32),
    (("gru", [2, 5, 4, 0, 3, 5, 1, 5, 4], True, False), torch.float32),
    (("rnn_relu", [5, 0, 3, 5, 1, 2, 4, 5, 5], False, False), torch.float32),
], ids=["lstm-proj-len-rev", "lstm", "gru-len-rev", "rnn_relu-len"])
def test_rnn_steps_past_the_grid_cap(lib, case, dtype):
    dims = dict(T=5, B=9, I=4, H=70, P=60)
    want = _rnn_check(lib, *case, dtype, persistent=False, **dims)
    with grid_cap(lib, 2):
        got = _rnn_check(lib, *case, dtype, persistent=False, **dims)
        assert last_grid(lib) == (2, 1, 1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_refuses_a_grid_past_its_limit(lib, dtype):
    # The attention grids have no cap and no loop: one block per (b, h) and 8 query rows (or 8 keys). Past
    # 2^32 blocks the count used to wrap when cast to unsigned: B = 2^32 + 1 ran one block and returned
    # success with every other row unwritten. The launchers refuse it before launching anything (only
    # row 0 exists here: the kernels must not run).
    B = (1 << 32) + 1
    q, k, v = (torch.randn(1, 1, 1, 8).to(dtype) for _ in range(3))
    prm = _attn_params(q, k, v, None, False, 0.0, 0, dtype)
    prm.B = B
    out, lse = poisoned(1, 1, 1, 8, dtype=dtype), poisoned(1, 1, 1, dtype=torch.float32)
    assert lib.emu_attention_forward(ctypes.byref(prm), ptr(out), ptr(lse)) == 9  # cudaErrorInvalidConfiguration
    assert out.isnan().all() and lse.isnan().all()
    # backward: no queries (L = 0, no delta or dQ launch), one key per (b, h): the dK/dV grid is the one past it
    prm.L = 0
    dk, dv = poisoned(1, 1, 1, 8, dtype=dtype), poisoned(1, 1, 1, 8, dtype=dtype)
    assert lib.emu_attention_backward(ctypes.byref(prm), None, None, None, None, None, ptr(dk), ptr(dv)) == 9
    assert dk.isnan().all() and dv.isnan().all()
