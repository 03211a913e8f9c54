"""Adapter registry: versioned domain adapters with lineage, aliases and metrics; push/pull to remotes.

Python: `AdapterRegistry().register(dir)`, `.resolve("law@prod")`, `.path(ref)`; CLI: `studio registry --help`.
"""

from studio.registry.refs import Ref, parse_ref
from studio.registry.maintenance import VerifyReport
from studio.registry.registry import AdapterRegistry, AdapterVersion
from studio.registry.remotes import RegistryConflict

__all__ = ["AdapterRegistry", "AdapterVersion", "Ref", "RegistryConflict", "VerifyReport", "parse_ref"]
