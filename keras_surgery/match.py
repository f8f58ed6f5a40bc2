"""Matching two models: which old layer and input each new one continues, and index maps.

Layers are matched while the new graph is labelled (`propagate(match_layer=...)`): by name
(through the auto-generated prefixes of nested models, `gpt2_backbone_1/x` continuing
`gpt2_backbone/x`), and auto-named layers (`dense_7`) structurally, from an alignment of both
graphs made before labelling: an edit distance over their topological orders (`align`), whose
pairing cost compares class, output and weight shapes, settings and neighbours, so that an
inserted layer is recognised as new and the layers after a deleted one keep their own weights.
Where equally good alignments differ (look-alike layers), the share of input labels the old
layer also read decides, and the report says to name the layers. Within matched weights,
`index_map` gives for each new label the position of the same label among the old ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.graph import InputSpec, LayerNode, ModelGraph, is_auto_name
from keras_surgery.labels import TensorLabels
from keras_surgery.propagate import GraphLabels, LayerRecord


def index_map(old_ids: np.ndarray, new_ids: np.ndarray) -> np.ndarray:
    """For each new label, the position of the same label among the old ones, or -1."""
    if len(old_ids) == 0:
        return np.full(len(new_ids), -1, dtype=np.int64)
    order = np.argsort(old_ids, kind="stable")
    sorted_ids = old_ids[order]
    pos = np.searchsorted(sorted_ids, new_ids)
    pos = np.clip(pos, 0, len(sorted_ids) - 1)
    found = sorted_ids[pos] == new_ids
    return np.where(found, order[pos], -1).astype(np.int64)


def _nested_prefix_map(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """New nested-model prefixes -> the old ones they continue, where the names differ only by
    Keras's auto-naming (a model built twice in one session: "gpt2_backbone" then
    "gpt2_backbone_1"). Auto-named nested models of one class under the same (translated)
    parent are paired in the order they appear, and only when both sides have the same number
    of them: with one added or removed, order says nothing about which continues which, and
    those stay unpaired (their layers then match by name or not at all)."""

    def auto_groups(models: dict[str, str], translate: Callable[[str], str]) -> dict:
        groups: dict[tuple[str, str], list[str]] = {}
        for prefix, class_name in models.items():
            parent, _, short = prefix.rpartition("/")
            if is_auto_name(short, class_name):
                groups.setdefault((translate(parent), class_name), []).append(prefix)
        return groups

    mapping: dict[str, str] = {}
    old_groups = auto_groups(old, lambda p: p)
    by_depth = sorted(new, key=lambda p: p.count("/"))  # parents first; stable order
    for depth in sorted({p.count("/") for p in by_depth}):
        level = {p: new[p] for p in by_depth if p.count("/") == depth}
        for (parent, class_name), prefixes in auto_groups(
            level, lambda p: mapping.get(p, p)
        ).items():
            olds = old_groups.get((parent, class_name), [])
            if len(olds) == len(prefixes):
                mapping.update({n: o for n, o in zip(prefixes, olds) if n != o})
        for prefix in level:  # a deliberately named model inside a translated parent
            parent, _, short = prefix.rpartition("/")
            if prefix not in mapping and parent in mapping:
                mapping[prefix] = f"{mapping[parent]}/{short}"
    return mapping


# -- structural alignment ---------------------------------------------------------------------

GAP = 100  # the cost of a layer inserted into, or deleted from, the sequence
# Costs of pairing two layers of one class that differ in one feature. Their sum stays below
# 2 * GAP, so a changed layer is always paired rather than deleted and inserted again.
FEATURE_COSTS = (("outputs", 40), ("weights", 40), ("sizes", 30), ("settings", 15),
                 ("inputs", 15), ("consumers", 10))
BAND = 48  # how far (beyond the difference in length) a pairing may stray from the diagonal
FORBIDDEN = 1 << 40  # the cost of a pairing that cannot be (other class, other name)
# Config keys that decide the shapes a layer makes (besides its weight and output shapes).
SIZE_KEYS = frozenset({
    "units", "filters", "kernel_size", "strides", "padding", "dilation_rate", "groups",
    "depth_multiplier", "pool_size", "input_dim", "output_dim", "num_heads", "key_dim",
    "value_dim", "target_shape", "dims", "axis", "size", "cropping", "return_sequences",
    "return_state", "data_format", "n", "num_tokens", "max_tokens",
})
# Config keys that say nothing about what a layer computes once trained.
_IGNORED_KEYS = frozenset({"name", "trainable", "dtype", "seed", "build_config"})
_IGNORED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")


@dataclass
class Alignment:
    """The pairing of the old and new layers that an edit distance over both topological
    orders found cheapest (layers inserted and deleted cost `GAP`, a pair what differs).

    Attributes:
        pairs: new layer -> the old layer it continues (structural candidates only).
        options: for a new layer that equally cheap alignments pair differently, every old
            layer they pair it with, the chosen one first (None: taken as new).
    """

    pairs: dict[str, str] = field(default_factory=dict)
    options: dict[str, list[str | None]] = field(default_factory=dict)


def layer_order(graph: ModelGraph) -> list[str]:
    """The graph's layers in a topological order that keeps each chain together.

    A depth-first walk back from the outputs lists a layer after the inputs of its first call,
    branch by branch in argument order, so a layer inserted into one branch moves no layer of
    another (ordering by depth, as Keras does, interleaves branches by their lengths). Layers
    no output reads follow in the graph's own order.
    """
    order: dict[str, None] = {}
    done: set[tuple[str, int]] = set()
    for out in graph.outputs:
        stack = [((out[0], out[1]), False)]
        while stack:
            call, expanded = stack.pop()
            if call in done or call[0] not in graph.layers:
                continue
            if expanded:
                done.add(call)
                order.setdefault(call[0])
                continue
            stack.append((call, True))
            refs = graph.layers[call[0]].calls[call[1]].inputs
            stack.extend(((r[0], r[1]), False) for r in reversed(refs)
                         if (r[0], r[1]) not in done)
    for name, _ in graph.order:
        order.setdefault(name)
    return list(order)


def _plain_config(value: Any) -> Any:
    """A config value in one form (file and live configs differ in tuples, module paths and
    registered names)."""
    if isinstance(value, (list, tuple)):
        return [_plain_config(v) for v in value]
    if isinstance(value, dict):
        if "class_name" in value and "config" in value:
            return [value["class_name"], _plain_config(value["config"])]
        return {str(k): _plain_config(v) for k, v in value.items()}
    return value


def _layer_features(graph: ModelGraph, names: list[str]) -> list[dict[str, str]]:
    """Per layer, its class and the features a pairing compares (`FEATURE_COSTS`), each as a
    string: output shapes, weight shapes, size settings, other settings, the classes of the
    layers it reads and of those that read it."""
    consumers: dict[str, list[str]] = {}
    for name, call_index in graph.order:
        for ref in graph.layers[name].calls[call_index].inputs:
            consumers.setdefault(ref[0], []).append(graph.layers[name].class_name)
    outputs: dict[str, dict[int, Any]] = {}
    for ref, shape in graph.tensor_shapes.items():
        if ref[1] == 0:
            outputs.setdefault(ref[0], {})[ref[2]] = shape
    found = []
    for name in names:
        node = graph.layers[name]
        config = {k: v for k, v in node.config.items()
                  if k not in _IGNORED_KEYS and not k.endswith(_IGNORED_SUFFIXES)}
        reads = node.calls[0].inputs if node.calls else []
        found.append({
            "class": f"{node.class_name}|{node.registered_name}",
            "outputs": repr(sorted((outputs.get(name) or {}).items())),
            "weights": repr([tuple(w.shape) for w in node.weights]),
            "sizes": json.dumps({k: _plain_config(v) for k, v in config.items()
                                 if k in SIZE_KEYS}, sort_keys=True, default=repr),
            "settings": json.dumps({k: _plain_config(v) for k, v in config.items()
                                    if k not in SIZE_KEYS}, sort_keys=True, default=repr),
            "inputs": repr([graph.layers[r[0]].class_name if r[0] in graph.layers else "Input"
                            for r in reads]),
            "consumers": repr(sorted(consumers.get(name, []))),
        })
    return found


class _PairCosts:
    """The cost of pairing old layer i with new layers js, from integer codes of features.

    `groups` say which pairs may be made at all: 0 for a structural candidate (pairs with
    any candidate of its class), k > 0 for the two layers of name pair k (pair only with each
    other, at no cost), and a distinct negative number for a layer that pairs with nothing.
    """

    def __init__(self, old: list[dict[str, str]], new: list[dict[str, str]],
                 old_groups: np.ndarray, new_groups: np.ndarray):
        keys = ["class", *(k for k, _ in FEATURE_COSTS)]
        table: dict[tuple[str, str], int] = {}

        def codes(rows: list[dict[str, str]]) -> np.ndarray:
            out = np.zeros((len(rows), len(keys)), dtype=np.int64)
            for r, row in enumerate(rows):
                for c, key in enumerate(keys):
                    out[r, c] = table.setdefault((key, row[key]), len(table))
            return out

        self.old, self.new = codes(old), codes(new)
        self.old_groups, self.new_groups = old_groups, new_groups
        self.weights = np.array([cost for _, cost in FEATURE_COSTS], dtype=np.int64)

    def __call__(self, i: int, js: np.ndarray) -> np.ndarray:
        new = self.new[js]
        differs = (new[:, 1:] != self.old[i, 1:]) @ self.weights
        group = self.old_groups[i]
        allowed = (new[:, 0] == self.old[i, 0]) & (self.new_groups[js] == group)
        return np.where(allowed, 0 if group > 0 else differs, FORBIDDEN)

    def diagonal(self) -> np.ndarray:
        """The cost of pairing old layer i with new layer i, for every i (equal lengths)."""
        differs = (self.new[:, 1:] != self.old[:, 1:]) @ self.weights
        allowed = (self.new[:, 0] == self.old[:, 0]) & (self.new_groups == self.old_groups)
        return np.where(allowed, np.where(self.old_groups > 0, 0, differs), FORBIDDEN)


class _Band:
    """The cells of an n x m edit-distance table near its diagonal: row i (old layers
    consumed) holds the columns `lo[i]..hi[i]` (new layers consumed), so the work is
    n * (|n - m| + 2 * BAND) however long the models are."""

    def __init__(self, n: int, m: int, width: int):
        centre = np.arange(n + 1, dtype=np.int64) * m // max(n, 1)
        self.n, self.m = n, m
        self.lo = np.clip(centre - width, 0, m)
        self.hi = np.clip(centre + width, 0, m)
        self.lo[0], self.hi[n] = 0, m

    def reversed(self) -> _Band:
        """The same cells, for the table of both sequences reversed."""
        band = object.__new__(_Band)
        band.n, band.m = self.n, self.m
        band.lo, band.hi = self.m - self.hi[::-1], self.m - self.lo[::-1]
        return band

    def cols(self, i: int) -> np.ndarray:
        return np.arange(self.lo[i], self.hi[i] + 1, dtype=np.int64)

    def at(self, rows: list[np.ndarray], i: int, js: np.ndarray) -> np.ndarray:
        """Row i of a table at columns js (a run of consecutive columns, either way), FORBIDDEN
        outside the band: a slice, as this is the inner loop."""
        out = np.full(len(js), FORBIDDEN, dtype=np.int64)
        if not len(js):
            return out
        step = -1 if len(js) > 1 and js[1] < js[0] else 1
        first = int(js[0] if step == 1 else js[-1]) - int(self.lo[i])
        a, b = max(0, -first), min(len(js), len(rows[i]) - first)
        if a < b:
            values = rows[i][first + a:first + b]
            if step == 1:
                out[a:b] = values
            else:
                out[len(js) - b:len(js) - a] = values[::-1]
        return out


def _edit_table(band: _Band, cost: Callable[[int, np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Row by row, the cheapest cost of aligning the first i old with the first j new layers.

    A row is vectorised: with a constant gap cost, the insertions along a row are a running
    minimum (`F[i, j] = j * GAP + min over k <= j of (E[k] - k * GAP)`).
    """
    rows = [band.cols(0) * GAP]
    for i in range(1, band.n + 1):
        js = band.cols(i)
        up = band.at(rows, i - 1, js) + GAP
        diag = np.full(len(js), FORBIDDEN, dtype=np.int64)
        ok = js >= 1
        diag[ok] = band.at(rows, i - 1, js[ok] - 1) + cost(i - 1, js[ok] - 1)
        best = np.minimum(np.minimum(up, diag), FORBIDDEN)
        rows.append(js * GAP + np.minimum.accumulate(best - js * GAP))
    return rows


def _backtrack(band: _Band, rows: list[np.ndarray],
               cost: Callable[[int, np.ndarray], np.ndarray]) -> dict[int, int]:
    """new index -> old index along one cheapest alignment. On a tie an insertion or deletion
    is placed as late as it can be, as a labelling in order would place it."""
    pairs: dict[int, int] = {}
    i, j = band.n, band.m

    def value(r: int, c: int) -> int:
        return int(band.at(rows, r, np.array([c]))[0])

    while i > 0 or j > 0:
        here = value(i, j)
        if j > 0 and value(i, j - 1) + GAP == here:
            j -= 1
        elif i > 0 and value(i - 1, j) + GAP == here:
            i -= 1
        else:
            pairs[j - 1] = i - 1
            i, j = i - 1, j - 1
    return pairs


def _tied_options(band: _Band, forward: list[np.ndarray], backward: list[np.ndarray],
                  cost: Callable[[int, np.ndarray], np.ndarray]) -> dict[int, set[int]]:
    """new index -> every old index (-1: inserted) some cheapest alignment gives it, for the
    new layers that cheapest alignments treat differently. A cell lies on a cheapest path
    when the cost to reach it plus the cost from it to the end is the optimum."""
    rev = band.reversed()
    best = int(forward[band.n][-1])
    options: dict[int, set[int]] = {}
    for i in range(band.n + 1):
        js = band.cols(i)
        after = rev.at(backward, band.n - i, band.m - js)  # from (i, j) to the end
        ins = band.at(forward, i, js - 1) + GAP + after
        for j in js[(js >= 1) & (ins == best)]:
            options.setdefault(int(j) - 1, set()).add(-1)
        if i == 0:
            continue
        ok = js >= 1
        diag = band.at(forward, i - 1, js[ok] - 1) + cost(i - 1, js[ok] - 1) + after[ok]
        for j in js[ok][diag == best]:
            options.setdefault(int(j) - 1, set()).add(i - 1)
    return {j: found for j, found in options.items() if len(found) > 1}


def align(
    old: list[dict[str, str]], new: list[dict[str, str]],
    old_groups: np.ndarray, new_groups: np.ndarray,
) -> tuple[dict[int, int], dict[int, set[int]]]:
    """The cheapest alignment of two layer sequences, and where equally cheap ones differ.

    Args:
        old: per old layer in `layer_order`, its features (`_layer_features`).
        new: likewise for the new layers.
        old_groups: which pairs may be made (see `_PairCosts`), per old layer.
        new_groups: likewise per new layer.

    Returns:
        (new index -> old index, new index -> the old indices (-1: inserted) equally cheap
        alignments give it, for the new layers where they differ).
    """
    n, m = len(old), len(new)
    if not n or not m:
        return {}, {}
    cost = _PairCosts(old, new, old_groups, new_groups)
    if n == m and int(cost.diagonal().sum()) < 2 * GAP:
        # Any other alignment of two sequences of one length inserts and deletes at least one
        # layer each (2 * GAP): the diagonal is then the one cheapest alignment, with no ties
        # (the common case of a surgery, found without the tables: 0.1 s on MobileNetV3).
        pairs = {j: j for j in range(n)}
        moved, moved_ties = _moved(old, new, old_groups, new_groups, pairs)
        return {**pairs, **moved}, moved_ties
    band = _Band(n, m, abs(n - m) + BAND)
    forward = _edit_table(band, cost)
    rev_band = band.reversed()
    backward = _edit_table(rev_band, lambda i, js: cost(n - 1 - i, m - 1 - js))
    pairs = _backtrack(band, forward, cost)
    pairs = {j: i for j, i in pairs.items() if cost(i, np.array([j]))[0] < FORBIDDEN}
    tied = _tied_options(band, forward, backward, cost)
    moved, moved_ties = _moved(old, new, old_groups, new_groups, pairs)
    return {**pairs, **moved}, {**tied, **moved_ties}


def _moved(
    old: list[dict[str, str]], new: list[dict[str, str]],
    old_groups: np.ndarray, new_groups: np.ndarray, pairs: dict[int, int],
) -> tuple[dict[int, int], dict[int, set[int]]]:
    """Pairs the candidates the alignment left unpaired on both sides whose features are all
    equal: a layer that moved in the order (branches of a merge swapped, outputs listed in
    another order) keeps its weights. Several of one kind pair in order, reported as ties."""
    used = set(pairs.values())
    waiting: dict[tuple, list[int]] = {}
    for i, row in enumerate(old):
        if old_groups[i] == 0 and i not in used:
            waiting.setdefault(tuple(sorted(row.items())), []).append(i)
    left: dict[tuple, list[int]] = {}
    for j, row in enumerate(new):
        if new_groups[j] == 0 and j not in pairs:
            left.setdefault(tuple(sorted(row.items())), []).append(j)
    moved: dict[int, int] = {}
    ties: dict[int, set[int]] = {}
    for key, js in left.items():
        olds = waiting.get(key, [])
        moved.update(zip(js, olds))
        if olds and (len(js) > 1 or len(olds) > 1):
            extra = {-1} if len(js) > len(olds) else set()
            ties.update({j: set(olds) | extra for j in js})
    return moved, ties


class LayerMatcher:
    """Decides which old layer each new layer continues, while the new graph is labelled.

    Named layers continue the old layer of the same name (through nested-model prefixes). The
    auto-named ones (`dense_7`) continue the old layer an alignment of both graphs pairs them
    with (`align`), decided before labelling, so that an inserted layer is new and the layers
    after a deleted one keep their own weights; where equally good alignments differ, the
    share of input labels the old layer also read decides, then the position.

    Attributes:
        matches: new layer -> the old layer it continues, as labelling decided.
        reasons: new layer -> why it continues its old layer: "name", "nested prefix",
            "structure" (aligned), or "position" (among look-alikes, with a warning).
        alignment: the precomputed `Alignment` of both graphs.

    Example:
        ```python
        matcher = LayerMatcher(old_labels, new_graph)
        new_labels = propagate(new_graph, match_layer=matcher.match_layer,
                               match_input=matcher.match_input, space=old_labels.space)
        matcher.reasons, matcher.warnings  # after labelling
        ```
    """

    def __init__(self, old: GraphLabels, new_graph: ModelGraph):
        self.old = old
        self.new_graph = new_graph
        self.taken: set[str] = set()
        self.taken_inputs: set[str] = set()
        self.reasons: dict[str, str] = {}
        self.matches: dict[str, str] = {}
        self.prefixes = _nested_prefix_map(old.graph.nested, new_graph.nested)
        # Names the new model uses deliberately are reserved for matching by name.
        self.reserved = {
            self.translate(n) for n, node in new_graph.layers.items()
            if not is_auto_name(n, node.class_name)
        }
        self.by_name = self._name_pairs()
        self.alignment = self._align()

    def _name_pairs(self) -> dict[str, str]:
        """new layer -> the old layer of its (translated) name and class, for named layers."""
        pairs = {}
        for name, node in self.new_graph.layers.items():
            same = self.translate(name)
            old = self.old.records.get(same)
            if (old is not None and old.node.class_name == node.class_name
                    and not is_auto_name(name, node.class_name)):
                pairs[name] = same
        return pairs

    def _align(self) -> Alignment:
        """Aligns both graphs' layers in `layer_order`; name pairs anchor the alignment."""
        old_graph = self.old.graph
        old_names = [n for n in layer_order(old_graph) if n in self.old.records]
        new_names = layer_order(self.new_graph)
        anchor = {old: k + 1 for k, old in enumerate(self.by_name.values())}
        old_groups = np.array([
            anchor.get(name, 0 if self._old_candidate(name) else -1 - i)
            for i, name in enumerate(old_names)], dtype=np.int64)
        new_groups = np.array([
            anchor[self.by_name[name]] if name in self.by_name
            else 0 if is_auto_name(name, self.new_graph.layers[name].class_name)
            else -1 - len(old_names) - j
            for j, name in enumerate(new_names)], dtype=np.int64)
        if not (old_groups == 0).any() or not (new_groups == 0).any():
            return Alignment()  # every layer is named on one side: names decide alone
        pairs, tied = align(_layer_features(old_graph, old_names),
                            _layer_features(self.new_graph, new_names), old_groups, new_groups)
        alignment = Alignment()
        for j, i in pairs.items():
            if new_groups[j] == 0:
                alignment.pairs[new_names[j]] = old_names[i]
        for j, found in tied.items():
            chosen = pairs.get(j, -1)
            ordered = [chosen, *sorted(found - {chosen})]
            alignment.options[new_names[j]] = [old_names[i] if i >= 0 else None
                                               for i in ordered]
        return alignment

    def _old_candidate(self, name: str) -> bool:
        """Whether an old layer may be continued structurally: auto-named, and its name is not
        one the new model uses deliberately."""
        rec = self.old.records[name]
        return is_auto_name(name, rec.node.class_name) and name not in self.reserved

    def match_input(self, spec: InputSpec, index: int) -> str | None:
        old_inputs = [i.name for i in self.old.graph.inputs]
        if spec.name in old_inputs and spec.name not in self.taken_inputs:
            self.taken_inputs.add(spec.name)
            return spec.name
        if is_auto_name(spec.name, "InputLayer"):
            for name in old_inputs:
                if is_auto_name(name, "InputLayer") and name not in self.taken_inputs:
                    self.taken_inputs.add(name)
                    return name
        return None

    def translate(self, name: str) -> str:
        """`name` with the auto-generated names of the new model's nested models replaced by
        those of the old nested models they continue ("gpt2_backbone_1/x" -> "gpt2_backbone/x")."""
        cut = name.rfind("/")
        while cut > 0:
            old_prefix = self.prefixes.get(name[:cut])
            if old_prefix is not None:
                return old_prefix + name[cut:]
            cut = name.rfind("/", 0, cut)
        return name

    def match_layer(self, node: LayerNode, inputs: list[TensorLabels], position: int) -> str | None:
        """The old layer `node` continues, or None (a named new layer) or a name no old layer
        has (an auto-named new layer). Records the reason in `reasons`."""
        name = node.name
        same = self.by_name.get(name)
        if same is not None and same not in self.taken:
            self.taken.add(same)
            self.matches[name] = same
            self.reasons[name] = "name" if same == name else "nested prefix"
            return same
        if not is_auto_name(name, node.class_name):
            return None
        chosen = self._structural(name, inputs)
        if chosen is None:
            # Not its own name: that may be the name of an old layer another one continues.
            return name if name not in self.old.records else f"{name} (new)"
        self.taken.add(chosen)
        self.matches[name] = chosen
        if name in self.alignment.options:
            self.reasons[name] = "position"
        elif chosen == name:
            self.reasons[name] = "name"
        else:
            self.reasons[name] = "nested prefix" if self.translate(name) == chosen else "structure"
        return chosen

    def _structural(self, name: str, inputs: list[TensorLabels]) -> str | None:
        """The aligned old layer of an auto-named new layer; among equally good ones, the one
        that read most of its input labels, the aligned one on a tie."""
        aligned = self.alignment.pairs.get(name)
        if aligned is None:
            return None
        options = [o for o in self.alignment.options.get(name, [aligned])
                   if o is not None and o not in self.taken]
        if not options:
            return None
        scores = [self._score(self.old.records[o], inputs) for o in options]
        return options[int(np.argmax(scores))]

    @property
    def warnings(self) -> list[str]:
        """After labelling: the look-alike layers matched by position (name them), and the
        old layers with weights that no new layer continues (deleted)."""
        found = []
        tied: dict[str, list[str]] = {}
        for name, options in self.alignment.options.items():
            node = self.new_graph.layers[name]
            if node.weights and (self.reasons.get(name) == "position" or options[0] is None):
                tied.setdefault(node.class_name, []).append(name)
        for class_name, names in tied.items():
            olds = sorted({o for n in names for o in self.alignment.options[n] if o})
            decided = ", ".join(
                f"'{n}' continues '{self._continued(n)}'" if self._continued(n) else f"'{n}' new"
                for n in names)
            found.append(
                f"layer(s) {_quoted(names)} ({class_name}) look alike old layer(s) "
                f"{_quoted(olds)}: several matches are equally good, and their position "
                f"decided ({decided}). Name the layers in both models (keras.layers."
                f"{class_name}(..., name=\"...\")) to say which continues which."
            )
        for name, rec in self.old.records.items():
            if rec.node.weights and name not in self.taken:
                found.append(f"old layer '{name}' ({rec.node.class_name}) is continued by no "
                             "layer of the new model: it was deleted, its weights are dropped.")
        return found

    def _continued(self, name: str) -> str | None:
        """The old layer a new one was matched to while labelling, if any."""
        return self.matches.get(name)

    @staticmethod
    def _score(old: LayerRecord, inputs: list[TensorLabels]) -> float:
        """The share of the new layer's input labels that the old layer also read."""
        if len(old.inputs) != len(inputs):
            return 0.0
        if not inputs:
            return 1.0
        shares = []
        for old_x, new_x in zip(old.inputs, inputs):
            old_ids = [a.ids for a in old_x if a.ids is not None]
            new_ids = [a.ids for a in new_x if a.ids is not None]
            if not new_ids or not old_ids:
                shares.append(1.0 if len(old_x) == len(new_x) else 0.0)
                continue
            new_all = np.concatenate(new_ids)
            shares.append(float(np.isin(new_all, np.concatenate(old_ids)).mean()))
        return float(np.mean(shares))


def _quoted(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_unit_maps(
    unit_maps: Mapping[str, Sequence[int]], old: GraphLabels, new: GraphLabels
) -> list[str]:
    """Validates the user's unit choices against the labelled graphs; returns warnings naming
    the old units no new unit continues.

    Raises:
        SurgeryError: a layer that is not in the new model or continues no old layer, a map
            whose length is no unit count of the layer, an entry that is no old unit, or an
            old unit chosen twice.
    """
    warnings = []
    for name, chosen in unit_maps.items():
        rec = new.records.get(name)
        if rec is None:
            raise SurgeryError(f"unit_maps names layer '{name}', which the new model does not "
                               f"have. Layers: {sorted(new.records)[:20]}")
        old_rec = old.records.get(rec.identity)
        if old_rec is None or old_rec.node.class_name != rec.node.class_name:
            raise SurgeryError(f"unit_maps names layer '{name}', which continues no layer of "
                               "the old model: its units have no old units to choose from.")
        if any(not isinstance(e, (int, np.integer)) or isinstance(e, bool) or e < -1
               for e in chosen):
            raise SurgeryError(f"unit_maps['{name}'] must list, per new unit, an old unit index "
                               f"or -1. Received: {list(chosen)!r}")
        old_n = _unit_count(old_rec, len(chosen), rec)
        if old_n is None:
            sizes = sorted({len(a.labels.ids) for w in rec.result.weights for a in w.axes
                            if a.kind == "out" and a.labels.ids is not None})
            raise SurgeryError(f"unit_maps['{name}'] has {len(chosen)} entries, but the layer's "
                               f"units come in groups of {sizes}.")
        kept = [int(e) for e in chosen if e >= 0]
        if any(e >= old_n for e in kept) or len(set(kept)) < len(kept):
            raise SurgeryError(f"unit_maps['{name}'] must name each old unit (0 to {old_n - 1}) "
                               f"at most once. Received: {list(chosen)!r}")
        dropped = sorted(set(range(old_n)) - set(kept))
        if dropped:
            shown = ", ".join(map(str, dropped[:12])) + (", ..." if len(dropped) > 12 else "")
            warnings.append(f"layer '{name}': unit_maps drops {len(dropped)} old unit(s) "
                            f"({shown}) of layer '{old_rec.node.name}'.")
    return warnings


def _unit_count(old_rec: LayerRecord, n_new: int, rec: LayerRecord) -> int | None:
    """The old layer's number of units on the output axis the map applies to: an "out" axis of
    the new layer holding `n_new` units (or k blocks of them: an LSTM's four gates), at the same
    weight and axis of the old one (holding k blocks of the old units)."""
    old_weights = {w.role: w for w in old_rec.result.weights}
    found = []
    for w in rec.result.weights:
        old_w = old_weights.get(w.role)
        for a, axis in enumerate(w.axes):
            ids = axis.labels.ids
            if axis.kind != "out" or ids is None or not n_new or len(ids) % n_new:
                continue
            if old_w is None or a >= len(old_w.axes) or old_w.axes[a].labels.ids is None:
                continue
            blocks, old_len = len(ids) // n_new, len(old_w.axes[a].labels.ids)
            if old_len % blocks == 0:
                found.append((blocks, old_len // blocks))
    return min(found)[1] if found else None
