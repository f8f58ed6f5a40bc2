"""The phi table: input feature -> the weight entries whose input side depends on it.

This is the paper's boolean-logic mapping, read off the dependency sets that label propagation
attached to every index: an entry of weight W depends on feature f when one of its `in`,
`diag` or `lookup` indices is labelled with something computed from f.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_surgery.features import FeatureSpec
from keras_surgery.labels import AxisLabels, DepSets, gc_paused
from keras_surgery.propagate import GraphLabels, LayerRecord, propagate
from keras_surgery.side import opened

INPUT_SIDE_KINDS = ("in", "diag", "lookup")


@dataclass(frozen=True)
class ParamSlice:
    """Entries of one weight along one axis: `weight[..., indices, ...]` at `axis`."""

    path: str  # "layer_name/role"
    axis: int
    indices: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "axis": self.axis, "indices": self.indices.tolist()}


class PhiTable(Mapping):
    """`{(input, feature): [ParamSlice, ...]}`; features are named, or column numbers.

    Example:
        >>> table = ks.phi_table(model, features={"obs": ["hp", ("pos", 2)]})  # doctest: +SKIP
        >>> table[("obs", "hp")]
        [ParamSlice(path='dense/kernel', axis=0, indices=array([0])), ...]
    """

    def __init__(self, entries: dict[tuple[str, Any], list[ParamSlice]]):
        self._entries = entries

    def __getitem__(self, key: tuple[str, Any]) -> list[ParamSlice]:
        return self._entries[key]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {
            f"{inp}:{feat}": [s.to_dict() for s in slices]
            for (inp, feat), slices in self._entries.items()
        }

    @classmethod
    @gc_paused
    def from_labels(cls, labels: GraphLabels) -> PhiTable:
        bits = labels.bits
        keys = [c.feature for c in bits]
        # One pass over every input-side axis: group its indices by dependency set, then hand
        # each group to the features in that set (usually few distinct sets per axis).
        parts: dict[tuple[str, Any], dict[tuple[str, int], list[np.ndarray]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for name, record in labels.records.items():
            for w in record.result.weights:
                path = f"{name}/{w.role}"
                for axis, waxis in enumerate(w.axes):
                    if waxis.kind not in INPUT_SIDE_KINDS or waxis.labels.ids is None:
                        continue
                    dep_ids = _entry_deps(labels, record, w.role, axis, waxis.labels)
                    # Indices grouped by dependency set with one stable sort (not one scan
                    # per set: the first layer has a set per feature).
                    dep_ids = np.asarray(dep_ids).reshape(-1)
                    order = np.argsort(dep_ids, kind="stable")
                    uniq, starts = np.unique(dep_ids[order], return_index=True)
                    ends = np.append(starts[1:], len(order))
                    for dep_id, start, end in zip(uniq.tolist(), starts, ends):
                        columns = labels.deps.sets[dep_id]
                        if not columns:
                            continue
                        idx = order[start:end]
                        idx.flags.writeable = False  # shared by every feature of the group
                        for column in sorted(columns):
                            parts[keys[column]][(path, axis)].append(idx)
        # Each index of an axis belongs to exactly one dependency group, so the chunks of one
        # (feature, weight, axis) are disjoint and sorted: one chunk (the usual case) is shared
        # as it is between all the features of its group; several are merged by a sort.
        entries = {
            key: [ParamSlice(p, a, chunks[0] if len(chunks) == 1
                             else np.sort(np.concatenate(chunks)))
                  for (p, a), chunks in groups.items()]
            for key, groups in parts.items()
        }
        for key in dict.fromkeys(keys):
            entries.setdefault(key, [])
        return cls(entries)


def _entry_deps(
    labels: GraphLabels, record: LayerRecord, role: str, axis: int, own: AxisLabels
) -> np.ndarray:
    """The dependency set of each index of one input-side weight axis.

    Besides its own label's, an index reads (a) the same index in every other call of a shared
    layer, and (b) everything along the other axes of the input axis it reads: a Dense kernel
    row reads its feature at every time step, so after a Permute that puts features before
    time, each row over time reads every feature.
    """
    columns = [own.deps]
    for result in record.later_calls:
        other = {w.role: w for w in result.weights}.get(role)
        if other is not None and axis < len(other.axes):
            theirs = other.axes[axis].labels
            if theirs.ids is not None and len(theirs.deps) == len(own.deps):
                columns.append(theirs.deps)
    broadcast = []
    for x in record.inputs:
        for a, xa in enumerate(x):
            if xa.ids is not None and np.array_equal(xa.ids, own.ids):
                broadcast.extend(b.deps for i, b in enumerate(x) if i != a)
    if broadcast:
        dep = labels.deps.union(np.concatenate(broadcast))
        if dep != DepSets.EMPTY:
            columns.append(np.full(len(own.deps), dep, dtype=np.int64))
    if len(columns) == 1:
        return own.deps
    return labels.deps.union_elementwise(columns)



def phi_table(
    model_or_path: Any, *, features: FeatureSpec | None = None, strict: bool = False
) -> PhiTable:
    """The phi table of a model or `.keras` file.

    Args:
        model_or_path: a built keras.Model, or the path of a `.keras` file (read as data).
        features: names for the input columns, e.g. `{"obs": ["hp", ("pos", 2)]}`.
        strict: raise for layers without a rule instead of treating them as opaque.

    Returns:
        PhiTable mapping `(input, feature)` to the weight slices that depend on it.
    """
    with opened(model_or_path) as side:
        return PhiTable.from_labels(propagate(side.graph(), features=features, strict=strict))


