"""One side of a surgery (the old model or the new one), resolved once.

A `Side` is made from what the user passed: the path of a `.keras` file or a live
keras.Model. A file is opened once (`KerasFile`: one file descriptor for the config, the
lineage record, the weights and their memory map); its graph, lineage and optimizer layout are
read once and kept. No other module asks whether something is a path: it asks its Side.

With `weights=` (a weights-only checkpoint, `keras_surgery.weights_file`), the file or model
gives the architecture (and a file its lineage and recorded features) and the checkpoint gives
every value: the graph is the architecture's, checked against the checkpoint and reading from
it (`fitted_graph`). A live model's own values are then never read, and the side counts as a
file (never run).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import keras

from keras_surgery.errors import SurgeryError, SurgeryFileError
from keras_surgery.features import FeatureSpec
from keras_surgery.graph import ModelGraph, WeightSource, graph_from_model
from keras_surgery.keras_file import WEIGHTS_ONLY_ADVICE, KerasFile
from keras_surgery.lineage import LINEAGE_MEMBER, parse_lineage
from keras_surgery.optimizer import OPTIMIZER_PREFIX, OptimizerLayout, file_layout, live_layout
from keras_surgery.weights_file import WeightsFile, fitted_graph, is_weights_only


class Side:
    """A `.keras` file or a live keras.Model, as one side of a surgery.

    Args:
        model_or_path: the path of a `.keras` file (read as data, never deserialised) or a
            keras.Model.
        weights: a weights-only checkpoint (`.weights.h5`, or the `.weights.json` index of a
            sharded one) holding the values; `model_or_path` then gives only the architecture.

    Attributes:
        path: the file the values are read from (the checkpoint when `weights` is given);
            None for a live model.
        architecture_path: the `.keras` file that gives the architecture, if any.
        model: the live model whose values are read (None when `weights` is given).
        warnings: what the side could not provide (optimizer state a checkpoint lacks),
            for the report.

    Raises:
        SurgeryError: `model_or_path` is neither.
        SurgeryFileError: the file cannot be opened as a `.keras` file (a weights-only file
            without `weights` says how to pass it), or `weights` cannot be read or does not
            fit the architecture.

    Example:
        >>> with Side("old.keras") as side:                               # doctest: +SKIP
        ...     graph = side.graph()
        >>> with Side(arch_model, weights="ckpt.weights.h5") as side:    # doctest: +SKIP
        ...     kernel = side.weights.read("layers/dense/vars/0")
    """

    def __init__(self, model_or_path: Any, *, weights: str | os.PathLike | None = None):
        self.path: str | None = None
        self.architecture_path: str | None = None
        self.model: Any = None
        self.file: KerasFile | None = None
        self.weights_file: WeightsFile | None = None
        self.warnings: list[str] = []
        self._architecture: Any = None  # a live model giving only the architecture
        if isinstance(model_or_path, (str, os.PathLike)):
            self.path = self.architecture_path = os.fspath(model_or_path)
            if weights is None and is_weights_only(self.path):
                raise SurgeryFileError(f"'{self.path}' is a weights-only file: "
                                       + WEIGHTS_ONLY_ADVICE)
            self.file = KerasFile(self.path)
        else:
            if not isinstance(model_or_path, keras.Model):
                raise SurgeryError(
                    "Expected a path to a .keras file or a keras.Model. "
                    f"Received: {type(model_or_path).__name__}"
                )
            if weights is None:
                self.model = model_or_path
            else:
                self._architecture = model_or_path
        if weights is not None:
            try:
                self.weights_file = WeightsFile(weights)
            except BaseException:
                self.close()
                raise
            self.path = self.weights_file.path
        self._graph: ModelGraph | None = None
        self._lineage: dict[str, Any] | None = None
        self._lineage_error: SurgeryError | None = None
        if self.file is not None:
            # Read now, while the file is open: a lineage record is small, and saving the new
            # model with its lineage (after this side is closed) needs it.
            try:
                self._lineage = parse_lineage(self.file.member(LINEAGE_MEMBER),
                                              self.architecture_path)
            except SurgeryError as exc:
                self._lineage_error = exc

    @property
    def is_file(self) -> bool:
        """Whether this side's values come from a file (never run, never deserialised) or
        from a live model."""
        return self.file is not None or self.weights_file is not None

    def graph(self) -> ModelGraph:
        """The model's graph, built on first use and kept; with a weights-only checkpoint, the
        architecture's graph checked against it and reading from it."""
        if self._graph is None:
            if self.file is not None:
                graph = self.file.graph()
            else:
                graph = graph_from_model(self.model if self._architecture is None
                                         else self._architecture)
            if self.weights_file is not None:
                graph = fitted_graph(graph, self.weights_file)
            self._graph = graph
        return self._graph

    @property
    def weights(self) -> WeightSource:
        """Where this side's values are read: the open file, or the model's variables.

        Raises:
            SurgeryError: the file was closed (its ModelMigrator was closed).
        """
        if not self.is_file:
            return self.graph().source
        if self.closed:
            raise SurgeryError(
                f"'{self.path}' was closed after planning (its ModelMigrator was closed); "
                "make a new plan to apply."
            )
        return self.weights_file if self.weights_file is not None else self.file

    def lineage(self) -> dict[str, Any] | None:
        """The file's lineage record (`keras_surgery.lineage`); None for a live model or a
        file without one."""
        if self._lineage_error is not None:
            raise self._lineage_error
        return self._lineage

    def features(self, given: FeatureSpec | None) -> FeatureSpec | None:
        """The feature spec to label this side with: `given`, else the file's recorded one."""
        if given is not None or self.file is None:
            return given
        return (self.lineage() or {}).get("features")

    def optimizer_layout(self, records: Mapping[str, Any]) -> OptimizerLayout | None:
        """Where the optimizer variables are and which variable each slot follows; `records`
        are this side's labelled layers (a file's trainable variables come from them)."""
        if self.weights_file is not None:
            return self._checkpoint_layout(records)
        if self.file is not None:
            return file_layout(self.graph(), self.file.config, records)
        return live_layout(self.model)

    def _checkpoint_layout(self, records: Mapping[str, Any]) -> OptimizerLayout | None:
        """The optimizer layout of a weights-only checkpoint: its optimizer variables, with the
        optimizer class the architecture names (a `.keras` file's compile config, or the live
        model's optimizer). None, with a warning in `self.warnings`, when the checkpoint holds
        no optimizer state or it cannot be told whose it is."""
        checkpoint = self.weights_file
        assert checkpoint is not None
        graph = self.graph()
        if not any(p.startswith(OPTIMIZER_PREFIX) for p in checkpoint.paths()):
            self._warn(f"optimizer state was not migrated: '{checkpoint.path}' holds no "
                       "optimizer variables (saved before the optimizer was built, or without "
                       "one).")
            return None
        config = self.file.config if self.file is not None else _live_compile_config(
            self._architecture)
        layout = file_layout(graph, config, records)
        if layout is None:
            self._warn(f"optimizer state was not migrated: '{checkpoint.path}' holds optimizer "
                       f"variables, but the architecture ({self.graph_architecture}) names no "
                       "optimizer; give a compiled model (or a .keras file saved from one) as "
                       "the architecture to carry it.")
            return None
        opt = config["compile_config"]["optimizer"]
        expected = (opt.get("config") or {}).get("name") if isinstance(opt, dict) else None
        stored = checkpoint.group_name(OPTIMIZER_PREFIX.split("/")[0])
        # Keras makes names unique per process ("adam", "adam_1"): the base names must agree.
        if isinstance(expected, str) and stored is not None and _base_name(stored) != _base_name(
                expected):
            self._warn(f"optimizer state was not migrated: the optimizer variables of "
                       f"'{checkpoint.path}' belong to optimizer '{stored}', the architecture's "
                       f"optimizer is '{expected}' ({layout.class_name}).")
            return None
        return layout

    @property
    def graph_architecture(self) -> str:
        """How messages name what gives the architecture."""
        if self.architecture_path is not None:
            return f"'{self.architecture_path}'"
        model = self._architecture if self._architecture is not None else self.model
        return f"model '{model.name}'"

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def sha256(self) -> str:
        """The SHA-256 of the file the values were read from, as it was opened (see
        `KerasFile.sha256`, `WeightsFile.sha256`)."""
        if self.weights_file is not None:
            return self.weights_file.sha256()
        if self.file is None:
            raise SurgeryError("A live model has no file to hash.")
        return self.file.sha256()

    @property
    def description(self) -> str:
        return self.graph().description

    @property
    def closed(self) -> bool:
        return (self.file is not None and self.file.closed) or (
            self.weights_file is not None and self.weights_file.closed)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.weights_file is not None:
            self.weights_file.close()

    def __enter__(self) -> Side:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def opened(model_or_path_or_side: Any) -> Iterator[Side]:
    """The Side of a model or path, closed when the block ends; a Side passed in is used as it
    is and left open (its owner closes it)."""
    if isinstance(model_or_path_or_side, Side):
        yield model_or_path_or_side
        return
    with Side(model_or_path_or_side) as side:
        yield side


def _base_name(name: str) -> str:
    """A Keras object name without the "_<n>" suffix Keras adds to make it unique."""
    return re.sub(r"_\d+$", "", name)


def _live_compile_config(model: Any) -> dict[str, Any]:
    """A compile config naming the optimizer of a live model (empty when it has none), as a
    `.keras` file records it."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return {}
    return {"compile_config": {"optimizer": keras.optimizers.serialize(optimizer)}}
