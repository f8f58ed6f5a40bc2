"""The gradient-mapping verifier: the phi table recomputed from gradients, and a numeric check
that a surgery kept the old outputs.

Label propagation (phi.py) says which weight entries read each input feature; this module finds
the same thing a second, independent way, from gradients of a *probe copy* of the model (same
architecture, redrawn weights; the user's model is never touched), as the paper's "gradient
mapping" does.

Why a zero base and not random base points: at a random input, the gradient of a weight
entry W[i, j] is (what index i reads) x (the cotangent arriving at j). Any nonlinearity after a
merge makes that cotangent depend on every feature, so perturbing one feature moves the gradient
of *every* row, not only of the rows that read it. The probe is therefore made to map 0 to 0
(kernels positive and scaled 1/fan_in, biases, betas, means and embedding tables zero, scales
and variances around 1), and each feature is probed alone on an all-zero input: an entry whose
input side does not depend on the feature then reads an exact 0 and has an exact 0 gradient,
whatever happens downstream. Positive kernels keep every ReLU on the feature's path alive, and a
second, negated draw revives the units a user's layer with negative weights turns off.

Per-channel parameters that are *added* (BatchNormalization beta and moving mean, an
EinsumDense bias) have a gradient that does not read the layer's input at all; they are found
by calling the layer alone on two inputs, and listed as unverified rather than guessed at.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.features import FeatureSpec
from keras_surgery.graph import ModelGraph, finalize_layers, graph_from_model, live_variables
from keras_surgery.phi import PhiTable
from keras_surgery.propagate import GraphLabels, propagate

logger = logging.getLogger("keras_surgery")

FeatureKey = tuple[str, Any]

VERIFIED_KINDS = ("in", "diag")
UNKNOWN_DIM = 4  # length given to axes of unknown length (time steps, pixels) in probe inputs
# Probe values by variable name: added per channel -> 0; multiplied per channel -> around 1.
ZERO_NAMES = frozenset({"bias", "beta", "moving_mean", "mean", "embeddings", "offset"})
UNIT_NAMES = frozenset({"gamma", "moving_variance", "variance", "scale"})
KEEP_NAMES = frozenset({"count", "iterations"})
GRADIENT_BUDGET = 2**26  # floats of per-example gradients one graph call may hold (256 MB)


# -- results ------------------------------------------------------------------------------------


def describe_feature(key: FeatureKey) -> str:
    return f"{key[0]}:{key[1]}"


def _indices(values: np.ndarray, limit: int = 12) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return "[" + shown + (", ..." if len(values) > limit else "") + "]"


@dataclass(frozen=True)
class Mismatch:
    """Phi and gradients disagree on which entries of one weight axis read one feature."""

    feature: FeatureKey
    path: str  # "layer/role", as in the phi table
    axis: int
    only_symbolic: np.ndarray  # listed by phi, but the gradient never reaches them
    only_gradient: np.ndarray  # reached by the gradient, but not listed by phi

    def describe(self) -> str:
        parts = []
        if len(self.only_symbolic):
            parts.append(
                f"phi lists {_indices(self.only_symbolic)} but their gradient does not depend "
                "on it"
            )
        if len(self.only_gradient):
            parts.append(
                f"the gradient of {_indices(self.only_gradient)} depends on it but phi does "
                "not list them"
            )
        return (
            f"feature {describe_feature(self.feature)}: '{self.path}' axis {self.axis}: "
            + "; ".join(parts)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": list(self.feature),
            "path": self.path,
            "axis": self.axis,
            "only_symbolic": self.only_symbolic.tolist(),
            "only_gradient": self.only_gradient.tolist(),
        }


@dataclass(frozen=True)
class Unverified:
    """A feature or a weight axis the verifier could not probe, and why. Never counted as
    verified."""

    reason: str
    feature: FeatureKey | None = None
    path: str | None = None
    axis: int | None = None

    def describe(self) -> str:
        if self.feature is not None:
            subject = f"feature {describe_feature(self.feature)}"
        elif self.path is not None:
            subject = f"'{self.path}'" + (f" axis {self.axis}" if self.axis is not None else "")
        else:
            subject = "model"
        return f"{subject}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": None if self.feature is None else list(self.feature),
            "path": self.path,
            "axis": self.axis,
            "reason": self.reason,
        }


@dataclass
class VerificationResult:
    """The outcome of `verify_mapping`.

    Attributes:
        model: the model's description.
        features: the features that were probed.
        mismatches: every (feature, weight axis) on which phi and gradients disagree.
        unverified: features and weight axes that could not be probed, with the reason.
        checked: how many (feature, weight axis) pairs were compared.
        notes: caveats for reading the mismatches (e.g. a layer that does not map 0 to 0).
        seconds: wall time.
    """

    model: str
    features: list[FeatureKey]
    mismatches: list[Mismatch]
    unverified: list[Unverified]
    checked: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when gradients and phi agree exactly on every pair that was compared."""
        return not self.mismatches

    @property
    def missing(self) -> list[Mismatch]:
        """The mismatches where phi misses a dependency the gradients show: a rule put an
        index in the wrong place, or mixed indices it says it keeps apart. (The others only
        list entries whose gradient never depends on the feature: structural zeros such as
        a transposed convolution's output padding, which axis-wise labels cannot express.)"""
        return [m for m in self.mismatches if len(m.only_gradient)]

    def summary(self, limit: int = 20) -> str:
        """A human-readable account: verdict, mismatches, unverified items, notes."""
        verdict = "OK" if self.ok else (
            f"{len(self.mismatches)} MISMATCH(ES), {len(self.missing)} with dependencies phi "
            "misses"
        )
        lines = [
            f"Gradient verification of {self.model}: {verdict} - {len(self.features)} "
            f"feature(s), {self.checked} (feature, weight axis) pair(s) compared, "
            f"{len(self.unverified)} unverified, {self.seconds:.2f} s"
        ]
        for m in self.mismatches[:limit]:
            lines.append(f"mismatch: {m.describe()}")
        if len(self.mismatches) > limit:
            lines.append(f"... and {len(self.mismatches) - limit} more mismatch(es)")
        for u in self.unverified[:limit]:
            lines.append(f"unverified: {u.describe()}")
        if len(self.unverified) > limit:
            lines.append(f"... and {len(self.unverified) - limit} more unverified")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ok": self.ok,
            "features": [list(k) for k in self.features],
            "checked": self.checked,
            "mismatches": [m.to_dict() for m in self.mismatches],
            "unverified": [u.to_dict() for u in self.unverified],
            "notes": list(self.notes),
            "seconds": self.seconds,
        }


# -- what is probed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One input-side axis of one weight: the gradient is reduced onto it."""

    path: str  # "layer/role"
    store_path: str  # where the variable lives (same in the probe copy)
    axis: int
    kind: str


@dataclass
class _ProbeInput:
    name: str
    shape: tuple[int, ...]  # one example, unknown lengths filled in
    dtype: str
    float_like: bool


def _is_float(dtype: str) -> bool:
    return "float" in dtype


def _targets(labels: GraphLabels) -> tuple[list[_Target], list[Unverified], dict[str, tuple]]:
    """Every input-side weight axis; weights that read values by lookup are unverified.

    Also returns the axis kinds of every weight by store path (for the probe's fan-in)."""
    targets: list[_Target] = []
    unverified: list[Unverified] = []
    kinds: dict[str, tuple[str, ...]] = {}
    for name, record in labels.records.items():
        for w, spec in zip(record.result.weights, record.node.weights):
            path = f"{name}/{w.role}"
            kinds[spec.path] = tuple(a.kind for a in w.axes)
            if record.opaque:
                unverified.append(Unverified(
                    f"layer '{name}' has no rule that labels it (opaque), so phi lists none of "
                    "its entries", path=path,
                ))
                continue
            for axis, waxis in enumerate(w.axes):
                if waxis.labels.ids is None:
                    continue
                if waxis.kind == "lookup":
                    unverified.append(Unverified(
                        "its rows are selected by integer ids, which have no gradient",
                        path=path, axis=axis,
                    ))
                elif waxis.kind in VERIFIED_KINDS:
                    targets.append(_Target(path, spec.path, axis, waxis.kind))
    return targets, unverified, kinds


def _probe_inputs(
    graph: ModelGraph, labels: GraphLabels, unverified: list[Unverified]
) -> tuple[list[_ProbeInput], dict[FeatureKey, list[tuple[int, list[int]]]]]:
    """The probe's inputs, and for each probe-able feature its (input index, columns)."""
    inputs: list[_ProbeInput] = []
    columns: dict[FeatureKey, list[tuple[int, list[int]]]] = {}
    for index, spec in enumerate(graph.inputs):
        shape = tuple(UNKNOWN_DIM if d is None else int(d) for d in spec.shape)
        float_like = _is_float(spec.dtype)
        inputs.append(_ProbeInput(spec.name, shape, spec.dtype, float_like))
        cols = labels.columns.get(spec.name, [])
        reason = None
        if not float_like:
            reason = (
                f"input '{spec.name}' has dtype {spec.dtype}: its values cannot be perturbed "
                "continuously, so gradients cannot probe its features"
            )
        elif not spec.shape or spec.shape[-1] is None:
            reason = f"input '{spec.name}' has no feature axis of known width"
        for j, col in enumerate(cols):
            key = col.feature
            if reason is not None:
                if key not in columns and all(u.feature != key for u in unverified):
                    unverified.append(Unverified(reason, feature=key))
                continue
            columns.setdefault(key, []).append((index, [j]))
    merged = {}
    for key, parts in columns.items():
        by_input: dict[int, list[int]] = {}
        for index, cols in parts:
            by_input.setdefault(index, []).extend(cols)
        merged[key] = sorted(by_input.items())
    return inputs, merged


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
        if not _is_float(dtype) or not hasattr(var, "assign"):
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


def _layer_by_name(model: Any, name: str) -> Any:
    layer = model
    for part in name.split("/"):
        layer = layer.get_layer(part)
    return layer


def _gradient_kind(layer: Any, input_shape: Sequence[int | None], variable: Any) -> str:
    """How the gradient of `variable` (a weight of `layer`) relates to the layer's input.

    "reads": it changes with the input (a multiplied weight). "added": it does not - a
    per-channel term that is added (beta, moving mean, a bias), whose gradient is the cotangent
    arriving at its channel whatever the channel reads. "none": no gradient reaches it (a
    layer that computes with values cached from the variable).
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shape = (2,) + tuple(UNKNOWN_DIM if d is None else int(d) for d in input_shape)
    cotangent = None
    grads = []
    for _ in range(2):
        x = tf.constant(rng.normal(size=shape).astype("float32"))
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variable.value)
            try:
                y = layer(x, training=False)
            except TypeError:
                y = layer(x)
            if cotangent is None:
                cotangent = tf.constant(rng.normal(size=tuple(y.shape)).astype("float32"))
            loss = tf.reduce_sum(tf.cast(y, "float32") * cotangent)
        grad = tape.gradient(loss, variable.value)
        grads.append(np.zeros(variable.shape) if grad is None else np.asarray(grad))
    scale = max(float(np.max(np.abs(grads[0]))), float(np.max(np.abs(grads[1]))))
    if scale == 0:
        return "none"
    return "reads" if float(np.max(np.abs(grads[0] - grads[1]))) > 1e-5 * scale else "added"


UNPROBED_REASONS = {
    "added": "its gradient does not read the layer's input (a per-channel term that is added), "
             "so gradients cannot tell which features it belongs to",
    "none": "no gradient reaches it (the layer computes with values cached from it)",
}


def _unprobed_weights(
    probe: Any, graph: ModelGraph, targets: list[_Target], variables: dict[str, Any]
) -> dict[str, str]:
    """Store path -> "added" or "none", for weights with only `diag` input-side axes whose
    gradient does not read the layer's input (checked on the layer alone; a layer that cannot
    be called alone keeps its weights verified)."""
    kinds_by_path: dict[str, set[str]] = {}
    for t in targets:
        kinds_by_path.setdefault(t.store_path, set()).add(t.kind)
    layer_of = {spec.path: name for name, node in graph.layers.items() for spec in node.weights}
    found = {}
    for store_path, kinds in kinds_by_path.items():
        if kinds != {"diag"}:
            continue
        name = layer_of.get(store_path)
        node = graph.layers.get(name) if name else None
        if node is None or not node.calls or len(node.calls[0].inputs) != 1:
            continue
        try:
            layer = _layer_by_name(probe, name)
            shape = graph.tensor_shapes.get(node.calls[0].inputs[0])
            if shape is None:  # layers inside a Sequential have no recorded shapes
                shape = tuple(layer.input.shape[1:])
            kind = _gradient_kind(layer, shape, variables[store_path])
        except Exception:  # a layer that cannot run alone: keep the weight as verified
            logger.debug("cannot call layer %s alone", name, exc_info=True)
            continue
        if kind != "reads":
            found[store_path] = kind
    return found


# -- the gradient side --------------------------------------------------------------------------


class _GradientProbe:
    """Per-example gradients of a random projection of every output, reduced onto each target
    axis; `chunk` examples per graph call."""

    def __init__(self, probe: Any, inputs: list[_ProbeInput], variables: list[Any],
                 reductions: list[tuple[int, tuple[int, ...]]], seed: int, chunk: int = 8):
        import keras
        import tensorflow as tf

        self.tf = tf
        self.probe = probe
        self.inputs = inputs
        self.variables = [v.value for v in variables]
        self.reductions = reductions  # (variable index, axes summed over)
        zero = self._zero_example()
        outs = keras.tree.flatten(probe(self._pack([z[None] for z in zero]), training=False))
        rng = np.random.default_rng(seed + 1)
        self.cotangents = [
            tf.constant(rng.normal(size=tuple(o.shape)).astype("float32"))
            if _is_float(str(getattr(o.dtype, "name", o.dtype))) else None
            for o in outs
        ]
        # Gradients at the all-zero input: 0 for every entry whose input maps 0 to 0. They are
        # subtracted, so a layer that does not (a sigmoid) still shows only what moved.
        self.base = [tf.zeros_like(v) for v in self.variables]
        self.base = [tf.constant(np.asarray(g)) for g in self._grads([tf.constant(z)
                                                                       for z in zero])]
        self.base_reduced = [np.abs(np.asarray(self.base[v])).sum(axis=axes) if axes
                             else np.abs(np.asarray(self.base[v])) for v, axes in reductions]
        self.chunk = chunk
        self._chunk_fn: Callable | None = None

    def _zero_example(self) -> list[np.ndarray]:
        examples = []
        for spec in self.inputs:
            if spec.float_like:
                examples.append(np.zeros(spec.shape, dtype=spec.dtype))
            elif "int" in spec.dtype:
                # id 1: not a mask id; probe embedding tables are 0, so any id reads zeros
                examples.append(np.ones(spec.shape, dtype=spec.dtype))
            else:
                examples.append(np.full(spec.shape, "", dtype=object))
        return examples

    def _pack(self, tensors: list[Any]) -> Any:
        return pack_inputs(self.probe, [i.name for i in self.inputs], tensors)

    def _grads(self, example: list[Any]) -> list[Any]:
        import keras

        tf = self.tf
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.variables)
            outs = self.probe(self._pack([tf.expand_dims(x, 0) for x in example]),
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
        tf = self.tf
        n = len(part[0])
        if n < self.chunk:  # pad with copies of the last example: one traced graph only
            part = [np.concatenate([p, np.repeat(p[-1:], self.chunk - n, axis=0)]) for p in part]
        if self._chunk_fn is None:
            # Unrolled in one graph (the executor runs the backward passes side by side), not
            # tf.vectorized_map: pfor-vectorised MultiHeadAttention gradients corrupt memory
            # with oneDNN on (TF 2.21: segfaults, malloc assertions from batch 8 up).
            def chunk_fn(tensors: list[Any]) -> list[Any]:
                rows = [self._reduce([t[i] for t in tensors]) for i in range(self.chunk)]
                return [tf.stack([r[k] for r in rows]) for k in range(len(self.reductions))]

            self._chunk_fn = tf.function(chunk_fn)
        out = self._chunk_fn([tf.constant(p) for p in part])
        return [np.asarray(o)[:n] for o in out]


def _perturbations(
    inputs: list[_ProbeInput], keys: list[FeatureKey],
    columns: dict[FeatureKey, list[tuple[int, list[int]]]], rng: np.random.Generator,
) -> list[np.ndarray]:
    """One example per feature: zeros, except the feature's columns at every position."""
    batch = []
    for spec in inputs:
        if spec.float_like:
            batch.append(np.zeros((len(keys),) + spec.shape, dtype=spec.dtype))
        elif "int" in spec.dtype:
            batch.append(np.ones((len(keys),) + spec.shape, dtype=spec.dtype))
        else:
            batch.append(np.full((len(keys),) + spec.shape, "", dtype=object))
    for row, key in enumerate(keys):
        for index, cols in columns[key]:
            spec = inputs[index]
            shape = spec.shape[:-1] + (len(cols),)
            batch[index][row][..., cols] = rng.uniform(0.5, 1.5, shape).astype(spec.dtype)
    return batch


# -- the verifier -------------------------------------------------------------------------------


def verify_mapping(
    model: Any,
    *,
    features: FeatureSpec | None = None,
    sample: int | None = None,
    seed: int = 0,
    rtol: float = 1e-6,
    strict: bool = False,
) -> VerificationResult:
    """Checks the phi table of `model` against gradients of a probe copy.

    For each feature, the probe copy (same architecture, weights redrawn so that it maps 0 to
    0 and no unit is dead; `model` itself is never touched) is run on an all-zero input with
    only that feature's columns set, and the gradient of a random projection of all outputs is
    taken with respect to every weight (twice: the feature's values, then their negation). An
    entry of an input-side weight axis (kind "in" or "diag") *reads* the feature when the sum
    of |gradient - gradient at the all-zero input| over the weight's other axes exceeds `rtol`
    times the largest such sum of that axis. Those entries must be exactly the ones
    `phi_table(model, features=features)` lists; `result.missing` holds the mismatches where
    gradients show a dependency phi does not list (a wrong rule), the other mismatches only
    entries phi lists that gradients never reach (structural zeros, or a feature whose effect
    is multiplied by another input that the probe holds at 0). Entries that read non-zero
    values at the all-zero input (after a sigmoid, say) are only checked in that second
    direction; `result.notes` names them. Layers run in inference mode (dropout off).

    Not probed, and listed in `result.unverified` with the reason: features of integer or
    string inputs, embedding rows (selected by ids, which have no gradient), weights of
    layers without a rule, and per-channel terms that are added (their gradient does not read
    the layer's input).

    Args:
        model: a built keras.Model.
        features: names for the input columns, as for `phi_table`.
        sample: verify this many randomly chosen features instead of all of them.
        seed: seeds the probe weights, the perturbations and the sample.
        rtol: relative threshold separating a dependency from numerical noise.
        strict: raise UnsupportedLayerError for layers without a rule.

    Returns:
        VerificationResult with `ok`, `mismatches`, `unverified` and `summary()`.

    Raises:
        SurgeryError: the model cannot be copied for probing (clone_model fails).

    Example:
        >>> result = ks.verify_mapping(model, features={"obs": ["hp", ("pos", 2)]})
        >>> result.ok                                                     # doctest: +SKIP
        True
    """
    start = time.perf_counter()
    graph = graph_from_model(model)
    labels = propagate(graph, features=features, strict=strict)
    table = PhiTable.from_labels(labels)
    targets, unverified, kinds = _targets(labels)
    inputs, columns = _probe_inputs(graph, labels, unverified)
    keys = list(columns)
    rng = np.random.default_rng(seed)
    if sample is not None and sample < len(keys):
        chosen = set(rng.choice(len(keys), size=max(0, int(sample)), replace=False).tolist())
        keys = [k for i, k in enumerate(keys) if i in chosen]

    probe = probe_copy(model, kinds, seed)
    variables = live_variables(probe)
    missing = sorted({t.store_path for t in targets} - set(variables))
    if missing:
        raise SurgeryError(
            f"The probe copy of model '{model.name}' lacks variables {missing[:3]}; "
            "clone_model did not reproduce the architecture."
        )
    unprobed = _unprobed_weights(probe, graph, targets, variables)
    for store_path, kind in unprobed.items():
        path = next(t.path for t in targets if t.store_path == store_path)
        unverified.append(Unverified(UNPROBED_REASONS[kind], path=path))
    targets = [t for t in targets if t.store_path not in unprobed]
    result = VerificationResult(
        graph.description, keys, [], unverified, 0,
    )
    if not targets or not keys:
        result.seconds = time.perf_counter() - start
        return result

    store_paths = list(dict.fromkeys(t.store_path for t in targets))
    var_index = {p: i for i, p in enumerate(store_paths)}
    reductions = []
    for t in targets:
        ndim = len(variables[t.store_path].shape)
        reductions.append((var_index[t.store_path], tuple(a for a in range(ndim) if a != t.axis)))
    # Examples per graph call: tracing cost grows with it, so small jobs use small chunks, and
    # each example holds a gradient of every probed weight, so large models use small chunks.
    size = sum(int(np.prod(variables[p].shape)) for p in store_paths)
    chunk = max(1, min(8, 2 * len(keys) // 16, GRADIENT_BUDGET // max(size, 1)))
    gradients = _GradientProbe(probe, inputs, [variables[p] for p in store_paths], reductions,
                               seed, chunk)
    draws = _perturbations(inputs, keys, columns, rng)
    negated = [-d if spec.float_like else d for d, spec in zip(draws, inputs)]
    both = [np.concatenate([a, b]) for a, b in zip(draws, negated)]
    reduced = gradients.run(both)
    n = len(keys)
    _compare(result, table, targets, keys, reduced, gradients.base_reduced, n, rtol)
    result.seconds = time.perf_counter() - start
    logger.info("%s", result.summary().splitlines()[0])
    return result


def _compare(
    result: VerificationResult, table: PhiTable, targets: list[_Target], keys: list[FeatureKey],
    reduced: list[np.ndarray], base: list[np.ndarray], n: int, rtol: float,
) -> None:
    listed: dict[tuple[FeatureKey, str, int], np.ndarray] = {}
    for key in keys:
        for s in table.get(key, []):
            listed[(key, s.path, s.axis)] = np.asarray(s.indices, dtype=np.int64)
    noted: set[str] = set()
    for t, values, at_zero in zip(targets, reduced, base):
        strength = np.maximum(values[:n], values[n:])  # the feature's two draws
        threshold = rtol * float(strength.max()) if strength.size else 0.0
        # Entries that already have a gradient when every feature is 0 read something a layer
        # before them does not map to 0 (a sigmoid, a normalisation's offset, an integer
        # input): their gradient also carries the cotangent, which may depend on any feature,
        # so only the dependencies phi lists can be checked for them, not extra ones.
        unclean = at_zero > max(threshold, 1e-30)
        if unclean.any() and t.path not in noted:
            noted.add(t.path)
            result.notes.append(
                f"'{t.path}': {int(unclean.sum())} of {unclean.size} entries of axis {t.axis} "
                "read non-zero values when every input feature is 0 (a layer before them does "
                "not map 0 to 0); only the dependencies phi lists are checked for those."
            )
        for row, key in enumerate(keys):
            found = np.nonzero(strength[row] > threshold)[0] if threshold > 0 else np.array(
                [], dtype=np.int64)
            phi = listed.get((key, t.path, t.axis), np.array([], dtype=np.int64))
            result.checked += 1
            only_symbolic = np.setdiff1d(phi, found)
            only_gradient = np.setdiff1d(found, phi)
            only_gradient = only_gradient[~unclean[only_gradient]]
            if len(only_symbolic) or len(only_gradient):
                result.mismatches.append(
                    Mismatch(key, t.path, t.axis, only_symbolic, only_gradient)
                )


# -- function preservation ------------------------------------------------------------------------


@dataclass
class OutputDiff:
    """How far one new output is from the old one on the old output's indices."""

    name: str
    max_abs: float
    max_rel: float  # max_abs / max |old output|
    compared: int  # number of values compared
    ok: bool


@dataclass
class PreservationCheck:
    """The outcome of running the old and the new model on the same (mapped) inputs."""

    outputs: list[OutputDiff]
    skipped: list[str] = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def summary(self) -> str:
        lines = [f"Function preservation: {'OK' if self.ok else 'FAILED'} "
                 f"(atol {self.atol:g}, rtol {self.rtol:g})"]
        for o in self.outputs:
            lines.append(f"  output '{o.name}': max |new - old| = {o.max_abs:.3g} "
                         f"(relative {o.max_rel:.3g}) over {o.compared} value(s)"
                         f"{'' if o.ok else '  <-- differs'}")
        lines.extend(f"  skipped: {s}" for s in self.skipped)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "outputs": [vars(o).copy() for o in self.outputs],
            "skipped": list(self.skipped),
        }


def _input_struct(model: Any) -> Any:
    try:
        return model.input
    except (AttributeError, ValueError):
        return None


def pack_inputs(model: Any, names: Sequence[str], tensors: Sequence[Any]) -> Any:
    """Arranges one tensor per graph input (in `names` order) the way `model` takes them."""
    import keras

    struct = _input_struct(model)
    if struct is not None:
        flat = keras.tree.flatten(struct)
        by_name = dict(zip(names, tensors))
        wanted = [getattr(t, "name", None) for t in flat]
        if len(flat) == len(tensors) and all(n in by_name for n in wanted):
            return keras.tree.pack_sequence_as(struct, [by_name[n] for n in wanted])
    return list(tensors) if len(tensors) > 1 else tensors[0]


def _random_input(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    if _is_float(dtype):
        return rng.normal(size=shape).astype(dtype)
    if "int" in dtype or dtype == "bool":
        # small ids: valid rows of any table of two or more, and not the mask id 0 only
        return rng.integers(0, 2, size=shape).astype(dtype)
    raise TypeError(dtype)


def _axis_selections(old_axes: Sequence[Any], new_axes: Sequence[Any],
                     old_shape: Sequence[int], new_shape: Sequence[int]):
    """Per non-batch axis, (old indices, new indices) of the entries the two tensors share."""
    from keras_surgery.plan import index_map

    old_sel, new_sel = [], []
    for a in range(len(old_shape)):
        oa = old_axes[a] if a < len(old_axes) else None
        na = new_axes[a] if a < len(new_axes) else None
        if oa is not None and na is not None and oa.ids is not None and na.ids is not None:
            idx = index_map(oa.ids, na.ids)
            keep = np.nonzero(idx >= 0)[0]
            new_sel.append(keep)
            old_sel.append(idx[keep])
        else:
            m = min(old_shape[a], new_shape[a])
            old_sel.append(np.arange(m))
            new_sel.append(np.arange(m))
    return old_sel, new_sel


def _outputs(model: Any, inputs: Any) -> list[np.ndarray]:
    import keras

    return [np.asarray(o) for o in keras.tree.flatten(model(inputs, training=False))]


def check_preservation(
    old_model: Any,
    new_model: Any,
    plan: Any,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    batch: int = 8,
    seed: int = 0,
) -> PreservationCheck:
    """Runs the old and the new model on the same inputs and compares the old outputs.

    The new model gets random inputs; the old model's input columns are taken from the new
    columns that continue them (by the plan's input labels: the same feature, wherever it moved)
    and are 0 where the feature was removed. Each old output is compared with the new output
    that continues it, on the indices they share (by the plan's output labels).

    Args:
        old_model: the old keras.Model (live; a file is never deserialised).
        new_model: the new keras.Model, after the surgery.
        plan: the SurgeryPlan of the surgery (made by ModelMigrator, so it carries its labels).
        atol, rtol: an output passes when max |new - old| <= atol + rtol * max |old|.
        batch: number of random examples.
        seed: seeds the random inputs.

    Returns:
        PreservationCheck with one OutputDiff per compared output.
    """
    labels = getattr(plan, "labels", None)
    if labels is None:
        raise SurgeryError(
            "This plan carries no labels (it was loaded from JSON); make it with ModelMigrator "
            "to check function preservation."
        )
    old_labels, new_labels = labels
    check = PreservationCheck([], atol=atol, rtol=rtol)
    rng = np.random.default_rng(seed)

    def runtime_shape(shape: Sequence[int | None]) -> tuple[int, ...]:
        return (batch,) + tuple(UNKNOWN_DIM if d is None else int(d) for d in shape)

    old_specs = {s.name: s for s in old_labels.graph.inputs}
    old_values = {}
    for spec in old_labels.graph.inputs:
        dtype = spec.dtype if (_is_float(spec.dtype) or "int" in spec.dtype) else None
        if dtype is None:
            check.skipped.append(f"input '{spec.name}' has dtype {spec.dtype}; outputs were not "
                                 "compared")
            return check
        old_values[spec.name] = np.zeros(runtime_shape(spec.shape), dtype=dtype)
    new_values = []
    for spec in new_labels.graph.inputs:
        try:
            value = _random_input(runtime_shape(spec.shape), spec.dtype, rng)
        except TypeError:
            check.skipped.append(f"input '{spec.name}' has dtype {spec.dtype}; outputs were not "
                                 "compared")
            return check
        new_values.append(value)
        identity = new_labels.input_identity.get(spec.name, spec.name)
        old_spec = old_specs.get(identity)
        if old_spec is None:
            continue
        old_value = old_values[identity]
        old_sel, new_sel = _axis_selections(
            old_labels.tensors[(identity, 0, 0)], new_labels.tensors[(spec.name, 0, 0)],
            old_value.shape[1:], value.shape[1:],
        )
        rows = np.arange(batch)
        old_value[np.ix_(rows, *old_sel)] = value[np.ix_(rows, *new_sel)]

    old_names = [s.name for s in old_labels.graph.inputs]
    new_names = [s.name for s in new_labels.graph.inputs]
    old_out = _outputs(old_model, pack_inputs(old_model, old_names,
                                              [old_values[n] for n in old_names]))
    new_out = _outputs(new_model, pack_inputs(new_model, new_names, new_values))

    identity_of = {rec.identity: name for name, rec in new_labels.records.items()}
    identity_of.update({ident: name for name, ident in new_labels.input_identity.items()})
    new_refs = list(new_labels.graph.outputs)
    for p, ref in enumerate(old_labels.graph.outputs):
        new_name = identity_of.get(ref[0])
        new_ref = (new_name, ref[1], ref[2])
        if new_name is None or new_ref not in new_refs or p >= len(old_out):
            check.skipped.append(f"old output '{ref[0]}' is not an output of the new model")
            continue
        q = new_refs.index(new_ref)
        if q >= len(new_out):
            check.skipped.append(f"new output '{new_name}' was not returned by the model")
            continue
        a, b = old_out[p], new_out[q]
        old_sel, new_sel = _axis_selections(
            old_labels.tensors.get(ref, ()), new_labels.tensors.get(new_ref, ()),
            a.shape[1:], b.shape[1:],
        )
        rows = np.arange(a.shape[0])
        a = a[np.ix_(rows, *old_sel)].astype(np.float64)
        b = b[np.ix_(rows, *new_sel)].astype(np.float64)
        max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        check.outputs.append(OutputDiff(
            name=new_name,
            max_abs=max_abs,
            max_rel=max_abs / scale if scale > 0 else max_abs,
            compared=int(a.size),
            ok=bool(max_abs <= atol + rtol * scale) and bool(np.all(np.isfinite(b))),
        ))
    return check


# -- verify=True in migrate_weights ---------------------------------------------------------------


@dataclass
class SurgeryVerification:
    """What `migrate_weights(..., verify=True)` checked.

    Attributes:
        mapping: the gradient verification of the new model's phi table.
        preservation: old vs new outputs (None when the old model is a file).
        failures: why the verification failed (empty when it passed).
    """

    mapping: VerificationResult | None
    preservation: PreservationCheck | None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        parts = []
        if self.mapping is not None:
            parts.append(self.mapping.summary())
        if self.preservation is not None:
            parts.append(self.preservation.summary())
        return "\n".join(parts + [f"failure: {f}" for f in self.failures])

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mapping": None if self.mapping is None else self.mapping.to_dict(),
            "preservation": None if self.preservation is None else self.preservation.to_dict(),
            "failures": list(self.failures),
        }


VERIFY_MODES = ("raise", "warn")


def verify_mode(verify: Any) -> str | None:
    """`verify=` of migrate_weights as a mode: None (off), "raise" (True) or "warn"."""
    if verify is False or verify is None:
        return None
    if verify is True:
        return "raise"
    if verify in VERIFY_MODES:
        return str(verify)
    raise SurgeryError(
        f"verify must be True, False, 'raise' or 'warn'. Received: verify={verify!r}"
    )


def file_warning() -> str:
    return (
        "verify: the old model is a file, and running it would mean deserialising it (which "
        "keras-surgery never does), so old and new outputs were not compared; only the new "
        "model's labels were checked against gradients. Pass the old keras.Model to compare "
        "outputs."
    )


def unprobed_mapping(model: Any, error: Exception) -> VerificationResult:
    """The result of a verification that could not run at all, and why."""
    return VerificationResult(
        f"model '{getattr(model, 'name', model)}'", [], [],
        [Unverified(f"gradient verification could not run: {error}")], 0,
    )


def nothing_checked(result: VerificationResult) -> str:
    reasons = "; ".join(u.reason for u in result.unverified[:3]) or "no feature could be probed"
    return (
        f"verify: nothing could be checked - the old model is a file (never run), and the "
        f"gradients of {result.model} could not be probed ({reasons}). Pass the old keras.Model "
        "to compare outputs, or verify='warn'."
    )


def mapping_failure(result: VerificationResult) -> str:
    missing = result.missing
    shown = "; ".join(m.describe() for m in missing[:3])
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    return (
        f"verify: the gradients of {result.model} depend on features its labels do not list, "
        f"so a rule labels some index wrongly: {shown}{more}."
    )


def preservation_failure(check: PreservationCheck) -> str:
    bad = [o for o in check.outputs if not o.ok]
    shown = ", ".join(f"'{o.name}' max |new - old| = {o.max_abs:.3g} (relative {o.max_rel:.3g})"
                      for o in bad)
    return (
        "verify: the report promised to preserve the old function, but the new model's outputs "
        f"differ: {shown}"
    )


def snapshot(model: Any) -> Callable[[], None]:
    """Saves every variable of `model` (optimizer included); the returned function restores."""
    variables = live_variables(model)
    saved = {p: np.array(v.numpy(), copy=True) for p, v in variables.items()
             if hasattr(v, "assign") and hasattr(v, "numpy")}

    def restore() -> None:
        for p, value in saved.items():
            variables[p].assign(value)
        finalize_layers(model, [variables[p] for p in saved])

    return restore
