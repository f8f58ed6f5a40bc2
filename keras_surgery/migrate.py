"""`migrate_weights`: the one-call front door onto the surgery pipeline."""

from __future__ import annotations

from typing import Any

from keras_surgery.features import FeatureSpec
from keras_surgery.plan import ModelMigrator
from keras_surgery.report import SurgeryReport


def migrate_weights(
    old: Any,
    new_model: Any,
    *,
    old_features: FeatureSpec | None = None,
    new_features: FeatureSpec | None = None,
    policy: str = "preserve",
    optimizer: bool = True,
    strict: bool = False,
    verify: bool = False,
) -> SurgeryReport:
    """Moves the weights of `old` into the modified `new_model`, in place.

    Every weight index is labelled with what it means (which input feature, which unit of which
    layer); what matches is copied wherever it moved, the rest is initialised so that the new
    model computes exactly the old function: zeros where a new input feeds an old unit, the new
    model's fresh initial values for new units.

    Args:
        old: path of the old `.keras` file (read as data, never deserialised) or a keras.Model.
        new_model: the built new keras.Model; its variables are overwritten, all or nothing.
        old_features: names of the old model's input columns, e.g. `{"obs": ["hp", "mana"]}`.
        new_features: the same for the new model; features are matched by name.
        policy: "preserve" (default; exact preservation where possible) or "random" (copy full
            matches, keep fresh values everywhere else).
        optimizer: carry the optimizer state through the surgery: Adam's moments, momentum,
            ... follow their variables through the same index maps (zeros where new), and
            `iterations` is copied. Needs a compiled new model; the report says what was not
            migrated and why.
        strict: raise UnsupportedLayerError for a layer without a rule instead of treating it
            as opaque with a warning.
        verify: not implemented yet; passing True raises NotImplementedError.

    Returns:
        SurgeryReport with `preserves_function`, `warnings`, `summary()` and `to_dict()`.

    Example:
        >>> report = ks.migrate_weights(                                  # doctest: +SKIP
        ...     "old.keras", new_model,
        ...     old_features={"obs": ["hp", "mana"]},
        ...     new_features={"obs": ["hp", "armor", "mana"]})
        >>> report.preserves_function
        True
    """
    if verify:
        raise NotImplementedError(
            "verify=True needs the gradient verifier, which is not implemented yet."
        )
    plan = ModelMigrator(old, old_features=old_features, strict=strict).plan(
        new_model, new_features=new_features, policy=policy
    )
    return plan.apply(new_model, optimizer=optimizer)
