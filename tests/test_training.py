"""Surgery in training: optimizer state, SurgeryCallback, resume safety."""

import json

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import max_diff, predict

OLD = ["hp", "mana", "x", "y"]
NEW = ["hp", "armor", "mana", "x", "y"]


def _model(features, width, optimizer, seed, batch_norm=True):
    keras.utils.set_random_seed(seed)
    x = keras.Input((len(features),), name="obs")
    h = keras.layers.Dense(width, activation="tanh", name="h")(x)
    if batch_norm:  # (fit updates its moving statistics even at learning rate 0)
        h = keras.layers.BatchNormalization(name="bn")(h)
    y = keras.layers.Dense(2, name="out")(h)
    model = keras.Model(x, y)
    if optimizer is not None:
        model.compile(optimizer=optimizer, loss="mse")
    return model


def _data(features, n=64, seed=0):
    rng = np.random.default_rng(seed)
    cols = {f: rng.normal(size=n).astype("float32") for f in set(OLD) | set(NEW)}
    x = np.stack([cols[f] for f in features], 1)
    y = np.stack([np.sin(cols["hp"]) + cols["x"], cols["mana"] * cols["y"]], 1)
    return x, y.astype("float32")


def _trained_old(tmp_path, optimizer, batch_norm=True):
    old = _model(OLD, 6, optimizer, 0, batch_norm)
    old.fit(*_data(OLD), epochs=2, batch_size=16, verbose=0)
    path = tmp_path / "old.keras"
    old.save(path)
    return old, str(path)


def _spec(features):
    return {"obs": features}


def _slot(model, var, suffix):
    prefix = var.path.replace("/", "_")
    (found,) = [v for v in model.optimizer.variables if v.name == f"{prefix}_{suffix}"]
    return found.numpy()


@pytest.mark.parametrize("source", ["path", "live"])
def test_adam_slots_follow_their_variables(tmp_path, source):
    old, path = _trained_old(tmp_path, keras.optimizers.Adam(1e-2))
    new = _model(NEW, 9, keras.optimizers.Adam(1e-2), 1)
    report = ks.migrate_weights(path if source == "path" else old, new,
                                old_features=_spec(OLD), new_features=_spec(NEW))
    assert report.preserves_function
    assert not [w for w in report.warnings if "optimizer" in w], report.warnings
    rows = [NEW.index(f) for f in OLD]
    for suffix in ("momentum", "velocity"):
        old_k = _slot(old, old.get_layer("h").kernel, suffix)
        new_k = _slot(new, new.get_layer("h").kernel, suffix)
        np.testing.assert_array_equal(new_k[rows][:, :6], old_k)
        assert np.all(np.delete(new_k, rows, axis=0) == 0) and np.all(new_k[:, 6:] == 0)
        old_b = _slot(old, old.get_layer("bn").gamma, suffix)
        new_b = _slot(new, new.get_layer("bn").gamma, suffix)
        np.testing.assert_array_equal(new_b[:6], old_b)
        assert np.all(new_b[6:] == 0)
    assert int(new.optimizer.iterations.numpy()) == int(old.optimizer.iterations.numpy()) > 0


def test_one_adam_step_after_surgery_matches_one_more_old_step(tmp_path):
    old, path = _trained_old(tmp_path, keras.optimizers.Adam(1e-2))
    new = _model(NEW, 9, keras.optimizers.Adam(1e-2), 1)
    ks.migrate_weights(path, new, old_features=_spec(OLD), new_features=_spec(NEW))
    x_old, y = _data(OLD, n=16, seed=5)
    x_new = np.zeros((16, len(NEW)), "float32")  # the new feature is zero
    for j, f in enumerate(NEW):
        if f in OLD:
            x_new[:, j] = x_old[:, OLD.index(f)]
    old.train_on_batch(x_old, y)
    new.train_on_batch(x_new, y)
    rows = [NEW.index(f) for f in OLD]
    np.testing.assert_allclose(
        new.get_layer("h").kernel.numpy()[rows][:, :6], old.get_layer("h").kernel.numpy(),
        rtol=1e-5, atol=1e-6,
    )
    np.testing.assert_allclose(
        new.get_layer("out").kernel.numpy()[:6], old.get_layer("out").kernel.numpy(),
        rtol=1e-5, atol=1e-6,
    )


def test_callback_with_zero_learning_rate_keeps_the_old_function(tmp_path):
    # (a carried momentum would move the weights even at learning rate 0: plain SGD here)
    old, path = _trained_old(tmp_path, keras.optimizers.SGD(1e-2, momentum=0.9), False)
    new = _model(NEW, 9, keras.optimizers.SGD(0.0), 1, False)
    callback = ks.SurgeryCallback(path, old_features=_spec(OLD), new_features=_spec(NEW),
                                  report_path=tmp_path / "report.json")
    x_new, y = _data(NEW)
    new.fit(x_new, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])
    assert callback.report is not None and callback.report.preserves_function
    x_old = x_new[:, [NEW.index(f) for f in OLD]]
    assert max_diff(predict(old, x_old), predict(new, x_new)) <= 1e-5
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["preserves_function"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_callback_applies_once_per_model(tmp_path):
    _, path = _trained_old(tmp_path, keras.optimizers.Adam(1e-2))
    new = _model(NEW, 9, keras.optimizers.Adam(1e-2), 1)
    callback = ks.SurgeryCallback(path, old_features=_spec(OLD), new_features=_spec(NEW))
    x_new, y = _data(NEW)
    new.fit(x_new, y, epochs=1, verbose=0, callbacks=[callback])
    first = callback.report
    trained = [w.numpy().copy() for w in new.weights]
    callback.report = None
    new.fit(x_new, y, epochs=0, verbose=0, callbacks=[callback])
    assert callback.report is None and first is not None
    for before, after in zip(trained, new.weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_backup_and_restore_resume_skips_the_surgery(tmp_path):
    _, path = _trained_old(tmp_path, keras.optimizers.Adam(1e-2))
    backup = tmp_path / "backup"
    x_new, y = _data(NEW)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    first = _model(NEW, 9, keras.optimizers.Adam(1e-2), 1)
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(x_new, y, epochs=4, verbose=0, callbacks=[
            keras.callbacks.BackupAndRestore(str(backup)),
            ks.SurgeryCallback(path, old_features=_spec(OLD), new_features=_spec(NEW)),
            Interrupt(),
        ])
    resumed = _model(NEW, 9, keras.optimizers.Adam(1e-2), 2)
    callback = ks.SurgeryCallback(path, old_features=_spec(OLD), new_features=_spec(NEW))
    restore = keras.callbacks.BackupAndRestore(str(backup))
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["kernel"] = self.model.get_layer("h").kernel.numpy().copy()

    resumed.fit(x_new, y, epochs=4, verbose=0, callbacks=[restore, callback, Probe()])
    assert callback.report is None  # skipped: the restored weights already descend from it
    np.testing.assert_array_equal(seen["kernel"], first.get_layer("h").kernel.numpy())


def test_optimizer_problems_are_reported_not_raised(tmp_path):
    old, path = _trained_old(tmp_path, keras.optimizers.Adam(1e-2))
    other = _model(NEW, 9, keras.optimizers.SGD(1e-2, momentum=0.9), 1)
    report = ks.migrate_weights(path, other, old_features=_spec(OLD), new_features=_spec(NEW))
    assert any("old optimizer is Adam, the new one SGD" in w for w in report.warnings)
    assert report.preserves_function
    uncompiled = _model(NEW, 9, None, 1)
    report = ks.migrate_weights(path, uncompiled, old_features=_spec(OLD),
                                new_features=_spec(NEW))
    assert any("not compiled" in w for w in report.warnings)
    plain = _model(OLD, 6, None, 3)
    plain.save(tmp_path / "plain.keras")
    report = ks.migrate_weights(str(tmp_path / "plain.keras"), _model(NEW, 9, "adam", 1),
                                old_features=_spec(OLD), new_features=_spec(NEW))
    assert not [w for w in report.warnings if "optimizer" in w]
