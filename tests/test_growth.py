"""Growth beyond widening: layers inserted between old layers start as the identity, new
residual branches start at zero (Net2DeeperNet), and the report says when that is impossible.

Every test randomises an old model (`randomize`), checks that its outputs depend on its input,
builds the new architecture, migrates, and checks the old function numerically, the start
values against their definition (an identity kernel, zero bias, BatchNormalization's
variance 1 - epsilon), and that `preserves_function` tells the truth in both directions.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.labels import LabelSpace, feature_key, unit_key, zero_key
from tests.util import max_diff, predict, preservation_bound, randomized_old

TOL = 1e-6
BATCH = 32

pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


def _old(build, shape, seed=0):
    return randomized_old(build, shape, seed, BATCH)


def _warns_about(report, *parts):
    for part in parts:
        assert any(part in w for w in report.warnings), (part, report.warnings)


def _truthful(report, new, old, batch):
    """preserves_function is checked against the outputs, in both directions."""
    d = max_diff(predict(new, batch), predict(old, batch))
    if report.preserves_function:
        assert d <= TOL, f"promised preservation, max diff {d:.3e}"
    else:
        assert d > 1e-4, f"preserves_function=False but the outputs match ({d:.3e})"
    return d


# -- the label algebra ---------------------------------------------------------------------


def test_sum_with_zero_members_is_the_other_member():
    space = LabelSpace()
    x = space.intern(unit_key("proj", "", 0))
    f = space.intern(unit_key("f_out", "", 0))
    z = space.intern(zero_key("g_out", 0))
    assert space.set_of([x, z], sums=True) == x
    assert space.set_of([space.set_of([x, f]), z], sums=True) == space.set_of([x, f])
    # Not for other merges (x * 0 is 0), and a sum of zeros stays a zero label.
    assert space.set_of([x, z]) != x
    assert space.kind(space.set_of([z, z], sums=True)) == "zero"
    assert space.describe(z) == "0 (g_out[0])"


# -- a Dense or BatchNormalization inserted between old layers ---------------------------------


def _mlp(insert=(), h1="relu"):
    """obs -> h1 (relu) -> [inserted layers] -> h2 (relu) -> out."""
    x = inp = keras.Input((8,), name="obs")
    x = keras.layers.Dense(16, activation=h1, name="h1")(x)
    for make in insert:
        x = make()(x)
    x = keras.layers.Dense(12, activation="relu", name="h2")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x), name="mlp")


def _dense(act, units=16, name="mid"):
    return lambda: keras.layers.Dense(units, activation=act, name=name)


def _bn(name="mid_bn", **kwargs):
    return lambda: keras.layers.BatchNormalization(name=name, **kwargs)


@pytest.mark.parametrize("act", ["relu", "linear", "elu"])
def test_dense_inserted_starts_as_identity(act):
    old, batch = _old(_mlp, (8,))
    new = _mlp([_dense(act)])
    report = ks.migrate_weights(old, new)

    assert report.preserves_function, report.warnings
    assert report.plan.starts == {"mid": "identity"}
    assert _truthful(report, new, old, batch) == 0.0  # relu(I h + 0) = h exactly, h >= 0
    mid = new.get_layer("mid")
    np.testing.assert_array_equal(mid.kernel.numpy(), np.eye(16, dtype="float32"))
    np.testing.assert_array_equal(mid.bias.numpy(), np.zeros(16, dtype="float32"))
    for name in ("h1", "h2", "out"):  # h2 reads h1's labels again, so it is copied
        for a, b in zip(new.get_layer(name).weights, old.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    statuses = {(w.layer, w.role): w.status for w in report.plan.weights}
    assert statuses[("mid", "kernel")] == "start" and statuses[("h2", "kernel")] == "copied"
    kernel = next(w for w in report.plan.weights if w.layer == "mid" and w.role == "kernel")
    assert (kernel.preset, kernel.zeroed, kernel.fresh) == (16, 16 * 15, 0)
    assert "identity" in report.summary()


@pytest.mark.parametrize(
    "insert, h1, reason",
    [
        ([_dense("tanh")], "relu", "activation 'tanh' is not the identity"),
        ([_dense("relu", units=24)], "relu", "24 units for 16 inputs"),
        # relu is the identity only on inputs >= 0; a linear h1 may be negative
        ([_dense("relu")], "linear", "inputs >= 0"),
        ([lambda: keras.layers.ReLU(name="mid")], "linear", "inputs >= 0"),
        ([lambda: keras.layers.LayerNormalization(name="mid")], "relu", "no identity start"),
        ([lambda: keras.layers.Activation("tanh", name="mid")], "relu", "'tanh' changes values"),
        ([lambda: keras.layers.Rescaling(2.0, name="mid")], "relu", "scales or shifts"),
    ],
    ids=["tanh", "wider", "relu-after-linear", "relu-layer-after-linear", "layer-norm",
         "tanh-layer", "rescaling"],
)
def test_inserted_layer_that_cannot_be_the_identity_is_reported(insert, h1, reason):
    old, batch = _old(lambda: _mlp(h1=h1), (8,))
    new = _mlp(insert, h1=h1)
    report = ks.migrate_weights(old, new)

    assert report.preserves_function is False
    _warns_about(report, "'mid'", reason)
    _truthful(report, new, old, batch)


def test_inserted_weightless_identities_keep_the_function():
    old, batch = _old(_mlp, (8,))
    new = _mlp([lambda: keras.layers.Dropout(0.3, name="drop"),
                lambda: keras.layers.ReLU(name="relu"),  # h1 is a relu output: >= 0
                lambda: keras.layers.Activation("linear", name="lin")])
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    assert report.plan.starts == {}  # nothing to set
    _truthful(report, new, old, batch)


def test_batch_normalization_inserted_starts_as_identity():
    old, batch = _old(_mlp, (8,))
    new = _mlp([_bn(epsilon=1e-3)])
    report = ks.migrate_weights(old, new)

    assert report.preserves_function, report.warnings
    assert report.plan.starts == {"mid_bn": "identity"}
    bn = new.get_layer("mid_bn")
    np.testing.assert_array_equal(bn.gamma.numpy(), np.ones(16, "float32"))
    np.testing.assert_array_equal(bn.beta.numpy(), np.zeros(16, "float32"))
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(16, "float32"))
    # variance + epsilon = 1, so nothing is divided (1 + epsilon would scale by 0.9995)
    np.testing.assert_array_equal(bn.moving_variance.numpy(),
                                  np.full(16, 1 - 1e-3, dtype="float32"))
    # Exact up to rounding: a few float32 epsilons at the scale of the outputs.
    assert _truthful(report, new, old, batch) <= preservation_bound(predict(old, batch))


def test_chain_of_inserted_layers_starts_one_after_another():
    """A BatchNormalization started as the identity lets the relu Dense after it see h1's
    (nonnegative) labels and start as the identity too."""
    old, batch = _old(_mlp, (8,))
    new = _mlp([_bn(), _dense("relu"), _dense("linear", name="mid2"), _dense("relu", name="m3")])
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    assert report.plan.starts == dict.fromkeys(("mid_bn", "mid", "mid2", "m3"), "identity")
    _truthful(report, new, old, batch)


def test_new_head_on_the_trunk_keeps_fresh_values():
    """A new layer that reaches no old layer is not in between: it keeps its initial values,
    even when its width would allow the identity."""
    old, batch = _old(_mlp, (8,))
    base = _mlp()
    head = keras.layers.Dense(12, activation="relu", name="head")(base.get_layer("h2").output)
    new = keras.Model(base.inputs, [base.output, keras.layers.Dense(1, name="v")(head)])
    fresh = new.get_layer("head").kernel.numpy().copy()
    report = ks.migrate_weights(old, new)
    assert report.preserves_function and report.plan.starts == {}
    np.testing.assert_array_equal(new.get_layer("head").kernel.numpy(), fresh)


# -- a new residual branch x + f(x) ------------------------------------------------------------


def _residual(branch=None):
    inp = keras.Input((6,), name="obs")
    x = keras.layers.Dense(16, name="proj")(inp)
    h = keras.layers.Dense(24, activation="relu", name="f_in")(x)
    x = keras.layers.Add(name="add")([x, keras.layers.Dense(16, name="f_out")(h)])
    if branch is not None:
        x = keras.layers.Add(name="g_add")([x, branch(x)])
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x), name="res")


def _dense_branch(x):
    h = keras.layers.Dense(16, activation="relu", name="g_in")(x)
    h = keras.layers.Dense(16, name="g_out")(h)
    return keras.layers.Dropout(0.1, name="g_drop")(h)


def _bn_branch(x):
    h = keras.layers.Dense(32, activation="relu", name="g_in")(x)
    h = keras.layers.Dense(16, name="g_proj")(h)
    return keras.layers.BatchNormalization(name="g_out")(h)


@pytest.mark.parametrize("branch, zeroed", [(_dense_branch, ("kernel", "bias")),
                                             (_bn_branch, ("gamma", "beta"))],
                         ids=["dense", "batchnorm"])
def test_new_residual_branch_starts_at_zero(branch, zeroed):
    old, batch = _old(_residual, (6,))
    new = _residual(branch)
    fresh_in = new.get_layer("g_in").kernel.numpy().copy()
    report = ks.migrate_weights(old, new)

    assert report.preserves_function, report.warnings
    assert report.plan.starts == {"g_out": "zero"}
    assert _truthful(report, new, old, batch) <= TOL
    g_out = new.get_layer("g_out")
    for role in zeroed:
        assert np.all(getattr(g_out, role).numpy() == 0.0), role
    # The branch's first layer learns from its fresh values; the zero start is its last layer.
    np.testing.assert_array_equal(new.get_layer("g_in").kernel.numpy(), fresh_in)
    # The labels say it: the sum is the old stream continued, so "out" reads old labels.
    old_labels, new_labels = report.plan.labels
    stream_old = old_labels.tensors[("add", 0, 0)][-1].ids
    stream_new = new_labels.tensors[("g_add", 0, 0)][-1].ids
    np.testing.assert_array_equal(stream_new, stream_old)
    for a, b in zip(new.get_layer("out").weights, old.get_layer("out").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_new_branch_that_cannot_start_at_zero_is_reported():
    old, batch = _old(_residual, (6,))
    new = _residual(lambda x: keras.layers.Dense(16, activation="sigmoid", name="g_out")(x))
    report = ks.migrate_weights(old, new)
    assert report.preserves_function is False
    _warns_about(report, "'g_add'", "'g_out'", "not 0 at 0")
    _truthful(report, new, old, batch)


# -- convolutions --------------------------------------------------------------------------


def _cnn(insert=None):
    inp = keras.Input((10, 10, 3), name="img")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    if insert is not None:
        x = insert(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x), name="cnn")


def _conv(k, **kwargs):
    return lambda x: keras.layers.Conv2D(8, k, activation="relu", name="mid", **kwargs)(x)


def _conv_block(x):
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="r1")(x)
    h = keras.layers.Conv2D(8, 3, padding="same", name="r2")(h)
    h = keras.layers.BatchNormalization(name="rbn")(h)
    return keras.layers.Add(name="radd")([x, h])


@pytest.mark.parametrize(
    "insert, starts",
    [
        (_conv(3, padding="same"), {"mid": "identity"}),
        (_conv(5, padding="same", dilation_rate=2), {"mid": "identity"}),
        (_conv(1), {"mid": "identity"}),
        (_conv_block, {"rbn": "zero"}),
    ],
    ids=["3x3", "5x5-dilated", "1x1-valid", "residual-block"],
)
def test_conv_inserted_keeps_the_function(insert, starts):
    old, batch = _old(_cnn, (10, 10, 3))
    new = _cnn(insert)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    assert report.plan.starts == starts
    assert _truthful(report, new, old, batch) == 0.0
    if "mid" in starts:
        kernel = new.get_layer("mid").kernel.numpy()
        centre = tuple(k // 2 for k in kernel.shape[:2])
        np.testing.assert_array_equal(kernel[centre], np.eye(8, dtype="float32"))
        assert np.count_nonzero(kernel) == 8


@pytest.mark.parametrize(
    "insert, reason",
    [(_conv(2, padding="same"), "no centre tap"),
     (_conv(3, padding="same", strides=2), "strides (2, 2)"),
     (_conv(3, padding="valid"), "padding 'valid'")],
    ids=["even-kernel", "strided", "valid-3x3"],
)
def test_conv_that_cannot_be_the_identity_is_reported(insert, reason):
    old, batch = _old(_cnn, (10, 10, 3))
    new = _cnn(insert)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function is False
    _warns_about(report, "'mid'", reason)
    _truthful(report, new, old, batch)


# -- the plan as data ----------------------------------------------------------------------


def test_starts_serialise_and_apply_file_to_file(tmp_path):
    old, batch = _old(_mlp, (8,))
    old_path = str(tmp_path / "old.keras")
    old.save(old_path)
    new = _mlp([_bn(), _dense("relu")])
    template = str(tmp_path / "template.keras")
    new.save(template)

    plan = ks.ModelMigrator(old_path).plan(template)
    assert plan.preserves_function and plan.starts == {"mid_bn": "identity", "mid": "identity"}
    data = plan.to_dict()
    assert data["starts"] == plan.starts
    inits = {(w["layer"], w["role"]): w["init"] for w in data["weights"] if w["init"]}
    assert inits[("mid", "kernel")] == {"kind": "identity", "value": 0.0}
    assert inits[("mid_bn", "moving_variance")]["value"] == pytest.approx(1 - 1e-3)
    again = ks.SurgeryPlan.from_dict(data)
    assert again.starts == plan.starts
    assert again.to_dict()["weights"] == data["weights"]

    out = str(tmp_path / "new.keras")
    plan.apply_file(old_path, out, template=template)
    migrated = keras.saving.load_model(out)
    assert max_diff(predict(migrated, batch), predict(old, batch)) <= TOL
    np.testing.assert_array_equal(migrated.get_layer("mid").kernel.numpy(), np.eye(16))


def test_descriptions_of_large_sets_stay_short():
    """A residual stream many blocks deep is a set of many units: warnings show a few members
    and a count instead of every member, and any description is cut at 160 characters."""
    space = LabelSpace()
    label = space.intern(unit_key("embed", "", 0))
    for block in range(12):
        parts = [space.intern(unit_key(f"block_{block}_{k}", "", 0)) for k in range(5)]
        label = space.set_of([label, *parts])
    assert space.describe(label) == "{block_0_0[0], block_0_1[0], embed[0], ... 58 more}"
    small = space.set_of([space.intern(unit_key(n, "", 0)) for n in "abc"])
    assert space.describe(small) == "{a[0], b[0], c[0]}"
    long = space.describe(space.intern(feature_key("obs", "x" * 300, 0)))
    assert len(long) == 160 and long.startswith("obs:xxx") and long.endswith("...")
