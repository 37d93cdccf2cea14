"""Drop-in ``torch.nn.MultiheadAttention`` computing attention through seqkern's
``scaled_dot_product_attention``.

:class:`MultiheadAttention` subclasses torch's module: the constructor, the parameters
(``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``, ``bias_v``,
``out_proj``), their init, ``state_dict`` and pickling are torch's own, so weights move
both ways with ``load_state_dict``. Only ``forward`` is replaced, and one keyword is
added: ``backend=None`` (also an attribute, changeable later), passed to every attention
call (see ``seqkern.backends``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends as B
from ..ops.attention import scaled_dot_product_attention
from .rnn import _scriptable_twin

__all__ = ["MultiheadAttention"]  # InputError, InputTypeError: its exceptions


class InputError(ValueError, AssertionError, RuntimeError):
    """Bad shapes or ranks: a ValueError by seqkern's rule, and the AssertionError or RuntimeError
    torch.nn.MultiheadAttention raises for the same call (it asserts most checks, and its matmuls
    or mask checks raise RuntimeError), so ``except``/``pytest.raises`` written for torch catches it."""


class InputTypeError(TypeError, AssertionError, RuntimeError):
    """A wrong dtype or kind of argument: a TypeError by seqkern's rule, and torch's
    AssertionError (mask dtypes) or RuntimeError (an integer query meets float weights)."""


def _check_backend(backend):
    if backend is not None and backend not in B.BACKENDS:
        raise ValueError(f"backend must be one of {B.BACKENDS} or None, got {backend!r}")
    return backend


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise InputTypeError(f"{name} must be a Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise InputTypeError(f"{name} must be a bool or floating tensor, got dtype {mask.dtype}")


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch.nn's convention: a bool True excludes the position (it becomes a mask of ``dtype``,
    the query's); a float mask is added as it is, in its own dtype."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


def _mask_dtype(key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], query: Tensor, q: Tensor,
                need_weights: bool) -> Optional[torch.dtype]:
    """The dtype of the merged float mask, checked by torch.nn.MultiheadAttention's rule (which raises
    RuntimeError): a bool mask becomes an additive mask of ``query``'s dtype, float masks keep theirs,
    and the two are added (type promotion); under autocast a merged mask of a float type autocast casts
    (not float64) takes the autocast dtype. It must then be the dtype of the projected query ``q`` when
    the weights are computed (torch's baddbmm), or that or float32 otherwise (torch's SDPA).
    None when no float mask is needed (no mask, or both bool)."""
    masks = [(n, m) for n, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask))
             if m is not None]
    if all(m.dtype == torch.bool for _, m in masks):
        return None
    dev = query.device.type
    cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

    def effective(d):
        return cast if cast is not None and d in (torch.float16, torch.bfloat16, torch.float32) else d

    canon = [(n, query.dtype if m.dtype == torch.bool else m.dtype) for n, m in masks]
    merged = canon[0][1] if len(canon) == 1 else torch.promote_types(canon[0][1], canon[1][1])
    merged = effective(merged)
    if merged == q.dtype or (not need_weights and merged == torch.float32):
        return merged
    bad = " and ".join(f"{n} ({d})" for n, d in canon if effective(d) != q.dtype)
    rule = "the query's dtype" if need_weights else "the query's dtype or torch.float32 (need_weights=False)"
    raise InputTypeError(f"{bad} must be bool or a float mask of {rule}: the query is {q.dtype}"
                         + (f", and the masks add up to {merged}" if len(canon) == 2 else "")
                         + " (torch.nn.MultiheadAttention refuses it too)")


def _pad_key(mask: Optional[Tensor]) -> Optional[Tensor]:
    # one more key that every query may see (bias_k or the zero key)
    if mask is None:
        return None
    return F.pad(mask, (0, 1), value=False if mask.dtype == torch.bool else 0.0)


def _merge(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], dtype: torch.dtype,
           merged_dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """One mask in SDPA's convention (bool True = attend, float = added to the logits),
    broadcastable to (B, H, L, S): bool stays bool when both masks are bool; float masks are
    added in their promoted dtype, as torch.nn does, then cast to ``merged_dtype`` (see _mask_dtype)."""
    masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        blocked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~blocked
    merged = _to_additive(masks[0], dtype)
    merged = merged if len(masks) == 1 else merged + _to_additive(masks[1], dtype)
    return merged.to(merged_dtype)


def _weights_reference(q: Tensor, k: Tensor, mask: Optional[Tensor], dropout_p: float, training: bool) -> Tensor:
    """Softmax probabilities (B, H, L, S), as torch.nn computes them, except that rows
    every mask entry excludes give 0 (not NaN), with 0 gradient."""
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    dead = scores.amax(-1, keepdim=True) == float("-inf")
    p = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return F.dropout(p, p=dropout_p, training=training) if dropout_p > 0.0 else p


class MultiheadAttention(torch.nn.MultiheadAttention):
    r"""``torch.nn.MultiheadAttention`` with attention computed by
    ``seqkern.functional.scaled_dot_product_attention``.

    Constructor: torch's (``embed_dim, num_heads, dropout=0.0, bias=True,
    add_bias_kv=False, add_zero_attn=False, kdim=None, vdim=None, batch_first=False,
    device=None, dtype=None``) plus keyword ``backend=None``.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False)`` takes and returns what
    torch's does: batched ``(L, B, E)`` (``(B, L, E)`` with ``batch_first``) or unbatched
    ``(L, E)`` inputs; ``key_padding_mask`` ``(B, S)``/``(S,)`` and ``attn_mask``
    ``(L, S)``/``(B*num_heads, L, S)``, each bool (True = not attended) or float (added
    to the logits). The two masks are merged into one (bool when both are bool) for
    the attention op; a float mask's dtype follows torch's rule (see ``_mask_dtype``: the
    query's dtype, or also float32 with ``need_weights=False``, after autocast's cast). ``is_causal`` is, as in torch, a hint that ``attn_mask`` is the
    causal mask (it still must be given); without a key padding mask and with
    ``need_weights=False`` the attention runs causally and ignores ``attn_mask``.

    **Weights**: with ``need_weights=True`` (torch's default) the probabilities must be
    materialised, so this call does not use a fused backend: it computes the weights
    and the output with the reference path (plain PyTorch, the full L x S matrix,
    like torch.nn) and ``backend`` is not consulted. Pass ``need_weights=False`` to run
    on the fused kernels.

    Rows that every mask entry excludes give a zero output (and zero weights), never
    NaN, unlike torch.nn. Nested tensors (what ``nn.TransformerEncoder`` passes in
    inference with a padding mask) go to torch's own forward, as they would unconverted.

    Bad arguments raise ``InputError`` (a ValueError) or ``InputTypeError`` (a TypeError), each also
    an AssertionError and a RuntimeError, the types torch's module raises for them.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = _check_backend(backend)

    backend: Optional[str] = None  # class default: modules pickled by torch.nn or converted in place

    def __prepare_scriptable__(self):
        # torch.jit.script cannot compile this forward: scripting gets torch's module over the same
        # parameters (see seqkern.nn.rnn._scriptable_twin, shared with the recurrent modules)
        return _scriptable_twin(self, __name__, __all__)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" if self.backend is not None else ""

    # -- checks ------------------------------------------------------------

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise InputTypeError(f"{name} must be a Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise InputTypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if query.dim() not in (2, 3):
            raise InputError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        want = 3 if batched else 2
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        for name, t in (("key", key), ("value", value)):
            if t.dim() != want:
                raise InputError(f"{name} must be {want}-D like the {kind} query, got shape {tuple(t.shape)}")
        if key_padding_mask is not None and key_padding_mask.dim() != want - 1:
            raise InputError(f"key_padding_mask must be {want - 1}-D for a {kind} query, "
                             f"got shape {tuple(key_padding_mask.shape)}")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise InputError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise InputError(f"{name} must have {dim} features in its last dim, got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise InputError(f"key and value must agree in all but the last dim, got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        for name, t in (("key", key), ("value", value), ("key_padding_mask", key_padding_mask),
                        ("attn_mask", attn_mask)):
            if t is not None and t.device != query.device:
                raise InputError(f"{name} is on {t.device} but query is on {query.device}")
        return batched

    # -- forward -----------------------------------------------------------

    def _project(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one GEMM
                return F.linear(query, w, b).chunk(3, dim=-1)
            wq, wk, wv = w.chunk(3)
            if key is value:
                return (F.linear(query, wq, bq),) + F.linear(key, w[E:], None if b is None else b[E:]).chunk(2, -1)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value)):
            # nn.TransformerEncoder (eval, no grad, a padding mask) packs its input into a nested
            # tensor and expects each layer's fused fast path to take it; when that path is off (a
            # forward hook, an odd head count, ...) the layer calls self_attn with the nested tensor.
            # torch's forward serves it (its own fast path, or its own error): so does this one.
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if batched and self.batch_first:
            query, key, value = self._time_first(query, key, value)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, Bsz, E = query.shape
        S = key.shape[0]
        H, D = self.num_heads, self.head_dim
        if key.shape[1] != Bsz:
            raise InputError(f"key and value have batch size {key.shape[1]} but query has {Bsz}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (Bsz, S):
            raise InputError(f"key_padding_mask must have shape (batch, source length) = {(Bsz, S)}, "
                             f"got {tuple(key_padding_mask.shape)}")

        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True is a hint that attn_mask is the causal mask: attn_mask must be "
                               "given too (as in torch.nn.MultiheadAttention), e.g. "
                               "torch.nn.Transformer.generate_square_subsequent_mask(L)")
        # torch.nn's rule: the hint is used only when nothing else must be masked or returned
        causal = is_causal and key_padding_mask is None and not need_weights
        am = None
        if attn_mask is not None and not causal:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise InputError(f"2-D attn_mask must have shape (L, S) = {(L, S)}, got {tuple(attn_mask.shape)}")
                am = attn_mask.reshape(1, 1, L, S)
            else:
                if tuple(attn_mask.shape) != (Bsz * H, L, S):
                    raise InputError(f"3-D attn_mask must have shape (batch * num_heads, L, S) = {(Bsz * H, L, S)}, "
                                     f"got {tuple(attn_mask.shape)}")
                am = attn_mask.reshape(Bsz, H, L, S)
        kpm = None if key_padding_mask is None else key_padding_mask.reshape(Bsz, 1, 1, S)

        q, k, v = self._project(query, key, value)
        mask_dtype = _mask_dtype(key_padding_mask, am, query, q, need_weights)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(1, Bsz, E).to(k.dtype)])
            v = torch.cat([v, self.bias_v.expand(1, Bsz, E).to(v.dtype)])
            am, kpm = _pad_key(am), _pad_key(kpm)
        # (T, B, E) -> (B, H, T, D)
        q = q.reshape(L, Bsz, H, D).permute(1, 2, 0, 3)
        k = k.reshape(k.shape[0], Bsz, H, D).permute(1, 2, 0, 3)
        v = v.reshape(v.shape[0], Bsz, H, D).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            zeros = torch.zeros(Bsz, H, 1, D, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], 2), torch.cat([v, zeros.to(v.dtype)], 2)
            am, kpm = _pad_key(am), _pad_key(kpm)
        mask = _merge(am, kpm, query.dtype, mask_dtype)
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            weights = _weights_reference(q, k, mask, dropout_p, self.training)
            out = torch.matmul(weights, v)
        else:
            weights = None
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                               backend=self.backend)
        out = out.permute(2, 0, 1, 3).reshape(L, Bsz, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    @staticmethod
    def _time_first(query, key, value):
        # keep "is" between the inputs: self-attention is projected with one GEMM
        if key is value:
            if query is key:
                query = key = value = query.transpose(0, 1)
            else:
                query, key = query.transpose(0, 1), key.transpose(0, 1)
                value = key
        else:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        return query, key, value
