"""The model graph IR, built from a live keras.Model or from a saved config, and nothing else.

Both sources go through one parser: a Keras 3 model config (what `config.json` holds, or what
`model.get_config()` returns) plus a *weight tree*, the store paths Keras's saving code would
write (`layers/dense_1/vars/0`, ...) mapped to readable handles. Every access to Keras private
attributes lives in this module, so a Keras upgrade touches one file.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import functools
import importlib
import re
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryError, SurgeryFileError
from keras_surgery.labels import MAX_AXIS_LENGTH, gc_paused
from keras_surgery.trace import (
    TracedModel,
    is_subclassed_model,
    readable_configs,
    subclassed_file_error,
    tensorflow_unprobed,
    traced,
)

TensorRef = tuple[str, int, int]
"""(layer name, call index, output index): one tensor of the graph."""

NESTED_MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})


@dataclass(frozen=True)
class WeightSpec:
    """One variable of a layer, as Keras's saving code addresses it."""

    path: str  # full store path, e.g. "layers/lstm/cell/vars/0"
    local: str  # path inside the layer's group, e.g. "cell/vars/0"
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Call:
    """One call of a layer in the graph (a Keras node)."""

    inputs: list[TensorRef]  # tensors of the positional arguments, then of the keywords
    kwargs: dict[str, Any] = field(default_factory=dict)  # non-tensor keyword arguments
    kwarg_inputs: dict[str, list[int]] = field(default_factory=dict)  # keyword -> inputs index
    # The positional arguments as serialized (tensors as `__keras_tensor__` entries), for
    # operations whose other arguments say what they do (the key of a GetItem).
    args: list[Any] = field(default_factory=list)


@dataclass
class LayerNode:
    """One layer or operation of the graph."""

    name: str  # unique in the graph; nested models prefix their layers' names with "outer/"
    class_name: str
    module: str | None
    registered_name: str | None
    config: dict[str, Any]
    # The resolved class; for files never imported from outside Keras (a registered model's
    # layers: classes of the package that registered it, see `model_from_registered_config`).
    cls: type | None
    group: str | None  # store group, e.g. "layers/dense_1"; None for operations
    weights: list[WeightSpec] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    @property
    def short_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | None, ...]  # without the batch axis
    dtype: str


@dataclass
class ModelGraph:
    """A model as data: inputs, layers with their calls in topological order, outputs."""

    name: str
    inputs: list[InputSpec]
    outputs: list[TensorRef]
    layers: dict[str, LayerNode]
    order: list[tuple[str, int]]  # (layer name, call index), topologically sorted
    tensor_shapes: dict[TensorRef, tuple[int | None, ...]]
    source: WeightSource
    description: str  # "old.keras" or "model 'name'", for messages
    # Nested models by the prefix of their layers' names (without the "/"): their class names,
    # in the order the models appear.
    nested: dict[str, str] = field(default_factory=dict)
    # What describing the model had to work around (a layer whose get_config() raised), for
    # the report.
    warnings: list[str] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        return [ref[0] for ref in self.outputs]

    def read(self, spec: WeightSpec) -> np.ndarray:
        return self.source.read(spec.path)


class WeightSource:
    """Reads variables by store path; subclasses read from a file or from live variables."""

    @property
    def file_bytes(self) -> int | None:
        """The size of the file(s) the values come from (None: not read from a file); the
        label budget of a side read from a file grows with it (`labels.file_label_limit`)."""
        return None

    def paths(self) -> Mapping[str, tuple[tuple[int, ...], str]]:
        """Every store path -> (shape, dtype)."""
        raise NotImplementedError

    def read(self, path: str) -> np.ndarray:
        raise NotImplementedError


class LiveWeights(WeightSource):
    """The variables of a live model, addressed by the paths Keras's saving code would use."""

    def __init__(self, variables: Mapping[str, Any]):
        self.variables = dict(variables)

    def paths(self) -> Mapping[str, tuple[tuple[int, ...], str]]:
        return {
            p: (tuple(int(d) for d in v.shape), _dtype_name(v.dtype))
            for p, v in self.variables.items()
        }

    def read(self, path: str) -> np.ndarray:
        value = self.variables[path]
        view = variable_view(value) if hasattr(value, "assign") else None
        if view is not None:
            return view
        return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def variable_view(var: Any) -> np.ndarray | None:
    """The current value of Keras variable `var` as a read-only numpy view of the backend's own
    buffer, without a copy, where that view keeps its values when the variable is assigned
    later: TensorFlow copies a shared buffer on write, JAX arrays never change. None on other
    backends and for 0-d variables (a 0-d bfloat16 tensor gives numpy a scalar).

    A Keras op on the variable (`keras.ops.reshape`) gives the same view but cost 0.7 ms per
    variable on TensorFlow; the tf.Variable's own snapshot costs 0.08 ms.

    Example:
        >>> view = variable_view(model.get_layer("dense").kernel)          # doctest: +SKIP
    """
    import keras

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax") or not len(var.shape):
        return None
    value = var.value
    snapshot = getattr(value, "value", None) if backend == "tensorflow" else None
    return np.asarray(snapshot() if callable(snapshot) else value)


def _dtype_name(dtype: Any) -> str:
    return str(getattr(dtype, "name", dtype))


# -- live models ---------------------------------------------------------------------------


# Inside `reused_saving_walk`: id(model) -> (model, what its last walk found), kept for one call.
_KEPT_WALKS: contextvars.ContextVar[dict[int, tuple[Any, dict[str, Any]]] | None] = (
    contextvars.ContextVar("keras_surgery_kept_walks", default=None)
)


@contextlib.contextmanager
def reused_saving_walk() -> Iterator[None]:
    """Inside this scope, the `live_variables` call that follows one that walked a model
    returns what that walk found, without walking again (the walk after it walks anew).

    `migrate_weights` plans and then applies, and each walks the new model: 5-10% of a
    migration of a model of many small layers (EfficientNetB0: 60 ms a walk). Only for a
    scope in which no model gains or loses variables between two walks of it: the caller
    promises that nothing runs between planning and applying. Applying builds an unbuilt
    optimizer and then walks again, which the one-call rule leaves a walk of its own.
    """
    token = _KEPT_WALKS.set({})
    try:
        yield
    finally:
        _KEPT_WALKS.reset(token)


def live_variables(model: Any) -> dict[str, Any]:
    """Store path -> variable for every variable Keras would save for `model`.

    Runs Keras's own saving walk (`saving_lib._save_state`) into a recording store, so the
    paths are exactly those of a `.keras` file written from this model (inside
    `reused_saving_walk`, every other call gives the previous call's walk again).

    Keras 3 (at least to 3.15) caches the attribute skip set of each kind of object under
    one global name (`saving_attr_skipset_<type>`) but looks it up under another
    (`saving_attr_skiplist_<type>`), so every object it walks builds a reference `Layer()`
    again: 5-15 ms each, most of the walk (and of Keras's own `load_weights`) on a model of
    many layers. The set is put under the name looked up, with the value Keras computes
    (`get_attr_skipset`); it depends only on the Keras classes, and `clear_session` drops it
    with the rest of Keras's global state.
    """
    kept = _KEPT_WALKS.get()
    if kept is not None:
        last = kept.pop(id(model), None)
        if last is not None and last[0] is model:
            return dict(last[1])
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    for kind in ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer",
                 "Loss"):
        if global_state.get_global_attribute(f"saving_attr_skiplist_{kind}") is None:
            try:
                skipset = saving_lib.get_attr_skipset(kind)
            except Exception:  # a Keras that does not know this kind: its walk never asks
                continue
            global_state.set_global_attribute(f"saving_attr_skiplist_{kind}", skipset)

    class _RecordingStore(saving_lib.H5IOStore):
        # Deliberately skips H5IOStore.__init__: nothing is written, paths are recorded.
        def __init__(self) -> None:
            self.groups: dict[str, dict[str, Any]] = {}

        def __bool__(self) -> bool:
            return True

        def make(self, path: str, metadata: dict | None = None) -> dict[str, Any]:
            # H5IOStore._create_h5_group puts a saveable's variables in `<path>/vars`.
            store: dict[str, Any] = {}
            self.groups[f"{path}/vars" if path else "vars"] = store
            return store

    recorder = _RecordingStore()
    saving_lib._save_state(model, recorder, None, "", visited_saveables=set())
    found: dict[str, Any] = {}
    for group, store in recorder.groups.items():
        for key, value in store.items():
            path = f"{group}/{key}" if group else key
            found[path.lstrip("/")] = value
    if kept is not None:
        kept[id(model)] = (model, dict(found))
    return found


def finalize_layers(model: Any, variables: list[Any]) -> None:
    """Calls `finalize_state()` on each layer of `model` that owns one of `variables`.

    Some layers cache tensors derived from their variables (an adapted Normalization keeps
    `mean`/`variance` reshaped from its `adapt_mean`/`adapt_variance` variables); Keras's own
    loader refreshes them in `load_own_variables`. Assigning the variables directly must do the
    same, or the layer keeps computing with its old statistics.
    """
    written = {id(v) for v in variables}
    for layer in model._flatten_layers(include_self=False):
        own = list(getattr(layer, "_trainable_variables", [])) + list(
            getattr(layer, "_non_trainable_variables", [])
        )
        if any(id(v) in written for v in own) and callable(getattr(layer, "finalize_state", None)):
            layer.finalize_state()


def _live_operations(model: Any, prefix: str = "") -> dict[str, Any]:
    import keras

    found: dict[str, Any] = {}
    functional = getattr(model, "_functional", None) or model
    for op in getattr(functional, "operations", None) or getattr(model, "layers", []):
        name = prefix + op.name
        found[name] = op
        if isinstance(op, keras.Model):
            found.update(_live_operations(op, name + "/"))
    return found


def graph_from_model(model: Any) -> ModelGraph:
    """Builds the IR of a live, built keras.Model (Functional, Sequential, nested or subclassed).

    Functional subclasses whose `get_config()` returns their constructor arguments (keras-hub
    backbones such as GPT2Backbone) are described by their functional graph, serialized the
    way Keras serializes a plain Functional model (`functional_graph_config`). A layer whose
    `get_config()` raises is described by its base class's config (`trace.readable_configs`).
    A subclassed model is traced by calling it on symbolic inputs (`trace.traced`) and
    described like the Functional model that trace makes, over its own layers and variables.

    Args:
        model: a built keras.Model.

    Returns:
        The ModelGraph, reading weights from the model's variables.

    Raises:
        SurgeryError: `model` is not a built keras.Model, a subclassed model cannot be traced
            or has variables its traced graph does not reach, or its graph cannot be read.

    Example:
        >>> graph = graph_from_model(model)                               # doctest: +SKIP
        >>> [i.name for i in graph.inputs]
        ['input_layer']
    """
    import keras

    if not isinstance(model, keras.Model):
        raise SurgeryError(f"Expected a keras.Model. Received: {type(model).__name__}")
    if not model.built:
        raise SurgeryError(
            f"Model '{model.name}' is not built: call it on data or build it before surgery."
        )
    if is_subclassed_model(model):
        return _traced_graph(model)
    config, notes = _model_config(model)
    objects = _live_operations(model)
    graph = build_graph(
        config,
        LiveWeights(live_variables(model)),
        resolve=_resolver(objects),
        description=f"model '{model.name}'",
        aliases=_shared_across_models(objects),
    )
    graph.warnings.extend(f"{graph.description}: {note}" for note in notes)
    return graph


def _model_config(model: Any) -> tuple[dict[str, Any], list[str]]:
    """The config of a Functional or Sequential `model` for `build_graph`, and the notes of
    `readable_configs` on it. Asked of the model as it is first: its layers are probed one by
    one, and those whose `get_config` raises patched, only when that fails (the probe calls
    every layer's `get_config` a second time)."""
    import keras

    def described() -> dict[str, Any]:
        return {
            "class_name": type(model).__name__ if isinstance(model, keras.Sequential)
            else "Functional",
            "config": _graph_config(model),
        }

    try:
        with tensorflow_unprobed():
            return described(), []
    except Exception:  # noqa: S110 - asked again below, with the failing layers patched
        pass
    with readable_configs(model) as notes:
        try:
            return described(), notes
        except Exception as exc:  # a third-party get_config that fails past its base classes
            raise SurgeryError(
                f"Model '{model.name}' cannot be described as a graph: get_config() failed "
                f"({type(exc).__name__}: {exc})."
            ) from exc


def _traced_graph(model: Any) -> ModelGraph:
    """The IR of a subclassed model: the graph of its trace, with the weights of the model's
    own store paths (what `model.save` writes, so applying and the optimizer find them)."""
    with traced(model) as trace, readable_configs(model) as notes:
        try:
            config = {"class_name": "Functional", "config": _traced_config(trace)}
        except Exception as exc:  # a third-party get_config that fails past its base classes
            own = _own_variables(model)
            if own:  # on JAX a model's own variable used in call() fails serialization first
                raise _untraced_variables_error(model, own) from exc
            raise SurgeryError(
                f"Model '{model.name}' (subclassed {type(model).__name__}) cannot be described "
                f"as a graph: get_config() failed ({type(exc).__name__}: {exc})."
            ) from exc
        objects = _traced_operations(trace)
    description = f"model '{model.name}'"
    graph = build_graph(
        config, LiveWeights({}), resolve=_resolver(objects), description=description,
        aliases=_shared_across_models(objects),
    )
    graph.source = LiveWeights(live_variables(model))
    _attach_live_weights(graph, model, objects)
    graph.warnings.extend(f"{description}: {note}" for note in notes)
    return graph


def _traced_config(trace: TracedModel) -> dict[str, Any]:
    """The functional config of a trace, each nested subclassed model replaced by its own."""
    config = _graph_config(trace.functional)
    config["name"] = trace.model.name
    for entry in config.get("layers") or []:
        inner = trace.nested.get(entry.get("name") if isinstance(entry, dict) else None)
        if inner is not None:
            entry["config"] = _traced_config(inner)
    return config


def _traced_operations(trace: TracedModel, prefix: str = "") -> dict[str, Any]:
    """Graph name -> operation of a trace, nested traces under "name/" (as `_live_operations`)."""
    found = _live_operations(trace.functional, prefix)
    for name, inner in trace.nested.items():
        found = {k: v for k, v in found.items() if not k.startswith(prefix + name + "/")}
        found.update(_traced_operations(inner, prefix + name + "/"))
    return found


def _attach_live_weights(graph: ModelGraph, model: Any, objects: Mapping[str, Any]) -> None:
    """Gives each layer of a traced graph its variables under `model`'s own store paths.

    Raises:
        SurgeryError: a variable of `model` is reached by no traced layer (a `self.add_weight`
            on the model used by a keras.ops call, or a layer that `call` does not call).
    """
    import keras

    path_of = {id(v): p for p, v in live_variables(model).items()}
    attached: set[int] = set()
    for name, node in graph.layers.items():
        op = objects.get(name)
        if op is None or node.group is None or isinstance(op, keras.Model):
            continue
        specs = []
        for local, variable in live_variables(op).items():
            path = path_of.get(id(variable))
            if path is None or not path.endswith("/" + local) or id(variable) in attached:
                continue
            group = path[: -len(local) - 1]
            if specs and group != node.group:
                continue
            node.group = group
            attached.add(id(variable))
            specs.append(WeightSpec(path, local, tuple(int(d) for d in variable.shape),
                                    _dtype_name(variable.dtype)))
        node.weights = sorted(specs, key=lambda w: _store_sort_key(w.local))
    missed = [f"{path_of.get(id(v), '?')} ({v.path})" for v in model.weights
              if id(v) not in attached]
    if missed:
        raise _untraced_variables_error(model, missed)


def _untraced_variables_error(model: Any, missed: list[str]) -> SurgeryError:
    return SurgeryError(
        f"Model '{model.name}' (subclassed {type(model).__name__}): variable(s) "
        f"{missed[:5]} belong to no layer its traced call() reaches (a self.add_weight on "
        "the model itself, or a layer call() never calls). Keep trainable state in Keras "
        "layers called by call(), with a rule for custom ones (ks.register_rule)."
    )


def _own_variables(model: Any) -> list[str]:
    """The variables of `model` that none of its layers holds (`self.add_weight` on the model),
    as "store path (variable path)"."""
    held = {id(v) for layer in model._flatten_layers(include_self=False) for v in layer.weights}
    path_of = {id(v): p for p, v in live_variables(model).items()}
    return [f"{path_of.get(id(v), '?')} ({v.path})" for v in model.weights if id(v) not in held]


def _resolver(objects: Mapping[str, Any]) -> Callable[..., type | None]:
    """Layer classes from the operations of a live model, by graph name."""

    def resolve(name: str, module: str | None, class_name: str, registered: str | None):
        op = objects.get(name)
        return type(op) if op is not None else resolve_keras_class(module, class_name, name)

    return resolve


def _graph_config(model: Any) -> dict[str, Any]:
    """`model.get_config()`, with the functional graph of every (nested) Functional model whose
    own config holds only its constructor arguments."""
    import keras
    from keras.src.models.functional import Functional

    if type(model) is Functional:
        # What Functional.get_config writes, without its deep copy of the finished config
        # (a third of its time; everything in it is made fresh by the serialization).
        config = functional_graph_config(model)
    else:
        config = model.get_config()
        if isinstance(model, Functional) and not isinstance(config.get("layers"), list):
            config = functional_graph_config(model)
    if isinstance(model, keras.Sequential):
        members = {layer.name: layer for layer in model.layers}
    else:
        members = {op.name: op for op in getattr(model, "operations", [])}
    for entry in config.get("layers") or []:
        if not isinstance(entry, dict):
            continue
        inner = members.get(entry.get("name") or (entry.get("config") or {}).get("name"))
        if isinstance(inner, keras.Model):
            entry["config"] = _graph_config(inner)
    return config


def functional_graph_config(model: Any) -> dict[str, Any]:
    """The config Keras's `Functional.get_config` writes for a functional-like model, made for
    any live Functional model (its subclasses return their constructor arguments instead).

    Follows keras.src.models.functional.Functional.get_config: the nodes of each operation that
    belong to this model are kept and renumbered, and tensors refer to them by the new index.
    """
    from keras.src import tree
    from keras.src.models.functional import Functional, serialize_node
    from keras.src.ops.function import make_node_key
    from keras.src.saving import serialization_lib

    own = model._nodes
    renumbered: dict[str, int] = {}
    layers = []
    for op in model.operations:
        kept = 1 if isinstance(op, Functional) else 0  # a model's first node is its own graph
        nodes = []
        for index, node in enumerate(op._inbound_nodes):
            key = make_node_key(op, index)
            if key not in own:
                continue
            renumbered[key] = kept
            kept += 1
            data = serialize_node(node, own_nodes=own)
            if data is not None:
                nodes.append(data)
        entry = serialization_lib.serialize_keras_object(op)
        entry["name"] = op.name
        entry["inbound_nodes"] = nodes
        layers.append(entry)

    def ref(tensor: Any) -> list:
        op, index, t = tensor._keras_history
        return [op.name, renumbered[make_node_key(op, index)], t]

    return {
        "name": model.name,
        "trainable": model.trainable,
        "layers": layers,
        "input_layers": tree.map_structure(ref, model._inputs_struct),
        "output_layers": tree.map_structure(ref, model._outputs_struct),
    }


def _shared_across_models(objects: Mapping[str, Any]) -> dict[str, str]:
    """Graph names of one layer object that appears under several names (a layer of a nested
    model that the outer model calls too: a language model's tied token embedding) -> the
    first of its names, the one its weights are saved under."""
    import keras

    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, op in objects.items():
        if isinstance(op, (keras.Model, keras.layers.InputLayer)):
            continue
        seen = first.setdefault(id(op), name)
        if seen != name:
            aliases[name] = seen
    return aliases


def model_from_registered_config(
    config: Mapping[str, Any], description: str, *, subclassed_ok: bool = False
) -> Any | None:
    """A model saved as its constructor arguments (a keras-hub backbone), built again so that
    its functional graph can be read; None when `config` does not name such a class.

    Only a Functional subclass that an already imported package registered with
    `keras.saving` (its `registered_name`, "keras_hub>GPT2Backbone") is made: nothing is
    imported, no class is looked up by the module path the file names, and Lambda layers are
    refused by Keras's safe mode. The constructor of that installed class runs with the
    file's arguments, inside a StatelessScope, so no variable is allocated or initialised;
    Keras's naming state is put back afterwards. The weights are still read as data.

    Args:
        config: the saved entry: `registered_name` and `config` (the constructor arguments).
        description: how to name the file (and the layer) in messages.
        subclassed_ok: return None for a registered subclassed (non-functional) model instead
            of refusing it (a nested one stays one opaque layer, as from a live model).

    Returns:
        The built Functional model, or None.

    Raises:
        SurgeryFileError: the class is registered but cannot be built from the config, or is
            a subclassed model (unless `subclassed_ok`).
    """
    import keras
    from keras.src.models.functional import Functional

    registered = config.get("registered_name")
    cls = keras.saving.get_registered_object(registered) if isinstance(registered, str) else None
    # Keras makes a keras.Model subclass whose constructor calls `super().__init__(inputs,
    # outputs)` a Functional subclass only when the first instance is made (keras-hub
    # backbones, in a fresh process), so a registered Model subclass is built to know.
    if not (isinstance(cls, type) and issubclass(cls, keras.Model)) or issubclass(
            cls, keras.Sequential):
        return None
    arguments = config.get("config")
    if not isinstance(arguments, dict):
        raise SurgeryFileError(f"{description}: the config of {registered} must be a mapping.")
    try:
        with unallocated_keras_objects():
            model = cls.from_config(copy.deepcopy(arguments))
    except Exception as exc:
        raise SurgeryFileError(
            f"{description}: cannot build {registered} from its config to read its graph "
            f"({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(model, Functional):
        if subclassed_ok:
            return None
        raise subclassed_file_error(registered, description) or SurgeryFileError(
            f"{description}: {registered} is not a functional model.")
    return model


@contextlib.contextmanager
def unallocated_keras_objects() -> Iterator[None]:
    """A scope for making Keras layers and models from configs only to look at their
    structure: safe mode (no Lambda), a StatelessScope that allocates and initialises no
    variable, warnings silenced, and Keras's naming and deferred-variable state put back on
    exit so that the caller's own models are named as if nothing had been made."""
    from keras.src.backend.common import global_state
    from keras.src.backend.common.stateless_scope import StatelessScope
    from keras.src.saving.serialization_lib import SafeModeScope

    names = copy.copy(global_state.get_global_attribute("object_name_uids"))
    pending = global_state.get_global_attribute("uninitialized_variables")
    pending = None if pending is None else list(pending)
    try:
        with warnings.catch_warnings(), SafeModeScope(True), StatelessScope(
            initialize_variables=False
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        global_state.set_global_attribute("object_name_uids", names)
        global_state.set_global_attribute("uninitialized_variables", pending)


# -- the shared parser ---------------------------------------------------------------------


def resolve_keras_class(
    module: str | None, class_name: str, layer: str | None = None
) -> type | None:
    """Keras's own class for a config entry; None for anything outside Keras.

    Only modules of the `keras` package are imported: a file's custom classes are never
    imported, so no code from a file runs.

    Args:
        module: the entry's `module` ("keras.layers").
        class_name: the entry's `class_name` ("Dense").
        layer: the layer's name, for the error message.

    Raises:
        SurgeryFileError: `class_name` names something of a Keras module that is not a class
            (a function such as `keras.activations.relu`, a submodule such as `keras.layers`).
    """
    if not module or not (module == "keras" or module.startswith("keras.")):
        return None
    if not isinstance(class_name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*",
                                                           class_name):
        return None
    found = _keras_attribute(module, class_name)
    if found is None or isinstance(found, type):
        return found
    kind = ("module" if isinstance(found, types.ModuleType) else
            "function" if callable(found) else f"{type(found).__name__} value")
    where = f"layer '{layer}'" if layer else "a layer entry"
    raise SurgeryFileError(
        f"{where}: class_name {class_name!r} of module {module!r} names a {kind}, not a "
        "class. Expected a layer class name as Keras writes it (such as 'Dense')."
    )


@functools.lru_cache(maxsize=4096)
def _keras_attribute(module: str, class_name: str) -> Any:
    """`module.class_name` of an importable Keras module, or None; cached, as a graph names
    the same few classes thousands of times (each import lookup takes the import lock)."""
    try:
        return getattr(importlib.import_module(module), class_name, None)
    except ImportError:
        return None


def is_auto_name(name: str, class_name: str) -> bool:
    """Whether `name` looks like a name Keras generated (`dense`, `dense_7`)."""
    from keras.src.utils import naming

    short = name.rsplit("/", 1)[-1]
    snake = naming.to_snake_case(class_name)
    return short == snake or re.fullmatch(re.escape(snake) + r"_\d+", short) is not None


def _is_layer_class(cls: type | None, module: str | None) -> bool:
    if cls is not None:
        import keras

        return isinstance(cls, type) and issubclass(cls, keras.layers.Layer)
    # Unknown classes: Keras ops live in keras.src.ops; a custom class is almost surely a Layer.
    return not (module or "").startswith("keras.src.ops")


def _tensor_refs(obj: Any) -> Iterator[tuple[TensorRef, tuple | None]]:
    """The keras tensors inside serialized call arguments, in order, with their shapes."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            cfg = obj.get("config", {})
            hist = cfg.get("keras_history")
            if not isinstance(hist, (list, tuple)) or len(hist) != 3:
                # build_graph turns this into a SurgeryFileError naming the file.
                raise ValueError(f"malformed tensor reference {obj!r}")
            shape = cfg.get("shape")
            if shape is not None:
                shape = tuple(None if d is None else int(d) for d in shape[1:])
            yield (str(hist[0]), int(hist[1]), int(hist[2])), shape
            return
        for v in obj.values():
            yield from _tensor_refs(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensor_refs(v)


def _declared_input_shape(entry: dict) -> tuple[int | None, ...] | None:
    """The input shape (without the batch axis) a layer entry's `build_config` records, when it
    is one flat shape; None otherwise (a multi-input layer, a malformed entry: the shape is a
    hint, never required)."""
    build = entry.get("build_config")
    shape = build.get("input_shape") if isinstance(build, dict) else None
    if not isinstance(shape, (list, tuple)) or not shape or not all(
        d is None or (isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_AXIS_LENGTH)
        for d in shape
    ):
        return None
    return tuple(shape[1:])


def _ref_list(obj: Any) -> list[TensorRef]:
    """`input_layers` / `output_layers` entries: one [name, node, index] or nested lists."""
    if isinstance(obj, dict):
        return [r for v in obj.values() for r in _ref_list(v)]
    if (
        isinstance(obj, (list, tuple))
        and len(obj) == 3
        and isinstance(obj[0], str)
        and isinstance(obj[1], int)
    ):
        return [(obj[0], int(obj[1]), int(obj[2]))]
    if isinstance(obj, (list, tuple)):
        return [r for v in obj for r in _ref_list(v)]
    raise ValueError(f"unexpected tensor reference {obj!r}")


# A file's inputs are labelled index by index (about 1 KB per index, phi table included):
# 17 KB declaring an input [None, 2**26] would take tens of GB. Real inputs stay far below this
# (a 262144-column input still fits, in about 250 MB); a live model is not budgeted.
MAX_FILE_INPUT_INDICES = 1 << 18


class _Builder:
    """Parses a (possibly nested) model config into a flat `ModelGraph`."""

    def __init__(self, weight_paths, resolve, description, aliases=None):
        self.weight_paths = weight_paths
        self.resolve = resolve
        self.description = description
        self.aliases: dict[str, str] = dict(aliases or {})
        # A file's nested registered models (keras-hub backbones saved as their constructor
        # arguments) are built to read their graph (`expand_registered`): their operations by
        # graph name, which resolve the classes of their layers, and what describing them
        # had to work around, for the graph's warnings.
        self.expand_registered = False
        self.objects: dict[str, Any] = {}
        self.notes: list[str] = []
        self.layers: dict[str, LayerNode] = {}
        self.shapes: dict[TensorRef, tuple] = {}
        self.alias: dict[TensorRef, TensorRef] = {}
        self.inputs: list[InputSpec] = []
        self.nested: dict[str, str] = {}
        # Indices the model's inputs declare, over all their axes (a file's are budgeted).
        self.input_indices = 0
        self.input_budget: int | None = None

    def canonical(self, ref: TensorRef) -> TensorRef:
        while ref in self.alias:
            ref = self.alias[ref]
        return ref

    def entry_fields(
        self, entry: dict, where: str
    ) -> tuple[str, str, str | None, str | None, dict]:
        if not isinstance(entry, dict) or "class_name" not in entry:
            raise SurgeryFileError(f"{self.description}: malformed layer entry in {where}.")
        cfg = entry.get("config") or {}
        if not isinstance(cfg, dict):
            raise SurgeryFileError(f"{self.description}: layer config must be a mapping.")
        name = entry.get("name") or cfg.get("name")
        if not isinstance(name, str):
            raise SurgeryFileError(f"{self.description}: a layer in {where} has no name.")
        return name, str(entry["class_name"]), entry.get("module"), entry.get(
            "registered_name"
        ), cfg

    def check_unique(self, name: str, seen: set[str]) -> None:
        """Keras names the layers of one model uniquely; a second entry of one name (an input
        declared twice) would be read as a second call of the first."""
        if name in seen:
            raise SurgeryFileError(
                f"{self.description}: layer name '{name}' appears twice in one model config; "
                "expected unique layer names, as Keras writes them."
            )
        seen.add(name)

    def resolve_class(self, name, module, class_name, registered) -> type | None:
        """`resolve`, with a refused class name reported against the file; the layers of a
        nested registered model built from a file have the classes of its operations."""
        op = self.objects.get(name)
        if op is not None:
            return type(op)
        try:
            return self.resolve(name, module, class_name, registered)
        except SurgeryFileError as exc:
            raise SurgeryFileError(f"{self.description}: {exc}") from exc

    def registered_model_config(self, name: str, class_name: str, registered: str | None,
                                cfg: dict) -> dict:
        """The functional graph config of a nested entry that a file saved as the constructor
        arguments of a registered Functional subclass (a keras-hub backbone under the user's
        head), built from them as a top-level one is (`model_from_registered_config`, under
        the rules of ARCHITECTURE.md section 6); `cfg` itself for any other entry.

        Args:
            name: the entry's graph name ("outer/backbone").
            class_name: the entry's class name.
            registered: the entry's registered name ("keras_hub>GPT2Backbone").
            cfg: the entry's config.

        Returns:
            The config to read the entry with: a nested model config when it was built.

        Raises:
            SurgeryFileError: the class is registered but cannot be built from `cfg`.
        """
        if not self.expand_registered or not isinstance(registered, str) or is_model_config(
                class_name, cfg):
            return cfg
        where = f"{self.description}: layer '{name}'"
        # A registered subclassed model has no graph to read from a file: one opaque layer,
        # as the same model nested in a live one is.
        model = model_from_registered_config({"registered_name": registered, "config": cfg},
                                             where, subclassed_ok=True)
        if model is None:
            return cfg
        with readable_configs(model) as notes:  # get_config raises (Gemma)
            graph_config = _graph_config(model)
        self.notes.extend(f"{where}: {note}" for note in notes)
        objects = _live_operations(model, name + "/")
        self.objects.update(objects)
        self.objects[name] = model
        self.aliases.update(_shared_across_models(objects))
        return graph_config

    def new_layer(self, name, class_name, module, registered, cfg, group) -> LayerNode:
        cls = self.resolve_class(name, module, class_name, registered)
        node = LayerNode(name, class_name, module, registered, cfg, cls, group)
        self.layers[name] = node
        return node

    def add_model(
        self,
        class_name: str,
        cfg: dict,
        prefix: str,
        group_prefix: str,
        bound_inputs: list[TensorRef] | None,
    ) -> list[TensorRef]:
        """Adds the layers of a model config; returns its output tensor refs."""
        if class_name == "Sequential":
            return self.add_sequential(cfg, prefix, group_prefix, bound_inputs)
        return self.add_functional(cfg, prefix, group_prefix, bound_inputs)

    def group_namer(self) -> Callable[[str], str]:
        from keras.src.utils import naming

        used: dict[str, int] = {}

        def name_for(class_name: str) -> str:
            base = naming.to_snake_case(class_name)
            n = used.get(base, 0)
            used[base] = n + 1
            return base if n == 0 else f"{base}_{n}"

        return name_for

    def add_sequential(self, cfg, prefix, group_prefix, bound_inputs) -> list[TensorRef]:
        entries = cfg.get("layers")
        if not isinstance(entries, list):
            raise SurgeryFileError(f"{self.description}: Sequential config without layers.")
        group_name = self.group_namer()
        current: TensorRef | None = None
        rest = entries
        if entries and entries[0].get("class_name") == "InputLayer":
            name, _, _, _, icfg = self.entry_fields(entries[0], "Sequential")
            shape = icfg.get("batch_shape") or icfg.get("batch_input_shape")
            rest = entries[1:]
        else:
            name, shape = "input_layer", cfg.get("build_input_shape")
        if shape is None:
            raise SurgeryFileError(
                f"{self.description}: Sequential model has no input shape (no InputLayer and "
                "no build_input_shape)."
            )
        current = self.add_input(prefix + name, shape, bound_inputs, 0)
        seen: set[str] = set()
        for entry in rest:
            name, class_name, module, registered, lcfg = self.entry_fields(entry, "Sequential")
            self.check_unique(prefix + name, seen)
            lcfg = self.registered_model_config(prefix + name, class_name, registered, lcfg)
            # A Sequential config has no tensors to carry shapes; each built layer's
            # build_config says what it reads, the shape of the tensor before it (a layer
            # without a rule, such as a Lambda, is labelled from its output shape).
            declared = _declared_input_shape(entry)
            if declared is not None:
                self.shapes.setdefault(current, declared)
            group = f"{group_prefix}layers/{group_name(class_name)}"
            outs = self.add_layer_call(
                prefix + name, class_name, module, registered, lcfg, entry, group, [current], {}
            )
            current = outs[0]
        return [current]

    def add_input(self, name, batch_shape, bound_inputs, index) -> TensorRef:
        ref = (name, 0, 0)
        if bound_inputs is not None:
            if index >= len(bound_inputs):
                raise SurgeryFileError(f"{self.description}: nested model '{name}' input count.")
            self.alias[ref] = bound_inputs[index]
            return self.canonical(ref)
        shape = tuple(None if d is None else int(d) for d in list(batch_shape)[1:])
        if any(d is not None and not 0 <= d <= MAX_AXIS_LENGTH for d in shape):
            raise SurgeryFileError(
                f"{self.description}: input '{name}' declares shape {shape}; at most "
                f"{MAX_AXIS_LENGTH} indices per axis are accepted."
            )
        self.input_indices += sum(d for d in shape if d is not None)
        if self.input_budget is not None and self.input_indices > self.input_budget:
            raise SurgeryFileError(
                f"{self.description}: input '{name}' declares shape {shape}, which brings the "
                f"model's inputs to {self.input_indices} indices, more than the "
                f"{self.input_budget} a file may declare (each index is labelled, about 1 KB "
                "each). If the file is trusted, raise keras_surgery.graph.MAX_FILE_INPUT_INDICES."
            )
        self.shapes[ref] = shape
        self.inputs.append(InputSpec(name, shape, "float32"))
        return ref

    def add_functional(self, cfg, prefix, group_prefix, bound_inputs) -> list[TensorRef]:
        entries = cfg.get("layers")
        if not isinstance(entries, list):
            raise SurgeryFileError(f"{self.description}: model config without layers.")
        group_name = self.group_namer()
        input_refs = _ref_list(cfg.get("input_layers", []))
        input_order = {ref[0]: i for i, ref in enumerate(input_refs)}
        pending: list[tuple] = []
        seen: set[str] = set()
        for entry in entries:
            name, class_name, module, registered, lcfg = self.entry_fields(entry, "model")
            self.check_unique(prefix + name, seen)
            lcfg = self.registered_model_config(prefix + name, class_name, registered, lcfg)
            cls = self.resolve_class(prefix + name, module, class_name, registered)
            is_layer = _is_layer_class(cls, module)
            group = f"{group_prefix}layers/{group_name(class_name)}" if is_layer else None
            if class_name == "InputLayer":
                shape = lcfg.get("batch_shape") or lcfg.get("batch_input_shape")
                if name not in input_order or shape is None:
                    raise SurgeryFileError(
                        f"{self.description}: input layer '{name}' is not a model input."
                    )
                self.add_input(prefix + name, shape, bound_inputs, input_order[name])
                if bound_inputs is None:
                    self.inputs[-1] = InputSpec(
                        prefix + name, self.inputs[-1].shape, str(lcfg.get("dtype", "float32"))
                    )
                continue
            pending.append((name, class_name, module, registered, lcfg, entry, group))
        # Config node indices are per config; a nested model called twice appends a second set of
        # calls to its inner layers, so translate (layer, node index) to the actual call index.
        call_of: dict[tuple[str, int], int] = {}
        output_call_of: dict[tuple[str, int], int] = {}

        def translate(r: TensorRef) -> TensorRef:
            name = self.aliases.get(prefix + r[0], prefix + r[0])
            return self.canonical((name, call_of.get((name, r[1]), r[1]), r[2]))

        for name, class_name, module, registered, lcfg, entry, group in pending:
            nodes = entry.get("inbound_nodes") or []
            # A layer the outer model shares with a nested one: its calls go to one node.
            full = self.aliases.get(prefix + name, prefix + name)
            for call_index, node in enumerate(nodes):
                kwargs = node.get("kwargs") or {}
                refs: list[TensorRef] = []
                kwarg_inputs: dict[str, list[int]] = {}
                for key, value in [(None, node.get("args", []))] + list(kwargs.items()):
                    for r, shape in _tensor_refs(value):
                        ref = translate(r)
                        if shape is not None:
                            self.shapes.setdefault(ref, shape)
                        if key is not None:
                            kwarg_inputs.setdefault(key, []).append(len(refs))
                        refs.append(ref)
                existing = self.layers.get(full)
                actual = len(existing.calls) if existing is not None else 0
                if is_model_config(class_name, lcfg):
                    actual = call_index
                    if class_name != "Sequential":
                        # Keras writes a nested Functional model's outputs in `output_layers`
                        # by its own node index, which counts the model's creation node first.
                        output_call_of[(full, call_index + 1)] = actual
                call_of[(full, call_index)] = actual
                self.add_layer_call(
                    full, class_name, module, registered, lcfg, entry, group, refs,
                    {k: v for k, v in kwargs.items() if k not in kwarg_inputs},
                    call_index=actual,
                    kwarg_inputs=kwarg_inputs,
                    args=node.get("args", []),
                )
        def translate_output(r: TensorRef) -> TensorRef:
            name = self.aliases.get(prefix + r[0], prefix + r[0])
            actual = output_call_of.get((name, r[1]))
            return translate(r) if actual is None else self.canonical((name, actual, r[2]))

        return [translate_output(r) for r in _ref_list(cfg.get("output_layers", []))]

    def add_layer_call(
        self, name, class_name, module, registered, cfg, entry, group, inputs, kwargs,
        call_index: int = 0, kwarg_inputs: dict[str, list[int]] | None = None,
        args: Any = None,
    ) -> list[TensorRef]:
        if is_model_config(class_name, cfg):
            self.nested.setdefault(name, class_name)
            outs = self.add_model(class_name, cfg, name + "/", group + "/", inputs)
            for t, inner in enumerate(outs):
                self.alias[(name, call_index, t)] = inner
            return [self.canonical((name, call_index, t)) for t in range(len(outs))]
        node = self.layers.get(name) or self.new_layer(
            name, class_name, module, registered, cfg, group
        )
        node.calls.append(Call(list(inputs), kwargs, dict(kwarg_inputs or {}),
                               list(args) if isinstance(args, (list, tuple)) else []))
        # Sequential chains have no keras_history; refer to the call we just added.
        return [(name, len(node.calls) - 1, 0)]

    def attach_weights(self) -> None:
        groups = {n.group: n for n in self.layers.values() if n.group}
        for path, (shape, dtype) in self.weight_paths.items():
            parts = path.split("/")
            for cut in range(len(parts) - 1, 0, -1):
                owner = groups.get("/".join(parts[:cut]))
                if owner is not None:
                    owner.weights.append(
                        WeightSpec(path, "/".join(parts[cut:]), tuple(shape), dtype)
                    )
                    break
        for node in self.layers.values():
            node.weights.sort(key=lambda w: _store_sort_key(w.local))


def is_model_config(class_name: str, cfg: Any) -> bool:
    """Whether a layer entry is a nested model to expand: a Functional or Sequential config, or
    the functional graph of a Functional subclass (a keras-hub backbone inside a task model,
    see `functional_graph_config`), which keeps its class name for its weights group."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list):
        return False
    return class_name in NESTED_MODEL_CLASSES or (
        "input_layers" in cfg and "output_layers" in cfg
    )


def _store_sort_key(local: str) -> tuple:
    # "vars/10" after "vars/2"; a layer's own vars before its sublayers' (Keras saves them so).
    parts = local.split("/")
    return (len(parts) > 2, [(0, int(p)) if p.isdigit() else (1, p) for p in parts])


@gc_paused
def build_graph(
    config: dict,
    source: WeightSource,
    *,
    resolve: Callable[[str, str | None, str, str | None], type | None] | None = None,
    description: str = "model",
    aliases: Mapping[str, str] | None = None,
) -> ModelGraph:
    """Parses a Keras 3 model config (with class_name and config keys) into a ModelGraph.

    A config that holds only the constructor arguments of a registered Functional subclass
    (a keras-hub backbone saved to a `.keras` file), at the top or nested at any depth in the
    user's model, is described by the graph of that class built from them
    (`model_from_registered_config`); a nested one is spliced in as a nested model, so its
    weights are read by their paths in the file.

    Args:
        config: the model config, as `config.json` holds it.
        source: the weights, by store path.
        resolve: (graph name, module, class name, registered name) -> the layer's class.
        description: how to name the model in messages.
        aliases: graph names of a layer that appears under several names -> its first name
            (see `_shared_across_models`).

    Raises:
        SurgeryFileError: the config is not a Keras 3 Functional or Sequential model.
    """
    if not isinstance(config, dict) or "config" not in config:
        raise SurgeryFileError(f"{description}: config is not a serialized Keras model.")
    class_name = config.get("class_name")
    known = isinstance(class_name, str) and class_name in NESTED_MODEL_CLASSES  # may be a list
    notes: list[str] = []
    if not known and resolve is None:
        model = model_from_registered_config(config, description)
        if model is not None:
            with readable_configs(model) as config_notes:  # get_config raises (Gemma)
                config = {"class_name": "Functional", "config": _graph_config(model)}
            notes = [f"{description}: {note}" for note in config_notes]
            class_name, known = "Functional", True
            objects = _live_operations(model)
            resolve, aliases = _resolver(objects), _shared_across_models(objects)
    inner = config["config"]
    if not known or not isinstance(inner, dict):
        registered = config.get("registered_name")
        refusal = subclassed_file_error(registered, description)
        if refusal is not None:
            raise refusal
        hint = (f" If {registered!r} is a model class of an installed package (keras_hub), "
                "import that package first." if isinstance(registered, str)
                and ">" in registered else "")
        raise SurgeryFileError(
            f"{description}: expected a Functional or Sequential model config. "
            f"Received: class_name={class_name!r}.{hint}"
        )
    resolve = resolve or (lambda name, module, cls, reg: resolve_keras_class(module, cls, name))
    builder = _Builder(source.paths(), resolve, description, aliases)
    if not isinstance(source, LiveWeights):  # a file: its declared sizes are budgeted
        builder.input_budget = MAX_FILE_INPUT_INDICES
        builder.expand_registered = True
    try:
        outputs = builder.add_model(class_name, inner, "", "", None)
        builder.attach_weights()
        input_names = {i.name for i in builder.inputs}
        order = _topological_calls(builder.layers, input_names, description)
        producers = {(name, ci) for name, node in builder.layers.items()
                     for ci in range(len(node.calls))}
        for ref in outputs:
            if not _produced(ref, producers, input_names):
                raise SurgeryFileError(
                    f"{description}: model output {list(ref)} is not a tensor of the model."
                )
    except (
        AttributeError, IndexError, KeyError, TypeError, ValueError, ArithmeticError,
        RecursionError,
    ) as exc:
        # The config is data from a file: a field of the wrong type or shape is a malformed
        # file, not a bug to surface as a bare Python error.
        raise SurgeryFileError(
            f"{description}: malformed model config, expected the layout Keras 3 writes "
            f"({type(exc).__name__}: {exc})."
        ) from exc
    return ModelGraph(
        name=str(inner.get("name", "model")),
        inputs=builder.inputs,
        outputs=outputs,
        layers=builder.layers,
        order=order,
        tensor_shapes=builder.shapes,
        source=source,
        description=description,
        nested=builder.nested,
        warnings=notes + builder.notes,
    )


def _produced(
    ref: TensorRef, producers: set[tuple[str, int]], input_names: set[str]
) -> bool:
    """Whether a tensor reference names a model input (its only tensor) or a layer call."""
    if ref[0] in input_names:
        return ref[1] == 0 and ref[2] == 0
    return ref[2] >= 0 and (ref[0], ref[1]) in producers


def _topological_calls(
    layers: dict[str, LayerNode], input_names: set[str], description: str
) -> list[tuple[str, int]]:
    producers = {(name, ci) for name, node in layers.items() for ci in range(len(node.calls))}
    deps: dict[tuple[str, int], set[tuple[str, int]]] = {}
    for name, node in layers.items():
        for ci, call in enumerate(node.calls):
            needed = set()
            for ref in call.inputs:
                if not _produced(ref, producers, input_names):
                    raise SurgeryFileError(
                        f"{description}: layer '{name}' reads tensor {list(ref)} that no layer "
                        "produces."
                    )
                if ref[0] not in input_names:
                    needed.add((ref[0], ref[1]))
            deps[(name, ci)] = needed
    return _by_depth(deps, description)


def _by_depth(
    deps: dict[tuple[str, int], set[tuple[str, int]]], description: str
) -> list[tuple[str, int]]:
    """The calls by depth (a call's depth is one more than its deepest input's), in config
    order within a depth: Kahn's algorithm, each call and edge visited once, so linear in the
    graph's size (re-scanning the calls not yet placed was quadratic: 98 s for a chain of 32k
    layers)."""
    position = {call: i for i, call in enumerate(deps)}
    waiting = {call: len(needed) for call, needed in deps.items()}
    readers: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for call, needed in deps.items():
        for producer in needed:
            readers.setdefault(producer, []).append(call)
    depth = {call: 0 for call, n in waiting.items() if n == 0}
    queue = collections.deque(depth)
    while queue:
        call = queue.popleft()
        for reader in readers.get(call, ()):
            depth[reader] = max(depth.get(reader, 0), depth[call] + 1)
            waiting[reader] -= 1
            if waiting[reader] == 0:
                queue.append(reader)
    stuck = [call for call, n in waiting.items() if n > 0]
    if stuck:
        raise SurgeryFileError(
            f"{description}: the layer graph has a cycle: layer '{stuck[0][0]}' and "
            f"{len(stuck) - 1} other call(s) wait on their own outputs."
        )
    return sorted(deps, key=lambda call: (depth[call], position[call]))


def strategy_scope(model: Any) -> Any:
    """The distribution-strategy scope `model`'s variables were created in (TensorFlow's
    MirroredStrategy and friends), or a no-op scope; optimizer variables must be built in it."""
    import contextlib

    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or not hasattr(strategy, "scope"):
        return contextlib.nullcontext()
    return strategy.scope()
