"""The SurgeryPlan as data: per new weight, index maps, fill and start; JSON both ways.

A plan is made by `keras_surgery.migrator.ModelMigrator` (matching in `keras_surgery.match`,
planning in `keras_surgery.planner`). Its methods are thin doors: `apply` streams it into a
live model (`keras_surgery.apply`), `apply_file` into a `.keras` file (`keras_surgery.files`),
and its counts come from the one fill kernel (`keras_surgery.fill`), so they are what is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_surgery.apply import apply_plan
from keras_surgery.errors import SurgeryError
from keras_surgery.files import apply_file
from keras_surgery.fill import OUT_KINDS, PRESERVING_POLICIES, counts, init_value
from keras_surgery.optimizer import OptimizerLayout
from keras_surgery.report import SurgeryReport, format_summary
from keras_surgery.rules.api import Init

if TYPE_CHECKING:
    from keras_surgery.propagate import GraphLabels

__all__ = ["OUT_KINDS", "POLICIES", "PRESERVING_POLICIES", "AxisMap", "SurgeryPlan",
           "WeightPlan", "init_value"]

POLICIES = ("preserve", "random", "net2net", "duplicate")


@dataclass
class AxisMap:
    """For each index of a new weight axis, the old index it continues, or -1.

    Policy "net2net" adds `source`: for a new index (-1 in `index`), the old index whose values
    it copies (a split unit), else -1; and `share`: per index, the factor copied values are
    multiplied by (on an input-side axis, each copy of a split unit gets a share of the unit's
    outgoing weights, the shares of one unit summing to 1).

    `mean_new` (an output-side axis of a head whose output spec says `init="mean"`): the new
    indices start as the mean of the continued ones, as Hugging Face starts new tokens.
    """

    kind: str
    index: np.ndarray
    zero_new: bool = False
    source: np.ndarray | None = None
    share: np.ndarray | None = None
    mean_new: bool = False

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
        return AxisMap(self.kind, self.index, self.zero_new, mean_new=self.mean_new)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "index": self.index.tolist(),
                                "zero_new": self.zero_new}
        if self.source is not None:
            data["source"] = self.source.tolist()
        if self.share is not None:
            data["share"] = self.share.tolist()
        if self.mean_new:
            data["mean_new"] = True
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
            bool(data.get("mean_new", False)),
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
    shift: float = 0.0  # then this is added to them (a rescaled offset gain: Gemma's 1 + scale)
    # Why the copied values are rescaled (the operator, for the report), or "".
    operator: str = ""
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

    def count(self, policy: str) -> None:
        """Sets `copied`, `zeroed`, `fresh` and `preset` from the regions `fill` writes."""
        self.copied, self.zeroed, self.fresh, self.preset = counts(self, policy)

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
            "shift": self.shift,
            "operator": self.operator,
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
            shift=float(data.get("shift", 0.0)),
            operator=str(data.get("operator", "")),
            zero_fill=bool(data.get("zero_fill", True)),
            init=None if init is None else Init.from_dict(init),
            copied=data.get("copied", 0),
            zeroed=data.get("zeroed", 0),
            fresh=data.get("fresh", 0),
            preset=data.get("preset", 0),
        )


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
    # Per new input: the old input it continues and its features kept, moved, added, removed
    # (`keras_surgery.feature_changes`).
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per named output (output specs): its old output and the columns kept, moved, added,
    # removed (`keras_surgery.outputs`).
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Why each new layer continues its old one: "name", "nested prefix", "structure" (aligned
    # with the old graph) or "position" (among look-alikes); see `keras_surgery.match`.
    match_reasons: dict[str, str] = field(default_factory=dict)
    # Where `apply` reads the old values: the old model's `keras_surgery.side.Side` (its file
    # held open from planning on); None for a plan loaded from JSON.
    old_source: Any = field(default=None, repr=False, compare=False)
    # (old, new) GraphLabels the plan was made from; None for a plan loaded from JSON. The
    # verifier reads them to know which new input column / output index continues which old one.
    labels: tuple[GraphLabels, GraphLabels] | None = field(
        default=None, repr=False, compare=False
    )

    def apply(
        self, model: Any, *, optimizer: bool = True, verbose: bool = False, undo: bool = True
    ) -> SurgeryReport:
        """Writes the planned values into `model`'s variables, all or nothing.

        Args:
            model: the new model the plan was made for.
            optimizer: also carry the optimizer state (slots through the same index maps,
                `iterations` copied) when both sides have one; the new model must be compiled.
            verbose: show a progress bar over the weights.
            undo: keep an undo journal so that a failure leaves `model` unchanged (see
                `migrate_weights`).

        Raises:
            SurgeryError: the plan does not fit `model`, or the old weights cannot be read;
                the model is then unchanged (with `undo=False`, once writing has begun, it is
                partly written and the error says so).
        """
        if self.old_source is None:
            raise SurgeryError(
                "This plan has no old weights attached (it was loaded from JSON); "
                "make it with ModelMigrator to apply it."
            )
        return apply_plan(self, model, self.old_source.weights, optimizer=optimizer,
                          verbose=verbose, undo=undo)

    def apply_file(
        self, src: Any, out: Any, *, template: Any, verbose: bool = False
    ) -> dict[str, Any]:
        """Migrates checkpoint `src` of the old architecture into the `.keras` file `out` of the
        new one, without building either model; fresh values come from `template`, a `.keras`
        file of the new architecture. See `keras_surgery.files.apply_file`."""
        return apply_file(self, src, out, template=template, verbose=verbose)

    def totals(self) -> dict[str, int]:
        return {
            "copied": sum(w.copied for w in self.weights),
            "zeroed": sum(w.zeroed for w in self.weights),
            "fresh": sum(w.fresh for w in self.weights),
            "preset": sum(w.preset for w in self.weights),
        }

    def summary(self) -> str:
        """A plain-text table of every weight, totals and warnings."""
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
            "features": dict(self.features),
            "outputs": dict(self.outputs),
            "match_reasons": dict(self.match_reasons),
            "dropped": list(self.dropped),
            "totals": self.totals(),
            "weights": [w.to_dict() for w in self.weights],
            "old_optimizer": None if self.old_optimizer is None else self.old_optimizer.to_dict(),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> SurgeryPlan:
        """The plan `to_json` wrote (without its old source: apply it with `apply_file`)."""
        return cls.from_dict(json.loads(text))

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
            features=dict(data.get("features") or {}),
            outputs=dict(data.get("outputs") or {}),
            match_reasons=dict(data.get("match_reasons") or {}),
        )


def _layout_from_dict(data: dict[str, Any] | None) -> OptimizerLayout | None:
    if data is None:
        return None
    fields = dict(data)
    fields["shapes"] = [tuple(s) for s in fields["shapes"]]
    if fields.get("trainable_shapes") is not None:
        fields["trainable_shapes"] = [tuple(s) for s in fields["trainable_shapes"]]
    return OptimizerLayout(**fields)
