"""The fallback for a layer without a rule: opaque, never guessed at silently."""

from __future__ import annotations

import numpy as np

from keras_surgery.labels import AxisLabels, axis_length, opaque_key
from keras_surgery.rules.api import Mixing, RuleCall, RuleResult, weight


def opaque_rule(call: RuleCall, reason: str) -> RuleResult:
    """Outputs get fresh positional labels that depend on everything the layer reads; its
    weights are copied only when matched and shape-identical; its inputs must not change."""
    dep = call.union(*(a for x in call.inputs for a in x))
    outputs = []
    for t, shape in enumerate(call.output_shapes or [None]):
        if shape is None:
            outputs.append((AxisLabels.unknown(dep),))
            continue
        axes = []
        for axis, n in enumerate(shape):
            if n is None:
                axes.append(AxisLabels.unknown(dep))
            else:
                n = axis_length(n, f"{call.describe()} output {t}")
                keys = (opaque_key(call.identity, t, axis, j) for j in range(n))
                axes.append(AxisLabels(call.space.intern_many(keys), np.full(n, dep, np.int64)))
        outputs.append(tuple(axes))
    weights = []
    for w in call.weights:
        axes = []
        for axis, n in enumerate(w.shape):
            n = axis_length(n, f"{call.describe()} weight '{w.local}'")
            keys = (("weight-index", call.identity, w.local, axis, j) for j in range(n))
            axes.append(("struct", AxisLabels(call.space.intern_many(keys), np.zeros(n, np.int64))))
        weights.append(weight(w.local, *axes))
    mixing = [Mixing(x, f"no rule ({reason}): its inputs must stay as they were", ordered=True)
              for x in call.inputs]
    return RuleResult(outputs, weights, mixing, [f"{call.describe()}: {reason}"], opaque=True)
