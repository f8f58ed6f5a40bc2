"""The per-layer costs removed from a migration: Keras's attribute skip set looked up under the
name it is cached by (`graph.live_variables`), and one layout rebuilt per distinct layer config
(`KerasFile._check_layouts`). Both must give exactly what they gave before: the paths of the
saved file, and an error naming the one damaged layer among identical ones."""

from __future__ import annotations

import io
import zipfile

import h5py
import keras
import numpy as np
import pytest
from keras.src.backend.common import global_state
from keras.src.saving import saving_lib

import keras_surgery as ks
from keras_surgery import keras_file
from keras_surgery.graph import live_variables
from keras_surgery.keras_file import WEIGHTS_MEMBER, KerasFile
from tests.util import edit_weights

SKIPLIST = "saving_attr_skiplist_"


def chain(depth: int, *, bias_free: int | None = None) -> keras.Model:
    x = inputs = keras.Input((3,), name="x")
    for i in range(depth):
        x = keras.layers.Dense(4, activation="tanh", use_bias=i != bias_free, name=f"d{i}")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, x)


def forget_skipsets() -> None:
    for name in list(vars(global_state.GLOBAL_STATE_TRACKER)):
        if name.startswith(SKIPLIST):
            delattr(global_state.GLOBAL_STATE_TRACKER, name)


def stored_datasets(path) -> dict[str, tuple[int, ...]]:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(WEIGHTS_MEMBER)
    found: dict[str, tuple[int, ...]] = {}
    with h5py.File(io.BytesIO(data), "r") as h5:
        h5.visititems(lambda name, obj: found.__setitem__(name, obj.shape)
                      if isinstance(obj, h5py.Dataset) else None)
    return found


def test_live_variables_are_the_saved_paths_with_and_without_the_cached_skip_set(tmp_path):
    model = chain(5)
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)  # slots saved beside the layers
    path = tmp_path / "m.keras"
    model.save(path)
    stored = stored_datasets(path)
    forget_skipsets()
    first = live_variables(model)
    again = live_variables(model)  # now with the skip sets under the name Keras looks up
    for found in (first, again):
        assert {p: tuple(v.shape) for p, v in found.items()} == stored
    for p, value in first.items():  # the same variables (a few stores hold plain arrays)
        if hasattr(value, "assign"):
            assert again[p] is value, p
        else:
            np.testing.assert_array_equal(np.asarray(again[p]), np.asarray(value), err_msg=p)
    # The cached value is the one Keras computes for itself.
    for kind in ("Layer", "Functional", "Optimizer"):
        assert global_state.get_global_attribute(SKIPLIST + kind) == \
            global_state.get_global_attribute(f"saving_attr_skipset_{kind}")


def test_a_primed_walk_builds_no_reference_layers(monkeypatch):
    model = chain(20)
    live_variables(model)
    made = []
    init = keras.layers.Layer.__init__

    def counting(self, *args, **kwargs):
        made.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__init__", counting)
    live_variables(model)
    assert made == []
    forget_skipsets()  # Keras's own walk, as it ships: one reference Layer() per object
    saving_lib._save_state(model, None, None, "", visited_saveables=set())
    assert len(made) > 20


def test_clear_session_drops_the_cached_skip_set():
    live_variables(chain(2))
    assert global_state.get_global_attribute(SKIPLIST + "Layer") is not None
    keras.backend.clear_session()
    assert global_state.get_global_attribute(SKIPLIST + "Layer") is None
    model = chain(2)
    assert sorted(live_variables(model)) == sorted(
        f"layers/{g}/vars/{i}" for g, n in
        [("dense", 2), ("dense_1", 2), ("batch_normalization", 4)] for i in range(n))


def saved_chain(tmp_path, depth: int, **kwargs):
    model = chain(depth, **kwargs)
    path = tmp_path / "chain.keras"
    model.save(path)
    return path


def counting_layouts(monkeypatch) -> list[str]:
    built: list[str] = []
    layout = keras_file.keras_layout

    def counted(node, entry):
        built.append(node.name)
        return layout(node, entry)

    monkeypatch.setattr(keras_file, "keras_layout", counted)
    return built


def test_identical_layers_rebuild_one_layout(tmp_path, monkeypatch):
    path = saved_chain(tmp_path, 8, bias_free=5)
    built = counting_layouts(monkeypatch)
    with KerasFile(path) as f:
        graph = f.graph()
    # d0 reads 3 inputs, d1-d7 read 4 but d5 has no bias, bn: four distinct layouts.
    assert sorted(built) == ["bn", "d0", "d1", "d5"]
    assert [w.local for w in graph.layers["d5"].weights] == ["vars/0"]


@pytest.mark.parametrize("damaged", [1, 6])
def test_one_damaged_layer_among_identical_ones_is_named(tmp_path, damaged):
    path = saved_chain(tmp_path, 8)
    group = f"layers/dense_{damaged}/vars"

    def widen(h5):
        del h5[f"{group}/0"]
        h5[group].create_dataset("0", data=np.ones((4, 7), "float32"))

    bad = edit_weights(path, tmp_path / "bad.keras", widen)
    with pytest.raises(ks.SurgeryFileError,
                       match=rf"layer 'd{damaged}' \(Dense\) do not match its config: "
                             rf"'{group}/0' has shape \(4, 7\), expected \(4, 4\)"):
        KerasFile(bad).graph()


def test_a_bias_stored_for_a_bias_free_twin_is_refused(tmp_path):
    # d5 has no bias in its config but the same config otherwise as d1-d7 (with bias): the
    # layout of d5 must be its own, so a bias stored for it is an error.
    path = saved_chain(tmp_path, 8, bias_free=5)

    def add_bias(h5):
        h5["layers/dense_5/vars"].create_dataset("1", data=np.ones((4,), "float32"))

    bad = edit_weights(path, tmp_path / "bias.keras", add_bias)
    with pytest.raises(ks.SurgeryFileError,
                       match=r"'layers/dense_5/vars/1' is not a variable of this layer"):
        KerasFile(bad).graph()


@pytest.mark.parametrize("row", [0, 37, 63])
@pytest.mark.parametrize("whole", [True, False])
def test_nonfinite_check_in_blocks_finds_a_nan_in_any_block(tmp_path, monkeypatch, row, whole):
    # The NaN / Inf check of an old weight reads it in row blocks, the file's pages released
    # after each: a NaN in the first, a middle or the last block is still reported. A weight
    # copied whole is checked in its new value instead (in memory: the file is not read again).
    from keras_surgery import apply as apply_module

    names = [f"f{i}" for i in range(64)]
    old = keras.Sequential([keras.Input((64,), name="x"), keras.layers.Dense(32, name="hidden")])
    kernel = np.random.default_rng(0).standard_normal((64, 32)).astype("float32")
    kernel[row, 5] = np.nan
    old.get_layer("hidden").kernel.assign(kernel)
    old.save(tmp_path / "nan.keras")
    monkeypatch.setattr(apply_module, "COPY_BLOCK_BYTES", 8 * 32 * 4)  # 8 rows per block
    released, checked = [], []
    release = KerasFile.release
    monkeypatch.setattr(KerasFile, "release", lambda self: (released.append(1), release(self)))
    real_check = apply_module.nonfinite_warning
    def check(wp, values):
        checked.append(values.shape)
        return real_check(wp, values)

    monkeypatch.setattr(apply_module, "nonfinite_warning", check)
    new_names = names if whole else names[:10] + ["added"] + names[10:]
    new = keras.Sequential([keras.Input((len(new_names),), name="x"),
                            keras.layers.Dense(32, name="hidden")])
    report = ks.migrate_weights(tmp_path / "nan.keras", new, old_features={"x": names},
                                new_features={"x": new_names})
    assert "layer 'hidden': old weight 'kernel' holds NaN or Inf values; they were copied as " \
        "they are." in report.warnings
    got = new.get_layer("hidden").kernel.numpy()
    np.testing.assert_array_equal(got if whole else np.delete(got, 10, axis=0), kernel)
    if whole:
        assert (64, 32) in checked  # the new value, once
    else:
        assert (8, 32) in checked  # the old weight, a block at a time
        assert len(released) >= 64 // 8  # at least once per block of the kernel


UNPROBED = """
import sys
import keras
import keras_surgery as ks
from keras.src.utils import module_utils

def build(n_in, units):
    x = keras.Input((n_in,), name="x")
    h = keras.layers.Dense(units, activation="relu", name="h")(x)
    return keras.Model(x, keras.layers.Dense(2, name="out")(h))

report = ks.migrate_weights(build(3, 4), build(3, 6))
assert report.preserves_function, report.warnings
assert "tensorflow" not in sys.modules, "a migration imported TensorFlow"
assert module_utils.tensorflow._available is None, module_utils.tensorflow._available
print("ok")
"""


@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="on TensorFlow the backend itself imports TensorFlow")
def test_migration_on_another_backend_does_not_import_tensorflow(tmp_path):
    """Keras's serialization asks whether TensorFlow is available (importing it when it is
    installed, 4-7 s) at the first get_config: a migration on JAX or PyTorch must not pay
    for it, and must leave the question unanswered for Keras afterwards."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed, so nothing could import it")
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    run = subprocess.run([sys.executable, "-c", UNPROBED], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
