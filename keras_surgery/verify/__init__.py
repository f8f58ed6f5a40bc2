"""The verifier: labels checked against gradients, and a surgery's old outputs against new."""

from keras_surgery.verify.mapping import Mismatch, Unverified, VerificationResult, verify_mapping
from keras_surgery.verify.preservation import (
    OutputDiff,
    PreservationCheck,
    check_preservation,
    pack_inputs,
)
from keras_surgery.verify.probe import (
    GradientProbe,
    JaxProbe,
    StatelessProbe,
    TensorFlowProbe,
    TorchProbe,
    probe_copy,
    probe_for_backend,
)
from keras_surgery.verify.surgery import (
    VERIFY_MODES,
    SurgeryVerification,
    file_warning,
    mapping_failure,
    nothing_checked,
    preservation_failure,
    snapshot,
    unprobed_mapping,
    verify_mode,
)

__all__ = [
    "VERIFY_MODES",
    "GradientProbe",
    "Mismatch",
    "OutputDiff",
    "PreservationCheck",
    "SurgeryVerification",
    "JaxProbe",
    "StatelessProbe",
    "TensorFlowProbe",
    "TorchProbe",
    "Unverified",
    "VerificationResult",
    "check_preservation",
    "file_warning",
    "mapping_failure",
    "nothing_checked",
    "pack_inputs",
    "preservation_failure",
    "probe_copy",
    "probe_for_backend",
    "snapshot",
    "unprobed_mapping",
    "verify_mapping",
    "verify_mode",
]
