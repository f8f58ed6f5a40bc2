"""Labels: what every index of every axis means, interned into integer ids.

A label key is a small hashable tuple. The kinds used by the rules are built by the
functions below (`feature_key`, `unit_key`, ...). Keys are interned by a `LabelSpace` shared by
the old and the new graph of one surgery, so "same meaning" is "same integer id", and matching
two axes is a numpy sort, not a Python loop over pairs.

Separately, every index carries a *dependency set*: the input feature columns it depends on (a
frozenset of column numbers). Dependency sets belong to one model (the same unit depends on
different features before and after a surgery), so they are interned per graph by `DepSets`.

A side read from a file is labelled under a budget (`label_budget`, MAX_FILE_LABELS): every id
handed out counts, so a few KB of config cannot make the reader label without bound.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import itertools
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from keras_surgery.errors import SurgeryError, SurgeryFileError

# Every index of every axis gets a label. A damaged config can declare sizes no model has
# (units=1e308, an input 10**12 wide) and labelling them would never end; real axes stay far
# below this (a 16M-token vocabulary, a 1M-sample waveform).
MAX_AXIS_LENGTH = 1 << 26

# Labelled indices (label ids handed out by `LabelSpace.intern`, a label made again included)
# one side read from a file may use in all (`label_budget`); a live model is never budgeted.
# Each costs about 230 bytes and 3 us. The budget is MAX_FILE_LABELS, or one label per
# FILE_BYTES_PER_LABEL bytes of the file if that is more (`file_label_limit`): a crafted file of
# a few KB whose rule-made axes are wide (a RepeatVector's `n`, an UpSampling's `size`, layers
# each declaring an axis just under the per-tensor budget) stops at about 250 MB and 3-4 s,
# and a larger file costs at most about 15 times its own size. Measured from files:
# EfficientNetB0 101k labels (21 MB), NASNetMobile 98k, GPT-2 (124M, vocabulary 50257) 158k
# (500 MB), all below the floor; a Llama-3-8B (about 1.7M by per-layer counts, 16 GB) is
# 600 times below its file's allowance.
MAX_FILE_LABELS = 1 << 20
FILE_BYTES_PER_LABEL = 16


def file_label_limit(file_bytes: int | None) -> int:
    """The label budget of a side read from a file of `file_bytes` bytes (None: unknown):
    MAX_FILE_LABELS, or `file_bytes // FILE_BYTES_PER_LABEL` if that is more. Both constants
    are read at the call, so raising either raises the budget.

    Example:
        >>> file_label_limit(None) == MAX_FILE_LABELS
        True
    """
    return max(MAX_FILE_LABELS, int(file_bytes or 0) // FILE_BYTES_PER_LABEL)

# -- label keys --------------------------------------------------------------------------------


def feature_key(input_name: str, name: str | None, k: int) -> tuple:
    """Column `k` of feature `name` of model input `input_name` (name None: unnamed column k)."""
    return ("feature", input_name, name, k)


def unit_key(identity: str, role: str, j: int) -> tuple:
    """Output unit `j` of the layer known as `identity`; `role` tells apart e.g. gates."""
    return ("unit", identity, role, j)


def pos_key(axis: int, i: int) -> tuple:
    """Position `i` along a spatial or time axis (`axis` counts non-batch axes)."""
    return ("pos", axis, i)


def derived_key(identity: str, label_id: int) -> tuple:
    """The value of label `label_id` after a per-index affine map of layer `identity`.

    Used where a layer keeps the meaning of each index but not its zero (BatchNormalization,
    Normalization, Rescaling with an offset): the index still matches across models, but an
    input that is 0 in the old model no longer yields 0 after the layer.
    """
    return ("via", identity, label_id)


def zero_key(identity: str, j: int) -> tuple:
    """Index `j` of the output of the new layer known as `identity`, started so that it is
    exactly 0 (the last projection of a new residual branch): a sum it enters keeps the
    meaning of its other terms (see `LabelSpace.set_of`)."""
    return ("zero", identity, j)


def opaque_key(identity: str, output: int, axis: int, j: int) -> tuple:
    """Index `j` of axis `axis` of output `output` of a layer without a rule."""
    return ("opaque", identity, output, axis, j)


def occurrence_key(label_id: int, k: int) -> tuple:
    """Occurrence `k` >= 1 (the second, third, ...) of label `label_id` on one axis.

    One tensor can reach a merge more than once (`concat([p, q, p])` in NAS-style cells); the
    copies mean the same, but each feeds its own weights downstream, so an index map must tell
    them apart: the k-th copy continues the k-th copy of the other model (see
    `LabelSpace.distinct`).
    """
    return ("occurrence", int(k), int(label_id))


def token_key(value: Hashable) -> tuple:
    """The table row a vocabulary token selects (a StringLookup / IntegerLookup term)."""
    return ("token", value)


def token_index_key(source: str, i: int) -> tuple:
    """Row `i` of a table indexed by the raw integers of `source` (no vocabulary known)."""
    return ("token", source, i)


@dataclass(frozen=True)
class TokenValues:
    """What the integer *values* of a tensor select when they index a table (token ids).

    Axis labels say what each index of a tensor means; for token ids the meaning is in the
    values, so a lookup layer says which token each id stands for: id `i` is `tokens[i]` when
    `i < len(tokens)`, else `token_index_key(source, i)`. An Embedding labels its rows with it.
    """

    source: str
    tokens: tuple[Hashable, ...] = ()

    def keys(self, n: int) -> list[Hashable]:
        """The label keys of ids 0..n-1."""
        known = list(self.tokens[:n])
        return known + [token_index_key(self.source, i) for i in range(len(known), n)]


ZERO_SAFE_KINDS = frozenset({"feature"})
# Kinds whose zero safety or kind depends on the labels they are made of (`LabelSpace._add`).
_COMPOSITE_KINDS = frozenset({"occurrence", "set", "tuple"})


class LabelBudgetError(SurgeryFileError):
    """A side read from a file needs more labelled indices than its budget allows."""


@dataclass
class LabelBudget:
    """The labelled indices one side read from a file has used, and may use.

    Attributes:
        limit: how many it may use in all (MAX_FILE_LABELS when the budget was entered).
        where: how messages name the file, e.g. `"'old.keras'"`.
        spent: how many it has used so far.
        labelling: what is being labelled, for messages (`"layer 'rep' (RepeatVector)"`).
    """

    limit: int
    where: str
    spent: int = 0
    labelling: str = "its inputs"

    def check(self, n: int) -> None:
        """Refuses, before anything is made, `n` more indices than the budget has left."""
        if self.spent + n > self.limit:
            raise self.exceeded(self.spent + n)

    def charge(self, n: int) -> None:
        """Counts `n` indices labelled, refusing once the total passes the limit."""
        self.spent += n
        if self.spent > self.limit:
            raise self.exceeded(self.spent)

    def exceeded(self, total: int) -> LabelBudgetError:
        return LabelBudgetError(
            f"{self.where}: labelling {self.labelling} brings the file to {total} labelled "
            f"indices, more than the {self.limit} a side read from a file may use (each costs "
            "about 230 bytes and 3 us: is the config damaged?); keras_surgery.labels."
            "MAX_FILE_LABELS raises the limit for a file you trust."
        )


_BUDGET: contextvars.ContextVar[LabelBudget | None] = contextvars.ContextVar(
    "keras_surgery_label_budget", default=None)
_CHARGE_CHUNK = 1 << 12  # keys a generator given to `intern_many` makes before they are counted


@contextlib.contextmanager
def label_budget(where: str, limit: int | None = None) -> Iterator[LabelBudget]:
    """Counts every label made inside the block against one budget, for a side read from a
    file (a live model's sizes are its own: it is labelled outside any budget).

    Budgets do not nest: the block's budget replaces any outer one until it ends.

    Args:
        where: how messages name the file, e.g. `"'old.keras'"`.
        limit: the indices it may label in all; default MAX_FILE_LABELS (read on entry, so
            raising the module constant raises it).

    Yields:
        The LabelBudget (its `labelling` names what is being labelled, for messages).

    Raises:
        LabelBudgetError: (a SurgeryFileError) inside the block, once labels would pass the
            limit; it names the file, what was being labelled, the limit and MAX_FILE_LABELS.

    Example:
        >>> with label_budget("'tiny.keras'", limit=10) as budget:
        ...     _ = positions(LabelSpace(), 0, 4)
        >>> budget.spent
        4
    """
    budget = LabelBudget(MAX_FILE_LABELS if limit is None else int(limit), where)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


@contextlib.contextmanager
def unbudgeted() -> Iterator[None]:
    """Labels made inside the block count against no budget (a live model's), even inside
    the block of a `label_budget`."""
    token = _BUDGET.set(None)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def current_budget() -> LabelBudget | None:
    """The budget labels are counted against here, or None (a live model, outside any)."""
    return _BUDGET.get()


class LabelSpace:
    """Interns label keys into integer ids; one space is shared by both sides of a surgery."""

    def __init__(self) -> None:
        self._ids: dict[Hashable, int] = {}
        self._keys: list[Hashable] = []
        self._zero_safe: list[bool] = []
        self._kinds: list[str | None] = []  # `kind` of each label, kept as it is interned
        self._zero_safe_table = np.zeros(0, dtype=bool)  # `_zero_safe` as an array, so far
        # `remembered`: key -> (ids, what making them was charged)
        self._remembered: dict[Hashable, tuple[np.ndarray, int]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def intern(self, key: Hashable) -> int:
        """Returns the id of `key`, creating it on first sight (counted against the label
        budget, if one is entered: `label_budget`)."""
        budget = _BUDGET.get()
        if budget is not None:
            budget.charge(1)
        return self._intern(key)

    def intern_many(self, keys: Iterable[Hashable]) -> np.ndarray:
        """Interns every key; returns their ids as an int64 array.

        Under a label budget a sized `keys` is counted before any is interned, an iterator in
        chunks of `_CHARGE_CHUNK`, so a refused axis costs at most one chunk.
        """
        budget = _BUDGET.get()
        if budget is None:
            return self._ids_of(keys)
        if isinstance(keys, Sized):
            budget.charge(len(keys))
            return self._ids_of(keys)
        parts = []
        iterator = iter(keys)
        while chunk := list(itertools.islice(iterator, _CHARGE_CHUNK)):
            budget.charge(len(chunk))
            parts.append(self._ids_of(chunk))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _ids_of(self, keys: Iterable[Hashable]) -> np.ndarray:
        # One dict lookup per key, inlined, and a new key added without a second one: an
        # EfficientNetB0 migration interns 95,000 labels, and the calls per key were most of it.
        get, add = self._ids.get, self._add
        ids = []
        for key in keys:
            found = get(key)
            ids.append(add(key) if found is None else found)
        return np.array(ids, dtype=np.int64)

    def _intern(self, key: Hashable) -> int:
        found = self._ids.get(key)
        return self._add(key) if found is None else found

    def _add(self, key: Hashable) -> int:
        """Interns a key not interned yet."""
        new_id = len(self._keys)
        self._ids[key] = new_id
        self._keys.append(key)
        head = key[0] if type(key) is tuple and key else None
        if head is not None and head not in _COMPOSITE_KINDS:
            # `_compute_zero_safe` and `_compute_kind` of a plain key, inlined (most keys)
            self._zero_safe.append(head in ZERO_SAFE_KINDS)
            self._kinds.append(head)
        else:
            self._zero_safe.append(self._compute_zero_safe(key))
            self._kinds.append(self._compute_kind(key))
        return new_id

    def remembered(self, key: Hashable, make: Callable[[], np.ndarray]) -> np.ndarray:
        """`make()`, the ids of labels that depend only on `key`, made once per space and
        read-only: the new model's layers that continue old ones make the old labels again
        (their units, per-channel derived labels, residual sets), which was a third of
        labelling EfficientNetB0. A call that finds them is charged to the label budget what
        the make was charged (counted even when it ran outside a budget), so a budget refuses
        the same files either way.
        """
        found = self._remembered.get(key)
        if found is not None:
            budget = _BUDGET.get()
            if budget is not None:
                budget.charge(found[1])
            return found[0]
        budget = _BUDGET.get()
        counter = budget if budget is not None else LabelBudget(sys.maxsize, "")
        before = counter.spent
        token = _BUDGET.set(counter) if budget is None else None
        try:
            ids = make()
        finally:
            if token is not None:
                _BUDGET.reset(token)
        ids.flags.writeable = False
        self._remembered[key] = (ids, counter.spent - before)
        return ids

    def key(self, label_id: int) -> Hashable:
        """The key behind an id."""
        return self._keys[int(label_id)]

    def find(self, key: Hashable) -> int | None:
        """The id of `key` if it was interned, else None (never creates one)."""
        return self._ids.get(key)

    def kind(self, label_id: int) -> str | None:
        """The kind of a label ("unit", "feature", "set", ...), the first entry of its key; a
        copy (`occurrence_key`) has the kind of what it copies (a copy of a position is a
        position that every model has)."""
        return self._kinds[int(label_id)]

    def kinds(self, ids: Iterable[int]) -> list[str | None]:
        """`kind` of each label of `ids`, in one pass (for a whole graph's labels at once)."""
        kinds = self._kinds
        return [kinds[i] for i in np.asarray(ids, dtype=np.int64).tolist()]

    def _compute_kind(self, key: Hashable) -> str | None:
        if isinstance(key, tuple) and key and key[0] == "occurrence":
            key = self._keys[key[2]]
        return key[0] if isinstance(key, tuple) and key else None

    def describe(self, label_id: int) -> str:
        """A short human-readable form of a label, for warnings: sets show a few members, and
        the whole is cut at `DESCRIBE_CHARS` characters (a residual stream deep in a
        transformer is a set of sets many levels down)."""
        text = _describe(self, self.key(label_id))
        return text if len(text) <= DESCRIBE_CHARS else text[:DESCRIBE_CHARS - 3] + "..."

    def zero_safe(self, ids: np.ndarray) -> np.ndarray:
        """Whether each label is exactly 0 in the old model when removed features are set to 0.

        Only raw input feature columns (and sets/composites made only of them) are: anything a
        layer computed may be non-zero even when its inputs are.
        """
        # Only the labels interned since the last call are converted: the planner asks once
        # per weight axis, and converting the whole list each time was most of its time on
        # large graphs (NASNetMobile: 909 questions, 6.5 s of its planning).
        done = len(self._zero_safe_table)
        if done < len(self._zero_safe):
            tail = np.fromiter(self._zero_safe[done:], dtype=bool,
                               count=len(self._zero_safe) - done)
            self._zero_safe_table = np.concatenate([self._zero_safe_table, tail])
        return self._zero_safe_table[np.asarray(ids, dtype=np.int64)]

    def set_of(self, ids: Sequence[int], *, sums: bool = False) -> int:
        """The label of an element-wise merge of indices labelled `ids`.

        With `sums=True` (the merge adds its inputs) members that are exactly 0 (`zero_key`:
        a new branch started at zero) are dropped while another member remains: x + 0 is x,
        so a residual stream {x_j, f_j} whose new branch f starts at zero is x_j continued.
        """
        members: set[int] = set()
        for i in ids:
            key = self._keys[int(i)]
            if key[0] == "set":
                members.update(key[1])
            else:
                members.add(int(i))
        if sums:
            kinds = self._kinds
            nonzero = {m for m in members if kinds[m] != "zero"}
            members = nonzero or members
        if len(members) == 1:
            return next(iter(members))
        return self.intern(("set", frozenset(members)))

    def distinct(self, ids: np.ndarray) -> np.ndarray:
        """`ids` with every repeated label made distinct, for an axis that holds some indices
        more than once (`concat([p, q, p])`, or an element-wise merge whose sets coincide).

        The first index with a label keeps it; each later one becomes `occurrence_key(base,
        k)` with the smallest k >= 1 not yet on the axis (base: the label with any occurrence
        wrapping removed, so keys stay flat however deep merges nest). Both sides of a surgery
        number their copies in index order, so the k-th copy continues the k-th copy.
        An axis without repeats comes back as the same array.
        """
        ids = np.asarray(ids, dtype=np.int64)
        unique, first = np.unique(ids, return_index=True)
        if len(unique) == len(ids):
            return ids
        taken: dict[int, set[int]] = {}
        for label in unique.tolist():
            base, k = self._occurrence(label)
            taken.setdefault(base, set()).add(k)
        repeats = np.ones(len(ids), dtype=bool)
        repeats[first] = False
        out = ids.copy()
        # The smallest free copy number of a base only grows (numbers are only taken), so a
        # cursor per base finds it: linear in the copies (a search from 1 each time was
        # quadratic: a file concatenating one tensor 10,000 times took minutes).
        cursor: dict[int, int] = {}
        for i in np.flatnonzero(repeats).tolist():
            base, _ = self._occurrence(int(ids[i]))
            used = taken[base]
            k = cursor.get(base, 1)
            while k in used:
                k += 1
            used.add(k)
            cursor[base] = k + 1
            out[i] = self.intern(occurrence_key(base, k))
        return out

    def _occurrence(self, label_id: int) -> tuple[int, int]:
        """(base label, copy number): (label_id, 0) unless it is an `occurrence_key`."""
        key = self._keys[label_id]
        if isinstance(key, tuple) and key and key[0] == "occurrence":
            return key[2], key[1]
        return label_id, 0

    def _compute_zero_safe(self, key: Hashable) -> bool:
        if not isinstance(key, tuple) or not key:
            return False
        if key[0] in ZERO_SAFE_KINDS:
            return True
        if key[0] == "occurrence":  # a copy is 0 exactly when what it copies is
            return self._zero_safe[key[2]]
        if key[0] == "set":
            return all(self._zero_safe[i] for i in key[1])
        if key[0] == "tuple":
            # composite of positions and channels: zero exactly when its channel label is
            return any(self._zero_safe[i] for i in key[1:]) and all(
                self._zero_safe[i] or self._keys[i][0] == "pos" for i in key[1:]
            )
        return False


DESCRIBE_CHARS = 160
SET_MEMBERS_SHOWN = 3


def _describe(space: LabelSpace, key: Hashable) -> str:
    if not isinstance(key, tuple):
        return repr(key)
    kind = key[0]
    if kind == "feature":
        _, inp, name, k = key
        return f"{inp}:{name}[{k}]" if name is not None else f"{inp}[{k}]"
    if kind == "unit":
        _, ident, role, j = key
        return f"{ident}{'.' + role if role else ''}[{j}]"
    if kind == "set":
        members = sorted(key[1])
        shown = sorted(space.describe(i) for i in members[:SET_MEMBERS_SHOWN])
        more = len(members) - len(shown)
        return "{" + ", ".join(shown + ([f"... {more} more"] if more else [])) + "}"
    if kind == "token":
        return f"token {key[1]!r}" if len(key) == 2 else f"{key[1]} id {key[2]}"
    if kind == "via":
        return f"{key[1]}({space.describe(key[2])})"
    if kind == "zero":
        return f"0 ({key[1]}[{key[2]}])"
    if kind == "occurrence":
        return f"{space.describe(key[2])} (copy {key[1] + 1})"
    return repr(key)


F = TypeVar("F", bound=Callable[..., Any])


def gc_paused(func: F) -> F:
    """Runs `func` with Python's cyclic garbage collector paused (and resumed after).

    Labelling makes a few objects per input feature and weight index, none in cycles; with
    TensorFlow's objects in the heap, each full collection those allocations trigger walks
    everything, which made planning at 10k features 3-4 times slower than linear.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not gc.isenabled():
            return func(*args, **kwargs)
        gc.disable()
        try:
            return func(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper  # type: ignore[return-value]


class DepSets:
    """Interns dependency sets (frozensets of input feature column numbers) of one graph.

    Sets, not int bitsets: a set of one column costs O(1) to make and hash whatever the
    column's number, so labelling n input features stays linear in n.
    """

    EMPTY = 0

    def __init__(self) -> None:
        empty: frozenset[int] = frozenset()
        self._ids: dict[frozenset[int], int] = {empty: 0}
        self.sets: list[frozenset[int]] = [empty]
        self._singles: dict[int, int] = {}

    def intern(self, columns: frozenset[int]) -> int:
        found = self._ids.get(columns)
        if found is None:
            found = len(self.sets)
            self._ids[columns] = found
            self.sets.append(columns)
        return found

    def single(self, column: int) -> int:
        """The dependency set holding one feature column."""
        found = self._singles.get(column)
        if found is None:
            found = self._singles[column] = self.intern(frozenset((column,)))
        return found

    def union(self, dep_ids: Iterable[int] | np.ndarray) -> int:
        """The union of several dependency sets, as one id."""
        unique = np.unique(np.fromiter(dep_ids, dtype=np.int64))
        unique = unique[unique != self.EMPTY]
        if len(unique) == 0:
            return self.EMPTY
        if len(unique) == 1:
            return int(unique[0])
        return self.intern(frozenset().union(*(self.sets[int(d)] for d in unique)))

    def union_elementwise(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        """Per index, the union of the dependency sets in the same index of each array."""
        stacked = np.stack([np.asarray(c, dtype=np.int64) for c in columns], axis=1)
        rows, inverse = np.unique(stacked, axis=0, return_inverse=True)
        merged = np.array([self.union(r) for r in rows], dtype=np.int64)
        return merged[inverse.reshape(-1)]


@dataclass(frozen=True)
class AxisLabels:
    """The labels of one axis: a label id and a dependency-set id per index.

    `ids is None` marks an axis of unknown length (a `None` time or spatial dimension); its
    single dependency set applies to every position.
    """

    ids: np.ndarray | None
    deps: np.ndarray

    def __post_init__(self) -> None:
        if self.ids is not None and len(self.ids) != len(self.deps):
            raise ValueError("AxisLabels: ids and deps must have the same length")

    @property
    def length(self) -> int | None:
        return None if self.ids is None else len(self.ids)

    @classmethod
    def unknown(cls, dep: int = DepSets.EMPTY) -> AxisLabels:
        return cls(None, np.array([dep], dtype=np.int64))

    def take(self, index: np.ndarray | slice) -> AxisLabels:
        if self.ids is None:
            return self
        return AxisLabels(self.ids[index], self.deps[index])

    def same_as(self, other: AxisLabels) -> bool:
        if self.ids is None or other.ids is None:
            return self.ids is None and other.ids is None
        return np.array_equal(self.ids, other.ids)


TensorLabels = tuple[AxisLabels, ...]
"""Labels of a tensor: one `AxisLabels` per non-batch axis."""


def concat_axes(parts: Sequence[AxisLabels]) -> AxisLabels:
    """The parts one after the other (their labels may repeat: see `LabelSpace.distinct`)."""
    if any(p.ids is None for p in parts):
        return AxisLabels.unknown()
    return AxisLabels(
        np.concatenate([p.ids for p in parts]), np.concatenate([p.deps for p in parts])
    )


def repeated_label(ids: np.ndarray | None) -> int | None:
    """A label that `ids` holds more than once, or None (an axis of unknown length: None)."""
    if ids is None or len(ids) < 2:
        return None
    unique, counts = np.unique(ids, return_counts=True)
    return int(unique[np.argmax(counts)]) if len(unique) < len(ids) else None


def axis_length(n: int, what: str) -> int:
    """`n` as the length of a labelled axis of `what`, checked before it is labelled.

    Raises:
        SurgeryError: `n` is negative or above MAX_AXIS_LENGTH.
        LabelBudgetError: under a label budget (a side read from a file), `n` more indices
            than the budget has left.
    """
    n = int(n)
    if not 0 <= n <= MAX_AXIS_LENGTH:
        raise SurgeryError(
            f"{what} declares {n} indices on one axis; at most {MAX_AXIS_LENGTH} are accepted "
            "(is the config damaged?)."
        )
    budget = _BUDGET.get()
    if budget is not None:
        budget.check(n)
    return n


def positions(space: LabelSpace, axis: int, length: int | None, dep: int = 0) -> AxisLabels:
    """Labels of a positional axis (time steps, pixels): `pos_key(axis, i)`."""
    if length is None:
        return AxisLabels.unknown(dep)
    length = axis_length(length, f"positional axis {axis}")
    return AxisLabels(
        space.intern_many(pos_key(axis, i) for i in range(length)),
        np.full(length, dep, dtype=np.int64),
    )


def tensor_deps(deps: DepSets, labels: TensorLabels) -> int:
    """Every feature a tensor depends on (the union over all its axes)."""
    return deps.union(np.concatenate([a.deps for a in labels]) if labels else [])
