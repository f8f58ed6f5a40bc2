"""Surgery under keras.distribution on JAX (DataParallel and a ModelParallel layout), on two
host devices: the migrated variables and optimizer slots keep their layouts and shards, and
their values are exactly the np.take/np.delete oracle's.

JAX fixes its device count when it initialises, so the check runs in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

pytest.importorskip("jax")
# The child runs on JAX whatever this run's backend is: once, in the JAX run, is enough.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution is tested on JAX, in the JAX run (KERAS_BACKEND=jax) only",
)

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, keras, numpy as np
    import keras_surgery as ks

    assert keras.backend.backend() == "jax" and len(jax.devices()) == 2, jax.devices()
    OLD = [f"f{i}" for i in range(6)]
    NEW = ["f1", "f0", "f3", "new", "f5", "f4"]  # f2 removed, "new" inserted, others moved
    KEPT_NEW = [j for j, f in enumerate(NEW) if f in OLD]
    KEPT_OLD = [OLD.index(NEW[j]) for j in KEPT_NEW]
    UNITS_OLD, UNITS_NEW = 8, 12  # both even: the "model" axis splits them in two

    def build(features, units, seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((len(features),), name="obs")
        h = keras.layers.Dense(units, activation="relu", name="h")(x)
        model = keras.Model(x, keras.layers.Dense(2, name="out")(h))
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        return model

    def values(variables):
        return {v.path: keras.ops.convert_to_numpy(v) for v in variables}

    rng = np.random.default_rng(0)
    old = build(OLD, UNITS_OLD, 0)
    old.fit(rng.normal(size=(32, 6)), rng.normal(size=(32, 2)), epochs=2, verbose=0)
    old.save(sys.argv[1])
    old_w = values(old.weights)
    old_slots = {v.name: keras.ops.convert_to_numpy(v) for v in old.optimizer.variables}
    assert np.any(old_slots["h_kernel_momentum"] != 0)

    def expected_weights(fresh):
        k = fresh["h/kernel"].copy()
        taken = np.take(old_w["h/kernel"], KEPT_OLD, axis=0)
        np.testing.assert_array_equal(  # the same rows, in the old order: f2's row deleted
            taken[np.argsort(KEPT_OLD)], np.delete(old_w["h/kernel"], OLD.index("f2"), axis=0))
        k[KEPT_NEW, :UNITS_OLD] = taken
        k[NEW.index("new"), :UNITS_OLD] = 0.0  # a new feature meets zero rows of old units
        b = fresh["h/bias"].copy()
        b[:UNITS_OLD] = old_w["h/bias"]
        out_k = fresh["out/kernel"].copy()
        out_k[:UNITS_OLD] = old_w["out/kernel"]
        out_k[UNITS_OLD:] = 0.0  # new units start switched off in the head
        return {"h/kernel": k, "h/bias": b, "out/kernel": out_k, "out/bias": old_w["out/bias"]}

    def expected_slots():
        want = {}
        for suffix in ("momentum", "velocity"):
            k = np.zeros((len(NEW), UNITS_NEW), "float32")
            k[KEPT_NEW, :UNITS_OLD] = np.take(old_slots[f"h_kernel_{suffix}"], KEPT_OLD, axis=0)
            b = np.zeros(UNITS_NEW, "float32")
            b[:UNITS_OLD] = old_slots[f"h_bias_{suffix}"]
            out_k = np.zeros((UNITS_NEW, 2), "float32")
            out_k[:UNITS_OLD] = old_slots[f"out_kernel_{suffix}"]
            want.update({f"h_kernel_{suffix}": k, f"h_bias_{suffix}": b,
                         f"out_kernel_{suffix}": out_k,
                         f"out_bias_{suffix}": old_slots[f"out_bias_{suffix}"]})
        want["iteration"] = old_slots["iteration"]
        return want

    def check_shards(v, want, sharding):
        assert v.value.sharding == sharding, (v.path, v.value.sharding, sharding)
        shards = v.value.addressable_shards
        assert len(shards) == 2 and {s.device for s in shards} == set(jax.devices()), v.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), want, err_msg=v.path)
        for s in shards:  # each device holds exactly its slice of the oracle
            np.testing.assert_array_equal(np.asarray(s.data), want[s.index], err_msg=v.path)

    def run(name, distribution, specs):
        with distribution.scope():
            new = build(NEW, UNITS_NEW, 1)
            new.optimizer.build(new.trainable_variables)
            layouts = {v.path: v.value.sharding for v in new.variables + new.optimizer.variables}
            for path, spec in specs.items():  # the layout really is the one asked for
                assert tuple(layouts[path].spec) == spec, (name, path, layouts[path].spec)
            slot_of = {v.name: v for v in new.optimizer.variables}
            for v in new.trainable_variables:  # slots follow their variable's layout
                for suffix in ("momentum", "velocity"):
                    slot = slot_of[f"{v.path.replace('/', '_')}_{suffix}"]
                    assert layouts[slot.path] == layouts[v.path], (name, slot.path)
            fresh = values(new.weights)
            learning_rate = keras.ops.convert_to_numpy(new.optimizer.learning_rate)
            report = ks.migrate_weights(sys.argv[1], new, old_features={"obs": OLD},
                                        new_features={"obs": NEW})
            assert report.preserves_function, report.warnings
            assert not [w for w in report.warnings if "optimizer" in w], report.warnings
            for path, want in expected_weights(fresh).items():
                (v,) = [v for v in new.weights if v.path == path]
                check_shards(v, want, layouts[path])
            slots = expected_slots()
            for v in new.optimizer.variables:
                want = slots.get(v.name, learning_rate)  # the new learning rate is kept
                check_shards(v, np.asarray(want, v.dtype), layouts[v.path])
            x_old = rng.normal(size=(8, len(OLD))).astype("float32")
            x_old[:, OLD.index("f2")] = 0.0  # a removed feature reads as 0
            x_new = rng.normal(size=(8, len(NEW))).astype("float32")
            x_new[:, KEPT_NEW] = x_old[:, KEPT_OLD]
            y_old = keras.ops.convert_to_numpy(old(x_old))
            diff = np.abs(keras.ops.convert_to_numpy(new(x_new)) - y_old).max()
            bound = 8 * np.finfo(np.float32).eps * max(1.0, np.abs(y_old).max())
            assert diff <= bound, (name, diff, bound)
            history = new.fit(x_new, rng.normal(size=(8, 2)), epochs=2, verbose=0)
            assert np.isfinite(history.history["loss"]).all(), name
            for v in new.variables + new.optimizer.variables:  # training keeps them too
                assert v.value.sharding == layouts[v.path], (name, v.path)
        print(f"{name}-OK")

    devices = jax.devices()
    run("DataParallel", keras.distribution.DataParallel(devices=devices),
        {"h/kernel": (None, None), "out/kernel": (None, None)})  # replicated
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["h/kernel"] = (None, "model")
    layout_map["h/bias"] = ("model",)
    layout_map["out/kernel"] = ("model", None)
    run("ModelParallel", keras.distribution.ModelParallel(layout_map=layout_map,
                                                          batch_dim_name="batch"),
        {"h/kernel": (None, "model"), "h/bias": ("model",), "out/kernel": ("model", None)})
    """
)


def test_data_and_model_parallel_keep_layouts_and_values(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "old.keras")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DataParallel-OK" in result.stdout and "ModelParallel-OK" in result.stdout
