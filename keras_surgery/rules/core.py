"""Rules for the core learned layers: Dense and EinsumDense."""

from __future__ import annotations

import re

import keras
import numpy as np

from keras_surgery.labels import AxisLabels, LabelSpace
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import (
    RuleCall,
    RuleResult,
    activation_mixing,
    check_weights,
    linear_starts,
    nonnegative_activation,
    single_input,
    weight,
)


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


register_rule(keras.layers.Dense, dense_rule, function_keys=("activation", "use_bias"))
register_rule(keras.layers.EinsumDense, einsum_dense_rule,
              function_keys=("activation", "equation", "bias_axes"))
