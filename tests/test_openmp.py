"""The decoding entry points set OpenMP's wait policy before torch loads libgomp (studio/_openmp.py), and leave a
user's own setting and the training entry points alone. Each case runs in a fresh interpreter: libgomp reads the
variables once, when torch is imported, and this test process has imported torch long ago."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "STUDIO_OPENMP")


def _fresh(code: str, **env: str) -> dict:
    """Run `code` in a new interpreter whose environment has none of NAMES except `env`; it prints a JSON dict."""
    clean = {k: v for k, v in os.environ.items() if k not in NAMES}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, **env}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# after the entry point ran: the two variables
REPORT = "import json, os; print(json.dumps({'env': {k: os.environ.get(k) for k in %r}}))" % (NAMES[:2],)


def _cli(argv: list[str]) -> str:
    return f"from studio import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n{REPORT}"


@pytest.mark.parametrize("command", ["serve", "eval"])
def test_decoding_subcommands_set_the_wait_policy_before_torch_loads(command):
    """Set means torch was not imported yet: spin_between_operators sets nothing once it is."""
    got = _fresh(_cli([command, "--help"]))
    assert got["env"] == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def test_app_sets_the_wait_policy_before_its_imports():
    got = _fresh(f"import runpy\nrunpy.run_path('app.py', run_name='not_main')\n{REPORT}")
    assert got["env"] == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def test_training_keeps_the_library_default():
    got = _fresh(_cli(["finetune", "--help"]))
    assert got["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "10"},
                                 {"STUDIO_OPENMP": "library"}])
def test_a_users_own_setting_is_left_alone(env):
    got = _fresh(_cli(["serve", "--help"]), **env)
    expected = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    expected.update({k: v for k, v in env.items() if k in expected})
    assert got["env"] == expected


def test_too_late_once_torch_is_imported():
    got = _fresh("import torch\nfrom studio import _openmp\nset_ = _openmp.spin_between_operators()\n"
                 "import json; print(json.dumps({'set': set_, 'env': _openmp.describe()}))")
    assert got == {"set": False, "env": "OMP_WAIT_POLICY=(unset), GOMP_SPINCOUNT=(unset)"}


@pytest.mark.parametrize("device, threads, env, warns", [
    ("cpu", 2, {}, True),
    ("cpu", 1, {}, False),                               # one thread: no team to wake
    ("cuda:0", 8, {}, False),
    ("cpu", 2, {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}, False),  # an entry point set them
    ("cpu", 2, {"OMP_WAIT_POLICY": "PASSIVE"}, False),  # the user's own choice
    ("cpu", 2, {"STUDIO_OPENMP": "library"}, False),
])
def test_slow_decoding_warning_names_the_fix_only_where_it_applies(device, threads, env, warns):
    from studio import _openmp

    got = _openmp.slow_decoding_warning(device, threads, environ=env)
    if warns:
        assert "OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000" in got and "STUDIO_OPENMP=library" in got
    else:
        assert got is None


def test_an_engine_in_ones_own_program_warns_on_cpu_without_the_settings(monkeypatch, caplog):
    """An Engine built in a user's program (no entry point set the variables before torch loaded) says so."""
    import logging

    import torch

    from studio.engine import Engine

    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.WARNING, logger="studio.engine"):
            Engine("tiny-moe", device="cpu").close()
    finally:
        torch.set_num_threads(threads)
    assert any("GOMP_SPINCOUNT=300000" in r.getMessage() for r in caplog.records), caplog.text
