"""The `keras-surgery` command line: inspect a surgery and the phi table of a saved model.

Exit codes: 0 success; 1 the surgery cannot preserve the function and --require-preserve was
given; 2 errors (bad files, bad feature specs, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_NOT_PRESERVED, EXIT_ERROR = 0, 1, 2


def _load_features(path: str | None) -> Any:
    from keras_surgery.errors import FeatureSpecError

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise FeatureSpecError(f"Cannot read feature spec '{path}': {exc}") from exc


def _new_model_from_file(path: str) -> Any:
    """The NEW side must be instantiated to get its fresh initial values; only Keras's safe
    mode loader is used (no Lambda bytecode)."""
    import keras

    from keras_surgery.errors import SurgeryFileError

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        raise SurgeryFileError(f"Cannot load new model '{path}': {exc}") from exc


def _cmd_diff(args: argparse.Namespace) -> int:
    from keras_surgery.plan import ModelMigrator

    new_model = _new_model_from_file(args.new)
    plan = ModelMigrator(args.old, old_features=_load_features(args.old_features)).plan(
        new_model, new_features=_load_features(args.new_features), policy=args.policy
    )
    print(plan.to_json(indent=2) if args.json else plan.summary())
    return EXIT_NOT_PRESERVED if args.require_preserve and not plan.preserves_function else 0


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
    diff.add_argument("--policy", default="preserve", choices=("preserve", "random"))
    diff.add_argument("--json", action="store_true", help="print the plan as JSON")
    diff.add_argument("--require-preserve", action="store_true",
                      help="exit 1 if the old function cannot be preserved")
    diff.set_defaults(func=_cmd_diff)

    phi = sub.add_parser("phi", help="print the phi table (feature -> dependent weights)")
    phi.add_argument("model", help=".keras file (read as data)")
    phi.add_argument("--features", help="JSON file with the feature spec")
    phi.add_argument("--json", action="store_true", help="print as JSON")
    phi.set_defaults(func=_cmd_phi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `keras-surgery` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_ERROR if exc.code else EXIT_OK
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from keras_surgery.errors import SurgeryError

    try:
        return args.func(args)
    except SurgeryError as exc:
        print(f"keras-surgery: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
