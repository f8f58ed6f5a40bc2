"""Benchmark: gradient verification of every feature of a ~1M-parameter model.

A functional model with 500 named input features in two inputs (an observation vector and a
small global vector), a bottleneck residual block, BatchNormalization, a concatenation and two
heads; every feature is verified. Target: under 60 s on 2 CPU cores.

    python benchmarks/bench_verify.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build_model():
    import keras

    obs = keras.Input((480,), name="obs")
    glob = keras.Input((20,), name="glob")
    h = keras.layers.Dense(1024, activation="relu", name="enc")(obs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    r = keras.layers.Dense(64, activation="relu", name="bottleneck")(h)
    r = keras.layers.Dense(1024, name="expand")(r)
    h = keras.layers.Add(name="residual")([h, r])
    g = keras.layers.Dense(64, activation="tanh", name="glob_enc")(glob)
    h = keras.layers.Concatenate(name="cat")([h, g])
    h = keras.layers.Dense(320, activation="relu", name="trunk")(h)
    policy = keras.layers.Dense(16, activation="softmax", name="policy")(h)
    value = keras.layers.Dense(1, name="value")(h)
    return keras.Model([obs, glob], [policy, value])


def main() -> None:
    import keras_surgery as ks

    model = build_model()
    features = {
        "obs": [f"unit{i}" for i in range(480)],
        "glob": [f"g{i}" for i in range(20)],
    }
    print(f"parameters: {model.count_params():,}; input features: 500")
    start = time.perf_counter()
    result = ks.verify_mapping(model, features=features)
    elapsed = time.perf_counter() - start
    print(result.summary(limit=5))
    print(f"verify_mapping: {elapsed:.1f} s for {len(result.features)} features "
          f"({result.checked} feature x weight-axis pairs); ok={result.ok}")


if __name__ == "__main__":
    main()
