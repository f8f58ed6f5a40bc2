"""The one fill kernel: which entries of a new weight are copied, zeroed or left fresh.

Every writer (a live model, a `.keras` file, optimizer slots) and every reader of the result
(the plan's counts, the visual report's maps) goes through `regions_of`, so what a report
shows is what was done. A weight's regions are outer products of per-axis index selections,
never weight-sized masks:

* copy: every axis matched (an old index continues, or under policy "net2net" a split unit
  copies one); the value is the old one, times the weight's scale and the split shares;
* zero (policy "preserve" only): every output-side ("out"/"diag") axis matched while some
  input-side index is new: a new input must not change an old unit's output, so its weight
  starts at 0. The copy block lies inside the zero block and is written after it;
* fresh: everything else keeps the new model's initial value.

New rows of a vocabulary ("lookup") axis inside the zero block start as the mean of the copied
rows instead of 0 (they are counted with the zero block: no old value reaches them directly);
a new layer's start (`WeightPlan.init`) replaces all of this.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_surgery import filemap
from keras_surgery.errors import SurgeryError

if TYPE_CHECKING:
    from keras_surgery.plan import WeightPlan
    from keras_surgery.rules.api import Init

OUT_KINDS = ("out", "diag")
# Policies that promise the old function: "net2net" and "duplicate" fill like "preserve",
# except that new units start as copies of old ones (see `keras_surgery.net2net`).
PRESERVING_POLICIES = ("preserve", "net2net", "duplicate")
COPY_BLOCK_BYTES = 32 << 20
"""A copy from an old weight larger than this goes in row blocks of about this size, the old
file's pages released after each, so a large weight is never resident twice over."""

BUFFER_ALIGNMENT = 64
"""Large new values start on a boundary of this many bytes (TensorFlow's and XLA's CPU
alignment), on TensorFlow `COPIED_OFFSET` bytes past one, on JAX on a page (see
`shareable_empty`)."""
SHARED_MIN_BYTES = 32 << 20
"""New values at least this large are placed for the backend (see `shareable_empty`); glibc
serves blocks of this size and up by their own memory map."""
COPIED_OFFSET = 16
"""On TensorFlow, large new values start this many bytes past a `BUFFER_ALIGNMENT` boundary:
TensorFlow then copies them into its own allocator's memory (see `shareable_empty`)."""


def shareable_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised array for a new value, placed so that the backend's `assign` costs
    least: from `SHARED_MIN_BYTES` up, on JAX in memory of its own on small pages
    (`_kept_empty`), on PyTorch on a `BUFFER_ALIGNMENT`-byte boundary, on TensorFlow
    `COPIED_OFFSET` bytes past one.

    JAX on CPU takes an aligned array as a variable's new buffer without copying it, and keeps
    it. TensorFlow does too, but then the buffer the variable had goes back to TensorFlow's
    allocator, which keeps it where oneDNN is on (the default on x86 CPUs with AVX-512, such
    as the project's machine): a 739M-parameter model migrated with every value shared kept
    2.8 GB more resident than before, the size of the model. A value TensorFlow cannot share it
    copies into its allocator's memory, which reuses the buffers the variables give back: 8
    kernels of 256 MB assigned from numpy took 5.2-5.6 s shared and 1.2-2.3 s copied, with
    2.3 GB against 0.6 GB extra memory (oneDNN off: 4.2-4.6 s against 2.0-2.5 s, 0.3 GB either
    way). Smaller values stay plain numpy arrays, which every backend copies into memory its
    allocator already holds.

    Example:
        >>> shareable_empty((4096, 4096), np.float32).shape                  # doctest: +SKIP
        (4096, 4096)
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < SHARED_MIN_BYTES:
        return np.empty(tuple(shape), dtype)
    backend = _backend()
    if backend == "jax":
        return _kept_empty(tuple(shape), dtype, nbytes)
    offset = COPIED_OFFSET if backend == "tensorflow" else 0
    raw = aligned_bytes(nbytes, BUFFER_ALIGNMENT, offset)
    return raw.view(dtype).reshape(tuple(shape))


def aligned_bytes(nbytes: int, alignment: int, offset: int = 0) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` whose data starts `offset` bytes (less than
    `alignment`) past an `alignment`-byte boundary."""
    raw = np.empty(nbytes + 2 * alignment, np.uint8)
    start = -raw.ctypes.data % alignment + offset
    return raw[start:start + nbytes]


def _kept_empty(shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> np.ndarray:
    """A page-aligned array in an anonymous memory map of its own (unmapped when the last
    array on it goes), on small pages: for a value the backend keeps as its buffer (JAX).

    numpy asks for transparent huge pages for large arrays. When new values stay alive, as
    JAX's buffers do, each 2 MB page the kernel must find for them cost far more than small
    pages on the project's machine: 8 arrays of 256 MB, kept, filled with `preadv` from the page
    cache in 2.6-4.6 s on huge pages and 1.0-1.1 s on small ones; the dense 739M-parameter
    migration on JAX took 10.3-11.2 s with numpy's huge pages and 4.9-6.3 s without. (On
    TensorFlow, whose copies free each value before the next, huge pages were the faster:
    4.6-5.1 against 6.3-7.7 s.)
    """
    area = mmap.mmap(-1, nbytes)
    if hasattr(area, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        with contextlib.suppress(OSError):
            area.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(area, dtype, nbytes // dtype.itemsize).reshape(shape)


def _backend() -> str:
    import keras

    return keras.backend.backend()


def shareable_copy(value: Any) -> np.ndarray:
    """A copy of `value` in a `shareable_empty` array."""
    value = np.asarray(value)
    out = shareable_empty(value.shape, value.dtype)
    np.copyto(out, value)
    return out


def shareable_full(shape: Sequence[int], fill_value: Any, dtype: Any) -> np.ndarray:
    """`np.full` in a `shareable_empty` array."""
    out = shareable_empty(shape, dtype)
    out[...] = fill_value
    return out


def fill_rule(wp: WeightPlan, policy: str) -> str:
    """The fill rule a weight actually gets under the plan's `policy`: "net2net" fills by the
    "preserve" rule (its split units are in the axis maps), and a weight whose old inputs are
    all gone (`zero_fill=False`) by the "random" rule."""
    if not wp.zero_fill:
        return "random"
    return "preserve" if policy in PRESERVING_POLICIES else policy


@dataclass(frozen=True)
class Regions:
    """Where the values of one planned weight (with axes) come from, per axis.

    Attributes:
        copy_new: per axis, the new indices that are copied (the copy block is their outer
            product; empty on some axis: nothing is copied).
        copy_old: per axis, the old index each of `copy_new` copies.
        zero: per axis, the indices (or `slice(None)`: all of them) of the zero block; None
            when nothing is zeroed.
        everything: every index is copied unscaled from one old index: the value is the old
            weight gathered, and needs no fresh value at all.
    """

    copy_new: list[np.ndarray]
    copy_old: list[np.ndarray]
    zero: list[np.ndarray | slice] | None
    everything: bool

    def copied(self) -> int:
        return int(np.prod([len(i) for i in self.copy_new], dtype=np.int64))

    def zeroed(self, shape: Sequence[int]) -> int:
        if self.zero is None:
            return 0
        size = np.prod([n if isinstance(s, slice) else len(s) for s, n in zip(self.zero, shape)],
                       dtype=np.int64)
        return int(size) - self.copied()

    def masks(self, shape: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per axis, boolean masks of the copy block's and the zero block's indices."""
        copy, zero = [], []
        for a, n in enumerate(shape):
            c = np.zeros(n, dtype=bool)
            c[self.copy_new[a]] = True
            copy.append(c)
            z = np.zeros(n, dtype=bool)
            if self.zero is not None:
                z[self.zero[a]] = True
            zero.append(z)
        return copy, zero


def copies_everything(wp: WeightPlan) -> bool:
    """Whether every index of the weight is copied unscaled and unshared from one old index."""
    return wp.scale == 1.0 and not wp.shift and all(
        a.share is None and len(a.index) and bool(a.matched.all()) for a in wp.axes or []
    )


def regions_of(wp: WeightPlan, policy: str) -> Regions:
    """The regions of a weight that has axis maps (`wp.axes` not None, no start)."""
    axes = wp.axes or []
    copy_new = [np.nonzero(a.matched)[0] for a in axes]
    copy_old = [a.old_index[a.matched] for a in axes]
    everything = copies_everything(wp)
    zero: list[np.ndarray | slice] | None = None
    if fill_rule(wp, policy) == "preserve" and not everything and all(
        len(a.index) for a in axes
    ):
        zero = [n if a.kind in OUT_KINDS and not a.zero_new else slice(None)
                for a, n in zip(axes, copy_new)]
        if any(isinstance(s, np.ndarray) and not len(s) for s in zero):
            zero = None
    return Regions(copy_new, copy_old, zero, everything)


def init_value(init: Init, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """The value of a start's `Init` for a weight of `shape`: a constant, or the identity over
    the last two axes at the centre of the leading (kernel tap) axes."""
    if init.kind == "constant":
        return shareable_full(shape, init.value, dtype)
    if len(shape) < 2 or shape[-1] != shape[-2] or any(k % 2 == 0 for k in shape[:-2]):
        raise SurgeryError(f"An identity start needs a square last pair of axes and odd kernel "
                           f"axes before them. Received: shape={shape}")
    value = shareable_full(shape, 0, dtype)
    value[tuple(k // 2 for k in shape[:-2])] = np.eye(shape[-1], dtype=dtype)
    return value


def counts(wp: WeightPlan, policy: str) -> tuple[int, int, int, int]:
    """(copied, zeroed, fresh, preset) entries of a weight, by the regions `fill` writes;
    preset: entries a start sets to a value other than 0."""
    total = wp.size
    if wp.init is not None:
        nonzero = int(np.count_nonzero(init_value(wp.init, wp.shape)))
        return 0, total - nonzero, 0, nonzero
    if wp.axes is None:
        return 0, 0, total, 0
    regions = regions_of(wp, policy)
    copied = regions.copied()
    zeroed = regions.zeroed(wp.shape)
    return copied, zeroed, total - copied - zeroed, 0


def needs_fresh(wp: WeightPlan, policy: str) -> bool:
    """Whether some entry of the weight keeps its fresh (current) value under `policy`; when
    none does, the current value is not read for the new one."""
    return wp.init is None and counts(wp, policy)[2] > 0


def index_tuple(selections: Sequence[np.ndarray | slice], shape: tuple[int, ...]) -> tuple:
    """An indexing tuple selecting the outer product of per-axis selections: basic slices
    (views, no copy) when every selection is a contiguous range, else `np.ix_` arrays."""
    slices = []
    for sel in selections:
        if isinstance(sel, slice):
            slices.append(sel)
        elif len(sel) and np.array_equal(sel, np.arange(sel[0], sel[0] + len(sel))):
            slices.append(slice(int(sel[0]), int(sel[0]) + len(sel)))
        else:
            slices.append(None)
    if all(s is not None for s in slices):
        return tuple(slices)
    arrays = [np.arange(n)[sel] if isinstance(sel, slice) else sel
              for sel, n in zip(selections, shape)]
    return np.ix_(*arrays)


def fill(
    wp: WeightPlan,
    old: np.ndarray | None,
    fresh: np.ndarray,
    policy: str,
    *,
    in_place: bool = False,
    new_rows_mean: bool = True,
    release: Callable[[], None] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The new value of one weight, by its regions (see the module docstring); a new layer's
    start value when it has one (`old` is then not read and may be None).

    Works on per-axis index selections, never on weight-sized masks, so its extra memory is
    the copied block. Split units (policy "net2net") copy from their source index, times
    their share on input-side axes.

    Args:
        wp: the weight's plan.
        old: the old weight's value.
        fresh: the new variable's current (initial) value.
        policy: the plan's policy.
        in_place: write into `fresh` (which must be a writable array the caller owns) instead
            of a copy of it.
        new_rows_mean: new rows of a vocabulary ("lookup") axis start as the mean of the
            copied rows (False: they keep what the fill rule gives them, as optimizer slots do).
        release: called after each block of at most `COPY_BLOCK_BYTES` copied from `old`
            (a memory-mapped file drops the block's pages), so a large weight is never
            resident twice over.
        out: a buffer of the value's shape and dtype to compute the value into, instead of
            a new array (`in_place` takes precedence); `fresh` must not overlap it.

    Returns:
        An array this call allocated (or `fresh` itself, with `in_place`, or `out`), never
        a view of `old`: the caller may hand it to the backend to keep.
    """
    if wp.init is not None:
        value = init_value(wp.init, tuple(fresh.shape), np.asarray(fresh).dtype)
        if out is None:
            return value
        np.copyto(out, value)
        return out
    if in_place and isinstance(fresh, np.ndarray) and fresh.flags.writeable:
        value = fresh
    elif out is not None:
        value = out
        if needs_fresh(wp, policy):
            np.copyto(value, fresh)
    elif needs_fresh(wp, policy):
        value = shareable_copy(fresh)
    else:  # every index is copied or zeroed below
        value = shareable_empty(fresh.shape, np.asarray(fresh).dtype)
    if wp.axes is None:
        return value
    if not wp.axes:  # a weight without axes (a scalar such as a count): one value to copy
        value[...] = checked_cast(old, value.dtype, wp.layer, wp.role, scale=wp.scale)
        return value
    regions = regions_of(wp, policy)
    if regions.zero is not None:
        value[index_tuple(regions.zero, value.shape)] = 0
    if regions.copied():
        _copy_blocks(wp, value, old, regions, release)
        if regions.zero is not None and new_rows_mean:
            _new_lookup_rows_from_mean(wp, value, regions.zero)
        if new_rows_mean:
            _new_units_from_mean(wp, value)
    return value


def _copy_blocks(
    wp: WeightPlan, value: np.ndarray, old: Any, regions: Regions,
    release: Callable[[], None] | None,
) -> None:
    """The copy block, in row blocks of about `COPY_BLOCK_BYTES` when `release` is given."""
    new_idx, old_idx = regions.copy_new, regions.copy_old
    rows = len(new_idx[0])
    step = rows
    if release is not None and old.nbytes > COPY_BLOCK_BYTES:
        step = max(1, rows * COPY_BLOCK_BYTES // old.nbytes)
    for start in range(0, rows, step):
        block = slice(start, start + step)
        _copy_block(wp, value, old, [new_idx[0][block]] + new_idx[1:],
                    [old_idx[0][block]] + old_idx[1:])
        if release is not None:
            release()


def _copy_block(
    wp: WeightPlan, value: np.ndarray, old: np.ndarray, new_idx: list, old_idx: list
) -> None:
    """value[new_idx] = old[old_idx] (outer products of per-axis indices), scaled and shared."""
    if _copy_bytes(wp, value, old, new_idx, old_idx):
        return
    copied = old[index_tuple(old_idx, old.shape)]
    if wp.scale != 1.0 or wp.shift:
        with np.errstate(over="ignore"):  # an overflow is counted below
            copied = copied * wp.scale + wp.shift if wp.shift else copied * wp.scale
    for a, amap in enumerate(wp.axes or []):
        if amap.share is not None:
            share = amap.share[new_idx[a]]
            copied = copied * share.reshape([-1 if i == a else 1 for i in range(copied.ndim)])
    target = index_tuple(new_idx, value.shape)
    if not _cast_may_lose(copied.dtype, value.dtype, wp):
        value[target] = copied.astype(value.dtype, copy=False)
        return
    # The cast array is the temporary `astype` makes anyway; the check reads it (and `copied`)
    # with min/max reductions, and only counts, row chunk by row chunk, when one fails.
    with np.errstate(over="ignore", invalid="ignore"):
        cast = copied.astype(value.dtype, copy=False)
    if not _cast_is_sound(copied, cast):
        scaled = (wp.scale != 1.0 or bool(wp.shift)
                  or any(a.share is not None for a in wp.axes or []))
        raw = old[index_tuple(old_idx, old.shape)] if scaled else copied
        lost = _count_lost(raw, copied, cast)
        if lost:
            _record_cast_loss(CastLoss(wp.layer, wp.role,
                                       np.dtype(old.dtype).name, np.dtype(value.dtype).name,
                                       lost))
    value[target] = cast


def _copy_bytes(
    wp: WeightPlan, value: np.ndarray, old: np.ndarray, new_idx: list, old_idx: list
) -> bool:
    """The copy of `_copy_block` as bytes, when it is one: same dtype, unscaled, unshared, and
    both blocks views (contiguous index ranges) whose last axis is contiguous. Returns whether
    it was done.

    Such a copy is the bytes of rows, so a source lying in the memory-mapped old file is read
    with `preadv` (`filemap.read_into`) without faulting the map's pages in; any other source
    is copied as bytes by numpy (the same values: the dtypes are equal).
    """
    if (old.dtype != value.dtype or wp.scale != 1.0 or wp.shift or not old.ndim
            or any(a.share is not None for a in wp.axes or [])):
        return False
    source = index_tuple(old_idx, old.shape)
    target = index_tuple(new_idx, value.shape)
    if not (isinstance(source[0], slice) and isinstance(target[0], slice)):
        return False
    src, dst = old[source], value[target]
    itemsize = old.dtype.itemsize
    if src.shape != dst.shape or src.strides[-1] != itemsize or dst.strides[-1] != itemsize:
        return False
    if not filemap.read_into(dst, src):
        dst.view(np.uint8)[...] = src.view(np.uint8)
    return True


def _new_lookup_rows_from_mean(
    wp: WeightPlan, value: np.ndarray, zero: list[np.ndarray | slice]
) -> None:
    """New rows of a "lookup" axis (new vocabulary tokens) in the zero region start as the mean
    of the copied rows, as Hugging Face does for new tokens: old inputs never select them, and
    a new token starts as an average one rather than as an all-zero vector."""
    for a, amap in enumerate(wp.axes or []):
        if amap.kind != "lookup" or amap.matched.all() or not amap.matched.any():
            continue
        rows_new = list(zero)
        rows_new[a] = np.nonzero(~amap.matched)[0]
        rows_old = list(zero)
        rows_old[a] = np.nonzero(amap.matched)[0]
        mean = value[index_tuple(rows_old, value.shape)].mean(axis=a, keepdims=True)
        target = index_tuple(rows_new, value.shape)
        value[target] = np.broadcast_to(mean, value[target].shape).astype(value.dtype)


def _new_units_from_mean(wp: WeightPlan, value: np.ndarray) -> None:
    """New units of an axis marked `mean_new` (new columns of a named head, `init="mean"`)
    start as the mean of the continued units, over the filled value: an input row that is
    zero in the old columns (a new input) stays zero in the new ones."""
    for a, amap in enumerate(wp.axes or []):
        if not amap.mean_new or amap.matched.all() or not amap.matched.any():
            continue
        old_units = np.nonzero(amap.index >= 0)[0]
        new_units = np.nonzero(amap.index < 0)[0]
        mean = np.take(value, old_units, axis=a).mean(axis=a, keepdims=True)
        target = [slice(None)] * value.ndim
        target[a] = new_units
        value[tuple(target)] = np.broadcast_to(
            mean, np.take(value, new_units, axis=a).shape).astype(value.dtype)


def nonfinite_warning(wp: WeightPlan, old: np.ndarray) -> str | None:
    """A warning when the old value of a planned weight holds NaN or Inf."""
    # dtype kind "V": bfloat16 (ml_dtypes), which is no np.floating but has NaN and Inf too.
    # min and max propagate NaN and show an Inf, without a weight-sized temporary.
    if old.dtype.kind in "fV" and old.size and not (
        np.isfinite(old.min()) and np.isfinite(old.max())
    ):
        return (f"layer '{wp.old_layer}': old weight '{wp.role}' holds NaN or Inf values; "
                "they were copied as they are.")
    return None


# -- casts to the new weight's dtype -------------------------------------------------------

logger = logging.getLogger("keras_surgery")

CAST_COUNT_ELEMENTS = 1 << 20
"""Lost values of a cast are counted in row chunks of about this many elements, so counting
costs a few MB however large the weight is."""


@dataclass(frozen=True)
class CastLoss:
    """Copied values of one block that the cast to the new weight's dtype did not keep: finite
    old values that became inf (a float dtype) or fell outside its range (an integer dtype)."""

    layer: str
    weight: str
    source: str  # the old dtype
    target: str  # the new weight's dtype
    count: int


_CAST_LOSSES: ContextVar[list[CastLoss] | None] = ContextVar(
    "keras_surgery_cast_losses", default=None)


@contextlib.contextmanager
def watching_casts() -> Iterator[list[CastLoss]]:
    """Collects the `CastLoss`es of every `fill` inside the block (without a watcher, a lost
    value is only logged). The losses come out of the copy loop this way, so `fill` keeps
    returning just the value, for every writer alike.

    Example:
        >>> with watching_casts() as losses:                              # doctest: +SKIP
        ...     value = fill(wp, old, fresh, "preserve")
        >>> note = cast_warning(losses)                                   # doctest: +SKIP
    """
    losses: list[CastLoss] = []
    token = _CAST_LOSSES.set(losses)
    try:
        yield losses
    finally:
        _CAST_LOSSES.reset(token)


def cast_warning(losses: Sequence[CastLoss], what: str | None = None) -> str | None:
    """The warning for the lost values of one weight (None when nothing was lost).

    Args:
        losses: what `watching_casts` collected while the weight was filled.
        what: how to name the variable (an optimizer slot); default: its layer and weight.
    """
    if not losses:
        return None
    first = losses[0]
    count = sum(loss.count for loss in losses)
    subject = f"layer '{first.layer}': weight '{first.weight}'"
    if what:
        subject = f"{what} ({subject})"
    return (f"{subject}: {count} copied value(s) do not fit the new dtype {first.target} (old "
            f"dtype {first.source}): finite old values became inf or out of range, so the new "
            "model does not compute the old function.")


def _record_cast_loss(loss: CastLoss) -> None:
    found = _CAST_LOSSES.get()
    if found is None:
        logger.warning("keras-surgery: %s", cast_warning([loss]))
    else:
        found.append(loss)


def _limits(dtype: Any) -> tuple[float, float] | None:
    """(lowest, highest) value of an integer or floating dtype (bfloat16 too); None for the
    others (bool, complex, strings), whose casts are not checked."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info: Any = np.iinfo(dtype)
    elif dtype.kind == "f":
        info = np.finfo(dtype)
    elif dtype.kind == "V":
        try:
            import ml_dtypes

            info = ml_dtypes.finfo(dtype)
        except (ImportError, ValueError, TypeError):
            return None
    else:
        return None
    return float(info.min), float(info.max)


def cast_can_overflow(source: Any, target: Any) -> bool:
    """Whether casting values of dtype `source` to `target` can turn a finite value into inf or
    an out-of-range integer: False for the same dtype or a wider one (float16 -> float32,
    int32 -> int64 or float32), True for a narrower one and for any float -> integer."""
    source, target = np.dtype(source), np.dtype(target)
    if source == target:
        return False
    src, dst = _limits(source), _limits(target)
    if src is None or dst is None:
        return False
    if target.kind in "iu" and source.kind not in "iu":
        return True  # NaN, inf and fractions beyond the range have no integer
    return src[0] < dst[0] or src[1] > dst[1]


def checked_cast(old: Any, dtype: Any, layer: str, weight: str, *,
                 scale: float = 1.0) -> np.ndarray:
    """`old` times `scale`, cast to `dtype`, watched as the copy blocks of `fill` are: finite
    old values that overflow or leave the integer range are recorded as a `CastLoss` of
    `layer`/`weight` (a warning naming them, and the promise broken, under `watching_casts`).
    For small values (a weight without axes, an optimizer's iteration count).

    Args:
        old: the old value; dtype: the new variable's dtype.
        layer, weight: how the loss names the variable.
        scale: the plan's rescale of the weight.

    Returns:
        The cast value (a new array, never a view of `old`).

    Example:
        >>> with watching_casts() as losses:
        ...     value = checked_cast(np.float64(1e39), np.float32, "norm", "count")
        >>> [loss.count for loss in losses]
        [1]
    """
    raw = np.asarray(old)
    copied = raw
    if scale != 1.0:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is counted below
            copied = raw * scale
    with np.errstate(over="ignore", invalid="ignore"):
        cast = copied.astype(dtype)
    may_lose = cast_can_overflow(copied.dtype, cast.dtype) or abs(scale) > 1.0
    if may_lose and not _cast_is_sound(copied, cast):
        lost = _count_lost(raw, copied, cast)
        if lost:
            _record_cast_loss(CastLoss(layer, weight, np.dtype(raw.dtype).name,
                                       np.dtype(cast.dtype).name, lost))
    return cast


def _cast_may_lose(source: Any, target: Any, wp: WeightPlan) -> bool:
    # A rescale above 1 can overflow even without a cast.
    return cast_can_overflow(source, target) or abs(wp.scale) > 1.0


def _cast_is_sound(copied: np.ndarray, cast: np.ndarray) -> bool:
    """Whether every value of the cast block is finite (float) or in range (integer), by
    reductions only: no temporary of the block's size."""
    if not cast.size:
        return True
    if cast.dtype.kind in "iu":
        low, high = _limits(cast.dtype) or (0.0, 0.0)
        cmin, cmax = copied.min(), copied.max()
        return bool(np.isfinite(cmin) and np.isfinite(cmax) and cmin >= low
                    and cmax < high + 1)
    return bool(np.isfinite(cast.min()) and np.isfinite(cast.max()))


def _count_lost(raw: np.ndarray, copied: np.ndarray, cast: np.ndarray) -> int:
    """How many finite old values (`raw`) did not survive: their copy (`copied`, scaled) is
    not finite, or its cast (`cast`) is inf or, to an integer dtype, out of range. Counted in
    row chunks of about `CAST_COUNT_ELEMENTS`."""
    integer = cast.dtype.kind in "iu"
    low, high = _limits(cast.dtype) or (0.0, 0.0)
    per_row = max(1, raw[0].size) if raw.ndim and len(raw) else 1
    rows = max(1, CAST_COUNT_ELEMENTS // per_row)
    lost = 0
    for start in range(0, max(1, len(raw)) if raw.ndim else 1, rows):
        part = slice(start, start + rows) if raw.ndim else ...
        finite = np.isfinite(raw[part])
        if integer:
            values = copied[part]
            with np.errstate(invalid="ignore"):
                kept = np.isfinite(values) & (values >= low) & (values < high + 1)
        else:
            kept = np.isfinite(cast[part])
        lost += int(np.count_nonzero(finite & ~kept))
    return lost
