"""Chosen units (`unit_maps`): keep, drop and reorder units of a matched layer, as pruning tools
do; every weight that reads the units follows (np.take oracles), dropped units are named, and
dropping units whose outgoing weights are exactly zero keeps the old function."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import max_diff, predict, preservation_bound, randomize

L = keras.layers


def _np(v):
    return keras.ops.convert_to_numpy(v)


def _mlp(width, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((3,), name="obs")
    h = L.Dense(width, activation="relu", name="h")(x)
    h = L.BatchNormalization(name="bn")(h)
    return keras.Model(x, L.Dense(2, name="out")(h))


def _randomized(model, shape, seed=0):
    rng = np.random.default_rng(seed)
    batch = rng.normal(size=(32, *shape)).astype("float32")
    randomize(model, batch)
    return batch


def test_chosen_units_are_kept_in_their_new_order_everywhere():
    old = _mlp(5, 0)
    _randomized(old, (3,))
    new = _mlp(3, 1)
    chosen = [4, 0, 2]
    report = ks.migrate_weights(old, new, unit_maps={"h": chosen})
    np.testing.assert_array_equal(_np(new.get_layer("h").kernel),
                                  np.take(_np(old.get_layer("h").kernel), chosen, axis=1))
    np.testing.assert_array_equal(_np(new.get_layer("h").bias),
                                  np.take(_np(old.get_layer("h").bias), chosen))
    for a, b in zip(new.get_layer("bn").weights, old.get_layer("bn").weights):
        np.testing.assert_array_equal(_np(a), np.take(_np(b), chosen), err_msg=a.path)
    np.testing.assert_array_equal(_np(new.get_layer("out").kernel),
                                  np.take(_np(old.get_layer("out").kernel), chosen, axis=0))
    assert not report.preserves_function
    assert "layer 'h': unit_maps drops 2 old unit(s) (1, 3) of layer 'h'." in report.warnings
    assert any("bn(h[1]), bn(h[3])" in w and "old outputs change" in w for w in report.warnings)


def test_dropping_units_whose_outgoing_weights_are_zero_keeps_the_function():
    old = _mlp(5, 0)
    batch = _randomized(old, (3,))
    kernel = _np(old.get_layer("out").kernel).copy()
    kernel[[1, 3]] = 0.0  # what magnitude pruning leaves behind
    old.get_layer("out").kernel.assign(kernel)
    new = _mlp(3, 1)
    report = ks.migrate_weights(old, new, unit_maps={"h": [4, 0, 2]})
    assert report.preserves_function, report.warnings
    assert any("their old weights are all exactly 0" in w for w in report.warnings)
    want = predict(old, batch)
    assert max_diff(predict(new, batch), want) <= preservation_bound(want)
    assert max_diff(predict(old, batch[::-1]), want) > 1e-3


def test_a_new_unit_starts_fresh_in_and_zero_out():
    old = _mlp(3, 0)
    batch = _randomized(old, (3,))
    new = _mlp(4, 1)
    fresh_in = _np(new.get_layer("h").kernel).copy()
    report = ks.migrate_weights(old, new, unit_maps={"h": [2, -1, 0, 1]})
    assert report.preserves_function, report.warnings
    k = _np(new.get_layer("h").kernel)
    np.testing.assert_array_equal(k[:, [0, 2, 3]],
                                  np.take(_np(old.get_layer("h").kernel), [2, 0, 1], axis=1))
    np.testing.assert_array_equal(k[:, 1], fresh_in[:, 1])
    np.testing.assert_array_equal(_np(new.get_layer("out").kernel)[1], 0.0)
    want = predict(old, batch)
    assert max_diff(predict(new, batch), want) <= preservation_bound(want)


def _convnet(channels, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, 2), name="img")
    h = L.Conv2D(channels, 3, padding="same", activation="relu", name="c1")(x)
    h = L.Conv2D(4, 3, padding="same", name="c2")(h)
    h = L.Flatten(name="flat")(L.MaxPooling2D(name="mp")(h))
    return keras.Model(x, L.Dense(2, name="out")(h))


def test_conv_channels_follow_into_the_next_convolution():
    old = _convnet(4, 0)
    batch = _randomized(old, (6, 6, 2))
    kernel = _np(old.get_layer("c2").kernel).copy()
    kernel[:, :, [1], :] = 0.0  # channel 1 of c1 is read by nothing
    old.get_layer("c2").kernel.assign(kernel)
    new = _convnet(3, 1)
    report = ks.migrate_weights(old, new, unit_maps={"c1": [3, 0, 2]})
    np.testing.assert_array_equal(_np(new.get_layer("c1").kernel),
                                  np.take(_np(old.get_layer("c1").kernel), [3, 0, 2], axis=3))
    np.testing.assert_array_equal(_np(new.get_layer("c2").kernel),
                                  np.take(kernel, [3, 0, 2], axis=2))
    assert report.preserves_function, report.warnings
    want = predict(old, batch)
    assert max_diff(predict(new, batch), want) <= preservation_bound(want)


def test_flatten_positions_follow_chosen_channels():
    def net(channels, seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((4, 4, 1), name="img")
        h = L.Conv2D(channels, 3, padding="same", name="c")(x)
        return keras.Model(x, L.Dense(2, name="out")(L.Flatten(name="flat")(h)))

    old = net(3, 0)
    _randomized(old, (4, 4, 1))
    new = net(2, 1)
    ks.migrate_weights(old, new, unit_maps={"c": [2, 0]})
    old_rows = _np(old.get_layer("out").kernel).reshape(4, 4, 3, 2)
    np.testing.assert_array_equal(_np(new.get_layer("out").kernel).reshape(4, 4, 2, 2),
                                  np.take(old_rows, [2, 0], axis=2))


def test_lstm_gate_blocks_follow_chosen_units():
    def net(units, seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((5, 3), name="seq")
        return keras.Model(x, L.Dense(2, name="out")(L.LSTM(units, name="lstm")(x)))

    old = net(3, 0)
    batch = _randomized(old, (5, 3))
    new = net(2, 1)
    chosen = [2, 0]
    report = ks.migrate_weights(old, new, unit_maps={"lstm": chosen})
    cols = [g * 3 + j for g in range(4) for j in chosen]  # gates i, f, c, o in blocks of units
    cell_old, cell_new = old.get_layer("lstm").cell, new.get_layer("lstm").cell
    np.testing.assert_array_equal(_np(cell_new.kernel), np.take(_np(cell_old.kernel), cols, 1))
    np.testing.assert_array_equal(_np(cell_new.bias), np.take(_np(cell_old.bias), cols))
    np.testing.assert_array_equal(
        _np(cell_new.recurrent_kernel),
        np.take(np.take(_np(cell_old.recurrent_kernel), chosen, axis=0), cols, axis=1))
    assert not report.preserves_function  # unit 1's state fed the others
    assert "layer 'lstm': unit_maps drops 1 old unit(s) (1) of layer 'lstm'." in report.warnings
    assert max_diff(predict(old, batch), predict(old, batch[::-1])) > 1e-3


@pytest.mark.parametrize("maps,match", [
    ({"nope": [0]}, "names layer 'nope', which the new model does not have"),
    ({"h": [0, 1]}, r"has 2 entries, but the layer's units come in groups of \[3\]"),
    ({"h": [0, 0, 1]}, r"must name each old unit \(0 to 4\) at most once"),
    ({"h": [0, 5, 1]}, r"must name each old unit \(0 to 4\) at most once"),
    ({"h": [0, -2, 1]}, "must list, per new unit, an old unit index or -1"),
])
def test_bad_unit_maps_are_refused_naming_the_layer(maps, match):
    old, new = _mlp(5, 0), _mlp(3, 1)
    before = [_np(v).copy() for v in new.weights]
    with pytest.raises(ks.SurgeryError, match=match):
        ks.migrate_weights(old, new, unit_maps=maps)
    for v, b in zip(new.weights, before):
        np.testing.assert_array_equal(_np(v), b)
