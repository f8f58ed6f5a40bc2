"""Label propagation: a walk over the graph that carries labels instead of values.

Like an interpreter: an environment from each tensor to what is known of it (`TensorFacts`),
read and write helpers, and a loop over the calls in topological order, each handled by its
layer's rule (or the opaque fallback, loudly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_surgery import rules as _rules  # noqa: F401 - registers the built-in rules
from keras_surgery.errors import SurgeryError, SurgeryFileError, UnsupportedLayerError
from keras_surgery.features import FeatureColumn, FeatureSpec, feature_columns, vocabularies
from keras_surgery.graph import InputSpec, LayerNode, LiveWeights, ModelGraph, TensorRef
from keras_surgery.labels import (
    AxisLabels,
    DepSets,
    LabelBudgetError,
    LabelSpace,
    TensorLabels,
    TokenValues,
    feature_key,
    file_label_limit,
    gc_paused,
    label_budget,
    positions,
    repeated_label,
    token_key,
    unbudgeted,
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


@dataclass(frozen=True)
class TensorFacts:
    """What the walk knows of one tensor: its labels, what its integer values select (token
    ids), and whether its values are known to be >= 0."""

    # None for an index a rule said something about but gave no labels: never readable.
    labels: TensorLabels | None
    values: TokenValues | None = None
    nonnegative: bool = False

    def updated(self, later: TensorFacts) -> TensorFacts:
        """These facts after `later` is written over them: its labels replace these, a known
        meaning or sign stays known."""
        return TensorFacts(
            self.labels if later.labels is None else later.labels,
            self.values if later.values is None else later.values,
            self.nonnegative or later.nonnegative,
        )


@dataclass
class GraphLabels:
    """The labels of every tensor and weight of one graph.

    `tensors`, `values` and `nonnegative` are the walk's environment split by kind, filled
    when it ends.
    """

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
    # The user's unit choices: layer -> per unit, the old unit it continues or -1.
    unit_maps: Mapping[str, Sequence[int]] = field(default_factory=dict)
    # For the new side of a surgery: old layer name -> (class name, roles of its weights).
    old_roles: Mapping[str, tuple[str, frozenset[str]]] = field(default_factory=dict)

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
    unit_maps: Mapping[str, Sequence[int]] | None = None,
    old_roles: Mapping[str, tuple[str, frozenset[str]]] | None = None,
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
        unit_maps: layer name -> per unit of the layer, the old unit it continues or -1 (a
            new unit); the layer's units of that many are labelled so, and every weight that
            reads them follows.

    Returns:
        GraphLabels.

    Raises:
        LabelBudgetError: (a SurgeryFileError) a graph read from a file needs more labelled
            indices than `keras_surgery.labels.MAX_FILE_LABELS`; the message names the file
            and the layer (a live model is not budgeted).
    """
    where = where or graph.description
    widths = {i.name: (i.shape[-1] if i.shape else 1) for i in graph.inputs}
    columns = feature_columns(features, widths, where=where)
    tokens = vocabularies(features, where=where)
    labels = GraphLabels(graph, LabelSpace() if space is None else space, DepSets(), columns, {},
                         unit_maps=dict(unit_maps or {}), old_roles=dict(old_roles or {}))
    env: dict[TensorRef, TensorFacts] = {}

    def read(ref: TensorRef, reader: str) -> TensorFacts:
        facts = env.get(ref)
        if facts is None or facts.labels is None:
            raise SurgeryFileError(
                f"{graph.description}: layer '{reader}' reads output {ref[2]} of layer "
                f"'{ref[0]}' (call {ref[1]}), which that layer does not produce."
            )
        return facts

    def write(ref: TensorRef, facts: TensorFacts) -> None:
        # Each tensor is written once, unless a damaged config names a layer like an input.
        known = env.get(ref)
        env[ref] = facts if known is None else known.updated(facts)

    with _budget_of(graph) as budget:
        _bind_inputs(labels, tokens, match_input, write)
        shapes = _shapes_by_call(graph)
        for position, (name, call_index) in enumerate(graph.order):
            if budget is not None:
                budget.labelling = f"layer '{name}' ({graph.layers[name].class_name})"
            facts = [read(ref, name) for ref in graph.layers[name].calls[call_index].inputs]
            outputs = _label_call(
                labels, position, name, call_index, facts, shapes.get((name, call_index), {}),
                match_layer=match_layer, strict=strict, start=(starts or {}).get(name),
            )
            for t, out in enumerate(outputs):
                write((name, call_index, t), out)
    _publish(labels, env)
    return labels


def _budget_of(graph: ModelGraph) -> contextlib.AbstractContextManager:
    """The label budget a graph is labelled under: one of its own for a graph read from a file
    (a `.keras` file, or an architecture fitted to a weights-only checkpoint, which counts as
    a file), none for a live model, whose sizes are its own (`keras_surgery.labels`)."""
    if isinstance(graph.source, LiveWeights):
        return unbudgeted()
    return label_budget(graph.description,
                        limit=file_label_limit(getattr(graph.source, "file_bytes", None)))


def _label_call(
    labels: GraphLabels, position: int, name: str, call_index: int, facts: list[TensorFacts],
    shapes: dict[int, Any], *, match_layer: LayerMatcher | None, strict: bool,
    start: str | None,
) -> list[TensorFacts]:
    """Runs the rule of one call (the first call of a layer is matched and recorded, a later
    one renames the units it creates); returns the facts of the call's outputs."""
    node = labels.graph.layers[name]
    inputs = [f.labels for f in facts]
    record = labels.records.get(name)
    if record is None:
        identity = (match_layer(node, inputs, position) if match_layer else None) or name
    else:
        identity = record.identity
    rule_call = _rule_call(labels, name, call_index, identity, inputs, facts, record, shapes)
    result = _run_rule(rule_call, strict)
    if start is not None:
        result = _started(result, rule_call, name, start)
    outputs = result.outputs
    if record is None:
        labels.records[name] = LayerRecord(node, identity, inputs, result, position,
                                           start=start)
        labels.warnings.extend(result.warnings)
    else:
        outputs = [_per_call(labels.space, inputs, out, len(record.later_calls) + 1)
                   for out in outputs]
        record.later_calls.append(result)
    _check_distinct(labels, name, node.class_name, inputs, outputs)
    return _output_facts(outputs, result)


def _check_distinct(
    labels: GraphLabels, name: str, class_name: str, inputs: list[TensorLabels],
    outputs: Sequence[TensorLabels],
) -> None:
    """Refuses a rule result with a label twice on one axis: an index map into or out of that
    axis could not tell the two indices apart (a weight read from one copy would be copied
    into both). An axis passed on from an input as it is was checked when it was made, so
    only new label arrays are sorted.

    Raises:
        SurgeryError: an output axis of the call holds a label more than once.
    """
    checked = {id(a.ids) for x in inputs if x is not None for a in x if a.ids is not None}
    for t, out in enumerate(outputs):
        for axis, labelled in enumerate(out or ()):
            if labelled.ids is None or id(labelled.ids) in checked:
                continue
            repeated = repeated_label(labelled.ids)
            if repeated is not None:
                raise SurgeryError(
                    f"{labels.graph.description}: the rule of layer '{name}' ({class_name}) "
                    f"labels output {t} axis {axis} with '{labels.space.describe(repeated)}' "
                    "more than once; labels on one axis must be unique, or index maps through "
                    "it are ambiguous. A rule that repeats indices of its inputs must make each "
                    "repeat distinct (LabelSpace.distinct)."
                )


def _bind_inputs(
    labels: GraphLabels, tokens: Mapping[str, tuple], match_input: InputMatcher | None,
    write: Callable[[TensorRef, TensorFacts], None],
) -> None:
    """Writes the facts of the model inputs: feature labels, one dependency bit per column."""
    bit = 0
    for index, spec in enumerate(labels.graph.inputs):
        identity = (match_input(spec, index) if match_input else None) or spec.name
        labels.input_identity[spec.name] = identity
        columns = labels.columns[spec.name]
        axes = _input_labels(spec, identity, columns, bit, labels.space, labels.deps)
        # Integer inputs are token ids: of the vocabulary the spec gives, else raw ids of
        # their own (an Embedding's rows by id).
        meaning = TokenValues(identity, tuple(token_key(t) for t in tokens.get(spec.name, ())))
        write((spec.name, 0, 0), TensorFacts(axes, meaning))
        bit += len(columns)


def _rule_call(
    labels: GraphLabels, name: str, call_index: int, identity: str,
    inputs: list[TensorLabels], facts: list[TensorFacts], record: LayerRecord | None,
    shapes: dict[int, Any],
) -> RuleCall:
    """What the rule of call `call_index` of layer `name` is given."""
    graph = labels.graph
    node = graph.layers[name]
    call = node.calls[call_index]
    output_shapes = _output_shapes(graph, name, shapes)
    return RuleCall(
        layer=node,
        identity=identity,
        inputs=inputs,
        input_shapes=[graph.tensor_shapes.get(ref) for ref in call.inputs],
        space=labels.space,
        deps=labels.deps,
        output_shapes=output_shapes,
        kwarg_inputs=call.kwarg_inputs,
        call_args=call.args,
        call_kwargs=call.kwargs,
        earlier=record.result if record is not None else None,
        input_values=[f.values for f in facts],
        input_nonnegative=[f.nonnegative for f in facts],
        unit_map=labels.unit_maps.get(name),
        old_roles=_old_roles(labels, node, identity),
    )


def _old_roles(labels: GraphLabels, node: Any, identity: str) -> frozenset[str] | None:
    found = labels.old_roles.get(identity)
    return found[1] if found is not None and found[0] == node.class_name else None


def _started(result: RuleResult, call: RuleCall, name: str, start: str) -> RuleResult:
    """`result` with its outputs replaced by those of the start the layer was told to take."""
    chosen = result.starts.get(start)
    if chosen is None or chosen.refused is not None:
        raise SurgeryError(
            f"layer '{name}' ({call.layer.class_name}) cannot start as '{start}'"
            + (f": {chosen.refused}" if chosen is not None else ".")
        )
    # The identity passes on what is known of its input's sign.
    kept = start == "identity" and all(call.input_nonnegative)
    outputs = chosen.labelled_outputs()
    nonnegative = [kept or (t < len(result.nonnegative) and result.nonnegative[t])
                   for t in range(len(outputs))]
    return dataclasses.replace(result, outputs=outputs, nonnegative=nonnegative)


def _output_facts(outputs: list[TensorLabels], result: RuleResult) -> list[TensorFacts]:
    """The facts of one call's outputs. A rule may state a meaning or a sign for more outputs
    than it labels; those are kept too (unreadable, as they have no labels)."""
    n = max(len(outputs), len(result.values), len(result.nonnegative))
    return [
        TensorFacts(
            outputs[t] if t < len(outputs) else None,
            result.values[t] if t < len(result.values) else None,
            t < len(result.nonnegative) and bool(result.nonnegative[t]),
        )
        for t in range(n)
    ]


def _publish(labels: GraphLabels, env: Mapping[TensorRef, TensorFacts]) -> None:
    """Splits the environment into the per-kind views the rest of the package reads."""
    labels.tensors = {ref: f.labels for ref, f in env.items() if f.labels is not None}
    labels.values = {ref: f.values for ref, f in env.items() if f.values is not None}
    labels.nonnegative = {ref for ref, f in env.items() if f.nonnegative}


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


def _shapes_by_call(graph: ModelGraph) -> dict[tuple[str, int], dict[int, Any]]:
    """The graph's known tensor shapes grouped by call, then by output index: one pass over
    them all, not one per call."""
    by_call: dict[tuple[str, int], dict[int, Any]] = {}
    for ref, shape in graph.tensor_shapes.items():
        by_call.setdefault((ref[0], ref[1]), {})[ref[2]] = shape
    return by_call


def _output_shapes(graph: ModelGraph, name: str, known: dict[int, Any]) -> list:
    """The shapes of one call's outputs by index (None where unknown), from `known`."""
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
    except (UnsupportedLayerError, LabelBudgetError):  # never hidden behind an opaque layer
        raise
    except Exception as exc:  # a rule that cannot label this configuration
        if strict:
            raise UnsupportedLayerError(
                f"The rule for layer '{node.name}' ({node.class_name}) failed: {exc}"
            ) from exc
        logger.debug("rule for %s failed", node.name, exc_info=True)
        return opaque_rule(call, f"its rule failed ({exc}); treated as opaque")
