"""The gradient-mapping verifier: phi agrees with gradients on good rules and names the exact
feature and indices of a wrong one; verify= in migrate_weights checks the surgery numerically."""

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.rules.elementwise import passthrough_rule
from keras_surgery.verify import check_preservation
from tests.util import randomize

L = keras.layers


def _assert_agrees(model, **kwargs):
    result = ks.verify_mapping(model, **kwargs)
    assert result.ok, result.summary()
    assert result.checked > 0 and result.features
    return result


# -- agreement on built-in rules ------------------------------------------------------------------


def test_dense_mlp_agrees_and_summary_says_ok():
    x = keras.Input((7,), name="obs")
    h = L.Dense(9, activation="relu", name="d1")(x)
    h = L.Dropout(0.5, name="drop")(h)
    h = L.Dense(8, activation="tanh", name="d2")(h)
    model = keras.Model(x, L.Dense(3, name="head")(h))
    result = _assert_agrees(model)
    assert len(result.features) == 7
    assert result.checked == 7 * 3  # three kernels, one input-side axis each
    assert result.summary().startswith(f"Gradient verification of model '{model.name}': OK")
    assert result.to_dict()["ok"] is True


def test_residual_add_agrees():
    x = keras.Input((6,), name="obs")
    h = L.Dense(6, activation="relu", name="f")(x)
    h = L.Add(name="res")([x, h])
    h = L.Dense(5, activation="relu", name="g")(h)
    model = keras.Model(x, L.Dense(2, name="head")(h))
    _assert_agrees(model)


def test_concatenate_two_inputs_with_named_features_agrees():
    obs = keras.Input((4,), name="obs")
    glob = keras.Input((2,), name="glob")
    h = L.Concatenate(name="cat")([
        L.Dense(5, activation="relu", name="enc_obs")(obs),
        L.Dense(3, activation="relu", name="enc_glob")(glob),
    ])
    h = L.Dense(6, activation="relu", name="mid")(h)
    model = keras.Model([obs, glob], [L.Dense(2, name="a")(h), L.Dense(1, name="b")(h)])
    result = _assert_agrees(model, features={"obs": ["hp", ("pos", 2), "mana"]})
    assert result.features == [("obs", "hp"), ("obs", "pos"), ("obs", "mana"),
                               ("glob", 0), ("glob", 1)]


def test_batch_normalization_agrees_and_added_terms_are_unverified():
    x = keras.Input((5,), name="obs")
    h = L.Dense(6, activation="relu", name="d")(x)
    h = L.BatchNormalization(name="bn")(h)
    model = keras.Model(x, L.Dense(2, name="head")(h))
    randomize(model, [np.random.default_rng(0).normal(size=(16, 5)).astype("float32")])
    result = _assert_agrees(model)
    unverified = {u.path: u.reason for u in result.unverified}
    assert set(unverified) == {"bn/beta", "bn/moving_mean"}
    assert "added" in unverified["bn/beta"]
    # the multiplied per-channel weights are checked
    checked_paths = {"bn/gamma", "bn/moving_variance"}
    assert not checked_paths & set(unverified)


@pytest.mark.parametrize("equation", ["ab,bc->ac", "...b,bc->...c"])
def test_einsum_dense_agrees(equation):
    x = keras.Input((6,), name="obs")
    h = L.EinsumDense(equation, output_shape=8, bias_axes="c", activation="relu", name="e1")(x)
    h = L.Reshape((2, 4), name="split")(h)
    h = L.EinsumDense("abc,cd->abd", output_shape=(2, 3), bias_axes="d", name="e2")(h)
    h = L.EinsumDense("abc,bc->abc", output_shape=(2, 3), name="scale")(h)  # diag kernel
    h = L.Flatten(name="flat")(h)
    model = keras.Model(x, L.Dense(2, name="head")(h))
    result = _assert_agrees(model)
    assert not [u for u in result.unverified if "opaque" in u.reason], result.summary()


def test_multi_head_attention_block_agrees():
    x = keras.Input((4, 6), name="seq")
    h = L.MultiHeadAttention(num_heads=2, key_dim=3, name="mha")(x, x)
    h = L.Add(name="res")([x, h])
    h = L.LayerNormalization(name="ln")(h)
    h = L.GlobalAveragePooling1D(name="pool")(h)
    model = keras.Model(x, L.Dense(2, name="head")(h))
    result = _assert_agrees(model)
    paths = {m for m in ("mha/query_dense/kernel", "mha/key_dense/kernel",
                         "mha/value_dense/kernel", "mha/output_dense/kernel")}
    assert all(not u.path or u.path not in paths for u in result.unverified)


def test_layer_normalization_alone_agrees():
    """Each LayerNormalization output reads its whole axis: phi must say so, too."""
    x = keras.Input((5,), name="obs")
    h = L.LayerNormalization(name="ln")(x)
    _assert_agrees(keras.Model(x, L.Dense(2, name="head")(h)))


def test_shared_layer_reads_the_features_of_every_call():
    a = keras.Input((3, 2), name="allies")
    b = keras.Input((2, 2), name="enemies")
    enc = L.Dense(4, activation="relu", name="encoder")
    h = L.Concatenate(name="cat")([L.Flatten(name="fa")(enc(a)), L.Flatten(name="fb")(enc(b))])
    result = _assert_agrees(keras.Model([a, b], L.Dense(2, name="head")(h)))
    assert ("enemies", 0) in result.features


def test_cross_attention_scale_reads_query_and_key_features():
    q = keras.Input((3, 4), name="q")
    v = keras.Input((5, 4), name="v")
    h = L.AdditiveAttention(name="att")([q, v])
    model = keras.Model([q, v], L.Dense(2, name="head")(L.Flatten(name="flat")(h)))
    result = ks.verify_mapping(model)
    # Every dependency the gradients show is listed. (Probed alone, a query feature meets
    # all-zero values, so its effect on the output is exactly 0: such entries can only show
    # up as "listed by phi, not reached", never as a missed dependency.)
    assert not result.missing, result.summary()
    assert result.checked == 8 * 2


def test_conv_model_agrees():
    pytest.importorskip("keras_surgery.rules.conv")
    x = keras.Input((8, 8, 3), name="img")
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="c1")(x)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.MaxPooling2D(name="pool")(h)
    h = L.Conv2D(5, 1, name="pw")(h)
    h = L.Flatten(name="flat")(h)
    _assert_agrees(keras.Model(x, L.Dense(2, name="head")(h)),
                   features={"img": ["r", "g", "b"]})


def test_dense_over_time_after_permute_agrees():
    """Each kernel row over time reads every feature at that time step."""
    pytest.importorskip("keras_surgery.rules.reshaping")
    x = keras.Input((6, 4), name="obs")
    h = L.Permute((2, 1), name="swap")(x)
    h = L.Dense(5, activation="relu", name="over_time")(h)
    _assert_agrees(keras.Model(x, L.Dense(2, name="head")(L.Flatten(name="flat")(h))))


def test_recurrent_model_agrees():
    pytest.importorskip("keras_surgery.rules.recurrent")
    x = keras.Input((4, 5), name="seq")
    h = L.LSTM(6, return_sequences=True, name="lstm")(x)
    h = L.GRU(3, name="gru")(h)
    _assert_agrees(keras.Model(x, L.Dense(2, name="head")(h)))


def test_sample_verifies_that_many_features():
    x = keras.Input((12,), name="obs")
    model = keras.Model(x, L.Dense(2, name="head")(L.Dense(4, name="d")(x)))
    result = ks.verify_mapping(model, sample=3, seed=5)
    assert result.ok and len(result.features) == 3
    assert result.features == ks.verify_mapping(model, sample=3, seed=5).features


# -- planted wrong rules --------------------------------------------------------------------------


class Reverse(L.Layer):
    """Reverses its feature axis."""

    def call(self, x):
        return keras.ops.flip(x, axis=-1)


class Mix(L.Layer):
    """Mixes features: x @ a fixed dense matrix."""

    def build(self, input_shape):
        n = input_shape[-1]
        self.matrix = np.random.default_rng(0).normal(size=(n, n)).astype("float32")

    def call(self, x):
        return keras.ops.matmul(x, self.matrix)


class Offset(L.Layer):
    """x + 1: keeps every index in place but moves its zero."""

    def call(self, x):
        return x + 1.0


@pytest.fixture
def wrong_rules():
    """Registers each custom layer as a per-feature pass-through (wrong for all three)."""
    for cls in (Reverse, Mix, Offset):
        ks.register_rule(cls, passthrough_rule)
    yield
    for cls in (Reverse, Mix, Offset):
        ks.unregister_rule(cls)


def _through(layer, n=5, name="obs"):
    x = keras.Input((n,), name=name)
    h = layer(x)
    h = L.Dense(4, activation="relu", name="dense")(h)
    return keras.Model(x, L.Dense(2, name="head")(h))


def test_reversing_layer_registered_as_passthrough_is_named_exactly(wrong_rules):
    result = ks.verify_mapping(_through(Reverse(name="reverse")))
    assert not result.ok
    found = {(m.feature, m.path, m.axis): (m.only_symbolic.tolist(), m.only_gradient.tolist())
             for m in result.mismatches}
    # column k really reaches kernel row 4 - k; phi says row k; the middle one is right
    assert found == {
        (("obs", k), "dense/kernel", 0): ([k], [4 - k]) for k in (0, 1, 3, 4)
    }
    assert result.missing == result.mismatches
    assert "feature obs:0: 'dense/kernel' axis 0: phi lists [0]" in result.summary()


def test_mixing_layer_registered_as_passthrough_is_named_exactly(wrong_rules):
    result = ks.verify_mapping(_through(Mix(name="mix")), features={"obs": list("abcde")})
    found = {(m.feature, m.path, m.axis): (m.only_symbolic.tolist(), m.only_gradient.tolist())
             for m in result.mismatches}
    names = list("abcde")
    assert found == {
        (("obs", f), "dense/kernel", 0): ([], [j for j in range(5) if j != i])
        for i, f in enumerate(names)
    }


def test_integer_input_is_unverified_not_counted():
    tokens = keras.Input((3,), dtype="int32", name="tokens")
    obs = keras.Input((4,), name="obs")
    e = L.Flatten(name="flat")(L.Embedding(10, 2, name="emb")(tokens))
    h = L.Concatenate(name="cat")([e, obs])
    h = L.Dense(5, activation="relu", name="d")(h)
    model = keras.Model([tokens, obs], L.Dense(2, name="head")(h))
    result = ks.verify_mapping(model)
    assert result.ok, result.summary()
    assert result.features == [("obs", k) for k in range(4)]
    reasons = {u.feature: u.reason for u in result.unverified if u.feature is not None}
    assert set(reasons) == {("tokens", k) for k in range(3)}
    assert all("int32" in r for r in reasons.values())
    assert any(u.path == "emb/embeddings" and u.axis == 0 for u in result.unverified)


def test_the_users_model_is_not_touched():
    model = _through(L.Identity(name="same"))
    before = [np.array(v.numpy()) for v in model.weights]
    ks.verify_mapping(model)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.weights))


# -- verify= in migrate_weights ------------------------------------------------------------------


def _pair(layer_old, layer_new, old_names, new_names):
    old = _through(layer_old, len(old_names))
    randomize(old, None)
    new = _through(layer_new, len(new_names))
    return old, new, {"obs": old_names}, {"obs": new_names}


def test_verify_true_passes_on_a_good_surgery():
    old, new, of, nf = _pair(L.Identity(name="same"), L.Identity(name="same"),
                             ["a", "b", "c"], ["a", "new", "b", "c"])
    report = ks.migrate_weights(old, new, old_features=of, new_features=nf, verify=True)
    assert report.preserves_function
    check = report.verification
    assert check.ok and check.mapping.ok
    (out,) = check.preservation.outputs
    assert out.compared == 8 * 2 and out.max_abs <= 1e-5
    assert report.to_dict()["verification"]["ok"] is True


def test_verify_true_raises_on_a_wrong_rule_and_restores_the_model(wrong_rules):
    old, new, of, nf = _pair(Reverse(name="rev"), Reverse(name="rev"),
                             ["a", "b", "c"], ["a", "new", "b", "c"])
    before = [np.array(v.numpy()) for v in new.weights]
    with pytest.raises(ks.SurgeryError) as info:
        ks.migrate_weights(old, new, old_features=of, new_features=nf, verify=True)
    message = str(info.value)
    assert "promised to preserve" in message and "'head'" in message
    # the gradient check points at the layer after the wrongly labelled one
    assert "labels some index wrongly" in message and "'dense/kernel'" in message
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, new.weights))


def test_verify_true_with_an_old_file_raises_on_a_wrong_rule_before_writing(
    wrong_rules, tmp_path
):
    old, new, of, nf = _pair(Reverse(name="rev"), Reverse(name="rev"),
                             ["a", "b", "c"], ["a", "new", "b", "c"])
    path = str(tmp_path / "old.keras")
    old.save(path)
    before = [np.array(v.numpy()) for v in new.weights]
    with pytest.raises(ks.SurgeryError, match="labels some index wrongly.*not changed"):
        ks.migrate_weights(path, new, old_features=of, new_features=nf, verify=True)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, new.weights))


def test_verify_true_raises_when_promised_outputs_differ_and_restores(wrong_rules):
    # Offset keeps indices in place (the gradients agree) but moves the zero: with feature "b"
    # removed, the old model sees 0 + 1 where the new model has nothing, which the wrong rule
    # hides from the planner.
    old, new, of, nf = _pair(Offset(name="offset"), Offset(name="offset"),
                             ["a", "b", "c"], ["a", "c"])
    assert ks.verify_mapping(new, features=nf).ok
    before = [np.array(v.numpy()) for v in new.weights]
    with pytest.raises(ks.SurgeryError, match="promised to preserve.*differ"):
        ks.migrate_weights(old, new, old_features=of, new_features=nf, verify=True)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, new.weights))


def test_verify_warn_records_the_failure_in_the_report(wrong_rules):
    old, new, of, nf = _pair(Offset(name="offset"), Offset(name="offset"),
                             ["a", "b", "c"], ["a", "c"])
    report = ks.migrate_weights(old, new, old_features=of, new_features=nf, verify="warn")
    assert not report.preserves_function
    assert any("promised to preserve" in w for w in report.warnings)
    assert not report.verification.ok and not report.verification.preservation.ok


def test_verify_with_an_old_file_says_outputs_were_not_compared(tmp_path):
    old, new, of, nf = _pair(L.Identity(name="same"), L.Identity(name="same"),
                             ["a", "b"], ["a", "b", "c"])
    path = str(tmp_path / "old.keras")
    old.save(path)
    report = ks.migrate_weights(path, new, old_features=of, new_features=nf, verify=True)
    assert report.verification.preservation is None and report.verification.mapping.ok
    assert any("deserialising" in w for w in report.warnings)


def test_verify_rejects_unknown_modes():
    old, new, of, nf = _pair(L.Identity(name="same"), L.Identity(name="same"), ["a"], ["a"])
    with pytest.raises(ks.SurgeryError, match="verify must be"):
        ks.migrate_weights(old, new, verify="sometimes")


def test_preservation_check_follows_moved_columns_and_widened_outputs():
    x = keras.Input((3,), name="obs")
    old = keras.Model(x, L.Dense(2, name="head")(L.Dense(4, activation="relu", name="d")(x)))
    randomize(old, None)
    y = keras.Input((4,), name="obs")
    new = keras.Model(y, L.Dense(3, name="head")(L.Dense(6, activation="relu", name="d")(y)))
    migrator = ks.ModelMigrator(old, old_features={"obs": ["a", "b", "c"]})
    plan = migrator.plan(new, new_features={"obs": ["c", "a", "new", "b"]})
    plan.apply(new)
    check = check_preservation(old, new, plan)
    assert check.ok, check.summary()
    (out,) = check.outputs
    assert out.compared == 8 * 2  # the old head's two units, not the new third one
    # a model that ignores the column moves fails the same check
    new.get_layer("d").kernel.assign(new.get_layer("d").kernel.numpy()[[1, 0, 2, 3]])
    assert not check_preservation(old, new, plan).ok


def test_check_rule_runs_the_verifier():
    from keras_surgery.testing import check_rule

    result = check_rule(lambda **kw: L.Dense(name="layer", **kw), (5,),
                        old_kwargs=dict(units=3), new_kwargs=dict(units=4))
    assert result.verification is not None and result.verification.ok
