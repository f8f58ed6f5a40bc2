"""Per-layer cost: migrate_weights against Keras's load_weights on models of many small layers.

Each model runs in a fresh child process: the old model (weights=None, small input, 3 input
channels) is saved to a temporary `.keras` file; its twin gets `load_weights` and the new model
(4 input channels) gets `migrate_weights`, `--calls` times each in the process, taking turns (so
both see the same load on a shared machine). Reported: the first call, and the best of the later
calls (the issue's figures are later calls; on a loaded machine one call is too noisy to
compare), each from a collected heap. `--profile NAME` prints a cProfile of the last migration
of one model to stderr. `--live` migrates from the old model itself instead of its file.

Usage: python benchmarks/bench_layers.py [--models EfficientNetB0,MobileNetV3Small,ResNet50,chain]
           [--chain 1000] [--calls 4] [--live] [--profile NAME] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

MODELS = ("EfficientNetB0", "MobileNetV3Small", "ResNet50", "chain")
SIZE = 64  # input height and width of the applications


def build(name: str, channels: int, chain: int):
    """`name` with `channels` input channels (the chain: `channels` input features)."""
    import keras

    if name == "chain":
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 20 * chain))  # Keras's map_graph
        x = inputs = keras.Input((channels,), name="x")
        for i in range(chain):
            x = keras.layers.Dense(8, activation="tanh", name=f"d{i}")(x)
        return keras.Model(inputs, x)
    constructor = getattr(keras.applications, name)
    return constructor(weights=None, input_shape=(SIZE, SIZE, channels), classes=10)


def randomise(model) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for v in model.weights:
        if "moving_variance" in v.path or "variance" in v.name:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(v.dtype))
        elif len(v.shape) == 1:
            v.assign(rng.normal(0, 0.1, v.shape).astype(v.dtype))


def child(name: str, chain: int, profile: bool, calls: int = 4, live: bool = False) -> dict:
    import keras

    import keras_surgery as ks
    import keras_surgery.migrate  # noqa: F401  (imported lazily; not part of the measure)

    old = build(name, 3, chain)
    randomise(old)
    workdir = tempfile.mkdtemp(prefix="bench-layers-")
    path = os.path.join(workdir, "old.keras")
    try:
        old.save(path)
        twin, new = build(name, 3, chain), build(name, 4, chain)
        keras_s, migrate_s = [], []
        for turn in range(max(2, calls)):
            # Each call starts from a collected heap: a full collection costs 0.6-0.7 s with
            # TensorFlow loaded, and one left pending by a call would land in the next one.
            gc.collect()
            t = time.perf_counter()
            twin.load_weights(path)
            keras_s.append(time.perf_counter() - t)
            profiler = None
            if profile and turn == max(2, calls) - 1:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            gc.collect()
            t = time.perf_counter()
            report = ks.migrate_weights(old if live else path, new)
            migrate_s.append(time.perf_counter() - t)
            if profiler is not None:
                import pstats

                profiler.disable()
                stats = pstats.Stats(profiler, stream=sys.stderr)
                stats.sort_stats("tottime").print_stats(30)
                stats.sort_stats("cumulative").print_stats(50)
    finally:
        if os.path.exists(path):
            os.remove(path)
        os.rmdir(workdir)
    keras_best, migrate_best = min(keras_s[1:]), min(migrate_s[1:])
    return {"model": name, "backend": keras.backend.backend(), "layers": len(old.layers),
            "parameters": int(old.count_params()), "calls": len(keras_s),
            "source": "model" if live else "file",
            "keras_first_s": round(keras_s[0], 3), "keras_s": round(keras_best, 3),
            "migrate_first_s": round(migrate_s[0], 3), "migrate_s": round(migrate_best, 3),
            "ratio": round(migrate_best / keras_best, 2),
            "preserves_function": bool(report.preserves_function),
            "load": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--chain", type=int, default=1000, help="Dense layers of the chain")
    parser.add_argument("--calls", type=int, default=4, help="calls of each per model (>= 2)")
    parser.add_argument("--live", action="store_true", help="migrate from the live old model")
    parser.add_argument("--profile", default=None, help="cProfile this model's migration")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.chain, args.profile == args.child, args.calls,
                               args.live)))
        return
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            parser.error(f"unknown model '{name}'; expected some of {list(MODELS)}")
        command = [sys.executable, os.path.abspath(__file__), "--child", name,
                   "--chain", str(args.chain), "--calls", str(args.calls)]
        command += ["--live"] if args.live else []
        command += ["--profile", args.profile] if args.profile else []
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        env.setdefault("KERAS_BACKEND", "tensorflow")
        proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if args.profile == name or proc.returncode != 0:
            sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed with exit code {proc.returncode}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print("| model | layers | parameters | load_weights s (1st / best later) | migrate s (1st / "
          "best later) | migrate / load_weights (later) | load avg |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['parameters']:,} | {r['keras_first_s']} / "
              f"{r['keras_s']} | {r['migrate_first_s']} / {r['migrate_s']} | {r['ratio']} | "
              f"{r['load']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
