"""Rules for pooling layers: windowed (Max/Average) and global pooling.

Pooling works channel by channel, so channel labels pass through (a channel that is 0
everywhere pools to 0); the spatial axes change length (windowed) or go away (global).
"""

from __future__ import annotations

import keras

from keras_surgery.labels import positions
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import Mixing, RuleCall, RuleResult, check_weights, single_input
from keras_surgery.rules.conv import (
    as_tuple,
    geometry_mixing,
    layout,
    spatial_mixing,
    spatial_outputs,
    window_length,
)


def pooling_rule(call: RuleCall) -> RuleResult:
    """MaxPooling1D/2D/3D, AveragePooling1D/2D/3D: channels pass, positions are re-counted."""
    x = single_input(call)
    pool = call.config["pool_size"]
    rank = len(x) - 1 if isinstance(pool, int) else len(tuple(pool))
    pool_size = as_tuple(call, pool, rank, "pool_size")
    strides = as_tuple(call, call.config.get("strides") or pool_size, rank, "strides")
    padding = str(call.config.get("padding", "valid")).lower()
    lay = layout(call, x, rank)
    lengths = [
        window_length(x[a].length, k, s, 1, padding)
        for a, k, s in zip(lay.spatial, pool_size, strides)
    ]
    out = lay.assemble(x[lay.channel], spatial_outputs(call, lay, lengths))
    mixing = [
        geometry_mixing(call, pool_size=pool_size, strides=strides, padding=padding),
        spatial_mixing(call, x, lay),
    ]
    return RuleResult([out], check_weights(call, []), mixing,
                      nonnegative=[call.nonnegative_input()])


def global_pooling_rule(call: RuleCall) -> RuleResult:
    """GlobalMax/GlobalAveragePooling1D/2D/3D: reduce over every spatial axis (a set: their
    positions may not change, their order does not matter)."""
    x = single_input(call)
    lay = layout(call, x, len(x) - 1)
    channels = x[lay.channel]
    if call.config.get("keepdims", False):
        out = lay.assemble(channels, [positions(call.space, a, 1) for a in lay.spatial])
    else:
        out = (channels,)
    mixing = Mixing(
        tuple(x[a] for a in lay.spatial), "global pooling reduces over its spatial axes"
    )
    return RuleResult([out], check_weights(call, []), [mixing],
                      nonnegative=[call.nonnegative_input()])


for _name in (
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
    "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
):
    register_rule(getattr(keras.layers, _name), pooling_rule,
                  function_keys=("pool_size", "strides", "padding", "data_format"))
for _name in (
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
):
    register_rule(getattr(keras.layers, _name), global_pooling_rule,
                  function_keys=("keepdims", "data_format"))
