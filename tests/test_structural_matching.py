"""Structural matching of auto-named layers (Sequential models, models rebuilt in another
session): an inserted layer is recognised as new and starts as the identity, the layers after
a deleted one keep their own weights, look-alikes matched by position are named in a warning,
and the report lists every old -> new layer match with its reason.

Every test randomises an old model (`randomize`), checks that its outputs depend on its input,
migrates into a new model whose layers all carry Keras's generated names, and checks each
continued weight exactly (np.array_equal with the old layer it continues, known from the
construction) and the outputs within a float32 bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.match import align
from tests.util import (
    assert_input_sensitive,
    max_diff,
    normal,
    predict,
    preservation_bound,
    randomize,
)

pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


def _old(layers, shape, seed=0):
    """An old Sequential model of `layers` (auto-named) with non-trivial weights; returns
    (model, batch)."""
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input(shape), *layers])
    batch = normal(rng, 32, *shape)
    randomize(model, batch, seed=seed)
    assert_input_sensitive(model, batch, normal(rng, 32, *shape))
    return model, batch


def _weights(layer) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in layer.weights]


def _assert_continues(new_layer, old_layer):
    """Every weight of `new_layer` holds exactly the values of `old_layer`'s."""
    new_w, old_w = _weights(new_layer), _weights(old_layer)
    assert len(new_w) == len(old_w) and new_w
    for a, b in zip(new_w, old_w):
        assert a.shape == b.shape and np.array_equal(a, b), (new_layer.name, old_layer.name)


def _assert_preserved(report, new, old, batch):
    reference = predict(old, batch)
    assert report.preserves_function, report.warnings
    assert max_diff(predict(new, batch), reference) <= preservation_bound(reference)


def _identity_kernel(layer) -> bool:
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    if kernel.ndim == 2:
        return np.array_equal(kernel, np.eye(*kernel.shape, dtype=kernel.dtype))
    centre = np.zeros_like(kernel)
    centre[kernel.shape[0] // 2, kernel.shape[1] // 2] = np.eye(kernel.shape[2])
    return np.array_equal(kernel, centre)


# -- insertions ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "relu"])
def test_dense_inserted_in_auto_named_mlp_starts_as_identity(activation):
    old, batch = _old([keras.layers.Dense(16, activation="relu"),
                       keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)], (4,))
    new = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(16, activation=activation),
                            keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    assert not {lay.name for lay in new.layers} & {lay.name for lay in old.layers}

    report = ks.migrate_weights(old, new)

    inserted = new.layers[1].name
    assert report.plan.starts == {inserted: "identity"}
    assert _identity_kernel(new.layers[1])
    assert np.array_equal(_weights(new.layers[1])[1], np.zeros(16, "float32"))
    for new_index, old_index in [(0, 0), (2, 1), (3, 2)]:
        _assert_continues(new.layers[new_index], old.layers[old_index])
    assert report.plan.matches == {new.layers[n].name: old.layers[o].name
                                   for n, o in [(0, 0), (2, 1), (3, 2)]}
    assert not any("activation" in w for w in report.warnings), report.warnings
    _assert_preserved(report, new, old, batch)


@pytest.mark.parametrize("make", [
    lambda: keras.layers.Conv2D(4, 3, padding="same"),
    lambda: keras.layers.BatchNormalization(),
], ids=["conv", "batchnorm"])
def test_conv_or_batchnorm_inserted_in_conv_sequential(make):
    def body(*middle):
        return [keras.layers.Conv2D(4, 3, padding="same", activation="relu"), *middle,
                keras.layers.Conv2D(6, 3, padding="same", activation="relu"),
                keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(3)]

    old, batch = _old(body(), (8, 8, 2))
    new = keras.Sequential([keras.Input((8, 8, 2)), *body(make())])

    report = ks.migrate_weights(old, new)

    inserted = new.layers[1]
    assert report.plan.starts == {inserted.name: "identity"}
    if isinstance(inserted, keras.layers.Conv2D):
        assert _identity_kernel(inserted)
    else:
        assert np.array_equal(keras.ops.convert_to_numpy(inserted.gamma), np.ones(4, "float32"))
    for new_index, old_index in [(0, 0), (2, 1), (3, 2), (5, 4)]:
        _assert_continues(new.layers[new_index], old.layers[old_index])
    _assert_preserved(report, new, old, batch)


def test_dense_inserted_in_one_branch_leaves_the_other_branch_its_weights():
    def model(extra: bool):
        inp = keras.Input((6,))
        trunk = keras.layers.Dense(8, activation="relu")(inp)
        left = keras.layers.Dense(8, activation="relu")(trunk)
        if extra:
            left = keras.layers.Dense(8)(left)
        left = keras.layers.Dense(8)(left)
        right = keras.layers.Dense(8)(trunk)
        return keras.Model(inp, keras.layers.Dense(3)(keras.layers.Add()([left, right])))

    rng = np.random.default_rng(3)
    old, batch = model(False), normal(rng, 32, 6)
    randomize(old, batch, seed=3)
    assert_input_sensitive(old, batch, normal(rng, 32, 6))
    new = model(True)

    report = ks.migrate_weights(old, new)

    dense = lambda m: [lay for lay in m.layers if isinstance(lay, keras.layers.Dense)]  # noqa: E731
    old_dense, new_dense = dense(old), dense(new)
    assert report.plan.starts == {new_dense[2].name: "identity"}
    for n, o in [(0, 0), (1, 1), (3, 2), (4, 3), (5, 4)]:
        _assert_continues(new_dense[n], old_dense[o])
    _assert_preserved(report, new, old, batch)


def test_branches_swapped_in_a_concatenation_keep_their_weights():
    def model(swap: bool):
        inp = keras.Input((6,))
        a = keras.layers.Dense(5)(keras.layers.Dense(8, activation="relu")(inp))
        b = keras.layers.Dense(3)(keras.layers.Dense(4, activation="tanh")(inp))
        merged = keras.layers.Concatenate()([b, a] if swap else [a, b])
        return keras.Model(inp, keras.layers.Dense(2)(merged))

    rng = np.random.default_rng(5)
    old, batch = model(False), normal(rng, 32, 6)
    randomize(old, batch, seed=5)
    assert_input_sensitive(old, batch, normal(rng, 32, 6))
    new = model(True)

    report = ks.migrate_weights(old, new)

    dense = lambda m: [lay for lay in m.layers if isinstance(lay, keras.layers.Dense)]  # noqa: E731
    by_units = lambda m: {(lay.units, lay.kernel.shape[0]): lay for lay in dense(m)}  # noqa: E731
    old_by, new_by = by_units(old), by_units(new)
    for key in [(8, 6), (5, 8), (4, 6), (3, 4)]:
        _assert_continues(new_by[key], old_by[key])
    # The head reads the branches in the other order: its kernel rows follow them.
    head_old, head_new = _weights(old_by[(2, 8)])[0], _weights(new_by[(2, 8)])[0]
    assert np.array_equal(head_new, np.concatenate([head_old[5:], head_old[:5]]))
    _assert_preserved(report, new, old, batch)


# -- deletions ----------------------------------------------------------------------------


def test_after_a_deleted_layer_the_later_layers_keep_their_own_weights():
    old, batch = _old([keras.layers.Dense(16, activation="relu"),
                       keras.layers.Dense(12, activation="relu"),
                       keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)], (4,))
    new = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    fresh_kernel = _weights(new.layers[1])[0]

    report = ks.migrate_weights(old, new)

    deleted = old.layers[1].name
    assert report.plan.matches == {new.layers[0].name: old.layers[0].name,
                                   new.layers[1].name: old.layers[2].name,
                                   new.layers[2].name: old.layers[3].name}
    _assert_continues(new.layers[0], old.layers[0])
    _assert_continues(new.layers[2], old.layers[3])
    # The layer after the deletion keeps its bias; its kernel read the deleted layer's units,
    # so it keeps its fresh values (zeros would disconnect it).
    kernel, bias = _weights(new.layers[1])
    assert np.array_equal(bias, _weights(old.layers[2])[1])
    assert np.array_equal(kernel, fresh_kernel)
    assert not report.preserves_function
    assert any(f"'{deleted}'" in w and "deleted" in w for w in report.warnings), report.warnings
    assert not any("activation" in w for w in report.warnings), report.warnings
    assert max_diff(predict(new, batch), predict(old, batch)) > 1e-3


# -- two processes ------------------------------------------------------------------------

_OLD_SCRIPT = textwrap.dedent("""
    import sys
    import keras
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    from tests.util import randomize

    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(12, activation="relu"),
                              keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])
    batch = np.random.default_rng(7).normal(size=(32, 5)).astype("float32")
    randomize(model, batch, seed=7)
    model.save(sys.argv[1])
    np.savez(sys.argv[2], batch=batch, out=keras.ops.convert_to_numpy(model(batch)),
             **{f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)},
             names=np.array([lay.name for lay in model.layers]))
""")


def test_insertion_into_a_model_saved_by_another_process(tmp_path):
    path, data = tmp_path / "old.keras", tmp_path / "old.npz"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", _OLD_SCRIPT, str(path), str(data), repo], check=True,
                   env={**os.environ, "KERAS_BACKEND": "numpy"}, timeout=120)
    saved = np.load(data)
    # Fresh counters: the names coincide but are shifted by the insertion ("dense_2" is the
    # old head and the new inserted layer), the worst case for matching by name.
    keras.backend.clear_session()
    new = keras.Sequential([keras.Input((5,)), keras.layers.Dense(12, activation="relu"),
                            keras.layers.Dense(6, activation="relu"),
                            keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])
    old_names = [str(n) for n in saved["names"]]
    assert old_names == [lay.name for lay in new.layers[:3]] == ["dense", "dense_1", "dense_2"]
    assert float(np.std(saved["out"])) > 1e-2

    report = ks.migrate_weights(str(path), new)

    assert report.plan.starts == {"dense_2": "identity"}
    assert report.plan.matches == {"dense": "dense", "dense_1": "dense_1", "dense_3": "dense_2"}
    for new_index, old_index in [(0, 0), (1, 1), (3, 2)]:
        kernel, bias = _weights(new.layers[new_index])
        assert np.array_equal(kernel, saved[f"w{2 * old_index}"])
        assert np.array_equal(bias, saved[f"w{2 * old_index + 1}"])
    assert report.preserves_function, report.warnings
    out = predict(new, saved["batch"])
    assert max_diff(out, saved["out"]) <= preservation_bound(saved["out"])


# -- look-alikes and names ----------------------------------------------------------------


def test_look_alikes_matched_by_position_warn_to_name_the_layers():
    old, batch = _old([keras.layers.Dense(8, activation="relu"),
                       keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)], (8,))
    new = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                            keras.layers.Dense(8, activation="relu"),
                            keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])

    report = ks.migrate_weights(old, new)

    named = [w for w in report.warnings if 'name="' in w and "look alike" in w]
    assert len(named) == 1 and "keras.layers.Dense(" in named[0], report.warnings
    assert f"'{new.layers[2].name}' new" in named[0] and f"'{old.layers[1].name}'" in named[0]
    # By position: the first two continue the old ones, the third is new (the identity).
    _assert_continues(new.layers[0], old.layers[0])
    _assert_continues(new.layers[1], old.layers[1])
    _assert_continues(new.layers[3], old.layers[2])
    assert report.plan.starts == {new.layers[2].name: "identity"}
    _assert_preserved(report, new, old, batch)


def test_distinct_shapes_are_no_look_alikes():
    old, _ = _old([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)], (4,))
    new = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(16), keras.layers.Dense(3)])
    report = ks.migrate_weights(old, new)
    assert not any("look alike" in w for w in report.warnings), report.warnings


def test_named_new_layer_is_never_matched_structurally():
    old, batch = _old([keras.layers.Dense(16, activation="relu"),
                       keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)], (4,))
    new = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(16, activation="relu", name="extra"),
                            keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    report = ks.migrate_weights(old, new)
    assert "extra" not in report.plan.matches and report.plan.starts == {"extra": "identity"}
    _assert_continues(new.layers[0], old.layers[0])
    _assert_continues(new.layers[2], old.layers[1])
    _assert_continues(new.layers[3], old.layers[2])
    _assert_preserved(report, new, old, batch)


# -- the report ---------------------------------------------------------------------------


def test_summary_and_to_dict_show_matches_with_reasons():
    inp = keras.Input((4,), name="obs")
    x = keras.layers.Dense(16, activation="relu", name="encoder")(inp)
    x = keras.layers.Dense(8, activation="relu")(x)
    x = keras.layers.Dense(6, activation="relu")(x)
    old = keras.Model(inp, keras.layers.Dense(3, name="head")(x))
    randomize(old, normal(np.random.default_rng(0), 8, 4))
    inp = keras.Input((4,), name="obs")
    x = keras.layers.Dense(16, activation="relu", name="encoder")(inp)
    x = keras.layers.Dense(16)(x)  # inserted
    x = keras.layers.Dense(8, activation="relu")(x)  # the old Dense(6) after it is deleted
    new = keras.Model(inp, keras.layers.Dense(3, name="head")(x))
    old_auto = [lay.name for lay in old.layers[2:4]]
    new_auto = [lay.name for lay in new.layers[2:4]]

    report = ks.migrate_weights(old, new)

    rows = report.to_dict()["matches"]
    assert {"new": "encoder", "old": "encoder", "reason": "name"} in rows
    assert {"new": "head", "old": "head", "reason": "name"} in rows
    assert {"new": new_auto[1], "old": old_auto[0], "reason": "structure"} in rows
    assert {"new": new_auto[0], "old": None, "reason": "new"} in rows
    assert {"new": None, "old": old_auto[1], "reason": "deleted"} in rows
    text = report.summary()
    assert "layers: old -> new (reason)" in text
    assert "2 layer(s) matched by their own name" in text
    assert f"{old_auto[0]} -> {new_auto[1]} (structure)" in text
    assert f"new: {new_auto[0]}" in text and f"deleted: {old_auto[1]}" in text
    assert report.to_json()  # JSON-able


# -- the alignment itself -----------------------------------------------------------------


def _chain(widths, start=4):
    """Features of a chain of Dense layers of `widths` (as `_layer_features` makes them)."""
    rows, before = [], start
    for w in widths:
        rows.append({"class": "Dense|None", "outputs": repr(w), "weights": repr((before, w)),
                     "sizes": repr(w), "settings": "", "inputs": "Dense", "consumers": "Dense"})
        before = w
    return rows


def test_alignment_of_thousands_of_layers_is_fast_and_exact():
    rng = np.random.default_rng(0)
    widths = [int(w) for w in rng.integers(2, 50, size=3000)]
    # Three insertions (of a width no old layer has) and two deletions along the chain.
    continues: list[int | None] = list(range(3000))  # per new layer, the old one it continues
    for at in (2500, 1500, 100):
        continues.insert(at, None)
    del continues[2000], continues[700]
    new_widths = [97 if i is None else widths[i] for i in continues]
    started = time.perf_counter()
    pairs, _ = align(_chain(widths), _chain(new_widths), np.zeros(3000, np.int64),
                     np.zeros(len(new_widths), np.int64))
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, elapsed
    assert not any(continues[j] is None for j in pairs)  # inserted layers are new
    wrong = [j for j, i in enumerate(continues) if i is not None and pairs.get(j) != i]
    assert len(wrong) <= 4, wrong  # at most a neighbour of a deletion, if of equal width
