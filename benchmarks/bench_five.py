"""OpenAI-Five-scale surgery benchmark: phi + plan, migrate_weights, against Keras's loader.

The model: two entity-set inputs through shared Dense layers and max-pooling, a global input,
Dense 4096, LSTM 4096, several action heads (about 150M parameters at --scale 1). The modified
model inserts observation features in the middle of an entity set, adds a head and widens the
pre-LSTM Dense. Measured in one process:

  (a) phi tables and plan for the old file and the new model
  (b) migrate_weights from the old .keras file into the new model
  (c) Keras's load_weights of the same file into an identical model (the reference)
  (d) peak resident memory added during (b)
  (e) the floor: reading the file's bytes once plus assigning every variable once

Usage: python benchmarks/bench_five.py [--scale 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_surgery as ks  # noqa: E402
from keras_surgery.graph import graph_from_model, live_variables  # noqa: E402
from keras_surgery.keras_file import KerasFile  # noqa: E402
from keras_surgery.phi import PhiTable  # noqa: E402
from keras_surgery.propagate import propagate  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Samples resident memory in a thread; `.peak` is the maximum seen."""

    def __enter__(self):
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def build(scale: float, *, unit_features: int, hero_features: int, pre_lstm: int, heads: int):
    s = lambda n: max(8, int(n * scale))  # noqa: E731
    init = keras.initializers.RandomNormal(stddev=0.02)  # cheap: no orthogonal 4096x16384
    units = keras.Input((s(64), unit_features), name="units")
    heroes = keras.Input((10, hero_features), name="heroes")
    glob = keras.Input((s(512),), name="global")
    enc_u = keras.layers.Dense(s(256), activation="relu", name="unit_encoder",
                               kernel_initializer=init)
    enc_h = keras.layers.Dense(s(256), activation="relu", name="hero_encoder",
                               kernel_initializer=init)
    pooled_u = keras.layers.GlobalMaxPooling1D(name="pool_units")(enc_u(units))
    pooled_h = keras.layers.GlobalMaxPooling1D(name="pool_heroes")(enc_h(heroes))
    x = keras.layers.Concatenate(name="cat")([pooled_u, pooled_h, glob])
    x = keras.layers.Dense(pre_lstm, activation="relu", name="pre_lstm",
                           kernel_initializer=init)(x)
    x = keras.layers.Reshape((1, pre_lstm), name="one_step")(x)
    core = keras.layers.LSTM(s(4096), name="core", kernel_initializer=init,
                             recurrent_initializer=init)(x)
    outputs = [keras.layers.Dense(s(n), name=f"head_{i}", kernel_initializer=init)(core)
               for i, n in enumerate([8, 30, 64, 128, 256, 16][:heads])]
    return keras.Model([units, heroes, glob], outputs)


def unit_names(n: int, inserted: int = 0) -> list[str]:
    names = [f"u{i}" for i in range(n)]
    for k in range(inserted):
        names.insert(n // 2, f"new{k}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    s = args.scale
    pre, pre_new = max(8, int(4096 * s)), max(9, int(4608 * s))
    old_spec = dict(unit_features=48, hero_features=32, pre_lstm=pre, heads=5)
    new_spec = dict(unit_features=52, hero_features=32, pre_lstm=pre_new, heads=6)
    workdir = tempfile.mkdtemp(prefix="bench-five-")
    old_path = os.path.join(workdir, "old.keras")

    t = time.perf_counter()
    old = build(s, **old_spec)
    old.save(old_path)
    n_params = old.count_params()
    size_mb = os.path.getsize(old_path) / 2**20
    del old
    new = build(s, **new_spec)
    print(f"built and saved: {n_params / 1e6:.1f}M parameters, {size_mb:.0f} MB file "
          f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    old_features = {"units": unit_names(48)}
    new_features = {"units": unit_names(48, inserted=4)}

    # (a) phi tables and plan
    t = time.perf_counter()
    with KerasFile(old_path) as f:
        PhiTable.from_labels(propagate(f.graph(), features=old_features))
    PhiTable.from_labels(propagate(graph_from_model(new), features=new_features))
    plan = ks.ModelMigrator(old_path, old_features=old_features).plan(
        new, new_features=new_features)
    t_plan = time.perf_counter() - t

    # (b) migrate_weights, with (d) peak memory
    base = rss_mb()
    with PeakRSS() as peak:
        t = time.perf_counter()
        report = ks.migrate_weights(old_path, new, old_features=old_features,
                                    new_features=new_features)
        t_migrate = time.perf_counter() - t
    extra_mb = peak.peak - base
    largest_mb = max(int(np.prod(w.shape)) for w in plan.weights) * 4 / 2**20
    # The first call pays one-off costs (TensorFlow's assign kernels, first touch of the file
    # and of fresh variable memory); a second call shows the steady state.
    t = time.perf_counter()
    ks.migrate_weights(old_path, new, old_features=old_features, new_features=new_features)
    t_migrate_warm = time.perf_counter() - t

    # (c) Keras's own load_weights into an identical model, first and second call
    twin = build(s, **old_spec)
    t = time.perf_counter()
    twin.load_weights(old_path)
    t_keras = time.perf_counter() - t
    t = time.perf_counter()
    twin.load_weights(old_path)
    t_keras_warm = time.perf_counter() - t

    # (e) floor: the file's bytes once + assigning every variable once
    t = time.perf_counter()
    with open(old_path, "rb") as f:
        while f.read(1 << 24):
            pass
    for v in live_variables(twin).values():
        if hasattr(v, "assign"):
            v.assign(np.zeros(v.shape, v.dtype))
    t_floor = time.perf_counter() - t

    results = {
        "parameters": n_params, "file_mb": round(size_mb, 1),
        "plan_s": round(t_plan, 3), "migrate_s": round(t_migrate, 3),
        "keras_load_weights_s": round(t_keras, 3), "floor_s": round(t_floor, 3),
        "migrate_warm_s": round(t_migrate_warm, 3),
        "keras_load_weights_warm_s": round(t_keras_warm, 3),
        "migrate_over_keras": round(t_migrate / t_keras, 3),
        "migrate_over_keras_warm": round(t_migrate_warm / t_keras_warm, 3),
        "migrate_over_floor": round(t_migrate / t_floor, 3),
        "migrate_warm_over_floor": round(t_migrate_warm / t_floor, 3),
        "extra_peak_mb": round(extra_mb, 1), "largest_tensor_mb": round(largest_mb, 1),
        "memory_budget_mb": round(2 * largest_mb + 200, 1),
        "preserves_function": report.preserves_function,
    }
    print(f"{'measure':<28}{'value':>12}")
    for key, value in results.items():
        print(f"{key:<28}{value!s:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
