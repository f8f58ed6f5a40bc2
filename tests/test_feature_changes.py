"""Features explained: what a surgery kept, moved, added and removed per input, a warning for a
likely misspelling, and an error for a feature spec given for one side only."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import max_diff, predict, preservation_bound, randomize


def _mlp(n, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((n,), name="obs")
    h = keras.layers.Dense(8, activation="relu", name="h")(x)
    return keras.Model(x, keras.layers.Dense(2, name="out")(h))


@pytest.fixture
def old():
    model = _mlp(3, 0)
    randomize(model, np.random.default_rng(0).normal(size=(32, 3)).astype("float32"))
    return model


def _kernel(model):
    return keras.ops.convert_to_numpy(model.get_layer("h").kernel)


def test_moved_added_and_removed_features_are_reported_and_followed(old):
    new = _mlp(4, 1)
    report = ks.migrate_weights(old, new, old_features={"obs": ["a", "b", "c"]},
                                new_features={"obs": ["c", "x", "a", "d"]})
    assert report.plan.features == {"obs": {
        "old_input": "obs", "kept": [], "moved": [["c", 2, 0], ["a", 0, 2]],
        "added": ["x", "d"], "removed": ["b"]}}
    assert ("features of input 'obs': 0 kept, 2 moved ('c' 2 -> 0, 'a' 0 -> 2), 2 added "
            "('x', 'd'), 1 removed ('b')") in report.summary()
    assert json.loads(report.to_json())["features"] == report.plan.features
    assert not any("typo" in w for w in report.warnings)
    np.testing.assert_array_equal(_kernel(new)[[0, 2]], np.take(_kernel(old), [2, 0], axis=0))
    np.testing.assert_array_equal(_kernel(new)[[1, 3]], 0.0)
    rng = np.random.default_rng(1)
    x_old = rng.normal(size=(32, 3)).astype("float32")
    x_old[:, 1] = 0.0  # the removed feature, as the promise reads it
    x_new = np.stack([x_old[:, 2], rng.normal(size=32), x_old[:, 0], rng.normal(size=32)],
                     axis=1).astype("float32")
    want = predict(old, x_old)
    assert report.preserves_function
    assert max_diff(predict(new, x_new), want) <= preservation_bound(want)
    assert max_diff(predict(old, rng.normal(size=(32, 3)).astype("float32")), want) > 1e-3


@pytest.mark.parametrize("added,gone", [("Income", "income"), ("incme", "income")])
def test_a_likely_misspelling_names_both_features(old, added, gone):
    report = ks.migrate_weights(old, _mlp(3, 1), old_features={"obs": ["age", gone, "visits"]},
                                new_features={"obs": ["age", added, "visits"]})
    typo = [w for w in report.warnings if "a typo?" in w]
    assert typo == [f"input 'obs': feature '{added}' is new and '{gone}' is gone: a typo? The "
                    f"weights of '{gone}' were dropped and '{added}' starts at zero; if they "
                    "are one feature, give it the same name in both specs."]
    assert report.warnings[0] == typo[0]  # first, where it is read


def test_unrelated_names_are_not_called_typos(old):
    report = ks.migrate_weights(old, _mlp(3, 1), old_features={"obs": ["age", "hp", "visits"]},
                                new_features={"obs": ["age", "mana", "visits"]})
    assert not any("typo" in w for w in report.warnings)


def test_a_spec_for_the_new_side_only_is_an_error_naming_the_input(old):
    new = _mlp(3, 1)
    before = _kernel(new).copy()
    with pytest.raises(ks.FeatureSpecError, match=(
            r"Input 'obs': none of the old model's features \(column 0, column 1, column 2\) "
            r"is among the new model's \('age', 'income', 'visits'\).*pass old_features")):
        ks.migrate_weights(old, new, new_features={"obs": ["age", "income", "visits"]})
    np.testing.assert_array_equal(_kernel(new), before)
    with pytest.raises(ks.FeatureSpecError, match="The new model has no feature names"):
        ks.migrate_weights(old, new, old_features={"obs": ["age", "income", "visits"]})
    # Said explicitly, it is accepted (and the report says nothing of the old input survived).
    report = ks.migrate_weights(old, new, new_features={"obs": ["age", "income", "visits"]},
                                allow_unrelated=True)
    assert report.plan.features["obs"]["removed"] == [0, 1, 2]


def test_an_input_that_drops_every_feature_without_adding_is_allowed():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((2,), name="a"), keras.Input((2,), name="b")
    old = keras.Model([a, b], keras.layers.Dense(
        2, name="out")(keras.layers.Concatenate(name="cat")([a, b])))
    keras.utils.set_random_seed(1)
    a, b = keras.Input((2,), name="a"), keras.Input((0,), name="b")
    new = keras.Model([a, b], keras.layers.Dense(
        2, name="out")(keras.layers.Concatenate(name="cat")([a, b])))
    report = ks.migrate_weights(old, new)
    assert report.plan.features["b"] == {"old_input": "b", "kept": [], "moved": [],
                                         "added": [], "removed": [0, 1]}
