"""Crash safety and concurrency with real processes: 8 concurrent registers; SIGKILL mid-register,
mid-pull and mid-push (made deterministic by the STUDIO_REGISTRY_PAUSE_AT hook); gc vs register."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from studio.registry import AdapterRegistry
from studio.registry.hooks import ENV_POINTS, ENV_SECONDS

try:
    from registry_fixtures import REPO, adapter, cli_env, make_registry, snapshot, studio_cli  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.registry_fixtures import REPO, adapter, cli_env, make_registry, snapshot, studio_cli  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def start_cli(*args, pause_at: str | None = None, seconds: float = 300) -> subprocess.Popen:
    env = cli_env({ENV_POINTS: pause_at, ENV_SECONDS: str(seconds)} if pause_at else None)
    return subprocess.Popen([sys.executable, "-m", "studio.cli", "registry", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_pause(proc: subprocess.Popen, point: str) -> None:
    """Read stderr until the process reports it is paused at `point` (or dies)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if f"paused at {point}" in line:
            return
    raise AssertionError(f"process exited ({proc.wait()}) before pausing at {point}: {''.join(seen)}")


def kill_at(point: str, *args) -> None:
    proc = start_cli(*args, pause_at=point)
    try:
        wait_for_pause(proc, point)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def own_integrity_check(root) -> None:
    con = sqlite3.connect(root / "catalog.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_eight_processes_register_one_domain_at_once(tmp_path, adapter):
    root = tmp_path / "shared-root"
    sources = [adapter(seed=i) for i in range(8)]
    procs = [start_cli("--root", str(root), "--json", "register", str(src)) for src in sources]
    outs = [p.communicate(timeout=90) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    refs = sorted(json.loads(out)["ref"] for out, _ in outs)
    assert refs == sorted(f"law@v{n}" for n in range(1, 9))
    reg = AdapterRegistry(root)
    versions = reg.list("law")
    assert [v.number for v in versions] == list(range(1, 9))
    weights = lambda files: next(f["sha256"] for f in files if f["path"] == "adapter_model.safetensors")  # noqa: E731
    assert len({weights(v.files) for v in versions}) == 8  # none lost, none duplicated
    assert {v.metadata["hyperparameters"]["seed"] for v in versions} == set(range(8))
    own_integrity_check(root)
    report = reg.verify()
    assert report.ok and report.integrity_check == "ok" and report.versions == 8, report.problems
    r = studio_cli("--root", str(root), "verify")
    assert r.returncode == 0 and r.stdout.startswith("ok:")
    reg.close()


@pytest.mark.parametrize("point", ["register:blobs-written", "register:before-commit"])
def test_sigkill_during_register_leaves_nothing_visible(tmp_path, adapter, point):
    root = tmp_path / "root"
    reg = AdapterRegistry(root)
    reg.register(adapter(seed=9, domain="code"))
    before = [v.ref for v in reg.list()]
    src = adapter(seed=1)
    kill_at(point, "--root", str(root), "register", str(src))
    assert [v.ref for v in reg.list()] == before
    assert "law" not in reg.domains() and reg.verify().ok
    own_integrity_check(root)
    r = studio_cli("--root", str(root), "--json", "register", str(src))  # the same command again
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ref"] == "law@v1"
    assert reg.verify().ok
    stats = reg.gc()  # orphans of the killed run (temp files / unreferenced manifest) go away
    assert stats["blobs_removed"] <= 1 and reg.verify().ok
    reg.close()


@pytest.mark.parametrize("point", ["pull:blob-staged", "pull:before-commit"])
def test_sigkill_during_pull_leaves_nothing_visible(tmp_path, adapter, point):
    url = (tmp_path / "remote").as_uri()
    a = AdapterRegistry(tmp_path / "a")
    v = a.register(adapter(seed=1))
    a.promote("law@v1", "prod")
    a.remote_add("origin", url, create=True)
    a.push("law@prod")
    b = AdapterRegistry(tmp_path / "b")
    b.register(adapter(seed=2, domain="code"))
    b.remote_add("origin", url, create=True)
    before = snapshot(b.root) if point == "pull:blob-staged" else None
    kill_at(point, "--root", str(b.root), "pull", "law@prod")
    assert b.domains() == ["code"] and b.verify().ok
    if before is not None:
        assert snapshot(b.root) == before  # staged blobs live in tmp/ only ...
        assert any((b.root / "tmp").glob("pull-*/*"))  # ... where the re-run resumes from them
    own_integrity_check(b.root)
    r = studio_cli("--root", str(b.root), "--json", "pull", "law@prod")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["ref"], got["sha"], got["aliases"]) == ("law@v1", v.sha, ["prod"])
    assert b.verify().ok and not any((b.root / "tmp").glob("pull-*"))
    a.close()
    b.close()


def test_sigkill_during_push_publishes_nothing_then_resumes(tmp_path, adapter):
    url = (tmp_path / "remote").as_uri()
    a = AdapterRegistry(tmp_path / "a")
    v = a.register(adapter(seed=1))
    a.remote_add("origin", url, create=True)
    kill_at("push:blobs-uploaded", "--root", str(a.root), "push", "law@v1")
    assert (tmp_path / "remote" / "blobs").is_dir() and not (tmp_path / "remote" / "law").exists()
    b = AdapterRegistry(tmp_path / "b")
    b.remote_add("origin", url, create=True)
    with pytest.raises(Exception, match="has no versions of 'law'"):
        b.pull("law")
    r = studio_cli("--root", str(a.root), "--json", "push", "law@v1")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == "created", r.stderr
    assert b.pull("law").sha == v.sha and b.verify().ok
    a.close()
    b.close()


def test_gc_waits_for_a_register_in_flight(tmp_path, adapter):
    root = tmp_path / "root"
    reg = AdapterRegistry(root)
    proc = start_cli("--root", str(root), "register", str(adapter(seed=1)),
                     pause_at="register:blobs-written", seconds=1.5)
    wait_for_pause(proc, "register:blobs-written")
    paused_at = time.monotonic()
    done = {}
    t = threading.Thread(target=lambda: done.update(stats=reg.gc(), at=time.monotonic()))
    t.start()
    out, err = proc.communicate(timeout=60)
    t.join(timeout=60)
    assert proc.returncode == 0, err
    assert done["at"] - paused_at >= 1.0  # gc waited for the register (paused 1.5 s) to commit
    assert done["stats"]["blobs_removed"] == 0
    assert reg.verify().ok and reg.resolve("law").ref == "law@v1"
    reg.close()
