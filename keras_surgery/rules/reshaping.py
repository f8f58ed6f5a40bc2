"""Rules for layers that move indices around: Flatten, Reshape, Permute, RepeatVector,
TimeDistributed, and the resampling layers ZeroPadding, Cropping and UpSampling.

Flattening labels each output index with the tuple of the labels it came from, so a Dense
after a Flatten finds every (row, column, channel) weight wherever a grown channel axis moved
it. A Reshape is split into blocks of axes with equal sizes (C order); each block passes,
merges or splits labels, and a block that does neither is reported as mixing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np

from keras_surgery.graph import LayerNode, resolve_keras_class
from keras_surgery.labels import AxisLabels, axis_length, concat_axes, positions
from keras_surgery.registry import find_rule, register_rule
from keras_surgery.rules.api import Mixing, RuleCall, RuleResult, check_weights, single_input
from keras_surgery.rules.conv import (
    as_pairs,
    as_tuple,
    empty_axis,
    geometry_mixing,
    layout,
    spatial_mixing,
    spatial_outputs,
)

# -- label helpers ------------------------------------------------------------------------------


def merge_axes(call: RuleCall, axes: Sequence[AxisLabels]) -> AxisLabels:
    """One axis for several, in C order: index labels are tuples of the merged axes' labels,
    and depend on the union of their dependency sets."""
    if any(a.ids is None for a in axes):
        raise ValueError(f"{call.describe()}: cannot flatten an axis of unknown length.")
    if len(axes) == 1:
        return axes[0]
    # Counted before the grid is made: a file's budget refuses it before any memory is taken.
    axis_length(math.prod(len(a.ids) for a in axes), call.describe())
    id_grid = np.meshgrid(*(a.ids for a in axes), indexing="ij")
    rows = np.stack([g.ravel() for g in id_grid], axis=1).tolist()
    ids = call.space.intern_many(("tuple", *row) for row in rows)
    dep_grid = np.meshgrid(*(a.deps for a in axes), indexing="ij")
    deps = call.deps.union_elementwise([g.ravel() for g in dep_grid])
    return AxisLabels(ids, deps)


def split_axis(call: RuleCall, axis: AxisLabels, sizes: Sequence[int]) -> list[AxisLabels]:
    """Several axes for one, in C order. The first new axis is labelled by the chunk of old
    labels each index covers; the others by their index inside a chunk of that shape, so a
    chunk that survives a surgery (a kept attention head) keeps its labels."""
    ids = axis.ids.reshape(sizes)
    deps = axis.deps.reshape(sizes)
    chunk_ids = call.space.intern_many(("chunk", tuple(ids[i].ravel().tolist()))
                                       for i in range(sizes[0]))
    chunk_deps = np.array([call.deps.union(deps[i].ravel()) for i in range(sizes[0])],
                          dtype=np.int64)
    out = [AxisLabels(chunk_ids, chunk_deps)]
    inner = tuple(int(s) for s in sizes[1:])
    for r in range(1, len(sizes)):
        keys = (("split", inner, r, j) for j in range(sizes[r]))
        r_deps = np.array([call.deps.union(np.take(deps, j, axis=r).ravel())
                           for j in range(sizes[r])], dtype=np.int64)
        out.append(AxisLabels(call.space.intern_many(keys), r_deps))
    return out


# -- Flatten, Reshape, Permute, RepeatVector ------------------------------------------------------


def flatten_rule(call: RuleCall) -> RuleResult:
    """Flatten: one axis of tuple labels, in C order (channels_first: channels last)."""
    x = single_input(call)
    if not x:
        raise ValueError(f"{call.describe()}: flattening a tensor without non-batch axes.")
    if call.config.get("data_format") == "channels_first" and len(x) > 1:
        x = x[1:] + x[:1]
    return RuleResult([(merge_axes(call, x),)], check_weights(call, []))


def _droppable(call: RuleCall, axis: AxisLabels) -> bool:
    """A length-1 axis that only says "position 0" can vanish without losing meaning."""
    if axis.ids is None or len(axis.ids) != 1 or int(axis.deps[0]) != 0:
        return False
    key = call.space.key(int(axis.ids[0]))
    return isinstance(key, tuple) and key[0] == "pos"


def _blocks(
    lengths: Sequence[int], target: Sequence[int], inputs: list[int], outputs: list[int]
) -> list[tuple[list[int], list[int]]]:
    """Groups input and output axes into consecutive blocks of equal size (C order)."""
    blocks = []
    i = j = 0
    while i < len(inputs) or j < len(outputs):
        block_in: list[int] = []
        block_out: list[int] = []
        size_in = size_out = 1
        if i < len(inputs):
            block_in.append(inputs[i])
            size_in *= lengths[inputs[i]]
            i += 1
        if j < len(outputs):
            block_out.append(outputs[j])
            size_out *= target[outputs[j]]
            j += 1
        while size_in != size_out:
            if size_in < size_out and i < len(inputs):
                block_in.append(inputs[i])
                size_in *= lengths[inputs[i]]
                i += 1
            elif size_out < size_in and j < len(outputs):
                block_out.append(outputs[j])
                size_out *= target[outputs[j]]
                j += 1
            else:
                raise ValueError("sizes do not match")
        while i < len(inputs) and lengths[inputs[i]] == 1:  # trailing unit axes join the block
            block_in.append(inputs[i])
            i += 1
        if not block_in or not block_out:
            raise ValueError("sizes do not match")
        blocks.append((block_in, block_out))
    return blocks


def _resolve_target(call: RuleCall, lengths: Sequence[int], target: Sequence[int]) -> list[int]:
    target = [int(t) for t in target]
    total = math.prod(lengths)
    if target.count(-1) == 1:
        rest = math.prod(t for t in target if t != -1)
        target[target.index(-1)] = total // rest if rest else 0
    if math.prod(target) != total:
        raise ValueError(f"{call.describe()}: cannot reshape {tuple(lengths)} to {tuple(target)}.")
    return target


def reshape_rule(call: RuleCall) -> RuleResult:
    """Reshape: per block of axes, pass (same size), merge (several -> one, as Flatten), split
    (one -> several); unit axes come and go. A block that does neither (e.g. (4, 6) -> (3, 8))
    cannot keep labels: its input axes are reported as mixing, its outputs get fresh labels."""
    x = single_input(call)
    raw_target = list(call.config["target_shape"])
    lengths = [a.length for a in x]
    dep = call.all_deps(x)
    scrambled: list[AxisLabels] = []

    def fresh(out_axis: int, n: int | None) -> AxisLabels:
        if n is None:
            return AxisLabels.unknown(dep)
        keys = (("reshaped", call.identity, tuple(raw_target), out_axis, i) for i in range(n))
        return AxisLabels(call.space.intern_many(keys), np.full(n, dep, dtype=np.int64))

    if any(n is None for n in lengths):
        recorded = call.output_shapes[0] if call.output_shapes else None
        shape = recorded if recorded is not None else [None] * len(raw_target)
        out = tuple(fresh(a, n) for a, n in enumerate(shape))
        scrambled = list(x)
    else:
        target = _resolve_target(call, lengths, raw_target)
        inputs = [a for a in range(len(x)) if not (lengths[a] == 1 and _droppable(call, x[a]))]
        outputs = [a for a in range(len(target)) if target[a] != 1]
        if not outputs and inputs and target:
            outputs = [len(target) - 1]
        result: list[AxisLabels | None] = [None] * len(target)
        for block_in, block_out in _blocks(lengths, target, inputs, outputs):
            if len(block_out) == 1:
                result[block_out[0]] = merge_axes(call, [x[a] for a in block_in])
            elif len(block_in) == 1:
                parts = split_axis(call, x[block_in[0]], [target[a] for a in block_out])
                for a, labels in zip(block_out, parts):
                    result[a] = labels
            else:
                scrambled.extend(x[a] for a in block_in)
                for a in block_out:
                    result[a] = fresh(a, target[a])
        out = tuple(r if r is not None else positions(call.space, a, 1)
                    for a, r in enumerate(result))
    # Always exactly one Mixing, so the old and new calls are compared whatever their blocks.
    mixed = concat_axes(scrambled) if scrambled else empty_axis()
    mixing = Mixing((mixed,), "Reshape cannot keep labels of these axes", ordered=True)
    return RuleResult([out], check_weights(call, []), [mixing])


def permute_rule(call: RuleCall) -> RuleResult:
    """Permute: the axes' labels, permuted (`dims` counts from 1, the batch axis is fixed)."""
    x = single_input(call)
    dims = [int(d) for d in call.config["dims"]]
    if sorted(dims) != list(range(1, len(x) + 1)):
        raise ValueError(f"{call.describe()}: dims={dims} is not a permutation of its axes.")
    return RuleResult([tuple(x[d - 1] for d in dims)], check_weights(call, []))


def repeat_vector_rule(call: RuleCall) -> RuleResult:
    """RepeatVector: a new axis of `n` positions in front."""
    x = single_input(call)
    n = int(call.config["n"])
    return RuleResult([(positions(call.space, 0, n),) + tuple(x)], check_weights(call, []))


# -- TimeDistributed -------------------------------------------------------------------------------


def time_distributed_rule(call: RuleCall) -> RuleResult:
    """TimeDistributed: the inner layer's rule on the labels of one step; its weights are the
    inner layer's, and the time axis passes through."""
    x = single_input(call)
    if len(x) < 2:
        raise ValueError(f"{call.describe()}: its input has no time axis.")
    inner = call.config.get("layer")
    if not isinstance(inner, dict) or "class_name" not in inner:
        raise ValueError(f"{call.describe()}: no inner layer in its config.")
    class_name = str(inner["class_name"])
    module, registered = inner.get("module"), inner.get("registered_name")
    cls = resolve_keras_class(module, class_name)
    rule = find_rule(cls, class_name, registered)
    if rule is None:
        raise ValueError(f"no rule for its inner layer of class {class_name}")
    node = call.layer
    inner_node = LayerNode(
        name=node.name,
        class_name=class_name,
        module=module,
        registered_name=registered,
        config=inner.get("config") or {},
        cls=cls,
        group=node.group,
        weights=node.weights,
    )
    step = RuleCall(
        layer=inner_node,
        identity=call.identity,
        inputs=[tuple(x[1:])],
        input_shapes=[None if s is None else tuple(s[1:]) for s in call.input_shapes],
        space=call.space,
        deps=call.deps,
        output_shapes=[None if s is None else tuple(s[1:]) for s in call.output_shapes],
        input_values=list(call.input_values),
    )
    result = rule(step)
    if result.opaque:
        raise ValueError(f"its inner layer ({class_name}) is opaque")
    outputs = [(x[0],) + tuple(out) for out in result.outputs]
    return RuleResult(outputs, result.weights, result.mixing, result.warnings,
                      values=list(result.values))


# -- ZeroPadding, Cropping, UpSampling ----------------------------------------------------------


def _resample_rule(call: RuleCall, rank: int, key: str, lengths_of) -> RuleResult:
    x = single_input(call)
    lay = layout(call, x, rank)
    value = call.config[key]
    lengths, geometry = lengths_of(call, [x[a].length for a in lay.spatial], value)
    out = lay.assemble(x[lay.channel], spatial_outputs(call, lay, lengths))
    extra = {k: call.config[k] for k in ("interpolation",) if k in call.config}
    mixing = [geometry_mixing(call, **{key: geometry}, **extra), spatial_mixing(call, x, lay)]
    return RuleResult([out], check_weights(call, []), mixing)


def _padded(call, lengths, value):
    pairs = as_pairs(call, value, len(lengths), "padding")
    return [None if n is None else n + b + a for n, (b, a) in zip(lengths, pairs)], pairs


def _cropped(call, lengths, value):
    pairs = as_pairs(call, value, len(lengths), "cropping")
    out = [None if n is None else n - b - a for n, (b, a) in zip(lengths, pairs)]
    if any(n is not None and n <= 0 for n in out):
        raise ValueError(f"{call.describe()}: cropping {pairs} leaves nothing of {lengths}.")
    return out, pairs


def _upsampled(call, lengths, value):
    sizes = as_tuple(call, value, len(lengths), "size")
    return [None if n is None else n * s for n, s in zip(lengths, sizes)], sizes


def _resampler(rank: int, key: str, lengths_of, what: str):
    def rule(call: RuleCall) -> RuleResult:
        return _resample_rule(call, rank, key, lengths_of)

    rule.__doc__ = f"{what}: channels pass through, spatial axes are re-counted."
    rule.__name__ = f"{what.lower()}_rule"
    return rule


for _rank in (1, 2, 3):
    register_rule(getattr(keras.layers, f"ZeroPadding{_rank}D"),
                  _resampler(_rank, "padding", _padded, f"ZeroPadding{_rank}D"),
                  function_keys=("padding", "data_format"))
    register_rule(getattr(keras.layers, f"Cropping{_rank}D"),
                  _resampler(_rank, "cropping", _cropped, f"Cropping{_rank}D"),
                  function_keys=("cropping", "data_format"))
    register_rule(getattr(keras.layers, f"UpSampling{_rank}D"),
                  _resampler(_rank, "size", _upsampled, f"UpSampling{_rank}D"),
                  function_keys=("size", "interpolation", "data_format"))

# -- indexing ---------------------------------------------------------------------------------


def _index_entry(entry: object) -> slice | int:
    """One entry of a serialized indexing key: a slice or an integer."""
    if isinstance(entry, dict) and entry.get("class_name") == "__slice__":
        cfg = entry.get("config") or {}
        bounds = [cfg.get(k) for k in ("start", "stop", "step")]
        if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds):
            raise ValueError(f"slice bounds must be integers. Received: {bounds}")
        return slice(*bounds)
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry
    raise ValueError(f"indexing with {entry!r} has no rule (only integers and slices)")


def get_item_rule(call: RuleCall) -> RuleResult:
    """`x[:, i, a:b]` (keras.ops GetItem, e.g. BERT's [CLS] position): an integer drops its
    axis, a slice keeps the labels it selects. The batch axis must be kept whole.

    An integer picks the index at its position, so the labels up to it must stay in place
    (reported as ordered mixing when they move); a slice of an axis of unknown length keeps
    the axis unknown."""
    if not call.inputs or len(call.call_args) < 2:
        raise ValueError(f"{call.describe()}: expected a tensor and an indexing key")
    x = call.inputs[0]
    key = call.call_args[1]
    entries = [_index_entry(e) for e in (key if isinstance(key, (list, tuple)) else [key])]
    if not entries or entries[0] != slice(None) or len(entries) - 1 > len(x):
        raise ValueError(f"{call.describe()}: only keys that keep the batch axis whole")
    out: list[AxisLabels] = []
    mixing: list[Mixing] = []
    for axis, entry in zip(x, entries[1:]):
        if isinstance(entry, slice):
            out.append(axis.take(entry))
            continue
        if axis.ids is not None:
            n = len(axis.ids)
            if not -n <= entry < n:
                raise ValueError(f"{call.describe()}: index {entry} out of range for {n}")
            picked = slice(0, entry + 1) if entry >= 0 else slice(entry, None)
            mixing.append(Mixing((axis.take(picked),), f"it picks index {entry} of this axis",
                                 ordered=True))
    out.extend(x[len(entries) - 1:])
    return RuleResult([tuple(out)], check_weights(call, []), mixing)


def _register_get_item() -> None:
    from keras.src.ops import numpy as knp

    if getattr(knp, "GetItem", None) is not None:
        register_rule(knp.GetItem, get_item_rule)


_register_get_item()
# A Reshape's, Permute's or RepeatVector's arguments are sizes and orders, which the rules
# follow; a wrapped layer answers for its own settings.
register_rule(keras.layers.Flatten, flatten_rule, function_keys=("data_format",))
register_rule(keras.layers.Reshape, reshape_rule)
register_rule(keras.layers.Permute, permute_rule)
register_rule(keras.layers.RepeatVector, repeat_vector_rule)
register_rule(keras.layers.TimeDistributed, time_distributed_rule)
