"""Bad input fails cleanly: a SurgeryError naming what was wrong, and nothing changed.

Every broken file is made here from a good one; no binary fixtures.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.keras_file import CONFIG_MEMBER, WEIGHTS_MEMBER, KerasFile

L = keras.layers


# -- fixtures and helpers ----------------------------------------------------------------------


def mlp(width=4):
    x = keras.Input((width,), name="obs")
    h = L.Dense(5, activation="relu", name="hidden")(x)
    return keras.Model(x, L.Dense(2, name="out")(h))


@pytest.fixture
def old_path(tmp_path):
    path = tmp_path / "old.keras"
    mlp().save(path)
    return path


@pytest.fixture
def new_model():
    return mlp()


def weights_of(model):
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def migrate_fails(old, new_model, error, match, **kwargs):
    """Runs a migration that must fail; checks the error and that nothing changed."""
    before = weights_of(new_model)
    path = os.fspath(old) if isinstance(old, (str, os.PathLike)) else None
    file_bytes = Path(path).read_bytes() if path and os.path.isfile(path) else None
    with pytest.raises(error, match=match) as info:
        ks.migrate_weights(old, new_model, **kwargs)
    assert isinstance(info.value, ks.SurgeryError)
    if new_model is not None and getattr(new_model, "built", False):
        after = weights_of(new_model)
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), "new model changed"
    if file_bytes is not None:
        assert Path(path).read_bytes() == file_bytes, "old file changed"
    return info.value


def members(path):
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_zip(path, contents):
    # Keras writes every member uncompressed; so do we.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return path


def edit_config(src, dst, edit):
    contents = members(src)
    config = json.loads(contents[CONFIG_MEMBER])
    config = edit(config) or config
    contents[CONFIG_MEMBER] = json.dumps(config).encode()
    return write_zip(dst, contents)


def edit_weights(src, dst, edit):
    """Copies the .keras file with its weights h5 changed by `edit(h5py.File)`."""
    contents = members(src)
    buffer = io.BytesIO(contents[WEIGHTS_MEMBER])
    with h5py.File(buffer, "a") as h5:
        edit(h5)
    contents[WEIGHTS_MEMBER] = buffer.getvalue()
    return write_zip(dst, contents)


def layer_entry(config, name):
    return next(e for e in config["config"]["layers"] if e["config"]["name"] == name)


# -- files that are not .keras files -----------------------------------------------------------


def test_missing_path(tmp_path, new_model):
    path = tmp_path / "nope.keras"
    migrate_fails(path, new_model, ks.SurgeryFileError, r"No such file: '.*nope\.keras'")


def test_directory(tmp_path, new_model):
    migrate_fails(tmp_path, new_model, ks.SurgeryFileError, "Expected a .keras file, got a dir")


def test_random_bytes(tmp_path, new_model):
    path = tmp_path / "noise.keras"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"'.*noise\.keras' is not a \.keras file: expected a zip archive")


def test_truncated_zip(old_path, tmp_path, new_model):
    data = old_path.read_bytes()
    path = tmp_path / "half.keras"
    path.write_bytes(data[: len(data) // 2])
    migrate_fails(path, new_model, ks.SurgeryFileError, r"half\.keras' is not a \.keras file")


def test_zip_without_config(old_path, tmp_path, new_model):
    contents = members(old_path)
    del contents[CONFIG_MEMBER]
    path = write_zip(tmp_path / "noconfig.keras", contents)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"noconfig\.keras' has no config\.json: expected a \.keras archive")


def test_zip_without_weights(old_path, tmp_path, new_model):
    contents = members(old_path)
    del contents[WEIGHTS_MEMBER]
    path = write_zip(tmp_path / "noweights.keras", contents)
    migrate_fails(path, new_model, ks.SurgeryFileError, r"has no model\.weights\.h5")


def test_invalid_json(old_path, tmp_path, new_model):
    contents = members(old_path)
    contents[CONFIG_MEMBER] = contents[CONFIG_MEMBER][:-7]
    path = write_zip(tmp_path / "badjson.keras", contents)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"badjson\.keras': config\.json is not valid JSON")


def test_config_not_an_object(old_path, tmp_path, new_model):
    contents = members(old_path)
    contents[CONFIG_MEMBER] = b"[1, 2, 3]"
    path = write_zip(tmp_path / "list.keras", contents)
    migrate_fails(path, new_model, ks.SurgeryFileError, "config.json must hold a JSON object")


def test_top_class_not_a_model(old_path, tmp_path, new_model):
    def to_layer(config):
        return layer_entry(config, "hidden")

    path = edit_config(old_path, tmp_path / "layer.keras", to_layer)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"layer\.keras': expected a Functional or Sequential model config\. "
                  r"Received: class_name='Dense'")


def test_weights_member_not_hdf5(old_path, tmp_path, new_model):
    contents = members(old_path)
    contents[WEIGHTS_MEMBER] = b"not an hdf5 file" * 100
    path = write_zip(tmp_path / "noth5.keras", contents)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"noth5\.keras': model\.weights\.h5 is not a readable HDF5 file")


def test_legacy_h5_model(tmp_path, new_model):
    path = tmp_path / "legacy.h5"
    mlp().save(path)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"legacy\.h5' is not a \.keras file: .* It is an HDF5 file: a legacy \.h5 model")


def test_unzipped_model_directory(tmp_path, new_model):
    path = tmp_path / "unzipped"
    mlp().save(path, zipped=False)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"got a directory: '.*unzipped'\. It looks like an unzipped Keras model")


def test_npz_weights(tmp_path, new_model):
    from keras.src.saving import saving_lib

    path = tmp_path / "npz.keras"
    saving_lib.save_model(mlp(), path, weights_format="npz")
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"npz\.keras' stores its weights as model\.weights\.npz")


def test_decompression_bomb_refused(old_path, tmp_path, new_model, monkeypatch):
    import keras_surgery.keras_file as keras_file

    contents = members(old_path)
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    # Keras's limits (4 GiB, 1000x) scaled down to this small file's h5, which is mostly zeros.
    monkeypatch.setattr(keras_file, "BOMB_FLOOR_BYTES", 1000)
    monkeypatch.setattr(keras_file, "MAX_EXPANSION", 2)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"bomb\.keras': model\.weights\.h5 declares \d+ bytes but stores only \d+; "
                  "refusing a decompression bomb")


def test_shape_bomb_refused(old_path, tmp_path, new_model, monkeypatch):
    import keras_surgery.keras_file as keras_file

    def unwritten(h5):
        # Declared, chunked and compressed, never written: no bytes stored at all.
        del h5["layers/dense/vars/0"]
        h5["layers/dense/vars"].create_dataset(
            "0", shape=(4, 5), dtype="float32", chunks=(2, 5), compression="gzip"
        )

    path = edit_weights(old_path, tmp_path / "shapebomb.keras", unwritten)
    monkeypatch.setattr(keras_file, "BOMB_FLOOR_BYTES", 10)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"weight 'layers/dense/vars/0' declares 80 bytes but stores next to nothing")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["config"].update(layers="dense"), "model config without layers"),
        (lambda c: c["config"]["layers"].append(7), "malformed layer entry"),
        (lambda c: layer_entry(c, "out").update(inbound_nodes=[3]), "malformed model config"),
        (lambda c: layer_entry(c, "out")["inbound_nodes"][0]["args"][0]["config"].update(
            keras_history=["hidden", "zero", 0]), "malformed model config"),
        (lambda c: layer_entry(c, "out")["inbound_nodes"][0]["args"][0]["config"].update(
            keras_history=["nobody", 0, 0]), "reads tensor .* that no layer produces"),
        (lambda c: layer_entry(c, "obs").update(config={"name": "obs", "batch_shape": 4}),
         "malformed model config"),
        (lambda c: c["config"].update(output_layers=[["out", 0]]),
         "unexpected tensor reference 'out'"),
        (lambda c: c["config"].update(input_layers=[]), "input layer 'obs' is not a model input"),
    ],
    ids=["layers-not-list", "entry-not-dict", "node-not-dict", "history-not-int",
         "unknown-tensor", "shape-not-list", "short-output-ref", "no-inputs"],
)
def test_malformed_config(old_path, tmp_path, new_model, edit, match):
    path = edit_config(old_path, tmp_path / "broken.keras", edit)
    migrate_fails(path, new_model, ks.SurgeryFileError, r"broken\.keras': .*" + match)


def test_deeply_nested_json(old_path, tmp_path, new_model):
    contents = members(old_path)
    contents[CONFIG_MEMBER] = b"[" * 100_000 + b"]" * 100_000
    path = write_zip(tmp_path / "deep.keras", contents)
    migrate_fails(path, new_model, ks.SurgeryFileError, "config.json is not valid JSON")


# -- weights that do not fit the config --------------------------------------------------------


def test_missing_dataset(old_path, tmp_path, new_model):
    def drop_bias(h5):
        del h5["layers/dense/vars/1"]

    path = edit_weights(old_path, tmp_path / "nobias.keras", drop_bias)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"nobias\.keras': the weights of layer 'hidden' \(Dense\) do not match its "
                  r"config: 'layers/dense/vars/1' is missing \(expected shape \(5,\)\)")


def test_missing_layer_group(old_path, tmp_path, new_model):
    def drop_layer(h5):
        del h5["layers/dense_1"]

    path = edit_weights(old_path, tmp_path / "nolayer.keras", drop_layer)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"layer 'out' \(Dense\) do not match its config: "
                  r"'layers/dense_1/vars/0' is missing \(expected shape \(5, 2\)\)")


def test_wrong_shape(old_path, tmp_path, new_model):
    def widen(h5):
        del h5["layers/dense/vars/0"]
        h5["layers/dense/vars"].create_dataset("0", data=np.ones((4, 7), "float32"))

    path = edit_weights(old_path, tmp_path / "shape.keras", widen)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"layer 'hidden' \(Dense\) do not match its config: "
                  r"'layers/dense/vars/0' has shape \(4, 7\), expected \(4, 5\)")


def test_extra_dataset(old_path, tmp_path, new_model):
    def add(h5):
        h5["layers/dense/vars"].create_dataset("2", data=np.ones((5,), "float32"))

    path = edit_weights(old_path, tmp_path / "extra.keras", add)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"'layers/dense/vars/2' is not a variable of this layer")


def test_group_of_another_layer(old_path, tmp_path, new_model):
    def rename(h5):
        h5["layers/dense/vars"].attrs["name"] = "intruder"

    path = edit_weights(old_path, tmp_path / "named.keras", rename)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"weights group 'layers/dense' belongs to layer 'intruder', but the config "
                  r"places layer 'hidden' there")


def test_dataset_where_a_group_belongs(old_path, tmp_path, new_model):
    def flatten(h5):
        del h5["layers/dense/vars"]
        h5["layers/dense"].create_dataset("vars", data=np.ones((4, 5), "float32"))

    path = edit_weights(old_path, tmp_path / "flat.keras", flatten)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"layer 'hidden' \(Dense\) do not match its config: 'layers/dense/vars/0' is "
                  r"missing .* 'layers/dense/vars' is not a variable of this layer")


def test_reference_to_missing_output(old_path, tmp_path, new_model):
    def second_output(config):
        args = layer_entry(config, "out")["inbound_nodes"][0]["args"]
        args[0]["config"]["keras_history"] = ["hidden", 0, 1]

    path = edit_config(old_path, tmp_path / "output1.keras", second_output)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"output1\.keras': layer 'out' reads .*'hidden'")


def test_file_changed_between_plan_and_apply(old_path, tmp_path, new_model):
    plan = ks.ModelMigrator(old_path).plan(new_model)
    before = weights_of(new_model)
    edit_weights(old_path, old_path,
                 lambda h5: _replace(h5, "layers/dense/vars/0", np.ones((4, 6), "float32")))
    # The old file is held open from planning on: written in place since, it is refused.
    with pytest.raises(ks.SurgeryFileError, match=r"old\.keras' changed while it was being read"):
        plan.apply(new_model)
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(new_model)))


def test_file_replaced_between_plan_and_apply_applies_what_was_planned(old_path, tmp_path):
    """A checkpoint replaced by another file (a trainer's `os.replace`) after planning: the
    plan applies the values of the file it was planned from, which it holds open."""
    old = keras.saving.load_model(old_path)
    new = mlp()
    plan = ks.ModelMigrator(old_path).plan(new)
    other = tmp_path / "other.keras"
    edit_weights(old_path, other,
                 lambda h5: _replace(h5, "layers/dense/vars/0", np.ones((4, 5), "float32")))
    os.replace(other, old_path)
    report = plan.apply(new)
    assert report.preserves_function, report.warnings
    for name in ("hidden", "out"):
        for a, b in zip(new.get_layer(name).weights, old.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def _replace(h5, path, value):
    group, _, name = path.rpartition("/")
    del h5[path]
    h5[group].create_dataset(name, data=value)


# -- h5 features Keras refuses -----------------------------------------------------------------


def test_soft_link_refused(old_path, tmp_path, new_model):
    def link(h5):
        del h5["layers/dense/vars/1"]
        h5["layers/dense/vars/1"] = h5py.SoftLink("/layers/dense_1/vars/1")

    path = edit_weights(old_path, tmp_path / "soft.keras", link)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"soft\.keras': model\.weights\.h5 entry 'layers/dense/vars/1' is a SoftLink")
    with KerasFile(path) as f, pytest.raises(ks.SurgeryFileError, match="SoftLink"):
        f.paths()


def test_external_link_refused(old_path, tmp_path, new_model):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as h5:
        h5["bias"] = np.ones((5,), "float32")

    def link(h5):
        del h5["layers/dense/vars/1"]
        h5["layers/dense/vars/1"] = h5py.ExternalLink(os.fspath(outside), "/bias")

    path = edit_weights(old_path, tmp_path / "external.keras", link)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"entry 'layers/dense/vars/1' is a ExternalLink; only plain datasets")


def test_external_dataset_refused(old_path, tmp_path, new_model):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.ones((5,), "float32").tobytes())

    def external(h5):
        del h5["layers/dense/vars/1"]
        h5["layers/dense/vars"].create_dataset(
            "1", shape=(5,), dtype="float32", external=[(os.fspath(raw), 0, 20)]
        )

    path = edit_weights(old_path, tmp_path / "extdata.keras", external)
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"entry 'layers/dense/vars/1' is an external dataset")


# -- feature specs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"old_features": {"obz": ["a", "b", "c", "d"]}},
         r"Feature spec for '.*old\.keras' names input\(s\) \['obz'\] that the model does not "
         r"have\. Expected input names: \['obs'\]"),
        ({"new_features": {"obz": ["a", "b", "c", "d"]}},
         r"Feature spec for the new model names input\(s\) \['obz'\]"),
        ({"old_features": {"obs": ["a", ("b", 2)]}},
         r"Features of input 'obs' of '.*old\.keras' cover 3 column\(s\) but the input's last "
         r"axis has 4"),
        ({"new_features": {"obs": ["a", "b", "c", "d", "e"]}},
         r"Features of input 'obs' of the new model cover 5 column\(s\) but .* has 4"),
        ({"new_features": {"obs": ["a", "b", "a", "d"]}},
         r"Feature name 'a' appears twice in input 'obs' of the new model"),
        ({"new_features": {"obs": "abcd"}},
         r"Features of input 'obs' of the new model must be a list of names or \(name, width\) "
         r"pairs\. Received: 'abcd'"),
        ({"old_features": {"obs": 4}}, r"Features of input 'obs' of '.*old\.keras' must be a list"),
        ({"new_features": ["a", "b", "c", "d"]},
         r"Feature spec for the new model must be a mapping from input name to a list of "
         r"features, .* Received: list"),
        ({"new_features": {"obs": ["a", ("b", 0), "c"]}},
         r"Feature 'b' of input 'obs' of the new model must have width >= 1\. Received: width=0"),
        ({"new_features": {"obs": ["a", ("b", 1.5), "c"]}},
         r"Feature entry of input 'obs' of the new model must be a name or a \(name, width\) "
         r"pair\. Received: \('b', 1\.5\)"),
        ({"new_features": {"obs": ["a", "", "c", "d"]}},
         r"Feature names of input 'obs' of the new model must be non-empty strings"),
        ({"new_features": {7: ["a"], "x": ["b"]}}, r"names input\(s\) \[7, 'x'\]"),
    ],
    ids=["old-unknown-input", "new-unknown-input", "old-widths", "new-widths", "duplicate",
         "string-not-list", "int-not-list", "list-not-mapping", "zero-width", "float-width",
         "empty-name", "mixed-key-types"],
)
def test_bad_feature_spec(old_path, new_model, kwargs, match):
    migrate_fails(old_path, new_model, ks.FeatureSpecError, match, **kwargs)


def test_numpy_integer_widths_are_accepted(old_path, new_model):
    spec = {"obs": ["a", ("b", np.int64(2)), "c"]}
    report = ks.migrate_weights(old_path, new_model, old_features=spec, new_features=spec)
    assert report.preserves_function


# -- wrong kinds of arguments ------------------------------------------------------------------


def test_unbuilt_new_model(old_path):
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    migrate_fails(old_path, unbuilt, ks.SurgeryError,
                  r"Model 'sequential.*' is not built: call it on data or build it")


def test_old_of_wrong_type(new_model):
    migrate_fails(12, new_model, ks.SurgeryError,
                  r"Expected a path to a \.keras file or a keras\.Model\. Received: int")


def test_new_model_of_wrong_type(old_path):
    with pytest.raises(ks.SurgeryError, match=r"or a keras\.Model\. Received: float"):
        ks.migrate_weights(old_path, 2.5)


# -- layers whose code is not in the file ------------------------------------------------------


def lambda_model():
    x = keras.Input((4,), name="obs")
    h = L.Dense(5, name="hidden")(x)
    h = L.Lambda(lambda t: t * 2.0, name="double")(h)
    return keras.Model(x, L.Dense(2, name="out")(h))


def test_lambda_layer_is_read_as_data(tmp_path):
    path = tmp_path / "lambda.keras"
    lambda_model().save(path)
    with KerasFile(path) as f:
        node = f.graph().layers["double"]
        assert node.class_name == "Lambda" and node.weights == []
    report = ks.migrate_weights(path, lambda_model())
    assert any("'double'" in w and "Lambda" in w for w in report.warnings), report.warnings
    with pytest.raises(ks.UnsupportedLayerError, match=r"layer 'double' of class Lambda"):
        ks.migrate_weights(path, lambda_model(), strict=True)


@keras.saving.register_keras_serializable(package="ks_bad_input")
class Gain(keras.layers.Layer):
    """A custom layer: one gain per feature."""

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gain")

    def call(self, x):
        return x * self.gain


def gain_model():
    x = keras.Input((4,), name="obs")
    h = Gain(name="gain")(L.Dense(5, name="hidden")(x))
    return keras.Model(x, L.Dense(2, name="out")(h))


@pytest.mark.parametrize("module", ["no_such_module_for_ks_tests", "ks_bad_input_trap"])
def test_custom_class_is_never_imported(tmp_path, monkeypatch, module):
    # A module that exists and would announce its import, and one that does not exist.
    marker = tmp_path / "imported.txt"
    (tmp_path / "ks_bad_input_trap.py").write_text(
        f"open({os.fspath(marker)!r}, 'w').write('imported')\n"
    )
    monkeypatch.syspath_prepend(os.fspath(tmp_path))
    original = tmp_path / "gain.keras"
    old_model = gain_model()
    gains = np.array([0.5, 1.5, 2.0, -1.0, 3.0], "float32")
    old_model.get_layer("gain").gain.assign(gains)
    old_model.save(original)

    def relocate(config):
        layer_entry(config, "gain")["module"] = module

    path = edit_config(original, tmp_path / "moved.keras", relocate)
    with KerasFile(path) as f:
        node = f.graph().layers["gain"]
        assert node.cls is None and node.module == module
        assert [w.shape for w in node.weights] == [(5,)]
    new = gain_model()
    report = ks.migrate_weights(path, new)
    assert any("'gain'" in w and "Gain" in w for w in report.warnings), report.warnings
    # Opaque, but its weight is matched by store path and shape-identical: copied.
    assert np.array_equal(new.get_layer("gain").gain.numpy(), gains)
    with pytest.raises(ks.UnsupportedLayerError, match=r"layer 'gain' of class Gain"):
        ks.migrate_weights(path, gain_model(), strict=True)
    assert module not in sys.modules
    assert not marker.exists(), "the file's module was imported"


# -- old weights of other dtypes, NaN and Inf --------------------------------------------------


def typed_mlp(dtype, width=4):
    x = keras.Input((width,), name="obs")
    h = L.Dense(5, activation="relu", name="hidden", dtype=dtype)(x)
    return keras.Model(x, L.Dense(2, name="out", dtype=dtype)(h))


def _values(model):
    return {(layer.name, v.path.rsplit("/", 1)[-1]): np.asarray(v.numpy())
            for layer in model.layers for v in layer.weights}


@pytest.mark.parametrize("source", ["file", "live"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_old_weights_of_another_float_dtype_are_cast(tmp_path, dtype, source):
    old = typed_mlp(dtype)
    rng = np.random.default_rng(0)
    for v in old.weights:
        v.assign(rng.normal(size=v.shape))
    expected = {key: value.astype("float32") for key, value in _values(old).items()}
    if source == "file":
        old.save(tmp_path / f"{dtype}.keras")
        old = tmp_path / f"{dtype}.keras"
    new = mlp(width=5)  # float32, one more input column
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    got = _values(new)
    assert all(v.dtype == np.float32 for v in got.values())
    np.testing.assert_array_equal(got[("hidden", "kernel")][:4], expected[("hidden", "kernel")])
    np.testing.assert_array_equal(got[("hidden", "kernel")][4], np.zeros(5, "float32"))
    for key in [("hidden", "bias"), ("out", "kernel"), ("out", "bias")]:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=str(key))


@pytest.mark.parametrize("dtype", ["int8", "int32", "int64", "uint16", "bool"])
def test_integer_old_weights_are_cast(old_path, tmp_path, new_model, dtype):
    values = np.arange(20).reshape(4, 5) % 7 - 3  # -3 .. 3
    kernel = (values > 0 if dtype == "bool" else values % 7 if dtype[0] == "u" else values)
    kernel = kernel.astype(dtype)
    path = edit_weights(old_path, tmp_path / f"{dtype}.keras",
                        lambda h5: _replace(h5, "layers/dense/vars/0", kernel))
    report = ks.migrate_weights(path, new_model)
    assert report.preserves_function
    got = new_model.get_layer("hidden").kernel.numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, kernel.astype("float32"))


@pytest.mark.parametrize(
    "value, match",
    [
        (np.array([[b"abc"] * 5] * 4), r"is stored as \|S3, not as numbers"),
        (np.ones((4, 5), "complex64"), r"is stored as complex64, not as numbers"),
        (np.zeros((4, 5), [("a", "<f4"), ("b", "<i4")]), r"is stored as \[\('a', '<f4'\), "),
        (np.zeros((4, 5), "V4"), r"holds values of type \|V4, not real numbers"),
    ],
    ids=["strings", "complex", "records", "opaque"],
)
def test_old_weights_that_are_not_numbers(old_path, tmp_path, new_model, value, match):
    path = edit_weights(old_path, tmp_path / "typed.keras",
                        lambda h5: _replace(h5, "layers/dense/vars/0", value))
    migrate_fails(path, new_model, ks.SurgeryFileError,
                  r"typed\.keras': weight 'layers/dense/vars/0' " + match)


def test_nan_and_inf_old_weights_are_copied_with_a_warning(old_path, tmp_path, new_model):
    kernel = np.ones((4, 5), "float32")
    kernel[1, 2] = np.nan
    bias = np.ones(2, "float32")
    bias[0] = -np.inf

    def poison(h5):
        _replace(h5, "layers/dense/vars/0", kernel)
        _replace(h5, "layers/dense_1/vars/1", bias)

    path = edit_weights(old_path, tmp_path / "nan.keras", poison)
    report = ks.migrate_weights(path, new_model)
    assert report.warnings == [
        "layer 'hidden': old weight 'kernel' holds NaN or Inf values; they were copied as they "
        "are.",
        "layer 'out': old weight 'bias' holds NaN or Inf values; they were copied as they are.",
    ]
    np.testing.assert_array_equal(new_model.get_layer("hidden").kernel.numpy(), kernel)
    np.testing.assert_array_equal(new_model.get_layer("out").bias.numpy(), bias)


@pytest.mark.parametrize("source", ["file", "live"])
def test_nan_in_bfloat16_old_weights_is_reported(tmp_path, source):
    old = typed_mlp("bfloat16")
    kernel = np.ones((4, 5), "float32")
    kernel[0, 0] = np.nan
    old.get_layer("hidden").kernel.assign(kernel)
    if source == "file":
        old.save(tmp_path / "bf16.keras")
        old = tmp_path / "bf16.keras"
    report = ks.migrate_weights(old, mlp())
    assert "layer 'hidden': old weight 'kernel' holds NaN or Inf values; they were copied as " \
        "they are." in report.warnings


def test_nan_old_weights_are_reported_file_to_file(old_path, tmp_path):
    kernel = np.ones((4, 5), "float32")
    kernel[3, 4] = np.inf
    src = edit_weights(old_path, tmp_path / "inf.keras",
                       lambda h5: _replace(h5, "layers/dense/vars/0", kernel))
    new = mlp()
    new.save(tmp_path / "template.keras")
    plan = ks.ModelMigrator(old_path).plan(new)
    result = plan.apply_file(src, tmp_path / "out.keras", template=tmp_path / "template.keras")
    assert "layer 'hidden': old weight 'kernel' holds NaN or Inf values; they were copied as " \
        "they are." in result["warnings"]


# -- zip members that point outside the archive ------------------------------------------------


def _all_files(root):
    return {p for p in Path(root).rglob("*")}


@pytest.mark.parametrize(
    "names",
    [["../escaped.txt"], ["../../escaped.txt", "sub/../../escaped.txt"], ["..\\escaped.txt"],
     ["ABSOLUTE"], ["../config.json", "../model.weights.h5"]],
    ids=["parent", "grandparent", "backslash", "absolute", "shadowing-members"],
)
def test_member_names_that_climb_out_are_never_extracted(old_path, tmp_path, monkeypatch, names):
    # Nothing is ever extracted: members are read in memory (config.json) or in place (the
    # weights). Run from a nested folder so that `..` and `../..` land inside tmp_path.
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    absolute = tmp_path / "absolute-escaped.txt"
    contents = members(old_path)
    for name in names:
        contents[os.fspath(absolute) if name == "ABSOLUTE" else name] = b"payload"
    path = write_zip(work / "climb.keras", contents)
    new = mlp()
    new.save(work / "template.keras")
    before = _all_files(tmp_path)

    report = ks.migrate_weights(path, new)
    assert report.preserves_function
    ks.phi_table(path)
    plan = ks.ModelMigrator(path).plan(new)
    plan.apply_file(path, work / "out.keras", template=work / "template.keras")

    assert _all_files(tmp_path) - before == {work / "out.keras"}
    assert not absolute.exists()
    with zipfile.ZipFile(work / "out.keras") as archive:  # nor copied into the new file
        assert sorted(archive.namelist()) == [CONFIG_MEMBER, "metadata.json", WEIGHTS_MEMBER]


# -- an old model that has nothing to do with the new one --------------------------------------


def unrelated_model():
    x = keras.Input((3,), name="state")
    h = L.Dense(7, activation="tanh", name="policy")(x)
    return keras.Model(x, L.Dense(2, name="value")(h))


@pytest.mark.parametrize("source", ["file", "live"])
def test_unrelated_old_model_is_refused(tmp_path, new_model, source):
    old = unrelated_model()
    what = r"model 'functional.*'"
    if source == "file":
        old.save(tmp_path / "other.keras")
        old, what = tmp_path / "other.keras", r"'.*other\.keras'"
    migrate_fails(
        old, new_model, ks.SurgeryError,
        what + r" and model '.*' have nothing in common: no layer matched and no weight value "
        r"was copied\. Layers are matched by name \(auto-generated names such as 'dense_3' by "
        r"an alignment of the two graphs\) and input columns by feature name\. Check that "
        r"the old model is the one the new model was made from, or pass allow_unrelated=True "
        r"to keep the new model's initial values\.",
    )
    with pytest.raises(ks.SurgeryError, match="have nothing in common"):
        ks.ModelMigrator(old).plan(new_model)

    before = weights_of(new_model)
    report = ks.migrate_weights(old, new_model, allow_unrelated=True)
    assert not report.preserves_function
    assert any("have nothing in common" in w and "allow_unrelated=True: the new model keeps its "
               "initial values." in w for w in report.warnings), report.warnings
    assert report.totals["copied"] == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(new_model)))


def test_related_model_with_nothing_to_copy_is_not_unrelated(tmp_path):
    # An old model without weights has nothing to copy, but nothing contradicts the new one.
    x = keras.Input((4,), name="obs")
    old = keras.Model(x, L.Activation("relu", name="act")(x))
    report = ks.migrate_weights(old, mlp())
    assert report.totals["copied"] == 0


# -- a failed file-to-file migration leaves nothing behind -------------------------------------


def _corrupt_chunk(src, dst, dataset):
    """A copy of `src` whose `dataset` is stored compressed, with its stored bytes damaged:
    the file lists fine, and reading that one weight fails."""
    def recompress(h5):
        value = h5[dataset][()]
        group, _, name = dataset.rpartition("/")
        del h5[dataset]
        h5[group].create_dataset(name, data=value, chunks=value.shape, compression="gzip",
                                 fletcher32=True)

    edit_weights(src, dst, recompress)
    contents = members(dst)
    blob = bytearray(contents[WEIGHTS_MEMBER])
    with h5py.File(io.BytesIO(bytes(blob)), "r") as h5:
        chunk = h5[dataset].id.get_chunk_info(0)
    for k in range(chunk.size // 4, chunk.size // 2):
        blob[chunk.byte_offset + k] ^= 0xFF
    contents[WEIGHTS_MEMBER] = bytes(blob)
    return write_zip(dst, contents)


def test_failed_file_to_file_migration_leaves_no_stray_files(old_path, tmp_path):
    new = mlp(width=6)
    template = tmp_path / "template.keras"
    new.save(template)
    plan = ks.ModelMigrator(old_path).plan(new)
    # The last weight written is damaged, so the temporary h5 holds the others when it fails.
    src = _corrupt_chunk(old_path, tmp_path / "damaged.keras", "layers/dense_1/vars/1")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "ckpt.keras").write_bytes(b"the previous checkpoint")

    with pytest.raises(ks.SurgeryFileError,
                       match=r"damaged\.keras': could not read weight 'layers/dense_1/vars/1'"):
        plan.apply_file(src, out_dir / "ckpt.keras", template=template)
    assert os.listdir(out_dir) == ["ckpt.keras"]
    assert (out_dir / "ckpt.keras").read_bytes() == b"the previous checkpoint"

    with pytest.raises(ks.SurgeryFileError, match="could not read weight"):
        ks.migrate_folder(plan, tmp_path, out_dir, template=template, pattern="damaged.keras",
                          verbose=False)
    assert os.listdir(out_dir) == ["ckpt.keras"]


@pytest.mark.parametrize("where", ["missing-folder", "disk-full"])
def test_unwritable_output_is_a_clean_error(old_path, tmp_path, monkeypatch, where):
    new = mlp()
    template = tmp_path / "template.keras"
    new.save(template)
    plan = ks.ModelMigrator(old_path).plan(new)
    out_dir = tmp_path / "out"
    out = out_dir / "nowhere" / "ckpt.keras"
    if where == "disk-full":
        import errno

        out_dir.mkdir()
        out = out_dir / "ckpt.keras"

        def no_space(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(zipfile.ZipFile, "write", no_space)
    with pytest.raises(ks.SurgeryFileError,
                       match=r"Writing '.*ckpt\.keras' failed: .*\. Nothing was written"):
        plan.apply_file(old_path, out, template=template)
    if out_dir.exists():
        assert os.listdir(out_dir) == []
