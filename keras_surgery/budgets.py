"""Budgets on what a file's config makes the reader allocate, checked before anything is made.

A `.keras` file of a few KB can declare values whose construction costs gigabytes: a
`{"class_name": "__numpy__", "config": {"value": ..., "dtype": ...}}` value that Keras turns into
`np.array(value, dtype)` (a dtype such as `"(1024,1024,255)f8"` or `"S2000000000"` makes every
element gigabytes), a Normalization with fixed `mean`/`variance` that its `build` broadcasts to
the shape its `build_config` declares, long lists (a deflated config.json of 41 KB holding ten
million zeros as a mean: Keras tracks each element, minutes) or a tensor shape declared in the
config that the reader labels index by index. Each is bounded here, before the layer is made
or the shape is labelled, and refused with a SurgeryFileError naming the layer, the limit and
the module constant that raises it. Genuine files stay far below every limit; raise one
(`keras_surgery.budgets.<NAME> = ...`) only for a file you trust.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from keras_surgery.errors import SurgeryFileError

# Numbers in the lists of a file's layer configs, over the whole file (a Normalization's fixed
# mean and variance, "__numpy__" values): Keras tracks every element of a list it is given
# (about 4.5 us and 180 bytes each), so 2**20 costs ~5 s and ~190 MB. A Normalization of a
# 2**18-wide input (MAX_FILE_INPUT_INDICES) holds 2**19.
MAX_CONFIG_ELEMENTS = 1 << 20
# Item size of such a value's dtype: the widest number (complex128) is 16 bytes; a wider dtype
# is a string, void or sub-array type whose every element can be gigabytes.
MAX_CONFIG_ITEMSIZE = 16
# Elements a built-in layer's `build` computes outside its variables from the shape its
# `build_config` declares (Normalization broadcasts a fixed mean and variance to it).
MAX_BUILD_ELEMENTS = 1 << 24
# Indices of one tensor shape a file's config declares (summed over its axes): each index is
# labelled, about 250 bytes and a few microseconds each, so 2**20 costs ~250 MB.
MAX_FILE_TENSOR_INDICES = 1 << 20
_ARRAY_CLASSES = ("__numpy__", "__tensor__")
_HINT = "keras_surgery.budgets.{} raises the limit for a file you trust"


def _itemsize(dtype: Any, where: str) -> int:
    """The item size of a config array's dtype, after refusing one that makes each element
    large (strings, void, records, sub-arrays); 8 for a name numpy does not know (Keras then
    fails to make the value, allocating nothing)."""
    if dtype is None:
        return 8
    if not isinstance(dtype, str):
        raise SurgeryFileError(
            f"{where}: an array value declares dtype {str(dtype)[:80]!r}; expected a dtype "
            "name such as 'float32', as Keras writes it.")
    try:
        parsed = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError):
        return 8
    if parsed.subdtype is not None or parsed.fields is not None or (
            parsed.itemsize > MAX_CONFIG_ITEMSIZE or parsed.kind not in "biufc"):
        raise SurgeryFileError(
            f"{where}: an array value declares dtype {dtype[:80]!r} ({parsed.itemsize} bytes "
            f"an element); at most {MAX_CONFIG_ITEMSIZE}-byte numbers are accepted "
            f"({_HINT.format('MAX_CONFIG_ITEMSIZE')}).")
    return parsed.itemsize


def check_config_values(config: Any, where: str, spent: int = 0) -> int:
    """Refuses, before Keras makes anything from `config`, array values of hostile dtypes and
    more numbers in its lists than MAX_CONFIG_ELEMENTS leaves (`spent` are already used).

    Args:
        config: a layer's config as read from the file (nested layer configs included).
        where: how the message names the layer, e.g. `"'old.keras': layer 'norm'"`.
        spent: the list elements of the file's configs counted before this one.

    Returns:
        `spent` plus the list elements of `config`.

    Raises:
        SurgeryFileError: a `__numpy__` or `__tensor__` value has a dtype other than a number
            of at most MAX_CONFIG_ITEMSIZE bytes, or the file's lists hold more elements than
            MAX_CONFIG_ELEMENTS.

    Example:
        >>> check_config_values({"mean": [0.5, 1.0], "mask_value": 0.0}, "layer 'norm'")
        2
    """
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            inner = item.get("config")
            if item.get("class_name") in _ARRAY_CLASSES and isinstance(inner, Mapping):
                _itemsize(inner.get("dtype"), where)
            stack.extend(v for v in item.values() if isinstance(v, (Mapping, list, tuple)))
        elif isinstance(item, (list, tuple)):
            spent += len(item)
            if spent > MAX_CONFIG_ELEMENTS:
                raise SurgeryFileError(
                    f"{where}: the lists of the file's layer configs hold more than "
                    f"{MAX_CONFIG_ELEMENTS} elements (Keras tracks each one when it makes the "
                    f"layer); refusing them ({_HINT.format('MAX_CONFIG_ELEMENTS')}).")
            stack.extend(v for v in item if isinstance(v, (Mapping, list, tuple)))
    return spent


def _known_product(shape: Sequence[Any]) -> int:
    return math.prod(int(d) for d in shape if isinstance(d, int) and not isinstance(d, bool))


def _shapes(build_config: Any) -> list[list]:
    """Every shape (a list of ints and Nones) inside a build_config."""
    found, stack = [], [build_config]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)) and item and all(
                d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in item):
            found.append(list(item))
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
    return found


def _kept_elements(axis: Any, shape: list) -> int | None:
    """Elements of a Normalization's mean broadcast over `shape` (its kept axes), or None if
    `axis` is not as Keras writes it."""
    axes = [axis] if isinstance(axis, int) else axis
    if axis is None:
        return 1
    if not isinstance(axes, (list, tuple)) or not all(isinstance(a, int) for a in axes):
        return None
    ndim = len(shape)
    return _known_product([shape[a] for a in axes if -ndim <= a < ndim])


def _fixed_normalizations(config: Any) -> list[Mapping]:
    """The configs of the Normalization layers with a fixed mean in `config` (the layer's own
    first, then those of layers it wraps)."""
    found, stack = [], [config]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if item.get("mean") is not None and "variance" in item and "invert" in item:
                found.append(item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def check_layer_build(config: Mapping, build_config: Any, where: str) -> None:
    """Refuses, before a Keras layer is built from `build_config`, a build that computes more
    than MAX_BUILD_ELEMENTS elements outside its variables: a Normalization (or a wrapper of
    one) with a fixed mean and variance broadcasts both to the declared shape. Its own kept
    axes are counted; a wrapped one counts every declared index (its shape is derived).

    Args:
        config: the layer's config; build_config: its `build_config` from the file.
        where: how the message names the layer.

    Raises:
        SurgeryFileError: the build would compute more than MAX_BUILD_ELEMENTS elements.

    Example:
        >>> check_layer_build({"axis": [-1], "mean": 0.5, "variance": 1.0, "invert": False},
        ...                   {"input_shape": [None, 4]}, "layer 'norm'")
    """
    norms = _fixed_normalizations(config)
    if not norms:
        return
    shapes = _shapes(build_config)
    own = norms[0] is config
    for shape in shapes:
        kept = _kept_elements(config.get("axis", -1), shape) if own else None
        elements = kept if kept is not None else _known_product(shape[1:])
        if elements > MAX_BUILD_ELEMENTS:
            raise SurgeryFileError(
                f"{where}: its build_config declares shape {shape[:8]}, to which its fixed "
                f"mean and variance would be broadcast ({elements} elements each); at most "
                f"{MAX_BUILD_ELEMENTS} are accepted ({_HINT.format('MAX_BUILD_ELEMENTS')}).")


def check_declared_shape(shape: Sequence[int | None] | None, budgeted: bool, where: str) -> None:
    """Refuses a tensor shape a file's config declares with more than MAX_FILE_TENSOR_INDICES
    indices over its axes, before they are labelled (a live model is not budgeted).

    Args:
        shape: the declared shape without its batch axis, or None (nothing declared).
        budgeted: whether the shape comes from a file (a live model's shapes are its own).
        where: how the message names the tensor, e.g. `"'old.keras': layer 'lam'"`.

    Raises:
        SurgeryFileError: the shape declares more indices than MAX_FILE_TENSOR_INDICES.

    Example:
        >>> check_declared_shape((None, 28, 28, 3), True, "layer 'conv'")
    """
    if shape is None or not budgeted:
        return
    total = sum(int(d) for d in shape if d is not None)
    if total > MAX_FILE_TENSOR_INDICES:
        raise SurgeryFileError(
            f"{where}: its config declares a tensor of shape {tuple(shape)[:8]}, {total} "
            f"indices to label (about 250 bytes each); at most {MAX_FILE_TENSOR_INDICES} are "
            f"accepted ({_HINT.format('MAX_FILE_TENSOR_INDICES')}).")


def _tensor_shapes(nodes: Any) -> list[list]:
    """The shapes of the Keras tensors in a layer entry's inbound nodes."""
    found, stack = [], [nodes]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            inner = item.get("config")
            if item.get("class_name") == "__keras_tensor__" and isinstance(inner, Mapping):
                shape = inner.get("shape")
                if isinstance(shape, (list, tuple)) and shape:
                    found.append(list(shape))
                continue
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def check_layer_entry(entry: Mapping, where: str, spent: int = 0) -> int:
    """Every budget of one layer entry of a file's config, before the graph is built from it
    or Keras makes the layer: its array values, its build (`check_layer_build`) and the shapes
    it declares, in its build_config and for the tensors it is called on.

    Args:
        entry: the layer's entry in config.json ({"class_name", "config", "build_config",
            "inbound_nodes", ...}).
        where: how messages name the layer, e.g. `"'old.keras': layer 'norm'"`.
        spent: the list elements of the file's configs counted before this entry.

    Returns:
        `spent` plus the list elements of this entry's config (`check_config_values`).

    Raises:
        SurgeryFileError: a budget is exceeded; the message names the module constant.

    Example:
        >>> check_layer_entry({"class_name": "Dense", "config": {"units": 2},
        ...                    "build_config": {"input_shape": [None, 4]}}, "layer 'out'")
        0
    """
    config = entry.get("config")
    spent = check_config_values(config, where, spent)
    build_config = entry.get("build_config")
    if isinstance(config, Mapping):
        check_layer_build(config, build_config, where)
    for shape in _shapes(build_config) + _tensor_shapes(entry.get("inbound_nodes")):
        if all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in shape):
            check_declared_shape(shape[1:], True, where)
    return spent

