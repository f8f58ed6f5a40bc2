"""The .keras reader against Keras's own loader: same graph, same bits, every layer type."""

from __future__ import annotations

import zipfile

import keras
import numpy as np
import pytest

from keras_surgery.errors import SurgeryFileError
from keras_surgery.graph import graph_from_model, live_variables
from keras_surgery.keras_file import WEIGHTS_MEMBER, KerasFile, _config_entries, keras_layout

L = keras.layers


# -- the models --------------------------------------------------------------------------------


def _dense_bias_and_not():
    x = keras.Input((6,), name="obs")
    h = L.Dense(5, activation="relu", name="with_bias")(x)
    return keras.Model(x, L.Dense(3, use_bias=False, name="no_bias")(h))


def _batchnorm_variants():
    x = keras.Input((4,))
    h = L.Dense(4)(x)
    h = L.BatchNormalization(scale=False, name="bn_no_scale")(h)
    h = L.BatchNormalization(center=False, name="bn_no_center")(h)
    h = L.BatchNormalization(scale=False, center=False)(h)
    return keras.Model(x, L.BatchNormalization()(h))


def _layernorm_prelu():
    x = keras.Input((4,))
    h = L.LayerNormalization(name="ln")(L.Dense(4)(x))
    h = L.LayerNormalization(scale=False)(h)
    return keras.Model(x, L.PReLU(name="prelu")(h))


def _normalization_adapted():
    x = keras.Input((5,))
    norm = L.Normalization(name="norm")
    norm.adapt(np.random.default_rng(0).normal(2.0, 3.0, (32, 5)).astype("float32"))
    return keras.Model(x, L.Dense(2)(norm(x)))


def _einsum_dense():
    x = keras.Input((3, 5))
    h = L.EinsumDense("abc,cd->abd", output_shape=(None, 4), bias_axes="d", name="ein")(x)
    return keras.Model(x, L.EinsumDense("abd,de->ae", output_shape=2)(h))


def _merges():
    a = keras.Input((3,), name="a")
    b = keras.Input((3,), name="b")
    joined = L.Concatenate()([L.Dense(3)(a), b])
    summed = L.Add()([a, L.Dense(3, name="db")(b)])
    via_ops = keras.ops.concatenate([joined, summed * 2.0], axis=-1)
    plus = a + b
    return keras.Model([a, b], [L.Dense(2, name="head1")(via_ops), L.Dense(2)(plus)])


def _nested_sequential():
    inner = keras.Sequential(
        [keras.Input((4,)), L.Dense(3, name="in1"), L.Dense(3, name="in2")], name="inner"
    )
    x = keras.Input((4,))
    return keras.Model(x, L.Dense(2, name="top")(inner(L.Dense(4)(x))))


def _nested_functional():
    ix = keras.Input((4,))
    inner = keras.Model(ix, L.Dense(3, name="f1")(L.Dense(4, name="f0")(ix)), name="innerf")
    x = keras.Input((4,))
    return keras.Model(x, L.Dense(2)(inner(L.Dense(4)(x))))


def _sequential_root():
    return keras.Sequential([keras.Input((4,)), L.Dense(3), L.Dense(3), L.Dense(2)])


def _sequential_built_by_call():
    model = keras.Sequential([L.Dense(3), L.BatchNormalization(), L.Dense(2)])
    model(np.zeros((1, 4), "float32"))
    return model


def _shared_layer():
    a = keras.Input((3,), name="left")
    b = keras.Input((3,), name="right")
    shared = L.Dense(3, name="shared")
    return keras.Model([a, b], L.Add()([shared(a), shared(b)]))


def _compiled_adam():
    x = keras.Input((4,))
    model = keras.Model(x, L.Dense(2)(L.Dense(3, activation="tanh")(x)))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    rng = np.random.default_rng(1)
    model.fit(rng.normal(size=(8, 4)), rng.normal(size=(8, 2)), epochs=1, verbose=0)
    return model


def _conv():
    x = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, name="conv")(x)
    h = L.DepthwiseConv2D(3, use_bias=False)(h)
    h = L.Flatten()(L.MaxPooling2D()(h))
    return keras.Model(x, L.Dense(2)(h))


def _recurrent():
    x = keras.Input((5, 3))
    h = L.LSTM(4, return_sequences=True, dropout=0.1, name="lstm")(x)
    return keras.Model(x, L.GRU(3)(L.Dropout(0.2)(h)))


def _embedding_bidirectional():
    x = keras.Input((5,), dtype="int32")
    h = L.Embedding(10, 3, name="emb")(x)
    return keras.Model(x, L.Bidirectional(L.LSTM(2), name="bi")(h))


def _attention():
    x = keras.Input((4, 6))
    h = L.MultiHeadAttention(num_heads=2, key_dim=3, name="mha")(x, x)
    return keras.Model(x, L.Dense(2)(L.GlobalAveragePooling1D()(h)))


def _bfloat16():
    x = keras.Input((4,))
    return keras.Model(x, L.Dense(3, dtype="bfloat16", name="half")(x))


MODELS = {
    "dense": _dense_bias_and_not,
    "batchnorm": _batchnorm_variants,
    "layernorm_prelu": _layernorm_prelu,
    "normalization": _normalization_adapted,
    "einsum_dense": _einsum_dense,
    "merges": _merges,
    "nested_sequential": _nested_sequential,
    "nested_functional": _nested_functional,
    "sequential": _sequential_root,
    "sequential_called": _sequential_built_by_call,
    "shared_layer": _shared_layer,
    "compiled_adam": _compiled_adam,
    "conv": _conv,
    "recurrent": _recurrent,
    "embedding_bidirectional": _embedding_bidirectional,
    "attention": _attention,
    "bfloat16": _bfloat16,
}


def distinct_weights(model, seed=0):
    """Every float variable gets its own random values: a swapped or shifted read shows."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        if "float" in str(v.dtype):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32").astype(v.dtype))


@pytest.fixture(params=sorted(MODELS))
def saved(request, tmp_path):
    model = MODELS[request.param]()
    distinct_weights(model)
    path = tmp_path / f"{request.param}.keras"
    model.save(path)
    return model, path


def value_of(variable):
    """A recorded store value: a variable, or the numpy copy Optimizer.save_own_variables
    stores."""
    return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable)


def weight_table(graph):
    return {
        name: (node.class_name, node.group, [(w.path, w.local, w.shape, w.dtype)
                                             for w in node.weights])
        for name, node in graph.layers.items()
    }


# -- (a) the graph -----------------------------------------------------------------------------


def test_file_graph_equals_live_graph(saved):
    model, path = saved
    live = graph_from_model(model)
    with KerasFile(path) as f:
        read = f.graph()
        assert weight_table(read) == weight_table(live)
        assert read.inputs == live.inputs
        assert read.outputs == live.outputs
        assert read.order == live.order
        for name, node in read.layers.items():
            assert [c.inputs for c in node.calls] == [c.inputs for c in live.layers[name].calls]
        # Every variable Keras saved belongs to a layer, or is optimizer state.
        owned = {w.path for node in read.layers.values() for w in node.weights}
        assert {p for p in f.paths() if not p.startswith("optimizer/")} == owned
    assert owned, "the model has weights"


# -- (b) the values ----------------------------------------------------------------------------


def test_every_weight_reads_as_keras_loads_it(saved):
    model, path = saved
    loaded = keras.saving.load_model(path)
    loaded_vars = live_variables(loaded)
    original_vars = live_variables(model)
    with KerasFile(path) as f:
        graph = f.graph()
        assert set(f.paths()) == set(loaded_vars), "the same variables as Keras's walk"
        for node in graph.layers.values():
            for spec in node.weights:
                ours = f.read(spec.path)
                theirs = value_of(loaded_vars[spec.path])
                assert ours.dtype == theirs.dtype, (node.name, spec.local)
                assert str(ours.dtype) == spec.dtype
                assert ours.shape == spec.shape
                assert np.array_equal(ours, theirs), (node.name, spec.local)
                # ... and Keras loaded what the model held (the loader did not skip it).
                assert np.array_equal(theirs, value_of(original_vars[spec.path]))
        for opt_path in [p for p in f.paths() if p.startswith("optimizer/")]:
            ours = f.read(opt_path)
            theirs = value_of(loaded_vars[opt_path])
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), opt_path


def test_optimizer_state_is_read():
    model = _compiled_adam()
    variables = live_variables(model)
    # iterations, learning rate, then (m, v) per trainable variable: 2 + 2 * 4.
    assert sorted(p for p in variables if p.startswith("optimizer/")) == sorted(
        f"optimizer/vars/{i}" for i in range(10)
    )
    assert float(value_of(variables["optimizer/vars/0"])) == 1.0  # one step


def test_keras_layout_check_is_active(saved):
    # The layout check rebuilds Keras's own layers; if it silently skipped them, a damaged
    # file would pass. Every built-in layer with weights must be rebuilt and match.
    model, path = saved
    with KerasFile(path) as f:
        graph = f.graph()
        checked = 0
        for name, entry in _config_entries(f.config):
            node = graph.layers.get(name)  # InputLayers are not graph layers
            if node is None or not node.weights:
                continue
            assert keras_layout(node, entry) == {w.local: w.shape for w in node.weights}, name
            checked += 1
        assert checked


def test_layout_check_leaves_keras_naming_alone(tmp_path):
    # Rebuilding layers (their dropout seed generators, softmax, sublayers) must not shift the
    # auto-names of the user's next layers.
    from keras.src.backend.common import global_state

    x = keras.Input((5, 3))
    h = L.Bidirectional(L.LSTM(4, dropout=0.2, return_sequences=True))(x)
    h = L.Dropout(0.3)(L.MultiHeadAttention(2, 3, dropout=0.1)(h, h))
    path = tmp_path / "m.keras"
    keras.Model(x, h).save(path)

    def counters():
        return dict(global_state.get_global_attribute("object_name_uids") or {})

    before = counters()
    with KerasFile(path) as f:
        f.graph()
    assert counters() == before
    assert not global_state.get_global_attribute("uninitialized_variables")


# -- names, storage ----------------------------------------------------------------------------


def test_nested_models_keep_inner_layer_names(tmp_path):
    path = tmp_path / "nested.keras"
    _nested_sequential().save(path)
    with KerasFile(path) as f:
        graph = f.graph()
        assert {"inner/in1", "inner/in2", "top"} <= set(graph.layers)
        node = graph.layers["inner/in2"]
        assert node.group == "layers/sequential/layers/dense_1"
        assert node.short_name == "in2"
        assert f.group_name(node.group) == "in2"  # Keras >= 3.6 names the group
        assert [w.local for w in node.weights] == ["vars/0", "vars/1"]

    path = tmp_path / "nested_f.keras"
    _nested_functional().save(path)
    with KerasFile(path) as f:
        graph = f.graph()
        assert {"innerf/f0", "innerf/f1"} <= set(graph.layers)
        assert graph.layers["innerf/f1"].group == "layers/functional/layers/dense_1"


def _all_reads(path):
    with KerasFile(path) as f:
        graph = f.graph()
        return weight_table(graph), {p: f.read(p) for p in f.paths()}


def test_weights_member_is_read_in_place(tmp_path, monkeypatch):
    path = tmp_path / "m.keras"
    _conv().save(path)
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo(WEIGHTS_MEMBER).compress_type == zipfile.ZIP_STORED
    expected_table, expected = _all_reads(path)

    real_open = zipfile.ZipFile.open

    def guarded_open(self, name, *args, **kwargs):
        member = name.filename if isinstance(name, zipfile.ZipInfo) else name
        assert member != WEIGHTS_MEMBER, "the weights member must not go through zipfile"
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", guarded_open)
    table, values = _all_reads(path)
    assert table == expected_table
    assert values.keys() == expected.keys()
    for p, value in values.items():
        assert value.dtype == expected[p].dtype and np.array_equal(value, expected[p])


def rewrite_zip(src, dst, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", compression) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info), compress_type=compression)


@pytest.mark.parametrize("name", ["compiled_adam", "embedding_bidirectional", "bfloat16"])
def test_compressed_weights_member_reads_identically(tmp_path, name):
    model = MODELS[name]()
    distinct_weights(model)
    stored = tmp_path / "stored.keras"
    model.save(stored)
    deflated = tmp_path / "deflated.keras"
    rewrite_zip(stored, deflated)
    with zipfile.ZipFile(deflated) as archive:
        assert archive.getinfo(WEIGHTS_MEMBER).compress_type == zipfile.ZIP_DEFLATED
    table_a, values_a = _all_reads(stored)
    table_b, values_b = _all_reads(deflated)
    assert table_a == table_b
    assert values_a.keys() == values_b.keys()
    for p in values_a:
        assert values_a[p].dtype == values_b[p].dtype and np.array_equal(values_a[p], values_b[p])


def test_reader_is_lazy_and_closes(tmp_path):
    path = tmp_path / "m.keras"
    _dense_bias_and_not().save(path)
    f = KerasFile(path)
    assert f._tree is None  # config only: the weights are opened when first needed
    f.graph()
    assert f._tree is not None
    f.close()
    f.close()  # idempotent
    assert f._tree is None and f._raw is None


# -- the global-heap scan ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [b"ABAB", b"ABABA", b"AB"])
@pytest.mark.parametrize("chunk", [5, 7, 64, 8 << 20])
def test_signature_positions_match_find(monkeypatch, chunk, sig):
    """The chunked numpy search gives exactly `bytes.find`'s positions: overlapping ones, ones
    across chunk boundaries, at both ends, in a bytes object and in a memory map, for
    signatures found by their first 4 bytes as one word and for shorter ones."""
    import mmap
    import tempfile

    from keras_surgery import keras_file

    monkeypatch.setattr(keras_file, "SCAN_CHUNK_BYTES", chunk)
    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(0, 4, 3000, dtype=np.uint8) + ord("A"))  # "ABCD" noise
    for at in (0, 5, 1000, 3000 - len(sig)):
        data[at:at + len(sig)] = sig
    data[61:67] = b"ABABAB"  # overlapping, across the 64-byte chunks' boundary
    data = bytes(data)

    def by_find(d, start, end):
        out, pos = [], d.find(sig, start, end)
        while pos >= 0:
            out.append(pos)
            pos = d.find(sig, pos + 1, end)
        return out

    for start, end in [(0, len(data)), (3, 2999), (62, 70), (10, 12), (2990, 4000)]:
        expected = by_find(data, start, end)
        assert list(keras_file.signature_positions(data, sig, start, end)) == expected
    assert {0, 5, 61, 1000, 3000 - len(sig)} <= set(by_find(data, 0, len(data)))
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert list(keras_file.signature_positions(m, sig, 0, len(m))) == by_find(
                data, 0, len(data))
        # leaving the with block closes the map: no view of it may still be alive


def test_damaged_global_heap_is_refused_before_hdf5_reads_it(tmp_path):
    """A free-space object of size 0 in a global heap collection makes HDF5 loop forever on
    the first string attribute it reads; the reader refuses the file first, naming it."""
    from keras_surgery.errors import SurgeryFileError
    from keras_surgery.keras_file import _HEAP_SCANS, GLOBAL_HEAP_SIGNATURE

    path = tmp_path / "old.keras"
    _dense_bias_and_not().save(path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    weights = bytearray(members[WEIGHTS_MEMBER])
    at = weights.find(GLOBAL_HEAP_SIGNATURE)
    assert at >= 0  # Keras writes layer names as variable-length strings
    first_object = at + 16  # signature, version, reserved, 8-byte collection size
    weights[first_object:first_object + 2] = b"\0\0"  # index 0: free space...
    weights[first_object + 8:first_object + 16] = bytes(8)  # ...of size 0
    members[WEIGHTS_MEMBER] = bytes(weights)
    damaged = tmp_path / "damaged.keras"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    _HEAP_SCANS.clear()
    with pytest.raises(SurgeryFileError, match=r"damaged\.keras'.*is damaged: the global heap "
                                               r"collection at byte \d+ holds an object of size 0"):
        with KerasFile(str(damaged)) as f:
            f.paths()
    with KerasFile(str(path)) as f:  # the undamaged file reads
        assert f.paths()


# -- one open per migration ---------------------------------------------------------------------


def test_a_migration_opens_the_old_file_once(tmp_path, monkeypatch):
    """Planning, the lineage record, the weights, their memory map and the optimizer layout all
    read the old file through one file descriptor."""
    import builtins
    import os

    import keras_surgery as ks

    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), name="obs")
    old = keras.Model(inp, keras.layers.Dense(2, name="out")(
        keras.layers.Dense(4, name="h")(inp)))
    old.compile(optimizer="adam", loss="mse")
    old.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    path = str(tmp_path / "old.keras")
    ks.save_with_lineage(old, path, features={"obs": ["a", "b", "c"]})
    inp = keras.Input((4,), name="obs")
    new = keras.Model(inp, keras.layers.Dense(2, name="out")(
        keras.layers.Dense(4, name="h")(inp)))
    new.compile(optimizer="adam", loss="mse")

    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == path:
            opened.append("open")
        return real_open(file, *args, **kwargs)

    def spy_os_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == path:
            opened.append("os.open")
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    report = ks.migrate_weights(path, new, new_features={"obs": ["a", "x", "b", "c"]})
    assert report.preserves_function, report.warnings
    assert not any("optimizer" in w for w in report.warnings), report.warnings
    np.testing.assert_array_equal(new.get_layer("h").kernel.numpy()[[0, 2, 3]],
                                  old.get_layer("h").kernel.numpy())
    assert opened == ["open"]


def _small_pair(tmp_path):
    keras.utils.set_random_seed(1)
    inp = keras.Input((3,), name="obs")
    old = keras.Model(inp, keras.layers.Dense(2, name="out")(inp))
    path = tmp_path / "old.keras"
    old.save(path)
    inp = keras.Input((3,), name="obs")
    return path, keras.Model(inp, keras.layers.Dense(2, name="out")(inp))


def test_lineage_hash_is_of_the_file_that_was_read(tmp_path):
    import hashlib
    import os

    import keras_surgery as ks

    path, new = _small_pair(tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    report = ks.migrate_weights(path, new)
    ks.save_with_lineage(new, tmp_path / "v2.keras", report=report)
    assert ks.read_lineage(tmp_path / "v2.keras")["history"][-1]["old_sha256"] == digest

    other = tmp_path / "other.keras"
    new.save(other)
    os.replace(other, path)  # the path now names another file
    with pytest.raises(ks.SurgeryFileError, match="changed since it was read"):
        ks.save_with_lineage(new, tmp_path / "v3.keras", report=report)
    os.remove(path)  # gone: the history says where the weights came from, without a hash
    ks.save_with_lineage(new, tmp_path / "v4.keras", report=report)
    entry = ks.read_lineage(tmp_path / "v4.keras")["history"][-1]
    assert entry["old"] == str(path) and "old_sha256" not in entry


def test_a_file_written_in_place_while_open_is_refused(tmp_path):
    import keras_surgery as ks

    path, new = _small_pair(tmp_path)
    with ks.ModelMigrator(path) as migrator:
        plan = migrator.plan(new)
        with open(path, "ab") as f:  # in place: same inode, new size
            f.write(b"\0" * 16)
        with pytest.raises(ks.SurgeryFileError, match="old.keras' changed while"):
            migrator.side.sha256()
        with pytest.raises(ks.SurgeryFileError, match="old.keras' changed while"):
            plan.apply(new)


def test_a_closed_migrator_says_so(tmp_path):
    import keras_surgery as ks

    path, new = _small_pair(tmp_path)
    migrator = ks.ModelMigrator(path)
    plan = migrator.plan(new)
    migrator.close()
    with pytest.raises(ks.SurgeryError, match="is closed; make a new one"):
        migrator.plan(new)
    with pytest.raises(ks.SurgeryError, match="was closed after planning"):
        plan.apply(new)


# -- budgets against small hostile files (issue 15, item 5) -----------------------------------


def _plain_weights(tmp_path):
    model = _dense_bias_and_not()
    distinct_weights(model)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    return path


def test_compressed_member_bomb_below_keras_floor_is_refused(tmp_path):
    """80 MiB of declared weights stored in a few hundred bytes (bzip2): below Keras's 4 GiB
    floor, so it used to be decompressed whole; refused before any of it is, with the real
    limits."""
    import time

    src = tmp_path / "m.keras"
    _dense_bias_and_not().save(src)
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(bomb, "w") as out:
        out.writestr("config.json", archive.read("config.json"))
        out.writestr(WEIGHTS_MEMBER, bytes(80 << 20), compress_type=zipfile.ZIP_BZIP2)
    with zipfile.ZipFile(bomb) as archive:
        info = archive.getinfo(WEIGHTS_MEMBER)
        assert info.file_size == 80 << 20 and info.compress_size < 1 << 12
    start = time.perf_counter()
    with KerasFile(bomb) as f, pytest.raises(SurgeryFileError,
                                             match="refusing a decompression bomb.*MAX_EXP"):
        f.paths()
    assert time.perf_counter() - start < 1.0


def test_compressed_member_is_decompressed_to_disk_and_mapped(tmp_path):
    model = _dense_bias_and_not()
    distinct_weights(model)
    stored, deflated = tmp_path / "stored.keras", tmp_path / "deflated.keras"
    model.save(stored)
    rewrite_zip(stored, deflated)
    with KerasFile(deflated) as f:
        value = f.read("layers/dense/vars/0")
        assert f._spill is not None and not value.flags.owndata  # a view of the mapped spill
        assert np.array_equal(value, keras.ops.convert_to_numpy(model.layers[1].kernel))
    assert f._spill is None


def test_huge_chunk_on_a_tiny_dataset_is_refused(tmp_path):
    import h5py

    from keras_surgery.weights_file import WeightsFile

    path = _plain_weights(tmp_path)
    with h5py.File(path, "a") as h5:
        value = h5["layers/dense/vars/0"][()]
        del h5["layers/dense/vars/0"]
        h5.create_dataset("layers/dense/vars/0", data=value, maxshape=(None, None),
                          chunks=(1024, 1024))  # 4 MiB chunks for 120 bytes
    with WeightsFile(path) as f, pytest.raises(SurgeryFileError, match="chunk bomb"):
        f.paths()


def test_declared_but_unwritten_datasets_have_a_total_limit(tmp_path):
    """Each one under the per-dataset floor, together past MAX_UNWRITTEN_BYTES."""
    import h5py

    from keras_surgery.weights_file import WeightsFile

    path = _plain_weights(tmp_path)
    with h5py.File(path, "a") as h5:
        for i in range(9):  # 9 x 32 MiB declared, nothing stored
            h5.create_dataset(f"layers/ghost/vars/{i}", shape=(8 << 20,), dtype="float32")
    with WeightsFile(path) as f, pytest.raises(SurgeryFileError, match="MAX_UNWRITTEN_BYTES"):
        f.paths()


def test_listing_reads_every_storage_layout_as_h5py_does(tmp_path):
    # The listing asks HDF5's low-level calls what h5py's Dataset properties would say: a
    # contiguous, a chunked and compressed, a compact and a bfloat16-tagged weight must list
    # with their shapes and dtypes and read back exactly, viewed in place only when contiguous.
    import h5py

    from keras_surgery.keras_file import H5Weights

    rng = np.random.default_rng(3)
    values = {
        "layers/a/vars/0": rng.normal(size=(5, 7)).astype("float32"),
        "layers/b/vars/0": rng.normal(size=(64, 3)).astype("float64"),
        "layers/c/vars/0": np.arange(6, dtype="int32").reshape(2, 3),
    }
    bits = rng.integers(0, 2**16, size=(4,), dtype=np.uint16)
    path = tmp_path / "w.weights.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("layers/a/vars/0", data=values["layers/a/vars/0"])
        h5.create_dataset("layers/b/vars/0", data=values["layers/b/vars/0"], chunks=(16, 3),
                          compression="gzip")
        space = h5py.h5s.create_simple((2, 3))
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_layout(h5py.h5d.COMPACT)
        group = h5.require_group("layers/c/vars")
        compact = h5py.h5d.create(group.id, b"0", h5py.h5t.STD_I32LE, space, dcpl=plist)
        compact.write(h5py.h5s.ALL, h5py.h5s.ALL, values["layers/c/vars/0"])
        tagged = h5.create_dataset("layers/d/vars/0", data=bits.view("V2"))
        tagged.attrs["dtype"] = "bfloat16"
        h5["layers/a/vars"].attrs["name"] = "dense_a"
    with open(path, "rb") as raw:
        tree = H5Weights(raw, "'w.weights.h5'", str(path))
        try:
            listed = dict(tree.paths())
            assert listed == {
                "layers/a/vars/0": ((5, 7), "float32"),
                "layers/b/vars/0": ((64, 3), "float64"),
                "layers/c/vars/0": ((2, 3), "int32"),
                "layers/d/vars/0": ((4,), "bfloat16"),
            }
            for name, value in values.items():
                np.testing.assert_array_equal(tree.read(name), value)
            assert tree.read("layers/d/vars/0").view(np.uint16).tolist() == bits.tolist()
            assert tree._placed["layers/a/vars/0"] is not None
            assert tree._placed["layers/b/vars/0"] is None  # chunked: read through h5py
            assert tree._placed["layers/c/vars/0"] is None  # compact: no offset in the file
            assert tree.group_name("layers/a") == "dense_a"
            assert tree.group_name("layers/b") is None  # no name stored
            assert tree.group_name("layers/missing") is None
        finally:
            tree.close()
