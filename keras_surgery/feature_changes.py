"""Which input features a surgery keeps, moves, adds and removes, and what looks like a mistake.

Features are matched by name within the input that continues an old input (unnamed columns by
position). Two mistakes are common and silent otherwise: a misspelled name (the old feature's
weights are zeroed as "removed" and the new one starts at zero as "added"), and a feature spec
given for one side only (no old column matches, and the first layer ignores every input). The
first is a warning naming both features; the second an error naming the input and both specs,
unless the user says it is meant (`allow_unrelated=True`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keras_surgery.errors import FeatureSpecError
from keras_surgery.features import FeatureColumn

if TYPE_CHECKING:
    from keras_surgery.propagate import GraphLabels

MAX_LISTED = 8  # features listed by name in one message


def _features(columns: list[FeatureColumn]) -> list[str | int]:
    """The features of one input in order: a name once per named feature (however wide), the
    column index for an unnamed column."""
    found: list[str | int] = []
    for c in columns:
        key: str | int = c.name if c.name is not None else c.k
        if not found or found[-1] != key or c.name is None:
            found.append(key)
    return found


def feature_changes(old: GraphLabels, new: GraphLabels) -> dict[str, dict[str, Any]]:
    """Per new input that continues an old one: its old input and the features kept (same
    position), moved (old and new position), added and removed; new inputs are "new"."""
    changes: dict[str, dict[str, Any]] = {}
    for name, identity in new.input_identity.items():
        new_features = _features(new.columns.get(name, []))
        if identity not in old.columns:
            changes[name] = {"old_input": None, "kept": [], "moved": [],
                             "added": new_features, "removed": []}
            continue
        old_features = _features(old.columns[identity])
        old_pos = {f: i for i, f in enumerate(old_features)}
        new_pos = {f: i for i, f in enumerate(new_features)}
        changes[name] = {
            "old_input": identity,
            "kept": [f for f in new_features if old_pos.get(f) == new_pos[f]],
            "moved": [[f, old_pos[f], new_pos[f]] for f in new_features
                      if f in old_pos and old_pos[f] != new_pos[f]],
            "added": [f for f in new_features if f not in old_pos],
            "removed": [f for f in old_features if f not in new_pos],
        }
    return changes


def _listed(features: list[Any]) -> str:
    shown = ", ".join(repr(f) if isinstance(f, str) else f"column {f}"
                      for f in features[:MAX_LISTED])
    return shown + (f", ... ({len(features)} in all)" if len(features) > MAX_LISTED else "")


def likely_typos(changes: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings for added features whose name is close to a removed one's (case, a letter)."""
    warnings = []
    for name, change in changes.items():
        removed = [f for f in change["removed"] if isinstance(f, str)]
        for added in (f for f in change["added"] if isinstance(f, str)):
            close = [r for r in removed if r.lower() == added.lower()] or difflib.get_close_matches(
                added, removed, n=1, cutoff=0.8)
            if close:
                warnings.append(
                    f"input '{name}': feature '{added}' is new and '{close[0]}' is gone: a typo? "
                    f"The weights of '{close[0]}' were dropped and '{added}' starts at zero; if "
                    f"they are one feature, give it the same name in both specs."
                )
    return warnings


def check_inputs_continue(
    changes: dict[str, dict[str, Any]], old: GraphLabels, *, allow_unrelated: bool
) -> None:
    """Refuses a continued input none of whose old features is in the new model, which is
    almost always a feature spec given for one side only.

    Raises:
        FeatureSpecError: such an input, unless `allow_unrelated`.
    """
    if allow_unrelated:
        return
    for name, change in changes.items():
        identity = change["old_input"]
        if identity is None or not change["removed"] or change["kept"] or change["moved"]:
            continue
        if not change["added"]:
            continue  # every feature removed, none added: a deliberate removal
        old_named = any(c.name is not None for c in old.columns[identity])
        new_named = any(isinstance(f, str) for f in change["added"])
        if old_named and new_named:
            how = ""
        elif new_named:
            how = (" The old model has no feature names for it (no old_features and no lineage "
                   "record in its file): pass old_features, or save the old model with "
                   "ks.save_with_lineage.")
        elif old_named:
            how = " The new model has no feature names for it: pass new_features."
        else:
            how = ""
        raise FeatureSpecError(
            f"Input '{name}': none of the old model's features ({_listed(change['removed'])}) "
            f"is among the new model's ({_listed(change['added'])}), so the first layers would "
            f"ignore everything they learned from it.{how} If the input really changed "
            "completely, pass allow_unrelated=True."
        )


def describe_changes(changes: dict[str, dict[str, Any]]) -> list[str]:
    """One line per input: which features it kept, moved, added and removed."""
    lines = []
    for name, change in changes.items():
        if change.get("old_input") is None:
            lines.append(f"input '{name}' is new: {len(change['added'])} feature(s)")
            continue
        was = "" if change["old_input"] == name else f" (was '{change['old_input']}')"
        lines.append(f"features of input '{name}'{was}: " + ", ".join(change_parts(change)))
    return lines


def change_parts(change: Mapping[str, Any]) -> list[str]:
    """The counts of a change (of an input's features, or of an output's columns): kept,
    then moved, added and removed with the first few of each listed."""
    parts = [f"{len(change['kept'])} kept"]
    for key, show in (("moved", lambda m: f"{m[0]!r} {m[1]} -> {m[2]}"),
                      ("added", repr), ("removed", repr)):
        items = change[key]
        listed = ", ".join(show(i) for i in items[:5]) + (", ..." if len(items) > 5 else "")
        parts.append(f"{len(items)} {key}" + (f" ({listed})" if items else ""))
    return parts
