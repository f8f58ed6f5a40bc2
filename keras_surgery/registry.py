"""The rule registry: one labelling rule per layer class, found through the class's MRO.

Rules are keyed by class (or, for classes that are not imported, by their registered name such
as "my_package>MyLayer", or their plain class name). Beside its rule, a registration keeps the
layer's *function keys*: the config keys whose change alters what the layer computes. Lookups
are cached per class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keras_surgery.rules.api import RuleCall, RuleResult

Rule = Callable[["RuleCall"], "RuleResult"]


@dataclass(frozen=True)
class Registration:
    """What is registered for a layer: its rule and its function keys."""

    rule: Rule
    function_keys: frozenset[str] = frozenset()


_by_class: dict[type, Registration] = {}
_by_name: dict[str, Registration] = {}
_cache: dict[type, Registration | None] = {}


def _name_keys(cls: type) -> list[str]:
    keys = []
    try:
        from keras.saving import get_registered_name

        keys.append(get_registered_name(cls))
    except Exception:
        pass
    return keys


def _key_set(function_keys: Iterable[str]) -> frozenset[str]:
    # A bare string is iterable too, and would register its letters.
    try:
        keys = None if isinstance(function_keys, str) else tuple(function_keys)
    except TypeError:
        keys = None
    if keys is None or not all(isinstance(k, str) for k in keys):
        raise TypeError(
            f"function_keys must be a collection of config key names. Received: {function_keys!r}"
        )
    return frozenset(keys)


def register_rule(
    layer: type | str,
    rule: Rule,
    *,
    override: bool = False,
    function_keys: Iterable[str] | None = None,
) -> None:
    """Registers the labelling rule for a layer class (and its subclasses).

    Args:
        layer: the layer class, or a name: its Keras registered name ("pkg>MyLayer") or its
            class name, for layers you cannot (or do not want to) import.
        rule: `rule(call: RuleCall) -> RuleResult`; see `keras_surgery.rules.api`.
        override: replace an existing rule instead of raising.
        function_keys: the layer's config keys whose change alters what it computes, whatever
            the sizes are (an activation, an epsilon, a padding). A migration between two
            layers matched by name whose values for one of them differ carries the weights
            over but reports that the old outputs change. The rule answers for sizes and
            orders; leave out sizes, initialisers, regularisers and training-only settings.
            Keys of wrapped layers (`layer`, `cell`, ...) come from their own registrations.
            None (the default) keeps the keys of the registration an override replaces, since
            they describe the layer rather than the rule; a new registration then has none.

    Raises:
        ValueError: a rule is already registered for `layer` and `override` is False.
        TypeError: `rule` is not callable, `layer` is neither a class nor a name, or
            `function_keys` is not a collection of names.

    Example:
        >>> import keras_surgery as ks                                    # doctest: +SKIP
        >>> from keras_surgery.rules.elementwise import passthrough_rule
        >>> ks.register_rule(MyScale, passthrough_rule)
        >>> ks.register_rule(MyGate, gate_rule, function_keys=("activation", "epsilon"))
    """
    if not callable(rule):
        raise TypeError(f"rule must be callable. Received: {rule!r}")
    table: dict[Any, Registration]
    if isinstance(layer, str):
        table, shown = _by_name, f"'{layer}'"
    elif isinstance(layer, type):
        table, shown = _by_class, f"{layer.__module__}.{layer.__qualname__}"
    else:
        raise TypeError(f"layer must be a class or a name. Received: {layer!r}")
    replaced = table.get(layer)
    if replaced is not None and not override:
        raise ValueError(
            f"A rule is already registered for {shown}. Pass override=True to replace it."
        )
    if function_keys is not None:
        keys = _key_set(function_keys)
    else:
        keys = replaced.function_keys if replaced is not None else frozenset()
    table[layer] = Registration(rule, keys)
    _cache.clear()


def unregister_rule(layer: type | str) -> None:
    """Removes the rule registered for `layer`, and its function keys.

    Raises:
        KeyError: no rule is registered for exactly this class or name.
    """
    table = _by_name if isinstance(layer, str) else _by_class
    if layer not in table:
        raise KeyError(f"No rule is registered for {layer!r}.")
    del table[layer]  # type: ignore[arg-type]
    _cache.clear()


def registrations() -> dict[type | str, Registration]:
    """Every registration, by the class or name it was made for (classes first)."""
    return {**_by_class, **_by_name}


def find_registration(
    cls: type | None, class_name: str | None = None, registered_name: str | None = None
) -> Registration | None:
    """The registration for a layer: by class through the MRO, else by registered or class
    name (a node read from a file may have no class, only its names)."""
    if cls is not None:
        if cls in _cache:
            return _cache[cls]
        found = None
        for klass in cls.__mro__:
            found = _by_class.get(klass)
            if found is None:
                for key in _name_keys(klass) + [klass.__name__]:
                    found = _by_name.get(key)
                    if found is not None:
                        break
            if found is not None:
                break
        _cache[cls] = found
        return found
    for key in (registered_name, class_name):
        if key and key in _by_name:
            return _by_name[key]
    # A class registered as a class, met in a file that we do not import it from.
    for klass, registration in _by_class.items():
        if registered_name and registered_name in _name_keys(klass):
            return registration
        if registered_name is None and class_name == klass.__name__ and not (
            klass.__module__.startswith("keras.")
        ):
            return registration
    return None


def find_rule(
    cls: type | None, class_name: str | None = None, registered_name: str | None = None
) -> Rule | None:
    """The rule for a layer, found as `find_registration` finds it."""
    registration = find_registration(cls, class_name, registered_name)
    return registration.rule if registration is not None else None
