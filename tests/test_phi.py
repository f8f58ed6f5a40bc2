"""The phi table: input feature -> weight slices that depend on it."""

import keras
import numpy as np
import pytest

import keras_surgery as ks


def _two_branch_model():
    a = keras.Input((4,), name="obs")
    b = keras.Input((2,), name="glob")
    ha = keras.layers.Dense(5, name="enc_obs")(a)
    hb = keras.layers.Dense(3, name="enc_glob")(b)
    h = keras.layers.Concatenate(name="cat")([ha, hb])
    h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Dense(2, name="head")(h)
    return keras.Model([a, b], out)


FEATURES = {"obs": ["hp", ("pos", 2), "mana"]}


def _as_dict(table):
    return {
        key: {(s.path, s.axis): s.indices.tolist() for s in slices}
        for key, slices in table.items()
    }


def test_phi_rows_follow_features_and_branches():
    table = ks.phi_table(_two_branch_model(), features=FEATURES)
    phi = _as_dict(table)
    assert set(phi) == {("obs", "hp"), ("obs", "pos"), ("obs", "mana"), ("glob", 0), ("glob", 1)}
    assert phi[("obs", "hp")][("enc_obs/kernel", 0)] == [0]
    assert phi[("obs", "pos")][("enc_obs/kernel", 0)] == [1, 2]
    assert phi[("obs", "mana")][("enc_obs/kernel", 0)] == [3]
    # an obs feature never reaches the glob encoder; after the concatenation only its own
    # part of the BatchNorm and of the head kernel depends on it
    assert ("enc_glob/kernel", 0) not in phi[("obs", "hp")]
    assert phi[("obs", "hp")][("bn/gamma", 0)] == [0, 1, 2, 3, 4]
    assert phi[("glob", 1)][("bn/gamma", 0)] == [5, 6, 7]
    assert phi[("glob", 0)][("head/kernel", 0)] == [5, 6, 7]
    # biases and the output side of kernels are not input-side entries
    assert all(path.endswith(("kernel", "gamma", "beta", "moving_mean", "moving_variance"))
               for path, _ in phi[("glob", 0)])


def test_phi_from_file_equals_phi_from_live_model(tmp_path):
    model = _two_branch_model()
    path = tmp_path / "m.keras"
    model.save(path)
    live = _as_dict(ks.phi_table(model, features=FEATURES))
    from_file = _as_dict(ks.phi_table(str(path), features=FEATURES))
    assert live == from_file


@pytest.mark.tensorflow_only  # the gradient comes from tf.GradientTape directly
def test_phi_slices_are_the_dependent_rows_numerically():
    """Gradient check: perturbing a feature changes exactly the first-layer rows phi names."""
    import tensorflow as tf

    model = _two_branch_model()
    table = ks.phi_table(model, features=FEATURES)
    kernel = model.get_layer("enc_obs").kernel
    for k, key in enumerate([("obs", "hp"), ("obs", "pos"), ("obs", "pos"), ("obs", "mana")]):
        x = np.zeros((1, 4), "float32")
        x[0, k] = 1.0
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(model([x, np.zeros((1, 2), "float32")], training=False))
        grad = tape.gradient(y, kernel).numpy()
        rows = set(np.nonzero(np.abs(grad).sum(axis=1))[0].tolist())
        (listed,) = [s.indices.tolist() for s in table[key] if s.path == "enc_obs/kernel"]
        assert rows <= set(listed) and k in listed
