"""The CUDA kernels of csrc/cuda/*.cu run on the CPU: compiled as host C++ against the emulator in
tests/cuda_emu (one fiber per CUDA thread, warp collectives and barriers as checked rendezvous) and
compared with the reference backend. No GPU has ever run them; this is where their logic is tested.
The library is built on first use into build/cuda_emu/<hash of the sources and flags>.
SEQKERN_EMU_ASAN=1 builds it with AddressSanitizer (libasan must then be preloaded, see
test_emulated_kernels_under_asan)."""
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
    os.path.join(EMU, "emu.cpp"), os.path.join(EMU, "api.cpp")]
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-DSEQKERN_CUDA_EMULATE", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
         "-I", os.path.join(EMU, "include"), "-I", os.path.join(ROOT, "csrc")]
if ASAN:
    FLAGS += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]

DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _build():
    h = hashlib.sha256(" ".join([CXX] + FLAGS).encode())
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
        procs.append((src, subprocess.Popen([CXX] + lang + FLAGS + ["-c", src, "-o", obj], stdout=subprocess.PIPE,
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


def close(got, want, dtype, what):
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


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
    rows_per_t, T, D, half = 3, 37, 20, 7  # 6 pass-through dims; 3*37*13 threads span several blocks
    x = torch.randn(rows_per_t, T, D).to(dtype)
    ang = torch.randn(T, half, dtype=torch.float64)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    out = poisoned(rows_per_t, T, D, dtype=dtype)
    call(lib, "emu_rotary", DT[dtype], ptr(x), ptr(out), ptr(cos), ptr(sin), I64(rows_per_t * T), I64(T), I64(D),
         I64(half), ctypes.c_bool(interleaved), ctypes.c_bool(inverse))
    want = _rotate_reference(x, cos, sin, interleaved, inverse)
    close(out, want, dtype, "rotary")
    assert torch.equal(out[..., 2 * half:], x[..., 2 * half:])


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
def test_attention_half_types(lib, dtype):
    _attention(lib, ATTN_CASES[1], dtype)


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
    dout = torch.randn(B, Hq, L, Ev, dtype=torch.float64).to(dtype)
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
    B, T, C = 3, 9, 70  # 70 channels: two 64-thread blocks, the second partly idle
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(5)
    td = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    tf = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    k = (torch.randn(B, T, C, generator=g, dtype=torch.float64) * 2).to(dtype)
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
    close(y, want_y, dtype, "y")
    close(st_out, want_st, dtype, "state")
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
    close((gw_bc.sum(0) * td.exp()), want[0], dtype, "gw")
    close(gu_bc.sum(0), want[1], dtype, "gu")
    close(gk, want[2], dtype, "gk")
    close(gv, want[3], dtype, "gv")
    close(gs, want[4], dtype, "gstate")
