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

Each runs in a fresh child process that builds its own model, so that none inherits memory
another already took from the system (first touches of fresh memory are a large part of a
first call here); each then runs a second time in its process, the steady state. A first call's
time depends on how quickly the system hands out fresh memory, which varies from run to run on
a shared machine (we saw 0.7 to 3 s for the same migration), so every child runs `--repeat`
times, in turns, and the table shows medians with the range.

Usage: python benchmarks/bench_five.py [--scale 1.0] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


OLD_SPEC = dict(unit_features=48, hero_features=32, heads=5)
NEW_SPEC = dict(unit_features=52, hero_features=32, heads=6)
FEATURES = ({"units": unit_names(48)}, {"units": unit_names(48, inserted=4)})


def specs(scale: float) -> tuple[dict, dict]:
    pre, pre_new = max(8, int(4096 * scale)), max(9, int(4608 * scale))
    return dict(OLD_SPEC, pre_lstm=pre), dict(NEW_SPEC, pre_lstm=pre_new)


def child_prepare(path: str, scale: float) -> dict:
    t = time.perf_counter()
    old = build(scale, **specs(scale)[0])
    old.save(path)
    return {"parameters": old.count_params(), "file_mb": round(os.path.getsize(path) / 2**20, 1),
            "build_save_s": round(time.perf_counter() - t, 1)}


def child_plan(path: str, scale: float) -> dict:
    new = build(scale, **specs(scale)[1])
    old_features, new_features = FEATURES
    t = time.perf_counter()
    with KerasFile(path) as f:
        PhiTable.from_labels(propagate(f.graph(), features=old_features))
    PhiTable.from_labels(propagate(graph_from_model(new), features=new_features))
    plan = ks.ModelMigrator(path, old_features=old_features).plan(
        new, new_features=new_features)
    return {"plan_s": round(time.perf_counter() - t, 3),
            "largest_tensor_mb": round(max(w.size for w in plan.weights) * 4 / 2**20, 1)}


def child_migrate(path: str, scale: float) -> dict:
    new = build(scale, **specs(scale)[1])
    old_features, new_features = FEATURES
    base = rss_mb()
    with PeakRSS() as peak:
        t = time.perf_counter()
        report = ks.migrate_weights(path, new, old_features=old_features,
                                    new_features=new_features)
        first = time.perf_counter() - t
    t = time.perf_counter()
    ks.migrate_weights(path, new, old_features=old_features, new_features=new_features)
    warm = time.perf_counter() - t
    return {"migrate_s": round(first, 3), "migrate_warm_s": round(warm, 3),
            "extra_peak_mb": round(peak.peak - base, 1),
            "preserves_function": report.preserves_function}


def child_keras(path: str, scale: float) -> dict:
    twin = build(scale, **specs(scale)[0])
    base = rss_mb()
    with PeakRSS() as peak:
        t = time.perf_counter()
        twin.load_weights(path)
        first = time.perf_counter() - t
    t = time.perf_counter()
    twin.load_weights(path)
    return {"keras_load_weights_s": round(first, 3),
            "keras_load_weights_warm_s": round(time.perf_counter() - t, 3),
            "keras_extra_peak_mb": round(peak.peak - base, 1)}


def floor_pass(path: str, variables: list) -> float:
    """Reads the file's bytes once, in order, and assigns every variable once from them (the
    new model has more parameters than the file holds: reading wraps around)."""
    t = time.perf_counter()
    with open(path, "rb") as f:
        for v in variables:
            dtype = np.dtype(v.dtype)
            need = int(np.prod(v.shape)) * dtype.itemsize
            buf = f.read(need)
            while len(buf) < need:
                f.seek(0)
                buf += f.read(need - len(buf))
            v.assign(np.frombuffer(buf, dtype=dtype).reshape(v.shape))
            del buf
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t


def child_floor(path: str, scale: float) -> dict:
    new = build(scale, **specs(scale)[1])
    variables = [v for v in live_variables(new).values() if hasattr(v, "assign")]
    first = floor_pass(path, variables)
    return {"floor_s": round(first, 3), "floor_warm_s": round(floor_pass(path, variables), 3)}


CHILDREN = {"prepare": child_prepare, "plan": child_plan, "migrate": child_migrate,
            "keras": child_keras, "floor": child_floor}


def run_child(name: str, path: str, scale: float) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--path", path, "--scale", str(scale)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child '{name}' failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5,
                        help="fresh processes per measurement (medians are reported)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.path, args.scale)))
        return
    workdir = tempfile.mkdtemp(prefix="bench-five-")
    path = os.path.join(workdir, "old.keras")
    results: dict = {}
    runs: dict[str, list] = {}
    try:
        print("  prepare ...", file=sys.stderr)
        results.update(run_child("prepare", path, args.scale))
        for turn in range(args.repeat):  # in turns, so that a slow spell hits every measure
            for name in ("plan", "migrate", "keras", "floor"):
                print(f"  {name} ({turn + 1}/{args.repeat}) ...", file=sys.stderr)
                for key, value in run_child(name, path, args.scale).items():
                    runs.setdefault(key, []).append(value)
    finally:
        if os.path.exists(path):
            os.remove(path)
        os.rmdir(workdir)
    for key, values in runs.items():
        if all(isinstance(v, bool) for v in values):
            results[key] = all(values)
        else:
            results[key] = round(statistics.median(values), 3)
            results[f"{key}_range"] = [min(values), max(values)]
    results.update({
        "migrate_over_keras": round(results["migrate_s"] / results["keras_load_weights_s"], 3),
        "migrate_over_keras_warm": round(
            results["migrate_warm_s"] / results["keras_load_weights_warm_s"], 3),
        "migrate_over_floor": round(results["migrate_s"] / results["floor_s"], 3),
        "migrate_over_floor_warm": round(results["migrate_warm_s"] / results["floor_warm_s"], 3),
        "memory_budget_mb": round(2 * results["largest_tensor_mb"] + 200, 1),
    })
    for ratio, (num, den) in {"migrate_over_keras": ("migrate_s", "keras_load_weights_s"),
                              "migrate_over_floor": ("migrate_s", "floor_s")}.items():
        turns = [a / b for a, b in zip(runs[num], runs[den])]  # same turn, same conditions
        results[f"{ratio}_range"] = [round(min(turns), 3), round(max(turns), 3)]
    print(f"{'measure':<28}{'median':>12}  range")
    for key, value in results.items():
        if not key.endswith("_range"):
            spread = results.get(f"{key}_range")
            print(f"{key:<28}{value!s:>12}  {spread[0]}-{spread[1]}" if spread else
                  f"{key:<28}{value!s:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
