"""Numeric surgery tests on small MLP-shaped models: features, widths, heads, merges, policies.

Every test sets up its old model the one shared way (the `saved_old` fixture, over
`tests.util.old_model`: non-trivial weights, outputs that depend on the input, saved), changes
the architecture, migrates, and then checks

* the function: max |new(x_new) - old(x_old)| <= 1e-5 on the old outputs, where x_new holds
  random values for new features and x_old holds 0 for removed ones;
* the copied slices, exactly, against np.take / np.delete oracles built from the old weights
  (never from the plan);
* that zero regions are exactly 0 and fresh regions hold the new model's own initial values;
* `report.preserves_function`, and a warning naming the layer whenever it is False (then the
  outputs must really differ: the flag is checked against the truth in both directions).
"""

from __future__ import annotations

import hashlib
import os

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import columns_from, max_diff, normal, old_model, predict, to_numpy

TOL = 1e-5
BATCH = 64

# Keras warns when a one-input functional model is called on a bare array; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def saved_old(tmp_path):
    """The old side of every test here: `saved_old(build, shape, rng, seed=...)` sets the model
    up the usual way (`tests.util.old_model`, batches of BATCH) and saves it in `tmp_path`;
    returns (model, batch, path)."""

    def make(build, shape, rng, *, seed, **kwargs):
        return old_model(build, shape, rng, seed=seed, batch_size=BATCH,
                         path=tmp_path / "old.keras", **kwargs)

    return make


def _snapshot(model) -> list[np.ndarray]:
    """Every weight of `model`, copied, in `model.weights` order."""
    return [np.array(v.numpy(), copy=True) for v in model.weights]


def _weight(model, layer: str, name: str) -> np.ndarray:
    return np.array(getattr(model.get_layer(layer), name).numpy(), copy=True)


def _columns(spec_entries) -> list[str]:
    """Column names of a feature spec, expanded here independently of the engine."""
    out = []
    for entry in spec_entries:
        if isinstance(entry, str):
            out.append(entry)
        else:
            name, width = entry
            out.extend(f"{name}:{k}" for k in range(width))
    return out


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _assert_preserved(new, x_new, old, x_old, *, output=None) -> float:
    """The new model's (old) outputs equal the old model's; returns the max diff."""
    got = predict(new, x_new)
    if output is not None:
        got = got[output]
    d = max_diff(got, predict(old, x_old))
    assert d <= TOL, f"surgery changed the old outputs: max diff {d:.3e}"
    return d


def _assert_warns_about(report, *names: str) -> None:
    for name in names:
        assert any(name in w for w in report.warnings), (
            f"no warning names {name!r}; warnings: {report.warnings}"
        )


def _assert_copied(new, old, *layers: str) -> None:
    """Layers whose weights must be copied bit for bit."""
    for name in layers:
        new_w = new.get_layer(name).weights
        old_w = old.get_layer(name).weights
        assert len(new_w) == len(old_w), name
        for a, b in zip(new_w, old_w):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{name}/{a.name}")


def _mlp(n_in, widths, n_out, *, names=("h1", "h2"), bn=True):
    x = inp = keras.Input((n_in,), name="obs")
    for i, (width, name) in enumerate(zip(widths, names)):
        x = keras.layers.Dense(width, activation="relu", name=name)(x)
        if bn and i == 0:
            x = keras.layers.BatchNormalization(name="bn")(x)
    out = keras.layers.Dense(n_out, name="out")(x)
    return keras.Model(inp, out, name="mlp")


# -- 1. input features inserted, removed and reordered -----------------------------------------


@pytest.mark.parametrize("block_bytes", [None, 8], ids=["whole", "row-blocks"])
def test_features_inserted_removed_and_reordered(saved_old, monkeypatch, block_bytes):
    if block_bytes is not None:  # copy a row at a time, releasing the file's pages after each
        monkeypatch.setattr("keras_surgery.fill.COPY_BLOCK_BYTES", block_bytes)
    old_spec = ["hp", "mana", ("pos", 2), "armor", "speed"]
    new_spec = ["speed", "hp", "gold", ("pos", 2), "mana", "xp"]
    old_cols, new_cols = _columns(old_spec), _columns(new_spec)
    rng = np.random.default_rng(1)
    old, batch, path = saved_old(lambda: _mlp(len(old_cols), (32, 16), 3), (len(old_cols),),
                                 rng, seed=1)

    keras.utils.set_random_seed(2)
    new = _mlp(len(new_cols), (32, 16), 3)
    report = ks.migrate_weights(
        path, new, old_features={"obs": old_spec}, new_features={"obs": new_spec}
    )

    assert report.preserves_function, report.warnings
    x_old = batch.copy()
    removed = [i for i, c in enumerate(old_cols) if c not in new_cols]
    assert removed == [old_cols.index("armor")]
    x_old[:, removed] = 0.0
    x_new = columns_from(x_old, old_cols, new_cols, rng)
    _assert_preserved(new, x_new, old, x_old)

    # Oracle for the first kernel, from the old weights and the column names only.
    old_k, new_k = _weight(old, "h1", "kernel"), _weight(new, "h1", "kernel")
    kept_new = [j for j, c in enumerate(new_cols) if c in old_cols]
    kept_old = [old_cols.index(new_cols[j]) for j in kept_new]
    added = [j for j, c in enumerate(new_cols) if c not in old_cols]
    assert [new_cols[j] for j in added] == ["gold", "xp"]
    np.testing.assert_array_equal(new_k[kept_new], np.take(old_k, kept_old, axis=0))
    in_old_order = [new_cols.index(c) for c in old_cols if c in new_cols]
    np.testing.assert_array_equal(new_k[in_old_order], np.delete(old_k, removed, axis=0))
    assert np.all(new_k[added] == 0.0)
    _assert_copied(new, old, "bn", "h2", "out")
    np.testing.assert_array_equal(_weight(new, "h1", "bias"), _weight(old, "h1", "bias"))


# -- 2. a hidden layer widened and narrowed --------------------------------------------------


def test_hidden_layer_widened(saved_old):
    rng = np.random.default_rng(2)
    old, batch, path = saved_old(lambda: _mlp(8, (32, 16), 4), (8,), rng, seed=3)

    keras.utils.set_random_seed(4)
    new = _mlp(8, (48, 16), 4)
    fresh = {(n, w): _weight(new, n, w) for n in ("h1", "bn") for w in
             (("kernel", "bias") if n == "h1" else
              ("gamma", "beta", "moving_mean", "moving_variance"))}
    assert max_diff(predict(new, batch), predict(old, batch)) > 1e-3  # not equal by accident
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)

    old_k, new_k = _weight(old, "h1", "kernel"), _weight(new, "h1", "kernel")
    np.testing.assert_array_equal(new_k[:, :32], old_k)
    np.testing.assert_array_equal(new_k[:, 32:], fresh[("h1", "kernel")][:, 32:])
    assert np.any(new_k[:, 32:] != 0)  # new units really read the input
    np.testing.assert_array_equal(_weight(new, "h1", "bias")[:32], _weight(old, "h1", "bias"))
    for w in ("gamma", "beta", "moving_mean", "moving_variance"):
        got = _weight(new, "bn", w)
        np.testing.assert_array_equal(got[:32], _weight(old, "bn", w))
        np.testing.assert_array_equal(got[32:], fresh[("bn", w)][32:])
    old_k2, new_k2 = _weight(old, "h2", "kernel"), _weight(new, "h2", "kernel")
    np.testing.assert_array_equal(new_k2[:32], old_k2)
    assert np.all(new_k2[32:] == 0.0)
    _assert_copied(new, old, "out")
    # The new units are alive, so the zero rows of h2 are what keeps the function.
    probe = keras.Model(new.inputs, new.get_layer("bn").output)
    assert np.abs(predict(probe, batch)[:, 32:]).max() > 1e-2


def test_hidden_layer_narrowed_cannot_preserve(saved_old):
    rng = np.random.default_rng(3)
    old, batch, path = saved_old(lambda: _mlp(8, (48, 16), 4, bn=False), (8,), rng, seed=5)

    keras.utils.set_random_seed(6)
    new = _mlp(8, (32, 16), 4, bn=False)
    report = ks.migrate_weights(path, new)

    assert report.preserves_function is False
    _assert_warns_about(report, "'h2'", "h1[")
    # The flag tells the truth: dropping live units changes the outputs.
    assert max_diff(predict(new, batch), predict(old, batch)) > 1e-3

    old_k, new_k = _weight(old, "h1", "kernel"), _weight(new, "h1", "kernel")
    np.testing.assert_array_equal(new_k, np.delete(old_k, np.arange(32, 48), axis=1))
    np.testing.assert_array_equal(
        _weight(new, "h1", "bias"), np.take(_weight(old, "h1", "bias"), np.arange(32))
    )
    np.testing.assert_array_equal(
        _weight(new, "h2", "kernel"), np.delete(_weight(old, "h2", "kernel"), np.s_[32:], axis=0)
    )
    _assert_copied(new, old, "out")


# -- 3. a new output head --------------------------------------------------------------------


def test_new_output_head(saved_old):
    rng = np.random.default_rng(4)
    old, batch, path = saved_old(lambda: _mlp(8, (32, 16), 4), (8,), rng, seed=7)

    keras.utils.set_random_seed(8)
    base = _mlp(8, (32, 16), 4)
    trunk = base.get_layer("h2").output
    value = keras.layers.Dense(1, name="value")(keras.layers.Dense(8, name="value_h")(trunk))
    new = keras.Model(base.inputs, [base.output, value], name="mlp2")
    fresh_head = {n: [np.array(v.numpy()) for v in new.get_layer(n).weights]
                  for n in ("value_h", "value")}
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch, output=0)
    _assert_copied(new, old, "h1", "bn", "h2", "out")
    for name, values in fresh_head.items():
        for v, before in zip(new.get_layer(name).weights, values):
            np.testing.assert_array_equal(v.numpy(), before)
    assert {"value_h", "value"} <= set(report.plan.new_layers)
    assert np.abs(predict(new, batch)[1]).max() > 1e-3  # the new head computes something


# -- 4. a new model input concatenated in ----------------------------------------------------


def test_new_input_concatenated(saved_old):
    rng = np.random.default_rng(5)
    old, batch, path = saved_old(lambda: _mlp(6, (32, 16), 3), (6,), rng, seed=9)

    keras.utils.set_random_seed(10)
    obs = keras.Input((6,), name="obs")
    extra = keras.Input((3,), name="extra")
    # The new input comes first, so every old row moves by 3.
    x = keras.layers.Concatenate(name="join")([extra, obs])
    x = keras.layers.Dense(32, activation="relu", name="h1")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dense(16, activation="relu", name="h2")(x)
    new = keras.Model([obs, extra], keras.layers.Dense(3, name="out")(x))
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    x_extra = normal(rng, BATCH, 3)
    _assert_preserved(new, [batch, x_extra], old, batch)
    old_k, new_k = _weight(old, "h1", "kernel"), _weight(new, "h1", "kernel")
    np.testing.assert_array_equal(new_k[3:], old_k)
    assert np.all(new_k[:3] == 0.0)
    _assert_copied(new, old, "bn", "h2", "out")
    np.testing.assert_array_equal(_weight(new, "h1", "bias"), _weight(old, "h1", "bias"))


# -- 5. a residual stream widened ------------------------------------------------------------


def _residual(width, hidden, blocks=2):
    inp = keras.Input((6,), name="obs")
    x = keras.layers.Dense(width, name="proj")(inp)
    for b in range(blocks):
        h = keras.layers.Dense(hidden, activation="relu", name=f"f{b}_in")(x)
        h = keras.layers.Dense(width, name=f"f{b}_out")(h)
        x = keras.layers.Add(name=f"add{b}")([x, h])
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x))


def test_residual_stream_widened(saved_old):
    rng = np.random.default_rng(6)
    old, batch, path = saved_old(lambda: _residual(16, 24), (6,), rng, seed=11)

    keras.utils.set_random_seed(12)
    new = _residual(24, 24)
    fresh_proj = _weight(new, "proj", "kernel")
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    new_proj = _weight(new, "proj", "kernel")
    np.testing.assert_array_equal(new_proj[:, :16], _weight(old, "proj", "kernel"))
    np.testing.assert_array_equal(new_proj[:, 16:], fresh_proj[:, 16:])
    assert np.any(new_proj[:, 16:] != 0)
    for b in range(2):
        # Stream readers: rows of the new stream indices are zero.
        k_in = _weight(new, f"f{b}_in", "kernel")
        np.testing.assert_array_equal(k_in[:16], _weight(old, f"f{b}_in", "kernel"))
        assert np.all(k_in[16:] == 0.0)
        # Stream writers: the old columns copied.
        k_out = _weight(new, f"f{b}_out", "kernel")
        np.testing.assert_array_equal(k_out[:, :16], _weight(old, f"f{b}_out", "kernel"))
        np.testing.assert_array_equal(_weight(new, f"f{b}_in", "bias"),
                                      _weight(old, f"f{b}_in", "bias"))
    k_out = _weight(new, "out", "kernel")
    np.testing.assert_array_equal(k_out[:16], _weight(old, "out", "kernel"))
    assert np.all(k_out[16:] == 0.0)


# -- 6. softmax / LayerNormalization over a grown axis -----------------------------------------


def _softmax_dense(classes):
    inp = keras.Input((8,), name="obs")
    x = keras.layers.Dense(16, activation="relu", name="h1")(inp)
    return keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name="probs")(x))


def _softmax_layer(classes):
    inp = keras.Input((8,), name="obs")
    x = keras.layers.Dense(16, activation="relu", name="h1")(inp)
    x = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inp, keras.layers.Softmax(name="sm")(x))


def _layer_norm(width):
    inp = keras.Input((8,), name="obs")
    x = keras.layers.Dense(width, activation="relu", name="h1")(inp)
    x = keras.layers.LayerNormalization(name="ln")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x))


@pytest.mark.parametrize(
    "build, small, big, mixer, grown",
    [
        (_softmax_dense, 3, 4, "probs", "probs"),
        (_softmax_layer, 3, 4, "sm", "logits"),
        (_layer_norm, 16, 24, "ln", "h1"),
    ],
    ids=["dense-softmax", "softmax-layer", "layer-norm"],
)
def test_mixing_over_grown_axis_cannot_preserve(saved_old, build, small, big, mixer, grown):
    rng = np.random.default_rng(7)
    old, batch, path = saved_old(lambda: build(small), (8,), rng, seed=13)

    keras.utils.set_random_seed(14)
    new = build(big)
    report = ks.migrate_weights(path, new)

    assert report.preserves_function is False
    _assert_warns_about(report, f"'{mixer}'")
    # The flag tells the truth: the old outputs really changed.
    got, want = predict(new, batch), predict(old, batch)
    if got.shape != want.shape:
        got = got[:, : want.shape[1]]
    assert max_diff(got, want) > 1e-4
    # The grown layer still got its old weights, columns copied in place.
    old_k, new_k = _weight(old, grown, "kernel"), _weight(new, grown, "kernel")
    np.testing.assert_array_equal(new_k[:, :small], old_k)
    _assert_copied(new, old, *(["h1"] if grown != "h1" else []))


# -- 7. old as a path or a live model; a rebuilt model with auto-names --------------------------


def _auto_named(kind):
    """No explicit names; the three middle Dense layers have the same shape, so a layer matched
    to the wrong old layer would still fit and only the values would tell."""
    layers = [
        keras.layers.Dense(16, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(4),
    ]
    if kind == "sequential":
        return keras.Sequential([keras.Input((8,))] + layers)
    x = inp = keras.Input((8,))
    for layer in layers:
        x = layer(x)
    return keras.Model(inp, x)


def test_path_and_live_model_give_the_same_plan(saved_old):
    rng = np.random.default_rng(8)
    old, batch, path = saved_old(lambda: _mlp(6, (32, 16), 3), (6,), rng, seed=15)

    keras.utils.set_random_seed(16)
    new = _mlp(7, (48, 16), 3)
    old_spec, new_spec = ["a", "b", ("c", 3), "d"], ["a", "e", "b", ("c", 3), "d"]
    from_path = ks.ModelMigrator(path, old_features={"obs": old_spec}).plan(
        new, new_features={"obs": new_spec}
    ).to_dict()
    from_model = ks.ModelMigrator(old, old_features={"obs": old_spec}).plan(
        new, new_features={"obs": new_spec}
    ).to_dict()
    # Only the description of the old side may differ (a file name vs a model name).
    assert path in from_path.pop("old")
    assert "mlp" in from_model.pop("old")
    assert from_path == from_model
    assert from_path["preserves_function"] is True
    assert any(w["zeroed"] for w in from_path["weights"])  # the plans are not trivial


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_rebuilt_model_with_new_auto_names_matches(saved_old, kind):
    rng = np.random.default_rng(9)
    old, batch, path = saved_old(lambda: _auto_named(kind), (8,), rng, seed=17)

    keras.utils.set_random_seed(18)
    new = _auto_named(kind)
    old_names = [layer.name for layer in old.layers]
    new_names = [layer.name for layer in new.layers]
    assert not set(old_names) & set(new_names), (old_names, new_names)  # really renamed
    # Built by the same code, so layer i of the new model continues layer i of the old one.
    expected = {
        n.name: o.name for n, o in zip(new.layers, old.layers)
        if not isinstance(n, keras.layers.InputLayer)
    }
    for source in (path, old):
        report = ks.migrate_weights(source, new)
        assert report.preserves_function, report.warnings
        assert report.plan.matches == expected
        assert all(w.status == "copied" for w in report.plan.weights), report.summary()
        for a, b in zip(new.weights, old.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
        np.testing.assert_array_equal(predict(new, batch), predict(old, batch))
        for v in new.weights:  # scramble, so the second source must copy again
            v.assign(np.zeros(v.shape, v.dtype))


# -- 8. the old file is never written; a failed migration changes nothing ------------------------


def _failure_setup(saved_old, seed):
    """An old MLP saved to a file (and its hash) and a widened new MLP with a snapshot of its
    weights, for tests of failures half-way through a migration."""
    old, batch, path = saved_old(lambda: _mlp(8, (32, 16), 4), (8,), np.random.default_rng(seed),
                                 seed=2 * seed - 1)
    keras.utils.set_random_seed(2 * seed)
    new = _mlp(8, (48, 16), 4)
    return old, batch, path, _sha256(path), new, _snapshot(new)


def test_old_file_unchanged_and_failed_assign_rolls_back(saved_old, monkeypatch):
    old, batch, path, digest, new, before = _failure_setup(saved_old, 10)

    # The last variable to be assigned (weights go smallest first: h2's kernel, 48x16, is the
    # largest) fails on its first call; earlier ones were written.
    victim = new.get_layer("h2").kernel
    early = new.get_layer("h1").kernel
    calls = {"victim": 0, "early": 0}
    real_early_assign = early.assign

    def failing_assign(value, *args, **kwargs):
        calls["victim"] += 1
        raise RuntimeError("disk on fire")

    def spying_assign(value, *args, **kwargs):
        calls["early"] += 1
        return real_early_assign(value, *args, **kwargs)

    monkeypatch.setattr(victim, "assign", failing_assign)
    monkeypatch.setattr(early, "assign", spying_assign)
    with pytest.raises(ks.SurgeryError, match="disk on fire"):
        ks.migrate_weights(path, new)
    assert calls["victim"] == 1  # the failed write; the last write needs no undo
    assert calls["early"] == 2  # written, then restored: the rollback really ran
    for v, b in zip(new.weights, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
    assert _sha256(path) == digest

    # Once the variable behaves again, the same migration succeeds and the file is untouched.
    monkeypatch.undo()
    report = ks.migrate_weights(path, new)
    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    assert _sha256(path) == digest


def test_unreadable_old_weight_changes_nothing(saved_old, monkeypatch):
    from keras_surgery.keras_file import KerasFile

    old, batch, path, digest, new, before = _failure_setup(saved_old, 11)
    real_read = KerasFile.read
    reads = []

    def read_until_out(self, weight_path):
        reads.append(weight_path)
        if weight_path == "layers/dense_1/vars/0":  # h2's kernel, the largest: read last
            raise ks.SurgeryFileError(f"could not read weight '{weight_path}'")
        return real_read(self, weight_path)

    monkeypatch.setattr(KerasFile, "read", read_until_out)
    with pytest.raises(ks.SurgeryError, match="could not read"):
        ks.migrate_weights(path, new)
    assert len(reads) > 1  # earlier weights were read before the failure
    for v, b in zip(new.weights, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
    assert _sha256(path) == digest


def test_spilled_rollback_restores_every_value_exactly(saved_old, tmp_path, monkeypatch):
    """With no memory budget every previous value goes to the temporary undo file; a failure
    on the last weight still restores all of them bit for bit, and nothing is left on disk."""
    from keras_surgery.apply import apply_plan
    from keras_surgery.keras_file import KerasFile

    old, batch, path, digest, new, before = _failure_setup(saved_old, 14)
    undo_dir = tmp_path / "undo"
    undo_dir.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(undo_dir))
    migrator = ks.ModelMigrator(path)
    plan = migrator.plan(new)
    real_read = KerasFile.read
    opened = []

    def read_until_out(self, weight_path):
        opened.extend(os.listdir(undo_dir))
        if weight_path == "layers/dense_1/vars/0":
            raise ks.SurgeryFileError(f"could not read weight '{weight_path}'")
        return real_read(self, weight_path)

    monkeypatch.setattr(KerasFile, "read", read_until_out)
    with pytest.raises(ks.SurgeryError, match="could not read"):
        apply_plan(plan, new, migrator.side.weights, spill_bytes=0)
    for v, b in zip(new.weights, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
    assert os.listdir(undo_dir) == []  # the undo file is anonymous and closed
    monkeypatch.setattr(KerasFile, "read", real_read)
    report = apply_plan(plan, new, migrator.side.weights, spill_bytes=0)
    migrator.close()
    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    assert _sha256(path) == digest


def test_failure_after_the_last_write_names_what_could_not_be_undone(saved_old, monkeypatch):
    """The largest weight is written last without an undo entry; if finishing fails after it,
    the error says that weight was not restored instead of claiming the migration was undone."""
    from keras_surgery import stream as stream_module

    old, batch, path, digest, new, before = _failure_setup(saved_old, 16)
    real_finalize = stream_module.finalize_layers
    calls = []

    def finalize_once_broken(model, variables):
        calls.append(len(variables))
        if len(calls) == 1:
            raise RuntimeError("finalize broke")
        return real_finalize(model, variables)

    monkeypatch.setattr(stream_module, "finalize_layers", finalize_once_broken)
    with pytest.raises(ks.SurgeryError, match=r"failed for h2/kernel .*no undo entry"):
        ks.migrate_weights(path, new)
    for v, b in zip(new.weights, before):
        if v.path != "h2/kernel":  # every journaled weight is back
            np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
    assert _sha256(path) == digest


def test_interrupt_mid_migration_restores_and_propagates(saved_old, monkeypatch):
    old, batch, path, digest, new, before = _failure_setup(saved_old, 15)
    victim = new.get_layer("h2").kernel
    real_assign = victim.assign
    calls = []

    def interrupted(value, *args, **kwargs):  # Ctrl-C during the write, once
        calls.append(value)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_assign(value, *args, **kwargs)

    monkeypatch.setattr(victim, "assign", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ks.migrate_weights(path, new)
    monkeypatch.undo()
    for v, b in zip(new.weights, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
    assert _sha256(path) == digest


# -- 9. policy="random" ----------------------------------------------------------------------


def test_random_policy_keeps_fresh_values_outside_full_matches(saved_old):
    old_spec, new_spec = ["a", "b", "c", "d"], ["a", "b", "new", "c", "d"]
    rng = np.random.default_rng(12)
    old, batch, path = saved_old(lambda: _mlp(4, (32, 16), 3), (4,), rng, seed=23)

    keras.utils.set_random_seed(24)
    new = _mlp(5, (48, 16), 3)
    fresh_h1 = _weight(new, "h1", "kernel")
    fresh_h2 = _weight(new, "h2", "kernel")
    report = ks.migrate_weights(
        path, new, old_features={"obs": old_spec}, new_features={"obs": new_spec},
        policy="random",
    )

    assert report.preserves_function is False
    h1 = _weight(new, "h1", "kernel")
    rows = [0, 1, 3, 4]
    np.testing.assert_array_equal(h1[np.ix_(rows, range(32))], _weight(old, "h1", "kernel"))
    # Where "preserve" would have zeroed (the new feature's row into old units), fresh values.
    np.testing.assert_array_equal(h1[2, :32], fresh_h1[2, :32])
    assert np.all(h1[2, :32] != 0)
    np.testing.assert_array_equal(h1[:, 32:], fresh_h1[:, 32:])
    h2 = _weight(new, "h2", "kernel")
    np.testing.assert_array_equal(h2[:32], _weight(old, "h2", "kernel"))
    np.testing.assert_array_equal(h2[32:], fresh_h2[32:])
    assert np.all(h2[32:] != 0)
    _assert_copied(new, old, "out")
    x_old = batch
    x_new = columns_from(x_old, old_spec, new_spec, rng)
    assert max_diff(predict(new, x_new), predict(old, x_old)) > 1e-3  # no promise, and none kept


def test_random_policy_on_an_unchanged_model_preserves(saved_old):
    rng = np.random.default_rng(13)
    old, batch, path = saved_old(lambda: _mlp(8, (32, 16), 4), (8,), rng, seed=25)

    keras.utils.set_random_seed(26)
    new = _mlp(8, (32, 16), 4)
    report = ks.migrate_weights(path, new, policy="random")
    assert report.preserves_function, report.warnings
    _assert_copied(new, old, "h1", "bn", "h2", "out")
    assert max_diff(predict(new, batch), predict(old, batch)) == 0.0


# -- 10. keras.ops merges as graph nodes -------------------------------------------------------


def _ops_model(width):
    inp = keras.Input((6,), name="obs")
    a = keras.layers.Dense(width, activation="relu", name="a")(inp)
    b = keras.layers.Dense(width, activation="tanh", name="b")(a)
    s = keras.ops.add(a, b)
    c = keras.ops.concatenate([s, a], axis=-1)
    return keras.Model(inp, keras.layers.Dense(4, name="out")(c))


def test_keras_ops_merges_widened(saved_old):
    rng = np.random.default_rng(14)
    old, batch, path = saved_old(lambda: _ops_model(16), (6,), rng, seed=27)

    keras.utils.set_random_seed(28)
    new = _ops_model(24)
    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    _assert_preserved(new, batch, old, batch)
    np.testing.assert_array_equal(_weight(new, "a", "kernel")[:, :16], _weight(old, "a", "kernel"))
    kb = _weight(new, "b", "kernel")
    np.testing.assert_array_equal(kb[:16, :16], _weight(old, "b", "kernel"))
    assert np.all(kb[16:, :16] == 0.0)
    # out reads concat([a + b, a]): old rows 0..15 -> 0..15, old rows 16..31 -> 24..39.
    old_out, new_out = _weight(old, "out", "kernel"), _weight(new, "out", "kernel")
    new_rows = np.r_[0:16, 24:40]
    np.testing.assert_array_equal(new_out[new_rows], old_out)
    assert np.all(np.delete(new_out, new_rows, axis=0) == 0.0)


# -- 11. an adapted Normalization layer in front of a feature that is removed ------------------


def _normalized(n_in, data):
    inp = keras.Input((n_in,), name="obs")
    norm = keras.layers.Normalization(name="norm")
    if data is not None:
        norm.adapt(data)
    x = keras.layers.Dense(16, activation="relu", name="h1")(norm(inp))
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x))


@pytest.mark.parametrize(
    "new_spec",
    [["a", "b", "d", "e"], ["a", "b", "x", "c", "d", "e"]],
    ids=["feature-removed", "feature-added"],
)
def test_normalization_in_front_of_dense(saved_old, new_spec):
    old_spec = ["a", "b", "c", "d", "e"]
    rng = np.random.default_rng(15)
    # Column "c" is far from zero-mean, so 0 in the old input is far from 0 once normalised.
    data = normal(rng, 256, 5) * 2.0 + np.array([0.5, -1.0, 3.0, 0.0, 1.5], "float32")
    old, batch, path = saved_old(lambda: _normalized(5, data), (5,), rng, seed=29,
                                 batch=data[:BATCH])

    keras.utils.set_random_seed(30)
    # Adapted on other data, so that copied statistics can be told from its own.
    new = _normalized(len(new_spec), normal(rng, 256, len(new_spec)) * 0.5 - 2.0)
    fresh = {w: to_numpy(getattr(new.get_layer("norm"), w)).reshape(-1) for w in
             ("mean", "variance")}
    report = ks.migrate_weights(
        path, new, old_features={"obs": old_spec}, new_features={"obs": new_spec}
    )
    removed = [i for i, c in enumerate(old_spec) if c not in new_spec]
    added = [j for j, c in enumerate(new_spec) if c not in old_spec]
    kept_new = [j for j, c in enumerate(new_spec) if c in old_spec]
    kept_old = [old_spec.index(new_spec[j]) for j in kept_new]
    x_old = batch.copy()
    x_old[:, removed] = 0.0
    x_new = columns_from(x_old, old_spec, new_spec, rng)
    d = max_diff(predict(new, x_new), predict(old, x_old))
    # The truth, whatever the verdict: a removed feature is 0 before normalisation, not after.
    if report.preserves_function:
        assert d <= TOL, f"preserves_function=True but max diff {d:.3e}"
    else:
        _assert_warns_about(report, "'h1'")
        assert d > 1e-3, f"preserves_function=False but the outputs match (max diff {d:.3e})"
    if not removed:
        # An added feature is harmless: its normalised value meets a zero row.
        assert report.preserves_function, report.warnings
    # The kept rows and the per-feature statistics the layer *computes with* are copied.
    new_k, old_k = _weight(new, "h1", "kernel"), _weight(old, "h1", "kernel")
    np.testing.assert_array_equal(new_k[kept_new], np.take(old_k, kept_old, axis=0))
    np.testing.assert_array_equal(new_k[kept_new], np.delete(old_k, removed, axis=0))
    assert np.all(new_k[added] == 0.0)
    for w in ("mean", "variance"):
        got = to_numpy(getattr(new.get_layer("norm"), w)).reshape(-1)
        want = to_numpy(getattr(old.get_layer("norm"), w)).reshape(-1)
        np.testing.assert_array_equal(got[kept_new], np.take(want, kept_old))
        np.testing.assert_array_equal(got[added], fresh[w][added])
    _assert_copied(new, old, "out")


def test_layer_whose_inputs_all_changed_keeps_fresh_input_weights():
    """A removed preprocessing layer changes every input label of the next layer: the function
    is lost (reported), and zeros would disconnect the layer, so its kernel stays fresh."""
    keras.utils.set_random_seed(3)
    x = keras.Input((4,), name="obs")
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(np.random.default_rng(0).normal(size=(32, 4)))
    old = keras.Model(x, keras.layers.Dense(3, name="d")(norm(x)))
    x2 = keras.Input((4,), name="obs")
    new = keras.Model(x2, keras.layers.Dense(3, name="d")(x2))
    fresh = new.get_layer("d").kernel.numpy().copy()
    report = ks.migrate_weights(old, new)
    assert not report.preserves_function
    assert any("'d'" in w and "keep fresh weights" in w for w in report.warnings)
    np.testing.assert_array_equal(new.get_layer("d").kernel.numpy(), fresh)
    np.testing.assert_array_equal(new.get_layer("d").bias.numpy(),
                                  old.get_layer("d").bias.numpy())


# -- 12. a layer kept its name and weights but changed what it computes ------------------------


def _behaviour_model(seq: bool = False, **changes):
    """An MLP (or a small recurrent net) whose layers take their settings from `changes`."""
    c = {"act": "relu", "eps": 1e-3, "momentum": 0.99, "rate": 0.1, "leak": 0.3,
         "merge": "sum", "inner_act": "tanh", "init": "glorot_uniform", **changes}
    if seq:
        x = inp = keras.Input((5, 3), name="seq")
        x = keras.layers.Bidirectional(
            keras.layers.LSTM(6, activation=c["inner_act"], name="lstm"),
            merge_mode=c["merge"], name="bi")(x)
    else:
        x = inp = keras.Input((6,), name="obs")
        x = keras.layers.Dense(16, activation=c["act"], kernel_initializer=c["init"],
                               name="h1")(x)
        x = keras.layers.BatchNormalization(epsilon=c["eps"], momentum=c["momentum"],
                                            name="bn")(x)
        x = keras.layers.Dropout(c["rate"], name="drop")(x)
        x = keras.layers.LeakyReLU(negative_slope=c["leak"], name="leaky")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x), name="behaviour")


@pytest.mark.parametrize("seq, changes, what", [
    (False, {"act": "tanh"}, "layer 'h1' (Dense) changed its activation: 'relu' -> 'tanh'"),
    (False, {"eps": 0.5}, "layer 'bn' (BatchNormalization) changed its epsilon: 0.001 -> 0.5"),
    (False, {"leak": 0.01}, "layer 'leaky' (LeakyReLU) changed its negative_slope: 0.3 -> 0.01"),
    (True, {"merge": "mul"}, "layer 'bi' (Bidirectional) changed its merge_mode: 'sum' -> 'mul'"),
    (True, {"inner_act": "relu"}, "changed its backward_layer.activation: 'tanh' -> 'relu', "
                                  "layer.activation: 'tanh' -> 'relu'"),
], ids=["dense-activation", "bn-epsilon", "leaky-slope", "bidirectional-merge", "lstm-activation"])
def test_changed_behaviour_under_the_same_name_is_reported(saved_old, seq, changes, what):
    """Same names, same weight shapes, different function: nothing in the labels differs, so
    the layer configs say it; the flag agrees with the outputs."""
    rng = np.random.default_rng(12)
    old, batch, path = saved_old(lambda: _behaviour_model(seq), (5, 3) if seq else (6,), rng,
                                 seed=12)
    new = _behaviour_model(seq, **changes)
    report = ks.migrate_weights(path, new)
    assert not report.preserves_function
    assert any(what in w for w in report.warnings), report.warnings
    _assert_copied(new, old, *(["bi", "out"] if seq else ["h1", "bn", "out"]))
    assert max_diff(predict(new, batch), predict(old, batch)) > 1e-3  # really changed


def test_training_only_settings_and_initialisers_may_change(saved_old):
    old, batch, path = saved_old(_behaviour_model, (6,), np.random.default_rng(13), seed=13)
    new = _behaviour_model(momentum=0.5, rate=0.6, init="he_normal")
    report = ks.migrate_weights(path, new)
    assert report.preserves_function, report.warnings
    assert not any("changed its" in w for w in report.warnings)
    _assert_preserved(new, batch, old, batch)


@pytest.mark.parametrize("change", ["bias-off", "rescale", "custom-size"])
def test_switched_off_weights_and_scales_are_reported_custom_keys_are_not(change):
    """A bias switched off drops a trained weight and a Rescaling factor scales everything:
    both reported. A custom layer's own config key named like a Keras one ('size', here its
    width) is its rule's business: a widened custom layer still preserves."""

    @keras.saving.register_keras_serializable(package="surgery_tests")
    class Gain(keras.layers.Layer):  # y = x * g, one gain per unit; "size" is its width
        def __init__(self, size, **kwargs):
            super().__init__(**kwargs)
            self.size = size

        def build(self, input_shape):
            self.g = self.add_weight(shape=(self.size,), initializer="ones", name="g")

        def call(self, x):
            return x * self.g

        def get_config(self):
            return {**super().get_config(), "size": self.size}

    def gain_rule(call):
        from keras_surgery.rules.api import RuleResult, single_input, weight

        x = single_input(call)
        return RuleResult([x], [weight("g", ("diag", x[-1]))])

    def build(use_bias=True, factor=1.0, width=8):
        x = inp = keras.Input((6,), name="obs")
        x = keras.layers.Rescaling(factor, name="rescale")(x)
        x = keras.layers.Dense(width, activation="tanh", use_bias=use_bias, name="h1")(x)
        if change == "custom-size":
            x = Gain(width, name="gain")(x)
        return keras.Model(inp, keras.layers.Dense(3, name="out")(x))

    rng = np.random.default_rng(21)

    def trained_gains(model):  # a weight `randomize` leaves alone
        if change == "custom-size":
            model.get_layer("gain").g.assign(rng.uniform(0.5, 1.5, 8).astype("float32"))

    # Migrated from the live model, so not saved.
    old, batch, _ = old_model(build, (6,), rng, seed=21, batch_size=BATCH, tweak=trained_gains)
    new = {"bias-off": lambda: build(use_bias=False), "rescale": lambda: build(factor=3.0),
           "custom-size": lambda: build(width=10)}[change]()
    if change == "custom-size":
        ks.register_rule("surgery_tests>Gain", gain_rule)
    try:
        report = ks.migrate_weights(old, new)
    finally:
        if change == "custom-size":
            ks.unregister_rule("surgery_tests>Gain")
    if change == "custom-size":
        assert report.preserves_function, report.warnings
        _assert_preserved(new, batch, old, batch)
        return
    assert not report.preserves_function
    what = {"bias-off": "changed its use_bias: True -> False",
            "rescale": "changed its scale: 1.0 -> 3.0"}[change]
    assert any(what in w for w in report.warnings), report.warnings
    assert max_diff(predict(new, batch), predict(old, batch)) > 1e-3
