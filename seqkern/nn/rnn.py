"""Drop-in ``torch.nn`` recurrent layers and cells running on seqkern's fused kernels.

``RNN``, ``LSTM``, ``GRU``, ``RNNCell``, ``LSTMCell`` and ``GRUCell`` subclass the torch
modules of the same name: constructor, parameters (names, shapes, registration order,
init), ``flatten_parameters()``, ``extra_repr``, pickling and ``state_dict`` are torch's
own, so weights move both ways with ``load_state_dict``. Only ``forward`` is replaced,
and one keyword is added: ``backend=None`` (also an attribute, changeable later), passed
to every op call (see ``seqkern.backends``).

Forward takes every input torch's modules take (batched, unbatched, ``batch_first``,
``PackedSequence``, initial state given or not) and returns the same shapes and dtypes.
Each layer and direction is one call of ``seqkern.functional.{rnn,lstm,gru}``; a
``PackedSequence`` is unpacked to a padded (T, B, I) tensor and its lengths go to the op
(``lengths=``), which keeps finished rows' states and reverses each row within its own
length, so no per-step slicing happens here. Inter-layer dropout is ``F.dropout`` on the
whole layer output (of a PackedSequence: on its packed rows), like torch.

Autocast: the outputs have the dtypes torch's module gives under the same autocast (see
``_autocast_compute_dtype``). On CUDA torch runs cuDNN's RNNs and its fused cells in the
autocast dtype, and so does the layer. CPU autocast casts only torch's matmuls (``linear``,
oneDNN's LSTM layer): the vanilla RNN and RNNCell and oneDNN's LSTM (batched or unbatched
tensor input, no projection) give the autocast dtype, while GRU, LSTMCell, GRUCell, a packed
LSTM and an LSTM's cell state with ``proj_size`` keep the dtype of the state (fp32 from an
fp32 input or initial state): those compute here in that dtype.

``torch.compile`` and ``isinstance``: Dynamo refuses every module that is an instance of
``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` (a check on the class, not on ``forward``) unless the
global ``torch._dynamo.config.allow_rnn`` is set, and setting it breaks the compiled
training of torch's own LSTM on CPU (measured, torch 2.13: aot_eager and inductor both
fail). So the layers derive from ``nn.RNNBase``, which holds all of torch's parameter
machinery (names, order, init, ``flatten_parameters``, ``extra_repr``, ``_apply``,
pickling), and take the few LSTM-specific helper methods from ``nn.LSTM``: models using
them compile with ``fullgraph=True`` with no configuration, and
``isinstance(m, torch.nn.RNNBase)`` holds but ``isinstance(m, torch.nn.LSTM)`` does not.
The cells subclass torch's cells directly (Dynamo has no rule for them).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import backends as B
from ..ops.rnn import _RNN_MODES, cell_eager, gru, gru_cell, lstm, lstm_cell, rnn, rnn_cell

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]


class StateTypeError(TypeError, RuntimeError):
    """A state or input of the wrong kind or dtype: a TypeError by seqkern's rule, and a
    RuntimeError, which is what torch.nn's recurrent modules raise for the same call (from
    deep inside their kernels), so ``except``/``pytest.raises`` written for either catches it."""


class InputDtypeError(ValueError, RuntimeError):
    """An input whose dtype is not the weights': the ValueError torch.nn's layers raise for a tensor
    input, and the RuntimeError (from their matmul) they raise for a PackedSequence's."""


class NonlinearityError(ValueError, RuntimeError):
    """An RNNCell whose ``nonlinearity`` is neither tanh nor relu: a ValueError by seqkern's rule, and
    the RuntimeError torch.nn.RNNCell raises for it."""


def _check_backend(backend):
    if backend is not None and backend not in B.BACKENDS:
        raise ValueError(f"backend must be one of {B.BACKENDS} or None, got {backend!r}")
    return backend


# ---------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------

def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


_ONEDNN = torch.backends.mkldnn.is_available()


def _autocast_compute_dtype(x: Tensor, mode: str, state: Optional[Tensor],
                            lstm_layer: bool = False) -> Optional[torch.dtype]:
    """The dtype a layer or cell computes in under autocast (None: autocast is off), following
    the dtypes torch's module produces. CPU autocast casts only the matmuls: torch's step then
    adds the low-precision gates to the carried state, so the new state has the promoted dtype of
    the two (``c' = f*c + i*g``, GRU's ``h' = (1-z)*n + z*h``, ``h' = o*tanh(c')``), the initial
    state being zeros of the input's dtype when not given; an RNN step's state is the activation
    of a matmul, always low; and oneDNN's LSTM layer (torch's CPU path for an LSTM without
    projection and without PackedSequence, with oneDNN enabled) is cast as a whole.
    ``lstm_layer``: that oneDNN case (compiled code assumes oneDNN enabled: Dynamo refuses to
    read the flag). ``state``: the carried state (LSTM: c, GRU: h) or None."""
    ac = _autocast_dtype(x)
    if ac is None or x.device.type != "cpu" or mode.startswith("RNN"):
        return ac
    if lstm_layer and _ONEDNN and (torch.compiler.is_compiling() or torch._C._get_mkldnn_enabled()):
        return ac
    s = x.dtype if state is None else state.dtype
    return torch.promote_types(ac, s) if s.is_floating_point else ac


def _cast(t, dtype):
    # autocast's eligibility rule: floating tensors other than fp64 are cast
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


# ---------------------------------------------------------------------------
# PackedSequence <-> padded (T, B, *) with lengths, in static shapes (traceable)
# ---------------------------------------------------------------------------

def _unpack(data: Tensor, batch_sizes: Tensor, Bsz: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Packed rows (N, I) -> padded (T, B, I) (zero padding), lengths (B,), and for each
    packed row its index in the flattened (T*B) padded tensor."""
    T = batch_sizes.shape[0]
    bs = batch_sizes.to(device=data.device, dtype=torch.int64)
    start = torch.cumsum(bs, 0) - bs  # first packed row of each step
    cols = torch.arange(Bsz, device=data.device)
    valid = cols[None, :] < bs[:, None]  # (T, B)
    src = torch.where(valid, start[:, None] + cols[None, :], 0).reshape(-1)
    x = data.index_select(0, src).reshape(T, Bsz, data.shape[-1])
    x = torch.where(valid[..., None], x, 0)
    lengths = valid.sum(0)
    # packed row n sits at step t = #{steps whose rows all lie before n} and column n - start[t]
    n = torch.arange(data.shape[0], device=data.device)
    t = torch.searchsorted(start + bs, n, right=True)
    flat = t * Bsz + (n - start.gather(0, t))
    return x, lengths, flat


def _pack(y: Tensor, flat: Tensor) -> Tensor:
    return y.reshape(-1, y.shape[-1]).index_select(0, flat)


def _dropout_packed(y: Tensor, p: float, flat: Tensor) -> Tensor:
    """Inter-layer dropout of a packed batch as torch applies it: on the packed rows, in their
    order (so one seed drops the same units as torch.nn), the padding left at zero."""
    rows = F.dropout(_pack(y, flat), p, True)
    return y.new_zeros(y.shape[0] * y.shape[1], y.shape[2]).index_copy(0, flat, rows).view(y.shape)


# ---------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------

def _scriptable_twin(module, home: str = __name__, names=tuple(__all__)):
    """``torch.jit.script`` support: TorchScript cannot compile seqkern's forward (Python-side
    backend dispatch, PackedSequence handling, custom ops with optional arguments), so scripting
    gets the torch.nn module of the same name holding the very same parameter tensors, hooks and
    settings. Only for the exact seqkern classes (``names`` of module ``home``; nn/attention.py
    passes its own): a subclass's own forward must not be dropped.
    Note: torch.jit.script puts what this returns into the parent's ``_modules`` in place, so
    after scripting a model, its eager copy runs torch's module there too (same weights)."""
    cls = type(module)
    if cls.__module__ != home or cls.__name__ not in names:
        return module
    twin = object.__new__(getattr(torch.nn, cls.__name__))
    state = dict(module.__dict__)
    for k in ("backend", "_seqkern_replaced_from"):
        state.pop(k, None)
    for k, v in state.items():
        if k.startswith("_") and isinstance(v, dict):
            state[k] = type(v)(v)  # own containers: registering on the twin leaves the module alone
    twin.__dict__.update(state)
    return twin


class _SeqMixin:
    """forward() shared by RNN, LSTM and GRU; placed before the torch class in the MRO."""

    backend: Optional[str] = None  # class default: modules unpickled from older versions

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend is None else f"{s}, backend={self.backend!r}"

    def __prepare_scriptable__(self):
        return _scriptable_twin(self)

    # --- checks, with torch's messages and exception types -------------------

    def _check_input(self, x: Tensor, w_dtype: torch.dtype, ac_dtype, expected_dim: int) -> None:
        if ac_dtype is None and x.dtype != w_dtype:
            raise InputDtypeError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({w_dtype}). "
                f"Convert input: input.to({w_dtype}), or convert model: model.to({x.dtype})")
        if x.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {x.dim()}")
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.size(-1)}")

    @staticmethod
    def _check_size(t: Tensor, expected, msg: str) -> None:
        if tuple(t.shape) != tuple(expected):
            raise RuntimeError(msg.format(tuple(expected), list(t.shape)))

    def _weights(self, layer: int, direction: int):
        sfx = f"l{layer}" + ("_reverse" if direction else "")
        w_ih, w_hh = getattr(self, "weight_ih_" + sfx), getattr(self, "weight_hh_" + sfx)
        b_ih = getattr(self, "bias_ih_" + sfx) if self.bias else None
        b_hh = getattr(self, "bias_hh_" + sfx) if self.bias else None
        w_hr = getattr(self, "weight_hr_" + sfx) if self.proj_size > 0 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def _run_layer(self, x, h0, c0, weights, lengths, reverse):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights
        if self.mode == "LSTM":
            hx = None if h0 is None else (h0, c0)
            y, (h, c) = lstm(x, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths=lengths, reverse=reverse,
                             backend=self.backend)
            return y, h, c
        if self.mode == "GRU":
            y, h = gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, reverse=reverse, backend=self.backend)
        else:
            # the mode decides, as in torch.nn.RNN.forward (not the nonlinearity attribute)
            y, h = rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="relu" if self.mode == "RNN_RELU" else "tanh",
                       lengths=lengths, reverse=reverse, backend=self.backend)
        return y, h, None

    # --- forward -------------------------------------------------------------

    def forward(self, input, hx=None):
        is_lstm = self.mode == "LSTM"
        name = {"LSTM": "LSTM", "GRU": "GRU"}.get(self.mode, "RNN")
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        ac = _autocast_dtype(input.data if packed else input)
        low = ac  # torch's dtype for the outputs that come out of a matmul (LSTM projection)
        # every weight read once a call (torch reads each once or twice): a parametrized weight
        # (weight_norm, spectral_norm) is recomputed, and spectral_norm's power iteration steps,
        # at each read
        all_w = [[self._weights(layer, d) for d in range(D)] for layer in range(self.num_layers)]
        w_dtype = all_w[0][0][0].dtype

        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_input(data, w_dtype, ac, 2)
            # the batch size from a shape when there is one: int(batch_sizes[0]) is data-dependent
            Bsz = sorted_indices.shape[0] if sorted_indices is not None else int(batch_sizes[0])
            x, lengths, flat = _unpack(data, batch_sizes, Bsz)
            batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
            self._check_input(x, w_dtype, ac, 3)
            if x.shape[0] == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            lengths = sorted_indices = unsorted_indices = None
            Bsz = x.shape[1]

        h0 = c0 = None
        if hx is not None:
            if is_lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    what = f"{len(hx)}-{type(hx).__name__}" if isinstance(hx, (tuple, list)) else type(hx).__name__
                    raise StateTypeError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {what}")
                h0, c0 = hx
                want = 3 if batched else 2
                if not packed and (h0.dim() != want or c0.dim() != want):
                    kind = "batched 3-D" if batched else "unbatched 2-D"
                    raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                       f"({h0.dim()}-D, {c0.dim()}-D) tensors")
            else:
                h0 = hx
                want = 3 if batched else 2
                if not packed and h0.dim() != want:
                    kind = "batched 3-D" if batched else "unbatched 2-D"
                    raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {h0.dim()}-D tensor")
            if ac is None:
                for st, what in ((h0, "h_0"), (c0, "c_0")):
                    if st is not None and st.dtype != x.dtype:
                        raise StateTypeError(f"{name}: {what} dtype ({st.dtype}) does not match input dtype "
                                             f"({x.dtype})")
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = None if c0 is None else c0.unsqueeze(1)
            L = self.num_layers * D
            self._check_size(h0, (L, Bsz, P), "Expected hidden[0] size {}, got {}" if is_lstm
                             else "Expected hidden size {}, got {}")
            if is_lstm:
                self._check_size(c0, (L, Bsz, self.hidden_size), "Expected hidden[1] size {}, got {}")
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices)
                c0 = None if c0 is None else c0.index_select(1, sorted_indices)

        if ac is not None:
            carried = c0 if is_lstm else h0
            ac = _autocast_compute_dtype(x, self.mode, carried if isinstance(carried, Tensor) else None,
                                         lstm_layer=is_lstm and not packed and self.proj_size == 0)
        dropout = self.dropout if self.training else 0.0
        with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
            x, h0, c0 = _cast(x, ac), _cast(h0, ac), _cast(c0, ac)
            h_n: List[Tensor] = []
            c_n: List[Tensor] = []
            layer_in = x
            for layer in range(self.num_layers):
                outs = []
                for d in range(D):
                    k = layer * D + d
                    weights = tuple(_cast(w, ac) for w in all_w[layer][d])
                    y, h, c = self._run_layer(layer_in, None if h0 is None else h0[k], None if c0 is None else c0[k],
                                              weights, lengths, d == 1)
                    outs.append(y)
                    h_n.append(h)
                    if c is not None:
                        c_n.append(c)
                layer_in = outs[0] if D == 1 else torch.cat(outs, 2)
                if dropout > 0 and layer + 1 < self.num_layers:
                    layer_in = (_dropout_packed(layer_in, dropout, flat) if packed
                                else F.dropout(layer_in, dropout, True))
        out = layer_in
        h_T = torch.stack(h_n, 0)
        if self.proj_size > 0 and low is not None and ac != low and ac != torch.float64:
            # torch projects h in the autocast dtype, its cell state keeps the carried dtype
            out, h_T = out.to(low), h_T.to(low)
        c_T = torch.stack(c_n, 0) if is_lstm else None
        if unsorted_indices is not None:
            h_T = h_T.index_select(1, unsorted_indices)
            c_T = None if c_T is None else c_T.index_select(1, unsorted_indices)

        if packed:
            out = PackedSequence(_pack(out, flat), batch_sizes, sorted_indices, unsorted_indices)
        elif not batched:
            out = out.squeeze(1)
            h_T = h_T.squeeze(1)
            c_T = None if c_T is None else c_T.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return (out, (h_T, c_T)) if is_lstm else (out, h_T)


_NO_PROJ = "proj_size argument is only supported for LSTM, not RNN or GRU"


class RNN(_SeqMixin, torch.nn.RNNBase):
    """``torch.nn.RNN`` (tanh or relu) on seqkern kernels; ``backend=None`` picks one per call.
    Same arguments as torch's, positional ones included (nonlinearity is the 4th)."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError(_NO_PROJ)
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__("RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)
        self.backend = _check_backend(backend)


class LSTM(_SeqMixin, torch.nn.RNNBase):
    """``torch.nn.LSTM`` (with ``proj_size``) on seqkern kernels; ``backend=None`` picks one per call."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        self.backend = _check_backend(backend)

    # torch's LSTM-specific helpers (public, sometimes called by user code)
    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden


class GRU(_SeqMixin, torch.nn.RNNBase):
    """``torch.nn.GRU`` on seqkern kernels; ``backend=None`` picks one per call."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError(_NO_PROJ)
        super().__init__("GRU", *args, **kwargs)
        self.backend = _check_backend(backend)


# ---------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------

class _CellMixin:
    backend: Optional[str] = None

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend is None else f"{s}, backend={self.backend!r}"

    def __prepare_scriptable__(self):
        return _scriptable_twin(self)

    def _weights(self):
        """(w_ih, w_hh, b_ih, b_hh) read from ``_parameters`` (module ``__getattr__`` costs ~1 us an
        attribute), or None when any of them lives elsewhere (a parametrization, weight_norm): those
        are read once a call by the general path."""
        p = self._parameters
        try:
            return p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"]
        except KeyError:
            return None

    def _prepare(self, input, states, name):
        """Checks as torch's cells do (same messages); returns (x, states, batched, autocast dtype,
        parameters), each parameter read once (a parametrized one is recomputed at each read)."""
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for i, s in enumerate(states):
            if s is not None and s.dim() not in (1, 2):
                what = f"hx[{i}]" if name == "LSTMCell" else "hidden"
                raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {s.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if x.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.size(1)} expected {self.input_size}")
        out = []
        for i, s in enumerate(states):
            if s is None:
                out.append(None)
                continue
            if s.dim() != input.dim():
                raise RuntimeError(f"{name}: hidden{i} must have {input.dim()} dimension(s) like the "
                                   f"{'batched' if batched else 'unbatched'} input, got shape {tuple(s.shape)}")
            s = s if batched else s.unsqueeze(0)
            if s.size(0) != x.size(0):
                raise RuntimeError(f"Input batch size {x.size(0)} doesn't match hidden{i} batch size {s.size(0)}")
            if s.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {s.size(1)}, "
                                   f"expected {self.hidden_size}")
            out.append(s)
        ac = _autocast_dtype(x)
        if ac is not None:
            ac = _autocast_compute_dtype(x, {"RNNCell": "RNN", "LSTMCell": "LSTM", "GRUCell": "GRU"}[name],
                                         out[-1] if name != "RNNCell" else None)
        params = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if ac is None:
            w_dtype = params[0].dtype
            for t, what in ((x, "input"), *((s, f"hidden{i}") for i, s in enumerate(out))):
                if t is not None and t.dtype != w_dtype:
                    raise StateTypeError(f"{name}: {what} dtype ({t.dtype}) does not match weight dtype "
                                         f"({w_dtype})")
        return _cast(x, ac), [_cast(s, ac) for s in out], batched, ac, tuple(_cast(w, ac) for w in params)


class RNNCell(_CellMixin, torch.nn.RNNCell):
    """``torch.nn.RNNCell`` on seqkern kernels."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        w, mode = self._weights(), _RNN_MODES.get(self.nonlinearity)
        if w is not None and mode is not None:
            out = cell_eager(mode, input, hx, None, *w, self.backend)
            if out is not None:
                return out[0]
        if self.nonlinearity not in ("tanh", "relu"):  # torch's cell checks it at each call, a RuntimeError
            raise NonlinearityError(f"Unknown nonlinearity: {self.nonlinearity}")
        x, (h,), batched, ac, params = self._prepare(input, (hx,), "RNNCell")
        with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
            out = rnn_cell(x, h, *params, nonlinearity=self.nonlinearity, backend=self.backend)
        return out if batched else out.squeeze(0)


class LSTMCell(_CellMixin, torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` on seqkern kernels."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        w = self._weights()
        if w is not None and (hx is None or (type(hx) in (tuple, list) and len(hx) == 2)):
            out = cell_eager("lstm", input, *((None, None) if hx is None else hx), *w, self.backend)
            if out is not None:
                return out
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            what = f"{len(hx)}-{type(hx).__name__}" if isinstance(hx, (tuple, list)) else type(hx).__name__
            raise StateTypeError(f"LSTMCell: hx must be a tuple (h, c) of two tensors, got {what}")
        x, (h, c), batched, ac, params = self._prepare(input, (None, None) if hx is None else tuple(hx), "LSTMCell")
        with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
            h1, c1 = lstm_cell(x, None if h is None else (h, c), *params, backend=self.backend)
        return (h1, c1) if batched else (h1.squeeze(0), c1.squeeze(0))


class GRUCell(_CellMixin, torch.nn.GRUCell):
    """``torch.nn.GRUCell`` on seqkern kernels."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        w = self._weights()
        if w is not None:
            out = cell_eager("gru", input, hx, None, *w, self.backend)
            if out is not None:
                return out[0]
        x, (h,), batched, ac, params = self._prepare(input, (hx,), "GRUCell")
        with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
            out = gru_cell(x, h, *params, backend=self.backend)
        return out if batched else out.squeeze(0)
