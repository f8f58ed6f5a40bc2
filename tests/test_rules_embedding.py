"""Embedding and lookup rules: a grown, reordered vocabulary keeps every token's row, new token
rows start as the mean of the old rows, and the old outputs on old tokens are unchanged."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import assert_input_sensitive, max_diff, predict, randomize, to_numpy

T = 10  # tokens per sequence
TOL = 1e-5
OLD_VOCAB = ["cat", "dog", "fish", "bird", "cow"]
NEW_VOCAB = ["bird", "ant", "dog", "cow", "cat", "emu", "fish"]  # grown and reordered


def text_model(vocab, *, dim: int = 8, **lookup_kwargs) -> keras.Model:
    tokens = keras.Input((T,), dtype="string", name="tokens")
    lookup = keras.layers.StringLookup(vocabulary=vocab, name="lookup", **lookup_kwargs)
    ids = lookup(tokens)
    vectors = keras.layers.Embedding(lookup.vocabulary_size(), dim, name="embed")(ids)
    state = keras.layers.LSTM(6, name="rnn")(vectors)
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(state))


def token_batch(words, seed: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array(words, dtype=object), size=(n, T))


def make_old(model, data, other, tmp_path):
    randomize(model, data)
    assert_input_sensitive(model, data, other)
    path = tmp_path / "old.keras"
    model.save(path)
    return str(path)


def row_of(model, token: str) -> int:
    return int(to_numpy(model.get_layer("lookup")(np.array([token])))[0])


def embeddings(model) -> np.ndarray:
    return np.asarray(model.get_layer("embed").embeddings.numpy())


@pytest.mark.tensorflow_only  # a model with a string Input runs on TensorFlow only
@pytest.mark.parametrize(
    "lookup_kwargs",
    [{}, {"mask_token": "", "num_oov_indices": 2}],
    ids=["oov1", "mask-oov2"],
)
def test_grown_reordered_vocabulary_keeps_each_tokens_row(lookup_kwargs, tmp_path):
    old = text_model(OLD_VOCAB, **lookup_kwargs)
    # "zebra" is out of vocabulary in both models: it must keep using the same OOV row.
    words = OLD_VOCAB + ["zebra"]
    data = token_batch(words, 0)
    path = make_old(old, data, token_batch(words, 1), tmp_path)
    new = text_model(NEW_VOCAB, **lookup_kwargs)

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    assert max_diff(predict(new, data), predict(old, data)) <= TOL
    old_e, new_e = embeddings(old), embeddings(new)
    old_rows = [row_of(old, t) for t in OLD_VOCAB]
    new_rows = [row_of(new, t) for t in OLD_VOCAB]
    assert old_rows != new_rows  # the vocabulary really moved
    np.testing.assert_array_equal(np.take(new_e, new_rows, axis=0), np.take(old_e, old_rows, 0))
    token_start = len(new_e) - len(NEW_VOCAB)  # mask and OOV ids come first
    np.testing.assert_array_equal(new_e[:token_start], old_e[:token_start])
    # New tokens start as the mean of the rows that were carried over (all old rows here).
    for token in ("ant", "emu"):
        np.testing.assert_allclose(new_e[row_of(new, token)], old_e.mean(axis=0), atol=1e-6)


@pytest.mark.tensorflow_only  # a model with a string Input runs on TensorFlow only
def test_removed_token_breaks_preservation_with_a_warning(tmp_path):
    old = text_model(OLD_VOCAB)
    data = token_batch(OLD_VOCAB, 2)
    path = make_old(old, data, token_batch(OLD_VOCAB, 3), tmp_path)
    new = text_model([t for t in OLD_VOCAB if t != "dog"])

    report = ks.migrate_weights(path, new)

    assert not report.preserves_function
    assert any("embed" in w and "dog" in w for w in report.warnings), report.warnings
    assert max_diff(predict(new, data), predict(old, data)) > 1e-3  # "dog" is OOV now
    kept = [t for t in OLD_VOCAB if t != "dog"]
    np.testing.assert_array_equal(
        np.take(embeddings(new), [row_of(new, t) for t in kept], axis=0),
        np.take(embeddings(old), [row_of(old, t) for t in kept], axis=0),
    )


def test_integer_lookup_vocabulary(tmp_path):
    def build(vocab) -> keras.Model:
        ids = keras.Input((T,), dtype="int64", name="ids")
        lookup = keras.layers.IntegerLookup(vocabulary=vocab, name="lookup")
        vectors = keras.layers.Embedding(lookup.vocabulary_size(), 4, name="embed")(lookup(ids))
        return keras.Model(ids, keras.layers.LSTM(5, name="rnn")(vectors))

    old_vocab, new_vocab = [7, 3, 42, 11], [42, 5, 7, 11, 3]
    rng = np.random.default_rng(4)
    data = rng.choice(np.array(old_vocab + [99]), size=(4, T))
    old = build(old_vocab)
    path = make_old(old, data, rng.choice(np.array(old_vocab), size=(4, T)), tmp_path)
    new = build(new_vocab)

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    assert max_diff(predict(new, data), predict(old, data)) <= TOL
    np.testing.assert_array_equal(
        np.take(embeddings(new), [1 + new_vocab.index(v) for v in old_vocab], axis=0),
        embeddings(old)[1:],
    )


def id_model(input_dim: int, dim: int) -> keras.Model:
    ids = keras.Input((T,), dtype="int32", name="ids")
    vectors = keras.layers.Embedding(input_dim, dim, name="embed")(ids)
    return keras.Model(ids, keras.layers.LSTM(6, return_sequences=True, name="rnn")(vectors))


def test_raw_ids_more_rows_and_a_wider_embedding(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 10, size=(4, T))
    old = id_model(10, 8)
    path = make_old(old, data, rng.integers(0, 10, size=(4, T)), tmp_path)
    new = id_model(14, 12)

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    assert max_diff(predict(new, data), predict(old, data)) <= TOL
    old_e, new_e = embeddings(old), embeddings(new)
    np.testing.assert_array_equal(new_e[:10, :8], old_e)  # rows by id, old columns
    np.testing.assert_allclose(new_e[10:, :8], np.tile(old_e.mean(axis=0), (4, 1)), atol=1e-6)
    # New embedding columns are new units: fresh in the table, zero rows into the LSTM.
    assert np.abs(new_e[:, 8:]).max() > 0
    lstm_kernel = new.get_layer("rnn").cell.kernel.numpy()
    np.testing.assert_array_equal(lstm_kernel[8:], 0.0)
    np.testing.assert_array_equal(lstm_kernel[:8], old.get_layer("rnn").cell.kernel.numpy())


def test_adapted_vocabulary_warns_rows_match_by_id(tmp_path):
    def build() -> keras.Model:
        tokens = keras.Input((T,), dtype="string", name="tokens")
        lookup = keras.layers.StringLookup(name="lookup")
        lookup.adapt(np.array(OLD_VOCAB))
        vectors = keras.layers.Embedding(lookup.vocabulary_size(), 4, name="embed")(
            lookup(tokens)
        )
        return keras.Model(tokens, vectors)

    old = build()
    path = tmp_path / "old.keras"
    old.save(path)

    plan = ks.ModelMigrator(str(path)).plan(build())

    assert any("lookup" in w and "matched by id" in w for w in plan.warnings), plan.warnings
