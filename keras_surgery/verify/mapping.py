"""The gradient-mapping verifier: the phi table recomputed from gradients of a probe copy.

Label propagation (phi.py) says which weight entries read each input feature; this module finds
the same thing a second, independent way, from gradients of a *probe copy* of the model (same
architecture, redrawn weights; the user's model is never touched; probe.py says how it is made
and why it is probed at zero), as the paper's "gradient mapping" does.

Per-channel parameters that are *added* (BatchNormalization beta and moving mean, an
EinsumDense bias) have a gradient that does not read the layer's input at all; they are found
by calling the layer alone on two inputs, and listed as unverified rather than guessed at.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.features import FeatureSpec
from keras_surgery.graph import ModelGraph, graph_from_model, live_variables
from keras_surgery.phi import PhiTable
from keras_surgery.propagate import GraphLabels, propagate
from keras_surgery.verify.inputs import FeatureKey
from keras_surgery.verify.probe import (
    FeatureColumns,
    GradientProbe,
    ProbeInput,
    chunk_size,
    perturbations,
    probe_copy,
    probe_for_backend,
    probe_inputs,
)

logger = logging.getLogger("keras_surgery")

VERIFIED_KINDS = ("in", "diag")
UNPROBED_REASONS = {
    "added": "its gradient does not read the layer's input (a per-channel term that is added), "
             "so gradients cannot tell which features it belongs to",
    "none": "no gradient reaches it (the layer computes with values cached from it)",
}


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


def _feature_columns(
    graph: ModelGraph, labels: GraphLabels, inputs: list[ProbeInput],
    unverified: list[Unverified],
) -> FeatureColumns:
    """For each probe-able feature its (input index, columns); the others go to `unverified`."""
    columns: dict[FeatureKey, list[tuple[int, list[int]]]] = {}
    for index, (spec, probe_input) in enumerate(zip(graph.inputs, inputs)):
        cols = labels.columns.get(spec.name, [])
        reason = None
        if not probe_input.float_like:
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
    return merged


def _sampled(keys: list[FeatureKey], sample: int | None,
             rng: np.random.Generator) -> list[FeatureKey]:
    if sample is None or sample >= len(keys):
        return keys
    chosen = set(rng.choice(len(keys), size=max(0, int(sample)), replace=False).tolist())
    return [k for i, k in enumerate(keys) if i in chosen]


def _layer_by_name(model: Any, name: str) -> Any:
    layer = model
    for part in name.split("/"):
        layer = layer.get_layer(part)
    return layer


def _unprobed_weights(
    probe: Any, graph: ModelGraph, targets: list[_Target], variables: dict[str, Any],
    gradients: type[GradientProbe],
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
            kind = gradients.gradient_kind(layer, shape, variables[store_path])
        except Exception:  # a layer that cannot run alone: keep the weight as verified
            logger.debug("cannot call layer %s alone", name, exc_info=True)
            continue
        if kind != "reads":
            found[store_path] = kind
    return found


def _probed_targets(
    model: Any, probe: Any, graph: ModelGraph, targets: list[_Target],
    variables: dict[str, Any], unverified: list[Unverified], gradients: type[GradientProbe],
) -> list[_Target]:
    """The targets whose gradient reads the layer's input; the others go to `unverified`."""
    missing = sorted({t.store_path for t in targets} - set(variables))
    if missing:
        raise SurgeryError(
            f"The probe copy of model '{model.name}' lacks variables {missing[:3]}; "
            "clone_model did not reproduce the architecture."
        )
    unprobed = _unprobed_weights(probe, graph, targets, variables, gradients)
    for store_path, kind in unprobed.items():
        path = next(t.path for t in targets if t.store_path == store_path)
        unverified.append(Unverified(UNPROBED_REASONS[kind], path=path))
    return [t for t in targets if t.store_path not in unprobed]


def _reduced_gradients(
    gradients: type[GradientProbe], probe: Any, inputs: list[ProbeInput],
    variables: dict[str, Any], targets: list[_Target], keys: list[FeatureKey],
    columns: FeatureColumns, seed: int, rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per target, the gradient differences of every feature's two draws reduced onto its
    axis, and the gradients at the all-zero input reduced the same way."""
    store_paths = list(dict.fromkeys(t.store_path for t in targets))
    var_index = {p: i for i, p in enumerate(store_paths)}
    reductions = []
    for t in targets:
        ndim = len(variables[t.store_path].shape)
        reductions.append((var_index[t.store_path], tuple(a for a in range(ndim) if a != t.axis)))
    size = sum(int(np.prod(variables[p].shape)) for p in store_paths)
    runner = gradients(probe, inputs, [variables[p] for p in store_paths], reductions, seed,
                       chunk_size(2 * len(keys), size))
    reduced = runner.run(perturbations(inputs, keys, columns, rng))
    return reduced, runner.base_reduced


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
        SurgeryError: the model cannot be copied for probing (clone_model fails), Keras
            runs on a backend that has no gradient probe (TensorFlow, JAX and PyTorch have
            one), or a string input cannot be fed on JAX or PyTorch.

    Example:
        >>> result = ks.verify_mapping(model, features={"obs": ["hp", ("pos", 2)]})
        >>> result.ok                                                     # doctest: +SKIP
        True
    """
    start = time.perf_counter()
    gradients = probe_for_backend()
    graph = graph_from_model(model)
    labels = propagate(graph, features=features, strict=strict)
    table = PhiTable.from_labels(labels)
    targets, unverified, kinds = _targets(labels)
    inputs = probe_inputs(graph)
    columns = _feature_columns(graph, labels, inputs, unverified)
    rng = np.random.default_rng(seed)
    keys = _sampled(list(columns), sample, rng)

    probe = probe_copy(model, kinds, seed)
    variables = live_variables(probe)
    targets = _probed_targets(model, probe, graph, targets, variables, unverified, gradients)
    result = VerificationResult(graph.description, keys, [], unverified, 0)
    if not targets or not keys:
        result.seconds = time.perf_counter() - start
        return result

    reduced, base = _reduced_gradients(gradients, probe, inputs, variables, targets, keys,
                                       columns, seed, rng)
    _compare(result, table, targets, keys, reduced, base, rtol)
    result.seconds = time.perf_counter() - start
    logger.info("%s", result.summary().splitlines()[0])
    return result


def _compare(
    result: VerificationResult, table: PhiTable, targets: list[_Target], keys: list[FeatureKey],
    reduced: list[np.ndarray], base: list[np.ndarray], rtol: float,
) -> None:
    """Adds to `result` every (feature, target) where gradients and phi disagree."""
    n = len(keys)
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
