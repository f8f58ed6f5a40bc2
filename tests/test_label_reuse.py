"""Labels made once per label space (`LabelSpace.remembered`), zero starts labelled only when
taken, and the reads that came with them: each must give what making everything again gave."""

from __future__ import annotations

import types
import zipfile

import h5py
import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.graph import LayerNode, WeightSpec
from keras_surgery.labels import AxisLabels, DepSets, LabelSpace, label_budget
from keras_surgery.propagate import _run_rule
from keras_surgery.rules.api import RuleCall
from keras_surgery.rules.elementwise import _merge_axes
from tests.util import max_diff, normal, old_model, predict, preservation_bound, to_numpy


def _residual_net(channels: int, width: int, branch: bool = False) -> keras.Model:
    """Conv, BatchNormalization, a depthwise conv and residual Adds (the labels remembered);
    `branch`: a new residual branch, which starts at zero (a start taken)."""
    x = inputs = keras.Input((8, 8, channels), name="img")
    x = keras.layers.Conv2D(width, 3, padding="same", name="stem")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=1, name="dw")(x)
    y = keras.layers.BatchNormalization(name="dw_bn")(y)
    x = keras.layers.Add(name="add1")([x, y])
    y = keras.layers.Conv2D(width, 1, name="pw")(x)
    x = keras.layers.Add(name="add2")([x, y])
    if branch:
        y = keras.layers.Conv2D(width, 1, activation="relu", name="new_a")(x)
        y = keras.layers.Conv2D(width, 1, name="new_b")(y)
        y = keras.layers.BatchNormalization(name="new_bn")(y)
        x = keras.layers.Add(name="add_new")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def test_remembered_labels_give_the_migration_that_making_them_again_gives(tmp_path,
                                                                        monkeypatch):
    rng = np.random.default_rng(0)
    old, batch, path = old_model(lambda: _residual_net(3, 6), (8, 8, 3), rng,
                                 path=tmp_path / "old.keras")

    def migrated(**kwargs):
        keras.utils.set_random_seed(5)
        new = _residual_net(4, 6, branch=True)
        return new, ks.migrate_weights(path, new, **kwargs)

    hits = []
    remembered = LabelSpace.remembered

    def counting(self, key, make):
        hits.append(key in self._remembered)
        return remembered(self, key, make)

    monkeypatch.setattr(LabelSpace, "remembered", counting)
    new, report = migrated()
    assert any(hits), "the new model's labels were all made again"
    monkeypatch.setattr(LabelSpace, "remembered", lambda self, key, make: make())
    again, report_again = migrated()

    assert report.preserves_function, report.warnings
    assert report.to_dict()["weights"] == report_again.to_dict()["weights"]
    for a, b in zip(new.weights, again.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)
    # The new channel's kernel slice is 0, the old ones are the old kernel's; the new branch
    # starts at zero, so the old function is kept whatever the new channel holds.
    stem = to_numpy(new.get_layer("stem").kernel)
    np.testing.assert_array_equal(stem[:, :, :3], to_numpy(old.get_layer("stem").kernel))
    assert not stem[:, :, 3].any()
    x = np.concatenate([batch, normal(rng, *batch.shape[:3], 1)], axis=-1)
    before = predict(old, batch)
    assert max_diff(predict(new, x), before) <= preservation_bound(before)


def _axis(ids: np.ndarray) -> AxisLabels:
    return AxisLabels(ids, np.zeros(len(ids), np.int64))


def test_a_remembered_merge_is_charged_what_making_it_was():
    space = LabelSpace()
    call = types.SimpleNamespace(space=space, deps=DepSets())
    a = space.intern_many([("unit", "x", "", j) for j in range(1000)])
    b = a.copy()
    b[-1] = space.intern(("unit", "y", "", 0))  # the two inputs differ in one index only
    with label_budget("'f'", limit=10**6) as budget:
        first = _merge_axes(call, [_axis(a), _axis(b)], sums=True)
        made = budget.spent
        second = _merge_axes(call, [_axis(a), _axis(b)], sums=True)
        assert budget.spent == 2 * made == 2  # one set label; not one per index
    np.testing.assert_array_equal(first.ids, second.ids)
    # Made outside any budget (a live model), then found under one (a file): the same charge.
    c = b.copy()
    c[0] = space.intern(("unit", "z", "", 0))
    _merge_axes(call, [_axis(a), _axis(c)], sums=True)
    with label_budget("'f'", limit=10**6) as budget:
        _merge_axes(call, [_axis(a), _axis(c)], sums=True)
        assert budget.spent == 2


@pytest.mark.parametrize("rule_class", ["BatchNormalization", "LayerScale"])
def test_a_zero_start_over_channels_of_unknown_length_still_fails_the_rule(rule_class):
    # Labelled eagerly, its zero start failed the rule (the layer opaque, or an
    # UnsupportedLayerError under strict); labelled lazily it must not pass as labelled.
    shapes = {"BatchNormalization": 4, "LayerScale": 1}[rule_class]
    weights = [WeightSpec(f"layers/l/vars/{i}", str(i), (4,), "float32") for i in range(shapes)]
    config = {"axis": -1, "epsilon": 1e-3} if rule_class == "BatchNormalization" else {}
    cls = keras.layers.BatchNormalization if rule_class == "BatchNormalization" else None
    node = LayerNode("l", rule_class, "keras.layers", None, config, cls, "layers/l", weights)
    call = RuleCall(node, "l", [(AxisLabels.unknown(),)], [None], LabelSpace(), DepSets())
    if rule_class == "LayerScale":  # keras-hub's, called directly
        from keras_surgery.rules.elementwise import layer_scale_rule

        with pytest.raises(ValueError, match="no known length"):
            layer_scale_rule(call)
        return
    result = _run_rule(call, False)
    assert result.opaque and "no known length" in " ".join(result.warnings), result.warnings
    with pytest.raises(ks.UnsupportedLayerError, match="no known length"):
        _run_rule(call, True)


def test_fixed_length_utf8_dtype_tags_are_still_read(tmp_path):
    # Keras and h5py write variable-length tags; another writer's fixed-length UTF-8 ones
    # must read the same (HDF5 converts no UTF-8 string to an ASCII memory type).
    keras.utils.set_random_seed(0)
    old = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d", dtype="bfloat16")])
    old.layers[0].bias.assign(np.linspace(-1, 1, 4))
    old.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as z:
        z.extractall(tmp_path / "x")
    retagged = []
    with h5py.File(tmp_path / "x" / "model.weights.h5", "r+") as f:
        def retag(name, obj):
            if isinstance(obj, h5py.Dataset) and "dtype" in obj.attrs:
                tag = obj.attrs["dtype"]
                del obj.attrs["dtype"]
                obj.attrs.create("dtype", tag.encode(), dtype=h5py.string_dtype("utf-8", len(tag)))
                retagged.append(name)
        f.visititems(retag)
    assert len(retagged) == 2
    with zipfile.ZipFile(tmp_path / "m2.keras", "w") as z:
        for member in ("metadata.json", "config.json", "model.weights.h5"):
            z.write(tmp_path / "x" / member, member)
    new = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d", dtype="bfloat16")])
    ks.migrate_weights(str(tmp_path / "m2.keras"), new)
    for a, b in zip(old.weights, new.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a).astype("float32"),
                                      to_numpy(b).astype("float32"))
