"""RWKV-4 blocks (Peng et al. 2023) with the parameter names of RWKV-4 checkpoints
(BlinkDL/RWKV-LM, RWKV-v4neo), so ``blocks.{i}.*`` tensors load with ``load_state_dict``.

Every module runs in two modes that agree: a whole (B, T, C) sequence (training) and one
token at a time (T = 1, RNN-mode inference). ``y, state = module(x, state)``; the returned
state continues the sequence, so running T tokens one by one equals one call on all T.

States are tensors in the accumulation dtype (fp32, fp64 for fp64 models):
- ``RWKV4TimeMix``: (B, 4, C) = (previous input for the token shift, WKV aa, bb, pp);
- ``RWKV4ChannelMix``: (B, 1, C) = (previous input for the token shift);
- ``RWKV4Block``: (B, 5, C), the two concatenated: (att_xx, aa, bb, pp, ffn_xx), the order of the
  per-layer RWKV-4 state of the ``rwkv`` package (ChatRWKV's ``rwkv/model.py``, pp starting at -1e30
  there, -1e38 here: both mean "no terms"); the older single-file RWKV_in_150_lines puts ffn_xx first.
``state=None`` is the start of a sequence (a zero token-shift input and the empty WKV state).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..backends import check_backend_name
from ..ops.wkv import acc_dtype, wkv4, wkv4_initial_state


def _ratios(layer_id: int, n_layer: Optional[int]) -> Tuple[float, float]:
    if layer_id < 0:
        raise ValueError(f"layer_id must be >= 0, got {layer_id}")
    n_layer = layer_id + 1 if n_layer is None else n_layer
    if n_layer <= layer_id:
        raise ValueError(f"n_layer must exceed layer_id={layer_id}, got {n_layer}")
    return layer_id / max(n_layer - 1, 1), 1.0 - layer_id / n_layer


def _shifted(x: Tensor, prev: Optional[Tensor]) -> Tensor:
    """The token-shift input: x moved one step later, ``prev`` (or zeros) in front."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat((first, x[:, :-1]), 1)


def _check_x(x: Tensor, n_embd: int, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != n_embd:
        raise ValueError(f"{name}: x must have shape (B, T, {n_embd}), got {tuple(x.shape)}")


def _check_state(state: Optional[Tensor], x: Tensor, rows: int, name: str) -> None:
    if state is None:
        return
    if not isinstance(state, Tensor):
        raise TypeError(f"{name}: state must be a Tensor or None, got {type(state).__name__}")
    want = (x.shape[0], rows, x.shape[2])
    if tuple(state.shape) != want:
        raise ValueError(f"{name}: state must have shape (B, {rows}, C) = {want}, got {tuple(state.shape)}")


class RWKV4TimeMix(nn.Module):
    """Time mixing: token shift, receptance/key/value, WKV, output projection."""

    def __init__(self, n_embd: int, layer_id: int = 0, n_layer: Optional[int] = None, *, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.n_embd, self.layer_id, self.backend = n_embd, layer_id, check_backend_name(backend)
        self._ratios = _ratios(layer_id, n_layer)
        self.time_decay = nn.Parameter(torch.empty(n_embd, **fk))
        self.time_first = nn.Parameter(torch.empty(n_embd, **fk))
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, n_embd, **fk))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, n_embd, **fk))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, n_embd, **fk))
        self.key = nn.Linear(n_embd, n_embd, bias=False, **fk)
        self.value = nn.Linear(n_embd, n_embd, bias=False, **fk)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False, **fk)
        self.output = nn.Linear(n_embd, n_embd, bias=False, **fk)
        self.reset_time_parameters()

    @torch.no_grad()
    def reset_time_parameters(self) -> None:
        """RWKV-4's initialisation of the decay, bonus and mixing coefficients (v4neo)."""
        r01, r10 = self._ratios
        C = self.n_embd
        h = torch.arange(C, dtype=torch.float64)
        ddd = (h / C).view(1, 1, C)
        self.time_decay.copy_(-5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * r01))
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(C)], dtype=torch.float64) * 0.5
        self.time_first.copy_(math.log(0.3) + zigzag)
        self.time_mix_k.copy_(ddd ** r10)
        self.time_mix_v.copy_(ddd ** r10 + 0.3 * r01)
        self.time_mix_r.copy_(ddd ** (0.5 * r10))

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        _check_x(x, self.n_embd, type(self).__name__)
        _check_state(state, x, 4, type(self).__name__)
        xx = _shifted(x, None if state is None else state[:, 0])
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xv = x * self.time_mix_v + xx * (1 - self.time_mix_v)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        k, v, r = self.key(xk), self.value(xv), self.receptance(xr)
        wkv_state = None if state is None else state[:, 1:4]
        # Under autocast the projections come out in bf16/fp16 while time_decay/time_first stay
        # fp32: the WKV then runs in the wider dtype, as RWKV-4's own kernel wrapper runs it in fp32
        # (the decay exp(-exp(time_decay)) and k's exponent do not survive a bf16 rounding).
        wd = torch.promote_types(k.dtype, self.time_decay.dtype)
        y, wkv_state = wkv4(self.time_decay.to(wd), self.time_first.to(wd), k.to(wd), v.to(wd), wkv_state,
                            backend=self.backend)
        out = self.output(torch.sigmoid(r) * y.to(k.dtype))
        acc = acc_dtype(x.dtype)
        if x.shape[1]:
            last = x[:, -1]
        else:  # no token: the state passes through (or stays the empty one)
            last = x.new_zeros(x.shape[0], x.shape[2]) if state is None else state[:, 0]
        return out, torch.cat((last.to(acc)[:, None], wkv_state.to(acc)), 1)

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> Tensor:
        st = wkv4_initial_state(batch, self.n_embd, dtype=dtype, device=device)
        return torch.cat((torch.zeros_like(st[:, :1]), st), 1)


class RWKV4ChannelMix(nn.Module):
    """Channel mixing: token shift, squared-ReLU key, value, sigmoid receptance gate."""

    def __init__(self, n_embd: int, dim_ffn: int, layer_id: int = 0, n_layer: Optional[int] = None, *,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        # backend: accepted like every layer's (DESIGN "Backends"); channel mixing is plain torch
        # (matmuls and elementwise), so no seqkern op reads it
        self.n_embd, self.dim_ffn, self.layer_id, self.backend = n_embd, dim_ffn, layer_id, check_backend_name(backend)
        self._ratios = _ratios(layer_id, n_layer)
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, n_embd, **fk))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, n_embd, **fk))
        self.key = nn.Linear(n_embd, dim_ffn, bias=False, **fk)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False, **fk)
        self.value = nn.Linear(dim_ffn, n_embd, bias=False, **fk)
        self.reset_time_parameters()

    @torch.no_grad()
    def reset_time_parameters(self) -> None:
        _, r10 = self._ratios
        ddd = (torch.arange(self.n_embd, dtype=torch.float64) / self.n_embd).view(1, 1, -1)
        self.time_mix_k.copy_(ddd ** r10)
        self.time_mix_r.copy_(ddd ** r10)

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        _check_x(x, self.n_embd, type(self).__name__)
        _check_state(state, x, 1, type(self).__name__)
        xx = _shifted(x, None if state is None else state[:, 0])
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        kv = self.value(torch.square(torch.relu(self.key(xk))))
        out = torch.sigmoid(self.receptance(xr)) * kv
        if x.shape[1]:
            last = x[:, -1:]
        else:
            last = x.new_zeros(x.shape[0], 1, x.shape[2]) if state is None else state
        return out, last.to(acc_dtype(x.dtype))


class RWKV4Block(nn.Module):
    """Pre-LN residual block: x + att(ln1(x)), then + ffn(ln2(.)); layer 0 first applies ln0
    to its input (the embedding), as the official model does."""

    def __init__(self, n_embd: int, dim_ffn: int, layer_id: int, n_layer: Optional[int] = None, *,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.n_embd, self.layer_id = n_embd, layer_id
        self.ln1 = nn.LayerNorm(n_embd, **fk)
        self.ln2 = nn.LayerNorm(n_embd, **fk)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd, **fk)
        self.att = RWKV4TimeMix(n_embd, layer_id, n_layer, backend=backend, **fk)
        self.ffn = RWKV4ChannelMix(n_embd, dim_ffn, layer_id, n_layer, backend=backend, **fk)

    @property
    def backend(self) -> Optional[str]:
        """The WKV backend of this block (``None``: automatic); settable, like the RNN layers' ``backend``."""
        return self.att.backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self.att.backend = self.ffn.backend = check_backend_name(value)

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        _check_x(x, self.n_embd, type(self).__name__)
        _check_state(state, x, 5, type(self).__name__)
        if self.layer_id == 0:
            x = self.ln0(x)
        a, att_state = self.att(self.ln1(x), None if state is None else state[:, :4])
        x = x + a
        f, ffn_state = self.ffn(self.ln2(x), None if state is None else state[:, 4:])
        return x + f, torch.cat((att_state, ffn_state), 1)

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> Tensor:
        """The state of an empty sequence (what ``state=None`` means)."""
        st = self.att.initial_state(batch, device=device, dtype=dtype)
        return torch.cat((st, torch.zeros_like(st[:, :1])), 1)
