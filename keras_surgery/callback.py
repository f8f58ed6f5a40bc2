"""SurgeryCallback: apply a surgery when training starts, and never again over trained weights.

Resume safety rests on evidence that outlives one Python object: a small JSON marker written
(atomically) where the run's resumable state lives (inside each `BackupAndRestore` folder,
beside each `ModelCheckpoint` target), naming the surgery by the SHA-256 of its old file(s),
the new model's weight layout and the surgery's options; plus the model's own values, compared
with the backup or checkpoint they may have come from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import h5py
import keras
import numpy as np

from keras_surgery.atomic import write_json
from keras_surgery.errors import SurgeryError, SurgeryFileError
from keras_surgery.features import FeatureSpec
from keras_surgery.migrate import migrate_weights
from keras_surgery.migrator import ModelMigrator
from keras_surgery.outputs import OutputSpec
from keras_surgery.report import SurgeryReport

logger = logging.getLogger("keras_surgery")

MARKER_NAME = "keras_surgery.json"
"""The marker's name inside a `BackupAndRestore` folder (removed with the folder)."""
SIDECAR_SUFFIX = ".keras-surgery.json"
"""Appended to a `ModelCheckpoint` filepath to name the marker beside its checkpoints."""
ON_RESUME = ("error", "skip", "apply")
_RECORD_ATTR = "_keras_surgery_record"
_MARKER_FORMAT = "keras-surgery-resume-marker"
_IDENTITY_KEYS = ("old_sha256", "old_weights_sha256", "layout_sha256", "options_sha256")


class SurgeryCallback(keras.callbacks.Callback):
    """Moves the weights of an old `.keras` file into the model being trained, once.

    At `on_train_begin` the callback decides, from evidence that does not depend on callback
    order or on one Python object, whether the model's weights are still the new model's own
    (then the surgery is applied) or came from somewhere (then it is never re-applied
    silently). "This surgery" means: the same old file(s) by SHA-256, the same weight layout of
    the new model and the same features, outputs, unit maps and policy. Decision table, first
    matching row wins:

    | evidence at the start of `fit` | this surgery | another surgery / none |
    |---|---|---|
    | a `BackupAndRestore` of this fit holds a backup | skip (its marker) | refuse |
    | this model object, unchanged since a fit with a SurgeryCallback | skip | apply |
    | its weights equal a `ModelCheckpoint` target of this fit | skip (marker beside) | refuse |
    | its optimizer has taken steps (trained, or loaded with `load_model`) | - | refuse |
    | none of these: the model's own initial weights | - | apply |

    "Refuse" raises a SurgeryError naming the backup or checkpoint, unless `on_resume` says
    otherwise: `"skip"` keeps the weights (and marks them as descending from this surgery),
    `"apply"` migrates over them. After applying (or skipping with proof), a marker is written
    into every `BackupAndRestore` folder and beside every `ModelCheckpoint` target of the fit,
    so a restarted script that resumes from them skips the surgery, in either callback order.
    Not detectable: weights loaded with `load_weights` before `fit` (Keras then skips an
    unbuilt optimizer) from a file that no `ModelCheckpoint` of this fit writes; remote
    (`gs://`) folders hold no marker.

    Args:
        old: the old `.keras` file (read as data, never deserialised or written); with
            `old_weights`, the file that gives the old architecture.
        old_features: the old model's feature spec, e.g. `{"obs": ["hp", "mana"]}`.
        new_features: the new model's feature spec.
        old_outputs: the old model's output spec (class names or a vocabulary per output,
            see `migrate_weights`).
        new_outputs: the new model's output spec.
        unit_maps: chosen units of matched layers (see `migrate_weights`).
        old_weights: a weights-only checkpoint (`.weights.h5` or a sharded `.weights.json`)
            with the old values (see `migrate_weights`).
        policy: "preserve" (default), "net2net", "duplicate" or "random" (see
            `migrate_weights`).
        optimizer: carry the optimizer state (the model is compiled inside `fit`).
        strict: raise UnsupportedLayerError for a layer without a rule.
        verify: check the surgery (see `migrate_weights`).
        allow_unrelated: see `migrate_weights`.
        report_path: write the report there as JSON (atomically).
        verbose: show a progress bar over the weights and log the report summary at INFO
            level (quiet by default, so as not to clutter fit's own output).
        on_resume: what to do where the table says "refuse": "error" (default), "skip" or
            "apply".

    Attributes:
        report: the SurgeryReport of the surgery this callback applied (None until it has).
        outcome: "applied" or "skipped" after `on_train_begin`, with the reason in `reason`.

    Raises:
        SurgeryError: `on_resume` is not one of "error", "skip", "apply" (at construction);
            at `on_train_begin`, a refused resume (see the table) or a failed surgery.

    Example:
        >>> model.fit(x, y, epochs=10,                                  # doctest: +SKIP
        ...           callbacks=[ks.SurgeryCallback("old.keras",
        ...                                         old_features={"obs": ["hp", "mana"]},
        ...                                         new_features={"obs": ["hp", "xp", "mana"]}),
        ...                      keras.callbacks.BackupAndRestore("backup")])
    """

    def __init__(
        self,
        old: str | os.PathLike,
        *,
        old_features: FeatureSpec | None = None,
        new_features: FeatureSpec | None = None,
        old_outputs: OutputSpec | None = None,
        new_outputs: OutputSpec | None = None,
        unit_maps: dict[str, list[int]] | None = None,
        old_weights: str | os.PathLike | None = None,
        policy: str = "preserve",
        optimizer: bool = True,
        strict: bool = False,
        verify: bool | str = False,
        allow_unrelated: bool = False,
        report_path: str | os.PathLike | None = None,
        verbose: bool = False,
        on_resume: str = "error",
    ):
        super().__init__()
        if on_resume not in ON_RESUME:
            raise SurgeryError(
                f"SurgeryCallback: on_resume must be one of {', '.join(ON_RESUME)}. "
                f"Received: on_resume={on_resume!r}"
            )
        self.old_path = os.fspath(old)
        self.old_features = old_features
        self.new_features = new_features
        self.old_outputs = old_outputs
        self.new_outputs = new_outputs
        self.unit_maps = unit_maps
        self.old_weights = None if old_weights is None else os.fspath(old_weights)
        self.policy = policy
        self.optimizer = optimizer
        self.strict = strict
        self.verify = verify
        self.allow_unrelated = allow_unrelated
        self.report_path = None if report_path is None else os.fspath(report_path)
        self.verbose = verbose
        self.on_resume = on_resume
        self.report: SurgeryReport | None = None
        self.outcome: str | None = None
        self.reason: str | None = None
        self._descends = False

    # -- hooks ---------------------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        self._descends = False
        identity = self.identity(model)
        places = resume_places(fit_callbacks(self))
        verdict, reason = self._decide(model, identity, places)
        if verdict == "refuse":
            verdict, reason = self._resolve_refusal(reason, places)
        self.outcome, self.reason = ("applied" if verdict == "apply" else "skipped"), reason
        if verdict == "apply":
            logger.debug("surgery from %s: applying (%s)", self.old_path, reason)
            self._apply(model)
        else:
            logger.info("surgery from %s skipped: %s", self.old_path, reason)
        self._descends = True
        # The weights now descend from this surgery and training moves them: no fingerprint
        # until the fit ends (an interrupted fit leaves the record "in training").
        setattr(model, _RECORD_ATTR, {"identity": identity, "fingerprint": None})
        write_markers(places, identity, self.old_path)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._descends:
            record = getattr(self.model, _RECORD_ATTR, None)
            if record is not None:
                record["fingerprint"] = weights_fingerprint(self.model)

    # -- decision ------------------------------------------------------------------------

    def identity(self, model: Any) -> dict[str, str | None]:
        """What makes this surgery this one: hashes of the old file(s), of the new model's
        weight layout and of the options that change the result.

        Raises:
            SurgeryFileError: the old file or `old_weights` cannot be read.
        """
        layout = [(w.path, list(w.shape), str(w.dtype)) for w in model.weights]
        options = {"old_features": self.old_features, "new_features": self.new_features,
                   "old_outputs": self.old_outputs, "new_outputs": self.new_outputs,
                   "unit_maps": self.unit_maps, "policy": self.policy}
        return {
            "old_sha256": file_sha256(self.old_path),
            "old_weights_sha256": None if self.old_weights is None else file_sha256(
                self.old_weights),
            "layout_sha256": _json_sha256(layout),
            "options_sha256": _json_sha256(options),
        }

    def _decide(self, model: Any, identity: dict, places: list[ResumePlace]) -> tuple[str, str]:
        """("apply" | "skip" | "refuse", why), by the table of the class docstring."""
        for place in places:
            if place.kind == "backup" and place.state is not None:
                return _by_marker(place, identity, "BackupAndRestore will restore")
        record = getattr(model, _RECORD_ATTR, None)
        if record is not None and record["fingerprint"] in (None, weights_fingerprint(model)):
            if same_surgery(record["identity"], identity):
                return "skip", "already applied to this model (its weights descend from it)"
            return "apply", "this model descends from another surgery, applied in this process"
        for place in places:
            if place.kind == "checkpoint" and place.state and model_matches_file(
                    model, place.state):
                return _by_marker(place, identity, "the model's weights are those of")
        steps = optimizer_steps(model)
        if steps:
            return "refuse", (
                f"the model's optimizer has taken {steps} steps (trained, or loaded with "
                "load_model), and no backup or ModelCheckpoint of this fit shows that its "
                "weights descend from this surgery")
        return "apply", "the model has its own initial weights"

    def _resolve_refusal(self, reason: str, places: list[ResumePlace]) -> tuple[str, str]:
        pending = [p.path for p in places if p.kind == "backup" and p.state is not None]
        if self.on_resume == "skip":
            logger.warning("surgery from %s skipped (on_resume='skip'): %s", self.old_path,
                           reason)
            return "skip", f"on_resume='skip': {reason}"
        if self.on_resume == "apply" and not pending:
            logger.warning("surgery from %s applied over loaded weights (on_resume='apply'): "
                           "%s", self.old_path, reason)
            return "apply", f"on_resume='apply': {reason}"
        if pending:
            advice = (f"If that backup is from this surgery's run, pass on_resume='skip'; to "
                      f"start over with the surgery, delete '{pending[0]}' (a backup is "
                      "restored after any surgery, so on_resume='apply' cannot apply here).")
        else:
            advice = ("Pass on_resume='skip' to keep these weights (they descend from this "
                      "surgery) or on_resume='apply' to migrate the old weights over them.")
        raise SurgeryError(
            f"SurgeryCallback: not applying the surgery from '{self.old_path}' over weights "
            f"that may be trained: {reason}. {advice}"
        )

    # -- applying ------------------------------------------------------------------------

    def _apply(self, model: Any) -> None:
        if self.verify:
            self.report = migrate_weights(
                self.old_path, model, old_features=self.old_features,
                new_features=self.new_features, old_outputs=self.old_outputs,
                new_outputs=self.new_outputs, unit_maps=self.unit_maps,
                old_weights=self.old_weights, policy=self.policy, optimizer=self.optimizer,
                strict=self.strict, verify=self.verify, allow_unrelated=self.allow_unrelated,
            )
        else:
            with ModelMigrator(self.old_path, old_features=self.old_features,
                               old_outputs=self.old_outputs, old_weights=self.old_weights,
                               strict=self.strict) as migrator:
                plan = migrator.plan(model, new_features=self.new_features,
                                     new_outputs=self.new_outputs, policy=self.policy,
                                     allow_unrelated=self.allow_unrelated,
                                     unit_maps=self.unit_maps)
                self.report = plan.apply(model, optimizer=self.optimizer, verbose=self.verbose)
        (logger.info if self.verbose else logger.debug)("%s", self.report.summary())
        for warning in self.report.warnings:
            logger.warning("keras-surgery: %s", warning)
        if self.report_path is not None:
            write_json(self.report_path, self.report.to_dict())


# -- where the run's resumable state lives -------------------------------------------------


@dataclass(frozen=True)
class ResumePlace:
    """A place a fit keeps resumable state: a BackupAndRestore folder or a ModelCheckpoint
    target (`path`), its marker file, and the state file there now (None if none yet)."""

    kind: str
    path: str
    marker: str
    state: str | None


def fit_callbacks(callback: keras.callbacks.Callback) -> list[Any]:
    """The callbacks of the fit that is calling `callback` now (Keras gives a callback no
    reference to its CallbackList: the caller's frame holds it), or [] outside a fit."""
    frame = sys._getframe(1)
    for _ in range(32):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList) and any(
                c is callback for c in owner.callbacks):
            return list(owner.callbacks)
        frame = frame.f_back
    return []


def resume_places(callbacks: Iterable[Any]) -> list[ResumePlace]:
    """The BackupAndRestore folders and ModelCheckpoint targets among `callbacks` (local
    paths only; a remote one is logged and left out)."""
    places = []
    for cb in callbacks:
        if isinstance(cb, keras.callbacks.BackupAndRestore):
            kind, path = "backup", os.fspath(cb.backup_dir)
            marker = os.path.join(path, MARKER_NAME)
            # (Keras private: where the backup's weights are; its public default otherwise)
            weights = getattr(cb, "_weights_path", os.path.join(path, "latest.weights.h5"))
            state = weights if os.path.isfile(weights) else None
        elif isinstance(cb, keras.callbacks.ModelCheckpoint):
            kind, path = "checkpoint", os.fspath(cb.filepath)
            marker, state = path + SIDECAR_SUFFIX, _latest_checkpoint(cb)
        else:
            continue
        if "://" in path:
            logger.info("keras-surgery keeps no resume marker at remote %s; skipped", path)
            continue
        places.append(ResumePlace(kind, path, marker, state))
    return places


def _latest_checkpoint(cb: Any) -> str | None:
    path = cb.filepath
    if "{" in path:  # a pattern: Keras's own choice of its most recent match (private)
        latest = getattr(cb, "_get_most_recently_modified_file_matching_pattern", None)
        path = latest(path) if latest is not None else None
    return path if path and os.path.isfile(path) else None


def write_markers(places: Iterable[ResumePlace], identity: dict, old_path: str) -> None:
    """Marks every place as holding state that descends from the surgery `identity`.

    Raises:
        SurgeryFileError: a marker cannot be written.
    """
    data = {"format": _MARKER_FORMAT, "version": 1, "old": old_path, **identity}
    for place in places:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(place.marker)), exist_ok=True)
            write_json(place.marker, data)
        except OSError as exc:
            raise SurgeryFileError(
                f"Cannot write the resume marker '{place.marker}' of {place.path}: {exc}."
            ) from exc


def read_marker(path: str) -> dict | None:
    """The marker at `path`, or None if there is none.

    Raises:
        SurgeryFileError: the file is not a readable keras-surgery marker.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 16)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SurgeryFileError(f"Cannot read the resume marker '{path}': {exc}.") from exc
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("format") != _MARKER_FORMAT:
        raise SurgeryFileError(
            f"'{path}' is not a keras-surgery resume marker (expected JSON with "
            f"format={_MARKER_FORMAT!r}); delete it if it is not yours."
        )
    return data


def same_surgery(a: dict, b: dict) -> bool:
    """Whether two identities (or markers) name one surgery."""
    return all(a.get(k) == b.get(k) for k in _IDENTITY_KEYS)


def _by_marker(place: ResumePlace, identity: dict, what: str) -> tuple[str, str]:
    state = f"'{place.state}'" if place.kind == "checkpoint" else f"the backup in '{place.path}'"
    marker = read_marker(place.marker)
    if marker is None:
        return "refuse", f"{what} {state}, which holds no keras-surgery marker ({place.marker})"
    if not same_surgery(marker, identity):
        return "refuse", (f"{what} {state}, which descends from another surgery (from "
                          f"'{marker.get('old')}', sha256 {marker.get('old_sha256')}, marker "
                          f"{place.marker})")
    return "skip", f"{what} {state}, which descends from this surgery (marker {place.marker})"


# -- values --------------------------------------------------------------------------------


def _json_sha256(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str) -> str:
    """The SHA-256 of a file, streamed.

    Raises:
        SurgeryFileError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    except OSError as exc:
        raise SurgeryFileError(f"Cannot read '{path}' to identify the surgery: {exc}.") from exc
    return digest.hexdigest()


def _array_digest(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.digest()


def _weight_digests(model: Any) -> list[bytes]:
    return [_array_digest(keras.ops.convert_to_numpy(w.value)) for w in model.weights]


def weights_fingerprint(model: Any) -> str:
    """A hash of every weight value of `model` (not its optimizer), in order."""
    return hashlib.blake2b(b"".join(_weight_digests(model)), digest_size=16).hexdigest()


def optimizer_steps(model: Any) -> int:
    """How many steps the model's optimizer has taken (0 if it has none or is unbuilt)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "built", False):
        return 0
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


def model_matches_file(model: Any, path: str) -> bool:
    """Whether every weight of `model` is, bit for bit, a dataset of the checkpoint at `path`
    (a `.keras` or `.weights.h5` file: Keras saves each variable as one dataset); False for a
    file it cannot read (then it is not where the weights came from)."""
    wanted = set(_weight_digests(model))
    found: set[bytes] = set()

    def visit(_: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.size * obj.dtype.itemsize <= (1 << 31):
            found.add(_array_digest(obj[()]))

    try:
        if path.endswith(".keras"):
            import zipfile

            with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as member, \
                    h5py.File(member, "r") as h5:
                h5.visititems(visit)
        else:
            with h5py.File(path, "r") as h5:
                h5.visititems(visit)
    except (OSError, KeyError, ValueError) as exc:
        logger.info("keras-surgery could not compare the model with %s: %s", path, exc)
        return False
    return bool(wanted) and wanted <= found
