"""Errors a user can act on. Every message names the problem and the fix."""


class StudioError(Exception):
    """Base class: the CLI prints these as `error: <message>` and exits 2, without a traceback."""


class DatasetError(StudioError):
    """A dataset file or reference is unusable (format, encoding, size, name)."""


class ModelError(StudioError):
    """A base model cannot be resolved, loaded or adapted."""


class PlanError(StudioError):
    """A LoRA plan is invalid: targets match nothing, no routed expert adapted, bad rank."""


class RegistryError(StudioError):
    """An adapter registry reference, version, alias or remote is unusable."""


class RequestError(StudioError):
    """A generation request the engine cannot take as given (prompt too long, bad sampling parameters)."""
