"""Rules for normalization layers: BatchNormalization, LayerNormalization, RMSNormalization,
Normalization."""

from __future__ import annotations

import keras

from keras_surgery.labels import TensorLabels
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import (
    ONES,
    ZEROS,
    Init,
    Mixing,
    RuleCall,
    RuleResult,
    Start,
    WeightAxis,
    WeightLabels,
    check_weights,
    single_input,
    weight,
)


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
    return RuleResult([_derive(call, x, [axis])], check_weights(call, weights),
                      starts=_batch_normalization_starts(call, x, axis, roles))


def _batch_normalization_starts(
    call: RuleCall, x: TensorLabels, axis: int, roles: list[str]
) -> dict[str, Start]:
    """A new BatchNormalization is the identity (in inference) with gamma 1, beta 0, moving
    mean 0 and moving variance 1 - epsilon: it divides by sqrt(variance + epsilon) = 1. It
    outputs exactly 0 with gamma 0 and beta 0 (the zero-gamma start of a residual branch)."""
    epsilon = float(call.config.get("epsilon", 1e-3))
    identity = {"gamma": ONES, "beta": ZEROS, "moving_mean": ZEROS,
                "moving_variance": Init("constant", 1.0 - epsilon)}
    starts = {"identity": Start("identity", {r: identity[r] for r in roles}, [x])}
    if "gamma" in roles:
        if x[axis].length is None:  # its zero start would label it (the rule cannot)
            raise ValueError(f"{call.describe()}: its channel axis has no known length")
        starts["zero"] = Start(
            "zero", {r: ZEROS for r in roles if r in ("gamma", "beta")},
            lambda: [tuple(call.zeros(a.length) if i == axis else a for i, a in enumerate(x))])
    else:
        starts["zero"] = Start("zero", refused="it has no scale (gamma) to set to 0")
    return starts


def layer_normalization_rule(call: RuleCall) -> RuleResult:
    """LayerNormalization mixes every index of its axes (mean and variance over them).

    A growth of a single normalised axis by duplication is exact (issue 20, policy
    "duplicate"): over [x, x] (every index k times) the mean and variance are x's, so each
    copy normalises to the old value and duplicated gamma and beta give [LN(x), LN(x)]. The
    mixing says so (`grows_by_duplication`); the planner accepts the growth only when every
    old index is copied exactly k times (`operators.accept_duplicate_growths`). Zero padding is
    not exact (the zeros move the mean) and is reported.
    """
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
    mixing = Mixing(tuple(x[a] for a in axes), "LayerNormalization normalises over this axis",
                    grows_by_duplication=True)
    out = call.mixed(_derive(call, x, axes), axes)
    return RuleResult([out], check_weights(call, weights), [mixing])


def rms_normalization_rule(call: RuleCall, gain_offset: float | None = None) -> RuleResult:
    """RMS normalisation, `x * rsqrt(mean(x ** 2) + epsilon) * gain` over `axis` (default -1):
    keras.layers.RMSNormalization, and keras-hub's Llama, Mistral, Qwen and Gemma norms (by
    name, in `rules.keras_hub_decoders`). The gain is `gain_offset + scale`: `gain_offset` is
    0 unless given or set in the config (Gemma's norms compute 1 + scale, their scale starts
    at 0).

    Like a LayerNormalization it mixes its axes, but a growth by indices that are exactly 0
    is exact up to epsilon (issue 20): over d_new indices, d_new - d_old of them 0, the mean
    of squares is d_old / d_new times the old one, so rsqrt grows by sqrt(d_new / d_old) and
    a gain multiplied by c = sqrt(d_old / d_new) gives the old outputs on the old indices
    (and 0 on the new ones). Epsilon then acts as epsilon * d_new / d_old. The gain is
    declared rescaled by (d_new / d_old) ** -0.5 along a single normalised axis, with its
    offset (Gemma: 1 + s_new = c * (1 + s_old), so s_new = c * s_old + (c - 1)); the planner
    accepts the growth only when every writer of the new indices starts them at 0, and
    reports it otherwise. It has no identity start (it normalises); it outputs exactly 0 with
    a gain of 0, so a new one can end a residual branch. RMS normalisation maps 0 to 0, which
    lets a decoder's post-norm branch start at 0 behind a zero projection.

    Under policy "duplicate" a growth by duplication (every index k times) is exact, epsilon
    included: the mean of squares over [x, x] is x's, so the duplicated gain keeps its old
    values (`operators.accept_duplicate_growths` takes the rescale back).

    Args:
        call: the layer's call.
        gain_offset: the constant added to `scale` (None: the config's `gain_offset`, or 0).

    Returns:
        The labels of the output, of `scale` (diag over the normalised axes) and the starts.
    """
    x = single_input(call)
    axes = _axes(call, x, call.config.get("axis", -1))
    mixed = call.mixed(x, axes)
    offset = float(call.config.get("gain_offset", 0.0) if gain_offset is None else gain_offset)
    rescale = (0, -0.5) if len(axes) == 1 else None  # (d_new / d_old) ** -0.5 on the gain
    weights = [WeightLabels("scale", tuple(WeightAxis("diag", mixed[a]) for a in axes), rescale,
                            offset=offset)] if call.weights else []
    mixing = Mixing(tuple(x[a] for a in axes),
                    "RMS normalisation divides by the root mean square over this axis",
                    grows_with_zeros=rescale is not None, zero_through=call.identity,
                    grows_by_duplication=True)

    def zero_out() -> list[TensorLabels]:
        return [tuple(call.zeros(a.length or 0) if i in axes else a for i, a in enumerate(x))]

    starts = {
        "identity": Start("identity", refused=(
            "it divides by the root mean square of its input, so it is not the identity")),
        "zero": Start("zero", {"scale": Init("constant", -offset)}, zero_out) if weights
        else Start("zero", refused="it has no scale to set to 0"),
    }
    out = call.mixed(_derive(call, x, axes), axes)
    return RuleResult([out], check_weights(call, weights), [mixing], starts=starts)


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


# A switched-off center or scale drops a trained weight; epsilon and axis change the statistics.
register_rule(keras.layers.BatchNormalization, batch_normalization_rule,
              function_keys=("axis", "epsilon", "center", "scale"))
register_rule(keras.layers.LayerNormalization, layer_normalization_rule,
              function_keys=("axis", "epsilon", "center", "scale", "rms_scaling"))
if hasattr(keras.layers, "RMSNormalization"):  # Keras >= 3.9
    register_rule(keras.layers.RMSNormalization, rms_normalization_rule,
                  function_keys=("axis", "epsilon"))
register_rule(keras.layers.Normalization, normalization_rule, function_keys=("axis", "invert"))
