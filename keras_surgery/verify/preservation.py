"""Function preservation: the old and the new model run on the same inputs, outputs compared."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.match import index_map
from keras_surgery.verify.inputs import example_shape, is_float, pack_inputs

__all__ = ["OutputDiff", "PreservationCheck", "check_preservation", "pack_inputs"]


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


def _random_input(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    if is_float(dtype):
        return rng.normal(size=shape).astype(dtype)
    if "int" in dtype or dtype == "bool":
        # small ids: valid rows of any table of two or more, and not the mask id 0 only
        return rng.integers(0, 2, size=shape).astype(dtype)
    raise TypeError(dtype)


def _axis_selections(old_axes: Sequence[Any], new_axes: Sequence[Any],
                     old_shape: Sequence[int], new_shape: Sequence[int]):
    """Per non-batch axis, (old indices, new indices) of the entries the two tensors share."""
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

    # convert_to_numpy, not np.asarray: a PyTorch output that requires grad refuses the latter
    return [keras.ops.convert_to_numpy(o) for o in _in_config_order(model(inputs, training=False))]


def _in_config_order(value: Any) -> list[Any]:
    """The leaves of a model's outputs in the order of its graph's outputs: a dict in its own
    key order, as a config's `output_layers` lists them (`keras.tree.flatten` sorts the keys,
    which pairs BertBackbone's `pooled_output` with the graph's `sequence_output`)."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _in_config_order(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _in_config_order(v)]
    return [value]


def _cannot_feed(spec: Any) -> str:
    return f"input '{spec.name}' has dtype {spec.dtype}; outputs were not compared"


def _paired_inputs(
    old_labels: Any, new_labels: Any, batch: int, rng: np.random.Generator, skipped: list[str]
) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Random inputs for the new model, one per input, and the old model's inputs taken from
    the new columns that continue them (0 where the feature was removed).

    None when an input has a dtype no value can be drawn for; `skipped` then says which.
    """
    def runtime_shape(shape: Sequence[int | None]) -> tuple[int, ...]:
        return (batch,) + example_shape(shape)

    old_specs = {s.name: s for s in old_labels.graph.inputs}
    old_values = {}
    for spec in old_labels.graph.inputs:
        dtype = spec.dtype if (is_float(spec.dtype) or "int" in spec.dtype) else None
        if dtype is None:
            skipped.append(_cannot_feed(spec))
            return None
        old_values[spec.name] = np.zeros(runtime_shape(spec.shape), dtype=dtype)
    new_values = []
    for spec in new_labels.graph.inputs:
        try:
            value = _random_input(runtime_shape(spec.shape), spec.dtype, rng)
        except TypeError:
            skipped.append(_cannot_feed(spec))
            return None
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
    return [old_values[s.name] for s in old_labels.graph.inputs], new_values


def _compare_outputs(
    check: PreservationCheck, old_labels: Any, new_labels: Any,
    old_out: list[np.ndarray], new_out: list[np.ndarray],
) -> None:
    """Adds to `check` one OutputDiff per old output that a new output continues."""
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
            ok=bool(max_abs <= check.atol + check.rtol * scale) and bool(np.all(np.isfinite(b))),
        ))


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
    paired = _paired_inputs(old_labels, new_labels, batch, rng, check.skipped)
    if paired is None:
        return check
    old_values, new_values = paired
    old_names = [s.name for s in old_labels.graph.inputs]
    new_names = [s.name for s in new_labels.graph.inputs]
    old_out = _outputs(old_model, pack_inputs(old_model, old_names, old_values))
    new_out = _outputs(new_model, pack_inputs(new_model, new_names, new_values))
    _compare_outputs(check, old_labels, new_labels, old_out, new_out)
    return check
