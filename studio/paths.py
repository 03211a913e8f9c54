"""Where the studio keeps things: model cache, datasets registry, adapter registry.

Every root can be moved with an environment variable, which is how tests isolate themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
# beside PEFT's adapter_config.json and adapter_model.safetensors in a saved adapter: the studio's own metadata
# (domain, base, dataset, plan, metrics), written by studio.lora.io and read by it and by the registry
METADATA_FILE = "studio_adapter.json"


def repo_root() -> Path | None:
    """The source checkout this package runs from (editable install), or None."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").exists() and (root / "datasets_registry").is_dir() else None


def studio_home() -> Path:
    return Path(os.environ.get("STUDIO_HOME", Path.home() / ".cache" / "studio")).expanduser()


def models_cache() -> Path:
    """Cache of locally built bases (the embedded `tiny-moe`, tiny test architectures)."""
    return Path(os.environ.get("STUDIO_MODELS_CACHE", studio_home() / "models")).expanduser()


def shipped_datasets_dir() -> Path:
    """The sample domain datasets that ship with the studio (law, medicine, code)."""
    root = repo_root()
    return (root if root else PACKAGE_DIR.parent) / "datasets_registry"


def shipped_samples() -> list[dict]:
    """The shipped samples' manifest entries (name, train_file, eval_file relative to shipped_datasets_dir(), ...),
    in manifest order; none when the manifest is absent. The one reader of the manifest."""
    path = shipped_datasets_dir() / "manifest.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("samples", []))


def datasets_root() -> Path:
    """Root of the datasets registry catalog (SQLite) and its stored versions."""
    env = os.environ.get("STUDIO_DATASETS_ROOT")
    if env:
        return Path(env).expanduser()
    root = repo_root()
    return root / "datasets_registry" if root else studio_home() / "datasets"


def adapters_root() -> Path:
    """Root of the adapter registry (SQLite catalog + content-addressed blobs)."""
    env = os.environ.get("STUDIO_ADAPTERS_ROOT")
    if env:
        return Path(env).expanduser()
    root = repo_root()
    return root / "adapters" if root else studio_home() / "adapters"


def replace_directory(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out` in place of whatever is there: the old copy is renamed aside
    first and removed last, so `out` is at every moment either the old complete copy or the new one."""
    import shutil

    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
