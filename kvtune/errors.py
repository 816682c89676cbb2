"""Errors a user can act on. The CLI prints their message without a traceback."""


class KvtuneError(Exception):
    """Base class: bad input or an unsupported setup, explained in the message."""


class PlanError(KvtuneError, ValueError):
    """A plan (or a per-layer quantization setting) is malformed or does not fit the model."""


class ModelError(KvtuneError):
    """The model cannot be found, loaded, or served by the mixed-precision cache."""


class DataError(KvtuneError):
    """The evaluation or calibration data cannot be found or is too short."""


class ProfileError(KvtuneError):
    """A profile artifact is missing, truncated, corrupt, or made for another model."""


class EngineError(KvtuneError):
    """A serving engine is missing, refused a plan's export, or failed while running it."""
