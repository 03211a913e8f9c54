"""Resolving `--base` references (embedded, local dir, config.json, hub id) and base fingerprints. Offline."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

from studio.errors import ModelError
from studio.models import resolve as R
from studio.models.tiny import EMBEDDED, TOKENIZER_DIR

pytestmark = pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.json").is_file(),
                                reason="the tiny-moe tokenizer asset is not written yet")

MIXTRAL = R.KNOWN_CONFIGS_DIR / "mistralai--Mixtral-8x7B-v0.1.json"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own models cache and an empty HF cache; the hub is offline."""
    from huggingface_hub import constants

    monkeypatch.setenv("STUDIO_MODELS_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.fixture(scope="module")
def built_tiny(tmp_path_factory):
    """tiny-moe built once for the module, into its own cache."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    return cache, R.resolve_base("tiny-moe", cache_dir=cache)


def _fake_model_dir(path, seed: int):
    path.mkdir(parents=True)
    shutil.copy(MIXTRAL, path / "config.json")
    gen = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(64, 64, generator=gen)}, str(path / "model.safetensors"))
    return path


def test_embedded_builds_once_and_resolves(built_tiny):
    cache, base = built_tiny
    assert base.kind == "embedded" and base.ref == "tiny-moe"
    assert (base.path / "config.json").is_file() and base.has_weights
    assert base.config.model_type == "deepseek_v3" and R.is_moe_config(base.config)
    assert R.moe_shape(base.config) == (8, 2)
    assert R.embedded_built_path("tiny-moe", cache) == base.path
    again = R.resolve_base("tiny-moe", cache_dir=cache)
    assert again.path == base.path


def test_embedded_config_only_builds_nothing(isolated):
    base = R.resolve_base("tiny-olmoe", config_only=True)
    assert base.kind == "embedded" and base.path is None and base.config.model_type == "olmoe"
    assert not (isolated / "models").exists()


def test_local_dir(built_tiny):
    _, tiny = built_tiny
    base = R.resolve_base(str(tiny.path))
    assert base.kind == "local" and base.path == tiny.path.resolve()
    assert base.config.model_type == "deepseek_v3" and base.has_weights


def test_config_json_path_is_for_planning(tmp_path):
    cfg = tmp_path / "cfgs" / "mixtral.json"
    cfg.parent.mkdir()
    shutil.copy(MIXTRAL, cfg)
    base = R.resolve_base(str(cfg), config_only=True)
    assert base.kind == "local" and base.config.model_type == "mixtral" and not base.has_weights
    with pytest.raises(ModelError, match="safetensors"):
        R.resolve_base(str(cfg))


def test_dir_without_config_or_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        R.resolve_base(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    shutil.copy(MIXTRAL, tmp_path / "noweights" / "config.json")
    with pytest.raises(ModelError, match="safetensors"):
        R.resolve_base(str(tmp_path / "noweights"))
    assert R.resolve_base(str(tmp_path / "noweights"), config_only=True).config.model_type == "mixtral"


@pytest.mark.parametrize("ref", ["./no/such/model", "/definitely/not/here", "../missing-dir", "~/nope/x/y",
                                 "weights/config.json"])
def test_nonexistent_path(ref):
    with pytest.raises(ModelError, match="does not exist"):
        R.resolve_base(ref)


def test_uncached_hub_id_offline_fails_fast_with_the_fix():
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        R.resolve_base("studio-test-org/no-such-moe")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "unreachable" in msg and "local" in msg and "--base /path/to/dir" in msg
    assert "download studio-test-org/no-such-moe --local-dir" in msg


def test_uncached_known_hub_id_plans_from_the_shipped_config():
    base = R.resolve_base("mistralai/Mixtral-8x7B-v0.1", config_only=True)
    assert base.kind == "hub" and base.path is None
    assert base.config.model_type == "mixtral" and base.config.num_local_experts == 8
    with pytest.raises(ModelError, match="unreachable"):  # weights still need a local copy
        R.resolve_base("mistralai/Mixtral-8x7B-v0.1")


def test_hub_id_found_in_the_hf_cache(isolated):
    repo = isolated / "hf" / "models--acme--tiny-moe-copy"
    snapshot = repo / "snapshots" / ("a" * 40)
    _fake_model_dir(snapshot, seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for config_only in (False, True):
        base = R.resolve_base("acme/tiny-moe-copy", config_only=config_only)
        assert base.kind == "hub" and base.path == snapshot and base.config.model_type == "mixtral"


@pytest.mark.parametrize("typo, expected", [("tiny-moee", "tiny-moe"), ("tiny-mixtrl", "tiny-mixtral"),
                                            ("tiny_gpt_oss", "tiny-gpt-oss"),
                                            ("Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-v0.1")])
def test_unknown_name_suggests(typo, expected):
    with pytest.raises(ModelError) as err:
        R.resolve_base(typo)
    assert f"Did you mean '{expected}'" in str(err.value)


def test_empty_ref():
    with pytest.raises(ModelError, match="no base"):
        R.resolve_base("  ")


def test_fingerprint_stable_cached_and_weight_sensitive(tmp_path, isolated):
    a = _fake_model_dir(tmp_path / "a", seed=1)
    b = _fake_model_dir(tmp_path / "b", seed=2)
    fa = R.base_fingerprint(a)
    assert fa.startswith("sha256:") and len(fa) == len("sha256:") + 64
    assert R.base_fingerprint(a) == fa == R.base_fingerprint(str(a / "config.json"))
    cache = json.loads((isolated / "models" / "fingerprints.json").read_text())
    assert any(key.startswith(str((a / "model.safetensors").resolve())) for key in cache)
    assert R.base_fingerprint(b) != fa
    # same bytes elsewhere: same fingerprint; a changed config: different fingerprint
    c = tmp_path / "c"
    shutil.copytree(a, c)
    assert R.base_fingerprint(c) == fa
    config = json.loads((c / "config.json").read_text())
    config["num_experts_per_tok"] = 1
    (c / "config.json").write_text(json.dumps(config))
    assert R.base_fingerprint(c) != fa
    # rewritten weights are re-hashed (the cache is keyed by path, mtime and size)
    save_file({"w": torch.zeros(64, 64)}, str(a / "model.safetensors"))
    assert R.base_fingerprint(a) != fa


def test_fingerprint_of_embedded_base_uses_its_recorded_hash(built_tiny):
    _, base = built_tiny
    f1 = R.base_fingerprint(base.path)
    assert f1 == R.base_fingerprint(base) and f1.startswith("sha256:")
    with pytest.raises(ModelError):
        R.base_fingerprint(R.resolve_base("mistralai/Mixtral-8x7B-v0.1", config_only=True))


def test_is_moe_and_dense_message():
    from transformers import LlamaConfig

    assert R.is_moe_config(R.known_config("Qwen/Qwen3-30B-A3B"))
    dense = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    assert not R.is_moe_config(dense)
    R.require_moe(R.known_config("openai/gpt-oss-20b"))
    with pytest.raises(ModelError, match="dense") as err:
        R.require_moe(dense, "meta-llama/Llama-3.1-8B")
    assert "tiny-moe" in str(err.value)


def test_every_embedded_name_resolves_config_only():
    for name in EMBEDDED:
        assert R.is_moe_config(R.resolve_base(name, config_only=True).config)


def test_cli_build_and_show(capsys, isolated):
    from studio.cli import main

    assert main(["models", "build", "tiny-mixtral", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["fingerprint"].startswith("sha256:") and (isolated / "models") in R.Path(built["path"]).parents
    assert main(["models", "show", "--base", built["path"], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "local" and shown["moe"] and shown["fingerprint"] == built["fingerprint"]
    assert main(["models", "build", "tiny-mixtrl"]) == 2
    assert "Did you mean 'tiny-mixtral'" in capsys.readouterr().err
