"""Local adapter registry: register, resolve, aliases, diff, remove, gc, verify, compatibility, CLI."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from studio.errors import RegistryError
from studio.registry import AdapterRegistry, AdapterVersion, parse_ref

try:
    from registry_fixtures import adapter, make_registry, registry, studio_cli, tree_bytes  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.registry_fixtures import adapter, make_registry, registry, studio_cli, tree_bytes  # noqa: F401


def test_register_assigns_next_version_and_records_lineage(registry, adapter):
    v1 = registry.register(adapter(seed=1), tags=["first"], notes="baseline")
    v2 = registry.register(adapter(seed=2), parent="law@v1")
    assert isinstance(v1, AdapterVersion)
    assert (v1.ref, v2.ref) == ("law@v1", "law@v2")
    assert (v1.domain, v1.number) == ("law", 1)
    assert len(v1.sha) == 64 and v1.sha != v2.sha
    assert v1.tags == ["first"] and v1.notes == "baseline"
    assert v2.parent == "law@v1" and v2.parent_sha == v1.sha
    lineage = v2.lineage
    assert lineage["base"] == {"id": "tiny-moe", "fingerprint": "sha256:base-a"}
    assert lineage["dataset"]["ref"] == "law@v1" and lineage["dataset"]["hash"] == "sha256:data"
    assert lineage["plan"]["router"] == "frozen" and lineage["quantization"]["mode"] == "nf4"
    assert lineage["hyperparameters"]["seed"] == 2 and lineage["library_versions"]["peft"] == "0.21.2"
    assert v2.metrics == {"train_loss": 2.2, "eval_loss": 2.7}
    assert v1.created < v2.created
    paths = {f["path"] for f in v1.files}
    assert paths == {"adapter_config.json", "adapter_model.safetensors", "studio_adapter.json", "README.md",
                     "training_log.jsonl"}
    assert registry.domains() == ["law"]
    assert [v.ref for v in registry.list()] == ["law@v1", "law@v2"]


def test_register_is_idempotent_for_identical_content(registry, adapter):
    src = adapter(seed=1)
    a = registry.register(src)
    b = registry.register(src)
    assert a.ref == b.ref == "law@v1" and a.sha == b.sha
    assert len(registry.list("law")) == 1


def test_domain_override_and_missing_domain(registry, adapter, tmp_path):
    v = registry.register(adapter(seed=1), domain="contracts")
    assert v.ref == "contracts@v1"
    src = adapter(seed=2)
    meta = json.loads((src / "studio_adapter.json").read_text())
    del meta["domain"]
    (src / "studio_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="--domain"):
        registry.register(src)
    with pytest.raises(RegistryError, match="invalid domain name 'Law Stuff'"):
        registry.register(src, domain="Law Stuff")


def test_register_rejects_non_adapters_and_skips_pickles(registry, adapter, tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        registry.register(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RegistryError, match="missing adapter_config.json, adapter_model.safetensors"):
        registry.register(empty, domain="law")
    bad = adapter(seed=1)
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(RegistryError, match="not a valid safetensors file"):
        registry.register(bad)
    src = adapter(seed=2, extra_files={"training_args.bin": b"\x80\x04pickle"})
    with pytest.warns(UserWarning, match="pickle"):
        v = registry.register(src)
    assert "training_args.bin" not in {f["path"] for f in v.files}


def test_non_finite_metrics_from_a_diverged_run_register(registry, adapter):
    src = adapter(seed=1)
    meta = json.loads((src / "studio_adapter.json").read_text())
    meta["metrics"]["eval_loss"] = float("nan")
    (src / "studio_adapter.json").write_text(json.dumps(meta))  # Python writes a bare NaN
    v = registry.register(src)
    assert v.metrics["eval_loss"] == "NaN" and registry.verify().ok


def test_subdirectories_are_content(registry, adapter):
    v = registry.register(adapter(seed=1, extra_files={"checkpoints/notes.txt": "x", "loss.png": b"\x89PNG"}))
    assert {"checkpoints/notes.txt", "loss.png"} <= {f["path"] for f in v.files}
    assert (registry.path(v.ref) / "checkpoints" / "notes.txt").read_text() == "x"


def test_resolve_all_reference_forms(registry, adapter):
    v1 = registry.register(adapter(seed=1))
    v2 = registry.register(adapter(seed=2))
    v3 = registry.register(adapter(seed=3))
    registry.promote("law@v2", "prod")
    assert registry.resolve("law").ref == "law@v3"
    assert registry.resolve("law@latest").ref == "law@v3"
    assert registry.resolve("law@v1").sha == v1.sha
    assert registry.resolve("law@prod").ref == "law@v2"
    assert registry.resolve(f"law@{v3.sha[:10]}").ref == "law@v3"
    assert registry.resolve(f"law@sha256:{v2.sha}").ref == "law@v2"
    assert registry.resolve(v1).ref == "law@v1"
    assert registry.resolve("law@v2").aliases == ["prod"]


@pytest.mark.parametrize("ref, pattern", [
    ("law@v999", r"law@v999 does not exist: law has v1-v2 \(latest v2\)"),
    ("../x", r"invalid adapter reference '\.\./x'.*no '/', '\.'"),
    ("", r"empty adapter reference: use DOMAIN, DOMAIN@vN"),
    ("   ", r"empty adapter reference"),
    ("law@canary", r"no alias or version named 'canary' \(aliases: prod->v1; law has v1-v2.*promote law@v2 canary"),
    ("medicine", r"no adapters registered for domain 'medicine' \(registered domains: law\)"
                 r".*register DIR --domain medicine"),
    ("law@", r"nothing after '@'"),
    ("law@v1@v2", r"more than one '@'"),
    ("law@ffffff", r"no version of law has a manifest sha starting with 'ffffff'"),
    ("law@Prod!", r"neither a version \(v3\), an alias \(prod\) nor a sha prefix"),
    ("LAW", r"invalid domain name 'LAW'.*\(e\.g\. 'law'\)"),
])
def test_bad_references_name_problem_and_fix(registry, adapter, ref, pattern):
    registry.register(adapter(seed=1))
    registry.register(adapter(seed=2))
    registry.promote("law@v1", "prod")
    with pytest.raises(RegistryError, match=pattern):
        registry.resolve(ref)


def test_unknown_remote_lists_remotes(registry, tmp_path):
    registry.remote_add("backup", str(tmp_path / "remote"), create=True)
    with pytest.raises(RegistryError,
                       match=r"unknown remote 'origin' \(remotes: backup \(file://.*remote add NAME URL"):
        registry.pull("law", "origin")


def test_parse_ref_shapes():
    assert parse_ref("law").is_latest
    assert parse_ref("law@v3").number == 3
    assert parse_ref("law@prod").alias == "prod"
    assert parse_ref("law@abcdef1").sha_prefix == "abcdef1"
    with pytest.raises(RegistryError, match="versions start at v1"):
        parse_ref("law@v0")


def test_promote_rollback_keep_history(registry, adapter):
    for seed in (1, 2, 3):
        registry.register(adapter(seed=seed))
    registry.promote("law@v1", "prod")
    registry.promote("law@v2", "prod")
    registry.promote("law@v3", "prod")
    registry.promote("law@v3", "staging")
    assert registry.resolve("law@prod").ref == "law@v3"
    assert registry.rollback("law", "prod").ref == "law@v2"
    assert registry.rollback("law", "prod").ref == "law@v1"  # an undo stack, not a toggle
    with pytest.raises(RegistryError, match="no earlier target to roll back to"):
        registry.rollback("law", "prod")
    registry.promote("law@v3", "prod")
    history = registry.alias_history("law", "prod")
    assert [(e["action"], e["previous"], e["ref"]) for e in history] == [
        ("promote", None, "law@v1"), ("promote", "law@v1", "law@v2"), ("promote", "law@v2", "law@v3"),
        ("rollback", "law@v3", "law@v2"), ("rollback", "law@v2", "law@v1"), ("promote", "law@v1", "law@v3"),
    ]
    assert registry.rollback("law", "prod").ref == "law@v1"
    assert registry.aliases("law") == {"prod": 1, "staging": 3}
    with pytest.raises(RegistryError, match="reserved"):
        registry.promote("law@v1", "latest")
    with pytest.raises(RegistryError, match="looks like a version"):
        registry.promote("law@v1", "v2")
    with pytest.raises(RegistryError, match=r"law@nightly: no such alias \(aliases of law: prod->v1, staging->v3"):
        registry.rollback("law", "nightly")


def test_remove_is_protected_by_aliases(registry, adapter):
    for seed in (1, 2, 3):
        registry.register(adapter(seed=seed))
    registry.promote("law@v2", "prod")
    with pytest.raises(RegistryError, match=r"law@v2 is the target of law@prod; move the alias first.*--force"):
        registry.remove("law@v2")
    assert registry.resolve("law@v2")
    registry.remove("law@v1")
    assert [v.ref for v in registry.list("law")] == ["law@v2", "law@v3"]
    with pytest.raises(RegistryError, match=r"law@v1 does not exist: law has v2-v3"):
        registry.resolve("law@v1")
    registry.remove("law@v2", force=True)
    assert registry.aliases("law") == {}
    assert registry.alias_history("law", "prod")[-1]["action"] == "remove"
    # numbers are never reused
    assert registry.register(adapter(seed=4)).ref == "law@v4"
    assert registry.verify().ok


def test_path_is_a_complete_read_only_checkout(registry, adapter):
    src = adapter(seed=1)
    v = registry.register(src)
    p = registry.path("law@v1")
    assert tree_bytes(p) == tree_bytes(src)
    assert registry.path("law") == p  # cached
    assert not os.access(p / "adapter_model.safetensors", os.W_OK) or os.geteuid() == 0
    assert oct((p / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o444"
    assert p.is_relative_to(registry.root)
    assert v.sha[:12] in p.name


def test_path_loads_with_peft(registry, tmp_path):
    """A checkout is a plain PEFT directory: PeftModel.from_pretrained loads the same weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    out = tmp_path / "trained"
    model.save_pretrained(out)
    (out / "studio_adapter.json").write_text(json.dumps({"domain": "law", "base": {"id": "tiny-llama"}}))
    registry.register(out)
    fresh = transformers.LlamaForCausalLM(cfg)
    loaded = peft.PeftModel.from_pretrained(fresh, str(registry.path("law")))
    want = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    got = loaded.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())


def test_diff_reports_config_plan_metrics_and_files(registry, adapter):
    registry.register(adapter(seed=1, rank=4))
    registry.register(adapter(seed=2, rank=8))
    registry.append_metrics("law@v2", {"perplexity": 3.0}, source="eval")
    d = registry.diff("law@v1", "law@v2")
    assert (d["a"], d["b"]) == ("law@v1", "law@v2")
    assert d["config"]["r"] == {"a": 4, "b": 8}
    assert d["plan"]["rank"] == {"a": 4, "b": 8}
    assert d["hyperparameters"]["seed"] == {"a": 1, "b": 2}
    assert d["metrics"]["train_loss"]["delta"] == pytest.approx(0.1)
    assert d["metrics"]["perplexity"] == {"a": None, "b": 3.0}
    assert "adapter_model.safetensors" in d["files"]["changed"]
    assert d["base"] == {} and registry.diff("law@v1", "law@v1")["config"] == {}


def test_append_metrics_is_kept_outside_the_manifest(registry, adapter):
    v = registry.register(adapter(seed=1))
    registry.append_metrics("law@v1", {"perplexity": 4.0, "eval_loss": 2.4}, source="eval-heldout")
    registry.append_metrics("law@v1", {"perplexity": 3.9}, source="eval-heldout")
    after = registry.resolve("law@v1")
    assert after.sha == v.sha  # immutable
    assert after.metrics["perplexity"] == 3.9 and after.metrics["eval_loss"] == 2.4
    assert after.metrics["train_loss"] == 2.1
    assert [e["source"] for e in after.metrics_history] == ["train", "eval-heldout", "eval-heldout"]
    with pytest.raises(RegistryError, match="source"):
        registry.append_metrics("law@v1", {"x": 1}, source="")
    with pytest.raises(RegistryError, match="NaN"):
        registry.append_metrics("law@v1", {"x": float("nan")}, source="eval")


def test_base_fingerprint_compatibility(registry, adapter):
    registry.register(adapter(seed=1, fingerprint="sha256:base-a"))
    assert registry.check_compatible("law", "sha256:base-a").ref == "law@v1"
    with pytest.raises(RegistryError, match=r"law@v1 was trained on base 'tiny-moe' with fingerprint sha256:base-a, "
                                            r"but the base you are using has fingerprint sha256:base-b"
                                            r".*allow_mismatch=True"):
        registry.check_compatible("law", "sha256:base-b")
    with pytest.raises(RegistryError, match="fingerprint"):
        registry.resolve("law@v1", base_fingerprint="sha256:base-b")
    with pytest.warns(UserWarning, match="allowed by override"):
        assert registry.check_compatible("law", {"fingerprint": "sha256:base-b"}, allow_mismatch=True).ref == "law@v1"
    with pytest.raises(RegistryError, match="fingerprint"):
        registry.path("law", base_fingerprint="sha256:base-b")


def test_gc_removes_only_unreferenced_blobs(registry, adapter):
    v1 = registry.register(adapter(seed=1))
    v2 = registry.register(adapter(seed=2))
    checkout = registry.path("law@v1")
    registry.remove("law@v1")
    assert not checkout.exists()  # rm drops its checkout at once
    (registry.root / "tmp").mkdir(exist_ok=True)
    (registry.root / "tmp" / "blob-stale").write_bytes(b"junk")
    stats = registry.gc()
    # v1's manifest and the files it does not share with v2 (adapter_config.json is shared)
    only_v1 = {f["sha256"] for f in v1.files} - {f["sha256"] for f in v2.files}
    assert len(only_v1) == 4
    assert stats["blobs_removed"] == len(only_v1) + 1 and stats["bytes_freed"] > 0
    assert stats["tmp_removed"] == 1 and stats["checkouts_removed"] == 0
    assert registry.verify().ok
    assert registry.gc()["blobs_removed"] == 0
    assert registry.path("law@v2").is_dir()


def test_verify_detects_corruption_and_missing_blobs(registry, adapter):
    v = registry.register(adapter(seed=1))
    report = registry.verify()
    assert report.ok and report.integrity_check == "ok" and report.versions == 1
    weights = next(f for f in v.files if f["path"] == "adapter_model.safetensors")
    blob = registry.blobs.path(weights["sha256"])
    os.chmod(blob, 0o644)
    blob.write_bytes(b"x" * weights["size"])
    report = registry.verify()
    assert not report.ok and any("adapter_model.safetensors" in p and "hashes to" in p for p in report.problems)
    blob.unlink()
    assert any("missing" in p for p in registry.verify().problems)
    with pytest.raises(RegistryError, match="studio registry verify.*studio registry pull law@v1"):
        registry.path("law@v1")


def test_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_ADAPTERS_ROOT", str(tmp_path / "envroot"))
    reg = AdapterRegistry()
    assert reg.root == tmp_path / "envroot"
    reg.domains()
    assert (tmp_path / "envroot" / "catalog.sqlite").exists()
    reg.close()


def test_catalog_uses_wal(registry, adapter):
    registry.register(adapter(seed=1))
    con = sqlite3.connect(registry.root / "catalog.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_cli_round_trip(tmp_path, adapter):
    root = str(tmp_path / "cli-root")
    src = adapter(seed=1)
    r = studio_cli("--root", root, "--json", "register", str(src), "--tag", "cli")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ref"] == "law@v1"
    assert studio_cli("--root", root, "register", str(adapter(seed=2))).returncode == 0
    assert studio_cli("--root", root, "promote", "law@v1", "prod").returncode == 0
    r = studio_cli("--root", root, "list")
    assert r.returncode == 0 and "law@v1" in r.stdout and "prod" in r.stdout and "TRAIN_LOSS" in r.stdout
    r = studio_cli("list", "--json", env={"STUDIO_ADAPTERS_ROOT": root})
    assert [v["ref"] for v in json.loads(r.stdout)] == ["law@v1", "law@v2"]
    r = studio_cli("--root", root, "--json", "diff", "law@v1", "law@v2")
    assert json.loads(r.stdout)["hyperparameters"]["seed"] == {"a": 1, "b": 2}
    r = studio_cli("--root", root, "rm", "law@v1")
    assert r.returncode == 2 and r.stderr.startswith("error: law@v1 is the target of law@prod")
    r = studio_cli("--root", root, "show", "law@v999")
    assert r.returncode == 2 and "law@v999 does not exist: law has v1-v2" in r.stderr and "Traceback" not in r.stderr
    r = studio_cli("--root", root, "show", "law", "--base-fingerprint", "sha256:other")
    assert r.returncode == 2 and "--allow-base-mismatch" in r.stderr
    r = studio_cli("--root", root, "show", "law", "--base-fingerprint", "sha256:other", "--allow-base-mismatch")
    assert r.returncode == 0 and "warning:" in r.stderr
    r = studio_cli("--root", root, "metrics", "law@v2", "eval", "perplexity=3.5")
    assert r.returncode == 0
    r = studio_cli("--root", root, "--json", "show", "law@v2")
    assert json.loads(r.stdout)["metrics"]["perplexity"] == 3.5
    r = studio_cli("--root", root, "history", "law", "prod")
    assert "promote" in r.stdout
    r = studio_cli("--root", root, "rollback", "law@prod")
    assert r.returncode == 2 and "no earlier target" in r.stderr
    r = studio_cli("--root", root, "--json", "verify")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = studio_cli("--root", root, "path", "law@prod")
    assert (tmp_path / "cli-root" / "checkouts").is_dir() and r.stdout.strip().endswith(r.stdout.strip().split("/")[-1])
    r = studio_cli("--root", root, "--json", "gc")
    assert r.returncode == 0 and "blobs_removed" in json.loads(r.stdout)
