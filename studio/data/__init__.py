"""Datasets: detect and normalise files to chat messages, version and split them in a registry.

`DatasetRegistry().get("law")` gives the shipped law sample; `studio datasets --help` for the CLI.
"""

from studio.data.formats import inspect_file, load_file
from studio.data.registry import DatasetRegistry, DatasetVersion, resolve_dataset

__all__ = ["DatasetRegistry", "DatasetVersion", "inspect_file", "load_file", "resolve_dataset"]
