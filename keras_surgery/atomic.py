"""Atomic, durable file writes: a temporary name in the target folder, fsynced, renamed into
place, and the folder fsynced, so that after a crash or a power loss the target is either the
old file or the complete new one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger("keras_surgery")

TEMP_SUFFIX = ".ks-partial"
"""Temporary files end with this (and start with a dot), so a folder pattern such as
`*.keras` never takes one for a checkpoint; a killed run's leftovers are recognised by it."""


def is_temporary(name: str) -> bool:
    """Whether a file name is one of our temporary files (this version's or an older one's:
    `.tmp-XXXX.keras`), which a killed run may have left behind."""
    return name.startswith(".") and (name.endswith(TEMP_SUFFIX) or name.startswith(".tmp-"))


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): renames are durable there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path next to `path`; when the block succeeds the file written there
    is fsynced, given the permissions of the file it replaces (or those a plain open() would
    give a new file), renamed to `path`, and the folder fsynced. On failure it is removed, so
    `path` is either the old file or the complete new one, never a partial one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX,
                               dir=folder)
    os.close(fd)
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)  # mkstemp creates 0600; a plain open() would honour the umask
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2))


def atomic_zip(path: str | os.PathLike, members: Iterable[tuple[str, bytes | str]]) -> None:
    """Writes a zip archive atomically (members uncompressed, as Keras writes them); a member
    given as a `str` is the path of a file to store, streamed."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members:
            if isinstance(data, str):
                z.write(data, name)
            else:
                z.writestr(name, data)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through links, `..`, another spelling); a path that
    does not exist is the same as another only if both resolve to one location."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
