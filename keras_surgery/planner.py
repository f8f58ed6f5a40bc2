"""The planner: two labelled graphs in, a SurgeryPlan out, weight by weight and axis by axis.

Planning is a sequence of small steps over the new model's layers; each step that finds
something bearing on the promise (a changed setting, a mixing axis that changed, an input
index gone) records it in one `Verdict`, which decides `preserves_function` at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.fill import fill_rule, regions_of
from keras_surgery.graph import WeightSpec
from keras_surgery.growth import Growth
from keras_surgery.labels import AxisLabels, LabelSpace
from keras_surgery.match import index_map
from keras_surgery.net2net import Splits, split_units
from keras_surgery.plan import POLICIES, PRESERVING_POLICIES, AxisMap, SurgeryPlan, WeightPlan
from keras_surgery.propagate import GraphLabels, LayerRecord
from keras_surgery.rules.api import WeightLabels
from keras_surgery.settings import changed_settings_warning

INPUT_SIDE_KINDS = ("in", "struct", "lookup")


@dataclass
class Verdict:
    """What planning found that the report must say, in order, and whether the new model can
    still compute the old function."""

    warnings: list[str] = field(default_factory=list)
    breaks: bool = False

    def warn(self, text: str, *, breaks: bool = True) -> None:
        """Records a warning; `breaks`: what it names changes the old outputs."""
        self.warnings.append(text)
        self.breaks = self.breaks or breaks

    def unique_warnings(self) -> list[str]:
        return list(dict.fromkeys(self.warnings))


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
    zero_growths: list[ZeroGrowth] = []

    for name, rec in new.records.items():
        old_rec = old.records.get(rec.identity)
        if old_rec is None or old_rec.node.class_name != rec.node.class_name:
            if rec.node.weights or rec.node.group:
                new_layers.append(name)
            weights.extend(_new_layer_weights(name, rec, policy))
            continue
        matches[name] = old_rec.node.name
        setting = changed_settings_warning(name, rec.node, old_rec.node)
        if setting is not None:
            verdict.warn(setting)
        zero_growths += _check_mixing(name, rec, old_rec, verdict)
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

    tied = tied_duplications(new, weights) if policy == "duplicate" else []
    splits = _split(old, new, splittable, policy, verdict)
    if tied:
        scale_tied_readers(tied, weights, policy)
    duplicated = [g for g in zero_growths if g.by_duplication]
    zero_growths = [g for g in zero_growths if not g.by_duplication]
    if duplicated:
        accept_duplicate_growths(duplicated, splits, verdict)
    if zero_growths:
        accept_zero_growths(zero_growths, new, weights, policy, verdict)
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
    name: str, rec: LayerRecord, old_rec: LayerRecord, verdict: Verdict
) -> list[ZeroGrowth]:
    """Mixing axes (a LayerNorm's, a softmax's) must keep their labels, or the old outputs
    change. A growth of an axis that may grow by zeros (an RMS norm's) is returned instead,
    for `accept_zero_growths` to decide once every weight is planned."""
    pending: list[ZeroGrowth] = []
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
            by_duplication = bool(single and new_mix.grows_by_duplication)
            if single and (new_mix.grows_with_zeros or by_duplication):
                pending.append(ZeroGrowth(name, rec.node.class_name, new_mix.reason,
                                          len(old_axis.ids), np.setdiff1d(new_axis.ids,
                                                                          old_axis.ids),
                                          by_duplication, old_axis.ids, changed))
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
    amap = AxisMap(na.kind, index_map(o_ids, n_ids), na.zero_new)
    if len(np.unique(n_ids)) < len(n_ids):
        verdict.warn(
            f"layer '{name}': weight '{role}' axis {axis} has indices with the same label, so "
            "where each came from is ambiguous; the old outputs may change."
        )
    if na.kind not in INPUT_SIDE_KINDS:
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


# -- growth by zeros through a normaliser (issue 20) ---------------------------------------------


@dataclass
class ZeroGrowth:
    """A mixing axis that gained indices and may grow by zeros (an RMS norm's): the layer,
    the mixing's reason, the old length and the gained labels."""

    layer: str
    class_name: str
    reason: str
    old_length: int
    gained: np.ndarray
    # A mixing whose axis may instead grow by duplicating every index k times (a
    # LayerNormalization's: `accept_duplicate_growths`), with its old labels and the warning
    # to give when it does not.
    by_duplication: bool = False
    old_ids: np.ndarray | None = None
    changed: str = ""

    def describe(self) -> str:
        return f"layer '{self.layer}' ({self.class_name}): {self.reason}"


def _writers(new: GraphLabels) -> dict[int, list[tuple[str, int, int]]]:
    """For each label on an output-side ("out") weight axis: (weight path, axis, index) of
    every entry that writes it."""
    found: dict[int, list[tuple[str, int, int]]] = {}
    for rec in new.records.values():
        for w, spec in zip(rec.result.weights, rec.node.weights):
            for a, axis in enumerate(w.axes):
                if axis.kind != "out" or axis.labels.ids is None:
                    continue
                for i, label in enumerate(axis.labels.ids.tolist()):
                    found.setdefault(label, []).append((spec.path, a, i))
    return found


def _members(space: LabelSpace, label: int, zero_through: set[str]) -> list[int]:
    """The labels whose values make up `label`: a sum's members, and through a layer that
    keeps zeros (an RMS norm's derived output, `Mixing.zero_through`) what it derives from."""
    key = space.key(label)
    if isinstance(key, tuple) and key and key[0] == "set":
        return [m for member in sorted(key[1]) for m in _members(space, member, zero_through)]
    if isinstance(key, tuple) and len(key) == 3 and key[0] == "via" and key[1] in zero_through:
        return _members(space, int(key[2]), zero_through)
    return [label]


def _axis_states(wp: WeightPlan, axis: int, policy: str) -> np.ndarray:
    """Per index of `axis`, whether the slice of `wp` there starts at 0: "zero", "zeroable" (a
    new index the fill zeroes once the axis is marked `zero_new`) or "nonzero"."""
    n = wp.shape[axis]
    if wp.init is not None:
        zero_init = wp.init.kind == "constant" and wp.init.value == 0.0
        return np.full(n, "zero" if zero_init else "nonzero", dtype=object)
    if wp.axes is None:
        return np.full(n, "nonzero", dtype=object)
    amap = wp.axes[axis]
    copy, zero = regions_of(wp, policy).masks(wp.shape)
    others_zero = all(z.all() for b, z in enumerate(zero) if b != axis)
    states = np.full(n, "zeroable" if fill_rule(wp, policy) == "preserve" else "nonzero",
                     dtype=object)
    states[zero[axis] & ~copy[axis] & others_zero] = "zero"
    states[(amap.old_index >= 0) | amap.mean_new] = "nonzero"
    return states


def _zero_writers(
    growth: ZeroGrowth, space: LabelSpace, writers: dict[int, list[tuple[str, int, int]]],
    by_path: dict[str, WeightPlan], policy: str, zero_through: set[str],
) -> tuple[list[tuple[WeightPlan, int]], str | None]:
    """The writer axes to mark `zero_new` so that every gained index starts at 0, or why it
    cannot (a label nothing writes, or an entry that cannot be 0)."""
    members = dict.fromkeys(m for label in growth.gained.tolist()
                            for m in _members(space, label, zero_through))
    states: dict[tuple[str, int], np.ndarray] = {}
    to_zero: dict[tuple[str, int], tuple[WeightPlan, int]] = {}
    for member in members:
        entries = writers.get(member)
        if not entries:
            return [], (f"new index {space.describe(member)} is not written by a weight "
                        "(it may not be 0)")
        for path, axis, i in entries:
            wp = by_path.get(path)
            if wp is not None and (path, axis) not in states:
                states[(path, axis)] = _axis_states(wp, axis, policy)
            state = "nonzero" if wp is None else states[(path, axis)][i]
            if state == "nonzero":
                return [], (f"weight '{path}' writes new index {space.describe(member)} "
                            "with values that are not 0")
            if state == "zeroable":
                to_zero[(path, axis)] = (wp, axis)  # type: ignore[assignment]
    return list(to_zero.values()), None


def accept_zero_growths(
    growths: list[ZeroGrowth], new: GraphLabels, weights: list[WeightPlan], policy: str,
    verdict: Verdict,
) -> None:
    """Decides each growth of an axis that may grow by zeros: when every weight that writes a
    new index can start it at 0, those weights' new output indices are zeroed (the residual
    stream's new dims: embedding columns, attention and MLP output projections) and the growth
    keeps the old outputs, the normaliser's gain being rescaled by its rule; otherwise the
    report says which writer breaks it. Growths are accepted one by one: a refused one leaves
    the weights as the fill rule has them."""
    writers = _writers(new)
    by_path = {wp.path: wp for wp in weights}
    zero_through = {m.zero_through for rec in new.records.values() for m in rec.result.mixing
                    if m.zero_through}
    known_zero: set[int] = set()
    for growth in growths:
        to_zero, why = _zero_writers(growth, new.space, writers, by_path, policy, zero_through)
        n_new = growth.old_length + len(growth.gained)
        if why is not None:
            verdict.warn(f"{growth.describe()}; that axis grew {growth.old_length} -> {n_new}, "
                         f"and {why}, so the old outputs cannot be preserved.")
            continue
        for wp, axis in to_zero:
            assert wp.axes is not None
            wp.axes[axis].zero_new = True
            wp.count(policy)
            wp.operator = wp.operator or f"new indices of axis {axis} start at 0"
        known_zero.update(m for g in growth.gained.tolist()
                          for m in [g, *_members(new.space, g, zero_through)])
        c = (growth.old_length / n_new) ** 0.5
        verdict.warn(
            f"{growth.describe()}; that axis grew {growth.old_length} -> {n_new} with the new "
            f"indices at 0 in every weight that writes them, so its gain is multiplied by "
            f"sqrt({growth.old_length}/{n_new}) = {c:.4f} and the old outputs are kept (up to "
            f"epsilon, which now acts as epsilon * {n_new}/{growth.old_length}).", breaks=False)
    if known_zero:
        _fresh_readers(known_zero, new, by_path, policy, zero_through)


def _fresh_readers(
    known_zero: set[int], new: GraphLabels, by_path: dict[str, WeightPlan], policy: str,
    zero_through: set[str],
) -> None:
    """Weights whose every new input index reads a dim that starts at 0 keep fresh values
    there instead of zeros (`zero_fill=False`): the old outputs cannot see them, and with the
    writers of those dims at 0 too, zeros on both sides would leave the new dims with a zero
    gradient forever. A weight with a `zero_new` axis keeps the fill rule's zeros."""
    for rec in new.records.values():
        for w, spec in zip(rec.result.weights, rec.node.weights):
            wp = by_path.get(spec.path)
            if wp is None or wp.axes is None or wp.init is not None or any(
                    a.zero_new for a in wp.axes) or fill_rule(wp, policy) != "preserve":
                continue
            new_inputs = [
                int(label) for axis, amap in zip(w.axes, wp.axes)
                if axis.kind in INPUT_SIDE_KINDS and axis.labels.ids is not None
                for label in axis.labels.ids[amap.index < 0]]
            if new_inputs and all(
                    label in known_zero
                    or set(_members(new.space, label, zero_through)) <= known_zero
                    for label in new_inputs):
                wp.zero_fill = False
                wp.count(policy)
                wp.operator = wp.operator or ("new input indices keep fresh values: they read "
                                              "dims that start at 0, so they can learn")


# -- growth by duplication through a LayerNormalization (issue 20, policy "duplicate") -----------

SPLIT_POLICIES = ("net2net", "duplicate")


def _split(
    old: GraphLabels, new: GraphLabels, splittable: list, policy: str, verdict: Verdict
) -> Splits | None:
    """Policies "net2net" and "duplicate": new units split off old ones (`split_units`); the
    roles that "duplicate" cannot grow by an integer factor are named in the report."""
    if policy not in SPLIT_POLICIES:
        return None
    splits = split_units(old, new, splittable, duplicate=policy == "duplicate")
    for wp, _, _ in splittable:
        wp.count(policy)
    for line in splits.refused:
        verdict.warn(line, breaks=False)  # a mixing axis it reaches says if the promise breaks
    return splits


def duplication_factor(growth: ZeroGrowth, splits: Splits | None) -> tuple[int, str | None]:
    """The factor k by which every old index of a growing mixing axis is duplicated, or why
    the growth is not a duplication (a new index copying nothing, old indices copied unequally
    often: a growth by a factor that is not an integer).

    Args:
        growth: the mixing axis's growth.
        splits: what policy "duplicate" split (None under another policy).

    Returns:
        (k, None) when the new axis holds every old index exactly k times, else (0, why).

    Example:
        >>> duplication_factor(growth, splits)                            # doctest: +SKIP
        (2, None)
    """
    assert growth.old_ids is not None
    if splits is None:
        return 0, None
    n_new = growth.old_length + len(growth.gained)
    if n_new % growth.old_length:
        return 0, (f"{n_new} is not a multiple of {growth.old_length}, and only an integer "
                   "factor keeps the mean and variance (policy 'duplicate')")
    copies = np.array([splits.resolve(int(label)) for label in growth.gained.tolist()])
    if (copies < 0).any():
        return 0, f"{int((copies < 0).sum())} new indices copy no old index"
    labels, counts = np.unique(np.concatenate([growth.old_ids, copies]), return_counts=True)
    k = n_new // growth.old_length
    if len(labels) != growth.old_length or (counts != k).any():
        return 0, f"the old indices are not each copied {k} times"
    return k, None


def accept_duplicate_growths(
    growths: list[ZeroGrowth], splits: Splits | None, verdict: Verdict
) -> None:
    """Decides each growth of a mixing axis that may grow by duplication (a LayerNorm's):
    when the new axis holds every old index exactly k times (policy "duplicate"), the mean
    and variance over it are the old ones, each copy normalises to the old value and its
    duplicated gamma and beta give the old output, so the growth keeps the old outputs;
    otherwise the report gives the mixing's warning, and why it is not a duplication."""
    for growth in growths:
        k, why = duplication_factor(growth, splits)
        n_new = growth.old_length + len(growth.gained)
        if k:
            verdict.warn(
                f"{growth.describe()}; that axis grew {growth.old_length} -> {n_new} by "
                f"duplicating every index {k} times, so its mean and variance are unchanged "
                "and the old outputs are kept.", breaks=False)
        else:
            verdict.warn(growth.changed if why is None else
                         f"{growth.changed[:-1]}: duplication is not exact there: {why}.")


@dataclass
class TiedDuplication:
    """A table whose output-side axis a later call reads back (tied logits, `hidden @ E^T`),
    and the LayerNormalization that computes what it reads: duplicating the table's columns
    makes that later call sum k copies, which dividing the norm's gamma and beta by k undoes."""

    table: WeightPlan
    axis: int
    norm: str  # the new layer name of the norm


def _norm_reading(new: GraphLabels, labels: AxisLabels) -> str | None:
    """The LayerNormalization (with gamma and beta) whose derived outputs are `labels`."""
    if labels.ids is None or not len(labels.ids):
        return None
    keys = [new.space.key(int(i)) for i in labels.ids]
    if not all(isinstance(k, tuple) and len(k) == 3 and k[0] == "via" for k in keys):
        return None
    identities = {k[1] for k in keys}
    names = [name for name, rec in new.records.items() if rec.identity in identities]
    if len(identities) != 1 or len(names) != 1:
        return None
    rec = new.records[names[0]]
    roles = {w.role for w in rec.result.weights}
    return names[0] if rec.node.class_name == "LayerNormalization" and roles == {
        "gamma", "beta"} else None


def tied_duplications(new: GraphLabels, weights: list[WeightPlan]) -> list[TiedDuplication]:
    """Policy "duplicate": the tables a later call reads back through a LayerNormalization
    (GPT-2's tied logits). Their output-side axis is released from `zero_new` (the rule zeroes
    new columns so that they cannot reach the tied logits) so that `split_units` duplicates
    it; `scale_tied_readers` then divides the norm's gamma and beta by k.

    Args:
        new: the new model's labels.
        weights: the planned weights.

    Returns:
        One `TiedDuplication` per released axis.

    Example:
        >>> tied = tied_duplications(new_labels, weights)                 # doctest: +SKIP
        >>> [(t.table.layer, t.norm) for t in tied]                       # doctest: +SKIP
        [('backbone/token_embedding', 'backbone/layer_norm')]
    """
    by_path = {wp.path: wp for wp in weights}
    found: list[TiedDuplication] = []
    for rec in new.records.values():
        for later in rec.later_calls:
            second_of = {w.role: w for w in later.weights}
            for first, spec in zip(rec.result.weights, rec.node.weights):
                wp, second = by_path.get(spec.path), second_of.get(first.role)
                if wp is None or wp.axes is None or second is None:
                    continue
                for a, (fa, sa) in enumerate(zip(first.axes, second.axes)):
                    norm = _norm_reading(new, sa.labels) if fa.kind == "out" and sa.kind == (
                        "in") and wp.axes[a].zero_new else None
                    if norm is not None:
                        wp.axes[a].zero_new = False
                        found.append(TiedDuplication(wp, a, norm))
    return found


def scale_tied_readers(
    tied: list[TiedDuplication], weights: list[WeightPlan], policy: str
) -> None:
    """After `split_units`: each table whose axis was duplicated k times has its norm's gamma
    and beta divided by k (the tied logits sum k copies of [y, y] / k: the old logits); a table
    that was not duplicated gets its zeroed new columns back."""
    for t in tied:
        amap = t.table.axes[t.axis] if t.table.axes else None
        if amap is None:
            continue
        norm = [wp for wp in weights if wp.layer == t.norm and wp.axes is not None
                and any(a.source is not None for a in wp.axes)]
        if amap.source is None or len(norm) != 2 or not t.table.old_shape:
            amap.source, amap.zero_new = None, True  # back to the rule's zero columns
            t.table.operator = ""
            t.table.count(policy)
            continue
        k = len(amap.index) / t.table.old_shape[t.axis]
        for wp in norm:  # gamma and beta
            wp.scale /= k
            wp.operator = (f"{wp.operator}; values x1/{k:g}: they feed the tied "
                           f"'{t.table.layer}' read back over {k:g} copies of each column")
            wp.count(policy)
