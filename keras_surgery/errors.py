"""The exceptions keras-surgery raises; every one is a SurgeryError."""


class SurgeryError(Exception):
    """Base class of every error keras-surgery raises on purpose."""


class SurgeryFileError(SurgeryError):
    """A `.keras` file (or a member of it) is missing, unreadable or malformed."""


class FeatureSpecError(SurgeryError):
    """A feature specification does not fit the model's inputs."""


class UnsupportedLayerError(SurgeryError):
    """A layer has no rule and `strict=True` was asked for."""
