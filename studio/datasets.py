"""`studio.datasets`: register, list, get and inspect training data, as `studio datasets` does on the command line.

Functions over the default datasets registry (`$STUDIO_DATASETS_ROOT`, else `datasets_registry/`); pass `root=`
for another one. Files are JSONL, JSON, CSV, Parquet or TXT in Alpaca, chat `messages`, ShareGPT, prompt/completion
or plain-text form; they are normalised to chat messages and versioned by content hash.
"""

from __future__ import annotations

import builtins
import os

from studio.data.registry import DatasetRegistry, DatasetVersion

__all__ = ["get", "inspect", "list", "register", "remove", "samples"]


def register(path: str | os.PathLike, name: str, *, eval_path: str | os.PathLike | None = None,
             eval_ratio: float = 0.1, seed: int = 0, root: str | os.PathLike | None = None) -> DatasetVersion:
    """Register a data file as the next version of dataset `name` (identical content returns the existing one).

    eval_path: a held-out file; without one, eval_ratio of the rows are split off deterministically (by seed).
    A file that cannot be read raises DatasetError naming the file, the line and the expected format; nothing is
    stored then. Returns the DatasetVersion (`ref` like "contracts@v2", `hash`, `rows_train`, `rows_eval`, `head()`).
    """
    return DatasetRegistry(root).add(path, name, eval_path=eval_path, eval_ratio=eval_ratio, seed=seed)


def list(root: str | os.PathLike | None = None) -> builtins.list[DatasetVersion]:
    """Every registered dataset version, by name then number (a shipped sample appears once it has been used)."""
    return DatasetRegistry(root).list()


def get(ref: str, root: str | os.PathLike | None = None) -> DatasetVersion:
    """Resolve "law" (latest), "law@v2" or "law@<hash prefix>"; the shipped samples (law, medicine, code) are
    registered on first use. Raises DatasetError with the known versions when there is no such dataset."""
    return DatasetRegistry(root).get(ref)


def inspect(path: str | os.PathLike, n: int = 5) -> dict:
    """What a file holds, without registering it: file_format, format, rows, dropped rows, a preview of n
    normalised rows, and errors (a bad file does not raise; the message naming the line is in `errors`)."""
    from studio.data.formats import inspect_file

    return inspect_file(path, n=n)


def remove(ref: str, root: str | os.PathLike | None = None) -> builtins.list[DatasetVersion]:
    """Remove one version ("law@v2") or every version of a name ("law"); returns what was removed."""
    return DatasetRegistry(root).remove(ref)


def samples() -> builtins.list[dict]:
    """The sample datasets that ship with the studio: manifest entries (name, format, rows, provenance, licence)
    with `train_path` / `eval_path`, the absolute paths of their files."""
    from studio.paths import shipped_datasets_dir

    base = shipped_datasets_dir()
    return [dict(s, train_path=str(base / s["train_file"]), eval_path=str(base / s["eval_file"]))
            for s in DatasetRegistry().shipped_samples()]
