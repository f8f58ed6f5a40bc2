"""Rules for recurrent layers: SimpleRNN, LSTM, GRU, RNN over one of their cells, Bidirectional.

A recurrent layer keeps its variables in its cell (`cell/vars/0` kernel, `1` recurrent_kernel,
`2` bias). The kernel's columns are gates: one block of `units` columns per gate, in Keras's
order (LSTM i, f, c, o; GRU z, r, h; SimpleRNN one block), each unit of each gate labelled
`Unit(layer, gate, j)`. The recurrent kernel reads the layer's own hidden units, so its rows
carry the labels of the output units. With the generic fill rule, a widened layer gets fresh
weights into its new gates and zeros from its new units into its old gates: the new units never
reach the old ones, and the old units compute exactly what they did.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import keras
import numpy as np

from keras_surgery.graph import resolve_keras_class
from keras_surgery.labels import AxisLabels, TensorLabels, concat_axes
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import RuleCall, RuleResult, WeightLabels, check_weights, weight

GRU_BIAS_ROWS = (("gru_bias", "input"), ("gru_bias", "recurrent"))
CARRY = "carry"  # role of an LSTM's cell state (the gates already use "c")


@dataclass(frozen=True)
class CellKind:
    """What distinguishes the built-in cells: gate names in Keras's column order, states."""

    gates: tuple[str, ...]
    states: tuple[str, ...]  # roles of the states; "" is the hidden state (= the output units)


SIMPLE_RNN = CellKind(("",), ("",))
LSTM = CellKind(("i", "f", "c", "o"), ("", CARRY))
GRU = CellKind(("z", "r", "h"), ("",))

_CELL_KINDS: tuple[tuple[type, CellKind], ...] = (
    (keras.layers.LSTM, LSTM),
    (keras.layers.LSTMCell, LSTM),
    (keras.layers.GRU, GRU),
    (keras.layers.GRUCell, GRU),
    (keras.layers.SimpleRNN, SIMPLE_RNN),
    (keras.layers.SimpleRNNCell, SIMPLE_RNN),
)


def cell_kind(cls: type | None, class_name: str) -> CellKind:
    """The cell kind of a layer or cell class (a subclass of a built-in counts as it)."""
    if cls is not None:
        for base, kind in _CELL_KINDS:
            if issubclass(cls, base):
                return kind
    raise ValueError(
        f"no recurrent rule for cell class {class_name} (only SimpleRNN, LSTM and GRU cells)"
    )


def _serialized_class(entry: Any, where: str) -> tuple[type | None, str, dict]:
    """(class, class name, config) of a serialized sub-layer entry of a config."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ValueError(f"{where}: expected a serialized layer, got {type(entry).__name__}")
    class_name = str(entry.get("class_name"))
    return resolve_keras_class(entry.get("module"), class_name), class_name, entry["config"]


@dataclass
class Recurrence:
    """The labels one recurrent layer (or one direction of a Bidirectional) produced."""

    output: TensorLabels
    states: list[TensorLabels]
    weights: dict[str, WeightLabels]  # weight path inside the layer -> labels


def recurrence(
    call: RuleCall,
    kind: CellKind,
    layer_config: dict,
    cell_config: dict,
    x: TensorLabels,
    dep: int,
    *,
    role: str = "",
    local: str = "",
) -> Recurrence:
    """Labels one recurrent layer over sequences `x` (time, features).

    Args:
        call: the rule call (units are labelled with its identity).
        kind: the cell kind.
        layer_config: the RNN layer's config (return_sequences, go_backwards).
        cell_config: the cell's config (units, use_bias, reset_after); the layer's own config
            for LSTM/GRU/SimpleRNN layers.
        x: labels of the input sequences.
        dep: what every unit depends on: the recurrence mixes all time steps and features.
        role: prefix of every unit role ("fwd" / "bwd" in a Bidirectional).
        local: prefix of the weight paths inside the layer ("forward_layer/").
    """
    if len(x) != 2:
        raise ValueError(f"{call.describe()}: expected (time, features) inputs, got rank {len(x)}")
    units = int(cell_config["units"])

    def named(name: str) -> str:
        return f"{role}/{name}" if role and name else role or name

    hidden = call.units(units, dep, role=named(""))
    gates = concat_axes([call.units(units, dep, role=named(g)) for g in kind.gates])
    kernel = weight("kernel", ("in", x[-1]), ("out", gates))
    recurrent = weight("recurrent_kernel", ("in", hidden), ("out", gates))
    weights = {"0": kernel, "1": recurrent}
    if cell_config.get("use_bias", True):
        if kind is GRU and cell_config.get("reset_after", True):
            rows = AxisLabels(call.space.intern_many(GRU_BIAS_ROWS), np.zeros(2, np.int64))
            weights["2"] = weight("bias", ("struct", rows), ("out", gates))
        else:
            weights["2"] = weight("bias", ("out", gates))
    time = x[0]
    if layer_config.get("go_backwards", False) and time.ids is not None:
        time = AxisLabels(time.ids[::-1], time.deps[::-1])  # outputs come out reversed
    output = (time, hidden) if layer_config.get("return_sequences", False) else (hidden,)
    states = [
        (hidden,) if s == "" else (call.units(units, dep, role=named(s)),) for s in kind.states
    ]
    return Recurrence(
        output,
        states if layer_config.get("return_state", False) else [],
        {
            f"{local}cell/vars/{k}": replace(w, role=f"{local}{w.role}")
            for k, w in weights.items()
        },
    )


def in_store_order(call: RuleCall, by_path: dict[str, WeightLabels]) -> list[WeightLabels]:
    """The labels of the layer's weights in the order the graph lists them."""
    have = [w.local for w in call.weights]
    if sorted(have) != sorted(by_path):
        raise call.weight_count_error(sorted(by_path))
    return check_weights(call, [by_path[p] for p in have])


def _sequences_and_dep(call: RuleCall) -> tuple[TensorLabels, int]:
    if not call.inputs:
        raise ValueError(f"{call.describe()} has no inputs")
    # inputs[0] is the sequence; initial states (keyword inputs) also feed every unit.
    return call.inputs[0], call.union(*(a for x in call.inputs for a in x))


def recurrent_rule(call: RuleCall) -> RuleResult:
    """SimpleRNN, LSTM and GRU: gate-aware kernel, recurrent kernel and bias labels."""
    x, dep = _sequences_and_dep(call)
    kind = cell_kind(call.layer.cls, call.layer.class_name)
    rec = recurrence(call, kind, call.config, call.config, x, dep)
    return RuleResult([rec.output, *rec.states], in_store_order(call, rec.weights))


def rnn_rule(call: RuleCall) -> RuleResult:
    """keras.layers.RNN over one SimpleRNN / LSTM / GRU cell (its variables in `cell/vars`)."""
    x, dep = _sequences_and_dep(call)
    cls, class_name, cell_config = _serialized_class(call.config.get("cell"), call.describe())
    kind = cell_kind(cls, class_name)
    rec = recurrence(call, kind, call.config, cell_config, x, dep)
    return RuleResult([rec.output, *rec.states], in_store_order(call, rec.weights))


def _merge(call: RuleCall, a: TensorLabels, b: TensorLabels, mode: str) -> TensorLabels:
    """Element-wise merge (sum, ave, mul) of the two directions: each index is a set."""
    last_a, last_b = a[-1], b[-1]
    if last_a.ids is None or last_b.ids is None or len(last_a.ids) != len(last_b.ids):
        raise ValueError(f"{call.describe()}: merge_mode={mode!r} needs equal unit counts")
    ids = np.array([call.space.set_of([i, j]) for i, j in zip(last_a.ids, last_b.ids)], np.int64)
    merged = AxisLabels(ids, call.deps.union_elementwise([last_a.deps, last_b.deps]))
    return a[:-1] + (merged,)


def bidirectional_rule(call: RuleCall) -> RuleResult:
    """Bidirectional over SimpleRNN / LSTM / GRU: each direction labelled by the inner rule with
    unit roles "fwd" / "bwd"; outputs merged by `merge_mode` (concat, sum, ave, mul, None)."""
    x, dep = _sequences_and_dep(call)
    directions: list[Recurrence] = []
    for key, role in (("layer", "fwd"), ("backward_layer", "bwd")):
        entry = call.config.get(key) or call.config.get("layer")
        cls, class_name, config = _serialized_class(entry, call.describe())
        if key == "backward_layer" and not call.config.get("backward_layer"):
            config = {**config, "go_backwards": True}  # how Bidirectional builds it by default
        if issubclass(cls or object, keras.layers.RNN) and not issubclass(
            cls, (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
        ):
            cls, class_name, cell_config = _serialized_class(config.get("cell"), call.describe())
        else:
            cell_config = config
        kind = cell_kind(cls, class_name)
        local = "forward_layer/" if role == "fwd" else "backward_layer/"
        directions.append(
            recurrence(call, kind, config, cell_config, x, dep, role=role, local=local)
        )
    fwd, bwd = directions
    bwd_out = bwd.output
    if len(bwd_out) == 2 and bwd_out[0].ids is not None:  # Bidirectional flips it back in time
        time = bwd_out[0]
        bwd_out = (AxisLabels(time.ids[::-1], time.deps[::-1]), bwd_out[1])
    mode = call.config.get("merge_mode", "concat")
    if mode == "concat":
        outputs: list[TensorLabels] = [fwd.output[:-1] + (concat_axes([fwd.output[-1],
                                                                      bwd_out[-1]]),)]
    elif mode in ("sum", "ave", "mul"):
        outputs = [_merge(call, fwd.output, bwd_out, mode)]
    elif mode is None:
        outputs = [fwd.output, bwd_out]
    else:
        raise ValueError(f"{call.describe()}: unknown merge_mode {mode!r}")
    return RuleResult(
        outputs + fwd.states + bwd.states,
        in_store_order(call, {**fwd.weights, **bwd.weights}),
    )


def unsupported_rule(call: RuleCall) -> RuleResult:
    """Convolutional recurrent layers have no rule yet: they become opaque, with a warning."""
    raise ValueError(f"{call.layer.class_name} is not supported by the recurrent rules yet")


# Direction and sequence outputs change what every recurrent layer computes; a wrapped cell or
# layer (`cell`, `layer`, `backward_layer`) answers for its own settings.
_SEQUENCE_KEYS = ("go_backwards", "return_sequences")
_CELL_KEYS = ("activation", "use_bias", *_SEQUENCE_KEYS)
_GATED_KEYS = (*_CELL_KEYS, "recurrent_activation")

register_rule(keras.layers.SimpleRNN, recurrent_rule, function_keys=_CELL_KEYS)
register_rule(keras.layers.LSTM, recurrent_rule, function_keys=_GATED_KEYS)
register_rule(keras.layers.GRU, recurrent_rule, function_keys=(*_GATED_KEYS, "reset_after"))
register_rule(keras.layers.RNN, rnn_rule, function_keys=_SEQUENCE_KEYS)
register_rule(keras.layers.Bidirectional, bidirectional_rule, function_keys=("merge_mode",))
for _name in ("ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"):
    if hasattr(keras.layers, _name):
        register_rule(getattr(keras.layers, _name), unsupported_rule,
                      function_keys=(*_GATED_KEYS, "strides", "dilation_rate", "padding",
                                     "data_format"))
