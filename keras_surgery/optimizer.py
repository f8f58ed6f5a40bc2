"""Optimizer state through a surgery: Adam's moments, momentum, ... follow their variables.

Keras saves optimizer variables positionally: `iterations`, the learning rate (when it is a
float, not a schedule), then the slots of every trainable variable in `model.trainable_variables`
order, interleaved per variable (m_0, v_0, m_1, v_1, ...). Each slot goes through the same index
map as its variable; entries that are new get zeros; `iterations` is copied. A layout that does
not check out against the variables' shapes (factored Adafactor slots, EMA copies, ...) is not
guessed at: the report says the state was not migrated.

`slot_fills` pairs each new slot with its old slot (or zeros) for a live model
(`optimizer_writes`) and a `.keras` file (`file_optimizer_values`, used by
`keras_surgery.files.apply_file`) alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_surgery.errors import SurgeryError
from keras_surgery.fill import checked_cast, fill, shareable_full
from keras_surgery.graph import ModelGraph, WeightSource, live_variables, strategy_scope
from keras_surgery.propagate import propagate
from keras_surgery.stream import Write

if TYPE_CHECKING:
    from keras_surgery.keras_file import KerasFile
    from keras_surgery.plan import SurgeryPlan

OPTIMIZER_PREFIX = "optimizer/vars/"
logger = logging.getLogger("keras_surgery")


@dataclass
class OptimizerLayout:
    """Where the optimizer variables of one model are, and which variable each slot follows."""

    class_name: str
    variables: list[str]  # store paths, in position order
    shapes: list[tuple[int, ...]]
    fixed: int  # leading non-slot variables: iterations (+ learning rate)
    trainable: list[str]  # store paths of the trainable variables, in optimizer order

    def slots(self) -> list[list[int]] | None:
        """For each trainable variable, the positions of its slots; None if unrecognised."""
        var_shapes = self.trainable_shapes
        if var_shapes is None:
            return None
        n_vars, rest = len(self.trainable), len(self.variables) - self.fixed
        if rest == 0:
            return [[] for _ in range(n_vars)]
        if n_vars == 0 or rest < 0 or rest % n_vars:
            return None
        k = rest // n_vars
        layouts = (
            [[self.fixed + t * k + s for s in range(k)] for t in range(n_vars)],  # interleaved
            [[self.fixed + s * n_vars + t for s in range(k)] for t in range(n_vars)],  # grouped
        )
        for layout in layouts:
            if all(self.shapes[i] == var_shapes[t] for t, idx in enumerate(layout) for i in idx):
                return layout
        return None

    trainable_shapes: list[tuple[int, ...]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sorted_optimizer_paths(paths: Any) -> list[str]:
    found = [p for p in paths if p.startswith(OPTIMIZER_PREFIX)]
    return sorted(found, key=lambda p: int(p[len(OPTIMIZER_PREFIX):]) if
                  p[len(OPTIMIZER_PREFIX):].isdigit() else 1 << 30)


def file_layout(graph: ModelGraph, config: dict, records: dict) -> OptimizerLayout | None:
    """The optimizer layout of a `.keras` file, from its compile config and weight tree."""
    compile_config = config.get("compile_config")
    opt = compile_config.get("optimizer") if isinstance(compile_config, dict) else None
    paths = graph.source.paths()
    variables = _sorted_optimizer_paths(paths)
    if not isinstance(opt, dict) or not variables:
        return None
    opt_config = opt.get("config")
    lr = opt_config.get("learning_rate") if isinstance(opt_config, dict) else None
    fixed = 1 + (1 if isinstance(lr, (int, float)) else 0)
    trainable: list[str] = []
    for name, node in graph.layers.items():
        rec = records.get(name)
        if rec is None or not node.config.get("trainable", True):
            continue
        for w, spec in zip(rec.result.weights, node.weights):
            if w.trainable:
                trainable.append(spec.path)
    return OptimizerLayout(
        class_name=str(opt.get("class_name")),
        variables=variables,
        shapes=[tuple(paths[p][0]) for p in variables],
        fixed=fixed,
        trainable=trainable,
        trainable_shapes=[tuple(paths[p][0]) for p in trainable],
    )


def live_layout(model: Any, variables: dict[str, Any] | None = None) -> OptimizerLayout | None:
    """The optimizer layout of a live, compiled model (None if it has no built optimizer)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "built", False):
        return None
    variables = live_variables(model) if variables is None else variables
    path_of = {id(v): p for p, v in variables.items()}
    # Keras saves the optimizer's variables as `optimizer/vars/<position in .variables>`.
    opt_vars = list(optimizer.variables)
    opt_paths = [f"{OPTIMIZER_PREFIX}{i}" for i in range(len(opt_vars))]
    names = [getattr(v, "name", "") for v in opt_vars]
    fixed = 1 + (1 if len(names) > 1 and names[1] == "learning_rate" else 0)
    trainable = [path_of.get(id(v)) for v in model.trainable_variables]
    if any(p is None for p in trainable):
        return None
    return OptimizerLayout(
        class_name=type(optimizer).__name__,
        variables=opt_paths,
        shapes=[tuple(int(d) for d in v.shape) for v in opt_vars],
        fixed=fixed,
        trainable=trainable,  # type: ignore[arg-type]
        trainable_shapes=[tuple(int(d) for d in v.shape) for v in model.trainable_variables],
    )


@dataclass
class SlotFill:
    """One slot of the new optimizer and where its value comes from: the old slot at
    `old_path` through `plan` (the variable's WeightPlan without splits, its rescale replaced by
    the slot's own, `slot_scale`, so a slot is zero wherever new), or zeros when `old_path` is
    None."""

    position: int  # in the new layout's variables
    what: str
    old_path: str | None = None
    plan: Any = None

    def value(self, read: Callable[[str], np.ndarray], current: np.ndarray,
              out: np.ndarray | None = None) -> np.ndarray:
        """The slot's new value, shaped like `current`; `read(path)` gives an old variable;
        computed into `out` when given (a buffer of that shape and dtype)."""
        if out is None:
            zeros = shareable_full(np.shape(current), 0, np.asarray(current).dtype)
        else:
            zeros = out
            zeros[...] = 0
        if self.old_path is None:
            return zeros
        return fill(self.plan, read(self.old_path), zeros, "preserve",
                    in_place=True, new_rows_mean=False)


def slot_fills(
    plan: Any, old: OptimizerLayout, new: OptimizerLayout
) -> tuple[list[SlotFill] | None, str | None]:
    """Which old slot (if any) each slot of the new optimizer takes, for a live model and a
    file alike: `(fills, None)`, or `(None, why)` when the state cannot be carried."""
    if new.class_name != old.class_name:
        return None, (
            f"optimizer state was not migrated: the old optimizer is {old.class_name}, the new "
            f"one {new.class_name}."
        )
    old_slots, new_slots = old.slots(), new.slots()
    if old_slots is None or new_slots is None:
        which = "old" if old_slots is None else "new"
        return None, (
            f"optimizer state was not migrated: the {which} {old.class_name} variables are not "
            "laid out one slot set per trainable variable (factored or extra state)."
        )
    if any(old_slots) and new.trainable and not any(new_slots):
        # Keras saves an optimizer that was compiled but never built with its iteration count
        # and no slots: carrying the count alone would resume Adam's bias correction at step
        # N with zero moments.
        return None, (
            f"optimizer state was not migrated: the new {new.class_name} has no slot variables "
            "(it was compiled but not built when saved: call model.optimizer.build("
            "model.trainable_variables) before saving the template)."
        )
    old_index = {p: t for t, p in enumerate(old.trainable)}
    by_path = {wp.path: wp for wp in plan.weights}
    fills: list[SlotFill] = []
    for t, path in enumerate(new.trainable):
        wp = by_path.get(path)
        t_old = old_index.get(wp.old_path) if wp is not None and wp.old_path else None
        for s, position in enumerate(new_slots[t]):
            what = f"optimizer slot {s} of '{path}'"
            if t_old is None or wp is None or wp.axes is None or s >= len(old_slots[t_old]):
                fills.append(SlotFill(position, what))
                continue
            # Slots are copied without net2net shares and are zero wherever new, split units
            # and new vocabulary rows included; a rescaled weight rescales them (`slot_scale`).
            # Duplicated units (policy "duplicate") share their old unit's slots instead.
            duplicated = plan.policy == "duplicate"
            scale = wp.scale * (duplication_gradient_factor(wp) if duplicated else 1.0)
            exact = dataclasses.replace(
                wp, scale=slot_scale(old.class_name, len(old_slots[t_old]), s, scale),
                shift=0.0, axes=[dataclasses.replace(a, share=None) if duplicated
                                 else a.without_splits() for a in wp.axes])
            fills.append(SlotFill(position, what, old.variables[old_slots[t_old][s]], exact))
    return fills, None


def duplication_gradient_factor(wp: Any) -> float:
    """The c for which a weight duplicated by policy "duplicate" has gradient g / c, g the old
    weight's: the product of the factors k of its duplicated output-side axes.

    After a duplication the new model computes the old one on the average of each unit's k
    copies, so a copy on an output-side ("out"/"diag") axis, whose value every reader divides
    by k, has 1/k of the old gradient; a copy on an input-side axis (x1/k, reading a
    duplicated unit) has the old gradient itself. The slots of g / c are `slot_scale(..., c)`.

    Args:
        wp: the weight's plan.

    Returns:
        c (1.0 for a weight without duplicated output-side axes).

    Example:
        >>> duplication_gradient_factor(wp)  # an embedding 16 -> 32 wide   # doctest: +SKIP
        2.0
    """
    factor = 1.0
    for a, amap in enumerate(wp.axes or []):
        if amap.kind in ("out", "diag") and amap.source is not None and wp.old_shape:
            factor *= len(amap.index) / wp.old_shape[a]
    return factor


# Per optimizer class and number of slots per variable: the power of the gradient each slot
# holds, in slot order (Adam's m ~ g, v ~ g ** 2; RMSprop's momentum of g / sqrt(v) ~ g ** 0).
# An optimizer or slot count not listed has its slots copied unscaled.
SLOT_GRADIENT_POWERS: dict[tuple[str, int], tuple[int, ...]] = {
    **{(name, 2): (1, 2) for name in ("Adam", "AdamW", "Nadam", "Lamb")},
    **{(name, 3): (1, 2, 2) for name in ("Adam", "AdamW")},  # amsgrad: v_hat
    ("Adamax", 2): (1, 1),  # m, and u = max |g|
    ("SGD", 1): (1,), ("Lion", 1): (1,), ("Adagrad", 1): (2,), ("RMSprop", 1): (2,),
    ("RMSprop", 3): (2, 0, 1),  # velocity, momentum, average gradient (centered)
}


def slot_scale(class_name: str, n_slots: int, slot: int, weight_scale: float) -> float:
    """The factor slot `slot` of a weight whose copied values are multiplied by
    `weight_scale` (c) is multiplied by.

    A weight stored as c * w that computes what w computed before (an RMS norm gain, an
    attention query under a grown key_dim) has gradient g / c, so a slot holding g ** p
    becomes c ** -p times the old one: Adam's m is divided by c, v by c ** 2. That is the
    state the optimizer would hold had it seen the new parameterisation's gradients, so the
    next update's m / sqrt(v) is unchanged and new gradients add to it consistently. (Scaling
    m by c and v by c ** 2 instead keeps the first ratio too, but then mixes each new
    gradient with a history c ** 2 times too large.)

    Args:
        class_name: the optimizer's class.
        n_slots: how many slots it keeps per variable.
        slot: which of them.
        weight_scale: the weight's rescale c.

    Returns:
        c ** -p for the slot's gradient power p; 1.0 when c is 1, and for an optimizer
        `SLOT_GRADIENT_POWERS` does not list (logged).

    Example:
        >>> slot_scale("Adam", 2, 1, 0.5)
        4.0
    """
    if weight_scale == 1.0:
        return 1.0
    powers = SLOT_GRADIENT_POWERS.get((class_name, n_slots))
    if powers is None:
        logger.warning("optimizer slots of a rescaled weight copied unscaled: the slots of "
                       "%s (%d per variable) are not known", class_name, n_slots)
        return 1.0
    return float(weight_scale ** -powers[slot])


def iterations_note(
    old: OptimizerLayout, old_shape: tuple[int, ...], new_shape: tuple[int, ...]
) -> str | None:
    """Why the old iteration count cannot be copied (a damaged one), or None."""
    if int(np.prod(old_shape)) == int(np.prod(new_shape)):
        return None
    return (f"optimizer state was not migrated: the old iteration count '{old.variables[0]}' "
            f"has shape {old_shape}, expected {new_shape}.")


def copied_iterations(old_value: np.ndarray, current: np.ndarray) -> np.ndarray:
    """The old iteration count as the new optimizer's: cast to its dtype (int32 on JAX and
    PyTorch, int64 on TensorFlow), watched like every copied weight (`fill.checked_cast`), so
    a count past the new dtype's range is named in a warning instead of wrapping silently.

    Args:
        old_value: the old optimizer's iteration count.
        current: the new optimizer's iteration count, whose dtype and shape the result takes.

    Returns:
        The new value.

    Example:
        >>> copied_iterations(np.int64(7), np.zeros((), np.int32))
        array(7, dtype=int32)
    """
    cast = checked_cast(old_value, np.asarray(current).dtype, "optimizer", "iterations")
    return cast.reshape(np.shape(current))


def state_difference(
    old: OptimizerLayout, paths: Any, class_name: str | None
) -> str | None:
    """How the optimizer variables of a file (`paths`: its weight tree; `class_name`: its
    compile config's optimizer) differ from `old`, or None when they are laid out alike."""
    if class_name is not None and class_name != old.class_name:
        return f"its optimizer is {class_name}, expected {old.class_name}"
    found = _sorted_optimizer_paths(paths)
    if found != old.variables:
        return (f"it has {len(found)} optimizer variables, expected {len(old.variables)}"
                if len(found) != len(old.variables) else
                f"its optimizer variables are {found}, expected {old.variables}")
    for path, shape in zip(found, old.shapes):
        if tuple(paths[path][0]) != tuple(shape):
            return (f"optimizer variable '{path}' has shape {tuple(paths[path][0])}, expected "
                    f"{tuple(shape)}")
    return None


def optimizer_writes(
    plan: SurgeryPlan, model: Any, old_weights: WeightSource, variables: dict[str, Any]
) -> tuple[list[Any], list[str]]:
    """The writes that carry the old optimizer state into the new model's optimizer, and
    warnings (why nothing is carried, when it is not).

    Returns:
        (writes, warnings): `writes` are `keras_surgery.stream.Write`s, computed one at a time
        while the weights stream in.
    """
    old = plan.old_optimizer
    if old is None:
        return [], []
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return [], [
            "optimizer state was not migrated: the new model is not compiled (compile it "
            "before the surgery, or use SurgeryCallback)."
        ]
    if not optimizer.built:
        with strategy_scope(model):
            optimizer.build(model.trainable_variables)
        variables = live_variables(model)
    new = live_layout(model, variables)
    if new is None:
        return [], ["optimizer state was not migrated: the new optimizer has no variables."]
    fills, note = slot_fills(plan, old, new)
    if fills is None:
        return [], [str(note)]
    opt_vars = list(optimizer.variables)
    iterations = opt_vars[0]
    old_iterations = np.asarray(old_weights.read(old.variables[0]))
    note = iterations_note(old, old_iterations.shape, tuple(iterations.shape))
    if note:  # damaged; weights still migrate
        return [], [note]
    writes = [Write(
        iterations, "the optimizer's iteration count",
        lambda current, owned: copied_iterations(old_iterations, current),
        reads_current=False,
    )]
    for slot in fills:
        writes.append(Write(
            opt_vars[slot.position], slot.what,
            lambda current, owned, out=None, slot=slot: slot.value(old_weights.read, current,
                                                                    out),
            reads_current=False, fills_into=True,
        ))
    return writes, []


def file_optimizer_values(
    plan: SurgeryPlan, old: KerasFile, tmpl: KerasFile
) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], str | None]:
    """The optimizer state carried from checkpoint `old` into a file made from template
    `tmpl`: for each optimizer variable of the template that takes an old value (the iteration
    count, every slot), a function of the template's value giving the new one; and why nothing
    is carried, when it is not.

    Slots are paired as on a live model (`keras_surgery.optimizer.slot_fills`); the learning
    rate and any variable not carried keep the template's value.
    """
    src, template = old.path, tmpl.path
    layout = plan.old_optimizer
    old_paths, new_paths = old.paths(), tmpl.paths()
    kept = " The template's optimizer variables are written as they are."
    if not any(p.startswith(OPTIMIZER_PREFIX) for p in new_paths):
        if layout is None:
            return {}, None
        return {}, (
            f"optimizer state was not migrated: '{template}' has no optimizer variables (compile "
            "the new model and build its optimizer, model.optimizer.build("
            "model.trainable_variables), before saving the template)."
        )
    if layout is None:
        if any(p.startswith(OPTIMIZER_PREFIX) for p in old_paths):
            return {}, (
                f"optimizer state was not migrated: '{src}' has optimizer variables, but the "
                "plan was made from an old model without optimizer state." + kept
            )
        return {}, None
    difference = state_difference(layout, old_paths, _optimizer_class(old.config))
    if difference:
        return {}, (
            f"optimizer state was not migrated: '{src}' does not hold the optimizer state of "
            f"the model the plan was made from: {difference}." + kept
        )
    try:
        graph = tmpl.graph()
        new = file_layout(graph, tmpl.config, propagate(graph).records)
    except SurgeryError as exc:
        return {}, (f"optimizer state was not migrated: the layers of '{template}' could not "
                    f"be read ({exc})." + kept)
    if new is None:
        return {}, (f"optimizer state was not migrated: '{template}' has optimizer variables "
                    "but no optimizer in its compile config." + kept)
    fills, note = slot_fills(plan, layout, new)
    if fills is None:
        return {}, f"{note}{kept}"
    old_iterations = layout.variables[0]
    note = iterations_note(layout, tuple(old_paths[old_iterations][0]), tuple(new.shapes[0]))
    if note:
        return {}, note + kept
    values: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        new.variables[0]: lambda fresh: copied_iterations(old.read(old_iterations), fresh),
    }
    for slot in fills:
        values[new.variables[slot.position]] = (
            lambda fresh, slot=slot: slot.value(old.read, fresh))
    return values, None


def _optimizer_class(config: Any) -> str | None:
    """The optimizer class named by a file's compile config, if any."""
    compile_config = config.get("compile_config") if isinstance(config, dict) else None
    opt = compile_config.get("optimizer") if isinstance(compile_config, dict) else None
    name = opt.get("class_name") if isinstance(opt, dict) else None
    return name if isinstance(name, str) else None
