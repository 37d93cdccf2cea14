"""Position encodings: the original Transformer's sinusoids and rotary embeddings."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..backends import check_backend_name
from ..ops.rotary import apply_rotary, rotary_cos_sin


class SinusoidalPositionalEncoding(torch.nn.Module):
    """Adds the fixed sinusoidal encoding of Vaswani et al. (2017) to its input.

    PE[p, 2i] = sin(p / 10000^(2i/d_model)), PE[p, 2i+1] = cos(p / 10000^(2i/d_model)).

    forward(x, start=0): x is (T, B, d_model), or (B, T, d_model) with ``batch_first=True``;
    positions are start .. start + T - 1 (``start`` continues a sequence, e.g. when decoding
    with a cache). Dropout as in the paper. The table is a non-persistent buffer, so it is
    not part of the state_dict; it grows past ``max_len`` when a longer input comes.
    """

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0, batch_first: bool = False,
                 base: float = 10000.0, device=None, dtype=None, backend: str | None = None):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        # backend: accepted like every layer's (DESIGN "Backends"); adding the table is plain torch
        self.d_model, self.batch_first, self.base = d_model, batch_first, base
        self.backend = check_backend_name(backend)
        self.dropout = torch.nn.Dropout(dropout)
        self.register_buffer("pe", self._table(max_len, device, dtype or torch.get_default_dtype()), persistent=False)

    def _table(self, length, device, dtype):
        pos = torch.arange(length, dtype=torch.float64, device=device)[:, None]
        div = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float64, device=device)
                        * (-math.log(self.base) / self.d_model))
        pe = torch.zeros(length, self.d_model, dtype=torch.float64, device=device)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : self.d_model // 2]
        return pe.to(dtype)

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        if x.size(-1) != self.d_model:
            raise ValueError(f"x must have d_model={self.d_model} features in its last dim, got shape {tuple(x.shape)}")
        T = x.size(1) if self.batch_first else x.size(0)
        if start + T > self.pe.size(0):
            self.pe = self._table(start + T, self.pe.device, self.pe.dtype)
        pe = self.pe[start:start + T].to(x.dtype)
        pe = pe[None] if self.batch_first else pe[:, None]
        return self.dropout(x + pe)


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (Su et al. 2021) for attention heads.

    ``q, k = rope(q, k, start=0)`` with q, k of shape (..., T, D) (e.g. (B, H, T, D)):
    rotates the first ``dim`` features of each head (``dim`` <= D, even; partial rotary
    when smaller) by the angles of positions start .. start + T - 1. ``interleaved``
    picks the GPT-J pair layout instead of rotate-half. cos/sin tables are cached and
    grown on demand (non-persistent buffers).
    """

    def __init__(self, dim: int, base: float = 10000.0, max_seq_len: int = 2048, interleaved: bool = False,
                 backend: str | None = None, device=None):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        self.dim, self.base, self.interleaved, self.backend = dim, base, interleaved, check_backend_name(backend)
        cos, sin = rotary_cos_sin(max_seq_len, dim, base, device=device, dtype=torch.float64)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def cos_sin(self, length: int, start: int = 0, dtype=torch.float32):
        if start + length > self.cos_cached.size(0):
            cos, sin = rotary_cos_sin(start + length, self.dim, self.base, device=self.cos_cached.device,
                                      dtype=torch.float64)
            self.cos_cached, self.sin_cached = cos, sin
        return (self.cos_cached[start:start + length].to(dtype), self.sin_cached[start:start + length].to(dtype))

    def forward(self, q: Tensor, k: Tensor, start: int = 0):
        if q.size(-1) < self.dim:
            raise ValueError(f"q has head dim {q.size(-1)}, smaller than the rotary dim {self.dim}")
        cos, sin = self.cos_sin(q.size(-2), start, q.dtype)
        return apply_rotary(q, k, cos.to(q.device), sin.to(q.device), interleaved=self.interleaved,
                            backend=self.backend)
