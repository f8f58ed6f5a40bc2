"""Integration tests on keras.applications models: an image gains a channel, the classifier
gains classes.

Each old model (weights=None: nothing is downloaded) gets random biases and scales and
BatchNormalization statistics from a real batch (`randomize`), is checked to depend on its
input, and is migrated into its twin with 4 input channels instead of 3 and 12 classes instead
of 10 (`classifier_activation=None`, so a grown class axis keeps the old logits). Then:

1. the new channel has no influence at all: the new outputs are the same whether it is 0 or
   random;
2. the old logits are preserved within float32 round-off (deep nets with BatchNormalization
   amplify it, so the bound is relative to the output scale), or the report says it cannot
   preserve them and names the layer why;
3. some copied / zeroed / fresh slices are checked exactly against the old and fresh weights.

ResNet50 goes through a saved `.keras` file; the other models are passed live, to save time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import assert_input_sensitive, calibrate_batch_norm, predict, randomize

OLD_CHANNELS, NEW_CHANNELS = 3, 4
OLD_CLASSES, NEW_CLASSES = 10, 12
BATCH = 4
# max |new - old| <= PRESERVE_RTOL * max |old|: float32 round-off amplified by depth and by
# random BatchNormalization statistics.
PRESERVE_RTOL = 2e-3
# max |new(x, 0) - new(x, r)| <= NO_INFLUENCE_RTOL * max |new(x, 0)|
NO_INFLUENCE_RTOL = 1e-6
logger = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning"),
    pytest.mark.filterwarnings("ignore:This model usually expects:UserWarning"),
    pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning"),
]


# -- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """One application under test and where to look at its weights."""

    name: str
    size: int  # input height and width
    pixels: str  # "raw": values in [0, 255] (the model rescales); "unit": preprocessed, ~N(0, 1)
    first_conv: tuple[str, ...]  # layer path (through nested models) of the conv reading pixels
    classifier: tuple[str, ...]
    source: str  # "file": the old model goes through a saved .keras file; "live": as a Model
    preserves: bool  # the outcome we expect (checked against the numbers either way)
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self, channels: int, classes: int, seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        return getattr(keras.applications, self.name)(
            weights=None,
            input_shape=(self.size, self.size, channels),
            classes=classes,
            classifier_activation=None,
            **dict(self.kwargs),
        )

    def images(self, rng: np.random.Generator, channels: int) -> np.ndarray:
        shape = (BATCH, self.size, self.size, channels)
        if self.pixels == "raw":
            return rng.uniform(0, 255, shape).astype("float32")
        return rng.normal(size=shape).astype("float32")


APPS = [
    App("ResNet50", 64, "unit", ("conv1_conv",), ("predictions",), "file", True),
    # Rescaling and an (adaptable) Normalization in front, DepthwiseConv2D, squeeze-excitation
    # through Reshape and Multiply.
    App("EfficientNetB0", 64, "raw", ("stem_conv",), ("predictions",), "live", True),
    # InceptionV3 needs at least 75x75; most of its layers have automatic names, so they are
    # matched structurally.
    App("InceptionV3", 75, "unit", ("conv2d",), ("predictions",), "live", True),
    # Nested Sequential blocks, grouped convolutions, LayerNormalization over channels and the
    # custom LayerScale layer. With 3 channels ConvNeXt normalises its pixels in a PreStem layer
    # that a 4-channel model does not have (see test_convnext_default_preprocessing_...), so
    # both sides are built without it here.
    App("ConvNeXtTiny", 64, "raw", ("convnext_tiny_stem", "convnext_tiny_stem_conv"),
        ("convnext_tiny_head_dense",), "live", True, (("include_preprocessing", False),)),
    # Its cells concatenate one tensor more than once (each copy is labelled as a copy); 32x32
    # is its smallest input.
    App("NASNetMobile", 32, "unit", ("stem_conv1",), ("predictions",), "live", True),
]
# Many BatchNormalization layers: one probe model per layer (`randomize`) took 129 s, so their
# statistics come from one forward pass in training mode instead (`calibrate_batch_norm`).
ONE_PASS_CALIBRATION = {"NASNetMobile"}


def _layer(model: keras.Model, path: tuple[str, ...]) -> keras.layers.Layer:
    layer = model
    for name in path:
        layer = layer.get_layer(name)
    return layer


def _first_conv(app: App, model: keras.Model) -> keras.layers.Layer:
    if app.first_conv == ("conv2d",):  # auto-named: the first Conv2D of the graph
        return next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    return _layer(model, app.first_conv)


def _values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in variables]


def _randomize_layer_scales(model: keras.Model, rng: np.random.Generator) -> None:
    """ConvNeXt's LayerScale starts at 1e-6, which would switch every residual branch off."""
    from keras.src.applications.convnext import LayerScale

    for layer in model._flatten_layers():
        if isinstance(layer, LayerScale):
            (gamma,) = layer.weights
            gamma.assign(rng.uniform(0.1, 0.5, gamma.shape).astype("float32"))


def _old_model(app: App, rng: np.random.Generator) -> tuple[keras.Model, np.ndarray]:
    old = app.build(OLD_CHANNELS, OLD_CLASSES, seed=1)
    x = app.images(rng, OLD_CHANNELS)
    for layer in old.layers:  # an adapted-looking Normalization (EfficientNet's), not 0 and 1
        if isinstance(layer, keras.layers.Normalization) and layer.weights:
            n = layer.adapt_mean.shape
            layer.adapt_mean.assign(rng.uniform(0.3, 0.7, n).astype("float32"))  # after 1/255
            layer.adapt_variance.assign(rng.uniform(0.05, 0.1, n).astype("float32"))
            layer.finalize_state()
    if app.name in ONE_PASS_CALIBRATION:
        randomize(old, None)  # biases and scales; the statistics follow
        calibrate_batch_norm(old, x, rng)
    else:
        randomize(old, x)
    _randomize_layer_scales(old, rng)
    assert_input_sensitive(old, x, app.images(rng, OLD_CHANNELS))
    return old, x


def _relative(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(scale)))


# -- the surgery -----------------------------------------------------------------------------


# 1-2 minutes each on JAX or PyTorch (2 cores): there, ConvNeXtTiny stands for the family.
SLOW_ON_OTHER_BACKENDS = {"ResNet50", "EfficientNetB0", "InceptionV3", "NASNetMobile"}


@pytest.mark.parametrize("app", [
    pytest.param(a, id=a.name, marks=[pytest.mark.slow_on_other_backends]
                 if a.name in SLOW_ON_OTHER_BACKENDS else [])
    for a in APPS
])
def test_image_gains_a_channel_and_classes(app, tmp_path):
    rng = np.random.default_rng(0)
    old, x = _old_model(app, rng)
    old_conv = _values(_first_conv(app, old).weights)
    old_head = _values(_layer(old, app.classifier).weights)
    source: Any = old
    if app.source == "file":
        source = str(tmp_path / "old.keras")
        old.save(source)

    new = app.build(NEW_CHANNELS, NEW_CLASSES, seed=2)
    fresh_head = _values(_layer(new, app.classifier).weights)
    report = ks.migrate_weights(source, new)
    logger.info("%s: %s", app.name, report.one_line())

    # 1. The new channel has no influence: a zero and a random new channel give the same outputs.
    x_zero = np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1)
    x_random = np.concatenate([x, app.images(rng, 1)], axis=-1)
    y_zero, y_random = predict(new, x_zero), predict(new, x_random)
    assert y_zero.shape == (BATCH, NEW_CLASSES)
    influence = _relative(y_random, y_zero, y_zero)
    assert influence <= NO_INFLUENCE_RTOL, f"the new channel changes the outputs ({influence:.2e})"

    # 2. The old logits, within round-off, or a report that says why not.
    y_old = predict(old, x)
    drift = _relative(y_zero[:, :OLD_CLASSES], y_old, y_old)
    logger.info("%s: preserves_function=%s, old logits max rel diff %.2e, new channel %.2e",
                app.name, report.preserves_function, drift, influence)
    assert not any("no rule" in w for w in report.warnings), report.warnings
    if report.preserves_function:
        assert drift <= PRESERVE_RTOL, f"promised preservation, got max rel diff {drift:.2e}"
        assert report.plan.dropped == []
    else:
        assert any("layer '" in w for w in report.warnings), report.warnings
    assert report.preserves_function is app.preserves, report.summary()

    # 3. Copied, zeroed and fresh slices.
    kernel, *bias = _values(_first_conv(app, new).weights)
    np.testing.assert_array_equal(kernel[..., :OLD_CHANNELS, :], old_conv[0])
    np.testing.assert_array_equal(kernel[..., OLD_CHANNELS:, :], 0.0)
    for b, old_b in zip(bias, old_conv[1:], strict=True):
        np.testing.assert_array_equal(b, old_b)
    for w, old_w, fresh_w in zip(_values(_layer(new, app.classifier).weights), old_head,
                                 fresh_head, strict=True):
        np.testing.assert_array_equal(w[..., :OLD_CLASSES], old_w)
        np.testing.assert_array_equal(w[..., OLD_CLASSES:], fresh_w[..., OLD_CLASSES:])


@pytest.mark.slow_on_other_backends  # ~50 s on PyTorch (EfficientNetB0 built twice)
def test_efficientnet_normalization_follows_the_channels():
    """EfficientNet's Normalization keeps the old statistics for the old channels; the new
    channel's are fresh (0 and 1); the stem convolution ignores it (its row is zero)."""
    app = APPS[1]
    rng = np.random.default_rng(1)
    old, _ = _old_model(app, rng)
    new = app.build(NEW_CHANNELS, OLD_CLASSES, seed=2)

    def norm(model):
        return next(la for la in model.layers if isinstance(la, keras.layers.Normalization))

    fresh = _values(norm(new).weights)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.summary()
    for got, want, initial in zip(_values(norm(new).weights), _values(norm(old).weights), fresh,
                                  strict=True):
        if got.ndim == 0:  # the sample count
            np.testing.assert_array_equal(got, want)
            continue
        np.testing.assert_array_equal(got[..., :OLD_CHANNELS], want)
        np.testing.assert_array_equal(got[..., OLD_CHANNELS:], initial[..., OLD_CHANNELS:])


def test_convnext_layer_scales_and_norms_are_copied():
    """Every LayerScale and LayerNormalization of the nested blocks is copied as it was: the
    channel axes they act on keep their labels when only the stem's input grows."""
    from keras.src.applications.convnext import LayerScale

    app = APPS[3]
    rng = np.random.default_rng(2)
    old, _ = _old_model(app, rng)
    new = app.build(NEW_CHANNELS, OLD_CLASSES, seed=2)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.summary()

    def per_channel(model):
        return {la.name: _values(la.weights) for la in model._flatten_layers()
                if isinstance(la, (LayerScale, keras.layers.LayerNormalization))}

    old_layers, new_layers = per_channel(old), per_channel(new)
    assert len(new_layers) > 30 and new_layers.keys() == old_layers.keys()
    for name, values in new_layers.items():
        for got, want in zip(values, old_layers[name], strict=True):
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_convnext_default_preprocessing_is_lost_with_a_fourth_channel():
    """With its default preprocessing, a 3-channel ConvNeXt normalises its pixels in a PreStem
    Normalization that Keras leaves out of a 4-channel ConvNeXt. The stem convolution then
    reads raw pixels instead of normalised ones: the surgery cannot preserve the old function,
    says so, and names the stem convolution."""
    app = App("ConvNeXtTiny", 64, "raw", ("convnext_tiny_stem", "convnext_tiny_stem_conv"),
              ("convnext_tiny_head_dense",), "live", False)
    rng = np.random.default_rng(3)
    old, x = _old_model(app, rng)
    assert any("prestem" in la.name for la in old.layers)
    new = app.build(NEW_CHANNELS, OLD_CLASSES, seed=2)
    assert not any("prestem" in la.name for la in new.layers)
    report = ks.migrate_weights(old, new)
    assert not report.preserves_function
    assert any("convnext_tiny_stem_conv" in w and "gone from the new model" in w
               for w in report.warnings), report.warnings
    # The report is right to refuse: the old logits are not what the new model computes.
    y_new = predict(new, np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1))
    y_old = predict(old, x)
    assert _relative(y_new, y_old, y_old) > PRESERVE_RTOL
