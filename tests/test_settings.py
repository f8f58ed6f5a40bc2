"""Changed settings of matched layers: the keys each rule declares, wrapped layers, and the
fallbacks for Keras and keras-hub layers without a rule."""

import dataclasses

import keras
import pytest

import keras_surgery as ks
from keras_surgery.graph import LayerNode, graph_from_model
from keras_surgery.settings import changed_settings_warning

L = keras.layers


def _node(layer_factory, shape=(6,), name="layer") -> LayerNode:
    """The graph node of `layer_factory()` called in a one-layer model."""
    x = keras.Input(shape, name="x")
    model = keras.Model(x, layer_factory()(x))
    return graph_from_model(model).layers[name]


class Gain(keras.layers.Layer):
    """A custom layer with a setting named like a Keras one."""

    def __init__(self, epsilon=0.0, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, x):
        return x + self.epsilon

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _gain_rule(call):
    from keras_surgery.rules.elementwise import passthrough_rule

    return passthrough_rule(call)


def test_a_changed_activation_names_the_layer_and_both_values():
    old = _node(lambda: L.Dense(4, activation="relu", name="layer"))
    new = _node(lambda: L.Dense(4, activation="tanh", name="layer"))
    assert changed_settings_warning("layer", new, old) == (
        "layer 'layer' (Dense) changed its activation: 'relu' -> 'tanh'; the weights were "
        "carried over, but the old outputs change."
    )


def test_unchanged_or_undeclared_settings_give_no_warning():
    old = _node(lambda: L.Dense(4, activation="relu", kernel_initializer="zeros", name="layer"))
    same = _node(lambda: L.Dense(8, activation="relu", name="layer"))  # sizes: the rule's job
    assert changed_settings_warning("layer", same, old) is None


def test_several_changes_are_sorted_and_objects_shown_by_class():
    old = _node(lambda: L.Conv1D(2, 3, strides=1, padding="valid", name="layer"), (8, 2))
    new = _node(lambda: L.Conv1D(2, 3, strides=2, padding="same", name="layer"), (8, 2))
    text = changed_settings_warning("layer", new, old)
    assert "changed its padding: 'valid' -> 'same', strides: (1,) -> (2,);" in text
    relu = _node(lambda: L.Dense(4, activation="relu", name="layer"))
    leaky = _node(lambda: L.Dense(4, activation=L.LeakyReLU(0.2), name="layer"))
    assert "changed its activation: 'relu' -> LeakyReLU;" in changed_settings_warning(
        "layer", leaky, relu)


def test_tuples_and_lists_are_the_same_setting():
    # a live config holds tuples where a file's config.json holds lists
    new = _node(lambda: L.Conv1D(2, 3, strides=2, name="layer"), (8, 2))
    old = dataclasses.replace(new, config={**new.config, "strides": [2]})
    assert changed_settings_warning("layer", new, old) is None


def test_a_custom_layer_has_only_the_keys_its_registration_declares():
    old = _node(lambda: Gain(0.0, name="layer"))
    new = _node(lambda: Gain(0.5, name="layer"))
    assert changed_settings_warning("layer", new, old) is None  # no registration
    ks.register_rule(Gain, _gain_rule)
    try:
        assert changed_settings_warning("layer", new, old) is None  # registered without keys
        ks.register_rule(Gain, _gain_rule, override=True, function_keys=("epsilon",))
        assert "changed its epsilon: 0.0 -> 0.5;" in changed_settings_warning("layer", new, old)
        # read from a file: no class, only its names (here its plain class name)
        file_new = dataclasses.replace(new, cls=None, module="my_package", registered_name=None)
        assert "epsilon: 0.0 -> 0.5" in changed_settings_warning("layer", file_new, old)
    finally:
        ks.unregister_rule(Gain)


def test_a_wrapped_layer_is_compared_with_its_own_keys_under_a_prefix():
    def bidirectional(activation):
        return lambda: L.Bidirectional(L.LSTM(3, activation=activation), name="layer")

    old = _node(bidirectional("tanh"), (4, 3))
    new = _node(bidirectional("relu"), (4, 3))
    text = changed_settings_warning("layer", new, old)
    assert text.startswith("layer 'layer' (Bidirectional) changed its ")
    assert "backward_layer.activation: 'tanh' -> 'relu', layer.activation: 'tanh' -> 'relu';" in (
        text)


def test_a_wrapped_cell_without_a_rule_falls_back_to_the_keras_keys():
    old = _node(lambda: L.RNN(L.GRUCell(3, reset_after=True), name="layer"), (4, 3))
    new = _node(lambda: L.RNN(L.GRUCell(3, reset_after=False), name="layer"), (4, 3))
    assert "cell.reset_after: True -> False" in changed_settings_warning("layer", new, old)


def test_keras_layers_without_a_rule_keep_the_general_keras_keys():
    # GroupNormalization has no rule (it is opaque): its weights are still copied when their
    # shapes agree, so a changed epsilon must still be reported.
    old = _node(lambda: L.GroupNormalization(2, epsilon=1e-3, name="layer"))
    new = _node(lambda: L.GroupNormalization(2, epsilon=1e-2, name="layer"))
    assert "changed its epsilon: 0.001 -> 0.01;" in changed_settings_warning("layer", new, old)


def test_keras_hub_layers_without_a_rule_keep_the_keras_hub_keys():
    def node(epsilon, registered_name):
        return LayerNode("block", "NewBlock", "keras_hub.src.layers.new_block",
                         registered_name, {"layer_norm_epsilon": epsilon, "epsilon": epsilon},
                         None, None)

    text = changed_settings_warning("block", node(1e-6, "keras_hub>NewBlock"),
                                    node(1e-5, "keras_hub>NewBlock"))
    assert "changed its layer_norm_epsilon: 1e-05 -> 1e-06;" in text  # not "epsilon"
    assert changed_settings_warning("block", node(1e-6, "other>NewBlock"),
                                    node(1e-5, "other>NewBlock")) is None


def test_keras_hub_transformer_keys_come_from_its_registration():
    keras_hub = pytest.importorskip("keras_hub")

    def block(normalize_first):
        return lambda: keras_hub.layers.TransformerEncoder(
            8, 2, normalize_first=normalize_first, name="layer")

    old, new = _node(block(False), (5, 4)), _node(block(True), (5, 4))
    assert "changed its normalize_first: False -> True;" in changed_settings_warning(
        "layer", new, old)
