"""Test isolation: offline, and every registry / cache root points into temporary directories."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Tiny bases are built once per test session into a private cache."""
    os.environ["STUDIO_MODELS_CACHE"] = str(tmp_path_factory.mktemp("models"))
    yield


@pytest.fixture(autouse=True)
def _isolated_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_DATASETS_ROOT", str(tmp_path / "datasets_root"))
    monkeypatch.setenv("STUDIO_ADAPTERS_ROOT", str(tmp_path / "adapters_root"))
    yield
