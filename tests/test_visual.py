"""The pictures tell the truth: cells show the state most of their entries are in (with the
shares), starts are drawn as starts, and the verdict and warnings come first."""

from __future__ import annotations

import numpy as np

from keras_surgery.fill import counts
from keras_surgery.plan import AxisMap, SurgeryPlan, WeightPlan
from keras_surgery.rules.api import Init
from keras_surgery.visual import COPIED, FRESH, START, ZEROED, region_fractions, region_map, to_html


def _kernel(n_in, n_out, old_in, old_out):
    index_in = np.array([i if i < old_in else -1 for i in range(n_in)])
    index_out = np.array([j if j < old_out else -1 for j in range(n_out)])
    return WeightPlan("d", "kernel", "layers/d/vars/0", (n_in, n_out), old_layer="d",
                      old_path="layers/d/vars/0", old_shape=(old_in, old_out),
                      axes=[AxisMap("in", index_in), AxisMap("out", index_out)])


def test_a_mostly_copied_weight_is_drawn_mostly_copied():
    wp = _kernel(300, 300, 300, 200)  # two thirds of the columns continue old units
    grid = region_map(wp, "preserve", max_cells=4)
    assert grid.shape == (4, 4)
    assert (grid == COPIED).sum() >= 8 and (grid == FRESH).sum() >= 4
    shares = region_fractions(wp, "preserve", max_cells=1)[0, 0]
    copied, zeroed, fresh, _ = counts(wp, "preserve")
    np.testing.assert_allclose(shares[[COPIED, ZEROED, FRESH]],
                               np.array([copied, zeroed, fresh]) / wp.size)


def test_folded_conv_taps_count_every_entry():
    wp = WeightPlan("c", "kernel", "p", (3, 3, 2, 4), old_shape=(3, 3, 2, 2), axes=[
        AxisMap("struct", np.arange(3)), AxisMap("struct", np.arange(3)),
        AxisMap("in", np.array([0, 1])), AxisMap("out", np.array([0, 1, -1, -1]))])
    shares = region_fractions(wp, "preserve", max_cells=64)
    assert shares.shape == (2, 4, 4)
    np.testing.assert_array_equal(shares[:, :2, COPIED], 1.0)
    np.testing.assert_array_equal(shares[:, 2:, FRESH], 1.0)


def test_a_start_is_drawn_as_a_start_and_matches_its_counts():
    wp = WeightPlan("new", "kernel", "p", (4, 4), init=Init("identity"))
    grid = region_map(wp, "preserve")
    np.testing.assert_array_equal(grid == START, np.eye(4, dtype=bool))
    np.testing.assert_array_equal(grid == ZEROED, ~np.eye(4, dtype=bool))
    wp.count("preserve")
    assert (wp.preset, wp.zeroed) == ((grid == START).sum(), (grid == ZEROED).sum())


def test_the_page_puts_the_verdict_and_warnings_first(tmp_path):
    wp = _kernel(4, 3, 3, 3)
    wp.count("preserve")
    plan = SurgeryPlan("old.keras", "new", "preserve", [wp], {"d": "d"}, [], [],
                       ["layer 'd': something to read first"], False)
    page = open(to_html(plan, tmp_path / "r.html"), encoding="utf-8").read()
    assert page.index("preserves_function: <b>False</b>") < page.index("something to read")
    assert page.index("something to read") < page.index("<table>")
    # Exact cells here: the new input's row is zeroed, the others copied.
    assert page.count("<title>copied 100%</title>") == 9
    assert page.count("<title>zeroed 100%</title>") == 3
