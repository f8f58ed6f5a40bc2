"""The one fill kernel against a dense-mask oracle: what `fill` writes, what the plan counts and
what the visual report draws are the same regions, for every policy and axis kind."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_surgery.fill import counts, fill, needs_fresh, regions_of
from keras_surgery.plan import AxisMap, WeightPlan
from keras_surgery.rules.api import Init
from keras_surgery.visual import COPIED, FRESH, ZEROED, region_map

KINDS = ("in", "out", "diag", "struct")


def _oracle(wp: WeightPlan, old: np.ndarray, fresh: np.ndarray, policy: str):
    """(value, copy mask, zero mask) computed with weight-sized masks, the slow obvious way."""
    ndim = len(wp.shape)
    copy = np.ones(wp.shape, bool)
    out_ok = np.ones(wp.shape, bool)
    gathered = old
    for a, amap in enumerate(wp.axes):
        shape = [-1 if i == a else 1 for i in range(ndim)]
        copy &= amap.matched.reshape(shape)
        if amap.kind in ("out", "diag") and not amap.zero_new:
            out_ok &= amap.matched.reshape(shape)
        gathered = np.take(gathered, np.maximum(amap.old_index, 0), axis=a)
        if amap.share is not None:
            gathered = gathered * amap.share.reshape(shape)
    preserve = policy in ("preserve", "net2net") and wp.zero_fill
    zero = out_ok & ~copy if preserve else np.zeros(wp.shape, bool)
    value = np.where(copy, gathered * wp.scale, np.where(zero, 0.0, fresh)).astype(fresh.dtype)
    return value, copy, zero


@st.composite
def weight_plans(draw):
    ndim = draw(st.integers(1, 3))
    axes, old_shape = [], []
    for _ in range(ndim):
        n_old = draw(st.integers(1, 5))
        n_new = draw(st.integers(1, 6))
        index = np.array(draw(st.lists(st.integers(-1, n_old - 1), min_size=n_new,
                                       max_size=n_new)), dtype=np.int64)
        kind = draw(st.sampled_from(KINDS))
        amap = AxisMap(kind, index, draw(st.booleans()))
        if draw(st.booleans()):  # net2net: some new indices copy a source unit
            source = np.where(index < 0, draw(st.integers(0, n_old - 1)), -1)
            amap.source = source.astype(np.int64)
            if kind == "in":
                amap.share = np.array(draw(st.lists(st.floats(0.25, 1.0), min_size=n_new,
                                                    max_size=n_new)))
        axes.append(amap)
        old_shape.append(n_old)
    shape = tuple(len(a.index) for a in axes)
    wp = WeightPlan("layer", "kernel", "p", shape, old_shape=tuple(old_shape), axes=axes,
                    scale=draw(st.sampled_from([1.0, 0.5])), zero_fill=draw(st.booleans()))
    return wp, draw(st.sampled_from(["preserve", "net2net", "random"]))


@settings(max_examples=300, deadline=None)
@given(weight_plans(), st.integers(0, 2**16))
def test_fill_counts_and_picture_match_the_oracle(case, seed):
    wp, policy = case
    rng = np.random.default_rng(seed)
    old = rng.normal(size=wp.old_shape).astype(np.float32)
    fresh = rng.normal(size=wp.shape).astype(np.float32) + 10.0  # no fresh value is 0
    value, copy, zero = _oracle(wp, old, fresh, policy)

    got = fill(wp, old, fresh.copy(), policy)
    np.testing.assert_allclose(got, value, rtol=4 * np.finfo(np.float32).eps, atol=0)
    in_place = fresh.copy()
    assert fill(wp, old, in_place, policy, in_place=True) is in_place
    np.testing.assert_allclose(in_place, value, rtol=4 * np.finfo(np.float32).eps, atol=0)
    blocked = fill(wp, old, fresh.copy(), policy, release=lambda: None)
    np.testing.assert_array_equal(blocked, got)

    assert counts(wp, policy) == (int(copy.sum()), int(zero.sum()),
                                  int(wp.size - copy.sum() - zero.sum()), 0)
    assert needs_fresh(wp, policy) == bool((~copy & ~zero).any())
    if len(wp.shape) == 2:  # the picture of a 2-D weight is its regions, cell by cell
        expected = np.full(wp.shape, FRESH)
        expected[zero] = ZEROED
        expected[copy] = COPIED
        np.testing.assert_array_equal(region_map(wp, policy, max_cells=64), expected)


def test_fill_never_returns_a_view_of_old_and_copies_in_blocks(monkeypatch):
    from keras_surgery import fill as fill_module

    monkeypatch.setattr(fill_module, "COPY_BLOCK_BYTES", 16)
    old = np.arange(40, dtype=np.float32).reshape(10, 4)
    wp = WeightPlan("d", "kernel", "p", (10, 4), old_shape=(10, 4),
                    axes=[AxisMap("in", np.arange(10)[::-1].copy()), AxisMap("out", np.arange(4))])
    releases = []
    got = fill(wp, old, np.zeros((10, 4), np.float32), "preserve",
               release=lambda: releases.append(1))
    np.testing.assert_array_equal(got, old[::-1])
    assert not np.shares_memory(got, old)
    assert len(releases) == 10  # one row of 16 bytes per block
    assert regions_of(wp, "preserve").everything and not needs_fresh(wp, "preserve")


def test_new_vocabulary_rows_start_as_the_mean_of_the_copied_rows():
    old = np.arange(12, dtype=np.float32).reshape(3, 4)
    wp = WeightPlan("emb", "embeddings", "p", (5, 4), old_shape=(3, 4),
                    axes=[AxisMap("lookup", np.array([2, -1, 0, 1, -1])),
                          AxisMap("out", np.arange(4))])
    got = fill(wp, old, np.full((5, 4), 9.0, np.float32), "preserve")
    np.testing.assert_array_equal(got[[0, 2, 3]], np.take(old, [2, 0, 1], axis=0))
    np.testing.assert_array_equal(got[1], old.mean(axis=0))
    np.testing.assert_array_equal(got[4], old.mean(axis=0))
    assert counts(wp, "preserve") == (12, 8, 0, 0)  # the mean rows are in the zero region
    slot = fill(wp, old, np.zeros((5, 4), np.float32), "preserve", new_rows_mean=False)
    np.testing.assert_array_equal(slot[[1, 4]], 0)  # optimizer slots: zero where new


@pytest.mark.parametrize("kind,value,nonzero", [("constant", 1.0, 6), ("identity", None, 3)])
def test_a_start_replaces_the_fill_and_is_counted_as_preset(kind, value, nonzero):
    wp = WeightPlan("new", "kernel", "p", (1, 3, 3) if kind == "identity" else (6,),
                    init=Init(kind, value) if value is not None else Init(kind))
    got = fill(wp, None, np.full(wp.shape, 5.0, np.float32), "preserve")
    assert np.count_nonzero(got) == nonzero
    assert counts(wp, "preserve") == (0, wp.size - nonzero, 0, nonzero)
    assert not needs_fresh(wp, "preserve")
