"""keras-surgery: keep training a Keras 3 model after you change its features or architecture.

Example:
    >>> import keras_surgery as ks
    >>> report = ks.migrate_weights("old.keras", new_model)          # doctest: +SKIP
    >>> print(report.summary())
"""

from keras_surgery.callback import SurgeryCallback
from keras_surgery.errors import (
    FeatureSpecError,
    SurgeryError,
    SurgeryFileError,
    UnsupportedLayerError,
)
from keras_surgery.files import migrate_folder, read_lineage, save_with_lineage
from keras_surgery.migrate import migrate_weights
from keras_surgery.phi import ParamSlice, PhiTable, phi_table
from keras_surgery.plan import ModelMigrator, SurgeryPlan
from keras_surgery.registry import register_rule, unregister_rule
from keras_surgery.report import SurgeryReport
from keras_surgery.verify import VerificationResult, verify_mapping

__version__ = "0.1.0"

__all__ = [
    "FeatureSpecError",
    "ModelMigrator",
    "ParamSlice",
    "PhiTable",
    "SurgeryError",
    "SurgeryFileError",
    "SurgeryCallback",
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
