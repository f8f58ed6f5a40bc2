"""Growth: how new layers start so that the old function is kept (Net2DeeperNet).

A new layer inserted between old layers starts as the identity (Dense/Conv kernel the
identity, bias 0; BatchNormalization gamma 1, beta 0, mean 0, variance 1 - epsilon), so the
layers after it read what they read before. The last layer of a new branch that is added to
old values (x + f(x)) starts at exactly 0, so that the sum is x: its outputs carry `zero_key`
labels, which an Add drops from its set labels (`LabelSpace.set_of(..., sums=True)`).

Both are decided here from a first labelling of the new model, in which new layers still
carry fresh labels; the planner then labels the new model again with the chosen starts
(`propagate(..., starts=...)`), so the layers after them match their old selves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from keras_surgery.graph import TensorRef
from keras_surgery.labels import TensorLabels
from keras_surgery.propagate import GraphLabels, LayerRecord

# Label kinds every model shares whatever its layers (positions, kernel taps): they say
# nothing about whether a tensor continues an old one.
_SHARED_KINDS = frozenset({"pos", "offset", "broadcast", "geometry", "group-slot"})


@dataclass
class Growth:
    """The starts chosen for new layers, and what could not be kept."""

    starts: dict[str, str] = field(default_factory=dict)  # layer -> "identity" | "zero"
    warnings: list[str] = field(default_factory=list)
    breaks: bool = False  # a new layer between old layers cannot start as the identity

    def to_dict(self) -> dict[str, str]:
        return dict(self.starts)


def is_new(record: LayerRecord, old: GraphLabels) -> bool:
    """Whether a layer of the new model continues no layer of the old one."""
    old_rec = old.records.get(record.identity)
    return old_rec is None or old_rec.node.class_name != record.node.class_name


def plan_starts(
    old: GraphLabels, new: GraphLabels, chosen: Mapping[str, str] | None = None
) -> Growth:
    """Chooses how each new layer starts, from a labelling `new` of the new model made with
    the starts `chosen` so far (kept). A start changes the labels after it, so the planner
    calls this again on the new labelling until nothing is added: a new BatchNormalization
    started as the identity lets the new Dense after it see old labels and start so too.

    * A new layer whose input carries old labels and whose output reaches old layers (not
      through a branch started at zero) must be the identity: layers with weights get the
      "identity" start; a layer that cannot be the identity (a tanh, a different width, a
      LayerNormalization) gets a warning naming it, and the function is not preserved.
    * An Add of old values and a new branch (whose labels are all new) starts that branch's
      last weighted layer at zero, walking back through layers that keep 0 at 0.
    """
    growth = Growth(starts=dict(chosen or {}))
    old_ids = _old_labels(old)
    graph = new.graph
    fresh = {name for name, rec in new.records.items() if is_new(rec, old)}
    consumers: dict[str, set[str]] = defaultdict(set)
    for name, call_index in graph.order:
        for ref in graph.layers[name].calls[call_index].inputs:
            consumers[ref[0]].add(name)

    def carries_old(x: TensorLabels) -> bool:
        return any(a.ids is not None and bool(np.isin(a.ids, old_ids).any()) for a in x)

    def reaches_old(name: str) -> bool:
        """Whether an output of `name` flows into an old layer, not through a zero start."""
        seen, todo = {name}, list(consumers.get(name, ()))
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            if current not in fresh:
                return True
            if growth.starts.get(current) != "zero":
                todo.extend(consumers.get(current, ()))
        return False

    # 1. New branches added to old values start at zero.
    in_branch: set[str] = set()  # layers walked back from a sum (reported there if need be)
    for name, call_index in graph.order:
        rec = new.records[name]
        call = graph.layers[name].calls[call_index]
        if not rec.result.sums or len(call.inputs) < 2 or name not in fresh:
            continue
        inputs = [new.tensors[ref] for ref in call.inputs]
        old_flags = [carries_old(x) for x in inputs]
        if all(old_flags) or not any(old_flags):
            continue
        for ref, flag in zip(call.inputs, old_flags):
            if flag:
                continue
            source, why, walked = _zero_source(new, fresh, ref)
            in_branch.update(walked)
            if source is not None:
                growth.starts.setdefault(source, "zero")
            elif reaches_old(name):
                growth.warnings.append(
                    f"layer '{name}' ({rec.node.class_name}) adds a new branch (from layer "
                    f"'{ref[0]}') to old values, and that branch cannot start at zero: {why}; "
                    "the old outputs change."
                )
                growth.breaks = True

    # 2. New layers between old layers start as the identity.
    for name in dict.fromkeys(n for n, _ in graph.order):
        rec = new.records[name]
        if name not in fresh or name in growth.starts or name in in_branch:
            continue
        if not any(carries_old(x) for x in rec.inputs) or not reaches_old(name):
            continue
        start = rec.result.starts.get("identity")
        what = f"layer '{name}' ({rec.node.class_name}) is new between old layers"
        if start is not None and start.refused is None:
            if rec.node.weights:
                if len(rec.node.calls) > 1:
                    growth.warnings.append(f"{what} and shared; it cannot start as the "
                                           "identity, so the old outputs change.")
                    growth.breaks = True
                else:
                    growth.starts[name] = "identity"
            continue
        if start is not None:
            reason = start.refused
        elif rec.node.weights:
            reason = "its rule offers no identity start"
        elif rec.result.mixing and not rec.opaque:
            reason = rec.result.mixing[0].reason
        elif len(rec.inputs) == 1 and rec.result.outputs and _same_labels(
            rec.result.outputs[0], rec.inputs[0]
        ):
            # Labels passed through unchanged by a layer not known to be the identity: its
            # values may differ (a custom scaling layer registered as a pass-through).
            reason = "it keeps its input's labels but is not known to be the identity"
        else:
            continue  # it moves labels (reshape, concatenate, pool): its labels say what it does
        growth.warnings.append(f"{what} and cannot start as the identity: {reason}; the old "
                               "outputs change.")
        growth.breaks = True
    return growth


def _zero_source(
    new: GraphLabels, fresh: set[str], ref: TensorRef
) -> tuple[str | None, str, list[str]]:
    """The new layer with weights that can make tensor `ref` exactly 0, walking back through
    new layers without weights that keep 0 at 0: (layer, "", walked) or (None, why not,
    walked), `walked` naming the new layers visited."""
    walked: list[str] = []
    while True:
        name = ref[0]
        rec = new.records.get(name)
        if rec is None:
            return None, f"it starts at model input '{name}'", walked
        if name not in fresh:
            return None, f"it starts at old layer '{name}'", walked
        walked.append(name)
        if len(rec.node.calls) > 1:
            return None, f"layer '{name}' is shared", walked
        start = rec.result.starts.get("zero")
        if start is None or start.refused is not None:
            why = start.refused if start is not None else "it does not keep 0 at 0"
            return None, f"layer '{name}' ({rec.node.class_name}): {why}", walked
        if rec.node.weights:
            return name, "", walked
        inputs = rec.node.calls[ref[1]].inputs
        if len(inputs) != 1:
            return None, f"layer '{name}' has {len(inputs)} inputs", walked
        ref = inputs[0]


def _old_labels(old: GraphLabels) -> np.ndarray:
    """Every label of an old tensor, except the kinds all models share."""
    ids = [a.ids for x in old.tensors.values() for a in x if a.ids is not None]
    if not ids:
        return np.zeros(0, dtype=np.int64)
    unique = np.unique(np.concatenate(ids))
    keep = [old.space.kind(i) not in _SHARED_KINDS for i in unique]
    return unique[np.asarray(keep, dtype=bool)]


def _same_labels(a: TensorLabels, b: TensorLabels) -> bool:
    return len(a) == len(b) and all(x.same_as(y) for x, y in zip(a, b))
