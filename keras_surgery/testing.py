"""A contract checker for labelling rules: test a custom rule the way the built-in ones are.

`check_rule` puts the layer between an input and a Dense head, gives the old model non-trivial
weights, inserts a new input feature near the front (and optionally changes the layer's own
arguments, e.g. more units), migrates, and checks numerically that the old function is kept;
then it checks the new model's labels against gradients (`verify_mapping`), which catches a rule
that puts an index in the wrong place even where the preservation check cannot see it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_surgery.graph import finalize_layers
from keras_surgery.migrate import migrate_weights
from keras_surgery.report import SurgeryReport
from keras_surgery.verify import VerificationResult, verify_mapping


@dataclass
class RuleCheck:
    """The outcome of `check_rule`."""

    preserves_function: bool
    max_diff: float
    report: SurgeryReport
    verification: VerificationResult | None = None


def _model(
    make_layer: Callable[..., Any], shape: tuple[int, ...], kwargs: dict, seed: int, dtype: str
):
    import keras

    keras.utils.set_random_seed(seed)
    x = keras.Input(shape, dtype=dtype, name="x")
    h = make_layer(**kwargs)(x)
    if len(h.shape) > 2:
        h = keras.layers.Flatten(name="flatten")(h)
    return keras.Model(x, keras.layers.Dense(3, name="head")(h))


def _randomize(model: Any, rng: np.random.Generator) -> None:
    assigned = []
    for v in model.weights:
        if v.path.endswith(("bias", "beta")) or (len(v.shape) <= 1 and "variance" not in v.path):
            v.assign(rng.normal(0, 0.3, v.shape).astype(v.dtype))
            assigned.append(v)
    # As a migration does: else an adapted Normalization would go on computing with its
    # initial statistics in the old model, and with the assigned ones after the migration.
    finalize_layers(model, assigned)


def _draw(
    rng: np.random.Generator, shape: tuple[int, ...], values: np.ndarray | None
) -> np.ndarray:
    if values is None:
        return rng.normal(size=shape).astype("float32")
    return rng.choice(values, size=shape)


def _values_and_dtype(input_values: Sequence[Any] | None) -> tuple[np.ndarray | None, str]:
    if input_values is None:
        return None, "float32"
    values = np.asarray(list(input_values))
    if values.size == 0:
        raise ValueError("input_values must hold at least one value.")
    if values.dtype.kind in "US":
        return values.astype(object), "string"
    if values.dtype.kind not in "iu":
        raise ValueError(
            f"input_values must be integers or strings. Received: dtype {values.dtype}"
        )
    return values.astype("int32"), "int32"


def check_rule(
    make_layer: Callable[..., Any],
    input_shape: tuple[int, ...],
    *,
    old_kwargs: dict | None = None,
    new_kwargs: dict | None = None,
    insert_feature: bool = True,
    atol: float = 1e-5,
    seed: int = 0,
    input_values: Sequence[Any] | None = None,
) -> RuleCheck:
    """Checks that surgery through `make_layer`'s layer keeps the old function.

    Args:
        make_layer: builds the layer, e.g. `lambda **kw: MyLayer(name="mine", **kw)`. Give the
            layer a fixed name so the old and new instances match. It may return any callable
            on the input tensor, so a layer with several inputs is checked inside a small
            graph: `lambda **kw: lambda x: Merge(name="m")([Dense(4, name="a")(x),
            Dense(4, name="b")(x)])`.
        input_shape: the input shape without the batch axis; the last axis holds features.
        old_kwargs: arguments of the old layer.
        new_kwargs: arguments of the new layer (default: the old ones), e.g. more units.
        insert_feature: insert a new input feature at position 1 of the last axis.
        atol: the largest allowed |new(x) - old(x)| on the old outputs.
        seed: random seed.
        input_values: for a layer that reads ids or strings (an Embedding, a StringLookup),
            the values inputs are drawn from; the input then has dtype "int32" (integers) or
            "string". Default: float32 inputs drawn from a normal distribution.

    Returns:
        RuleCheck with the measured difference and the surgery report.

    Raises:
        AssertionError: the report promises preservation but outputs differ, the report
            does not promise it (the message lists its warnings), or the new model's labels
            disagree with its gradients (the message lists the mismatches).

    Example:
        >>> ks.register_rule(Scale, scale_rule)                          # doctest: +SKIP
        >>> check_rule(lambda **kw: Scale(name="scale"), (6,))
        RuleCheck(preserves_function=True, max_diff=0.0, ...)
    """
    import keras

    old_kwargs = dict(old_kwargs or {})
    new_kwargs = dict(old_kwargs if new_kwargs is None else new_kwargs)
    values, dtype = _values_and_dtype(input_values)
    rng = np.random.default_rng(seed)
    n = input_shape[-1]
    old = _model(make_layer, tuple(input_shape), old_kwargs, seed, dtype)
    _randomize(old, rng)
    new_shape = tuple(input_shape[:-1]) + (n + 1 if insert_feature else n,)
    new = _model(make_layer, new_shape, new_kwargs, seed + 1, dtype)
    old_names = [f"f{i}" for i in range(n)]
    new_names = list(old_names)
    if insert_feature:
        # off-centre, so that a rule that mirrors or shifts indices cannot pass by symmetry
        new_names.insert(min(1, n), "inserted")
    report = migrate_weights(
        old, new, old_features={"x": old_names}, new_features={"x": new_names}
    )
    x_old = _draw(rng, (4,) + tuple(input_shape), values)
    x_new = _draw(rng, (4,) + new_shape, values)
    for j, name in enumerate(new_names):
        if name in old_names:
            x_new[..., j] = x_old[..., old_names.index(name)]
    # convert_to_numpy, not np.asarray: a PyTorch output that requires grad refuses the latter
    diff = float(np.max(np.abs(
        keras.ops.convert_to_numpy(old(x_old)) - keras.ops.convert_to_numpy(new(x_new))
    )))
    if not report.preserves_function:
        raise AssertionError(
            "the surgery does not promise to preserve the function:\n  "
            + "\n  ".join(report.warnings)
        )
    if diff > atol:
        raise AssertionError(
            f"the report promises preservation but max |new(x) - old(x)| = {diff:.3g} > {atol}; "
            "the rule labels some index wrongly."
        )
    verification = verify_mapping(new, features={"x": new_names}, seed=seed)
    if verification.missing:
        raise AssertionError(
            "the new model's gradients depend on features its labels do not list, so the rule "
            "labels some index wrongly:\n" + verification.summary()
        )
    return RuleCheck(report.preserves_function, diff, report, verification)
