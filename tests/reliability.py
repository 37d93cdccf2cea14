"""Shared machinery of the reliability suite (test_properties, test_hostile,
test_determinism, test_memory_threads): tensor layouts, a parity check of one
backend against the reference (values, every input gradient, inputs untouched),
and one typical call per op."""
from __future__ import annotations

import copy
import importlib
import importlib.util

import pytest
import torch

from seqkern import backends as B
from helpers import TOL

# ---------------------------------------------------------------------------
# layouts: the same values presented to an op in different memory layouts
# ---------------------------------------------------------------------------

LAYOUTS = ("contiguous", "noncontig", "transposed", "offset", "expanded")


class Arg:
    """A tensor argument: a leaf (what gradients are taken against) and the view of it
    that the op sees. ``value`` is the full-size tensor; for ``expanded`` only its first
    slice along the first dim of size > 1 is kept (the op sees it broadcast)."""

    def __init__(self, value: torch.Tensor, layout: str = "contiguous", grad: bool = False):
        self.shape = tuple(value.shape)
        if layout == "transposed" and value.dim() < 2:
            layout = "noncontig"
        self.expand_dim = None
        if layout == "expanded":
            dims = [d for d, s in enumerate(self.shape) if s > 1]
            if not dims:
                layout = "contiguous"
            else:
                self.expand_dim = dims[0]
                value = value.narrow(self.expand_dim, 0, 1)
        if layout == "transposed":
            value = value.transpose(-1, -2)
        self.layout = layout
        self.leaf = value.detach().clone().contiguous()
        if grad and self.leaf.is_floating_point():
            self.leaf.requires_grad_(True)

    def present(self) -> torch.Tensor:
        x = self.leaf
        if self.layout == "expanded":
            return x.expand(self.shape)
        if self.layout == "transposed":
            return x.transpose(-1, -2)
        if self.layout == "noncontig":
            if x.dim() == 0:
                return x
            # every other element of a twice-as-wide buffer: stride 2 in the last dim
            return torch.stack((x, torch.zeros_like(x)), -1).flatten(-2)[..., ::2]
        if self.layout == "offset":
            return torch.cat((x.new_zeros(3), x.reshape(-1)))[3:].view(self.shape)
        return x

    def cast(self, dtype) -> "Arg":
        """The same argument in another floating dtype (integer and bool ones unchanged)."""
        other = copy.copy(self)
        if self.leaf.is_floating_point():
            other.leaf = self.leaf.detach().to(dtype).requires_grad_(self.leaf.requires_grad)
        return other

    def __repr__(self):
        return f"Arg({self.shape}, {self.leaf.dtype}, {self.layout}, grad={self.leaf.requires_grad})"


def present(args: dict, contiguous: bool = False) -> dict:
    out = {}
    for n, a in args.items():
        if isinstance(a, Arg):
            t = a.present()
            out[n] = t.contiguous() if contiguous else t
        else:
            out[n] = a
    return out


def leaves(args: dict):
    return [(n, a.leaf) for n, a in args.items() if isinstance(a, Arg) and a.leaf.requires_grad]


def flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None:
        return []
    res = []
    for o in out:
        res.extend(flatten(o))
    return res


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaNs in the same places."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def assert_untouched(ins: dict, snap: dict, who: str):
    for n, before in snap.items():
        assert _same(ins[n].detach(), before), f"{who} modified input {n}"


def forward_backward(call, args: dict, backend: str, cotangent_seed: int = 1, contiguous: bool = False,
                     grads: bool = True, cotangent_dtype=None):
    """Outputs and input gradients (in the order of ``leaves(args)``) of one call.

    ``cotangent_dtype``: draw the cotangents in this dtype, then cast (torch.randn draws other
    values for fp32 and fp64 once a tensor has 16 elements: an fp64 run that must see the fp32
    run's cotangents draws them in fp32)."""
    ins = present(args, contiguous)
    snap = {n: t.detach().clone() for n, t in ins.items() if isinstance(t, torch.Tensor)}
    outs = flatten(call(ins, backend))
    assert_untouched(ins, snap, backend)
    gs = []
    lv = leaves(args)
    if grads and lv:
        diff = [o for o in outs if o.requires_grad]
        if diff:
            gen = torch.Generator().manual_seed(cotangent_seed)
            cot = [torch.randn(o.shape, generator=gen, dtype=cotangent_dtype or o.dtype).to(o.device, o.dtype)
                   for o in diff]
            got = torch.autograd.grad(diff, [t for _, t in lv], cot, allow_unused=True)
            gs = [torch.zeros_like(t) if g is None else g for g, (_, t) in zip(got, lv)]
    return [o.detach() for o in outs], gs


def _close_or_both_nonfinite(g, w, tol, msg):
    """Equal where ``w`` is finite; non-finite (NaN or inf, either) where ``w`` is not."""
    fin = torch.isfinite(w)
    assert torch.equal(torch.isfinite(g), fin), f"{msg}: finite where the reference is not, or the other way round"
    torch.testing.assert_close(g[fin], w[fin], **tol, msg=lambda m: f"{msg}: {m}")


def assert_parity(call, args: dict, backend: str, dtype, *, op: str | None = None, grads: bool = True, tol=None,
                  loose_nonfinite_grads: bool = False):
    """``backend`` on ``args`` (in their layouts) equals the reference on contiguous copies:
    every output and every input gradient; no input is modified.

    ``loose_nonfinite_grads`` (inputs with NaN/inf): a gradient entry that the reference makes
    NaN or inf must be NaN or inf, not necessarily the same one (inf - inf is NaN in one order
    of evaluation and inf in another); finite entries must agree."""
    tol = tol or TOL[dtype]
    want_o, want_g = forward_backward(call, args, "reference", contiguous=True, grads=grads)
    got_o, got_g = forward_backward(call, args, backend, grads=grads)
    if op is not None:
        assert B.last_backend(op) == backend, f"{op} ran on {B.last_backend(op)}, not {backend}"
    assert len(got_o) == len(want_o)
    for i, (g, w) in enumerate(zip(got_o, want_o)):
        assert g.shape == w.shape, f"{backend}: output {i} shape {tuple(g.shape)} != reference {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{backend}: output {i} dtype {g.dtype} != reference {w.dtype}"
        torch.testing.assert_close(g, w, **tol, equal_nan=True, msg=lambda m: f"{backend} output {i}: {m}")
    for (name, _), g, w in zip(leaves(args), got_g, want_g):
        if loose_nonfinite_grads:
            _close_or_both_nonfinite(g, w, tol, f"{backend} grad of {name}")
        else:
            torch.testing.assert_close(g, w, **tol, equal_nan=True, msg=lambda m: f"{backend} grad of {name}: {m}")
    return got_o, got_g


def assert_parity_vs_fp64(call, args: dict, backend: str, *, op: str | None = None):
    """For ill-conditioned fp32 inputs (huge magnitudes): the backend's error against the fp64
    reference is at most twice the fp32 reference's own error (DESIGN.md's rule for half types),
    outputs and gradients."""
    args64 = {n: a.cast(torch.float64) if isinstance(a, Arg) else a for n, a in args.items()}
    exact_o, exact_g = forward_backward(call, args64, "reference", cotangent_dtype=torch.float32)
    ref_o, ref_g = forward_backward(call, args, "reference", contiguous=True)
    got_o, got_g = forward_backward(call, args, backend)
    if op is not None:
        assert B.last_backend(op) == backend, f"{op} ran on {B.last_backend(op)}, not {backend}"
    names = [f"output {i}" for i in range(len(exact_o))] + [f"grad of {n}" for n, _ in leaves(args)]
    for name, e, r, g in zip(names, exact_o + exact_g, ref_o + ref_g, got_o + got_g):
        ref_err = (r.double() - e).abs().nan_to_num(0.0).max().item() if e.numel() else 0.0
        torch.testing.assert_close(g.double(), e, rtol=TOL[torch.float32]["rtol"],
                                   atol=2 * ref_err + TOL[torch.float32]["atol"], equal_nan=True,
                                   msg=lambda m: f"{backend} {name} vs fp64 (fp32 reference's error {ref_err:.3g}): {m}")


# ---------------------------------------------------------------------------
# which families have landed (the others are placeholders raising NotImplementedError)
# ---------------------------------------------------------------------------

FAMILY_OPS = {"rotary": "apply_rotary", "attention": "scaled_dot_product_attention", "wkv": "wkv4",
              "rnn": "lstm"}


def landed(family: str) -> bool:
    mod = importlib.import_module(f"seqkern.ops.{family}")
    return not (mod.__doc__ or "").startswith("Placeholder")


def require_family(family: str):
    if not landed(family):
        pytest.skip(f"seqkern.ops.{family} is still a placeholder")


def require_layer(name: str):
    from seqkern import nn as snn

    if getattr(snn, name, None) is None:
        pytest.skip(f"seqkern.nn.{name} is still a placeholder")


# per op: (prefix of its C++ ops in seqkern_C, its Triton module in seqkern.kernels)
_KERNELS_OF = {"apply_rotary": ("rotary", "rotary"), "scaled_dot_product_attention": ("sdpa", "attention"),
               "wkv4": ("wkv4", "wkv")}


def _kernels_exist(op: str, backend: str) -> bool:
    """Whether a registered backend's kernels have been written yet: a family registers its
    backends with its reference, before the C++ and Triton kernels land."""
    c_prefix, triton_module = _KERNELS_OF.get(op, ("rnn", "rnn"))
    if backend == "cpu":
        return any(n.startswith(f"seqkern_C::{c_prefix}") for n in torch._C._dispatch_get_all_op_names())
    if backend == "triton":
        return importlib.util.find_spec(f"seqkern.kernels.{triton_module}") is not None
    return True


def require_backend(op: str, backend: str):
    if backend not in backends_for(op):
        pytest.skip(f"backend {backend} of {op} cannot run here or its kernels have not landed")


def backends_for(op: str):
    """Backends that implement ``op`` and can run here on CPU tensors."""
    table = B._SUPPORTS.get(op, {})
    return [n for n in ("reference", "cpu", "triton")
            if n in table and B.available(n)[0] and _kernels_exist(op, n)]


# ---------------------------------------------------------------------------
# one typical call per op: (family, call, args) with gradients on every float input
# ---------------------------------------------------------------------------

def _typical_rotary(dtype, device="cpu"):
    from seqkern import functional as SF

    ang = torch.rand(33, 8, dtype=torch.float64, device=device) * 6
    args = dict(q=Arg(torch.randn(2, 4, 33, 16, dtype=dtype, device=device), grad=True),
                k=Arg(torch.randn(2, 2, 33, 16, dtype=dtype, device=device), grad=True),
                cos=Arg(ang.cos().to(dtype), grad=True), sin=Arg(ang.sin().to(dtype), grad=True))
    return "rotary", (lambda a, be: SF.apply_rotary(a["q"], a["k"], a["cos"], a["sin"], backend=be)), args


def _typical_rnn(mode):
    def make(dtype, device="cpu"):
        from seqkern import functional as SF

        G, T, Bsz, I, H = {"lstm": 4, "gru": 3, "rnn": 1}[mode], 17, 4, 16, 32
        P = 8 if mode == "lstm" else H
        r = lambda *s: torch.randn(*s, dtype=dtype, device=device) * H ** -0.5  # noqa: E731
        args = dict(x=Arg(r(T, Bsz, I), grad=True), h0=Arg(r(Bsz, P), grad=True), w_ih=Arg(r(G * H, I), grad=True),
                    w_hh=Arg(r(G * H, P), grad=True), b_ih=Arg(r(G * H), grad=True), b_hh=Arg(r(G * H), grad=True),
                    lengths=Arg(torch.tensor([17, 3, 0, 9])))
        if mode == "lstm":
            args.update(c0=Arg(r(Bsz, H), grad=True), w_hr=Arg(r(P, H), grad=True))

        def call(a, be):
            w = (a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"])
            kw = dict(lengths=a["lengths"], reverse=True, backend=be)
            if mode == "lstm":
                return SF.lstm(a["x"], (a["h0"], a["c0"]), *w, a["w_hr"], **kw)
            if mode == "gru":
                return SF.gru(a["x"], a["h0"], *w, **kw)
            return SF.rnn(a["x"], a["h0"], *w, **kw)
        return "rnn", call, args
    return make


def _typical_attention(dtype, device="cpu"):
    from seqkern import functional as SF

    r = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    mask = torch.rand(2, 1, 33, 40, device=device) < 0.8
    args = dict(q=Arg(r(2, 4, 33, 16), grad=True), k=Arg(r(2, 2, 40, 16), grad=True), v=Arg(r(2, 2, 40, 16), grad=True),
                attn_mask=Arg(mask))
    return "attention", (lambda a, be: SF.scaled_dot_product_attention(
        a["q"], a["k"], a["v"], attn_mask=a["attn_mask"], enable_gqa=True, backend=be)), args


def _typical_wkv(dtype, device="cpu"):
    from seqkern import functional as SF

    r = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = torch.stack((r(2, 48), r(2, 48).abs() + 0.1, r(2, 48)), 1).to(acc)
    args = dict(time_decay=Arg(r(48) - 1, grad=True), time_first=Arg(r(48), grad=True), k=Arg(r(2, 33, 48) * 5, grad=True),
                v=Arg(r(2, 33, 48), grad=True), state=Arg(state, grad=True))
    return "wkv", (lambda a, be: SF.wkv4(a["time_decay"], a["time_first"], a["k"], a["v"], a["state"], backend=be)), args


TYPICAL = {"scaled_dot_product_attention": _typical_attention, "wkv4": _typical_wkv, "apply_rotary": _typical_rotary, "lstm": _typical_rnn("lstm"), "gru": _typical_rnn("gru"),
           "rnn": _typical_rnn("rnn")}
