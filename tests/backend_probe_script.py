"""Child process of tests/test_verify_backends.py: the gradient verifier on one Keras backend.

Run as `KERAS_BACKEND=<name> python tests/backend_probe_script.py OUT.json`. Builds the same small
models on every backend (fixed names, weights drawn from NumPy with fixed seeds), runs
`verify_mapping` on each and `migrate_weights(..., verify=True)` on a live old model, and writes
to OUT.json what the parent compares across backends: each `result.to_dict()` (without its wall
time), the reduced gradients the verifier compared, and the migrations' verdicts. A backend that
cannot be imported writes {"unavailable": reason}, which the parent turns into a skip.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")


def main(out_path: str) -> None:
    try:  # before `import keras`, which fails on its own with a missing backend
        importlib.import_module(BACKEND)
    except ImportError as exc:
        _write(out_path, {"unavailable": f"{BACKEND} is not importable ({exc})"})
        return
    import keras

    import keras_surgery as ks
    from keras_surgery.rules.elementwise import passthrough_rule
    from keras_surgery.verify import mapping, probe_for_backend

    assert keras.backend.backend() == BACKEND, keras.backend.backend()
    recorded: list[dict] = []
    original = mapping._reduced_gradients

    def recording(*args, **kwargs):
        # The numbers the verdicts are thresholded from: the parent compares them, too.
        reduced, base = original(*args, **kwargs)
        recorded.append({"reduced": [r.tolist() for r in reduced],
                         "base": [b.tolist() for b in base]})
        return reduced, base

    mapping._reduced_gradients = recording
    reverse, mix = custom_layer_classes()
    for cls in (reverse, mix):  # per-feature pass-throughs: wrong for both
        ks.register_rule(cls, passthrough_rule)
    cases, gradients = {}, {}
    for name, (build, features) in verified_models(reverse, mix).items():
        recorded.clear()
        result = ks.verify_mapping(build(), features=features).to_dict()
        result.pop("seconds")
        cases[name] = result
        gradients[name] = list(recorded)
    _write(out_path, {
        "backend": BACKEND,
        "probe": probe_for_backend().__name__,
        "cases": cases,
        "gradients": gradients,
        "migrations": migrations(ks, reverse),
    })


def _write(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)


# -- the models ----------------------------------------------------------------------------------


@functools.cache
def numpy_zeros():
    """An initializer giving NumPy zeros (`fill` draws the values): a Keras random initializer
    compiles one XLA kernel per weight shape on JAX, which would cost most of this script's time,
    in building the models and again in each probe copy."""
    import keras
    import numpy as np

    @keras.saving.register_keras_serializable(package="backend_probe_script")
    class NumpyZeros(keras.initializers.Initializer):
        def __call__(self, shape, dtype=None):
            return np.zeros(shape, dtype=dtype or "float32")

    return NumpyZeros()


def kernels(*names: str) -> dict:
    """`name=numpy_zeros()` for each initializer argument in `names` (default: the kernel's)."""
    return {name: numpy_zeros() for name in names or ("kernel_initializer",)}


def fill(model, seed: int = 0):
    """Gives every weight a value drawn from NumPy: the same model on every backend."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for v in model.weights:
        name = v.path.rsplit("/", 1)[-1]
        shape = tuple(v.shape)
        if name in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.5, shape)
        v.assign(value.astype(v.dtype))
    return model


def mlp(features=("hp", "x", "y", "mana"), name="mlp"):
    import keras

    L = keras.layers
    x = keras.Input((len(features),), name="obs")
    h = L.Dense(9, activation="relu", **kernels(), name="d1")(x)
    h = L.Dropout(0.5, name="drop")(h)
    h = L.Dense(8, activation="tanh", **kernels(), name="d2")(h)
    return fill(keras.Model(x, L.Dense(3, **kernels(), name="head")(h), name=name))


def sigmoid_mlp():
    """A sigmoid does not map 0 to 0: the head's rows are noted, and checked one way only."""
    import keras

    L = keras.layers
    x = keras.Input((4,), name="obs")
    h = L.Dense(5, activation="sigmoid", **kernels(), name="squash")(x)
    return fill(keras.Model(x, L.Dense(2, **kernels(), name="head")(h), name="sigmoid_mlp"))


def batch_norm():
    import keras

    L = keras.layers
    x = keras.Input((5,), name="obs")
    h = L.Dense(6, activation="relu", **kernels(), name="d")(x)
    h = L.BatchNormalization(name="bn")(h)
    return fill(keras.Model(x, L.Dense(2, **kernels(), name="head")(h), name="batch_norm"))


def conv():
    import keras

    L = keras.layers
    x = keras.Input((6, 6, 3), name="img")
    h = L.Conv2D(4, 3, padding="same", activation="relu", **kernels(), name="c1")(x)
    h = L.DepthwiseConv2D(3, padding="same", **kernels("depthwise_initializer"), name="dw")(h)
    h = L.MaxPooling2D(name="pool")(h)
    h = L.Flatten(name="flat")(L.Conv2D(5, 1, **kernels(), name="pw")(h))
    return fill(keras.Model(x, L.Dense(2, **kernels(), name="head")(h), name="conv"))


def embedding_concat():
    """Integer ids are not probed (unverified); the float input beside them is."""
    import keras

    L = keras.layers
    tokens = keras.Input((3,), dtype="int32", name="tokens")
    obs = keras.Input((4,), name="obs")
    e = L.Embedding(10, 2, **kernels("embeddings_initializer"), name="emb")(tokens)
    h = L.Concatenate(name="cat")([L.Flatten(name="flat")(e), obs])
    h = L.Dense(5, activation="relu", **kernels(), name="d")(h)
    head = L.Dense(2, **kernels(), name="head")(h)
    return fill(keras.Model([tokens, obs], head, name="embedding_concat"))


def recurrent():
    import keras

    L = keras.layers
    x = keras.Input((3, 4), name="seq")
    both = kernels("kernel_initializer", "recurrent_initializer")
    h = L.LSTM(5, return_sequences=True, **both, name="lstm")(x)
    h = L.GRU(3, **both, name="gru")(h)
    return fill(keras.Model(x, L.Dense(2, **kernels(), name="head")(h), name="recurrent"))


def shared_encoder():
    import keras

    L = keras.layers
    a = keras.Input((3, 2), name="allies")
    b = keras.Input((2, 2), name="enemies")
    enc = L.Dense(4, activation="relu", **kernels(), name="encoder")
    h = L.Concatenate(name="cat")([L.Flatten(name="fa")(enc(a)), L.Flatten(name="fb")(enc(b))])
    head = L.Dense(2, **kernels(), name="head")(h)
    return fill(keras.Model([a, b], head, name="shared_encoder"))


def attention():
    import keras

    L = keras.layers
    x = keras.Input((3, 4), name="seq")
    h = L.MultiHeadAttention(num_heads=2, key_dim=2, **kernels(), name="mha")(x, x)
    h = L.LayerNormalization(name="ln")(L.Add(name="res")([x, h]))
    h = L.GlobalAveragePooling1D(name="pool")(h)
    return fill(keras.Model(x, L.Dense(2, **kernels(), name="head")(h), name="attention"))


def custom_layer_classes():
    import keras

    class Reverse(keras.layers.Layer):
        """Reverses its feature axis."""

        def call(self, x):
            return keras.ops.flip(x, axis=-1)

    class Mix(keras.layers.Layer):
        """Mixes its features through a fixed dense matrix."""

        def build(self, input_shape):
            import numpy as np

            n = input_shape[-1]
            self.matrix = np.random.default_rng(0).normal(size=(n, n)).astype("float32")

        def call(self, x):
            return keras.ops.matmul(x, self.matrix)

    return Reverse, Mix


def through(layer_class, features, name):
    """obs -> `layer_class` -> Dense -> head, as in tests/test_verify.py."""
    import keras

    L = keras.layers
    x = keras.Input((len(features),), name="obs")
    h = L.Dense(4, activation="relu", **kernels(), name="dense")(layer_class(name="custom")(x))
    return fill(keras.Model(x, L.Dense(2, **kernels(), name="head")(h), name=name))


# -- migrations with verify=True -----------------------------------------------------------------


def migrations(ks, reverse) -> dict:
    """A good surgery (a feature removed, one moved, one added) passes both checks; a surgery
    through a wrongly labelled layer raises and leaves the new model as it was."""
    import keras
    import numpy as np

    old_features, new_features = ["a", "b", "c"], ["c", "a", "new"]
    report = ks.migrate_weights(
        mlp(old_features, "old"), mlp(new_features, "new"), verify=True,
        old_features={"obs": old_features}, new_features={"obs": new_features},
    )
    check = report.verification
    (output,) = check.preservation.outputs
    good = {"ok": check.ok, "mapping_ok": check.mapping.ok, "checked": check.mapping.checked,
            "preserves_function": report.preserves_function,
            "preservation_ok": check.preservation.ok, "compared": output.compared,
            "max_rel": output.max_rel}

    new = through(reverse, ["a", "new", "b", "c"], "new_reversed")
    before = [keras.ops.convert_to_numpy(v) for v in new.weights]
    try:
        ks.migrate_weights(through(reverse, ["a", "b", "c"], "old_reversed"), new, verify=True,
                           old_features={"obs": ["a", "b", "c"]},
                           new_features={"obs": ["a", "new", "b", "c"]})
        wrong = {"raised": None}
    except ks.SurgeryError as exc:
        message = str(exc)
        wrong = {"raised": "SurgeryError",
                 "labels_wrongly": "labels some index wrongly" in message,
                 "names_kernel": "'dense/kernel'" in message,
                 "promised": "promised to preserve" in message}
    wrong["restored"] = all(np.array_equal(a, keras.ops.convert_to_numpy(v))
                            for a, v in zip(before, new.weights))
    return {"good": good, "wrong_rule": wrong}


def verified_models(reverse, mix) -> dict:
    """Name -> (model builder, features) of every model `verify_mapping` is run on."""
    return {
        "mlp": (mlp, {"obs": ["hp", ("pos", 2), "mana"]}),
        "sigmoid_mlp": (sigmoid_mlp, None),
        "batch_norm": (batch_norm, None),
        "conv": (conv, {"img": ["r", "g", "b"]}),
        "embedding_concat": (embedding_concat, None),
        "recurrent": (recurrent, None),
        "shared_encoder": (shared_encoder, None),
        "attention": (attention, None),
        "reverse_as_passthrough": (lambda: through(reverse, list("abcde"), "reverse"), None),
        "mix_as_passthrough": (lambda: through(mix, list("abcde"), "mix"),
                               {"obs": list("abcde")}),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT.json. Received: {sys.argv[1:]}")
    main(sys.argv[1])
