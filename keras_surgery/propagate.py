"""Label propagation: a walk over the graph that carries labels instead of values.

Like an interpreter: an environment from tensor to labels, and a loop over the calls in
topological order, each handled by its layer's rule (or the opaque fallback, loudly).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from keras_surgery import rules as _rules  # noqa: F401 - registers the built-in rules
from keras_surgery.errors import SurgeryError, SurgeryFileError, UnsupportedLayerError
from keras_surgery.features import FeatureColumn, FeatureSpec, feature_columns, vocabularies
from keras_surgery.graph import InputSpec, LayerNode, ModelGraph, TensorRef
from keras_surgery.labels import (
    AxisLabels,
    DepSets,
    LabelSpace,
    TensorLabels,
    TokenValues,
    feature_key,
    gc_paused,
    positions,
    token_key,
)
from keras_surgery.registry import find_rule
from keras_surgery.rules.api import RuleCall, RuleResult
from keras_surgery.rules.opaque import opaque_rule

logger = logging.getLogger("keras_surgery")

MAX_OUTPUTS = 4096  # outputs of one layer call; a larger index in a config is damage

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
    later_calls: list[RuleResult] = field(default_factory=list)  # shared layers' other calls
    start: str | None = None  # how this new layer starts ("identity", "zero"), if it was told

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
    values: dict[TensorRef, TokenValues] = field(default_factory=dict)  # token ids' meaning
    nonnegative: set[TensorRef] = field(default_factory=set)  # tensors known to be >= 0
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


@gc_paused
def propagate(
    graph: ModelGraph,
    *,
    features: FeatureSpec | None = None,
    space: LabelSpace | None = None,
    match_layer: LayerMatcher | None = None,
    match_input: InputMatcher | None = None,
    strict: bool = False,
    where: str | None = None,
    starts: Mapping[str, str] | None = None,
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
        starts: layer name -> the `Start` kind ("identity", "zero") it takes: its outputs
            then carry that start's labels (see `keras_surgery.growth`).

    Returns:
        GraphLabels.
    """
    space = LabelSpace() if space is None else space
    deps = DepSets()
    where = where or graph.description
    widths = {i.name: (i.shape[-1] if i.shape else 1) for i in graph.inputs}
    columns = feature_columns(features, widths, where=where)
    tokens = vocabularies(features, where=where)
    labels = GraphLabels(graph, space, deps, columns, {})

    bit = 0
    for index, spec in enumerate(graph.inputs):
        identity = (match_input(spec, index) if match_input else None) or spec.name
        labels.input_identity[spec.name] = identity
        labels.tensors[(spec.name, 0, 0)] = _input_labels(
            spec, identity, columns[spec.name], bit, space, deps
        )
        # Integer inputs are token ids: of the vocabulary the spec gives, else raw ids of
        # their own (an Embedding's rows by id).
        labels.values[(spec.name, 0, 0)] = TokenValues(
            identity, tuple(token_key(t) for t in tokens.get(spec.name, ()))
        )
        bit += len(columns[spec.name])

    for position, (name, call_index) in enumerate(graph.order):
        node = graph.layers[name]
        call = node.calls[call_index]
        inputs = []
        for ref in call.inputs:
            if ref not in labels.tensors:
                raise SurgeryFileError(
                    f"{graph.description}: layer '{name}' reads output {ref[2]} of layer "
                    f"'{ref[0]}' (call {ref[1]}), which that layer does not produce."
                )
            inputs.append(labels.tensors[ref])
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
            kwarg_inputs=call.kwarg_inputs,
            call_args=call.args,
            call_kwargs=call.kwargs,
            earlier=record.result if record is not None else None,
            input_values=[labels.values.get(ref) for ref in call.inputs],
            input_nonnegative=[ref in labels.nonnegative for ref in call.inputs],
        )
        result = _run_rule(rule_call, strict)
        start = (starts or {}).get(name)
        if start is not None:
            chosen = result.starts.get(start)
            if chosen is None or chosen.refused is not None:
                raise SurgeryError(
                    f"layer '{name}' ({node.class_name}) cannot start as '{start}'"
                    + (f": {chosen.refused}" if chosen is not None else ".")
                )
            # The identity passes on what is known of its input's sign.
            kept = start == "identity" and all(rule_call.input_nonnegative)
            nonnegative = [kept or (t < len(result.nonnegative) and result.nonnegative[t])
                           for t in range(len(chosen.outputs))]
            result = dataclasses.replace(result, outputs=list(chosen.outputs),
                                         nonnegative=nonnegative)
        outputs = result.outputs
        if record is not None:
            outputs = [_per_call(space, inputs, out, len(record.later_calls) + 1)
                       for out in outputs]
        for t, out in enumerate(outputs):
            labels.tensors[(name, call_index, t)] = out
        for t, meaning in enumerate(result.values):
            if meaning is not None:
                labels.values[(name, call_index, t)] = meaning
        for t, known in enumerate(result.nonnegative):
            if known:
                labels.nonnegative.add((name, call_index, t))
        if record is None:
            labels.records[name] = LayerRecord(node, identity, inputs, result, position,
                                               start=start)
            labels.warnings.extend(result.warnings)
        else:
            record.later_calls.append(result)
    return labels


def _per_call(
    space: LabelSpace, inputs: list[TensorLabels], out: TensorLabels, k: int
) -> TensorLabels:
    """Outputs of call `k` > 0 of a shared layer: the labels the layer created (its units) are
    made distinct per call, so that e.g. a concatenation of two calls' outputs has no two
    indices with the same label; labels passed through from the inputs stay as they are."""
    seen = [a.ids for x in inputs for a in x if a.ids is not None]
    passed = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
    renamed = []
    for axis in out:
        if axis.ids is None:
            renamed.append(axis)
            continue
        own = ~np.isin(axis.ids, passed)
        ids = axis.ids.copy()
        ids[own] = space.intern_many(("call", k, int(i)) for i in axis.ids[own])
        renamed.append(AxisLabels(ids, axis.deps))
    return tuple(renamed)


def _output_shapes(graph: ModelGraph, name: str, call_index: int) -> list:
    known = {ref[2]: shape for ref, shape in graph.tensor_shapes.items()
             if ref[0] == name and ref[1] == call_index}
    if not known:
        return []
    if max(known) > MAX_OUTPUTS:
        raise SurgeryFileError(
            f"{graph.description}: layer '{name}' is referenced with output index {max(known)};"
            f" at most {MAX_OUTPUTS} outputs per layer are accepted."
        )
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
