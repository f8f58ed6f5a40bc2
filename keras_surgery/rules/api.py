"""What a rule receives and returns, and the small helpers rules are written with.

A rule is a plain function `rule(call: RuleCall) -> RuleResult`. It reads the layer's config,
its weight shapes and the labels of its inputs, and says (a) the labels of its outputs and
(b) for each of the layer's weights, in store order, the labelling and kind of every axis:

* ``in``: the index reads an input label (Dense kernel axis 0);
* ``out``: the index produces an output label (Dense kernel axis 1, bias);
* ``diag``: the same label in and out (BatchNormalization gamma/beta/mean/variance);
* ``struct``: structural taps matched by their own labels (conv kernel offsets);
* ``lookup``: rows selected by input values (Embedding rows).

A rule may also declare *mixing* axes: axes whose indices all influence each output
(LayerNormalization, a softmax). If such an axis gains or loses labels in a surgery, the old
function cannot be preserved and the report says so, naming the layer.

For growth (a layer inserted between old layers, a new residual branch) a rule may offer
*starts*: values of the layer's weights that make it compute the identity or exactly 0, with
the labels its outputs then carry (see `Start`); the planner picks one for new layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_surgery.graph import LayerNode, WeightSpec
from keras_surgery.labels import (
    AxisLabels,
    DepSets,
    LabelSpace,
    TensorLabels,
    TokenValues,
    axis_length,
    derived_key,
    unit_key,
    zero_key,
)

AXIS_KINDS = ("in", "out", "diag", "struct", "lookup")
INIT_KINDS = ("constant", "identity")
START_KINDS = ("identity", "zero")


@dataclass(frozen=True)
class WeightAxis:
    """One axis of a weight. `zero_new=True` asks for zeros (not fresh values) at new indices
    of this axis whenever the weight's other out/diag indices are matched: used where a new
    output index would otherwise leak into old outputs (the new key_dim columns of an attention
    query, whose product with the keys enters every old score)."""

    kind: str
    labels: AxisLabels
    zero_new: bool = False

    def __post_init__(self) -> None:
        if self.kind not in AXIS_KINDS:
            raise ValueError(f"Axis kind must be one of {AXIS_KINDS}. Received: {self.kind!r}")


@dataclass(frozen=True)
class WeightLabels:
    """The labelling of one weight: a role name ("kernel") and one `WeightAxis` per axis."""

    role: str
    axes: tuple[WeightAxis, ...]
    # (axis, power): copied values are multiplied by (new length / old length) ** power of that
    # axis, for layers whose computation scales with an axis length (attention's 1/sqrt(key_dim)).
    rescale: tuple[int, float] | None = None
    trainable: bool = True  # False for statistics (moving mean/variance), which have no slots
    # The constant the layer adds to this weight before using it (Gemma's RMS norm gain is
    # 1 + scale): a rescale by c then multiplies `offset + value`, so the stored value becomes
    # c * value + (c - 1) * offset.
    offset: float = 0.0


@dataclass(frozen=True)
class Mixing:
    """An axis whose indices are mixed together, so growing or shrinking it changes outputs.

    `ordered=True` means even a permutation changes the output (an opaque layer).
    """

    labels: TensorLabels
    reason: str
    ordered: bool = False
    # Growth by indices that are exactly 0 keeps the old outputs on the old indices once the
    # layer's weights are rescaled (`WeightLabels.rescale`): an RMS norm's mean of squares over
    # d_new indices, d_new - d_old of them 0, is d_old / d_new times the old one. The planner
    # accepts such a growth when every writer of the new indices starts them at 0.
    grows_with_zeros: bool = False
    # The identity of the layer whose derived outputs (`derived_key` labels) are 0 wherever
    # its inputs are (RMS normalisation scales each index), or "": a stream behind such a
    # layer (Gemma's post-norms) starts at 0 where the layer's input does.
    zero_through: str = ""
    # Growth by duplication (every index copied k times) keeps the old outputs: a
    # LayerNormalization's mean and variance over [x, x] are those over x (policy "duplicate").
    grows_by_duplication: bool = False


@dataclass(frozen=True)
class Init:
    """A value a new weight is set to: "constant" (every entry `value`) or "identity" (the
    identity matrix over the last two axes at the centre tap of any leading (kernel) axes, so
    a Dense kernel is `eye(n)` and an odd-sized conv kernel passes each channel through)."""

    kind: str
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise ValueError(f"Init kind must be one of {INIT_KINDS}. Received: {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Init:
        return cls(str(data["kind"]), float(data.get("value", 0.0)))


ZEROS = Init("constant", 0.0)
ONES = Init("constant", 1.0)
IDENTITY = Init("identity")


@dataclass(frozen=True)
class Start:
    """How a *new* layer can start so that the model around it keeps its old function.

    `kind` "identity": with `values`, every output equals the input at the same index, so the
    outputs carry the input's labels (`outputs`): a layer inserted between old layers
    (Net2DeeperNet). `kind` "zero": every output is exactly 0 (`outputs` holds `zero_key`
    labels), for the last layer of a new branch that is added to old values. A layer without
    weights offers "zero" with no values when it maps 0 to 0 (a pass-through, a relu).

    `refused` says why the layer cannot start this way (the planner reports it when it needed
    that start); `values` and `outputs` are then empty. `outputs` may be a function giving
    them, called only for a layer that takes the start (`labelled_outputs`): a "zero" start's
    `zero_key` labels were a third of all the labels interned for EfficientNetB0, nearly all
    of them for old layers, which never start.
    """

    kind: str
    values: dict[str, Init] = field(default_factory=dict)
    outputs: list[TensorLabels] | Callable[[], list[TensorLabels]] = field(default_factory=list)
    refused: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in START_KINDS:
            raise ValueError(f"Start kind must be one of {START_KINDS}. Received: {self.kind!r}")

    def labelled_outputs(self) -> list[TensorLabels]:
        """The labels of the layer's outputs when it takes this start."""
        return list(self.outputs() if callable(self.outputs) else self.outputs)


@dataclass
class RuleResult:
    outputs: list[TensorLabels]
    weights: list[WeightLabels] = field(default_factory=list)
    mixing: list[Mixing] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    opaque: bool = False
    # Per output, what its integer values select (a lookup's token ids); None or missing: unknown.
    values: list[TokenValues | None] = field(default_factory=list)
    # Per output, whether every value is known to be >= 0 (a relu's output); missing: unknown.
    nonnegative: list[bool] = field(default_factory=list)
    # How the layer can start when it is new (keyed by `Start.kind`).
    starts: dict[str, Start] = field(default_factory=dict)
    # The output is the sum of the inputs (Add): an input that is all 0 changes nothing.
    sums: bool = False
    # Weights of sublayers the old layer did not have (see `RuleCall.old_roles`), by role, with
    # the value each starts at so that the layer keeps its old function (None: its fresh
    # value); the rule has labelled the layer's outputs as if those sublayers were so set.
    added: dict[str, Init | None] = field(default_factory=dict)
    # The layer multiplies its one tensor input by this constant of the graph (a scalar
    # argument, not a weight: `x * sqrt(hidden_dim)`): 0 stays 0 through it, and when the
    # constant differs between the models the planner makes up for it where it can
    # (`operators.compensate_constants`); None: not such a layer.
    scales_by: float | None = None


@dataclass
class RuleCall:
    """Everything a rule may look at for one call of one layer."""

    layer: LayerNode
    identity: str  # the name unit labels are built from (the matched old layer's name)
    inputs: list[TensorLabels]
    input_shapes: list[tuple[int | None, ...] | None]
    space: LabelSpace
    deps: DepSets
    output_shapes: list[tuple[int | None, ...] | None] = field(default_factory=list)
    # Per input, what its integer values select, when known (see `TokenValues`).
    input_values: list[TokenValues | None] = field(default_factory=list)
    kwarg_inputs: dict[str, list[int]] = field(default_factory=dict)  # keyword -> inputs index
    # Per input, whether its values are known to be >= 0 (see `RuleResult.nonnegative`).
    input_nonnegative: list[bool] = field(default_factory=list)
    # The call's positional arguments as serialized (tensors as `__keras_tensor__` entries)
    # and its non-tensor keyword arguments (`reverse=True`).
    call_args: list[Any] = field(default_factory=list)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    # For a later call of a shared layer: what its first call's rule returned (a reversed
    # embedding labels its rows as the forward call did).
    earlier: RuleResult | None = None
    # The user's choice of units for this (new) layer: per new unit, the old unit it
    # continues or -1 (`migrate_weights(unit_maps=...)`); applies to every role of that size.
    unit_map: Sequence[int] | None = None
    # For a layer of the new model that continues an old layer of its class: the roles of
    # that old layer's weights, so that a composite rule can tell a sublayer added inside the
    # layer (a block more in a ViTEncoder) from one it continues. None otherwise.
    old_roles: frozenset[str] | None = None

    @property
    def config(self) -> dict[str, Any]:
        return self.layer.config

    @property
    def weights(self) -> list[WeightSpec]:
        return self.layer.weights

    def positional_inputs(self) -> list[TensorLabels]:
        """The labels of the tensors passed as positional arguments."""
        by_keyword = {i for idx in self.kwarg_inputs.values() for i in idx}
        return [x for i, x in enumerate(self.inputs) if i not in by_keyword]

    def keyword_input(self, name: str) -> TensorLabels | None:
        """The labels of the tensor passed as keyword `name`, if one was."""
        idx = self.kwarg_inputs.get(name)
        return self.inputs[idx[0]] if idx else None

    def describe(self) -> str:
        return f"layer '{self.layer.name}' ({self.layer.class_name})"

    # -- helpers -------------------------------------------------------------------------

    def weight_backed(self, n: int, what: str) -> int:
        """`n`, a size read from the config that one of the layer's weights must have: checked
        before anything is labelled, since a damaged config can declare any size."""
        n = axis_length(n, self.describe())
        largest = max((max(w.shape, default=1) for w in self.weights), default=None)
        if largest is not None and n > largest:
            raise ValueError(
                f"{self.describe()} declares {what}={n}, more than any of its weights holds "
                f"({[w.shape for w in self.weights]})"
            )
        return n

    def units(self, n: int, dep: int, role: str = "") -> AxisLabels:
        """`n` output units of this layer, each depending on `dep`: unit j continues unit j of
        the old layer, or the old unit the user's `unit_map` names for it (-1: a new unit)."""
        n = self.weight_backed(n, f"{role or 'units'}")
        if self.unit_map is not None and len(self.unit_map) == n and _applicable(self.unit_map):
            chosen = [unit_key(self.identity, role, int(e) if e >= 0 else ("new", j))
                      for j, e in enumerate(self.unit_map)]
            ids = self.space.intern_many(chosen)
        else:
            ids = self.space.remembered(
                ("units", self.identity, role, n),
                lambda: self.space.intern_many([unit_key(self.identity, role, j)
                                                for j in range(n)]))
        return AxisLabels(ids, np.full(n, dep, dtype=np.int64))

    def union(self, *axes: AxisLabels) -> int:
        """The dependency set of everything in `axes` (one id)."""
        if not axes:
            return DepSets.EMPTY
        return self.deps.union(np.concatenate([a.deps for a in axes]))

    def all_deps(self, labels: TensorLabels) -> int:
        return self.union(*labels)

    def derived(self, axis: AxisLabels) -> AxisLabels:
        """`axis` after a per-index affine map of this layer (same meaning, new zero)."""
        if axis.ids is None:
            return axis
        source = np.asarray(axis.ids, dtype=np.int64)
        ids = self.space.remembered(
            ("derived", self.identity, source.tobytes()),
            lambda: self.space.intern_many([derived_key(self.identity, i)
                                            for i in source.tolist()]))
        return AxisLabels(ids, axis.deps)

    def mixed(self, x: TensorLabels, axes: Sequence[int]) -> TensorLabels:
        """`x` after mixing every index of `axes` into each of them (a softmax, a
        LayerNormalization): the labels stay, and each index of those axes now depends on what
        any of them depended on."""
        dep = self.union(*(x[a] for a in axes))
        return tuple(
            AxisLabels(a.ids, np.full(len(a.deps), dep, dtype=np.int64)) if i in axes else a
            for i, a in enumerate(x)
        )

    def zeros(self, n: int) -> AxisLabels:
        """`n` indices of this (new) layer's output that are exactly 0 (see `Start`)."""
        return AxisLabels(
            self.space.intern_many(zero_key(self.identity, j) for j in range(n)),
            np.zeros(n, dtype=np.int64),
        )

    def nonnegative_input(self, i: int = 0) -> bool:
        return i < len(self.input_nonnegative) and bool(self.input_nonnegative[i])

    def weight_count_error(self, expected: Sequence[str]) -> ValueError:
        return ValueError(
            f"{self.describe()} has {len(self.weights)} variable(s) "
            f"{[w.local for w in self.weights]}, but its rule expects {list(expected)}."
        )

    def sublayer(
        self,
        attribute: str,
        class_name: str,
        config: dict[str, Any],
        inputs: Sequence[TensorLabels],
        input_values: Sequence[TokenValues | None] = (),
    ) -> RuleCall:
        """The call of a sublayer whose variables are saved under `attribute` (a
        TransformerDecoder's `_self_attention_layer`), reading `inputs`, for running that
        sublayer's own rule: its unit labels are built from `<identity>/<attribute>`."""
        prefix = attribute + "/"
        weights = [WeightSpec(w.path, w.local[len(prefix):], w.shape, w.dtype)
                   for w in self.weights if w.local.startswith(prefix)]
        node = LayerNode(f"{self.layer.name}/{attribute}", class_name, None, None, dict(config),
                         None, None, weights)
        return RuleCall(node, f"{self.identity}/{attribute}", list(inputs),
                        [None] * len(inputs), self.space, self.deps,
                        input_values=list(input_values))

    def normalize_axis(self, axis: int, rank: int) -> int:
        """A Keras axis (counting the batch axis, may be negative) as a non-batch axis index."""
        full = axis if axis >= 0 else axis + rank + 1
        if not 1 <= full <= rank:
            raise ValueError(f"{self.describe()}: axis {axis} out of range for rank {rank}.")
        return full - 1


def weight(
    role: str, *axes: tuple, rescale: tuple[int, float] | None = None, trainable: bool = True
) -> WeightLabels:
    """Shorthand: `weight("kernel", ("in", x), ("out", units))`; an axis given as
    `(kind, labels, True)` has `zero_new` set."""
    return WeightLabels(role, tuple(WeightAxis(*axis) for axis in axes), rescale, trainable)


def zero_passing() -> dict[str, Start]:
    """The starts of a layer without weights that maps 0 to 0 index by index."""
    return {"zero": Start("zero")}


def single_input(call: RuleCall) -> TensorLabels:
    if len(call.inputs) != 1:
        raise ValueError(f"{call.describe()} expects one input, got {len(call.inputs)}.")
    return call.inputs[0]


def check_weights(call: RuleCall, weights: list[WeightLabels]) -> list[WeightLabels]:
    """`weights`, checked against the layer's variables: one labelling per variable, one axis
    per dimension, and as many labels as the dimension has indices."""
    shapes = [w.shape for w in call.weights]
    if len(shapes) != len(weights) or any(
        len(s) != len(w.axes)
        or any(a.labels.ids is not None and len(a.labels.ids) != d for a, d in zip(w.axes, s))
        for s, w in zip(shapes, weights)
    ):
        raise ValueError(
            f"{call.describe()} has variables {[(w.local, w.shape) for w in call.weights]}, "
            "but its rule expects "
            f"{[(w.role, tuple(a.labels.length for a in w.axes)) for w in weights]}."
        )
    return weights


# -- activations -----------------------------------------------------------------------------

MIXING_ACTIVATIONS = frozenset({"softmax", "log_softmax"})
# Activations whose every value is >= 0.
NONNEGATIVE_ACTIVATIONS = frozenset(
    {"relu", "relu6", "sigmoid", "hard_sigmoid", "softmax", "softplus", "exponential"}
)
# Activations with f(0) = 0: a layer with them and zero weights outputs exactly 0.
ZERO_AT_ZERO = frozenset({
    "linear", "relu", "relu6", "tanh", "elu", "selu", "gelu", "silu", "swish", "leaky_relu",
    "softsign", "mish", "hard_silu", "hard_swish", "celu", "hard_tanh", "tanh_shrink",
    "soft_shrink", "hard_shrink",
})
# Activations with f(x) = x for x >= 0: a layer with them is the identity on nonnegative inputs.
IDENTITY_ON_NONNEGATIVE = frozenset({"relu", "leaky_relu", "elu", "celu"})


def activation_name(config: dict) -> str | None:
    act = config.get("activation")
    if isinstance(act, str):
        return act
    if isinstance(act, dict):  # a serialized activation function or layer
        return act.get("config") if isinstance(act.get("config"), str) else act.get("class_name")
    return None


def activation_mixing(call: RuleCall, labels: AxisLabels) -> list[Mixing]:
    """A softmax-like activation mixes the units of the axis it normalises."""
    act = activation_name(call.config)
    if act in MIXING_ACTIVATIONS:
        return [Mixing((labels,), f"'{act}' activation normalises over its units")]
    return []


def nonnegative_activation(call: RuleCall) -> bool:
    return activation_name(call.config) in NONNEGATIVE_ACTIVATIONS


def linear_starts(
    call: RuleCall,
    x: TensorLabels,
    out: TensorLabels,
    axis: int,
    *,
    bias: bool,
    refuse_identity: str | None = None,
) -> dict[str, Start]:
    """Starts of a new layer computing `activation(kernel . x + bias)` along `axis` (Dense,
    a convolution): "zero" sets kernel and bias to 0 (exact when the activation is 0 at 0);
    "identity" sets the kernel to the identity and the bias to 0, when the layer has as many
    units as inputs and its activation is the identity (linear; relu-like on inputs >= 0).
    `refuse_identity` is the layer's own reason it cannot be the identity (its geometry)."""
    act = activation_name(call.config) or "linear"
    roles = ("kernel", "bias") if bias else ("kernel",)
    n_in, n_out = x[axis].length, out[axis].length
    starts: dict[str, Start] = {}
    if act in ZERO_AT_ZERO and n_out is not None:
        starts["zero"] = Start("zero", dict.fromkeys(roles, ZEROS),
                               lambda: [out[:axis] + (call.zeros(n_out),) + out[axis + 1:]])
    else:
        starts["zero"] = Start("zero", refused=f"its activation '{act}' is not 0 at 0")
    reason = refuse_identity
    if reason is None and n_in != n_out:
        reason = f"it has {n_out} units for {n_in} inputs"
    if reason is None and act != "linear":
        if act not in IDENTITY_ON_NONNEGATIVE:
            reason = f"its activation '{act}' is not the identity"
        elif not call.nonnegative_input():
            reason = (f"its activation '{act}' is the identity only on inputs >= 0, and its "
                      "input may be negative")
    if reason is not None:
        starts["identity"] = Start("identity", refused=reason)
    else:
        values = {"kernel": IDENTITY, **({"bias": ZEROS} if bias else {})}
        starts["identity"] = Start("identity", values, [x])
    return starts


class Composite:
    """Builds the result of a layer made of sublayers by running each sublayer's own rule
    (`RuleCall.sublayer`): their weights get roles prefixed with the attribute they are saved
    under and are returned in the layer's store order, and their mixing axes and warnings name
    the sublayer."""

    def __init__(self, call: RuleCall):
        self.call = call
        self.weights: dict[str, WeightLabels] = {}  # store path -> labels
        self.mixing: list[Mixing] = []
        self.warnings: list[str] = []

    def run(
        self,
        rule: Callable[[RuleCall], RuleResult],
        attribute: str,
        class_name: str,
        config: dict[str, Any],
        inputs: Sequence[TensorLabels],
        input_values: Sequence[TokenValues | None] = (),
    ) -> TensorLabels:
        """Runs `rule` for the sublayer under `attribute`; returns its (first) output."""
        sub = self.call.sublayer(attribute, class_name, config, inputs, input_values)
        result = rule(sub)
        for spec, w in zip(sub.weights, result.weights):
            self.weights[spec.path] = dataclasses.replace(w, role=f"{attribute}/{w.role}")
        self.mixing += [dataclasses.replace(m, reason=f"{attribute} ({class_name}): {m.reason}")
                        for m in result.mixing]
        self.warnings += result.warnings
        return result.outputs[0]

    def result(self, outputs: list[TensorLabels], **kwargs: Any) -> RuleResult:
        """The layer's result; every variable of the layer must belong to a sublayer run."""
        unknown = [w.local for w in self.call.weights if w.path not in self.weights]
        if unknown:
            raise ValueError(f"{self.call.describe()}: unexpected variables {unknown}")
        weights = [self.weights[w.path] for w in self.call.weights]
        return RuleResult(outputs, weights, self.mixing, self.warnings, **kwargs)


def _applicable(unit_map: Sequence[int]) -> bool:
    """Whether a user's unit map can label units: integers >= -1, no old unit twice. Other maps
    are not applied here; `check_unit_maps` refuses them by name once the graph is labelled
    (applied, a repeated old unit would repeat a label on the axis)."""
    if any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < -1
           for e in unit_map):
        return False
    kept = [int(e) for e in unit_map if e >= 0]
    return len(set(kept)) == len(kept)
