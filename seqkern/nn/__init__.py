"""Drop-in modules: same constructor, forward, parameter names and state_dict as torch.nn."""
from .rnn import RNN, LSTM, GRU, RNNCell, LSTMCell, GRUCell  # noqa: F401
from .attention import MultiheadAttention  # noqa: F401
from .rwkv import RWKV4TimeMix, RWKV4ChannelMix, RWKV4Block  # noqa: F401
from .positional import SinusoidalPositionalEncoding, RotaryEmbedding  # noqa: F401

__all__ = [
    "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "MultiheadAttention",
    "RWKV4TimeMix", "RWKV4ChannelMix", "RWKV4Block", "SinusoidalPositionalEncoding", "RotaryEmbedding",
]
