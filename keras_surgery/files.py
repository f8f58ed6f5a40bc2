"""File-to-file surgery (checkpoint pools) and lineage records inside `.keras` files.

`apply_file` migrates a checkpoint of the old architecture into a `.keras` file of the new one
without building either model: the new file takes its config and fresh initial values from a
*template* (any `.keras` file of the new architecture), its matched values from the checkpoint,
through the plan's index maps. Optimizer state comes along as on a live model (the iteration
count, each slot through its variable's index maps) when the template has optimizer variables.
Every file is written to a temporary name in the target folder and renamed into place, so a
failed migration leaves nothing behind.

Lineage: `save_model` writes a model together with a `keras_surgery.json` member (its feature
layout and the history of surgeries that produced it). Keras's loader ignores the member; the
next surgery reads the old feature layout from it when none is given.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from keras_surgery.atomic import atomic_path
from keras_surgery.errors import SurgeryError, SurgeryFileError
from keras_surgery.features import FeatureSpec
from keras_surgery.keras_file import (
    CONFIG_MEMBER,
    METADATA_MEMBER,
    WEIGHTS_MEMBER,
    ZIP_ERRORS,
    KerasFile,
)

logger = logging.getLogger("keras_surgery")

LINEAGE_MEMBER = "keras_surgery.json"


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lineage(path: str | os.PathLike) -> dict[str, Any] | None:
    """The lineage record of a `.keras` file, or None if it has none.

    A file that is not a readable zip has no lineage here; reading it as a model reports why.

    Raises:
        SurgeryFileError: the lineage member exists but is damaged.
    """
    try:
        archive = zipfile.ZipFile(os.fspath(path))
    except ZIP_ERRORS:
        return None
    with archive:
        if LINEAGE_MEMBER not in archive.namelist():
            return None
        try:
            data = json.loads(archive.read(LINEAGE_MEMBER).decode("utf-8"))
        except (*ZIP_ERRORS, RuntimeError, RecursionError) as exc:  # RuntimeError: encrypted
            raise SurgeryFileError(f"'{path}': unreadable {LINEAGE_MEMBER} ({exc}).") from exc
    if not isinstance(data, dict):
        raise SurgeryFileError(f"'{path}': {LINEAGE_MEMBER} must hold a JSON object.")
    return data


def _history_entry(report: Any) -> dict[str, Any]:
    plan = report.plan
    source = plan.old_source
    entry: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "old": os.fspath(source) if isinstance(source, (str, os.PathLike)) else plan.old,
        "policy": plan.policy,
        "preserves_function": report.preserves_function,
        **plan.totals(),
        "warnings": len(report.warnings),
    }
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        entry["old_sha256"] = file_sha256(os.fspath(source))
    return entry


def _atomic_zip(out: str, members: Iterable[tuple[str, bytes | str]]) -> None:
    """Writes a zip archive atomically; a member given as a `str` is the path of a file to
    store (streamed, uncompressed)."""
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members:
            if isinstance(data, str):
                z.write(data, name)
            else:
                z.writestr(name, data)


def save_with_lineage(
    model: Any,
    path: str | os.PathLike,
    *,
    features: FeatureSpec | None = None,
    report: Any = None,
) -> None:
    """Saves `model` like `model.save(path)`, plus its feature layout and surgery history.

    Args:
        model: the keras.Model to save.
        path: the `.keras` file to write (atomically).
        features: the model's feature spec; later surgeries read it as their old features.
        report: the SurgeryReport that produced this model; appended to the history (which is
            carried over from the old file when the surgery read one).

    Example:
        >>> report = ks.migrate_weights("v1.keras", model, new_features=spec)  # doctest: +SKIP
        >>> ks.save_with_lineage(model, "v2.keras", features=spec, report=report)
    """
    path = os.fspath(path)
    history: list[dict[str, Any]] = []
    if report is not None:
        source = report.plan.old_source
        if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
            history = list((read_lineage(source) or {}).get("history", []))
        history.append(_history_entry(report))
    lineage = {"format": 1, "features": features, "history": history}
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmpdir:
        plain = os.path.join(tmpdir, "model.keras")
        model.save(plain)
        with zipfile.ZipFile(plain) as archive:
            members = [(name, archive.read(name)) for name in archive.namelist()]
    members.append((LINEAGE_MEMBER, json.dumps(lineage, indent=2)))
    _atomic_zip(path, [(n, d.encode() if isinstance(d, str) else d) for n, d in members])


def apply_file(
    plan: Any,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    template: str | os.PathLike,
    verbose: bool = False,
) -> dict[str, Any]:
    """Migrates checkpoint `src` (old architecture) into `out` (new architecture).

    Args:
        plan: the SurgeryPlan (made once, applied to many checkpoints).
        src: a `.keras` checkpoint of the old architecture; never written.
        out: the `.keras` file to write (atomically); must not be `src`.
        template: a `.keras` file of the new architecture: its config, and the fresh values of
            every entry the plan does not copy or zero (save the new model once to make one).
            When it has optimizer variables (the new model compiled and its optimizer built
            before saving) and the plan has the old optimizer's layout, `src`'s iteration
            count and slots are carried into them; otherwise a warning says why not.
        verbose: show a progress bar.

    Returns:
        A summary dict: counts and warnings.

    Raises:
        SurgeryFileError: `src` is not a checkpoint of the plan's old architecture, a file
            cannot be read, or `out` cannot be written; nothing is left in `out`'s folder then.
    """
    import h5py

    from keras_surgery.apply import fill, nonfinite_warning

    src, out, template = os.fspath(src), os.fspath(out), os.fspath(template)
    if os.path.abspath(src) == os.path.abspath(out):
        raise SurgeryError(f"apply_file would overwrite its source: '{src}'.")
    warnings: list[str] = []
    with KerasFile(src) as old, KerasFile(template) as tmpl:
        old_paths, new_paths = old.paths(), tmpl.paths()
        for wp in plan.weights:
            if wp.path not in new_paths or tuple(new_paths[wp.path][0]) != tuple(wp.shape):
                raise SurgeryFileError(
                    f"'{template}' is not a file of the plan's new architecture: weight "
                    f"'{wp.path}' of layer '{wp.layer}' expected with shape {wp.shape}."
                )
            if wp.axes is not None and (
                wp.old_path not in old_paths
                or tuple(old_paths[wp.old_path][0]) != tuple(wp.old_shape)
            ):
                raise SurgeryFileError(
                    f"'{src}' is not a checkpoint of the plan's old architecture: weight "
                    f"'{wp.old_path}' of layer '{wp.old_layer}' expected with shape "
                    f"{wp.old_shape}."
                )
        by_path = {wp.path: wp for wp in plan.weights}
        carried, note = _optimizer_values(plan, src, template, old, tmpl)
        if note:
            warnings.append(note)
        progress = progress_bar(len(new_paths), verbose)
        folder = os.path.dirname(os.path.abspath(out))
        with _writing(out), tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmpdir:
            weights_path = os.path.join(tmpdir, WEIGHTS_MEMBER)
            with h5py.File(weights_path, "w") as h5:
                _copy_attrs(tmpl, "", h5)
                for i, path in enumerate(sorted(new_paths)):
                    fresh = tmpl.read(path)
                    wp = by_path.get(path)
                    if path in carried:  # optimizer state; the old slot is read now
                        value = carried[path](fresh)
                    elif wp is not None and wp.init is not None:  # a new layer's start
                        value = fill(wp, None, fresh, plan.policy)
                    elif wp is not None and wp.axes is not None:
                        old_value = old.read(wp.old_path)
                        note = nonfinite_warning(wp, old_value)
                        if note:
                            warnings.append(note)
                        value = fill(wp, old_value, fresh, plan.policy,
                                     release=getattr(old, "release", None))
                    else:
                        value = fresh
                    parent = path.rsplit("/", 1)[0]
                    if parent not in h5:
                        h5.require_group(parent)
                        _copy_attrs(tmpl, parent, h5)
                    # As H5IOStore writes it; the dataset's attributes (bfloat16's "dtype" tag)
                    # come from the template.
                    h5.create_dataset(
                        path, data=np.asarray(value).astype(fresh.dtype, copy=False))
                    _copy_attrs(tmpl, path, h5)
                    progress(i + 1)
                _copy_empty_groups(tmpl, h5)
            with zipfile.ZipFile(template) as archive:
                config = archive.read(CONFIG_MEMBER)
                metadata = (archive.read(METADATA_MEMBER)
                            if METADATA_MEMBER in archive.namelist() else None)
            members: list[tuple[str, bytes | str]] = [(CONFIG_MEMBER, config)]
            if metadata is not None:
                members.insert(0, (METADATA_MEMBER, metadata))
            members.append((WEIGHTS_MEMBER, weights_path))
            _atomic_zip(out, members)
    totals = plan.totals()
    logger.info("migrated %s -> %s: %s", src, out, totals)
    return {"src": src, "out": out, **totals, "warnings": warnings}


def _optimizer_values(
    plan: Any, src: str, template: str, old: KerasFile, tmpl: KerasFile
) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], str | None]:
    """The optimizer state carried from `src` into the new file: for each optimizer variable
    of the template that takes an old value (the iteration count, every slot), a function of
    the template's value giving the new one; and why nothing is carried, when it is not.

    Slots are paired as on a live model (`keras_surgery.optimizer.slot_fills`); the learning
    rate and any variable not carried keep the template's value.
    """
    from keras_surgery.optimizer import (
        OPTIMIZER_PREFIX,
        copied_iterations,
        file_layout,
        iterations_note,
        slot_fills,
        state_difference,
    )
    from keras_surgery.propagate import propagate

    layout = plan.old_optimizer
    old_paths, new_paths = old.paths(), tmpl.paths()
    kept = " The template's optimizer variables are written as they are."
    if not any(p.startswith(OPTIMIZER_PREFIX) for p in new_paths):
        if layout is None:
            return {}, None
        return {}, (
            f"optimizer state was not migrated: '{template}' has no optimizer variables (compile "
            "the new model and build its optimizer, model.optimizer.build("
            "model.trainable_variables), before saving the template)."
        )
    if layout is None:
        if any(p.startswith(OPTIMIZER_PREFIX) for p in old_paths):
            return {}, (
                f"optimizer state was not migrated: '{src}' has optimizer variables, but the "
                "plan was made from an old model without optimizer state." + kept
            )
        return {}, None
    difference = state_difference(layout, old_paths, _optimizer_class(old.config))
    if difference:
        return {}, (
            f"optimizer state was not migrated: '{src}' does not hold the optimizer state of "
            f"the model the plan was made from: {difference}." + kept
        )
    try:
        graph = tmpl.graph()
        new = file_layout(graph, tmpl.config, propagate(graph).records)
    except SurgeryError as exc:
        return {}, (f"optimizer state was not migrated: the layers of '{template}' could not "
                    f"be read ({exc})." + kept)
    if new is None:
        return {}, (f"optimizer state was not migrated: '{template}' has optimizer variables "
                    "but no optimizer in its compile config." + kept)
    fills, note = slot_fills(plan, layout, new)
    if fills is None:
        return {}, f"{note}{kept}"
    old_iterations = layout.variables[0]
    note = iterations_note(layout, tuple(old_paths[old_iterations][0]), tuple(new.shapes[0]))
    if note:
        return {}, note + kept
    values: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        new.variables[0]: lambda fresh: copied_iterations(old.read(old_iterations), fresh),
    }
    for slot in fills:
        values[new.variables[slot.position]] = (
            lambda fresh, slot=slot: slot.value(old.read, fresh))
    return values, None


def _optimizer_class(config: Any) -> str | None:
    """The optimizer class named by a file's compile config, if any."""
    compile_config = config.get("compile_config") if isinstance(config, dict) else None
    opt = compile_config.get("optimizer") if isinstance(compile_config, dict) else None
    name = opt.get("class_name") if isinstance(opt, dict) else None
    return name if isinstance(name, str) else None


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


def progress_bar(total: int, verbose: bool):
    """`update(i)` of a keras Progbar over `total` steps, or a no-op when not verbose."""
    if not verbose or total == 0:
        return lambda i: None
    import keras

    bar = keras.utils.Progbar(total, unit_name="weight")
    return bar.update


def _copy_attrs(source: KerasFile, group: str, h5: Any) -> None:
    src = source._open_h5()
    if group and group not in src:
        return
    target = h5[group] if group else h5
    for key, value in (src[group] if group else src).attrs.items():
        target.attrs[key] = value


def _copy_empty_groups(source: KerasFile, h5: Any) -> None:
    """Groups without datasets (layers without weights) keep their `vars` name attributes."""
    import h5py

    src = source._open_h5()

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and name not in h5:
            h5.require_group(name)
            for key, value in obj.attrs.items():
                h5[name].attrs[key] = value

    src.visititems(visit)


def migrate_folder(
    plan: Any,
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
    """
    import fnmatch

    src_dir, out_dir = os.fspath(src_dir), os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(n for n in os.listdir(src_dir) if fnmatch.fnmatch(n, pattern))
    results = []
    progress = progress_bar(len(names), verbose)
    for i, name in enumerate(names):
        results.append(apply_file(plan, os.path.join(src_dir, name),
                                  os.path.join(out_dir, name), template=template))
        progress(i + 1)
    return results
