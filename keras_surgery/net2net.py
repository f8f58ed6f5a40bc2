"""Policy "net2net": new units of a widened layer start as copies of old units (Net2WiderNet).

Chen, Goodfellow and Shlens, "Net2Net" (2016): each new unit j of a widened layer copies the
incoming weights (and per-channel statistics, e.g. BatchNormalization's) of an old unit g(j)
of the same layer, picked at random; every layer that reads the units gives each copy of g a
share of g's outgoing weights, the shares of one unit summing to 1, so the sums it computes -
and the old function - are unchanged. The shares are random (not 1/count) so that the copies
get different gradients and do not stay identical while training.

In label terms: a new unit label `unit(layer, role, j)` gets the source `unit(layer, role,
g(j))`. Composite labels map member by member (a BatchNormalization's derived labels, the sets
of a residual stream, flattened (position, channel) tuples) and map only if the mapped label
exists in the old model. g depends only on the numbers of old and new units of a role, so
layers widened together (the writers of one residual stream, the gates of an LSTM) pick the
same sources. Indices whose labels do not map keep the "preserve" fill (fresh or zero).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from typing import Any

import numpy as np

from keras_surgery.labels import LabelSpace
from keras_surgery.match import index_map
from keras_surgery.propagate import GraphLabels
from keras_surgery.rules.api import WeightLabels

SEED = 2016  # a fixed seed: the same surgery gives the same plan
SPLIT_KINDS = ("in", "out", "diag")
_COMPOSITE = ("via", "set", "tuple", "call", "occurrence")


def split_units(
    old: GraphLabels, new: GraphLabels, weights: list[tuple[Any, WeightLabels, WeightLabels]]
) -> None:
    """Adds `source` (and on input-side axes `share`) to the axis maps of `weights`, a list of
    (WeightPlan, new WeightLabels, old WeightLabels) of matched layers, in place."""
    space = new.space
    old_ids = _all_labels(old)
    source = _unit_sources(space, old_ids, new, weights)
    if not source:
        return
    resolve = _Resolver(space, old_ids, source)
    for wp, new_w, old_w in weights:
        for amap, na, oa in zip(wp.axes, new_w.axes, old_w.axes):
            if amap.kind not in SPLIT_KINDS or amap.zero_new or na.labels.ids is None:
                continue
            new_pos = np.nonzero(amap.index < 0)[0]
            if not len(new_pos):
                continue
            mapped = np.array([resolve(int(i)) for i in na.labels.ids[new_pos]], dtype=np.int64)
            src = np.full(len(amap.index), -1, dtype=np.int64)
            known = mapped >= 0
            if not known.any():
                continue
            src[new_pos[known]] = _positions(oa.labels.ids, mapped[known])
            if not (src >= 0).any():
                continue
            amap.source = src
            if amap.kind == "in":
                amap.share = _shares(amap.old_index, zlib.crc32(wp.path.encode()))


def _all_labels(graph: GraphLabels) -> set[int]:
    ids: set[int] = set()
    for x in graph.tensors.values():
        for a in x:
            if a.ids is not None:
                ids.update(a.ids.tolist())
    for rec in graph.records.values():
        for w in rec.result.weights:
            for axis in w.axes:
                if axis.labels.ids is not None:
                    ids.update(axis.labels.ids.tolist())
    return ids


def _unit_sources(
    space: LabelSpace, old_ids: set[int], new: GraphLabels, weights: list
) -> dict[int, int]:
    """new unit label -> the old unit label of the same layer and role it copies."""
    outputs = {new.records[ref[0]].identity for ref in new.graph.outputs
               if ref[0] in new.records}
    new_units: dict[tuple, set[tuple[int, int]]] = defaultdict(set)
    for _, new_w, _ in weights:
        for axis in new_w.axes:
            if axis.labels.ids is None:
                continue
            for label in axis.labels.ids.tolist():
                key = space.key(label)
                if key[0] == "unit" and label not in old_ids and key[1] not in outputs:
                    new_units[(key[1], key[2])].add((key[3], label))
    if not new_units:
        return {}
    old_units: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for label in old_ids:
        key = space.key(label)
        if key[0] == "unit" and (key[1], key[2]) in new_units:
            old_units[(key[1], key[2])].append((key[3], label))
    source = {}
    for group, items in new_units.items():
        olds = sorted(old_units.get(group, ()))
        if not olds:
            continue
        items_sorted = sorted(items)
        rng = np.random.default_rng([SEED, len(olds), len(items_sorted)])
        picks = rng.integers(len(olds), size=len(items_sorted))
        for (_, label), pick in zip(items_sorted, picks):
            source[label] = olds[int(pick)][1]
    return source


class _Resolver:
    """Maps a new label to the old label it copies (-1 if none), member by member."""

    def __init__(self, space: LabelSpace, old_ids: set[int], source: dict[int, int]):
        self.space, self.old_ids, self.source = space, old_ids, source
        self.memo: dict[int, int] = {}

    def __call__(self, label: int) -> int:
        if label in self.old_ids:
            return label
        found = self.memo.get(label)
        if found is None:
            found = self._map(label)
            self.memo[label] = found
        return found

    def _map(self, label: int) -> int:
        if label in self.source:
            return self.source[label]
        key = self.space.key(label)
        kind = key[0] if isinstance(key, tuple) and key else None
        if kind not in _COMPOSITE:
            return -1
        if kind == "set":
            members = [self(m) for m in key[1]]
            if min(members) < 0:
                return -1
            mapped = self.space.find(("set", frozenset(members)))
        elif kind == "via":
            inner = self(key[2])
            mapped = None if inner < 0 else self.space.find(("via", key[1], inner))
        elif kind in ("call", "occurrence"):  # a later call's or a repeated copy's label
            inner = self(key[2])
            mapped = None if inner < 0 else self.space.find((kind, key[1], inner))
        else:  # tuple of positions and a channel
            parts = [self(p) for p in key[1:]]
            mapped = None if min(parts) < 0 else self.space.find(("tuple", *parts))
        return mapped if mapped is not None and mapped in self.old_ids else -1


def _positions(old_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The position of each label among `old_ids`, or -1."""
    return index_map(old_ids, labels)


def _shares(old_index: np.ndarray, seed: int) -> np.ndarray:
    """Per index of an input-side axis, the share of its old index's outgoing weights: 1 for
    an index nothing else copies, random positive shares summing to 1 among copies."""
    share = np.ones(len(old_index), dtype=np.float64)
    rng = np.random.default_rng([SEED, seed])
    valid = old_index >= 0
    values, counts = np.unique(old_index[valid], return_counts=True)
    for g in values[counts > 1]:
        members = np.nonzero(old_index == g)[0]
        w = rng.uniform(0.5, 1.5, len(members))
        share[members] = w / w.sum()
    return share
