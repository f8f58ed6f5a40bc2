"""The planner: two labelled graphs in, a SurgeryPlan out, weight by weight and axis by axis.

Planning is a sequence of small steps over the new model's layers; each step that finds
something bearing on the promise (a changed setting, a mixing axis that changed, an input
index gone) records it in one `Verdict`, which decides `preserves_function` at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.graph import WeightSpec
from keras_surgery.growth import Growth
from keras_surgery.labels import AxisLabels, LabelSpace
from keras_surgery.match import index_map
from keras_surgery.operators import (
    INPUT_SIDE_KINDS,
    MixingGrowth,
    Verdict,
    grow,
)
from keras_surgery.plan import POLICIES, PRESERVING_POLICIES, AxisMap, SurgeryPlan, WeightPlan
from keras_surgery.propagate import GraphLabels, LayerRecord
from keras_surgery.rules.api import WeightLabels
from keras_surgery.settings import changed_call_warning, changed_settings_warning


def build_plan(
    old: GraphLabels,
    new: GraphLabels,
    *,
    policy: str,
    old_source: Any = None,
    growth: Growth | None = None,
) -> SurgeryPlan:
    """Matches the two labelled graphs weight by weight and axis by axis.

    Args:
        old: the old model's labels.
        new: the new model's labels, made with the matcher (and with `growth`'s starts).
        policy: "preserve", "net2net" or "random".
        old_source: where the old values are read when the plan is applied (a `Side`).
        growth: the starts of new layers and what could not be started; under policy
            "net2net" new units are also split off old ones.

    Returns:
        The SurgeryPlan (without optimizer layout and labels, which the migrator adds).

    Raises:
        SurgeryError: an unknown policy, or a weight axis without labels.
    """
    if policy not in POLICIES:
        raise SurgeryError(f"policy must be one of {POLICIES}. Received: policy={policy!r}")
    growth = Growth() if growth is None else growth
    source_weights = getattr(old_source, "weights", None)
    old_value = None if source_weights is None else source_weights.read
    verdict = Verdict(list(new.warnings) + list(growth.warnings), growth.breaks)
    weights: list[WeightPlan] = []
    splittable: list[tuple[WeightPlan, WeightLabels, WeightLabels]] = []
    matches: dict[str, str] = {}
    new_layers: list[str] = []
    continued_old: set[str] = set()
    zero_growths: list[MixingGrowth] = []

    for name, rec in new.records.items():
        old_rec = old.records.get(rec.identity)
        if old_rec is None or old_rec.node.class_name != rec.node.class_name:
            if rec.node.weights or rec.node.group:
                new_layers.append(name)
            weights.extend(_new_layer_weights(name, rec, policy))
            continue
        matches[name] = old_rec.node.name
        for setting in (changed_settings_warning(name, rec.node, old_rec.node),
                        changed_call_warning(name, rec.node, old_rec.node, constants_elsewhere=(
                            rec.result.scales_by is not None
                            and old_rec.result.scales_by is not None))):
            if setting is not None:
                verdict.warn(setting)
        zero_growths += _check_mixing(name, rec, old_rec, verdict, policy)
        old_weights = {w.role: (w, spec) for w, spec in zip(old_rec.result.weights,
                                                            old_rec.node.weights)}
        for w, spec in zip(rec.result.weights, rec.node.weights):
            found = old_weights.get(w.role)
            wp = _matched_weight(name, rec, old_rec, w, spec, found, new.space, verdict,
                                 old_value)
            wp.count(policy)
            weights.append(wp)
            if found is not None:
                continued_old.add(found[1].path)
                if wp.axes is not None:
                    splittable.append((wp, w, found[0]))

    grow(old, new, weights, splittable, zero_growths, policy, verdict)
    dropped = [
        spec.path for rec in old.records.values() for spec in rec.node.weights
        if spec.path not in continued_old
    ]
    _check_outputs(old, new, verdict)
    if policy not in PRESERVING_POLICIES and any(
        w.zeroed or (w.axes is not None and w.fresh) for w in weights
    ):
        verdict.breaks = True
    return SurgeryPlan(
        old=old.graph.description,
        new=new.graph.description,
        policy=policy,
        weights=weights,
        matches=matches,
        new_layers=new_layers,
        dropped=dropped,
        warnings=verdict.unique_warnings(),
        preserves_function=not verdict.breaks,
        old_source=old_source,
        starts=starts_of(new),
    )


def starts_of(labels: GraphLabels) -> dict[str, str]:
    """The starts a labelling was made with: layer -> "identity" | "zero"."""
    return {name: rec.start for name, rec in labels.records.items() if rec.start is not None}


def _new_layer_weights(name: str, rec: LayerRecord, policy: str) -> list[WeightPlan]:
    """The weights of a layer nothing in the old model continues: fresh, or its start."""
    roles = [w.role for w in rec.result.weights]
    start = rec.result.starts.get(rec.start) if rec.start is not None else None
    planned = []
    for i, spec in enumerate(rec.node.weights):
        role = roles[i] if len(roles) == len(rec.node.weights) else spec.local
        wp = WeightPlan(name, role, spec.path, spec.shape)
        if start is not None:
            wp.init = start.values.get(role)
        wp.count(policy)
        planned.append(wp)
    return planned


def _check_mixing(
    name: str, rec: LayerRecord, old_rec: LayerRecord, verdict: Verdict, policy: str
) -> list[MixingGrowth]:
    """Mixing axes (a LayerNorm's, a softmax's) must keep their labels, or the old outputs
    change. A growth of an axis that may grow by zeros (an RMS norm's) or by duplication (a
    LayerNorm's; an RMS norm's under policy "duplicate") is returned instead, for
    `operators.grow` to decide once every weight is planned."""
    pending: list[MixingGrowth] = []
    for new_mix, old_mix in zip(rec.result.mixing, old_rec.result.mixing):
        for new_axis, old_axis in zip(new_mix.labels, old_mix.labels):
            if new_axis.ids is None or old_axis.ids is None:
                if new_axis.ids is None and old_axis.ids is None:
                    continue
                gained = lost = 0
            elif new_mix.ordered and np.array_equal(new_axis.ids, old_axis.ids):
                continue
            elif not new_mix.ordered and (
                set(new_axis.ids.tolist()) == set(old_axis.ids.tolist())
            ):
                continue
            else:
                gained = len(np.setdiff1d(new_axis.ids, old_axis.ids))
                lost = len(np.setdiff1d(old_axis.ids, new_axis.ids))
            reordered = ", reordered" if new_mix.ordered and not gained and not lost else ""
            changed = (f"layer '{name}' ({rec.node.class_name}): {new_mix.reason}; that axis "
                       f"changed (gained {gained}, lost {lost} labels{reordered}), so the old "
                       "outputs cannot be preserved.")
            single = gained and not lost and len(new_mix.labels) == 1
            by_duplication = bool(single and new_mix.grows_by_duplication and (
                policy == "duplicate" or not new_mix.grows_with_zeros))
            if single and (new_mix.grows_with_zeros or by_duplication):
                pending.append(MixingGrowth(name, rec.node.class_name, new_mix.reason,
                                          len(old_axis.ids), np.setdiff1d(new_axis.ids,
                                                                          old_axis.ids),
                                          by_duplication, old_axis.ids, changed,
                                          rescaled=new_mix.grows_with_zeros))
                continue
            verdict.warn(changed)
    return pending


def _matched_weight(
    name: str,
    rec: LayerRecord,
    old_rec: LayerRecord,
    w: WeightLabels,
    spec: WeightSpec,
    found: tuple[WeightLabels, WeightSpec] | None,
    space: LabelSpace,
    verdict: Verdict,
    old_value: Callable[[str], np.ndarray] | None,
) -> WeightPlan:
    """The plan of one weight of a matched layer: index maps from its old counterpart, or
    fresh (with a warning) when it has none or cannot be mapped."""
    wp = WeightPlan(name, w.role, spec.path, spec.shape)
    if found is None and w.role in rec.result.added:
        wp.init = rec.result.added[w.role]  # a sublayer added inside the layer, started so
        return wp
    if found is None:
        verdict.warn(
            f"layer '{name}': weight '{w.role}' has no counterpart in the old model; it keeps "
            "its initial values, so the old outputs may change."
        )
        return wp
    old_w, old_spec = found
    wp.old_layer, wp.old_path, wp.old_shape = old_rec.node.name, old_spec.path, tuple(
        old_spec.shape)
    if rec.opaque and tuple(spec.shape) != tuple(old_spec.shape):
        verdict.warn(
            f"layer '{name}' ({rec.node.class_name}) has no rule and its weight '{w.role}' "
            f"changed shape {tuple(old_spec.shape)} -> {tuple(spec.shape)}; it keeps its "
            "initial values."
        )
        return wp
    if len(w.axes) != len(old_w.axes):
        verdict.warn(f"layer '{name}': weight '{w.role}' changed rank; it keeps its initial "
                     "values.")
        return wp
    wp.axes = []
    for axis, (na, oa) in enumerate(zip(w.axes, old_w.axes)):
        wp.axes.append(_axis_map(name, w.role, axis, na, oa, wp, space, verdict, old_value))
    _check_shared_calls(rec, old_rec, w.role, wp, verdict)
    if w.rescale is not None and spec.shape[w.rescale[0]] != wp.old_shape[w.rescale[0]]:
        axis, power = w.rescale
        wp.scale = float((spec.shape[axis] / wp.old_shape[axis]) ** power)
        # The layer uses offset + value: c * (offset + old) = offset + (c * old + (c - 1) offset)
        wp.shift = float((wp.scale - 1.0) * w.offset)
        wp.operator = rescale_operator(wp, axis, power, w.offset)
    return wp


def rescale_operator(wp: WeightPlan, axis: int, power: float, offset: float) -> str:
    """What a rescaled weight's copied values become, for the report: "values x0.8165
    ((48/32) ** -0.5, axis 0 grew 32 -> 48)", with the offset's shift when it has one."""
    n_old, n_new = wp.old_shape[axis] if wp.old_shape else 0, wp.shape[axis]
    text = (f"values x{wp.scale:.4g} (({n_new}/{n_old}) ** {power:g}, axis {axis} "
            f"{'grew' if n_new > n_old else 'shrank'} {n_old} -> {n_new})")
    if offset:
        text += (f", then {wp.shift:+.4g}: the layer uses {offset:g} + value, so "
                 f"{offset:g} + new = {wp.scale:.4g} * ({offset:g} + old)")
    return text


def _axis_map(
    name: str, role: str, axis: int, na: Any, oa: Any, wp: WeightPlan, space: LabelSpace,
    verdict: Verdict, old_value: Callable[[str], np.ndarray] | None,
) -> AxisMap:
    """The index map of one axis of a matched weight, and what it says about the promise:
    ambiguous labels, and input indices that are gone (features set to 0 are harmless)."""
    n_ids, o_ids = na.labels.ids, oa.labels.ids
    if n_ids is None or o_ids is None:
        raise SurgeryError(f"layer '{name}': weight '{role}' axis {axis} has no labels.")
    distinct = len(np.unique(n_ids)) == len(n_ids)
    # Most axes of a layer that continues an old one hold the old labels as they were.
    same = distinct and (n_ids is o_ids or np.array_equal(n_ids, o_ids))
    amap = AxisMap(na.kind, np.arange(len(n_ids), dtype=np.int64) if same
                   else index_map(o_ids, n_ids), na.zero_new)
    if not distinct:
        verdict.warn(
            f"layer '{name}': weight '{role}' axis {axis} has indices with the same label, so "
            "where each came from is ambiguous; the old outputs may change."
        )
    if na.kind not in INPUT_SIDE_KINDS or same:
        return amap
    lost = np.setdiff1d(o_ids, n_ids)
    unsafe = lost[~space.zero_safe(lost)]
    if not len(unsafe):
        return amap
    if old_value is not None and _all_zero(old_value(wp.old_path), o_ids, unsafe, axis):
        # Values decide, not only labels: what read the gone indices was exactly 0.
        verdict.warn(
            f"layer '{name}': {len(unsafe)} input index(es) of weight '{role}' axis {axis} are "
            f"gone from the new model ({describe_labels(space, unsafe)}); their old weights are "
            "all exactly 0, so the old outputs do not change.", breaks=False
        )
        return amap
    if not np.any(amap.matched):
        wp.zero_fill = False
        verdict.warn(
            f"layer '{name}': none of the old input indices of weight '{role}' axis {axis} "
            "survive, so its new inputs keep fresh weights instead of zeros.", breaks=False
        )
    verdict.warn(
        f"layer '{name}': {len(unsafe)} input index(es) of weight '{role}' axis {axis} are "
        f"gone from the new model ({describe_labels(space, unsafe)}); they were not input "
        "features set to 0, so the old outputs change."
    )
    return amap


def _check_shared_calls(
    rec: LayerRecord, old_rec: LayerRecord, role: str, wp: WeightPlan, verdict: Verdict
) -> None:
    """A shared layer's weight gets one index map; every other call must agree with it."""
    for k, (new_result, old_result) in enumerate(
        zip(rec.later_calls, old_rec.later_calls), start=1
    ):
        new_w = {w.role: w for w in new_result.weights}.get(role)
        old_w = {w.role: w for w in old_result.weights}.get(role)
        if new_w is None or old_w is None:
            continue
        for axis, (na, oa, amap) in enumerate(zip(new_w.axes, old_w.axes, wp.axes or [])):
            if na.labels.ids is None or oa.labels.ids is None:
                continue
            if not np.array_equal(index_map(oa.labels.ids, na.labels.ids), amap.index):
                verdict.warn(
                    f"layer '{rec.node.name}' is shared, and its call {k} moves the indices of "
                    f"weight '{role}' axis {axis} differently from its first call; the first "
                    "call's mapping was used, so the old outputs change."
                )
                return


def _all_zero(old: np.ndarray, o_ids: np.ndarray, gone: np.ndarray, axis: int) -> bool:
    """Whether the old weight is exactly 0 at every index of `axis` labelled one of `gone`."""
    rows = np.nonzero(np.isin(o_ids, gone))[0]
    return bool(len(rows)) and not np.any(np.take(old, rows, axis=axis))


def describe_labels(space: LabelSpace, ids: np.ndarray, limit: int = 3) -> str:
    """The first `limit` labels of `ids`, described for a message."""
    shown = ", ".join(space.describe(i) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def _check_outputs(old: GraphLabels, new: GraphLabels, verdict: Verdict) -> None:
    """Every old output must still be computed, on at least all of its old labels."""
    identity_of = {rec.identity: name for name, rec in new.records.items()}
    identity_of.update({ident: name for name, ident in new.input_identity.items()})
    new_refs = set(new.graph.outputs)
    kept = 0
    for ref in old.graph.outputs:
        new_name = identity_of.get(ref[0])
        new_ref = (new_name, ref[1], ref[2]) if new_name is not None else None
        if new_ref is None or new_ref not in new_refs:
            verdict.warn(f"old output '{ref[0]}' is not an output of the new model.",
                         breaks=False)
            continue
        kept += 1
        _check_output_labels(new_name, old.tensors.get(ref), new.tensors.get(new_ref),
                             new.space, verdict)
    if old.graph.outputs and not kept:
        # A dropped head leaves the other outputs' promise intact; with every head gone there
        # is nothing left that could be preserved.
        verdict.warn("no output of the old model is an output of the new model, so none of "
                     "the old outputs is preserved.")


def _check_output_labels(
    name: str, old_x: tuple[AxisLabels, ...] | None, new_x: tuple[AxisLabels, ...] | None,
    space: LabelSpace, verdict: Verdict,
) -> None:
    if old_x is None or new_x is None:
        return
    for axis, (oa, na) in enumerate(zip(old_x, new_x)):
        if oa.ids is None or na.ids is None:
            continue
        lost = np.setdiff1d(oa.ids, na.ids)
        if len(lost):
            verdict.warn(
                f"output '{name}' lost {len(lost)} of its old indices on axis {axis} "
                f"({describe_labels(space, lost)}); those old outputs are gone."
            )
