"""The per-weight and per-label costs removed from a migration must give exactly what the slow
paths gave: the old file's listing (two HDF5 visits instead of a walk from Python) and its
reads (views at offsets found while listing), the layouts kept across calls, the variables'
current values read without a Keras op, and labels interned without a call per key."""

from __future__ import annotations

import io
import zipfile

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery import keras_file, match
from keras_surgery.keras_file import WEIGHTS_MEMBER, KerasFile
from keras_surgery.labels import LabelSpace, occurrence_key
from keras_surgery.match import FEATURE_COSTS
from keras_surgery.stream import current_value
from tests.util import edit_weights, normal, to_numpy

# The weights groups Keras names after the layers' classes
GROUPS = {"bn": "batch_normalization", "dw": "depthwise_conv2d", "head": "dense"}


def small_convnet(channels: int = 3) -> keras.Model:
    x = inputs = keras.Input((8, 8, channels), name="img")
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(5, name="head")(x)
    return keras.Model(inputs, x)


def randomised(model: keras.Model, seed: int = 0) -> keras.Model:
    rng = np.random.default_rng(seed)
    for v in model.weights:
        low = 0.5 if "variance" in v.path else -1.0
        v.assign(rng.uniform(low, 1.5, v.shape).astype(v.dtype))
    return model


def python_walk(h5: h5py.File) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The oracle listing: every dataset, by h5py's own recursive walk from Python."""
    found = {}

    def visit(group, prefix):
        for key in group.keys():
            item = group[key]
            if isinstance(item, h5py.Group):
                visit(item, f"{prefix}{key}/")
            elif isinstance(item, h5py.Dataset):
                found[f"{prefix}{key}"] = (item.shape, item.dtype)

    visit(h5, "")
    return found


def stored(path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(WEIGHTS_MEMBER)
    with h5py.File(io.BytesIO(data), "r") as h5:
        return {p: np.asarray(h5[p][()]) for p in python_walk(h5)}


@pytest.fixture
def saved(tmp_path):
    model = randomised(small_convnet())
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)  # optimizer groups beside the layers
    path = tmp_path / "old.keras"
    model.save(path)
    return path


def test_listing_and_reads_are_h5pys_own(saved):
    expected = stored(saved)
    with zipfile.ZipFile(saved) as archive:
        oracle = python_walk(h5py.File(io.BytesIO(archive.read(WEIGHTS_MEMBER)), "r"))
    with KerasFile(saved) as f:
        listed = f.paths()
        assert list(listed) == list(oracle)  # same paths, same order
        assert {p: shape for p, (shape, _) in listed.items()} == {
            p: tuple(shape) for p, (shape, _) in oracle.items()}
        assert any(p.startswith("optimizer/") for p in listed)
        for p, value in expected.items():
            read = f.read(p)
            assert read.dtype == value.dtype and read.shape == value.shape, p
            np.testing.assert_array_equal(read, value, err_msg=p)
            assert not read.flags.writeable, p  # a view of the file, never written through
    assert len(expected) > 10 and any(np.abs(v).max() > 0.5 for v in expected.values())


def test_chunked_compressed_and_linked_datasets_are_read_as_before(saved, tmp_path):
    kernel_path = "layers/dense/vars/0"
    values = stored(saved)

    def edit(h5):
        kernel = h5[kernel_path][()]
        del h5[kernel_path]
        h5.create_dataset(kernel_path, data=kernel, chunks=(2, 5), compression="gzip")
        h5["layers/extra_name_for_the_bias"] = h5["layers/dense/vars/1"]  # a second hard link

    path = edit_weights(saved, tmp_path / "chunked.keras", edit)
    with KerasFile(path) as f:
        listed = f.paths()
        assert "layers/extra_name_for_the_bias" in listed
        np.testing.assert_array_equal(f.read(kernel_path), values[kernel_path])
        np.testing.assert_array_equal(f.read("layers/extra_name_for_the_bias"),
                                      values["layers/dense/vars/1"])
        assert f._weights()._placed[kernel_path] is None  # read through h5py
        assert f._weights()._placed["layers/conv2d/vars/0"] is not None


def test_bfloat16_weights_are_read_from_their_offsets(tmp_path):
    keras.config.set_dtype_policy("bfloat16")
    try:
        model = randomised(small_convnet())
    finally:
        keras.config.set_dtype_policy("float32")
    path = tmp_path / "bf16.keras"
    model.save(path)
    with KerasFile(path) as f:
        kernel = f.read("layers/conv2d/vars/0")
        assert f._weights()._placed["layers/conv2d/vars/0"] is not None
    assert kernel.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kernel, model.get_layer("conv").kernel.numpy())
    assert np.abs(kernel.astype(np.float32)).max() > 0.5


def test_a_soft_link_is_still_refused_by_name(saved, tmp_path):
    def edit(h5):
        del h5["layers/dense/vars/1"]
        h5["layers/dense/vars/1"] = h5py.SoftLink("/layers/conv/vars/1")

    path = edit_weights(saved, tmp_path / "soft.keras", edit)
    with pytest.raises(ks.SurgeryFileError,
                       match=r"entry 'layers/dense/vars/1' is a SoftLink; only plain datasets"):
        KerasFile(path).graph()


def test_layouts_are_rebuilt_once_per_process_and_still_checked(saved, tmp_path, monkeypatch):
    rebuilt = []
    rebuild = keras_file._rebuilt_layout
    monkeypatch.setattr(keras_file, "_LAYOUTS", {})
    monkeypatch.setattr(keras_file, "_rebuilt_layout",
                        lambda node, entry: (rebuilt.append(node.name), rebuild(node, entry))[1])
    with KerasFile(saved) as f:
        f.graph()
    first = sorted(rebuilt)
    assert first == ["add", "bn", "conv", "dw", "head", "pool"]  # one per distinct config
    with KerasFile(saved) as f:
        f.graph()
    assert sorted(rebuilt) == first  # nothing rebuilt the second time

    def widen(h5):
        del h5["layers/dense/vars/0"]
        h5["layers/dense/vars"].create_dataset("0", data=np.ones((6, 7), "float32"))

    bad = edit_weights(saved, tmp_path / "bad.keras", widen)
    with pytest.raises(ks.SurgeryFileError,
                       match=r"'layers/dense/vars/0' has shape \(6, 7\), expected \(6, 5\)"):
        KerasFile(bad).graph()
    assert sorted(rebuilt) == first  # refused from the kept layout


def test_a_full_layout_cache_starts_again(saved, monkeypatch):
    monkeypatch.setattr(keras_file, "_LAYOUTS", {})
    monkeypatch.setattr(keras_file, "_MAX_LAYOUTS", 2)
    with KerasFile(saved) as f:
        f.graph()
    assert 1 <= len(keras_file._LAYOUTS) <= 2


@pytest.mark.parametrize("shape", [(), (7,), (3, 3, 2, 4)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_current_value_without_copy_is_the_value_and_keeps_it(shape, dtype):
    rng = np.random.default_rng(1)
    v = keras.Variable(np.asarray(rng.uniform(1, 9, shape)).astype(dtype), dtype=dtype,
                       trainable=dtype != "int32")  # torch: no gradients of integers
    before = np.array(v.numpy())
    assert np.abs(before.astype(np.float64)).max() > 0
    for copy in (False, True):
        value, owned = current_value(v, copy=copy)
        assert value.shape == shape and value.dtype == before.dtype
        np.testing.assert_array_equal(value, before)
        if not copy and len(shape) and keras.backend.backend() in ("tensorflow", "jax"):
            assert not owned  # the variable's own buffer: never to be written
    view, _ = current_value(v, copy=False)
    v.assign(np.zeros(shape, dtype))
    np.testing.assert_array_equal(view, before)  # the journal's record survives the write
    np.testing.assert_array_equal(current_value(v, copy=False)[0], np.zeros(shape, dtype))


def test_interning_in_bulk_gives_the_ids_and_kinds_one_by_one_gives():
    def keys(space_ids):
        base = [("unit", "dense", "", j) for j in range(5)] + [("feature", "x", None, 0)]
        base += [("zero", "dense", 1), ("via", "bn", 0)]
        return base, lambda ids: [("set", frozenset(ids[:2])), occurrence_key(ids[5], 1),
                                  ("tuple", ids[5], ids[0]), ("set", frozenset([ids[5]]))]

    bulk, single = LabelSpace(), LabelSpace()
    plain, composite = keys(None)
    ids = bulk.intern_many(plain)  # a list
    ids = np.concatenate([ids, bulk.intern_many(k for k in composite(ids.tolist()))])
    again = bulk.intern_many(iter(plain + [("unit", "new", "", 0)]))  # a generator, one new
    one = [single.intern(k) for k in plain]
    one += [single.intern(k) for k in composite(one)]
    assert ids.dtype == np.int64 and ids.tolist() == one
    assert again.tolist() == one[:len(plain)] + [len(one)]
    assert bulk.intern_many([]).shape == (0,)
    for i in range(len(one)):
        key = single.key(i)
        base = single.key(key[2]) if key[0] == "occurrence" else key
        assert bulk.kind(i) == single.kind(i) == base[0]
    assert bulk.kinds(ids) == [single.kind(i) for i in one]
    np.testing.assert_array_equal(bulk.zero_safe(ids), single.zero_safe(np.array(one)))
    # a feature, a copy of it and a set of it alone are zero-safe; units and composites of them
    # are not
    assert bulk.zero_safe(ids).tolist() == [False] * 5 + [True, False, False,
                                                          False, True, False, True]


def test_a_migration_reads_every_old_value_through_the_new_paths(saved, tmp_path):
    # End to end: 3 -> 4 input channels; every layer after the first conv copied exactly, the
    # new channel's kernel rows zero, and the new model computes the old function.
    old = keras.models.load_model(saved)
    new = small_convnet(4)
    report = ks.migrate_weights(saved, new)
    assert report.preserves_function
    values = stored(saved)
    conv = new.get_layer("conv").kernel.numpy()
    np.testing.assert_array_equal(conv[:, :, :3], values["layers/conv2d/vars/0"])
    np.testing.assert_array_equal(conv[:, :, 3], 0)
    for name, group in GROUPS.items():
        for i, w in enumerate(new.get_layer(name).weights):
            np.testing.assert_array_equal(w.numpy(), values[f"layers/{group}/vars/{i}"])
    rng = np.random.default_rng(2)
    x, x2 = normal(rng, 4, 8, 8, 3), normal(rng, 4, 8, 8, 3)
    old_y = to_numpy(old(x))
    assert np.abs(old_y - to_numpy(old(x2))).max() > 1e-3
    new_y = to_numpy(new(np.concatenate([x, normal(rng, 4, 8, 8, 1) * 0], axis=-1)))
    bound = 64 * np.finfo(np.float32).eps * max(1.0, np.abs(old_y).max())
    assert np.abs(new_y - old_y).max() <= bound


def _features(rng, n: int, kinds: int) -> list[dict[str, str]]:
    keys = ["class", *(k for k, _ in FEATURE_COSTS)]
    return [{k: f"{k}{rng.integers(kinds)}" for k in keys} for _ in range(n)]


def test_the_diagonal_shortcut_is_the_alignment_the_tables_give(monkeypatch):
    # Oracle: the same alignment with the shortcut disabled (both edit tables, backtracking,
    # ties). Equal lengths, a few features or classes changed (some cases below 2 * GAP in
    # total, some above), some name-paired and some unpairable layers.
    cases = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 30))
        old = _features(rng, n, 2)
        new = [dict(row) for row in old]
        for _ in range(int(rng.integers(0, 5))):
            row, key = int(rng.integers(n)), str(rng.choice(["class", *dict(FEATURE_COSTS)]))
            new[row][key] = "changed"
        kind = rng.choice([0, 0, 0, 1, -1], size=n)
        old_groups = np.where(kind > 0, np.arange(1, n + 1),
                              np.where(kind < 0, -1 - np.arange(n), 0))
        new_groups = np.where(kind < 0, -1 - n - np.arange(n), old_groups)
        cases.append((old, new, old_groups, new_groups))
    fast = [match.align(*case) for case in cases]
    shortcut = [int(match._PairCosts(*case).diagonal().sum()) < 2 * match.GAP
                for case in cases]
    original = match._PairCosts.diagonal
    monkeypatch.setattr(match._PairCosts, "diagonal",
                        lambda self: original(self) + 2 * match.GAP)  # never the shortcut
    slow = [match.align(*case) for case in cases]
    for k, (a, b) in enumerate(zip(fast, slow)):
        assert a == b, k
    assert sum(shortcut) >= 10 and len(cases) - sum(shortcut) >= 10  # both kinds were tried
