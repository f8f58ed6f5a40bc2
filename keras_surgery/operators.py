"""Function-preserving growth operators the planner applies once every weight is planned
(issue 20): growth by zeros through an RMS norm (`accept_zero_growths`), growth by duplication
through a LayerNormalization or an RMS norm (`accept_duplicate_growths`, policy "duplicate"),
tables read back through a norm (tied logits, `tied_duplications`), and scalar constants of the
graph that changed with a size (Gemma's `embeddings * sqrt(hidden_dim)`,
`compensate_constants`).

Each operator either keeps the old outputs, saying so in the report with the factor it used,
or records in the `Verdict` why the growth is not exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_surgery.fill import fill_rule, regions_of
from keras_surgery.labels import AxisLabels, LabelSpace
from keras_surgery.net2net import Splits, duplication_operator, split_units
from keras_surgery.plan import WeightPlan
from keras_surgery.propagate import GraphLabels

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
        """The warnings in order, each once."""
        return list(dict.fromkeys(self.warnings))


# -- growth by zeros through a normaliser (issue 20) ---------------------------------------------


@dataclass
class MixingGrowth:
    """A mixing axis that gained indices and may still keep the old outputs, by zeros (an RMS
    norm's) or by duplication (a LayerNorm's; an RMS norm's under policy "duplicate"): the
    layer, the mixing's reason, the old length and the gained labels."""

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
    # The layer's gain was rescaled for a growth by zeros (an RMS norm's,
    # `WeightLabels.rescale`): a growth by duplication keeps the mean of squares, so the
    # rescale is taken back when the duplication is accepted.
    rescaled: bool = False

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
    growth: MixingGrowth, space: LabelSpace, writers: dict[int, list[tuple[str, int, int]]],
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
    growths: list[MixingGrowth], new: GraphLabels, weights: list[WeightPlan], policy: str,
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
    zero_through = zero_keeping(new)
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


def split(
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


def duplication_factor(growth: MixingGrowth, splits: Splits | None) -> tuple[int, str | None]:
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
    growths: list[MixingGrowth], splits: Splits | None, new: GraphLabels,
    weights: list[WeightPlan], verdict: Verdict,
) -> list[MixingGrowth]:
    """Decides each growth of a mixing axis that may grow by duplication (a LayerNorm's; an
    RMS norm's under policy "duplicate"): when the new axis holds every old index exactly k
    times, the mean and variance (or the mean of squares) over it are the old ones, each copy
    normalises to the old value and its duplicated gain (and bias) give the old output, so
    the growth keeps the old outputs (an RMS norm's gain then keeps its old values: the
    rescale its rule declares for a growth by zeros is taken back); otherwise the report
    gives the mixing's warning, and why it is not a duplication.

    Returns:
        The growths that are not duplications but may still grow by zeros (an RMS norm's
        under a factor that is not a whole number), for `accept_zero_growths`.
    """
    by_zeros: list[MixingGrowth] = []
    for growth in growths:
        k, why = duplication_factor(growth, splits)
        n_new = growth.old_length + len(growth.gained)
        if not k and growth.rescaled:
            verdict.warn(f"{growth.describe()}; that axis grew {growth.old_length} -> {n_new}, "
                         f"which is not a duplication ({why or 'nothing was split'}), so it "
                         "may only grow by zeros.", breaks=False)
            by_zeros.append(growth)
            continue
        if k:
            if growth.rescaled:
                _unscale_gains(growth, new, {wp.path: wp for wp in weights})
            stats = "mean of squares is" if growth.rescaled else "mean and variance are"
            verdict.warn(
                f"{growth.describe()}; that axis grew {growth.old_length} -> {n_new} by "
                f"duplicating every index {k} times, so its {stats} unchanged and the old "
                "outputs are kept.", breaks=False)
        else:
            verdict.warn(growth.changed if why is None else
                         f"{growth.changed[:-1]}: duplication is not exact there: {why}.")
    return by_zeros


def _unscale_gains(growth: MixingGrowth, new: GraphLabels, by_path: dict[str, WeightPlan]) -> None:
    """Takes back the growth-by-zeros rescale (`WeightLabels.rescale`) of the gains over the
    grown axis of `growth`'s layer (only those: a decoder layer's other weights keep theirs)."""
    rec = new.records[growth.layer]
    for w, spec in zip(rec.result.weights, rec.node.weights):
        wp = by_path.get(spec.path)
        if wp is None or w.rescale is None or not all(a.kind == "diag" for a in w.axes) or not (
                any(a.labels.ids is not None and np.isin(a.labels.ids, growth.gained).any()
                    for a in w.axes)):
            continue
        wp.scale, wp.shift = 1.0, 0.0
        wp.operator = duplication_operator(wp) if wp.axes else ""


@dataclass
class TiedDuplication:
    """A table whose output-side axis a later call reads back (tied logits, `hidden @ E^T`),
    and the norm that computes what it reads: duplicating the table's columns makes that later
    call sum k copies, which dividing the norm's gain (and bias) by k undoes."""

    table: WeightPlan
    axis: int
    norm: str  # the new layer name of the norm


def tied_norm(new: GraphLabels, table_layer: str, call: int, labels: AxisLabels) -> str | None:
    """The norm whose output call `call` of `table_layer` reads back (tied logits), when
    scaling the norm's gain (and bias) scales exactly what that call reads: a LayerNormalization
    or an RMS norm with a gain (`_scales_linearly`) whose derived outputs are `labels`, whose
    output is that call's input itself (nothing between them, such as an activation) and is
    read by nothing else (another reader, or a model output, would see the scaled values).

    Args:
        new: the new model's labels.
        table_layer: the layer of the table (its new name).
        call: the index of the later call among the layer's calls (1 for the second).
        labels: the labels the later call reads on the table's hidden axis.

    Returns:
        The norm's layer name, or None.
    """
    norm = _norm_reading(new, labels)
    calls = new.graph.layers[table_layer].calls
    refs = calls[call].inputs if call < len(calls) else []
    if norm is None or not refs or tuple(refs[0])[0] != norm:
        return None
    return norm if consumers(new, tuple(refs[0])) == 1 else None


def _norm_reading(new: GraphLabels, labels: AxisLabels) -> str | None:
    """The norm whose derived outputs are `labels`, when scaling its gain (and bias) scales
    them: a LayerNormalization or an RMS norm with a gain (see `_scales_linearly`)."""
    if labels.ids is None or not len(labels.ids):
        return None
    keys = [new.space.key(int(i)) for i in labels.ids]
    if not all(isinstance(k, tuple) and len(k) == 3 and k[0] == "via" for k in keys):
        return None
    identities = {k[1] for k in keys}
    names = [name for name, rec in new.records.items() if rec.identity in identities]
    if len(identities) != 1 or len(names) != 1:
        return None
    return names[0] if _scales_linearly(new.records[names[0]]) else None


GAIN_ROLES = ("gamma", "scale")


def _scales_linearly(rec: Any) -> bool:
    """A normaliser (its axis may grow by zeros or by duplication) whose weights are all
    per-index ("diag") and include a gain: multiplying `offset + gain` and the bias by m
    multiplies its output by m."""
    weights = rec.result.weights
    return bool(weights) and any(
        m.grows_with_zeros or m.grows_by_duplication for m in rec.result.mixing) and all(
        all(a.kind == "diag" for a in w.axes) for w in weights) and any(
        w.role in GAIN_ROLES for w in weights)


def scale_affine(wp: WeightPlan, m: float, offset: float) -> None:
    """Multiplies what a weight's copied values compute by `m`, composing with its rescale so
    far: the layer uses `offset + value` (Gemma's 1 + scale), so `offset + new = m * scale *
    (offset + old)`, that is new = scale' * old + (scale' - 1) * offset with scale' = m * scale.
    """
    wp.scale *= m
    wp.shift = (wp.scale - 1.0) * offset if offset else 0.0


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
    for name, rec in new.records.items():
        for k, later in enumerate(rec.later_calls, start=1):
            second_of = {w.role: w for w in later.weights}
            for first, spec in zip(rec.result.weights, rec.node.weights):
                wp, second = by_path.get(spec.path), second_of.get(first.role)
                if wp is None or wp.axes is None or second is None:
                    continue
                for a, (fa, sa) in enumerate(zip(first.axes, second.axes)):
                    norm = tied_norm(new, name, k, sa.labels) if fa.kind == "out" and (
                        sa.kind == "in") and wp.axes[a].zero_new else None
                    if norm is not None:
                        wp.axes[a].zero_new = False
                        found.append(TiedDuplication(wp, a, norm))
    return found


def scale_tied_readers(
    tied: list[TiedDuplication], new: GraphLabels, weights: list[WeightPlan], policy: str
) -> None:
    """After `split_units`: each table whose axis was duplicated k times has its norm's gain
    and bias divided by k (the tied logits sum k copies of [y, y] / k: the old logits); a table
    that was not duplicated gets its zeroed new columns back."""
    for t in tied:
        amap = t.table.axes[t.axis] if t.table.axes else None
        if amap is None:
            continue
        norm = [wp for wp in weights if wp.layer == t.norm and wp.axes is not None
                and any(a.source is not None for a in wp.axes)]
        if amap.source is None or not norm or not t.table.old_shape:
            amap.source, amap.zero_new = None, True  # back to the rule's zero columns
            t.table.operator = ""
            t.table.count(policy)
            continue
        k = len(amap.index) / t.table.old_shape[t.axis]
        scale_norm(norm, new, 1.0 / k, f"values x1/{k:g}: they feed the tied "
                   f"'{t.table.layer}' read back over {k:g} copies of each column")
        for wp in norm:
            wp.count(policy)


def scale_norm(norm: list[WeightPlan], new: GraphLabels, m: float, why: str) -> None:
    """Multiplies what a norm's weights (`norm`: its gain and bias, all of one layer) compute
    by `m`, each with the constant its layer adds to it (`WeightLabels.offset`), and says why
    in their operator."""
    if not norm:
        return
    offsets = {w.role: w.offset for w in new.records[norm[0].layer].result.weights}
    for wp in norm:
        scale_affine(wp, m, offsets.get(wp.role, 0.0))
        wp.operator = "; ".join(t for t in (wp.operator, why) if t)


def zero_keeping(new: GraphLabels) -> set[str]:
    """The identities of the layers whose derived outputs are 0 wherever their inputs are: RMS
    norms (`Mixing.zero_through`) and multiplications by a constant (`RuleResult.scales_by`)."""
    found = {m.zero_through for rec in new.records.values() for m in rec.result.mixing
             if m.zero_through}
    return found | {rec.identity for rec in new.records.values()
                    if rec.result.scales_by is not None}


# -- constants of the graph that changed with a size ---------------------------------------------


def compensate_constants(
    old: GraphLabels, new: GraphLabels, weights: list[WeightPlan], verdict: Verdict
) -> None:
    """A matched layer that multiplies by a constant of the graph (`RuleResult.scales_by`) that
    changed (Gemma's backbone: `embeddings * sqrt(hidden_dim)`, a constant that grows with
    hidden_dim) changes the old outputs by c_new / c_old, unless what it multiplies can take
    the ratio back: when its input is a lookup table's output read by nothing else, the
    table's copied values are multiplied by r = c_old / c_new; a later call that reads the
    table back (tied logits) through a norm then gets that norm's gain divided by r. The
    report says which, or why the change stays.

    Args:
        old: the old model's labels.
        new: the new model's labels.
        weights: the planned weights (their `scale` and `shift` are composed with).
        verdict: where the finding is recorded.
    """
    for name, rec in new.records.items():
        old_rec = old.records.get(rec.identity)
        c_new = rec.result.scales_by
        c_old = None if old_rec is None else old_rec.result.scales_by
        if c_new is None or c_old is None or c_old == c_new:
            continue
        what = (f"layer '{name}' ({rec.node.class_name}) multiplies by the constant "
                f"{c_new:.6g} where the old model multiplied by {c_old:.6g}")
        r = c_old / c_new  # both non-zero and finite (`rules.elementwise.scalar_factor`)
        why = _compensate(name, rec, r, new, {wp.path: wp for wp in weights})
        if why is not None:
            verdict.warn(f"{what}; {why}, so the old outputs change.")
        else:
            verdict.warn(f"{what}; the values of the table it multiplies are multiplied by "
                         f"{c_old:.6g}/{c_new:.6g} = {r:.4g} instead, so the old outputs are "
                         "kept.", breaks=False)


def consumers(new: GraphLabels, ref: tuple) -> int:
    """How many calls of the new graph read tensor `ref`, and how many model outputs it is."""
    found = sum(1 for node in new.graph.layers.values() for call in node.calls
                for r in call.inputs if tuple(r) == tuple(ref))
    return found + sum(1 for r in new.graph.outputs if tuple(r) == tuple(ref))


def _compensate(
    name: str, rec: Any, r: float, new: GraphLabels, by_path: dict[str, WeightPlan]
) -> str | None:
    """Multiplies the table behind the constant multiplication `name` by `r` (and the norm of
    each later call that reads the table back by 1 / r), or says why it cannot."""
    refs = rec.node.calls[0].inputs if rec.node.calls else []
    if len(refs) != 1:
        return "its input is not a single tensor"
    ref = tuple(refs[0])
    producer = new.records.get(ref[0])
    tables = [] if producer is None or ref[1] != 0 else [
        (w, by_path.get(spec.path)) for w, spec in zip(producer.result.weights,
                                                       producer.node.weights)
        if any(a.kind == "out" for a in w.axes) and any(a.kind == "lookup" for a in w.axes)]
    if len(tables) != 1:
        return "what it multiplies is not the output of an embedding lookup"
    if consumers(new, ref) != 1:
        return f"the output of '{ref[0]}' is also read elsewhere"
    if tables[0][1] is None or tables[0][1].axes is None:
        return f"'{ref[0]}' has no table copied from the old model"
    role, table = tables[0][0].role, tables[0][1]
    readers = []
    for k, later in enumerate(producer.later_calls, start=1):
        w = {x.role: x for x in later.weights}.get(role)
        if w is None:
            continue  # a later call that does not read the table (untied reverse embeddings)
        hidden = [a for a in w.axes if a.kind == "in"]
        norm = tied_norm(new, ref[0], k, hidden[0].labels) if len(hidden) == 1 else None
        if norm is None:
            return (f"call {k} of '{ref[0]}' reads the table too, and what it reads is not "
                    "the output of a norm, read by nothing else, whose gain could take the "
                    "ratio back")
        readers.append(norm)
    table.scale *= r
    table.operator = "; ".join(t for t in (table.operator, (
        f"values x{r:.4g}: layer '{name}' multiplies them by a constant that changed")) if t)
    for norm in dict.fromkeys(readers):
        scale_norm([wp for wp in by_path.values() if wp.layer == norm and wp.axes is not None],
                   new, 1.0 / r, f"values x1/{r:.4g}: they feed '{ref[0]}' read back, whose "
                   f"table was multiplied by {r:.4g} for layer '{name}'")
    return None


def grow(
    old: GraphLabels, new: GraphLabels, weights: list[WeightPlan], splittable: list,
    growths: list[MixingGrowth], policy: str, verdict: Verdict,
) -> None:
    """Applies the growth operators once every weight is planned, each composing its rescale
    with the ones before it: units split (policies "net2net", "duplicate"), growths by
    duplication decided (an accepted RMS norm's gain rescale taken back), tied tables' norms
    divided by their duplication factor, changed constants compensated, and growths by zeros
    decided last (they zero the writers that are still fresh).

    Args:
        old: the old model's labels.
        new: the new model's labels.
        weights: every planned weight, changed in place.
        splittable: (WeightPlan, new WeightLabels, old WeightLabels) of the matched weights.
        growths: the mixing axes that grew and may grow exactly (`planner._check_mixing`).
        policy: the migration's policy.
        verdict: where the findings are recorded.
    """
    tied = tied_duplications(new, weights) if policy == "duplicate" else []
    splits = split(old, new, splittable, policy, verdict)
    duplicated = [g for g in growths if g.by_duplication]
    zero = [g for g in growths if not g.by_duplication]
    if duplicated:
        zero += accept_duplicate_growths(duplicated, splits, new, weights, verdict)
    if tied:
        scale_tied_readers(tied, new, weights, policy)
    compensate_constants(old, new, weights, verdict)
    if zero:
        accept_zero_growths(zero, new, weights, policy, verdict)
