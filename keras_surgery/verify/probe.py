"""Gradients of a probe copy: the copy, its inputs, and one gradient probe per Keras backend.

The verifier takes its gradients from a *probe copy* of the model (same architecture, redrawn
weights; the user's model is never touched).

Why a zero base and not random base points: at a random input, the gradient of a weight
entry W[i, j] is (what index i reads) x (the cotangent arriving at j). Any nonlinearity after a
merge makes that cotangent depend on every feature, so perturbing one feature moves the gradient
of *every* row, not only of the rows that read it. The probe is therefore made to map 0 to 0
(kernels positive and scaled 1/fan_in, biases, betas, means and embedding tables zero, scales
and variances around 1), and each feature is probed alone on an all-zero input: an entry whose
input side does not depend on the feature then reads an exact 0 and has an exact 0 gradient,
whatever happens downstream. Positive kernels keep every ReLU on the feature's path alive, and a
second, negated draw revives the units a user's layer with negative weights turns off.

Gradients are taken with each backend's own machinery: `GradientProbe` is what the verifier
asks of a backend; `TensorFlowProbe` (the reference) answers it with tf.GradientTape, and
`JaxProbe` and `TorchProbe` by differentiating the probe copy as a function of its variables'
values (`StatelessProbe`: jax.grad/vmap/jit, torch.func.grad/vmap). `probe_for_backend` picks the
one for the backend Keras runs on. Only this module imports a backend, and only inside a probe.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.graph import ModelGraph, finalize_layers, live_variables
from keras_surgery.verify.inputs import FeatureKey, example_shape, is_float, pack_inputs

# Probe values by variable name: added per channel -> 0; multiplied per channel -> around 1.
ZERO_NAMES = frozenset({"bias", "beta", "moving_mean", "mean", "embeddings", "offset"})
UNIT_NAMES = frozenset({"gamma", "moving_variance", "variance", "scale"})
KEEP_NAMES = frozenset({"count", "iterations"})
GRADIENT_BUDGET = 2**26  # floats of per-example gradients one graph call may hold (256 MB)

FeatureColumns = dict[FeatureKey, list[tuple[int, list[int]]]]  # feature -> (input, columns)
Reduction = tuple[int, tuple[int, ...]]  # (index of the probed variable, axes summed over)


# -- the probe copy -----------------------------------------------------------------------------


def probe_copy(model: Any, kinds: dict[str, tuple[str, ...]], seed: int = 0) -> Any:
    """A copy of `model` with weights redrawn so that it maps 0 to 0 and no unit is dead.

    Kernels are uniform in [0.5, 1.5] / fan_in (positive: no cancellation, every ReLU on a
    positive input's path stays alive); added per-channel terms (biases, betas, means,
    embedding tables) are 0; per-channel scales and variances are uniform in [0.5, 1.5].
    """
    import keras

    try:
        probe = keras.models.clone_model(model)
    except Exception as exc:  # a layer that cannot be re-created from its config
        raise SurgeryError(
            f"Cannot make a probe copy of model '{model.name}' for gradient verification: "
            f"keras.models.clone_model failed ({exc})."
        ) from exc
    rng = np.random.default_rng(seed)
    variables = live_variables(probe)
    written = []
    for path, var in variables.items():
        dtype = str(getattr(var.dtype, "name", var.dtype))
        if not is_float(dtype) or not hasattr(var, "assign"):
            continue
        name = str(getattr(var, "name", path)).rsplit("/", 1)[-1]
        shape = tuple(int(d) for d in var.shape)
        if name in KEEP_NAMES:
            continue
        if name in ZERO_NAMES:
            value = np.zeros(shape)
        elif name in UNIT_NAMES:
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.uniform(0.5, 1.5, shape) / _fan_in(shape, kinds.get(path))
        var.assign(value.astype(dtype))
        written.append(var)
    finalize_layers(probe, written)
    return probe


def _fan_in(shape: tuple[int, ...], kinds: tuple[str, ...] | None) -> float:
    if kinds is not None and len(kinds) == len(shape):
        sizes = [n for n, k in zip(shape, kinds) if k in ("in", "struct")]
    else:
        sizes = list(shape[:-1])
    return float(max(1, int(np.prod(sizes, dtype=np.int64)) if sizes else 1))


# -- what the probe is fed ----------------------------------------------------------------------


@dataclass
class ProbeInput:
    """One input of the probe copy, as it is fed one example at a time."""

    name: str
    shape: tuple[int, ...]  # one example, unknown lengths filled in
    dtype: str
    float_like: bool


def probe_inputs(graph: ModelGraph) -> list[ProbeInput]:
    """One ProbeInput per input of `graph`, in order."""
    return [ProbeInput(spec.name, example_shape(spec.shape), spec.dtype, is_float(spec.dtype))
            for spec in graph.inputs]


def zero_inputs(inputs: list[ProbeInput], batch: tuple[int, ...] = ()) -> list[np.ndarray]:
    """The all-zero input, one array per input with `batch` axes in front.

    Integer inputs hold id 1: not a mask id, and since the probe's embedding tables are 0, any
    id reads zeros. String inputs hold empty strings.
    """
    arrays = []
    for spec in inputs:
        shape = batch + spec.shape
        if spec.float_like:
            arrays.append(np.zeros(shape, dtype=spec.dtype))
        elif "int" in spec.dtype:
            arrays.append(np.ones(shape, dtype=spec.dtype))
        else:
            arrays.append(np.full(shape, "", dtype=object))
    return arrays


def perturbations(
    inputs: list[ProbeInput], keys: list[FeatureKey], columns: FeatureColumns,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Two examples per feature: zeros except the feature's columns at every position.

    The first `len(keys)` examples hold each feature's draw, the next `len(keys)` the same draws
    negated (the second draw that revives units a negative weight turns off).
    """
    draws = zero_inputs(inputs, (len(keys),))
    for row, key in enumerate(keys):
        for index, cols in columns[key]:
            spec = inputs[index]
            shape = spec.shape[:-1] + (len(cols),)
            draws[index][row][..., cols] = rng.uniform(0.5, 1.5, shape).astype(spec.dtype)
    negated = [-d if spec.float_like else d for d, spec in zip(draws, inputs)]
    return [np.concatenate([a, b]) for a, b in zip(draws, negated)]


def chunk_size(examples: int, gradient_floats: int) -> int:
    """Examples per graph call, for `examples` examples of `gradient_floats` probed floats each.

    Tracing cost grows with the chunk, so small jobs use small chunks, and each example holds a
    gradient of every probed weight, so large models use small chunks.
    """
    return max(1, min(8, examples // 16, GRADIENT_BUDGET // max(gradient_floats, 1)))


def _call_for_inference(layer: Any, x: Any) -> Any:
    try:
        return layer(x, training=False)
    except TypeError:  # a layer whose call takes no `training`
        return layer(x)


def _to_numpy(x: Any) -> np.ndarray:
    # Not np.asarray: a PyTorch tensor that requires grad refuses it.
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


# -- gradient probes ----------------------------------------------------------------------------


class GradientProbe(abc.ABC):
    """What the verifier asks of a backend: per-example gradients of a probe copy.

    A probe takes, for each example, the gradient of a random projection of every output with
    respect to every probed variable, subtracts the gradient at the all-zero input, and reduces
    |difference| onto each target axis: `reductions[k] = (v, axes)` sums variable `v` over
    `axes`. The all-zero input's own gradients, reduced the same way, are in `base_reduced`.

    Args:
        probe: the probe copy (`probe_copy`).
        inputs: its inputs (`probe_inputs`).
        variables: the probed variables of `probe`.
        reductions: one (variable index, axes summed over) per target.
        seed: seeds the random projection of the outputs.
        chunk: examples per graph call (`chunk_size`).
    """

    backend: ClassVar[str]  # the name keras.backend.backend() gives

    def __init__(self, probe: Any, inputs: list[ProbeInput], variables: list[Any],
                 reductions: list[Reduction], seed: int, chunk: int = 8):
        self.probe = probe
        self.inputs = inputs
        self.reductions = reductions
        self.chunk = chunk
        self.base_reduced: list[np.ndarray] = []

    def pack(self, tensors: list[Any]) -> Any:
        """One tensor per probe input, arranged the way the probe copy takes them."""
        return pack_inputs(self.probe, [i.name for i in self.inputs], tensors)

    def output_cotangents(self, seed: int) -> list[np.ndarray | None]:
        """The random projection of the outputs: one float32 array per float output."""
        import keras

        # Shapes from a symbolic call: an eager one compiles every op on JAX, one by one.
        specs = [keras.KerasTensor((1,) + i.shape, i.dtype) for i in self.inputs]
        outs = keras.tree.flatten(self.probe.compute_output_spec(self.pack(specs)))
        rng = np.random.default_rng(seed + 1)
        return [
            rng.normal(size=tuple(o.shape)).astype("float32")
            if is_float(str(getattr(o.dtype, "name", o.dtype))) else None
            for o in outs
        ]

    def reduce(self, gradients: list[Any]) -> list[np.ndarray]:
        """|gradients| summed onto each target axis, as numpy arrays."""
        return [np.abs(_to_numpy(gradients[v])).sum(axis=axes) if axes
                else np.abs(_to_numpy(gradients[v])) for v, axes in self.reductions]

    def run(self, examples: list[np.ndarray]) -> list[np.ndarray]:
        """Reduced gradient differences for a batch of examples (one array per input)."""
        n = len(examples[0])
        results: list[list[np.ndarray]] = [[] for _ in self.reductions]
        for start in range(0, n, self.chunk):
            part = [e[start:start + self.chunk] for e in examples]
            for i, values in enumerate(self._run_chunk(part)):
                results[i].append(values)
        return [np.concatenate(r, axis=0) for r in results]

    def _run_chunk(self, part: list[np.ndarray]) -> list[np.ndarray]:
        n = len(part[0])
        if n < self.chunk:  # pad with copies of the last example: one traced graph only
            part = [np.concatenate([p, np.repeat(p[-1:], self.chunk - n, axis=0)]) for p in part]
        return [_to_numpy(o)[:n] for o in self.reduced_chunk(part)]

    @abc.abstractmethod
    def reduced_chunk(self, part: list[np.ndarray]) -> list[Any]:
        """Reduced gradient differences of exactly `chunk` examples, one array per target."""

    @classmethod
    def gradient_kind(cls, layer: Any, input_shape: Sequence[int | None], variable: Any) -> str:
        """How the gradient of `variable` (a weight of `layer`) relates to the layer's input.

        "reads": it changes with the input (a multiplied weight). "added": it does not - a
        per-channel term that is added (beta, moving mean, a bias), whose gradient is the
        cotangent arriving at its channel whatever the channel reads. "none": no gradient
        reaches it (a layer that computes with values cached from the variable).
        """
        rng = np.random.default_rng(0)
        shape = (2,) + example_shape(input_shape)
        drawn: list[np.ndarray] = []

        def cotangent(output_shape: tuple[int, ...]) -> np.ndarray:
            if not drawn:  # drawn once, after the first call shows the output's shape
                drawn.append(rng.normal(size=output_shape).astype("float32"))
            return drawn[0]

        grads = []
        for _ in range(2):
            x = rng.normal(size=shape).astype("float32")
            grad = cls.layer_gradient(layer, x, variable, cotangent)
            grads.append(np.zeros(variable.shape) if grad is None else _to_numpy(grad))
        scale = max(float(np.max(np.abs(grads[0]))), float(np.max(np.abs(grads[1]))))
        if scale == 0:
            return "none"
        return "reads" if float(np.max(np.abs(grads[0] - grads[1]))) > 1e-5 * scale else "added"

    @staticmethod
    @abc.abstractmethod
    def layer_gradient(layer: Any, x: np.ndarray, variable: Any,
                       cotangent: Callable[[tuple[int, ...]], np.ndarray]) -> Any:
        """The gradient of sum(layer(x) * cotangent(output shape)) for `variable`, or None."""


class TensorFlowProbe(GradientProbe):
    """The TensorFlow probe: tf.GradientTape, `chunk` examples unrolled in one tf.function."""

    backend = "tensorflow"

    def __init__(self, probe: Any, inputs: list[ProbeInput], variables: list[Any],
                 reductions: list[Reduction], seed: int, chunk: int = 8):
        import tensorflow as tf

        super().__init__(probe, inputs, variables, reductions, seed, chunk)
        self.tf = tf
        self.variables = [v.value for v in variables]
        self.cotangents = [None if c is None else tf.constant(c)
                           for c in self.output_cotangents(seed)]
        # Gradients at the all-zero input: 0 for every entry whose input maps 0 to 0. They are
        # subtracted, so a layer that does not (a sigmoid) still shows only what moved.
        self.base = [tf.zeros_like(v) for v in self.variables]
        self.base = [tf.constant(np.asarray(g))
                     for g in self._grads([tf.constant(z) for z in zero_inputs(inputs)])]
        self.base_reduced = self.reduce(self.base)
        self._chunk_fn: Callable | None = None

    def _grads(self, example: list[Any]) -> list[Any]:
        import keras

        tf = self.tf
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.variables)
            outs = self.probe(self.pack([tf.expand_dims(x, 0) for x in example]),
                              training=False)
            loss = tf.constant(0.0)
            for y, c in zip(keras.tree.flatten(outs), self.cotangents):
                if c is not None:
                    loss = loss + tf.reduce_sum(tf.cast(y, "float32") * c)
        grads = tape.gradient(loss, self.variables,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [tf.cast(g, "float32") - tf.cast(b, "float32") for g, b in zip(grads, self.base)]

    def _reduce(self, example: list[Any]) -> list[Any]:
        tf = self.tf
        diffs = self._grads(example)
        return [tf.reduce_sum(tf.abs(diffs[v]), axis=axes) if axes else tf.abs(diffs[v])
                for v, axes in self.reductions]

    def reduced_chunk(self, part: list[np.ndarray]) -> list[Any]:
        tf = self.tf
        if self._chunk_fn is None:
            # Unrolled in one graph (the executor runs the backward passes side by side), not
            # tf.vectorized_map: pfor-vectorised MultiHeadAttention gradients corrupt memory
            # with oneDNN on (TF 2.21: segfaults, malloc assertions from batch 8 up).
            def chunk_fn(tensors: list[Any]) -> list[Any]:
                rows = [self._reduce([t[i] for t in tensors]) for i in range(self.chunk)]
                return [tf.stack([r[k] for r in rows]) for k in range(len(self.reductions))]

            self._chunk_fn = tf.function(chunk_fn)
        return self._chunk_fn([tf.constant(p) for p in part])

    @staticmethod
    def layer_gradient(layer: Any, x: np.ndarray, variable: Any,
                       cotangent: Callable[[tuple[int, ...]], np.ndarray]) -> Any:
        import tensorflow as tf

        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variable.value)
            y = _call_for_inference(layer, tf.constant(x))
            c = tf.constant(cotangent(tuple(y.shape)))
            loss = tf.reduce_sum(tf.cast(y, "float32") * c)
        return tape.gradient(loss, variable.value)


class StatelessProbe(GradientProbe):
    """A probe that differentiates the probe copy as a pure function of its variables' values.

    JAX and PyTorch take gradients of functions, not of recorded variable reads: the probe copy
    is called inside a `keras.StatelessScope` that maps every variable to an argument (what
    `stateless_call` does, but through `__call__`, so masks and `training` take the path the
    TensorFlow probe's call takes), and a backend only says how to differentiate (`grad`),
    map over examples (`vmap`) and compile (`jit`) such a function.
    """

    def __init__(self, probe: Any, inputs: list[ProbeInput], variables: list[Any],
                 reductions: list[Reduction], seed: int, chunk: int = 8):
        import keras

        super().__init__(probe, inputs, variables, reductions, seed, chunk)
        self._refuse_text_inputs()
        probed = {id(v) for v in variables}
        self.variables = list(variables)
        # Every other variable is an argument too, not a constant the compiled function holds.
        self.others = [v for v in probe.variables if id(v) not in probed]
        self.values = [v.value for v in self.variables]
        self.other_values = [v.value for v in self.others]
        self.cotangents = [None if c is None else keras.ops.convert_to_tensor(c)
                           for c in self.output_cotangents(seed)]
        self._chunk_fn = self.jit(self._chunk_function())
        # Gradients at the all-zero input, subtracted as in TensorFlowProbe (a sigmoid's
        # entries then show only what moved). Taken by the same compiled function as every
        # chunk, from a chunk of zeros, so that JAX compiles one function and not two.
        self.base = [keras.ops.zeros(v.shape, "float32") for v in self.variables]
        reduced, self.base = self._chunk_fn(self.values, self.other_values, self.base,
                                            self._tensors(zero_inputs(inputs, (chunk,))))
        self.base_reduced = [_to_numpy(r)[0] for r in reduced]

    def _chunk_function(self) -> Callable[..., Any]:
        """(values, others, base, examples) -> (reduced differences, first example's gradients).
        """
        import keras

        gradient = self.grad(self._loss)

        def one(values: list[Any], others: list[Any], base: list[Any],
                example: list[Any]) -> tuple[list[Any], list[Any]]:
            grads = [keras.ops.cast(g, "float32") for g in gradient(values, others, example)]
            diffs = [g - b for g, b in zip(grads, base)]
            return [keras.ops.sum(keras.ops.abs(diffs[v]), axis=axes) if axes
                    else keras.ops.abs(diffs[v]) for v, axes in self.reductions], grads

        mapped = self.vmap(one)

        def chunk_fn(*args: Any) -> tuple[list[Any], list[Any]]:
            reduced, grads = mapped(*args)
            return reduced, [g[0] for g in grads]

        return chunk_fn

    @staticmethod
    def _tensors(arrays: list[np.ndarray]) -> list[Any]:
        import keras

        return [keras.ops.convert_to_tensor(a) for a in arrays]

    def _refuse_text_inputs(self) -> None:
        text = [i.name for i in self.inputs if not i.float_like and "int" not in i.dtype]
        if text:
            raise SurgeryError(
                f"Gradient verification on the '{self.backend}' backend cannot feed the "
                f"probe copy of model '{self.probe.name}': input(s) {text} hold strings, "
                "which only TensorFlow tensors can. Run it with KERAS_BACKEND=tensorflow. "
                f"Received: dtypes={[i.dtype for i in self.inputs]}"
            )

    def _loss(self, values: list[Any], others: list[Any], example: list[Any]) -> Any:
        """The projected outputs for one example, with the variables reading `values`."""
        import keras

        mapping = list(zip(self.variables, values)) + list(zip(self.others, others))
        with keras.StatelessScope(state_mapping=mapping):
            outs = self.probe(self.pack([keras.ops.expand_dims(x, 0) for x in example]),
                              training=False)
        loss = keras.ops.zeros((), "float32")
        for y, c in zip(keras.tree.flatten(outs), self.cotangents):
            if c is not None:
                loss = loss + keras.ops.sum(keras.ops.cast(y, "float32") * c)
        return loss

    def reduced_chunk(self, part: list[np.ndarray]) -> list[Any]:
        return self._chunk_fn(self.values, self.other_values, self.base, self._tensors(part))[0]

    @classmethod
    def layer_gradient(cls, layer: Any, x: np.ndarray, variable: Any,
                       cotangent: Callable[[tuple[int, ...]], np.ndarray]) -> Any:
        import keras

        def loss(values: list[Any], x: Any) -> Any:
            with keras.StatelessScope(state_mapping=[(variable, values[0])]):
                y = _call_for_inference(layer, x)
            # A constant of the compiled function: the output's shape is static when traced.
            c = keras.ops.convert_to_tensor(cotangent(tuple(y.shape)))
            return keras.ops.sum(keras.ops.cast(y, "float32") * c)

        return cls.jit(cls.grad(loss))([variable.value], keras.ops.convert_to_tensor(x))[0]

    @staticmethod
    @abc.abstractmethod
    def grad(fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`'s gradient with respect to its first argument (a list of tensors)."""

    @staticmethod
    @abc.abstractmethod
    def vmap(fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` mapped over the first axis of its last argument (the examples)."""

    @staticmethod
    def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` compiled, where compiling pays for itself."""
        return fn


class JaxProbe(StatelessProbe):
    """The JAX probe: jax.grad of the stateless call, vmapped over a chunk, jitted."""

    backend = "jax"

    @staticmethod
    def grad(fn: Callable[..., Any]) -> Callable[..., Any]:
        import jax

        return jax.grad(fn)

    @staticmethod
    def vmap(fn: Callable[..., Any]) -> Callable[..., Any]:
        import jax

        return jax.vmap(fn, in_axes=(None, None, None, 0))

    @staticmethod
    def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
        import jax

        return jax.jit(fn)


class TorchProbe(StatelessProbe):
    """The PyTorch probe: torch.autograd of the stateless call, one example at a time.

    Not torch.func.vmap: Keras's PyTorch convolutions clone to channels-last, which vmap
    refuses, and its attention has no batching rule. Not compiled: torch.compile costs seconds
    per graph, more than the eager probe of a model this verifier is run on takes.
    """

    backend = "torch"

    @staticmethod
    def grad(fn: Callable[..., Any]) -> Callable[..., Any]:
        import torch

        def gradient(values: list[Any], *args: Any) -> list[Any]:
            # Fresh leaves: non-trainable variables do not require grad, and the variables'
            # own parameters must not collect gradients.
            leaves = [v.detach().requires_grad_(True) for v in values]
            with torch.enable_grad():
                loss = fn(leaves, *args)
            if not loss.requires_grad:  # no probed variable reaches an output
                return [torch.zeros_like(v) for v in leaves]
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)]

        return gradient

    @staticmethod
    def vmap(fn: Callable[..., Any]) -> Callable[..., Any]:
        import keras
        import torch

        def mapped(*args: Any) -> Any:
            *fixed, examples = args
            rows = [fn(*fixed, [e[i] for e in examples]) for i in range(len(examples[0]))]
            return keras.tree.map_structure(lambda *leaves: torch.stack(leaves), *rows)

        return mapped


PROBES: dict[str, type[GradientProbe]] = {
    p.backend: p for p in (TensorFlowProbe, JaxProbe, TorchProbe)
}


def probe_for_backend(backend: str | None = None) -> type[GradientProbe]:
    """The gradient probe of a Keras backend (by default, the one Keras runs on).

    Raises:
        SurgeryError: no probe takes gradients on that backend yet.
    """
    if backend is None:
        import keras

        backend = keras.backend.backend()
    probe = PROBES.get(backend)
    if probe is None:
        available = ", ".join(f"'{name}'" for name in sorted(PROBES))
        raise SurgeryError(
            f"Gradient verification has no probe for the '{backend}' backend yet (gradients "
            f"are taken with each backend's own machinery; probes exist for {available}). "
            f"Run it with KERAS_BACKEND=tensorflow. Received: backend={backend}"
        )
    return probe
