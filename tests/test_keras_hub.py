"""keras-hub models: vocabulary growth, an added transformer layer and hidden_dim growth on
small randomly initialised GPT2Backbone and BertBackbone configurations, tied output logits,
token labels from a tokenizer's vocabulary, and a backbone read from a `.keras` file.

Every old model gets non-trivial weights (random kernels, biases and LayerNorm gamma/beta) and
must be shown to depend on its input; `preserves_function` is checked against the outputs in
both directions. Skipped without keras-hub (`pip install keras-surgery[hub]`).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.labels import AxisLabels
from keras_surgery.testing import check_rule
from tests.util import assert_input_sensitive, max_diff, predict, randomize

keras_hub = pytest.importorskip("keras_hub")

V, T, HIDDEN = 50, 10, 8  # vocabulary, tokens per sequence, hidden width
TOL = 1e-5
VOCAB = [f"tok{i}" for i in range(V)]


# -- helpers ---------------------------------------------------------------------------------


def _gpt2(vocabulary_size=V, num_layers=2, hidden_dim=HIDDEN, max_sequence_length=12, **kw):
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size, num_layers=num_layers, num_heads=2,
        hidden_dim=hidden_dim, intermediate_dim=16, max_sequence_length=max_sequence_length,
        dropout=0.0, **kw)


def _bert(vocabulary_size=V, num_layers=2, hidden_dim=HIDDEN, max_sequence_length=12):
    return keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size, num_layers=num_layers, num_heads=2,
        hidden_dim=hidden_dim, intermediate_dim=16, max_sequence_length=max_sequence_length,
        dropout=0.0)


BUILDERS = {"gpt2": _gpt2, "bert": _bert}


def _scramble(model, seed: int = 0) -> None:
    """Kernels and tables at a scale where every layer matters (keras-hub initialises them
    with stddev 0.02), plus `randomize`'s random biases and LayerNorm gamma/beta."""
    rng = np.random.default_rng(seed)
    randomize(model, None, seed=seed)
    for v in model.weights:
        if v.path.rsplit("/", 1)[-1] in ("kernel", "embeddings", "reverse_embeddings"):
            v.assign(rng.normal(0, 0.4, v.shape).astype(v.dtype))


def _batch(kind: str, seed: int, vocabulary_size: int = V) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((4, T), "int32")
    mask[1, 7:] = 0  # padded rows too
    batch = {"token_ids": rng.integers(0, vocabulary_size, (4, T)).astype("int32"),
             "padding_mask": mask}
    if kind == "bert":
        batch["segment_ids"] = rng.integers(0, 2, (4, T)).astype("int32")
    return batch


def _old(kind: str, **kw):
    keras.utils.set_random_seed(1)
    old = BUILDERS[kind](**kw)
    _scramble(old)
    assert_input_sensitive(old, _batch(kind, 0), _batch(kind, 1))
    return old


def _old_columns(old_out, new_out):
    """The new outputs restricted to the old width of their last axis."""
    if isinstance(old_out, dict):
        return {k: new_out[k][..., : old_out[k].shape[-1]] for k in old_out}
    return new_out[..., : old_out.shape[-1]]


def _embeddings(model) -> np.ndarray:
    return model.get_layer("token_embedding").embeddings.numpy()


def _weight_plan(report, layer: str, role: str):
    return next(w for w in report.plan.weights if w.layer == layer and w.role == role)


# -- vocabulary growth -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_vocabulary_growth_keeps_every_old_token_row(kind):
    old = _old(kind)
    keras.utils.set_random_seed(2)
    new = BUILDERS[kind](vocabulary_size=V + 7)
    report = ks.migrate_weights(old, new)

    assert report.preserves_function, report.warnings
    batch = _batch(kind, 3)
    assert max_diff(predict(old, batch), predict(new, batch)) <= TOL
    old_e, new_e = _embeddings(old), _embeddings(new)
    plan = _weight_plan(report, "token_embedding", "embeddings")
    assert plan.axes[0].kind == "lookup"
    np.testing.assert_array_equal(plan.axes[0].index, np.r_[np.arange(V), [-1] * 7])
    np.testing.assert_array_equal(new_e[:V], old_e)  # ids keep their rows
    # New tokens start as the mean of the old rows (old ids never select them).
    np.testing.assert_allclose(new_e[V:], np.tile(old_e.mean(axis=0), (7, 1)), atol=1e-6)


def test_longer_positions_keep_the_old_rows():
    old = _old("gpt2")
    new = _gpt2(max_sequence_length=16)
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    assert max_diff(predict(old, _batch("gpt2", 3)), predict(new, _batch("gpt2", 3))) <= TOL
    table = [m.get_layer("position_embedding").position_embeddings.numpy() for m in (old, new)]
    np.testing.assert_array_equal(table[1][:12], table[0])


def _reordered_vocabulary(seed: int = 0) -> list[str]:
    """VOCAB shuffled, with three new tokens at random places."""
    rng = np.random.default_rng(seed)
    grown = [VOCAB[i] for i in rng.permutation(V)]
    for token in ("new_a", "new_b", "new_c"):
        grown.insert(int(rng.integers(0, len(grown) + 1)), token)
    return grown


def _remap(ids: np.ndarray, old_vocab, new_vocab) -> np.ndarray:
    position = {t: i for i, t in enumerate(new_vocab)}
    return np.vectorize(lambda i: position[old_vocab[i]])(ids).astype(ids.dtype)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_tokenizer_vocabulary_moves_rows_to_their_tokens(kind):
    old = _old(kind)
    new_vocab = _reordered_vocabulary()
    new = BUILDERS[kind](vocabulary_size=len(new_vocab))
    # The new tokenizer's vocabulary as a BPE tokenizer keeps it: token -> id, in no order.
    order = np.random.default_rng(7).permutation(len(new_vocab))
    token_ids = {new_vocab[i]: int(i) for i in order}
    report = ks.migrate_weights(
        old, new,
        old_features={"token_ids": {"vocabulary": VOCAB}},
        new_features={"token_ids": {"vocabulary": token_ids}},
    )

    assert report.preserves_function, report.warnings
    old_rows = np.arange(V)
    new_rows = np.array([new_vocab.index(t) for t in VOCAB])
    np.testing.assert_array_equal(np.take(_embeddings(new), new_rows, axis=0),
                                  np.take(_embeddings(old), old_rows, axis=0))
    batch = _batch(kind, 4)
    moved = dict(batch, token_ids=_remap(batch["token_ids"], VOCAB, new_vocab))
    assert max_diff(predict(old, batch), predict(new, moved)) <= TOL
    # Without the vocabularies rows are matched by id, which is wrong for this tokenizer.
    unnamed = BUILDERS[kind](vocabulary_size=len(new_vocab))
    assert ks.migrate_weights(old, unnamed).preserves_function
    assert max_diff(predict(old, batch), predict(unnamed, moved)) > 1e-3


def test_removed_token_is_reported():
    old = _old("gpt2")
    new_vocab = [t for t in VOCAB if t != "tok7"]
    new = _gpt2(vocabulary_size=len(new_vocab))
    report = ks.migrate_weights(
        old, new,
        old_features={"token_ids": {"vocabulary": VOCAB}},
        new_features={"token_ids": {"vocabulary": new_vocab}},
    )
    assert not report.preserves_function
    assert any("token_embedding" in w and "tok7" in w for w in report.warnings), report.warnings


@pytest.mark.parametrize(
    "spec, message",
    [({"vocabulary": ["a", "b", "a"]}, "appears twice"),
     ({"vocab": ["a"]}, "must hold a 'vocabulary'"),
     ({"vocabulary": "abc"}, "list of tokens"),
     ({"vocabulary": [1.5]}, "strings or integers"),
     ({"vocabulary": {"a": 0, "b": 2}}, "ids 0..1")],
    ids=["duplicate", "unknown-key", "string", "float", "id-gap"],
)
def test_bad_vocabulary_spec_is_an_error_naming_the_input(spec, message):
    old = _old("gpt2")
    with pytest.raises(ks.FeatureSpecError, match=message) as info:
        ks.migrate_weights(old, _gpt2(), old_features={"token_ids": spec})
    assert "token_ids" in str(info.value)


# -- logits through the reversed (tied) embedding ------------------------------------------------


def _tied_lm(vocabulary_size: int, tie_weights: bool, hidden: int = HIDDEN) -> keras.Model:
    """ids -> table -> Dense -> logits through the same table, reversed."""
    ids = keras.Input((T,), dtype="int32", name="token_ids")
    table = keras.layers.ReversibleEmbedding(vocabulary_size, hidden, tie_weights=tie_weights,
                                             name="table")
    h = keras.layers.Dense(hidden, activation="tanh", name="mix")(table(ids))
    return keras.Model(ids, table(h, reverse=True), name="lm")


@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_reversed_embedding_logits_follow_their_tokens(tie_weights):
    keras.utils.set_random_seed(3)
    old = _tied_lm(V, tie_weights)
    _scramble(old)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, V, (4, T)).astype("int32")
    assert_input_sensitive(old, ids, rng.integers(0, V, (4, T)).astype("int32"))
    new_vocab = _reordered_vocabulary(1)
    new = _tied_lm(len(new_vocab), tie_weights)
    report = ks.migrate_weights(
        old, new,
        old_features={"token_ids": {"vocabulary": VOCAB}},
        new_features={"token_ids": {"vocabulary": new_vocab}},
    )

    assert report.preserves_function, report.warnings
    columns = [new_vocab.index(t) for t in VOCAB]
    old_logits = predict(old, ids)
    new_logits = predict(new, _remap(ids, VOCAB, new_vocab))
    assert max_diff(old_logits, np.take(new_logits, columns, axis=-1)) <= TOL
    if not tie_weights:
        np.testing.assert_array_equal(
            np.take(new.get_layer("table").reverse_embeddings.numpy(), columns, axis=1),
            old.get_layer("table").reverse_embeddings.numpy())


@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_reversed_embedding_widening_is_exact(tie_weights):
    """Without a LayerNorm, a wider tied table is exact: its new columns start at 0, since they
    are also the weights of the new hidden units into the old logits."""
    keras.utils.set_random_seed(3)
    old = _tied_lm(V, tie_weights)
    _scramble(old)
    ids = np.random.default_rng(6).integers(0, V, (4, T)).astype("int32")
    new = _tied_lm(V + 3, tie_weights, hidden=HIDDEN + 4)
    report = ks.migrate_weights(old, new)

    assert report.preserves_function, report.warnings
    assert max_diff(predict(old, ids), predict(new, ids)[..., :V]) <= TOL
    new_columns = new.get_layer("table").embeddings.numpy()[:, HIDDEN:]
    assert np.all(new_columns == 0) if tie_weights else np.abs(new_columns).max() > 0


def test_gpt2_causal_lm_keeps_old_logits_and_grows_deeper():
    def causal_lm(**kw):
        # A fixed backbone name (auto-named backbones match too: see the test further down).
        backbone = _gpt2(name="backbone", **kw)
        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)

    keras.utils.set_random_seed(4)
    old = causal_lm()
    _scramble(old)
    assert_input_sensitive(old, _batch("gpt2", 0), _batch("gpt2", 1))
    new = causal_lm(vocabulary_size=V + 5, num_layers=3)
    report = ks.migrate_weights(old, new)

    assert report.preserves_function, report.warnings
    assert report.plan.starts == {"backbone/transformer_layer_2": "identity"}
    batch = _batch("gpt2", 6)
    old_logits, new_logits = predict(old, batch), predict(new, batch)
    assert new_logits.shape[-1] == V + 5
    assert max_diff(old_logits, new_logits[..., :V]) <= TOL


# -- an added transformer layer ----------------------------------------------------------------


def test_added_pre_layer_norm_decoder_starts_as_the_identity():
    old = _old("gpt2")
    keras.utils.set_random_seed(5)
    new = _gpt2(num_layers=3)
    report = ks.migrate_weights(old, new)

    assert report.preserves_function, report.warnings
    assert report.plan.starts == {"transformer_layer_2": "identity"}
    batch = _batch("gpt2", 7)
    assert max_diff(predict(old, batch), predict(new, batch)) <= TOL
    added = new.get_layer("transformer_layer_2")
    # Both residual branches end in a projection at 0 ...
    for layer in (added._self_attention_layer._output_dense, added._feedforward_output_dense):
        assert np.all(layer.kernel.numpy() == 0) and np.all(layer.bias.numpy() == 0)
    # ... and everything before them keeps its fresh values, so the new layer can learn.
    assert np.abs(added._self_attention_layer._query_dense.kernel.numpy()).min() > 0
    assert np.abs(added._feedforward_intermediate_dense.kernel.numpy()).max() > 0
    # The final LayerNorm reads the old stream, so it and the old layers are copied.
    for name in ("transformer_layer_1", "layer_norm", "token_embedding"):
        for a, b in zip(new.get_layer(name).weights, old.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_added_post_layer_norm_encoder_is_reported():
    old = _old("bert")
    new = _bert(num_layers=3)
    report = ks.migrate_weights(old, new)

    assert not report.preserves_function
    assert any("'transformer_layer_2'" in w and "normalize_first=False" in w
               for w in report.warnings), report.warnings
    batch = _batch("bert", 7)
    assert max_diff(predict(old, batch)["sequence_output"],
                    predict(new, batch)["sequence_output"]) > 1e-3


# -- hidden_dim growth ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind, norm", [("gpt2", "'layer_norm'"),
                                        ("bert", "'embeddings_layer_norm'")])
def test_hidden_growth_is_reported_not_preserving(kind, norm):
    old = _old(kind)
    new = BUILDERS[kind](hidden_dim=HIDDEN + 4)
    report = ks.migrate_weights(old, new)

    assert not report.preserves_function
    assert any(norm in w and "(LayerNormalization)" in w and "gained 4" in w
               for w in report.warnings), report.warnings
    assert any("_feedforward_layer_norm (LayerNormalization)" in w for w in report.warnings)
    batch = _batch(kind, 8)
    old_out = predict(old, batch)
    assert max_diff(old_out, _old_columns(old_out, predict(new, batch))) > 1e-3
    # What can be kept is kept: old token rows in the old columns.
    np.testing.assert_array_equal(_embeddings(new)[:, :HIDDEN], _embeddings(old))


# -- keras-hub layers in a model of one's own ---------------------------------------------------


def _tagger(vocabulary_size: int, sequence_length: int, blocks: int) -> keras.Model:
    ids = keras.Input((T,), dtype="int32", name="token_ids")
    x = keras_hub.layers.TokenAndPositionEmbedding(vocabulary_size, sequence_length, HIDDEN,
                                                   name="embed")(ids)
    for i in range(blocks):
        x = keras_hub.layers.TransformerEncoder(16, 2, normalize_first=True,
                                                name=f"block_{i}")(x)
    return keras.Model(ids, keras.layers.Dense(3, name="tags")(x), name="tagger")


def test_token_and_position_embedding_and_encoder_blocks():
    keras.utils.set_random_seed(6)
    old = _tagger(V, T, 1)
    _scramble(old)
    rng = np.random.default_rng(9)
    ids = rng.integers(0, V, (4, T)).astype("int32")
    assert_input_sensitive(old, ids, rng.integers(0, V, (4, T)).astype("int32"))
    new = _tagger(V + 6, T + 4, 2)
    report = ks.migrate_weights(old, new)

    assert report.preserves_function, report.warnings
    assert report.plan.starts == {"block_1": "identity"}
    assert max_diff(predict(old, ids), predict(new, ids)) <= TOL
    old_embed, new_embed = old.get_layer("embed"), new.get_layer("embed")
    np.testing.assert_array_equal(new_embed.token_embedding.embeddings.numpy()[:V],
                                  old_embed.token_embedding.embeddings.numpy())
    np.testing.assert_array_equal(new_embed.position_embedding.position_embeddings.numpy()[:T],
                                  old_embed.position_embedding.position_embeddings.numpy())


# -- indexing, as BERT's pooled output picks the [CLS] position ------------------------------------


def _picker(steps: int, index: int) -> keras.Model:
    x = keras.Input((steps, 4), name="obs")
    h = keras.layers.Dense(6, activation="tanh", name="proj")(x)
    return keras.Model(x, keras.layers.Dense(2, name="out")(h[:, index, :]))


@pytest.mark.parametrize("index, kept", [(0, True), (2, True), (-1, False)])
def test_indexing_a_grown_sequence_axis(index, kept):
    """Two steps appended: x[:, 0] and x[:, 2] still pick the same step, x[:, -1] does not."""
    keras.utils.set_random_seed(7)
    old = _picker(5, index)
    _scramble(old)
    rng = np.random.default_rng(12)
    x_old = rng.normal(size=(4, 5, 4)).astype("float32")
    assert_input_sensitive(old, x_old, rng.normal(size=x_old.shape).astype("float32"))
    new = _picker(7, index)
    report = ks.migrate_weights(old, new)
    x_new = np.concatenate([x_old, rng.normal(size=(4, 2, 4)).astype("float32")], axis=1)
    diff = max_diff(predict(old, x_old), predict(new, x_new))
    assert report.preserves_function is kept, report.warnings
    if kept:
        assert diff <= TOL
    else:
        assert diff > 1e-3
        assert any("picks index -1" in w for w in report.warnings), report.warnings


# -- the gradient verifier agrees with the rules -----------------------------------------------


@pytest.mark.parametrize(
    "layer",
    ["TransformerEncoder", "TransformerDecoder"],
)
@pytest.mark.parametrize("normalize_first", [True, False], ids=["pre-ln", "post-ln"])
def test_gradients_agree_with_the_transformer_rules(layer, normalize_first):
    block = getattr(keras_hub.layers, layer)

    def make(**kwargs):
        return keras.Sequential(
            [keras.layers.Dense(HIDDEN, name="proj"),
             block(12, 2, normalize_first=normalize_first, name="block")], name="stack")

    check = check_rule(make, (5, 4))  # a new input feature enters through "proj"
    assert check.max_diff <= TOL
    assert check.verification.ok and check.verification.checked > 0
    unverified = {m.path for m in check.verification.unverified}
    assert not any("output_dense" in p or "intermediate" in p for p in unverified), unverified


def test_the_verifier_catches_a_rule_that_hides_dependencies():
    from keras_surgery.rules.keras_hub import transformer_encoder_rule

    def hiding(call):
        result = transformer_encoder_rule(call)
        blind = tuple(AxisLabels(a.ids, np.zeros_like(a.deps)) for a in result.outputs[0])
        return dataclasses.replace(result, outputs=[blind])

    def make(**kwargs):
        return keras.Sequential([keras.layers.Dense(HIDDEN, name="proj"),
                                 keras_hub.layers.TransformerEncoder(12, 2, name="block")],
                                name="stack")

    ks.register_rule("keras_hub>TransformerEncoder", hiding, override=True)
    try:
        with pytest.raises(AssertionError, match="labels some index wrongly"):
            check_rule(make, (5, 4))
    finally:
        ks.register_rule("keras_hub>TransformerEncoder", transformer_encoder_rule,
                         override=True)


# -- a backbone saved to a .keras file ------------------------------------------------------------


def test_backbone_file_is_read_through_its_registered_class(tmp_path):
    old = _old("gpt2")
    path = tmp_path / "gpt2.keras"
    old.save(path)
    new_vocab = _reordered_vocabulary(2)
    new = _gpt2(vocabulary_size=len(new_vocab), num_layers=3)
    report = ks.migrate_weights(
        str(path), new,
        old_features={"token_ids": {"vocabulary": VOCAB}},
        new_features={"token_ids": {"vocabulary": new_vocab}},
    )

    assert report.preserves_function, report.warnings
    assert report.plan.starts == {"transformer_layer_2": "identity"}
    batch = _batch("gpt2", 10)
    moved = dict(batch, token_ids=_remap(batch["token_ids"], VOCAB, new_vocab))
    assert max_diff(predict(old, batch), predict(new, moved)) <= TOL


def test_backbone_files_migrate_file_to_file(tmp_path):
    old = _old("gpt2")
    old_path, template, out = (str(tmp_path / f"{n}.keras") for n in ("old", "new", "out"))
    old.save(old_path)
    _gpt2(vocabulary_size=V + 5, num_layers=3).save(template)

    plan = ks.ModelMigrator(old_path).plan(template)
    assert plan.preserves_function and plan.starts == {"transformer_layer_2": "identity"}
    plan.apply_file(old_path, out, template=template)
    migrated = keras.saving.load_model(out)
    batch = _batch("gpt2", 11)
    assert max_diff(predict(old, batch), predict(migrated, batch)) <= TOL


def test_task_model_file_that_cannot_be_built_without_variables_is_refused(tmp_path):
    """A GPT2CausalLM creates variables while it is built, which the StatelessScope it is
    built in forbids: a clean error naming the file and the class, not a crash."""
    keras.utils.set_random_seed(4)
    old = keras_hub.models.GPT2CausalLM(backbone=_gpt2(name="backbone"), preprocessor=None)
    path = tmp_path / "lm.keras"
    old.save(path)
    with pytest.raises(ks.SurgeryFileError, match=r"lm\.keras.*keras_hub>GPT2CausalLM"):
        ks.migrate_weights(str(path), keras_hub.models.GPT2CausalLM(
            backbone=_gpt2(name="backbone"), preprocessor=None))


def test_backbone_file_of_an_unregistered_class_is_refused(tmp_path):
    old = _old("gpt2")
    path = tmp_path / "gpt2.keras"
    old.save(path)
    changed = tmp_path / "renamed.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(changed, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["registered_name"] = "nowhere>GPT2Backbone"
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ks.SurgeryFileError, match="expected a Functional or Sequential"):
        ks.migrate_weights(str(changed), _gpt2())


def test_task_model_built_twice_in_one_session_matches_its_auto_named_backbone():
    """Without a name, the second GPT2CausalLM's backbone is 'gpt2_backbone_1': its layers
    continue those of the old 'gpt2_backbone' all the same."""
    keras.utils.set_random_seed(4)
    old = keras_hub.models.GPT2CausalLM(backbone=_gpt2(), preprocessor=None)
    _scramble(old)
    assert_input_sensitive(old, _batch("gpt2", 0), _batch("gpt2", 1))
    new = keras_hub.models.GPT2CausalLM(backbone=_gpt2(vocabulary_size=V + 3), preprocessor=None)
    assert old.backbone.name != new.backbone.name  # the session auto-named them apart
    report = ks.migrate_weights(old, new)
    assert report.preserves_function, report.warnings
    assert report.plan.matches[f"{new.backbone.name}/transformer_layer_1"] == (
        f"{old.backbone.name}/transformer_layer_1")
    batch = _batch("gpt2", 7)
    assert max_diff(predict(old, batch), predict(new, batch)[..., :V]) <= TOL


def test_a_backbone_file_is_read_in_a_fresh_process(tmp_path):
    """In a fresh process no backbone instance exists yet, and Keras makes GPT2Backbone a
    Functional subclass only when the first one is built: the file must still be read (it was
    refused as "not a Functional or Sequential model config")."""
    import os
    import subprocess
    import sys

    _gpt2().save(tmp_path / "gpt2.keras")
    script = (
        "import sys, keras_hub, keras_surgery as ks\n"
        "plan = ks.ModelMigrator(sys.argv[1]).plan(sys.argv[1])\n"
        "assert plan.preserves_function and not plan.totals()['fresh'], plan.warnings\n"
        "print('copied', plan.totals()['copied'])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "gpt2.keras")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "copied" in done.stdout
