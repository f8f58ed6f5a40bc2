"""Streaming values into live variables, one at a time, all or nothing.

A migration is a list of `Write`s (one variable each, its new value computed from its current
one when its turn comes). `stream` runs them smallest first, keeping each variable's previous
value in a `Journal` (in memory up to `SPILL_BYTES`, then in an anonymous temporary file,
written past the page cache where the filesystem allows it: `SpillFile`), so a failure at any
point restores every variable written, and the extra memory stays near twice the largest
weight.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.filemap import read_fully
from keras_surgery.fill import BUFFER_ALIGNMENT, COPIED_OFFSET, SHARED_MIN_BYTES, aligned_bytes
from keras_surgery.graph import finalize_layers, variable_view

logger = logging.getLogger("keras_surgery")

SPILL_BYTES = 64 << 20
"""Rollback values are kept in memory up to this many bytes in all; the rest go to a file."""

DIRECT_BLOCK = 4096
"""Alignment of the undo file's direct writes: their buffer, offsets and lengths (a multiple of
the logical block size of every common disk)."""
DIRECT_BUFFER_BYTES = 8 << 20
"""The reused buffer values are copied through on their way to the undo file."""


class SpillFile:
    """The journal's anonymous temporary file, written with `O_DIRECT` where the filesystem
    allows it, through one reused aligned buffer, and read back only to undo.

    A buffered write puts every byte in a new page of the page cache, which costs what touching
    fresh memory does and counts against a container's memory limit: on the project's machine
    writing a 2.8 GB journal took 7.4 s buffered, 0.54 s per GiB direct. Where direct writes
    are refused (tmpfs, some network filesystems, Windows, or alignment the device does not
    take), the file is written buffered, as before.

    Args:
        directory: where the file is made (`tempfile`'s default when None).
    """

    def __init__(self, directory: str | None = None) -> None:
        self.file = tempfile.TemporaryFile(prefix="keras-surgery-undo-", dir=directory,
                                           buffering=0)
        self.end = 0  # where the next value goes (a multiple of DIRECT_BLOCK when direct)
        self._buffer: np.ndarray | None = None
        self.direct = _set_direct(self.file.fileno(), True)

    def write(self, value: np.ndarray) -> int:
        """Appends C-contiguous `value`'s bytes; returns the offset they start at."""
        data = memoryview(value.reshape(-1).view(np.uint8))
        offset = self.end
        if self.direct:
            try:
                self.end = offset + self._write_direct(data, offset)
                return offset
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Refused after all (alignment stricter than DIRECT_BLOCK): buffered from here.
                self.direct = _set_direct(self.file.fileno(), False)
                if self.direct:
                    raise
        _write_all(self.file, data, offset)
        self.end = offset + len(data)
        return offset

    def _write_direct(self, data: memoryview, offset: int) -> int:
        if self._buffer is None:
            # A numpy array, not a memory map: a view of it kept alive by a traceback (a
            # failed write) cannot make closing the journal fail.
            self._buffer = aligned_bytes(DIRECT_BUFFER_BYTES, DIRECT_BLOCK)
        buffer = self._buffer
        source = np.frombuffer(data, np.uint8)
        done = 0
        while done < len(data):
            size = min(len(buffer), len(data) - done)
            buffer[:size] = source[done:done + size]
            padded = -(-size // DIRECT_BLOCK) * DIRECT_BLOCK
            buffer[size:padded] = 0
            _write_all(self.file, memoryview(buffer[:padded]), offset + done)
            done += size
        return -(-len(data) // DIRECT_BLOCK) * DIRECT_BLOCK

    def read_into(self, value: np.ndarray, offset: int) -> None:
        """Fills C-contiguous `value` with the bytes written at `offset`."""
        if self.direct:  # a read into an unaligned value is refused under O_DIRECT
            self.direct = _set_direct(self.file.fileno(), False)
            if self.direct:
                raise SurgeryError("the undo file could not be switched to buffered reads")
        target = memoryview(value.reshape(-1).view(np.uint8))
        if read_fully(self.file, target, offset) < len(target):
            raise SurgeryError("the undo file ended before the value recorded in it")

    def close(self, *, background: bool = False) -> None:
        """Closes the file. `background`: in a daemon thread (the file is already unlinked:
        giving its blocks back took 0.28 s for a 2.8 GB journal, after a migration that has
        nothing left to undo)."""
        self._buffer = None
        if not background:
            self.file.close()
            return
        file, self.file = self.file, None
        threading.Thread(target=_close_logged, args=(file,), name="keras-surgery-undo-close",
                         daemon=True).start()


def _close_logged(file: Any) -> None:
    try:
        file.close()
    except OSError as exc:
        logger.warning("keras-surgery: closing the undo file failed: %s", exc)


def _set_direct(fd: int, on: bool) -> bool:
    """Turns `O_DIRECT` on or off for open file `fd`; whether it is now on."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except (ImportError, OSError):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | flag) if on else (flags & ~flag))
    except OSError:
        return bool(flags & flag)  # as it was
    return on


def _write_all(file: Any, data: memoryview, offset: int) -> None:
    """Writes every byte of `data` at `offset` of raw file `file` (a write may take part)."""
    done = 0
    while done < len(data):
        if hasattr(os, "pwrite"):
            done += os.pwrite(file.fileno(), data[done:], offset + done)
        else:
            file.seek(offset + done)
            done += file.write(data[done:])


class Journal:
    """The values variables held before a migration wrote them, to undo a failed migration.

    The first `spill_bytes` are kept in memory; past that, values are written to an anonymous
    temporary file (gone when closed, even after a crash; see `SpillFile`), so that a
    migration's extra memory stays near the size of its largest weight however large the model
    is.
    """

    def __init__(self, spill_bytes: int = SPILL_BYTES, directory: str | None = None) -> None:
        self.spill_bytes = spill_bytes
        self.directory = directory
        self.kept = 0
        self.entries: list[tuple[Any, Any]] = []
        self._file: SpillFile | None = None

    def save(self, var: Any, current: np.ndarray, *, copy: bool = False) -> bool:
        """Records `current` as `var`'s value to restore. Returns True when the journal keeps
        no reference to `current` (it was written out), so the caller may overwrite it.
        `copy=True`: a value kept in memory is copied (`current` is a view of the variable's
        own buffer, which is about to be written in place)."""
        current = np.asarray(current, order="C")  # `ascontiguousarray` makes a 0-d array 1-d
        if self.kept + current.nbytes <= self.spill_bytes:
            self.entries.append((var, np.array(current) if copy else current))
            self.kept += current.nbytes
            return copy
        if self._file is None:
            self._file = SpillFile(self.directory)
        offset = self._file.write(current)
        self.entries.append((var, (offset, current.shape, current.dtype)))
        return True

    def spills(self, current: np.ndarray) -> bool:
        """Whether `save` would write `current` to the undo file (not keep it in memory)."""
        return self.kept + np.asarray(current).nbytes > self.spill_bytes

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
            for attempt in (1, 2):
                try:
                    var.assign(self._recorded(entry))
                    restored.append(var)
                    break
                except Exception as exc:
                    if var is not unsure:
                        failed.append((var, exc))
                    break
                except BaseException as exc:
                    # A second Ctrl-C while undoing: the undo goes on (this variable is tried
                    # once more), since stopping here would leave the model half migrated.
                    if attempt == 2 and var is not unsure:
                        failed.append((var, exc))
        return restored, failed

    def _recorded(self, entry: Any) -> np.ndarray:
        if not isinstance(entry, tuple):
            return entry
        offset, shape, dtype = entry
        value = np.empty(shape, dtype)
        assert self._file is not None
        self._file.read_into(value, offset)
        return value

    def close(self, *, background: bool = False) -> None:
        """Drops every entry and closes the undo file (`background`: see `SpillFile.close`)."""
        self.entries.clear()
        if self._file is not None:
            file, self._file = self._file, None
            file.close(background=background)


@dataclass
class Write:
    """One variable to write: `compute(current, owned)` gives its new value from its current
    one, which it may overwrite when `owned` is True. The value must be an array nothing else
    refers to (or `current` itself when owned): it is given to the backend to keep.
    `reads_current=False` says the new value does not depend on the current values (only on
    their shape and dtype): then the current value is taken without a copy where the backend
    allows, for the rollback journal only. `fills_into=True` says `compute` takes a third
    argument: None, or a writable view of the variable's own buffer (`writable_view`, then
    also `current`) to compute the value into and return."""

    var: Any
    what: str
    compute: Callable[..., np.ndarray]
    reads_current: bool = True
    fills_into: bool = False


def current_value(var: Any, *, copy: bool) -> tuple[np.ndarray, bool]:
    """The current value of `var` as a numpy array, and whether the caller owns it (may write
    into it).

    With `copy=False`, on TensorFlow and JAX, a read-only view of the variable's own buffer,
    taken without copying: assigning the variable afterwards leaves the view holding the
    values it had (TensorFlow copies a shared buffer on write; JAX arrays never change).
    Elsewhere, and with `copy=True`, a copy.
    """
    view = None if copy else variable_view(var)
    if view is not None:
        return view, False
    value = np.asarray(var.numpy())
    return value, value.flags.writeable


IN_PLACE_MIN_BYTES = 1 << 20
"""Values at least this large are computed in the variable's own buffer where the backend
allows it (see `writable_view`)."""


def writable_view(var: Any) -> np.ndarray | None:
    """A writable numpy view of a PyTorch variable's own CPU buffer, outside a stateless
    scope (None elsewhere, for a 0-d variable, or for a dtype numpy has no view of).

    A large new value is computed straight into it (after the journal copied the current
    values out), instead of into fresh memory that Keras's `assign` would then copy again
    (its PyTorch `convert_to_tensor` copies every numpy array, then `copy_` copies it into
    the variable): memory the process touches for the first time costs far more than a copy
    into memory already touched (about 2 s against 0.4 s per GiB, measured on the project's
    machine while a migration runs). TensorFlow and JAX have no writable view: on JAX an
    aligned new value becomes the variable's buffer without a copy; TensorFlow copies a new
    value into its own allocator's memory, which reuses the buffers variables give back
    (`_HandedOver`, `keras_surgery.fill.shareable_empty`).
    """
    import keras
    from keras.src.backend.common.stateless_scope import in_stateless_scope
    from keras.src.backend.common.variables import get_autocast_scope

    if (keras.backend.backend() != "torch" or not len(var.shape) or in_stateless_scope()
            or get_autocast_scope() is not None):  # `var.value` would be a cast copy
        return None
    try:
        value = var.value
        if value.device.type != "cpu":
            return None
        view = value.detach().numpy()
    except (TypeError, RuntimeError, AttributeError):
        return None  # bfloat16 has no numpy view
    if (not view.flags.writeable or not view.flags.c_contiguous
            or tuple(view.shape) != tuple(var.shape) or view.nbytes < IN_PLACE_MIN_BYTES):
        return None
    return view


class Staging:
    """One reused buffer that TensorFlow's large new values are computed in, one at a time.

    TensorFlow copies a new value into its own allocator's memory when it is assigned (a
    large value is placed so that it must: `keras_surgery.fill.COPIED_OFFSET`), so the array
    the value was computed in is free again once `assign` returns. A new array for each value
    is memory the process touches for the first time, which costs far more than a copy into
    memory already touched (about 2 s against 0.4 s per GiB, measured on the project's
    machine during a migration). So values of `SHARED_MIN_BYTES` and up are computed in one
    buffer, touched once (a new one only for a value larger than it, or under half its size).
    The first buffer is aligned, so TensorFlow keeps it as its variable's own without a copy,
    and the buffer that variable gives back is where TensorFlow's later copies go: its own
    first copy into fresh memory took 0.8-1.0 s per 256 MB. Whenever a variable keeps the
    buffer (checked after each assign by the variable's buffer address), it is left to it and
    the next value gets a new one. Other backends keep the value (JAX) or are written in place
    (PyTorch): `for_value` gives None there.
    """

    def __init__(self) -> None:
        import keras

        self._raw: np.ndarray | None = None
        self._given = False
        self._on = keras.backend.backend() == "tensorflow"

    def for_value(self, current: np.ndarray) -> np.ndarray | None:
        """A buffer of `current`'s shape and dtype to compute a new value into, or None."""
        nbytes = current.nbytes
        if not self._on or nbytes < SHARED_MIN_BYTES or current.dtype.hasobject:
            return None
        if self._raw is None or not nbytes <= self._raw.nbytes < 2 * nbytes:
            # A new buffer when the value is larger, or less than half the size (large values
            # go largest first: a buffer kept for the largest would hold its size to the end).
            self._raw = None
            # The first buffer is aligned: TensorFlow keeps it as the variable's own, and
            # the buffer that variable gives back to its allocator is where later copies go.
            offset = COPIED_OFFSET if self._given else 0
            self._raw = aligned_bytes(nbytes, BUFFER_ALIGNMENT, offset)
        return self._raw[:nbytes].view(current.dtype).reshape(current.shape)

    def assigned(self, var: Any, following: Write | None = None) -> None:
        """After `var` was assigned a value computed in the buffer: give the buffer up if
        the variable kept it, or if the `following` write (None: none) will not use it."""
        if self._raw is None:
            return
        kept = variable_view(var)
        if kept is None:
            self._raw, self._given = None, True  # cannot tell: never reuse it
            return
        start = self._raw.ctypes.data
        address = kept.ctypes.data
        if start - kept.nbytes < address < start + self._raw.nbytes:
            self._raw, self._given = None, True
        elif following is None or not self._raw.nbytes < 2 * _nbytes(following.var):
            self._raw = None  # not used again: freed before the next write reads its value

    def close(self) -> None:
        self._raw = None


def _nbytes(var: Any) -> int:
    try:
        itemsize = np.dtype(str(getattr(var.dtype, "name", var.dtype))).itemsize
    except TypeError:
        itemsize = 2  # bfloat16 and the like, which numpy names only through ml_dtypes
    return int(np.prod(tuple(var.shape), dtype=np.int64)) * itemsize


class _HandedOver:
    """A new value the migration allocated and never touches again, given to TensorFlow
    through the array protocol.

    TensorFlow's Python layer copies every `np.ndarray` it converts, into memory newly taken
    from the system (slow to touch the first time: about 0.6 s per 256 MB measured on the
    project's machine), and then keeps that copy as the variable's buffer. An array-like goes
    to its C++ conversion instead, which either shares an aligned array's buffer or copies it
    into memory TensorFlow's allocator already holds (such as the buffers variables gave
    back): the same values, without a second weight-sized copy in fresh memory. Large new
    values are placed so that it copies them (`keras_surgery.fill.shareable_empty`: with
    oneDNN on, a buffer given back to TensorFlow's allocator stays in it).
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


def write_order(writes: list[Write]) -> list[Write]:
    """The order `stream` runs `writes` in: values under `SHARED_MIN_BYTES` smallest first,
    then the larger ones largest first (ties in their given order).

    Small values first: the in-memory part of the journal holds many of them, and the large
    ones go to its file. Large ones largest first: TensorFlow copies each new value into its
    allocator's memory before the variable gives its previous buffer back, so each copy after
    the first fits in a buffer a larger variable gave back (ascending, every size larger than
    any given back takes memory the process touches for the first time: 0.8-1.0 s per
    256 MB measured during the dense 739M migration, against 0.02 s for a reused one). The
    last write, which keeps no journal entry, is then the smallest large one.
    """
    sizes = [_nbytes(w.var) for w in writes]
    small = sorted((i for i, n in enumerate(sizes) if n < SHARED_MIN_BYTES),
                   key=lambda i: sizes[i])
    large = sorted((i for i, n in enumerate(sizes) if n >= SHARED_MIN_BYTES),
                   key=lambda i: -sizes[i])
    return [writes[i] for i in small + large]


def stream(
    writes: list[Write], model: Any, *, release: Callable[[], None] | None = None,
    progress: Callable[[int], None] | None = None, spill_bytes: int = SPILL_BYTES,
    before_last: Callable[[], None] | None = None, undo: bool = True,
) -> None:
    """Runs `writes` into `model`'s variables, all or nothing (with `undo`).

    Args:
        writes: the variables to write and how to compute their values.
        model: the model the variables belong to (its layers are finalized after writing).
        release: called after each write (a memory-mapped old file drops its pages).
        progress: called with the number of writes done.
        spill_bytes: rollback values kept in memory, in bytes; the rest go to a file.
        before_last: called before the last write, the only one without an undo entry (the
            check that the old values read were sound): if it raises, every write is undone.
        undo: keep the journal. False: no variable's previous value is kept (no copy of the
            model's current values is written anywhere), and a failure leaves the variables
            written so far with their new values; the error says so.

    Raises:
        SurgeryError: a write failed; every variable written before is restored (or the
            error names those that could not be, or, with `undo=False`, says how many were
            written and not restored).
    """
    release = release or (lambda: None)
    progress = progress or (lambda i: None)
    journal = Journal(spill_bytes)
    staging = Staging()
    written: list[Any] = []
    what, stage, var, journaled, in_place = "finishing", "finish", None, False, False
    saving = _Saving(journal)
    writes = write_order(writes)
    try:
        for count, write in enumerate(writes, start=1):
            what, var = write.what, write.var
            journaled = in_place = False
            if count == len(writes) and before_last is not None:
                stage = "check"
                before_last()
            stage = "read"
            view = writable_view(var) if write.fills_into else None
            in_place = view is not None
            if in_place:
                current, owned = view, True
            else:
                current, owned = current_value(var, copy=write.reads_current)
            if undo and (count < len(writes) or view is not None):
                if not owned and journal.spills(current):
                    # Written to the undo file while the value is computed: `current` is a
                    # read-only view that keeps its values until the variable is assigned.
                    saving.start(var, current)
                else:
                    # A value computed in place has an undo entry even when it is the last:
                    # its computation can fail halfway through the variable's own buffer.
                    owned = journal.save(var, current, copy=view is not None) and owned
                    journaled = True
            stage = "compute"
            if write.fills_into:
                out = view if in_place else staging.for_value(current)
                value = write.compute(current, owned, out)
            else:
                out = None
                value = write.compute(current, owned)
            if saving.pending:
                stage = "journal"
                journaled = saving.finish()
            del current
            if view is None or value is not view:  # else written in the variable's own buffer
                if isinstance(value, np.ndarray) and value.flags.writeable:
                    release()  # the old values are copied out: drop their pages first
                stage = "assign"
                var.assign(handed_over(value))
                if out is not None and value is out:
                    staging.assigned(var, writes[count] if count < len(writes) else None)
            del value, view, out
            written.append(var)
            stage = "written"  # an interrupt in what follows comes after this write
            release()
            progress(count)
        what, stage = "finishing", "finish"
        finalize_layers(model, written)
    except BaseException as exc:
        if saving.pending:  # the journal's entry for the write that failed
            journaled = saving.settle()
        after_last = stage in ("finish", "written") and len(written) == len(writes)
        if after_last and not isinstance(exc, Exception):
            _finish_interrupted(exc, model, written, journal)
            raise
        if not undo:
            _close_quietly(journal)
            _not_undone(exc, what, written, var,
                        in_place and stage == "compute" and not any(v is var for v in written))
        try:
            if stage == "compute" and journaled and not in_place:
                journal.forget_last()  # never written: nothing to undo
            restored, failed = journal.restore(unsure=var if stage == "assign" else None)
            finalize_layers(model, restored)
            if stage in ("finish", "written") and written and not journaled:
                # Only what follows the last (unjournaled) write can fail after it: say so.
                failed.append((written[-1], SurgeryError("the last write keeps no undo entry")))
        finally:
            journal.close()
        _raise_undone(exc, what, failed)
    finally:
        saving.close()
    _close_finished(journal)


def _raise_undone(exc: BaseException, what: str, failed: list[tuple[Any, Exception]]) -> None:
    """Raises what a write that failed at `what` becomes once the journal was restored:
    `exc` itself (an interrupt, with a note; a SurgeryError), or a SurgeryError saying the
    migration was undone or naming the variables in `failed` that could not be restored."""
    if failed:
        names = ", ".join(getattr(v, "path", None) or getattr(v, "name", "?")
                          for v, _ in failed)
        raise SurgeryError(
            f"Writing the new weights failed at {what} ({exc}), and restoring the previous "
            f"values failed for {names} ({failed[0][1]}); the model is inconsistent."
        ) from exc
    if not isinstance(exc, Exception):
        _say(exc, f"the migration was interrupted at {what} and undone: every variable "
                  "written was restored, the model is as it was.")
        raise exc
    if isinstance(exc, SurgeryError):
        raise exc  # a precise error, now with the model restored
    raise SurgeryError(
        f"Writing the new weights failed at {what} and was undone: {exc}"
    ) from exc


class _Saving:
    """The journal's write of one value to its undo file, in a thread of its own, while the
    value's replacement is computed: both are copies that let the GIL go (into the file past
    the page cache, from the old file into the new value), and on two cores they overlap. The
    dense 739M migration on TensorFlow spent 0.86 s in the journal and 0.78 s computing."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.pending: Any = None
        self._pool: Any = None

    def start(self, var: Any, current: np.ndarray) -> None:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="keras-surgery-journal")
        self.pending = self._pool.submit(self.journal.save, var, current)

    def finish(self) -> bool:
        """Waits for the write; raises its error. True: the entry is recorded."""
        pending, self.pending = self.pending, None
        pending.result()
        return True

    def settle(self) -> bool:
        """After a failure elsewhere: waits for the write (even through an interrupt, since the
        journal must not change under the undo); True when it recorded its entry."""
        pending, self.pending = self.pending, None
        while True:
            try:
                return pending.exception() is None
            except BaseException:  # noqa: S112  (a second Ctrl-C: the write ends soon anyway)
                continue

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _not_undone(exc: BaseException, what: str, written: list[Any], var: Any,
                halfway: bool) -> None:
    """Raises for a failed write without an undo journal (`undo=False`): nothing is
    restored, and the error says what the model now holds."""
    before = sum(1 for v in written if v is not var)
    detail = (f"the variables written before it ({before}) keep their new values, the others "
              "their previous ones")
    if var is not None and any(v is var for v in written):
        detail += "; its own variable holds its new value"
    elif halfway:
        detail += "; its own variable, computed in place, may hold part of its new value"
    if not isinstance(exc, Exception):
        _say(exc, f"the migration was interrupted at {what} and not undone (undo=False): "
                  f"{detail}.")
        raise exc
    raise SurgeryError(
        f"Writing the new weights failed at {what} ({exc}) and was not undone (undo=False): "
        f"{detail}."
    ) from exc


def _say(exc: BaseException, text: str) -> None:
    """Tells what state the model is in, on the exception (a note under its traceback) and in
    the log."""
    exc.add_note(f"keras-surgery: {text}")
    logger.warning("keras-surgery: %s", text)


def _close_quietly(journal: Journal) -> None:
    journal.entries.clear()
    undo_file, journal._file = journal._file, None
    if undo_file is not None:
        with contextlib.suppress(Exception):
            undo_file.close()


def _finish_interrupted(exc: BaseException, model: Any, written: list[Any],
                        journal: Journal) -> None:
    """An interrupt after the last write, while the layers were finalized: every variable
    already holds its new value (the last one has no undo entry), so the migration is finished
    rather than half undone, and the interrupt goes on saying so."""
    try:
        finalize_layers(model, written)
    finally:
        _close_quietly(journal)
    _say(exc, "the interrupt came after the last write: the migration finished, every "
              "variable holds its new value.")


def _close_finished(journal: Journal) -> None:
    """Closes the journal of a finished migration. Nothing can be undone any more, so a failure
    or an interrupt while closing must not read as a failed migration: an error is logged, an
    interrupt goes on with a note that the model is fully migrated."""
    try:
        journal.close(background=True)
    except BaseException as exc:
        _close_quietly(journal)
        text = ("the migration finished (every variable holds its new value); closing its "
                "undo journal was interrupted")
        if isinstance(exc, Exception):
            logger.warning("keras-surgery: %s: %s", text, exc)
            return
        _say(exc, text + ".")
        raise


def progress_bar(total: int, verbose: bool):
    """`update(i)` of a keras Progbar over `total` steps, or a no-op when not verbose."""
    if not verbose or total == 0:
        return lambda i: None
    import keras

    bar = keras.utils.Progbar(total, unit_name="weight")
    return bar.update
