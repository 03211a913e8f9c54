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
    monkeypatch.setenv("STUDIO_PROFILES_CACHE", str(tmp_path / "expert_profiles"))
    yield


def pytest_sessionfinish(session, exitstatus):
    """`.ci/run` (README's test command) sets STUDIO_FAIL_ON_SKIP=1: on a fresh machine every test must run, so a
    skip (a missing system package such as chromium, a missing optional dependency) fails the run."""
    if os.environ.get("STUDIO_FAIL_ON_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.ensure_newline()
        reporter.write_line(f"STUDIO_FAIL_ON_SKIP=1: {len(skipped)} test(s) skipped; every test must run here "
                            "(see the skip reasons above)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
