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

Policy "duplicate" (Staged Training, Shen et al. 2022) is the same mechanism made uniform:
when a role grows by an integer factor k, new unit j copies old unit j mod d_old (the grown
axis is [x, x, ...]) and every copy of a unit gets the share 1/k. Every old unit then has
exactly k copies, so a LayerNormalization over the grown axis sees the same mean and
variance (`operators.accept_duplicate_growths`). A role that grows by a factor that is not an
integer is not split, and the report names it.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
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
    old: GraphLabels, new: GraphLabels, weights: list[tuple[Any, WeightLabels, WeightLabels]],
    *, duplicate: bool = False,
) -> Splits:
    """Adds `source` (and on input-side axes `share`) to the axis maps of `weights`, a list of
    (WeightPlan, new WeightLabels, old WeightLabels) of matched layers, in place.

    Args:
        old: the old model's labels.
        new: the new model's labels.
        weights: the matched weights with their new and old labels.
        duplicate: policy "duplicate": sources j mod d_old and shares 1/k, for roles that grow
            by an integer factor k (others are not split and are named in `Splits.refused`).

    Returns:
        The `Splits`: how new labels map to the old labels they copy, and the refused roles.

    Example:
        >>> splits = split_units(old_labels, new_labels, splittable)     # doctest: +SKIP
        >>> splits.resolve(new_label)  # the old label it copies, or -1  # doctest: +SKIP
    """
    space = new.space
    old_ids = _all_labels(old)
    held = _held_at_zero(new, weights)
    source, refused = _unit_sources(space, old_ids, new, weights, duplicate, held)
    resolve = _Resolver(space, old_ids, source)
    if not source:
        return Splits(resolve, refused)
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
                amap.share = _shares(amap.old_index, zlib.crc32(wp.path.encode()), duplicate)
        if duplicate and any(a.source is not None for a in wp.axes):
            wp.operator = "; ".join(t for t in (duplication_operator(wp), wp.operator) if t)
    return Splits(resolve, refused)


@dataclass
class Splits:
    """What `split_units` did: `resolve(label)` is the old label a new label copies (itself
    for an old label, -1 for none); `refused`, under policy "duplicate", one line per unit
    role that grew by a factor that is not an integer (its new units were not split)."""

    resolve: Callable[[int], int]
    refused: list[str]


def duplication_operator(wp: Any) -> str:
    """The report's text for a duplicated weight: per split axis, which old index each new
    index copies and, on input-side axes, the share its copies get."""
    parts = []
    for a, amap in enumerate(wp.axes):
        if amap.source is None:
            continue
        n_old, n_new = wp.old_shape[a], len(amap.index)
        text = f"axis {a} duplicated {n_old} -> {n_new} (new index j copies j mod {n_old})"
        if amap.share is not None:
            text += f", each copy x1/{n_new // n_old}"
        parts.append(text)
    return "duplication: " + "; ".join(parts)


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


def _held_at_zero(new: GraphLabels, weights: list) -> set[int]:
    """The new labels that a tied table must write as 0 (`AxisMap.zero_new` on the output-side
    axis of a weight that a later call of its layer reads back, with no norm found to take a
    duplication back, `operators.tied_duplications`): their units cannot be split, or their
    readers would share an old unit's weights with a copy that is 0."""
    held: set[int] = set()
    for wp, new_w, _ in weights:
        rec = new.records.get(wp.layer)
        if rec is None or not any(w.role == new_w.role for later in rec.later_calls
                                  for w in later.weights):
            continue
        for amap, axis in zip(wp.axes, new_w.axes):
            if amap.zero_new and axis.kind == "out" and axis.labels.ids is not None:
                held.update(axis.labels.ids[amap.index < 0].tolist())
    return held


def _unit_sources(
    space: LabelSpace, old_ids: set[int], new: GraphLabels, weights: list, duplicate: bool,
    held: set[int],
) -> tuple[dict[int, int], list[str]]:
    """new unit label -> the old unit label of the same layer and role it copies, and the
    roles refused: by policy "duplicate", a growth by a factor that is not an integer; by
    both policies, units a weight must write as 0 (`_held_at_zero`)."""
    outputs = {new.records[ref[0]].identity for ref in new.graph.outputs
               if ref[0] in new.records}
    if duplicate:  # only the units on the outputs themselves: a tied table's columns split
        outputs = set()
        output_labels = {int(i) for x in new.output_labels() if x is not None for a in x
                         if a.ids is not None for i in a.ids}
    new_units: dict[tuple, set[tuple[int, int]]] = defaultdict(set)
    for _, new_w, _ in weights:
        for axis in new_w.axes:
            if axis.labels.ids is None:
                continue
            for label in axis.labels.ids.tolist():
                key = space.key(label)
                if key[0] == "unit" and label not in old_ids and key[1] not in outputs and (
                        not duplicate or label not in output_labels):
                    new_units[(key[1], key[2])].add((key[3], label))
    if not new_units:
        return {}, []
    old_units: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for label in old_ids:
        key = space.key(label)
        if key[0] == "unit" and (key[1], key[2]) in new_units:
            old_units[(key[1], key[2])].append((key[3], label))
    source: dict[int, int] = {}
    refused: list[str] = []
    for group, items in new_units.items():
        olds = sorted(old_units.get(group, ()))
        if not olds:
            continue
        items_sorted = sorted(items)
        if any(label in held for _, label in items_sorted):
            refused.append(
                f"{repr(group[1]) + ' ' if group[1] else ''}units of layer '{group[0]}' start "
                "at 0 in a weight that must keep them 0 (a tied table read back without a norm "
                "that could take a copy back), so they are not split and keep the 'preserve' "
                "fill")
            continue
        if duplicate:
            if len(items_sorted) % len(olds):
                n_new = len(olds) + len(items_sorted)
                refused.append(
                    f"{repr(group[1]) + ' ' if group[1] else ''}units of layer '{group[0]}' "
                    f"grew {len(olds)} -> "
                    f"{n_new}, which is not an integer factor, so policy 'duplicate' leaves "
                    "its new units to the 'preserve' fill")
                continue
            picks = np.arange(len(items_sorted)) % len(olds)  # new unit j copies j mod d_old
        else:
            rng = np.random.default_rng([SEED, len(olds), len(items_sorted)])
            picks = rng.integers(len(olds), size=len(items_sorted))
        for (_, label), pick in zip(items_sorted, picks):
            source[label] = olds[int(pick)][1]
    return source, refused


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


def _shares(old_index: np.ndarray, seed: int, duplicate: bool = False) -> np.ndarray:
    """Per index of an input-side axis, the share of its old index's outgoing weights: 1 for
    an index nothing else copies, random positive shares summing to 1 among copies (1 / their
    count under policy "duplicate")."""
    share = np.ones(len(old_index), dtype=np.float64)
    rng = np.random.default_rng([SEED, seed])
    valid = old_index >= 0
    values, counts = np.unique(old_index[valid], return_counts=True)
    for g in values[counts > 1]:
        members = np.nonzero(old_index == g)[0]
        w = np.ones(len(members)) if duplicate else rng.uniform(0.5, 1.5, len(members))
        share[members] = w / w.sum()
    return share
