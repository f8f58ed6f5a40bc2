"""Verifying one surgery for `migrate_weights(..., verify=...)`: the evidence and the verdict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.features import FeatureSpec
from keras_surgery.graph import finalize_layers, live_variables
from keras_surgery.verify.mapping import Unverified, VerificationResult, verify_mapping
from keras_surgery.verify.preservation import PreservationCheck, check_preservation

if TYPE_CHECKING:  # report.py imports plan.py, which the verifier does not otherwise need
    from keras_surgery.report import SurgeryReport

VERIFY_MODES = ("raise", "warn")


@dataclass
class SurgeryVerification:
    """What `migrate_weights(..., verify=True)` checked.

    Attributes:
        mapping: the gradient verification of the new model's phi table.
        preservation: old vs new outputs (None when the old model is a file).
        failures: why the verification failed (empty when it passed).
    """

    mapping: VerificationResult | None
    preservation: PreservationCheck | None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        parts = []
        if self.mapping is not None:
            parts.append(self.mapping.summary())
        if self.preservation is not None:
            parts.append(self.preservation.summary())
        return "\n".join(parts + [f"failure: {f}" for f in self.failures])

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mapping": None if self.mapping is None else self.mapping.to_dict(),
            "preservation": None if self.preservation is None else self.preservation.to_dict(),
            "failures": list(self.failures),
        }


def verify_mode(verify: Any) -> str | None:
    """`verify=` of migrate_weights as a mode: None (off), "raise" (True) or "warn"."""
    if verify is False or verify is None:
        return None
    if verify is True:
        return "raise"
    if verify in VERIFY_MODES:
        return str(verify)
    raise SurgeryError(
        f"verify must be True, False, 'raise' or 'warn'. Received: verify={verify!r}"
    )


# -- what the failures say ------------------------------------------------------------------------


def file_warning() -> str:
    return (
        "verify: the old model is a file, and running it would mean deserialising it (which "
        "keras-surgery never does), so old and new outputs were not compared; only the new "
        "model's labels were checked against gradients. Pass the old keras.Model to compare "
        "outputs."
    )


def unprobed_mapping(model: Any, error: Exception) -> VerificationResult:
    """The result of a verification that could not run at all, and why."""
    return VerificationResult(
        f"model '{getattr(model, 'name', model)}'", [], [],
        [Unverified(f"gradient verification could not run: {error}")], 0,
    )


def nothing_checked(result: VerificationResult) -> str:
    reasons = "; ".join(u.reason for u in result.unverified[:3]) or "no feature could be probed"
    return (
        f"verify: nothing could be checked - the old model is a file (never run), and the "
        f"gradients of {result.model} could not be probed ({reasons}). Pass the old keras.Model "
        "to compare outputs, or verify='warn'."
    )


def mapping_failure(result: VerificationResult) -> str:
    missing = result.missing
    shown = "; ".join(m.describe() for m in missing[:3])
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    return (
        f"verify: the gradients of {result.model} depend on features its labels do not list, "
        f"so a rule labels some index wrongly: {shown}{more}."
    )


def preservation_failure(check: PreservationCheck) -> str:
    bad = [o for o in check.outputs if not o.ok]
    shown = ", ".join(f"'{o.name}' max |new - old| = {o.max_abs:.3g} (relative {o.max_rel:.3g})"
                      for o in bad)
    return (
        "verify: the report promised to preserve the old function, but the new model's outputs "
        f"differ: {shown}"
    )


# -- the steps of a verified surgery --------------------------------------------------------------


def verify_new_labels(new_model: Any, *, features: FeatureSpec | None,
                      strict: bool) -> VerificationResult:
    """The new model's labels checked against gradients, before any weight is written.

    A model that cannot be probed (no probe copy of a Lambda layer, a backend without a
    gradient probe) gives a result that checked nothing and says why, so the rest is checked.
    """
    try:
        return verify_mapping(new_model, features=features, strict=strict)
    except SurgeryError as exc:
        return unprobed_mapping(new_model, exc)


def require_gradient_evidence(mapping: VerificationResult) -> None:
    """Stops an old-file surgery whose gradients show a wrong label or checked nothing.

    Raises:
        SurgeryError: the gradients depend on features the labels miss, or nothing was checked.
    """
    if mapping.missing or not mapping.checked:
        problem = mapping_failure(mapping) if mapping.missing else nothing_checked(mapping)
        raise SurgeryError(problem + " The new model was not changed.")


def snapshot(model: Any) -> Callable[[], None]:
    """Saves every variable of `model` (optimizer included); the returned function restores."""
    variables = live_variables(model)
    saved = {p: np.array(v.numpy(), copy=True) for p, v in variables.items()
             if hasattr(v, "assign") and hasattr(v, "numpy")}

    def restore() -> None:
        for p, value in saved.items():
            variables[p].assign(value)
        finalize_layers(model, [variables[p] for p in saved])

    return restore


def verify_surgery(
    old_model: Any, new_model: Any, plan: Any, report: SurgeryReport,
    mapping: VerificationResult, mode: str, restore: Callable[[], None] | None,
) -> None:
    """Runs the numeric check when the old model is live; decides and acts on failures.

    Args:
        old_model: the old keras.Model, or None when the old side is a file (never run).
        new_model: the new keras.Model, after the surgery.
        plan: the SurgeryPlan that was applied.
        report: its SurgeryReport; gets `verification`, and under "warn" the failures.
        mapping: the gradient check of the new model's labels (`verify_new_labels`).
        mode: "raise" or "warn" (`verify_mode`).
        restore: puts the new model back as it was before the surgery (`snapshot`), or None.

    Raises:
        SurgeryError: under "raise", when the verification failed or could check nothing;
            `restore` has run first.
    """
    failures = []  # evidence that the surgery went wrong
    unchecked = []  # no evidence either way, though verification was asked for
    diagnostics = []
    preservation = None
    if old_model is None:
        report.warnings.append(file_warning())
        if mapping.missing:
            failures.append(mapping_failure(mapping))
        elif not mapping.checked:
            unchecked.append(nothing_checked(mapping))
    else:
        # The old and new outputs decide; a label disagreement is a diagnostic that points at
        # the layer (phi can also miss dependencies the surgery does not rely on).
        if mapping.missing:
            diagnostics.append(mapping_failure(mapping))
            report.warnings.extend(diagnostics)
        preservation = check_preservation(old_model, new_model, plan)
        if report.preserves_function and not preservation.ok:
            failures.append(preservation_failure(preservation))
        elif not preservation.outputs:
            unchecked.append("verify: no output could be compared (" +
                             "; ".join(preservation.skipped) + ").")
    report.verification = SurgeryVerification(mapping, preservation, failures + unchecked)
    if not failures and not unchecked:
        return
    if mode == "raise":
        if restore is not None:
            restore()
        raise SurgeryError("\n".join(failures + unchecked + diagnostics) + "\nThe new model was "
                           "left with its values from before the surgery.")
    report.warnings.extend(failures + unchecked)
    if failures:
        report.preserves_function = False
