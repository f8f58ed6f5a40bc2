"""How planning scales: phi tables + plan time against input features and against parameters.

The surgery's cost should grow with the lengths of the weight axes (each axis is labelled and
matched once), not with features x parameters. Two sweeps, each point the best of three runs:

  features:   Input(n) -> Dense(64) -> Dense(16), n = 100 .. 100,000; the new model inserts
              n/100 features in the middle and drops n/100 others.
  parameters: 1,000 features -> Dense(h) -> Dense(h) -> Dense(16), h = 128 .. 8,192 (up to
              ~77M parameters; axis lengths grow like sqrt(parameters)); the new model widens
              both hidden layers by h/8 and inserts 10 features.

Prints a table, writes JSON (--json) and a log-log plot (--plot, needs matplotlib) with the
fitted slopes: time ~ n^1 over features, ~ params^0.5 (that is, linear in axis length) over
parameters.

Usage: python benchmarks/bench_scaling.py [--quick] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_surgery as ks  # noqa: E402
from keras_surgery.graph import graph_from_model  # noqa: E402
from keras_surgery.phi import PhiTable  # noqa: E402
from keras_surgery.propagate import propagate  # noqa: E402


def mlp(n_in: int, hidden: list[int], n_out: int) -> keras.Model:
    # Zeros: the plan reads shapes, never values, and building stays cheap at 77M parameters.
    x = inp = keras.Input((n_in,), name="obs")
    for i, h in enumerate(hidden):
        x = keras.layers.Dense(h, activation="relu", name=f"h{i}",
                               kernel_initializer="zeros")(x)
    out = keras.layers.Dense(n_out, name="out", kernel_initializer="zeros")(x)
    return keras.Model(inp, out)


def edited(names: list[str], k: int) -> list[str]:
    """`names` with k features inserted in the middle and k others dropped."""
    mid = len(names) // 2
    kept = names[: mid - k] + names[mid:] if k else list(names)
    return kept[: len(kept) // 2] + [f"new{i}" for i in range(k)] + kept[len(kept) // 2:]


def plan_seconds(old, new, old_features, new_features, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        PhiTable.from_labels(propagate(graph_from_model(old), features=old_features))
        PhiTable.from_labels(propagate(graph_from_model(new), features=new_features))
        ks.ModelMigrator(old, old_features=old_features).plan(new, new_features=new_features)
        best = min(best, time.perf_counter() - t)
    return best


def axis_total(model: keras.Model) -> int:
    return sum(sum(w.shape) for w in model.weights)


def feature_sweep(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        names = [f"f{i}" for i in range(n)]
        new_names = edited(names, max(1, n // 100))
        old, new = mlp(n, [64], 16), mlp(len(new_names), [64], 16)
        seconds = plan_seconds(old, new, {"obs": names}, {"obs": new_names})
        rows.append({"features": n, "parameters": old.count_params(),
                     "axis_length": axis_total(old), "plan_s": round(seconds, 4)})
        print(f"  features {n:>7}: {seconds:.3f} s", file=sys.stderr)
        del old, new
    return rows


def parameter_sweep(widths: list[int], n_features: int = 1000) -> list[dict]:
    rows = []
    names = [f"f{i}" for i in range(n_features)]
    new_names = names[:500] + [f"new{i}" for i in range(10)] + names[500:]
    for h in widths:
        old = mlp(n_features, [h, h], 16)
        new = mlp(len(new_names), [h + h // 8, h + h // 8], 16)
        seconds = plan_seconds(old, new, {"obs": names}, {"obs": new_names})
        rows.append({"width": h, "parameters": old.count_params(),
                     "axis_length": axis_total(old), "plan_s": round(seconds, 4)})
        print(f"  width {h:>5} ({old.count_params() / 1e6:.1f}M parameters): {seconds:.3f} s",
              file=sys.stderr)
        del old, new
        gc.collect()
    return rows


def slope(xs: list[float], ys: list[float]) -> float:
    """The exponent of a power law through the points (least squares on log-log)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot(features: list[dict], params: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs, ys = [r["features"] for r in features], [r["plan_s"] for r in features]
    a.loglog(xs, ys, "o-", label=f"measured (slope {slope(xs, ys):.2f})")
    a.loglog(xs, [ys[-1] * x / xs[-1] for x in xs], "--", color="grey", label="linear")
    a.set_xlabel("input features")
    a.set_ylabel("phi tables + plan (s)")
    a.set_title("against input features")
    a.legend()
    xs, ys = [r["parameters"] for r in params], [r["plan_s"] for r in params]
    b.loglog(xs, ys, "o-", label=f"measured (slope {slope(xs, ys):.2f})")
    b.loglog(xs, [ys[-1] * x / xs[-1] for x in xs], "--", color="grey",
             label="linear in parameters")
    b.loglog(xs, [ys[-1] * (x / xs[-1]) ** 0.5 for x in xs], ":", color="grey",
             label="linear in axis length")
    b.set_xlabel("parameters")
    b.set_title("against parameters (1,000 features)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sweeps")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    sizes = [100, 300, 1_000, 3_000, 10_000, 30_000, 100_000]
    widths = [128, 256, 512, 1024, 2048, 4096, 8192]
    if args.quick:
        sizes, widths = sizes[:4], widths[:4]
    features, params = feature_sweep(sizes), parameter_sweep(widths)
    results = {
        "features": features, "parameters": params,
        "slope_features": round(slope([r["features"] for r in features],
                                      [r["plan_s"] for r in features]), 3),
        "slope_parameters": round(slope([r["parameters"] for r in params],
                                        [r["plan_s"] for r in params]), 3),
    }
    print(f"{'features':>10}{'plan (s)':>12}")
    for r in features:
        print(f"{r['features']:>10}{r['plan_s']:>12.4f}")
    print(f"{'parameters':>12}{'plan (s)':>12}")
    for r in params:
        print(f"{r['parameters']:>12}{r['plan_s']:>12.4f}")
    print(f"slope over features: {results['slope_features']}, over parameters: "
          f"{results['slope_parameters']} (0.5 = linear in axis length)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot(features, params, args.plot)


if __name__ == "__main__":
    main()
