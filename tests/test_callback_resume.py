"""SurgeryCallback resume safety (issue 15, item 3): a restart from the run's own checkpoint or
backup never re-applies the surgery over trained weights, in either callback order and in a new
process; a fresh surgery is never skipped silently; where it cannot tell, it refuses."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.callback import MARKER_NAME, SIDECAR_SUFFIX, read_marker

OLD = ["hp", "mana", "x", "y"]
NEW = ["hp", "armor", "mana", "x", "y"]
ROWS = [NEW.index(f) for f in OLD]
BATCHES = 4  # per epoch


def _model(features, width, seed, lr=0.05):
    keras.utils.set_random_seed(seed)
    x = keras.Input((len(features),), name="obs")
    h = keras.layers.Dense(width, activation="tanh", name="h")(x)
    model = keras.Model(x, keras.layers.Dense(2, name="out")(h))
    # (eager: tracing a train function per model costs more than these few batches)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.5), loss="mse",
                  run_eagerly=True)
    return model


def new_model(seed):
    """The new architecture: one more input feature, a wider hidden layer."""
    return _model(NEW, 8, seed)


def data(features, seed=0):
    rng = np.random.default_rng(seed)
    cols = {f: rng.normal(size=8 * BATCHES).astype("float32") for f in set(OLD) | set(NEW)}
    x = np.stack([cols[f] for f in features], 1)
    y = np.stack([np.sin(cols["hp"]) + cols["x"], cols["mana"] * cols["y"]], 1)
    return x, y.astype("float32")


def weights(model):
    return {w.path: keras.ops.convert_to_numpy(w.value).copy() for w in model.weights}


class Probe(keras.callbacks.Callback):
    """Records the weights training starts from (first batch, after every on_train_begin)."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen is None:
            self.seen = weights(self.model)


class Interrupt(keras.callbacks.Callback):
    """Raises at the end of `batch` of `epoch` (listed last: the backups of that batch are
    written before it raises)."""

    def __init__(self, epoch, batch=BATCHES - 1):
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == self.batch:
            raise RuntimeError("interrupted")


def is_surgery_of(seen, old_weights):
    """Whether `seen` holds the copied slices of the old model exactly (np.take oracle)."""
    return (np.array_equal(np.take(seen["h/kernel"], ROWS, axis=0)[:, :6], old_weights["h/kernel"])
            and np.array_equal(seen["h/bias"][:6], old_weights["h/bias"])
            and np.array_equal(seen["out/kernel"][:6], old_weights["out/kernel"])
            and np.array_equal(seen["out/bias"], old_weights["out/bias"]))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _saved_old(folder, seed):
    old = _model(OLD, 6, seed)
    x, y = data(OLD, seed)
    old.fit(x, y, epochs=2, batch_size=8, verbose=0)
    out = keras.ops.convert_to_numpy(old(x))
    assert np.ptp(out, axis=0).min() > 1e-2  # the old model depends on its input
    path = os.path.join(folder, f"old{seed}.keras")
    old.save(path)
    return path, weights(old)


@pytest.fixture(scope="module")
def olds(tmp_path_factory):
    """Two different trained old models, saved: (path, weights) each."""
    folder = str(tmp_path_factory.mktemp("olds"))
    return _saved_old(folder, 0), _saved_old(folder, 3)


def surgery(path, **kwargs):
    return ks.SurgeryCallback(path, old_features={"obs": OLD}, new_features={"obs": NEW},
                              **kwargs)


def fit(model, callbacks, epochs=1):
    probe = Probe()
    model.fit(*data(NEW), epochs=epochs, batch_size=8, verbose=0,
              callbacks=[*callbacks, probe])
    return probe.seen


def test_same_process_second_fit_keeps_the_trained_weights(olds):
    (path, old), _ = olds
    model = new_model(1)
    callback = surgery(path)
    assert is_surgery_of(fit(model, [callback]), old) and callback.outcome == "applied"
    trained = weights(model)
    assert not is_surgery_of(trained, old)  # training moved the copied slices
    again = surgery(path)  # a new callback object for the same surgery (a re-run cell)
    assert_same(fit(model, [again]), trained)
    assert again.outcome == "skipped" and again.report is None
    fit_start(model, callback)  # the same callback object again
    assert callback.outcome == "skipped"


def fit_start(model, callback, epochs=1):
    """Checks that a further fit with `callback` starts from the model's weights."""
    before = weights(model)
    seen = fit(model, [callback], epochs)
    assert_same(seen, before)
    return seen


def test_fresh_model_after_a_finished_run_gets_the_surgery(olds, tmp_path):
    # A completed run left its checkpoint and marker; a fresh model (not loaded) is operated on.
    (path, old), _ = olds
    ckpt = str(tmp_path / "ckpt.keras")
    fit(new_model(1), [surgery(path), keras.callbacks.ModelCheckpoint(ckpt)], epochs=2)
    assert read_marker(ckpt + SIDECAR_SUFFIX) is not None
    callback = surgery(path)
    assert is_surgery_of(fit(new_model(2), [keras.callbacks.ModelCheckpoint(ckpt), callback]), old)
    assert callback.outcome == "applied"


_RESTART = """
import json, sys
sys.path.insert(0, sys.argv[1])
import keras, numpy as np
import test_callback_resume as t
old = sys.argv[2]
for kind, ckpt, out in json.loads(sys.argv[3]):
    if kind == "load_model":
        model = keras.saving.load_model(ckpt)
    else:
        model = t.new_model(7)
        model.load_weights(ckpt)  # (Keras skips the unbuilt optimizer: its state is lost)
    callback = t.surgery(old)
    seen = t.fit(model, [keras.callbacks.ModelCheckpoint(ckpt), callback])
    np.savez(out, **{k.replace("/", "."): v for k, v in seen.items()})
    print(json.dumps({"kind": kind, "outcome": callback.outcome, "reason": callback.reason}))
"""


def test_new_process_resuming_from_its_checkpoint_keeps_the_trained_weights(olds, tmp_path):
    # One restarted process resumes from a .keras checkpoint (load_model) and from a
    # .weights.h5 one (load_weights), the SurgeryCallback still listed.
    (path, old), _ = olds
    runs, trained = [], {}
    for kind, name in [("load_model", "ckpt.keras"), ("load_weights", "ckpt.weights.h5")]:
        ckpt = str(tmp_path / name)
        first = new_model(1)
        assert is_surgery_of(fit(first, [surgery(path), keras.callbacks.ModelCheckpoint(
            ckpt, save_weights_only=kind == "load_weights")], epochs=2), old)
        trained[kind] = weights(first)  # what the checkpoint of the last epoch holds
        runs.append((kind, ckpt, str(tmp_path / f"{kind}.npz")))
    script = tmp_path / "restart.py"
    script.write_text(_RESTART)
    run = subprocess.run([sys.executable, str(script), os.path.dirname(__file__), path,
                          json.dumps(runs)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.strip().splitlines()[-2:]]
    for (kind, _, out), result in zip(runs, results):
        assert result["kind"] == kind and result["outcome"] == "skipped", result
        with np.load(out) as seen:
            got = {k.replace(".", "/"): seen[k] for k in seen.files}
        assert_same(got, trained[kind])
        assert not is_surgery_of(got, old)


def test_loaded_model_without_its_checkpoint_listed_is_refused(olds, tmp_path):
    (path, old), _ = olds
    ckpt = str(tmp_path / "ckpt.keras")
    fit(new_model(1), [surgery(path), keras.callbacks.ModelCheckpoint(ckpt)], epochs=2)
    loaded = keras.saving.load_model(ckpt)
    trained = weights(loaded)
    with pytest.raises(ks.SurgeryError, match=r"optimizer has taken \d+ steps.*on_resume"):
        fit(loaded, [surgery(path)])
    assert_same(weights(loaded), trained)
    skip = surgery(path, on_resume="skip")
    assert_same(fit(loaded, [skip]), trained)
    assert skip.outcome == "skipped"
    applied = surgery(path, on_resume="apply")
    assert is_surgery_of(fit(keras.saving.load_model(ckpt), [applied]), old)


def test_checkpoint_of_a_run_without_surgery_is_refused_naming_it(olds, tmp_path):
    (path, _), _ = olds
    ckpt = str(tmp_path / "plain.weights.h5")
    fit(new_model(1), [keras.callbacks.ModelCheckpoint(ckpt, save_weights_only=True)])
    model = new_model(2)
    model.load_weights(ckpt)
    trained = weights(model)
    with pytest.raises(ks.SurgeryError, match="plain.weights.h5.*holds no keras-surgery marker"):
        fit(model, [keras.callbacks.ModelCheckpoint(ckpt, save_weights_only=True),
                    surgery(path)])
    assert_same(weights(model), trained)


@pytest.mark.parametrize("save_freq,epoch,order", [
    ("epoch", 0, "surgery_first"), ("epoch", 1, "backup_first"), ("epoch", 1, "surgery_first"),
    (2, 0, "backup_first"), (2, 0, "surgery_first"), (2, 1, "surgery_first")])
def test_backup_and_restore_resume(olds, tmp_path, save_freq, epoch, order):
    (path, old), _ = olds
    backup = str(tmp_path / "backup")

    def callbacks(callback):
        restore = keras.callbacks.BackupAndRestore(backup, save_freq=save_freq)
        return [restore, callback] if order == "backup_first" else [callback, restore]

    first = new_model(1)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(first, [*callbacks(surgery(path)), Interrupt(epoch)], epochs=2)
    saved = os.path.join(backup, "latest.weights.h5")
    reference = None
    if os.path.exists(saved):  # what the restart must start from
        reference = _model(NEW, 8, 9)
        reference.load_weights(saved)
    assert (reference is None) == (save_freq == "epoch" and epoch == 0)
    callback = surgery(path)
    seen = fit(new_model(2), callbacks(callback), epochs=2)  # the restarted script
    if reference is None:  # nothing was backed up: the surgery starts over
        assert callback.outcome == "applied" and is_surgery_of(seen, old)
    else:
        assert callback.outcome == "skipped" and not is_surgery_of(seen, old)
        assert_same(seen, weights(reference))
    assert not os.path.exists(backup)  # the finished run removed its backup (and marker)


def test_backup_without_marker_or_of_another_surgery_is_refused(olds, tmp_path):
    (path, _), (other, _) = olds
    backup = str(tmp_path / "backup")
    model = new_model(1)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(model, [keras.callbacks.BackupAndRestore(backup, save_freq=2), Interrupt(0)],
            epochs=2)
    with pytest.raises(ks.SurgeryError, match="backup.*holds no keras-surgery marker"):
        fit(new_model(2), [surgery(path), keras.callbacks.BackupAndRestore(backup)])
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(new_model(1), [keras.callbacks.BackupAndRestore(backup, save_freq=2),
                           surgery(other, on_resume="skip"), Interrupt(0)], epochs=2)
    assert read_marker(os.path.join(backup, MARKER_NAME))["old"] == other
    with pytest.raises(ks.SurgeryError, match=r"another surgery \(from '.*old3.keras'"):
        fit(new_model(2), [keras.callbacks.BackupAndRestore(backup), surgery(path)])
    with pytest.raises(ks.SurgeryError, match="on_resume='apply' cannot apply here"):
        fit(new_model(2), [keras.callbacks.BackupAndRestore(backup),
                           surgery(path, on_resume="apply")])


def test_a_different_surgery_on_a_once_resumed_model_is_applied(olds, tmp_path):
    (path, _), (other, other_old) = olds
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(new_model(1), [keras.callbacks.BackupAndRestore(backup), surgery(path),
                           Interrupt(1)], epochs=3)
    resumed = new_model(2)
    first = surgery(path)
    fit(resumed, [first, keras.callbacks.BackupAndRestore(backup)], epochs=3)
    assert first.outcome == "skipped"  # resumed from its backup
    # (Keras keeps the restored initial epoch on the model: later fits start there)
    second = surgery(other)
    seen = fit(resumed, [second], epochs=3)
    assert is_surgery_of(seen, other_old) and second.outcome == "applied"
    third = surgery(other)
    fit_start(resumed, third, epochs=3)  # the second surgery, once
    assert third.outcome == "skipped"


def test_bad_on_resume_and_a_foreign_marker_are_errors(olds, tmp_path):
    (path, _), _ = olds
    with pytest.raises(ks.SurgeryError, match="on_resume must be one of.*'later'"):
        surgery(path, on_resume="later")
    bad = tmp_path / ("ckpt.keras" + SIDECAR_SUFFIX)
    bad.write_text(json.dumps({"something": "else"}))
    with pytest.raises(ks.SurgeryFileError, match="not a keras-surgery resume marker"):
        read_marker(str(bad))
