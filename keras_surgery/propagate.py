"""Label propagation: a walk over the graph that carries labels instead of values.

Like an interpreter: an environment from tensor to labels, and a loop over the calls in
topological order, each handled by its layer's rule (or the opaque fallback, loudly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from keras_surgery import rules as _rules  # noqa: F401 - registers the built-in rules
from keras_surgery.errors import UnsupportedLayerError
from keras_surgery.features import FeatureColumn, FeatureSpec, feature_columns
from keras_surgery.graph import InputSpec, LayerNode, ModelGraph, TensorRef
from keras_surgery.labels import (
    AxisLabels,
    DepSets,
    LabelSpace,
    TensorLabels,
    feature_key,
    positions,
)
from keras_surgery.registry import find_rule
from keras_surgery.rules.api import RuleCall, RuleResult
from keras_surgery.rules.opaque import opaque_rule

logger = logging.getLogger("keras_surgery")

LayerMatcher = Callable[[LayerNode, list[TensorLabels], int], "str | None"]
InputMatcher = Callable[[InputSpec, int], "str | None"]


@dataclass
class LayerRecord:
    """What propagation learned about one layer (from its first call)."""

    node: LayerNode
    identity: str
    inputs: list[TensorLabels]
    result: RuleResult
    position: int  # index of the layer's first call in topological order

    @property
    def opaque(self) -> bool:
        return self.result.opaque


@dataclass
class GraphLabels:
    """The labels of every tensor and weight of one graph."""

    graph: ModelGraph
    space: LabelSpace
    deps: DepSets
    columns: dict[str, list[FeatureColumn]]
    input_identity: dict[str, str]  # input name -> the name its feature labels are built from
    tensors: dict[TensorRef, TensorLabels] = field(default_factory=dict)
    records: dict[str, LayerRecord] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def bits(self) -> list[FeatureColumn]:
        """Feature column of each dependency bit."""
        return [c for cols in self.columns.values() for c in cols]

    def output_labels(self) -> list[TensorLabels | None]:
        return [self.tensors.get(ref) for ref in self.graph.outputs]


def _input_labels(
    spec: InputSpec, identity: str, columns: list[FeatureColumn], first_bit: int,
    space: LabelSpace, deps: DepSets,
) -> TensorLabels:
    axes: list[AxisLabels] = []
    for axis, n in enumerate(spec.shape[:-1]):
        axes.append(positions(space, axis, n))
    if spec.shape:
        keys = (feature_key(identity, c.name, c.k if c.name is not None else i)
                for i, c in enumerate(columns))
        ids = space.intern_many(keys)
        dep_ids = np.fromiter(
            (deps.single(first_bit + i) for i in range(len(columns))), dtype=np.int64,
            count=len(columns),
        )
        axes.append(AxisLabels(ids, dep_ids) if spec.shape[-1] is not None
                    else AxisLabels.unknown())
    return tuple(axes)


def propagate(
    graph: ModelGraph,
    *,
    features: FeatureSpec | None = None,
    space: LabelSpace | None = None,
    match_layer: LayerMatcher | None = None,
    match_input: InputMatcher | None = None,
    strict: bool = False,
    where: str | None = None,
) -> GraphLabels:
    """Labels every tensor and weight of `graph`.

    Args:
        graph: the model graph.
        features: the feature spec of the graph's inputs.
        space: the label space to intern into (share one between the two sides of a surgery).
        match_layer: for the new side of a surgery: given a layer and its input labels,
            returns the name of the old layer it continues, or None for a new layer. Unit
            labels are built from that name, so a continued layer's units keep their labels.
        match_input: likewise for model inputs.
        strict: raise UnsupportedLayerError for a layer without a rule instead of treating it
            as opaque with a warning.
        where: how to name the model in messages.

    Returns:
        GraphLabels.
    """
    space = LabelSpace() if space is None else space
    deps = DepSets()
    where = where or graph.description
    widths = {i.name: (i.shape[-1] if i.shape else 1) for i in graph.inputs}
    columns = feature_columns(features, widths, where=where)
    labels = GraphLabels(graph, space, deps, columns, {})

    bit = 0
    for index, spec in enumerate(graph.inputs):
        identity = (match_input(spec, index) if match_input else None) or spec.name
        labels.input_identity[spec.name] = identity
        labels.tensors[(spec.name, 0, 0)] = _input_labels(
            spec, identity, columns[spec.name], bit, space, deps
        )
        bit += len(columns[spec.name])

    for position, (name, call_index) in enumerate(graph.order):
        node = graph.layers[name]
        call = node.calls[call_index]
        inputs = [labels.tensors[ref] for ref in call.inputs]
        record = labels.records.get(name)
        if record is None:
            identity = (match_layer(node, inputs, position) if match_layer else None) or name
        else:
            identity = record.identity
        output_shapes = _output_shapes(graph, name, call_index)
        rule_call = RuleCall(
            layer=node,
            identity=identity,
            inputs=inputs,
            input_shapes=[graph.tensor_shapes.get(ref) for ref in call.inputs],
            space=space,
            deps=deps,
            output_shapes=output_shapes,
        )
        result = _run_rule(rule_call, strict)
        for t, out in enumerate(result.outputs):
            labels.tensors[(name, call_index, t)] = out
        if record is None:
            labels.records[name] = LayerRecord(node, identity, inputs, result, position)
            labels.warnings.extend(result.warnings)
    return labels


def _output_shapes(graph: ModelGraph, name: str, call_index: int) -> list:
    known = {ref[2]: shape for ref, shape in graph.tensor_shapes.items()
             if ref[0] == name and ref[1] == call_index}
    if not known:
        return []
    return [known.get(t) for t in range(max(known) + 1)]


def _run_rule(call: RuleCall, strict: bool) -> RuleResult:
    node = call.layer
    rule = find_rule(node.cls, node.class_name, node.registered_name)
    if rule is None:
        if strict:
            raise UnsupportedLayerError(
                f"No rule for layer '{node.name}' of class {node.class_name} "
                f"(module {node.module}). Register one with keras_surgery.register_rule, "
                "or pass strict=False to treat it as opaque."
            )
        return opaque_rule(call, f"no rule for class {node.class_name}; treated as opaque")
    try:
        return rule(call)
    except UnsupportedLayerError:
        raise
    except Exception as exc:  # a rule that cannot label this configuration
        if strict:
            raise UnsupportedLayerError(
                f"The rule for layer '{node.name}' ({node.class_name}) failed: {exc}"
            ) from exc
        logger.debug("rule for %s failed", node.name, exc_info=True)
        return opaque_rule(call, f"its rule failed ({exc}); treated as opaque")
