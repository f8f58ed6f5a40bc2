"""Numeric surgery tests for per-index layers that keras.applications models define themselves:
ConvNeXt's LayerScale (one scale per channel) and StochasticDepth (identity at inference).

The old model gets non-trivial weights, is checked to depend on its input, goes through a saved
`.keras` file (so the rule is found from the file's config, without deserialising it) and is
migrated into a model whose image gained a channel in the middle and whose convolution gained
filters; the old outputs must be kept (max |new(x) - old(x)| <= 1e-5) and the per-channel scales
must follow their channels.
"""

from __future__ import annotations

import keras
import numpy as np
from keras.src.applications.convnext import LayerScale, StochasticDepth

import keras_surgery as ks
from tests.util import assert_input_sensitive, max_diff, predict, randomize

TOL = 1e-5
L = keras.layers
OLD_NAMES, NEW_NAMES = ["r", "g", "b"], ["r", "depth", "g", "b"]


def _scaled_conv(channels: int, filters: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, channels), name="img")
    h = L.Conv2D(filters, 3, padding="same", name="conv")(x)
    h = LayerScale(1e-6, filters, name="scale")(h)
    h = StochasticDepth(0.5, name="drop")(h)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, L.Dense(3, name="head")(h))


def test_layer_scale_follows_grown_filters_and_stochastic_depth_passes(tmp_path):
    rng = np.random.default_rng(0)
    old = _scaled_conv(3, 4, seed=1)
    x_old = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    randomize(old, x_old)
    (gamma,) = old.get_layer("scale").weights
    gamma.assign(rng.uniform(0.5, 2.0, gamma.shape).astype("float32"))
    assert_input_sensitive(old, x_old, rng.normal(size=x_old.shape).astype("float32"))
    path = str(tmp_path / "old.keras")
    old.save(path)

    new = _scaled_conv(4, 6, seed=2)
    fresh_gamma = np.array(new.get_layer("scale").weights[0].numpy(), copy=True)
    report = ks.migrate_weights(path, new, old_features={"img": OLD_NAMES},
                                new_features={"img": NEW_NAMES})
    assert report.preserves_function, report.summary()
    assert report.warnings == []

    x_new = np.insert(x_old, 1, rng.normal(size=x_old.shape[:-1]), axis=-1)
    assert max_diff(predict(new, x_new), predict(old, x_old)) <= TOL

    got = new.get_layer("scale").weights[0].numpy()
    np.testing.assert_array_equal(got[:4], gamma.numpy())  # old filters keep their scales
    np.testing.assert_array_equal(got[4:], fresh_gamma[4:])  # new filters: the initial 1e-6
    kernel = new.get_layer("conv").kernel.numpy()
    np.testing.assert_array_equal(kernel[:, :, 1, :4], 0.0)  # the inserted channel, old filters
    np.testing.assert_array_equal(
        np.delete(kernel[..., :4], 1, axis=2), old.get_layer("conv").kernel.numpy()
    )


def test_layer_scale_without_its_rule_is_opaque_and_reported(tmp_path):
    """The rule is what makes the difference: without it the layer is opaque, and a grown
    channel axis through it is reported, naming the layer."""
    from keras_surgery.rules.elementwise import layer_scale_rule

    old, new = _scaled_conv(3, 4, seed=1), _scaled_conv(3, 6, seed=2)
    ks.unregister_rule(LayerScale)
    try:
        report = ks.migrate_weights(old, new)
    finally:
        ks.register_rule(LayerScale, layer_scale_rule)
    assert not report.preserves_function
    assert any("'scale'" in w and "no rule" in w for w in report.warnings), report.warnings


def test_contract_checker_layer_scale():
    from keras_surgery.testing import check_rule

    result = check_rule(
        lambda **kw: LayerScale(1e-6, name="layer", **kw), (5, 3),
        old_kwargs=dict(projection_dim=3), new_kwargs=dict(projection_dim=4),
    )
    assert result.preserves_function and result.max_diff <= TOL
