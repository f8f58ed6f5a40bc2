"""Lineage records inside `.keras` files: a model's feature layout and surgery history.

`save_with_lineage` writes a model together with a `keras_surgery.json` member (its feature
layout and the history of surgeries that produced it). Keras's loader ignores the member; the
next surgery reads the old feature layout from it when none is given.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import zipfile
from typing import Any

from keras_surgery.atomic import atomic_zip
from keras_surgery.errors import SurgeryFileError
from keras_surgery.features import FeatureSpec
from keras_surgery.keras_file import MAX_CONFIG_BYTES, ZIP_ERRORS, read_member

LINEAGE_MEMBER = "keras_surgery.json"


def parse_lineage(raw: bytes | None, path: str) -> dict[str, Any] | None:
    """The lineage record from the bytes of the lineage member (None: the file has none).

    Raises:
        SurgeryFileError: the member is not a JSON object.
    """
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SurgeryFileError(f"'{path}': unreadable {LINEAGE_MEMBER} ({exc}).") from exc
    if not isinstance(data, dict):
        raise SurgeryFileError(f"'{path}': {LINEAGE_MEMBER} must hold a JSON object.")
    return data


def read_lineage(path: str | os.PathLike) -> dict[str, Any] | None:
    """The lineage record of a `.keras` file, or None if it has none.

    A file that is not a readable zip has no lineage here; reading it as a model reports why.

    Raises:
        SurgeryFileError: the lineage member exists but is damaged.

    Example:
        >>> ks.read_lineage("v2.keras")["features"]                      # doctest: +SKIP
        {'obs': ['hp', 'armor', 'mana']}
    """
    try:
        archive = zipfile.ZipFile(os.fspath(path))
    except ZIP_ERRORS:
        return None
    with archive:
        raw = read_member(archive, LINEAGE_MEMBER, MAX_CONFIG_BYTES, os.fspath(path))
    return parse_lineage(raw, os.fspath(path))


def _history_entry(report: Any) -> dict[str, Any]:
    plan = report.plan
    source = plan.old_source
    old_path = getattr(source, "path", None)
    entry: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "old": old_path if old_path is not None else plan.old,
        "policy": plan.policy,
        "preserves_function": report.preserves_function,
        **plan.totals(),
        "warnings": len(report.warnings),
    }
    # The hash of the file that was read; a closed one whose path is gone is not hashed.
    if old_path is not None and (not source.closed or os.path.exists(old_path)):
        entry["old_sha256"] = source.sha256()
    return entry


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
        if getattr(source, "path", None) is not None:
            history = list((source.lineage() or {}).get("history", []))
        history.append(_history_entry(report))
    lineage = {"format": 1, "features": features, "history": history}
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmpdir:
        plain = os.path.join(tmpdir, "model.keras")
        model.save(plain)
        with zipfile.ZipFile(plain) as archive:
            members = [(name, archive.read(name)) for name in archive.namelist()]
    members.append((LINEAGE_MEMBER, json.dumps(lineage, indent=2).encode()))
    atomic_zip(path, members)
