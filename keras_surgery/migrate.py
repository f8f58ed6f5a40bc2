"""`migrate_weights`: the one-call front door onto the surgery pipeline."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from keras_surgery.features import FeatureSpec
from keras_surgery.graph import reused_saving_walk
from keras_surgery.migrator import ModelMigrator
from keras_surgery.outputs import OutputSpec
from keras_surgery.report import SurgeryReport
from keras_surgery.side import Side
from keras_surgery.verify.surgery import (
    require_gradient_evidence,
    snapshot,
    verify_mode,
    verify_new_labels,
    verify_surgery,
)


def migrate_weights(
    old: Any,
    new_model: Any,
    *,
    old_features: FeatureSpec | None = None,
    new_features: FeatureSpec | None = None,
    old_outputs: OutputSpec | None = None,
    new_outputs: OutputSpec | None = None,
    unit_maps: Mapping[str, Sequence[int]] | None = None,
    old_weights: str | os.PathLike | None = None,
    policy: str = "preserve",
    optimizer: bool = True,
    strict: bool = False,
    verify: bool | str = False,
    allow_unrelated: bool = False,
    undo: bool = True,
) -> SurgeryReport:
    """Moves the weights of `old` into the modified `new_model`, in place.

    Every weight index is labelled with what it means (which input feature, which unit of which
    layer); what matches is copied wherever it moved, the rest is initialised so that the new
    model computes exactly the old function: zeros where a new input feeds an old unit, the new
    model's fresh initial values for new units.

    Args:
        old: path of the old `.keras` file (read as data, never deserialised) or a keras.Model.
        new_model: the built new keras.Model; its variables are overwritten, all or nothing.
        old_features: names of the old model's input columns, e.g. `{"obs": ["hp", "mana"]}`.
        new_features: the same for the new model; features are matched by name.
        old_outputs: names of the old model's output columns, per output: class names
            (`{"species": ["cat", "dog"]}`) or a vocabulary for a logits head
            (`{"logits": {"vocabulary": [...]}}`). With `new_outputs`, a head's columns
            follow their names through reordering and growth (see `keras_surgery.outputs`).
        new_outputs: the same for the new model.
        unit_maps: chosen units of matched layers, `{new layer name: [old unit index or -1,
            per new unit]}`: keep, drop or reorder units (pruning, as keras-surgeon's
            `delete_channels`); every weight that reads them follows (the next layers' input
            rows, BatchNorm statistics, LSTM gate blocks, Flatten positions). Dropped units are
            named in the warnings; dropping units whose outgoing weights are all exactly zero
            keeps the old function.
        policy: "preserve" (default; exact preservation where possible), "net2net" (the same,
            but new units of a widened layer start as copies of old units, their outgoing
            weights split among the copies: Net2WiderNet), "duplicate" (the same with every
            unit of a role that grows by an integer factor k duplicated k times: new unit j
            copies old unit j mod d_old, each copy reading 1/k of it, which keeps
            LayerNormalizations over a grown residual stream exact: GPT-2 and BERT hidden_dim
            growth by Staged Training's operator; tied logits through a final LayerNorm divide
            its gamma and beta by k; a non-integer factor is reported) or "random" (copy full
            matches, keep fresh values everywhere else). Under the preserving policies a new
            layer inserted between old layers starts as the identity and a new residual branch
            at zero.
        optimizer: carry the optimizer state through the surgery: Adam's moments, momentum,
            ... follow their variables through the same index maps (zeros where new), and
            `iterations` is copied. Needs a compiled new model; the report says what was not
            migrated and why.
        strict: raise UnsupportedLayerError for a layer without a rule instead of treating it
            as opaque with a warning.
        verify: check the surgery, independently of the labels it was planned with. The new
            model's labels are checked against gradients of a probe copy (`verify_mapping`).
            When `old` is a live keras.Model, old and new are also run on the same random
            inputs (removed features 0 in the old input) and the old outputs compared
            (`check_preservation`); that numeric check decides, and a label disagreement is
            added to the warnings. An old *file* is never run, since that would deserialise
            it: a warning says so, and then the gradient check decides. `True` (or "raise")
            raises SurgeryError on failure - when the report promised preservation and the
            outputs differ, or (old file) when the gradients show dependencies the labels miss;
            the new model is left with its values from before. "warn" adds the failure to
            `report.warnings` and sets `preserves_function` to False instead. What was checked
            is in `report.verification`.
        allow_unrelated: accept an old model that has nothing in common with the new one
            (no weight value copied; the new model keeps its initial values, with a warning),
            or an input none of whose old features is among the new ones. By default both
            raise, as they almost always mean the wrong old model or a feature spec given for
            one side only.
        undo: keep an undo journal while writing (default), so that a migration that fails
            or is interrupted after its first write leaves `new_model` as it was: each
            variable's current value is copied out first (in memory up to 64 MB, then to an
            anonymous temporary file), which costs about as much as the copies themselves on
            a large model. False skips it, for a model built only to be migrated into: a
            failure then leaves it partly written, and the error says so.

    Returns:
        SurgeryReport with `preserves_function`, `warnings`, `summary()` and `to_dict()`.

    Raises:
        FeatureSpecError: a feature or output spec that does not fit its model (wrong widths,
            an unknown input or output name), or an input none of whose old features
            continues (see `allow_unrelated`).
        SurgeryFileError: the old file (or `old_weights`) cannot be read as what it claims
            to be, or changed while it was read; the new model is left as it was.
        UnsupportedLayerError: `strict=True` and a layer has no rule.
        SurgeryError: anything else that stops the surgery (the base class of the above);
            the new model is left as it was.

    Input and output names are the models' own: `[t.name for t in model.inputs]` (the
    `keras.Input(name=...)`) and `model.output_names` (the names of the output layers).

    Example:
        >>> report = ks.migrate_weights(                                  # doctest: +SKIP
        ...     "old.keras", new_model,
        ...     old_features={"obs": ["hp", "mana"]},
        ...     new_features={"obs": ["hp", "armor", "mana"]})
        >>> report.preserves_function
        True
    """
    mode = verify_mode(verify)
    with Side(old, weights=old_weights) as side:
        return _migrate(side, new_model, mode, old_features=old_features,
                        new_features=new_features, old_outputs=old_outputs,
                        new_outputs=new_outputs, policy=policy, optimizer=optimizer,
                        strict=strict, allow_unrelated=allow_unrelated, unit_maps=unit_maps,
                        undo=undo)


def _migrate(side: Side, new_model: Any, mode: str | None, *, old_features: Any,
             new_features: Any, old_outputs: Any, new_outputs: Any, policy: str,
             optimizer: bool, strict: bool, allow_unrelated: bool,
             unit_maps: Any, undo: bool = True) -> SurgeryReport:
    """`migrate_weights` on the opened old side (the file is read through it, once)."""
    mapping = None
    if mode is not None:
        mapping = verify_new_labels(new_model, features=new_features, strict=strict)
        if mode == "raise" and side.is_file:
            # Without the old model to run, the gradients are the only evidence: stop before
            # any weight is written.
            require_gradient_evidence(mapping)
    with reused_saving_walk():  # nothing runs between planning and applying
        plan = ModelMigrator(side, old_features=old_features, old_outputs=old_outputs,
                             strict=strict).plan(
            new_model, new_features=new_features, new_outputs=new_outputs, policy=policy,
            allow_unrelated=allow_unrelated, unit_maps=unit_maps,
        )
        restore = snapshot(new_model) if mode == "raise" and not side.is_file else None
        report = plan.apply(new_model, optimizer=optimizer, undo=undo)
    if mode is not None:
        verify_surgery(side.model, new_model, plan, report, mapping, mode, restore)
    return report
