"""Errors a user can act on. Every message names the problem and the fix."""

from __future__ import annotations

import json
from pathlib import Path


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


def read_json_object(path: Path, error: type[StudioError], fix: str) -> dict:
    """A JSON file that must hold an object, or `error` naming the file, where it broke and `fix` (the one reader
    of the studio's own JSON files: adapter configs and metadata, registry inputs)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); {fix}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}); {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{path} must hold a JSON object, not {type(obj).__name__}; {fix}")
    return obj
