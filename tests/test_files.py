"""File-to-file surgery over a pool of checkpoints, and lineage records."""

import os
import zipfile

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import max_diff, predict

OLD = ["a", "b", "c"]
NEW = ["b", "new", "a", "c"]


def _model(features, width, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((len(features),), name="obs")
    h = keras.layers.Dense(width, activation="relu", name="h")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    return keras.Model(x, keras.layers.Dense(2, name="out")(h))


def _new_input(x_old, rng):
    x = rng.normal(size=(len(x_old), len(NEW))).astype("float32")
    for j, f in enumerate(NEW):
        if f in OLD:
            x[:, j] = x_old[:, OLD.index(f)]
    return x


def test_pool_of_checkpoints_migrated_file_to_file(tmp_path):
    pool, out_dir = tmp_path / "pool", tmp_path / "migrated"
    pool.mkdir()
    rng = np.random.default_rng(0)
    sources = []
    for k in range(5):  # five opponents of the old architecture, each with its own weights
        model = _model(OLD, 5, 10 + k)
        for v in model.weights:
            v.assign(rng.normal(0.5 if "variance" in v.path else 0, 0.4, v.shape)
                     .astype("float32") ** (2 if "variance" in v.path else 1) + 0.0)
        model.save(pool / f"opponent_{k}.keras")
        sources.append(model)
    new = _model(NEW, 8, 99)
    template = tmp_path / "template.keras"
    new.save(template)
    plan = ks.ModelMigrator(str(pool / "opponent_0.keras"), old_features={"obs": OLD}).plan(
        new, new_features={"obs": NEW})
    before = {p: os.stat(pool / p).st_mtime_ns for p in os.listdir(pool)}
    results = ks.migrate_folder(plan, pool, out_dir, template=template, verbose=False)
    assert len(results) == 5
    assert {p: os.stat(pool / p).st_mtime_ns for p in os.listdir(pool)} == before
    x_old = rng.normal(size=(16, 3)).astype("float32")
    x_new = _new_input(x_old, rng)
    for k, source in enumerate(sources):
        migrated = keras.saving.load_model(out_dir / f"opponent_{k}.keras")
        assert max_diff(predict(source, x_old), predict(migrated, x_new)) <= 1e-5
        k_old = source.get_layer("h").kernel.numpy()
        k_new = migrated.get_layer("h").kernel.numpy()
        np.testing.assert_array_equal(k_new[[NEW.index(f) for f in OLD]][:, :5], k_old)
        assert np.all(k_new[NEW.index("new"), :5] == 0)
        # fresh entries come from the template
        np.testing.assert_array_equal(k_new[:, 5:], new.get_layer("h").kernel.numpy()[:, 5:])
    assert sorted(os.listdir(out_dir)) == [f"opponent_{k}.keras" for k in range(5)]


def test_failed_file_migration_leaves_no_file(tmp_path):
    old = _model(OLD, 5, 0)
    old.save(tmp_path / "old.keras")
    other = _model(OLD, 7, 1)  # not the plan's old architecture
    other.save(tmp_path / "other.keras")
    new = _model(NEW, 8, 2)
    new.save(tmp_path / "template.keras")
    plan = ks.ModelMigrator(str(tmp_path / "old.keras"), old_features={"obs": OLD}).plan(
        new, new_features={"obs": NEW})
    with pytest.raises(ks.SurgeryFileError, match="not a checkpoint of the plan's old"):
        plan.apply_file(tmp_path / "other.keras", tmp_path / "out.keras",
                        template=tmp_path / "template.keras")
    assert sorted(os.listdir(tmp_path)) == ["old.keras", "other.keras", "template.keras"]


def test_lineage_is_ignored_by_keras_and_read_by_the_next_surgery(tmp_path):
    v1 = _model(OLD, 5, 0)
    ks.save_with_lineage(v1, tmp_path / "v1.keras", features={"obs": OLD})
    assert "keras_surgery.json" in zipfile.ZipFile(tmp_path / "v1.keras").namelist()
    loaded = keras.saving.load_model(tmp_path / "v1.keras")
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    assert max_diff(predict(loaded, x), predict(v1, x)) == 0
    v2 = _model(NEW, 8, 1)
    report = ks.migrate_weights(str(tmp_path / "v1.keras"), v2, new_features={"obs": NEW})
    assert report.preserves_function  # the old features came from the lineage record
    ks.save_with_lineage(v2, tmp_path / "v2.keras", features={"obs": NEW}, report=report)
    lineage = ks.read_lineage(tmp_path / "v2.keras")
    assert lineage["features"] == {"obs": NEW}
    (entry,) = lineage["history"]
    assert entry["copied"] == report.plan.totals()["copied"] and len(entry["old_sha256"]) == 64
    rng = np.random.default_rng(1)
    x_old = rng.normal(size=(4, 3)).astype("float32")
    assert max_diff(predict(v1, x_old), predict(v2, _new_input(x_old, rng))) <= 1e-5


def test_bfloat16_checkpoint_file_to_file(tmp_path):
    def build(n, width, seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((n,), name="obs")
        return keras.Model(x, keras.layers.Dense(width, dtype="bfloat16", name="d")(x))

    old, new = build(3, 4, 0), build(4, 4, 1)
    old.save(tmp_path / "old.keras")
    new.save(tmp_path / "template.keras")
    plan = ks.ModelMigrator(str(tmp_path / "old.keras")).plan(str(tmp_path / "template.keras"))
    plan.apply_file(tmp_path / "old.keras", tmp_path / "out.keras",
                    template=tmp_path / "template.keras")
    loaded = keras.saving.load_model(tmp_path / "out.keras")
    kernel = np.asarray(loaded.get_layer("d").kernel.numpy(), dtype="float32")
    np.testing.assert_array_equal(kernel[:3], np.asarray(old.get_layer("d").kernel.numpy(),
                                                         dtype="float32"))
    assert np.all(kernel[3] == 0)


# -- optimizer state, file to file -------------------------------------------------------------

OPT_OLD = ["a", "b", "c", "d", "e", "f"]
OPT_NEW = ["a", "b", "c", "new", "d", "f"]  # "new" inserted in the middle, "e" removed


def _compiled(features, width, optimizer, seed):
    model = _model(features, width, seed)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _trained(path, optimizer, seed=0):
    model = _compiled(OPT_OLD, 6, optimizer, seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(48, len(OPT_OLD))).astype("float32")
    y = np.stack([np.sin(x[:, 0]) + x[:, 4], x[:, 2] * x[:, 5]], 1).astype("float32")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    model.save(path)
    return model


def _template(path):
    new = _compiled(OPT_NEW, 9, keras.optimizers.Adam(5e-3), 7)
    new.optimizer.build(new.trainable_variables)
    new.save(path)
    return new


def _opt_values(model):
    return [(v.name, np.asarray(v.numpy())) for v in model.optimizer.variables]


def test_adam_state_carried_file_to_file_as_on_a_live_model(tmp_path):
    old_path, template, out = tmp_path / "old.keras", tmp_path / "tmpl.keras", tmp_path / "o.keras"
    old = _trained(old_path, keras.optimizers.Adam(1e-2))
    new = _template(template)
    spec_old, spec_new = {"obs": OPT_OLD}, {"obs": OPT_NEW}
    plan = ks.ModelMigrator(str(old_path), old_features=spec_old).plan(new, new_features=spec_new)
    result = plan.apply_file(old_path, out, template=template)
    assert not [w for w in result["warnings"] if "optimizer" in w], result["warnings"]
    migrated = keras.saving.load_model(out)

    live = _compiled(OPT_NEW, 9, keras.optimizers.Adam(5e-3), 7)
    report = ks.migrate_weights(str(old_path), live, old_features=spec_old, new_features=spec_new)
    assert not [w for w in report.warnings if "optimizer" in w], report.warnings
    got, want = _opt_values(migrated), _opt_values(live)
    assert [n for n, _ in got] == [n for n, _ in want] and len(got) == 2 + 2 * 6
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)

    # the moments of the first kernel: old rows by feature ("e" gone), zero for "new" and for
    # the new hidden units
    saved_old = keras.saving.load_model(old_path)
    by_name = {v.name: np.asarray(v.numpy()) for v in saved_old.optimizer.variables}
    got_by_name = dict(got)
    for suffix in ("momentum", "velocity"):
        old_slot = by_name[f"h_kernel_{suffix}"]
        assert np.any(old_slot != 0)
        rows = np.take(old_slot, [OPT_OLD.index(f) for f in OPT_NEW if f in OPT_OLD], axis=0)
        np.testing.assert_array_equal(rows, np.delete(old_slot, OPT_OLD.index("e"), axis=0))
        expected = np.zeros((len(OPT_NEW), 9), "float32")
        expected[[j for j, f in enumerate(OPT_NEW) if f != "new"], :6] = rows
        np.testing.assert_array_equal(got_by_name[f"h_kernel_{suffix}"], expected)
    iterations = int(migrated.optimizer.iterations.numpy())
    assert iterations == int(old.optimizer.iterations.numpy()) > 0
    assert float(migrated.optimizer.learning_rate.numpy()) == np.float32(5e-3)  # the new one

    rng = np.random.default_rng(3)
    x_old = rng.normal(size=(16, len(OPT_OLD))).astype("float32")
    x_old[:, OPT_OLD.index("e")] = 0  # a removed feature reads as 0
    x_new = rng.normal(size=(16, len(OPT_NEW))).astype("float32")  # "new" stays random
    for j, f in enumerate(OPT_NEW):
        if f in OPT_OLD:
            x_new[:, j] = x_old[:, OPT_OLD.index(f)]
    assert max_diff(predict(old, x_old), predict(migrated, x_new)) <= 1e-5


def test_checkpoint_with_another_optimizer_keeps_the_template_state(tmp_path):
    adam_path, template = tmp_path / "adam.keras", tmp_path / "tmpl.keras"
    _trained(adam_path, keras.optimizers.Adam(1e-2))
    sgd_path = tmp_path / "sgd.keras"
    sgd = _trained(sgd_path, keras.optimizers.SGD(1e-2, momentum=0.9), seed=1)
    new = _template(template)
    plan = ks.ModelMigrator(str(adam_path), old_features={"obs": OPT_OLD}).plan(
        new, new_features={"obs": OPT_NEW})
    result = plan.apply_file(sgd_path, tmp_path / "out.keras", template=template)
    (note,) = [w for w in result["warnings"] if "optimizer" in w]
    assert note.startswith(f"optimizer state was not migrated: '{sgd_path}'")
    assert "its optimizer is SGD, expected Adam" in note
    assert "template's optimizer variables are written as they are" in note
    migrated = keras.saving.load_model(tmp_path / "out.keras")
    for (name, a), (_, b) in zip(_opt_values(migrated), _opt_values(new), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    k_old = sgd.get_layer("h").kernel.numpy()
    k_new = migrated.get_layer("h").kernel.numpy()
    np.testing.assert_array_equal(
        k_new[[OPT_NEW.index(f) for f in OPT_OLD if f in OPT_NEW], :6],
        np.delete(k_old, OPT_OLD.index("e"), axis=0))

    # a template saved without a built optimizer: said so, weights still migrate
    bare = _model(OPT_NEW, 9, 7)
    bare.save(tmp_path / "bare.keras")
    result = plan.apply_file(adam_path, tmp_path / "out2.keras", template=tmp_path / "bare.keras")
    assert any(f"'{tmp_path / 'bare.keras'}' has no optimizer variables" in w
               for w in result["warnings"]), result["warnings"]
