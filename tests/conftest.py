"""Test set-up: the TensorFlow backend unless KERAS_BACKEND says otherwise, quiet logs,
deterministic seeds, and the markers that pick the tests of one backend."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "tensorflow_only: makes sense on the TensorFlow backend only (tf.distribute, "
        "tf.GradientTape, TensorFlow's defensive copies); the JAX and PyTorch runs deselect it "
        "with -m 'not tensorflow_only'",
    )
    config.addinivalue_line(
        "markers",
        "slow_on_other_backends: runs on every backend, but too slowly for the JAX and PyTorch "
        "runs' time budget; the TensorFlow run covers it",
    )
    config.addinivalue_line(
        "markers",
        "applications_sweep: every keras.applications constructor (tests/test_all_applications"
        ".py); `make test` runs it as its own step after the TensorFlow suite",
    )


@pytest.fixture(autouse=True)
def _seed():
    import keras

    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
