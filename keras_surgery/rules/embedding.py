"""Rules for token tables: Embedding, and the StringLookup / IntegerLookup layers feeding them.

An Embedding's rows are selected by the *values* of its input, so they are labelled by what
those values stand for (`TokenValues`): the vocabulary token itself when a lookup layer with
an inline vocabulary produced the ids, so a grown or reordered vocabulary keeps every token's
row; otherwise the raw id of the input. New rows are "lookup" indices: the fill rule sets them
to the mean of the old rows, and old inputs never select them.
"""

from __future__ import annotations

from collections.abc import Hashable

import keras
import numpy as np

from keras_surgery.labels import AxisLabels, TensorLabels, TokenValues, token_key
from keras_surgery.registry import register_rule
from keras_surgery.rules.api import RuleCall, RuleResult, check_weights, single_input, weight


def mask_key() -> tuple:
    """The id a lookup reserves for its mask token."""
    return ("token_special", "mask")


def oov_key(k: int, count: int) -> tuple:
    """OOV bucket `k` of `count`: tokens hash differently when the bucket count changes."""
    return ("token_special", "oov", k, count)


def lookup_tokens(config: dict) -> tuple[Hashable, ...] | None:
    """The label key of every id a StringLookup / IntegerLookup (output_mode "int") produces.

    Ids are laid out as Keras's IndexLookup does: the mask token (if any), then the OOV
    buckets, then the vocabulary. A vocabulary that already starts with those special tokens
    is accepted as Keras accepts it. None when the vocabulary is not inline in the config
    (adapted, or read from a file).
    """
    vocabulary = config.get("vocabulary")
    if not isinstance(vocabulary, (list, tuple)):
        return None
    mask_token = config.get("mask_token")
    num_oov = int(config.get("num_oov_indices", 1))
    specials: list[Hashable] = [mask_key()] if mask_token is not None else []
    specials += [oov_key(k, num_oov) for k in range(num_oov)]
    reserved = [mask_token] if mask_token is not None else []
    reserved += [config.get("oov_token")] * num_oov
    terms = list(vocabulary)
    if terms[: len(reserved)] == reserved:
        terms = terms[len(reserved):]
    return tuple(specials) + tuple(token_key(_plain(t)) for t in terms)


def _plain(term: object) -> Hashable:
    # numpy scalars from a live layer's config hash like their Python values; bytes do not.
    if isinstance(term, bytes):
        return term.decode("utf-8")
    return term.item() if isinstance(term, np.generic) else term  # type: ignore[return-value]


def index_lookup_rule(call: RuleCall) -> RuleResult:
    """StringLookup / IntegerLookup with output_mode "int": the same index labels as the input,
    and the meaning of every id it produces (`TokenValues`), read from the vocabulary."""
    x = single_input(call)
    config = call.config
    if config.get("invert", False):
        raise ValueError("invert=True (ids to tokens) has no rule")
    if config.get("output_mode", "int") != "int":
        raise ValueError(f"output_mode={config.get('output_mode')!r} has no rule (only 'int')")
    tokens = lookup_tokens(config)
    warnings = []
    if tokens is None:
        warnings.append(
            f"{call.describe()}: its vocabulary is not in the model config (adapted, or read "
            "from a file), so tables it indexes (Embedding rows) are matched by id, not by token; "
            "pass the vocabulary as a list to keep each token's row when the vocabulary changes."
        )
        meaning = TokenValues(call.identity)
    else:
        meaning = TokenValues(call.identity, tokens)
    return RuleResult([x], check_weights(call, []), warnings=warnings, values=[meaning])


def _table_axes(call: RuleCall, x: TensorLabels) -> tuple[AxisLabels, AxisLabels]:
    """The rows (by the token each id stands for) and the columns (units) of a token table
    indexed by `x`."""
    meaning = call.input_values[0] if call.input_values else None
    if meaning is None:
        meaning = TokenValues(call.identity)  # ids computed inside the model: by id
    dep = call.union(*x)
    input_dim = call.weight_backed(int(call.config["input_dim"]), "input_dim")
    rows = AxisLabels(
        call.space.intern_many(meaning.keys(input_dim)), np.full(input_dim, dep, np.int64)
    )
    return rows, call.units(int(call.config["output_dim"]), dep)


def embedding_rule(call: RuleCall) -> RuleResult:
    """Embedding: rows ("lookup") labelled by the tokens its ids stand for; columns are units.

    The output is the input's axes (time positions) followed by the embedding dimension.
    """
    x = single_input(call)
    rows, dim = _table_axes(call, x)
    weights = [weight("embeddings", ("lookup", rows), ("out", dim))]
    return RuleResult([tuple(x) + (dim,)], check_weights(call, weights))


def reversible_embedding_rule(call: RuleCall) -> RuleResult:
    """ReversibleEmbedding (keras.layers, keras-hub): an Embedding that, called with
    `reverse=True`, projects hidden states back onto its rows (the logits of a language model:
    `hidden @ embeddings^T`, or `hidden @ reverse_embeddings` when `tie_weights=False`).

    Rows are labelled by token in both directions, so a grown or reordered vocabulary keeps
    each token's row and its logit. A reverse call labels the rows as the layer's first call
    did. With tied weights and a reverse call, new embedding columns start at 0: a new hidden
    unit must not reach the old logits.
    """
    tied = bool(call.config.get("tie_weights", True))
    positional = call.positional_inputs() or call.inputs
    if not positional:
        raise ValueError(f"{call.describe()} has no input")
    x = positional[0]
    if call.call_kwargs.get("reverse"):
        if call.earlier is not None and call.earlier.weights:
            rows, dim = (a.labels for a in call.earlier.weights[0].axes)
        else:
            rows, dim = _table_axes(call, x[:-1])
        hidden = x[-1]
        logits = AxisLabels(rows.ids, np.full(len(rows.deps), call.union(hidden), np.int64))
        if tied:
            weights = [weight("embeddings", ("out", rows), ("in", hidden))]
        else:
            weights = [weight("embeddings", ("lookup", rows), ("out", dim)),
                       weight("reverse_embeddings", ("in", hidden), ("out", rows))]
        return RuleResult([tuple(x[:-1]) + (logits,)], check_weights(call, weights))
    rows, dim = _table_axes(call, x)
    reversed_too = any(c.kwargs.get("reverse") for c in call.layer.calls)
    weights = [weight("embeddings", ("lookup", rows), ("out", dim, tied and reversed_too))]
    if not tied:
        weights.append(weight("reverse_embeddings", ("in", dim), ("out", rows)))
    return RuleResult([tuple(x) + (dim,)], check_weights(call, weights))


# A masked padding id changes what the layers after an embedding compute.
EMBEDDING_KEYS = ("mask_zero",)

register_rule(keras.layers.Embedding, embedding_rule, function_keys=EMBEDDING_KEYS)
register_rule(keras.layers.StringLookup, index_lookup_rule, function_keys=("invert", "output_mode"))
register_rule(keras.layers.IntegerLookup, index_lookup_rule,
              function_keys=("invert", "output_mode"))
if hasattr(keras.layers, "ReversibleEmbedding"):  # Keras >= 3.15 (keras-hub's before: by name)
    register_rule(keras.layers.ReversibleEmbedding, reversible_embedding_rule,
                  function_keys=EMBEDDING_KEYS)
