"""keras-surgery: keep training a Keras 3 model after you change its features or architecture.

Example:
    >>> import keras_surgery as ks
    >>> report = ks.migrate_weights("old.keras", new_model)          # doctest: +SKIP
    >>> print(report.summary())

The public names are imported on first use, so `import keras_surgery` (and the command line,
which quiets TensorFlow's start-up logs first) does not load Keras before it is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keras_surgery.errors import (
    FeatureSpecError,
    SurgeryError,
    SurgeryFileError,
    UnsupportedLayerError,
)

__version__ = "0.1.0"

_LAZY = {
    "SurgeryCallback": "keras_surgery.callback",
    "migrate_folder": "keras_surgery.files",
    "read_lineage": "keras_surgery.lineage",
    "save_with_lineage": "keras_surgery.lineage",
    "migrate_weights": "keras_surgery.migrate",
    "ParamSlice": "keras_surgery.phi",
    "PhiTable": "keras_surgery.phi",
    "phi_table": "keras_surgery.phi",
    "ModelMigrator": "keras_surgery.migrator",
    "SurgeryPlan": "keras_surgery.plan",
    "register_rule": "keras_surgery.registry",
    "unregister_rule": "keras_surgery.registry",
    "SurgeryReport": "keras_surgery.report",
    "VerificationResult": "keras_surgery.verify",
    "verify_mapping": "keras_surgery.verify",
}

__all__ = [
    "FeatureSpecError",
    "ModelMigrator",
    "ParamSlice",
    "PhiTable",
    "SurgeryCallback",
    "SurgeryError",
    "SurgeryFileError",
    "SurgeryPlan",
    "SurgeryReport",
    "UnsupportedLayerError",
    "VerificationResult",
    "migrate_folder",
    "migrate_weights",
    "phi_table",
    "read_lineage",
    "register_rule",
    "save_with_lineage",
    "unregister_rule",
    "verify_mapping",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from keras_surgery.callback import SurgeryCallback
    from keras_surgery.files import migrate_folder
    from keras_surgery.lineage import read_lineage, save_with_lineage
    from keras_surgery.migrate import migrate_weights
    from keras_surgery.migrator import ModelMigrator
    from keras_surgery.phi import ParamSlice, PhiTable, phi_table
    from keras_surgery.plan import SurgeryPlan
    from keras_surgery.registry import register_rule, unregister_rule
    from keras_surgery.report import SurgeryReport
    from keras_surgery.verify import VerificationResult, verify_mapping
