"""Functional API (DESIGN.md, "Public API"). Every op takes ``backend=None``."""
from .ops.rnn import rnn, lstm, gru, rnn_cell, lstm_cell, gru_cell  # noqa: F401
from .ops.attention import scaled_dot_product_attention  # noqa: F401
from .ops.wkv import wkv4  # noqa: F401
from .ops.rotary import apply_rotary, rotary_cos_sin  # noqa: F401

__all__ = [
    "rnn", "lstm", "gru", "rnn_cell", "lstm_cell", "gru_cell",
    "scaled_dot_product_attention", "wkv4", "apply_rotary", "rotary_cos_sin",
]
