"""Numeric surgery tests for layers that move indices: Reshape, Permute, RepeatVector,
TimeDistributed (Flatten, padding, cropping and upsampling are covered with the convolutions).

As in test_rules_conv: non-trivial old weights, a saved `.keras` file, a modified new model,
and checks of the function, of `preserves_function`, and of the changed weights against
oracles written from the old weights and the architecture alone.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import max_diff, model_of, normal, predict, saved_old_model

TOL = 1e-5
BATCH = 16
L = keras.layers
logger = logging.getLogger(__name__)

pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


_normal = normal
_model = model_of


def _old_model(tmp_path, shape, body, rng, seed=1):
    return saved_old_model(tmp_path, shape, body, rng, seed=seed, batch_size=BATCH)


def _new_model(shape, body, seed=2):
    keras.utils.set_random_seed(seed)
    return _model(shape, body)


def _w(model, layer, name="kernel") -> np.ndarray:
    found = model.get_layer(layer)
    found = getattr(found, "layer", found)  # TimeDistributed: the inner layer's weights
    return np.array(getattr(found, name).numpy(), copy=True)


def _assert_preserved(got, want) -> float:
    d = max_diff(got, want)
    logger.info("max diff %.3e", d)
    assert d <= TOL, f"surgery changed the old outputs: max diff {d:.3e}"
    return d


# -- Flatten -----------------------------------------------------------------------------------


def _flat_image(x):
    return L.Dense(2, name="head")(L.Flatten(name="flat")(x))


def test_flatten_of_raw_image_with_channel_replaced(tmp_path):
    old_spec, new_spec = ["r", "g", "b"], ["r", "depth", "b"]
    rng = np.random.default_rng(9)
    old, batch, path = _old_model(tmp_path, (4, 4, 3), _flat_image, rng)
    new = _new_model((4, 4, 3), _flat_image)
    report = ks.migrate_weights(
        path, new, old_features={"obs": old_spec}, new_features={"obs": new_spec}
    )

    # A (row, column, "g") index is 0 when "g" is: dropping it keeps the function.
    assert report.preserves_function, report.warnings
    x_old = batch.copy()
    x_old[..., 1] = 0.0
    x_new = batch.copy()
    x_new[..., 1] = _normal(rng, BATCH, 4, 4)
    _assert_preserved(predict(new, x_new), predict(old, x_old))
    new_h = _w(new, "head").reshape(4, 4, 3, 2)
    old_h = _w(old, "head").reshape(4, 4, 3, 2)
    np.testing.assert_array_equal(new_h[:, :, [0, 2]], np.delete(old_h, 1, axis=2))
    assert np.all(new_h[:, :, 1] == 0.0)


# -- Reshape -----------------------------------------------------------------------------------


def _merge(filters):
    def body(x):
        x = L.Conv1D(filters, 3, padding="same", activation="relu", name="conv")(x)
        x = L.Reshape((-1,), name="fold")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_reshape_merging_axes_follows_grown_channels(tmp_path):
    rng = np.random.default_rng(0)
    old, batch, path = _old_model(tmp_path, (6, 3), _merge(4), rng)
    new = _new_model((6, 3), _merge(6))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(predict(new, batch), predict(old, batch))
    new_h = _w(new, "head").reshape(6, 6, 2)
    np.testing.assert_array_equal(new_h[:, :4], _w(old, "head").reshape(6, 4, 2))
    assert np.all(new_h[:, 4:] == 0.0)


def _heads(n_heads):
    def body(x):
        x = L.Dense(n_heads * 4, name="proj")(x)
        x = L.Reshape((n_heads, 4), name="split")(x)
        x = L.Dense(3, activation="tanh", name="per_head")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_reshape_splitting_last_axis_keeps_heads(tmp_path):
    rng = np.random.default_rng(1)
    old, batch, path = _old_model(tmp_path, (5,), _heads(3), rng)
    new = _new_model((5,), _heads(4))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(predict(new, batch), predict(old, batch))
    np.testing.assert_array_equal(_w(new, "proj")[:, :12], _w(old, "proj"))
    np.testing.assert_array_equal(_w(new, "per_head"), _w(old, "per_head"))
    new_h = _w(new, "head").reshape(4, 3, 2)
    np.testing.assert_array_equal(new_h[:3], _w(old, "head").reshape(3, 3, 2))
    assert np.all(new_h[3] == 0.0)


def _unit_axes(body_filters=4):
    def body(x):
        x = L.Reshape((8, 1, -1), name="add_unit")(x)
        x = L.Conv2D(body_filters, (3, 1), padding="same", activation="relu", name="conv")(x)
        x = L.Reshape((8, body_filters), name="drop_unit")(x)
        x = L.Conv1D(2, 3, name="conv1d")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_reshape_adding_and_removing_unit_axes(tmp_path):
    old_spec, new_spec = ["a", "b", "c"], ["a", "new", "b", "c"]
    rng = np.random.default_rng(2)
    old, batch, path = _old_model(tmp_path, (8, 3), _unit_axes(), rng)
    new = _new_model((8, 4), _unit_axes())
    report = ks.migrate_weights(
        path, new, old_features={"obs": old_spec}, new_features={"obs": new_spec}
    )

    assert report.preserves_function, report.warnings
    x_new = np.insert(batch, 1, _normal(rng, BATCH, 8), axis=-1)
    _assert_preserved(predict(new, x_new), predict(old, batch))
    kernel = _w(new, "conv")
    np.testing.assert_array_equal(np.delete(kernel, 1, axis=2), _w(old, "conv"))
    assert np.all(kernel[:, :, 1] == 0.0)
    for name in ("conv1d", "head"):
        np.testing.assert_array_equal(_w(new, name), _w(old, name))


def _scrambled(width, outputs=2):
    def body(x):
        x = L.Dense(width, name="mix")(x)
        x = L.Reshape((-1, 8), name="fold")(x)  # (4, 6) -> (3, 8): rows straddle time steps
        x = L.Flatten(name="flat")(x)
        return L.Dense(outputs, name="head")(x)

    return body


def test_reshape_that_cannot_keep_labels_is_reported_when_its_axis_grows(tmp_path):
    rng = np.random.default_rng(3)
    old, batch, path = _old_model(tmp_path, (4, 3), _scrambled(6), rng)
    new = _new_model((4, 3), _scrambled(8))
    report = ks.migrate_weights(path, new)

    assert not report.preserves_function
    assert any("'fold'" in w and "Reshape cannot keep labels" in w for w in report.warnings), (
        report.warnings)
    assert max_diff(predict(new, batch), predict(old, batch)) > 1e-4
    np.testing.assert_array_equal(_w(new, "mix")[:, :6], _w(old, "mix"))


def test_reshape_that_cannot_keep_labels_is_fine_while_its_axes_stay(tmp_path):
    rng = np.random.default_rng(4)
    old, batch, path = _old_model(tmp_path, (4, 3), _scrambled(6), rng)
    new = _new_model((4, 3), _scrambled(6, outputs=3))  # only a new output unit
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(predict(new, batch)[:, :2], predict(old, batch))
    np.testing.assert_array_equal(_w(new, "head")[:, :2], _w(old, "head"))


# -- Permute, RepeatVector ---------------------------------------------------------------------


def _permuted(x):
    x = L.Permute((2, 1), name="swap")(x)  # (time, feature) -> (feature, time)
    x = L.Dense(5, activation="relu", name="over_time")(x)
    x = L.Flatten(name="flat")(x)
    return L.Dense(2, name="head")(x)


def test_permute_moves_feature_labels(tmp_path):
    old_spec, new_spec = ["a", "b", "c", "d"], ["a", "new", "b", "c", "d"]
    rng = np.random.default_rng(5)
    old, batch, path = _old_model(tmp_path, (6, 4), _permuted, rng)
    new = _new_model((6, 5), _permuted)
    report = ks.migrate_weights(
        path, new, old_features={"obs": old_spec}, new_features={"obs": new_spec}
    )

    assert report.preserves_function, report.warnings
    x_new = np.insert(batch, 1, _normal(rng, BATCH, 6), axis=-1)
    _assert_preserved(predict(new, x_new), predict(old, batch))
    np.testing.assert_array_equal(_w(new, "over_time"), _w(old, "over_time"))
    new_h = _w(new, "head").reshape(5, 5, 2)  # (feature, unit) rows
    np.testing.assert_array_equal(np.delete(new_h, 1, axis=0), _w(old, "head").reshape(4, 5, 2))
    assert np.all(new_h[1] == 0.0)


def _repeated(width):
    def body(x):
        x = L.Dense(width, activation="tanh", name="enc")(x)
        x = L.RepeatVector(3, name="repeat")(x)
        x = L.Conv1D(2, 2, padding="same", name="conv")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_repeat_vector_with_grown_encoder(tmp_path):
    rng = np.random.default_rng(6)
    old, batch, path = _old_model(tmp_path, (4,), _repeated(6), rng)
    new = _new_model((4,), _repeated(8))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(predict(new, batch), predict(old, batch))
    kernel = _w(new, "conv")
    np.testing.assert_array_equal(kernel[:, :6], _w(old, "conv"))
    assert np.all(kernel[:, 6:] == 0.0)
    np.testing.assert_array_equal(_w(new, "head"), _w(old, "head"))


# -- TimeDistributed ---------------------------------------------------------------------------


def _time_distributed(width):
    def body(x):
        x = L.TimeDistributed(L.Dense(width, activation="relu"), name="td1")(x)
        x = L.TimeDistributed(L.Dense(3), name="td2")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_time_distributed_dense_with_inserted_feature_and_grown_width(tmp_path):
    old_spec, new_spec = ["a", "b", "c", "d"], ["a", "b", "new", "c", "d"]
    rng = np.random.default_rng(7)
    old, batch, path = _old_model(tmp_path, (5, 4), _time_distributed(6), rng)
    new = _new_model((5, 5), _time_distributed(8))
    report = ks.migrate_weights(
        path, new, old_features={"obs": old_spec}, new_features={"obs": new_spec}
    )

    assert report.preserves_function, report.warnings
    x_new = np.insert(batch, 2, _normal(rng, BATCH, 5), axis=-1)
    _assert_preserved(predict(new, x_new), predict(old, batch))
    td1 = _w(new, "td1")
    np.testing.assert_array_equal(np.delete(td1, 2, axis=0)[:, :6], _w(old, "td1"))
    assert np.all(td1[2, :6] == 0.0)
    np.testing.assert_array_equal(_w(new, "td1", "bias")[:6], _w(old, "td1", "bias"))
    td2 = _w(new, "td2")
    np.testing.assert_array_equal(td2[:6], _w(old, "td2"))
    assert np.all(td2[6:] == 0.0)
    np.testing.assert_array_equal(_w(new, "head"), _w(old, "head"))


def _time_distributed_conv(filters):
    def body(x):
        x = L.TimeDistributed(L.Conv2D(filters, 3, padding="same", activation="relu"),
                              name="tdc")(x)
        x = L.TimeDistributed(L.GlobalAveragePooling2D(), name="tdp")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_time_distributed_conv_with_grown_filters(tmp_path):
    rng = np.random.default_rng(8)
    old, batch, path = _old_model(tmp_path, (3, 6, 6, 2), _time_distributed_conv(3), rng)
    new = _new_model((3, 6, 6, 2), _time_distributed_conv(5))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(predict(new, batch), predict(old, batch))
    np.testing.assert_array_equal(_w(new, "tdc")[..., :3], _w(old, "tdc"))
    new_h = _w(new, "head").reshape(3, 5, 2)
    np.testing.assert_array_equal(new_h[:, :3], _w(old, "head").reshape(3, 3, 2))
    assert np.all(new_h[:, 3:] == 0.0)
