"""Feature specifications: names for the columns of a model's inputs, validated against shapes.

A spec maps an input name to a list of entries, each a feature name (one column) or a
`(name, width)` pair (that many consecutive columns)::

    {"obs": ["hp", "mana", ("pos", 2)], "global": ["time"]}

Inputs left out of the spec get unnamed columns, so column i of input "obs" is the feature
`("obs", i)`: appending columns to an unnamed input still keeps the old ones.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from keras_surgery.errors import FeatureSpecError

FeatureSpec = Mapping[str, Sequence["str | tuple[str, int]"]]


@dataclass(frozen=True)
class FeatureColumn:
    """One column of one model input."""

    input: str
    name: str | None
    k: int  # column within the named feature (or the column index when unnamed)

    @property
    def feature(self) -> tuple[str, str | int]:
        """The phi-table key: `(input, name)`, or `(input, column)` for unnamed columns."""
        return (self.input, self.name if self.name is not None else self.k)


def parse_entries(
    input_name: str, entries: object, *, where: str = "model"
) -> list[tuple[str, int]]:
    """Validates one input's entries; returns `(name, width)` pairs."""
    of = f"input '{input_name}' of {where}"
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise FeatureSpecError(
            f"Features of {of} must be a list of names or (name, width) pairs. "
            f"Received: {entries!r}"
        )
    parsed: list[tuple[str, int]] = []
    seen: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            name, width = entry, 1
        elif (
            isinstance(entry, (tuple, list))
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], numbers.Integral)
            and not isinstance(entry[1], bool)
        ):
            name, width = entry[0], int(entry[1])
        else:
            raise FeatureSpecError(
                f"Feature entry of {of} must be a name or a (name, width) pair. "
                f"Received: {entry!r}"
            )
        if not name:
            raise FeatureSpecError(
                f"Feature names of {of} must be non-empty strings. Received: {entry!r}"
            )
        if width < 1:
            raise FeatureSpecError(
                f"Feature '{name}' of {of} must have width >= 1. Received: width={width}"
            )
        if name in seen:
            raise FeatureSpecError(f"Feature name '{name}' appears twice in {of}.")
        seen.add(name)
        parsed.append((name, width))
    return parsed


def feature_columns(
    spec: FeatureSpec | None, inputs: Mapping[str, int | None], *, where: str = "model"
) -> dict[str, list[FeatureColumn]]:
    """Expands a spec into one `FeatureColumn` per column of every input.

    Args:
        spec: the user's feature spec, or None for unnamed columns everywhere.
        inputs: input name -> width of its last axis (None if unknown).
        where: what the spec describes, for error messages (a file name or "new model").

    Returns:
        input name -> its columns in order.

    Raises:
        FeatureSpecError: an unknown input name, widths that do not add up, duplicate names.
    """
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise FeatureSpecError(
            f"Feature spec for {where} must be a mapping from input name to a list of "
            f"features, e.g. {{'obs': ['hp', ('pos', 2)]}}. Received: {type(spec).__name__}"
        )
    spec = dict(spec)
    unknown = sorted(set(spec) - set(inputs), key=str)
    if unknown:
        raise FeatureSpecError(
            f"Feature spec for {where} names input(s) {unknown} that the model does not have. "
            f"Expected input names: {sorted(inputs)}"
        )
    columns: dict[str, list[FeatureColumn]] = {}
    for input_name, width in inputs.items():
        if input_name not in spec:
            columns[input_name] = (
                [FeatureColumn(input_name, None, i) for i in range(width)] if width else []
            )
            continue
        entries = parse_entries(input_name, spec[input_name], where=where)
        total = sum(w for _, w in entries)
        if width is not None and total != width:
            raise FeatureSpecError(
                f"Features of input '{input_name}' of {where} cover {total} column(s) but the "
                f"input's last axis has {width}. Received: {list(spec[input_name])!r}"
            )
        columns[input_name] = [
            FeatureColumn(input_name, name, k) for name, w in entries for k in range(w)
        ]
    return columns
