"""The SurgeryReport: what a surgery copied, zeroed, left fresh or dropped, and why."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from keras_surgery.feature_changes import describe_changes
from keras_surgery.outputs import describe_output_changes
from keras_surgery.visual import plot, to_html

if TYPE_CHECKING:
    from keras_surgery.plan import SurgeryPlan

COLUMNS = ("layer", "weight", "shape", "status", "copied", "zeroed", "fresh")


def weight_rows(plan: SurgeryPlan) -> list[tuple[str, ...]]:
    """One row of `COLUMNS` per weight of the new model."""
    return [(w.layer, w.role, "x".join(map(str, w.shape)) or "()", w.status,
             str(w.copied), str(w.zeroed), str(w.fresh)) for w in plan.weights]


def format_summary(plan: SurgeryPlan, warnings: list[str] | None = None) -> str:
    """A plain-text table of every weight of the new model, totals and warnings."""
    rows = [COLUMNS, *weight_rows(plan)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"Surgery {plan.old} -> {plan.new} (policy '{plan.policy}')"]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) for j, c in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.extend(summary_footer(plan, warnings))
    return "\n".join(lines)


def match_rows(plan: SurgeryPlan) -> list[dict[str, str | None]]:
    """Every layer match of the plan as `{"new", "old", "reason"}`, in the new model's order,
    then the new layers (old None, reason "new") and the deleted old layers (new None, reason
    "deleted"). Reasons come from `plan.match_reasons` ("name", "nested prefix", "structure",
    "position"); a plan made without them says "name" for a layer of the same name."""
    reasons = getattr(plan, "match_reasons", None) or {}
    rows: list[dict[str, str | None]] = [
        {"new": new, "old": old, "reason": reasons.get(new, "name" if new == old else "matched")}
        for new, old in plan.matches.items()
    ]
    rows.extend({"new": name, "old": None, "reason": "new"} for name in plan.new_layers)
    rows.extend({"new": None, "old": name, "reason": "deleted"} for name in deleted_layers(plan))
    return rows


def deleted_layers(plan: SurgeryPlan) -> list[str]:
    """The old layers with weights that no new layer continues (known while the plan holds
    the labels it was made from)."""
    if getattr(plan, "labels", None) is None:
        return []
    continued = set(plan.matches.values())
    return [name for name, rec in plan.labels[0].records.items()
            if rec.node.weights and name not in continued]


def match_lines(plan: SurgeryPlan) -> list[str]:
    """The section "layers: old -> new (reason)": one count line for the layers matched by
    their own name, one line per other match, then the new and the deleted layers."""
    rows = match_rows(plan)
    same = sum(1 for r in rows if r["reason"] == "name" and r["new"] == r["old"])
    lines = ["layers: old -> new (reason)"]
    if same:
        lines.append(f"  {same} layer(s) matched by their own name")
    lines.extend(f"  {r['old']} -> {r['new']} ({r['reason']})" for r in rows
                 if r["old"] is not None and r["new"] is not None
                 and not (r["reason"] == "name" and r["new"] == r["old"]))
    for reason in ("new", "deleted"):
        names = [r["new"] if reason == "new" else r["old"] for r in rows if r["reason"] == reason]
        if names:
            lines.append(f"  {reason}: " + ", ".join(str(n) for n in names))
    return lines


def summary_footer(plan: SurgeryPlan, warnings: list[str] | None = None) -> list[str]:
    """Layer matches, totals, started layers, the preservation verdict and the warnings, one
    per line."""
    lines = match_lines(plan)
    totals = plan.totals()
    preset = f", {totals['preset']} preset by starts" if totals.get("preset") else ""
    lines.append(
        f"total: {totals['copied']} copied, {totals['zeroed']} zeroed, {totals['fresh']} fresh"
        f"{preset}; {len(plan.dropped)} old weight(s) dropped"
    )
    lines.extend(describe_changes(plan.features))
    lines.extend(describe_output_changes(getattr(plan, "outputs", {})))
    if plan.starts:
        lines.append("new layers started: " + ", ".join(
            f"{name} as the identity" if how == "identity" else f"{name} at zero"
            for name, how in plan.starts.items()))
    lines.extend(operator_lines(plan))
    lines.append(f"preserves_function: {plan.preserves_function}")
    for w in warnings if warnings is not None else plan.warnings:
        lines.append(f"warning: {w}")
    return lines


def print_summary(plan: SurgeryPlan, warnings: list[str] | None = None) -> None:
    """Prints the summary as a rich table (Keras already depends on rich)."""
    from rich.console import Console
    from rich.table import Table

    styles = {"copied": "green", "partial": "yellow", "new": "cyan", "start": "magenta"}
    table = Table(title=f"Surgery {plan.old} -> {plan.new} (policy '{plan.policy}')")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="right" if i >= 4 else "left")
    for row in weight_rows(plan):
        table.add_row(*row[:3], f"[{styles.get(row[3], 'white')}]{row[3]}[/]", *row[4:])
    console = Console(soft_wrap=True)
    console.print(table)
    for line in summary_footer(plan, warnings):
        console.print(line, markup=False, highlight=False)


class SurgeryReport:
    """The result of applying a surgery.

    Attributes:
        preserves_function: True when the new model computes exactly the old outputs (with
            removed input features set to 0 in the old model's input).
        warnings: each names a layer or weight and the reason.
        plan: the SurgeryPlan that was applied.
        verification: what `migrate_weights(..., verify=...)` checked (a
            `keras_surgery.verify.SurgeryVerification`), or None.
    """

    def __init__(self, plan: SurgeryPlan, *, warnings: list[str] | None = None):
        self.plan = plan
        self.warnings = list(dict.fromkeys(warnings if warnings is not None else plan.warnings))
        self.preserves_function = plan.preserves_function
        self.verification: Any = None

    @property
    def totals(self) -> dict[str, int]:
        return self.plan.totals()

    @property
    def operators(self) -> dict[str, str]:
        """Per weight path, the operator its values went through when it is not a plain copy
        (issue 20's growth operators): "values x0.8165 ((48/32) ** -0.5, axis 0 grew 32 ->
        48)" for an RMS norm's gain, "new indices of axis 1 start at 0" for a weight writing
        a residual stream that grew by zeros. See `operator_lines` for the text form."""
        return {w.path: w.operator for w in self.plan.weights if w.operator}

    def one_line(self) -> str:
        t = self.totals
        return (
            f"surgery {self.plan.old} -> {self.plan.new}: {t['copied']} copied, "
            f"{t['zeroed']} zeroed, {t['fresh']} fresh, {len(self.warnings)} warning(s), "
            f"preserves_function={self.preserves_function}"
        )

    def summary(self) -> str:
        """A human-readable table of every weight, totals and warnings."""
        return format_summary(self.plan, self.warnings)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (index maps included); `"matches"` lists every layer match as
        `{"new", "old", "reason"}` (see `match_rows`)."""
        data = self.plan.to_dict()
        data["matches"] = match_rows(self.plan)
        data["warnings"] = list(self.warnings)
        data["preserves_function"] = self.preserves_function
        if self.verification is not None:
            data["verification"] = self.verification.to_dict()
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_html(self, path: str) -> str:
        """Writes a self-contained HTML page: every weight, a map of its copied / zeroed /
        fresh regions, the warnings and the dropped weights. Returns the path."""
        return to_html(self.plan, path, self.warnings)

    def plot(self, path: str) -> str:
        """Draws the region maps of the changed weights to an image (needs matplotlib)."""
        return plot(self.plan, path)

    def __repr__(self) -> str:
        return f"SurgeryReport({self.one_line()})"


def operator_lines(plan: SurgeryPlan) -> list[str]:
    """One line per weight whose values went through an operator other than a copy, by layer:
    `layer 'backbone/transformer_layer_0': weight '_self_attention_layernorm/scale': values
    x0.8165 ((48/32) ** -0.5, axis 0 grew 32 -> 48)`."""
    return [f"layer '{w.layer}': weight '{w.role}': {w.operator}"
            for w in plan.weights if w.operator]
