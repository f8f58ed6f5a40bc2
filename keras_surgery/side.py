"""One side of a surgery (the old model or the new one), resolved once.

A `Side` is made from what the user passed: the path of a `.keras` file or a live
keras.Model. A file is opened once (`KerasFile`: one file descriptor for the config, the
lineage record, the weights and their memory map); its graph, lineage and optimizer layout are
read once and kept. No other module asks whether something is a path: it asks its Side.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import keras

from keras_surgery.errors import SurgeryError
from keras_surgery.features import FeatureSpec
from keras_surgery.graph import ModelGraph, WeightSource, graph_from_model
from keras_surgery.keras_file import KerasFile
from keras_surgery.lineage import LINEAGE_MEMBER, parse_lineage
from keras_surgery.optimizer import OptimizerLayout, file_layout, live_layout


class Side:
    """A `.keras` file or a live keras.Model, as one side of a surgery.

    Args:
        model_or_path: the path of a `.keras` file (read as data, never deserialised) or a
            keras.Model.

    Raises:
        SurgeryError: `model_or_path` is neither.
        SurgeryFileError: the file cannot be opened as a `.keras` file.

    Example:
        >>> with Side("old.keras") as side:                               # doctest: +SKIP
        ...     graph = side.graph()
    """

    def __init__(self, model_or_path: Any, *, weights: str | os.PathLike | None = None):
        if weights is not None:
            raise SurgeryError("old_weights (weights-only checkpoints) are not supported yet.")
        self.path: str | None = None
        self.model: Any = None
        self.file: KerasFile | None = None
        if isinstance(model_or_path, (str, os.PathLike)):
            self.path = os.fspath(model_or_path)
            self.file = KerasFile(self.path)
        else:
            if not isinstance(model_or_path, keras.Model):
                raise SurgeryError(
                    "Expected a path to a .keras file or a keras.Model. "
                    f"Received: {type(model_or_path).__name__}"
                )
            self.model = model_or_path
        self._graph: ModelGraph | None = None
        self._lineage: dict[str, Any] | None = None
        self._lineage_error: SurgeryError | None = None
        if self.file is not None:
            # Read now, while the file is open: a lineage record is small, and saving the new
            # model with its lineage (after this side is closed) needs it.
            try:
                self._lineage = parse_lineage(self.file.member(LINEAGE_MEMBER), self.path)
            except SurgeryError as exc:
                self._lineage_error = exc

    @property
    def is_file(self) -> bool:
        """Whether this side is a file (never run, never deserialised) or a live model."""
        return self.file is not None

    def graph(self) -> ModelGraph:
        """The model's graph, built on first use and kept."""
        if self._graph is None:
            self._graph = self.file.graph() if self.file is not None else graph_from_model(
                self.model)
        return self._graph

    @property
    def weights(self) -> WeightSource:
        """Where this side's values are read: the open file, or the model's variables.

        Raises:
            SurgeryError: the file was closed (its ModelMigrator was closed).
        """
        if self.file is None:
            return self.graph().source
        if self.closed:
            raise SurgeryError(
                f"'{self.path}' was closed after planning (its ModelMigrator was closed); "
                "make a new plan to apply."
            )
        return self.file

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
        if self.file is not None:
            return file_layout(self.graph(), self.file.config, records)
        return live_layout(self.model)

    def sha256(self) -> str:
        """The SHA-256 of the file as it was opened (see `KerasFile.sha256`)."""
        if self.file is None:
            raise SurgeryError("A live model has no file to hash.")
        return self.file.sha256()

    @property
    def description(self) -> str:
        return self.graph().description

    @property
    def closed(self) -> bool:
        return self.file is not None and self.file.closed

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

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
