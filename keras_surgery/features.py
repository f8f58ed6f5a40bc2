"""Feature specifications: names for the columns of a model's inputs, validated against shapes.

A spec maps an input name to a list of entries, each a feature name (one column) or a
`(name, width)` pair (that many consecutive columns)::

    {"obs": ["hp", "mana", ("pos", 2)], "global": ["time"]}

Inputs left out of the spec get unnamed columns, so column i of input "obs" is the feature
`("obs", i)`: appending columns to an unnamed input still keeps the old ones.

An input of token ids can name what its ids stand for instead, with a mapping holding its
tokenizer's vocabulary (a list: the token of id 0, of id 1, ...; or a mapping token -> id) and,
optionally, its columns::

    {"token_ids": {"vocabulary": word_piece_tokenizer.get_vocabulary()}}
    {"token_ids": {"vocabulary": byte_pair_tokenizer.vocabulary}}

Tables its ids index (embedding rows, the logits of a tied output projection) are then
labelled by token, so a grown or reordered vocabulary keeps each token's row.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

from keras_surgery.errors import FeatureSpecError

FeatureSpec = Mapping[str, "Sequence[str | tuple[str, int]] | Mapping[str, Sequence]"]
VOCABULARY_KEYS = frozenset({"vocabulary", "columns"})


class FeatureColumn(NamedTuple):
    """One column of one model input (a named tuple: models with 100k columns make 100k)."""

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
        if isinstance(spec.get(input_name), Mapping):
            _vocabulary(input_name, spec[input_name], where)  # validated here, read apart
            if "columns" in spec[input_name]:
                spec[input_name] = spec[input_name]["columns"]
            else:
                del spec[input_name]
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


def vocabularies(spec: FeatureSpec | None, *, where: str = "model") -> dict[str, tuple]:
    """Input name -> the token of each id, for the inputs whose spec gives a vocabulary.

    Raises:
        FeatureSpecError: a vocabulary that is not a list of distinct strings or integers.
    """
    if not isinstance(spec, Mapping):
        return {}
    return {
        name: _vocabulary(name, entry, where)
        for name, entry in spec.items()
        if isinstance(entry, Mapping)
    }


def _vocabulary(input_name: str, entry: Mapping, where: str) -> tuple[Hashable, ...]:
    of = f"input '{input_name}' of {where}"
    unknown = sorted(set(entry) - VOCABULARY_KEYS, key=str)
    if unknown or "vocabulary" not in entry:
        raise FeatureSpecError(
            f"The spec of {of} is a mapping, so it must hold a 'vocabulary' (the token of each "
            f"id) and optionally 'columns'. Received keys: {sorted(entry, key=str)}"
        )
    terms = entry["vocabulary"]
    if isinstance(terms, Mapping):  # token -> id, as BPE tokenizers keep it
        terms = _by_id(terms, of)
    if isinstance(terms, (str, bytes)) or not isinstance(terms, Sequence):
        raise FeatureSpecError(
            f"The vocabulary of {of} must be a list of tokens (strings or integers; the token "
            f"of id 0 first) or a mapping token -> id. Received: {type(terms).__name__}"
        )
    tokens: list[Hashable] = []
    seen: set[Hashable] = set()
    for term in terms:
        if isinstance(term, bytes):
            term = term.decode("utf-8")
        if isinstance(term, bool) or not isinstance(term, (str, numbers.Integral)):
            raise FeatureSpecError(
                f"The vocabulary of {of} must hold strings or integers. Received: {term!r}"
            )
        token = term if isinstance(term, str) else int(term)
        if token in seen:
            raise FeatureSpecError(
                f"Token {token!r} appears twice in the vocabulary of {of}: its rows would be "
                "ambiguous."
            )
        seen.add(token)
        tokens.append(token)
    return tuple(tokens)


def _by_id(token_ids: Mapping, of: str) -> list:
    """The tokens of a token -> id mapping in id order; the ids must be 0, 1, ..., n-1."""
    ids = list(token_ids.values())
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids) or (
        sorted(int(i) for i in ids) != list(range(len(ids)))
    ):
        raise FeatureSpecError(
            f"The vocabulary mapping of {of} must map tokens to the ids 0..{len(ids) - 1}, "
            "each once."
        )
    tokens: list = [None] * len(ids)
    for token, i in token_ids.items():
        tokens[int(i)] = token
    return tokens
