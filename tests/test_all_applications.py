"""Every keras.applications constructor in the installed Keras: identity surgery, an image that
gains a channel and a classifier that gains classes.

A sweep, marked `applications_sweep`: `make test` runs it as its own step after the TensorFlow
suite (the largest models take a minute each on 2 cores). tests/test_applications.py checks
four of them in more detail (file round trip, exact slices of the first convolution, ConvNeXt's
preprocessing) in the main suite.

Each old model (weights=None: nothing is downloaded) gets random biases and scales and
BatchNormalization statistics from a real batch, and is checked to depend on its input. Then:
1. into its twin (same architecture, other initial values): every weight copied, the outputs
   identical within float32 round-off;
2. into a twin with 4 input channels and 12 classes (`classifier_activation=None`): the new
   channel has no influence at all, the old logits are preserved within round-off amplified by
   depth, the classifier's old columns are copied exactly and its new ones keep their values.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import (
    assert_input_sensitive,
    calibrate_batch_norm,
    predict,
    preservation_bound,
    randomize,
)

OLD_CLASSES, NEW_CLASSES = 10, 12
BATCH = 2
CALIBRATION = 16  # images the BatchNormalization statistics are computed on
# Relative bound for the grown twin: float32 round-off amplified by depth and by random
# BatchNormalization statistics (as in tests/test_applications.py).
PRESERVE_RTOL = 2e-3
# Smallest inputs the constructors accept, where it is not 32.
SIZES = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71, "NASNetLarge": 32}
# Models whose pixels are raw [0, 255] values (EfficientNet rescales inside; VGG expects
# caffe-style pixels, and without BatchNormalization its 16 ReLU layers under Glorot
# initialisers shrink an N(0, 1) image below float32 resolution); the others get ~N(0, 1).
RAW_PIXELS = ("EfficientNetB", "VGG")
# Built-in preprocessing that is defined for 3 channels only (ImageNet means): off on both
# sides, as a user growing the input would have it.
NO_PREPROCESSING = ("ConvNeXt", "EfficientNetV2", "MobileNetV3")

CONSTRUCTORS = sorted(
    name for name, obj in vars(keras.applications).items()
    if name[:1].isupper() and inspect.isfunction(obj)
)

pytestmark = [
    pytest.mark.applications_sweep,
    pytest.mark.tensorflow_only,  # the sweep is about the models, not the backend
    pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning"),
    pytest.mark.filterwarnings("ignore:This model usually expects:UserWarning"),
    pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning"),
]


def _build(name: str, channels: int, classes: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    kwargs = {}
    if name.startswith(NO_PREPROCESSING):
        kwargs["include_preprocessing"] = False
    size = SIZES.get(name, 32)
    return getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, channels), classes=classes,
        classifier_activation=None, **kwargs,
    )


def _images(name: str, rng: np.random.Generator, channels: int) -> np.ndarray:
    size = SIZES.get(name, 32)
    shape = (BATCH, size, size, channels)
    if name.startswith(RAW_PIXELS):
        return rng.uniform(0, 255, shape).astype("float32")
    return rng.normal(size=shape).astype("float32")


def _calibrate(model: keras.Model, name: str, rng: np.random.Generator) -> None:
    """Non-trivial values everywhere: random biases and scales, an adapted-looking
    Normalization, ConvNeXt's LayerScale away from 1e-6, and BatchNormalization statistics
    from one forward pass over a calibration batch of CALIBRATION images (statistics from the
    two test images alone leave deep nets such as EfficientNetB7 chaotic: a 1e-6 change of
    the input moved their outputs by 1e4)."""
    # Without BatchNormalization (VGG) random biases of 0.3 swamp what reaches the head from
    # the pixels (its outputs then barely depend on them): smaller ones there.
    normalised = any(isinstance(la, keras.layers.BatchNormalization)
                     for la in model._flatten_layers())
    randomize(model, None, bias_scale=0.3 if normalised else 0.01)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Normalization) and layer.weights:
            n = layer.adapt_mean.shape
            layer.adapt_mean.assign(rng.uniform(0.3, 0.7, n).astype("float32"))
            layer.adapt_variance.assign(rng.uniform(0.05, 0.1, n).astype("float32"))
            layer.finalize_state()
        if type(layer).__name__ == "LayerScale":
            (gamma,) = layer.weights
            gamma.assign(rng.uniform(0.1, 0.5, gamma.shape).astype("float32"))
    calibration = np.concatenate([_images(name, rng, 3) for _ in range(CALIBRATION // BATCH)])
    calibrate_batch_norm(model, calibration, rng, relative_margin=True)


def _assert_well_conditioned(model: keras.Model, x: np.ndarray, y: np.ndarray,
                             rng: np.random.Generator) -> None:
    """A float32-sized change of the input must move the outputs by little more, or no
    round-off bound means anything (the check is of the test's old model, not the surgery)."""
    nudged = x * (1 + 1e-6 * rng.normal(size=x.shape)).astype("float32")
    moved = float(np.max(np.abs(predict(model, nudged) - y)))
    assert moved <= 1e-3 * float(np.max(np.abs(y))), f"ill-conditioned old model ({moved})"


def _classifier(model: keras.Model, classes: int) -> keras.layers.Layer:
    """The last layer with one kernel column per class (a Dense, or MobileNetV3's 1x1 Conv2D
    logits)."""
    heads = [layer for layer in model._flatten_layers()
             if getattr(layer, "kernel", None) is not None and layer.kernel.shape[-1] == classes]
    assert heads, f"{model.name} has no layer with {classes} kernel columns"
    return heads[-1]


def _np(v) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(v), copy=True)


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_every_application(name):
    rng = np.random.default_rng(0)
    old = _build(name, 3, OLD_CLASSES, seed=1)
    _calibrate(old, name, rng)
    x = _images(name, rng, 3)
    assert_input_sensitive(old, x, _images(name, rng, 3))
    y_old = predict(old, x)
    _assert_well_conditioned(old, x, y_old, rng)

    twin = _build(name, 3, OLD_CLASSES, seed=2)
    report = ks.migrate_weights(old, twin)
    assert report.preserves_function, report.warnings
    totals = report.plan.totals()
    assert totals["zeroed"] == 0 and totals["fresh"] == 0, totals
    assert np.max(np.abs(predict(twin, x) - y_old)) <= preservation_bound(y_old, ulps=64)
    del twin

    grown = _build(name, 4, NEW_CLASSES, seed=3)
    head = _classifier(grown, NEW_CLASSES)
    fresh_kernel = _np(head.kernel)
    report = ks.migrate_weights(old, grown)
    assert report.preserves_function, report.warnings
    zero = np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1)
    other = np.concatenate([x, _images(name, rng, 1)], axis=-1)
    y_zero, y_other = predict(grown, zero), predict(grown, other)
    assert np.max(np.abs(y_zero - y_other)) <= 1e-6 * np.max(np.abs(y_zero)), \
        "the new channel changes the outputs"
    scale = np.max(np.abs(y_old))
    assert np.max(np.abs(y_zero[:, :OLD_CLASSES] - y_old)) <= PRESERVE_RTOL * scale
    new_kernel, old_kernel = _np(head.kernel), _np(_classifier(old, OLD_CLASSES).kernel)
    np.testing.assert_array_equal(new_kernel[..., :OLD_CLASSES], old_kernel)
    np.testing.assert_array_equal(new_kernel[..., OLD_CLASSES:], fresh_kernel[..., OLD_CLASSES:])
