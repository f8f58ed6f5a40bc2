"""Rules for convolutions, and the spatial-geometry helpers they share with pooling and
resampling layers.

Kernel taps are labelled by the (doubled, so always an integer) offset they read relative to
the output position's anchor in the input: with `padding="same"` and an odd kernel that is the
centred offset `2*i - (k-1)`, so a 3x3 kernel grown to 5x5 keeps its old taps in the middle and
the new taps are zeroed. With "valid" padding taps are aligned to the left (the output keeps
reading the same input window), with "causal" to the right. Output spatial axes are labelled
by position; a layer that reads neighbouring positions declares its input's spatial axes and
its geometry (strides, padding, ...) as mixing, so any change of them is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from keras_surgery.labels import AxisLabels, TensorLabels, concat_axes, positions
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import (
    Mixing,
    RuleCall,
    RuleResult,
    activation_mixing,
    check_weights,
    linear_starts,
    nonnegative_activation,
    single_input,
    weight,
)

# -- spatial geometry helpers ------------------------------------------------------------------


def as_tuple(call: RuleCall, value: Any, rank: int, what: str) -> tuple[int, ...]:
    """A Keras int-or-tuple argument as a tuple of `rank` ints."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * rank
    values = tuple(int(v) for v in value)
    if len(values) == 1 and rank > 1:
        values = values * rank
    if len(values) != rank:
        raise ValueError(f"{call.describe()}: {what}={value!r} does not have {rank} entries.")
    return values


def as_pairs(call: RuleCall, value: Any, rank: int, what: str) -> tuple[tuple[int, int], ...]:
    """A padding/cropping argument as one (before, after) pair per spatial axis."""
    if isinstance(value, (int, np.integer)):
        return ((int(value), int(value)),) * rank
    items = list(value)
    if rank == 1 and len(items) == 2 and all(isinstance(v, (int, np.integer)) for v in items):
        return ((int(items[0]), int(items[1])),)
    if len(items) != rank:
        raise ValueError(f"{call.describe()}: {what}={value!r} does not have {rank} entries.")
    pairs = []
    for item in items:
        if isinstance(item, (int, np.integer)):
            pairs.append((int(item), int(item)))
        else:
            before, after = item
            pairs.append((int(before), int(after)))
    return tuple(pairs)


@dataclass(frozen=True)
class Layout:
    """Where the channel axis and the spatial axes of a tensor are (non-batch axis indices)."""

    channel: int
    spatial: tuple[int, ...]

    def assemble(self, channel: AxisLabels, spatial: Sequence[AxisLabels]) -> TensorLabels:
        out: list[AxisLabels | None] = [None] * (len(self.spatial) + 1)
        out[self.channel] = channel
        for axis, labels in zip(self.spatial, spatial):
            out[axis] = labels
        return tuple(out)  # type: ignore[arg-type]


def layout(call: RuleCall, x: TensorLabels, rank: int) -> Layout:
    """The layout of a rank-`rank` spatial input, from the layer's `data_format`."""
    if len(x) != rank + 1:
        raise ValueError(
            f"{call.describe()} expects {rank} spatial axes and a channel axis; "
            f"its input has {len(x)} non-batch axes."
        )
    # Layers without the option (Cropping1D, UpSampling1D) are always channels_last.
    fmt = call.config.get("data_format", "channels_last") or keras.config.image_data_format()
    if fmt == "channels_last":
        return Layout(rank, tuple(range(rank)))
    if fmt == "channels_first":
        return Layout(0, tuple(range(1, rank + 1)))
    raise ValueError(f"{call.describe()}: unknown data_format={fmt!r}.")


def window_length(n: int | None, k: int, s: int, d: int, padding: str) -> int | None:
    """Output length of a convolution or pooling window sweep (Keras's formula)."""
    if n is None:
        return None
    if padding == "valid":
        out = (n - d * (k - 1) - 1) // s + 1
    elif padding in ("same", "causal"):
        out = (n - 1) // s + 1
    else:
        raise ValueError(f"unknown padding={padding!r}")
    if out <= 0:
        raise ValueError(f"an axis of length {n} is too short for a window of {k}")
    return out


def spatial_outputs(
    call: RuleCall, lay: Layout, lengths: Sequence[int | None]
) -> list[AxisLabels]:
    """Position labels of the output's spatial axes, checked against the recorded shape."""
    recorded = call.output_shapes[0] if call.output_shapes else None
    out = []
    for axis, n in zip(lay.spatial, lengths):
        if recorded is not None and len(recorded) > axis and recorded[axis] is not None:
            if n is not None and n != recorded[axis]:
                raise ValueError(
                    f"{call.describe()}: computed output length {n} on axis {axis}, but the "
                    f"model records {recorded[axis]}."
                )
            n = recorded[axis]
        out.append(positions(call.space, axis, n))
    return out


def spatial_mixing(call: RuleCall, x: TensorLabels, lay: Layout) -> Mixing:
    """The input's spatial axes must keep their labels: border and window alignment depend
    on them, and output positions are counted from them."""
    return Mixing(
        tuple(x[a] for a in lay.spatial),
        "it reads neighbouring positions, so its input's spatial axes must keep their positions",
        ordered=True,
    )


def geometry_mixing(call: RuleCall, **geometry: Any) -> Mixing:
    """A one-label pseudo axis naming the layer's window geometry: a change of strides,
    padding, cropping, ... moves every output position, and is reported as such."""
    frozen = tuple(sorted((k, _freeze(v)) for k, v in geometry.items()))
    label = call.space.intern(("geometry", call.layer.class_name, frozen))
    described = ", ".join(f"{k}={v}" for k, v in frozen)
    return Mixing(
        (AxisLabels(np.array([label], dtype=np.int64), np.zeros(1, dtype=np.int64)),),
        f"its geometry ({described}) must stay as it was",
        ordered=True,
    )


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def spatial_dep(call: RuleCall, x: TensorLabels, lay: Layout) -> int:
    return call.union(*(x[a] for a in lay.spatial))


# -- taps ---------------------------------------------------------------------------------


def _pad_before(n: int | None, k: int, s: int, d: int, padding: str) -> int | None:
    """Padding before the first input position (TensorFlow/JAX "SAME" convention)."""
    span = d * (k - 1) + 1
    if padding == "valid":
        return 0
    if padding == "causal":
        return span - 1
    if s == 1:
        return (span - 1) // 2
    if n is None:
        return None
    out = (n - 1) // s + 1
    return max((out - 1) * s + span - n, 0) // 2


def tap_labels(call: RuleCall, k: int, d: int, pad_before: int | None) -> AxisLabels:
    """Kernel taps labelled by twice the input offset they read (centred if unknown)."""
    if pad_before is None:
        offsets = [(2 * i - (k - 1)) * d for i in range(k)]
    else:
        offsets = [2 * (i * d - pad_before) for i in range(k)]
    ids = call.space.intern_many(("offset", v) for v in offsets)
    return AxisLabels(ids, np.zeros(k, dtype=np.int64))


@dataclass(frozen=True)
class _ConvGeometry:
    rank: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: str

    @classmethod
    def of(cls, call: RuleCall) -> _ConvGeometry:
        kernel = tuple(int(k) for k in call.config["kernel_size"])
        rank = len(kernel)
        cfg = call.config
        return cls(
            rank,
            kernel,
            as_tuple(call, cfg.get("strides", 1), rank, "strides"),
            as_tuple(call, cfg.get("dilation_rate", 1), rank, "dilation_rate"),
            str(cfg.get("padding", "valid")).lower(),
        )

    def mixing(self, call: RuleCall, **extra: Any) -> Mixing:
        return geometry_mixing(
            call, strides=self.strides, dilation_rate=self.dilation, padding=self.padding, **extra
        )


def _conv_frame(call: RuleCall) -> tuple[TensorLabels, Layout, _ConvGeometry, AxisLabels]:
    x = single_input(call)
    geo = _ConvGeometry.of(call)
    lay = layout(call, x, geo.rank)
    channels = x[lay.channel]
    if channels.ids is None:
        raise ValueError(f"{call.describe()}: its input has an unknown number of channels.")
    return x, lay, geo, channels


def _forward(
    call: RuleCall, x: TensorLabels, lay: Layout, geo: _ConvGeometry
) -> tuple[list[AxisLabels], list[AxisLabels]]:
    """Tap labels and output spatial labels of a forward convolution."""
    taps, lengths = [], []
    for a, k, s, d in zip(lay.spatial, geo.kernel, geo.strides, geo.dilation):
        n = x[a].length
        taps.append(tap_labels(call, k, d, _pad_before(n, k, s, d, geo.padding)))
        lengths.append(window_length(n, k, s, d, geo.padding))
    return taps, spatial_outputs(call, lay, lengths)


# -- rules --------------------------------------------------------------------------------


def conv_rule(call: RuleCall) -> RuleResult:
    """Conv1D/2D/3D: kernel (taps..., in: channels, out: filters), bias (out: filters).

    With `groups > 1`, filter f of group g reads input channels g*C/G ... (g+1)*C/G - 1 through
    kernel slots 0 ... C/G - 1. Filters are labelled per group, so each group may grow; the
    slots are structural, so the input channels must stay as they were (reported otherwise).
    """
    x, lay, geo, channels = _conv_frame(call)
    groups = int(call.config.get("groups", 1) or 1)
    filters = int(call.config["filters"])
    taps, spatial = _forward(call, x, lay, geo)
    if groups == 1:
        units = call.units(filters, call.all_deps(x))
        reads = ("in", channels)
        grouped = empty_axis()
    else:
        units, reads = _grouped(call, x, lay, channels, groups, filters)
        grouped = channels
    use_bias = call.config.get("use_bias", True)
    weights = [weight("kernel", *(("struct", t) for t in taps), reads, ("out", units))]
    if use_bias:
        weights.append(weight("bias", ("out", units)))
    out = lay.assemble(units, spatial)
    mixing = [
        geo.mixing(call),
        spatial_mixing(call, x, lay),
        *activation_mixing(call, out[-1]),
        # Always present, so that old and new calls are compared pairwise whatever `groups`.
        Mixing((grouped,), "a grouped convolution's input channels must stay as they were",
               ordered=True),
    ]
    starts = linear_starts(call, x, out, lay.channel, bias=use_bias,
                           refuse_identity=_not_identity(geo, groups))
    return RuleResult([out], check_weights(call, weights), mixing,
                      nonnegative=[nonnegative_activation(call)], starts=starts)


def _not_identity(geo: _ConvGeometry, groups: int) -> str | None:
    """Why a convolution of this geometry cannot pass every position through (None: it can,
    with the identity at its centre tap)."""
    if groups != 1:
        return f"it is grouped (groups={groups})"
    if any(s != 1 for s in geo.strides):
        return f"its strides {geo.strides} are not 1"
    if any(k % 2 == 0 for k in geo.kernel):
        return f"its kernel {geo.kernel} has no centre tap"
    if geo.padding != "same" and any(k != 1 for k in geo.kernel):
        return f"its padding '{geo.padding}' changes the output size"
    return None


def _grouped(
    call: RuleCall, x: TensorLabels, lay: Layout, channels: AxisLabels, groups: int, filters: int
) -> tuple[AxisLabels, tuple[str, AxisLabels]]:
    n = len(channels.ids)
    if n % groups or filters % groups:
        raise ValueError(f"groups={groups} does not divide {n} channels and {filters} filters")
    per_in, per_out = n // groups, filters // groups
    sdep = spatial_dep(call, x, lay)
    parts = []
    for g in range(groups):
        part = channels.take(slice(g * per_in, (g + 1) * per_in))
        dep = call.deps.union([*part.deps.tolist(), sdep])
        parts.append(call.units(per_out, dep, role=f"group{g}"))
    slots = call.space.intern_many(("group-slot", j) for j in range(per_in))
    return concat_axes(parts), ("struct", AxisLabels(slots, np.zeros(per_in, dtype=np.int64)))


def empty_axis() -> AxisLabels:
    """An axis without indices (a Mixing entry that is present but holds nothing)."""
    return AxisLabels(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


def _transpose_length(
    n: int | None, k: int, s: int, d: int, padding: str, output_padding: int | None
) -> int | None:
    """Keras's output length of a transposed convolution."""
    if n is None:
        return None
    span = d * (k - 1) + 1
    if padding == "valid":
        extra = max(span, s) - span if output_padding is None else output_padding
        return (n - 1) * s + span + extra
    if output_padding is None:
        return n * s
    return (n - 1) * s + span % 2 + output_padding


def _transpose_pad_before(
    n: int | None, k: int, s: int, d: int, padding: str, output_padding: int | None
) -> int | None:
    # A transposed convolution is the gradient of a forward one from its output length back
    # to its input length; its taps line up with that forward convolution's padding.
    if padding == "valid":
        return 0
    span = d * (k - 1) + 1
    if output_padding is None:
        return max(span - s, 0) // 2
    if n is None:
        return None
    big = _transpose_length(n, k, s, d, padding, output_padding)
    return max((n - 1) * s + span - big, 0) // 2


def conv_transpose_rule(call: RuleCall) -> RuleResult:
    """Conv1D/2D/3DTranspose: kernel (taps..., out: filters, in: channels), bias (out)."""
    x, lay, geo, channels = _conv_frame(call)
    if geo.padding not in ("valid", "same"):
        raise ValueError(f"{call.describe()}: unsupported padding={geo.padding!r}.")
    raw = call.config.get("output_padding")
    output_padding = (None,) * geo.rank if raw is None else as_tuple(
        call, raw, geo.rank, "output_padding")
    taps, lengths = [], []
    for a, k, s, d, op in zip(lay.spatial, geo.kernel, geo.strides, geo.dilation, output_padding):
        n = x[a].length
        taps.append(tap_labels(call, k, d, _transpose_pad_before(n, k, s, d, geo.padding, op)))
        lengths.append(_transpose_length(n, k, s, d, geo.padding, op))
    spatial = spatial_outputs(call, lay, lengths)
    units = call.units(int(call.config["filters"]), call.all_deps(x))
    weights = [weight("kernel", *(("struct", t) for t in taps), ("out", units), ("in", channels))]
    if call.config.get("use_bias", True):
        weights.append(weight("bias", ("out", units)))
    out = lay.assemble(units, spatial)
    mixing = [
        geo.mixing(call, output_padding=output_padding),
        spatial_mixing(call, x, lay),
        *activation_mixing(call, out[-1]),
    ]
    return RuleResult([out], check_weights(call, weights), mixing)


def depthwise_channels(
    call: RuleCall, channels: AxisLabels, multiplier: int, extra_dep: int
) -> AxisLabels:
    """Output channel `c * multiplier + m` of a depthwise convolution, keyed by input channel
    c's label: a grown or reordered input keeps every output with its own input channel."""
    source = np.asarray(channels.ids, dtype=np.int64)
    ids = call.space.remembered(
        ("depthwise", call.identity, multiplier, source.tobytes()),
        lambda: call.space.intern_many([("depthwise", call.identity, c, m)
                                        for c in source.tolist() for m in range(multiplier)]))
    per_channel = call.deps.union_elementwise(
        [channels.deps, np.full(len(channels.ids), extra_dep, dtype=np.int64)]
    )
    return AxisLabels(ids, np.repeat(per_channel, multiplier))


def _multiplier_axis(call: RuleCall, multiplier: int) -> AxisLabels:
    ids = call.space.intern_many(("multiplier", m) for m in range(multiplier))
    return AxisLabels(ids, np.zeros(multiplier, dtype=np.int64))


def _depthwise_part(
    call: RuleCall, role: str
) -> tuple[TensorLabels, Layout, _ConvGeometry, list, AxisLabels, list[AxisLabels]]:
    x, lay, geo, channels = _conv_frame(call)
    multiplier = int(call.config.get("depth_multiplier", 1))
    taps, spatial = _forward(call, x, lay, geo)
    mid = depthwise_channels(call, channels, multiplier, spatial_dep(call, x, lay))
    kernel = weight(
        role,
        *(("struct", t) for t in taps),
        ("diag", channels),
        ("out", _multiplier_axis(call, multiplier)),
    )
    return x, lay, geo, [kernel], mid, spatial


def depthwise_conv_rule(call: RuleCall) -> RuleResult:
    """DepthwiseConv1D/2D: kernel (taps..., diag: channels, out: multiplier), bias (out)."""
    x, lay, geo, weights, out_channels, spatial = _depthwise_part(call, "kernel")
    if call.config.get("use_bias", True):
        weights.append(weight("bias", ("out", out_channels)))
    out = lay.assemble(out_channels, spatial)
    mixing = [geo.mixing(call), spatial_mixing(call, x, lay), *activation_mixing(call, out[-1])]
    return RuleResult([out], check_weights(call, weights), mixing)


def separable_conv_rule(call: RuleCall) -> RuleResult:
    """SeparableConv1D/2D: a depthwise kernel, then a pointwise kernel (1..., in, out), bias."""
    x, lay, geo, weights, mid, spatial = _depthwise_part(call, "depthwise_kernel")
    units = call.units(int(call.config["filters"]), call.all_deps(x))
    one_tap = tap_labels(call, 1, 1, 0)
    weights.append(
        weight("pointwise_kernel", *(("struct", one_tap),) * geo.rank, ("in", mid), ("out", units))
    )
    if call.config.get("use_bias", True):
        weights.append(weight("bias", ("out", units)))
    out = lay.assemble(units, spatial)
    mixing = [geo.mixing(call), spatial_mixing(call, x, lay), *activation_mixing(call, out[-1])]
    return RuleResult([out], check_weights(call, weights), mixing)


# What a convolution computes besides its sizes: the rules relabel grown kernels and channels,
# not a changed stride, padding or activation.
CONV_KEYS = ("activation", "strides", "dilation_rate", "padding", "data_format", "use_bias")

for _name in ("Conv1D", "Conv2D", "Conv3D"):
    register_rule(getattr(keras.layers, _name), conv_rule, function_keys=CONV_KEYS)
for _name in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"):
    register_rule(getattr(keras.layers, _name), conv_transpose_rule, function_keys=CONV_KEYS)
for _name in ("DepthwiseConv1D", "DepthwiseConv2D"):
    register_rule(getattr(keras.layers, _name), depthwise_conv_rule, function_keys=CONV_KEYS)
for _name in ("SeparableConv1D", "SeparableConv2D"):
    register_rule(getattr(keras.layers, _name), separable_conv_rule, function_keys=CONV_KEYS)
