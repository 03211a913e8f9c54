"""Remotes: push/pull/sync against file:// and a real S3-compatible server (moto on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from studio.errors import RegistryError
from studio.registry import RegistryConflict

try:
    from registry_fixtures import (adapter, make_registry, registry, s3_remote, s3_server, snapshot,  # noqa: F401
                                   studio_cli, tree_bytes)
except ImportError:  # tests/ imported as a package
    from tests.registry_fixtures import (adapter, make_registry, registry, s3_remote, s3_server,  # noqa: F401
                                         snapshot, studio_cli, tree_bytes)


@pytest.fixture(params=["file", "s3"])
def remote_spec(request, tmp_path):
    """(url, storage options) of an empty remote store of each kind."""
    if request.param == "file":
        return (tmp_path / "remote-store").as_uri(), {}
    return request.getfixturevalue("s3_remote")


def _remote_fs(reg, name="origin"):
    rem = reg.remote(name)
    return rem.fs, rem.base


def test_push_pull_round_trip_is_byte_identical(make_registry, adapter, remote_spec):
    url, opts = remote_spec
    a = make_registry("a")
    src1, src2 = adapter(seed=1), adapter(seed=2)
    a.register(src1)
    a.register(src2, parent="law@v1", tags=["best"])
    a.promote("law@v2", "prod")
    a.append_metrics("law@v2", {"perplexity": 3.25}, source="eval-heldout")
    a.remote_add("origin", url, create=True, **opts)
    result = a.push("law@prod")
    assert result["version"] == "created" and result["alias"]["status"] == "moved" and result["metrics"] == 1
    assert a.push("law@v1")["version"] == "created"

    fs, base = _remote_fs(a)
    v2 = a.resolve("law@v2")
    for f in v2.files:  # layout: content-addressed blobs, one manifest per version, alias generations
        assert fs.cat_file(f"{base}/blobs/sha256/{f['sha256']}") == (src2 / f["path"]).read_bytes()
    assert fs.cat_file(f"{base}/law/versions/v2.json") == a._manifest_bytes(v2)
    assert json.loads(fs.cat_file(f"{base}/law/aliases/prod/0000000001.json"))["number"] == 2

    b = make_registry("b")  # empty registry on "another machine"
    b.remote_add("origin", url, create=True, **opts)
    got = b.pull("law@prod")
    assert (got.ref, got.sha, got.aliases) == ("law@v2", v2.sha, ["prod"])
    assert b._manifest_bytes(got) == a._manifest_bytes(v2)
    assert got.metadata == v2.metadata and got.tags == ["best"] and got.parent == "law@v1"
    assert got.metrics["perplexity"] == 3.25 and got.origin == "pull:origin"
    assert tree_bytes(b.path("law@v2")) == tree_bytes(src2)
    for f in got.files:  # every blob stored under the name its content hashes to
        assert hashlib.sha256(b.blobs.path(f["sha256"]).read_bytes()).hexdigest() == f["sha256"]
    assert b.verify().ok
    assert b.pull("law@v1").sha == a.resolve("law@v1").sha
    assert tree_bytes(b.path("law@v1")) == tree_bytes(src1)
    assert b.pull(f"law@{v2.sha[:8]}").ref == "law@v2"
    assert b.resolve("law").ref == "law@v2" and b.register(adapter(seed=3)).ref == "law@v3"


def test_push_and_pull_are_idempotent(make_registry, adapter, remote_spec):
    url, opts = remote_spec
    a, b = make_registry("a"), make_registry("b")
    a.register(adapter(seed=1))
    for reg in (a, b):
        reg.remote_add("origin", url, create=True, **opts)
    assert a.push("law@v1")["version"] == "created"
    assert a.push("law@v1")["version"] == "present"
    first = b.pull("law@v1")
    before = snapshot(b.root)
    again = b.pull("law@v1")
    assert again.sha == first.sha and snapshot(b.root) == before
    assert [v.ref for v in b.list()] == ["law@v1"]


def test_corrupted_remote_blob_fails_pull_and_leaves_local_unchanged(make_registry, adapter, remote_spec):
    url, opts = remote_spec
    a, b = make_registry("a"), make_registry("b")
    v = a.register(adapter(seed=1))
    a.remote_add("origin", url, create=True, **opts)
    a.push("law@v1")
    b.register(adapter(seed=5, domain="medicine"))
    b.remote_add("origin", url, create=True, **opts)
    fs, base = _remote_fs(b)
    weights = next(f for f in v.files if f["path"] == "adapter_model.safetensors")
    blob = f"{base}/blobs/sha256/{weights['sha256']}"
    data = bytearray(fs.cat_file(blob))
    data[-1] ^= 0xFF  # same size, one flipped byte
    fs.pipe_file(blob, bytes(data))

    before, listed = snapshot(b.root), [x.ref for x in b.list()]
    with pytest.raises(RegistryError, match=r"checksum mismatch pulling law@v1 on remote 'origin': "
                                            r"adapter_model.safetensors should be sha256 .*corrupt; nothing was added"):
        b.pull("law@v1")
    assert snapshot(b.root) == before and [x.ref for x in b.list()] == listed
    assert not any((b.root / "tmp").glob("pull-*")) and b.verify().ok
    with pytest.raises(RegistryError, match="no adapters registered for domain 'law'"):
        b.resolve("law")

    assert a.push("law@v1")["version"] == "present"  # a size check alone does not see the damage ...
    a.push("law@v1", verify_remote=True)  # ... re-hashing does, and repairs it
    assert b.pull("law@v1").sha == v.sha and b.verify().ok


def test_missing_remote_blob_is_a_clear_error(make_registry, adapter, tmp_path):
    a, b = make_registry("a"), make_registry("b")
    v = a.register(adapter(seed=1))
    url = (tmp_path / "remote").as_uri()
    for reg in (a, b):
        reg.remote_add("origin", url, create=True)
    a.push("law")
    (tmp_path / "remote" / "blobs" / "sha256" / v.files[0]["sha256"]).unlink()
    with pytest.raises(RegistryError, match=r"remote 'origin' lacks blob .* of law@v1.*push law@v1 again"):
        b.pull("law")
    assert b.domains() == []


def test_corrupt_remote_manifest_is_refused(make_registry, adapter, tmp_path):
    a, b = make_registry("a"), make_registry("b")
    a.register(adapter(seed=1))
    url = (tmp_path / "remote").as_uri()
    for reg in (a, b):
        reg.remote_add("origin", url, create=True)
    a.push("law@v1")
    (tmp_path / "remote" / "law" / "versions" / "v1.json").write_text('{"format": "nope"')
    with pytest.raises(RegistryError, match=r"manifest law@v1 on remote 'origin' is corrupt"):
        b.pull("law@v1")
    assert b.domains() == []


def test_same_number_different_content_is_refused_not_overwritten(make_registry, adapter, remote_spec):
    url, opts = remote_spec
    a, b = make_registry("a"), make_registry("b")
    va, vb = a.register(adapter(seed=1)), b.register(adapter(seed=2))
    assert va.ref == vb.ref == "law@v1"
    for reg in (a, b):
        reg.remote_add("origin", url, create=True, **opts)
    # both push at once: exactly one wins the version number, the other gets a conflict
    errors, barrier = [], threading.Barrier(2)

    def go(reg):
        barrier.wait()
        try:
            reg.push("law@v1")
        except RegistryConflict as exc:
            errors.append((reg, exc))
    threads = [threading.Thread(target=go, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1
    loser, exc = errors[0]
    winner = b if loser is a else a
    assert "already has law@v1 with different content" in str(exc) and "nothing was overwritten" in str(exc)
    fs, base = _remote_fs(a)
    assert fs.cat_file(f"{base}/law/versions/v1.json") == winner._manifest_bytes(winner.resolve("law@v1"))
    with pytest.raises(RegistryConflict, match=r"local law@v1 .* differs from law@v1 on remote 'origin'"):
        loser.pull("law@v1")


def test_concurrent_pushes_of_different_versions_do_not_clobber(make_registry, adapter, remote_spec):
    url, opts = remote_spec
    a, b = make_registry("a"), make_registry("b")
    for reg in (a, b):
        reg.remote_add("origin", url, create=True, **opts)
    a.register(adapter(seed=1))
    a.push("law@v1")
    b.pull("law@v1")
    a.register(adapter(seed=2))  # law@v2 on machine a
    b.register(adapter(seed=3), domain="law")  # also the next number on b: law@v2 ...
    b.register(adapter(seed=4))  # ... and law@v3
    b.remove("law@v2")
    barrier = threading.Barrier(2)
    results = {}

    def go(name, reg, ref):
        barrier.wait()
        results[name] = reg.push(ref)["version"]
    threads = [threading.Thread(target=go, args=("a", a, "law@v2")),
               threading.Thread(target=go, args=("b", b, "law@v3"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": "created", "b": "created"}
    c = make_registry("c")
    c.remote_add("origin", url, create=True, **opts)
    stats = c.sync()
    assert stats["pulled"] == ["law@v1", "law@v2", "law@v3"] and not stats["conflicts"]
    assert c.resolve("law@v2").sha == a.resolve("law@v2").sha
    assert c.resolve("law@v3").sha == b.resolve("law@v3").sha
    assert c.verify().ok


def test_remote_alias_move_detects_concurrent_move(make_registry, adapter, remote_spec):
    url, opts = remote_spec
    a, b = make_registry("a"), make_registry("b")
    for reg in (a, b):
        reg.remote_add("origin", url, create=True, **opts)
    for seed in (1, 2, 3):
        a.register(adapter(seed=seed))
        a.push(f"law@v{seed}")
    a.promote("law@v1", "prod")
    a.push("law@prod")
    assert b.pull("law@prod").ref == "law@v1"
    a.promote("law@v2", "prod")
    assert a.push("law@prod")["alias"]["generation"] == 2
    b.pull("law@v3")
    b.promote("law@v3", "prod")
    with pytest.raises(RegistryConflict, match=r"law@prod was moved to v2 \(generation 2\) by someone else"):
        b.push("law@prod")
    rem = b.remote("origin")
    assert rem.alias_head("law", "prod")["number"] == 2
    assert b.push("law@prod", force=True)["alias"]["generation"] == 3
    assert rem.alias_head("law", "prod")["number"] == 3
    # the compare-and-swap itself: two writers expecting the same generation, one wins
    record = {"domain": "law", "alias": "staging", "number": 1, "sha": a.resolve("law@v1").sha}
    assert rem.write_alias("law", "staging", record, 0) == 1
    with pytest.raises(RegistryConflict, match="moved concurrently"):
        rem.write_alias("law", "staging", {**record, "number": 2}, 0)
    assert rem.alias_head("law", "staging")["number"] == 1


def test_sync_exchanges_versions_metrics_and_aliases(make_registry, adapter, tmp_path):
    url = (tmp_path / "remote").as_uri()
    a, b = make_registry("a"), make_registry("b")
    for reg in (a, b):
        reg.remote_add("origin", url, create=True)
    a.register(adapter(seed=1))
    a.register(adapter(seed=2))
    a.promote("law@v2", "prod")
    s = a.sync()
    assert s["pushed"] == ["law@v1", "law@v2"] and s["aliases_pushed"] == ["law@prod -> v2"]
    s = b.sync()
    assert s["pulled"] == ["law@v1", "law@v2"] and s["aliases_pulled"] == ["law@prod -> v2"]
    b.append_metrics("law@v1", {"bleu": 0.3}, source="eval")
    b.promote("law@v1", "prod")  # b moves prod; a did not touch it: fast-forward
    assert b.sync()["aliases_pushed"] == ["law@prod -> v1"]
    s = a.sync()
    assert s["aliases_pulled"] == ["law@prod -> v1"] and not s["conflicts"]
    assert a.resolve("law@prod").ref == "law@v1" and a.resolve("law@v1").metrics["bleu"] == 0.3
    assert a.alias_history("law", "prod")[-1]["action"] == "pull"
    a.promote("law@v2", "prod")
    assert a.sync()["aliases_pushed"] == ["law@prod -> v2"]
    assert b.sync()["aliases_pulled"] == ["law@prod -> v2"]
    # both sides moved "qa" independently: reported, neither overwritten
    a.promote("law@v1", "qa")
    a.sync()
    b.promote("law@v2", "qa")
    s = b.sync()
    assert any("law@qa moved both here" in c for c in s["conflicts"])
    assert b.resolve("law@qa").ref == "law@v2" and a.remote("origin").alias_head("law", "qa")["number"] == 1
    # a version removed here is not pulled back by sync
    a.remove("law@v1", force=True)
    assert "law@v1" in a.sync()["skipped_removed"]
    assert [v.ref for v in a.list("law")] == ["law@v2"]


def test_remote_errors_name_the_fix(registry, adapter, tmp_path, monkeypatch):
    registry.register(adapter(seed=1))
    with pytest.raises(RegistryError, match="none configured: add one with `studio registry remote add origin URL`"):
        registry.push("law")
    with pytest.raises(RegistryError, match="look like credentials"):
        registry.remote_add("s3", "s3://bucket/x", key="AKIA", secret="shh")
    with pytest.raises(RegistryError, match="unknown remote protocol 'nosuch'"):
        registry.remote_add("x", "nosuch://foo")
    with pytest.raises(RegistryError, match="invalid remote name"):
        registry.remote_add("../evil", (tmp_path / "evil").as_uri())
    registry.remote_add("origin", (tmp_path / "remote").as_uri(), create=True)
    with pytest.raises(RegistryError, match="already exists"):
        registry.remote_add("origin", (tmp_path / "other").as_uri())
    with pytest.raises(RegistryError, match=r"remote 'origin' .* has no versions of 'law' \(domains there: none\)"):
        registry.pull("law")
    registry.push("law")
    with pytest.raises(RegistryError, match=r"law@v7 is not on remote 'origin': remote 'origin' has law v1"):
        registry.pull("law@v7")
    with pytest.raises(RegistryError, match=r"remote 'origin' has no alias 'prod' for law \(aliases there: none"):
        registry.pull("law@prod")
    assert registry.remotes()[0]["url"].startswith("file://")


def test_hf_remote_fails_fast_when_offline(registry, adapter, monkeypatch):
    """hf:// cannot be exercised here (no Hub); offline it must refuse at once with a clear message."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry.register(adapter(seed=1))
    registry.remote_add("hub", "hf://my-org/adapters")
    with pytest.raises(RegistryError, match="HF_HUB_OFFLINE is set"):
        registry.push("law", "hub")
    with pytest.raises(RegistryError, match="HF_HUB_OFFLINE is set"):
        registry.pull("law", "hub")


def test_hf_remote_url_is_validated(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from studio.registry.hub import HubRemote
    with pytest.raises(RegistryError, match="bad hf:// remote URL"):
        HubRemote("hub", "hf://a/b/c", {})
    hub = HubRemote("hub", "hf://my-org/adapters", {})
    assert hub.repo("law") == "my-org/adapters-law"
    assert HubRemote("hub", "hf://my-org", {}).repo("law") == "my-org/law"


def test_cli_push_pull_against_s3(tmp_path, adapter, s3_remote, s3_server):
    """The whole path through `studio registry` subprocesses, S3 endpoint given on the command line."""
    url, _ = s3_remote
    src = adapter(seed=1)
    a, b = str(tmp_path / "cli-a"), str(tmp_path / "cli-b")
    assert studio_cli("--root", a, "register", str(src)).returncode == 0
    assert studio_cli("--root", a, "promote", "law@v1", "prod").returncode == 0
    for root in (a, b):
        r = studio_cli("--root", root, "remote", "add", "origin", url, "--endpoint-url", s3_server)
        assert r.returncode == 0, r.stderr
    r = studio_cli("--root", a, "--json", "push", "law@prod")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["alias"]["status"] == "moved"
    r = studio_cli("--root", b, "--json", "remote", "list")
    assert json.loads(r.stdout)[0]["options"] == {"client_kwargs": {"endpoint_url": s3_server}}
    r = studio_cli("--root", b, "pull", "law@prod")
    assert r.returncode == 0 and "all checksums verified" in r.stdout, r.stderr
    r = studio_cli("--root", b, "--json", "path", "law@prod")
    assert tree_bytes(Path(json.loads(r.stdout)["path"])) == tree_bytes(src)
    r = studio_cli("--root", b, "sync")
    assert r.returncode == 0 and "pulled: -" in r.stdout
    r = studio_cli("--root", b, "pull", "law@v9")
    assert r.returncode == 2 and "law@v9 is not on remote 'origin'" in r.stderr
