"""Rules for layers and operations that act index by index: pass-through, activations, merges,
concatenation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np

from keras_surgery.labels import AxisLabels, LabelSpace, TensorLabels, concat_axes
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import (
    IDENTITY_ON_NONNEGATIVE,
    MIXING_ACTIVATIONS,
    NONNEGATIVE_ACTIVATIONS,
    ONES,
    ZERO_AT_ZERO,
    ZEROS,
    Mixing,
    RuleCall,
    RuleResult,
    Start,
    activation_name,
    check_weights,
    single_input,
    weight,
    zero_passing,
)

# Activations that map values >= 0 to values >= 0 (besides the always-nonnegative ones).
_KEEP_NONNEGATIVE = IDENTITY_ON_NONNEGATIVE | {"linear", "tanh"}


def passthrough_rule(call: RuleCall) -> RuleResult:
    """Output labels are the input labels (Dropout, ReLU, Identity, ...): 0 stays 0."""
    # Only the built-in pass-throughs are known to keep signs (a custom one may negate).
    x = single_input(call)
    builtin = call.layer.class_name in _PASSTHROUGH
    nonnegative = (call.nonnegative_input() and builtin) or _relu_layer_nonnegative(call.config)
    starts = zero_passing()
    if builtin:
        starts["identity"] = _passthrough_identity(call, x)
    return RuleResult(outputs=[x], weights=check_weights(call, []),
                      nonnegative=[nonnegative], starts=starts)


def _passthrough_identity(call: RuleCall, x: TensorLabels) -> Start:
    """Built-in pass-throughs are the identity in inference, except the relu-like ones, which
    are only on inputs >= 0 (and a ReLU with a cap or threshold not even then)."""
    cfg = call.config
    if call.layer.class_name not in _RELU_LIKE:
        return Start("identity", outputs=[x])
    if cfg.get("max_value") is not None or float(cfg.get("threshold") or 0.0) != 0.0:
        return Start("identity", refused="its max_value / threshold clip its input")
    if not call.nonnegative_input():
        return Start("identity", refused="it is the identity only on inputs >= 0, and its "
                     "input may be negative")
    return Start("identity", outputs=[x])


def _relu_layer_nonnegative(config: dict) -> bool:
    """A ReLU layer without a negative slope and with a threshold >= 0 outputs values >= 0
    (other pass-through layers have no such keys)."""
    if "negative_slope" not in config or "threshold" not in config or "max_value" not in config:
        return False
    return float(config.get("negative_slope") or 0.0) == 0.0 and float(
        config.get("threshold") or 0.0) >= 0.0


def def_passthrough(*classes: type, function_keys: Iterable[str] | None = None) -> None:
    """Registers `passthrough_rule` for each class: one line per pass-through layer.
    `function_keys` are the classes' settings that change what they compute (a ReLU's
    threshold); see `register_rule`."""
    for cls in classes:
        register_rule(cls, passthrough_rule, function_keys=function_keys)


def _mixing_on(call: RuleCall, x: TensorLabels, axis: int | Sequence[int], what: str) -> Mixing:
    axes = [axis] if isinstance(axis, int) else list(axis)
    picked = tuple(x[call.normalize_axis(a, len(x))] for a in axes)
    return Mixing(picked, what)


def activation_rule(call: RuleCall) -> RuleResult:
    x = single_input(call)
    act = activation_name(call.config)
    mixing = []
    if act in MIXING_ACTIVATIONS:
        mixing.append(_mixing_on(call, x, -1, f"'{act}' normalises over the last axis"))
        x = call.mixed(x, [len(x) - 1])
    act = act or "linear"
    nonnegative = act in NONNEGATIVE_ACTIVATIONS or (
        act in _KEEP_NONNEGATIVE and call.nonnegative_input())
    starts = zero_passing() if act in ZERO_AT_ZERO else {}
    if act == "linear" or (act in IDENTITY_ON_NONNEGATIVE and call.nonnegative_input()):
        starts["identity"] = Start("identity", outputs=[x])
    else:
        starts["identity"] = Start("identity", refused=f"its activation '{act}' changes values")
    return RuleResult([x], check_weights(call, []), mixing, nonnegative=[nonnegative],
                      starts=starts)


def softmax_rule(call: RuleCall) -> RuleResult:
    x = single_input(call)
    axis = call.config.get("axis", -1)
    mixing = _mixing_on(call, x, axis, "softmax normalises over its axis")
    axes = [axis] if isinstance(axis, int) else list(axis)
    out = call.mixed(x, [call.normalize_axis(int(a), len(x)) for a in axes])
    return RuleResult([out], check_weights(call, []), [mixing])


def prelu_rule(call: RuleCall) -> RuleResult:
    """PReLU: one alpha per index, except along `shared_axes` (size 1)."""
    x = single_input(call)
    shared = {call.normalize_axis(a, len(x)) for a in (call.config.get("shared_axes") or [])}
    broadcast = AxisLabels(np.array([call.space.intern(("broadcast",))]), np.zeros(1, np.int64))
    axes = [("struct", broadcast) if i in shared else ("diag", a) for i, a in enumerate(x)]
    # alpha = 1 makes it the identity on every input
    starts = {"identity": Start("identity", {"alpha": ONES}, [x])}
    return RuleResult([x], check_weights(call, [weight("alpha", *axes)]), starts=starts)


def layer_scale_rule(call: RuleCall) -> RuleResult:
    """x * gamma with one gamma per index of the last axis (ConvNeXt's LayerScale): 0 stays 0,
    and gamma follows its channel (diag)."""
    x = single_input(call)
    if x[-1].length is None:  # its zero start would label a channel axis of unknown length
        raise ValueError(f"{call.describe()}: its channel axis has no known length")
    starts = {"identity": Start("identity", {"gamma": ONES}, [x]),
              "zero": Start("zero", {"gamma": ZEROS},
                            lambda: [x[:-1] + (call.zeros(x[-1].length),)])}
    return RuleResult([x], check_weights(call, [weight("gamma", ("diag", x[-1]))]),
                      starts=starts)


def rescaling_rule(call: RuleCall) -> RuleResult:
    """x * scale + offset: labels keep their meaning; a non-zero offset moves their zero."""
    x = single_input(call)
    offset = call.config.get("offset", 0.0)
    scale = call.config.get("scale", 1.0)
    if np.any(np.asarray(offset, dtype=float) != 0):
        x = x[:-1] + (call.derived(x[-1]),)
    if np.all(np.asarray(scale, dtype=float) == 1) and np.all(np.asarray(offset, dtype=float) == 0):
        identity = Start("identity", outputs=[x])
    else:
        identity = Start("identity", refused="it scales or shifts its input")
    return RuleResult([x], check_weights(call, []), starts={"identity": identity})


def _merge_axes(call: RuleCall, axes: Sequence[AxisLabels], sums: bool = False) -> AxisLabels:
    """Element-wise merge of one axis of several inputs (broadcasting length-1 axes)."""
    known = [a for a in axes if a.ids is not None]
    if len(known) < len(axes):
        return AxisLabels.unknown(call.deps.union(np.concatenate([a.deps for a in axes])))
    n = max(len(a.ids) for a in known)
    ids = [a.ids if len(a.ids) == n else np.repeat(a.ids, n) for a in known]
    deps = [a.deps if len(a.deps) == n else np.repeat(a.deps, n) for a in known]
    if all(np.array_equal(ids[0], other) for other in ids[1:]):
        merged_ids = ids[0]
    else:
        stacked = np.ascontiguousarray(np.stack(ids, axis=1), dtype=np.int64)
        merged_ids = call.space.remembered(
            ("merge", sums, stacked.shape, stacked.tobytes()),
            lambda: _merged_labels(call.space, stacked, sums))
    return AxisLabels(merged_ids, call.deps.union_elementwise(deps))


def _merged_labels(space: LabelSpace, stacked: np.ndarray, sums: bool) -> np.ndarray:
    """The label of each row of `stacked` (an index's labels in the merged inputs): the set
    of them, `LabelSpace.set_of`."""
    rows, inverse = np.unique(stacked, axis=0, return_inverse=True)
    merged = np.array([space.set_of(r, sums=sums) for r in rows], dtype=np.int64)[
        inverse.reshape(-1)
    ]
    # Different rows can make the same set ({a_j, b_j} from (a_j, b_j) and (b_j, a_j)): each
    # such index feeds its own weights downstream, so it keeps a label of its own.
    return space.distinct(merged)


def merge_rule(call: RuleCall, *, sums: bool = False) -> RuleResult:
    """Add, Subtract, Multiply, Average, Maximum, Minimum (layers or keras.ops).

    An index whose inputs carry different labels gets the *set* of them: a residual stream
    index is {x_j, f(x)_j}. A merge with a constant (`ops.add(x, 1.0)`) moves the zero.
    """
    if len(call.inputs) == 1:
        x = call.inputs[0]
        return RuleResult([x[:-1] + (call.derived(x[-1]),)], check_weights(call, []))
    ranks = {len(x) for x in call.inputs}
    if len(ranks) != 1:
        raise ValueError(f"{call.describe()}: inputs of different ranks {sorted(ranks)}")
    rank = ranks.pop()
    out = tuple(_merge_axes(call, [x[a] for x in call.inputs], sums) for a in range(rank))
    nonnegative = sums and all(call.nonnegative_input(i) for i in range(len(call.inputs)))
    return RuleResult([out], check_weights(call, []), nonnegative=[nonnegative], sums=sums)


def serialized_constant(value: Any) -> Any:
    """A call argument as Keras serializes it, with a `__tensor__` / `__numpy__` constant given
    by its value (a number or nested lists); anything else as it is."""
    if isinstance(value, dict) and value.get("class_name") in ("__tensor__", "__numpy__"):
        return (value.get("config") or {}).get("value")
    return value


def scalar_factor(call: RuleCall) -> float | None:
    """The non-zero scalar constant a one-tensor multiplication multiplies by (`x * 2.0`, or a
    scalar `__tensor__` / `__numpy__` argument as Keras serializes it), or None."""
    constants = [a for a in call.call_args
                 if not (isinstance(a, dict) and a.get("class_name") == "__keras_tensor__")]
    if len(constants) != 1 or len(call.call_args) != 2:
        return None
    value = serialized_constant(constants[0])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value != 0.0 and np.isfinite(value) else None


def multiply_rule(call: RuleCall) -> RuleResult:
    """Multiply (layer or keras.ops): a merge; one tensor times a scalar constant keeps its
    labels' meaning and 0 at 0, and says which constant (`RuleResult.scales_by`)."""
    result = merge_rule(call)
    if len(call.inputs) != 1:
        return result
    return dataclasses.replace(result, scales_by=scalar_factor(call))


def add_rule(call: RuleCall) -> RuleResult:
    """Add (layer or keras.ops): a merge whose output is the sum of its inputs, so an input
    that is exactly 0 (a new branch started at zero) leaves the others' labels as they are."""
    return merge_rule(call, sums=True)


def concatenate_rule(call: RuleCall) -> RuleResult:
    """Concatenation along `axis`: the labels of the parts, one after the other.

    A tensor that comes more than once (`concat([p, q, p])`, NAS-style cells) would put the
    same labels on the axis twice; its later copies are labelled as copies
    (`LabelSpace.distinct`), with the dependency sets of what they copy."""
    if not call.inputs:
        raise ValueError(f"{call.describe()} has no inputs")
    rank = len(call.inputs[0])
    axis = call.normalize_axis(int(call.config.get("axis", -1)), rank)
    first = call.inputs[0]
    joined = concat_axes([x[axis] for x in call.inputs])
    if joined.ids is not None:
        joined = AxisLabels(call.space.distinct(joined.ids), joined.deps)
    out = tuple(joined if a == axis else first[a] for a in range(rank))
    nonnegative = all(call.nonnegative_input(i) for i in range(len(call.inputs)))
    return RuleResult([out], check_weights(call, []), nonnegative=[nonnegative])


_RELU_LIKE = ("ReLU", "LeakyReLU", "ELU")
_PASSTHROUGH = (
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianDropout",
    "GaussianNoise",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "Masking",
)
# Pass-throughs copy their input in inference, except the relu-like ones, which clip and bend
# it. (A spatial dropout's data_format matters only while training; it stays declared because
# changed settings were reported for it before rules declared their own.)
_PASSTHROUGH_KEYS = {
    "ReLU": ("max_value", "negative_slope", "threshold"),
    "LeakyReLU": ("negative_slope",),
    "ELU": ("alpha",),
    "SpatialDropout2D": ("data_format",),
    "SpatialDropout3D": ("data_format",),
}
for _name in _PASSTHROUGH:
    if hasattr(keras.layers, _name):
        def_passthrough(getattr(keras.layers, _name),
                        function_keys=_PASSTHROUGH_KEYS.get(_name, ()))
register_rule(keras.layers.Activation, activation_rule, function_keys=("activation",))
register_rule(keras.layers.Softmax, softmax_rule, function_keys=("axis",))
register_rule(keras.layers.PReLU, prelu_rule)
register_rule(keras.layers.Rescaling, rescaling_rule, function_keys=("scale", "offset"))
register_rule(keras.layers.Concatenate, concatenate_rule, function_keys=("axis",))
register_rule(keras.layers.Add, add_rule)
for _merge in (
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
):
    register_rule(_merge, merge_rule)


def _register_ops() -> None:
    # keras.ops calls on symbolic tensors appear in the graph as Operation nodes.
    from keras.src.ops import numpy as knp

    for name in ("Add", "Subtract", "Multiply", "Maximum", "Minimum"):
        op = getattr(knp, name, None)
        if op is not None:
            register_rule(op, {"Add": add_rule, "Multiply": multiply_rule}.get(name, merge_rule))
    if getattr(knp, "Concatenate", None) is not None:
        register_rule(knp.Concatenate, concatenate_rule, function_keys=("axis",))


_register_ops()


def _register_application_layers() -> None:
    # Layers that keras.applications models define for themselves (ConvNeXt). StochasticDepth
    # drops whole examples while training and is the identity otherwise: 0 stays 0.
    try:
        from keras.src.applications.convnext import LayerScale, StochasticDepth
    except ImportError:  # moved in another Keras version: such layers are then opaque, loudly
        return
    register_rule(LayerScale, layer_scale_rule)
    def_passthrough(StochasticDepth)


_register_application_layers()
