"""How new values reach the variables: every value is an array the migration allocated (never a
view of the old file), handed to TensorFlow without its defensive copy, and still right after
the migration dropped it."""

from __future__ import annotations

import gc
import hashlib

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery import fill as fill_module
from keras_surgery import stream as stream_module
from keras_surgery.fill import fill
from keras_surgery.keras_file import KerasFile
from keras_surgery.plan import AxisMap, WeightPlan
from keras_surgery.stream import _HandedOver, _owns, handed_over
from tests.util import assert_input_sensitive, max_diff, predict, randomize

pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


def _mlp(n_in, width):
    inp = keras.Input((n_in,), name="obs")
    x = keras.layers.Dense(width, activation="relu", name="h1")(inp)
    x = keras.layers.Dense(16, activation="relu", name="h2")(x)
    return keras.Model(inp, keras.layers.Dense(4, name="out")(x))


def test_a_file_view_is_never_handed_over(tmp_path):
    keras.utils.set_random_seed(3)
    path = str(tmp_path / "old.keras")
    _mlp(8, 32).save(path)
    with KerasFile(path) as f:
        view = f.read("layers/dense_1/vars/0")
        assert not _owns(view)  # a read-only view of the memory-mapped file
        assert handed_over(view) is view
        assert not _owns(np.frombuffer(b"\0" * 16, np.float32))  # bytes, not numpy's
        del view
    owned = np.ones((3, 4), np.float32)
    assert _owns(owned) and _owns(owned[1:])
    if keras.backend.backend() == "tensorflow":
        assert isinstance(handed_over(owned), _HandedOver)
    else:  # only TensorFlow copies a plain array defensively, so others get it as it is
        assert handed_over(owned) is owned
    scalar = np.float32(1.0)
    assert handed_over(scalar) is scalar  # not an array: passed as it is
    read_only = np.ones(3, np.float32)
    read_only.flags.writeable = False
    assert handed_over(read_only) is read_only  # may be someone else's: TensorFlow copies it


def test_copied_weight_is_a_new_array_in_blocks(monkeypatch):
    """A weight whose every index is copied (here permuted) is a new array, not a view of the
    old one, copied in blocks with the old pages released after each."""
    monkeypatch.setattr(fill_module, "COPY_BLOCK_BYTES", 8)
    old = np.arange(24, dtype=np.float32).reshape(6, 4)
    perm = np.array([2, 0, 1, 5, 4, 3])
    wp = WeightPlan("d", "kernel", "p", (6, 4), axes=[AxisMap("in", perm),
                                                      AxisMap("out", np.arange(4))])
    releases = []
    value = fill(wp, old, np.full((6, 4), -1, np.float32), "preserve",
                 release=lambda: releases.append(1))
    np.testing.assert_array_equal(value, np.take(old, perm, axis=0))
    assert not np.shares_memory(value, old) and _owns(value)
    assert len(releases) == 6  # blocks of at most 8 bytes: one 16-byte row at a time


def test_scalar_weight_is_copied_and_scaled():
    wp = WeightPlan("n", "count", "p", (), axes=[])
    old = np.array(3.0, np.float32)
    value = fill(wp, old, np.zeros((), np.float32), "preserve")
    assert value == 3.0 and not np.shares_memory(value, old)
    scaled = WeightPlan("n", "count", "p", (), axes=[], scale=0.5)
    assert fill(scaled, old, np.zeros((), np.float32), "preserve") == 1.5


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
def test_handed_over_value_outlives_the_array(dtype):
    """Whether TensorFlow shares the handed-over buffer or copies it (it depends on the
    buffer's alignment), the variable keeps the right values after the array is dropped and
    its memory reused, and later in-place updates work."""
    n = 1000
    # (PyTorch has no gradients of integers: an int32 variable must not be trainable there)
    var = keras.Variable(np.zeros(n, dtype), dtype=dtype, trainable=dtype != "int32")
    # Only what the loop makes can be dropped: frozen, the session's other objects are not
    # scanned again by each collection (which took ~1 s each late in a run).
    gc.freeze()
    try:
        for offset in range(16):  # buffers at every alignment
            base = np.arange(n + 16).astype(dtype) + offset
            value = base[offset:offset + n]
            expected = value.copy()
            var.assign(handed_over(value))
            del base, value
            gc.collect()
            junk = [np.full(n + 16, -7, dtype) for _ in range(64)]  # reuses freed memory
            np.testing.assert_array_equal(var.numpy(), expected)
            del junk
    finally:
        gc.unfreeze()
    var.assign_add(np.ones(n, dtype))
    np.testing.assert_array_equal(var.numpy(), expected + 1)


def test_migration_hands_over_every_value_and_keeps_the_function(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    keras.utils.set_random_seed(4)
    old = _mlp(8, 32)
    batch = rng.normal(size=(64, 8)).astype("float32")
    randomize(old, batch)
    assert_input_sensitive(old, batch, rng.normal(size=(64, 8)).astype("float32"))
    path = str(tmp_path / "old.keras")
    old.save(path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()

    keras.utils.set_random_seed(5)
    new = _mlp(8, 48)
    passed = []
    real = stream_module.handed_over

    def spy(value):
        out = real(value)
        passed.append(out)
        return out

    monkeypatch.setattr(stream_module, "handed_over", spy)
    report = ks.migrate_weights(path, new)
    assert report.preserves_function, report.warnings
    assert len(passed) == len(new.weights)
    if keras.backend.backend() == "tensorflow":
        assert all(isinstance(p, _HandedOver) for p in passed)  # no file view went to TF
    else:  # no file view went to the backend: every value is an array numpy owns
        assert all(isinstance(p, np.ndarray) and _owns(p) for p in passed)
    passed.clear()  # no reference to any value is left
    gc.collect()
    junk = [np.full((48, 48), -7, np.float32) for _ in range(64)]
    assert max_diff(predict(new, batch), predict(old, batch)) <= 1e-5
    del junk
    new.get_layer("h2").kernel.assign_add(np.ones((48, 16), np.float32))  # writable buffers
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
