"""Surgery under tf.distribute.MirroredStrategy, on two logical CPU devices.

Logical devices must be configured before TensorFlow initialises, so the check runs in a fresh
interpreter.
"""

import subprocess
import sys
import textwrap

import pytest

# tf.distribute is TensorFlow's; keras.distribution on JAX is in test_distribution_jax.py
pytestmark = pytest.mark.tensorflow_only

SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import keras_surgery as ks

    def build(n, width, seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((n,), name="obs")
        h = keras.layers.Dense(width, activation="relu", name="h")(x)
        return keras.Model(x, keras.layers.Dense(2, name="out")(h))

    old = build(3, 4, 0)
    old.compile("adam", "mse")
    old.fit(np.ones((8, 3)), np.ones((8, 2)), verbose=0)
    old.save(sys.argv[1])
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        new = build(4, 6, 1)
        new.compile("adam", "mse")
    report = ks.migrate_weights(sys.argv[1], new)
    assert report.preserves_function, report.warnings
    for v in new.weights:
        replicas = [np.asarray(r) for r in v.value.values]
        assert len(replicas) == 2, v.path
        assert all(np.array_equal(replicas[0], r) for r in replicas), v.path
    np.testing.assert_array_equal(new.get_layer("h").kernel.numpy()[:3, :4],
                                  old.get_layer("h").kernel.numpy())
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    x4 = np.concatenate([x, np.random.default_rng(1).normal(size=(8, 1))], 1).astype("float32")
    assert np.abs(np.asarray(old(x)) - np.asarray(new(x4))).max() <= 1e-5
    history = new.fit(x4, np.ones((8, 2)), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    print("MIRRORED-OK")
    """
)


def test_mirrored_strategy_replicas_identical_and_training_continues(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "old.keras")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MIRRORED-OK" in result.stdout
