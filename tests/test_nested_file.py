"""Nested models read from a `.keras` file through their own graph, at any depth: a keras-hub
backbone under the user's head (saved as its constructor arguments, built from them through its
registered class as a top-level backbone file is), one wrapped a model deeper, migrated file to
file; a registered subclassed model nested in a file (one opaque layer, as when live); and plain
Functional and Sequential models nested two and three deep.

Every old model gets non-trivial weights and is shown to depend on its input; copied slices are
checked exactly with np.take oracles, outputs within a bound of float32 epsilons at the scale of
the old outputs (`preservation_bound`). Skips the backbone tests without keras-hub.
"""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery.keras_file import KerasFile
from tests.util import (
    assert_input_sensitive,
    max_diff,
    normal,
    predict,
    preservation_bound,
    randomize,
)

V, T, HIDDEN = 50, 8, 16  # vocabulary, tokens per sequence, backbone width
VOCAB = [f"tok{i}" for i in range(V)]


def _hub():
    return pytest.importorskip("keras_hub")


def _scramble(model, seed: int = 0) -> None:
    """`randomize`'s biases and gains, and kernels and tables at a scale where every layer
    matters (keras-hub initialises them with stddev 0.02)."""
    rng = np.random.default_rng(seed)
    randomize(model, None, seed=seed)
    for v in model.weights:
        if v.path.rsplit("/", 1)[-1] in ("kernel", "embeddings"):
            v.assign(rng.normal(0, 0.4, v.shape).astype(v.dtype))


def _tokens(seed: int, vocabulary_size: int = V) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((4, T), "int32")
    mask[1, 5:] = 0  # a padded row too
    return {"token_ids": rng.integers(0, vocabulary_size, (4, T)).astype("int32"),
            "padding_mask": mask}


def _gpt2_head(seed: int, *, mid: int = 8, head: int = 4, vocabulary_size: int = V,
               wrapped: bool = False):
    """Inputs -> GPT2Backbone (2 layers, hidden 16) -> Dense "mid" -> Dense "head"; `wrapped`
    puts the backbone one level deeper, inside a functional "encoder" model with its own
    Dense "proj"."""
    hub = _hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size, num_layers=2, num_heads=2, hidden_dim=HIDDEN,
        intermediate_dim=32, max_sequence_length=T, dropout=0.0, name="backbone")

    def inputs():
        return {"token_ids": keras.Input((None,), dtype="int32", name="token_ids"),
                "padding_mask": keras.Input((None,), dtype="int32", name="padding_mask")}

    encoder = backbone
    if wrapped:
        inner = inputs()
        proj = keras.layers.Dense(HIDDEN, activation="tanh", name="proj")(backbone(inner))
        encoder = keras.Model(inner, proj, name="encoder")
    outer = inputs()
    h = keras.layers.Dense(mid, activation="relu", name="mid")(encoder(outer))
    return keras.Model(outer, keras.layers.Dense(head, name="head")(h))


def _old_gpt2_file(tmp_path, **kw):
    old = _gpt2_head(1, **kw)
    _scramble(old)
    assert_input_sensitive(old, _tokens(0), _tokens(1))
    old.save(tmp_path / "old.keras")
    return old, str(tmp_path / "old.keras")


def _backbone_weights(model, path=("backbone",)):
    for name in path:
        model = model.get_layer(name)
    return [v.numpy() for v in model.weights]


# -- a keras-hub backbone nested in the user's model ------------------------------------------


@pytest.mark.parametrize("wrapped", [
    False, pytest.param(True, marks=pytest.mark.slow_on_other_backends)], ids=["depth1", "depth2"])
def test_nested_backbone_file_into_an_identical_model_copies_every_weight(tmp_path, wrapped):
    old, path = _old_gpt2_file(tmp_path, wrapped=wrapped)
    new = _gpt2_head(2, wrapped=wrapped)
    assert not np.array_equal(new.weights[0].numpy(), old.weights[0].numpy())

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    totals = report.plan.totals()
    assert totals["fresh"] == totals["zeroed"] == 0 and totals["copied"] == sum(
        int(np.prod(v.shape)) for v in old.weights)
    for o, n in zip(old.weights, new.weights, strict=True):
        np.testing.assert_array_equal(n.numpy(), o.numpy(), err_msg=n.path)
    prefix = "encoder/backbone/" if wrapped else "backbone/"
    assert report.plan.matches[prefix + "transformer_layer_1"] == prefix + "transformer_layer_1"
    batch = _tokens(5)
    old_y = predict(old, batch)
    assert max_diff(predict(new, batch), old_y) <= preservation_bound(old_y)


def test_nested_backbone_layers_are_read_by_their_path_in_the_file(tmp_path):
    """The backbone's layers get their keras-hub classes (so their rules apply) and the
    weights stored under the backbone's group of the file."""
    old, path = _old_gpt2_file(tmp_path)
    with KerasFile(path) as file:
        graph = file.graph()
    decoder = graph.layers["backbone/transformer_layer_0"]
    assert decoder.cls is type(old.get_layer("backbone").get_layer("transformer_layer_0"))
    assert decoder.group == "layers/gpt2_backbone/layers/transformer_decoder"
    assert len(decoder.weights) == 16
    assert graph.nested == {"backbone": "GPT2Backbone"}
    stored = sum(len(node.weights) for node in graph.layers.values())
    assert stored == len(old.weights)


@pytest.mark.slow_on_other_backends  # JAX compiles each new model's initialisers
def test_nested_backbone_file_into_a_grown_user_part_copies_exact_slices(tmp_path):
    """The user's layers after the backbone widen (mid 8 -> 12 units, head 4 -> 6 classes):
    the old slices are copied exactly, the head's rows for the new mid units are zero."""
    old, path = _old_gpt2_file(tmp_path)
    new = _gpt2_head(2, mid=12, head=6)

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    for o, n in zip(_backbone_weights(old), _backbone_weights(new), strict=True):
        np.testing.assert_array_equal(n, o)
    old_mid, new_mid = (m.get_layer("mid").kernel.numpy() for m in (old, new))
    np.testing.assert_array_equal(np.take(new_mid, np.arange(8), axis=1), old_mid)
    old_head, new_head = (m.get_layer("head").kernel.numpy() for m in (old, new))
    kept = np.take(np.take(new_head, np.arange(8), axis=0), np.arange(4), axis=1)
    np.testing.assert_array_equal(kept, old_head)
    assert not np.any(np.take(new_head, np.arange(8, 12), axis=0)[:, :4])
    batch = _tokens(6)
    old_y = predict(old, batch)
    assert max_diff(predict(new, batch)[..., :4], old_y) <= preservation_bound(old_y)


@pytest.mark.slow_on_other_backends  # JAX compiles each new model's initialisers
def test_nested_backbone_file_follows_tokens_into_a_grown_vocabulary(tmp_path):
    """Token labels flow through the backbone read from the file: a reordered vocabulary
    with 3 new tokens moves each old embedding row to its token (np.take oracle)."""
    old, path = _old_gpt2_file(tmp_path)
    new_vocab = VOCAB[::-1][:20] + ["new0", "new1", "new2"] + VOCAB[::-1][20:]
    new = _gpt2_head(2, vocabulary_size=len(new_vocab))

    report = ks.migrate_weights(
        path, new, old_features={"token_ids": {"vocabulary": VOCAB}},
        new_features={"token_ids": {"vocabulary": new_vocab}})

    assert report.preserves_function, report.warnings
    table = "token_embedding"
    old_rows = old.get_layer("backbone").get_layer(table).embeddings.numpy()
    new_rows = new.get_layer("backbone").get_layer(table).embeddings.numpy()
    where = [new_vocab.index(token) for token in VOCAB]
    np.testing.assert_array_equal(np.take(new_rows, where, axis=0), old_rows)
    batch = _tokens(7)
    moved = dict(batch, token_ids=np.asarray(where, "int32")[batch["token_ids"]])
    old_y = predict(old, batch)
    assert max_diff(predict(new, moved), old_y) <= preservation_bound(old_y)


def _vgg_head(channels: int, seed: int):
    hub = _hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.VGGBackbone(
        stackwise_num_repeats=[1, 1], stackwise_num_filters=[4, 6],
        image_shape=(8, 8, channels), name="vgg")
    image = keras.Input((8, 8, channels), name="image")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(image))
    return keras.Model(image, keras.layers.Dense(3, name="head")(pooled))


@pytest.mark.slow_on_other_backends  # JAX compiles each convolution: ~25 s
def test_nested_vgg_backbone_file_gets_a_channel_inserted_at_the_top_input(tmp_path):
    """A VGGBackbone under a classifier head, read from a file (its weights were dropped):
    a fourth channel inserted at position 1 of the user's input reaches the backbone's first
    convolution, whose old taps move and whose new channel is zero."""
    rng = np.random.default_rng(0)
    old = _vgg_head(3, 1)
    x = normal(rng, 8, 8, 8, 3)
    randomize(old, x)
    assert_input_sensitive(old, x, normal(rng, 8, 8, 8, 3))
    old.save(tmp_path / "old.keras")
    new = _vgg_head(4, 2)

    report = ks.migrate_weights(
        str(tmp_path / "old.keras"), new, old_features={"image": ["r", "g", "b"]},
        new_features={"image": ["r", "ir", "g", "b"]})

    assert report.preserves_function, report.warnings
    old_vgg, new_vgg = old.get_layer("vgg"), new.get_layer("vgg")
    old_k, new_k = (m.get_layer("block1_conv1").kernel.numpy() for m in (old_vgg, new_vgg))
    np.testing.assert_array_equal(np.take(new_k, [0, 2, 3], axis=2), old_k)
    assert not np.any(new_k[:, :, 1, :])
    for o, n in [(old_vgg.get_layer("block2_conv1"), new_vgg.get_layer("block2_conv1")),
                 (old.get_layer("head"), new.get_layer("head"))]:
        for vo, vn in zip(o.weights, n.weights, strict=True):
            np.testing.assert_array_equal(vn.numpy(), vo.numpy())
    x_new = np.insert(x, 1, normal(rng, 8, 8, 8), axis=-1)
    old_y = predict(old, x)
    assert max_diff(predict(new, x_new), old_y) <= preservation_bound(old_y)


@pytest.mark.slow_on_other_backends  # JAX compiles each new model's initialisers
def test_nested_backbone_that_cannot_be_built_from_the_file_is_refused_by_name(tmp_path):
    _, path = _old_gpt2_file(tmp_path)
    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                entry = next(e for e in config["config"]["layers"] if e["name"] == "backbone")
                entry["config"]["num_layers"] = "two"
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ks.SurgeryFileError,
                       match=r"broken\.keras': layer 'backbone': cannot build "
                             r"keras_hub>GPT2Backbone"):
        ks.migrate_weights(str(broken), _gpt2_head(2))


@pytest.mark.slow_on_other_backends  # JAX compiles each new model's initialisers
def test_nested_backbone_files_migrate_file_to_file(tmp_path):
    """Old file -> template file (head 4 -> 6 classes) -> a written file Keras loads."""
    old, path = _old_gpt2_file(tmp_path, wrapped=True)
    template, out = str(tmp_path / "template.keras"), str(tmp_path / "out.keras")
    _gpt2_head(2, head=6, wrapped=True).save(template)

    plan = ks.ModelMigrator(path).plan(template)
    assert plan.preserves_function, plan.warnings
    plan.apply_file(path, out, template=template)

    migrated = keras.saving.load_model(out)
    path_in_model = ("encoder", "backbone")
    for o, n in zip(_backbone_weights(old, path_in_model),
                    _backbone_weights(migrated, path_in_model), strict=True):
        np.testing.assert_array_equal(n, o)
    batch = _tokens(8)
    old_y = predict(old, batch)
    assert max_diff(predict(migrated, batch)[..., :4], old_y) <= preservation_bound(old_y)


@keras.saving.register_keras_serializable(package="ks_test_nested_file")
class _Tower(keras.Model):
    """A subclassed model (its wiring only in call) with a config of its own."""

    def __init__(self, width: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.inner = keras.layers.Dense(width, activation="tanh", name="inner")

    def call(self, x):
        return self.inner(x)

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def test_nested_registered_subclassed_model_stays_one_opaque_layer_as_when_live(tmp_path):
    """A registered subclassed model inside the user's functional model has no graph in the
    file: it stays one opaque layer (named in the warnings), as from the live model, not a
    refusal of the whole file."""

    def build(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((4,), name="obs")
        return keras.Model(x, keras.layers.Dense(2, name="head")(_Tower(name="tower")(x)))

    rng = np.random.default_rng(4)
    old = build(1)
    x = normal(rng, 16, 4)
    randomize(old, x)
    assert_input_sensitive(old, x, normal(rng, 16, 4))
    old.save(tmp_path / "old.keras")
    for source in (old, str(tmp_path / "old.keras")):
        new = build(2)
        report = ks.migrate_weights(source, new)
        assert any("'tower' (_Tower)" in w and "opaque" in w for w in report.warnings)
        assert report.preserves_function, report.warnings
        for o, n in zip(old.weights, new.weights, strict=True):
            np.testing.assert_array_equal(n.numpy(), o.numpy())


# -- plain Functional and Sequential models nested two and three deep -------------------------


def _tower(n_in: int, width: int, first: int, kinds: tuple[str, ...]):
    """A model of kind `kinds[0]` holding the model of `kinds[1:]` (if any), then a Dense
    layer "d<depth>" of `width` units; the innermost model's Dense "d1" reads the input and has
    `first` units."""
    depth = len(kinds)
    inner = [_tower(n_in, width, first, kinds[1:])] if depth > 1 else []
    dense = keras.layers.Dense(first if depth == 1 else width, activation="tanh",
                               name=f"d{depth}")
    if kinds[0] == "sequential":
        return keras.Sequential([keras.Input((n_in,)), *inner, dense], name=f"level{depth}")
    i = keras.Input((n_in,))
    return keras.Model(i, dense(inner[0](i) if inner else i), name=f"level{depth}")


def _nested_model(n_in: int, first: int, kinds: tuple[str, ...], seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input((n_in,), name="obs")
    tower = _tower(n_in, 5, first, kinds)
    return keras.Model(x, keras.layers.Dense(2, name="head")(tower(x)))


def _level(model, kinds, depth: int):
    """The model of nesting level `depth` (1: the innermost) inside the user's model."""
    for level in range(len(kinds), depth - 1, -1):
        model = model.get_layer(f"level{level}")
    return model


@pytest.mark.parametrize("kinds", [
    ("functional", "functional"),
    ("functional", "functional", "functional"),
    ("sequential", "sequential"),
    ("sequential", "sequential", "sequential"),
    ("sequential", "functional", "sequential"),
], ids="-".join)
def test_nested_models_read_from_a_file_get_a_feature_inserted_at_the_top_input(
        tmp_path, kinds):
    """A feature inserted at the user's input reaches the innermost model's Dense "d1", two
    or three models deep; d1 also widens (6 -> 8 units), so "d2", one model up, gets zero rows
    for the new units."""
    rng = np.random.default_rng(len(kinds))
    old = _nested_model(4, 6, kinds, 1)
    x = normal(rng, 16, 4)
    randomize(old, x)
    assert_input_sensitive(old, x, normal(rng, 16, 4))
    old.save(tmp_path / "old.keras")
    new = _nested_model(5, 8, kinds, 2)

    report = ks.migrate_weights(
        str(tmp_path / "old.keras"), new, old_features={"obs": ["a", "b", "c", "d"]},
        new_features={"obs": ["a", "b", "new", "c", "d"]})

    assert report.preserves_function, report.warnings
    old_k, new_k = (_level(m, kinds, 1).get_layer("d1").kernel.numpy() for m in (old, new))
    np.testing.assert_array_equal(np.take(new_k, [0, 1, 3, 4], axis=0)[:, :6], old_k)
    assert not np.any(new_k[2, :6])
    old_k, new_k = (_level(m, kinds, 2).get_layer("d2").kernel.numpy() for m in (old, new))
    np.testing.assert_array_equal(np.take(new_k, np.arange(6), axis=0), old_k)
    assert not np.any(new_k[6:])
    for depth in range(3, len(kinds) + 1):
        o, n = (_level(m, kinds, depth).get_layer(f"d{depth}").kernel.numpy()
                for m in (old, new))
        np.testing.assert_array_equal(n, o)
    x_new = np.insert(x, 2, normal(rng, 16), axis=1)
    old_y = predict(old, x)
    assert max_diff(predict(new, x_new), old_y) <= preservation_bound(old_y)
