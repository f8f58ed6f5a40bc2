"""The rule registry: one labelling rule per layer class, found through the class's MRO.

Rules are keyed by class (or, for classes that are not imported, by their registered name such
as "my_package>MyLayer", or their plain class name). Lookups are cached per class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keras_surgery.rules.api import RuleCall, RuleResult

Rule = Callable[["RuleCall"], "RuleResult"]

_rules_by_class: dict[type, Rule] = {}
_rules_by_name: dict[str, Rule] = {}
_cache: dict[type, Rule | None] = {}


def _name_keys(cls: type) -> list[str]:
    keys = []
    try:
        from keras.saving import get_registered_name

        keys.append(get_registered_name(cls))
    except Exception:
        pass
    return keys


def register_rule(layer: type | str, rule: Rule, *, override: bool = False) -> None:
    """Registers the labelling rule for a layer class (and its subclasses).

    Args:
        layer: the layer class, or a name: its Keras registered name ("pkg>MyLayer") or its
            class name, for layers you cannot (or do not want to) import.
        rule: `rule(call: RuleCall) -> RuleResult`; see `keras_surgery.rules.api`.
        override: replace an existing rule instead of raising.

    Raises:
        ValueError: a rule is already registered for `layer` and `override` is False.

    Example:
        >>> import keras_surgery as ks                                    # doctest: +SKIP
        >>> from keras_surgery.rules.elementwise import passthrough_rule
        >>> ks.register_rule(MyScale, passthrough_rule)
    """
    if not callable(rule):
        raise TypeError(f"rule must be callable. Received: {rule!r}")
    if isinstance(layer, str):
        if layer in _rules_by_name and not override:
            raise ValueError(
                f"A rule is already registered for '{layer}'. Pass override=True to replace it."
            )
        _rules_by_name[layer] = rule
    elif isinstance(layer, type):
        if layer in _rules_by_class and not override:
            raise ValueError(
                f"A rule is already registered for {layer.__module__}.{layer.__qualname__}. "
                "Pass override=True to replace it."
            )
        _rules_by_class[layer] = rule
    else:
        raise TypeError(f"layer must be a class or a name. Received: {layer!r}")
    _cache.clear()


def unregister_rule(layer: type | str) -> None:
    """Removes the rule registered for `layer`.

    Raises:
        KeyError: no rule is registered for exactly this class or name.
    """
    table = _rules_by_name if isinstance(layer, str) else _rules_by_class
    if layer not in table:
        raise KeyError(f"No rule is registered for {layer!r}.")
    del table[layer]  # type: ignore[arg-type]
    _cache.clear()


def find_rule(
    cls: type | None, class_name: str | None = None, registered_name: str | None = None
) -> Rule | None:
    """The rule for a layer: by class through the MRO, else by registered or class name."""
    if cls is not None:
        if cls in _cache:
            return _cache[cls]
        found = None
        for klass in cls.__mro__:
            found = _rules_by_class.get(klass)
            if found is None:
                for key in _name_keys(klass) + [klass.__name__]:
                    found = _rules_by_name.get(key)
                    if found is not None:
                        break
            if found is not None:
                break
        _cache[cls] = found
        return found
    for key in (registered_name, class_name):
        if key and key in _rules_by_name:
            return _rules_by_name[key]
    # A class registered as a class, met in a file that we do not import it from.
    for klass, rule in _rules_by_class.items():
        if registered_name and registered_name in _name_keys(klass):
            return rule
        if registered_name is None and class_name == klass.__name__ and not (
            klass.__module__.startswith("keras.")
        ):
            return rule
    return None
