"""Applying a SurgeryPlan to a live model: compute every new value first, then assign.

All reading and checking happens before the first variable is written, and the assignments are
undone if one of them fails, so a failed migration leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.graph import WeightSource, finalize_layers, live_variables
from keras_surgery.plan import SurgeryPlan, WeightPlan

logger = logging.getLogger("keras_surgery")


def fill(wp: WeightPlan, old: np.ndarray, fresh: np.ndarray, policy: str) -> np.ndarray:
    """The new value of one weight: copied where every axis matched, zero where only input-side
    indices are new (policy "preserve"), the fresh initial value elsewhere."""
    value = np.array(fresh, copy=True)
    if wp.axes is None:
        return value
    copy_mask, zero_mask = wp.regions(policy)
    value[zero_mask] = 0
    new_idx = [np.nonzero(a.matched)[0] for a in wp.axes]
    old_idx = [a.index[a.matched] for a in wp.axes]
    if all(len(i) for i in new_idx) or not wp.axes:
        copied = old[np.ix_(*old_idx)]
        if wp.scale != 1.0:
            copied = copied * wp.scale
        value[np.ix_(*new_idx)] = copied.astype(value.dtype, copy=False)
        value = _new_lookup_rows_from_mean(wp, value, zero_mask)
    return value


def _new_lookup_rows_from_mean(wp: WeightPlan, value: np.ndarray, zero_mask: np.ndarray):
    """New rows of a "lookup" axis (new vocabulary tokens) in the zero region start as the mean
    of the copied rows, as Hugging Face does for new tokens: old inputs never select them, and
    a new token starts as an average one rather than as an all-zero vector."""
    for a, amap in enumerate(wp.axes or []):
        if amap.kind != "lookup" or amap.matched.all() or not amap.matched.any():
            continue
        new_rows = zero_mask & ~amap.matched.reshape([-1 if i == a else 1
                                                      for i in range(value.ndim)])
        mean = value.take(np.nonzero(amap.matched)[0], axis=a).mean(axis=a, keepdims=True)
        value = np.where(new_rows, mean.astype(value.dtype), value)
    return value


@contextlib.contextmanager
def _opened(source: Any) -> Iterator[WeightSource]:
    from keras_surgery.keras_file import KerasFile
    from keras_surgery.sources import is_path

    if is_path(source):
        with KerasFile(source) as f:
            yield f
    else:
        yield source


def apply_plan(
    plan: SurgeryPlan, model: Any, source: Any, *, optimizer: bool = True, verbose: bool = False
) -> Any:
    """Writes the plan into `model`; returns a SurgeryReport. All or nothing."""
    from keras_surgery.files import progress_bar
    from keras_surgery.optimizer import stage_optimizer
    from keras_surgery.report import SurgeryReport

    progress = progress_bar(len(plan.weights), verbose)

    variables = live_variables(model)
    staged: list[tuple[Any, np.ndarray, np.ndarray]] = []
    warnings = list(plan.warnings)
    with _opened(source) as old_weights:
        for done_count, wp in enumerate(plan.weights, start=1):
            progress(done_count)
            var = variables.get(wp.path)
            if var is None or not hasattr(var, "assign"):
                raise SurgeryError(
                    f"The plan was made for another model: '{wp.path}' (layer '{wp.layer}') is not "
                    f"a variable of model '{model.name}'."
                )
            if tuple(var.shape) != tuple(wp.shape):
                raise SurgeryError(
                    f"The plan was made for another model: '{wp.path}' has shape "
                    f"{tuple(var.shape)}, the plan expects {wp.shape}."
                )
            if wp.axes is None:
                continue
            fresh = np.asarray(var.numpy())
            old = old_weights.read(wp.old_path)
            if tuple(old.shape) != tuple(wp.old_shape):
                raise SurgeryError(
                    f"Old weight '{wp.old_path}' of layer '{wp.old_layer}' has shape "
                    f"{tuple(old.shape)}; expected {wp.old_shape}."
                )
            if np.issubdtype(old.dtype, np.floating) and not np.all(np.isfinite(old)):
                warnings.append(
                    f"layer '{wp.old_layer}': old weight '{wp.role}' holds NaN or Inf values; "
                    "they were copied as they are."
                )
            staged.append((var, fill(wp, old, fresh, plan.policy), fresh))
        if optimizer:
            slots, notes = stage_optimizer(plan, model, old_weights, variables)
            staged.extend(slots)
            warnings.extend(notes)
        elif plan.old_optimizer is not None:
            warnings.append("optimizer state was not migrated (optimizer=False).")
    done: list[tuple[Any, np.ndarray]] = []
    try:
        for var, value, fresh in staged:
            var.assign(value)
            done.append((var, fresh))
        finalize_layers(model, [var for var, _ in done])
    except Exception as exc:
        for var, fresh in reversed(done):
            var.assign(fresh)
        finalize_layers(model, [var for var, _ in done])
        raise SurgeryError(f"Assigning the new weights failed and was undone: {exc}") from exc
    report = SurgeryReport(plan, warnings=warnings)
    logger.info("%s", report.one_line())
    return report
