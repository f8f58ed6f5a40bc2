"""Weights-only checkpoints (`old_weights=`): `.weights.h5` and sharded `.weights.json`."""

import json
import os

import h5py
import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.cli import main
from keras_surgery.keras_file import WEIGHTS_ONLY_ADVICE, H5Weights
from keras_surgery.side import Side
from tests.util import (
    assert_input_sensitive,
    max_diff,
    normal,
    predict,
    preservation_bound,
    randomize,
)

OLD_FEATURES = {"obs": ["a", "b", "c", "d"]}
NEW_FEATURES = {"obs": ["a", "b", "x", "c", "d"]}  # "x" inserted
SHARD_GB = 100 / 1024**3  # 100 bytes: the kernels and biases below land in >= 3 shards


def _build(n_in, width, *, name="m"):
    inp = keras.Input((n_in,), name="obs")
    h = keras.layers.Dense(width, activation="tanh", name="h")(inp)
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inp, out, name=name)


def _save_weights(model, folder, kind, shard_gb=SHARD_GB):
    if kind == "h5":
        path = folder / "ckpt.weights.h5"
        model.save_weights(path)
    else:
        path = folder / "ckpt.weights.json"
        model.save_weights(path, max_shard_size=shard_gb)
        shards = {n for names in json.loads(path.read_text())["weight_map"].values()
                  for n in ([names] if isinstance(names, str) else names)}
        assert len(shards) >= (3 if shard_gb == SHARD_GB else 2), shards
    return str(path)


@pytest.fixture
def old(tmp_path):
    """An old model with non-trivial weights that depends on its input, its weights saved."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(1)
    model = _build(4, 6)
    batch = normal(rng, 16, 4)
    randomize(model, batch)
    assert_input_sensitive(model, batch, normal(rng, 16, 4))
    return model, batch


def _architecture(tmp_path, kind):
    """The old architecture with other values (seed 99): whatever it holds must not be used."""
    keras.utils.set_random_seed(99)
    arch = _build(4, 6, name="arch")
    if kind == "live":
        return arch
    path = tmp_path / "arch.keras"
    arch.save(path)
    return str(path)


def _check_migrated(old_model, new_model, batch, report):
    assert report.preserves_function, report.warnings
    x_new = np.insert(batch, 2, normal(np.random.default_rng(5), len(batch)), axis=1)
    x_new[:, 2] = 0.0  # the added feature at 0 gives the old function
    reference = predict(old_model, batch)
    assert max_diff(predict(new_model, x_new), reference) <= preservation_bound(reference)
    old_k, old_b = (v.numpy() for v in old_model.get_layer("h").weights)
    new_k, new_b = (v.numpy() for v in new_model.get_layer("h").weights)
    kept_rows = [0, 1, 3, 4]  # a, b, c, d in the new input
    assert np.array_equal(np.take(new_k[:, :6], kept_rows, axis=0), old_k)
    assert np.array_equal(new_k[2, :6], np.zeros(6, np.float32))  # x feeds old units with 0
    assert np.array_equal(new_b[:6], old_b)
    old_out, new_out = (m.get_layer("out").weights[0].numpy() for m in (old_model, new_model))
    assert np.array_equal(new_out[:6], old_out)
    assert np.array_equal(new_out[6:], np.zeros((3, 3), np.float32))  # new units read as 0


@pytest.mark.parametrize("arch_kind", ["file", "live"])
@pytest.mark.parametrize("kind", ["h5", "sharded"])
def test_migrates_from_a_weights_only_checkpoint(tmp_path, old, kind, arch_kind):
    old_model, batch = old
    weights = _save_weights(old_model, tmp_path, kind)
    arch = _architecture(tmp_path, arch_kind)
    if arch_kind == "live":  # the live values differ from the checkpoint's, and stay as they are
        before = [v.numpy().copy() for v in arch.weights]
        assert max_diff(before[0], old_model.get_layer("h").weights[0].numpy()) > 0.1
    keras.utils.set_random_seed(7)
    new = _build(5, 9)  # "x" inserted, h widened 6 -> 9
    report = ks.migrate_weights(arch, new, old_weights=weights, old_features=OLD_FEATURES,
                                new_features=NEW_FEATURES)
    _check_migrated(old_model, new, batch, report)
    assert weights in report.plan.old  # the report names the checkpoint the values came from
    if arch_kind == "live":
        assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, arch.weights))


def test_sharded_checkpoint_is_read_shard_by_shard(tmp_path, old, monkeypatch):
    """Each read opens nothing new and touches one shard; release drops only touched shards."""
    old_model, _ = old
    weights = _save_weights(old_model, tmp_path, "sharded")
    reads = []
    real = H5Weights.read
    monkeypatch.setattr(H5Weights, "read", lambda self, p: reads.append(self.path) or real(self, p))
    with Side(_architecture(tmp_path, "live"), weights=weights) as side:
        graph = side.graph()
        for node in graph.layers.values():
            for spec in node.weights:
                value = side.weights.read(spec.path)
                assert np.array_equal(value, keras.ops.convert_to_numpy(
                    old_model.get_layer(node.name).weights[int(spec.local[-1])]))
    assert len(reads) == 4 and len(set(reads)) >= 2  # the values came from several shards


def test_callback_with_old_weights(tmp_path, old):
    old_model, batch = old
    weights = _save_weights(old_model, tmp_path, "h5")
    keras.utils.set_random_seed(7)
    new = _build(5, 9)
    new.compile("sgd", "mse")
    callback = ks.SurgeryCallback(_architecture(tmp_path, "file"), old_weights=weights,
                                  old_features=OLD_FEATURES, new_features=NEW_FEATURES)
    x_new = np.insert(batch, 2, 0.0, axis=1)
    new.fit(x_new, predict(old_model, batch), epochs=1, verbose=0, callbacks=[callback])
    assert callback.report is not None and callback.report.preserves_function
    assert callback.report.plan.totals()["copied"] > 0


def test_bare_weights_file_is_refused_with_advice(tmp_path, old):
    weights = _save_weights(old[0], tmp_path, "h5")
    with pytest.raises(ks.SurgeryFileError) as err:
        ks.migrate_weights(weights, _build(4, 6))
    assert str(err.value) == f"'{weights}' is a weights-only file: {WEIGHTS_ONLY_ADVICE}"
    assert WEIGHTS_ONLY_ADVICE == (
        "a weights-only file has no architecture, pass the architecture as `old` (a .keras "
        "file or the live model) and the file as `old_weights=`.")
    renamed = tmp_path / "ckpt.bin"  # by content too, whatever its name
    os.rename(weights, renamed)
    with pytest.raises(ks.SurgeryFileError, match="has no architecture"):
        ks.ModelMigrator(str(renamed))


def test_missing_variable_names_layer_weight_and_both_files(tmp_path, old):
    weights = _save_weights(old[0], tmp_path, "h5")
    with h5py.File(weights, "a") as f:
        del f["layers/dense/vars/1"]  # Keras names the groups by class: h's bias
    arch = _architecture(tmp_path, "file")
    with pytest.raises(ks.SurgeryFileError) as err:
        ks.migrate_weights(arch, _build(5, 9), old_weights=weights)
    message = str(err.value)
    assert all(s in message for s in (weights, arch, "'layers/dense/vars/1'", "layer 'h'",
                                      "missing")), message


@pytest.mark.parametrize("kind", ["h5", "sharded"])
def test_wrong_shape_names_layer_weight_and_both_files(tmp_path, kind):
    keras.utils.set_random_seed(3)
    # h has 7 units, the architecture 6
    weights = _save_weights(_build(4, 7), tmp_path, kind, shard_gb=2 * SHARD_GB)
    arch = _architecture(tmp_path, "live")
    with pytest.raises(ks.SurgeryFileError) as err:
        ks.migrate_weights(arch, _build(5, 9), old_weights=weights)
    message = str(err.value)
    assert all(s in message for s in (weights, "model 'arch'", "'layers/dense/vars/0'",
                                      "layer 'h'", "(4, 7)", "(4, 6)")), message


def test_extra_variable_is_refused(tmp_path, old):
    weights = _save_weights(old[0], tmp_path, "h5")
    with h5py.File(weights, "a") as f:
        f.create_dataset("layers/ghost/vars/0", data=np.ones(3, np.float32))
    with pytest.raises(ks.SurgeryFileError, match="'layers/ghost/vars/0'.*another model"):
        ks.migrate_weights(_architecture(tmp_path, "live"), _build(5, 9), old_weights=weights)


def _shard_paths(index):
    names = json.loads(open(index).read())["weight_map"].values()
    found = sorted({n for v in names for n in ([v] if isinstance(v, str) else v)})
    return [os.path.join(os.path.dirname(index), n) for n in found]


def test_truncated_or_missing_shard_is_refused(tmp_path, old):
    weights = _save_weights(old[0], tmp_path, "sharded")
    shard = _shard_paths(weights)[1]
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ks.SurgeryFileError, match="shard of"):
        ks.migrate_weights(_architecture(tmp_path, "live"), _build(5, 9), old_weights=weights)
    os.unlink(shard)
    with pytest.raises(ks.SurgeryFileError, match="No such file.*shard of"):
        ks.migrate_weights(_architecture(tmp_path, "live"), _build(5, 9), old_weights=weights)


@pytest.mark.parametrize("name", ["../elsewhere.weights.h5", "/etc/passwd", ""])
def test_index_naming_a_shard_outside_its_folder_is_refused(tmp_path, old, name):
    weights = _save_weights(old[0], tmp_path, "sharded")
    index = json.loads(open(weights).read())
    index["weight_map"]["/layers/dense/vars"] = [name]
    open(weights, "w").write(json.dumps(index))
    with pytest.raises(ks.SurgeryFileError, match="plain file names"):
        Side(_architecture(tmp_path, "live"), weights=weights)


def test_index_that_misplaces_a_group_is_refused(tmp_path, old):
    weights = _save_weights(old[0], tmp_path, "sharded")
    index = json.loads(open(weights).read())
    shards = [os.path.basename(p) for p in _shard_paths(weights)]
    group = "/layers/dense/vars"
    index["weight_map"][group] = [n for n in shards if n not in index["weight_map"][group]][:1]
    open(weights, "w").write(json.dumps(index))
    with pytest.raises(ks.SurgeryFileError, match="does not place group"):
        ks.migrate_weights(_architecture(tmp_path, "live"), _build(5, 9), old_weights=weights)


@pytest.mark.parametrize("kind", ["h5", "sharded"])
def test_checkpoint_written_while_it_is_read_is_refused(tmp_path, old, kind, monkeypatch):
    """A file written in place between opening and the end of the read: SurgeryFileError, and
    the new model keeps its values."""
    old_model, _ = old
    weights = _save_weights(old_model, tmp_path, kind)
    victim = weights if kind == "h5" else _shard_paths(weights)[-1]
    real = H5Weights.read

    def read_then_append(self, path):
        value = real(self, path)
        with open(victim, "ab") as f:  # as a trainer rewriting the checkpoint in place would
            f.write(b"\0" * 64)
        return value

    monkeypatch.setattr(H5Weights, "read", read_then_append)
    new = _build(5, 9)
    before = [v.numpy().copy() for v in new.weights]
    with pytest.raises(ks.SurgeryFileError, match="changed while it was being read"):
        ks.migrate_weights(_architecture(tmp_path, "live"), new, old_weights=weights,
                           old_features=OLD_FEATURES, new_features=NEW_FEATURES)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, new.weights))


def test_checkpoint_replaced_by_rename_keeps_reading_the_opened_file(tmp_path, old):
    """`os.replace` of the path (how an atomic writer replaces a checkpoint) leaves the opened
    file intact: the migration reads the values it opened, consistently, and succeeds."""
    old_model, batch = old
    weights = _save_weights(old_model, tmp_path, "h5")
    with ks.ModelMigrator(_architecture(tmp_path, "live"), old_weights=weights,
                          old_features=OLD_FEATURES) as migrator:
        keras.utils.set_random_seed(7)
        new = _build(5, 9)
        plan = migrator.plan(new, new_features=NEW_FEATURES)
        keras.utils.set_random_seed(5)
        _build(4, 6).save_weights(tmp_path / "other.weights.h5")
        os.replace(tmp_path / "other.weights.h5", weights)
        report = plan.apply(new)
    _check_migrated(old_model, new, batch, report)


def test_optimizer_state_carried_or_said_missing(tmp_path, old):
    old_model, batch = old
    old_model.compile(keras.optimizers.Adam(1e-3), "mse")
    old_model.fit(batch, predict(old_model, batch) + 1, epochs=2, verbose=0)
    with_state = _save_weights(old_model, tmp_path, "h5")
    keras.utils.set_random_seed(99)
    arch = _build(4, 6, name="arch")
    arch.compile(keras.optimizers.Adam(1e-3), "mse")
    keras.utils.set_random_seed(7)
    new = _build(5, 9)
    new.compile(keras.optimizers.Adam(1e-3), "mse")
    report = ks.migrate_weights(arch, new, old_weights=with_state, old_features=OLD_FEATURES,
                                new_features=NEW_FEATURES)
    assert not [w for w in report.warnings if "optimizer" in w], report.warnings
    assert int(new.optimizer.iterations.numpy()) == int(old_model.optimizer.iterations.numpy())
    old_m = old_model.optimizer.variables[2].numpy()  # Adam's m of h's kernel
    new_m = new.optimizer.variables[2].numpy()
    assert np.abs(old_m).max() > 0
    assert np.array_equal(np.take(new_m[:, :6], [0, 1, 3, 4], axis=0), old_m)
    assert np.array_equal(new_m[2], np.zeros(9, np.float32))

    keras.utils.set_random_seed(99)
    bare = _build(4, 6)  # never compiled: its checkpoint has no optimizer variables
    bare.set_weights(old_model.get_weights())
    without = str(tmp_path / "bare.weights.h5")
    bare.save_weights(without)
    with ks.ModelMigrator(arch, old_weights=without, old_features=OLD_FEATURES) as migrator:
        migrator.plan(new, new_features=NEW_FEATURES)
        assert any(without in w and "holds no optimizer variables" in w
                   for w in migrator.side.warnings), migrator.side.warnings
    report = ks.migrate_weights(arch, new, old_weights=without, old_features=OLD_FEATURES,
                                new_features=NEW_FEATURES)
    assert any(without in w and "holds no optimizer variables" in w for w in report.warnings)


def test_apply_file_from_weights_only_checkpoints(tmp_path, old):
    """A plan made from one checkpoint applies to a pool of them; `.weights.h5` out is a
    weights-only file the new model loads, `.keras` out a full file."""
    old_model, batch = old
    weights = _save_weights(old_model, tmp_path, "h5")
    sharded = _save_weights(old_model, tmp_path, "sharded")
    keras.utils.set_random_seed(7)
    new = _build(5, 9)
    template = tmp_path / "template.keras"
    new.save(template)
    with ks.ModelMigrator(_architecture(tmp_path, "file"), old_weights=weights,
                          old_features=OLD_FEATURES) as migrator:
        plan = migrator.plan(new, new_features=NEW_FEATURES)
    for src, out in ((weights, tmp_path / "out.weights.h5"), (sharded, tmp_path / "out.keras")):
        plan.apply_file(src, out, template=template)
        if str(out).endswith(".weights.h5"):
            loaded = _build(5, 9)
            loaded.load_weights(out)
        else:
            loaded = keras.saving.load_model(out)
        x_new = np.insert(batch, 2, 0.0, axis=1)
        reference = predict(old_model, batch)
        assert max_diff(predict(loaded, x_new), reference) <= preservation_bound(reference)
    with pytest.raises(ks.SurgeryError, match="not a sharded checkpoint"):
        plan.apply_file(weights, tmp_path / "out.weights.json", template=template)


def test_cli_old_weights(tmp_path, old, capsys):
    old_model, batch = old
    weights = _save_weights(old_model, tmp_path, "sharded")
    arch = _architecture(tmp_path, "file")
    keras.utils.set_random_seed(7)
    new = tmp_path / "new.keras"
    _build(4, 9).save(new)  # h widened
    out = tmp_path / "out.keras"
    assert main(["diff", arch, str(new), "--old-weights", weights]) == 0
    assert weights in capsys.readouterr().out
    assert main(["migrate", arch, str(new), "--old-weights", weights, "-o", str(out)]) == 0
    reference = predict(old_model, batch)
    migrated = keras.saving.load_model(out)
    assert max_diff(predict(migrated, batch), reference) <= preservation_bound(reference)
    assert main(["migrate", arch, str(new), "--old-weights", str(tmp_path / "no.weights.h5"),
                 "-o", str(tmp_path / "x.keras")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert main(["diff", weights.replace(".json", "_00000.weights.h5"), str(new)]) == 2
    assert "has no architecture" in capsys.readouterr().err


def test_migrate_folder_of_weights_only_checkpoints(tmp_path, old):
    old_model, batch = old
    pool, out = tmp_path / "pool", tmp_path / "grown"
    pool.mkdir()
    for step in range(2):  # two checkpoints of one run: the second with other values
        old_model.get_layer("out").weights[1].assign(np.full(3, step, np.float32))
        old_model.save_weights(pool / f"ckpt_{step}.weights.h5")
    keras.utils.set_random_seed(7)
    new = _build(5, 9)
    template = tmp_path / "template.keras"
    new.save(template)
    with ks.ModelMigrator(_architecture(tmp_path, "live"), old_weights=pool / "ckpt_0.weights.h5",
                          old_features=OLD_FEATURES) as migrator:
        plan = migrator.plan(new, new_features=NEW_FEATURES)
    results = ks.migrate_folder(plan, pool, out, template=template, pattern="*.weights.h5",
                                verbose=False)
    assert [os.path.basename(r["out"]) for r in results] == ["ckpt_0.weights.h5",
                                                             "ckpt_1.weights.h5"]
    loaded = _build(5, 9)
    loaded.load_weights(out / "ckpt_1.weights.h5")
    reference = predict(old_model, batch)  # the values of the last checkpoint
    x_new = np.insert(batch, 2, 0.0, axis=1)
    assert max_diff(predict(loaded, x_new), reference) <= preservation_bound(reference)
    assert np.array_equal(loaded.get_layer("out").weights[1].numpy(), np.ones(3, np.float32))
