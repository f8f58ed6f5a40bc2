"""Reading the bytes behind a view of a memory-mapped file with `preadv` instead of page faults.

The old weights are read as numpy views of one memory map of the old file (`keras_file`), so
that nothing is read that is not copied. Touching a view faults the file's pages into the
process (and they must be dropped again to keep its resident pages low); `preadv` of the same
bytes lets the kernel copy them from the page cache without mapping a page, and a file that
shrank meanwhile is a short read, which is an error here, where touching the map past its end
kills the process (SIGBUS). Measured on the project's machine the two cost about the same
(the dense 739M migration's copies 5.55 -> 5.36 s: what they pay is the first touch of the
new values' memory). `read_into` does that copy for any view that lies inside a map
registered here; the maps' owners register them when they create them and forget them when
they close them.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryFileError

# base address -> (the map, weakly: a map closed or gone never answers; open file; its name)
_MAPS: dict[int, tuple[weakref.ref, Any, str]] = {}
_LOCK = threading.Lock()


def _address(data: Any) -> int:
    view = np.frombuffer(data, np.uint8, 1) if len(data) else None
    try:
        return 0 if view is None else int(view.ctypes.data)
    finally:
        del view  # a map cannot close while a view of it is alive


def register(data: Any, raw: Any, name: str) -> None:
    """Records that `data` (a memory map) holds the bytes of open file `raw` from offset 0."""
    if len(data) and hasattr(os, "preadv"):
        with _LOCK:
            _MAPS[_address(data)] = (weakref.ref(data), raw, name)


def forget(data: Any) -> None:
    """Forgets a map registered with `register` (call before closing it)."""
    with _LOCK:
        if len(data) and not data.closed:
            _MAPS.pop(_address(data), None)


def read_into(target: np.ndarray, source: np.ndarray) -> bool:
    """Copies the bytes of `source` into `target` with `preadv` when `source` is a view inside
    a registered map and both are C-contiguous arrays of the same size in bytes. Returns
    whether it did; False leaves `target` as it was.

    Raises:
        SurgeryFileError: the file ended before the bytes the view covers (it was truncated
            while it was read; touching the view would have crashed the process).
    """
    if (target.nbytes != source.nbytes or not target.nbytes or not target.flags.c_contiguous
            or not source.flags.c_contiguous or not target.flags.writeable):
        return False
    address = int(source.ctypes.data)
    found = None
    with _LOCK:
        for base, (ref, raw, name) in list(_MAPS.items()):
            data = ref()
            if data is None or data.closed:
                del _MAPS[base]  # closed without `forget`: its address may be reused
            elif base <= address and address + source.nbytes <= base + len(data):
                found = base, raw, name
    if found is None:
        return False
    base, raw, name = found
    buffer = memoryview(target.reshape(-1).view(np.uint8))
    offset = address - base
    done = read_fully(raw, buffer, offset)
    if done < len(buffer):
        raise SurgeryFileError(
            f"'{name}' ended at byte {offset + done} while it was read, before the "
            f"{len(buffer)} bytes of a weight at byte {offset}: it changed while it was read."
        )
    return True


def read_fully(raw: Any, target: memoryview, offset: int) -> int:
    """Reads open file `raw` from `offset` into byte view `target` until it is full or the
    file ends; returns the bytes read. With `preadv` (no file position moves); where there is
    none, as on Windows, a seek and `readinto` of `raw`."""
    done = 0
    while done < len(target):
        if hasattr(os, "preadv"):
            got = os.preadv(raw.fileno(), [target[done:]], offset + done)
        else:
            raw.seek(offset + done)
            got = raw.readinto(target[done:]) or 0
        if got <= 0:
            break
        done += got
    return done
