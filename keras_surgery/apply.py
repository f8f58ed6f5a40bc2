"""Applying a SurgeryPlan to a live model, one weight at a time, all or nothing.

Every shape and path is checked before the first variable is written. Values are then streamed
(`keras_surgery.stream`): computed by the fill kernel (`keras_surgery.fill`), assigned and
dropped one weight at a time, with each variable's previous value in a rollback journal, so a
failed migration leaves the model exactly as it was and the extra memory stays near twice the
largest weight.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.fill import (
    COPY_BLOCK_BYTES,
    cast_warning,
    copies_everything,
    fill,
    needs_fresh,
    nonfinite_warning,
    watching_casts,
)
from keras_surgery.graph import WeightSource, live_variables
from keras_surgery.optimizer import optimizer_writes
from keras_surgery.report import SurgeryReport
from keras_surgery.stream import SPILL_BYTES, Write, progress_bar, stream

if TYPE_CHECKING:
    from keras_surgery.plan import SurgeryPlan, WeightPlan

logger = logging.getLogger("keras_surgery")


def _check_targets(plan: SurgeryPlan, model: Any, variables: dict, old_weights: Any) -> None:
    """Everything about shapes and paths, checked before the first variable is written."""
    old_paths = old_weights.paths()
    for wp in plan.weights:
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
        if wp.init is None and wp.axes is not None:
            stored = old_paths.get(wp.old_path)
            if stored is None:
                raise SurgeryError(
                    f"Old weight '{wp.old_path}' of layer '{wp.old_layer}' is missing from the "
                    "old model."
                )
            if tuple(stored[0]) != tuple(wp.old_shape):
                raise SurgeryError(
                    f"Old weight '{wp.old_path}' of layer '{wp.old_layer}' has shape "
                    f"{tuple(stored[0])}; expected {wp.old_shape}."
                )


def _weight_writes(
    plan: SurgeryPlan, variables: dict, old_weights: Any, notes: dict[tuple[int, int], str]
) -> list[Write]:
    """The writes of the plan's weights; warnings about old values go to `notes`, by the
    write's position in the list (writes run in another order)."""
    release = getattr(old_weights, "release", None)
    writes = []
    for wp in plan.weights:
        if wp.init is None and wp.axes is None:
            continue

        def compute(current: np.ndarray, owned: bool, out: np.ndarray | None = None,
                    wp: WeightPlan = wp, i: int = len(writes)):
            if wp.init is not None:
                return fill(wp, None, current, plan.policy, out=out)
            old = old_weights.read(wp.old_path)
            if tuple(old.shape) != tuple(wp.old_shape):
                raise SurgeryError(
                    f"Old weight '{wp.old_path}' of layer '{wp.old_layer}' has shape "
                    f"{tuple(old.shape)}; expected {wp.old_shape}."
                )
            whole = _copies_whole(wp, old, current)
            note = None if whole else _nonfinite_in_blocks(wp, old, release)
            value = fill(wp, old, current, plan.policy, in_place=owned, release=release,
                         out=out)
            if whole:  # the value holds every old value: checked there, in memory
                note = nonfinite_warning(wp, value)
            if note:
                notes[(i, 0)] = note
            return value

        writes.append(Write(
            variables[wp.path], f"weight '{wp.path}' of layer '{wp.layer}'", compute,
            reads_current=needs_fresh(wp, plan.policy), fills_into=True,
        ))
    return writes


def _copies_whole(wp: WeightPlan, old: np.ndarray, current: np.ndarray) -> bool:
    """Whether the new value is every old value, rearranged at most (same shape and dtype,
    every index copied unscaled from one old index): then the NaN/Inf check reads the new
    value, in memory, instead of the old file's pages a second time. (A cast value could
    overflow to Inf, or lose a NaN to an integer dtype.)"""
    return (tuple(old.shape) == tuple(np.shape(current))
            and np.dtype(old.dtype) == np.asarray(current).dtype and copies_everything(wp))


def _nonfinite_in_blocks(
    wp: WeightPlan, old: np.ndarray, release: Callable[[], None] | None
) -> str | None:
    """`nonfinite_warning` of `old`, read in row blocks of about `COPY_BLOCK_BYTES` with the
    old file's pages released after each (when `release` is given): the check reads every
    value, and a memory-mapped weight must not become resident all at once for it."""
    if release is None or old.ndim == 0 or old.nbytes <= COPY_BLOCK_BYTES:
        note = nonfinite_warning(wp, old)
    else:
        step = max(1, len(old) * COPY_BLOCK_BYTES // old.nbytes)
        note = None
        for start in range(0, len(old), step):
            note = note or nonfinite_warning(wp, old[start:start + step])
            release()
    if release is not None:
        release()
    return note


def _cast_checked(
    write: Write, position: int, notes: dict[tuple[int, int], str], *, slot: bool
) -> Write:
    """`write` with its values watched for casts that lose them (`watching_casts`): a loss
    becomes a warning in `notes` at `(position, 1)`, which also marks the report as not
    preserving the function. A slot's warning names the slot as well as its variable."""
    compute = write.compute

    def watched(current: np.ndarray, owned: bool, *out: np.ndarray | None) -> np.ndarray:
        with watching_casts() as losses:
            value = compute(current, owned, *out)
        note = cast_warning(losses, write.what if slot else None)
        if note:
            notes[(position, 1)] = note
        return value

    return dataclasses.replace(write, compute=watched)


def apply_plan(
    plan: SurgeryPlan,
    model: Any,
    old_weights: WeightSource,
    *,
    optimizer: bool = True,
    verbose: bool = False,
    spill_bytes: int = SPILL_BYTES,
    undo: bool = True,
) -> SurgeryReport:
    """Writes the plan into `model`, reading old values from `old_weights`; all or nothing.

    Weights are streamed: each new value is computed, the variable's current value is put in
    a rollback journal (in memory up to `spill_bytes`, then in an anonymous temporary file),
    the value is assigned, and the old file's pages are released before the next weight. So
    the extra memory is about twice the largest weight, not the model. Every shape and path
    is checked before the first write; if anything fails after that (a damaged dataset, an
    interrupt), every variable written so far is restored from the journal.

    Args:
        undo: keep the rollback journal (see `migrate_weights`); False skips it.

    Returns:
        The SurgeryReport.

    Raises:
        SurgeryError: the plan does not fit `model` or the old weights, or writing failed;
            the model is then as it was (with `undo=False`: partly written, and the error
            says so).
    """
    variables = live_variables(model)
    warnings = list(plan.warnings)
    _check_targets(plan, model, variables, old_weights)
    notes: dict[tuple[int, int], str] = {}
    writes = _weight_writes(plan, variables, old_weights, notes)
    slot_count = 0
    if optimizer:
        slots, slot_notes = optimizer_writes(plan, model, old_weights, variables)
        writes.extend(slots)
        slot_count = len(slots)
        warnings.extend(slot_notes)
    elif plan.old_optimizer is not None:
        warnings.append("optimizer state was not migrated (optimizer=False).")
    first_slot = len(writes) - slot_count
    writes = [_cast_checked(w, i, notes, slot=i >= first_slot) for i, w in enumerate(writes)]
    # The old file's bytes are checked against their CRC-32 while the weights stream in, and
    # before the last write (the one without an undo entry): damage undoes the migration.
    check = old_weights.integrity_check() if hasattr(old_weights, "integrity_check") else None
    try:
        stream(writes, model, release=getattr(old_weights, "release", None),
               progress=progress_bar(len(writes), verbose), spill_bytes=spill_bytes,
               undo=undo,
               before_last=None if check is None else check.wait)
        if check is not None:
            check.wait()  # also when there was nothing to write
    finally:
        if check is not None:
            check.cancel()
    warnings[len(plan.warnings):len(plan.warnings)] = [notes[i] for i in sorted(notes)]
    report = SurgeryReport(plan, warnings=warnings)
    if any(kind == 1 for _, kind in notes):
        report.preserves_function = False  # values were lost in a cast (the plan is reused)
    logger.info("%s", report.one_line())
    return report
