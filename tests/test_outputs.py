"""Output specs (`old_outputs` / `new_outputs`): a head's columns follow their class names or
tokens through reordering, growth and removal (np.take oracles on the head's weights, exact
logits of the old columns), new columns start fresh or at the mean of the old ones, and a head
that follows positions under a changed vocabulary is named in the warnings."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.errors import FeatureSpecError
from keras_surgery.plan import SurgeryPlan
from tests.util import assert_input_sensitive, max_diff, predict, preservation_bound, randomize

L = keras.layers
OLD_CLASSES = ["cat", "dog", "bird"]
NEW_CLASSES = ["bird", "cat", "fox", "dog"]  # reordered, one added


def _np(v):
    return keras.ops.convert_to_numpy(v)


def _classifier(n_classes, seed, activation=None):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="obs")
    h = L.Dense(6, activation="relu", name="h")(x)
    return keras.Model(x, L.Dense(n_classes, activation=activation, name="species")(h))


def _old_classifier(activation=None):
    old = _classifier(len(OLD_CLASSES), 0, activation)
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(32, 4)).astype("float32")
    randomize(old, batch)
    assert_input_sensitive(old, batch[:16], batch[16:])
    return old, batch


def _columns(old_names, new_names):
    """Per old column, the new column of the same name (the np.take oracle's indices)."""
    return [list(new_names).index(n) for n in old_names if n in new_names]


@pytest.mark.parametrize("init", ["fresh", "mean"])
def test_classes_reordered_and_grown_follow_their_names(init):
    old, x = _old_classifier()
    new = _classifier(len(NEW_CLASSES), 1)
    fresh_kernel = _np(new.get_layer("species").kernel).copy()
    report = ks.migrate_weights(
        old, new, old_outputs={"species": OLD_CLASSES},
        new_outputs={"species": {"classes": NEW_CLASSES, "init": init}},
    )
    at = _columns(OLD_CLASSES, NEW_CLASSES)  # cat -> 1, dog -> 3, bird -> 0
    old_k, new_k = _np(old.get_layer("species").kernel), _np(new.get_layer("species").kernel)
    old_b, new_b = _np(old.get_layer("species").bias), _np(new.get_layer("species").bias)
    np.testing.assert_array_equal(np.take(new_k, at, axis=1), old_k)
    np.testing.assert_array_equal(np.take(new_b, at), old_b)
    fox = NEW_CLASSES.index("fox")
    if init == "mean":
        # float32 means summed in any order: a few epsilons at the scale of the values
        np.testing.assert_allclose(new_k[:, fox], old_k.mean(axis=1), rtol=0,
                                   atol=preservation_bound(old_k))
        np.testing.assert_allclose(new_b[fox], old_b.mean(), rtol=0,
                                   atol=preservation_bound(old_b))
    else:
        np.testing.assert_array_equal(new_k[:, fox], fresh_kernel[:, fox])
    old_y, new_y = predict(old, x), predict(new, x)
    assert max_diff(np.take(new_y, at, axis=1), old_y) <= preservation_bound(old_y)
    assert report.preserves_function, report.warnings
    change = report.plan.outputs["species"]
    assert change["added"] == ["fox"] and change["removed"] == []
    assert ["cat", 0, 1] in change["moved"] and ["bird", 2, 0] in change["moved"]
    assert "classes of output 'species'" in report.summary()


def test_a_removed_class_is_named_and_breaks_the_promise():
    old, x = _old_classifier()
    new_classes = ["dog", "cat"]
    new = _classifier(2, 1)
    report = ks.migrate_weights(old, new, old_outputs={"species": OLD_CLASSES},
                                new_outputs={"species": new_classes})
    np.testing.assert_array_equal(_np(new.get_layer("species").kernel),
                                  np.take(_np(old.get_layer("species").kernel), [1, 0], axis=1))
    old_y, new_y = predict(old, x), predict(new, x)
    assert max_diff(new_y, old_y[:, [1, 0]]) <= preservation_bound(old_y)
    assert not report.preserves_function
    assert any("output 'species'" in w and "'bird'" in w and "dropped" in w
               for w in report.warnings), report.warnings


def test_reordered_classes_through_a_softmax_keep_the_probabilities():
    old, x = _old_classifier(activation="softmax")
    new = _classifier(3, 1, activation="softmax")
    reordered = ["dog", "bird", "cat"]
    report = ks.migrate_weights(old, new, old_outputs={"species": OLD_CLASSES},
                                new_outputs={"species": reordered})
    old_y, new_y = predict(old, x), predict(new, x)
    at = _columns(OLD_CLASSES, reordered)
    assert max_diff(np.take(new_y, at, axis=1), old_y) <= preservation_bound(old_y)
    assert report.preserves_function, report.warnings


def test_class_names_from_a_file(tmp_path):
    old, x = _old_classifier()
    old.save(tmp_path / "old.keras")
    new = _classifier(len(NEW_CLASSES), 1)
    report = ks.migrate_weights(tmp_path / "old.keras", new,
                                old_outputs={"species": OLD_CLASSES},
                                new_outputs={"species": NEW_CLASSES})
    at = _columns(OLD_CLASSES, NEW_CLASSES)
    old_y = predict(old, x)
    assert max_diff(np.take(predict(new, x), at, axis=1), old_y) <= preservation_bound(old_y)
    assert report.preserves_function


# -- a logits head over a vocabulary -----------------------------------------------------------

OLD_VOCAB = ["<pad>", "the", "cat", "sat", "mat", "on"]
NEW_VOCAB = ["<pad>", "on", "the", "a", "cat", "mat", "sat", "dog"]  # reordered and grown


def _language_model(vocab_size, seed):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    h = L.Embedding(vocab_size, 8, name="embed")(tokens)
    h = L.GlobalAveragePooling1D(name="pool")(h)
    h = L.Dense(8, activation="tanh", name="h")(h)
    return keras.Model(tokens, L.Dense(vocab_size, name="logits")(h))


def _ids(batch_tokens, vocab):
    return np.asarray([[vocab.index(t) for t in row] for row in batch_tokens], dtype="int32")


def _old_language_model():
    old = _language_model(len(OLD_VOCAB), 0)
    rng = np.random.default_rng(0)
    words = rng.choice(OLD_VOCAB, size=(32, 5))
    randomize(old, _ids(words, OLD_VOCAB))
    assert_input_sensitive(old, _ids(words[:16], OLD_VOCAB), _ids(words[16:], OLD_VOCAB))
    return old, words


def test_an_untied_logits_head_follows_its_tokens():
    old, words = _old_language_model()
    new = _language_model(len(NEW_VOCAB), 1)
    report = ks.migrate_weights(
        old, new,
        old_features={"tokens": {"vocabulary": OLD_VOCAB}},
        new_features={"tokens": {"vocabulary": NEW_VOCAB}},
        old_outputs={"logits": {"vocabulary": OLD_VOCAB}},
        new_outputs={"logits": {"vocabulary": NEW_VOCAB}},
    )
    at = _columns(OLD_VOCAB, NEW_VOCAB)
    old_y = predict(old, _ids(words, OLD_VOCAB))
    new_y = predict(new, _ids(words, NEW_VOCAB))
    assert max_diff(np.take(new_y, at, axis=1), old_y) <= preservation_bound(old_y)
    assert (np.take(new_y, at, axis=1).argmax(1) == old_y.argmax(1)).all()
    old_k, new_k = _np(old.get_layer("logits").kernel), _np(new.get_layer("logits").kernel)
    np.testing.assert_array_equal(np.take(new_k, at, axis=1), old_k)
    new_tokens = [NEW_VOCAB.index(t) for t in NEW_VOCAB if t not in OLD_VOCAB]
    for j in new_tokens:  # a vocabulary's new columns start at the mean, as in Hugging Face
        np.testing.assert_allclose(new_k[:, j], old_k.mean(axis=1), rtol=0,
                                   atol=preservation_bound(old_k))
    assert report.preserves_function, report.warnings
    assert report.plan.outputs["logits"]["added"] == ["a", "dog"]


def test_a_head_that_follows_positions_under_a_changed_vocabulary_is_named():
    old, _ = _old_language_model()
    new = _language_model(len(NEW_VOCAB), 1)
    report = ks.migrate_weights(old, new, old_features={"tokens": {"vocabulary": OLD_VOCAB}},
                                new_features={"tokens": {"vocabulary": NEW_VOCAB}})
    assert not report.preserves_function
    assert any("output 'logits'" in w and "input 'tokens'" in w and "new_outputs" in w
               for w in report.warnings), report.warnings


def test_the_plan_keeps_names_and_mean_starts_through_json():
    old, x = _old_classifier()
    new = _classifier(len(NEW_CLASSES), 1)
    plan = ks.ModelMigrator(old, old_outputs={"species": OLD_CLASSES}).plan(
        new, new_outputs={"species": {"classes": NEW_CLASSES, "init": "mean"}})
    again = SurgeryPlan.from_json(plan.to_json())
    assert again.outputs == plan.outputs
    kernel = next(w for w in again.weights if w.layer == "species" and w.role == "kernel")
    assert [a.mean_new for a in kernel.axes] == [False, True]


# -- mistakes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("old_outputs, new_outputs, expected", [
    ({"species": OLD_CLASSES}, {"nope": NEW_CLASSES}, "does not have"),
    ({"species": OLD_CLASSES}, None, "old output spec only"),
    (None, {"species": NEW_CLASSES}, "new output spec only"),
    ({"species": OLD_CLASSES}, {"species": NEW_CLASSES[:3]}, "names 3 column(s)"),
    ({"species": OLD_CLASSES}, {"species": ["a", "b", "a", "c"]}, "appears twice"),
    ({"species": OLD_CLASSES}, {"species": {"classes": NEW_CLASSES, "init": "zero"}}, "init"),
    ({"species": "cat dog bird"}, {"species": NEW_CLASSES}, "list of column names"),
])
def test_bad_output_specs_name_the_output(old_outputs, new_outputs, expected):
    old, _ = _old_classifier()
    new = _classifier(len(NEW_CLASSES), 1)
    with pytest.raises(FeatureSpecError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ks.migrate_weights(old, new, old_outputs=old_outputs, new_outputs=new_outputs)


def test_a_head_chosen_twice_is_refused():
    old, _ = _old_classifier()
    new = _classifier(len(NEW_CLASSES), 1)
    with pytest.raises(FeatureSpecError, match="unit_maps"):
        ks.migrate_weights(old, new, old_outputs={"species": OLD_CLASSES},
                           new_outputs={"species": NEW_CLASSES},
                           unit_maps={"species": [0, 1, 2, -1]})


def _tied_language_model(vocab_size, seed):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    embed = keras_hub.layers.ReversibleEmbedding(vocab_size, 8, name="embed")
    h = L.Dense(8, activation="tanh", name="h")(embed(tokens))
    return keras.Model(tokens, embed(h, reverse=True))


def test_a_tied_head_follows_the_input_vocabulary_and_its_spec_is_checked():
    old = _tied_language_model(len(OLD_VOCAB), 0)
    rng = np.random.default_rng(0)
    words = rng.choice(OLD_VOCAB, size=(16, 5))
    randomize(old, _ids(words, OLD_VOCAB))
    features = ({"tokens": {"vocabulary": OLD_VOCAB}}, {"tokens": {"vocabulary": NEW_VOCAB}})
    name = old.output_names[0]
    new = _tied_language_model(len(NEW_VOCAB), 1)
    report = ks.migrate_weights(old, new, old_features=features[0], new_features=features[1],
                                old_outputs={name: {"vocabulary": OLD_VOCAB}},
                                new_outputs={new.output_names[0]: {"vocabulary": NEW_VOCAB}})
    at = _columns(OLD_VOCAB, NEW_VOCAB)
    old_y = predict(old, _ids(words, OLD_VOCAB))
    new_y = predict(new, _ids(words, NEW_VOCAB))
    assert max_diff(np.take(new_y, at, axis=-1), old_y) <= preservation_bound(old_y)
    assert report.preserves_function, report.warnings
    other = _tied_language_model(len(NEW_VOCAB), 2)
    with pytest.raises(FeatureSpecError, match="must agree"):
        ks.migrate_weights(old, other, old_features=features[0], new_features=features[1],
                           old_outputs={name: {"vocabulary": OLD_VOCAB}},
                           new_outputs={other.output_names[0]:
                                        {"vocabulary": NEW_VOCAB[::-1]}})
