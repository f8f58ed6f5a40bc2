"""Shared helpers for surgery tests: non-trivial old weights and numeric checks."""

from __future__ import annotations

import numpy as np


def randomize(model, data, *, seed: int = 0, bias_scale: float = 0.3) -> None:
    """Gives `model` non-trivial weights without losing its sensitivity to the input.

    Keeps Keras's initialisers for kernels, draws random biases and per-channel scales, and sets
    BatchNormalization statistics from one real batch (`data`, a batch or a list of batches
    matching the model inputs), so that deep nets neither explode nor forget their input.
    """
    import keras

    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        for v in layer.weights:
            name = v.path.rsplit("/", 1)[-1]
            if name in ("bias", "beta"):
                v.assign(rng.normal(0, bias_scale, v.shape).astype(v.dtype))
            elif name == "gamma":
                v.assign(rng.uniform(0.5, 1.5, v.shape).astype(v.dtype))
    # BatchNormalization statistics from real activations, layer by layer (random ones for
    # layers inside nested models, which a probe model cannot reach).
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            if data is None or layer not in model.layers:
                n = layer.moving_mean.shape[0]
                layer.moving_mean.assign(rng.normal(0, 0.3, n).astype("float32"))
                layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
                continue
            probe = keras.Model(model.inputs, layer.input)
            acts = to_numpy(probe(data, training=False))
            axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
            axes = tuple(i for i in range(acts.ndim) if i != axis % acts.ndim)
            mean = acts.mean(axis=axes)
            var = acts.var(axis=axes) + rng.uniform(0.05, 0.2, mean.shape)
            layer.moving_mean.assign(mean.astype("float32"))
            layer.moving_variance.assign(var.astype("float32"))


def calibrate_batch_norm(model, x: np.ndarray, rng: np.random.Generator, *,
                         relative_margin: bool = False) -> None:
    """Sets every BatchNormalization's statistics from batch `x` in one forward pass: with
    momentum 0, a training-mode call stores each layer's batch mean and variance, computed on
    the activations its predecessors, already normalised by their own batch statistics,
    produce (what a layer-by-layer calibration gives). Then, as `randomize` does, the variances
    get a random margin so that the inference outputs are not exactly those of the batch
    (`relative_margin`: a random fraction of each variance rather than an absolute amount)."""
    import keras

    norms = [la for la in model._flatten_layers()
             if isinstance(la, keras.layers.BatchNormalization)]
    momenta = [la.momentum for la in norms]
    for la in norms:
        la.momentum = 0.0
    try:
        model(x, training=True)
    finally:
        for la, momentum in zip(norms, momenta, strict=True):
            la.momentum = momentum
    for la in norms:
        var = keras.ops.convert_to_numpy(la.moving_variance)
        margin = rng.uniform(0.05, 0.2, var.shape)
        # relative: small-variance channels (after gates, in deep nets) keep their scale
        # instead of being squashed towards 0 layer after layer
        var = var * (1 + margin) if relative_margin else var + margin
        la.moving_variance.assign(var.astype("float32"))


def _all_layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def to_numpy(value) -> np.ndarray:
    """A NumPy array of a backend tensor, a variable or an array, on every backend.

    `keras.ops.convert_to_numpy`, not `np.asarray`: NumPy refuses a PyTorch tensor that requires
    grad (and one on a GPU), and a JAX array would come back read-only.
    """
    import keras

    if isinstance(value, np.ndarray):
        return value
    return keras.ops.convert_to_numpy(value)


def predict(model, x):
    out = model(x, training=False)
    if isinstance(out, (list, tuple)):
        return [to_numpy(o) for o in out]
    if isinstance(out, dict):
        return {k: to_numpy(v) for k, v in out.items()}
    return to_numpy(out)


def max_diff(a, b) -> float:
    """max |a - b| over arrays or matching lists/dicts of arrays."""
    if isinstance(a, dict):
        return max(max_diff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return max(max_diff(x, y) for x, y in zip(a, b))
    return float(np.max(np.abs(to_numpy(a) - to_numpy(b))))


def assert_input_sensitive(model, x1, x2, *, min_diff: float = 1e-3) -> None:
    """The model's outputs must depend on its input, or any surgery would look right."""
    d = max_diff(predict(model, x1), predict(model, x2))
    assert d > min_diff, f"model output barely depends on its input (max diff {d:.2e})"


def columns_from(old_x: np.ndarray, old_names, new_names, rng) -> np.ndarray:
    """The new model's input for old input `old_x`: matched columns moved, new ones random."""
    out = rng.normal(size=old_x.shape[:-1] + (len(new_names),)).astype(old_x.dtype)
    for j, name in enumerate(new_names):
        if name in old_names:
            out[..., j] = old_x[..., list(old_names).index(name)]
    return out


def prepare_old(model, batch, other_batch, path) -> str:
    """The usual old side of a surgery test for a model already built: non-trivial weights
    (`randomize`), outputs that depend on the input, saved to `path`. Returns the path as a
    string."""
    randomize(model, batch)
    assert_input_sensitive(model, batch, other_batch)
    model.save(path)
    return str(path)


def old_model(build, shape, rng, *, seed=1, batch=None, batch_size=16, path=None, tweak=None):
    """The old side of a surgery test, set up the one usual way.

    Seeds Keras with `seed`, calls `build()`, gives the model non-trivial weights (`randomize`
    on `batch`, by default `batch_size` samples of `shape` drawn from `rng`; then `tweak(model)`
    for weights `randomize` leaves alone), checks that its outputs depend on its input (on a
    second batch from `rng`) and saves it to `path`, if one is given.

    Returns:
        (model, batch, path as a string, or None when not saved).
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = build()
    if batch is None:
        batch = normal(rng, batch_size, *shape)
    randomize(model, batch)
    if tweak is not None:
        tweak(model)
    assert_input_sensitive(model, batch, normal(rng, batch_size, *shape))
    if path is None:
        return model, batch, None
    model.save(path)
    return model, batch, str(path)


def randomized_old(build, shape, seed: int = 0, batch_size: int = 32):
    """`build()` an old model with non-trivial weights that depends on its input; returns
    (model, the batch its BatchNorm statistics came from)."""
    model, batch, _ = old_model(build, shape, np.random.default_rng(seed), seed=seed + 1,
                                batch_size=batch_size)
    return model, batch


def normal(rng, *shape) -> np.ndarray:
    return rng.normal(size=shape).astype("float32")


def model_of(shape, body, name: str = "obs"):
    """A functional model `body(Input(shape, name=name))`."""
    import keras

    inp = keras.Input(shape, name=name)
    return keras.Model(inp, body(inp))


def saved_old_model(tmp_path, shape, body, rng, *, seed=1, batch_size=16, name="obs"):
    """`model_of(shape, body)` set up as an old model (see `old_model`) and saved in
    `tmp_path`; returns (model, batch, path)."""
    return old_model(lambda: model_of(shape, body, name), shape, rng, seed=seed,
                     batch_size=batch_size, path=tmp_path / "old.keras")


def preservation_bound(reference, ulps: float = 8) -> float:
    """The largest max |new - old| to accept where a surgery keeps the function: `ulps`
    float32 epsilons at the scale of the old outputs `reference` (at least 1), so the bound
    holds on every CPU whatever order its kernels sum in."""
    return ulps * float(np.finfo(np.float32).eps) * max(1.0, _max_abs(reference))


def _max_abs(a) -> float:
    if isinstance(a, dict):
        return max(_max_abs(v) for v in a.values())
    if isinstance(a, (list, tuple)):
        return max(_max_abs(v) for v in a)
    return float(np.max(np.abs(to_numpy(a))))


def adam_slots(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per trainable variable path, Adam's (m, v) of a compiled model that has trained."""
    import keras

    opt = model.optimizer
    return {v.path: tuple(keras.ops.convert_to_numpy(s[opt._get_variable_index(v)])
                          for s in (opt._momentums, opt._velocities))
            for v in model.trainable_variables}


def edit_weights(src, dst, edit):
    """A copy of the `.keras` file `src` at `dst` with its weights member edited by
    `edit(h5)` (an h5py File opened for appending), every member stored uncompressed."""
    import io
    import zipfile

    import h5py

    from keras_surgery.keras_file import WEIGHTS_MEMBER

    with zipfile.ZipFile(src) as archive:
        contents = {info.filename: archive.read(info) for info in archive.infolist()}
    buffer = io.BytesIO(contents[WEIGHTS_MEMBER])
    with h5py.File(buffer, "a") as h5:
        edit(h5)
    contents[WEIGHTS_MEMBER] = buffer.getvalue()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return dst
