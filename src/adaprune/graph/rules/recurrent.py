"""Rules for recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, their cells) and packed sequences.

A hidden unit is one channel: its rows in every gate of ``weight_ih``, ``weight_hh`` and the biases,
its column of ``weight_hh`` (the recurrent input), its column of ``weight_hr`` (an LSTM with
``proj_size``), and every slice that reads it downstream. ``nn.LSTM``/``nn.GRU``/``nn.RNN`` keep one
``hidden_size`` (and one ``proj_size``) for all layers and both directions, so unit ``i`` of every
layer and direction is one channel (lockstep); the projected width of an LSTM with ``proj_size`` is a
channel set of its own, in lockstep the same way. Layer ``k + 1`` reads the concatenated directions of
layer ``k``; layer 0 reads whatever produces the input (an embedding's or linear's channels). The
returned states ``h_n`` / ``c_n`` carry the same channels along their last dim, so they are pinned
when they leave the model and pruned with the layer when a prunable layer consumes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..fields import along, read
from ..registry import Call, rule
from .layers import couple

if TYPE_CHECKING:
    from ..tracer import TraceState

_STACKED = ("lstm", "gru", "rnn_tanh", "rnn_relu")
_CELLS = ("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell")
_MIXED = "a channel axis along time or batch is mixed by a recurrent layer"


def _units(state: TraceState, n: int) -> torch.Tensor:
    """``n`` fresh atoms: the hidden units (or projections) every layer and direction shares."""
    return state.atoms.new(n)


def _take_input(state: TraceState, call: Call, x: Any) -> torch.Tensor:
    """The atoms of the input's feature dim (``-1`` where the input carries none); fields along
    other dims (time, batch) are pinned, since the recurrence mixes them."""
    a, rest = read(state.atoms, state.fields_of(x), x.shape, -1)
    for f in rest:
        state.pin_op(f, call.name, _MIXED)
    return a


def _take_state(state: TraceState, call: Call, h: Any, atoms: torch.Tensor) -> None:
    """An initial state passed in (``h_0`` / ``c_0``) carries the units along its last dim."""
    if not isinstance(h, torch.Tensor) or h.shape[-1] != atoms.numel():
        return
    a = _take_input(state, call, h)
    if bool((a >= 0).any()):  # a state with no channels (zeros made in forward) fixes nothing
        state.atoms.union_pairs(atoms, a)


def _couple_cell(
    state: TraceState,
    tensors: list[Any],
    units: torch.Tensor,
    gates: int,
    inputs: torch.Tensor,
    recurrent: torch.Tensor,
    proj: torch.Tensor | None,
) -> None:
    """One layer and direction: ``[w_ih, w_hh, (b_ih, b_hh), (w_hr)]`` coupled to its units.

    ``inputs``: atoms of the columns of ``w_ih``; ``recurrent``: atoms of the columns of ``w_hh``
    (the units, or the projections with ``proj_size``).
    """
    rows = units.repeat(gates)  # gate g, unit i -> row g * hidden + i
    w_ih, w_hh = tensors[0], tensors[1]
    couple(state, rows, w_ih, 0)
    couple(state, inputs, w_ih, 1)
    couple(state, rows, w_hh, 0)
    couple(state, recurrent, w_hh, 1)
    biases = tensors[2:4] if len(tensors) in (4, 5) else []
    for b in biases:
        couple(state, rows, b, 0)
    if proj is not None:
        w_hr = tensors[-1]
        couple(state, proj, w_hr, 0)
        couple(state, units, w_hr, 1)


@rule(*_STACKED)
def recurrent(state: TraceState, call: Call) -> None:
    """``_VF.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` as ``nn.LSTM``/``nn.GRU``/``nn.RNN`` call them:
    ``(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)``, or for a
    packed sequence ``(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train,
    bidirectional)``."""
    args = call.args
    if call.kwargs or len(args) < 9:
        state.unknown(call, f"{call.name} called with arguments nn.{call.name.upper()} does not use")
        return
    packed = isinstance(args[3], (list, tuple))
    x, hx = args[0], args[2] if packed else args[1]
    params = list(args[3] if packed else args[2])
    layers = int(args[5] if packed else args[4])
    dirs = 2 if bool(args[8] if packed else args[7]) else 1
    per = len(params) // (layers * dirs) if layers * dirs else 0
    if per not in (2, 3, 4, 5) or per * layers * dirs != len(params):
        state.unknown(call, f"{call.name} with {len(params)} weights for {layers} layer(s)")
        return
    cells = [params[i * per : (i + 1) * per] for i in range(layers * dirs)]
    has_proj = per in (3, 5)
    w_ih, w_hh = cells[0][0], cells[0][1]
    hidden = cells[0][-1].shape[1] if has_proj else w_hh.shape[1]
    gates = w_ih.shape[0] // hidden
    units = _units(state, hidden)
    proj = _units(state, cells[0][-1].shape[0]) if has_proj else None
    width = proj if proj is not None else units  # what each layer outputs, per direction
    a_in = _take_input(state, call, x)
    for k in range(layers):
        inputs = a_in if k == 0 else width.repeat(dirs)  # layer k + 1 reads both directions of layer k
        for d in range(dirs):
            _couple_cell(state, cells[k * dirs + d], units, gates, inputs, width, proj)
    states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    for h, atoms in zip(states, (width, units)):
        _take_state(state, call, h, atoms)
    outs = list(call.out)
    state.set_fields(outs[0], [along(width.repeat(dirs), outs[0].dim(), -1)])
    for h, atoms in zip(outs[1:], (width, units)):
        state.set_fields(h, [along(atoms, h.dim(), -1)])


@rule(*_CELLS)
def recurrent_cell(state: TraceState, call: Call) -> None:
    """``_VF.lstm_cell`` / ``gru_cell`` / ``rnn_*_cell`` as ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell``
    call them: ``(input, hx, w_ih, w_hh, b_ih, b_hh)``; the state of one step feeds the next."""
    args = call.args
    if len(args) < 4 or call.kwargs:
        state.unknown(call, f"{call.name} called with arguments nn.{call.name} does not use")
        return
    x, hx, w_ih, w_hh = args[:4]
    biases = [b for b in args[4:6] if isinstance(b, torch.Tensor)]
    hidden = w_hh.shape[1]
    units = _units(state, hidden)
    _couple_cell(state, [w_ih, w_hh, *biases], units, w_ih.shape[0] // hidden,
                 _take_input(state, call, x), units, None)
    for h in list(hx) if isinstance(hx, (tuple, list)) else [hx]:
        _take_state(state, call, h, units)
    for h in [call.out] if isinstance(call.out, torch.Tensor) else list(call.out):
        state.set_fields(h, [along(units, h.dim(), -1)])


@rule("_pack_padded_sequence")
def pack_padded(state: TraceState, call: Call) -> None:
    """``(T, B, *F)`` (or ``(B, T, *F)``) packed into ``(N, *F)``: feature channels pass through."""
    x = call.args[0]
    data = call.out[0]
    fields = []
    for f in state.fields_of(x):
        if f.shape[0] > 1 or f.shape[1] > 1:
            state.pin_op(f, call.name, "packed along a channel axis")
        else:
            fields.append(f.reshape(f.shape[1:]))
    state.set_fields(data, fields)


@rule("_pad_packed_sequence")
def pad_packed(state: TraceState, call: Call) -> None:
    """``(N, *F)`` padded back to ``(T, B, *F)`` (or ``(B, T, *F)``): feature channels pass through."""
    data = call.args[0]
    padded = call.out[0]
    fields = []
    for f in state.fields_of(data):
        if f.shape[0] > 1:
            state.pin_op(f, call.name, "padded along a channel axis")
        else:
            fields.append(f.unsqueeze(0))
    state.set_fields(padded, fields)


@rule("index_select")
def index_select(state: TraceState, call: Call) -> None:
    """Rows picked by a tensor of positions (a batch reordered for a packed sequence): channels along
    other dims pass through; channels along the indexed dim are pinned (the positions are fixed)."""
    x, dim = call.args[0], call.arg(1, "dim")
    d = dim % x.dim()
    fields = []
    for f in state.fields_of(x):
        if f.shape[d] > 1:
            state.pin_op(f, call.name, "selected by a tensor of fixed positions along a channel dim")
        else:
            fields.append(f)
    state.set_fields(call.out, fields)
