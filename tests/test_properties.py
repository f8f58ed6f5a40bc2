"""Property-based tests (hypothesis) of the label algebra and of planning.

Hypothesis draws surgeries of small models: named input features inserted, deleted, permuted
and widened, hidden widths grown or shrunk, with or without a residual Add and a Concatenate of
two inputs, explicit or Keras auto-generated layer names. For every drawn case the old
model (live, or read from its saved file) is migrated into the new one and

* the promise is checked against the truth: when `report.preserves_function` is True, the new
  model's outputs equal the old model's (new features random, removed features 0 in the old
  input) within 1e-5; with explicit names it must be True exactly when no width shrank;
* the first layer's copied rows are checked against an oracle built from column names alone;
* the plan round-trips through JSON.

`index_map` and `feature_columns` are checked against pure-Python oracles.

Examples are derandomized (the same cases on every run, as CI needs); set KS_HYPOTHESIS_EXPLORE=1
to draw new ones, and KS_HYPOTHESIS_EXAMPLES=N to draw more.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_surgery as ks
from keras_surgery.features import FeatureColumn, feature_columns
from keras_surgery.match import index_map
from keras_surgery.plan import SurgeryPlan
from tests.util import max_diff, predict, randomize

L = keras.layers
TOL = 1e-5
BATCH = 16
POOL = ("hp", "mana", "armor", "speed", "gold", "xp", "pos", "vel", "time", "team")

SETTINGS = settings(
    max_examples=int(os.environ.get("KS_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    derandomize=not os.environ.get("KS_HYPOTHESIS_EXPLORE"),
    database=None,
    # The autouse seeding fixture runs once per test, not per example; that is fine here.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")


# -- drawing surgeries -----------------------------------------------------------------------


@dataclass
class InputChange:
    """One model input's feature spec before and after."""

    name: str
    old: list  # spec entries: "name" or ("name", width)
    new: list

    @staticmethod
    def columns(entries: list) -> list[tuple[str, int]]:
        """(feature, k) of every column, expanded here independently of the engine."""
        out = []
        for entry in entries:
            name, width = (entry, 1) if isinstance(entry, str) else entry
            out.extend((name, k) for k in range(width))
        return out


@dataclass
class Surgery:
    inputs: list[InputChange]
    old_widths: list[int]
    new_widths: list[int]
    old_out: int
    new_out: int
    residual: bool
    named: bool
    via_file: bool  # the old model is read from its .keras file instead of live

    @property
    def shrinks(self) -> bool:
        return self.new_out < self.old_out or any(
            n < o for n, o in zip(self.new_widths, self.old_widths)
        )


def _entry(draw, name: str, width: int):
    # A width-1 feature may be written as a name or as a (name, 1) pair: the same column.
    if width == 1 and draw(st.booleans()):
        return name
    return (name, width)


@st.composite
def input_changes(draw, input_name: str) -> InputChange:
    universe = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=7, unique=True))
    widths = {n: draw(st.sampled_from((1, 1, 1, 2, 3))) for n in universe}
    old_names = draw(st.lists(st.sampled_from(universe), min_size=1, unique=True))
    # A random subset in a random order: insertions, deletions and permutations at once.
    new_names = draw(st.lists(st.sampled_from(universe), min_size=1, unique=True))
    new_widths = {
        n: draw(st.integers(1, 3)) if widths[n] > 1 and draw(st.booleans()) else widths[n]
        for n in new_names
    }
    return InputChange(
        input_name,
        [_entry(draw, n, widths[n]) for n in old_names],
        [_entry(draw, n, new_widths[n]) for n in new_names],
    )


@st.composite
def surgeries(draw) -> Surgery:
    two_inputs = draw(st.booleans())
    names = ("a", "b") if two_inputs else ("obs",)
    inputs = [draw(input_changes(n)) for n in names]
    residual = draw(st.booleans())
    depth = 1 if residual else draw(st.integers(1, 2))
    old_widths = draw(st.lists(st.integers(1, 6), min_size=depth, max_size=depth))
    new_widths = [w + draw(st.sampled_from((0, 0, 1, 3, -1))) for w in old_widths]
    new_widths = [max(1, w) for w in new_widths]
    old_out = draw(st.integers(1, 3))
    new_out = old_out + draw(st.sampled_from((0, 0, 0, 1, -1)))
    return Surgery(inputs, old_widths, new_widths, old_out, max(1, new_out), residual,
                   named=draw(st.booleans()), via_file=draw(st.booleans()))


def build(case: Surgery, *, new: bool) -> keras.Model:
    """The old or new model of a drawn surgery."""
    widths = case.new_widths if new else case.old_widths

    def name(n: str) -> str | None:
        return n if case.named else None

    inputs = [
        keras.Input((len(InputChange.columns(c.new if new else c.old)),), name=c.name)
        for c in case.inputs
    ]
    x = inputs[0] if len(inputs) == 1 else L.Concatenate(name=name("cat"))(inputs)
    h = L.Dense(widths[0], activation="tanh", name=name("h0"))(x)
    if case.residual:
        h = L.Add(name=name("add"))([h, L.Dense(widths[0], activation="tanh",
                                                name=name("h1"))(h)])
    for i, width in enumerate(widths[1:], start=1):
        h = L.Dense(width, activation="tanh", name=name(f"h{i}"))(h)
    out = L.Dense(case.new_out if new else case.old_out, name=name("out"))(h)
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], out)


def inputs_for(case: Surgery, rng) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(new inputs, old inputs): new features random, removed features 0 in the old input."""
    new_x, old_x = [], []
    for change in case.inputs:
        old_cols, new_cols = InputChange.columns(change.old), InputChange.columns(change.new)
        x_new = rng.normal(size=(BATCH, len(new_cols))).astype("float32")
        x_old = np.zeros((BATCH, len(old_cols)), "float32")
        for j, col in enumerate(new_cols):
            if col in old_cols:
                x_old[:, old_cols.index(col)] = x_new[:, j]
        new_x.append(x_new)
        old_x.append(x_old)
    return new_x, old_x


def _feed(xs: list[np.ndarray]):
    return xs[0] if len(xs) == 1 else xs


def _specs(case: Surgery, *, new: bool) -> dict:
    return {c.name: list(c.new if new else c.old) for c in case.inputs}


def _first_layer_oracle(case: Surgery, old_model, new_model) -> None:
    """Rows of the first Dense kernel follow their column names: copied where the column is
    old, zero where it is new (on the old units), whatever the order."""
    old_cols = [(c.name, col) for c in case.inputs for col in InputChange.columns(c.old)]
    new_cols = [(c.name, col) for c in case.inputs for col in InputChange.columns(c.new)]
    old_k = old_model.get_layer("h0").kernel.numpy()
    new_k = new_model.get_layer("h0").kernel.numpy()
    units = min(case.old_widths[0], case.new_widths[0])
    for j, col in enumerate(new_cols):
        if col in old_cols:
            expected = old_k[old_cols.index(col), :units]
        else:
            expected = np.zeros(units, "float32")
        np.testing.assert_array_equal(new_k[j, :units], expected, err_msg=f"row of {col}")
    np.testing.assert_array_equal(new_model.get_layer("h0").bias.numpy()[:units],
                                  old_model.get_layer("h0").bias.numpy()[:units])


# -- the surgery property --------------------------------------------------------------------


@SETTINGS
@given(case=surgeries(), seed=st.integers(0, 2**16))
def test_drawn_surgeries_keep_their_promise(tmp_path, case, seed):
    rng = np.random.default_rng(seed)
    old_model = build(case, new=False)
    randomize(old_model, None, seed=seed)
    new_model = build(case, new=True)
    old = old_model
    if case.via_file:
        old = tmp_path / "old.keras"
        old_model.save(old)

    migrator = ks.ModelMigrator(old, old_features=_specs(case, new=False))
    plan = migrator.plan(new_model, new_features=_specs(case, new=True), allow_unrelated=True)
    if not plan.totals()["copied"]:
        # Auto-named layers are matched by what they read: with no feature in common nothing
        # matches, and that is refused unless asked for.
        assert not case.named and not plan.preserves_function
        with pytest.raises(ks.SurgeryError, match="have nothing in common"):
            migrator.plan(new_model, new_features=_specs(case, new=True))
    report = plan.apply(new_model)

    # The plan is pure data: JSON and back gives the same plan.
    again = SurgeryPlan.from_dict(json.loads(plan.to_json()))
    assert again.to_dict() == plan.to_dict()

    new_x, old_x = inputs_for(case, rng)
    got, want = predict(new_model, _feed(new_x)), predict(old_model, _feed(old_x))
    if case.named:
        assert report.preserves_function == (not case.shrinks), report.warnings
        _first_layer_oracle(case, old_model, new_model)
    if report.preserves_function:
        assert case.new_out >= case.old_out, "an output lost units, yet preserves_function"
        assert max_diff(got[:, : case.old_out], want) <= TOL, report.summary()
    else:
        assert report.warnings, "preserves_function is False without a warning saying why"
        if case.named and case.new_out == case.old_out:
            # The flag is honest both ways: a unit that was lost really changes the outputs.
            assert max_diff(got, want) > TOL, report.summary()


@SETTINGS
@given(case=surgeries())
def test_unchanged_model_copies_everything(case):
    case.inputs = [InputChange(c.name, c.old, c.old) for c in case.inputs]
    case.new_widths, case.new_out = list(case.old_widths), case.old_out
    old_model = build(case, new=False)
    randomize(old_model, None)
    new_model = build(case, new=True)
    spec = _specs(case, new=False)
    report = ks.migrate_weights(old_model, new_model, old_features=spec, new_features=spec)
    assert report.preserves_function, report.warnings
    assert report.totals["zeroed"] == 0 and report.totals["fresh"] == 0
    for a, b in zip(old_model.weights, new_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# -- index_map against a pure-Python oracle --------------------------------------------------


def _index_map_oracle(old: list[int], new: list[int]) -> list[int]:
    return [old.index(label) if label in old else -1 for label in new]


ids = st.one_of(
    st.integers(-4, 12),  # few distinct labels: many matches and duplicates
    st.integers(-(2**63), 2**63 - 1),  # int64 extremes
)


@SETTINGS
@given(old=st.lists(ids, max_size=30), new=st.lists(ids, max_size=30))
def test_index_map_matches_oracle(old, new):
    got = index_map(np.array(old, dtype=np.int64), np.array(new, dtype=np.int64))
    assert got.dtype == np.int64 and got.shape == (len(new),)
    assert got.tolist() == _index_map_oracle(old, new)


@SETTINGS
@given(labels=st.lists(st.integers(0, 10**6), unique=True, max_size=40), data=st.data())
def test_index_map_inverts_a_permutation(labels, data):
    moved = data.draw(st.permutations(labels))
    kept = data.draw(st.lists(st.sampled_from(moved), unique=True)) if moved else []
    fresh = [10**6 + 1 + i for i in range(data.draw(st.integers(0, 5)))]
    new = np.array(kept + fresh, dtype=np.int64)
    found = index_map(np.array(moved, dtype=np.int64), new)
    assert (found[len(kept):] == -1).all()
    assert np.array_equal(np.array(moved, dtype=np.int64)[found[: len(kept)]], new[: len(kept)])


# -- feature_columns against a pure-Python oracle --------------------------------------------


@st.composite
def feature_specs(draw):
    """(spec, input widths): some inputs named, some left unnamed."""
    inputs = draw(st.lists(st.sampled_from(("obs", "a", "b", "global")), min_size=1,
                           unique=True))
    spec, widths = {}, {}
    for name in inputs:
        if draw(st.booleans()):
            features = draw(st.lists(st.sampled_from(POOL), min_size=1, unique=True))
            entries = [_entry(draw, f, draw(st.integers(1, 3))) for f in features]
            spec[name] = entries
            widths[name] = len(InputChange.columns(entries))
        else:
            widths[name] = draw(st.integers(0, 5))
    return spec, widths


@SETTINGS
@given(drawn=feature_specs())
def test_feature_columns_match_oracle(drawn):
    spec, widths = drawn
    columns = feature_columns(spec, widths, where="the model")
    assert list(columns) == list(widths)
    for name, width in widths.items():
        if name in spec:
            expected = [FeatureColumn(name, f, k) for f, k in InputChange.columns(spec[name])]
        else:
            expected = [FeatureColumn(name, None, i) for i in range(width)]
        assert columns[name] == expected
        keys = [c.feature for c in columns[name]]
        assert all(key[0] == name for key in keys)


@SETTINGS
@given(drawn=feature_specs(), extra=st.integers(-2, 2).filter(bool))
def test_feature_columns_refuse_wrong_widths(drawn, extra):
    spec, widths = drawn
    if not spec:
        return
    name = next(iter(spec))
    total = widths[name]
    widths = {**widths, name: total + extra}
    with pytest.raises(ks.FeatureSpecError) as info:
        feature_columns(spec, widths, where="the model")
    assert str(info.value).startswith(
        f"Features of input '{name}' of the model cover {total} column(s) but the input's last "
        f"axis has {total + extra}."
    )


@SETTINGS
@given(drawn=feature_specs(), data=st.data())
def test_feature_columns_refuse_duplicates(drawn, data):
    spec, widths = drawn
    if not spec:
        return
    name = next(iter(spec))
    entries = list(spec[name])
    twin = data.draw(st.sampled_from(entries))
    entries.insert(data.draw(st.integers(0, len(entries))), twin)
    widths = {**widths, name: len(InputChange.columns(entries))}
    feature = twin if isinstance(twin, str) else twin[0]
    with pytest.raises(ks.FeatureSpecError,
                       match=f"Feature name '{feature}' appears twice in input '{name}'"):
        feature_columns({**spec, name: entries}, widths, where="the model")
