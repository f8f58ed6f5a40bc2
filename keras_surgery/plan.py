"""Matching layers and labels of two models, and the SurgeryPlan that results (pure data)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.features import FeatureSpec
from keras_surgery.graph import InputSpec, LayerNode, ModelGraph, is_auto_name
from keras_surgery.growth import Growth, plan_starts
from keras_surgery.labels import LabelSpace, TensorLabels, gc_paused
from keras_surgery.net2net import split_units
from keras_surgery.optimizer import OptimizerLayout, file_layout, live_layout
from keras_surgery.propagate import GraphLabels, LayerRecord, propagate
from keras_surgery.rules.api import Init, WeightLabels

if TYPE_CHECKING:
    from keras_surgery.report import SurgeryReport

logger = logging.getLogger("keras_surgery")

POLICIES = ("preserve", "random", "net2net")
# Policies that promise the old function: "net2net" fills like "preserve", except that new
# units start as copies of old ones (see `keras_surgery.net2net`).
PRESERVING_POLICIES = ("preserve", "net2net")
OUT_KINDS = ("out", "diag")


@dataclass
class AxisMap:
    """For each index of a new weight axis, the old index it continues, or -1.

    Policy "net2net" adds `source`: for a new index (-1 in `index`), the old index whose values
    it copies (a split unit), else -1; and `share`: per index, the factor copied values are
    multiplied by (on an input-side axis, each copy of a split unit gets a share of the unit's
    outgoing weights, the shares of one unit summing to 1).
    """

    kind: str
    index: np.ndarray
    zero_new: bool = False
    source: np.ndarray | None = None
    share: np.ndarray | None = None

    @property
    def old_index(self) -> np.ndarray:
        """For each new index, the old index its values come from (continued or split), or -1."""
        if self.source is None:
            return self.index
        return np.where(self.index >= 0, self.index, self.source)

    @property
    def matched(self) -> np.ndarray:
        return self.old_index >= 0

    def without_splits(self) -> AxisMap:
        """This map as policy "preserve" sees it: only continued indices."""
        return AxisMap(self.kind, self.index, self.zero_new)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "index": self.index.tolist(),
                                "zero_new": self.zero_new}
        if self.source is not None:
            data["source"] = self.source.tolist()
        if self.share is not None:
            data["share"] = self.share.tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AxisMap:
        source, share = data.get("source"), data.get("share")
        return cls(
            data["kind"],
            np.asarray(data["index"], dtype=np.int64),
            bool(data.get("zero_new", False)),
            None if source is None else np.asarray(source, dtype=np.int64),
            None if share is None else np.asarray(share, dtype=np.float64),
        )


@dataclass
class WeightPlan:
    """How one variable of the new model gets its value."""

    layer: str
    role: str
    path: str
    shape: tuple[int, ...]
    old_layer: str | None = None
    old_path: str | None = None
    old_shape: tuple[int, ...] | None = None
    axes: list[AxisMap] | None = None  # None: nothing to copy, keep the fresh value
    scale: float = 1.0  # copied values are multiplied by this
    # False when none of an input-side axis's old indices survived and the old function is lost
    # anyway: zeros there would only disconnect the layer from its inputs, so new input-side
    # entries keep their fresh values (the "random" fill for this weight).
    zero_fill: bool = True
    # A new layer's start (see `keras_surgery.growth`): the value this weight is set to.
    init: Init | None = None
    copied: int = 0
    zeroed: int = 0
    fresh: int = 0
    preset: int = 0  # entries a start sets to a value other than 0 (identity ones, gamma 1)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def status(self) -> str:
        if self.init is not None:
            return "start"
        if self.axes is None:
            return "new"
        if self.copied == self.size and self.shape == self.old_shape:
            return "copied"
        return "partial"

    def fill_policy(self, policy: str) -> str:
        """The fill rule this weight actually gets under the plan's `policy` ("net2net" fills
        by the "preserve" rule; its split units are in the axis maps)."""
        if not self.zero_fill:
            return "random"
        return "preserve" if policy in PRESERVING_POLICIES else policy

    def regions(self, policy: str) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks (copy, zero) over the weight, by the fill rule of `policy`."""
        policy = self.fill_policy(policy)
        if self.axes is None:
            empty = np.zeros(self.shape, dtype=bool)
            return empty, empty
        ndim = len(self.shape)
        copy = np.ones(self.shape, dtype=bool)
        out_ok = np.ones(self.shape, dtype=bool)
        for a, amap in enumerate(self.axes):
            view = amap.matched.reshape([-1 if i == a else 1 for i in range(ndim)])
            copy = copy & view
            if amap.kind in OUT_KINDS and not amap.zero_new:
                out_ok = out_ok & view
        zero = out_ok & ~copy if policy == "preserve" else np.zeros(self.shape, dtype=bool)
        return copy, zero

    def count(self, policy: str) -> None:
        total = self.size
        self.preset = 0
        if self.init is not None:
            nonzero = int(np.count_nonzero(init_value(self.init, self.shape)))
            self.copied, self.zeroed, self.fresh, self.preset = 0, total - nonzero, 0, nonzero
            return
        if self.axes is None:
            self.copied, self.zeroed, self.fresh = 0, 0, total
            return
        matched = [int(a.matched.sum()) for a in self.axes]
        lengths = [len(a.index) for a in self.axes]
        self.copied = int(np.prod(matched, dtype=np.int64))
        out_ok = int(np.prod([m if a.kind in OUT_KINDS and not a.zero_new else n
                              for a, m, n in zip(self.axes, matched, lengths)], dtype=np.int64))
        self.zeroed = out_ok - self.copied if self.fill_policy(policy) == "preserve" else 0
        self.fresh = total - self.copied - self.zeroed

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "role": self.role,
            "path": self.path,
            "shape": list(self.shape),
            "old_layer": self.old_layer,
            "old_path": self.old_path,
            "old_shape": None if self.old_shape is None else list(self.old_shape),
            "status": self.status,
            "copied": self.copied,
            "zeroed": self.zeroed,
            "fresh": self.fresh,
            "preset": self.preset,
            "scale": self.scale,
            "zero_fill": self.zero_fill,
            "init": None if self.init is None else self.init.to_dict(),
            "axes": None if self.axes is None else [a.to_dict() for a in self.axes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightPlan:
        axes, init = data.get("axes"), data.get("init")
        return cls(
            layer=data["layer"],
            role=data["role"],
            path=data["path"],
            shape=tuple(data["shape"]),
            old_layer=data.get("old_layer"),
            old_path=data.get("old_path"),
            old_shape=None if data.get("old_shape") is None else tuple(data["old_shape"]),
            axes=None if axes is None else [AxisMap.from_dict(a) for a in axes],
            scale=float(data.get("scale", 1.0)),
            zero_fill=bool(data.get("zero_fill", True)),
            init=None if init is None else Init.from_dict(init),
            copied=data.get("copied", 0),
            zeroed=data.get("zeroed", 0),
            fresh=data.get("fresh", 0),
            preset=data.get("preset", 0),
        )


def init_value(init: Init, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """The value of a start's `Init` for a weight of `shape`: a constant, or the identity over
    the last two axes at the centre of the leading (kernel tap) axes."""
    if init.kind == "constant":
        return np.full(shape, init.value, dtype=dtype)
    if len(shape) < 2 or shape[-1] != shape[-2] or any(k % 2 == 0 for k in shape[:-2]):
        raise SurgeryError(f"An identity start needs a square last pair of axes and odd kernel "
                           f"axes before them. Received: shape={shape}")
    value = np.zeros(shape, dtype=dtype)
    value[tuple(k // 2 for k in shape[:-2])] = np.eye(shape[-1], dtype=dtype)
    return value


@dataclass
class SurgeryPlan:
    """Everything a surgery will do, as data: per new weight, index maps and fill regions.

    A plan can be summarised, serialised (`to_json`), and applied to the model it was made for
    (`apply`), reading the old weights from the source it was made from.
    """

    old: str
    new: str
    policy: str
    weights: list[WeightPlan]
    matches: dict[str, str]  # new layer name -> old layer name
    new_layers: list[str]
    dropped: list[str]  # old weight paths nothing continues
    warnings: list[str]
    preserves_function: bool
    old_optimizer: OptimizerLayout | None = None
    # New layers started so that the old function is kept: layer -> "identity" | "zero".
    starts: dict[str, str] = field(default_factory=dict)
    old_source: Any = field(default=None, repr=False, compare=False)
    # (old, new) GraphLabels the plan was made from; None for a plan loaded from JSON. The
    # verifier reads them to know which new input column / output index continues which old one.
    labels: tuple[GraphLabels, GraphLabels] | None = field(
        default=None, repr=False, compare=False
    )

    def apply(
        self, model: Any, *, optimizer: bool = True, verbose: bool = False
    ) -> SurgeryReport:
        """Writes the planned values into `model`'s variables, all or nothing.

        Args:
            model: the new model the plan was made for.
            optimizer: also carry the optimizer state (slots through the same index maps,
                `iterations` copied) when both sides have one; the new model must be compiled.
            verbose: show a progress bar over the weights.

        Raises:
            SurgeryError: the plan does not fit `model`, or the old weights cannot be read;
                the model is then unchanged.
        """
        from keras_surgery.apply import apply_plan

        if self.old_source is None:
            raise SurgeryError(
                "This plan has no old weights attached (it was loaded from JSON); "
                "make it with ModelMigrator to apply it."
            )
        return apply_plan(self, model, self.old_source, optimizer=optimizer, verbose=verbose)

    def apply_file(
        self, src: Any, out: Any, *, template: Any, verbose: bool = False
    ) -> dict[str, Any]:
        """Migrates checkpoint `src` of the old architecture into the `.keras` file `out` of the
        new one, without building either model; fresh values come from `template`, a `.keras`
        file of the new architecture. See `keras_surgery.files.apply_file`."""
        from keras_surgery.files import apply_file

        return apply_file(self, src, out, template=template, verbose=verbose)

    def totals(self) -> dict[str, int]:
        return {
            "copied": sum(w.copied for w in self.weights),
            "zeroed": sum(w.zeroed for w in self.weights),
            "fresh": sum(w.fresh for w in self.weights),
            "preset": sum(w.preset for w in self.weights),
        }

    def summary(self) -> str:
        from keras_surgery.report import format_summary

        return format_summary(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "old": self.old,
            "new": self.new,
            "policy": self.policy,
            "preserves_function": self.preserves_function,
            "warnings": list(self.warnings),
            "matches": dict(self.matches),
            "new_layers": list(self.new_layers),
            "starts": dict(self.starts),
            "dropped": list(self.dropped),
            "totals": self.totals(),
            "weights": [w.to_dict() for w in self.weights],
            "old_optimizer": None if self.old_optimizer is None else self.old_optimizer.to_dict(),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurgeryPlan:
        return cls(
            old=data["old"],
            new=data["new"],
            policy=data["policy"],
            weights=[WeightPlan.from_dict(w) for w in data["weights"]],
            matches=dict(data["matches"]),
            new_layers=list(data["new_layers"]),
            dropped=list(data["dropped"]),
            warnings=list(data["warnings"]),
            preserves_function=bool(data["preserves_function"]),
            old_optimizer=_layout_from_dict(data.get("old_optimizer")),
            starts=dict(data.get("starts") or {}),
        )


def _layout_from_dict(data: dict[str, Any] | None) -> OptimizerLayout | None:
    if data is None:
        return None
    fields = dict(data)
    fields["shapes"] = [tuple(s) for s in fields["shapes"]]
    if fields.get("trainable_shapes") is not None:
        fields["trainable_shapes"] = [tuple(s) for s in fields["trainable_shapes"]]
    return OptimizerLayout(**fields)


# -- matching ------------------------------------------------------------------------------


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


class _Matcher:
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


# -- planning ------------------------------------------------------------------------------


def _weight_by_role(record: LayerRecord) -> dict[str, tuple[WeightLabels, Any]]:
    return {w.role: (w, spec) for w, spec in zip(record.result.weights, record.node.weights)}


def _describe_missing(space: LabelSpace, ids: np.ndarray, limit: int = 3) -> str:
    shown = ", ".join(space.describe(i) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def build_plan(
    old: GraphLabels,
    new: GraphLabels,
    *,
    policy: str,
    old_source: Any = None,
    growth: Growth | None = None,
) -> SurgeryPlan:
    """Matches the two labelled graphs weight by weight and axis by axis.

    `growth` holds the starts of new layers (`new` must have been labelled with them) and
    what could not be started; under policy "net2net" new units are split off old ones.
    """
    if policy not in POLICIES:
        raise SurgeryError(f"policy must be one of {POLICIES}. Received: policy={policy!r}")
    growth = Growth() if growth is None else growth
    space = new.space
    warnings: list[str] = list(new.warnings) + list(growth.warnings)
    breaks = growth.breaks
    weights: list[WeightPlan] = []
    splittable: list[tuple[WeightPlan, WeightLabels, WeightLabels]] = []
    matches: dict[str, str] = {}
    new_layers: list[str] = []
    continued_old: set[str] = set()

    for name, rec in new.records.items():
        old_rec = old.records.get(rec.identity)
        if old_rec is None or old_rec.node.class_name != rec.node.class_name:
            if rec.node.weights or rec.node.group:
                new_layers.append(name)
            roles = [w.role for w in rec.result.weights]
            start = rec.result.starts.get(rec.start) if rec.start is not None else None
            for i, spec in enumerate(rec.node.weights):
                role = roles[i] if len(roles) == len(rec.node.weights) else spec.local
                wp = WeightPlan(name, role, spec.path, spec.shape)
                if start is not None:
                    wp.init = start.values.get(role)
                wp.count(policy)
                weights.append(wp)
            continue
        matches[name] = old_rec.node.name
        breaks |= _check_config(name, rec.node, old_rec.node, warnings)

        # Mixing axes must keep their labels, or the old outputs change.
        for new_mix, old_mix in zip(rec.result.mixing, old_rec.result.mixing):
            for new_axis, old_axis in zip(new_mix.labels, old_mix.labels):
                if new_axis.ids is None or old_axis.ids is None:
                    same = new_axis.ids is None and old_axis.ids is None
                elif new_mix.ordered:
                    same = np.array_equal(new_axis.ids, old_axis.ids)
                else:
                    same = set(new_axis.ids.tolist()) == set(old_axis.ids.tolist())
                if not same:
                    gained = 0 if new_axis.ids is None or old_axis.ids is None else len(
                        np.setdiff1d(new_axis.ids, old_axis.ids))
                    lost = 0 if new_axis.ids is None or old_axis.ids is None else len(
                        np.setdiff1d(old_axis.ids, new_axis.ids))
                    warnings.append(
                        f"layer '{name}' ({rec.node.class_name}): {new_mix.reason}; that axis "
                        f"changed (gained {gained}, lost {lost} labels"
                        f"{', reordered' if new_mix.ordered and not gained and not lost else ''}"
                        "), so the old outputs cannot be preserved."
                    )
                    breaks = True

        old_weights = _weight_by_role(old_rec)
        for w, spec in zip(rec.result.weights, rec.node.weights):
            found = old_weights.get(w.role)
            wp = WeightPlan(name, w.role, spec.path, spec.shape)
            if found is None:
                warnings.append(
                    f"layer '{name}': weight '{w.role}' has no counterpart in the old model; "
                    "it keeps its initial values, so the old outputs may change."
                )
                breaks = True
            else:
                old_w, old_spec = found
                continued_old.add(old_spec.path)
                wp.old_layer, wp.old_path, wp.old_shape = old_rec.node.name, old_spec.path, tuple(
                    old_spec.shape)
                if rec.opaque and tuple(spec.shape) != tuple(old_spec.shape):
                    warnings.append(
                        f"layer '{name}' ({rec.node.class_name}) has no rule and its weight "
                        f"'{w.role}' changed shape {tuple(old_spec.shape)} -> {tuple(spec.shape)};"
                        " it keeps its initial values."
                    )
                    breaks = True
                elif len(w.axes) != len(old_w.axes):
                    warnings.append(
                        f"layer '{name}': weight '{w.role}' changed rank; it keeps its initial "
                        "values."
                    )
                    breaks = True
                else:
                    wp.axes = []
                    for axis, (na, oa) in enumerate(zip(w.axes, old_w.axes)):
                        n_ids, o_ids = na.labels.ids, oa.labels.ids
                        if n_ids is None or o_ids is None:
                            raise SurgeryError(
                                f"layer '{name}': weight '{w.role}' axis {axis} has no labels."
                            )
                        wp.axes.append(AxisMap(na.kind, index_map(o_ids, n_ids), na.zero_new))
                        if len(np.unique(n_ids)) < len(n_ids):
                            warnings.append(
                                f"layer '{name}': weight '{w.role}' axis {axis} has indices "
                                "with the same label, so where each came from is ambiguous; "
                                "the old outputs may change."
                            )
                            breaks = True
                        if na.kind in ("in", "struct", "lookup"):
                            lost = np.setdiff1d(o_ids, n_ids)
                            unsafe = lost[~space.zero_safe(lost)]
                            if len(unsafe) and not np.any(wp.axes[-1].matched):
                                wp.zero_fill = False
                                warnings.append(
                                    f"layer '{name}': none of the old input indices of weight "
                                    f"'{w.role}' axis {axis} survive, so its new inputs keep "
                                    "fresh weights instead of zeros."
                                )
                            if len(unsafe):
                                warnings.append(
                                    f"layer '{name}': {len(unsafe)} input index(es) of weight "
                                    f"'{w.role}' axis {axis} are gone from the new model "
                                    f"({_describe_missing(space, unsafe)}); they were not input "
                                    "features set to 0, so the old outputs change."
                                )
                                breaks = True
            if wp.axes is not None and found is not None:
                breaks |= _check_shared_calls(rec, old_rec, w.role, wp, warnings)
            if wp.axes is not None and w.rescale is not None:
                axis, power = w.rescale
                wp.scale = float((spec.shape[axis] / wp.old_shape[axis]) ** power)
            wp.count(policy)
            weights.append(wp)
            if wp.axes is not None and found is not None:
                splittable.append((wp, w, found[0]))

    if policy == "net2net":
        split_units(old, new, splittable)
        for wp, _, _ in splittable:
            wp.count(policy)

    dropped = [
        spec.path for rec in old.records.values() for spec in rec.node.weights
        if spec.path not in continued_old
    ]

    breaks |= _check_outputs(old, new, warnings)
    if policy not in PRESERVING_POLICIES and any(
        w.zeroed or (w.axes is not None and w.fresh) for w in weights
    ):
        breaks = True
    return SurgeryPlan(
        old=old.graph.description,
        new=new.graph.description,
        policy=policy,
        weights=weights,
        matches=matches,
        new_layers=new_layers,
        dropped=dropped,
        warnings=_unique(warnings),
        preserves_function=not breaks,
        old_source=old_source,
        starts=_starts_of(new),
    )


def _check_shared_calls(
    rec: LayerRecord, old_rec: LayerRecord, role: str, wp: WeightPlan, warnings: list[str]
) -> bool:
    """A shared layer's weight gets one index map; every other call must agree with it."""
    if not rec.later_calls:
        return False
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
                warnings.append(
                    f"layer '{rec.node.name}' is shared, and its call {k} moves the indices of "
                    f"weight '{role}' axis {axis} differently from its first call; the first "
                    "call's mapping was used, so the old outputs change."
                )
                return True
    return False


KERAS_FUNCTION_KEYS = frozenset({
    "activation", "recurrent_activation", "approximate", "negative_slope", "max_value",
    "threshold", "alpha", "theta", "epsilon", "invert", "strides", "dilation_rate", "padding",
    "data_format", "pool_size", "size", "interpolation", "cropping", "keepdims", "axis", "axes",
    "return_sequences", "go_backwards", "reset_after", "merge_mode", "use_scale", "score_mode",
    "mask_zero", "output_mode", "normalize", "equation", "bias_axes", "scale", "offset",
    "use_bias", "center", "rms_scaling", "attention_axes",
})
"""Config keys of Keras's own layers that change what a layer computes at inference, whatever
the sizes are. A matched layer whose value for one of them changed cannot compute the old
function: the rules only know how sizes and orders changed. (Sizes, initialisers, regularisers,
dropout rates, momentum, `stateful` and `return_state` are left out: the rules handle the
first, the others do not change the old outputs. A bias, center or scale switched off drops a
trained weight.)"""

KERAS_HUB_FUNCTION_KEYS = frozenset({"activation", "layer_norm_epsilon", "normalize_first"})
"""The same for keras-hub's layers (registered as "keras_hub>..." or "keras_nlp>...")."""

_NESTED_LAYER_KEYS = ("layer", "cell", "forward_layer", "backward_layer")


def _function_keys(module: Any, registered: Any) -> frozenset[str]:
    """The function keys of a layer class: Keras's and keras-hub's layers only; a custom
    layer's config keys mean what its author chose (its rule answers for it)."""
    package = str(registered).split(">", 1)[0] if registered else ""
    if package in ("keras_hub", "keras_nlp"):
        return KERAS_HUB_FUNCTION_KEYS
    if not registered and isinstance(module, str) and (
        module == "keras" or module.startswith("keras.")
    ):
        return KERAS_FUNCTION_KEYS
    return frozenset()


def _function_config(config: Any, keys: frozenset[str], prefix: str = "") -> dict[str, Any]:
    """The `keys` entries of a layer config, with those of wrapped layers and cells
    (Bidirectional, TimeDistributed, RNN) under "<key>." prefixes."""
    found: dict[str, Any] = {}
    if not isinstance(config, dict):
        return found
    for key, value in config.items():
        if key in keys:
            found[prefix + key] = value
        elif key in _NESTED_LAYER_KEYS and isinstance(value, dict):
            inner_keys = _function_keys(value.get("module"), value.get("registered_name"))
            found.update(_function_config(value.get("config"), inner_keys, f"{prefix}{key}."))
    return found


def _check_config(name: str, node: Any, old_node: Any, warnings: list[str]) -> bool:
    """Whether a matched layer's inference behaviour changed (its function keys); warns if
    so."""
    keys = _function_keys(node.module, node.registered_name)
    new_config = _function_config(node.config, keys)
    old_config = _function_config(old_node.config, keys)
    # A key only one side has (a Keras version that added it) says nothing about a change.
    changed = sorted(k for k in new_config.keys() & old_config.keys()
                     if _plain(new_config[k]) != _plain(old_config[k]))
    if not changed:
        return False
    what = ", ".join(f"{k}: {_show(old_config[k])} -> {_show(new_config[k])}" for k in changed)
    warnings.append(f"layer '{name}' ({node.class_name}) changed its {what}; the weights were "
                    "carried over, but the old outputs change.")
    return True


def _plain(value: Any) -> Any:
    """A config value in one form: tuples as lists, a serialized Keras object by its class and
    config (file and live configs differ in module paths and registered names)."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        if "class_name" in value and "config" in value:
            return {"class_name": value["class_name"], "config": _plain(value["config"])}
        return {k: _plain(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    if isinstance(value, dict) and "class_name" in value:
        return str(value["class_name"])
    return repr(value)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _check_outputs(old: GraphLabels, new: GraphLabels, warnings: list[str]) -> bool:
    """Every old output must still be computed, on at least all of its old labels."""
    breaks = False
    identity_of = {rec.identity: name for name, rec in new.records.items()}
    identity_of.update({ident: name for name, ident in new.input_identity.items()})
    new_refs = set(new.graph.outputs)
    kept = 0
    for ref in old.graph.outputs:
        new_name = identity_of.get(ref[0])
        new_ref = (new_name, ref[1], ref[2]) if new_name is not None else None
        if new_ref is None or new_ref not in new_refs:
            warnings.append(f"old output '{ref[0]}' is not an output of the new model.")
            continue
        kept += 1
        old_x, new_x = old.tensors.get(ref), new.tensors.get(new_ref)
        if old_x is None or new_x is None:
            continue
        for axis, (oa, na) in enumerate(zip(old_x, new_x)):
            if oa.ids is None or na.ids is None:
                continue
            lost = np.setdiff1d(oa.ids, na.ids)
            if len(lost):
                warnings.append(
                    f"output '{new_name}' lost {len(lost)} of its old indices on axis {axis} "
                    f"({_describe_missing(new.space, lost)}); those old outputs are gone."
                )
                breaks = True
    if old.graph.outputs and not kept:
        # A dropped head leaves the other outputs' promise intact; with every head gone there
        # is nothing left that could be preserved.
        warnings.append("no output of the old model is an output of the new model, so none of "
                        "the old outputs is preserved.")
        breaks = True
    return breaks


class ModelMigrator:
    """Plans surgeries from one old model (a `.keras` path or a live model).

    Example:
        >>> migrator = ks.ModelMigrator("old.keras", old_features={"obs": ["hp", "mana"]})
        >>> plan = migrator.plan(new_model, new_features={"obs": ["hp", "armor", "mana"]})
        >>> print(plan.summary())                                  # doctest: +SKIP
        >>> report = plan.apply(new_model)
    """

    def __init__(
        self, old: Any, *, old_features: FeatureSpec | None = None, strict: bool = False
    ):
        self.old = old
        self.old_features = old_features
        self.strict = strict

    @gc_paused
    def plan(
        self,
        new_model: Any,
        *,
        new_features: FeatureSpec | None = None,
        policy: str = "preserve",
        allow_unrelated: bool = False,
    ) -> SurgeryPlan:
        """Matches `new_model` against the old model and returns the SurgeryPlan.

        Args:
            new_model: the built new keras.Model, or the path of a `.keras` file of the new
                architecture (read as data; such a plan can be applied file to file with
                `apply_file`, using that file as the template).
            new_features: the new model's feature spec.
            policy: "preserve", "net2net" or "random" (see `migrate_weights`).
            allow_unrelated: accept a plan that copies nothing from an old model that has
                weights (the new model then keeps its initial values, with a warning); by
                default that is an error, since it almost always means the wrong old model.

        Raises:
            SurgeryFileError, FeatureSpecError, UnsupportedLayerError: see their docs.
            SurgeryError: nothing of the old model continues in the new one and
                `allow_unrelated` is False.
        """
        from keras_surgery.sources import is_path, open_graph

        if policy not in POLICIES:
            raise SurgeryError(f"policy must be one of {POLICIES}. Received: policy={policy!r}")
        if new_features is None and is_path(new_model):
            from keras_surgery.files import read_lineage

            new_features = (read_lineage(new_model) or {}).get("features")
        with open_graph(new_model) as new_graph:
            plan = self._plan(new_graph, new_features, policy)
        _check_related(plan, allow_unrelated)
        return plan

    def _plan(self, new_graph: ModelGraph, new_features: Any, policy: str) -> SurgeryPlan:
        from keras_surgery.sources import is_path, open_graph

        space = LabelSpace()
        old_features = self.old_features
        if old_features is None and is_path(self.old):
            from keras_surgery.files import read_lineage

            old_features = (read_lineage(self.old) or {}).get("features")
        with open_graph(self.old) as old_graph:
            old_labels = propagate(
                old_graph, features=old_features, space=space, strict=self.strict
            )
            if is_path(self.old):
                config = getattr(old_graph.source, "config", {})
                old_optimizer = file_layout(old_graph, config, old_labels.records)
            else:
                old_optimizer = live_layout(self.old)
        matcher = _Matcher(old_labels, new_graph)
        new_labels = propagate(
            new_graph,
            features=new_features,
            space=space,
            match_layer=matcher.match_layer,
            match_input=matcher.match_input,
            strict=self.strict,
            where="the new model",
        )
        growth = None
        if policy in PRESERVING_POLICIES:
            new_labels, growth = self._grow(new_graph, new_features, old_labels, new_labels)
        source = self.old if is_path(self.old) else old_graph.source
        plan = build_plan(old_labels, new_labels, policy=policy, old_source=source,
                          growth=growth)
        plan.old_optimizer = old_optimizer
        plan.labels = (old_labels, new_labels)
        logger.info("planned surgery %s -> %s: %s", plan.old, plan.new, plan.totals())
        return plan

    def _grow(
        self, new_graph: ModelGraph, new_features: Any, old: GraphLabels, new: GraphLabels
    ) -> tuple[GraphLabels, Growth]:
        """Chooses the starts of new layers (`keras_surgery.growth`), labelling the new model
        again with them until no start is added; each layer keeps continuing the old layer it
        was matched to first."""
        first = new
        growth = plan_starts(old, new)
        # Terminates: starts are only ever added, and there are finitely many layers.
        while growth.starts != _starts_of(new):
            new = propagate(
                new_graph,
                features=new_features,
                space=new.space,
                match_layer=lambda node, inputs, position: first.records[node.name].identity,
                match_input=lambda spec, index: first.input_identity[spec.name],
                strict=self.strict,
                where="the new model",
                starts=growth.starts,
            )
            growth = plan_starts(old, new, growth.starts)
        return new, growth


def _starts_of(labels: GraphLabels) -> dict[str, str]:
    """The starts a labelling was made with."""
    return {name: rec.start for name, rec in labels.records.items() if rec.start is not None}


def _check_related(plan: SurgeryPlan, allow_unrelated: bool) -> None:
    """Refuses a plan that copies nothing although both models have weights: the old model is
    then almost surely not the one the new model was made from."""
    old_labels = plan.labels[0] if plan.labels is not None else None
    old_size = 0 if old_labels is None else sum(
        int(np.prod(spec.shape, dtype=np.int64))
        for rec in old_labels.records.values() for spec in rec.node.weights
    )
    if plan.totals()["copied"] or not old_size or not any(w.size for w in plan.weights):
        return
    matched = (f"the layer(s) that matched ({', '.join(sorted(plan.matches))}) hold no weights"
               if plan.matches else "no layer matched")
    what = (f"{plan.old} and {plan.new} have nothing in common: {matched} and no weight value "
            "was copied. Layers are matched by name (auto-generated names such as 'dense_3' by "
            "class and position) and input columns by feature name")
    if not allow_unrelated:
        raise SurgeryError(
            f"{what}. Check that the old model is the one the new model was made from, or pass "
            "allow_unrelated=True to keep the new model's initial values."
        )
    plan.warnings.append(f"{what}; allow_unrelated=True: the new model keeps its initial "
                         "values.")
    plan.preserves_function = False
