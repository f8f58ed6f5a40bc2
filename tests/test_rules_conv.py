"""Numeric surgery tests for convolutions and pooling: grown filters, kernels and channels.

Every test gives the old model non-trivial weights (`randomize`), checks that its outputs
depend on its input, saves it to a `.keras` file, migrates it into a modified model and checks
the function (max |new(x) - old(x)| <= 1e-5 on the old outputs), `preserves_function`, and the
copied / zeroed / fresh slices of the changed weights against np.take / np.delete oracles
written from the old weights and the architecture alone.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import (
    assert_input_sensitive,
    max_diff,
    model_of,
    normal,
    predict,
    randomize,
    saved_old_model,
)

TOL = 1e-5
BATCH = 16
L = keras.layers
logger = logging.getLogger(__name__)

pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


# -- helpers ---------------------------------------------------------------------------------


def _model(shape, body, name="img"):
    return model_of(shape, body, name)


_normal = normal


def _w(model, layer, name="kernel") -> np.ndarray:
    return np.array(getattr(model.get_layer(layer), name).numpy(), copy=True)


def _old_model(tmp_path, shape, body, rng, seed=1):
    return saved_old_model(tmp_path, shape, body, rng, seed=seed, batch_size=BATCH, name="img")


def _new_model(shape, body, seed=2):
    keras.utils.set_random_seed(seed)
    new = _model(shape, body)
    fresh = {w.path: np.array(w.numpy(), copy=True) for w in new.weights}
    return new, fresh


def _assert_preserved(new, x_new, old, x_old) -> float:
    d = max_diff(predict(new, x_new), predict(old, x_old))
    logger.info("max diff %.3e", d)
    assert d <= TOL, f"surgery changed the old outputs: max diff {d:.3e}"
    return d


def _assert_same_weights(new, old, *layers):
    for name in layers:
        for a, b in zip(new.get_layer(name).weights, old.get_layer(name).weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{name}/{a.name}")


def _assert_warns_about(report, *names):
    for name in names:
        assert any(name in w for w in report.warnings), (name, report.warnings)


# -- conv -> Flatten -> Dense, filters grown ---------------------------------------------------


def _conv_flatten(filters):
    def body(x):
        x = L.Conv2D(filters, 3, padding="same", activation="relu", name="conv")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(4, name="head")(x)

    return body


def test_conv_filters_grown_through_flatten(tmp_path):
    rng = np.random.default_rng(0)
    old, batch, path = _old_model(tmp_path, (6, 6, 3), _conv_flatten(8), rng)
    new, fresh = _new_model((6, 6, 3), _conv_flatten(12))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    old_k, new_k = _w(old, "conv"), _w(new, "conv")
    np.testing.assert_array_equal(new_k[..., :8], old_k)
    np.testing.assert_array_equal(new_k[..., 8:], fresh[new.get_layer("conv").kernel.path][..., 8:])
    np.testing.assert_array_equal(_w(new, "conv", "bias")[:8], _w(old, "conv", "bias"))
    # Flatten is C order over (row, column, channel): a grown channel axis moves every row.
    old_h = _w(old, "head").reshape(6, 6, 8, 4)
    new_h = _w(new, "head").reshape(6, 6, 12, 4)
    np.testing.assert_array_equal(new_h[:, :, :8], old_h)
    assert np.all(new_h[:, :, 8:] == 0.0)
    np.testing.assert_array_equal(_w(new, "head", "bias"), _w(old, "head", "bias"))
    # The zero rows matter: the new filters are alive.
    probe = keras.Model(new.inputs, new.get_layer("conv").output)
    assert np.abs(predict(probe, batch)[..., 8:]).max() > 1e-2


# -- kernel grown, centred / left / right aligned ----------------------------------------------


def _conv_pool(kernel, padding="same", cls=L.Conv2D, filters=5):
    def body(x):
        x = cls(filters, kernel, padding=padding, activation="tanh", name="conv")(x)
        pool = L.GlobalAveragePooling2D if cls is L.Conv2D else L.GlobalAveragePooling1D
        x = pool(name="gap")(x)
        return L.Dense(3, name="head")(x)

    return body


def test_kernel_grown_3x3_to_5x5_same_keeps_taps_centred(tmp_path):
    rng = np.random.default_rng(1)
    old, batch, path = _old_model(tmp_path, (8, 8, 3), _conv_pool(3), rng)
    new, _ = _new_model((8, 8, 3), _conv_pool(5))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    new_k = _w(new, "conv")
    np.testing.assert_array_equal(new_k[1:4, 1:4], _w(old, "conv"))
    ring = np.ones((5, 5), dtype=bool)
    ring[1:4, 1:4] = False
    assert np.all(new_k[ring] == 0.0)
    _assert_same_weights(new, old, "head")
    np.testing.assert_array_equal(_w(new, "conv", "bias"), _w(old, "conv", "bias"))


@pytest.mark.parametrize(
    "padding, old_k, new_k, taps, options",
    [
        ("valid", 3, 5, slice(0, 3), {}),  # the output keeps reading the same window
        ("causal", 2, 4, slice(2, 4), {}),  # causal taps end at the current step
        ("same", 2, 4, slice(1, 3), {}),  # even kernels: TensorFlow pads one less before
        ("same", 2, 3, slice(1, 3), {}),
        ("same", 3, 5, slice(1, 4), {"strides": 2}),  # padding depends on the length here
        ("same", 3, 5, slice(1, 4), {"dilation_rate": 2}),
        ("causal", 2, 3, slice(1, 3), {"dilation_rate": 3}),
    ],
)
def test_conv1d_kernel_grown_keeps_taps_aligned(tmp_path, padding, old_k, new_k, taps, options):
    def body(k):
        return lambda x: L.Conv1D(4, k, padding=padding, name="conv", **options)(x)

    rng = np.random.default_rng(2)
    old, batch, path = _old_model(tmp_path, (10, 3), body(old_k), rng)
    new, _ = _new_model((10, 3), body(new_k))
    report = ks.migrate_weights(path, new)

    kernel = _w(new, "conv")
    np.testing.assert_array_equal(kernel[taps], _w(old, "conv"))
    assert np.all(np.delete(kernel, np.arange(new_k)[taps], axis=0) == 0.0)
    got, want = predict(new, batch), predict(old, batch)
    if padding == "valid":
        # The output is shorter: the kept positions are exact, the lost ones are reported.
        assert max_diff(got, want[:, : got.shape[1]]) <= TOL
        assert not report.preserves_function
        _assert_warns_about(report, "conv")
    else:
        assert report.preserves_function, report.warnings
        _assert_preserved(new, batch, old, batch)


def test_kernel_shrunk_cannot_preserve(tmp_path):
    rng = np.random.default_rng(3)
    old, batch, path = _old_model(tmp_path, (8, 8, 3), _conv_pool(5), rng)
    new, _ = _new_model((8, 8, 3), _conv_pool(3))
    report = ks.migrate_weights(path, new)

    assert not report.preserves_function
    _assert_warns_about(report, "'conv'")
    np.testing.assert_array_equal(_w(new, "conv"), _w(old, "conv")[1:4, 1:4])
    assert max_diff(predict(new, batch), predict(old, batch)) > 1e-4


# -- input channels --------------------------------------------------------------------------


def _conv_bn(filters=6):
    def body(x):
        x = L.Conv2D(filters, 3, padding="same", name="conv")(x)
        x = L.BatchNormalization(name="bn")(x)
        x = L.ReLU()(x)
        x = L.GlobalMaxPooling2D(name="gmp")(x)
        return L.Dense(3, name="head")(x)

    return body


@pytest.mark.parametrize("new_channel", ["zero", "random"])
def test_image_gains_a_channel(tmp_path, new_channel):
    rng = np.random.default_rng(4)
    old, batch, path = _old_model(tmp_path, (8, 8, 3), _conv_bn(), rng)
    new, _ = _new_model((8, 8, 4), _conv_bn())
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    extra = np.zeros((BATCH, 8, 8, 1), "float32") if new_channel == "zero" else _normal(
        rng, BATCH, 8, 8, 1)
    _assert_preserved(new, np.concatenate([batch, extra], axis=-1), old, batch)
    kernel = _w(new, "conv")
    np.testing.assert_array_equal(kernel[:, :, :3], _w(old, "conv"))
    assert np.all(kernel[:, :, 3] == 0.0)
    _assert_same_weights(new, old, "bn", "head")


def test_named_channel_inserted_and_removed(tmp_path):
    rng = np.random.default_rng(5)
    old_spec, new_spec = ["r", "g", "b"], ["r", "depth", "b"]
    old, batch, path = _old_model(tmp_path, (8, 8, 3), _conv_bn(), rng)
    new, _ = _new_model((8, 8, 3), _conv_bn())
    report = ks.migrate_weights(
        path, new, old_features={"img": old_spec}, new_features={"img": new_spec}
    )

    assert report.preserves_function, report.warnings
    x_old = batch.copy()
    x_old[..., 1] = 0.0  # "g" is gone: the old model sees it as 0
    x_new = np.stack([batch[..., 0], _normal(rng, BATCH, 8, 8), batch[..., 2]], axis=-1)
    _assert_preserved(new, x_new, old, x_old)
    kernel, old_k = _w(new, "conv"), _w(old, "conv")
    np.testing.assert_array_equal(kernel[:, :, [0, 2]], np.delete(old_k, 1, axis=2))
    assert np.all(kernel[:, :, 1] == 0.0)


def test_conv1d_on_time_series_with_inserted_feature(tmp_path):
    def body(x):
        x = L.Conv1D(6, 3, padding="causal", activation="relu", name="conv")(x)
        x = L.Conv1D(4, 2, strides=2, name="conv2")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    old_spec, new_spec = ["a", "b", "c", "d"], ["a", "b", "new", "c", "d"]
    rng = np.random.default_rng(6)
    old, batch, path = _old_model(tmp_path, (10, 4), body, rng)
    new, _ = _new_model((10, 5), body)
    report = ks.migrate_weights(
        path, new, old_features={"img": old_spec}, new_features={"img": new_spec}
    )

    assert report.preserves_function, report.warnings
    x_new = np.insert(batch, 2, _normal(rng, BATCH, 10), axis=-1)
    _assert_preserved(new, x_new, old, batch)
    kernel = _w(new, "conv")
    np.testing.assert_array_equal(np.delete(kernel, 2, axis=1), _w(old, "conv"))
    assert np.all(kernel[:, 2] == 0.0)
    _assert_same_weights(new, old, "conv2", "head")


# -- depthwise and separable -------------------------------------------------------------------


def _depthwise(width, multiplier=2):
    def body(x):
        x = L.Conv2D(width, 1, name="pre")(x)
        x = L.DepthwiseConv2D(3, depth_multiplier=multiplier, padding="same", name="dw")(x)
        x = L.Activation("tanh")(x)
        x = L.GlobalAveragePooling2D(name="gap")(x)
        return L.Dense(3, name="head")(x)

    return body


def test_depthwise_conv_with_grown_channels(tmp_path):
    rng = np.random.default_rng(7)
    old, batch, path = _old_model(tmp_path, (6, 6, 2), _depthwise(3), rng)
    new, fresh = _new_model((6, 6, 2), _depthwise(5))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    dw, old_dw = _w(new, "dw"), _w(old, "dw")
    np.testing.assert_array_equal(dw[:, :, :3], old_dw)
    # New input channels get their own fresh depthwise filters (they are new outputs).
    np.testing.assert_array_equal(dw[:, :, 3:], fresh[new.get_layer("dw").kernel.path][:, :, 3:])
    # Output channel c * multiplier + m: the old ones are the first 3 * 2.
    np.testing.assert_array_equal(_w(new, "dw", "bias")[:6], _w(old, "dw", "bias"))
    head = _w(new, "head")
    np.testing.assert_array_equal(head[:6], _w(old, "head"))
    assert np.all(head[6:] == 0.0)


def test_depthwise_conv_with_inserted_input_channel(tmp_path):
    def body(x):
        x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    rng = np.random.default_rng(8)
    old, batch, path = _old_model(tmp_path, (5, 5, 3), body, rng)
    new, _ = _new_model((5, 5, 4), body)
    report = ks.migrate_weights(
        path, new, old_features={"img": ["a", "b", "c"]},
        new_features={"img": ["a", "new", "b", "c"]},
    )

    assert report.preserves_function, report.warnings
    _assert_preserved(new, np.insert(batch, 1, _normal(rng, BATCH, 5, 5), axis=-1), old, batch)
    np.testing.assert_array_equal(np.delete(_w(new, "dw"), 1, axis=2), _w(old, "dw"))
    kept = [0, 1, 4, 5, 6, 7]  # outputs (a, 0), (a, 1), (b, 0), (b, 1), (c, 0), (c, 1)
    np.testing.assert_array_equal(_w(new, "dw", "bias")[kept], _w(old, "dw", "bias"))
    old_h = _w(old, "head").reshape(3, 3, 6, 2)
    new_h = _w(new, "head").reshape(3, 3, 8, 2)
    np.testing.assert_array_equal(new_h[:, :, kept], old_h)
    assert np.all(new_h[:, :, [2, 3]] == 0.0)


def _separable(width, filters):
    def body(x):
        x = L.Conv2D(width, 1, activation="relu", name="pre")(x)
        x = L.SeparableConv2D(filters, 3, depth_multiplier=2, padding="same", name="sep")(x)
        x = L.GlobalAveragePooling2D(name="gap")(x)
        return L.Dense(3, name="head")(x)

    return body


def test_separable_conv_with_grown_channels_and_filters(tmp_path):
    rng = np.random.default_rng(9)
    old, batch, path = _old_model(tmp_path, (6, 6, 2), _separable(3, 4), rng)
    new, _ = _new_model((6, 6, 2), _separable(5, 6))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    np.testing.assert_array_equal(
        _w(new, "sep", "depthwise_kernel")[:, :, :3], _w(old, "sep", "depthwise_kernel"))
    point, old_point = _w(new, "sep", "pointwise_kernel"), _w(old, "sep", "pointwise_kernel")
    np.testing.assert_array_equal(point[:, :, :6, :4], old_point)
    assert np.all(point[:, :, 6:, :4] == 0.0)  # new depthwise outputs must not reach old filters
    np.testing.assert_array_equal(_w(new, "sep", "bias")[:4], _w(old, "sep", "bias"))
    np.testing.assert_array_equal(_w(new, "head")[:4], _w(old, "head"))
    assert np.all(_w(new, "head")[4:] == 0.0)


# -- transposed convolution ------------------------------------------------------------------


def _transpose(filters, kernel):
    def body(x):
        x = L.Conv2DTranspose(filters, kernel, strides=2, padding="same", name="up")(x)
        x = L.Activation("relu")(x)
        x = L.Conv2D(3, 2, strides=2, name="down")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_conv_transpose_filters_and_kernel_grown(tmp_path):
    rng = np.random.default_rng(10)
    old, batch, path = _old_model(tmp_path, (4, 4, 2), _transpose(3, 3), rng)
    new, _ = _new_model((4, 4, 2), _transpose(5, 5))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    kernel = _w(new, "up")  # (taps, taps, filters, in)
    # strides 2, "same": the 3-tap kernel reads offsets 0..2, the 5-tap one -1..3.
    np.testing.assert_array_equal(kernel[1:4, 1:4, :3], _w(old, "up"))
    np.testing.assert_array_equal(_w(new, "down")[:, :, :3], _w(old, "down"))
    assert np.all(_w(new, "down")[:, :, 3:] == 0.0)


# -- pooling, padding, cropping, upsampling chains with BatchNormalization ----------------------


def _chain2d(f1, f2):
    def body(x):
        x = L.Conv2D(f1, 3, padding="same", name="c1")(x)
        x = L.BatchNormalization(name="bn1")(x)
        x = L.ReLU()(x)
        x = L.MaxPooling2D(name="mp")(x)
        x = L.ZeroPadding2D(((1, 0), (0, 2)), name="pad")(x)
        x = L.Conv2D(f2, 3, name="c2")(x)
        x = L.BatchNormalization(name="bn2")(x)
        x = L.AveragePooling2D(2, strides=1, padding="same", name="ap")(x)
        x = L.UpSampling2D((2, 1), name="up")(x)
        x = L.Cropping2D(((1, 0), (0, 1)), name="crop")(x)
        y = L.GlobalAveragePooling2D(name="gap")(x)
        z = L.Flatten(name="flat")(L.GlobalMaxPooling2D(keepdims=True, name="gmp")(x))
        return L.Dense(3, name="head")(L.Concatenate(name="cat")([y, z]))

    return body


def test_pooling_padding_cropping_upsampling_chain_2d(tmp_path):
    rng = np.random.default_rng(11)
    old, batch, path = _old_model(tmp_path, (12, 12, 3), _chain2d(4, 5), rng)
    new, _ = _new_model((12, 12, 3), _chain2d(6, 7))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    np.testing.assert_array_equal(_w(new, "c2")[:, :, :4, :5], _w(old, "c2"))
    assert np.all(_w(new, "c2")[:, :, 4:, :5] == 0.0)
    for w in ("gamma", "beta", "moving_mean", "moving_variance"):
        np.testing.assert_array_equal(_w(new, "bn1", w)[:4], _w(old, "bn1", w))
    head, old_head = _w(new, "head"), _w(old, "head")
    kept = [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]  # [gap 0..4 of 7, gmp 0..4 of 7]
    np.testing.assert_array_equal(head[kept], old_head)
    assert np.all(np.delete(head, kept, axis=0) == 0.0)


def _chain1d(filters):
    def body(x):
        x = L.Conv1D(filters, 3, padding="same", activation="relu", name="c")(x)
        x = L.BatchNormalization(name="bn")(x)
        x = L.MaxPooling1D(2, name="mp")(x)
        x = L.ZeroPadding1D((2, 1), name="pad")(x)
        x = L.UpSampling1D(2, name="up")(x)
        x = L.Cropping1D((1, 2), name="crop")(x)
        x = L.AveragePooling1D(3, strides=2, name="ap")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_pooling_chain_1d_through_flatten(tmp_path):
    rng = np.random.default_rng(12)
    old, batch, path = _old_model(tmp_path, (10, 3), _chain1d(4), rng)
    new, _ = _new_model((10, 3), _chain1d(6))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    steps = predict(keras.Model(old.inputs, old.get_layer("ap").output), batch).shape[1]
    new_h = _w(new, "head").reshape(steps, 6, 2)
    np.testing.assert_array_equal(new_h[:, :4], _w(old, "head").reshape(steps, 4, 2))
    assert np.all(new_h[:, 4:] == 0.0)


def _chain3d(filters):
    def body(x):
        x = L.Conv3D(filters, 3, padding="same", name="c")(x)
        x = L.BatchNormalization(name="bn")(x)
        x = L.MaxPooling3D(2, name="mp")(x)
        x = L.ZeroPadding3D(1, name="pad")(x)
        x = L.UpSampling3D(2, name="up")(x)
        x = L.Cropping3D(((1, 0), (0, 1), (1, 1)), name="crop")(x)
        x = L.AveragePooling3D(2, name="ap")(x)
        x = L.GlobalMaxPooling3D(name="gmp")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_pooling_chain_3d(tmp_path):
    rng = np.random.default_rng(13)
    old, batch, path = _old_model(tmp_path, (4, 4, 4, 2), _chain3d(3), rng)
    new, _ = _new_model((4, 4, 4, 2), _chain3d(4))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    np.testing.assert_array_equal(_w(new, "c")[..., :3], _w(old, "c"))
    np.testing.assert_array_equal(_w(new, "head")[:3], _w(old, "head"))
    assert np.all(_w(new, "head")[3:] == 0.0)


# -- channels_first ------------------------------------------------------------------------


def _channels_first(filters, data_format="channels_first"):
    axis = 1 if data_format == "channels_first" else -1

    def body(x):
        x = L.Conv2D(filters, 3, padding="same", data_format=data_format, name="c")(x)
        x = L.BatchNormalization(axis=axis, name="bn")(x)
        x = L.MaxPooling2D(data_format=data_format, name="mp")(x)
        x = L.Flatten(data_format=data_format, name="flat")(x)
        return L.Dense(2, name="head")(x)

    return body


def _run_channels_first(model, filters, x):
    """The outputs of a channels-first model, computed by its channels-last twin with the same
    weights: TensorFlow runs channels-first convolutions on the CPU only where oneDNN is on
    (not on every CPU), and a channels-first Flatten flattens as (row, column, channel)."""
    twin = _model((6, 6, 2), _channels_first(filters, "channels_last"))
    for layer in twin.layers:
        for a, b in zip(layer.weights, model.get_layer(layer.name).weights, strict=True):
            a.assign(b.numpy())
    return predict(twin, np.transpose(x, (0, 2, 3, 1)))


def test_channels_first_conv_pool_flatten(tmp_path):
    rng = np.random.default_rng(14)
    keras.utils.set_random_seed(1)
    # Non-trivial old weights, BatchNormalization statistics from a real batch: set on the
    # channels-last twin (which runs everywhere), then moved into the channels-first model.
    batch = _normal(rng, BATCH, 2, 6, 6)
    twin = _model((6, 6, 2), _channels_first(3, "channels_last"))
    randomize(twin, np.transpose(batch, (0, 2, 3, 1)))
    old = _model((2, 6, 6), _channels_first(3))
    for layer in twin.layers:
        for a, b in zip(old.get_layer(layer.name).weights, layer.weights, strict=True):
            a.assign(b.numpy())
    old_out = _run_channels_first(old, 3, batch)
    assert max_diff(old_out, _run_channels_first(old, 3, _normal(rng, BATCH, 2, 6, 6))) > 1e-3
    path = tmp_path / "old.keras"
    old.save(path)
    new, _ = _new_model((2, 6, 6), _channels_first(5))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    d = max_diff(_run_channels_first(new, 5, batch), old_out)
    assert d <= TOL, f"surgery changed the old outputs: max diff {d:.3e}"
    # Flatten(channels_first) flattens as channels_last: (row, column, channel).
    new_h = _w(new, "head").reshape(3, 3, 5, 2)
    np.testing.assert_array_equal(new_h[:, :, :3], _w(old, "head").reshape(3, 3, 3, 2))
    assert np.all(new_h[:, :, 3:] == 0.0)
    np.testing.assert_array_equal(_w(new, "c")[..., :3], _w(old, "c"))


# -- what cannot be preserved is reported --------------------------------------------------------


def _cropped(cropping):
    def body(x):
        x = L.Conv2D(3, 3, padding="same", name="c")(x)
        x = L.Cropping2D(cropping, name="crop")(x)
        x = L.Flatten(name="flat")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_changed_cropping_is_reported(tmp_path):
    rng = np.random.default_rng(15)
    old, batch, path = _old_model(tmp_path, (6, 6, 2), _cropped(((1, 1), (0, 0))), rng)
    new, _ = _new_model((6, 6, 2), _cropped(((2, 0), (0, 0))))  # same shape, shifted window
    report = ks.migrate_weights(path, new)

    assert not report.preserves_function
    _assert_warns_about(report, "'crop'")
    assert max_diff(predict(new, batch), predict(old, batch)) > 1e-4


def test_grown_image_is_reported(tmp_path):
    rng = np.random.default_rng(16)
    old, batch, path = _old_model(tmp_path, (6, 6, 2), _conv_bn(), rng)
    new, _ = _new_model((8, 8, 2), _conv_bn())
    report = ks.migrate_weights(path, new)

    assert not report.preserves_function
    _assert_warns_about(report, "'conv'", "'gmp'")
    _assert_same_weights(new, old, "conv", "bn", "head")


def _grouped(filters):
    def body(x):
        x = L.Conv2D(filters, 3, groups=2, activation="relu", name="g")(x)
        x = L.GlobalAveragePooling2D(name="gap")(x)
        return L.Dense(2, name="head")(x)

    return body


def test_grouped_conv_grows_filters_per_group(tmp_path):
    rng = np.random.default_rng(17)
    old, batch, path = _old_model(tmp_path, (6, 6, 4), _grouped(4), rng)
    new, _ = _new_model((6, 6, 4), _grouped(6))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    kept = [0, 1, 3, 4]  # two groups of 2 filters became two groups of 3
    np.testing.assert_array_equal(_w(new, "g")[..., kept], _w(old, "g"))
    np.testing.assert_array_equal(_w(new, "g", "bias")[kept], _w(old, "g", "bias"))
    np.testing.assert_array_equal(_w(new, "head")[kept], _w(old, "head"))
    assert np.all(_w(new, "head")[[2, 5]] == 0.0)


def test_grouped_conv_with_grown_input_is_reported(tmp_path):
    rng = np.random.default_rng(18)
    old, batch, path = _old_model(tmp_path, (6, 6, 4), _grouped(4), rng)
    new, _ = _new_model((6, 6, 6), _grouped(4))
    report = ks.migrate_weights(path, new)

    assert not report.preserves_function
    _assert_warns_about(report, "'g'")


# -- unknown lengths ---------------------------------------------------------------------------


def _variable_length(x):
    x = L.Conv1D(5, 3, padding="causal", activation="relu", name="conv")(x)
    x = L.MaxPooling1D(2, name="mp")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return L.Dense(2, name="head")(x)


def test_variable_length_sequence_with_inserted_feature(tmp_path):
    keras.utils.set_random_seed(1)
    old = _model((None, 3), _variable_length)
    rng = np.random.default_rng(19)
    batch = _normal(rng, BATCH, 10, 3)
    randomize(old, batch)
    assert_input_sensitive(old, batch, _normal(rng, BATCH, 10, 3))
    path = str(tmp_path / "old.keras")
    old.save(path)
    new, _ = _new_model((None, 4), _variable_length)
    report = ks.migrate_weights(
        path, new, old_features={"img": ["a", "b", "c"]}, new_features={"img": ["a", "b", "x", "c"]}
    )

    assert report.preserves_function, report.warnings
    for steps in (7, 12):
        x_old = _normal(rng, BATCH, steps, 3)
        _assert_preserved(new, np.insert(x_old, 2, _normal(rng, BATCH, steps), axis=-1), old, x_old)
    np.testing.assert_array_equal(np.delete(_w(new, "conv"), 2, axis=1), _w(old, "conv"))
    assert np.all(_w(new, "conv")[:, 2] == 0.0)


def test_flatten_of_unknown_length_is_opaque(tmp_path):
    def body(x):
        return L.Flatten(name="flat")(L.Conv1D(2, 3, name="conv")(x))

    keras.utils.set_random_seed(1)
    old = _model((None, 3), body)
    path = str(tmp_path / "old.keras")
    old.save(path)
    new, _ = _new_model((None, 3), body)
    report = ks.migrate_weights(path, new)
    _assert_warns_about(report, "'flat'")
    _assert_same_weights(new, old, "conv")


# -- every rule against the contract checker -----------------------------------------------------


def _same(**kw):
    return {"padding": "same", **kw}


SWEEP = [
    (L.Conv1D, (8, 3), _same(filters=3, kernel_size=3), _same(filters=5, kernel_size=5)),
    (L.Conv2D, (6, 6, 2), _same(filters=3, kernel_size=3, strides=2),
     _same(filters=4, kernel_size=5, strides=2)),
    (L.Conv3D, (4, 4, 4, 2), _same(filters=2, kernel_size=3), _same(filters=3, kernel_size=3)),
    (L.Conv1DTranspose, (5, 2), _same(filters=3, kernel_size=3, strides=2),
     _same(filters=4, kernel_size=5, strides=2)),
    (L.Conv2DTranspose, (3, 3, 2), dict(filters=2, kernel_size=2, strides=2, output_padding=1),
     dict(filters=3, kernel_size=4, strides=2, output_padding=1)),
    (L.Conv3DTranspose, (2, 2, 2, 2), dict(filters=2, kernel_size=2),
     dict(filters=3, kernel_size=2)),
    (L.DepthwiseConv1D, (8, 3), _same(kernel_size=3, depth_multiplier=2),
     _same(kernel_size=5, depth_multiplier=3)),
    (L.DepthwiseConv2D, (5, 5, 2), dict(kernel_size=3), dict(kernel_size=3, depth_multiplier=2)),
    (L.SeparableConv1D, (8, 3), _same(filters=3, kernel_size=3, depth_multiplier=2),
     _same(filters=4, kernel_size=5, depth_multiplier=2)),
    (L.SeparableConv2D, (5, 5, 2), dict(filters=2, kernel_size=3), dict(filters=3, kernel_size=3)),
    (L.MaxPooling2D, (5, 5, 3), _same(pool_size=2, strides=1), None),
    (L.AveragePooling1D, (7, 3), _same(pool_size=3, strides=2), None),
    (L.AveragePooling3D, (4, 4, 4, 2), dict(pool_size=2), None),
    (L.GlobalAveragePooling3D, (3, 3, 3, 2), {}, None),
    (L.GlobalMaxPooling1D, (5, 3), dict(keepdims=True), None),
    (L.ZeroPadding3D, (2, 2, 2, 2), dict(padding=((1, 0), (0, 1), (1, 1))), None),
    (L.Cropping1D, (6, 3), dict(cropping=(2, 1)), None),
    (L.UpSampling2D, (3, 3, 2), dict(size=2, interpolation="bilinear"), None),
    (L.Reshape, (4, 3), dict(target_shape=(4, 1, -1)), None),
    (L.Permute, (4, 3), dict(dims=(2, 1)), None),
    (L.RepeatVector, (3,), dict(n=2), None),
    (L.Flatten, (3, 3, 2), {}, None),
]


@pytest.mark.parametrize(
    "cls, shape, old_kwargs, new_kwargs", SWEEP, ids=[row[0].__name__ for row in SWEEP]
)
def test_contract_checker_with_inserted_feature(cls, shape, old_kwargs, new_kwargs):
    from keras_surgery.testing import check_rule

    result = check_rule(
        lambda **kw: cls(name="layer", **kw), shape, old_kwargs=old_kwargs, new_kwargs=new_kwargs
    )
    logger.info("%s max diff %.3e", cls.__name__, result.max_diff)
    assert result.preserves_function and result.max_diff <= TOL


def test_contract_checker_time_distributed():
    from keras_surgery.testing import check_rule

    result = check_rule(
        lambda **kw: L.TimeDistributed(L.Dense(**kw), name="layer"), (4, 3),
        old_kwargs=dict(units=3), new_kwargs=dict(units=5),
    )
    assert result.preserves_function and result.max_diff <= TOL
