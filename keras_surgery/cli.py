"""The `keras-surgery` command line: inspect a surgery and the phi table of a saved model.

Exit codes: 0 success; 1 the surgery cannot preserve the function and --require-preserve was
given (or `verify` found a mismatch); 2 errors (bad files, bad feature specs, bad arguments,
no Keras backend that imports).

Start-up: `--help` and argument errors import no Keras. The commands that only read and write
files (diff, migrate, phi) run on Keras's "numpy" backend when KERAS_BACKEND is not set and that
backend can be imported (it needs JAX and SciPy): their output does not depend on the backend,
and it takes about a third of TensorFlow's start-up time (benchmarks/bench_cli.py). `verify`
runs the model and takes gradients: it keeps the backend Keras would choose (KERAS_BACKEND,
then ~/.keras/keras.json). A KERAS_BACKEND the user set is always kept.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

# keras_surgery.plan.POLICIES, written out: importing plan imports Keras, and `--help` must not
# (tests/test_cli.py checks that the two agree).
POLICY_CHOICES = ("preserve", "random", "net2net", "duplicate")

EXIT_OK, EXIT_NOT_PRESERVED, EXIT_ERROR = 0, 1, 2

logger = logging.getLogger(__name__)

# Commands that read models as data and write files: no model is run, no gradient is taken, so
# any backend gives the same output (byte for byte, checked on Dense/Conv/RNN/attention models
# and MobileNetV3). Keras's layer classes are still used: to rebuild built-in layers from their
# configs (in a StatelessScope, no variable allocated) and check the stored variables.
FILE_COMMANDS = frozenset({"diff", "migrate", "phi"})
FILE_BACKEND = "numpy"
# What Keras's numpy backend imports besides numpy (keras/src/backend/numpy: jax.lax, the jax
# backend's fft, scipy.linalg); without them it cannot be imported.
_FILE_BACKEND_NEEDS = ("jax", "jaxlib", "scipy")
# Optional imports Keras makes while it is imported, each inside try/except ImportError, for
# features no command uses: matplotlib.pyplot (keras.visualization's galleries), IPython (the
# saving file editor's notebook display) and requests (the RemoteMonitor callback). Together a
# third of the numpy backend's import time when they are installed. Kept out only while Keras is
# imported on the file backend, then importable again (`--plot` uses matplotlib).
_NOT_NEEDED_BY_KERAS = ("matplotlib", "IPython", "requests")


def _load_features(path: str | None, what: str = "feature") -> Any:
    from keras_surgery.errors import FeatureSpecError

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise FeatureSpecError(f"Cannot read {what} spec '{path}': {exc}") from exc


def print_summary(plan: Any) -> None:
    from keras_surgery.report import print_summary as print_rich

    print_rich(plan)


def _plan(args: argparse.Namespace) -> Any:
    """Both files are read as data; neither model is deserialised."""
    from keras_surgery.migrator import ModelMigrator

    return ModelMigrator(args.old, old_features=_load_features(args.old_features),
                         old_outputs=_load_features(args.old_outputs, "output"),
                         old_weights=args.old_weights).plan(
        args.new, new_features=_load_features(args.new_features),
        new_outputs=_load_features(args.new_outputs, "output"), policy=args.policy
    )


def _pictures(args: argparse.Namespace, plan: Any) -> None:
    from keras_surgery.visual import plot, to_html

    if args.html:
        print(f"wrote {to_html(plan, args.html)}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot(plan, args.plot)}", file=sys.stderr)


def _cmd_diff(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if args.json:
        print(plan.to_json(indent=2))
    else:
        print_summary(plan)
    _pictures(args, plan)
    return EXIT_NOT_PRESERVED if args.require_preserve and not plan.preserves_function else 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if args.require_preserve and not plan.preserves_function:
        print_summary(plan)
        print("keras-surgery: the old function cannot be preserved; nothing written.",
              file=sys.stderr)
        return EXIT_NOT_PRESERVED
    # With --old-weights, OLD gave only the architecture: the values come from the checkpoint.
    src = args.old if args.old_weights is None else args.old_weights
    result = plan.apply_file(src, args.output, template=args.new, verbose=args.verbose)
    print_summary(plan)
    _pictures(args, plan)
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    print(f"wrote {args.output}")
    return EXIT_OK


def _cmd_phi(args: argparse.Namespace) -> int:
    from keras_surgery.phi import phi_table

    table = phi_table(args.model, features=_load_features(args.features))
    if args.json:
        print(json.dumps(table.to_dict(), indent=2))
        return EXIT_OK
    for (inp, feat), slices in table.items():
        parts = ", ".join(f"{s.path}[axis {s.axis}: {len(s.indices)}]" for s in slices)
        print(f"{inp}:{feat} -> {parts or '(no weights)'}")
    return EXIT_OK


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--old-outputs", metavar="F.json",
                        help="JSON file with the old output spec: column names per output "
                             "(class names, or {\"vocabulary\": [...]})")
    parser.add_argument("--new-outputs", metavar="F.json",
                        help="JSON file with the new output spec")


def _old_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--old-weights", metavar="W",
        help="weights-only checkpoint with the old values (.weights.h5, or the .weights.json "
             "index of a sharded one); OLD then gives only the architecture")


def _picture_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    parser.add_argument("--plot", metavar="PATH",
                        help="draw the changed weights' regions to an image (needs matplotlib)")


def _cmd_verify(args: argparse.Namespace) -> int:
    """The verifier must run the model, so MODEL is loaded with Keras's safe-mode loader (no
    Lambda bytecode); use it on files you trust, as you would `keras.saving.load_model`."""
    import keras

    from keras_surgery.errors import SurgeryFileError
    from keras_surgery.verify import verify_mapping

    try:
        model = keras.saving.load_model(args.model, compile=False, safe_mode=True)
    except Exception as exc:
        raise SurgeryFileError(f"Cannot load '{args.model}' to verify it: {exc}") from exc
    result = verify_mapping(model, features=_load_features(args.features), sample=args.sample)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return EXIT_OK if result.ok else EXIT_NOT_PRESERVED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-surgery",
        description="Move trained Keras weights into a modified model, preserving its function.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    diff = sub.add_parser("diff", help="show what a surgery OLD -> NEW would copy, zero, drop")
    diff.add_argument("old", help="old .keras file (read as data)")
    diff.add_argument("new", help="new .keras file")
    diff.add_argument("--old-features", help="JSON file with the old feature spec")
    diff.add_argument("--new-features", help="JSON file with the new feature spec")
    _output_options(diff)
    _old_weights_option(diff)
    diff.add_argument("--policy", default="preserve", choices=POLICY_CHOICES)
    diff.add_argument("--json", action="store_true", help="print the plan as JSON")
    diff.add_argument("--require-preserve", action="store_true",
                      help="exit 1 if the old function cannot be preserved")
    _picture_options(diff)
    diff.set_defaults(func=_cmd_diff)

    migrate = sub.add_parser(
        "migrate", help="write OUT: NEW's architecture with OLD's weights moved in"
    )
    migrate.add_argument("old", help="old .keras checkpoint (read as data, never written)")
    migrate.add_argument("new", help="new .keras file: architecture and fresh initial values")
    migrate.add_argument("-o", "--output", required=True, help="the .keras file to write")
    migrate.add_argument("--old-features", help="JSON file with the old feature spec")
    migrate.add_argument("--new-features", help="JSON file with the new feature spec")
    _output_options(migrate)
    _old_weights_option(migrate)
    migrate.add_argument("--policy", default="preserve", choices=POLICY_CHOICES)
    migrate.add_argument("--require-preserve", action="store_true",
                         help="exit 1 and write nothing if the function cannot be preserved")
    _picture_options(migrate)
    migrate.set_defaults(func=_cmd_migrate)

    phi = sub.add_parser("phi", help="print the phi table (feature -> dependent weights)")
    phi.add_argument("model", help=".keras file (read as data)")
    phi.add_argument("--features", help="JSON file with the feature spec")
    phi.add_argument("--json", action="store_true", help="print as JSON")
    phi.set_defaults(func=_cmd_phi)
    verify = sub.add_parser(
        "verify", help="check the rules' phi table against gradients (loads MODEL, safe mode)"
    )
    verify.add_argument("model", help=".keras file (loaded with Keras's safe-mode loader)")
    verify.add_argument("--features", help="JSON file with the feature spec")
    verify.add_argument("--sample", type=int, default=None,
                        help="verify this many random features instead of all")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=_cmd_verify)
    return parser


def file_backend(command: str | None) -> str | None:
    """The backend the command line chooses for `command`, or None to leave Keras's own choice.

    Keras's numpy backend for a command in FILE_COMMANDS, when the user has not set
    KERAS_BACKEND (an empty value counts as unset, as for Keras), Keras is not imported yet (its
    backend is fixed at import time) and the backend's own imports are installed.
    """
    if command not in FILE_COMMANDS or os.environ.get("KERAS_BACKEND") or "keras" in sys.modules:
        return None
    if any(importlib.util.find_spec(name) is None for name in _FILE_BACKEND_NEEDS):
        return None
    return FILE_BACKEND


@contextlib.contextmanager
def _quiet_stderr(quiet: bool) -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null, unless `quiet` is false or there is no stderr.

    TensorFlow's C++ side writes start-up lines ("All log messages before
    absl::InitializeLog() is called ...", oneDNN's notice) straight to the process's stderr
    while it is imported, before any setting can silence them; they would bury the command's
    own messages. Python errors raised inside still propagate (and print after the descriptor
    is back); `--verbose` keeps every line.
    """
    saved = None
    if quiet:
        with contextlib.suppress(OSError):  # no stderr to save: import as it is
            saved = os.dup(2)
    if saved is None:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            sys.stderr.flush()
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@contextlib.contextmanager
def _unimportable(names: Sequence[str]) -> Iterator[None]:
    """`import NAME` raises ImportError inside (for names not imported yet), as if not installed."""
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in added:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _forget_keras() -> None:
    """Drops a failed or partial Keras import, as `keras.config.set_backend` does, so that Keras
    can be imported again with another backend."""
    for name in [n for n in sys.modules if n == "keras" or n.startswith("keras.")]:
        del sys.modules[name]


def _import_keras(command: str | None, quiet: bool = True) -> None:
    """Imports Keras and its backend before the command runs (see `file_backend`).

    The file backend is imported with KERAS_BACKEND set for the import only (Keras reads it
    then; os.environ is put back after) and the optional imports it does not need kept out; if
    it fails to import (a broken JAX), Keras is imported again as the user's environment says.

    Raises:
        ImportError: Keras cannot be imported on the backend it chose (none is installed).
    """
    if "keras" in sys.modules:
        return
    backend = file_backend(command)
    if backend is not None:
        saved = os.environ.get("KERAS_BACKEND")
        os.environ["KERAS_BACKEND"] = backend
        try:
            with _quiet_stderr(quiet), _unimportable(_NOT_NEEDED_BY_KERAS):
                import keras  # noqa: F401
            logger.info("Keras backend: %s (chosen for '%s', which only reads and writes "
                        "files; set KERAS_BACKEND to choose another)", backend, command)
            return
        except ImportError as exc:
            logger.info("Keras's %s backend did not import (%s); using Keras's own choice",
                        backend, exc)
            _forget_keras()
        finally:
            if saved is None:
                os.environ.pop("KERAS_BACKEND", None)
            else:
                os.environ["KERAS_BACKEND"] = saved
    with _quiet_stderr(quiet):
        import keras  # noqa: F401, F811


def _chosen_backend() -> str:
    """The backend Keras tried to import (after a failed import), for the error message."""
    config = sys.modules.get("keras.src.backend.config")
    backend = getattr(config, "backend", None)
    if callable(backend):
        with contextlib.suppress(Exception):
            return str(backend())
    return os.environ.get("KERAS_BACKEND") or "tensorflow"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `keras-surgery` console script.

    Run in a process that has not imported Keras, it imports Keras for the command (on the
    numpy backend for diff, migrate and phi, unless KERAS_BACKEND is set: see the module's
    docstring); import Keras first to keep the backend it would choose.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_ERROR if exc.code else EXIT_OK
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _import_keras(args.command, quiet=not args.verbose)
    except ImportError as exc:
        print(f"keras-surgery: error: cannot import Keras on its '{_chosen_backend()}' backend "
              f"({exc}). Install TensorFlow, JAX or PyTorch, or set KERAS_BACKEND to a backend "
              "that is installed.", file=sys.stderr)
        return EXIT_ERROR
    from keras_surgery.errors import SurgeryError

    try:
        return args.func(args)
    except SurgeryError as exc:
        print(f"keras-surgery: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
