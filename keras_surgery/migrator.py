"""ModelMigrator: the front door that turns an old model and a new one into a SurgeryPlan.

It opens the old side once, labels both sides in one label space (the new side matched
against the old one as it is labelled, `keras_surgery.match`), chooses the starts of new
layers (`keras_surgery.growth`, labelling again until no start is added), and hands both
labellings to the planner.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.feature_changes import check_inputs_continue, feature_changes, likely_typos
from keras_surgery.features import FeatureSpec
from keras_surgery.graph import ModelGraph
from keras_surgery.growth import Growth, plan_starts
from keras_surgery.labels import LabelSpace, gc_paused
from keras_surgery.match import LayerMatcher, check_unit_maps
from keras_surgery.outputs import OutputSpec, plan_outputs
from keras_surgery.plan import OUT_KINDS, POLICIES, PRESERVING_POLICIES, SurgeryPlan
from keras_surgery.planner import build_plan, starts_of
from keras_surgery.propagate import GraphLabels, propagate
from keras_surgery.side import Side, opened

logger = logging.getLogger("keras_surgery")


class ModelMigrator:
    """Plans surgeries from one old model (a `.keras` path or a live model).

    The old file is opened once, when the migrator is made, and stays open while the migrator
    or a plan made from it is in use, so planning and applying read the same file. Close it
    with `close()` (or use the migrator as a context manager) when done.

    Args:
        old: the old model: a `.keras` path, a keras.Model, or an opened `Side` (left open).
        old_features: the old model's feature spec; by default the one its file records.
        old_outputs: the old model's output spec (see `migrate_weights`).
        old_weights: a weights-only checkpoint with the old values (see `migrate_weights`).
        strict: raise UnsupportedLayerError for a layer without a rule.

    Example:
        >>> migrator = ks.ModelMigrator("old.keras", old_features={"obs": ["hp", "mana"]})
        >>> plan = migrator.plan(new_model, new_features={"obs": ["hp", "armor", "mana"]})
        >>> print(plan.summary())                                  # doctest: +SKIP
        >>> report = plan.apply(new_model)
    """

    def __init__(
        self,
        old: Any,
        *,
        old_features: FeatureSpec | None = None,
        old_outputs: OutputSpec | None = None,
        old_weights: str | os.PathLike | None = None,
        strict: bool = False,
    ):
        if isinstance(old, Side) and old_weights is not None:
            raise SurgeryError("old_weights cannot be given with an opened Side (open the Side "
                               "with them instead).")
        self.owns_side = not isinstance(old, Side)
        self.side = old if isinstance(old, Side) else Side(old, weights=old_weights)
        self.old = old
        self.old_features = old_features
        self.old_outputs = old_outputs
        self.strict = strict

    def close(self) -> None:
        """Closes the old file (if the migrator opened it); its plans can then not be applied."""
        if self.owns_side:
            self.side.close()

    def __enter__(self) -> ModelMigrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @gc_paused
    def plan(
        self,
        new_model: Any,
        *,
        new_features: FeatureSpec | None = None,
        new_outputs: OutputSpec | None = None,
        policy: str = "preserve",
        allow_unrelated: bool = False,
        unit_maps: Mapping[str, Sequence[int]] | None = None,
    ) -> SurgeryPlan:
        """Matches `new_model` against the old model and returns the SurgeryPlan.

        Args:
            new_model: the built new keras.Model, or the path of a `.keras` file of the new
                architecture (read as data; such a plan can be applied file to file with
                `apply_file`, using that file as the template).
            new_features: the new model's feature spec.
            new_outputs: the new model's output spec; with the old one, the columns of the
                heads they name follow their class names or tokens.
            policy: "preserve", "net2net", "duplicate" or "random" (see `migrate_weights`).
            allow_unrelated: accept a plan that copies nothing from an old model that has
                weights (the new model then keeps its initial values, with a warning), and an
                input none of whose old features is among the new ones; by default both are
                errors, since they almost always mean the wrong old model or a feature spec
                given for one side only.
            unit_maps: chosen units, `{new layer name: [old unit index or -1, per new
                unit]}`: keep, drop or reorder units of a matched layer (pruning); every weight
                that reads them follows. The report names the old units dropped.

        Returns:
            The SurgeryPlan; `plan.apply(new_model)` carries it out.

        Raises:
            FeatureSpecError: a bad feature spec, or an input none of whose old features
                continues (see `allow_unrelated`).
            SurgeryFileError, UnsupportedLayerError: see their docs.
            SurgeryError: nothing of the old model continues in the new one and
                `allow_unrelated` is False.
        """
        if policy not in POLICIES:
            raise SurgeryError(f"policy must be one of {POLICIES}. Received: policy={policy!r}")
        if self.side.closed:
            raise SurgeryError(f"This ModelMigrator of '{self.side.path}' is closed; make a new "
                               "one to plan.")
        with opened(new_model) as new_side:
            plan = self._plan(new_side.graph(), new_side.features(new_features), new_outputs,
                              policy, allow_unrelated, dict(unit_maps or {}))
        _check_related(plan, allow_unrelated)
        return plan

    def _plan(self, new_graph: ModelGraph, new_features: Any, new_outputs: Any, policy: str,
              allow_unrelated: bool, unit_maps: dict[str, Sequence[int]]) -> SurgeryPlan:
        space = LabelSpace()
        old = self.side
        old_features = old.features(self.old_features)
        old_labels = propagate(
            old.graph(), features=old_features, space=space, strict=self.strict,
        )
        old_optimizer = old.optimizer_layout(old_labels.records)
        matcher = LayerMatcher(old_labels, new_graph)
        new_labels = propagate(
            new_graph,
            features=new_features,
            space=space,
            match_layer=matcher.match_layer,
            match_input=matcher.match_input,
            strict=self.strict,
            where="the new model",
            unit_maps=unit_maps,
            old_roles=old_roles_of(old_labels),
        )
        outputs = plan_outputs(old_labels, new_labels, self.old_outputs, new_outputs, unit_maps,
                               old_features, new_features)
        if outputs.unit_maps:  # the heads' columns follow their names: label them so
            new_labels = self._relabel(new_graph, new_features, new_labels,
                                       starts=starts_of(new_labels),
                                       unit_maps={**unit_maps, **outputs.unit_maps})
        unit_warnings = check_unit_maps(unit_maps, old_labels, new_labels)
        growth = None
        if policy in PRESERVING_POLICIES:
            new_labels, growth = self._grow(new_graph, new_features, old_labels, new_labels)
        changes = feature_changes(old_labels, new_labels)
        check_inputs_continue(changes, old_labels, allow_unrelated=allow_unrelated)
        plan = build_plan(old_labels, new_labels, policy=policy, old_source=old, growth=growth)
        plan.features = changes
        plan.outputs = outputs.changes
        mark_mean_units(plan, outputs.mean_layers)
        plan.match_reasons = dict(matcher.reasons)
        plan.warnings[:0] = (likely_typos(changes) + unit_warnings + outputs.warnings
                             + matcher.warnings)
        if outputs.breaks:
            plan.preserves_function = False
        plan.old_optimizer = old_optimizer
        plan.warnings.extend(w for w in old.warnings + old.graph().warnings + new_graph.warnings
                             if w not in plan.warnings)
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
        while growth.starts != starts_of(new):
            new = self._relabel(new_graph, new_features, first, starts=growth.starts,
                                unit_maps=new.unit_maps)
            growth = plan_starts(old, new, growth.starts)
        return new, growth

    def _relabel(self, new_graph: ModelGraph, new_features: Any, first: GraphLabels, *,
                 starts: Any, unit_maps: Mapping[str, Sequence[int]]) -> GraphLabels:
        """The new model labelled again, each layer and input continuing what it continued in
        `first`, with other starts or unit choices."""
        return propagate(
            new_graph,
            features=new_features,
            space=first.space,
            match_layer=lambda node, inputs, position: first.records[node.name].identity,
            match_input=lambda spec, index: first.input_identity[spec.name],
            strict=self.strict,
            where="the new model",
            starts=starts,
            unit_maps=unit_maps,
            old_roles=first.old_roles,
        )


def old_roles_of(labels: GraphLabels) -> dict[str, tuple[str, frozenset[str]]]:
    """Per layer of the old model, its class name and the roles of its weights."""
    return {name: (rec.node.class_name, frozenset(w.role for w in rec.result.weights))
            for name, rec in labels.records.items()}


def mark_mean_units(plan: SurgeryPlan, layers: set[str]) -> None:
    """The new units of the named heads in `layers` start as the mean of their old units
    (`init="mean"` in the output spec): their output-side axes that have new units say so."""
    for wp in plan.weights:
        if wp.layer in layers and wp.axes and wp.init is None:
            for amap in wp.axes:
                if amap.kind in OUT_KINDS and (amap.index < 0).any():
                    amap.mean_new = True


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
            "an alignment of the two graphs) and input columns by feature name")
    if not allow_unrelated:
        raise SurgeryError(
            f"{what}. Check that the old model is the one the new model was made from, or pass "
            "allow_unrelated=True to keep the new model's initial values."
        )
    plan.warnings.append(f"{what}; allow_unrelated=True: the new model keeps its initial "
                         "values.")
    plan.preserves_function = False
