"""Reads `.keras` files as data: config.json parsed as JSON, weights read lazily with h5py.

Nothing in the file is deserialised: no layer is instantiated, no custom class is imported,
no code from the file runs. Keras's own loader (`saving_lib.load_model`, `H5IOStore`) streams
the weights member through zipfile's reader; we open the member in place instead (a file object
over its byte range when it is stored uncompressed, which is how Keras writes it), so reading a
tensor costs what h5py costs, and only the tensors asked for are read.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryFileError
from keras_surgery.graph import ModelGraph, WeightSource, build_graph

CONFIG_MEMBER = "config.json"
WEIGHTS_MEMBER = "model.weights.h5"
METADATA_MEMBER = "metadata.json"
MAX_CONFIG_BYTES = 64 * 1024 * 1024
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


class _MemberReader(io.RawIOBase):
    """A read-only, seekable file object over one byte range of a file."""

    def __init__(self, path: str, start: int, size: int):
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._start = start
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class KerasFile(WeightSource):
    """A `.keras` file opened for reading.

    Example:
        >>> with KerasFile("old.keras") as f:            # doctest: +SKIP
        ...     graph = f.graph()
        ...     kernel = graph.read(graph.layers["dense"].weights[0])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._h5: Any = None
        self._reader: io.RawIOBase | None = None
        self._paths: dict[str, tuple[tuple[int, ...], str]] | None = None
        self.config = self._read_config()

    # -- zip members ---------------------------------------------------------------------

    def _zip(self) -> zipfile.ZipFile:
        if not os.path.exists(self.path):
            raise SurgeryFileError(f"No such file: '{self.path}'.")
        if os.path.isdir(self.path):
            raise SurgeryFileError(f"Expected a .keras file, got a directory: '{self.path}'.")
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise SurgeryFileError(
                f"'{self.path}' is not a .keras file: expected a zip archive with "
                f"{CONFIG_MEMBER} and {WEIGHTS_MEMBER} ({exc})."
            ) from exc

    def _member(self, archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
        try:
            return archive.getinfo(name)
        except KeyError:
            raise SurgeryFileError(
                f"'{self.path}' has no {name}: expected a .keras archive with {CONFIG_MEMBER} "
                f"and {WEIGHTS_MEMBER}. Members found: {sorted(archive.namelist())[:10]}"
            ) from None

    def _read_config(self) -> dict:
        with self._zip() as archive:
            info = self._member(archive, CONFIG_MEMBER)
            if info.file_size > MAX_CONFIG_BYTES:
                raise SurgeryFileError(
                    f"'{self.path}': {CONFIG_MEMBER} is {info.file_size} bytes, more than the "
                    f"{MAX_CONFIG_BYTES} allowed."
                )
            try:
                with archive.open(info) as member:
                    raw = member.read(MAX_CONFIG_BYTES + 1)
                config = json.loads(raw.decode("utf-8"))
            except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError) as exc:
                raise SurgeryFileError(
                    f"'{self.path}': {CONFIG_MEMBER} is not valid JSON ({exc})."
                ) from exc
            self._member(archive, WEIGHTS_MEMBER)
        if not isinstance(config, dict):
            raise SurgeryFileError(f"'{self.path}': {CONFIG_MEMBER} must hold a JSON object.")
        return config

    # -- weights -------------------------------------------------------------------------

    def _open_h5(self) -> Any:
        if self._h5 is not None:
            return self._h5
        import h5py

        with self._zip() as archive:
            info = self._member(archive, WEIGHTS_MEMBER)
            if info.compress_type == zipfile.ZIP_STORED:
                with open(self.path, "rb") as raw:
                    raw.seek(info.header_offset)
                    header = raw.read(_LOCAL_HEADER.size)
                if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                    raise SurgeryFileError(f"'{self.path}': corrupt zip entry {WEIGHTS_MEMBER}.")
                fields = _LOCAL_HEADER.unpack(header)
                start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
                self._reader = _MemberReader(self.path, start, info.file_size)
            else:
                # Compressed (not how Keras writes it): decompress once into memory.
                with archive.open(info) as member:
                    self._reader = io.BytesIO(member.read())  # type: ignore[assignment]
        try:
            self._h5 = h5py.File(self._reader, "r")
        except Exception as exc:
            self.close()
            raise SurgeryFileError(
                f"'{self.path}': {WEIGHTS_MEMBER} is not a readable HDF5 file ({exc})."
            ) from exc
        return self._h5

    def paths(self) -> Mapping[str, tuple[tuple[int, ...], str]]:
        if self._paths is None:
            self._paths = self._walk(self._open_h5())
        return self._paths

    def _walk(self, h5: Any) -> dict[str, tuple[tuple[int, ...], str]]:
        import h5py

        found: dict[str, tuple[tuple[int, ...], str]] = {}

        def visit(group: Any, prefix: str) -> None:
            for key in group.keys():
                link = group.get(key, getlink=True)
                path = f"{prefix}{key}"
                if not isinstance(link, h5py.HardLink):
                    raise SurgeryFileError(
                        f"'{self.path}': {WEIGHTS_MEMBER} entry '{path}' is a "
                        f"{type(link).__name__}; only plain datasets are accepted."
                    )
                item = group[key]
                if isinstance(item, h5py.Group):
                    visit(item, path + "/")
                elif isinstance(item, h5py.Dataset):
                    found[path] = (tuple(int(d) for d in item.shape), str(item.dtype))

        visit(h5, "")
        return found

    def read(self, path: str) -> np.ndarray:
        h5 = self._open_h5()
        if path not in self.paths():
            raise SurgeryFileError(f"'{self.path}': {WEIGHTS_MEMBER} has no dataset '{path}'.")
        try:
            return np.asarray(h5[path][()])
        except Exception as exc:
            raise SurgeryFileError(
                f"'{self.path}': could not read weight '{path}' ({exc})."
            ) from exc

    def group_name(self, group: str) -> str | None:
        """The layer name Keras >= 3.6 stores on `<group>/vars`, if any."""
        try:
            vars_group = self._open_h5().get(f"{group}/vars")
        except Exception:
            return None
        name = vars_group.attrs.get("name") if vars_group is not None else None
        return name.decode() if isinstance(name, bytes) else name

    def graph(self) -> ModelGraph:
        """The model graph described by this file."""
        graph = build_graph(self.config, self, description=f"'{self.path}'")
        self._check_group_names(graph)
        return graph

    def _check_group_names(self, graph: ModelGraph) -> None:
        # Files from Keras >= 3.6 name the layer on each vars group: a mismatch means our
        # reconstruction of the group naming disagrees with Keras's and weights would be swapped.
        for node in graph.layers.values():
            if node.group is None:
                continue
            stored = self.group_name(node.group)
            if stored is not None and stored != node.short_name:
                raise SurgeryFileError(
                    f"'{self.path}': weights group '{node.group}' belongs to layer '{stored}', "
                    f"but the config places layer '{node.short_name}' there."
                )

    def close(self) -> None:
        if self._h5 is not None:
            try:
                self._h5.close()
            finally:
                self._h5 = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> KerasFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
