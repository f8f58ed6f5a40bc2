"""The rule registry: registration, MRO lookup, duplicates, opaque fallback and strict mode."""

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.registry import Registration, find_registration, find_rule
from keras_surgery.rules.core import dense_rule
from keras_surgery.rules.elementwise import passthrough_rule
from tests.util import max_diff, predict


class Scale(keras.layers.Layer):
    """A custom layer with one weight per feature (element-wise scale)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        return x * self.scale


def scale_rule(call):
    from keras_surgery.rules.api import RuleResult, single_input, weight

    x = single_input(call)
    return RuleResult([x], [weight("scale", ("diag", x[-1]))])


class SubDense(keras.layers.Dense):
    pass


def test_mro_lookup_finds_the_parent_rule():
    assert find_rule(SubDense) is dense_rule


def test_duplicate_registration_is_an_error_unless_override():
    ks.register_rule(Scale, scale_rule)
    try:
        with pytest.raises(ValueError, match="already registered.*override=True"):
            ks.register_rule(Scale, passthrough_rule)
        ks.register_rule(Scale, passthrough_rule, override=True)
        assert find_rule(Scale) is passthrough_rule
    finally:
        ks.unregister_rule(Scale)
    assert find_rule(Scale) is None
    with pytest.raises(KeyError, match="No rule is registered"):
        ks.unregister_rule(Scale)


def _scale_model(n_in, hidden, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((n_in,), name="x")
    h = Scale(name="scale")(x)
    y = keras.layers.Dense(hidden, name="out")(h)
    model = keras.Model(x, y)
    model.get_layer("scale").scale.assign(np.linspace(0.5, 2.0, n_in).astype("float32"))
    return model


def test_custom_rule_moves_per_feature_weights():
    ks.register_rule(Scale, scale_rule)
    try:
        old = _scale_model(4, 3, 0)
        new = _scale_model(5, 3, 1)
        report = ks.migrate_weights(
            old, new, old_features={"x": list("abcd")}, new_features={"x": list("caebd")}
        )
        assert report.preserves_function
        old_scale = old.get_layer("scale").scale.numpy()
        new_scale = new.get_layer("scale").scale.numpy()
        order = [list("abcd").index(c) for c in "cabd"]
        np.testing.assert_array_equal(new_scale[[0, 1, 3, 4]], old_scale[order])
        x_old = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
        x_new = np.random.default_rng(1).normal(size=(8, 5)).astype("float32")
        for j, c in enumerate("caebd"):
            if c in "abcd":
                x_new[:, j] = x_old[:, "abcd".index(c)]
        diff = max_diff(predict(old, x_old), predict(new, x_new))
        assert diff <= 1e-5
    finally:
        ks.unregister_rule(Scale)


def test_layer_without_rule_is_opaque_with_a_warning_or_an_error_when_strict():
    old = _scale_model(4, 3, 0)
    new = _scale_model(4, 3, 1)
    report = ks.migrate_weights(old, new)
    assert any("'scale'" in w and "no rule" in w for w in report.warnings)
    # Unchanged inputs and identical shapes: the opaque layer's weights are copied.
    np.testing.assert_array_equal(
        new.get_layer("scale").scale.numpy(), old.get_layer("scale").scale.numpy()
    )
    assert report.preserves_function
    with pytest.raises(ks.UnsupportedLayerError, match="layer 'scale' of class Scale"):
        ks.migrate_weights(old, _scale_model(4, 3, 2), strict=True)


def test_opaque_layer_whose_input_changed_cannot_preserve():
    old = _scale_model(4, 3, 0)
    new = _scale_model(5, 3, 1)
    before = [w.numpy().copy() for w in new.weights]
    report = ks.migrate_weights(old, new)
    assert not report.preserves_function
    assert any("'scale'" in w for w in report.warnings)
    # the opaque layer's weight changed shape: it keeps its initial value
    np.testing.assert_array_equal(new.get_layer("scale").scale.numpy(), before[0])


# -- function keys -----------------------------------------------------------------------------


class SubScale(Scale):
    pass


@keras.saving.register_keras_serializable(package="registry_tests")
class Gate(keras.layers.Layer):
    """Registered with Keras under "registry_tests>Gate", for lookups by name."""


def test_function_keys_are_stored_beside_the_rule_and_found_through_the_mro():
    ks.register_rule(Scale, scale_rule, function_keys=["epsilon", "activation"])
    try:
        for cls in (Scale, SubScale):
            found = find_registration(cls)
            assert found.rule is scale_rule
            assert found.function_keys == frozenset({"epsilon", "activation"})
    finally:
        ks.unregister_rule(Scale)
    assert find_registration(SubScale) is None  # the cache forgot the old lookup
    # a built-in: Keras's Dense through a subclass
    assert find_registration(SubDense).function_keys == {"activation", "use_bias"}


def test_function_keys_are_found_by_name_as_the_rule_is():
    ks.register_rule("registry_tests>Gate", scale_rule, function_keys=("epsilon",))
    try:
        # a live class, by the name Keras registered it under
        assert find_registration(Gate).function_keys == {"epsilon"}
        # a node read from a file: no class, only its names
        assert find_registration(None, "Gate", "registry_tests>Gate").function_keys == {"epsilon"}
    finally:
        ks.unregister_rule("registry_tests>Gate")
    ks.register_rule("Gate", scale_rule, function_keys=("axis",))  # by plain class name
    try:
        assert find_registration(None, "Gate", None).function_keys == {"axis"}
    finally:
        ks.unregister_rule("Gate")
    ks.register_rule(Gate, scale_rule, function_keys=("center",))  # as a class, met in a file
    try:
        assert find_registration(None, "Gate", "registry_tests>Gate").function_keys == {"center"}
    finally:
        ks.unregister_rule(Gate)
    assert find_registration(None, "Gate", "registry_tests>Gate") is None


def test_an_override_keeps_the_keys_unless_given_and_unregister_removes_them():
    ks.register_rule(Scale, scale_rule, function_keys=("epsilon",))
    try:
        ks.register_rule(Scale, passthrough_rule, override=True)  # the keys describe the layer
        assert find_registration(Scale) == Registration(passthrough_rule, frozenset({"epsilon"}))
        ks.register_rule(Scale, scale_rule, override=True, function_keys=("axis",))
        assert find_registration(Scale).function_keys == {"axis"}
        ks.register_rule(Scale, scale_rule, override=True, function_keys=())
        assert find_registration(Scale).function_keys == frozenset()
        ks.register_rule(Scale, scale_rule, override=True, function_keys=("epsilon",))
    finally:
        ks.unregister_rule(Scale)
    ks.register_rule(Scale, scale_rule)  # a new registration does not inherit the old keys
    try:
        assert find_registration(Scale).function_keys == frozenset()
    finally:
        ks.unregister_rule(Scale)


@pytest.mark.parametrize("keys", ["activation", [1], 3])
def test_function_keys_must_be_a_collection_of_names(keys):
    with pytest.raises(TypeError, match="function_keys must be a collection of config key "
                                        "names. Received: "):
        ks.register_rule(Scale, scale_rule, function_keys=keys)
    assert find_registration(Scale) is None
