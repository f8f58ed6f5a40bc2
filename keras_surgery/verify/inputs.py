"""What the verifier feeds a model: example shapes, dtype kinds and the inputs' structure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FeatureKey = tuple[str, Any]  # (input name, feature), as the phi table keys them

UNKNOWN_DIM = 4  # length given to axes of unknown length (time steps, pixels) in made-up inputs


def is_float(dtype: str) -> bool:
    return "float" in dtype


def example_shape(shape: Sequence[int | None]) -> tuple[int, ...]:
    """The shape of one made-up example: `shape` (no batch axis), unknown lengths filled in."""
    return tuple(UNKNOWN_DIM if d is None else int(d) for d in shape)


def _input_struct(model: Any) -> Any:
    try:
        return model.input
    except (AttributeError, ValueError):
        return None


def pack_inputs(model: Any, names: Sequence[str], tensors: Sequence[Any]) -> Any:
    """Arranges one tensor per graph input (in `names` order) the way `model` takes them."""
    import keras

    struct = _input_struct(model)
    if struct is not None:
        flat = keras.tree.flatten(struct)
        by_name = dict(zip(names, tensors))
        wanted = [getattr(t, "name", None) for t in flat]
        if len(flat) == len(tensors) and all(n in by_name for n in wanted):
            return keras.tree.pack_sequence_as(struct, [by_name[n] for n in wanted])
    return list(tensors) if len(tensors) > 1 else tensors[0]
