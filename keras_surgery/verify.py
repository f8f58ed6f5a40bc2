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
CHUNK_BUDGET = 2**25  # floats of per-example gradients held at once by the vectorised probe


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
        else:
            subject = f"'{self.path}'" + (f" axis {self.axis}" if self.axis is not None else "")
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
        """True when gradients and phi agree on every pair that was compared."""
        return not self.mismatches

    def summary(self, limit: int = 20) -> str:
        """A human-readable account: verdict, mismatches, unverified items, notes."""
        verdict = "OK" if self.ok else f"{len(self.mismatches)} MISMATCH(ES)"
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
        name = path.rsplit("/", 1)[-1] if not path.rsplit("/", 1)[-1].isdigit() else var.name
        name = str(getattr(var, "name", name)).rsplit("/", 1)[-1]
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


def _gradient_reads_input(layer: Any, input_shape: Sequence[int | None], variable: Any) -> bool:
    """Whether the gradient of `variable` (a weight of `layer`) changes with the layer's input.

    It does not for a per-channel term that is *added* (beta, moving mean, a bias): such a
    weight's gradient is the cotangent arriving at its channel, whatever the channel reads.
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
    scale = max(float(np.max(np.abs(grads[0]))), float(np.max(np.abs(grads[1]))), 1e-30)
    return float(np.max(np.abs(grads[0] - grads[1]))) > 1e-5 * scale


def _added_weights(
    probe: Any, graph: ModelGraph, targets: list[_Target], variables: dict[str, Any]
) -> set[str]:
    """Store paths of weights with only `diag` input-side axes whose gradient does not read the
    layer's input (checked on the layer alone; layers that cannot be called alone are kept)."""
    kinds_by_path: dict[str, set[str]] = {}
    owner: dict[str, str] = {}
    for t in targets:
        kinds_by_path.setdefault(t.store_path, set()).add(t.kind)
        owner[t.store_path] = t.path.split("/")[0]
    layer_of = {spec.path: name for name, node in graph.layers.items() for spec in node.weights}
    added = set()
    for store_path, kinds in kinds_by_path.items():
        if kinds != {"diag"}:
            continue
        name = layer_of.get(store_path)
        node = graph.layers.get(name) if name else None
        if node is None or not node.calls or len(node.calls[0].inputs) != 1:
            continue
        shape = graph.tensor_shapes.get(node.calls[0].inputs[0])
        if shape is None:
            continue
        try:
            layer = _layer_by_name(probe, name)
            reads = _gradient_reads_input(layer, shape, variables[store_path])
        except Exception:  # a layer that cannot run alone: keep the weight as verified
            logger.debug("cannot call layer %s alone", name, exc_info=True)
            continue
        if not reads:
            added.add(store_path)
    return added


# -- the gradient side --------------------------------------------------------------------------


class _GradientProbe:
    """Per-example gradients of a random projection of every output, reduced onto each target
    axis, vectorised over examples (falls back to a loop where vectorisation fails)."""

    def __init__(self, probe: Any, inputs: list[_ProbeInput], variables: list[Any],
                 reductions: list[tuple[int, tuple[int, ...]]], seed: int):
        import keras
        import tensorflow as tf

        self.tf = tf
        self.probe = probe
        self.inputs = inputs
        self.variables = [v.value for v in variables]
        self.reductions = reductions  # (variable index, axes summed over)
        self.names = [getattr(t, "name", None) for t in keras.tree.flatten(probe.input)]
        zero = self._zero_example()
        outs = keras.tree.flatten(probe(self._pack([z[None] for z in zero]), training=False))
        rng = np.random.default_rng(seed + 1)
        self.cotangents = [
            tf.constant(rng.normal(size=tuple(o.shape)).astype("float32"))
            if _is_float(str(getattr(o.dtype, "name", o.dtype))) else None
            for o in outs
        ]
        self.base = [tf.zeros_like(v) for v in self.variables]
        self.base = self._loop_grads([tf.constant(z) for z in zero])
        size = sum(int(np.prod(v.shape)) for v in self.variables)
        self.chunk = int(max(1, min(64, CHUNK_BUDGET // max(size, 1))))
        self._vectorised = None

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
        import keras

        by_name = dict(zip([i.name for i in self.inputs], tensors))
        if all(n in by_name for n in self.names):
            return keras.tree.pack_sequence_as(self.probe.input, [by_name[n] for n in self.names])
        return tensors if len(tensors) > 1 else tensors[0]

    def _grads(self, example: list[Any]) -> list[Any]:
        tf = self.tf
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.variables)
            outs = self.probe(self._pack([tf.expand_dims(x, 0) for x in example]),
                              training=False)
            import keras

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

    def _loop_grads(self, example: list[Any]) -> list[Any]:
        return self.tf.function(self._grads)(example)

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
        padded = [np.concatenate([p, np.repeat(p[-1:], self.chunk - n, axis=0)]) if
                  n < self.chunk else p for p in part]
        tensors = [tf.constant(p) for p in padded]
        if self._vectorised is not False:
            try:
                if self._vectorised is None:
                    self._vectorised = tf.function(
                        lambda xs: tf.vectorized_map(self._reduce, xs)
                    )
                out = self._vectorised(tensors)
                return [np.asarray(o)[:n] for o in out]
            except Exception:  # an op pfor cannot vectorise: one example at a time
                logger.debug("vectorised gradients failed; looping", exc_info=True)
                self._vectorised = False
        one = getattr(self, "_one", None)
        if one is None:
            one = self._one = tf.function(self._reduce)
        rows = [one([t[i] for t in tensors]) for i in range(n)]
        return [np.stack([np.asarray(r[k]) for r in rows]) for k in range(len(self.reductions))]


def _perturbations(
    inputs: list[_ProbeInput], keys: list[FeatureKey],
    columns: dict[FeatureKey, list[tuple[int, list[int]]]], rng: np.random.Generator,
) -> list[np.ndarray]:
    """One example per feature: zeros, except the feature's columns at every position."""
    batch = []
    for index, spec in enumerate(inputs):
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
    rtol: float = 1e-4,
    strict: bool = False,
) -> VerificationResult:
    """Checks the phi table of `model` against gradients of a probe copy.

    For each feature, the probe copy (same architecture, weights redrawn so that it maps 0 to
    0 and no unit is dead; `model` itself is never touched) is run on an all-zero input with
    only that feature's columns set, and the gradient of a random projection of all outputs is
    taken with respect to every weight. An entry of an input-side weight axis (kind "in" or
    "diag") *reads* the feature when the sum of |gradient| over the weight's other axes exceeds
    `rtol` times the largest such sum of that axis. Those entries must be exactly the ones
    `phi_table(model, features=features)` lists.

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
    added = _added_weights(probe, graph, targets, variables)
    for store_path in sorted(added):
        path = next(t.path for t in targets if t.store_path == store_path)
        unverified.append(Unverified(
            "its gradient does not read the layer's input (a per-channel term that is added), "
            "so gradients cannot tell which features it belongs to", path=path,
        ))
    targets = [t for t in targets if t.store_path not in added]
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
    gradients = _GradientProbe(probe, inputs, [variables[p] for p in store_paths], reductions,
                               seed)
    draws = _perturbations(inputs, keys, columns, rng)
    negated = [-d if spec.float_like else d for d, spec in zip(draws, inputs)]
    both = [np.concatenate([a, b]) for a, b in zip(draws, negated)]
    reduced = gradients.run(both)
    n = len(keys)
    _compare(result, table, targets, keys, reduced, n, rtol)
    result.notes.extend(_base_notes(gradients, targets))
    result.seconds = time.perf_counter() - start
    logger.info("%s", result.summary().splitlines()[0])
    return result


def _compare(
    result: VerificationResult, table: PhiTable, targets: list[_Target], keys: list[FeatureKey],
    reduced: list[np.ndarray], n: int, rtol: float,
) -> None:
    listed: dict[tuple[FeatureKey, str, int], np.ndarray] = {}
    for key in keys:
        for s in table.get(key, []):
            listed[(key, s.path, s.axis)] = np.asarray(s.indices, dtype=np.int64)
    for t, values in zip(targets, reduced):
        strength = np.maximum(values[:n], values[n:])  # the feature's two draws
        threshold = rtol * float(strength.max()) if strength.size else 0.0
        for row, key in enumerate(keys):
            found = np.nonzero(strength[row] > threshold)[0] if threshold > 0 else np.array(
                [], dtype=np.int64)
            phi = listed.get((key, t.path, t.axis), np.array([], dtype=np.int64))
            result.checked += 1
            only_symbolic = np.setdiff1d(phi, found)
            only_gradient = np.setdiff1d(found, phi)
            if len(only_symbolic) or len(only_gradient):
                result.mismatches.append(
                    Mismatch(key, t.path, t.axis, only_symbolic, only_gradient)
                )


def _base_notes(gradients: _GradientProbe, targets: list[_Target]) -> list[str]:
    """Weights that already have a gradient when every feature is 0 read something that does
    not map 0 to 0 (a sigmoid, an offset, an integer input's values): extra dependencies
    reported for them may come from that rather than from a wrong rule."""
    notes = []
    seen = set()
    for t, (v, _) in zip(targets, gradients.reductions):
        if t.path in seen or t.kind != "in":
            continue
        base = np.asarray(gradients.base_raw[v]) if hasattr(gradients, "base_raw") else None
        if base is not None and np.any(base != 0):
            seen.add(t.path)
            notes.append(
                f"'{t.path}' has a non-zero gradient when every input feature is 0: a layer "
                "before it does not map 0 to 0, so the cotangent it sees can depend on other "
                "features; extra dependencies reported for it may come from that."
            )
    return notes


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
