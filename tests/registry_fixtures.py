"""Fixtures for the adapter-registry tests: fake trainer outputs, isolated roots, an S3 server.

Kept out of conftest.py on purpose (other suites own that); test modules import from here.
The S3 server is moto's, started on 127.0.0.1 with dummy credentials; nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make_adapter(path: Path, domain: str = "law", seed: int = 0, fingerprint: str = "sha256:base-a",
                 extra_files: dict | None = None, parent: str | None = None, rank: int = 4) -> Path:
    """A small trainer output: real safetensors (random tensors), PEFT config, studio metadata."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(rank, 16, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, rank, generator=g),
        "base_model.model.model.layers.0.mlp.experts.lora_A.weight": torch.randn(rank * 4, 16, generator=g),
    }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj"],
        "base_model_name_or_path": "tiny-moe", "task_type": "CAUSAL_LM",
    }, indent=2))
    (path / "studio_adapter.json").write_text(json.dumps({
        "domain": domain,
        "base": {"id": "tiny-moe", "fingerprint": fingerprint},
        "quantization": {"mode": "nf4", "experts": True},
        "plan": {"attention": ["q_proj"], "experts": ["gate_up_proj"], "router": "frozen", "rank": rank},
        "dataset": {"ref": f"{domain}@v1", "name": domain, "version": 1, "hash": "sha256:data"},
        "hyperparameters": {"lr": 2e-4, "epochs": 1, "seed": seed},
        "metrics": {"train_loss": round(2.0 + seed / 10, 4), "eval_loss": round(2.5 + seed / 10, 4)},
        "memory": {"peak_gb": 0.1},
        "library_versions": {"torch": "2.13.0", "peft": "0.21.2"},
        "parent": parent,
    }, indent=2))
    (path / "README.md").write_text(f"# {domain} adapter {seed}\n")
    (path / "training_log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0 + seed}) + "\n")
    for rel, data in (extra_files or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def snapshot(root: Path) -> dict[str, bytes]:
    """Everything that makes up a registry's visible state (catalog rows aside): blobs and checkouts."""
    return {k: v for k, v in tree_bytes(root).items() if k.startswith(("blobs/", "checkouts/"))}


def studio_cli(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `python -m studio.cli registry ...` in a real subprocess."""
    return subprocess.run([sys.executable, "-m", "studio.cli", "registry", *args], capture_output=True, text=True,
                          env=cli_env(env), cwd=REPO, timeout=120, **kw)


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra or {})
    return env


@pytest.fixture
def adapter(tmp_path):
    """Factory: adapter(seed=1, domain="law") -> path of a fresh fake adapter directory."""
    def make(seed: int = 0, domain: str = "law", **kw) -> Path:
        return make_adapter(tmp_path / "adapters-src" / f"{domain}-{seed}-{uuid.uuid4().hex[:6]}", domain, seed, **kw)
    return make


@pytest.fixture
def registry(tmp_path):
    from studio.registry import AdapterRegistry
    reg = AdapterRegistry(tmp_path / "registry")
    yield reg
    reg.close()


@pytest.fixture
def make_registry(tmp_path):
    from studio.registry import AdapterRegistry
    made = []

    def make(name: str):
        reg = AdapterRegistry(tmp_path / name)
        made.append(reg)
        return reg
    yield make
    for reg in made:
        reg.close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (random port) with dummy credentials in the environment."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_remote(s3_server):
    """A fresh bucket: returns (url, storage options) for AdapterRegistry.remote_add."""
    import s3fs
    bucket = f"reg-{uuid.uuid4().hex[:10]}"
    options = {"client_kwargs": {"endpoint_url": s3_server}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.mkdir(bucket)
    return f"s3://{bucket}/adapters", options
