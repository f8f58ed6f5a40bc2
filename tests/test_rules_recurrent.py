"""Recurrent rules: widening and feature surgery on SimpleRNN, LSTM, GRU and Bidirectional keep
the old outputs exactly, and every per-gate block lands where it belongs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_surgery as ks
from tests.util import assert_input_sensitive, columns_from, max_diff, predict, randomize

T, F = 12, 5  # timesteps, input features
TOL = 1e-5
GATES = {"SimpleRNN": 1, "LSTM": 4, "GRU": 3}


def sequences(seed: int, features: int = F, n: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, T, features)).astype("float32")


def gate_columns(gates: int, units: int, kept: int) -> np.ndarray:
    """Columns of the first `kept` units of every gate block of a (.., gates * units) weight."""
    return np.concatenate([g * units + np.arange(kept) for g in range(gates)])


def cell_weights(layer) -> dict[str, np.ndarray]:
    cell = layer.cell
    found = {"kernel": cell.kernel, "recurrent_kernel": cell.recurrent_kernel}
    if cell.bias is not None:
        found["bias"] = cell.bias
    return {k: np.asarray(v.numpy()) for k, v in found.items()}


def make_old(build, data, tmp_path):
    """Builds the old model, gives it non-trivial weights and saves it to a .keras file."""
    old = build()
    randomize(old, data)
    assert_input_sensitive(old, data, data[::-1] + 0.5)
    path = tmp_path / "old.keras"
    old.save(path)
    return old, str(path)


def check_widened_cell(
    old_layer, new_layer, kind: str, old_units: int, new_units: int, fresh=None
) -> None:
    """Per-gate oracle: old blocks copied exactly, new units' rows into old gates zero, and
    (given the new layer's `fresh` weights from before the surgery) new gates left fresh."""
    gates = GATES[kind]
    cols = gate_columns(gates, new_units, old_units)
    old_w, new_w = cell_weights(old_layer), cell_weights(new_layer)
    old_inputs = old_w["kernel"].shape[0]  # a stacked layer's inputs may have grown too
    kernel = np.take(new_w["kernel"], cols, axis=1)
    np.testing.assert_array_equal(kernel[:old_inputs], old_w["kernel"])
    rec = np.take(new_w["recurrent_kernel"], cols, axis=1)
    np.testing.assert_array_equal(rec[:old_units], old_w["recurrent_kernel"])
    np.testing.assert_array_equal(rec[old_units:], 0.0)  # new units never reach old gates
    np.testing.assert_array_equal(np.take(new_w["bias"], cols, axis=-1), old_w["bias"])
    # New gates keep their fresh initial values: the new units learn.
    new_cols = np.setdiff1d(np.arange(gates * new_units), cols)
    assert np.abs(np.take(new_w["kernel"], new_cols, axis=1)).max() > 0
    for role, value in (fresh or {}).items():
        np.testing.assert_array_equal(
            np.take(new_w[role], new_cols, axis=-1), np.take(value, new_cols, axis=-1)
        )


def seq_model(kind: str, units: int, *, features: int = F, **kwargs) -> keras.Model:
    x = keras.Input((T, features), name="obs")
    y = getattr(keras.layers, kind)(units, return_sequences=True, name="rnn", **kwargs)(x)
    return keras.Model(x, y)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("LSTM", {}),
        ("GRU", {"reset_after": True}),
        ("GRU", {"reset_after": False}),
        ("SimpleRNN", {}),
    ],
    ids=["lstm", "gru-reset-after", "gru-reset-before", "simple-rnn"],
)
def test_widening_is_exact_over_every_timestep(kind, kwargs, tmp_path):
    data = sequences(0)
    old, path = make_old(lambda: seq_model(kind, 16, **kwargs), data, tmp_path)
    new = seq_model(kind, 24, **kwargs)
    fresh = cell_weights(new.get_layer("rnn"))

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    out_old, out_new = predict(old, data), predict(new, data)
    assert out_new.shape == (4, T, 24)
    assert max_diff(out_new[..., :16], out_old) <= TOL  # every one of the T timesteps
    assert np.abs(out_new[..., 16:]).max() > 1e-3  # the new units do compute something
    check_widened_cell(old.get_layer("rnn"), new.get_layer("rnn"), kind, 16, 24, fresh)
    if kind == "GRU" and kwargs["reset_after"]:
        assert new.get_layer("rnn").cell.bias.shape == (2, 72)


def test_lstm_with_an_inserted_input_feature(tmp_path):
    old_names, new_names = list("abcde"), ["a", "b", "new", "c", "d", "e"]
    data = sequences(1)
    old, path = make_old(lambda: seq_model("LSTM", 8), data, tmp_path)
    new = seq_model("LSTM", 8, features=6)

    report = ks.migrate_weights(
        path, new, old_features={"obs": old_names}, new_features={"obs": new_names}
    )

    assert report.preserves_function, report.warnings
    new_data = columns_from(data, old_names, new_names, np.random.default_rng(2))
    assert max_diff(predict(new, new_data), predict(old, data)) <= TOL
    old_k = cell_weights(old.get_layer("rnn"))["kernel"]
    new_k = cell_weights(new.get_layer("rnn"))["kernel"]
    np.testing.assert_array_equal(np.delete(new_k, 2, axis=0), old_k)
    np.testing.assert_array_equal(new_k[2], 0.0)  # the new feature does not reach old gates
    for role in ("recurrent_kernel", "bias"):
        np.testing.assert_array_equal(
            cell_weights(new.get_layer("rnn"))[role], cell_weights(old.get_layer("rnn"))[role]
        )


def test_lstm_widened_with_unknown_sequence_length(tmp_path):
    def build(units: int) -> keras.Model:
        x = keras.Input((None, F), name="obs")
        y = keras.layers.LSTM(units, return_sequences=True, go_backwards=True, name="rnn")(x)
        return keras.Model(x, y)

    data = sequences(8)
    old, path = make_old(lambda: build(5), data, tmp_path)
    new = build(7)

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    assert max_diff(predict(new, data)[..., :5], predict(old, data)) <= TOL
    longer = np.concatenate([data, data], axis=1)  # any length: the recurrence is exact
    assert max_diff(predict(new, longer)[..., :5], predict(old, longer)) <= TOL


def stacked(units1: int, units2: int) -> keras.Model:
    # Auto-named layers: Keras renumbers them per build, so they are matched structurally.
    x = keras.Input((T, F))
    h = keras.layers.LSTM(units1, return_sequences=True)(x)
    y = keras.layers.LSTM(units2, return_sequences=True)(h)
    return keras.Model(x, y)


def test_stacked_lstms_both_widened(tmp_path):
    data = sequences(3)
    old, path = make_old(lambda: stacked(16, 12), data, tmp_path)
    new = stacked(24, 20)
    new_l1, new_l2 = [la for la in new.layers if isinstance(la, keras.layers.LSTM)]
    fresh1, fresh2 = cell_weights(new_l1), cell_weights(new_l2)

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    assert max_diff(predict(new, data)[..., :12], predict(old, data)) <= TOL
    old_l1, old_l2 = [la for la in old.layers if isinstance(la, keras.layers.LSTM)]
    check_widened_cell(old_l1, new_l1, "LSTM", 16, 24, fresh1)
    check_widened_cell(old_l2, new_l2, "LSTM", 12, 20, fresh2)
    # The upper layer's input rows follow the lower layer's units: new ones are zero.
    cols = gate_columns(4, 20, 12)
    k2 = np.take(cell_weights(new_l2)["kernel"], cols, axis=1)
    np.testing.assert_array_equal(k2[:16], cell_weights(old_l2)["kernel"])
    np.testing.assert_array_equal(k2[16:], 0.0)


def bidirectional(units: int, merge_mode: str | None) -> keras.Model:
    x = keras.Input((T, F), name="obs")
    y = keras.layers.Bidirectional(
        keras.layers.LSTM(units, return_sequences=True), merge_mode=merge_mode, name="bi"
    )(x)
    return keras.Model(x, y)


@pytest.mark.parametrize("merge_mode", ["concat", "sum", None])
def test_bidirectional_lstm_widened(merge_mode, tmp_path):
    data = sequences(4)
    old, path = make_old(lambda: bidirectional(8, merge_mode), data, tmp_path)
    new = bidirectional(12, merge_mode)
    bi = new.get_layer("bi")
    fresh = [cell_weights(bi.forward_layer), cell_weights(bi.backward_layer)]

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    out_old, out_new = predict(old, data), predict(new, data)
    if merge_mode == "concat":  # [fwd 0..12 | bwd 0..12]: old units at 0..8 and 12..20
        kept = np.concatenate([np.arange(8), 12 + np.arange(8)])
        assert max_diff(np.take(out_new, kept, axis=-1), out_old) <= TOL
    elif merge_mode == "sum":
        assert max_diff(out_new[..., :8], out_old) <= TOL
    else:
        assert max_diff([o[..., :8] for o in out_new], out_old) <= TOL
    old_bi, new_bi = old.get_layer("bi"), new.get_layer("bi")
    check_widened_cell(old_bi.forward_layer, new_bi.forward_layer, "LSTM", 8, 12, fresh[0])
    check_widened_cell(old_bi.backward_layer, new_bi.backward_layer, "LSTM", 8, 12, fresh[1])


def with_states(kind: str, units: int) -> keras.Model:
    x = keras.Input((T, F), name="obs")
    outs = getattr(keras.layers, kind)(units, return_state=True, name="rnn")(x)
    return keras.Model(x, outs)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_return_state_outputs_are_preserved(kind, tmp_path):
    data = sequences(5)
    old, path = make_old(lambda: with_states(kind, 16), data, tmp_path)
    new = with_states(kind, 24)

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    out_old, out_new = predict(old, data), predict(new, data)
    assert len(out_new) == (3 if kind == "LSTM" else 2)  # output, h (, c)
    assert max_diff([o[..., :16] for o in out_new], out_old) <= TOL
    np.testing.assert_allclose(out_new[1], out_new[0], atol=0)  # h is the last output
    check_widened_cell(old.get_layer("rnn"), new.get_layer("rnn"), kind, 16, 24)


def test_rnn_over_a_cell_and_a_dense_head(tmp_path):
    def build(units: int) -> keras.Model:
        x = keras.Input((T, F), name="obs")
        h = keras.layers.RNN(keras.layers.GRUCell(units), name="rnn")(x)
        return keras.Model(x, keras.layers.Dense(3, name="head")(h))

    data = sequences(6)
    old, path = make_old(lambda: build(10), data, tmp_path)
    new = build(14)

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    assert max_diff(predict(new, data), predict(old, data)) <= TOL
    head_old = old.get_layer("head").kernel.numpy()
    head_new = new.get_layer("head").kernel.numpy()
    np.testing.assert_array_equal(head_new[:10], head_old)
    np.testing.assert_array_equal(head_new[10:], 0.0)  # new units feed the head nothing yet


def test_conv_lstm_is_opaque_with_a_warning(tmp_path):
    def build() -> keras.Model:
        x = keras.Input((3, 6, 6, 2), name="frames")
        return keras.Model(x, keras.layers.ConvLSTM2D(2, 3, name="conv_lstm")(x))

    old = build()
    path = tmp_path / "old.keras"
    old.save(path)
    new = build()

    report = ks.migrate_weights(str(path), new)

    assert any("conv_lstm" in w and "opaque" in w for w in report.warnings), report.warnings
    for a, b in zip(old.weights, new.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # same shapes: copied as they are


def test_bidirectional_gru_return_state(tmp_path):
    def build(units: int) -> keras.Model:
        x = keras.Input((T, F), name="obs")
        outs = keras.layers.Bidirectional(
            keras.layers.GRU(units, return_state=True), name="bi"
        )(x)
        return keras.Model(x, outs)

    data = sequences(7)
    old, path = make_old(lambda: build(6), data, tmp_path)
    new = build(9)

    report = ks.migrate_weights(path, new)

    assert report.preserves_function, report.warnings
    out_old, out_new = predict(old, data), predict(new, data)
    assert len(out_new) == 3  # concat output, forward h, backward h
    kept = np.concatenate([np.arange(6), 9 + np.arange(6)])
    assert max_diff(np.take(out_new[0], kept, axis=-1), out_old[0]) <= TOL
    assert max_diff([o[..., :6] for o in out_new[1:]], out_old[1:]) <= TOL
