"""Exact hidden_dim growth through LayerNorms by duplication (issue 20, policy "duplicate";
Staged Training, Shen et al. 2022), on tiny keras-hub GPT-2 models.

The operator, for an integer factor k: every residual dim is duplicated ([x, x]: new dim j
copies old dim j mod d_old) wherever it is written (token and position embeddings, attention
output projection, feed-forward output Dense), so LayerNorm of [x, x] is [LN(x), LN(x)]
(same mean and variance) with gamma and beta duplicated; every weight that reads the stream
(query/key/value, the feed-forward input Dense, a head) gives each copy of a row 1/k of it, so
its sums are unchanged. keras-hub's GPT-2 derives head_dim = hidden_dim / num_heads, so the
heads grow with hidden_dim (2 -> 4, head_dim 8 kept): new heads copy old heads h mod 2 and
the output projection gives each copy 1/k of its rows. Zero padding would move the
LayerNorms' means (reported, tests/test_keras_hub.py); a factor that is not an integer is
refused by name.

Configurations: vocabulary 50, 2 layers, hidden 16 -> 32, intermediate 32, sequences of 10,
kernels drawn at a scale where every layer matters. Skipped without keras-hub.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.report import operator_lines
from tests.util import (
    adam_slots,
    assert_input_sensitive,
    max_diff,
    predict,
    preservation_bound,
    randomize,
)

keras_hub = pytest.importorskip("keras_hub")

V, T, OLD_HIDDEN, NEW_HIDDEN = 50, 10, 16, 32
K = NEW_HIDDEN // OLD_HIDDEN
EPS32 = float(np.finfo(np.float32).eps)


def _gpt2(hidden: int, heads: int, seed: int, **kw):
    keras.utils.set_random_seed(seed)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=V, num_layers=2, num_heads=heads, hidden_dim=hidden,
        intermediate_dim=32, max_sequence_length=16, dropout=0.0, **kw)


def _scramble(model, seed: int = 0) -> None:
    """Kernels and tables at a scale where every layer matters (keras-hub draws them with
    stddev 0.02), random biases and LayerNorm gamma/beta (`randomize`)."""
    rng = np.random.default_rng(seed)
    randomize(model, None, seed=seed)
    for v in model.weights:
        if v.path.rsplit("/", 1)[-1] in ("kernel", "embeddings"):
            v.assign(rng.normal(0, 0.4, v.shape).astype(v.dtype))


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((4, T), "int32")
    mask[1, 7:] = 0
    return {"token_ids": rng.integers(0, V, (4, T)).astype("int32"), "padding_mask": mask}


def _old_backbone(heads: int = 2):
    old = _gpt2(OLD_HIDDEN, heads, 1)
    _scramble(old)
    assert_input_sensitive(old, _batch(0), _batch(1))
    return old


def _variables(model) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def _one(variables: dict, tail: str) -> np.ndarray:
    (value,) = [v for p, v in variables.items() if p == tail or p.endswith("/" + tail)]
    return value


def _dup(n_new: int, n_old: int) -> np.ndarray:
    return np.arange(n_new) % n_old  # new index j copies old index j mod n_old


@pytest.mark.slow_on_other_backends
def test_hidden_and_heads_duplicated_keep_the_old_outputs():
    """hidden 16 -> 32 with heads 2 -> 4: the new sequence output is [old, old] on every
    token (float32 round-off only), every LayerNorm is accepted as a duplication, the verifier
    agrees, and the report names the operator of every duplicated weight."""
    old = _old_backbone()
    new = _gpt2(NEW_HIDDEN, 4, 2)
    report = ks.migrate_weights(old, new, policy="duplicate", verify=True)

    assert report.preserves_function, report.warnings
    assert report.verification.ok, report.verification.summary()
    accepted = [w for w in report.warnings if "grew 16 -> 32 by duplicating every index 2" in w]
    assert len(accepted) == 5, report.warnings  # two per layer and the final one
    batch = _batch(3)
    old_y, new_y = predict(old, batch), predict(new, batch)
    bound = preservation_bound(old_y, ulps=32)
    assert max_diff(old_y, new_y[..., :OLD_HIDDEN]) <= bound
    assert max_diff(old_y, new_y[..., OLD_HIDDEN:]) <= bound
    lines = operator_lines(report.plan)
    assert any("token_embedding': weight 'embeddings': duplication: axis 1 duplicated 16 -> "
               "32 (new index j copies j mod 16)" in line for line in lines), lines
    assert any("query_dense/kernel': duplication: axis 0 duplicated 16 -> 32 (new index j "
               "copies j mod 16), each copy x1/2; axis 1 duplicated 2 -> 4" in line
               for line in lines), lines
    assert any("output_dense/kernel': duplication: axis 0 duplicated 2 -> 4 (new index j "
               "copies j mod 2), each copy x1/2; axis 2 duplicated 16 -> 32" in line
               for line in lines), lines


def test_duplicated_slices_are_exact():
    """Every copied slice against np.take oracles: writers' columns and LayerNorm gamma/beta
    tiled, readers' rows tiled and halved, heads tiled, the output projection's heads halved."""
    old = _old_backbone()
    new = _gpt2(NEW_HIDDEN, 4, 2)
    ks.migrate_weights(old, new, policy="duplicate")
    before, after = _variables(old), _variables(new)
    d, h = _dup(NEW_HIDDEN, OLD_HIDDEN), _dup(4, 2)

    for tail in ("token_embedding/embeddings", "position_embedding/embeddings"):
        assert np.abs(_one(before, tail)).max() > 0
        np.testing.assert_array_equal(_one(after, tail), np.take(_one(before, tail), d, 1))
    for tail in ("layer_norm/gamma", "layer_norm/beta"):
        np.testing.assert_array_equal(_one(after, tail), np.take(_one(before, tail), d))
    layer = "transformer_layer_1/"
    for name in ("query", "key", "value"):
        kernel = f"{layer}self_attention/{name}/kernel"
        want = np.take(np.take(_one(before, kernel), d, 0), h, 1) / K
        np.testing.assert_array_equal(_one(after, kernel), want)
        bias = f"{layer}self_attention/{name}/bias"
        np.testing.assert_array_equal(_one(after, bias), np.take(_one(before, bias), h, 0))
    out = f"{layer}self_attention/attention_output/kernel"
    np.testing.assert_array_equal(
        _one(after, out), np.take(np.take(_one(before, out), h, 0), d, 2) / K)
    np.testing.assert_array_equal(
        _one(after, f"{layer}feedforward_intermediate_dense/kernel"),
        np.take(_one(before, f"{layer}feedforward_intermediate_dense/kernel"), d, 0) / K)
    np.testing.assert_array_equal(
        _one(after, f"{layer}feedforward_output_dense/kernel"),
        np.take(_one(before, f"{layer}feedforward_output_dense/kernel"), d, 1))


@pytest.mark.slow_on_other_backends
def test_head_dim_growth_duplicates_keys_and_values_and_zero_pads_queries():
    """hidden 16 -> 32 at 2 heads grows head_dim 8 -> 16: the key and value dims of each head
    are duplicated within it, the output projection halves the duplicated value rows, and the
    attention rule zero-pads the queries' new dims and scales them by sqrt(16/8) against
    Keras's 1/sqrt(head_dim), so q.k / sqrt(16) is the old score: exact too."""
    old = _old_backbone()
    new = _gpt2(NEW_HIDDEN, 2, 2)
    report = ks.migrate_weights(old, new, policy="duplicate", verify=True)

    assert report.preserves_function, report.warnings
    assert report.verification.ok, report.verification.summary()
    batch = _batch(3)
    old_y, new_y = predict(old, batch), predict(new, batch)
    bound = preservation_bound(old_y, ulps=32)
    assert max_diff(old_y, new_y[..., :OLD_HIDDEN]) <= bound
    assert max_diff(old_y, new_y[..., OLD_HIDDEN:]) <= bound
    before, after = _variables(old), _variables(new)
    e = _dup(16, 8)
    query = "transformer_layer_0/self_attention/query/kernel"
    np.testing.assert_array_equal(  # (hidden, heads, head_dim): new dims 0, old ones x sqrt(2)
        _one(after, query)[:, :, :8],
        np.take(_one(before, query), _dup(NEW_HIDDEN, OLD_HIDDEN), 0) / K
        * np.float32(2 ** 0.5))
    assert np.all(_one(after, query)[:, :, 8:] == 0)
    assert any("query_dense/kernel': duplication: axis 0 duplicated 16 -> 32" in line
               and "values x1.414 ((16/8) ** 0.5, axis 2 grew 8 -> 16)" in line
               for line in operator_lines(report.plan)), operator_lines(report.plan)
    key = "transformer_layer_0/self_attention/key/kernel"
    np.testing.assert_array_equal(
        _one(after, key), np.take(np.take(_one(before, key), _dup(32, 16), 0), e, 2) / K)
    out = "transformer_layer_0/self_attention/attention_output/kernel"
    np.testing.assert_array_equal(  # (heads, head_dim, hidden)
        _one(after, out), np.take(np.take(_one(before, out), e, 1), _dup(32, 16), 2) / K)


def test_growth_by_a_factor_that_is_not_an_integer_is_reported():
    """16 -> 24 (heads 2 -> 3, head_dim 8 kept) is not an integer factor: the residual units
    are not duplicated, the report names them and every LayerNorm, and says why."""
    old = _old_backbone()
    new = _gpt2(24, 3, 2)
    report = ks.migrate_weights(old, new, policy="duplicate")

    assert not report.preserves_function
    batch = _batch(3)
    assert max_diff(predict(old, batch), predict(new, batch)[..., :OLD_HIDDEN]) > 1e-3
    assert any("of layer 'token_embedding' grew 16 -> 24, which is not an integer factor" in w
               for w in report.warnings), report.warnings
    norms = [w for w in report.warnings if "(LayerNormalization)" in w
             and "duplication is not exact there: 24 is not a multiple of 16" in w]
    assert len(norms) == 5, report.warnings


def test_zero_padding_is_still_reported_under_preserve():
    """Policy "preserve" keeps its report: a LayerNorm growth by zeros is not exact."""
    old = _old_backbone()
    report = ks.migrate_weights(old, _gpt2(NEW_HIDDEN, 4, 2))
    assert not report.preserves_function
    assert sum("gained 16, lost 0 labels" in w for w in report.warnings) == 5, report.warnings


# -- optimizer slots ----------------------------------------------------------------------------


def _lm(hidden: int, heads: int, seed: int):
    """A GPT2CausalLM: its logits are the token table read back (tied, `h @ E^T`)."""
    backbone = _gpt2(hidden, heads, seed, name="backbone")
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)  # tracing two train steps costs more than 4 eager ones
    return model


@pytest.mark.slow_on_other_backends
def test_tied_logits_are_kept_by_dividing_the_final_norm():
    """GPT2CausalLM, hidden 16 -> 32 with heads 2 -> 4: the tied logits h @ E^T sum over the
    duplicated columns, twice the old ones, so the final LayerNorm's gamma and beta are halved
    (its output [y, y] / 2): the old logits are kept, and the verifier agrees."""
    old = _lm(OLD_HIDDEN, 2, 1)
    _scramble(old)
    assert_input_sensitive(old, _batch(0), _batch(1))
    new = _lm(NEW_HIDDEN, 4, 2)
    report = ks.migrate_weights(old, new, policy="duplicate", verify=True)

    assert report.preserves_function, report.warnings
    assert report.verification.ok, report.verification.summary()
    batch = _batch(3)
    old_y = predict(old, batch)
    assert max_diff(old_y, predict(new, batch)) <= preservation_bound(old_y, ulps=32)
    before, after = _variables(old), _variables(new)
    d = _dup(NEW_HIDDEN, OLD_HIDDEN)
    np.testing.assert_array_equal(_one(after, "token_embedding/embeddings"),
                                  np.take(_one(before, "token_embedding/embeddings"), d, 1))
    for tail in ("layer_norm/gamma", "layer_norm/beta"):
        np.testing.assert_array_equal(_one(after, tail), np.take(_one(before, tail), d) / K)
    lines = operator_lines(report.plan)
    assert sum("values x1/2: they feed the tied 'backbone/token_embedding' read back over 2 "
               "copies of each column" in line for line in lines) == 2, lines


def _train(model, seeds) -> None:
    for seed in seeds:
        batch = _batch(seed)
        model.train_on_batch(batch, np.roll(batch["token_ids"], -1, axis=1))


# (weight, the axes its copies are taken on, c: its gradient is the old one / c)
SLOTS = [
    ("token_embedding/embeddings", {1: (32, 16)}, K),  # writes the stream: out, duplicated
    ("transformer_layer_0/self_attention/query/kernel", {0: (32, 16), 1: (4, 2)}, K),
    ("transformer_layer_0/self_attention/attention_output/kernel", {0: (4, 2), 2: (32, 16)}, K),
    ("transformer_layer_1/feedforward_intermediate_dense/kernel", {0: (32, 16)}, 1),  # reads
    ("transformer_layer_1/feedforward_layer_norm/gamma", {0: (32, 16)}, K),
    # x1/2 and duplicated, read by the tied table: c = 2 * 1/2
    ("layer_norm/gamma", {0: (32, 16)}, 1),
]


def _taken(value: np.ndarray, axes: dict) -> np.ndarray:
    for axis, (n_new, n_old) in axes.items():
        value = np.take(value, _dup(n_new, n_old), axis)
    return value


@pytest.mark.slow_on_other_backends
def test_adam_slots_are_shared_by_the_copies():
    """After 2 Adam steps on the old model, each copy of a duplicated weight takes its old
    entry's slots, divided by c ** p (m / c, v / c ** 2) where its gradient is the old one / c:
    c = k for a weight on a duplicated output-side axis (every reader gives each copy 1/k), 1
    for one whose copies read duplicated inputs (each x1/k, the old gradient), and k * 1/k
    for the final norm, halved for the tied logits (a weight stored x1/k has gradient k g,
    and each copy 1/k of it). Tied logits, GPT2CausalLM. The oracle: one
    more step on the same batch in both models gives those relations again (the gradient
    really is g / c), and the logits stay the old ones after the migration."""
    old = _lm(OLD_HIDDEN, 2, 1)
    _scramble(old)
    _train(old, (7, 8))
    new = _lm(NEW_HIDDEN, 4, 2)
    report = ks.migrate_weights(old, new, policy="duplicate")
    assert report.preserves_function, report.warnings
    batch = _batch(3)
    old_y = predict(old, batch)
    assert max_diff(old_y, predict(new, batch)) <= preservation_bound(old_y, ulps=32)

    for when in ("migrated", "one more step"):
        before, after = adam_slots(old), adam_slots(new)
        for tail, axes, c in SLOTS:
            (m0, v0), (m1, v1) = _one(before, tail), _one(after, tail)
            assert np.abs(m0).max() > 0 and np.abs(v0).max() > 0, tail
            if when == "migrated":
                np.testing.assert_allclose(m1, _taken(m0, axes) / c, rtol=2 * EPS32, atol=0)
                np.testing.assert_allclose(v1, _taken(v0, axes) / c**2, rtol=2 * EPS32, atol=0)
            else:
                m_want, v_want = _taken(m0, axes) / c, _taken(v0, axes) / c**2
                np.testing.assert_allclose(m1, m_want, rtol=1e-4,
                                           atol=1e-4 * np.abs(m_want).max(), err_msg=tail)
                np.testing.assert_allclose(v1, v_want, rtol=1e-4,
                                           atol=1e-4 * np.abs(v_want).max(), err_msg=tail)
        _train(old, (10,))
        _train(new, (10,))


@pytest.mark.slow_on_other_backends
def test_bert_width_by_duplication_keeps_the_sequence_output():
    """BertBackbone (post-LayerNorm, with an embeddings LayerNorm), hidden 16 -> 32 with heads
    2 -> 4: the sequence output is [old, old]; the pooler is an output head, so its new units
    keep their fresh values and its old units the old pooled output."""
    keras.utils.set_random_seed(1)
    sizes = dict(vocabulary_size=V, num_layers=2, intermediate_dim=32, max_sequence_length=16,
                 dropout=0.0)
    old = keras_hub.models.BertBackbone(hidden_dim=OLD_HIDDEN, num_heads=2, **sizes)
    _scramble(old)
    keras.utils.set_random_seed(2)
    new = keras_hub.models.BertBackbone(hidden_dim=NEW_HIDDEN, num_heads=4, **sizes)
    report = ks.migrate_weights(old, new, policy="duplicate", verify=True)

    assert report.preserves_function, report.warnings
    assert sum("by duplicating every index 2 times" in w for w in report.warnings) == 5
    batch = dict(_batch(3), segment_ids=np.random.default_rng(3).integers(0, 2, (4, T)))
    old_y, new_y = predict(old, batch), predict(new, batch)
    assert_input_sensitive(old, batch, dict(_batch(4), segment_ids=batch["segment_ids"]))
    bound = preservation_bound(old_y, ulps=32)
    sequence = old_y["sequence_output"]
    assert max_diff(sequence, new_y["sequence_output"][..., :OLD_HIDDEN]) <= bound
    assert max_diff(sequence, new_y["sequence_output"][..., OLD_HIDDEN:]) <= bound
    assert max_diff(old_y["pooled_output"], new_y["pooled_output"][..., :OLD_HIDDEN]) <= bound
