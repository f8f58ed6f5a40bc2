"""SurgeryCallback: apply a surgery when training starts, once per model."""

from __future__ import annotations

import logging
import os

import keras

from keras_surgery.atomic import write_json
from keras_surgery.features import FeatureSpec
from keras_surgery.graph import restored_from_backup
from keras_surgery.migrate import migrate_weights
from keras_surgery.migrator import ModelMigrator
from keras_surgery.outputs import OutputSpec
from keras_surgery.report import SurgeryReport

logger = logging.getLogger("keras_surgery")

_APPLIED_ATTR = "_keras_surgery_applied"


class SurgeryCallback(keras.callbacks.Callback):
    """Moves the weights of an old `.keras` file into the model being trained.

    The surgery runs in `on_train_begin`, once per model: a second `fit()` does not re-apply it
    (that would wipe what was learned since). With `keras.callbacks.BackupAndRestore`, list the
    backup callback *before* this one: when it restores an interrupted run, the surgery is
    skipped (the restored weights already descend from it). Listed after this one, the restore
    simply overwrites the surgery's result, which is also correct.

    Args:
        old: the old `.keras` file (read as data, never deserialised or written); with
            `old_weights`, the file that gives the old architecture.
        old_features: the old model's feature spec, e.g. `{"obs": ["hp", "mana"]}`.
        new_features: the new model's feature spec.
        old_outputs: the old model's output spec (class names or a vocabulary per output,
            see `migrate_weights`).
        new_outputs: the new model's output spec.
        unit_maps: chosen units of matched layers (see `migrate_weights`).
        old_weights: a weights-only checkpoint (`.weights.h5` or a sharded `.weights.json`)
            with the old values (see `migrate_weights`).
        policy: "preserve" (default), "net2net" or "random" (see `migrate_weights`).
        optimizer: carry the optimizer state (the model is compiled inside `fit`).
        strict: raise UnsupportedLayerError for a layer without a rule.
        verify: check the surgery (see `migrate_weights`).
        allow_unrelated: see `migrate_weights`.
        report_path: write the report there as JSON (atomically).
        verbose: show a progress bar over the weights and log the report summary at INFO
            level (quiet by default, so as not to clutter fit's own output).

    Attributes:
        report: the SurgeryReport, available once training has started (None if skipped).

    Example:
        >>> model.fit(x, y, epochs=10,                                  # doctest: +SKIP
        ...           callbacks=[ks.SurgeryCallback("old.keras",
        ...                                         old_features={"obs": ["hp", "mana"]},
        ...                                         new_features={"obs": ["hp", "xp", "mana"]})])
    """

    def __init__(
        self,
        old: str | os.PathLike,
        *,
        old_features: FeatureSpec | None = None,
        new_features: FeatureSpec | None = None,
        old_outputs: OutputSpec | None = None,
        new_outputs: OutputSpec | None = None,
        unit_maps: dict[str, list[int]] | None = None,
        old_weights: str | os.PathLike | None = None,
        policy: str = "preserve",
        optimizer: bool = True,
        strict: bool = False,
        verify: bool | str = False,
        allow_unrelated: bool = False,
        report_path: str | os.PathLike | None = None,
        verbose: bool = False,
    ):
        super().__init__()
        self.old_path = os.fspath(old)
        self.old_features = old_features
        self.new_features = new_features
        self.old_outputs = old_outputs
        self.new_outputs = new_outputs
        self.unit_maps = unit_maps
        self.old_weights = None if old_weights is None else os.fspath(old_weights)
        self.policy = policy
        self.optimizer = optimizer
        self.strict = strict
        self.verify = verify
        self.allow_unrelated = allow_unrelated
        self.report_path = None if report_path is None else os.fspath(report_path)
        self.verbose = verbose
        self.report: SurgeryReport | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        if getattr(model, _APPLIED_ATTR, None) == self.old_path:
            logger.info("surgery from %s already applied to this model; skipped", self.old_path)
            return
        if restored_from_backup(model):
            logger.info(
                "BackupAndRestore resumed an interrupted run; surgery from %s skipped",
                self.old_path,
            )
            setattr(model, _APPLIED_ATTR, self.old_path)
            return
        if self.verify:
            self.report = migrate_weights(
                self.old_path, model, old_features=self.old_features,
                new_features=self.new_features, old_outputs=self.old_outputs,
                new_outputs=self.new_outputs, unit_maps=self.unit_maps,
                old_weights=self.old_weights, policy=self.policy, optimizer=self.optimizer,
                strict=self.strict, verify=self.verify, allow_unrelated=self.allow_unrelated,
            )
        else:
            with ModelMigrator(self.old_path, old_features=self.old_features,
                               old_outputs=self.old_outputs, old_weights=self.old_weights,
                               strict=self.strict) as migrator:
                plan = migrator.plan(model, new_features=self.new_features,
                                     new_outputs=self.new_outputs, policy=self.policy,
                                     allow_unrelated=self.allow_unrelated,
                                     unit_maps=self.unit_maps)
                self.report = plan.apply(model, optimizer=self.optimizer, verbose=self.verbose)
        setattr(model, _APPLIED_ATTR, self.old_path)
        (logger.info if self.verbose else logger.debug)("%s", self.report.summary())
        for warning in self.report.warnings:
            logger.warning("keras-surgery: %s", warning)
        if self.report_path is not None:
            write_json(self.report_path, self.report.to_dict())
