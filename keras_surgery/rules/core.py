"""Rules for the core learned layers: Dense and EinsumDense."""

from __future__ import annotations

import re

import keras
import numpy as np

from keras_surgery.labels import AxisLabels, LabelSpace, TensorLabels
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import (
    IDENTITY,
    ZEROS,
    Mixing,
    RuleCall,
    RuleResult,
    Start,
    WeightLabels,
    single_input,
    weight,
)

MIXING_ACTIVATIONS = frozenset({"softmax", "log_softmax"})
# Activations whose every value is >= 0.
NONNEGATIVE_ACTIVATIONS = frozenset(
    {"relu", "relu6", "sigmoid", "hard_sigmoid", "softmax", "softplus", "exponential"}
)
# Activations with f(0) = 0: a layer with them and zero weights outputs exactly 0.
ZERO_AT_ZERO = frozenset({
    "linear", "relu", "relu6", "tanh", "elu", "selu", "gelu", "silu", "swish", "leaky_relu",
    "softsign", "mish", "hard_silu", "hard_swish", "celu", "hard_tanh", "tanh_shrink",
    "soft_shrink", "hard_shrink",
})
# Activations with f(x) = x for x >= 0: a layer with them is the identity on nonnegative inputs.
IDENTITY_ON_NONNEGATIVE = frozenset({"relu", "leaky_relu", "elu", "celu"})


def activation_name(config: dict) -> str | None:
    act = config.get("activation")
    if isinstance(act, str):
        return act
    if isinstance(act, dict):  # a serialized activation function or layer
        return act.get("config") if isinstance(act.get("config"), str) else act.get("class_name")
    return None


def activation_mixing(call: RuleCall, labels: AxisLabels) -> list[Mixing]:
    """A softmax-like activation mixes the units of the axis it normalises."""
    act = activation_name(call.config)
    if act in MIXING_ACTIVATIONS:
        return [Mixing((labels,), f"'{act}' activation normalises over its units")]
    return []


def linear_starts(
    call: RuleCall,
    x: TensorLabels,
    out: TensorLabels,
    axis: int,
    *,
    bias: bool,
    refuse_identity: str | None = None,
) -> dict[str, Start]:
    """Starts of a new layer computing `activation(kernel . x + bias)` along `axis` (Dense,
    a convolution): "zero" sets kernel and bias to 0 (exact when the activation is 0 at 0);
    "identity" sets the kernel to the identity and the bias to 0, when the layer has as many
    units as inputs and its activation is the identity (linear; relu-like on inputs >= 0).
    `refuse_identity` is the layer's own reason it cannot be the identity (its geometry)."""
    act = activation_name(call.config) or "linear"
    roles = ("kernel", "bias") if bias else ("kernel",)
    n_in, n_out = x[axis].length, out[axis].length
    starts: dict[str, Start] = {}
    if act in ZERO_AT_ZERO and n_out is not None:
        zero_out = out[:axis] + (call.zeros(n_out),) + out[axis + 1:]
        starts["zero"] = Start("zero", dict.fromkeys(roles, ZEROS), [zero_out])
    else:
        starts["zero"] = Start("zero", refused=f"its activation '{act}' is not 0 at 0")
    reason = refuse_identity
    if reason is None and n_in != n_out:
        reason = f"it has {n_out} units for {n_in} inputs"
    if reason is None and act != "linear":
        if act not in IDENTITY_ON_NONNEGATIVE:
            reason = f"its activation '{act}' is not the identity"
        elif not call.nonnegative_input():
            reason = (f"its activation '{act}' is the identity only on inputs >= 0, and its "
                      "input may be negative")
    if reason is not None:
        starts["identity"] = Start("identity", refused=reason)
    else:
        values = {"kernel": IDENTITY, **({"bias": ZEROS} if bias else {})}
        starts["identity"] = Start("identity", values, [x])
    return starts


def nonnegative_activation(call: RuleCall) -> bool:
    return activation_name(call.config) in NONNEGATIVE_ACTIVATIONS


def check_weights(call: RuleCall, weights: list[WeightLabels]) -> list[WeightLabels]:
    shapes = [w.shape for w in call.weights]
    if len(shapes) != len(weights) or any(
        len(s) != len(w.axes)
        or any(a.labels.ids is not None and len(a.labels.ids) != d for a, d in zip(w.axes, s))
        for s, w in zip(shapes, weights)
    ):
        raise ValueError(
            f"{call.describe()} has variables {[(w.local, w.shape) for w in call.weights]}, "
            "but its rule expects "
            f"{[(w.role, tuple(a.labels.length for a in w.axes)) for w in weights]}."
        )
    return weights


def dense_rule(call: RuleCall) -> RuleResult:
    """Dense: kernel (in: input's last axis, out: units), bias (out: units)."""
    x = single_input(call)
    features = x[-1]
    units = call.units(int(call.config["units"]), call.union(features))
    use_bias = call.config.get("use_bias", True)
    weights = [weight("kernel", ("in", features), ("out", units))]
    if use_bias:
        weights.append(weight("bias", ("out", units)))
    out = x[:-1] + (units,)
    return RuleResult(
        outputs=[out],
        weights=check_weights(call, weights),
        mixing=activation_mixing(call, units),
        nonnegative=[nonnegative_activation(call)],
        starts=linear_starts(call, x, out, len(x) - 1, bias=use_bias),
    )


_EQUATION = re.compile(r"^\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z]+)\s*->\s*([a-zA-Z.]+)\s*$")


def _broadcast_axis(space: LabelSpace) -> AxisLabels:
    return AxisLabels(np.array([space.intern(("broadcast",))]), np.zeros(1, dtype=np.int64))


def einsum_dense_rule(call: RuleCall) -> RuleResult:
    """EinsumDense with any `input,kernel->output` equation (with or without `...`).

    Kernel axes whose letter is only in the input are contracted ("in"); letters only in the
    output are new units ("out", one unit set per letter); letters in input, kernel and output
    scale each index ("diag").
    """
    x = single_input(call)
    match = _EQUATION.match(call.config["equation"])
    if match is None:
        raise ValueError(f"{call.describe()}: unsupported equation {call.config['equation']!r}")
    in_spec, kernel_spec, out_spec = match.groups()
    elided = "..." in in_spec
    in_letters = in_spec.replace("...", "")
    out_letters = out_spec.replace("...", "")
    if not elided and len(in_letters) == len(x) + 1 and out_letters[:1] == in_letters[:1]:
        # Keras equations name the batch axis too ("ab,bc->ac"); labels have no batch axis.
        in_letters, out_letters = in_letters[1:], out_letters[1:]
    # Letters of the input, aligned from the right when the leading axes are elided.
    offset = len(x) - len(in_letters) if elided else 0
    if offset < 0 or (not elided and len(in_letters) != len(x)):
        raise ValueError(f"{call.describe()}: equation does not fit input rank {len(x)}")
    by_letter = {c: x[offset + i] for i, c in enumerate(in_letters)}
    contracted = [by_letter[c] for c in in_letters if c not in out_letters]
    dep = call.union(*contracted) if contracted else call.union(*by_letter.values())

    kernel_shape = call.weights[0].shape if call.weights else ()
    kernel_axes = []
    unit_labels: dict[str, AxisLabels] = {}
    for i, c in enumerate(kernel_spec):
        if c in in_letters and c not in out_letters:
            kernel_axes.append(("in", by_letter[c]))
        elif c in in_letters:
            kernel_axes.append(("diag", by_letter[c]))
        else:
            size = kernel_shape[i] if i < len(kernel_shape) else 0
            unit_labels[c] = call.units(int(size), dep, role=c)
            kernel_axes.append(("out", unit_labels[c]))
    weights = [weight("kernel", *kernel_axes)]

    def out_axis(c: str) -> AxisLabels:
        return by_letter[c] if c in by_letter else unit_labels[c]

    bias_axes = call.config.get("bias_axes")
    if bias_axes:
        first = min(out_letters.find(c) for c in bias_axes)
        axes = []
        for c in out_letters[first:]:
            if c not in bias_axes:
                axes.append(("struct", _broadcast_axis(call.space)))
            else:
                axes.append(("out" if c in unit_labels else "diag", out_axis(c)))
        weights.append(weight("bias", *axes))
    leading = x[:offset] if elided else ()
    outputs = [tuple(leading) + tuple(out_axis(c) for c in out_letters)]
    last = outputs[0][-1]
    return RuleResult(outputs, check_weights(call, weights), activation_mixing(call, last))


register_rule(keras.layers.Dense, dense_rule)
register_rule(keras.layers.EinsumDense, einsum_dense_rule)
