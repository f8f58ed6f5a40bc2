"""New values are allocated so that the backend can keep them as its buffers, and old weights
lying in a memory-mapped file are copied with `preadv` (or as bytes) exactly as numpy would
copy them; a file that shrinks under the read is an error, not garbage or a crash."""

from __future__ import annotations

import mmap
import os
import re

import keras
import numpy as np
import pytest

import keras_surgery as ks
from keras_surgery import filemap
from keras_surgery.errors import SurgeryFileError
from keras_surgery.fill import (
    BUFFER_ALIGNMENT,
    COPIED_OFFSET,
    SHARED_MIN_BYTES,
    shareable_copy,
    shareable_empty,
    shareable_full,
)
from keras_surgery.graph import variable_view
from keras_surgery.stream import handed_over


@pytest.mark.parametrize("shape,dtype", [((), np.float32), ((5,), np.int64),
                                         ((3, 7, 2), np.float16), ((0, 4), np.float32),
                                         ((SHARED_MIN_BYTES // 8 + 3,), np.float64),
                                         ((4096, 2049), np.float32)])
def test_new_value_arrays_hold_what_was_asked_and_large_ones_are_placed(shape, dtype):
    large = int(np.prod(shape)) * np.dtype(dtype).itemsize >= SHARED_MIN_BYTES
    # TensorFlow is given large values it copies into its own allocator (which keeps the
    # buffers the variables give back); the other backends aligned ones
    placed = COPIED_OFFSET if keras.backend.backend() == "tensorflow" else 0
    for _ in range(3):
        empty = shareable_empty(shape, dtype)
        assert empty.shape == shape and empty.dtype == dtype
        assert empty.flags.c_contiguous and empty.flags.writeable
        if large:
            assert empty.ctypes.data % BUFFER_ALIGNMENT == placed
            if keras.backend.backend() == "jax":  # kept by JAX: a map of its own
                assert empty.ctypes.data % mmap.PAGESIZE == 0
                assert _huge_pages_allowed(empty) in (False, None)
    full = shareable_full(shape, 3, dtype)
    np.testing.assert_array_equal(full, np.full(shape, 3, dtype))
    source = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    copy = shareable_copy(source)
    np.testing.assert_array_equal(copy, source)
    assert not large or copy.ctypes.data % BUFFER_ALIGNMENT == placed
    copy[...] = 0
    np.testing.assert_array_equal(source, np.arange(source.size, dtype=dtype).reshape(shape))


def _huge_pages_allowed(array: np.ndarray) -> bool | None:
    """Whether the kernel may back `array` with transparent huge pages (its mapping's
    THPeligible in /proc/self/smaps), or None where that is not known."""
    address = array.ctypes.data + array.nbytes // 2  # numpy advises whole 2 MB pages only
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                first = line.split(" ", 1)[0]
                if "-" in first and ":" not in first:
                    low, high = (int(x, 16) for x in first.split("-"))
                    inside = low <= address < high
                elif inside and line.startswith("THPeligible:"):
                    return line.split()[1] == "1"
    except OSError:
        return None
    return None


def test_a_large_value_becomes_the_variables_buffer_without_a_copy_where_shared():
    """JAX takes a large aligned value as the variable's buffer (no second copy of a large
    weight); TensorFlow copies it into its own allocator's memory, never keeping ours; on
    every backend the values are the ones filled."""
    layer = keras.layers.Dense(2048)
    layer.build((None, 4096))
    value = shareable_empty((4096, 2048), np.float32)
    value[...] = np.random.default_rng(0).standard_normal((4096, 2048), dtype=np.float32)
    expected = value.copy()
    layer.kernel.assign(handed_over(value))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), expected)
    view = variable_view(layer.kernel)
    if keras.backend.backend() == "jax":
        assert view is not None and view.ctypes.data == value.ctypes.data
    if keras.backend.backend() == "tensorflow":
        assert view is not None and view.ctypes.data != value.ctypes.data
        value[...] = 0  # ours is not the variable's buffer
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), expected)


def _mapped_file(tmp_path, data: bytes):
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    raw = open(path, "rb")
    whole = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
    filemap.register(whole, raw, str(path))
    return path, raw, whole


def test_read_into_copies_the_bytes_of_a_view_of_a_registered_map(tmp_path):
    data = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    path, raw, whole = _mapped_file(tmp_path, b"xyz" + data.tobytes())  # at an odd offset
    try:
        view = np.frombuffer(whole, np.float32, 10_000, 3).reshape(100, 100)
        assert not view.flags.aligned
        target = np.empty((40, 100), np.float32)
        assert filemap.read_into(target, view[10:50])
        np.testing.assert_array_equal(target, data.reshape(100, 100)[10:50])
        # Not C-contiguous, other sizes, or memory that is no map: not done, target untouched
        target[...] = 7
        assert not filemap.read_into(target, view[10:50, :50].reshape(40, 50)[:, :25].T.T)
        assert not filemap.read_into(np.empty((39, 100), np.float32), view[10:50])
        assert not filemap.read_into(target, data.reshape(100, 100)[10:50].copy())
        np.testing.assert_array_equal(target, 7)
        del view
    finally:
        filemap.forget(whole)
        whole.close()
        raw.close()


def test_read_into_says_the_file_was_truncated_while_it_was_read(tmp_path):
    data = np.arange(4096, dtype=np.float64)
    path, raw, whole = _mapped_file(tmp_path, data.tobytes())
    try:
        view = np.frombuffer(whole, np.float64)
        os.truncate(path, 1000)  # touching the view now would kill the process (SIGBUS)
        with pytest.raises(SurgeryFileError, match="changed while it was read"):
            filemap.read_into(np.empty(4096, np.float64), view)
        del view
    finally:
        filemap.forget(whole)
        whole.close()
        raw.close()


def test_a_closed_map_never_answers_for_a_view_at_its_old_address(tmp_path):
    path, raw, whole = _mapped_file(tmp_path, bytes(range(256)) * 64)
    whole.close()  # closed without forget
    raw.close()
    other = np.arange(2048, dtype=np.uint8)
    target = np.zeros(2048, np.uint8)
    assert not filemap.read_into(target, other)
    assert not any(base for base in filemap._MAPS if filemap._MAPS[base][0]() is whole)


def test_a_migration_from_a_file_copies_unaligned_weights_exactly(tmp_path):
    """Weights of a `.keras` file lie at odd offsets of the archive: the byte copy (preadv or
    numpy's) gives exactly the old values, checked against an np.take oracle."""
    def build(features: int) -> keras.Model:
        x = inputs = keras.Input((features,), name="x")
        x = keras.layers.Dense(96, name="d1")(x)
        x = keras.layers.Dense(7, name="d2")(x)
        return keras.Model(inputs, x)

    old = build(6)
    rng = np.random.default_rng(3)
    for v in old.weights:
        v.assign(rng.standard_normal(tuple(v.shape)).astype(np.float32))
    path = str(tmp_path / "old.keras")
    old.save(path)
    new = build(7)
    names = ["a", "b", "c", "d", "e", "f"]
    report = ks.migrate_weights(path, new, old_features={"x": names},
                                new_features={"x": ["a", "b", "new", "c", "d", "e", "f"]})
    assert report.preserves_function
    old_kernel = keras.ops.convert_to_numpy(old.get_layer("d1").kernel)
    new_kernel = keras.ops.convert_to_numpy(new.get_layer("d1").kernel)
    np.testing.assert_array_equal(np.delete(new_kernel, 2, axis=0), old_kernel)
    np.testing.assert_array_equal(new_kernel[2], 0)
    for name in ("d2",):
        for a, b in zip(old.get_layer(name).weights, new.get_layer(name).weights):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                          keras.ops.convert_to_numpy(b))
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y_old = keras.ops.convert_to_numpy(old(x))
    assert np.ptp(y_old, axis=0).max() > 0.1  # the outputs depend on the input
    y_new = keras.ops.convert_to_numpy(new(np.insert(x, 2, 5.0, axis=1)))
    scale = float(np.abs(y_old).max())
    assert np.abs(y_new - y_old).max() <= 64 * np.finfo(np.float32).eps * scale


def _wide(features: int, seed: int) -> keras.Model:
    x = inputs = keras.Input((features,), name="x")
    x = keras.layers.Dense(48, name="d1")(x)
    x = keras.layers.Dense(32, name="d2")(x)
    x = keras.layers.Dense(3, name="out")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.standard_normal(tuple(v.shape)).astype(np.float32))
    return model


def _values(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


def test_values_computed_in_place_are_exact_and_keep_the_variables_buffers(monkeypatch):
    """With every value computed in the variable's own buffer where the backend allows it
    (PyTorch), the migration gives the np.take/np.delete oracle's values; on PyTorch every
    variable keeps its buffer."""
    from keras_surgery import stream as stream_module

    monkeypatch.setattr(stream_module, "IN_PLACE_MIN_BYTES", 0)
    old, new = _wide(5, 0), _wide(6, 1)
    fresh = _values(new)
    pointers = [stream_module.writable_view(v) for v in new.weights]
    pointers = [None if p is None else p.ctypes.data for p in pointers]
    names = ["a", "b", "c", "d", "e"]
    report = ks.migrate_weights(old, new, old_features={"x": names},
                                new_features={"x": ["a", "b", "c", "new", "d", "e"]})
    assert report.preserves_function
    got = _values(new)
    want = _values(old)
    np.testing.assert_array_equal(np.delete(got[0], 3, axis=0), want[0])
    np.testing.assert_array_equal(got[0][3], 0)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(g, w)
    assert not np.array_equal(got[0], fresh[0])
    if keras.backend.backend() == "torch":
        assert all(p is not None for p in pointers)
        after = [stream_module.writable_view(v).ctypes.data for v in new.weights]
        assert after == pointers


def test_a_failed_in_place_migration_restores_every_variable_exactly(monkeypatch):
    """Values computed in place go into the variables' own buffers: the journal must hold
    copies, not views of them, for the undo to give back the values they had, and the last
    write, which fails here, needs its own entry."""
    from keras_surgery import stream as stream_module

    monkeypatch.setattr(stream_module, "IN_PLACE_MIN_BYTES", 0)
    old, new = _wide(5, 0), _wide(6, 1)
    before = _values(new)
    from keras_surgery import apply as apply_module

    real_fill = apply_module.fill

    def failing(wp, *args, **kwargs):
        value = real_fill(wp, *args, **kwargs)
        if wp.layer == "d1" and wp.role == "kernel":  # the largest: written last
            value[...] = 99.0  # halfway through the variable's buffer when in place
            raise RuntimeError("disk on fire")
        return value

    monkeypatch.setattr(apply_module, "fill", failing)
    names = ["a", "b", "c", "d", "e"]
    with pytest.raises(ks.SurgeryError, match="disk on fire"):
        ks.migrate_weights(old, new, old_features={"x": names},
                           new_features={"x": ["a", "b", "c", "new", "d", "e"]})
    for got, want in zip(_values(new), before):
        np.testing.assert_array_equal(got, want)
    # with the journal spilling to its file too
    from keras_surgery import plan as plan_module

    real_apply, spilled = plan_module.apply_plan, []
    real_save = stream_module.Journal.save

    def save(self, *args, **kwargs):
        spilled.append(real_save(self, *args, **kwargs))
        return spilled[-1]

    monkeypatch.setattr(plan_module, "apply_plan",
                        lambda *a, **k: real_apply(*a, **{**k, "spill_bytes": 0}))
    monkeypatch.setattr(stream_module.Journal, "save", save)
    with pytest.raises(ks.SurgeryError, match="disk on fire"):
        ks.migrate_weights(old, new, old_features={"x": names},
                           new_features={"x": ["a", "b", "c", "new", "d", "e"]})
    assert spilled and all(spilled)  # every undo value went to the file
    for got, want in zip(_values(new), before):
        np.testing.assert_array_equal(got, want)


def test_undo_false_gives_the_same_values_without_a_journal(monkeypatch):
    from keras_surgery import stream as stream_module

    saved = []
    real_save = stream_module.Journal.save
    monkeypatch.setattr(stream_module.Journal, "save",
                        lambda self, *a, **k: saved.append(1) or real_save(self, *a, **k))
    names = ["a", "b", "c", "d", "e"]
    spec = {"old_features": {"x": names},
            "new_features": {"x": ["a", "b", "c", "new", "d", "e"]}}
    old = _wide(5, 0)
    with_undo, without = _wide(6, 1), _wide(6, 1)
    assert ks.migrate_weights(old, with_undo, **spec).preserves_function
    assert saved
    saved.clear()
    assert ks.migrate_weights(old, without, undo=False, **spec).preserves_function
    assert not saved
    for a, b in zip(_values(with_undo), _values(without)):
        np.testing.assert_array_equal(a, b)


def test_undo_false_failure_says_the_model_is_partly_written(monkeypatch):
    from keras_surgery import apply as apply_module

    real_fill = apply_module.fill

    def failing(wp, *args, **kwargs):
        if wp.layer == "d1" and wp.role == "kernel":  # the largest: written last
            raise RuntimeError("disk on fire")
        return real_fill(wp, *args, **kwargs)

    monkeypatch.setattr(apply_module, "fill", failing)
    old, new = _wide(5, 0), _wide(6, 1)
    before = _values(new)
    names = ["a", "b", "c", "d", "e"]
    with pytest.raises(ks.SurgeryError, match=r"not undone \(undo=False\): the variables "
                                              r"written before it \(\d+\) keep their new") as e:
        ks.migrate_weights(old, new, undo=False, old_features={"x": names},
                           new_features={"x": ["a", "b", "c", "new", "d", "e"]})
    written = int(re.search(r"written before it \((\d+)\)", str(e.value)).group(1))
    assert "its own variable" not in str(e.value)  # the failure came before any write to it
    after = _values(new)
    assert np.array_equal(after[0], before[0])  # d1's kernel: never written
    changed = sum(not np.array_equal(a, b) for a, b in zip(after, before))
    assert changed == written and 0 < written < len(before) - 1  # smaller ones first


def test_no_in_place_view_inside_an_autocast_scope_or_a_stateless_scope(monkeypatch):
    """`var.value` is a cast copy inside an autocast scope, and a stateless scope records
    values instead of writing them: a value computed in such a view would be lost."""
    from keras.src.backend.common.variables import AutocastScope

    from keras_surgery import stream as stream_module

    monkeypatch.setattr(stream_module, "IN_PLACE_MIN_BYTES", 0)
    layer = keras.layers.Dense(4)
    layer.build((None, 3))
    with AutocastScope("float16"):
        assert stream_module.writable_view(layer.kernel) is None
    with keras.StatelessScope():
        assert stream_module.writable_view(layer.kernel) is None
    view = stream_module.writable_view(layer.kernel)
    assert (view is not None) == (keras.backend.backend() == "torch")


def test_an_interrupt_after_the_last_write_finishes_the_migration_and_says_so():
    """A Ctrl-C in the progress update that follows the last (unjournaled) write: every
    variable already holds its new value, so the migration is finished, not half undone."""
    from keras_surgery import stream as stream_module

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(16, name="b")(
        keras.layers.Dense(8, name="a")(inputs)))
    variables = [model.get_layer("a").kernel, model.get_layer("b").kernel]

    def compute(current, owned, out=None):
        return np.full(current.shape, 5, current.dtype)

    def progress(count):
        if count == 2:
            raise KeyboardInterrupt

    writes = [stream_module.Write(v, name, compute) for v, name in zip(variables, "ab")]
    with pytest.raises(KeyboardInterrupt) as caught:
        stream_module.stream(writes, model, progress=progress)
    assert any("the interrupt came after the last write: the migration finished" in note
               for note in caught.value.__notes__)
    for v in variables:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), 5)


def test_a_weight_cast_to_a_narrower_dtype_is_not_said_to_hold_nan_in_the_old_model():
    """The NaN/Inf check reads the new value only when it has the old dtype: a float32 1e5
    that overflows float16 is a cast loss, not an old NaN."""
    def build(dtype: str) -> keras.Model:
        inputs = keras.Input((4,), name="x")
        return keras.Model(inputs, keras.layers.Dense(3, name="d", dtype=dtype)(inputs))

    old = build("float32")
    old.get_layer("d").kernel.assign(np.full((4, 3), 1e5, np.float32))
    new = build("float16")
    report = ks.migrate_weights(old, new)
    assert not report.preserves_function
    assert not any("holds NaN or Inf" in w for w in report.warnings), report.warnings
    assert any("float16" in w for w in report.warnings), report.warnings


# -- the undo journal's file -----------------------------------------------------------------


def _spill_values(rng):
    """Values of sizes around the direct block and the reused buffer, several dtypes."""
    from keras_surgery.stream import DIRECT_BLOCK, DIRECT_BUFFER_BYTES

    sizes = [1, DIRECT_BLOCK // 4 - 1, DIRECT_BLOCK // 4, DIRECT_BUFFER_BYTES // 4 + 7, 3]
    values = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    values.append(rng.integers(-9, 9, (5, 3, 7)).astype(np.int8))
    values.append(rng.standard_normal((33, 65)).astype(np.float16))
    return values


def _written_and_read(spill, values):
    offsets = [spill.write(np.ascontiguousarray(v)) for v in values]
    back = []
    for v, offset in zip(values, offsets):
        out = np.empty_like(v)
        spill.read_into(out, offset)
        back.append(out)
    return offsets, back


def test_the_undo_file_gives_back_every_value_exactly_direct_or_buffered(tmp_path, monkeypatch):
    from keras_surgery import stream as stream_module

    rng = np.random.default_rng(3)
    values = _spill_values(rng)
    spill = stream_module.SpillFile(str(tmp_path))
    try:
        direct = spill.direct
        offsets, back = _written_and_read(spill, values)
    finally:
        spill.close()
    for got, want in zip(back, values):
        np.testing.assert_array_equal(got, want)
    if direct:  # each value starts on a block of its own
        assert all(o % stream_module.DIRECT_BLOCK == 0 for o in offsets)
    # buffered, as where the filesystem refuses O_DIRECT
    monkeypatch.setattr(stream_module, "_set_direct", lambda fd, on: False)
    spill = stream_module.SpillFile(str(tmp_path))
    try:
        assert not spill.direct
        offsets, back = _written_and_read(spill, values)
    finally:
        spill.close()
    assert offsets == list(np.cumsum([0] + [v.nbytes for v in values[:-1]]))
    for got, want in zip(back, values):
        np.testing.assert_array_equal(got, want)


def test_the_undo_file_writes_buffered_when_a_direct_write_is_refused(tmp_path, monkeypatch):
    import errno

    from keras_surgery import stream as stream_module

    values = _spill_values(np.random.default_rng(4))

    def refused(self, data, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(stream_module.SpillFile, "_write_direct", refused)
    spill = stream_module.SpillFile(str(tmp_path))
    spill.direct = True  # as if the filesystem had taken the flag
    try:
        _, back = _written_and_read(spill, values)
        assert not spill.direct
    finally:
        spill.close()
    for got, want in zip(back, values):
        np.testing.assert_array_equal(got, want)

    def full(self, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream_module.SpillFile, "_write_direct", full)
    spill = stream_module.SpillFile(str(tmp_path))
    spill.direct = True
    try:
        with pytest.raises(OSError, match="No space"):
            spill.write(values[0])  # any other error is the migration's failure, as before
    finally:
        spill.close()


def test_a_failed_write_to_the_undo_file_still_lets_the_journal_close(tmp_path, monkeypatch):
    """An error from the disk while a value is written (the traceback keeping the write's
    frames alive) is the migration's error, and closing the journal after it still works."""
    import errno

    from keras_surgery import stream as stream_module

    value = np.random.default_rng(5).standard_normal(
        stream_module.DIRECT_BUFFER_BYTES // 4 + 9).astype(np.float32)
    spill = stream_module.SpillFile(str(tmp_path))

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space") as failed:
        spill.write(value)
    assert failed.value.__traceback__ is not None
    spill.close()  # while the traceback is alive


@pytest.mark.parametrize("spill_bytes", [0, 1 << 20])
def test_the_journal_restores_a_scalar_as_a_scalar(spill_bytes, tmp_path):
    from keras_surgery import stream as stream_module

    class Var:
        value = None

        def assign(self, value):
            self.value = np.asarray(value)

    journal = stream_module.Journal(spill_bytes, directory=str(tmp_path))
    scalar, vector = Var(), Var()
    try:
        journal.save(scalar, np.asarray(np.float32(2.5)))
        journal.save(vector, np.arange(3, dtype=np.int64))
        restored, failed = journal.restore()
    finally:
        journal.close()
    assert restored == [vector, scalar] and failed == []
    assert scalar.value.shape == () and scalar.value == np.float32(2.5)
    np.testing.assert_array_equal(vector.value, np.arange(3))


def test_writes_go_small_ones_smallest_first_then_large_ones_largest_first(monkeypatch):
    """TensorFlow copies each large value into a buffer an earlier, larger variable gave back
    only when the large ones go largest first (`stream.write_order`)."""
    from types import SimpleNamespace

    from keras_surgery import stream as stream_module

    monkeypatch.setattr(stream_module, "SHARED_MIN_BYTES", 400)
    shapes = [(10, 10), (3,), (20, 10), (5, 5), (10, 30), (2, 2), (20, 10)]  # float32
    writes = [stream_module.Write(SimpleNamespace(shape=s, dtype="float32"), str(i),
                                  lambda *a: None) for i, s in enumerate(shapes)]
    order = [w.what for w in stream_module.write_order(writes)]
    # under 400 bytes: (3,) 12, (2, 2) 16, (5, 5) 100; from 400: 1200, 800, 800, 400
    assert order == ["1", "5", "3", "4", "2", "6", "0"]


def _staged_spec():
    names = ["a", "b", "c", "d", "e"]
    return {"old_features": {"x": names},
            "new_features": {"x": ["a", "b", "c", "new", "d", "e"]}}


def _count_staged(monkeypatch):
    from keras_surgery import stream as stream_module

    staged = []
    real = stream_module.Staging.for_value

    def for_value(self, current):
        out = real(self, current)
        if out is not None:
            staged.append(out.ctypes.data)
        return out

    monkeypatch.setattr(stream_module, "SHARED_MIN_BYTES", 0)
    monkeypatch.setattr(stream_module.Staging, "for_value", for_value)
    return staged


def test_staged_values_are_exact_and_no_variable_keeps_a_buffer_that_is_reused(monkeypatch):
    """On TensorFlow every large value is computed in one reused buffer (`stream.Staging`),
    the first of them aligned so that the variable keeps it: the values must be the
    np.take/np.delete oracle's, and no two variables may end up on the same memory."""
    staged = _count_staged(monkeypatch)
    old, new = _wide(5, 0), _wide(6, 1)
    report = ks.migrate_weights(old, new, **_staged_spec())
    assert report.preserves_function
    got, want = _values(new), _values(old)
    np.testing.assert_array_equal(np.delete(got[0], 3, axis=0), want[0])
    np.testing.assert_array_equal(got[0][3], 0)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(g, w)
    if keras.backend.backend() != "tensorflow":
        assert not staged  # JAX keeps each value; PyTorch writes in place
        return
    assert len(staged) == len(new.weights)
    buffers = [variable_view(v).ctypes.data for v in new.weights]
    assert len(set(buffers)) == len(buffers)
    assert staged[0] in buffers  # the first buffer is kept by its variable
    assert len(set(staged)) < len(staged)  # and one buffer is used again after it
    reused = {a for a in staged if staged.count(a) > 1}
    assert not reused & set(buffers)  # never one a variable kept


def test_a_failed_staged_migration_restores_every_variable_exactly(monkeypatch):
    """A write that fails while its value is computed in the reused buffer leaves every
    variable, including the one that kept the first buffer, as it was."""
    staged = _count_staged(monkeypatch)
    old, new = _wide(5, 0), _wide(6, 1)
    before = _values(new)
    from keras_surgery import apply as apply_module

    real_fill, calls = apply_module.fill, []

    def failing(wp, *args, **kwargs):
        value = real_fill(wp, *args, **kwargs)
        calls.append(wp.path)
        if len(calls) == 4:
            value[...] = 99.0
            raise RuntimeError("disk on fire")
        return value

    monkeypatch.setattr(apply_module, "fill", failing)
    with pytest.raises(ks.SurgeryError, match="disk on fire"):
        ks.migrate_weights(old, new, **_staged_spec())
    assert len(calls) == 4
    if keras.backend.backend() == "tensorflow":
        assert len(staged) == 4
    for got, want in zip(_values(new), before):
        np.testing.assert_array_equal(got, want)


def _spilling(monkeypatch, saved_in: list[str]):
    """Every undo value goes to the file; records the thread each one was written in."""
    import threading

    from keras_surgery import plan as plan_module
    from keras_surgery import stream as stream_module

    real_apply, real_save = plan_module.apply_plan, stream_module.Journal.save

    def save(self, *args, **kwargs):
        saved_in.append(threading.current_thread().name)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(plan_module, "apply_plan",
                        lambda *a, **k: real_apply(*a, **{**k, "spill_bytes": 0}))
    monkeypatch.setattr(stream_module.Journal, "save", save)


@pytest.mark.parametrize("fault", ["compute", "undo file"])
def test_a_failure_while_the_journal_writes_in_its_thread_restores_every_variable(
        fault, monkeypatch):
    """On TensorFlow and JAX a value going to the undo file is written in a thread while its
    replacement is computed (`stream._Saving`). A failure of either, at the fourth write,
    leaves every variable exactly as it was, and the error says which."""
    import errno

    from keras_surgery import apply as apply_module
    from keras_surgery import stream as stream_module

    saved_in: list[str] = []
    _spilling(monkeypatch, saved_in)
    old, new = _wide(5, 0), _wide(6, 1)
    before = _values(new)
    real_fill, real_write, calls = apply_module.fill, stream_module.SpillFile.write, []

    def failing_fill(wp, *args, **kwargs):
        calls.append(wp.path)
        value = real_fill(wp, *args, **kwargs)
        if fault == "compute" and len(calls) == 4:
            raise RuntimeError("disk on fire")
        return value

    def failing_write(self, value):
        if fault == "undo file" and len(calls) == 3:  # the fourth write's entry
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, value)

    monkeypatch.setattr(apply_module, "fill", failing_fill)
    monkeypatch.setattr(stream_module.SpillFile, "write", failing_write)
    with pytest.raises(ks.SurgeryError, match="disk on fire" if fault == "compute"
                       else "No space left"):
        ks.migrate_weights(old, new, **_staged_spec())
    if keras.backend.backend() in ("tensorflow", "jax"):
        assert any(name.startswith("keras-surgery-journal") for name in saved_in)
    for got, want in zip(_values(new), before):
        np.testing.assert_array_equal(got, want)
    # and the same migration, unfaulted, gives the oracle's values
    fault = None
    report = ks.migrate_weights(old, new, **_staged_spec())
    assert report.preserves_function
    got, want = _values(new), _values(old)
    np.testing.assert_array_equal(np.delete(got[0], 3, axis=0), want[0])
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(g, w)
