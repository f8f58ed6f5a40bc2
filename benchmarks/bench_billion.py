"""Billion-scale surgery benchmark: migrate_weights against Keras's loader and the floor.

Two models (`--model dense|llama`, default both), each old model written once with non-trivial
weights into benchmarks/.cache/, as a `.keras` file and as a sharded `.weights.json` (1 GB
shards, `model.save_weights(path, max_shard_size=1)`):

  dense  the model of issue 19: an input of 64 named features, then 12 Dense layers of 8192
         units (738.8M parameters, a 2.8 GB `.keras` file). The new model inserts 2 features in
         the middle of the input and widens the first layer to 8704 units.
  llama  a keras-hub LlamaBackbone built from a config (no download): vocabulary 32000,
         hidden 2048, 16 layers, intermediate 5632, 16 query heads over 4 key/value heads
         (TinyLlama's widths with 16 of its 22 layers: 852.6M parameters, a 3.4 GB file). The
         new model grows intermediate_dim to 6144 in every layer (Keras cannot load it).

Per backend (each measure in a fresh child process, KERAS_BACKEND set for it):

  migrate          `ks.migrate_weights(old.keras, new)`; the new model's outputs on probe
                   inputs (logits on probe tokens for llama) are checked against the old
                   model's, computed once when the file was written
  keras            Keras's `load_weights(old.keras)` into a twin of the old model (reference)
  sharded_migrate  `ks.migrate_weights(architecture, new, old_weights=old.weights.json)`, the
                   architecture a live old model built in the child (its values never read)
  sharded_keras    Keras's `load_weights(old.weights.json)` into a twin of the old model
  floor            read the `.keras` file's bytes into a reused buffer + copy the same number
                   of bytes into memory already touched (the physical floor, same run)

Each reports wall time, the peak of anonymous and of file-backed resident memory above what the
child held before the measure (RssAnon / RssFile of /proc/self/status, sampled in a thread
every 5 ms), and the load average at its start and end (the machine is shared).

Usage: python benchmarks/bench_billion.py [--model dense,llama] [--small]
           [--backend tensorflow,jax,torch] [--repeat 1] [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
BACKENDS = ("tensorflow", "jax", "torch")
MODELS = ("dense", "llama")
FEATURES = 64
INSERTED = 2
PROBE_ROWS = 4
# (layers, width): the model, and a quick one for development.
SIZES = {"full": (12, 8192), "small": (4, 4096)}
# LlamaBackbone arguments of the old model; the new one has GROWN_INTERMEDIATE.
LLAMA = {"full": dict(vocabulary_size=32000, num_layers=16, hidden_dim=2048,
                      intermediate_dim=5632, num_query_heads=16, num_key_value_heads=4),
         "small": dict(vocabulary_size=4000, num_layers=4, hidden_dim=512,
                       intermediate_dim=1408, num_query_heads=8, num_key_value_heads=2)}
GROWN_INTERMEDIATE = {"full": 6144, "small": 1536}
PROBE_TOKENS = (2, 8)  # llama probe: 2 sequences of 8 tokens
# max|new - old| / max|old| accepted as "kept": float32 round-off through 16 residual layers,
# the old outputs computed on TensorFlow and the new ones on each backend.
OUTPUT_BOUND = 256 * 2.0**-23
# GB per shard of the sharded checkpoint (small sizes: more than one shard, each holding
# the model's largest tensor)
SHARD_GB = {"dense": {"full": 1.0, "small": 0.1}, "llama": {"full": 1.0, "small": 0.05}}
# The measures of one backend, in this order: (child, route); route "sharded" reads the
# sharded .weights.json, and its figures carry the prefix "sharded_".
MEASURES = (("migrate", "keras"), ("keras", "keras"), ("migrate", "sharded"),
            ("keras", "sharded"), ("floor", "keras"), ("migrate", "noundo"))


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


def build_dense(size: str, *, new: bool):
    """The old Dense model (zeros: its values are set from numpy) or the new one (zeros too:
    every entry it keeps fresh is a new unit, whose value the benchmark does not depend on)."""
    import keras

    layers, width = SIZES[size]
    x = inputs = keras.Input((FEATURES + (INSERTED if new else 0),), name="x")
    for i in range(layers):
        units = width + width // 16 if new and i == 0 else width
        x = keras.layers.Dense(units, activation="relu" if i < layers - 1 else None,
                               kernel_initializer="zeros", name=f"dense_{i}")(x)
    return keras.Model(inputs, x, name="billion")


def build_llama(size: str, *, new: bool):
    """The old LlamaBackbone or the new one (intermediate_dim grown), with keras-hub's own
    initialisers (seeded: the new model's fresh units are reproducible)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(20 if new else 19)
    sizes = dict(LLAMA[size])
    if new:
        sizes["intermediate_dim"] = GROWN_INTERMEDIATE[size]
    return keras_hub.models.LlamaBackbone(**sizes, name="llama")


class Spec:
    """One benchmarked model at one size: how to build, fill, probe and migrate it, and its
    cached files."""

    def __init__(self, model: str, size: str) -> None:
        self.model, self.size = model, size
        if model == "dense":
            layers, width = SIZES[size]
            stem = f"billion-{layers}x{width}"
        else:
            c = LLAMA[size]
            stem = (f"llama-{c['num_layers']}x{c['hidden_dim']}-i{c['intermediate_dim']}"
                    f"-v{c['vocabulary_size']}")
        stem = os.path.join(CACHE, stem)
        self.keras_path, self.probe_path = stem + ".keras", stem + ".probe.npz"
        self.shard_dir = stem + ".sharded"
        self.sharded_path = os.path.join(self.shard_dir, "old.weights.json")

    def build(self, *, new: bool):
        return (build_dense if self.model == "dense" else build_llama)(self.size, new=new)

    def randomize(self, old, rng) -> None:
        """Non-trivial old values: Dense kernels ~ N(0, 2 / fan_in), biases 0.1 N(0, 1);
        Llama: keras-hub's initialisers for its kernels and embeddings, and RMS norm gains
        1 + 0.1 N(0, 1) (its only vectors), so that a gain copied to the wrong place shows."""
        import numpy as np

        for v in old.weights:
            shape = tuple(v.shape)
            if self.model == "llama" and len(shape) != 1:
                continue
            if len(shape) == 1:
                base = 1.0 if self.model == "llama" else 0.0
                v.assign(base + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1))
            else:
                v.assign(rng.standard_normal(shape, dtype=np.float32)
                         * np.float32(np.sqrt(2.0 / shape[0])))

    def probe(self, rng):
        """Old-model probe inputs: feature rows (dense) or token ids (llama)."""
        import numpy as np

        if self.model == "dense":
            return rng.standard_normal((PROBE_ROWS, FEATURES), dtype=np.float32)
        return rng.integers(0, LLAMA[self.size]["vocabulary_size"], PROBE_TOKENS, np.int32)

    def outputs(self, model, x, *, new: bool):
        """The model's outputs on probe `x` (the old model's inputs): Dense outputs, or the
        logits of a causal LM head on the Llama backbone (its reverse embedding)."""
        import keras
        import numpy as np

        if self.model == "dense":
            return np.asarray(model.predict(new_probe(x) if new else x, verbose=0))
        hidden = model({"token_ids": x, "padding_mask": np.ones_like(x)})
        logits = model.token_embedding(hidden, reverse=True)
        return np.asarray(keras.ops.convert_to_numpy(logits), dtype=np.float32)

    def migrate_kwargs(self) -> dict:
        if self.model == "dense":
            return {"old_features": {"x": feature_names()},
                    "new_features": {"x": feature_names(INSERTED)}}
        return {}


def child_prepare(spec: Spec, route: str, profile: bool) -> dict:
    """Writes the old model with non-trivial weights (.keras file and sharded .weights.json)
    and its outputs on probe inputs."""
    import numpy as np

    rng = np.random.default_rng(19)
    t = time.perf_counter()
    old = spec.build(new=False)
    spec.randomize(old, rng)
    x = spec.probe(rng)
    y = spec.outputs(old, x, new=False)
    os.makedirs(CACHE, exist_ok=True)
    tmp = spec.keras_path + ".tmp.keras"
    old.save(tmp)
    os.replace(tmp, spec.keras_path)
    write_sharded(old, spec)
    np.savez(spec.probe_path + ".tmp.npz", x=x, y=y)
    os.replace(spec.probe_path + ".tmp.npz", spec.probe_path)
    return {"parameters": int(old.count_params()),
            "file_mb": round(os.path.getsize(spec.keras_path) / 2**20, 1),
            "prepare_s": round(time.perf_counter() - t, 1)}


def write_sharded(model, spec: Spec) -> None:
    """`model.save_weights(.weights.json, max_shard_size)` into a temporary folder renamed
    into place (Keras names the shards after the index)."""
    tmp = spec.shard_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_weights(os.path.join(tmp, "old.weights.json"),
                       max_shard_size=SHARD_GB[spec.model][spec.size])
    shutil.rmtree(spec.shard_dir, ignore_errors=True)
    os.replace(tmp, spec.shard_dir)


def child_shard(spec: Spec, route: str, profile: bool) -> dict:
    """Writes the sharded checkpoint of an old model cached before sharding was measured."""
    t = time.perf_counter()
    old = spec.build(new=False)
    old.load_weights(spec.keras_path)
    write_sharded(old, spec)
    return {"shard_s": round(time.perf_counter() - t, 1)}


def old_files(spec: Spec) -> list[str]:
    """The old model's files: the `.keras` file, the sharded index and its shards."""
    with open(spec.sharded_path) as f:
        index = json.load(f)
    names = {n for v in index["weight_map"].values() for n in ([v] if isinstance(v, str) else v)}
    return [spec.keras_path, spec.sharded_path,
            *sorted(os.path.join(spec.shard_dir, n) for n in names)]


def warm(paths: list[str], chunk: int = 64 << 20) -> None:
    """Reads every byte of `paths` once, so that each measure reads them from the page cache,
    as the floor does: on the project's VM the page cache does not keep files for long, and
    the first child to read a cold file paid the disk (the sharded route on TensorFlow, the
    first to read the shards: 8.4 s against 3.6 s for the `.keras` route)."""
    buffer = bytearray(chunk)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def shard_stats(spec: Spec) -> dict:
    with open(spec.sharded_path) as f:
        index = json.load(f)
    names = {n for v in index["weight_map"].values() for n in ([v] if isinstance(v, str) else v)}
    sizes = [os.path.getsize(os.path.join(spec.shard_dir, n)) for n in names]
    return {"shards": len(sizes), "sharded_mb": round(sum(sizes) / 2**20, 1),
            "largest_shard_mb": round(max(sizes) / 2**20, 1)}


def new_probe(x):
    """The probe inputs for the new Dense model: the old columns where the names put them,
    random values in the inserted columns (the migration must make them irrelevant)."""
    import numpy as np

    names = feature_names(INSERTED)
    columns = [names.index(n) for n in feature_names()]
    out = np.random.default_rng(7).standard_normal((x.shape[0], len(names)), dtype=np.float32)
    out[:, columns] = x
    return out


def prefix(route: str) -> str:
    """Result keys of a route: the `.keras` file (no prefix), the sharded checkpoint, or the
    `.keras` file migrated with `undo=False` (no undo journal)."""
    return {"sharded": "sharded_", "noundo": "noundo_"}.get(route, "")


def child_migrate(spec: Spec, route: str, profile: bool) -> dict:
    import numpy as np

    import keras_surgery as ks
    import keras_surgery.migrate  # noqa: F401  (imported lazily; not part of the measure)

    new = spec.build(new=True)
    largest = max(int(np.prod(v.shape)) for v in new.weights) * 4
    old, weights = spec.keras_path, None
    if route == "sharded":  # a live architecture, its values never read
        old, weights = spec.build(new=False), spec.sharded_path
    start_load = load()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    with PeakMemory() as memory:
        t = time.perf_counter()
        report = ks.migrate_weights(old, new, old_weights=weights, undo=route != "noundo",
                                    **spec.migrate_kwargs())
        seconds = time.perf_counter() - t
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    del old
    saved = np.load(spec.probe_path)
    y_old = saved["y"]
    y_new = spec.outputs(new, saved["x"], new=True)
    scale = float(np.abs(y_old).max())
    diff = float(np.abs(y_new - y_old).max() / scale)
    p = prefix(route)
    return {f"{p}migrate_s": round(seconds, 3),
            **{f"{p}{k}": v for k, v in memory.extra().items()},
            "largest_tensor_mb": round(largest / 2**20, 1),
            "new_parameters": int(new.count_params()),
            f"{p}preserves_function": bool(report.preserves_function),
            f"{p}max_abs_diff_over_scale": diff,
            f"{p}outputs_kept": bool(diff <= OUTPUT_BOUND),
            # the old outputs depend on the input (else any surgery would look right)
            "old_output_spread_over_scale": float(np.ptp(y_old, axis=0).max() / scale),
            "old_output_scale": scale, f"{p}load_start": start_load, f"{p}load_end": load()}


def child_keras(spec: Spec, route: str, profile: bool) -> dict:
    path = spec.sharded_path if route == "sharded" else spec.keras_path
    twin = spec.build(new=False)
    start_load = load()
    with PeakMemory() as memory:
        t = time.perf_counter()
        twin.load_weights(path)
        seconds = time.perf_counter() - t
    p = prefix(route)
    return {f"{p}keras_s": round(seconds, 3),
            **{f"{p}keras_{k}": v for k, v in memory.extra().items()},
            f"{p}keras_load_start": start_load, f"{p}keras_load_end": load()}


def child_floor(spec: Spec, route: str, profile: bool) -> dict:
    """Reads the file into a reused 64 MiB buffer, then copies as many bytes between two
    256 MiB buffers that are already touched."""
    import numpy as np

    path = spec.keras_path
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


CHILDREN = {"prepare": child_prepare, "shard": child_shard, "migrate": child_migrate,
            "keras": child_keras, "floor": child_floor}


def run_child(name: str, spec: Spec, backend: str, route: str = "keras",
              profile: bool = False) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--model", spec.model,
               "--route", route]
    command += ["--small"] if spec.size == "small" else []
    command += ["--profile"] if profile else []
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if profile:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child '{name}' ({spec.model}, {route}) on {backend} failed with exit "
                         f"code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list]) -> dict:
    out: dict = {}
    for key, values in runs.items():
        if all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif len(set(values)) == 1:  # a constant (parameter count, tensor size) or one run
            out[key] = values[0]
        elif "load_" in key or "max_abs" in key or "spread" in key:
            out[key] = max(values) if "spread" not in key else min(values)
        else:
            out[key] = round(statistics.median(values), 3)
            if len(values) > 1:
                out[f"{key}_range"] = [min(values), max(values)]
    ratios = {"migrate_over_keras": ("migrate_s", "keras_s"),
              "migrate_over_floor": ("migrate_s", "floor_s"),
              "sharded_migrate_over_sharded_keras": ("sharded_migrate_s", "sharded_keras_s"),
              "sharded_migrate_over_floor": ("sharded_migrate_s", "floor_s"),
              "sharded_migrate_over_migrate": ("sharded_migrate_s", "migrate_s"),
              "noundo_migrate_over_floor": ("noundo_migrate_s", "floor_s"),
              "noundo_migrate_over_sharded_keras": ("noundo_migrate_s", "sharded_keras_s"),
              "sharded_keras_over_keras": ("sharded_keras_s", "keras_s")}
    for name, (top, bottom) in ratios.items():
        if top in out and bottom in out:
            out[name] = round(out[top] / out[bottom], 3)
    if "largest_tensor_mb" in out:
        out["anon_budget_mb"] = round(2 * out["largest_tensor_mb"] + 200, 1)
    return out


def run_model(spec: Spec, backends: list[str], args) -> dict:
    """The measures of one model on every backend (writing its cached files first)."""
    measures = [m for m in MEASURES if args.measures is None
                or f"{prefix(m[1])}{m[0]}" in args.measures.split(",")]
    results: dict = {"model": spec.model, "size": spec.size,
                     "config": (dict(zip(("layers", "width"), SIZES[spec.size]))
                                if spec.model == "dense" else
                                {**LLAMA[spec.size],
                                 "grown_intermediate_dim": GROWN_INTERMEDIATE[spec.size]}),
                     # which keras_surgery the children import (PYTHONPATH may name a snapshot)
                     "keras_surgery": importlib.util.find_spec("keras_surgery").origin}
    if not (os.path.exists(spec.keras_path) and os.path.exists(spec.probe_path)):
        print(f"  writing {spec.keras_path} (once) ...", file=sys.stderr)
        results["prepare"] = run_child("prepare", spec, "tensorflow")
    if not os.path.exists(spec.sharded_path):
        print(f"  writing {spec.sharded_path} (once) ...", file=sys.stderr)
        results["shard"] = run_child("shard", spec, "tensorflow")
    results["file_mb"] = round(os.path.getsize(spec.keras_path) / 2**20, 1)
    results.update(shard_stats(spec))
    for backend in backends:
        runs: dict[str, list] = {}
        for turn in range(args.repeat):  # in turns, so that a slow spell hits every measure
            for name, route in measures:
                print(f"  {spec.model} {backend}: {name} {route} ({turn + 1}/{args.repeat}) ...",
                      file=sys.stderr)
                warm(old_files(spec))
                found = run_child(name, spec, backend, route,
                                  args.profile and name == "migrate")
                for key, value in found.items():
                    runs.setdefault(key, []).append(value)
        results[backend] = summarise(runs)
        print(json.dumps({spec.model: {backend: results[backend]}}), file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=",".join(MODELS),
                        help="comma-separated models (default: dense,llama)")
    parser.add_argument("--small", action="store_true",
                        help="development sizes: 4 Dense layers of 4096; a 4-layer Llama of 512")
    parser.add_argument("--backend", default=",".join(BACKENDS),
                        help="comma-separated backends (default: all three)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh children per measure")
    parser.add_argument("--json", default=None)
    parser.add_argument("--measures", default=None,
                        help="comma-separated subset of migrate,keras,sharded_migrate,"
                        "noundo_migrate,"
                             "sharded_keras,floor (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the migration (printed to stderr)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--route", choices=("keras", "sharded", "noundo"), default="keras",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "small" if args.small else "full"
    if args.child:
        print(json.dumps(CHILDREN[args.child](Spec(args.model, size), args.route, args.profile)))
        return
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    for given, known in ((backends, BACKENDS), (models, MODELS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown name(s) {unknown}; expected some of {list(known)}")
    results = {}
    for model in models:
        results[model] = run_model(Spec(model, size), backends, args)
        print(f"\n{model}:\n" + table(results[model], backends))
        if args.json:  # after every model, so that a later failure keeps the figures
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


ROWS = (("migrate_weights(.keras) s", "migrate_s"), ("load_weights(.keras) s", "keras_s"),
        ("migrate_weights(sharded .weights.json) s", "sharded_migrate_s"),
        ("load_weights(sharded .weights.json) s", "sharded_keras_s"),
        ("floor s (read + copy)", "floor_s"),
        ("migrate_weights(.keras, undo=False) s", "noundo_migrate_s"),
        ("undo=False: migrate / floor, / load_weights (sharded)",
         ("noundo_migrate_over_floor", "noundo_migrate_over_sharded_keras")),
        ("undo=False: extra anon / file MB", ("noundo_extra_anon_mb", "noundo_extra_file_mb")),
        ("migrate / load_weights (.keras)", "migrate_over_keras"),
        ("migrate / load_weights (sharded)", "sharded_migrate_over_sharded_keras"),
        ("migrate sharded / migrate .keras", "sharded_migrate_over_migrate"),
        ("migrate / floor (.keras, sharded)", ("migrate_over_floor", "sharded_migrate_over_floor")),
        ("migrate extra anon MB (.keras, sharded)", ("extra_anon_mb", "sharded_extra_anon_mb")),
        ("migrate extra file MB (.keras, sharded)", ("extra_file_mb", "sharded_extra_file_mb")),
        ("load_weights extra anon MB (.keras, sharded)",
         ("keras_extra_anon_mb", "sharded_keras_extra_anon_mb")),
        ("load_weights extra file MB (.keras, sharded)",
         ("keras_extra_file_mb", "sharded_keras_extra_file_mb")),
        ("anon budget 2x largest + 200 MB", "anon_budget_mb"),
        ("preserves_function (.keras, sharded)",
         ("preserves_function", "sharded_preserves_function")),
        ("max|new-old| / max|old| (.keras, sharded)",
         ("max_abs_diff_over_scale", "sharded_max_abs_diff_over_scale")),
        ("outputs kept (<= 256 eps32) (.keras, sharded)",
         ("outputs_kept", "sharded_outputs_kept")),
        ("load avg, migrate start/end (.keras, sharded)",
         ("load_start", "load_end", "sharded_load_start", "sharded_load_end")))


def cell(result: dict, key) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    parts = []
    for k in keys:
        value = result.get(k, "-")
        parts.append(f"{value:.2e}" if "max_abs" in k and value != "-" else str(value))
    return " / ".join(parts)


def table(results: dict, backends: list[str]) -> str:
    lines = [f"| measure | {' | '.join(backends)} |", "|---|" + "---|" * len(backends)]
    for label, key in ROWS:
        lines.append(f"| {label} | {' | '.join(cell(results[b], key) for b in backends)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
