"""Billion-scale surgery benchmark: migrate_weights against Keras's loader and the floor.

The model of issue 19: an input of 64 named features, then 12 Dense layers of 8192 units
(738.8M parameters, a 2.8 GB `.keras` file). The new model inserts 2 features in the middle of
the input and widens the first layer to 8704 units. Per backend (a child per backend, each
measure in a fresh child process, KERAS_BACKEND set for it):

  migrate   `ks.migrate_weights(old.keras, new)`; the outputs of the new model on probe inputs
            are checked against the old model's (computed once when the file was written)
  keras     Keras's `load_weights(old.keras)` into a twin of the old model (the reference)
  floor     read the file's bytes into a reused buffer + copy the same number of bytes into
            memory already touched (the physical floor, measured in the same run)

Each reports wall time, the peak of anonymous and of file-backed resident memory above what the
child held before the measure (RssAnon / RssFile of /proc/self/status, sampled in a thread
every 5 ms), and the load average at its start and end (the machine is shared). The old file is
written once and cached in benchmarks/.cache/.

Usage: python benchmarks/bench_billion.py [--small] [--backend tensorflow,jax,torch]
           [--repeat 1] [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
BACKENDS = ("tensorflow", "jax", "torch")
FEATURES = 64
INSERTED = 2
PROBE_ROWS = 4
# (layers, width): the model, and a quick one for development.
SIZES = {"full": (12, 8192), "small": (4, 4096)}


def status_mb() -> dict[str, float]:
    """RssAnon and RssFile of this process, in MiB."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile"):
                found[key] = int(line.split()[1]) / 1024
    return found


class PeakMemory:
    """Samples RssAnon / RssFile in a thread; `.extra()` gives the peaks above the start."""

    def __enter__(self) -> PeakMemory:
        self.base = status_mb()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        for key, value in status_mb().items():
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def extra(self) -> dict[str, float]:
        return {"extra_anon_mb": round(self.peak["RssAnon"] - self.base["RssAnon"], 1),
                "extra_file_mb": round(self.peak["RssFile"] - self.base["RssFile"], 1)}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def feature_names(inserted: int = 0) -> list[str]:
    names = [f"f{i}" for i in range(FEATURES)]
    for k in range(inserted):
        names.insert(FEATURES // 2, f"new{k}")
    return names


def build(size: str, *, new: bool):
    """The old model (zeros: its values are set from numpy) or the new one (zeros too: every
    entry it keeps fresh is a new unit, whose value the benchmark does not depend on)."""
    import keras

    layers, width = SIZES[size]
    x = inputs = keras.Input((FEATURES + (INSERTED if new else 0),), name="x")
    for i in range(layers):
        units = width + width // 16 if new and i == 0 else width
        x = keras.layers.Dense(units, activation="relu" if i < layers - 1 else None,
                               kernel_initializer="zeros", name=f"dense_{i}")(x)
    return keras.Model(inputs, x, name="billion")


def cached_paths(size: str) -> tuple[str, str]:
    layers, width = SIZES[size]
    stem = os.path.join(CACHE, f"billion-{layers}x{width}")
    return stem + ".keras", stem + ".probe.npz"


def child_prepare(size: str) -> dict:
    """Writes the old model with non-trivial weights and its outputs on probe inputs."""
    import numpy as np

    path, probe = cached_paths(size)
    rng = np.random.default_rng(19)
    t = time.perf_counter()
    old = build(size, new=False)
    for layer in old.layers[1:]:
        kernel, bias = layer.kernel, layer.bias
        fan_in = kernel.shape[0]
        kernel.assign(rng.standard_normal(kernel.shape, dtype=np.float32)
                      * np.float32(np.sqrt(2.0 / fan_in)))
        bias.assign(rng.standard_normal(bias.shape, dtype=np.float32) * np.float32(0.1))
    x = rng.standard_normal((PROBE_ROWS, FEATURES), dtype=np.float32)
    y = np.asarray(old.predict(x, verbose=0))
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + ".tmp.keras"
    old.save(tmp)
    os.replace(tmp, path)
    np.savez(probe + ".tmp.npz", x=x, y=y)
    os.replace(probe + ".tmp.npz", probe)
    return {"parameters": int(old.count_params()),
            "file_mb": round(os.path.getsize(path) / 2**20, 1),
            "prepare_s": round(time.perf_counter() - t, 1)}


def new_probe(x):
    """The probe inputs for the new model: the old columns where the names put them, random
    values in the inserted columns (the migration must make them irrelevant)."""
    import numpy as np

    names = feature_names(INSERTED)
    columns = [names.index(n) for n in feature_names()]
    out = np.random.default_rng(7).standard_normal((x.shape[0], len(names)), dtype=np.float32)
    out[:, columns] = x
    return out


def child_migrate(size: str, profile: bool) -> dict:
    import numpy as np

    import keras_surgery as ks
    import keras_surgery.migrate  # noqa: F401  (imported lazily; not part of the measure)

    path, probe = cached_paths(size)
    new = build(size, new=True)
    largest = max(int(np.prod(v.shape)) for v in new.weights) * 4
    start_load = load()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    with PeakMemory() as memory:
        t = time.perf_counter()
        report = ks.migrate_weights(path, new, old_features={"x": feature_names()},
                                    new_features={"x": feature_names(INSERTED)})
        seconds = time.perf_counter() - t
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    saved = np.load(probe)
    y_old = saved["y"]
    y_new = np.asarray(new.predict(new_probe(saved["x"]), verbose=0))
    scale = float(np.abs(y_old).max())
    return {"migrate_s": round(seconds, 3), **memory.extra(),
            "largest_tensor_mb": round(largest / 2**20, 1),
            "preserves_function": bool(report.preserves_function),
            "max_abs_diff_over_scale": float(np.abs(y_new - y_old).max() / scale),
            "old_output_scale": scale, "load_start": start_load, "load_end": load()}


def child_keras(size: str, profile: bool) -> dict:
    path, _ = cached_paths(size)
    twin = build(size, new=False)
    start_load = load()
    with PeakMemory() as memory:
        t = time.perf_counter()
        twin.load_weights(path)
        seconds = time.perf_counter() - t
    return {"keras_s": round(seconds, 3),
            **{f"keras_{k}": v for k, v in memory.extra().items()},
            "keras_load_start": start_load, "keras_load_end": load()}


def child_floor(size: str, profile: bool) -> dict:
    """Reads the file into a reused 64 MiB buffer, then copies as many bytes between two
    256 MiB buffers that are already touched."""
    import numpy as np

    path, _ = cached_paths(size)
    start_load = load()
    buffer = bytearray(64 << 20)
    t = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            total += n
    read_s = time.perf_counter() - t
    src = np.ones(256 << 20, np.uint8)
    dst = np.ones(256 << 20, np.uint8)
    t = time.perf_counter()
    left = total
    while left > 0:
        n = min(left, src.size)
        np.copyto(dst[:n], src[:n])
        left -= n
    copy_s = time.perf_counter() - t
    mapped_s, pread_s = release_ways(path, dst[:32 << 20])
    return {"floor_s": round(read_s + copy_s, 3), "floor_read_s": round(read_s, 3),
            "floor_copy_s": round(copy_s, 3), "mapped_madvise_s": round(mapped_s, 3),
            "pread_reused_s": round(pread_s, 3), "floor_load_start": start_load,
            "floor_load_end": load()}


def release_ways(path: str, target) -> tuple[float, float]:
    """Two ways to copy the file into memory already touched (`target`, 32 MiB) without its
    pages staying resident: from a memory map, 32 MiB at a time, each block's pages dropped
    with madvise(MADV_DONTNEED); or with `readinto` into the reused target itself."""
    import mmap

    import numpy as np

    block = target.size
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        t = time.perf_counter()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for start in range(0, size - block + 1, block):
                np.copyto(target, np.frombuffer(data, np.uint8, block, start))
                data.madvise(mmap.MADV_DONTNEED, start, block)
        mapped_s = time.perf_counter() - t
        view = memoryview(target)
        t = time.perf_counter()
        for start in range(0, size - block + 1, block):
            os.preadv(f.fileno(), [view], start)
        pread_s = time.perf_counter() - t
    return mapped_s, pread_s


CHILDREN = {"prepare": child_prepare, "migrate": child_migrate, "keras": child_keras,
            "floor": child_floor}


def run_child(name: str, size: str, backend: str, profile: bool = False) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, os.path.abspath(__file__), "--child", name]
    command += ["--small"] if size == "small" else []
    command += ["--profile"] if profile else []
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if profile:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child '{name}' on {backend} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list]) -> dict:
    out: dict = {}
    for key, values in runs.items():
        if all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif key.startswith(("load", "keras_load", "floor_load")) or key.startswith("max_abs"):
            out[key] = max(values)
        else:
            out[key] = round(statistics.median(values), 3)
            if len(values) > 1:
                out[f"{key}_range"] = [min(values), max(values)]
    out["migrate_over_keras"] = round(out["migrate_s"] / out["keras_s"], 3)
    out["migrate_over_floor"] = round(out["migrate_s"] / out["floor_s"], 3)
    out["anon_budget_mb"] = round(2 * out["largest_tensor_mb"] + 200, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="4 Dense layers of 4096")
    parser.add_argument("--backend", default=",".join(BACKENDS),
                        help="comma-separated backends (default: all three)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh children per measure")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the migration (printed to stderr)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "small" if args.small else "full"
    if args.child:
        if args.child == "prepare":
            print(json.dumps(child_prepare(size)))
        else:
            print(json.dumps(CHILDREN[args.child](size, args.profile)))
        return
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; expected some of {list(BACKENDS)}")
    path, probe = cached_paths(size)
    results: dict = {"model": dict(zip(("layers", "width"), SIZES[size]))}
    if not (os.path.exists(path) and os.path.exists(probe)):
        print(f"  writing {path} (once) ...", file=sys.stderr)
        results["prepare"] = run_child("prepare", size, "tensorflow")
    results["file_mb"] = round(os.path.getsize(path) / 2**20, 1)
    for backend in backends:
        runs: dict[str, list] = {}
        for turn in range(args.repeat):  # in turns, so that a slow spell hits every measure
            for name in ("migrate", "keras", "floor"):
                print(f"  {backend}: {name} ({turn + 1}/{args.repeat}) ...", file=sys.stderr)
                found = run_child(name, size, backend, args.profile and name == "migrate")
                for key, value in found.items():
                    runs.setdefault(key, []).append(value)
        results[backend] = summarise(runs)
        print(json.dumps({backend: results[backend]}), file=sys.stderr)
    print(table(results, backends))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def table(results: dict, backends: list[str]) -> str:
    rows = [("migrate_weights s", "migrate_s"), ("load_weights s", "keras_s"),
            ("floor s (read + copy)", "floor_s"), ("migrate / load_weights", "migrate_over_keras"),
            ("migrate / floor", "migrate_over_floor"), ("migrate extra anon MB", "extra_anon_mb"),
            ("migrate extra file MB", "extra_file_mb"),
            ("load_weights extra anon MB", "keras_extra_anon_mb"),
            ("load_weights extra file MB", "keras_extra_file_mb"),
            ("anon budget 2x largest + 200 MB", "anon_budget_mb"),
            ("preserves_function", "preserves_function"),
            ("max|new-old| / max|old|", "max_abs_diff_over_scale"),
            ("load avg (migrate start/end)", None)]
    lines = [f"| measure | {' | '.join(backends)} |", "|---|" + "---|" * len(backends)]
    for label, key in rows:
        cells = []
        for b in backends:
            r = results[b]
            if key is None:
                cells.append(f"{r['load_start']}/{r['load_end']}")
            else:
                value = r[key]
                cells.append(f"{value:.2e}" if key.startswith("max_abs") else str(value))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
