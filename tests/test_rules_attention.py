"""Attention layers: more heads, larger key_dim and value_dim, a wider residual stream."""

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import assert_input_sensitive, max_diff, predict, randomize

T, STEPS = 6, 5


def _block(width, heads, key_dim, value_dim, *, seed, extra_feature=False):
    keras.utils.set_random_seed(seed)
    n_in = 5 + (1 if extra_feature else 0)
    x = keras.Input((T, n_in), name="x")
    h = keras.layers.Dense(width, name="embed")(x)
    a = keras.layers.MultiHeadAttention(heads, key_dim, value_dim=value_dim, name="mha")(h, h)
    h = keras.layers.Add(name="residual")([h, a])
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model(x, out)


@pytest.mark.parametrize(
    "change",
    [
        dict(heads=3),
        dict(key_dim=6),
        dict(value_dim=7),
        dict(width=12),
        dict(heads=3, key_dim=6, value_dim=6, width=12, extra_feature=True),
    ],
    ids=["heads", "key_dim", "value_dim", "width", "everything"],
)
def test_multi_head_attention_growth_is_exact(tmp_path, change):
    base = dict(width=8, heads=2, key_dim=4, value_dim=4)
    dims = {**base, **change}
    if keras.backend.backend() == "jax" and dims["key_dim"] != dims["value_dim"]:
        pytest.skip("Keras 3.15's MultiHeadAttention on JAX cannot run key_dim != value_dim "
                    "(jax.nn.dot_product_attention wants one head size), surgery or not")
    rng = np.random.default_rng(0)
    x_old = rng.normal(size=(STEPS, T, 5)).astype("float32")
    old = _block(**base, seed=1)
    randomize(old, x_old)
    assert_input_sensitive(old, x_old, rng.normal(size=x_old.shape).astype("float32"))
    path = tmp_path / "old.keras"
    old.save(path)
    extra = change.pop("extra_feature", False)
    new = _block(**{**base, **change}, seed=2, extra_feature=extra)
    report = ks.migrate_weights(str(path), new)
    assert report.preserves_function, report.warnings
    x_new = x_old
    if extra:
        x_new = np.concatenate([x_old, rng.normal(size=(STEPS, T, 1)).astype("float32")], -1)
    assert max_diff(predict(old, x_old), predict(new, x_new)) <= 1e-5

    # Oracle for the query projection: copied block scaled by sqrt(new/old key_dim), new
    # key_dim columns zero.
    mha_old, mha_new = old.get_layer("mha"), new.get_layer("mha")
    q_old = mha_old._query_dense.kernel.numpy()
    q_new = mha_new._query_dense.kernel.numpy()
    d, h, k = q_old.shape
    factor = np.sqrt(q_new.shape[2] / k)
    np.testing.assert_allclose(q_new[:d, :h, :k], q_old * factor, rtol=1e-6)
    assert np.all(q_new[:, :h, k:] == 0)
    o_old = mha_old._output_dense.kernel.numpy()
    o_new = mha_new._output_dense.kernel.numpy()
    np.testing.assert_array_equal(o_new[:h, : o_old.shape[1], : o_old.shape[2]], o_old)
    old_out = o_old.shape[2]  # new heads / value_dim rows feed old output units with zeros
    assert np.all(o_new[h:, :, :old_out] == 0) and np.all(o_new[:, o_old.shape[1]:, :old_out] == 0)


def _attention_model(kind, dim, seed):
    keras.utils.set_random_seed(seed)
    q = keras.Input((T, dim), name="q")
    v = keras.Input((T + 1, dim), name="v")
    layer = {
        "dot": keras.layers.Attention(name="att"),
        "additive": keras.layers.AdditiveAttention(name="att"),
    }[kind]
    return keras.Model([q, v], keras.layers.Dense(2, name="out")(layer([q, v])))


def test_additive_attention_with_a_new_feature_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    old = _attention_model("additive", 4, 0)
    randomize(old, None)
    new = _attention_model("additive", 5, 1)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    q, v = rng.normal(size=(3, T, 4)), rng.normal(size=(3, T + 1, 4))
    q5 = np.concatenate([q, rng.normal(size=(3, T, 1))], -1)
    v5 = np.concatenate([v, rng.normal(size=(3, T + 1, 1))], -1)
    assert max_diff(predict(old, [q, v]), predict(new, [q5, v5])) <= 1e-5
    assert new.get_layer("att").scale.numpy()[4] == 0


def test_dot_attention_with_a_new_feature_cannot_preserve():
    old = _attention_model("dot", 4, 0)
    new = _attention_model("dot", 5, 1)
    report = ks.migrate_weights(old, new)
    assert not report.preserves_function
    assert any("'att'" in w and "query features" in w for w in report.warnings)
