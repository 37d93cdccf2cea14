"""One module per op family: reference implementation, torch.library registration
(schema, fake kernel, autograd) and dispatch to the backends."""
from . import rnn, attention, wkv, rotary  # noqa: F401
