"""Opening either side of a surgery: a `.keras` path or a live keras.Model, as a ModelGraph."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from keras_surgery.errors import SurgeryError
from keras_surgery.graph import ModelGraph, graph_from_model
from keras_surgery.keras_file import KerasFile


def is_path(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike))


@contextlib.contextmanager
def open_graph(model_or_path: Any) -> Iterator[ModelGraph]:
    """The graph of a model or file; a file is closed when the block ends."""
    if is_path(model_or_path):
        with KerasFile(model_or_path) as source:
            yield source.graph()
        return
    try:
        import keras
    except ImportError as exc:  # pragma: no cover
        raise SurgeryError("keras is required") from exc
    if not isinstance(model_or_path, keras.Model):
        raise SurgeryError(
            "Expected a path to a .keras file or a keras.Model. "
            f"Received: {type(model_or_path).__name__}"
        )
    yield graph_from_model(model_or_path)
