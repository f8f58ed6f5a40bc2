"""Applying a SurgeryPlan to a live model, one weight at a time, all or nothing.

Every shape and path is checked before the first variable is written. Values are then streamed:
computed, assigned and dropped one weight at a time, with each variable's previous value in a
rollback journal (spilled to an anonymous temporary file past a few tens of MB), so a failed
migration leaves the model exactly as it was and the extra memory stays near twice the largest
weight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def fill(
    wp: WeightPlan,
    old: np.ndarray | None,
    fresh: np.ndarray,
    policy: str,
    *,
    in_place: bool = False,
    new_rows_mean: bool = True,
    release: Callable[[], None] | None = None,
) -> np.ndarray:
    """The new value of one weight: copied where every axis matched, zero where only input-side
    indices are new (policy "preserve"), the fresh initial value elsewhere; a new layer's start
    value when it has one (`old` is then not read and may be None).

    Works on per-axis index selections, never on weight-sized masks, so its extra memory is
    the copied block. Split units (policy "net2net") copy from their source index, times
    their share on input-side axes.

    Args:
        in_place: write into `fresh` (which must be a writable array the caller owns) instead
            of a copy of it.
        new_rows_mean: new rows of a vocabulary ("lookup") axis start as the mean of the
            copied rows (False: they keep what the fill rule gives them, as optimizer slots do).
        release: called after each block of at most `COPY_BLOCK_BYTES` copied from `old`
            (a memory-mapped file drops the block's pages), so a large weight is never
            resident twice over.

    Returns:
        An array this call allocated (or `fresh` itself, with `in_place`), never a view of
        `old`: the caller may hand it to the backend to keep.
    """
    if wp.init is not None:
        return init_value(wp.init, tuple(fresh.shape), np.asarray(fresh).dtype)
    writable = in_place and isinstance(fresh, np.ndarray) and fresh.flags.writeable
    if writable:
        value = fresh
    elif needs_fresh(wp, policy):
        value = np.array(fresh, copy=True)
    else:  # every index is copied or zeroed below
        value = np.empty(fresh.shape, np.asarray(fresh).dtype)
    if wp.axes is None:
        return value
    if not wp.axes:  # a weight without axes (a scalar such as a count): one value to copy
        value[...] = old if wp.scale == 1.0 else old * wp.scale
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
    everything = _copies_everything(wp)  # nothing is left to zero
    if policy == "preserve" and not everything and all(
        not isinstance(s, np.ndarray) or len(s) for s in out_matched
    ):
        value[_index(out_matched, shape)] = 0
    new_idx = [np.nonzero(a.matched)[0] for a in wp.axes]
    old_idx = [a.old_index[a.matched] for a in wp.axes]
    if all(len(i) for i in new_idx):
        rows = len(new_idx[0])
        step = rows
        if release is not None and old.nbytes > COPY_BLOCK_BYTES:
            step = max(1, rows * COPY_BLOCK_BYTES // old.nbytes)
        for start in range(0, rows, step):
            block = slice(start, start + step)
            _copy_block(wp, value, old, [new_idx[0][block]] + new_idx[1:],
                        [old_idx[0][block]] + old_idx[1:])
            if release is not None:
                release()
        if policy == "preserve" and new_rows_mean and not everything:
            _new_lookup_rows_from_mean(wp, value, out_matched)
    return value


COPY_BLOCK_BYTES = 32 << 20


def needs_fresh(wp: WeightPlan, policy: str) -> bool:
    """Whether some index of the weight keeps its fresh value under `policy`: False when every
    index is copied or (policy "preserve") zeroed, or the weight is a new layer's start."""
    if wp.init is not None or (wp.axes is not None and _copies_everything(wp)):
        return False
    if wp.axes is None or wp.fill_policy(policy) != "preserve":
        return True
    if any(len(a.index) == 0 for a in wp.axes):
        return True
    return not all(bool(a.matched.all()) for a in wp.axes
                   if a.kind in OUT_KINDS and not a.zero_new)


def _copy_block(
    wp: WeightPlan, value: np.ndarray, old: np.ndarray, new_idx: list, old_idx: list
) -> None:
    """value[new_idx] = old[old_idx] (outer products of per-axis indices), scaled and shared."""
    copied = old[_index(old_idx, old.shape)]
    if wp.scale != 1.0:
        copied = copied * wp.scale
    for a, amap in enumerate(wp.axes or []):
        if amap.share is not None:
            share = amap.share[new_idx[a]]
            copied = copied * share.reshape([-1 if i == a else 1 for i in range(copied.ndim)])
    value[_index(new_idx, value.shape)] = copied.astype(value.dtype, copy=False)


def _copies_everything(wp: WeightPlan) -> bool:
    """Whether every index of the weight is copied unscaled from one old index (nothing new,
    no split shares): then the value is the old weight, gathered, and needs no fresh value."""
    return wp.scale == 1.0 and all(
        a.share is None and len(a.index) and bool(a.matched.all()) for a in wp.axes or []
    )


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
    # min and max propagate NaN and show an Inf, without a weight-sized temporary.
    if old.dtype.kind in "fV" and old.size and not (
        np.isfinite(old.min()) and np.isfinite(old.max())
    ):
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


SPILL_BYTES = 64 << 20
"""Rollback values are kept in memory up to this many bytes in all; the rest go to a file."""


class Journal:
    """The values variables held before a migration wrote them, to undo a failed migration.

    The first `spill_bytes` are kept in memory; past that, values are written to an anonymous
    temporary file (gone when closed, even after a crash), so that a migration's extra memory
    stays near the size of its largest weight however large the model is.
    """

    def __init__(self, spill_bytes: int = SPILL_BYTES, directory: str | None = None) -> None:
        self.spill_bytes = spill_bytes
        self.directory = directory
        self.kept = 0
        self.entries: list[tuple[Any, Any]] = []
        self._file: Any = None

    def save(self, var: Any, current: np.ndarray) -> bool:
        """Records `current` as `var`'s value to restore. Returns True when the journal keeps
        no reference to `current` (it was written out), so the caller may overwrite it."""
        current = np.ascontiguousarray(current)
        if self.kept + current.nbytes <= self.spill_bytes:
            self.entries.append((var, current))
            self.kept += current.nbytes
            return False
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="keras-surgery-undo-", dir=self.directory)
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(current.reshape(-1).view(np.uint8).data)
        self.entries.append((var, (offset, current.shape, current.dtype)))
        return True

    def forget_last(self) -> None:
        """Drops the last record (its variable was never written)."""
        var, entry = self.entries.pop()
        if not isinstance(entry, tuple):
            self.kept -= entry.nbytes

    def restore(self, *, unsure: Any = None) -> tuple[list[Any], list[tuple[Any, Exception]]]:
        """Assigns every recorded value back, last first.

        Args:
            unsure: a variable whose own write failed: restored too, but a failure to restore
                it is not reported (the failed write most likely left it as it was).

        Returns:
            (restored, failed): the variables restored, and (variable, error) pairs for those
            that could not be; every other variable is still restored after a failure.
        """
        restored, failed = [], []
        for var, entry in reversed(self.entries):
            try:
                if isinstance(entry, tuple):
                    offset, shape, dtype = entry
                    value = np.empty(shape, dtype)
                    self._file.seek(offset)
                    self._file.readinto(value.reshape(-1).view(np.uint8).data)
                else:
                    value = entry
                var.assign(value)
                restored.append(var)
            except Exception as exc:
                if var is not unsure:
                    failed.append((var, exc))
        return restored, failed

    def close(self) -> None:
        self.entries.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Write:
    """One variable to write: `compute(current, owned)` gives its new value from its current
    one, which it may overwrite when `owned` is True. The value must be an array nothing else
    refers to (or `current` itself when owned): it is given to the backend to keep.
    `reads_current=False` says the new value does not depend on the current values (only on
    their shape and dtype): then the current value is taken without a copy where the backend
    allows, for the rollback journal only."""

    var: Any
    what: str
    compute: Callable[[np.ndarray, bool], np.ndarray]
    reads_current: bool = True


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
    plan: SurgeryPlan, variables: dict, old_weights: Any, notes: dict[int, str]
) -> list[Write]:
    """The writes of the plan's weights; warnings about old values go to `notes`, by the
    weight's position in the plan (writes run in another order)."""
    release = getattr(old_weights, "release", None)
    writes = []
    for i, wp in enumerate(plan.weights):
        if wp.init is None and wp.axes is None:
            continue

        def compute(current: np.ndarray, owned: bool, wp: WeightPlan = wp, i: int = i):
            if wp.init is not None:
                return fill(wp, None, current, plan.policy)
            old = old_weights.read(wp.old_path)
            if tuple(old.shape) != tuple(wp.old_shape):
                raise SurgeryError(
                    f"Old weight '{wp.old_path}' of layer '{wp.old_layer}' has shape "
                    f"{tuple(old.shape)}; expected {wp.old_shape}."
                )
            note = nonfinite_warning(wp, old)
            if note:
                notes[i] = note
            if release is not None:
                release()
            return fill(wp, old, current, plan.policy, in_place=owned, release=release)

        writes.append(Write(
            variables[wp.path], f"weight '{wp.path}' of layer '{wp.layer}'", compute,
            reads_current=needs_fresh(wp, plan.policy),
        ))
    return writes


def apply_plan(
    plan: SurgeryPlan,
    model: Any,
    source: Any,
    *,
    optimizer: bool = True,
    verbose: bool = False,
    spill_bytes: int = SPILL_BYTES,
) -> Any:
    """Writes the plan into `model`; returns a SurgeryReport. All or nothing.

    Weights are streamed: each new value is computed, the variable's current value is put in
    a rollback journal (in memory up to `spill_bytes`, then in an anonymous temporary file),
    the value is assigned, and the old file's pages are released before the next weight. So
    the extra memory is about twice the largest weight, not the model. Every shape and path
    is checked before the first write; if anything fails after that (a damaged dataset, an
    interrupt), every variable written so far is restored from the journal.
    """
    from keras_surgery.files import progress_bar
    from keras_surgery.optimizer import optimizer_writes
    from keras_surgery.report import SurgeryReport

    variables = live_variables(model)
    warnings = list(plan.warnings)
    with _opened(source) as old_weights:
        _check_targets(plan, model, variables, old_weights)
        notes: dict[int, str] = {}
        writes = _weight_writes(plan, variables, old_weights, notes)
        if optimizer:
            slots, slot_notes = optimizer_writes(plan, model, old_weights, variables)
            writes.extend(slots)
            warnings.extend(slot_notes)
        elif plan.old_optimizer is not None:
            warnings.append("optimizer state was not migrated (optimizer=False).")
        _stream(writes, model, old_weights, progress_bar(len(writes), verbose), spill_bytes)
    warnings[len(plan.warnings):len(plan.warnings)] = [notes[i] for i in sorted(notes)]
    report = SurgeryReport(plan, warnings=warnings)
    logger.info("%s", report.one_line())
    return report


def current_value(var: Any, *, copy: bool) -> tuple[np.ndarray, bool]:
    """The current value of `var` as a numpy array, and whether the caller owns it (may write
    into it).

    With `copy=False`, on TensorFlow and JAX, a read-only view of the variable's own buffer,
    taken without copying: assigning the variable afterwards leaves the view holding the
    values it had (TensorFlow copies a shared buffer on write; JAX arrays never change).
    Elsewhere, and with `copy=True`, a copy.
    """
    import keras

    if not copy and keras.backend.backend() in ("tensorflow", "jax"):
        return np.asarray(keras.ops.reshape(var, tuple(var.shape))), False
    value = np.asarray(var.numpy())
    return value, value.flags.writeable


class _HandedOver:
    """A new value the migration allocated and never touches again, given to TensorFlow
    through the array protocol.

    TensorFlow's Python layer copies every `np.ndarray` it converts, into memory newly taken
    from the system (slow to touch the first time: about 0.6 s per 256 MB measured on the
    project's machine), and then keeps that copy as the variable's buffer. An array-like goes
    to its C++ conversion instead, which either shares the array's buffer or copies it into
    memory TensorFlow's allocator already holds (such as the buffer the variable had): the
    same values, without a second weight-sized copy.
    """

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if dtype is not None and np.dtype(dtype) != self.array.dtype:
            return self.array.astype(dtype)
        return self.array.copy() if copy else self.array


def _owns(array: np.ndarray) -> bool:
    """Whether `array`'s memory belongs to numpy (not a memory map, a bytes object or another
    library's buffer) and may be written."""
    if not array.flags.writeable:
        return False
    while isinstance(array, np.ndarray):
        if array.flags.owndata:
            return True
        array = array.base
    return False


def handed_over(value: Any) -> Any:
    """What to pass to `assign` for a new value nothing else refers to (see `_HandedOver`):
    on TensorFlow, an array numpy owns goes through the array protocol; anything else, and
    every other backend, is passed as it is."""
    import keras

    if (isinstance(value, np.ndarray) and keras.backend.backend() == "tensorflow"
            and _owns(value)):
        return _HandedOver(value)
    return value


def _stream(
    writes: list[Write], model: Any, old_weights: Any, progress: Callable, spill_bytes: int
) -> None:
    release = getattr(old_weights, "release", None) or (lambda: None)
    journal = Journal(spill_bytes)
    written: list[Any] = []
    what, stage, var, journaled = "finishing", "finish", None, False
    # Smallest first: the in-memory part of the journal holds many small values, and the
    # largest weight comes last, when nothing after it can fail, so it needs no journal entry.
    writes = sorted(writes, key=lambda w: int(np.prod(w.var.shape)))
    try:
        for count, write in enumerate(writes, start=1):
            what, var = write.what, write.var
            stage, journaled = "read", False
            current, owned = current_value(var, copy=write.reads_current)
            if count < len(writes):
                owned = journal.save(var, current) and owned
                journaled = True
            stage = "compute"
            value = write.compute(current, owned)
            del current
            if isinstance(value, np.ndarray) and value.flags.writeable:
                release()  # the old values are copied out: drop their pages before assigning
            stage = "assign"
            var.assign(handed_over(value))
            del value
            written.append(var)
            release()
            progress(count)
        what, stage = "finishing", "finish"
        finalize_layers(model, written)
    except BaseException as exc:
        try:
            if stage == "compute" and journaled:
                journal.forget_last()  # never written: nothing to undo
            restored, failed = journal.restore(unsure=var if stage == "assign" else None)
            finalize_layers(model, restored)
            if stage == "finish" and written and not journaled:
                # Only finishing can fail after the last (unjournaled) write: say so.
                failed.append((written[-1], SurgeryError("the last write keeps no undo entry")))
        finally:
            journal.close()
        if failed:
            names = ", ".join(getattr(v, "path", None) or getattr(v, "name", "?")
                              for v, _ in failed)
            raise SurgeryError(
                f"Writing the new weights failed at {what} ({exc}), and restoring the previous "
                f"values failed for {names} ({failed[0][1]}); the model is inconsistent."
            ) from exc
        if isinstance(exc, SurgeryError) or not isinstance(exc, Exception):
            raise  # a precise error (or an interrupt), now with the model restored
        raise SurgeryError(
            f"Writing the new weights failed at {what} and was undone: {exc}"
        ) from exc
    journal.close()
