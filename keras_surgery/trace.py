"""Subclassed keras.Model tracing into functional graphs, and readable configs for live layers.

A subclassed model (layers as attributes, wiring in `call`) has no graph in its config. Calling
its `call` on `keras.Input` tensors makes Keras record a node on every Keras layer it calls,
and `keras.Model(inputs, outputs)` over those tensors is a Functional model whose operations
are the model's own layer objects, so their variables are the model's variables. The nodes the
trace adds are removed again when the trace ends: the user's model is left as it was.

This module reads Keras private attributes (`_inbound_nodes`, `_build_shapes_dict`,
`_flatten_layers`) only to trace; graph.py turns the traced models into the IR.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import linecache
import logging
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from keras_surgery.errors import SurgeryError, SurgeryFileError

logger = logging.getLogger(__name__)
_MISSING = object()

# Packages whose frames are not "the user's code" when a trace fails.
_LIBRARY_PACKAGES = ("keras", "tensorflow", "jax", "jaxlib", "torch", "numpy", "optree",
                     "keras_surgery", "keras_hub")


@dataclass
class TracedModel:
    """A subclassed model traced into a Functional model over its own layer objects.

    Attributes:
        model: the subclassed model.
        functional: the Functional model; its operations are `model`'s layers.
        nested: graph names of nested subclassed models (called in `call`) -> their traces.
    """

    model: Any
    functional: Any
    nested: dict[str, TracedModel] = field(default_factory=dict)


def is_subclassed_model(model: Any) -> bool:
    """Whether `model` is a subclassed keras.Model: neither Functional (keras-hub backbones
    are Functional subclasses) nor Sequential, so its wiring lives only in `call`."""
    import keras
    from keras.src.models.functional import Functional

    return isinstance(model, keras.Model) and not isinstance(
        model, (Functional, keras.Sequential)
    )


@contextlib.contextmanager
def traced(model: Any) -> Iterator[TracedModel]:
    """Traces a built subclassed model (and the subclassed models it calls) for the block.

    Args:
        model: a built subclassed keras.Model.

    Yields:
        The TracedModel; valid only inside the block.

    Raises:
        SurgeryError: the model's input shapes are unknown, or `call` does something that
            cannot be followed on symbolic tensors (a raw `tf.*`/`jnp.*`/`torch.*` op, Python
            control flow on tensor values); the message names the model and that line.

    Example:
        >>> with traced(model) as trace:                                 # doctest: +SKIP
        ...     names = [op.name for op in trace.functional.operations]
    """
    from keras.src.backend.common import global_state

    names = copy.copy(global_state.get_global_attribute("object_name_uids"))
    nodes = _node_counts(model)
    try:
        inputs = symbolic_inputs(model)
        yield _trace(model, inputs)
    finally:
        _restore_nodes(nodes)
        global_state.set_global_attribute("object_name_uids", names)


def _trace(model: Any, inputs: tuple[list, dict[str, Any]]) -> TracedModel:
    """Calls `model.call` on symbolic `inputs` (args, kwargs) and wraps the result, then traces
    every nested subclassed model the same way, on the tensors it was called with."""
    from keras.src import tree
    from keras.src.models.functional import Functional

    args, kwargs = inputs
    try:
        outputs = model.call(*args, **kwargs)
        flat_inputs = tree.flatten((args, kwargs))
        functional = Functional(
            flat_inputs if len(flat_inputs) > 1 or not args else args[0], outputs,
            name=model.name,
        )
    except SurgeryError:
        raise
    except Exception as exc:
        raise SurgeryError(_untraceable_message(model, exc)) from exc
    result = TracedModel(model, functional)
    for op in functional.operations:
        if is_subclassed_model(op) and op is not model:
            node = next(n for n in op._inbound_nodes if n in _own_nodes(functional))
            result.nested[op.name] = _trace(op, _inputs_like(node))
    return result


def _own_nodes(functional: Any) -> list[Any]:
    return [n for op in functional.operations for n in op._inbound_nodes
            if _node_key(op, n) in functional._nodes]


def _node_key(op: Any, node: Any) -> str:
    from keras.src.ops.function import make_node_key

    return make_node_key(op, op._inbound_nodes.index(node))


def _inputs_like(node: Any) -> tuple[list, dict[str, Any]]:
    """Fresh `keras.Input`s shaped like the tensors of a recorded call, in its structure."""
    import keras
    from keras.src import tree

    def fresh(x: Any) -> Any:
        if isinstance(x, keras.KerasTensor):
            return keras.Input(batch_shape=x.shape, dtype=x.dtype, sparse=x.sparse)
        return x

    args = tree.map_structure(fresh, list(node.arguments.args))
    kwargs = tree.map_structure(fresh, dict(node.arguments.kwargs))
    return args, kwargs


def symbolic_inputs(model: Any) -> tuple[list, dict[str, Any]]:
    """`keras.Input`s for a built subclassed model's `call`, as (args, kwargs).

    The shapes are those `build()` recorded (`model._build_shapes_dict`: Keras records them
    when the model is built by `build(shape)` or by its first call), else those of the first
    symbolic call of the model. Dict inputs are named by their keys; other inputs get Keras's
    automatic input names, as an unnamed `keras.Input` of a Functional model would.

    Raises:
        SurgeryError: the model recorded no input shape.
    """
    shapes = getattr(model, "_build_shapes_dict", None)
    if not shapes and getattr(model, "_inbound_nodes", None):
        return _inputs_like(model._inbound_nodes[0])
    if not shapes:
        raise SurgeryError(
            f"Model '{model.name}' (subclassed {type(model).__name__}) has no recorded input "
            "shape to trace its call() with (Keras records none when a first eager call "
            "builds the model and call() cannot run on symbolic tensors): call "
            "model.build(input_shape) before surgery."
        )
    counter = iter(range(1 << 30))
    if list(shapes) == ["input_shape"]:
        _check_single_argument(model)
        return [_inputs_for(shapes["input_shape"], None, counter)], {}
    # Several call arguments: build() got them as `<argument>_shape` keywords.
    kwargs = {}
    for key, shape in shapes.items():
        argument = key[: -len("_shape")] if key.endswith("_shape") else key
        kwargs[argument] = _inputs_for(shape, argument, counter)
    return [], kwargs


def _check_single_argument(model: Any) -> None:
    """Keras records one input shape for a model built by a call with several positional
    tensors (the first one's): such a model cannot be traced from what was recorded."""
    try:
        parameters = list(inspect.signature(model.call).parameters.values())
    except (TypeError, ValueError):
        return
    required = [p.name for p in parameters if p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) > 1:
        raise SurgeryError(
            f"Model '{model.name}' (subclassed {type(model).__name__}): call() takes "
            f"{len(required)} tensor arguments ({', '.join(required)}) but Keras recorded the "
            "input shape of the first one only, so call() cannot be traced. Give call() one "
            "argument holding a list or dict of tensors."
        )


def _is_shape(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(
        d is None or isinstance(d, int) for d in value
    )


def _inputs_for(shapes: Any, name: str | None, counter: Iterator[int]) -> Any:
    """One `keras.Input` per shape in a nested structure of shapes (batch axis made None)."""
    import keras

    if isinstance(shapes, dict):
        return {k: _inputs_for(v, str(k), counter) for k, v in shapes.items()}
    if _is_shape(shapes):
        if name is None:
            index = next(counter)
            name = "input_layer" if index == 0 else f"input_layer_{index}"
        return keras.Input(batch_shape=(None, *tuple(shapes)[1:]), name=name)
    if isinstance(shapes, (list, tuple)):
        return type(shapes)(
            _inputs_for(v, None if name is None else f"{name}_{i}", counter)
            for i, v in enumerate(shapes)
        )
    raise SurgeryError(f"Unexpected recorded input shape {shapes!r}.")


def _node_counts(model: Any) -> list[tuple[Any, int, int]]:
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    return [(layer, len(layer._inbound_nodes), len(layer._outbound_nodes)) for layer in layers]


def _restore_nodes(counts: list[tuple[Any, int, int]]) -> None:
    # Keras only ever appends nodes, so cutting each list back to its length before the trace
    # removes exactly the nodes the trace recorded (a later fit/save must not see them).
    for layer, inbound, outbound in counts:
        del layer._inbound_nodes[inbound:]
        del layer._outbound_nodes[outbound:]


def _untraceable_message(model: Any, exc: BaseException) -> str:
    """Names the model and the first line of user code that failed on symbolic tensors."""
    where = _user_frame(exc.__traceback__)
    line = ""
    if where is not None:
        filename, lineno, function = where
        source = linecache.getline(filename, lineno).split("  #")[0].strip()
        line = (f" The first operation that could not be followed is `{source}` in "
                f"{function}() ({os.path.basename(filename)}:{lineno}).")
    return (
        f"Model '{model.name}' (subclassed {type(model).__name__}) cannot be traced on symbolic "
        f"inputs to read its graph.{line} Use Keras layers and keras.ops in call() (no raw "
        "backend ops, no Python control flow on tensor values), or give its layers a rule "
        f"through a custom Keras layer. ({type(exc).__name__}: {exc})"
    )


def _user_frame(tb: types.TracebackType | None) -> tuple[str, int, str] | None:
    roots = _library_roots()
    found = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not any(filename.startswith(root) for root in roots) and os.path.exists(filename):
            found = (filename, tb.tb_lineno, tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return found


def _library_roots() -> list[str]:
    roots = [os.path.dirname(contextlib.__file__)]  # the standard library
    for package in _LIBRARY_PACKAGES:
        module = sys.modules.get(package)
        if module is not None and getattr(module, "__file__", None):
            roots.append(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    return roots


# -- layers whose get_config() fails ---------------------------------------------------------


@contextlib.contextmanager
def readable_configs(model: Any) -> Iterator[list[str]]:
    """For the block, every layer of `model` whose `get_config()` raises answers with the
    config of the nearest base class that can give one, completed by the constructor arguments
    the layer keeps as attributes, so the model's graph can still be described (a rule that
    still misses a key makes the layer opaque, with a warning naming it).

    keras-hub 0.32's LlamaTransformerDecoder is one: its get_config reads an attribute its
    constructor never sets.

    Yields:
        One message per layer whose config was replaced, naming it and the error.

    Example:
        >>> with readable_configs(model) as notes:                       # doctest: +SKIP
        ...     config = model.get_config()
    """
    with tensorflow_unprobed(), _patched_configs(model) as notes:
        yield notes


@contextlib.contextmanager
def _patched_configs(model: Any) -> Iterator[list[str]]:
    patched: list[tuple[Any, Any]] = []  # (layer, its own instance attribute or _MISSING)
    notes: list[str] = []
    try:
        for layer in model._flatten_layers(include_self=False, recursive=True):
            error = _config_error(layer)
            if error is None:
                continue
            patched.append((layer, layer.__dict__.get("get_config", _MISSING)))
            object.__setattr__(layer, "get_config", _fallback_config(layer))
            first = (error.strip().splitlines() or [""])[0].rstrip(": ")
            notes.append(
                f"layer '{layer.name}' ({type(layer).__name__}): get_config() failed ({first});"
                " its config was read from its base class and its attributes instead"
            )
            logger.warning("%s: %s", model.name, notes[-1])
        yield notes
    finally:
        for layer, own in patched:
            if own is _MISSING:
                object.__delattr__(layer, "get_config")
            else:
                object.__setattr__(layer, "get_config", own)


@contextlib.contextmanager
def tensorflow_unprobed() -> Iterator[None]:
    """For the block, Keras's serialization does not import TensorFlow to ask whether a value
    is one of its types, when TensorFlow has not been imported yet.

    `serialize_keras_object` asks `module_utils.tensorflow.available` (for tf.TensorShape,
    tf.DType and tf.TypeSpec values), which imports TensorFlow when it is installed: on JAX
    and PyTorch, with TensorFlow next to them (Colab), the first `get_config` of a migration
    cost 4-7 s and about 400 MB. No value can be of a type of a module that is not imported,
    so the answer False is exact; the question is put back unanswered afterwards, so
    whatever asks it later gets Keras's own answer.
    """
    from keras.src.utils import module_utils

    lazy = getattr(module_utils, "tensorflow", None)
    if "tensorflow" in sys.modules or getattr(lazy, "_available", True) is not None:
        yield  # already imported or already answered: nothing to spare
        return
    lazy._available = False
    try:
        yield
    finally:  # unanswered again, even if something imported TensorFlow meanwhile
        lazy._available = None


def _config_error(layer: Any) -> str | None:
    try:
        layer.get_config()
    except Exception as exc:  # any failure of a third-party get_config
        return f"{type(exc).__name__}: {exc}"
    return None


def _fallback_config(layer: Any) -> Callable[[], dict[str, Any]]:
    """The config of the first class in `layer`'s MRO whose get_config works on it, with each
    constructor argument of `layer`'s class that the layer keeps as an attribute of the same
    name (keras-hub's convention: `self.intermediate_dim = intermediate_dim`)."""

    def get_config() -> dict[str, Any]:
        config = {"name": layer.name, "trainable": layer.trainable}
        for cls in type(layer).__mro__:
            method = cls.__dict__.get("get_config")
            if method is None:
                continue
            try:
                config = dict(method(layer))
                break
            except Exception:  # noqa: S112 - the next base class may do better
                continue
        return {**_attribute_arguments(layer), **config}

    return get_config


def _attribute_arguments(layer: Any) -> dict[str, Any]:
    from keras.src.saving import serialization_lib

    found: dict[str, Any] = {}
    try:
        parameters = inspect.signature(type(layer).__init__).parameters.values()
    except (TypeError, ValueError):
        return found
    for parameter in parameters:
        if parameter.name == "self" or parameter.kind in (
            parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD
        ) or parameter.name not in layer.__dict__:
            continue
        value = layer.__dict__[parameter.name]
        if value is None or isinstance(value, (bool, int, float, str)):
            found[parameter.name] = value
            continue
        try:  # activations, initializers: as Keras writes them
            found[parameter.name] = serialization_lib.serialize_keras_object(value)
        except Exception:  # noqa: S112 - an attribute Keras cannot write is left out
            continue
    return found


# -- files -------------------------------------------------------------------------------


def subclassed_file_error(
    registered: Any, description: str
) -> SurgeryFileError | None:
    """The refusal for a `.keras` file of a registered, imported subclassed model class.

    Such a file holds the constructor arguments, not a graph; the graph exists only by running
    the class's `call`, which ARCHITECTURE.md section 6 does not do for files. None when
    `registered` does not name such a class.
    """
    import keras
    from keras.src.models.functional import Functional

    if not isinstance(registered, str):
        return None
    cls = keras.saving.get_registered_object(registered)
    if not (inspect.isclass(cls) and issubclass(cls, keras.Model)) or issubclass(
        cls, (Functional, keras.Sequential)
    ):
        return None
    return SurgeryFileError(
        f"{description}: {registered} is a subclassed keras.Model; its file holds no graph "
        "and keras-surgery does not deserialise files. Pass the live model instead: load it "
        "yourself (keras.saving.load_model) and give that model as the old side, or give an "
        "instance built by your code with old_weights= pointing at its weights."
    )
