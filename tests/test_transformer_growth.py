"""Exact transformer growth (issue 20) for keras-hub's pre-RMSNorm decoders: hidden_dim grown
with the heads in proportion (head_dim kept), query and key/value heads grown with the grouping
kept, the optimizer's slots following every rescale.

The operator: new residual dims start at 0 wherever they are written (token embedding columns,
attention output and down projection columns), and every RMS norm over the grown residual
axis has its gain multiplied by c = sqrt(d_old / d_new): the mean of squares over d_new dims,
d_new - d_old of them 0, is d_old / d_new times the old one. Exact up to epsilon, which then
acts as epsilon * d_new / d_old (checked on its own with a large epsilon).

Tiny configurations (vocabulary 50, 2 layers, hidden 32 -> 48, 4 -> 6 query heads over
2 -> 3 key/value heads, head_dim 8, intermediate 64), every weight redrawn at a scale where
every layer matters, and old models shown to depend on their tokens. Skipped without keras-hub.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.report import operator_lines
from tests.test_hub_decoders import (  # noqa: F401  (_llama_config: an autouse fixture)
    _batch,
    _calibrate,
    _causal_lm,
    _llama_config,
    _old,
)
from tests.util import adam_slots, assert_input_sensitive, max_diff, predict, preservation_bound

keras_hub = pytest.importorskip("keras_hub")

EPS32 = float(np.finfo(np.float32).eps)
OLD = dict(hidden_dim=32, num_query_heads=4, num_key_value_heads=2, intermediate_dim=64)
GROWN = dict(hidden_dim=48, num_query_heads=6, num_key_value_heads=3, intermediate_dim=64)
C = (32 / 48) ** 0.5
RMS_FAMILIES = ("llama", "mistral", "qwen", "qwen3")


def _sizes(family: str, **kw) -> dict:
    sizes = dict(kw)
    if family in ("qwen3", "gemma"):
        sizes["head_dim"] = sizes["hidden_dim"] // sizes["num_query_heads"]
    return sizes


def _variables(model) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def _path(variables: dict, tail: str) -> str:
    (path,) = [p for p in variables if p.endswith(tail)]
    return path


def _epsilon_term(old, batch, n_norms: int, epsilon: float, grown: float) -> float:
    """A bound on the change the epsilon term makes to the old outputs: a norm computes
    x * g * rsqrt(ms + grown * epsilon) instead of rsqrt(ms + epsilon), a relative change of at
    most (grown - 1) * epsilon / (2 * ms); summed over the norms, at the outputs' scale. ms is
    the smallest mean square of the residual streams the norms read that the graph exposes
    (the embeddings, each decoder layer's output), halved for the streams it does not."""
    backbone = old.backbone
    streams = [backbone.token_embedding.output] + [
        layer.output for layer in backbone.transformer_layers]
    probe = keras.Model(backbone.inputs, streams)
    ms = min(float(np.min(np.mean(np.square(keras.ops.convert_to_numpy(s)), axis=-1)))
             for s in probe(batch))
    scale = float(np.max(np.abs(predict(old, batch))))
    return n_norms * (grown - 1.0) * epsilon / (2.0 * ms / 2.0) * scale


# -- hidden_dim through the RMS norms ---------------------------------------------------------


@pytest.mark.slow_on_other_backends
@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_hidden_growth_with_heads_keeps_old_logits(family):
    """hidden 32 -> 48 with 4 -> 6 heads over 2 -> 3 key/value heads (head_dim 8 kept): the
    logits of the old tokens are kept, the verifier agrees, and the report names the operator
    of every norm (5: two per layer and the final one)."""
    old = _old(_causal_lm, family, 1, **_sizes(family, **OLD))
    new = _causal_lm(family, 2, **_sizes(family, **GROWN))
    report = ks.migrate_weights(old, new, verify=True)

    assert report.preserves_function, report.warnings
    assert report.verification.ok, report.verification.summary()
    notes = [w for w in report.warnings if "sqrt(32/48) = 0.8165" in w]
    assert len(notes) == 5 and all("epsilon * 48/32" in w for w in notes), report.warnings
    batch = _batch(3)
    old_y, new_y = predict(old, batch), predict(new, batch)
    epsilon = float(old.backbone.transformer_layers[0].layer_norm_epsilon)
    bound = preservation_bound(old_y, ulps=32) + _epsilon_term(old, batch, 5, epsilon, 1.5)
    assert max_diff(old_y, new_y) <= bound, (max_diff(old_y, new_y), bound)

    before, after = _variables(old), _variables(new)
    gains = [p for p in after if p.endswith("/scale")
             and after[p].shape == (48,)]  # not Qwen3's per-head query/key norms
    assert len(gains) == 5
    for path in gains:
        np.testing.assert_array_equal(after[path][:32], before[path] * C)  # x0.8165
    lines = operator_lines(report.plan)
    assert sum("scale': values x0.8165 ((48/32) ** -0.5, axis 0 grew 32 -> 48)" in line
               for line in lines) == 5, lines
    assert sum(line.endswith("start at 0") for line in lines) >= 4, lines  # the projections
    written = [p for p in after if p.endswith(("token_embedding/embeddings",
                                               "attention_output/kernel",
                                               "feedforward_output_dense/kernel"))]
    assert len(written) == 5
    for path in written:  # the residual stream's new dims start at 0 where they are written
        assert np.all(after[path][..., 32:] == 0), path
        assert np.abs(before[path]).max() > 0
    table = _path(after, "token_embedding/embeddings")
    np.testing.assert_array_equal(after[table][:, :32], before[table])


def test_hidden_growth_without_heads_moves_the_rotary_frequencies():
    """Qwen derives head_dim = hidden_dim / num_heads: 32 -> 48 at 4 heads grows head_dim 8 ->
    12, which moves the rotary frequencies; the report names them (the norms' growth is
    exact, and said so)."""
    old = _old(_causal_lm, "qwen", 1, **OLD)
    new = _causal_lm("qwen", 2, **dict(OLD, hidden_dim=48))
    report = ks.migrate_weights(old, new)
    assert not report.preserves_function
    assert any("rotary" in w and "head_dim" in w and "gained 4" in w
               for w in report.warnings), report.warnings


def _gemma_stream_ms(old, batch) -> float:
    """The smallest mean square of the residual streams Gemma's norms read (`old` a
    GemmaCausalLM or its backbone): the embeddings after their sqrt(hidden_dim) scaling (the
    first decoder block's input) and each block's output."""
    backbone = getattr(old, "backbone", old)
    blocks = backbone.transformer_layers
    probe = keras.Model(backbone.inputs, [blocks[0].input[0] if isinstance(
        blocks[0].input, (list, tuple)) else blocks[0].input] + [b.output for b in blocks])
    return min(float(np.min(np.mean(np.square(keras.ops.convert_to_numpy(s)), axis=-1)))
               for s in probe(batch))


@pytest.mark.slow_on_other_backends
def test_gemma_hidden_growth_keeps_old_logits():
    """Gemma's backbone multiplies the embeddings by sqrt(hidden_dim), a constant of the graph
    that grows with hidden_dim (32 -> 48). The table's copied columns take the ratio back
    (x sqrt(32/48)), its new columns start at 0, every norm's 1 + scale is multiplied by
    sqrt(32/48), and the final norm, which feeds the tied logits (they read the scaled table
    back), is multiplied by sqrt(48/32) as well: left as it was. The logits are kept and the
    verifier agrees."""
    old = _old(_causal_lm, "gemma", 1, **_sizes("gemma", **OLD))
    new = _causal_lm("gemma", 2, **_sizes("gemma", **GROWN))
    report = ks.migrate_weights(old, new, verify=True)

    assert report.preserves_function, report.warnings
    assert report.verification.ok, report.verification.summary()
    assert any("multiplies by the constant 6.9282 where the old model multiplied by 5.65685"
               in w and "old outputs are kept" in w for w in report.warnings), report.warnings
    batch = _batch(3)
    old_y, new_y = predict(old, batch), predict(new, batch)
    ms = _gemma_stream_ms(old, batch)
    epsilon = 1e-6  # GemmaBackbone's layer_norm_epsilon
    bound = preservation_bound(old_y, ulps=32) + (
        5 * 0.5 * epsilon / (ms / 2.0) * float(np.max(np.abs(old_y))))
    assert max_diff(old_y, new_y) <= bound, (max_diff(old_y, new_y), bound)

    before, after = _variables(old), _variables(new)
    table = _path(after, "token_embedding/embeddings")
    np.testing.assert_allclose(after[table][:, :32], before[table] * C, rtol=2 * EPS32)
    assert np.all(after[table][:, 32:] == 0)
    final = _path(after, "final_normalization/scale")
    np.testing.assert_allclose(after[final][:32], before[final], rtol=4 * EPS32,
                               atol=4 * EPS32)
    assert np.abs(before[final]).max() > 0
    for path in after:  # the decoder blocks' norms: 1 + s_new = C * (1 + s_old)
        if path.endswith("norm/scale") and "final" not in path:
            np.testing.assert_allclose(1 + after[path][:32], C * (1 + before[path]),
                                       rtol=4 * EPS32, atol=4 * EPS32)


def test_gemma_backbone_hidden_growth_keeps_old_outputs():
    """The backbone alone: its output is the final norm's, which then gets the usual
    sqrt(32/48) (no tied logits read the table back); the old dims of the sequence output are
    kept and the new ones are 0."""
    from tests.test_hub_decoders import _backbone

    old = _old(_backbone, "gemma", 1, **_sizes("gemma", **OLD))
    new = _backbone("gemma", 2, **_sizes("gemma", **GROWN))
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    batch = _batch(3)
    old_y, new_y = predict(old, batch), predict(new, batch)
    ms = _gemma_stream_ms(old, batch)
    assert max_diff(old_y, new_y[..., :32]) <= preservation_bound(old_y, ulps=32) + (
        5 * 0.5 * 1e-6 / (ms / 2.0) * float(np.max(np.abs(old_y))))
    assert np.all(new_y[..., 32:] == 0)


def test_changed_constant_without_a_table_is_reported():
    """`x * 2.0` becoming `x * 3.0` behind a Dense changes what the model computes, with every
    weight in place: the report names the constant and does not claim the old outputs."""

    def model(c: float, seed: int):
        keras.utils.set_random_seed(seed)
        x = keras.Input((4,), name="x")
        h = keras.layers.Dense(3, name="d")(x) * c
        return keras.Model(x, keras.layers.Dense(2, name="o")(h))

    same = ks.migrate_weights(model(2.0, 1), model(2.0, 2))
    assert same.preserves_function, same.warnings
    report = ks.migrate_weights(model(2.0, 1), model(3.0, 2))
    assert not report.preserves_function
    assert any("multiplies by the constant 3 where the old model multiplied by 2" in w
               and "not the output of an embedding lookup" in w for w in report.warnings)


def test_changed_operation_argument_is_reported():
    """An operation's other constants (`ops.power(x, 2)` -> `ops.power(x, 3)`) are compared
    too: the call is named with the argument that changed."""

    def model(p: float, seed: int):
        keras.utils.set_random_seed(seed)
        x = keras.Input((4,), name="x")
        h = keras.ops.power(keras.layers.Dense(3, name="d")(x), p)
        return keras.Model(x, keras.layers.Dense(2, name="o")(h))

    assert ks.migrate_weights(model(2.0, 1), model(2.0, 2)).preserves_function
    report = ks.migrate_weights(model(2.0, 1), model(3.0, 2))
    assert not report.preserves_function
    assert any("called with other arguments" in w and "argument 1: 2.0 -> 3.0" in w
               for w in report.warnings), report.warnings


def _block(family: str, seed: int, hidden: int, heads: int, kv: int):
    """Input (4, 8) -> Dense(hidden) -> one decoder layer: float inputs, so the verifier
    checks the labels against gradients."""
    from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock
    from keras_hub.src.models.llama.llama_decoder import LlamaTransformerDecoder

    keras.utils.set_random_seed(seed)
    x = keras.Input((4, 8), name="x")
    h = keras.layers.Dense(hidden, name="proj")(x)
    sizes = dict(intermediate_dim=64, num_query_heads=heads, num_key_value_heads=kv,
                 name="decoder")
    if family == "gemma":
        layer = GemmaDecoderBlock(hidden_dim=hidden, head_dim=8, use_post_ffw_norm=True,
                                  use_post_attention_norm=True, **sizes)
    else:
        layer = LlamaTransformerDecoder(**sizes)
    return keras.Model(x, layer(h))


@pytest.mark.slow_on_other_backends
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_decoder_block_growth_agrees_with_the_gradients(family):
    """A decoder layer behind a Dense that grows 32 -> 48 units: the Dense's new columns and
    bias start at 0, and so do the attention output's (a norm reads the stream after it), the
    norms' gains are rescaled (Gemma's 1 + scale: s_new = c * s_old + (c - 1)), the old
    outputs are kept, and the labels agree with the gradients of the grown model. (The down
    projection's new columns stay fresh: no norm reads the stream after it here.)"""
    rng = np.random.default_rng(0)
    old = _block(family, 1, 32, 4, 2)
    _calibrate(old, seed=3)
    x1, x2 = (rng.normal(size=(3, 4, 8)).astype("float32") for _ in range(2))
    assert_input_sensitive(old, x1, x2)
    new = _block(family, 2, 48, 6, 3)
    report = ks.migrate_weights(old, new, verify=True)

    assert report.preserves_function, report.warnings
    assert report.verification.ok, report.verification.summary()
    assert report.verification.mapping.checked > 0 and not report.verification.mapping.mismatches
    old_y, new_y = predict(old, x1), predict(new, x1)
    assert max_diff(old_y, new_y[..., :32]) <= preservation_bound(old_y, ulps=32) + (
        # two (Gemma: four) norms, epsilon 1e-6 acting as 1.5e-6, inputs of mean square >~ 0.1
        4 * 0.5 * 1e-6 / 0.1 * float(np.max(np.abs(old_y))))
    before, after = _variables(old), _variables(new)
    offset = 1.0 if family == "gemma" else 0.0
    gains = [p for p in after if p.endswith("/scale")]
    assert len(gains) == (4 if family == "gemma" else 2)
    for path in gains:
        expected = before[path] * C + (C - 1.0) * offset if offset else before[path] * C
        np.testing.assert_array_equal(after[path][:32], expected.astype("float32"))
        np.testing.assert_allclose(offset + after[path][:32], C * (offset + before[path]),
                                   rtol=4 * EPS32, atol=4 * EPS32)
    assert np.all(after["proj/kernel"][:, 32:] == 0) and np.all(after["proj/bias"][32:] == 0)
    loaded = ks.SurgeryPlan.from_json(report.plan.to_json())  # the shift survives JSON
    assert [(w.scale, w.shift, w.operator) for w in loaded.weights] == [
        (w.scale, w.shift, w.operator) for w in report.plan.weights]
    assert any(w.shift for w in loaded.weights) == bool(offset)
    attention_out = after[_path(after, "attention_output/kernel")]
    assert np.all(attention_out[..., 32:] == 0) and np.abs(attention_out[..., :32]).max() > 0


def test_epsilon_acts_as_epsilon_times_the_growth():
    """The one inexact term, measured: with a large epsilon (0.05) the grown model computes
    exactly what the old model computes with epsilon * 48/32, and visibly not what it computes
    with epsilon itself."""
    from keras_hub.src.models.llama.llama_layernorm import LlamaLayerNorm

    def model(units: int, epsilon: float, seed: int):
        keras.utils.set_random_seed(seed)
        x = keras.Input((16,), name="x")
        h = keras.layers.Dense(units, name="proj")(x)
        h = LlamaLayerNorm(epsilon=epsilon, name="norm")(h)
        return keras.Model(x, keras.layers.Dense(3, name="head")(h))

    old = model(32, 0.05, 1)
    _calibrate(old, seed=5)
    new = model(48, 0.05, 2)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    oracle = model(32, 0.05 * 48 / 32, 3)
    oracle.set_weights(old.get_weights())
    x = np.random.default_rng(1).normal(0, 0.3, (64, 16)).astype("float32")
    old_y, new_y, oracle_y = predict(old, x), predict(new, x), predict(oracle, x)
    assert max_diff(new_y, oracle_y) <= preservation_bound(oracle_y, ulps=32)
    assert max_diff(new_y, old_y) > 100 * preservation_bound(old_y, ulps=32)


# -- query and key/value heads ----------------------------------------------------------------


def test_key_value_heads_growth_that_splits_groups_is_reported():
    """4 query heads over 2 -> 4 key/value heads: old query head 1 read key/value head 0, its
    continuation would read a new one, so the report names the query heads that are gone."""
    old = _old(_causal_lm, "llama", 1, **OLD)
    new = _causal_lm("llama", 2, **dict(OLD, num_key_value_heads=4))
    report = ks.migrate_weights(old, new)
    assert not report.preserves_function
    assert any("_output_dense/kernel" in w and "head[(1, 1)]" in w and "gone" in w
               for w in report.warnings), report.warnings


@pytest.mark.slow_on_other_backends
@pytest.mark.parametrize("family, old_sizes, new_sizes", [
    # Mistral takes head_dim: 4 -> 8 query heads over 2 -> 4 key/value heads at head_dim 8
    ("mistral", dict(OLD, head_dim=8), dict(OLD, head_dim=8, num_query_heads=8,
                                            num_key_value_heads=4)),
    # Qwen3 too: 4 -> 6 query heads over 2 key/value heads (groups of 2 -> 3)
    ("qwen3", dict(OLD, head_dim=8), dict(OLD, head_dim=8, num_query_heads=6)),
], ids=["mistral-heads-and-kv-heads", "qwen3-query-heads"])
def test_heads_growth_keeps_old_logits(family, old_sizes, new_sizes):
    """New heads get zero rows in the output projection; the grouping is kept (old query head
    (g, r) reads key/value head g in both models)."""
    old = _old(_causal_lm, family, 1, **old_sizes)
    new = _causal_lm(family, 2, **new_sizes)
    report = ks.migrate_weights(old, new, verify=True)
    assert report.preserves_function, report.warnings
    assert report.verification.ok, report.verification.summary()
    batch = _batch(4)
    old_y = predict(old, batch)
    assert max_diff(old_y, predict(new, batch)) <= preservation_bound(old_y, ulps=32)
    old_group = old_sizes["num_query_heads"] // old_sizes["num_key_value_heads"]
    new_group = new_sizes["num_query_heads"] // new_sizes["num_key_value_heads"]
    moved = [(u // old_group) * new_group + u % old_group
             for u in range(old_sizes["num_query_heads"])]
    path = _path(_variables(new), "transformer_layer_0/self_attention/attention_output/kernel")
    before, after = _variables(old)[path], _variables(new)[path]
    np.testing.assert_array_equal(np.take(after, moved, axis=0), before)
    assert np.all(np.delete(after, moved, axis=0) == 0)


# -- optimizer slots ----------------------------------------------------------------------------


def _compiled(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)  # tracing two train steps costs more than 4 eager ones
    return model


def _train(model, seeds) -> None:
    for seed in seeds:
        batch = _batch(seed)
        model.train_on_batch(batch, np.roll(batch["token_ids"], -1, axis=1))


@pytest.mark.slow_on_other_backends
def test_adam_slots_follow_the_gain_rescale():
    """After 3 Adam steps on the old model: the new gains' m is the old m / c and v the old
    v / c ** 2 (a gain stored as c * g has gradient grad / c), zero at the new dims; other
    slots are copied. The oracle of that convention: one more step on the same batch in both
    models gives the new m = old m / c again (the gradient really is grad / c), which m * c
    would not."""
    old = _compiled(_old(_causal_lm, "llama", 1, **OLD))
    _train(old, (7, 8, 9))
    new = _compiled(_causal_lm("llama", 2, **GROWN))
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    before, after = adam_slots(old), adam_slots(new)
    gains = [p for p in after if p.endswith("/scale")]
    assert len(gains) == 5
    for path in gains:
        (m0, v0), (m1, v1) = before[path], after[path]
        assert np.abs(m0).max() > 0 and np.abs(v0).max() > 0
        np.testing.assert_allclose(m1[:32], m0 / C, rtol=2 * EPS32, atol=0)
        np.testing.assert_allclose(v1[:32], v0 / C**2, rtol=2 * EPS32, atol=0)
        assert np.all(m1[32:] == 0) and np.all(v1[32:] == 0)
    table = _path(after, "token_embedding/embeddings")
    np.testing.assert_array_equal(after[table][0][:, :32], before[table][0])
    assert np.all(after[table][0][:, 32:] == 0)

    _train(old, (10,))
    _train(new, (10,))
    before, after = adam_slots(old), adam_slots(new)
    for path in gains:
        (m0, v0), (m1, v1) = before[path], after[path]
        np.testing.assert_allclose(m1[:32], m0 / C, rtol=1e-4, atol=1e-4 * np.abs(m0).max())
        np.testing.assert_allclose(v1[:32], v0 / C**2, rtol=1e-4,
                                   atol=1e-4 * np.abs(v0).max())


@pytest.mark.slow_on_other_backends
def test_adam_slots_follow_gemmas_table_rescale():
    """Gemma 32 -> 48: the token table's copied columns are stored x C (for the changed
    sqrt(hidden_dim) constant), so their m is the old m / C and v the old v / C ** 2; the
    final norm's gain is left as it was (x C, then x 1 / C), and so are its slots."""
    old = _compiled(_old(_causal_lm, "gemma", 1, **_sizes("gemma", **OLD)))
    _train(old, (7, 8))
    new = _compiled(_causal_lm("gemma", 2, **_sizes("gemma", **GROWN)))
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    before, after = adam_slots(old), adam_slots(new)
    table = _path(after, "token_embedding/embeddings")
    (m0, v0), (m1, v1) = before[table], after[table]
    assert np.abs(m0).max() > 0 and np.abs(v0).max() > 0
    np.testing.assert_allclose(m1[:, :32], m0 / C, rtol=2 * EPS32, atol=0)
    np.testing.assert_allclose(v1[:, :32], v0 / C**2, rtol=2 * EPS32, atol=0)
    final = _path(after, "final_normalization/scale")
    (m0, v0), (m1, v1) = before[final], after[final]
    assert np.abs(m0).max() > 0
    np.testing.assert_allclose(m1[:32], m0, rtol=4 * EPS32, atol=0)
    np.testing.assert_allclose(v1[:32], v0, rtol=4 * EPS32, atol=0)


@pytest.mark.slow_on_other_backends
def test_new_residual_dims_can_learn():
    """hidden 32 -> 48 alone (Qwen3 takes head_dim: 4 heads of 8 kept). The writers of the new
    dims start at 0, so their readers (query/key/value, gate/up) keep fresh rows there: the old
    logits cannot see them, and the new dims get a gradient. Zeros on both sides would be a
    saddle: every new entry's gradient exactly 0, for ever."""
    sizes = dict(OLD, head_dim=8)
    old = _compiled(_old(_causal_lm, "qwen3", 1, **sizes))
    new = _compiled(_causal_lm("qwen3", 2, **dict(sizes, hidden_dim=48)))
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    batch = _batch(3)
    old_y = predict(old, batch)
    bound = preservation_bound(old_y, ulps=32) + _epsilon_term(old, batch, 5, 1e-6, 1.5)
    assert max_diff(old_y, predict(new, batch)) <= bound
    after = _variables(new)
    query = _path(after, "transformer_layer_0/self_attention/query/kernel")
    assert np.abs(after[query][32:]).max() > 0  # (hidden, heads, head_dim): fresh new rows
    assert any("transformer_layer_0': weight '_self_attention_layer/_query_dense/kernel': "
               "new input indices keep fresh values" in line
               for line in operator_lines(report.plan)), operator_lines(report.plan)
    table = _path(after, "token_embedding/embeddings")
    assert np.all(after[table][:, 32:] == 0)
    _train(new, (10,))
    assert np.abs(_variables(new)[table][:, 32:]).max() > 0  # a gradient reached them


# -- policy "duplicate" through the RMS norms ---------------------------------------------------

WIDE = dict(hidden_dim=64, num_query_heads=8, num_key_value_heads=4, intermediate_dim=128)


@pytest.mark.slow_on_other_backends
@pytest.mark.parametrize("family", ["llama", "qwen", "gemma"])
def test_duplication_through_rms_norms_keeps_old_logits(family):
    """Policy "duplicate", hidden 32 -> 64 with 4 -> 8 heads over 2 -> 4 key/value heads
    (head_dim 8 kept, so the rotary frequencies too) and intermediate 64 -> 128: the mean of
    squares over [x, x] is x's, so the norms' gains are duplicated unscaled (epsilon
    included: no epsilon term), readers give each copy 1/2. Untied Llama, tied Qwen (the final
    norm / 2), tied Gemma (the table also x sqrt(32/64) for its sqrt(hidden_dim) constant,
    the final norm x 1/2 / sqrt(32/64))."""
    old = _old(_causal_lm, family, 1, **_sizes(family, **OLD))
    new = _causal_lm(family, 2, **_sizes(family, **WIDE))
    report = ks.migrate_weights(old, new, policy="duplicate", verify=True)

    assert report.preserves_function, report.warnings
    assert report.verification.ok, report.verification.summary()
    assert sum("by duplicating every index 2 times, so its mean of squares is unchanged" in w
               for w in report.warnings) == 5, report.warnings
    batch = _batch(3)
    old_y, new_y = predict(old, batch), predict(new, batch)
    assert max_diff(old_y, new_y) <= preservation_bound(old_y, ulps=32), max_diff(old_y, new_y)

    before, after = _variables(old), _variables(new)
    r = (32 / 64) ** 0.5 if family == "gemma" else 1.0
    table = _path(after, "token_embedding/embeddings")
    np.testing.assert_allclose(after[table][:, :32], before[table] * r, rtol=2 * EPS32)
    np.testing.assert_array_equal(after[table][:, 32:], after[table][:, :32])
    tied = family != "llama"
    for path in after:
        if not path.endswith("/scale") or after[path].shape != (64,):
            continue
        final = "final_normalization" in path or "sequence_output_layernorm" in path
        m = (0.5 / r if final and tied else 1.0)
        if family == "gemma":  # 1 + scale
            np.testing.assert_allclose(1 + after[path][:32], m * (1 + before[path]),
                                       rtol=4 * EPS32, atol=4 * EPS32)
        else:
            np.testing.assert_allclose(after[path][:32], m * before[path], rtol=2 * EPS32)
        np.testing.assert_array_equal(after[path][32:], after[path][:32])
    down = _path(after, "_0/" + ("ffw_linear/kernel" if family == "gemma"
                                 else "feedforward_output_dense/kernel"))
    units = before[down].shape[0]  # intermediate units (Gemma: intermediate_dim / 2)
    np.testing.assert_allclose(after[down][:units, :32], before[down] / 2, rtol=2 * EPS32)
    np.testing.assert_array_equal(after[down][units:, :32], after[down][:units, :32])
    lines = operator_lines(report.plan)
    assert any("ffw_linear" in line or "feedforward_output_dense" in line for line in lines
               if "duplication: axis 0 duplicated" in line and "each copy x1/2" in line), lines


def test_duplication_growing_head_dim_moves_the_rotary_frequencies():
    """Llama derives head_dim = hidden_dim / num_query_heads: doubling hidden_dim at 4 heads
    duplicates each head's dims (8 -> 16), which moves the rotary frequencies; the report says
    so. A factor that is not a whole number (32 -> 48) is no duplication, said by name, and the
    RMS norms then grow by zeros (exact up to epsilon), as under policy "preserve"."""
    old = _old(_causal_lm, "llama", 1, **OLD)
    report = ks.migrate_weights(old, _causal_lm("llama", 2, **dict(OLD, hidden_dim=64)),
                                policy="duplicate")
    assert not report.preserves_function
    assert any("rotary" in w and "head_dim" in w for w in report.warnings), report.warnings

    # 32 -> 48 is no duplication: the norms grow by zeros instead, which is exact up to epsilon
    grown = _causal_lm("llama", 2, **_sizes("llama", **GROWN))
    report = ks.migrate_weights(old, grown, policy="duplicate")
    assert report.preserves_function, report.warnings
    assert sum("48 is not a multiple of 32" in w and "may only grow by zeros" in w
               for w in report.warnings) == 5, report.warnings
    batch = _batch(3)
    old_y = predict(old, batch)
    epsilon = float(old.backbone.transformer_layers[0].layer_norm_epsilon)
    bound = preservation_bound(old_y, ulps=32) + _epsilon_term(old, batch, 5, epsilon, 1.5)
    assert max_diff(old_y, predict(grown, batch)) <= bound


# -- tables read back (tied logits) whose reader is not a norm's sole output -------------------


def _tied(seed: int, width: int, c: float, tail: str):
    """ReversibleEmbedding (tied) -> x * c -> Dense -> tail -> the table read back; `tail`:
    "" (the Dense's output read back), "rms", "ln", "rms-tanh" (a tanh behind the norm)."""
    from keras_hub.layers import ReversibleEmbedding

    keras.utils.set_random_seed(seed)
    t = keras.Input((5,), dtype="int32", name="t")
    emb = ReversibleEmbedding(20, width, tie_weights=True, name="emb")
    h = keras.layers.Dense(width, name="d")(emb(t) * c)
    if tail.startswith("rms"):
        h = keras.layers.RMSNormalization(name="n")(h)
    elif tail == "ln":
        h = keras.layers.LayerNormalization(name="n")(h)
    if tail.endswith("tanh"):
        h = keras.layers.Activation("tanh", name="act")(h)
    model = keras.Model(t, emb(h, reverse=True))
    rng = np.random.default_rng(seed)
    for v in model.weights:
        neutral = 1.0 if v.path.endswith(("scale", "gamma")) else 0.0
        v.assign(rng.normal(neutral, 0.7, v.shape).astype("float32"))
    return model


TOKENS = np.random.default_rng(0).integers(0, 20, (4, 5)).astype("int32")


@pytest.mark.parametrize("tail", ["", "ln"])
def test_a_tied_table_is_duplicated_only_through_its_norm(tail):
    """Policy "duplicate", width 8 -> 16. Read back through a LayerNorm's own output ("ln"),
    the table's columns are duplicated and the norm divided by 2. Read back from a Dense's
    output (""), no norm can take the copies back: the table's new columns stay 0, so the
    units they write are not split either (a reader giving each copy 1/2 would halve the old
    sums). Both keep the old logits."""
    old, new = _tied(1, 8, 2.0, tail), _tied(2, 16, 2.0, tail)
    report = ks.migrate_weights(old, new, policy="duplicate")
    old_y, new_y = predict(old, TOKENS), predict(new, TOKENS)
    assert report.preserves_function, report.warnings
    assert max_diff(old_y, new_y) <= preservation_bound(old_y, ulps=16)
    before, table = _variables(old)["emb/embeddings"], _variables(new)["emb/embeddings"]
    np.testing.assert_array_equal(table[:, :8], before)
    held = any("units of layer 'emb' start at 0 in a weight that must keep them 0" in w
               for w in report.warnings)
    assert held == (tail == ""), report.warnings
    if tail:
        np.testing.assert_array_equal(table[:, 8:], before)
        np.testing.assert_allclose(_variables(new)["n/gamma"][:8],
                                   _variables(old)["n/gamma"] / 2, rtol=2 * EPS32)
    else:
        assert np.all(table[:, 8:] == 0)


@pytest.mark.parametrize("policy", ["preserve", "duplicate"])
def test_a_norm_behind_a_nonlinear_layer_is_not_scaled(policy):
    """The table is read back through a tanh behind the norm: scaling the norm's gain would not
    scale what the table reads (tanh(y / r) is not tanh(y) / r). A changed constant (2 -> 3)
    is then reported and the old outputs are not claimed; under policy "duplicate" (8 -> 16)
    the tied columns are not duplicated, which keeps the old outputs."""
    grown = policy == "duplicate"
    old, new = _tied(1, 8, 2.0, "rms-tanh"), _tied(2, 16 if grown else 8, 2.0 if grown else 3.0,
                                                    "rms-tanh")
    report = ks.migrate_weights(old, new, policy=policy)
    old_y, new_y = predict(old, TOKENS), predict(new, TOKENS)
    if grown:
        assert report.preserves_function, report.warnings
        assert max_diff(old_y, new_y) <= preservation_bound(old_y, ulps=16)
        assert np.all(_variables(new)["emb/embeddings"][:, 8:] == 0)
    else:
        assert max_diff(old_y, new_y) > 1e-3  # it does change
        assert not report.preserves_function
        assert any("is not the output of a norm, read by nothing else" in w
                   for w in report.warnings), report.warnings


def test_a_final_norm_that_is_also_an_output_is_not_scaled():
    """GPT-2 whose model returns the final LayerNorm's hidden states beside the tied logits:
    dividing that norm by k for the logits would halve the hidden-state output, so the
    duplication of the tied table is not claimed."""
    def model(seed, hidden, heads):
        keras.utils.set_random_seed(seed)
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=50, num_layers=1, num_heads=heads, hidden_dim=hidden,
            intermediate_dim=2 * hidden, max_sequence_length=16, name="backbone")
        inputs = {"token_ids": keras.Input((None,), dtype="int32", name="token_ids"),
                  "padding_mask": keras.Input((None,), dtype="int32", name="padding_mask")}
        h = backbone(inputs)
        return keras.Model(inputs, {"hidden": h,
                                    "logits": backbone.token_embedding(h, reverse=True)})

    old = model(1, 8, 2)
    _calibrate(old)
    new = model(2, 16, 4)
    report = ks.migrate_weights(old, new, policy="duplicate")
    old_y, new_y = predict(old, _batch(3)), predict(new, _batch(3))
    assert max_diff(old_y["hidden"], new_y["hidden"][..., :8]) > 1e-3
    assert not report.preserves_function, report.warnings


def test_a_call_keyword_given_on_one_side_only_is_compared_with_its_default():
    """`use_causal_mask=True` in the new model's call and not given in the old one (default
    False) changes the attention: reported, naming the keyword and both values."""

    def model(seed: int, **kw):
        keras.utils.set_random_seed(seed)
        x = keras.Input((5, 8), name="x")
        h = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x, **kw)
        return keras.Model(x, h)

    assert ks.migrate_weights(model(1), model(2, use_causal_mask=False)).preserves_function
    report = ks.migrate_weights(model(1), model(2, use_causal_mask=True))
    assert not report.preserves_function
    assert any("use_causal_mask: False -> True" in w for w in report.warnings), report.warnings
