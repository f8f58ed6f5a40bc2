"""File-to-file surgery for checkpoint pools: `apply_file` and `migrate_folder`.

`apply_file` migrates a checkpoint of the old architecture into a `.keras` file of the new one
without building either model: the new file takes its config and fresh initial values from a
*template* (any `.keras` file of the new architecture), its matched values from the checkpoint,
through the plan's index maps and the fill kernel. Optimizer state comes along as on a live
model (`keras_surgery.optimizer.file_optimizer_values`) when the template has optimizer
variables. Every file is written to a temporary name in the target folder and renamed into
place, so a failed migration leaves nothing behind.

Weights-only checkpoints take part both ways: `src` may be a `.weights.h5` file or a sharded
`.weights.json` index (`keras_surgery.weights_file`; the plan gives the old architecture, and
the checkpoint must hold its variables), and an `out` named `*.weights.h5` is written as a
weights-only file (what `model.save_weights` writes: `new_model.load_weights(out)` reads it)
instead of a `.keras` archive. So a pool of `ModelCheckpoint(save_weights_only=True)` files
migrates into a pool of the same kind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from keras_surgery.atomic import TEMP_SUFFIX, atomic_path, atomic_zip, is_temporary, same_file
from keras_surgery.errors import SurgeryError, SurgeryFileError
from keras_surgery.fill import cast_warning, fill, nonfinite_warning, watching_casts
from keras_surgery.keras_file import CONFIG_MEMBER, METADATA_MEMBER, WEIGHTS_MEMBER, KerasFile
from keras_surgery.optimizer import file_optimizer_values
from keras_surgery.stream import progress_bar
from keras_surgery.weights_file import WeightsFile, is_weights_only

if TYPE_CHECKING:
    from keras_surgery.plan import SurgeryPlan

logger = logging.getLogger("keras_surgery")


def apply_file(
    plan: SurgeryPlan,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    template: str | os.PathLike,
    verbose: bool = False,
) -> dict[str, Any]:
    """Migrates checkpoint `src` (old architecture) into `out` (new architecture).

    Args:
        plan: the SurgeryPlan (made once, applied to many checkpoints).
        src: a checkpoint of the old architecture, never written: a `.keras` file, or a
            weights-only `.weights.h5` file or sharded `.weights.json` index (the plan gives
            the architecture; a plan made with `old_weights=` applies to its checkpoint and
            to any other of the same architecture).
        out: the file to write (atomically); must not be `src`. A name ending in
            `.weights.h5` gets a weights-only file (the template's weights tree, as
            `model.save_weights` writes it); any other name a `.keras` archive. Sharded
            output (`.weights.json`) is not written.
        template: a `.keras` file of the new architecture: its config, and the fresh values of
            every entry the plan does not copy or zero (save the new model once to make one).
            When it has optimizer variables (the new model compiled and its optimizer built
            before saving) and the plan has the old optimizer's layout, `src`'s iteration
            count and slots are carried into them; otherwise a warning says why not.
        verbose: show a progress bar.

    Returns:
        A summary dict: counts, warnings and `preserves_function` (the plan's promise, False
        when a cast lost values).

    Raises:
        SurgeryError: `out` is `src` or the template, or names a sharded `.weights.json`.
        SurgeryFileError: `src` is not a checkpoint of the plan's old architecture, a file
            cannot be read, or `out` cannot be written; nothing is left in `out`'s folder then.

    Example:
        >>> plan = ks.ModelMigrator("run/ckpt_0.keras").plan(new_model)   # doctest: +SKIP
        >>> plan.apply_file("run/ckpt_7.keras", "grown/ckpt_7.keras", template="new.keras")
    """
    src, out, template = os.fspath(src), os.fspath(out), os.fspath(template)
    # By identity, not by spelling: through a linked folder, `..` or a hard link.
    if same_file(src, out):
        raise SurgeryError(f"apply_file would overwrite its source: '{src}' (as '{out}').")
    if same_file(template, out):
        raise SurgeryError(f"apply_file would overwrite its template: '{template}' (as '{out}').")
    if out.endswith(".weights.json"):
        raise SurgeryError(
            f"apply_file writes a .keras file or a .weights.h5 file, not a sharded checkpoint: "
            f"'{out}'. Name the output '*.weights.h5' (or '*.keras') and re-shard it with "
            "model.save_weights(..., max_shard_size=...) if needed."
        )
    warnings: list[str] = []
    with open_checkpoint(src) as old, KerasFile(template) as tmpl:
        _check_files(plan, old, tmpl)
        carried, note = file_optimizer_values(plan, old, tmpl)
        if note:
            warnings.append(note)
        folder = os.path.dirname(os.path.abspath(out))
        with _writing(out), tempfile.TemporaryDirectory(
            dir=folder, prefix=".ks-", suffix=TEMP_SUFFIX
        ) as tmpdir:
            weights_path = os.path.join(tmpdir, WEIGHTS_MEMBER)
            check = old.integrity_check()
            try:
                lost = _write_weights(plan, old, tmpl, carried, weights_path, warnings,
                                      verbose)
                check.wait()  # damaged old bytes: nothing is written
            finally:
                check.cancel()
            if out.endswith(".weights.h5"):
                with atomic_path(out) as tmp:
                    os.replace(weights_path, tmp)
            else:
                members: list[tuple[str, bytes | str]] = [
                    (name, data) for name in (METADATA_MEMBER, CONFIG_MEMBER)
                    if (data := tmpl.member(name)) is not None
                ]
                members.append((WEIGHTS_MEMBER, weights_path))
                atomic_zip(out, members)
    totals = plan.totals()
    logger.info("migrated %s -> %s: %s", src, out, totals)
    return {"src": src, "out": out, **totals, "warnings": warnings,
            "preserves_function": plan.preserves_function and not lost}


def open_checkpoint(path: str | os.PathLike) -> KerasFile | WeightsFile:
    """A checkpoint opened for reading: a weights-only file (`.weights.h5`, a sharded
    `.weights.json` index, or a file that starts like one) as a WeightsFile, else a KerasFile.

    Raises:
        SurgeryFileError: the file cannot be opened as what it looks like.
    """
    return WeightsFile(path) if is_weights_only(path) else KerasFile(path)


def _check_files(plan: SurgeryPlan, old: KerasFile | WeightsFile, tmpl: KerasFile) -> None:
    """Every weight the plan writes is in the template, and every one it reads in `old`, with
    the planned shapes; checked before anything is written."""
    old_paths, new_paths = old.paths(), tmpl.paths()
    for wp in plan.weights:
        if wp.path not in new_paths or tuple(new_paths[wp.path][0]) != tuple(wp.shape):
            raise SurgeryFileError(
                f"'{tmpl.path}' is not a file of the plan's new architecture: weight "
                f"'{wp.path}' of layer '{wp.layer}' expected with shape {wp.shape}."
            )
        if wp.axes is not None and (
            wp.old_path not in old_paths
            or tuple(old_paths[wp.old_path][0]) != tuple(wp.old_shape)
        ):
            raise SurgeryFileError(
                f"'{old.path}' is not a checkpoint of the plan's old architecture: weight "
                f"'{wp.old_path}' of layer '{wp.old_layer}' expected with shape "
                f"{wp.old_shape}."
            )


def _write_weights(
    plan: SurgeryPlan, old: KerasFile | WeightsFile, tmpl: KerasFile,
    carried: dict[str, Callable[[np.ndarray], np.ndarray]], weights_path: str,
    warnings: list[str], verbose: bool,
) -> bool:
    """Writes the new weights file: the template's tree, each value by the fill kernel (or
    the `carried` optimizer state, or the template's own), with the template's attributes.
    Returns whether a cast lost values (each named in `warnings`)."""
    lost = False
    by_path = {wp.path: wp for wp in plan.weights}
    new_paths = tmpl.paths()
    progress = progress_bar(len(new_paths), verbose)
    with h5py.File(weights_path, "w") as h5:
        _copy_attrs(tmpl, "", h5)
        for i, path in enumerate(sorted(new_paths)):
            fresh = tmpl.read(path)
            wp = by_path.get(path)
            with watching_casts() as losses:
                if path in carried:  # optimizer state; the old slot is read now
                    value = carried[path](fresh)
                elif wp is not None and wp.init is not None:  # a new layer's start
                    value = fill(wp, None, fresh, plan.policy)
                elif wp is not None and wp.axes is not None:
                    old_value = old.read(wp.old_path)
                    note = nonfinite_warning(wp, old_value)
                    if note:
                        warnings.append(note)
                    value = fill(wp, old_value, fresh, plan.policy, release=old.release)
                else:
                    value = fresh
            note = cast_warning(losses, f"optimizer variable '{path}'" if path in carried
                                else None)
            if note:
                warnings.append(note)
                lost = True
            parent = path.rsplit("/", 1)[0]
            if parent not in h5:
                h5.require_group(parent)
                _copy_attrs(tmpl, parent, h5)
            # As H5IOStore writes it; the dataset's attributes (bfloat16's "dtype" tag) come
            # from the template.
            h5.create_dataset(path, data=np.asarray(value).astype(fresh.dtype, copy=False))
            _copy_attrs(tmpl, path, h5)
            progress(i + 1)
        # Groups without datasets (layers without weights) keep their `vars` name attributes.
        for name in tmpl.h5_groups():
            if name not in h5:
                h5.require_group(name)
                _copy_attrs(tmpl, name, h5)
    return lost


def _copy_attrs(source: KerasFile, name: str, h5: Any) -> None:
    attrs = source.h5_attrs(name)
    if attrs is None:
        return
    target = h5[name] if name else h5
    for key, value in attrs.items():
        target.attrs[key] = value


@contextlib.contextmanager
def _writing(out: str) -> Iterator[None]:
    """An OSError while `out` is written (a missing folder, a full disk) as a SurgeryFileError;
    the temporary files are gone by then, so the message can say nothing was left behind."""
    try:
        yield
    except OSError as exc:
        raise SurgeryFileError(
            f"Writing '{out}' failed: {exc}. Nothing was written: the target folder holds no "
            "partial file."
        ) from exc


def migrate_folder(
    plan: SurgeryPlan,
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    template: str | os.PathLike,
    pattern: str = "*.keras",
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Migrates every checkpoint in `src_dir` into `out_dir` (same file names).

    Stops at the first checkpoint that fails (earlier outputs stay, the failed one leaves no
    file) and raises its error, naming the file.

    Args:
        plan: the SurgeryPlan, made from one checkpoint of the old architecture.
        src_dir: the folder of old checkpoints; never written.
        out_dir: where the migrated checkpoints go (created if missing).
        template: a `.keras` file of the new architecture (see `apply_file`).
        pattern: which file names of `src_dir` to migrate: `"*.weights.h5"` for a pool of
            weights-only checkpoints, which become weights-only files of the new
            architecture (see `apply_file`).
        verbose: show a progress bar over the files.

    Returns:
        One `apply_file` summary per checkpoint, in name order.

    Raises:
        SurgeryFileError: a checkpoint could not be migrated (see `apply_file`).
    """
    src_dir, out_dir = os.fspath(src_dir), os.fspath(out_dir)
    if same_file(src_dir, out_dir):
        raise SurgeryError(
            f"migrate_folder would overwrite its source checkpoints: '{out_dir}' is the folder "
            f"'{src_dir}'. Choose another output folder."
        )
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for name in sorted(os.listdir(src_dir)):
        if is_temporary(name):
            logger.warning("keras-surgery: skipped '%s' in '%s': a temporary file an "
                           "interrupted run left behind (safe to delete)", name, src_dir)
        elif fnmatch.fnmatch(name, pattern):
            names.append(name)
    results = []
    progress = progress_bar(len(names), verbose)
    for i, name in enumerate(names):
        results.append(apply_file(plan, os.path.join(src_dir, name),
                                  os.path.join(out_dir, name), template=template))
        progress(i + 1)
    return results
