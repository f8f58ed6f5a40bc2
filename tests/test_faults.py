"""Real-world faults: damaged bytes inside the stored weights, outputs that reach their source
through links, permissions and durability of replaced files, leftovers of killed runs."""

from __future__ import annotations

import logging
import os
import stat
import zipfile

import h5py
import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.keras_file import WEIGHTS_MEMBER


def _mlp(n_in=4, width=6, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((n_in,), name="obs")
    h = keras.layers.Dense(width, activation="relu", name="hidden")(x)
    return keras.Model(x, keras.layers.Dense(2, name="out")(h))


def _weights(model):
    return [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in model.weights]


def _damage_one_weight_byte(path):
    """Flips one byte inside the stored values of the hidden kernel, leaving the zip's central
    directory (and so the CRC-32 it records) as it was: what a bad disk block does."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(WEIGHTS_MEMBER)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len)
    with zipfile.ZipFile(path) as archive, archive.open(WEIGHTS_MEMBER) as member:
        import io

        with h5py.File(io.BytesIO(member.read()), "r") as h5:
            offset = h5["layers/dense/vars/0"].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(start + offset + 2)
        byte = f.read(1)[0]
        f.seek(start + offset + 2)
        f.write(bytes([byte ^ 0x40]))


def test_damaged_weight_bytes_are_refused_and_the_model_is_unchanged(tmp_path):
    path = tmp_path / "old.keras"
    _mlp().save(path)
    _damage_one_weight_byte(path)
    new = _mlp(5, 8, seed=1)
    before = _weights(new)
    with pytest.raises(ks.SurgeryFileError, match=r"old\.keras': model\.weights\.h5 is damaged: "
                                                  r"its bytes have CRC-32"):
        ks.migrate_weights(path, new, old_features={"obs": list("abcd")},
                           new_features={"obs": list("abxcd")})
    for a, b in zip(_weights(new), before):
        np.testing.assert_array_equal(a, b)
    # Keras's own loader refuses it too.
    with pytest.raises(Exception):  # noqa: B017 - any of zipfile's errors
        keras.saving.load_model(path)


def test_damaged_weight_bytes_leave_no_file_to_file_output(tmp_path):
    src, template, out = tmp_path / "old.keras", tmp_path / "new.keras", tmp_path / "out.keras"
    _mlp().save(src)
    new = _mlp(4, 8, seed=1)
    new.save(template)
    plan = ks.ModelMigrator(src).plan(template)
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(src.read_bytes())
    _damage_one_weight_byte(damaged)
    with pytest.raises(ks.SurgeryFileError, match="is damaged: its bytes have CRC-32"):
        plan.apply_file(damaged, out, template=template)
    assert sorted(os.listdir(tmp_path)) == ["damaged.keras", "new.keras", "old.keras"]
    plan.apply_file(src, out, template=template)  # the sound file migrates
    assert out.exists()


def test_sound_file_is_checked_once(tmp_path, monkeypatch):
    from keras_surgery import keras_file

    path = tmp_path / "old.keras"
    old = _mlp()
    old.save(path)
    calls = []
    real = keras_file.zlib.crc32
    monkeypatch.setattr(keras_file.zlib, "crc32", lambda *a: calls.append(1) or real(*a))
    for _ in range(2):
        new = _mlp(4, 6, seed=2)
        report = ks.migrate_weights(path, new)
        assert report.preserves_function
        for a, b in zip(_weights(new), _weights(old)):
            np.testing.assert_array_equal(a, b)
    assert len(calls) == 1  # a small member: one chunk, and the second migration reuses it


def _pool(tmp_path):
    src = tmp_path / "pool"
    src.mkdir()
    _mlp().save(src / "ckpt_0.keras")
    template = tmp_path / "template.keras"
    _mlp(4, 8, seed=1).save(template)
    plan = ks.ModelMigrator(src / "ckpt_0.keras").plan(template)
    return src, template, plan


def test_outputs_that_reach_the_source_or_template_through_links_are_refused(tmp_path):
    src, template, plan = _pool(tmp_path)
    source_bytes = (src / "ckpt_0.keras").read_bytes()
    link = tmp_path / "linked"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(ks.SurgeryError, match="would overwrite its source"):
        plan.apply_file(src / "ckpt_0.keras", link / "ckpt_0.keras", template=template)
    with pytest.raises(ks.SurgeryError, match="would overwrite its source checkpoints"):
        ks.migrate_folder(plan, src, link, template=template, verbose=False)
    with pytest.raises(ks.SurgeryError, match="would overwrite its template"):
        plan.apply_file(src / "ckpt_0.keras", tmp_path / "." / "template.keras",
                        template=template)
    assert (src / "ckpt_0.keras").read_bytes() == source_bytes


def test_a_replaced_output_keeps_its_permissions_and_everything_is_fsynced(tmp_path,
                                                                           monkeypatch):
    src, template, plan = _pool(tmp_path)
    out = tmp_path / "out.keras"
    out.write_bytes(b"old output")
    os.chmod(out, 0o600)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    plan.apply_file(src / "ckpt_0.keras", out, template=template)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert synced == [False, True]  # the file before the rename, the folder after it
    with zipfile.ZipFile(out) as archive:
        assert WEIGHTS_MEMBER in archive.namelist()


def test_leftovers_of_killed_runs_are_skipped_with_a_log_line(tmp_path, caplog):
    src, template, plan = _pool(tmp_path)
    (src / ".tmp-abc123.keras").write_bytes(b"partial")  # an older version's temporary name
    (src / ".ckpt_1.keras.x1y2.ks-partial").write_bytes(b"partial")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="keras_surgery"):
        results = ks.migrate_folder(plan, src, out, template=template, verbose=False)
    assert [os.path.basename(r["out"]) for r in results] == ["ckpt_0.keras"]
    assert sum("interrupted run left behind" in r.message for r in caplog.records) == 2
    assert not any(n.endswith(".ks-partial") for n in os.listdir(out))


def test_a_template_whose_optimizer_was_never_built_gets_no_half_state(tmp_path):
    """Compiled but not built, Keras saves the iteration count and no slots; carrying the count
    alone would resume Adam at step N with zero moments: nothing is carried, and it says why."""
    old = _mlp()
    old.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    old.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=2, verbose=0)
    src = tmp_path / "old.keras"
    old.save(src)
    template = tmp_path / "template.keras"
    new = _mlp(4, 8, seed=1)
    new.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    new.save(template)
    with zipfile.ZipFile(template) as archive, archive.open(WEIGHTS_MEMBER) as member:
        import io

        with h5py.File(io.BytesIO(member.read()), "r") as h5:
            saved = sorted(h5["optimizer/vars"].keys()) if "optimizer/vars" in h5 else []
    plan = ks.ModelMigrator(src).plan(template)
    result = plan.apply_file(src, tmp_path / "out.keras", template=template)
    notes = [w for w in result["warnings"] if "optimizer" in w]
    if saved:  # this Keras writes the iteration count (and the learning rate) only
        assert len(saved) <= 2
        assert notes == ["optimizer state was not migrated: the new Adam has no slot variables "
                         "(it was compiled but not built when saved: call model.optimizer.build("
                         "model.trainable_variables) before saving the template). The "
                         "template's optimizer variables are written as they are."]
        migrated = keras.saving.load_model(tmp_path / "out.keras")
        assert int(keras.ops.convert_to_numpy(migrated.optimizer.iterations)) == 0
    else:
        assert any("has no optimizer variables" in w for w in notes), notes
