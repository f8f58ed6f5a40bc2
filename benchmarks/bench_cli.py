"""Benchmark: start-up time of the `keras-surgery` command line.

Each command runs in a fresh process (`python -m keras_surgery.cli ...`), so every run pays the
imports a user pays: `--help`, `diff --json` and `phi` on a small two-Dense model (a few kB),
and `migrate` of the same pair. Each setting of KERAS_BACKEND is measured in turns, `--runs`
times (a busy machine slows every setting of a turn alike), and the table gives the median and
range of the wall-clock times and the median CPU time (user + system of the child, which other
work on a shared machine inflates less). "unset" is what a user gets who has not chosen a
backend (KERAS_BACKEND removed from the environment: the command line then picks one itself).

    python benchmarks/bench_cli.py [--runs 5] [--backends unset,tensorflow] [--json PATH]
        [--before OLD_CLI.py]

`--before` measures a saved copy of an earlier `keras_surgery/cli.py` in the same turns (with
KERAS_BACKEND unset), e.g. `git show REV:keras_surgery/cli.py > /tmp/cli_before.py`.

Target: under 1.5 s for `diff` and `phi`; `--help` imports no Keras at all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MAKE_FILES = """
import sys
import keras

def save(n_in, path):
    keras.utils.set_random_seed(n_in)
    x = keras.Input((n_in,), name="x")
    h = keras.layers.Dense(6, activation="relu", name="h")(x)
    keras.Model(x, keras.layers.Dense(2, name="out")(h)).save(path)

save(3, sys.argv[1])
save(4, sys.argv[2])
"""


def _env(setting: str, pythonpath: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    if setting != "unset":
        env["KERAS_BACKEND"] = setting
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return env


class Variant:
    """One way of starting the command line: a module and a KERAS_BACKEND setting."""

    def __init__(self, label: str, module: str, setting: str, pythonpath: str | None = None):
        self.label, self.module, self.env = label, module, _env(setting, pythonpath)

    def time(self, argv: list[str]) -> tuple[float, float]:
        """Wall-clock and CPU (user + system) seconds of one run in a fresh process."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", self.module, *argv], env=self.env,
                             capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if run.returncode != 0:
            raise SystemExit(f"{self.label}: {argv[0]} failed ({run.returncode}): "
                             f"{run.stderr.strip()[-500:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return elapsed, cpu

    def backend_used(self, path: str) -> str:
        """The backend this variant ends up on for a file-only command."""
        code = (f"import sys, {self.module} as c; c.main(['phi', sys.argv[1]]); "
                "import keras; print('BACKEND', keras.backend.backend())")
        run = subprocess.run([sys.executable, "-c", code, path], env=self.env,
                             capture_output=True, text=True)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("BACKEND ")]
        return lines[-1].split()[1] if lines else f"? ({run.stderr.strip()[-200:]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", default="unset,tensorflow",
                        help="comma-separated KERAS_BACKEND settings; 'unset' removes it")
    parser.add_argument("--before", metavar="OLD_CLI.py",
                        help="a saved copy of an earlier cli.py, measured in the same turns")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    variants = [Variant(f"KERAS_BACKEND={s}", "keras_surgery.cli", s)
                for s in args.backends.split(",")]
    if args.before:
        before = os.path.abspath(args.before)
        module = os.path.splitext(os.path.basename(before))[0]
        variants.insert(0, Variant(f"before ({module}), unset", module, "unset",
                                   os.path.dirname(before)))

    with tempfile.TemporaryDirectory() as tmp:
        old, new, out = (os.path.join(tmp, f"{n}.keras") for n in ("old", "new", "out"))
        subprocess.run([sys.executable, "-c", MAKE_FILES, old, new], env=_env("unset"),
                       check=True, capture_output=True)
        commands = {
            "--help": ["--help"],
            "diff --json": ["diff", old, new, "--json"],
            "phi": ["phi", old],
            "migrate": ["migrate", old, new, "-o", out],
        }
        used = {v.label: v.backend_used(old) for v in variants}
        times: dict[str, dict[str, list[tuple[float, float]]]] = {
            v.label: {c: [] for c in commands} for v in variants}
        for turn in range(args.runs):
            for variant in variants:
                for name, argv in commands.items():
                    times[variant.label][name].append(variant.time(argv))
            print(f"turn {turn + 1}/{args.runs} done", file=sys.stderr)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {load}; "
          f"seconds, median of {args.runs} fresh processes: wall clock (range) / CPU\n")
    print("| command | " + " | ".join(f"{v.label} (on {used[v.label]})" for v in variants)
          + " |")
    print("|---" * (len(variants) + 1) + "|")
    for name in commands:
        cells = []
        for variant in variants:
            wall, cpu = zip(*times[variant.label][name])
            cells.append(f"{statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) / "
                         f"{statistics.median(cpu):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"runs": args.runs, "backend_used": used, "seconds": times}, f, indent=2)


if __name__ == "__main__":
    main()
