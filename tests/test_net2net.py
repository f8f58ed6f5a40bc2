"""policy="net2net": widened layers' new units start as copies of old units (Net2WiderNet).

The oracle is the definition, computed from the old weights only (never from the plan): each
new unit's incoming weights, bias and BatchNormalization statistics equal one old unit's
exactly; the rows of the next layer that read one old unit and its copies are proportional to
the old row and sum to it; and the old outputs are unchanged.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import max_diff, predict, randomized_old

TOL = 1e-5
BATCH = 32

pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


def _old(build, shape, seed=0):
    return randomized_old(build, shape, seed, BATCH)


def _w(model, layer, name):
    return np.array(getattr(model.get_layer(layer), name).numpy())


def _sources(new_cols: np.ndarray, old_cols: np.ndarray) -> np.ndarray:
    """For each new column, the old column it equals exactly (-1 if none)."""
    out = []
    for j in range(new_cols.shape[1]):
        equal = np.nonzero(np.all(old_cols == new_cols[:, [j]], axis=0))[0]
        out.append(int(equal[0]) if len(equal) == 1 else -1)
    return np.array(out)


def _assert_split_rows(new_rows: np.ndarray, old_rows: np.ndarray, groups: np.ndarray) -> None:
    """Rows reading old unit g and its copies (`groups[i]` = g) are shares of old row g."""
    shares = []
    for g in range(len(old_rows)):
        members = np.nonzero(groups == g)[0]
        np.testing.assert_allclose(new_rows[members].sum(0), old_rows[g], rtol=1e-5, atol=1e-6)
        for i in members:
            share = new_rows[i] / old_rows[g]
            np.testing.assert_allclose(share, share[0], rtol=1e-4)
            shares.append(share[0])
    assert min(shares) > 0
    # random shares, not 1/count: the copies get different gradients
    assert len(np.unique(np.round(shares, 6))) > len(old_rows) // 2


def _mlp(w1, w2, *, act="relu", bn=True, n_in=8, n_out=3):
    x = inp = keras.Input((n_in,), name="obs")
    x = keras.layers.Dense(w1, activation=act, name="h1")(x)
    if bn:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dense(w2, activation=act, name="h2")(x)
    return keras.Model(inp, keras.layers.Dense(n_out, name="out")(x), name="mlp")


@pytest.mark.parametrize("act, bn", [("relu", True), ("tanh", False), ("gelu", True)],
                         ids=["relu-bn", "tanh", "gelu-bn"])
def test_mlp_widened_by_splitting_units(act, bn):
    old, batch = _old(lambda: _mlp(16, 12, act=act, bn=bn), (8,))
    new = _mlp(24, 20, act=act, bn=bn)
    report = ks.migrate_weights(old, new, policy="net2net")

    assert report.preserves_function, report.warnings
    d = max_diff(predict(new, batch), predict(old, batch))
    assert d <= TOL, d
    assert report.totals["zeroed"] == 0 and report.totals["fresh"] == 0  # nothing left fresh

    # h1: old columns in place, each new column an exact copy of one old column.
    k1, ok1 = _w(new, "h1", "kernel"), _w(old, "h1", "kernel")
    np.testing.assert_array_equal(k1[:, :16], ok1)
    src = _sources(k1[:, 16:], ok1)
    assert np.all(src >= 0)
    np.testing.assert_array_equal(_w(new, "h1", "bias")[16:], _w(old, "h1", "bias")[src])
    if bn:
        for stat in ("gamma", "beta", "moving_mean", "moving_variance"):
            np.testing.assert_array_equal(_w(new, "bn", stat)[16:], _w(old, "bn", stat)[src])
    # h2 reads the split units: shares of the old rows; its own new units copy old ones.
    k2, ok2 = _w(new, "h2", "kernel"), _w(old, "h2", "kernel")
    groups = np.concatenate([np.arange(16), src])
    src2 = _sources(k2[:, 12:], k2[:, :12])
    assert np.all(src2 >= 0)
    _assert_split_rows(k2[:, :12], ok2, groups)
    # out reads h2's split units the same way; out itself (the model output) is not split.
    _assert_split_rows(_w(new, "out", "kernel"), _w(old, "out", "kernel"),
                       np.concatenate([np.arange(12), src2]))


def test_plan_is_deterministic_and_serialises():
    old, _ = _old(lambda: _mlp(16, 12), (8,))
    plans = [ks.ModelMigrator(old).plan(_mlp(24, 12), policy="net2net") for _ in range(2)]
    assert plans[0].to_dict() == plans[1].to_dict()
    data = plans[0].to_dict()
    kernel = next(w for w in data["weights"] if w["layer"] == "h2" and w["role"] == "kernel")
    rows = kernel["axes"][0]
    assert rows["index"][16:] == [-1] * 8 and min(rows["source"][16:]) >= 0
    # the shares of each old unit sum to 1 (float64 sums: a few ulps of 16 per term)
    shares = np.asarray(rows["share"], dtype=np.float64)
    assert abs(shares.sum() - 16) <= 16 * len(shares) * np.finfo(np.float64).eps
    again = ks.SurgeryPlan.from_dict(data)
    assert again.to_dict()["weights"] == data["weights"]


def test_output_layer_and_new_features_keep_the_preserve_fill():
    """New classes of the output layer are not copies of old ones, and a new input feature
    meets zero rows, as under "preserve"."""
    old, batch = _old(lambda: _mlp(16, 12, n_out=3), (8,))
    new = _mlp(24, 12, n_out=4, n_in=9)
    fresh_out = _w(new, "out", "kernel")
    report = ks.migrate_weights(old, new, policy="net2net", old_features={"obs": list("abcdefgh")},
                                new_features={"obs": list("abcdefghz")})
    assert report.preserves_function, report.warnings
    x_new = np.concatenate([batch, np.ones((BATCH, 1), "float32")], axis=1)
    assert max_diff(predict(new, x_new)[:, :3], predict(old, batch)) <= TOL
    assert np.all(_w(new, "h1", "kernel")[8] == 0.0)  # the new feature's row
    np.testing.assert_array_equal(_w(new, "out", "kernel")[:, 3], fresh_out[:, 3])


def _residual(width):
    inp = keras.Input((6,), name="obs")
    x = keras.layers.Dense(width, name="proj")(inp)
    for b in range(2):
        h = keras.layers.Dense(24, activation="relu", name=f"f{b}_in")(x)
        x = keras.layers.Add(name=f"add{b}")([x, keras.layers.Dense(width, name=f"f{b}_out")(h)])
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x), name="res")


def _cnn(channels):
    inp = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(channels, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="act")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Flatten(name="flat")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x), name="cnn")


def _rnn(kind):
    def build(units):
        inp = keras.Input((5, 4), name="seq")
        layer = getattr(keras.layers, kind)
        x = layer(units, return_sequences=True, name="r1")(inp)
        x = layer(units, name="r2")(x)
        return keras.Model(inp, keras.layers.Dense(3, name="out")(x), name="rnn")
    return build


@pytest.mark.parametrize(
    "build, small, big, shape",
    [
        (_residual, 16, 24, (6,)),  # every writer of the stream picks the same sources
        (_cnn, 6, 9, (8, 8, 3)),  # channels through BN, pooling and Flatten
        (_rnn("LSTM"), 6, 10, (5, 4)),  # gates and hidden units split together
        (_rnn("GRU"), 6, 10, (5, 4)),
    ],
    ids=["residual-stream", "conv-bn-flatten", "lstm", "gru"],
)
def test_other_families_widened_by_splitting(build, small, big, shape):
    old, batch = _old(lambda: build(small), shape)
    new = build(big)
    report = ks.migrate_weights(old, new, policy="net2net")
    assert report.preserves_function, report.warnings
    assert report.totals["fresh"] == 0
    d = max_diff(predict(new, batch), predict(old, batch))
    assert d <= TOL, d


def test_optimizer_slots_of_split_units_are_zero():
    old, batch = _old(lambda: _mlp(16, 12, bn=False), (8,))
    old.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    old.fit(batch, np.zeros((BATCH, 3), "float32"), epochs=1, verbose=0)
    new = _mlp(24, 12, bn=False)
    new.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    report = ks.migrate_weights(old, new, policy="net2net")
    assert report.preserves_function, report.warnings

    def slot(model, layer, which):
        prefix = model.get_layer(layer).kernel.path.replace("/", "_")
        (found,) = [v for v in model.optimizer.variables if v.name == f"{prefix}_{which}"]
        return np.array(found.numpy())

    for which in ("momentum", "velocity"):
        m_new, m_old = slot(new, "h1", which), slot(old, "h1", which)
        np.testing.assert_array_equal(m_new[:, :16], m_old)  # copied as they are
        assert np.all(m_new[:, 16:] == 0.0)  # split units start without momentum
        # rows reading split units: old entries unchanged (not scaled by the shares)
        np.testing.assert_array_equal(slot(new, "h2", which)[:16], slot(old, "h2", which))


def test_training_breaks_the_symmetry_of_copies():
    """Unequal shares give copies different gradients: after a few steps of training, a unit
    and its copy no longer have the same incoming weights."""
    old, batch = _old(lambda: _mlp(8, 8, bn=False), (8,))
    new = _mlp(12, 8, bn=False)
    ks.migrate_weights(old, new, policy="net2net")
    k = _w(new, "h1", "kernel")
    src = _sources(k[:, 8:], k[:, :8])
    new.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    y = np.random.default_rng(3).normal(size=(BATCH, 3)).astype("float32")
    new.fit(batch, y, epochs=5, batch_size=BATCH, verbose=0)
    k = _w(new, "h1", "kernel")
    assert np.abs(k[:, 8:] - k[:, src]).max() > 1e-4


@pytest.mark.parametrize("block_bytes", [None, 8], ids=["whole", "row-blocks"])
def test_file_to_file_gives_the_live_values(tmp_path, monkeypatch, block_bytes):
    if block_bytes is not None:  # the live migration copies row blocks (split shares too)
        monkeypatch.setattr("keras_surgery.fill.COPY_BLOCK_BYTES", block_bytes)
    old, batch = _old(lambda: _mlp(16, 12), (8,))
    old_path = str(tmp_path / "old.keras")
    old.save(old_path)
    keras.utils.set_random_seed(5)
    live = _mlp(24, 16)
    template = str(tmp_path / "template.keras")
    live.save(template)
    ks.migrate_weights(old_path, live, policy="net2net")

    plan = ks.ModelMigrator(old_path).plan(template, policy="net2net")
    out = str(tmp_path / "new.keras")
    plan.apply_file(old_path, out, template=template)
    migrated = keras.saving.load_model(out)
    for a, b in zip(migrated.weights, live.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert max_diff(predict(migrated, batch), predict(old, batch)) <= TOL


def test_widened_and_deepened_at_once():
    """net2net widening and an inserted layer (started as the identity) in one surgery."""
    old, batch = _old(lambda: _mlp(16, 12, bn=False), (8,))

    def deeper():
        x = inp = keras.Input((8,), name="obs")
        x = keras.layers.Dense(24, activation="relu", name="h1")(x)
        x = keras.layers.Dense(24, activation="relu", name="mid")(x)
        x = keras.layers.Dense(12, activation="relu", name="h2")(x)
        return keras.Model(inp, keras.layers.Dense(3, name="out")(x))

    new = deeper()
    report = ks.migrate_weights(old, new, policy="net2net")
    assert report.preserves_function, report.warnings
    assert report.plan.starts == {"mid": "identity"}
    assert max_diff(predict(new, batch), predict(old, batch)) <= TOL
    # "random" promises nothing and starts nothing
    again = ks.migrate_weights(old, deeper(), policy="random")
    assert again.plan.starts == {} and not again.preserves_function
