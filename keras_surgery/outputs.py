"""Output specs: the names of a model's output columns, so a head's columns follow their names.

A classifier head's columns mean classes, a language model's logits columns mean tokens; by
default they are matched by position, like any units. An output spec names them:

    {"species": ["cat", "dog", "bird"]}                      # class names, column 0 first
    {"species": {"classes": [...], "init": "mean"}}          # the same, new columns at the mean
    {"logits": {"vocabulary": tokenizer.get_vocabulary()}}   # a logits head over a vocabulary

With an old and a new spec for an output, the columns of the layer that computes it (a Dense
head, through element-wise layers after it) follow their names through reordering, growth and
removal: the spec becomes a choice of units of that layer (`unit_maps`), so the kernel's
columns, the bias and every weight that reads them move together. A head tied to the input
embedding (keras-hub's ReversibleEmbedding) already follows the tokens of the input's
vocabulary; its output spec is checked against it.

New columns keep the new model's initial values ("fresh", the default for classes) or start as
the mean of the old columns ("mean", the default for a vocabulary, as Hugging Face's
`resize_token_embeddings` does for new tokens): an average new class or token rather than a
random one. Either way the old columns' values are exact.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keras_surgery.errors import FeatureSpecError
from keras_surgery.feature_changes import change_parts
from keras_surgery.features import FeatureSpec, vocabularies

if TYPE_CHECKING:
    from keras_surgery.labels import LabelSpace
    from keras_surgery.propagate import GraphLabels

OutputSpec = Mapping[str, Sequence[Hashable] | Mapping[str, Any]]
OUTPUT_SPEC_KEYS = frozenset({"classes", "vocabulary", "init"})
INITS = ("fresh", "mean")
MAX_LISTED = 8


@dataclass(frozen=True)
class OutputNames:
    """The names of one output's columns (last axis), and how its new columns start."""

    names: tuple[Hashable, ...]
    kind: str  # "classes" or "vocabulary"
    init: str  # "fresh" or "mean"


@dataclass
class OutputPlan:
    """What the output specs ask of the new model's labelling and plan.

    Attributes:
        unit_maps: new head layer -> per new unit, the old unit it continues or -1.
        mean_layers: new head layers whose new units start as the mean of the old ones.
        changes: per new output with a spec: its old output and the names kept, moved, added
            and removed (as the feature changes of an input).
        warnings: what the report must say, each naming the output.
        breaks: a warning says an output's columns may no longer mean what they meant (a
            head as wide as a changed vocabulary, following positions).
    """

    unit_maps: dict[str, list[int]] = field(default_factory=dict)
    mean_layers: set[str] = field(default_factory=set)
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    breaks: bool = False


def parse_outputs(
    spec: OutputSpec | None, output_names: Sequence[str], where: str
) -> dict[str, OutputNames]:
    """Validates an output spec against a model's output names.

    Args:
        spec: `{output name: [class names] | {"classes"|"vocabulary": [...], "init": ...}}`.
        output_names: the model's outputs (`model.output_names`).
        where: "the old model" or "the new model", for messages.

    Returns:
        Output name -> its OutputNames.

    Raises:
        FeatureSpecError: an unknown output, a spec that is not a list of distinct names, or
            an unknown key or `init`.
    """
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise FeatureSpecError(
            f"The output spec of {where} must map output names to their column names. "
            f"Received: {type(spec).__name__}"
        )
    # An output computed inside a nested model (a CausalLM's logits come from its backbone's
    # token embedding) is "backbone/token_embedding" in the graph, "token_embedding" in Keras's
    # `model.output_names`: both are accepted.
    short: dict[str, list[str]] = {}
    for full in output_names:
        short.setdefault(full.rpartition("/")[2], []).append(full)
    parsed = {}
    for name, entry in spec.items():
        full = name if name in output_names else None
        if full is None and len(short.get(name, [])) == 1:
            full = short[name][0]
        if full is None:
            raise FeatureSpecError(
                f"The output spec of {where} names output {name!r}, which it does not have. "
                f"Its outputs: {sorted(short)} (model.output_names, the output layers' names)."
            )
        parsed[full] = _output_names(name, entry, where)
    return parsed


def _output_names(name: str, entry: Any, where: str) -> OutputNames:
    of = f"output '{name}' of {where}"
    kind, init = "classes", "fresh"
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - OUTPUT_SPEC_KEYS, key=str)
        kinds = [k for k in ("classes", "vocabulary") if k in entry]
        if unknown or len(kinds) != 1:
            raise FeatureSpecError(
                f"The spec of {of} must hold one of 'classes' or 'vocabulary' (the name of each "
                f"column) and optionally 'init' ({' or '.join(map(repr, INITS))}). Received "
                f"keys: {sorted(entry, key=str)}"
            )
        kind = kinds[0]
        init = entry.get("init", "mean" if kind == "vocabulary" else "fresh")
        if init not in INITS:
            raise FeatureSpecError(f"The 'init' of {of} must be one of {INITS}. "
                                   f"Received: {init!r}")
        if kind == "vocabulary":
            tokens = vocabularies({name: {"vocabulary": entry["vocabulary"]}}, where=where)
            return OutputNames(tokens[name], kind, init)
        entry = entry["classes"]
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
        raise FeatureSpecError(f"The spec of {of} must be a list of column names (column 0 "
                               f"first). Received: {type(entry).__name__}")
    names: list[Hashable] = []
    for n in entry:
        if isinstance(n, bool) or not isinstance(n, (str, numbers.Integral)):
            raise FeatureSpecError(f"The column names of {of} must be strings or integers. "
                                   f"Received: {n!r}")
        names.append(n if isinstance(n, str) else int(n))
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise FeatureSpecError(f"Column {twice!r} appears twice in the spec of {of}: its "
                               "column would be ambiguous.")
    return OutputNames(tuple(names), kind, init)


def plan_outputs(
    old: GraphLabels,
    new: GraphLabels,
    old_spec: OutputSpec | None,
    new_spec: OutputSpec | None,
    unit_maps: Mapping[str, Sequence[int]],
    old_features: FeatureSpec | None = None,
    new_features: FeatureSpec | None = None,
) -> OutputPlan:
    """The unit choices that make the heads' columns follow their names.

    Args:
        old: the old model's labels.
        new: the new model's labels, made without output specs.
        old_spec, new_spec: the output specs (see the module docstring).
        unit_maps: the user's own unit choices (a head may not be chosen twice).
        old_features, new_features: the feature specs, for the warning about a vocabulary
            that changed under a head that follows positions.

    Returns:
        The OutputPlan.

    Raises:
        FeatureSpecError: a bad spec, an output named on one side only, or an output whose
            columns are not the units of one layer (or the rows of a tied embedding).
    """
    old_parsed = parse_outputs(old_spec, old.graph.output_names, "the old model")
    new_parsed = parse_outputs(new_spec, new.graph.output_names, "the new model")
    result = OutputPlan()
    old_refs = {ref[0]: ref for ref in old.graph.outputs}
    for ref in new.graph.outputs:
        name = ref[0]
        rec = new.records.get(name)
        old_name = rec.identity if rec is not None else None
        old_ref = old_refs.get(old_name) if old_name is not None else None
        new_names, old_names = new_parsed.get(name), old_parsed.get(old_name or "")
        if (new_names is None) != (old_names is None):
            if old_ref is None:
                continue  # a new output: its spec has nothing to follow
            given, missing = ("new", "old") if old_names is None else ("old", "new")
            raise FeatureSpecError(
                f"Output '{name}' has column names in the {given} output spec only, so they "
                f"cannot be followed: give its {missing} names too ({missing}_outputs="
                f"{{'{name if missing == 'new' else old_name}': [...]}})."
            )
        if new_names is None or old_ref is None:
            continue
        _follow(name, old_name, old, new, old.tensors.get(old_ref), new.tensors.get(ref),
                old_names, new_names, unit_maps, result)
    scrambled = _vocabulary_warnings(old, new, old_features, new_features, set(new_parsed))
    result.warnings.extend(scrambled)
    result.breaks = bool(scrambled)
    return result


def _follow(
    name: str, old_name: str, old: GraphLabels, new: GraphLabels, old_x: Any, new_x: Any,
    old_names: OutputNames, new_names: OutputNames, unit_maps: Mapping[str, Sequence[int]],
    result: OutputPlan,
) -> None:
    """Adds the unit choice (or the tied-head check) for one named output."""
    old_axis, new_axis = _last_axis(name, old_x), _last_axis(name, new_x)
    for side, names, axis in (("old", old_names, old_axis), ("new", new_names, new_axis)):
        if len(names.names) != len(axis):
            raise FeatureSpecError(
                f"The {side} output spec names {len(names.names)} column(s) of output "
                f"'{name if side == 'new' else old_name}', which has {len(axis)}."
            )
    space = new.space
    old_pos = {n: i for i, n in enumerate(old_names.names)}
    result.changes[name] = _changes(old_name, old_names, new_names, old_pos)
    new_units = [_unit(space, int(i)) for i in new_axis]
    if all(u is not None and u[0] == "token" for u in new_units):
        _check_tied(name, new_units, new_names)
        return
    for unit in new_units:
        layer = _layer_of(unit[1], new) if unit is not None and unit[0] == "unit" else None
        if layer in unit_maps:
            raise FeatureSpecError(
                f"Output '{name}' is computed by layer '{layer}', whose units unit_maps also "
                "chooses: give its columns' names in the output specs or its units in "
                "unit_maps, not both."
            )
    head = _head(name, new_units, new)
    old_units = [_unit(space, int(i)) for i in old_axis]
    if any(u is None or u[:2] != ("unit", head[1]) for u in old_units):
        raise FeatureSpecError(
            f"Output '{name}': its old columns are not the units of the layer that continues "
            f"'{head[1]}', so they cannot follow their names."
        )
    layer = head[0]
    chosen = [-1] * len(new_units)
    for i, unit in enumerate(new_units):
        at = old_pos.get(new_names.names[i])
        chosen[unit[3]] = -1 if at is None else old_units[at][3]
    if chosen != list(range(len(chosen))) or len(old_units) != len(chosen):
        result.unit_maps[layer] = chosen
    if new_names.init == "mean" and -1 in chosen:
        result.mean_layers.add(layer)
    removed = result.changes[name]["removed"]
    if removed:
        result.warnings.append(
            f"output '{name}': {_listed(removed)} {'is' if len(removed) == 1 else 'are'} not "
            f"among the new model's columns: {'its' if len(removed) == 1 else 'their'} "
            f"column(s) of layer '{layer}' were dropped, and those old outputs are gone."
        )


def _last_axis(name: str, x: Any) -> Any:
    if not x or x[-1].ids is None:
        raise FeatureSpecError(f"Output '{name}' has no known last axis, so its columns cannot "
                               "be named.")
    return x[-1].ids


def _unit(space: LabelSpace, label_id: int) -> tuple | None:
    """The ("unit", identity, role, j) or ("token", ...) key behind a label, through the
    derived labels of per-index affine layers (a BatchNormalization after the head) and the
    per-call labels of a shared layer's later calls (a tied embedding's reverse call)."""
    key = space.key(label_id)
    while isinstance(key, tuple) and key and key[0] in ("via", "call"):
        key = space.key(key[2])
    if isinstance(key, tuple) and key and key[0] in ("unit", "token"):
        return key
    return None


def _head(name: str, units: list[tuple | None], new: GraphLabels) -> tuple[str, str]:
    """(new layer name, identity) of the one layer whose units are the output's columns."""
    idents = {u[1:3] if u is not None and u[0] == "unit" else None for u in units}
    js = sorted(u[3] for u in units if u is not None and u[0] == "unit"
                and isinstance(u[3], int))
    if None in idents or len(idents) != 1 or js != list(range(len(units))):
        raise FeatureSpecError(
            f"Output '{name}': its columns are not the units of one layer (a Dense head, "
            "possibly through element-wise layers), so they cannot follow their names."
        )
    identity = next(iter(idents))[0]
    return _layer_of(identity, new), identity


def _layer_of(identity: str, new: GraphLabels) -> str:
    """The new layer labelled as `identity` (the old layer it continues, or its own name)."""
    return next((n for n, r in new.records.items() if r.identity == identity), identity)


def _check_tied(name: str, units: list[tuple], names: OutputNames) -> None:
    """A head tied to the input embedding follows the input vocabulary's tokens already."""
    for i, unit in enumerate(units):
        if len(unit) != 2:
            raise FeatureSpecError(
                f"Output '{name}' is tied to an embedding whose rows are not named: give the "
                "vocabulary as the input's feature spec too ({input: {'vocabulary': [...]}}, "
                "old and new), since a tied head's columns are the embedding's rows."
            )
        if unit[1] != names.names[i]:
            raise FeatureSpecError(
                f"Output '{name}' is tied to the input embedding, whose vocabulary has "
                f"{unit[1]!r} at id {i}, but its output spec names column {i} "
                f"{names.names[i]!r}: the two vocabularies must agree."
            )


def _changes(old_name: str, old_names: OutputNames, new_names: OutputNames,
             old_pos: dict[Hashable, int]) -> dict[str, Any]:
    new_pos = {n: i for i, n in enumerate(new_names.names)}
    change: dict[str, Any] = {
        "old_output": old_name,
        "kind": new_names.kind,
        "kept": [n for n in new_names.names if old_pos.get(n) == new_pos[n]],
        "moved": [[n, old_pos[n], new_pos[n]] for n in new_names.names
                  if n in old_pos and old_pos[n] != new_pos[n]],
        "added": [n for n in new_names.names if n not in old_pos],
        "removed": [n for n in old_names.names if n not in new_pos],
    }
    if change["added"]:
        change["init"] = new_names.init
    return change


def _vocabulary_warnings(
    old: GraphLabels, new: GraphLabels, old_features: Any, new_features: Any,
    named: set[str],
) -> list[str]:
    """A head as wide as an input's vocabulary, following positions while that vocabulary's
    tokens moved: almost surely an untied logits head that would be scrambled."""
    try:
        old_vocab = vocabularies(old_features, where="the old model")
        new_vocab = vocabularies(new_features, where="the new model")
    except FeatureSpecError:
        return []  # reported where the feature specs are read
    warnings = []
    for input_name, tokens in new_vocab.items():
        before = old_vocab.get(new.input_identity.get(input_name, input_name))
        if before is None or tuple(tokens[:len(before)]) == tuple(before):
            continue  # unchanged, or grown at the end: old ids keep their tokens
        for ref in new.graph.outputs:
            x = new.tensors.get(ref)
            if ref[0] in named or not x or x[-1].ids is None:
                continue
            units = [_unit(new.space, int(i)) for i in x[-1].ids]
            width_matches = len(units) in (len(before), len(tokens))
            if width_matches and all(u is not None and u[0] == "unit" for u in units):
                warnings.append(
                    f"output '{ref[0]}' has one column per token of input '{input_name}' "
                    f"({len(units)}), whose vocabulary changed: the embedding rows follow "
                    "their tokens, but this output's columns stay by position. If it is a "
                    f"logits head over that vocabulary, name its columns: old_outputs / "
                    f"new_outputs={{'{ref[0]}': {{'vocabulary': [...]}}}}."
                )
    return warnings


def describe_output_changes(changes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per named output: its columns kept, moved, added and removed."""
    lines = []
    for name, change in changes.items():
        was = "" if change["old_output"] == name else f" (was '{change['old_output']}')"
        parts = change_parts(change)
        if change.get("init") == "mean":
            parts.append("new columns at the mean of the old ones")
        what = "tokens" if change["kind"] == "vocabulary" else "classes"
        lines.append(f"{what} of output '{name}'{was}: " + ", ".join(parts))
    return lines


def _listed(names: Sequence[Hashable]) -> str:
    shown = ", ".join(repr(n) for n in names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")
