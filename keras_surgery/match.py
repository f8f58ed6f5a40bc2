"""Matching two models: which old layer and input each new one continues, and index maps.

Layers are matched while the new graph is labelled (`propagate(match_layer=...)`): by name
(through the auto-generated prefixes of nested models, `gpt2_backbone_1/x` continuing
`gpt2_backbone/x`), and auto-named layers (`dense_7`) structurally, by class and by the share
of their input labels the old layer also read. Within matched weights, `index_map` gives for
each new label the position of the same label among the old ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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


class LayerMatcher:
    """Decides which old layer each new layer continues, while the new graph is labelled."""

    def __init__(self, old: GraphLabels, new_graph: ModelGraph):
        self.old = old
        self.taken: set[str] = set()
        self.taken_inputs: set[str] = set()
        self.prefixes = _nested_prefix_map(old.graph.nested, new_graph.nested)
        # Names the new model uses deliberately are reserved for matching by name.
        self.reserved = {
            self.translate(n) for n, node in new_graph.layers.items()
            if not is_auto_name(n, node.class_name)
        }
        self.old_rank = self._ranks(
            [r.node for r in sorted(old.records.values(), key=lambda r: r.position)]
        )
        first_calls = dict.fromkeys(name for name, _ in new_graph.order)
        self.new_rank = self._ranks([new_graph.layers[name] for name in first_calls])

    @staticmethod
    def _ranks(nodes: list[LayerNode]) -> dict[str, int]:
        """Each layer's rank among the layers of its class, in topological order."""
        by_class: dict[str, int] = {}
        ranks = {}
        for node in nodes:
            ranks[node.name] = by_class.get(node.class_name, 0)
            by_class[node.class_name] = ranks[node.name] + 1
        return ranks

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
        records = self.old.records
        same = self.translate(node.name)
        old = records.get(same)
        if (
            old is not None
            and same not in self.taken
            and old.node.class_name == node.class_name
            and (not is_auto_name(node.name, node.class_name) or self._score(old, inputs) > 0)
        ):
            self.taken.add(same)
            return same
        if not is_auto_name(node.name, node.class_name):
            return None
        new_rank = self.new_rank.get(node.name, 0)
        best: tuple[float, int] | None = None
        best_name = None
        for name, rec in records.items():
            if (
                name in self.taken
                or name in self.reserved
                or rec.node.class_name != node.class_name
                or not is_auto_name(name, rec.node.class_name)
            ):
                continue
            score = self._score(rec, inputs)
            if score <= 0:
                continue
            key = (-score, abs(self.old_rank[name] - new_rank))
            if best is None or key < best:
                best, best_name = key, name
        if best_name is not None:
            self.taken.add(best_name)
        return best_name

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
