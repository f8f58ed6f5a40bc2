"""Rules for normalization layers: BatchNormalization, LayerNormalization, Normalization."""

from __future__ import annotations

import keras

from keras_surgery.labels import TensorLabels
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import Mixing, RuleCall, RuleResult, single_input, weight
from keras_surgery.rules.core import check_weights


def _axes(call: RuleCall, x: TensorLabels, axis: object) -> list[int]:
    if axis is None:
        return []
    axes = [axis] if isinstance(axis, int) else list(axis)  # type: ignore[arg-type]
    return sorted(call.normalize_axis(int(a), len(x)) for a in axes)


def _derive(call: RuleCall, x: TensorLabels, axes: list[int]) -> TensorLabels:
    return tuple(call.derived(a) if i in axes else a for i, a in enumerate(x))


def batch_normalization_rule(call: RuleCall) -> RuleResult:
    """Per-channel gamma, beta, moving mean and variance along `axis` (diag)."""
    x = single_input(call)
    (axis,) = _axes(call, x, call.config.get("axis", -1))
    channel = x[axis]
    roles = (["gamma"] if call.config.get("scale", True) else []) + (
        ["beta"] if call.config.get("center", True) else []
    ) + ["moving_mean", "moving_variance"]
    weights = [weight(role, ("diag", channel), trainable=not role.startswith("moving_"))
               for role in roles]
    return RuleResult([_derive(call, x, [axis])], check_weights(call, weights))


def layer_normalization_rule(call: RuleCall) -> RuleResult:
    """LayerNormalization mixes every index of its axes (mean and variance over them)."""
    x = single_input(call)
    axes = _axes(call, x, call.config.get("axis", -1))
    roles = (["gamma"] if call.config.get("scale", True) else []) + (
        ["beta"] if call.config.get("center", True) and not call.config.get("rms_scaling")
        else []
    )
    # gamma and beta act on normalised values, each of which reads the whole axis
    mixed = call.mixed(x, axes)
    weights = [weight(role, *(("diag", mixed[a]) for a in axes)) for role in roles]
    if len(call.weights) != len(weights):  # rms_scaling/center combinations vary by version
        weights = [weight(w.local, *(("diag", mixed[a]) for a in axes)) for w in call.weights]
    mixing = Mixing(tuple(x[a] for a in axes), "LayerNormalization normalises over this axis")
    out = call.mixed(_derive(call, x, axes), axes)
    return RuleResult([out], check_weights(call, weights), [mixing])


def normalization_rule(call: RuleCall) -> RuleResult:
    """Normalization: per-feature mean and variance along `axis`, plus a scalar count."""
    x = single_input(call)
    axes = _axes(call, x, call.config.get("axis", -1))
    weights = []
    for w in call.weights:
        if len(w.shape) == len(axes):
            weights.append(weight(w.local, *(("diag", x[a]) for a in axes), trainable=False))
        else:
            weights.append(weight(w.local, trainable=False))
    return RuleResult([_derive(call, x, axes)], check_weights(call, weights))


register_rule(keras.layers.BatchNormalization, batch_normalization_rule)
register_rule(keras.layers.LayerNormalization, layer_normalization_rule)
register_rule(keras.layers.Normalization, normalization_rule)
