"""Weights-only checkpoints read as data: a Keras 3 `.weights.h5`, or a sharded `.weights.json`.

`model.save_weights(path)`, `ModelCheckpoint(save_weights_only=True)` and `BackupAndRestore`
write one HDF5 file laid out as the `model.weights.h5` member of a `.keras` archive;
`model.save_weights(path, max_shard_size=...)` writes a JSON index (`weight_map`: variable
group -> shard file names) and shard files beside it, each an HDF5 file of the same layout
holding some of the groups (`saving_lib.ShardedH5IOStore`). Neither holds an architecture: a
`Side` takes it from a `.keras` file or a live model and checks that this file fits it.

Read with the safety of `KerasFile`: every file (index and shards) is opened once, its identity
(device, inode, size, modification time) pinned and checked again before each read and at the
end (`integrity_check`, `check_unchanged`); the index is bounded before it is read; shard names
must be plain file names beside the index; each shard's HDF5 tree is read by `H5Weights`
(global heaps walked first, links and external datasets refused, shape bombs refused,
contiguous datasets memory-mapped). A sharded checkpoint is read shard by shard: each shard is
opened, scanned and listed on its own, its pages released before the next one, and a read
touches only the shard that holds the variable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryFileError
from keras_surgery.graph import ModelGraph, WeightSource
from keras_surgery.keras_file import (
    HDF5_SIGNATURE,
    MAX_CONFIG_BYTES,
    WEIGHTS_ONLY_SUFFIXES,
    H5Weights,
    _identity,
    read_at,
)

logger = logging.getLogger("keras_surgery")

# More shards than any checkpoint Keras writes (5 GB each by default); each one holds a file
# descriptor while the checkpoint is open.
MAX_SHARDS = 4096
OPTIMIZER_GROUP = "optimizer"


def is_weights_only(path: str | os.PathLike) -> bool:
    """Whether `path` names a weights-only checkpoint (`*.weights.h5`, `*.weights.json`), by
    name only, so that the file is opened once, by its reader (a `.keras` reader that finds
    such a file under another name says what it is: `KerasFile`'s format hint)."""
    return os.fspath(path).endswith(WEIGHTS_ONLY_SUFFIXES)


@dataclass
class _Shard:
    """One HDF5 file of a checkpoint, open once."""

    name: str
    path: str
    raw: Any
    identity: tuple[int, ...]
    tree: H5Weights
    touched: bool = False


class WeightsFile(WeightSource):
    """A weights-only checkpoint opened for reading, once (see the module docstring).

    Args:
        path: a `.weights.h5` file, or the `.weights.json` index of a sharded checkpoint.

    Raises:
        SurgeryFileError: the file is missing, is not a weights-only checkpoint (a `.keras`
            archive is refused with a hint), its index is malformed or names a shard that is
            missing or outside its folder, or a shard is not a readable HDF5 file.

    Example:
        >>> with WeightsFile("ckpt.weights.h5") as w:                   # doctest: +SKIP
        ...     kernel = w.read("layers/dense/vars/0")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        # A weights-only file holds no model config (no compile config, no optimizer class).
        self.config: dict[str, Any] = {}
        self._weight_map: dict[str, list[str]] = {}
        self._index: tuple[Any, tuple[int, ...]] | None = None
        self._shards: list[_Shard] = []
        self._where: dict[str, _Shard] | None = None
        self._paths: dict[str, tuple[tuple[int, ...], str]] | None = None
        self.sharded = False
        raw = _open(self.path, "weights-only checkpoint")
        try:
            head = read_at(raw, 8, 0)
            if head == HDF5_SIGNATURE:
                self._add_shard(os.path.basename(self.path), self.path, raw)
            elif head[:2] == b"PK":
                raise SurgeryFileError(
                    f"'{self.path}' is a .keras archive, not a weights-only checkpoint: pass it "
                    "as the old model itself, without old_weights."
                )
            else:
                self.sharded = True
                self._index = (raw, _identity(raw))
                self._open_shards(self._read_index(raw))
        except BaseException:
            raw.close()
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------

    def _add_shard(self, name: str, path: str, raw: Any) -> None:
        where = f"'{path}'" if path == self.path else f"'{path}' (shard of '{self.path}')"
        self._shards.append(_Shard(name, path, raw, _identity(raw),
                                   H5Weights(raw, where, path)))

    def _read_index(self, raw: Any) -> dict[str, list[str]]:
        """The index's weight map, checked: group -> the names of the shards holding it."""
        size = os.fstat(raw.fileno()).st_size
        if size > MAX_CONFIG_BYTES:
            raise SurgeryFileError(
                f"'{self.path}': the index of a sharded checkpoint is {size} bytes, more than "
                f"the {MAX_CONFIG_BYTES} allowed."
            )
        try:
            index = json.loads(read_at(raw, size, 0).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise SurgeryFileError(
                f"'{self.path}' is neither a .weights.h5 file (HDF5) nor the JSON index of a "
                f"sharded .weights.json checkpoint ({exc})."
            ) from exc
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise SurgeryFileError(
                f"'{self.path}': expected the index of a sharded checkpoint, a JSON object with "
                "a 'weight_map' object (as model.save_weights(..., max_shard_size=...) writes)."
            )
        checked: dict[str, list[str]] = {}
        for group, names in weight_map.items():
            names = [names] if isinstance(names, str) else names
            if not isinstance(names, list) or not names or not all(
                isinstance(n, str) and _plain_name(n) for n in names
            ):
                raise SurgeryFileError(
                    f"'{self.path}': weight_map entry '{group}' must name shard files beside "
                    f"the index (plain file names). Received: {weight_map[group]!r}"
                )
            checked[str(group)] = names
        return checked

    def _open_shards(self, weight_map: dict[str, list[str]]) -> None:
        names = list(dict.fromkeys(n for names in weight_map.values() for n in names))
        if len(names) > MAX_SHARDS:
            raise SurgeryFileError(
                f"'{self.path}' names {len(names)} shards, more than the {MAX_SHARDS} allowed."
            )
        folder = os.path.dirname(self.path)
        for name in names:
            path = os.path.join(folder, name)
            self._add_shard(name, path, _open(path, f"shard of '{self.path}'"))
        self._weight_map = weight_map

    # -- reading -------------------------------------------------------------------------

    def check_unchanged(self) -> None:
        """Raises SurgeryFileError if the index or a shard was written since it was opened."""
        files = [(s.path, s.raw, s.identity) for s in self._shards]
        if self._index is not None:
            files.insert(0, (self.path, *self._index))
        for path, raw, identity in files:
            if raw.closed:
                continue
            if _identity(raw) != identity:
                raise SurgeryFileError(
                    f"'{path}' changed while it was being read (written in place since it was "
                    "opened); nothing read from it can be trusted. Read it again once nothing "
                    "writes it."
                )

    @property
    def file_bytes(self) -> int | None:
        """The size of the checkpoint, every shard (see `WeightSource.file_bytes`)."""
        return sum(os.fstat(shard.raw.fileno()).st_size for shard in self._shards)

    def paths(self) -> Mapping[str, tuple[tuple[int, ...], str]]:
        self.check_unchanged()
        if self._paths is None:
            self._paths, self._where = self._list()
        return self._paths

    def _list(self) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, _Shard]]:
        """Every dataset of every shard, one shard at a time (its pages released after it)."""
        found: dict[str, tuple[tuple[int, ...], str]] = {}
        where: dict[str, _Shard] = {}
        for shard in self._shards:
            listed = shard.tree.paths()
            shard.tree.release()
            for path, entry in listed.items():
                if path in where:
                    raise SurgeryFileError(
                        f"'{self.path}': variable '{path}' is stored twice, in '{where[path].path}'"
                        f" and in '{shard.path}'."
                    )
                if self.sharded:
                    group = "/" + path.rsplit("/", 1)[0]
                    if shard.name not in self._weight_map.get(group, ()):
                        raise SurgeryFileError(
                            f"'{shard.path}' holds variable '{path}', but the index "
                            f"'{self.path}' does not place group '{group}' in that shard."
                        )
                found[path] = entry
                where[path] = shard
        return found, where

    def read(self, path: str) -> np.ndarray:
        self.paths()  # checks every file is unchanged
        shard = self._where.get(path) if self._where is not None else None
        if shard is None:
            raise SurgeryFileError(f"'{self.path}' has no variable '{path}'.")
        shard.touched = True
        return shard.tree.read(path)

    def group_name(self, group: str) -> str | None:
        """The name Keras >= 3.6 stores on `<group>/vars` (a layer's or the optimizer's)."""
        self.paths()
        for shard in self._shards:
            if not self.sharded or shard.name in self._weight_map.get(f"/{group}/vars", ()):
                return shard.tree.group_name(group)
        return None

    def release(self) -> None:
        """Drops the pages of the shards read since the last call (see `KerasFile.release`)."""
        for shard in self._shards:
            if shard.touched:
                shard.tree.release()
                shard.touched = False

    def integrity_check(self) -> _IdentityCheck:
        """What the migration checks before its last write: no CRC is recorded for a plain
        HDF5 file, so every file's identity is checked again (`check_unchanged`)."""
        self.paths()
        return _IdentityCheck(self)

    def sha256(self, chunk: int = 1 << 22) -> str:
        """The SHA-256 of the checkpoint as opened: of the file, or of the index followed by
        every shard in index order."""
        self.check_unchanged()
        digest = hashlib.sha256()
        raws = ([self._index[0]] if self._index is not None else []) + [
            s.raw for s in self._shards]
        for raw in raws:
            if raw.closed:
                raise SurgeryFileError(f"'{self.path}' is closed; it cannot be hashed.")
            offset = 0
            while block := read_at(raw, chunk, offset):
                digest.update(block)
                offset += len(block)
        return digest.hexdigest()

    @property
    def closed(self) -> bool:
        return not self._shards or self._shards[0].raw.closed

    def close(self) -> None:
        for shard in self._shards:
            shard.tree.close()
            shard.raw.close()
        if self._index is not None:
            self._index[0].close()

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fitted_graph(graph: ModelGraph, weights: WeightsFile) -> ModelGraph:
    """`graph` (an architecture's, from a `.keras` file or a live model) reading its values from
    `weights`, after checking that the checkpoint holds exactly the architecture's variables
    with their shapes (the optimizer's aside: a checkpoint may hold them or not).

    Raises:
        SurgeryFileError: a variable is missing from the checkpoint or has another shape, or the
            checkpoint holds a variable the architecture does not have; the message names the
            layer, the variable and both files.
    """
    stored = weights.paths()
    architecture = graph.source.paths()
    owner = {spec.path: node for node in graph.layers.values() for spec in node.weights}
    for path, (shape, _) in architecture.items():
        if path.startswith(OPTIMIZER_GROUP + "/"):
            continue
        layer = f"layer '{owner[path].name}'" if path in owner else "the model"
        if path not in stored:
            raise SurgeryFileError(
                f"'{weights.path}' does not fit the architecture {graph.description}: weight "
                f"'{path}' of {layer} is missing from it (expected shape {tuple(shape)})."
            )
        if tuple(stored[path][0]) != tuple(shape):
            raise SurgeryFileError(
                f"'{weights.path}' does not fit the architecture {graph.description}: weight "
                f"'{path}' of {layer} has shape {tuple(stored[path][0])} there, the "
                f"architecture's has shape {tuple(shape)}."
            )
    extra = [p for p in stored if p not in architecture and not p.startswith(OPTIMIZER_GROUP + "/")]
    if extra:
        raise SurgeryFileError(
            f"'{weights.path}' does not fit the architecture {graph.description}: it holds "
            f"variable '{extra[0]}' ({len(extra)} in all), which no layer of the architecture "
            "has; it is a checkpoint of another model."
        )
    for node in graph.layers.values():
        node.weights = [dataclasses.replace(spec, dtype=stored[spec.path][1])
                        for spec in node.weights]
    graph.source = weights
    graph.description = f"{graph.description} with weights '{weights.path}'"
    return graph


class _IdentityCheck:
    """`IntegrityCheck`'s interface for a checkpoint without recorded checksums: `wait()`
    checks that no file changed; `cancel()` has nothing to stop."""

    def __init__(self, weights: WeightsFile):
        self._weights = weights

    def wait(self) -> None:
        self._weights.check_unchanged()

    def cancel(self) -> None:
        pass


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and os.path.basename(name) == name and (
        "/" not in name and "\\" not in name and "\x00" not in name)


def _open(path: str, what: str) -> Any:
    if not os.path.exists(path):
        raise SurgeryFileError(f"No such file: '{path}' (expected a {what}).")
    if os.path.isdir(path):
        raise SurgeryFileError(f"Expected a {what}, got a directory: '{path}'.")
    try:
        return open(path, "rb")  # noqa: SIM115 - closed in WeightsFile.close()
    except OSError as exc:
        raise SurgeryFileError(f"Cannot read '{path}' ({what}): {exc}.") from exc
