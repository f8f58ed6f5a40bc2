"""Nested models, shared layers, and the public check_rule harness."""

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.testing import check_rule
from tests.util import assert_input_sensitive, max_diff, predict, preservation_bound, randomize


def _nested(n_in, width, seed, functional_inner=False):
    keras.utils.set_random_seed(seed)
    if functional_inner:
        i = keras.Input((n_in,))
        h = keras.layers.Dense(width, activation="relu", name="inner_a")(i)
        inner = keras.Model(i, keras.layers.Dense(width, name="inner_b")(h), name="trunk")
    else:
        inner = keras.Sequential(
            [keras.Input((n_in,)), keras.layers.Dense(width, activation="relu", name="inner_a"),
             keras.layers.BatchNormalization(name="inner_bn"),
             keras.layers.Dense(width, name="inner_b")],
            name="trunk",
        )
    x = keras.Input((n_in,), name="x")
    y = keras.layers.Dense(2, name="head")(inner(x))
    return keras.Model(x, y)


@pytest.mark.parametrize("functional_inner", [False, True])
def test_nested_model_widened_and_fed_a_new_feature(tmp_path, functional_inner):
    rng = np.random.default_rng(0)
    x_old = rng.normal(size=(16, 4)).astype("float32")
    old = _nested(4, 6, 0, functional_inner)
    randomize(old, x_old)
    assert_input_sensitive(old, x_old, rng.normal(size=x_old.shape).astype("float32"))
    old.save(tmp_path / "old.keras")
    new = _nested(5, 9, 1, functional_inner)
    report = ks.migrate_weights(str(tmp_path / "old.keras"), new)
    assert report.preserves_function, report.warnings
    assert report.plan.matches["trunk/inner_a"] == "trunk/inner_a"
    x_new = np.concatenate([x_old, rng.normal(size=(16, 1)).astype("float32")], 1)
    assert max_diff(predict(old, x_old), predict(new, x_new)) <= 1e-5
    k_old = old.get_layer("trunk").get_layer("inner_a").kernel.numpy()
    k_new = new.get_layer("trunk").get_layer("inner_a").kernel.numpy()
    np.testing.assert_array_equal(k_new[:4, :6], k_old)
    assert np.all(k_new[4, :6] == 0)


def _shared(features_a, features_b, width, seed):
    keras.utils.set_random_seed(seed)
    a = keras.Input((3, len(features_a)), name="allies")
    b = keras.Input((2, len(features_b)), name="enemies")
    enc = keras.layers.Dense(width, activation="relu", name="entity_encoder")
    pooled = [keras.layers.GlobalMaxPooling1D(name=f"pool_{n}")(enc(t))
              for n, t in (("a", a), ("b", b))]
    h = keras.layers.Concatenate(name="cat")(pooled)
    return keras.Model([a, b], keras.layers.Dense(2, name="head")(h))


def _spec(a, b):
    return {"allies": a, "enemies": b}


def test_shared_layer_consistent_growth_is_exact():
    pytest.importorskip("keras_surgery.rules.reshaping")  # global pooling rules
    rng = np.random.default_rng(0)
    old = _shared(["hp", "x", "y"], ["hp", "x", "y"], 4, 0)
    randomize(old, None)
    new = _shared(["hp", "armor", "x", "y"], ["hp", "armor", "x", "y"], 6, 1)
    report = ks.migrate_weights(
        old, new, old_features=_spec(["hp", "x", "y"], ["hp", "x", "y"]),
        new_features=_spec(["hp", "armor", "x", "y"], ["hp", "armor", "x", "y"]),
    )
    # The two calls read different inputs, so their labels differ: the shared kernel's rows
    # are matched by the first call and the second call must move them the same way.
    xa, xb = rng.normal(size=(5, 3, 3)), rng.normal(size=(5, 2, 3))
    ins = lambda x: np.insert(x, 1, rng.normal(size=x.shape[:2]), axis=2)  # noqa: E731
    diff = max_diff(predict(old, [xa, xb]), predict(new, [ins(xa), ins(xb)]))
    if report.preserves_function:
        assert diff <= 1e-5
    else:
        assert any("shared" in w for w in report.warnings)


def test_shared_layer_inconsistent_growth_is_reported():
    pytest.importorskip("keras_surgery.rules.reshaping")
    old = _shared(["hp", "x", "y"], ["hp", "x", "y"], 4, 0)
    new = _shared(["hp", "armor", "x", "y"], ["x", "hp", "y", "z"], 4, 1)
    report = ks.migrate_weights(
        old, new, old_features=_spec(["hp", "x", "y"], ["hp", "x", "y"]),
        new_features=_spec(["hp", "armor", "x", "y"], ["x", "hp", "y", "z"]),
    )
    assert not report.preserves_function
    assert any("'entity_encoder' is shared" in w for w in report.warnings)


def test_check_rule_passes_for_builtin_rules_and_catches_a_wrong_rule():
    result = check_rule(lambda **kw: keras.layers.Dense(name="layer", **kw), (6,),
                        old_kwargs={"units": 4}, new_kwargs={"units": 7})
    assert result.preserves_function and result.max_diff <= 1e-5

    class Reverse(keras.layers.Layer):
        def call(self, x):
            return keras.ops.flip(x, axis=-1)

    from keras_surgery.rules.elementwise import passthrough_rule

    ks.register_rule(Reverse, passthrough_rule)  # wrong: reversing moves every index
    try:
        with pytest.raises(AssertionError, match="labels some index wrongly"):
            check_rule(lambda **kw: Reverse(name="reverse"), (6,))
    finally:
        ks.unregister_rule(Reverse)


def _auto_named_nested(n_in, widths, seed):
    """Two auto-named inner models of one class, one inside the other's sibling: names such
    as 'functional_3' change each time the model is built."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((n_in,), name="x")
    h = x
    for width in widths:
        i = keras.Input((h.shape[-1],))
        h = keras.Model(i, keras.layers.Dense(width, activation="tanh", name="inner")(i))(h)
    return keras.Model(x, keras.layers.Dense(2, name="head")(h))


def test_auto_named_nested_models_pair_in_order(tmp_path):
    rng = np.random.default_rng(3)
    old = _auto_named_nested(4, (6, 5), 3)
    x_old = rng.normal(size=(16, 4)).astype("float32")
    randomize(old, x_old)
    assert_input_sensitive(old, x_old, rng.normal(size=x_old.shape).astype("float32"))
    old.save(tmp_path / "old.keras")
    new = _auto_named_nested(4, (6, 8), 4)  # the second inner model is wider
    old_names = [layer.name for layer in old.layers[1:3]]
    new_names = [layer.name for layer in new.layers[1:3]]
    assert not set(old_names) & set(new_names)
    for source in (str(tmp_path / "old.keras"), old):
        report = ks.migrate_weights(source, new)
        assert report.preserves_function, report.warnings
        assert report.plan.matches == {f"{n}/inner": f"{o}/inner"
                                       for n, o in zip(new_names, old_names)} | {"head": "head"}
        assert max_diff(predict(new, x_old), predict(old, x_old)) <= 1e-5
        np.testing.assert_array_equal(new.layers[1].weights[0].numpy(),
                                      old.layers[1].weights[0].numpy())


def _towers(keep_first: bool, seed: int):
    """Two auto-named towers of one class reading the same input (or only the second)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="x")
    outputs = []
    for keep in (keep_first, True):
        i = keras.Input((4,))
        tower = keras.Model(i, keras.layers.Dense(2, name="head")(
            keras.layers.Dense(5, activation="tanh", name="proj")(i)))
        if keep:
            outputs.append(tower(x))
    return keras.Model(x, [keras.layers.Identity(name=f"out{k}")(o)
                           for k, o in enumerate(outputs)])


def test_auto_named_nested_models_are_not_paired_when_one_was_removed():
    """Old: towers A and B; new: B alone, under a new auto-name. Order cannot say which old
    tower it continues, so none is paired (pairing the first would copy A's weights into B):
    the models are refused as unrelated, loudly."""
    old = _towers(True, 5)
    new = _towers(False, 6)
    before = [v.numpy().copy() for v in new.weights]
    with pytest.raises(ks.SurgeryError, match="nothing in common"):
        ks.migrate_weights(old, new)
    for v, b in zip(new.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_a_nested_functional_model_called_twice_as_the_outputs(tmp_path):
    """Keras writes a nested Functional model's outputs by its own node index (its creation
    node first), its inputs' references from 0: both calls must be told apart, from a file too."""

    def build(width, seed):
        keras.utils.set_random_seed(seed)
        i = keras.Input((3,))
        inner = keras.Model(i, keras.layers.Dense(2, name="d")(i), name="inner")
        x = keras.Input((3,), name="obs")
        h = keras.layers.Dense(3, name="h2")(keras.layers.Dense(width, name="h")(x))
        return keras.Model(x, [inner(h), inner(h * 2.0)])

    old = build(4, 0)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    randomize(old, x)
    old.save(tmp_path / "old.keras")
    old_y = predict(old, x)
    assert np.max(np.abs(old_y[0] - old_y[1])) > 1e-3  # the two calls differ
    for source in (old, tmp_path / "old.keras"):
        new = build(6, 1)
        report = ks.migrate_weights(source, new)
        assert report.preserves_function, report.warnings
        assert max_diff(predict(new, x), old_y) <= preservation_bound(old_y)
