"""Benchmark: building the graph IR is linear in the number of layers.

A chain of N weightless layers (Activation), the shape of the audit's bomb (32k layers took
98 s: the topological order re-scanned every call not yet placed once per depth), written as the
model config Keras saves, is parsed with `keras_surgery.graph.build_graph` for N = 1250, 2500
and 5000 (`--sizes`). The table gives the time, the time per layer, and for the largest N the
old round-by-round order for comparison (`--no-reference` skips it). `--file` also times
`ks.phi_table` on a `.keras` file of the largest chain (the whole read: h5 walk, layer checks,
labels).

    python benchmarks/bench_graph.py [--sizes 1250,2500,5000] [--file] [--no-reference]

Pass/fail (exit 1 on failure), generous for a busy shared machine: the largest chain builds in
under 15 s, and doubling N at most triples the time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LIMIT_S = 15.0
MAX_DOUBLING_RATIO = 3.0


def chain_config(n: int, width: int = 4) -> dict:
    """The config Keras writes for Input -> n Activation layers (a Functional model)."""
    layers = [{"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
               "name": "obs", "inbound_nodes": [],
               "config": {"batch_shape": [None, width], "dtype": "float32", "name": "obs"}}]
    previous = "obs"
    for i in range(n):
        name = f"act_{i}"
        tensor = {"class_name": "__keras_tensor__", "config": {
            "shape": [None, width], "dtype": "float32", "keras_history": [previous, 0, 0]}}
        layers.append({
            "module": "keras.layers", "class_name": "Activation", "registered_name": None,
            "name": name, "build_config": {"input_shape": [None, width]},
            "config": {"name": name, "trainable": True, "dtype": "float32",
                       "activation": "relu"},
            "inbound_nodes": [{"args": [tensor], "kwargs": {}}],
        })
        previous = name
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "registered_name": "Functional",
            "config": {"name": "chain", "trainable": True, "layers": layers,
                       "input_layers": [["obs", 0, 0]], "output_layers": [[previous, 0, 0]]}}


def write_keras_file(path: str, n: int) -> None:
    """A `.keras` file of the chain: its config and a weights tree of empty layer groups."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        group = h5.create_group("layers")
        for i in range(n):
            group.create_group("activation" if i == 0 else f"activation_{i}").create_group("vars")
        h5.create_group("vars")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.5.0"}))
        archive.writestr("config.json", json.dumps(chain_config(n)))
        archive.writestr("model.weights.h5", buffer.getvalue())


def round_by_round(deps: dict) -> list:
    """The order as it was computed before: one scan of the remaining calls per depth."""
    order, done, remaining = [], set(), list(deps)
    while remaining:
        ready = [c for c in remaining if deps[c] <= done]
        order.extend(ready)
        done.update(ready)
        remaining = [c for c in remaining if c not in done]
    return order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1250,2500,5000")
    parser.add_argument("--file", action="store_true", help="also time phi_table on a file")
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras_surgery.graph import LiveWeights, _by_depth, build_graph

    sizes = sorted(int(s) for s in args.sizes.split(","))
    build_graph(chain_config(10), LiveWeights({}))  # imports and Keras classes, once
    times = {}
    print("| layers | build_graph | per layer |")
    print("|---|---|---|")
    for n in sizes:
        config = chain_config(n)
        started = time.perf_counter()
        graph = build_graph(config, LiveWeights({}), description="chain")
        times[n] = time.perf_counter() - started
        assert [name for name, _ in graph.order] == [f"act_{i}" for i in range(n)]
        print(f"| {n} | {times[n]:.2f} s | {1e6 * times[n] / n:.0f} us |")
    largest = sizes[-1]
    if not args.no_reference:
        deps = {(f"act_{i}", 0): ({(f"act_{i - 1}", 0)} if i else set())
                for i in range(largest)}
        started = time.perf_counter()
        new = _by_depth(deps, "chain")
        linear = time.perf_counter() - started
        started = time.perf_counter()
        old = round_by_round(deps)
        quadratic = time.perf_counter() - started
        assert new == old
        print(f"order of {largest} calls: {linear:.3f} s by depth (Kahn), {quadratic:.2f} s "
              "round by round (before)")
    if args.file:
        import keras_surgery as ks

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "chain.keras")
            write_keras_file(path, largest)
            started = time.perf_counter()
            ks.phi_table(path)
            print(f"phi_table of a {largest}-layer file: {time.perf_counter() - started:.1f} s")
    failures = []
    if times[largest] > LIMIT_S:
        failures.append(f"{largest} layers took {times[largest]:.1f} s > {LIMIT_S} s")
    for small, big in zip(sizes, sizes[1:]):
        if big == 2 * small and times[big] > MAX_DOUBLING_RATIO * max(times[small], 0.05):
            failures.append(f"{small} -> {big} layers: {times[small]:.2f} -> {times[big]:.2f} s")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
