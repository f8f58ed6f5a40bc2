"""Regression tests of issue 15's crash list and of the fuzzer's findings: each failed before
its fix (a bare Python error, an interrupt that misreported the model's state, a quadratic
order) and must keep passing."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery import cli
from keras_surgery import stream as stream_module
from keras_surgery.graph import _by_depth
from tests.util import assert_input_sensitive, predict, preservation_bound, randomize


def _mlp(n_in=4, width=6, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((n_in,), name="obs")
    h = keras.layers.Dense(width, activation="relu", name="hidden")(x)
    return keras.Model(x, keras.layers.Dense(2, name="out")(h))


def _values(model):
    return [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in model.weights]


def _rewrite_config(src, dst, edit):
    with zipfile.ZipFile(src) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


# -- class names that name a function or a module --------------------------------------------


@pytest.mark.parametrize("module,class_name,kind", [
    ("keras.activations", "relu", "function"), ("keras", "layers", "module"),
    ("keras.layers", "Input", "function"), ("keras.src.layers", "core", "module"),
])
def test_a_class_name_that_is_no_class_is_a_file_error(tmp_path, capsys, module, class_name,
                                                        kind):
    _mlp().save(tmp_path / "old.keras")
    bad = tmp_path / "bad.keras"

    def edit(config):
        entry = config["config"]["layers"][-1]  # the "out" Dense
        entry["module"], entry["class_name"] = module, class_name

    _rewrite_config(tmp_path / "old.keras", bad, edit)
    expected = (f"layer 'out': class_name '{class_name}' of module '{module}' names a {kind}, "
                "not a class")
    with pytest.raises(ks.SurgeryFileError, match=expected):
        ks.phi_table(bad)
    new = _mlp(seed=3)
    before = _values(new)
    with pytest.raises(ks.SurgeryFileError, match=expected):
        ks.migrate_weights(bad, new)
    for a, b in zip(_values(new), before):
        np.testing.assert_array_equal(a, b)
    assert cli.main(["phi", str(bad)]) == 2  # one line, no traceback: exit 2, not 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err


# -- interrupts: the model is as it was, or fully migrated, and the message says which -------


def _migration(tmp_path):
    old = _mlp()
    randomize(old, None, seed=4)
    old.save(tmp_path / "old.keras")
    spec = {"old_features": {"obs": list("abcd")}, "new_features": {"obs": list("abxcd")}}
    reference = _mlp(5, 8, seed=1)
    ks.migrate_weights(tmp_path / "old.keras", reference, **spec)
    return tmp_path / "old.keras", spec, _values(reference)


def test_an_interrupt_while_the_journal_closes_leaves_a_finished_migration(tmp_path,
                                                                          monkeypatch):
    path, spec, migrated = _migration(tmp_path)
    real_close = stream_module.Journal.close
    calls = []

    def interrupted_close(self, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_close(self, **kwargs)

    monkeypatch.setattr(stream_module.Journal, "close", interrupted_close)
    new = _mlp(5, 8, seed=1)
    with pytest.raises(KeyboardInterrupt) as caught:
        ks.migrate_weights(path, new, **spec)
    assert any("the migration finished (every variable holds its new value)" in note
               for note in caught.value.__notes__)
    for got, want in zip(_values(new), migrated):
        np.testing.assert_array_equal(got, want)  # fully migrated, not half undone


def test_an_interrupt_while_layers_are_finalized_finishes_the_migration(tmp_path, monkeypatch):
    path, spec, migrated = _migration(tmp_path)
    real_finalize = stream_module.finalize_layers
    calls = []

    def interrupted_finalize(model, variables):
        calls.append(len(variables))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_finalize(model, variables)

    monkeypatch.setattr(stream_module, "finalize_layers", interrupted_finalize)
    new = _mlp(5, 8, seed=1)
    with pytest.raises(KeyboardInterrupt) as caught:
        ks.migrate_weights(path, new, **spec)
    assert any("the interrupt came after the last write: the migration finished" in note
               for note in caught.value.__notes__)
    assert calls == [4, 4]  # finalized again, over every variable written
    for got, want in zip(_values(new), migrated):
        np.testing.assert_array_equal(got, want)


def test_an_interrupt_mid_migration_says_the_model_is_as_it_was(tmp_path, monkeypatch):
    path, spec, migrated = _migration(tmp_path)
    new = _mlp(5, 8, seed=1)
    before = _values(new)
    victim = new.get_layer("out").kernel  # written after the small biases
    real_assign = victim.assign

    def interrupted(value, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(victim, "assign", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        ks.migrate_weights(path, new, **spec)
    monkeypatch.setattr(victim, "assign", real_assign)
    assert any("interrupted at weight 'layers/dense_1/vars/0' of layer 'out' and undone: every "
               "variable "
               "written was restored, the model is as it was" in note
               for note in caught.value.__notes__), caught.value.__notes__
    for got, want in zip(_values(new), before):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(migrated, before))  # would change


def test_a_second_interrupt_while_undoing_does_not_stop_the_undo():
    class Var:
        def __init__(self):
            self.value, self.fail = None, 1

        def assign(self, value):
            if self.fail:
                self.fail -= 1
                raise KeyboardInterrupt
            self.value = value

    journal = stream_module.Journal()
    a, b = Var(), Var()
    journal.save(a, np.ones(3))
    journal.save(b, np.zeros(2))
    restored, failed = journal.restore()
    assert restored == [b, a] and failed == []
    np.testing.assert_array_equal(a.value, np.ones(3))


# -- a Lambda inside a nested Sequential ------------------------------------------------------


def _with_nested_lambda(width):
    inner = keras.Sequential([keras.Input((4,)),
                              keras.layers.Lambda(lambda t: t * 2.0 - 1.0, name="affine"),
                              keras.layers.Dense(width, activation="tanh", name="d1")],
                             name="inner")
    x = keras.Input((4,), name="obs")
    return keras.Model(x, keras.layers.Dense(2, name="out")(inner(x)))


def test_a_lambda_inside_a_nested_sequential_is_labelled_from_its_shape(tmp_path):
    keras.utils.set_random_seed(5)
    old = _with_nested_lambda(6)
    randomize(old, None, seed=6)
    rng = np.random.default_rng(7)
    x, x2 = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
    assert_input_sensitive(old, x, x2)
    old.save(tmp_path / "old.keras", zipped=True)
    reference = predict(old, x)
    for source in (old, tmp_path / "old.keras"):
        new = _with_nested_lambda(9)
        report = ks.migrate_weights(source, new)
        assert report.preserves_function, report.warnings
        assert any("'inner/affine' (Lambda)" in w for w in report.warnings)
        diff = float(np.max(np.abs(predict(new, x) - reference)))
        assert diff <= preservation_bound(reference), diff
        kernel = keras.ops.convert_to_numpy(new.get_layer("inner").get_layer("d1").kernel)
        old_kernel = old.get_layer("inner").get_layer("d1").kernel
        np.testing.assert_array_equal(kernel[:, :6], keras.ops.convert_to_numpy(old_kernel))


# -- the order of calls: linear, by depth, and right on a DAG --------------------------------


def _round_by_round(deps):
    order, done, remaining = [], set(), list(deps)
    while remaining:
        ready = [c for c in remaining if deps[c] <= done]
        order.extend(ready)
        done.update(ready)
        remaining = [c for c in remaining if c not in done]
    return order


@pytest.mark.parametrize("seed", range(5))
def test_calls_are_ordered_by_depth_on_a_random_dag(seed):
    rng = np.random.default_rng(seed)
    n = 60
    names = [f"l{i}" for i in rng.permutation(n)]  # config order is not the DAG's order
    rank = {name: i for i, name in enumerate(rng.permutation(names))}
    deps = {}
    for name in names:
        earlier = [m for m in names if rank[m] < rank[name]]
        picks = rng.choice(len(earlier), size=min(len(earlier), 3), replace=False) \
            if earlier else []
        deps[(name, 0)] = {(earlier[int(i)], 0) for i in picks}
    order = _by_depth(deps, "dag")
    assert order == _round_by_round(deps)  # the order the rest of the package was built on
    place = {call: i for i, call in enumerate(order)}
    assert sorted(place) == sorted(deps)
    for call, needed in deps.items():
        assert all(place[p] < place[call] for p in needed)


def test_a_cycle_is_named():
    deps = {("a", 0): set(), ("b", 0): {("c", 0)}, ("c", 0): {("b", 0)}, ("d", 0): {("a", 0)}}
    with pytest.raises(ks.SurgeryFileError, match=r"'x': the layer graph has a cycle: layer "
                                                  r"'b' and 1 other call\(s\)"):
        _by_depth(deps, "'x'")


# -- findings of the structure-aware fuzzer ----------------------------------------------------


def test_a_layer_entry_given_twice_is_a_file_error(tmp_path):
    """Fuzz finding (config_struct, a layer twice): an InputLayer listed twice became a second
    model input of one name, and phi_table failed with a bare IndexError."""
    _mlp().save(tmp_path / "old.keras")
    bad = tmp_path / "bad.keras"

    def edit(config):
        layers = config["config"]["layers"]
        layers.append(json.loads(json.dumps(layers[0])))  # the "obs" input, again

    _rewrite_config(tmp_path / "old.keras", bad, edit)
    with pytest.raises(ks.SurgeryFileError,
                       match=r"bad\.keras': layer name 'obs' appears twice in one model config"):
        ks.phi_table(bad)
    with pytest.raises(ks.SurgeryFileError, match="appears twice"):
        ks.migrate_weights(bad, _mlp(seed=2))


# -- an input declared huge in a small file ----------------------------------------------------


@pytest.mark.parametrize("shape", [[None, 2**26], [None, 2**22], [None, 2**4, 2**18],
                                   [None, 2**17 + 1, 2**17]])
def test_an_input_declared_huge_is_refused_before_it_is_labelled(tmp_path, shape):
    """17 KB declaring an input [None, 2**26] used to take 23 GB (phi table): the inputs'
    declared indices are budgeted, and the error names the setting that raises the budget."""
    x = keras.Input((3,), name="obs")
    keras.Model(x, keras.layers.Activation("relu", name="a")(x)).save(tmp_path / "small.keras")

    def declare(config):
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "InputLayer":
                layer["config"]["batch_shape"] = shape
    _rewrite_config(tmp_path / "small.keras", tmp_path / "bomb.keras", declare)
    assert (tmp_path / "bomb.keras").stat().st_size < 64 << 10
    with pytest.raises(ks.SurgeryFileError, match="MAX_FILE_INPUT_INDICES"):
        ks.phi_table(tmp_path / "bomb.keras")
    x = keras.Input(tuple(shape[1:]), name="obs")
    new = keras.Model(x, keras.layers.Activation("relu", name="a")(x))
    with pytest.raises(ks.SurgeryFileError, match="obs"):
        ks.migrate_weights(tmp_path / "bomb.keras", new)


def test_a_member_compressed_as_keras_never_does_is_refused(tmp_path):
    """zipfile decompresses bzip2 and lzma without bounding the output (a 19 KB lineage record
    expanded to 4 GB): only members stored or deflated, as Keras writes them, are read."""
    from keras_surgery.lineage import LINEAGE_MEMBER

    model = _mlp()
    model.save(tmp_path / "plain.keras")
    with zipfile.ZipFile(tmp_path / "plain.keras") as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    with zipfile.ZipFile(tmp_path / "bz.keras", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(LINEAGE_MEMBER, b"{}", compress_type=zipfile.ZIP_BZIP2)
    with pytest.raises(ks.SurgeryFileError, match=f"{LINEAGE_MEMBER} is compressed with method"):
        ks.migrate_weights(tmp_path / "bz.keras", _mlp(seed=1))


# -- config values that make the reader allocate: budgets before allocation --------------------


def _normalized_mlp(seed=0):
    """obs -> Normalization (fixed mean and variance) -> Masking -> Dense."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="obs")
    h = keras.layers.Normalization(mean=[0.5, 1.0, -2.0, 3.0], variance=[2.0, 1.0, 0.5, 4.0],
                                   name="norm")(x)
    h = keras.layers.Masking(mask_value=0.0, name="mask")(h)
    return keras.Model(x, keras.layers.Dense(2, name="out")(h))


def _lambdas(seed=0):
    """A Sequential whose last layers have no rule, so their shapes come from build_config."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="d1"),
                             keras.layers.Lambda(lambda t: t * 2.0, name="lam"),
                             keras.layers.Lambda(lambda t: t * 3.0, name="lam2")], name="seq")


def _entry(config, name):
    return next(e for e in config["config"]["layers"] if e["config"].get("name") == name)


def _broadcast_bomb(config):  # 2**24 + 4096 elements, mean and variance each (+140 MB before)
    norm = _entry(config, "norm")
    norm["config"].update(mean=0.5, variance=2.0, axis=[1, 2])
    norm["build_config"]["input_shape"] = [None, 2**12, 2**12 + 1]


def _dtype_bomb(config):  # every element of the mask value 128 MB (2 GB: "(1024,1024,255)f8")
    mask = _entry(config, "mask")
    mask["build_config"] = {"input_shape": [None, 4]}
    mask["config"]["mask_value"] = {"class_name": "__numpy__",
                                    "config": {"value": 0.0, "dtype": "(1024,1024,16)f8"}}


def _string_bomb(config):  # 2**27 bytes an element
    _dtype_bomb(config)
    _entry(config, "mask")["config"]["mask_value"]["config"].update(value="a",
                                                                    dtype=f"S{2**27}")


def _declared_tensor_bomb(config):  # the tensor lam2 is called on, declared wide
    _entry(config, "lam2")["inbound_nodes"][0]["args"][0]["config"]["shape"] = [None, 2**20 + 1]


def _declared_build_bomb(config):  # a Sequential layer's build_config: the shape it reads
    _entry(config, "lam2")["build_config"] = {"input_shape": [None, 2**20 + 1]}


def _functional_lambdas(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="obs")
    h = keras.layers.Lambda(lambda t: t * 2.0, name="lam")(keras.layers.Dense(4, name="d1")(x))
    h = keras.layers.Lambda(lambda t: t * 3.0, name="lam2")(h)
    return keras.Model(x, keras.layers.Dense(2, name="out")(h))


@pytest.mark.parametrize("make,edit,layer,constant", [
    (_normalized_mlp, _broadcast_bomb, "norm", "MAX_BUILD_ELEMENTS"),
    (_normalized_mlp, _dtype_bomb, "mask", "MAX_CONFIG_ITEMSIZE"),
    (_normalized_mlp, _string_bomb, "mask", "MAX_CONFIG_ITEMSIZE"),
    (_functional_lambdas, _declared_tensor_bomb, "lam2", "MAX_FILE_TENSOR_INDICES"),
    (_lambdas, _declared_build_bomb, "lam2", "MAX_FILE_TENSOR_INDICES"),
])
def test_config_values_that_would_allocate_are_refused_first(tmp_path, capsys, make, edit,
                                                              layer, constant):
    """A few KB of config.json made the reader allocate before anything was refused: a
    Normalization's fixed mean broadcast to its build_config shape (2**28 elements: 2.7 GB,
    7.6 s), a Masking `__numpy__` value whose dtype makes each element gigabytes (killed at
    6 GB), a declared tensor labelled index by index (2**24 indices: killed at 4 GB after
    90 s). Each is refused before allocation, naming the layer and the setting to raise."""
    make().save(tmp_path / "old.keras")
    _rewrite_config(tmp_path / "old.keras", tmp_path / "bomb.keras", edit)
    assert (tmp_path / "bomb.keras").stat().st_size < 64 << 10
    expected = rf"bomb\.keras': layer '{layer}'.*keras_surgery\.budgets\.{constant}"
    with pytest.raises(ks.SurgeryFileError, match=expected):
        ks.phi_table(tmp_path / "bomb.keras")
    new = make(seed=2)
    before = _values(new)
    with pytest.raises(ks.SurgeryFileError, match=expected):
        ks.migrate_weights(tmp_path / "bomb.keras", new)
    for a, b in zip(_values(new), before):
        np.testing.assert_array_equal(a, b)
    assert cli.main(["phi", str(tmp_path / "bomb.keras")]) == 2
    assert constant in capsys.readouterr().err


def test_long_lists_in_a_deflated_config_are_refused_first(tmp_path):
    """A 41 KB file whose deflated config.json holds a Normalization mean and variance of ten
    million numbers each ran past 90 s (Keras tracks every element of a list it is given;
    2**20 of each: 9 s, +380 MB): the lists of a file's configs are budgeted."""
    _normalized_mlp().save(tmp_path / "old.keras")
    with zipfile.ZipFile(tmp_path / "old.keras") as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(members["config.json"])
    n = 2**19 + 1  # mean and variance: just past MAX_CONFIG_ELEMENTS = 2**20 in all
    _entry(config, "norm")["config"].update(mean=[0] * n, variance=[1] * n)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "lists.keras", "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert (tmp_path / "lists.keras").stat().st_size < 64 << 10
    with pytest.raises(ks.SurgeryFileError,
                       match=r"layer 'norm'.*keras_surgery\.budgets\.MAX_CONFIG_ELEMENTS"):
        ks.phi_table(tmp_path / "lists.keras")


def test_config_values_within_the_budgets_still_read(tmp_path, monkeypatch):
    """The budgets refuse only what exceeds them: a Masking value stored as Keras stores an
    array, a fixed-mean Normalization and a wide Lambda input are read, and migrate exactly;
    a budget raised through its constant admits what it refused."""
    from keras_surgery import budgets

    old = _normalized_mlp()
    randomize(old, None, seed=4)
    old.save(tmp_path / "old.keras")

    def numpy_mask(config):
        _entry(config, "mask")["build_config"] = {"input_shape": [None, 4]}
        _entry(config, "mask")["config"]["mask_value"] = {
            "class_name": "__numpy__", "config": {"value": [0.0], "dtype": "float32"}}

    _rewrite_config(tmp_path / "old.keras", tmp_path / "ok.keras", numpy_mask)
    rng = np.random.default_rng(0)
    x, x2 = (rng.normal(size=(16, 4)).astype("float32") for _ in range(2))
    assert_input_sensitive(old, x, x2)
    new = _normalized_mlp(seed=2)
    report = ks.migrate_weights(tmp_path / "ok.keras", new)
    assert report.preserves_function
    for a, b in zip(_values(new), _values(old)):
        np.testing.assert_array_equal(a, b)  # every weight copied
    reference = predict(old, x)
    assert np.max(np.abs(predict(new, x) - reference)) <= preservation_bound(reference)

    _lambdas().save(tmp_path / "seq.keras")
    _rewrite_config(tmp_path / "seq.keras", tmp_path / "wide.keras", _declared_build_bomb)
    monkeypatch.setattr(budgets, "MAX_FILE_TENSOR_INDICES", 2**19)
    with pytest.raises(ks.SurgeryFileError, match="at most 524288 are accepted"):
        ks.phi_table(tmp_path / "wide.keras")
    edited = tmp_path / "narrow.keras"
    _rewrite_config(tmp_path / "seq.keras", edited, lambda c: _entry(c, "lam2").update(
        build_config={"input_shape": [None, 2**10]}))
    monkeypatch.setattr(budgets, "MAX_FILE_TENSOR_INDICES", 2**10)
    ks.phi_table(edited)  # exactly at the budget


# -- the total label budget of a side read from a file ---------------------------------------


def _repeated(n=3, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="obs")
    h = keras.layers.Dense(3, name="hidden")(x)
    rep = keras.layers.RepeatVector(n, name="rep")(h)
    return keras.Model(x, keras.layers.Dense(2, name="out")(rep))


def _repeat_bomb(n):
    """RepeatVector's `n` only (the tensor `out` reads still declares 3 positions)."""
    def edit(config):
        _entry(config, "rep")["config"]["n"] = n
    return edit


def _encodings(width=8, copies=3):
    x = keras.Input((3,), name="ids")
    outs = [keras.layers.Activation("relu", name=f"act{k}")(
        keras.layers.CategoryEncoding(width, output_mode="multi_hot", name=f"enc{k}")(x))
        for k in range(copies)]
    return keras.Model(x, outs)


def _encoding_bomb(width, copies=3):
    """Each CategoryEncoding `width` tokens wide, as the tensor its Activation reads says."""
    def edit(config):
        for k in range(copies):
            _entry(config, f"enc{k}")["config"]["num_tokens"] = width
            for item in _entry(config, f"act{k}")["inbound_nodes"][0]["args"]:
                item["config"]["shape"] = [None, width]
    return edit


def _repeat_bomb_tail(n):
    """RepeatVector as the model's output: no tensor declares its width, only its `n`."""
    def edit(config):
        _entry(config, "rep")["config"]["n"] = n
        config["config"]["layers"] = [e for e in config["config"]["layers"]
                                      if e["config"]["name"] != "out"]
        config["config"]["output_layers"] = [["rep", 0, 0]]
    return edit


def _timed_refusal(call, match):
    import time

    start = time.perf_counter()
    with pytest.raises(ks.SurgeryFileError, match=match) as caught:
        call()
    return time.perf_counter() - start, caught.value


@pytest.mark.parametrize("edit", [_repeat_bomb(2**23), _repeat_bomb_tail(2**23)],
                         ids=["read-by-a-dense", "the-output"])
def test_a_rule_made_axis_past_the_label_budget_is_refused_first(tmp_path, capsys, edit):
    """A RepeatVector(n=2**22) in a 16 KB file was labelled index by index (+955 MB, 20 s,
    then success; 2**23: twice that): a side read from a file has one budget of labelled
    indices, and an axis it cannot afford is refused before it is labelled, naming the file,
    the layer, the limit and the constant."""
    _repeated().save(tmp_path / "old.keras")
    bomb = tmp_path / "bomb.keras"
    _rewrite_config(tmp_path / "old.keras", bomb, edit)
    assert bomb.stat().st_size < 64 << 10
    from keras_surgery import labels

    limit = labels.file_label_limit(bomb.stat().st_size)  # the floor, for a file this small
    assert limit == labels.MAX_FILE_LABELS
    expected = (r"bomb\.keras': labelling layer 'rep' \(RepeatVector\).* more than the "
                rf"{limit} .*keras_surgery\.labels\.MAX_FILE_LABELS")
    seconds, _ = _timed_refusal(lambda: ks.phi_table(bomb), expected)
    assert seconds < 2
    new = _repeated(seed=2)
    before = _values(new)
    seconds, _ = _timed_refusal(lambda: ks.migrate_weights(bomb, new), expected)
    assert seconds < 2
    for a, b in zip(_values(new), before):
        np.testing.assert_array_equal(a, b)
    old = _repeated()  # the weights-only path: a checkpoint whose architecture is the bomb
    old.save_weights(tmp_path / "old.weights.h5")
    _timed_refusal(lambda: ks.migrate_weights(bomb, new, old_weights=tmp_path / "old.weights.h5"),
                   r"bomb\.keras' with weights '.*old\.weights\.h5': labelling layer 'rep'.*"
                   r"MAX_FILE_LABELS")
    assert cli.main(["phi", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "MAX_FILE_LABELS" in err


def test_the_label_budget_is_one_total_over_the_file(tmp_path, monkeypatch):
    """Axes each under every per-tensor budget add up: three CategoryEncoding layers whose
    widths fit MAX_FILE_TENSOR_INDICES one by one are refused together at the layer that
    passes the total, before it is labelled; a live model of the same widths is not
    budgeted, and a limit raised through the constant lets the file through."""
    from keras_surgery import labels

    width = 2**14
    _encodings().save(tmp_path / "small.keras")
    wide = tmp_path / "wide.keras"
    _rewrite_config(tmp_path / "small.keras", wide, _encoding_bomb(width))
    monkeypatch.setattr(labels, "MAX_FILE_LABELS", 2 * width)  # the inputs' 3 labels too
    _, error = _timed_refusal(lambda: ks.phi_table(wide), r"wide\.keras': labelling layer "
                              r"'enc1' \(CategoryEncoding\) brings the file to 32771 .*32768 ")
    assert "MAX_FILE_LABELS" in str(error)
    assert cli.main(["phi", str(wide)]) == 2
    live = _encodings(width)
    assert len(ks.phi_table(live)) == 3  # a live model: its sizes are its own
    monkeypatch.setattr(labels, "MAX_FILE_LABELS", 3 * width + 3)  # exactly what it uses
    assert len(ks.phi_table(wide)) == 3
    monkeypatch.setattr(labels, "MAX_FILE_LABELS", 3 * width + 2)
    with pytest.raises(ks.SurgeryFileError, match=r"layer 'enc2'.*MAX_FILE_LABELS"):
        ks.phi_table(wide)


def test_a_raised_label_budget_admits_a_wide_repeat_and_it_migrates(tmp_path, monkeypatch):
    """A RepeatVector the default budget refuses is read once MAX_FILE_LABELS is raised, and
    migrates exactly (its n positions matched, every weight copied)."""
    from keras_surgery import labels

    n = 2**12
    old = _repeated(n)
    randomize(old, None, seed=4)
    old.save(tmp_path / "old.keras")
    monkeypatch.setattr(labels, "MAX_FILE_LABELS", n)
    with pytest.raises(ks.SurgeryFileError, match=r"layer 'rep'.*MAX_FILE_LABELS"):
        ks.migrate_weights(tmp_path / "old.keras", _repeated(n, seed=2))
    monkeypatch.setattr(labels, "MAX_FILE_LABELS", 2 * n)
    new = _repeated(n, seed=2)
    report = ks.migrate_weights(tmp_path / "old.keras", new)
    assert report.preserves_function
    for a, b in zip(_values(new), _values(old)):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    x, x2 = (rng.normal(size=(4, 4)).astype("float32") for _ in range(2))
    assert_input_sensitive(old, x, x2)
    reference = predict(old, x)
    assert np.max(np.abs(predict(new, x) - reference)) <= preservation_bound(reference)


def _token_model(vocabulary=50257, seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((8,), dtype="int32", name="ids")
    h = keras.layers.Embedding(vocabulary, 8, name="embed")(ids)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(ids, keras.layers.Dense(4, name="out")(h))


def test_a_file_of_realistic_size_fits_the_label_budget(tmp_path, monkeypatch):
    """GPT-2's vocabulary of 50257 rows read from a file is labelled within the default
    budget (GPT-2 itself uses 158k labelled indices, EfficientNetB0 101k, NASNetMobile 98k:
    26-43 times below it) and migrates exactly; the budget does count its rows."""
    from keras_surgery import labels

    old = _token_model()
    randomize(old, None, seed=4)
    old.save(tmp_path / "old.keras")
    new = _token_model(seed=2)
    report = ks.migrate_weights(tmp_path / "old.keras", new)
    assert report.preserves_function
    for a, b in zip(_values(new), _values(old)):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    x, x2 = (rng.integers(0, 50257, size=(4, 8)).astype("int32") for _ in range(2))
    assert_input_sensitive(old, x, x2)
    reference = predict(old, x)
    assert np.max(np.abs(predict(new, x) - reference)) <= preservation_bound(reference)
    monkeypatch.setattr(labels, "MAX_FILE_LABELS", 50000)  # below its vocabulary
    monkeypatch.setattr(labels, "FILE_BYTES_PER_LABEL", 1 << 40)  # no allowance by size
    with pytest.raises(ks.SurgeryFileError, match=r"layer 'embed' \(Embedding\)"):
        ks.phi_table(tmp_path / "old.keras")
    # A larger file may label more: one label per FILE_BYTES_PER_LABEL bytes of it.
    size = (tmp_path / "old.keras").stat().st_size
    monkeypatch.setattr(labels, "FILE_BYTES_PER_LABEL", max(1, size // 200_000))
    assert labels.file_label_limit(size) >= 200_000
    assert ks.phi_table(tmp_path / "old.keras") is not None


def test_one_tensor_concatenated_thousands_of_times_is_labelled_in_linear_time(tmp_path):
    """Each copy of a label on one axis gets the smallest free copy number; searching it from
    1 for every copy was quadratic (a file concatenating its input 4000 times, 16 columns
    wide: 34 s to label). The copies stay distinct, numbered in index order."""
    import time

    copies, width = 5000, 16  # before: 30 s; now 0.3 s
    x = keras.Input((width,), name="obs")
    cat = keras.layers.Concatenate(name="cat")([x] * copies)
    keras.Model(x, keras.layers.Dense(2, name="out")(cat)).save(tmp_path / "cat.keras")
    from keras_surgery.propagate import propagate
    from keras_surgery.side import Side

    start = time.perf_counter()
    with Side(tmp_path / "cat.keras") as side:
        labels = propagate(side.graph())
    assert time.perf_counter() - start < 5
    ids = labels.records["out"].inputs[0][0].ids
    assert len(ids) == copies * width and len(np.unique(ids)) == len(ids)
    first = ids[:width]
    for k in (1, 2, copies - 1):  # the k-th copy of column j is occurrence k of column j
        expected = [labels.space.find(("occurrence", k, int(i))) for i in first]
        np.testing.assert_array_equal(ids[k * width:(k + 1) * width], expected)
