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
from keras_surgery.plan import OUT_KINDS, SurgeryPlan, WeightPlan, init_value

logger = logging.getLogger("keras_surgery")


def _index(selections: list[np.ndarray | slice], shape: tuple[int, ...]) -> tuple:
    """An indexing tuple selecting the outer product of per-axis selections: basic slices
    (views, no copy) when every selection is a contiguous range, else `np.ix_` arrays."""
    slices = []
    for sel in selections:
        if isinstance(sel, slice):
            slices.append(sel)
        elif len(sel) and np.array_equal(sel, np.arange(sel[0], sel[0] + len(sel))):
            slices.append(slice(int(sel[0]), int(sel[0]) + len(sel)))
        else:
            slices.append(None)
    if all(s is not None for s in slices):
        return tuple(slices)
    arrays = [np.arange(n)[sel] if isinstance(sel, slice) else sel
              for sel, n in zip(selections, shape)]
    return np.ix_(*arrays)


def fill(wp: WeightPlan, old: np.ndarray | None, fresh: np.ndarray, policy: str) -> np.ndarray:
    """The new value of one weight: copied where every axis matched, zero where only input-side
    indices are new (policy "preserve"), the fresh initial value elsewhere; a new layer's start
    value when it has one (`old` is then not read and may be None).

    Works on per-axis index selections, never on weight-sized masks, so its extra memory is
    the copied block. Split units (policy "net2net") copy from their source index, times
    their share on input-side axes.
    """
    if wp.init is not None:
        return init_value(wp.init, tuple(fresh.shape), np.asarray(fresh).dtype)
    value = np.array(fresh, copy=True)
    if wp.axes is None:
        return value
    policy = wp.fill_policy(policy)
    if any(len(a.index) == 0 for a in wp.axes):
        return value
    shape = value.shape
    # The zero region is every index whose out/diag axes matched; the copy region (every axis
    # matched) is inside it and is written next.
    out_matched: list[np.ndarray | slice] = [
        np.nonzero(a.matched)[0] if a.kind in OUT_KINDS and not a.zero_new else slice(None)
        for a in wp.axes
    ]
    if policy == "preserve" and all(not isinstance(s, np.ndarray) or len(s) for s in out_matched):
        value[_index(out_matched, shape)] = 0
    new_idx = [np.nonzero(a.matched)[0] for a in wp.axes]
    old_idx = [a.old_index[a.matched] for a in wp.axes]
    if all(len(i) for i in new_idx):
        copied = old[_index(old_idx, old.shape)]
        if wp.scale != 1.0:
            copied = copied * wp.scale
        for a, amap in enumerate(wp.axes):
            if amap.share is not None:
                share = amap.share[new_idx[a]]
                copied = copied * share.reshape([-1 if i == a else 1 for i in range(copied.ndim)])
        value[_index(new_idx, shape)] = copied.astype(value.dtype, copy=False)
        if policy == "preserve":
            _new_lookup_rows_from_mean(wp, value, out_matched)
    return value


def _new_lookup_rows_from_mean(
    wp: WeightPlan, value: np.ndarray, out_matched: list[np.ndarray | slice]
) -> None:
    """New rows of a "lookup" axis (new vocabulary tokens) in the zero region start as the mean
    of the copied rows, as Hugging Face does for new tokens: old inputs never select them, and
    a new token starts as an average one rather than as an all-zero vector."""
    for a, amap in enumerate(wp.axes or []):
        if amap.kind != "lookup" or amap.matched.all() or not amap.matched.any():
            continue
        rows_new = list(out_matched)
        rows_new[a] = np.nonzero(~amap.matched)[0]
        rows_old = list(out_matched)
        rows_old[a] = np.nonzero(amap.matched)[0]
        mean = value[_index(rows_old, value.shape)].mean(axis=a, keepdims=True)
        target = _index(rows_new, value.shape)
        value[target] = np.broadcast_to(mean, value[target].shape).astype(value.dtype)


def nonfinite_warning(wp: WeightPlan, old: np.ndarray) -> str | None:
    """A warning when the old value of a planned weight holds NaN or Inf."""
    # dtype kind "V": bfloat16 (ml_dtypes), which is no np.floating but has NaN and Inf too.
    if old.dtype.kind in "fV" and not np.all(np.isfinite(old)):
        return (f"layer '{wp.old_layer}': old weight '{wp.role}' holds NaN or Inf values; "
                "they were copied as they are.")
    return None


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
            if wp.init is not None:
                fresh = np.asarray(var.numpy())
                staged.append((var, fill(wp, None, fresh, plan.policy), fresh))
                continue
            if wp.axes is None:
                continue
            fresh = np.asarray(var.numpy())
            old = old_weights.read(wp.old_path)
            if tuple(old.shape) != tuple(wp.old_shape):
                raise SurgeryError(
                    f"Old weight '{wp.old_path}' of layer '{wp.old_layer}' has shape "
                    f"{tuple(old.shape)}; expected {wp.old_shape}."
                )
            note = nonfinite_warning(wp, old)
            if note:
                warnings.append(note)
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
