"""One tensor reaching a merge more than once (NAS-style cells, `concat([p, q, p])`).

Each copy of a repeated index carries a label of its own (`LabelSpace.distinct`: the k-th copy
continues the k-th copy), so index maps through such an axis are never ambiguous: identity
surgery copies every weight where it was, and widening the layer that feeds the cell moves
each copy's columns to the right place. A rule whose output repeats a label is refused.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.graph import graph_from_model
from keras_surgery.labels import LabelSpace, concat_axes, occurrence_key, unit_key
from keras_surgery.propagate import propagate
from keras_surgery.rules.api import RuleResult, check_weights, single_input
from tests.util import (
    assert_input_sensitive,
    calibrate_batch_norm,
    predict,
    randomize,
    to_numpy,
)

EPS32 = float(np.finfo(np.float32).eps)
# Copied weights compute the same sums in the same order; the bound leaves room for a
# backend that reorders them (64 eps of the output scale), never below 1e-6 relative.
PRESERVE_RTOL = max(64 * EPS32, 1e-6)
# Keras warns when a one-input model is called on a bare array, not a list of one.
pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


def _assert_preserved(new, old, x_new, x_old):
    y_old = predict(old, x_old)
    drift = np.max(np.abs(predict(new, x_new) - y_old))
    bound = PRESERVE_RTOL * np.max(np.abs(y_old))
    assert drift <= bound, f"max |new - old| = {drift:.3e} > {bound:.3e}"


def _weights(model) -> dict[str, np.ndarray]:
    return {v.path: np.array(to_numpy(v), copy=True) for v in model.weights}


def _assert_all_copied(new, old):
    """Identity surgery: every variable of the new model holds the old one's values."""
    new_w, old_w = _weights(new), _weights(old)
    assert new_w.keys() == old_w.keys()
    for path, value in new_w.items():
        np.testing.assert_array_equal(value, old_w[path], err_msg=path)


def _kernels(model) -> dict[str, np.ndarray]:
    """Layer name -> its first weight (a Dense kernel), as a copy."""
    return {la.name: np.array(to_numpy(la.weights[0]), copy=True)
            for la in model.layers if la.weights}


def _concat_map(old_widths, new_widths) -> np.ndarray:
    """The oracle: per new index of a concatenation of parts that keep their order, the old
    index it continues (the first columns of a grown part), or -1 (its new columns)."""
    old_starts = np.concatenate([[0], np.cumsum(old_widths)[:-1]])
    index = []
    for start, n_old, n_new in zip(old_starts, old_widths, new_widths, strict=True):
        index.extend(int(start) + j if j < n_old else -1 for j in range(n_new))
    return np.asarray(index)


def _check_taken(new_value, old_value, fresh_value, index, axis, new_fill):
    """Copied slices equal np.take of the old values; the others are 0 ("zero") or the new
    model's initial values ("fresh")."""
    kept = index >= 0
    np.testing.assert_array_equal(np.compress(kept, new_value, axis=axis),
                                  np.take(old_value, index[kept], axis=axis))
    rest = np.compress(~kept, new_value, axis=axis)
    if new_fill == "zero":
        np.testing.assert_array_equal(rest, 0.0)
    else:
        np.testing.assert_array_equal(rest, np.compress(~kept, fresh_value, axis=axis))


# -- labels ---------------------------------------------------------------------------------------


def test_distinct_numbers_the_copies_and_keeps_keys_flat():
    space = LabelSpace()
    a, b = (space.intern(unit_key("p", "", j)) for j in range(2))
    unique = np.array([a, b])
    assert space.distinct(unique) is unique  # nothing repeated: the same array

    out = space.distinct(np.array([a, b, a, a]))
    assert [space.key(i) for i in out[2:]] == [occurrence_key(a, 1), occurrence_key(a, 2)]
    assert out[:2].tolist() == [a, b]
    # concat([concat([p, p]), p]): the third copy is copy 2 of p, not a copy of a copy.
    nested = space.distinct(np.array([a, out[2], a]))
    assert [space.key(i) for i in nested] == [
        space.key(a), occurrence_key(a, 1), occurrence_key(a, 2)]
    assert "copy 2" in space.describe(out[2])


def test_copies_keep_the_dependency_sets_of_what_they_copy():
    """The cell's axis: p's units, q's, then copies of p's, each depending on the input
    columns its original depends on (the phi table and the verifier read these)."""
    labels = propagate(graph_from_model(_dense_cell()))
    (axis,) = labels.tensors[("cell", 0, 0)]
    assert len(np.unique(axis.ids)) == len(axis.ids) == 11
    np.testing.assert_array_equal(axis.deps[7:], axis.deps[:4])
    assert [labels.space.key(i) for i in axis.ids[7:]] == [
        occurrence_key(i, 1) for i in axis.ids[:4]]


# -- a small cell: concat([p, q, p]) -------------------------------------------------------------


def _dense_cell(p_units=4, order=("p", "q", "p")):
    x = keras.Input((5,), name="obs")
    p = keras.layers.Dense(p_units, name="p")(x)
    q = keras.layers.Dense(3, activation="tanh", name="q")(x)
    parts = {"p": p, "q": q}
    cell = keras.layers.Concatenate(name="cell")([parts[k] for k in order])
    return keras.Model(x, keras.layers.Dense(2, name="out")(cell))


def _old(build, shape, seed=1):
    keras.utils.set_random_seed(seed)
    old = build()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, *shape)).astype("float32")
    randomize(old, x)
    assert_input_sensitive(old, x, rng.normal(size=x.shape).astype("float32"))
    return old, x


def test_identity_surgery_on_a_cell_that_repeats_a_tensor_is_exact():
    old, x = _old(_dense_cell, (5,))
    keras.utils.set_random_seed(2)
    new = _dense_cell()
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    assert not report.warnings
    out = next(w for w in report.plan.weights if w.layer == "out" and w.role == "kernel")
    np.testing.assert_array_equal(out.axes[0].index, np.arange(11))  # not [0..6, 0..3]
    _assert_all_copied(new, old)
    _assert_preserved(new, old, x, x)


def test_widening_the_repeated_tensor_moves_both_copies():
    old, x = _old(_dense_cell, (5,))
    keras.utils.set_random_seed(2)
    new = _dense_cell(p_units=6)
    fresh = _kernels(new)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings

    got, want = _kernels(new), _kernels(old)
    # Both copies of p's units go to the old rows of their own copy; p's new units get 0s.
    _check_taken(got["out"], want["out"], fresh["out"], _concat_map([4, 3, 4], [6, 3, 6]), 0,
                 "zero")
    _check_taken(got["p"], want["p"], fresh["p"], _concat_map([4], [6]), 1, "fresh")
    _assert_preserved(new, old, x, x)


def test_net2net_splits_a_repeated_unit_in_both_copies():
    """Policy "net2net": a new unit of p copies an old one in both copies of p in the cell,
    and the old unit's outgoing rows in each copy are shared with its split: every share is
    positive and each old unit's shares sum to 1, in both copies."""
    old, x = _old(_dense_cell, (5,))
    keras.utils.set_random_seed(2)
    new = _dense_cell(p_units=6)
    report = ks.migrate_weights(old, new, policy="net2net")
    assert report.preserves_function, report.warnings
    got, want = _kernels(new), _kernels(old)
    sources = [int(np.argmin(np.abs(got["p"][:, j:j + 1] - want["p"]).sum(0)))
               for j in range(6)]  # the old unit each new unit of p copies
    assert sorted(set(sources)) == [0, 1, 2, 3] and len(set(sources)) < 6
    shares = []
    for start_new, start_old in ((0, 0), (9, 7)):  # first and second copy of p in the cell
        rows = got["out"][start_new:start_new + 6]
        old_rows = want["out"][start_old + np.asarray(sources)]
        share = rows / old_rows  # one share per new unit, the same in every column
        np.testing.assert_allclose(share, share[:, :1] * np.ones_like(share), rtol=1e-5)
        for u in range(4):
            np.testing.assert_allclose(share[[j for j in range(6) if sources[j] == u], 0].sum(),
                                       1.0, rtol=1e-6)
        shares.append(share[:, 0])
    for share in shares:  # each copy's split units carry a share, none is left at zero
        assert (share > 0).all(), share
    _assert_preserved(new, old, x, x)


def test_copies_match_by_copy_number_not_by_slot():
    """concat([p, q, p]) -> concat([p, p, q]): the second copy of p continues the second
    copy, wherever it sits, so the function is kept."""
    old, x = _old(_dense_cell, (5,))
    keras.utils.set_random_seed(2)
    new = _dense_cell(order=("p", "p", "q"))
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    out = next(w for w in report.plan.weights if w.layer == "out" and w.role == "kernel")
    np.testing.assert_array_equal(out.axes[0].index, [0, 1, 2, 3, 7, 8, 9, 10, 4, 5, 6])
    _assert_preserved(new, old, x, x)


def _conv_cell(p_filters=4):
    """A NAS-like cell: the cell's input is concatenated twice, then normalised per channel."""
    x = keras.Input((6, 6, 3), name="image")
    p = keras.layers.Conv2D(p_filters, 3, padding="same", name="p")(x)
    q = keras.layers.Conv2D(3, 1, name="q")(keras.layers.ReLU()(p))
    cell = keras.layers.Concatenate(name="cell")([p, q, p])
    h = keras.layers.BatchNormalization(name="bn")(cell)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h))
    return keras.Model(x, keras.layers.Dense(5, name="head")(h))


def test_widening_through_a_normalised_conv_cell_is_preserved():
    old, x = _old(_conv_cell, (6, 6, 3))
    keras.utils.set_random_seed(2)
    new = _conv_cell(p_filters=6)
    fresh = {la.name: [to_numpy(v) for v in la.weights] for la in new.layers}
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings

    index = _concat_map([4, 3, 4], [6, 3, 6])
    for got, want, initial in zip(new.get_layer("bn").weights, old.get_layer("bn").weights,
                                  fresh["bn"], strict=True):  # gamma, beta, mean, variance
        _check_taken(to_numpy(got), to_numpy(want), initial, index, 0, "fresh")
    head = [to_numpy(v) for v in new.get_layer("head").weights]
    _check_taken(head[0], to_numpy(old.get_layer("head").weights[0]), fresh["head"][0],
                 index, 0, "zero")
    _assert_preserved(new, old, x, x)


def _time_cell(units=2):
    """A sequence followed by itself along the time axis, flattened into a Dense: each
    (step, unit) index of the second copy is a copy of a position, not the same position."""
    x = keras.Input((4, 3), name="seq")
    a = keras.layers.Dense(units, activation="tanh", name="a")(x)
    h = keras.layers.Flatten()(keras.layers.Concatenate(axis=1)([a, a]))
    return keras.Model(x, keras.layers.Dense(3, name="out")(h))


def test_widening_a_sequence_concatenated_along_time_is_preserved():
    old, x = _old(_time_cell, (4, 3))
    keras.utils.set_random_seed(2)
    new = _time_cell(units=3)
    fresh = _kernels(new)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    # Flatten order (step, unit): new row 3 t + c continues old row 2 t + c for c < 2.
    index = np.array([2 * t + c if c < 2 else -1 for t in range(8) for c in range(3)])
    _check_taken(_kernels(new)["out"], _kernels(old)["out"], fresh["out"], index, 0, "zero")
    _assert_preserved(new, old, x, x)


# -- element-wise merges --------------------------------------------------------------------------


def _self_merge(merge, p_units=4):
    x = keras.Input((5,), name="obs")
    p = keras.layers.Dense(p_units, activation="tanh", name="p")(x)
    return keras.Model(x, keras.layers.Dense(2, name="out")(merge()([p, p])))


@pytest.mark.parametrize("merge", [keras.layers.Add, keras.layers.Multiply,
                                   keras.layers.Maximum], ids=lambda m: m.__name__)
def test_a_tensor_merged_with_itself_keeps_its_labels_and_widens(merge):
    """p + p is 2p, p * p is p squared: each index still means unit j of p, once."""
    old, x = _old(lambda: _self_merge(merge), (5,))
    keras.utils.set_random_seed(2)
    new = _self_merge(merge, p_units=6)
    fresh = _kernels(new)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    _check_taken(_kernels(new)["out"], _kernels(old)["out"], fresh["out"],
                 _concat_map([4], [6]), 0, "zero")
    _assert_preserved(new, old, x, x)


def _crossed_sum(a_units=2):
    """Add(concat([a, b]), concat([b, a])): index j and index n + j are both a_j + b_j, so
    the set labels of the merge coincide."""
    x = keras.Input((5,), name="obs")
    a = keras.layers.Dense(a_units, name="a")(x)
    b = keras.layers.Dense(2, name="b")(x)
    ab = keras.layers.Concatenate()([a, b])
    ba = keras.layers.Concatenate()([b, a])
    return keras.Model(x, keras.layers.Dense(3, name="out")(keras.layers.Add()([ab, ba])))


def test_coinciding_merge_sets_get_their_own_labels():
    old, x = _old(_crossed_sum, (5,))
    keras.utils.set_random_seed(2)
    new = _crossed_sum()
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    out = next(w for w in report.plan.weights if w.layer == "out" and w.role == "kernel")
    np.testing.assert_array_equal(out.axes[0].index, np.arange(4))  # not [0, 1, 0, 1]
    _assert_all_copied(new, old)
    _assert_preserved(new, old, x, x)


def test_widening_under_crossed_sums_is_reported_not_preserved():
    """With a wider `a`, the crossed sums pair different units (a_2 + a_0, b_0 + a_1):
    copying cannot keep the old function, and the report says so instead of copying old
    columns twice."""
    old, _ = _old(_crossed_sum, (5,))
    keras.utils.set_random_seed(2)
    report = ks.migrate_weights(old, _crossed_sum(a_units=3))
    assert not report.preserves_function
    assert any("layer 'out'" in w for w in report.warnings), report.warnings


def test_a_removed_feature_repeated_by_a_concatenation_is_still_harmless():
    """Copies of an input column are 0 when the column is (zero-safe like the column)."""
    names = ["hp", "mana", "armor", "speed"]

    def build(n):
        x = keras.Input((n,), name="obs")
        h = keras.layers.Concatenate()([x, x])
        return keras.Model(x, keras.layers.Dense(3, name="out")(h))

    old, x = _old(lambda: build(4), (4,))
    keras.utils.set_random_seed(2)
    new = build(3)
    kept = ["hp", "armor", "speed"]
    report = ks.migrate_weights(old, new, old_features={"obs": names},
                                new_features={"obs": kept})
    assert report.preserves_function, report.warnings
    x_old = x.copy()
    x_old[:, names.index("mana")] = 0.0
    _assert_preserved(new, old, x[:, [names.index(k) for k in kept]], x_old)


# -- a rule that repeats labels is refused ------------------------------------------------------


class Twice(keras.layers.Layer):
    """Its input twice along the last axis."""

    def call(self, x):
        return keras.ops.concatenate([x, x], axis=-1)


def _careless_twice_rule(call):
    x = single_input(call)
    return RuleResult([x[:-1] + (concat_axes([x[-1], x[-1]]),)], check_weights(call, []))


def test_a_rule_result_with_a_repeated_label_is_refused_by_name():
    inp = keras.Input((3,), name="obs")
    model = keras.Model(inp, keras.layers.Dense(2)(Twice(name="twice")(inp)))
    ks.register_rule(Twice, _careless_twice_rule)
    try:
        with pytest.raises(ks.SurgeryError, match=r"layer 'twice' \(Twice\) labels output 0 "
                           r"axis 0 with 'obs\[\d\]' more than once"):
            ks.phi_table(model)
    finally:
        ks.unregister_rule(Twice)


# -- NASNetMobile ---------------------------------------------------------------------------------


def _nasnet(seed):
    keras.utils.set_random_seed(seed)
    return keras.applications.NASNetMobile(weights=None, input_shape=(32, 32, 3), classes=10,
                                           classifier_activation=None)


@pytest.mark.slow_on_other_backends
def test_identity_surgery_on_nasnet_mobile_is_exact():
    """Its cells concatenate a tensor with itself; before each copy had its own labels the
    head read [0, 1, 2, 0, 1, 2]-like maps and the logits moved by up to 29."""
    rng = np.random.default_rng(0)
    old = _nasnet(1)
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    randomize(old, None)
    calibrate_batch_norm(old, x, rng)
    assert_input_sensitive(old, x, rng.normal(size=x.shape).astype("float32"))
    new = _nasnet(2)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    assert report.plan.dropped == []
    _assert_all_copied(new, old)
    _assert_preserved(new, old, x, x)
