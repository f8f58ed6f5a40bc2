"""Reads `.keras` files as data: config.json parsed as JSON, weights read lazily with h5py.

The model is not deserialised: no custom class is imported and no code from the file runs.
The only objects ever made from the config are Keras's own built-in layers, in safe mode and
without allocating their variables, to learn which variables Keras would store for them
(`keras_layout`). Keras's own loader (`saving_lib.load_model`, `H5IOStore`) streams
the weights member through zipfile's reader; we open the member in place instead (a file object
over its byte range when it is stored uncompressed, which is how Keras writes it), so reading a
tensor costs what h5py costs, and only the tensors asked for are read.

The checks Keras's loader makes are made here too, before anything is read: h5 links and
external or virtual datasets are refused (`saving_lib.safe_get_h5_dataset`), as are zip and
h5 decompression bombs, and the variables stored for each Keras layer must be those Keras would
create from its config (`Layer._check_load_own_variables`), so a damaged file fails with an
error naming the layer instead of being read as a layer of another shape.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import mmap
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from keras_surgery import filemap
from keras_surgery.budgets import check_config_values, check_layer_entry
from keras_surgery.errors import SurgeryFileError
from keras_surgery.graph import (
    NESTED_MODEL_CLASSES,
    LayerNode,
    ModelGraph,
    WeightSource,
    build_graph,
    live_variables,
    unallocated_keras_objects,
)

logger = logging.getLogger("keras_surgery")

CONFIG_MEMBER = "config.json"
WEIGHTS_MEMBER = "model.weights.h5"
METADATA_MEMBER = "metadata.json"
MAX_CONFIG_BYTES = 64 * 1024 * 1024
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
# Keras's limits against decompression and shape bombs (saving_lib._reject_zip_bomb,
# saving_lib.safe_get_h5_dataset): a member or dataset above the floor must not expand more.
BOMB_FLOOR_BYTES = 1 << 32
MAX_EXPANSION = 1000
# Our own budgets, tighter than Keras's (issue "safe under real-world faults"): a small hostile
# file must cost at most a few hundred MB before it is refused. Genuine files stay far below:
# Keras stores the weights member uncompressed and writes every dataset whole, contiguously.
# Raise them (keras_surgery.keras_file.<NAME> = ...) only for a file you trust.
DECOMPRESS_FLOOR_BYTES = 64 << 20  # above it, a compressed member may not expand > MAX_EXPANSION
MAX_UNWRITTEN_BYTES = 256 << 20  # total declared bytes of datasets that store next to nothing
MAX_CHUNK_FLOOR_BYTES = 1 << 20  # an HDF5 chunk may exceed its dataset's size only up to this
SPILL_BLOCK_BYTES = 8 << 20  # a compressed member is decompressed to disk in blocks this size
BFLOAT16 = "bfloat16"
try:
    from lzma import LZMAError as _LZMAError
except ImportError:  # a Python without lzma: zipfile cannot decompress such members either
    _LZMAError = zlib.error  # type: ignore[misc,assignment]
# What zipfile raises on a damaged archive: besides BadZipFile, its decompressors' errors and
# NotImplementedError for a compression method or zip version it does not know.
ZIP_ERRORS = (
    zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error, _LZMAError,
)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
WEIGHTS_ONLY_SUFFIXES = (".weights.h5", ".weights.json")
WEIGHTS_ONLY_ADVICE = (
    "a weights-only file has no architecture, pass the architecture as `old` (a .keras file "
    "or the live model) and the file as `old_weights=`."
)
GLOBAL_HEAP_SIGNATURE = b"GCOL\x01"  # signature and version 1, the only version HDF5 reads
# More global heap objects than any Keras file holds (one per layer name or dtype tag); also
# bounds the time the check below takes on a hostile file.
MAX_GLOBAL_HEAP_OBJECTS = 1 << 20
# HDF5 classes of the datasets a weight can be stored as: h5py writes numpy bools as an enum,
# and Keras's bfloat16 as 2-byte opaque values.
_NUMBER_CLASSES = (0, 1, 4, 5, 8)  # H5T_INTEGER, FLOAT, BITFIELD, OPAQUE, ENUM

# Results of the global-heap scan, by file identity (device, inode, size, modification time) and
# member range: planning and applying open the same file, and the scan reads every byte of it.
_HEAP_SCANS: dict[tuple, str | None] = {}
_MAX_HEAP_SCANS = 64
# Stored weights members whose CRC-32 matched, by the same key: a file is checked once.
_CRC_CHECKED: set[tuple] = set()
CRC_CHUNK_BYTES = 32 << 20


def read_at(raw: Any, size: int, offset: int) -> bytes:
    """`size` bytes of open file `raw` from `offset`, without moving a position anything else
    relies on (`os.pread`; where there is none, as on Windows, a seek and read of `raw`)."""
    if hasattr(os, "pread"):
        return os.pread(raw.fileno(), size, offset)
    raw.seek(offset)
    return raw.read(size)


class _MemberReader(io.RawIOBase):
    """A read-only, seekable file object over one byte range of an open file, with a position
    of its own (`read_at`), so that readers of one file descriptor never disturb each other."""

    def __init__(self, raw: Any, start: int, size: int):
        super().__init__()
        self._raw = raw
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
        view = memoryview(buffer)[:n]
        if hasattr(os, "preadv"):  # straight into the caller's buffer
            got = os.preadv(self._raw.fileno(), [view], self._start + self._pos)
        else:
            data = read_at(self._raw, n, self._start + self._pos)
            got = len(data)
            view[:got] = data
        self._pos += got
        return got


class H5Weights(WeightSource):
    """The HDF5 weight tree Keras's `H5IOStore` writes, read as data from one byte range of an
    open file: a stored `model.weights.h5` member of a `.keras` archive (or a compressed one,
    decompressed to a temporary file), or a whole plain `.weights.h5` file.

    The global heaps are walked before h5py opens the tree (`endless_global_heap`), links and
    external or virtual datasets are refused, declared sizes are bounded before anything is
    allocated, and contiguous uncompressed datasets (how Keras writes them) are read as views
    of one memory map of the file, whose pages `release()` drops again. The owner of the file
    checks its identity; this object reads only through the descriptor it is given.

    Args:
        raw: the open file (read with `os.pread`, so its position is never used).
        where: how messages name the tree, e.g. `"'old.keras': model.weights.h5"`.
        path: the file's path, for messages about single weights.
        start: where the tree begins in `raw`.
        size: how many bytes it spans (None: to the end of the file).
        crc: the CRC-32 the archive records for the byte range, checked by
            `integrity_check`; None when nothing records one (a plain file).

    Example:
        >>> with open("ckpt.weights.h5", "rb") as raw:                   # doctest: +SKIP
        ...     tree = H5Weights(raw, "'ckpt.weights.h5'", "ckpt.weights.h5")
        ...     kernel = tree.read("layers/dense/vars/0")
    """

    def __init__(self, raw: Any, where: str, path: str, *, start: int = 0,
                 size: int | None = None, crc: int | None = None):
        self.where = where
        self.path = path
        self._raw = raw
        size = os.fstat(raw.fileno()).st_size - start if size is None else size
        self._reader: _MemberReader | None = _MemberReader(raw, start, size)
        self._crc = crc
        self._h5: Any = None
        self._mmap: mmap.mmap | None = None
        self._paths: dict[str, tuple[tuple[int, ...], str]] | None = None
        # Where each dataset that can be viewed in place lies (`_placement`), found with paths
        self._placed: dict[str, tuple[int, np.dtype] | None] = {}

    def h5(self) -> Any:
        """The h5py File, opened on first use (after the global-heap walk)."""
        if self._h5 is not None:
            return self._h5
        import h5py

        if self._reader is None:
            raise SurgeryFileError(f"{self.where} is closed.")
        self._check_global_heaps()
        try:
            self._h5 = h5py.File(self._reader, "r")
        except Exception as exc:
            self.close()
            raise SurgeryFileError(
                f"{self.where} is not a readable HDF5 file ({exc})."
            ) from exc
        return self._h5

    def _key(self) -> tuple:
        reader = self._reader
        st = os.fstat(self._raw.fileno())
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                reader._start, reader._size)  # type: ignore[union-attr]

    def _check_global_heaps(self) -> None:
        reader = self._reader
        assert reader is not None
        if reader._size == 0:
            return
        key = self._key()
        if key in _HEAP_SCANS:
            problem = _HEAP_SCANS[key]
        else:
            problem = endless_global_heap(
                self._map(), reader._start, reader._start + reader._size
            )
            self.release()  # the scan touched every page; weights are read later
            if len(_HEAP_SCANS) >= _MAX_HEAP_SCANS:
                _HEAP_SCANS.clear()
            _HEAP_SCANS[key] = problem
        if problem is not None:
            self.close()
            raise SurgeryFileError(
                f"{self.where} is damaged: {problem}; HDF5 would never finish reading it."
            )

    def paths(self) -> Mapping[str, tuple[tuple[int, ...], str]]:
        if self._paths is None:
            self._paths = self._walk(self.h5())
        return self._paths

    def _walk(self, h5: Any) -> dict[str, tuple[tuple[int, ...], str]]:
        found: dict[str, tuple[tuple[int, ...], str]] = {}
        unwritten = 0  # declared bytes of datasets that store next to nothing
        try:
            for path in _dataset_paths(h5, self.where):
                facts = _DatasetFacts(h5, path)
                if facts.external:
                    raise _refused(self.where, path, "an external dataset")
                if facts.virtual:
                    raise _refused(self.where, path, "a virtual dataset")
                found[path] = (facts.shape, facts.dtype_name())
                unwritten += self._check_budget(path, facts)
                if unwritten > MAX_UNWRITTEN_BYTES:
                    raise SurgeryFileError(
                        f"{self.where}: its datasets declare more than {MAX_UNWRITTEN_BYTES} "
                        f"bytes that they do not store (the last one '{path}'); refusing a "
                        "shape bomb (keras_surgery.keras_file.MAX_UNWRITTEN_BYTES raises the "
                        "limit for a file you trust)."
                    )
                self._placed[path] = self._placement(facts, found[path][1])
        except SurgeryFileError:
            raise
        except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError on damaged files
            raise SurgeryFileError(
                f"{self.where} is damaged and cannot be listed ({exc})."
            ) from exc
        return found

    def _check_budget(self, path: str, facts: _DatasetFacts) -> int:
        """The declared bytes of the dataset at `path` when it stores next to nothing (else 0),
        after refusing a chunk larger than both the dataset and MAX_CHUNK_FLOOR_BYTES: HDF5
        allocates a whole chunk to read any part of it."""
        itemsize = facts.numpy_dtype.itemsize
        declared = math.prod(facts.shape) * itemsize
        if facts.chunks is not None:
            chunk = math.prod(int(c) for c in facts.chunks) * itemsize
            if chunk > max(declared, MAX_CHUNK_FLOOR_BYTES):
                raise SurgeryFileError(
                    f"{self.where} entry '{path}' of {declared} bytes is stored in chunks of "
                    f"{chunk} bytes; refusing a chunk bomb (keras_surgery.keras_file."
                    "MAX_CHUNK_FLOOR_BYTES raises the limit for a file you trust)."
                )
        return declared if declared > MAX_EXPANSION * facts.storage else 0

    def read(self, path: str) -> np.ndarray:
        h5 = self.h5()
        if path not in self.paths():
            raise SurgeryFileError(f"{self.where} has no dataset '{path}'.")
        shape, dtype = self.paths()[path]
        placed = self._placed.get(path)
        if placed is not None and self._reader is not None:
            # Checked when the tree was listed: numbers, contiguous, stored in full, inside.
            value = np.frombuffer(self._map(), dtype=placed[1], count=math.prod(shape),
                                  offset=self._reader._start + placed[0]).reshape(shape)
            return self._typed(path, dtype, value)
        try:
            dataset = h5[path]
            if dataset.id.get_type().get_class() not in _NUMBER_CLASSES:
                # Read nothing else: HDF5 can crash converting a damaged variable-length type.
                raise SurgeryFileError(
                    f"'{self.path}': weight '{path}' is stored as {dataset.dtype}, not as "
                    "numbers; the file is damaged."
                )
            declared = math.prod(shape) * dataset.dtype.itemsize
            if declared > BOMB_FLOOR_BYTES and (
                declared > MAX_EXPANSION * dataset.id.get_storage_size()
            ):
                raise SurgeryFileError(
                    f"'{self.path}': weight '{path}' declares {declared} bytes but stores "
                    "next to nothing; refusing a shape bomb."
                )
            value = self._mapped(dataset, shape)
            if value is None:
                value = np.asarray(dataset[()])
        except SurgeryFileError:
            raise
        except Exception as exc:
            raise SurgeryFileError(
                f"'{self.path}': could not read weight '{path}' ({exc})."
            ) from exc
        return self._typed(path, dtype, value)

    def _typed(self, path: str, dtype: str, value: np.ndarray) -> np.ndarray:
        """`value` read for `path` as the numbers it stores (bfloat16 seen as such)."""
        if dtype == BFLOAT16:
            # Keras stores bfloat16 as 2-byte opaque values tagged attrs["dtype"]; the bits are
            # bfloat16's own (H5IOStore.__getitem__).
            import ml_dtypes

            value = value.view(ml_dtypes.bfloat16)
        elif value.dtype.kind not in "biuf":
            # Strings, records, complex numbers: no variable holds these, and casting them to
            # the new variable's dtype would fail or silently drop parts.
            raise SurgeryFileError(
                f"'{self.path}': weight '{path}' holds values of type {value.dtype}, not real "
                "numbers; the file is damaged."
            )
        return value

    def _placement(self, facts: _DatasetFacts, dtype: str) -> tuple[int, np.dtype] | None:
        """(offset in the tree, dtype) of a contiguous dataset stored in full (as Keras writes
        them), to view in place, else None: found while the tree is listed, so that reading it
        later asks h5py nothing (looking a dataset up again and asking its properties cost
        0.3-0.5 ms per weight). Keras's bfloat16 (2-byte opaque values) is viewed too."""
        reader = self._reader
        if reader is None or facts.type_class not in _NUMBER_CLASSES:
            return None
        numbers = facts.numpy_dtype.kind in "biuf" or dtype == BFLOAT16
        if facts.chunks is not None or not numbers or facts.filtered:
            return None
        offset = facts.offset
        nbytes = math.prod(facts.shape) * facts.numpy_dtype.itemsize
        if (offset is None or nbytes == 0 or facts.storage != nbytes
                or offset + nbytes > reader._size):
            return None  # read (and refused, if it must be) by `read`'s own path
        return offset, facts.numpy_dtype

    def _mapped(self, dataset: Any, shape: tuple[int, ...]) -> np.ndarray | None:
        """A read-only view of a contiguous, uncompressed dataset straight from the memory-mapped
        file (how Keras writes weights): no copy and no trip through h5py's reader. None where
        that does not apply; the caller then reads through h5py."""
        reader = self._reader
        if reader is None or dataset.chunks is not None:
            return None
        if dataset.dtype.kind not in "biuf" or dataset.compression is not None:
            return None
        offset = dataset.id.get_offset()
        nbytes = math.prod(shape) * dataset.dtype.itemsize
        if offset is None or nbytes == 0 or dataset.id.get_storage_size() != nbytes:
            return None
        if offset + nbytes > reader._size:
            raise SurgeryFileError(
                f"'{self.path}': weight '{dataset.name}' points past the end of {self.where}."
            )
        return np.frombuffer(
            self._map(), dtype=dataset.dtype, count=math.prod(shape),
            offset=reader._start + offset,
        ).reshape(shape)

    def _map(self) -> mmap.mmap:
        """The whole file, memory-mapped once (read-only)."""
        if self._mmap is None:
            self._mmap = mmap.mmap(self._raw.fileno(), 0, access=mmap.ACCESS_READ)
            filemap.register(self._mmap, self._raw, self.path)
        return self._mmap

    def integrity_check(self) -> IntegrityCheck:
        """Starts checking the byte range against the CRC-32 recorded for it (see
        `KerasFile.integrity_check`); nothing to check without a recorded CRC."""
        self.h5()
        reader = self._reader
        if self._crc is None or reader is None:
            return IntegrityCheck(None)
        key = self._key()
        if key in _CRC_CHECKED or reader._size == 0:
            return IntegrityCheck(None)
        data, start, size, expected = self._map(), reader._start, reader._size, self._crc

        def crc(cancelled: threading.Event) -> str | None:
            value = 0
            for offset in range(start, start + size, CRC_CHUNK_BYTES):
                if cancelled.is_set():
                    return None
                end = min(offset + CRC_CHUNK_BYTES, start + size)
                with memoryview(data) as whole, whole[offset:end] as chunk:
                    value = zlib.crc32(chunk, value)
                _drop_pages(data, offset, end)
            if value != expected:
                return (f"{self.where} is damaged: its bytes have CRC-32 {value:08x}, the "
                        f"archive records {expected:08x}.")
            if len(_CRC_CHECKED) >= _MAX_HEAP_SCANS:
                _CRC_CHECKED.clear()
            _CRC_CHECKED.add(key)
            return None

        return IntegrityCheck(crc)

    def release(self) -> None:
        """Drops the pages of the memory-mapped file from this process's resident memory
        (see `KerasFile.release`)."""
        if self._mmap is not None and hasattr(self._mmap, "madvise"):
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError, AttributeError):
                pass  # only an optimisation

    def h5_attrs(self, name: str = "") -> dict[str, Any] | None:
        """The HDF5 attributes of group or dataset `name` ("" for the root), or None if there
        is no such entry."""
        h5 = self.h5()
        if name and name not in h5:
            return None
        return dict((h5[name] if name else h5).attrs.items())

    def h5_groups(self) -> list[str]:
        """Every group of the tree, parents before their children."""
        import h5py

        found: list[str] = []
        self.h5().visititems(
            lambda name, obj: found.append(name) if isinstance(obj, h5py.Group) else None)
        return found

    def group_name(self, group: str) -> str | None:
        """The layer name Keras >= 3.6 stores on `<group>/vars`, if any."""
        import h5py

        name = f"{group}/vars".encode()
        try:  # HDF5's own lookup: h5py's `get` cost 0.1 ms a group, most of a file's checks
            vars_group = h5py.h5o.open(self.h5().id, name)
        except Exception:  # no such group (KeyError), or a damaged tree
            return None
        return _string_attr(vars_group, "name")

    def close(self) -> None:
        """Closes the h5py file and the memory map (not `raw`: its owner closes it)."""
        if self._h5 is not None:
            try:
                self._h5.close()
            finally:
                self._h5 = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._mmap is not None:
            filemap.forget(self._mmap)
            try:
                self._mmap.close()
            except BufferError:
                pass  # arrays read from it are still in use; the map closes when they go
            self._mmap = None


class KerasFile(WeightSource):
    """A `.keras` file opened for reading, once: every read (config, members, weights, the
    memory map) goes through the one file descriptor taken when it is opened, so all of them
    see the same file even if its path is replaced meanwhile.

    Example:
        >>> with KerasFile("old.keras") as f:            # doctest: +SKIP
        ...     graph = f.graph()
        ...     kernel = graph.read(graph.layers["dense"].weights[0])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._tree: H5Weights | None = None
        self._spill: Any = None  # a compressed weights member, decompressed to disk
        self._raw: Any = None
        self._raw = self._open()
        self.identity = _identity(self._raw)
        try:
            self.config = self._read_config()
        except BaseException:
            self.close()
            raise

    # -- zip members ---------------------------------------------------------------------

    def _open(self) -> Any:
        if not os.path.exists(self.path):
            raise SurgeryFileError(
                f"No such file: '{self.path}'. Expected a .keras file written by "
                "keras.Model.save()."
            )
        if os.path.isdir(self.path):
            hint = ""
            if os.path.exists(os.path.join(self.path, "saved_model.pb")):
                hint = " It holds a TensorFlow SavedModel, which is not supported."
            elif os.path.exists(os.path.join(self.path, CONFIG_MEMBER)):
                hint = " It looks like an unzipped Keras model (zipped=False): zip it or re-save."
            raise SurgeryFileError(
                f"Expected a .keras file, got a directory: '{self.path}'.{hint}"
            )
        try:
            return open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except PermissionError as exc:
            raise SurgeryFileError(f"Cannot read '{self.path}': {exc.strerror}.") from exc
        except OSError as exc:
            raise SurgeryFileError(f"Cannot read '{self.path}': {exc}.") from exc

    def _zip(self) -> zipfile.ZipFile:
        """The archive, read through the open file with a position of its own (closing it
        leaves the file open)."""
        if self._raw is None:
            raise SurgeryFileError(f"'{self.path}' is closed.")
        try:
            return zipfile.ZipFile(io.BufferedReader(_MemberReader(self._raw, 0,
                                                                   self.identity[2])))
        except ZIP_ERRORS as exc:
            raise SurgeryFileError(
                f"'{self.path}' is not a .keras file: expected a zip archive with "
                f"{CONFIG_MEMBER} and {WEIGHTS_MEMBER} ({exc}).{self._format_hint()}"
            ) from exc

    def _format_hint(self) -> str:
        try:
            head = read_at(self._raw, 8, 0)
        except OSError:
            return ""
        if head == HDF5_SIGNATURE:
            return (
                " It is an HDF5 file: a legacy .h5 model (save the model with "
                "keras.Model.save('model.keras')) or a weights-only file (model.save_weights): "
                + WEIGHTS_ONLY_ADVICE
            )
        if head.lstrip()[:1] == b"{":
            return (" It is a JSON file: if it is the index of a sharded .weights.json "
                    "checkpoint, " + WEIGHTS_ONLY_ADVICE)
        return ""

    def _member(self, archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
        try:
            return archive.getinfo(name)
        except KeyError:
            if name == WEIGHTS_MEMBER and "model.weights.npz" in archive.namelist():
                raise SurgeryFileError(
                    f"'{self.path}' stores its weights as model.weights.npz "
                    "(weights_format='npz'), which keras-surgery does not read; expected "
                    f"{WEIGHTS_MEMBER}: re-save the model with the default weights format."
                ) from None
            raise SurgeryFileError(
                f"'{self.path}' has no {name}: expected a .keras archive with {CONFIG_MEMBER} "
                f"and {WEIGHTS_MEMBER}. Members found: {sorted(archive.namelist())[:10]}"
            ) from None

    def _read_config(self) -> dict:
        with self._zip() as archive:
            info = self._member(archive, CONFIG_MEMBER)
            if info.flag_bits & 0x1:  # zipfile would raise RuntimeError asking for a password
                raise SurgeryFileError(f"'{self.path}': {CONFIG_MEMBER} is encrypted.")
            if info.file_size > MAX_CONFIG_BYTES:
                raise SurgeryFileError(
                    f"'{self.path}': {CONFIG_MEMBER} is {info.file_size} bytes, more than the "
                    f"{MAX_CONFIG_BYTES} allowed."
                )
            try:
                with archive.open(info) as member:
                    raw = member.read(MAX_CONFIG_BYTES + 1)
                config = json.loads(raw.decode("utf-8"))
            except (*ZIP_ERRORS, UnicodeDecodeError, RecursionError) as exc:
                raise SurgeryFileError(
                    f"'{self.path}': {CONFIG_MEMBER} is not valid JSON ({exc})."
                ) from exc
            self._member(archive, WEIGHTS_MEMBER)
        if not isinstance(config, dict):
            raise SurgeryFileError(f"'{self.path}': {CONFIG_MEMBER} must hold a JSON object.")
        return config

    def member(self, name: str, limit: int = MAX_CONFIG_BYTES) -> bytes | None:
        """The bytes of archive member `name` (at most `limit`), or None if there is none.

        Raises:
            SurgeryFileError: the member is encrypted, compressed otherwise than Keras does
            (stored or deflated), larger than `limit` or unreadable.
        """
        with self._zip() as archive:
            return read_member(archive, name, limit, self.path)

    def sha256(self, chunk: int = 1 << 22) -> str:
        """The SHA-256 of the whole file as opened (not of whatever its path names now).

        Raises:
            SurgeryFileError: the file is closed and its path now names another file or the
                file changed since it was opened.
        """
        if self._raw is not None:
            self.check_unchanged()
            return _sha256(self._raw, chunk)
        try:
            with open(self.path, "rb") as raw:
                if _identity(raw) != self.identity:
                    raise SurgeryFileError(
                        f"'{self.path}' changed since it was read (another file, or rewritten), "
                        "so its hash would not be that of the weights that were read."
                    )
                return _sha256(raw, chunk)
        except OSError as exc:
            raise SurgeryFileError(f"Cannot read '{self.path}' again to hash it: {exc}.") from exc

    # -- weights -------------------------------------------------------------------------

    def _weights(self) -> H5Weights:
        """The weights member's HDF5 tree (`H5Weights`), opened on first use."""
        if self._tree is not None:
            return self._tree
        if self._raw is None:
            raise SurgeryFileError(f"'{self.path}' is closed.")
        where = f"'{self.path}': {WEIGHTS_MEMBER}"
        with self._zip() as archive:
            info = self._member(archive, WEIGHTS_MEMBER)
            if info.flag_bits & 0x1:
                raise SurgeryFileError(f"{where} is encrypted.")
            if info.compress_type == zipfile.ZIP_STORED:
                start = self._stored_member(info)
                tree = H5Weights(self._raw, where, self.path, start=start, size=info.file_size,
                                 crc=info.CRC)
            else:
                self._spill = _decompressed(archive, info, where)
                tree = H5Weights(self._spill, where, self.path, size=info.file_size)
        try:
            tree.h5()
        except SurgeryFileError:
            self.close()
            raise
        self._tree = tree
        return tree

    def _stored_member(self, info: zipfile.ZipInfo) -> int:
        """Where the bytes of an uncompressed member begin in the file."""
        header = read_at(self._raw, _LOCAL_HEADER.size, info.header_offset)
        file_size = os.fstat(self._raw.fileno()).st_size
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise SurgeryFileError(f"'{self.path}': corrupt zip entry {WEIGHTS_MEMBER}.")
        fields = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        if start + info.file_size > file_size:
            raise SurgeryFileError(
                f"'{self.path}': zip entry {WEIGHTS_MEMBER} claims {info.file_size} bytes "
                "beyond the end of the file; the file is truncated or corrupt."
            )
        return start

    def check_unchanged(self) -> None:
        """Raises SurgeryFileError if the open file was written since it was opened (a path
        replaced by another file is no change: the open file is still the one read)."""
        if self._raw is not None and _identity(self._raw) != self.identity:
            raise SurgeryFileError(
                f"'{self.path}' changed while it was being read (written in place since it "
                "was opened); nothing read from it can be trusted. Read it again once nothing "
                "writes it."
            )

    @property
    def file_bytes(self) -> int | None:
        """The size of the open file (see `WeightSource.file_bytes`)."""
        return None if self._raw is None else os.fstat(self._raw.fileno()).st_size

    def paths(self) -> Mapping[str, tuple[tuple[int, ...], str]]:
        self.check_unchanged()
        return self._weights().paths()

    def read(self, path: str) -> np.ndarray:
        self.check_unchanged()
        return self._weights().read(path)

    def integrity_check(self) -> IntegrityCheck:
        """Starts checking the weights member read in place against the CRC-32 the archive
        records for it, in a background thread (zlib releases the GIL, so it overlaps the
        migration's own work). A compressed member needs none: zipfile checked it when it
        was decompressed. See `IntegrityCheck`."""
        return self._weights().integrity_check()

    def release(self) -> None:
        """Drops the pages of the memory-mapped archive from this process's resident memory.

        Arrays returned by `read` stay valid (their pages come back from the page cache when
        touched again); a caller streaming through the weights calls this after each one, so
        that the file's bytes never all count against the process's memory at once.
        """
        if self._tree is not None:
            self._tree.release()

    def h5_attrs(self, name: str = "") -> dict[str, Any] | None:
        """The HDF5 attributes of group or dataset `name` of the weights ("" for the root),
        or None if there is no such entry."""
        return self._weights().h5_attrs(name)

    def h5_groups(self) -> list[str]:
        """Every group of the weights, parents before their children."""
        return self._weights().h5_groups()

    def group_name(self, group: str) -> str | None:
        """The layer name Keras >= 3.6 stores on `<group>/vars`, if any."""
        return self._weights().group_name(group)

    def graph(self) -> ModelGraph:
        """The model graph described by this file.

        Raises:
            SurgeryFileError: the config is not a Keras model, declares values or shapes
                beyond the budgets of `keras_surgery.budgets`, or the weights stored for a
                layer are not those Keras would create from the layer's config.
        """
        self._check_budgets()
        graph = build_graph(self.config, self, description=f"'{self.path}'")
        self._check_group_names(graph)
        self._check_layouts(graph)
        return graph

    def _check_budgets(self) -> None:
        """Bounds what the config makes us allocate (`keras_surgery.budgets`), before any
        graph is built or layer made from it: a file of a few KB must not cost gigabytes."""
        model = self.config.get("config")
        spent = 0
        if isinstance(model, Mapping):  # a registered model's own arguments (keras-hub)
            spent = check_config_values({k: v for k, v in model.items() if k != "layers"},
                                        f"'{self.path}': model")
        for name, entry in _config_entries(self.config):
            spent = check_layer_entry(entry, f"'{self.path}': layer '{name}'", spent)

    def _check_layouts(self, graph: ModelGraph) -> None:
        # Keras's loader refuses a layer whose stored variables differ in number or shape from
        # those its config builds; we must too, or a damaged layer would be read as a layer of
        # another configuration (a Dense without its bias) and its rule would quietly give up.
        # Rebuilding a layer costs 5-20 ms; layers that differ only in their name (a stack of
        # identical blocks) have the same variables, so each layout is asked for once per call
        # (and `keras_layout` keeps it for later calls).
        layouts: dict[tuple, dict[str, tuple[int, ...]] | None] = {}
        for name, entry in _config_entries(self.config):
            node = graph.layers.get(name)
            if node is None or node.group is None:
                continue
            key = _layout_key(node, entry)
            if key not in layouts:
                layouts[key] = keras_layout(node, entry)
            expected = layouts[key]
            if expected is None:
                continue
            stored = {w.local: w.shape for w in node.weights}
            problems = [
                f"'{node.group}/{local}' is missing (expected shape {shape})"
                for local, shape in expected.items() if local not in stored
            ] + [
                f"'{node.group}/{local}' has shape {stored[local]}, expected {shape}"
                for local, shape in expected.items()
                if local in stored and tuple(stored[local]) != tuple(shape)
            ] + [
                f"'{node.group}/{local}' is not a variable of this layer"
                for local in stored if local not in expected
            ]
            if problems:
                raise SurgeryFileError(
                    f"'{self.path}': the weights of layer '{node.name}' ({node.class_name}) do "
                    f"not match its config: {'; '.join(problems)}. Keras's own loader would "
                    "refuse this file too."
                )

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
        if self._tree is not None:
            try:
                self._tree.close()
            finally:
                self._tree = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    @property
    def closed(self) -> bool:
        return self._raw is None

    def __enter__(self) -> KerasFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _drop_pages(data: mmap.mmap, start: int, end: int) -> None:
    """Drops the whole pages of `data[start:end]` from resident memory (they come back from
    the page cache if touched again); only an optimisation."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    if end - first >= mmap.PAGESIZE and hasattr(data, "madvise"):
        with contextlib.suppress(OSError, ValueError):
            data.madvise(mmap.MADV_DONTNEED, first, (end - first) // mmap.PAGESIZE
                         * mmap.PAGESIZE)


class IntegrityCheck:
    """A check of the bytes a migration reads, running in the background: `wait()` blocks
    until it is done and raises SurgeryFileError if the bytes are damaged; `cancel()` stops it
    (a migration that failed anyway). Call one of them before the file is closed."""

    def __init__(self, check: Any):
        self._cancelled = threading.Event()
        self._problem: list[str | None] = [None]
        self._thread = None if check is None else threading.Thread(
            target=self._run, args=(check,), name="keras-surgery-crc", daemon=True)
        if self._thread is not None:
            self._thread.start()

    def _run(self, check: Any) -> None:
        try:
            self._problem[0] = check(self._cancelled)
        except Exception as exc:  # a damaged or vanished mapping: not checked is not "fine"
            self._problem[0] = f"the integrity check of the weights could not run ({exc})."

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._problem[0] is not None:
            raise SurgeryFileError(self._problem[0])

    def cancel(self) -> None:
        self._cancelled.set()
        if self._thread is not None:
            self._thread.join()


def _decompressed(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Any:
    """A compressed member (not how Keras writes it), decompressed in blocks into an anonymous
    temporary file, so that memory stays bounded and the weights are memory-mapped as for a
    stored member; zipfile checks its CRC-32 and size on the way.

    Raises:
        SurgeryFileError: the member would expand more than MAX_EXPANSION times past the
            floor (a decompression bomb), expands past its declared size, or is damaged.
    """
    import tempfile

    floor = min(BOMB_FLOOR_BYTES, DECOMPRESS_FLOOR_BYTES)
    if info.file_size > floor and info.file_size > MAX_EXPANSION * info.compress_size:
        raise SurgeryFileError(
            f"{where} declares {info.file_size} bytes but stores only {info.compress_size}; "
            f"refusing a decompression bomb (more than {MAX_EXPANSION}x expansion above "
            f"{floor} bytes: keras_surgery.keras_file.MAX_EXPANSION and DECOMPRESS_FLOOR_BYTES "
            "raise the limit for a file you trust, or re-save it with keras.Model.save)."
        )
    spill = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the KerasFile
    try:
        written = 0
        with archive.open(info) as member:
            while block := member.read(SPILL_BLOCK_BYTES):
                written += len(block)
                if written > info.file_size:
                    raise SurgeryFileError(
                        f"{where} expands past the {info.file_size} bytes it declares."
                    )
                spill.write(block)
        spill.flush()
    except ZIP_ERRORS as exc:
        spill.close()
        raise SurgeryFileError(f"{where}: cannot decompress it ({exc}).") from exc
    except BaseException:
        spill.close()
        raise
    return spill


def read_member(archive: zipfile.ZipFile, name: str, limit: int, path: str) -> bytes | None:
    """The bytes of member `name` of an open archive (at most `limit`), or None if it has none.

    Raises:
        SurgeryFileError: the member is encrypted, compressed otherwise than Keras does
            (stored or deflated), larger than `limit` or unreadable.
    """
    try:
        info = archive.getinfo(name)
    except KeyError:
        return None
    if info.flag_bits & 0x1:
        raise SurgeryFileError(f"'{path}': {name} is encrypted.")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # zipfile decompresses bzip2 and lzma without an output bound (19 KB of bzip2 can
        # expand to gigabytes before `limit` is seen); Keras writes neither.
        raise SurgeryFileError(
            f"'{path}': {name} is compressed with method {info.compress_type}; Keras writes "
            "members stored or deflated, and only those are read.")
    if info.file_size > limit:
        raise SurgeryFileError(
            f"'{path}': {name} is {info.file_size} bytes, more than the {limit} allowed."
        )
    try:
        with archive.open(info) as stream:
            return stream.read(limit + 1)
    except ZIP_ERRORS as exc:
        raise SurgeryFileError(f"'{path}': unreadable {name} ({exc}).") from exc


def _identity(raw: Any) -> tuple[int, ...]:
    """What tells one file from another and a changed file from itself: a rewrite in place
    changes the size or the modification time (one of a same-size rewrite within the file
    system's timestamp granularity is not seen); reading (atime) and chmod (ctime) do not."""
    st = os.fstat(raw.fileno())
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _sha256(raw: Any, chunk: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while block := read_at(raw, chunk, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def endless_global_heap(data: Any, start: int, end: int) -> str | None:
    """Why HDF5 would loop forever on a global heap collection in `data[start:end]`, or None.

    HDF5 (1.14.6 at least) reads a global heap collection, where variable-length strings such
    as Keras's layer-name attributes live, by walking its objects and advancing by each one's
    size until the collection ends (`H5HG__cache_heap_deserialize`). A free-space object of
    size 0, or a size that wraps the pointer around, never advances: h5py then hangs in C on
    the first attribute read, and no timeout can interrupt it. One damaged byte is enough. So
    every collection is walked here first, the same way, with the file's size of lengths.
    Bytes of weight data that happen to spell the signature are walked too; only a walk that
    would not end is refused, which a real collection never is.

    Args:
        data: bytes or a memory map holding the HDF5 file at `data[start:end]`.
    """
    lengths = _sizeof_lengths(data, start, end)
    if lengths is None:
        return None  # no superblock: h5py refuses the file by itself
    header = 8 + lengths  # signature, version, reserved, collection size
    object_header = 8 + lengths  # index, reference count, reserved, object size
    wrap = 1 << 64
    steps = 0
    for pos in signature_positions(data, GLOBAL_HEAP_SIGNATURE, start, end):
        size = int.from_bytes(data[pos + 8:pos + 8 + lengths], "little") % wrap
        # HDF5 cannot read a collection past the end of the file, so the walk stops there.
        stop = min(end, pos + size)
        p = pos + header
        while p + object_header <= stop:  # a smaller tail is free space, as HDF5 takes it
            steps += 1
            if steps > MAX_GLOBAL_HEAP_OBJECTS:
                return f"it holds more than {MAX_GLOBAL_HEAP_OBJECTS} global heap objects"
            index = int.from_bytes(data[p:p + 2], "little")
            length = int.from_bytes(data[p + 8:p + 8 + lengths], "little") % wrap
            need = (object_header + (length + 7) % wrap // 8 * 8) % wrap if index else length
            if need == 0 or need >= wrap // 2:
                return (f"the global heap collection at byte {pos - start} holds an object of "
                        f"size {length} at byte {p - start}")
            p += need
    return None


SCAN_CHUNK_BYTES = 8 << 20


def signature_positions(data: Any, signature: bytes, start: int, end: int) -> Iterator[int]:
    """Every position in `data[start:end]` where `signature` begins, in order (overlapping
    ones included), as `data.find` would give them one by one, but compared by numpy a chunk
    at a time: about twice as fast over a weights file, and a chunk's memory at most (the
    pages of a memory-mapped file are dropped after each chunk: a 2.8 GB file stayed resident
    whole, 64 MB now)."""
    k = len(signature)
    sig = np.frombuffer(signature, np.uint8)
    end = min(end, len(data))  # as `find` does, should the file have shrunk meanwhile
    buffer = None
    for chunk_start in range(start, max(start, end - k + 1), SCAN_CHUNK_BYTES):
        # The chunk holds every signature beginning in it, even one running past its end.
        chunk_end = min(end, chunk_start + SCAN_CHUNK_BYTES + k - 1)
        chunk = np.frombuffer(data, np.uint8, chunk_end - chunk_start, chunk_start)
        if isinstance(data, mmap.mmap):
            # Read with preadv into one reused buffer where the map is registered: the map's
            # pages are then never touched (faulting them in cost 4x as much during a run)
            if buffer is None:
                buffer = np.empty(SCAN_CHUNK_BYTES + k - 1, np.uint8)
            if filemap.read_into(buffer[:len(chunk)], chunk):
                chunk = buffer[:len(chunk)]
        found = _starts(chunk, sig)
        del chunk  # a memory map cannot close while a view of it is alive
        yield from (chunk_start + found).tolist()
        if isinstance(data, mmap.mmap):  # a scan of a whole file never holds it resident
            _drop_pages(data, chunk_start, chunk_end)


def _starts(chunk: np.ndarray, sig: np.ndarray) -> np.ndarray:
    """Every position of uint8 array `chunk` where `sig` begins, ascending.

    A signature of 4 bytes or more is looked for by its first 4 as one uint32, at each of the
    4 byte offsets: the candidates are then almost only the matches (a first byte alone
    matches 1 byte in 256 of weight data). The scan of a 2.8 GB file went 0.79-1.07 ->
    0.60-0.66 s in one process.
    """
    k, last = len(sig), len(chunk) - len(sig)
    if last < 0:
        return np.empty(0, np.int64)
    if k < 4:
        found = np.flatnonzero(chunk[:last + 1] == sig[0])
        rest = range(1, k)
    else:
        head = int(sig[:4].view(np.uint32)[0])
        parts = []
        for start in range(4):
            words = (len(chunk) - start) // 4
            hit = chunk[start:start + 4 * words].view(np.uint32) == head
            if hit.any():
                parts.append(np.flatnonzero(hit) * 4 + start)
        found = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
        found = found[found <= last]
        rest = range(4, k)
    for i in rest:
        found = found[chunk[found + i] == sig[i]]
    return found


def _sizeof_lengths(data: Any, start: int, end: int) -> int | None:
    """The size of lengths of the HDF5 superblock, found where HDF5 looks for it."""
    base = 0
    while start + base + 16 <= end:
        if data[start + base:start + base + 8] == HDF5_SIGNATURE:
            version = data[start + base + 8]
            lengths = data[start + base + (14 if version < 2 else 10)]
            return lengths if lengths in (2, 4, 8, 16) else None
        base = 512 if base == 0 else base * 2
    return None


def _string_attr(oid: Any, name: str) -> str | None:
    """A scalar string attribute (how H5IOStore writes them) of the object with low-level h5py
    id `oid` (a high-level object's `.id`), or None.

    An attribute of any other type is not read: one damaged byte can turn a string's datatype
    into a variable-length sequence of garbage, and HDF5 crashes the process converting it.
    """
    import h5py

    try:
        if not h5py.h5a.exists(oid, name.encode()):
            return None
        attr = h5py.h5a.open(oid, name.encode())
        kind = attr.get_type()
        if (
            kind.get_class() != h5py.h5t.STRING
            or attr.get_space().get_simple_extent_type() != h5py.h5s.SCALAR
        ):
            return None
        # Read as h5py's `attrs[name]` reads it, without its high-level lookups (half the cost
        # of reading each layer's name and each weight's dtype tag).
        if kind.is_variable_str():
            # Bytes, decoded as h5py decodes them (undecodable bytes surrogate-escaped).
            out = np.empty((), dtype=h5py.vlen_dtype(bytes))
            attr.read(out)
            value = bytes(out[()]).decode("utf-8", errors="surrogateescape")
        else:
            out = np.empty((), dtype=f"S{kind.get_size()}")
            memory = h5py.h5t.py_create(out.dtype).copy()
            memory.set_cset(kind.get_cset())  # HDF5 converts no UTF-8 string to ASCII
            attr.read(out, mtype=memory)
            value = out[()]
    except Exception:
        return None
    value = value.decode(errors="replace") if isinstance(value, bytes) else value
    return value if isinstance(value, str) else None


def _refused(where: str, path: str, what: str) -> SurgeryFileError:
    return SurgeryFileError(
        f"{where} entry '{path}' is {what}; only plain datasets inside the file are accepted "
        "(Keras refuses these too)."
    )


_LINK_NAMES = {0: "HardLink", 1: "SoftLink", 64: "ExternalLink"}  # H5L_TYPE_* as h5py names them


def _dataset_paths(h5: Any, where: str) -> list[str]:
    """Every dataset path of the tree, in h5py's order (by name, parents first), after refusing
    any link that is not a hard link.

    Two visits in HDF5's own loops (links, then objects) instead of opening every group and
    asking each name three times from Python: the listing of EfficientNetB0's 796 entries took
    0.3 s, now 0.12 s. A name HDF5's object visit skips (a second hard link to an object) is
    opened and looked at, as before.
    """
    import h5py

    links: list[tuple[bytes, int]] = []
    h5.id.links.visit(lambda name, info: links.append((name, info.type)), info=True)
    kinds: dict[bytes, int] = {}
    h5py.h5o.visit(h5.id, lambda name, info: kinds.__setitem__(name, info.type), info=True)
    paths = []
    for name, link_type in links:
        path = name.decode("utf-8")
        if link_type != h5py.h5l.TYPE_HARD:
            kind = _LINK_NAMES.get(link_type, f"user-defined link (type {link_type})")
            raise _refused(where, path, f"a {kind}")
        kind = kinds.get(name)
        if kind == h5py.h5o.TYPE_DATASET or (kind is None and isinstance(h5[path],
                                                                           h5py.Dataset)):
            paths.append(path)
    return paths


class _DatasetFacts:
    """What listing a tree asks of one dataset, read with h5py's low-level calls: its high-level
    properties each look the dataset up and make its creation property list again (0.15 ms
    per dataset, most of listing a file of many small weights)."""

    def __init__(self, h5: Any, path: str):
        import h5py

        dataset = h5py.h5d.open(h5.id, path.encode("utf-8"))
        plist = dataset.get_create_plist()
        layout = plist.get_layout()
        self.dataset = dataset
        self.shape = tuple(int(d) for d in dataset.shape)
        self.numpy_dtype: np.dtype = dataset.dtype
        self.type_class = dataset.get_type().get_class()
        self.external = plist.get_external_count() > 0
        self.virtual = layout == h5py.h5d.VIRTUAL
        self.chunks = plist.get_chunk() if layout == h5py.h5d.CHUNKED else None
        self.filtered = plist.get_nfilters() > 0
        self.storage = dataset.get_storage_size()
        self.offset = dataset.get_offset()

    def dtype_name(self) -> str:
        """The dtype the weight holds: Keras's bfloat16 tag on 2-byte values, else numpy's."""
        if self.numpy_dtype.itemsize == 2 and _string_attr(self.dataset, "dtype") == BFLOAT16:
            return BFLOAT16
        return str(self.numpy_dtype)


def _config_entries(config: Mapping, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(graph layer name, config entry) of every layer, nested models flattened as the graph
    names them ("outer/inner")."""
    inner = config.get("config") if isinstance(config, Mapping) else None
    entries = inner.get("layers") if isinstance(inner, Mapping) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        cfg = entry.get("config")
        name = entry.get("name") or (cfg.get("name") if isinstance(cfg, dict) else None)
        if not isinstance(name, str):
            continue
        class_name = entry.get("class_name")
        if (
            isinstance(class_name, str)
            and class_name in NESTED_MODEL_CLASSES
            and isinstance(cfg, dict)
            and isinstance(cfg.get("layers"), list)
        ):
            yield from _config_entries(entry, prefix + name + "/")
        else:
            yield prefix + name, entry


# Keras layers whose constructor reads outside data (Lambda: Python bytecode; preprocessing
# layers: vocabulary files) are never instantiated; Normalization is plain arrays.
_NOT_INSTANTIATED = ("keras.src.layers.core.lambda_layer", "keras.src.layers.preprocessing.")
_INSTANTIATED_ANYWAY = ("keras.src.layers.preprocessing.normalization",)


_LAYOUTS: dict[tuple, dict[str, tuple[int, ...]] | None] = {}
"""Layouts rebuilt in this process, by `_layout_key`: a Keras class and its config (name aside)
always make the same variables, and a second migration of the same architecture (the next
checkpoint, `migrate_folder`) then rebuilds none (EfficientNetB0: 107 layouts, 0.25 s)."""
_MAX_LAYOUTS = 4096


def _layout_key(node: LayerNode, entry: Mapping) -> tuple:
    """What a layer's variables depend on: its class, its config without its name, its build
    config."""
    unnamed = {k: v for k, v in node.config.items() if k != "name"}
    return (node.cls, json.dumps([unnamed, entry.get("build_config")], sort_keys=True,
                                 default=repr))


def keras_layout(node: LayerNode, entry: Mapping) -> dict[str, tuple[int, ...]] | None:
    """The variables Keras itself creates for a built-in layer: local store path -> shape.

    The layer is made from its config with Keras's own class, in safe mode, and built from its
    `build_config` inside a StatelessScope, so no variable is allocated; Keras's naming and
    deferred-variable state is put back afterwards. Only classes of Keras's own `layers`
    package are made: a custom class is never imported, so no code from the file runs. Each
    distinct layout is rebuilt once per process (`_LAYOUTS`); callers must not change it.

    Args:
        node: the layer, as the file's graph describes it.
        entry: its entry in the file's config (for its `build_config`).

    Returns:
        None when the layer is not a Keras built-in layer or cannot be rebuilt here (the check
        is then skipped; the layer's rule or the opaque fallback still applies).

    Example:
        >>> keras_layout(graph.layers["dense"], entry)                   # doctest: +SKIP
        {'vars/0': (3, 4), 'vars/1': (4,)}
    """
    key = _layout_key(node, entry)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = _rebuilt_layout(node, entry)
    return _LAYOUTS[key]


def _rebuilt_layout(node: LayerNode, entry: Mapping) -> dict[str, tuple[int, ...]] | None:
    """`keras_layout`, rebuilt from the layer's config."""
    cls = node.cls
    module = getattr(cls, "__module__", "") or ""
    if (
        not isinstance(cls, type)
        or not module.startswith("keras.src.layers.")
        or (module.startswith(_NOT_INSTANTIATED) and not module.startswith(_INSTANTIATED_ANYWAY))
    ):
        return None
    build_config = entry.get("build_config")
    if not isinstance(build_config, dict) or not build_config:
        return None
    try:
        with unallocated_keras_objects():
            layer = cls.from_config(copy.deepcopy(node.config))
            layer.build_from_config(build_config)
            if not layer.built:
                return None
            variables = live_variables(layer)
    except Exception:  # a configuration this Keras cannot rebuild: leave it to the rules
        logger.debug("cannot rebuild layer %s to check its weights", node.name, exc_info=True)
        return None
    return {path: tuple(int(d) for d in v.shape) for path, v in variables.items()}
