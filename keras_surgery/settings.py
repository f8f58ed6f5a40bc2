"""Which settings of a matched layer changed what it computes, as its rule declared them."""

from __future__ import annotations

import inspect
from typing import Any

from keras_surgery import rules as _rules  # noqa: F401 - registers the built-in rules' keys
from keras_surgery.graph import LayerNode, resolve_keras_class
from keras_surgery.registry import find_registration
from keras_surgery.rules.elementwise import serialized_constant

# Layers of Keras and keras-hub that have no rule are opaque, and an opaque layer whose inputs
# did not change still gets its weights copied, so its settings must still be compared. For
# such layers, and only for them, these lists stand in for the keys a rule declares: the config
# keys that change what some layer of the package computes at inference, whatever the sizes
# are (sizes, initialisers, regularisers, dropout rates, momentum, `stateful` and
# `return_state` are left out). A custom layer without a rule has none: its config keys mean
# what its author chose.
UNREGISTERED_KERAS_KEYS = frozenset({
    "activation", "recurrent_activation", "approximate", "negative_slope", "max_value",
    "threshold", "alpha", "theta", "epsilon", "invert", "strides", "dilation_rate", "padding",
    "data_format", "pool_size", "size", "interpolation", "cropping", "keepdims", "axis", "axes",
    "return_sequences", "go_backwards", "reset_after", "merge_mode", "use_scale", "score_mode",
    "mask_zero", "output_mode", "normalize", "equation", "bias_axes", "scale", "offset",
    "use_bias", "center", "rms_scaling", "attention_axes",
})
UNREGISTERED_KERAS_HUB_KEYS = frozenset({"activation", "layer_norm_epsilon", "normalize_first"})

# Config entries that hold a whole wrapped layer or cell (Bidirectional, TimeDistributed, RNN).
_NESTED_LAYER_KEYS = ("layer", "cell", "forward_layer", "backward_layer")


def changed_settings_warning(name: str, node: LayerNode, old_node: LayerNode) -> str | None:
    """The warning for a matched layer whose declared settings differ between its old and new
    configs, or None when none of them changed.

    The weights of such a layer are still carried over (its sizes and orders are the rule's
    business), but the old outputs change: "layer 'h1' (Dense) changed its activation: 'relu'
    -> 'tanh'; ...". Settings of wrapped layers are named by their path ("layer.activation").

    Args:
        name: the layer's name in the new model, for the message.
        node: the layer in the new model; its registration says which keys count.
        old_node: the layer it was matched to in the old model.
    """
    keys = _function_keys(node.cls, node.class_name, node.module, node.registered_name)
    new_settings = _settings(node.config, keys)
    old_settings = _settings(old_node.config, keys)
    # A key only one side has (a Keras version that added it) says nothing about a change.
    changed = sorted(k for k in new_settings.keys() & old_settings.keys()
                     if _plain(new_settings[k]) != _plain(old_settings[k]))
    if not changed:
        return None
    what = ", ".join(f"{k}: {_show(old_settings[k])} -> {_show(new_settings[k])}"
                     for k in changed)
    return (f"layer '{name}' ({node.class_name}) changed its {what}; the weights were carried "
            "over, but the old outputs change.")


def _function_keys(
    cls: type | None, class_name: Any, module: Any, registered_name: Any
) -> frozenset[str]:
    """The keys declared beside the layer's rule, found as its rule is found; for a Keras or
    keras-hub layer without a registration, its package's list."""
    class_name = class_name if isinstance(class_name, str) else None
    module = module if isinstance(module, str) else None
    registered_name = registered_name if isinstance(registered_name, str) else None
    registration = find_registration(cls, class_name, registered_name)
    if registration is not None:
        return registration.function_keys
    package = registered_name.split(">", 1)[0] if registered_name else ""
    if package in ("keras_hub", "keras_nlp"):
        return UNREGISTERED_KERAS_HUB_KEYS
    # Keras writes no registered name for its own layers; its operations carry their class name.
    if not registered_name and module is not None and (
        module == "keras" or module.startswith("keras.")
    ):
        return UNREGISTERED_KERAS_KEYS
    return frozenset()


def _settings(config: Any, keys: frozenset[str], prefix: str = "") -> dict[str, Any]:
    """The `keys` entries of a layer config, and those of its wrapped layers and cells under
    "<key>." prefixes, each with the keys of the wrapped layer's own registration."""
    found: dict[str, Any] = {}
    if not isinstance(config, dict):
        return found
    for key, value in config.items():
        if key in keys:
            found[prefix + key] = value
        elif key in _NESTED_LAYER_KEYS and isinstance(value, dict):
            class_name, module = value.get("class_name"), value.get("module")
            cls = (resolve_keras_class(module, class_name)
                   if isinstance(class_name, str) and isinstance(module, str) else None)
            inner = _function_keys(cls, class_name, module, value.get("registered_name"))
            found.update(_settings(value.get("config"), inner, f"{prefix}{key}."))
    return found


def _plain(value: Any) -> Any:
    """A config value in one form: tuples as lists, a serialized Keras object by its class and
    config (file and live configs differ in module paths and registered names)."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        if "class_name" in value and "config" in value:
            return {"class_name": value["class_name"], "config": _plain(value["config"])}
        return {k: _plain(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    if isinstance(value, dict) and value.get("class_name") in ("__tensor__", "__numpy__"):
        return repr(serialized_constant(value))  # a constant, by its value
    if isinstance(value, dict) and "class_name" in value:
        return str(value["class_name"])
    return repr(value)


# Operations whose rule reads their non-tensor arguments to label the output (a GetItem's key
# follows the features it selects): a change there is the labels' business.
_ARGUMENTS_READ_BY_RULE = frozenset({"GetItem"})


def changed_call_warning(
    name: str, node: LayerNode, old_node: LayerNode, *, constants_elsewhere: bool = False
) -> str | None:
    """The warning for a matched layer or operation called with other non-tensor arguments than
    in the old model (an operation's constant, `x * 2.0` -> `x * 3.0`; a keyword argument of
    a call), or None: such a call computes something else even with every weight in place.

    Args:
        name: the layer's name in the new model, for the message.
        node: the layer in the new model.
        old_node: the layer it was matched to.
        constants_elsewhere: the planner decides the layer's constant itself (a multiplication
            by a scalar, `operators.compensate_constants`).

    Returns:
        "layer 'multiply' (Multiply) is called with other arguments: argument 1: 2.0 -> 3.0;
        ..." or None.
    """
    if constants_elsewhere or node.class_name in _ARGUMENTS_READ_BY_RULE:
        return None
    changes = []
    for k, (call, old_call) in enumerate(zip(node.calls, old_node.calls)):
        where = f"call {k} " if len(node.calls) > 1 else ""
        if len(call.args) == len(old_call.args):
            for i, (a, b) in enumerate(zip(call.args, old_call.args)):
                if not (_holds_tensor(a) or _holds_tensor(b)) and _plain(a) != _plain(b):
                    changes.append(f"{where}argument {i}: {_show(b)} -> {_show(a)}")
        defaults = _call_defaults(node.cls)
        for key in sorted((call.kwargs.keys() | old_call.kwargs.keys()) - _MODE_KEYWORDS):
            before, after = (c.kwargs.get(key, defaults.get(key, _NOT_GIVEN))
                             for c in (old_call, call))
            if _plain(before) != _plain(after):
                changes.append(f"{where}{key}: {_show(before)} -> {_show(after)}")
    if not changes:
        return None
    return (f"layer '{name}' ({node.class_name}) is called with other arguments than in the "
            f"old model ({'; '.join(changes)}); the weights were carried over, but the old "
            "outputs change.")


# `training` is the mode Keras calls a layer in: fit, evaluate and predict pass their own value
# to every node (`Functional`'s `operation_fn`), so a node's recorded value is not what it does.
_MODE_KEYWORDS = frozenset({"training"})


class _NotGiven:
    """A keyword a call did not pass and whose default is unknown."""

    def __repr__(self) -> str:
        return "(not given)"


_NOT_GIVEN = _NotGiven()


def _call_defaults(cls: type | None) -> dict[str, Any]:
    """The defaults of the keyword parameters of `cls.call` (what a call that does not pass a
    keyword gets), or {} when the class or its signature is unknown."""
    call = getattr(cls, "call", None)
    if call is None:
        return {}
    try:
        parameters = inspect.signature(call).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _holds_tensor(value: Any) -> bool:
    """Whether a serialized argument is or contains a symbolic tensor (`__keras_tensor__`)."""
    if isinstance(value, dict):
        return value.get("class_name") == "__keras_tensor__" or any(
            _holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False
