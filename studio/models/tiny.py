"""Tiny MoE bases built locally and deterministically: the embedded default `tiny-moe` and small test
models of six MoE families. Run `python -m studio.models.tiny NAME` to build one into the cache.

`tiny-moe` is a DeepSeek-V3-architecture base (MLA attention, one shared expert, 8 routed experts with top-2
routing, first layer dense) pretrained by the studio on CPython's documentation: its weights ship in
studio/assets/tiny-moe/model.safetensors (sha256 in pretrained.json) and `studio models pretrain tiny-moe` rebuilds
them. `tiny-moe-random` is the same architecture randomly initialised (the pretraining's starting point, and a fast
smoke-test base); the other tiny architectures are random too. Real adaptation uses `--base <hub id or dir>`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from studio import paths

SEED = 1234
TOKENIZER_DIR = paths.ASSETS_DIR / "tiny-moe"
EMBEDDED_CONFIG = paths.ASSETS_DIR / "tiny-moe" / "model_config.json"

# Small shapes shared by the test architectures: hidden 64, 2 layers, 8 experts, top-2.
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, tie_word_embeddings=False)

# name -> (transformers config class name, kwargs). The vocabulary comes from the shipped tokenizer.
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "tiny-mixtral": ("MixtralConfig", dict(_SMALL, intermediate_size=64, num_local_experts=8,
                                            num_experts_per_tok=2, output_router_logits=True)),
    "tiny-qwen2-moe": ("Qwen2MoeConfig", dict(_SMALL, intermediate_size=128, moe_intermediate_size=64,
                                               shared_expert_intermediate_size=64, num_experts=8,
                                               num_experts_per_tok=2, output_router_logits=True)),
    "tiny-qwen3-moe": ("Qwen3MoeConfig", dict(_SMALL, intermediate_size=128, moe_intermediate_size=64,
                                               num_experts=8, num_experts_per_tok=2, head_dim=16,
                                               output_router_logits=True)),
    "tiny-olmoe": ("OlmoeConfig", dict(_SMALL, num_key_value_heads=4, intermediate_size=64, num_experts=8,
                                       num_experts_per_tok=2, output_router_logits=True)),
    "tiny-gpt-oss": ("GptOssConfig", dict(_SMALL, intermediate_size=64, num_local_experts=8,
                                          num_experts_per_tok=2, head_dim=16, sliding_window=64,
                                          layer_types=["sliding_attention", "full_attention"],
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                          output_router_logits=True)),
}
EMBEDDED = ("tiny-moe", *TINY_ARCHS)
# Bases that resolve and build like the embedded ones but are not listed among them (test-only variants).
RANDOM_TINY_MOE = "tiny-moe-random"
BUILDABLE = (*EMBEDDED, RANDOM_TINY_MOE)
PRETRAINED_WEIGHTS = paths.ASSETS_DIR / "tiny-moe" / "model.safetensors"
PRETRAINED_RECORD = paths.ASSETS_DIR / "tiny-moe" / "pretrained.json"


def _tokenizer_ids() -> dict:
    from studio.models.tokenizer import load_tokenizer

    tok = load_tokenizer()
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=None)


def make_config(name: str):
    """The transformers config of an embedded base (no weights)."""
    import transformers

    if name in ("tiny-moe", RANDOM_TINY_MOE):
        spec = json.loads(EMBEDDED_CONFIG.read_text())
        cls_name, kwargs = spec.pop("config_class"), spec
    elif name in TINY_ARCHS:
        cls_name, kwargs = TINY_ARCHS[name]
    else:
        raise KeyError(name)
    kwargs = dict(kwargs, **_tokenizer_ids())
    config = getattr(transformers, cls_name)(**kwargs)
    # The eager experts loop is the one our expert LoRA replaces; pin it so builds are identical everywhere.
    config._experts_implementation = "eager"
    return config


def pretrained_sha256() -> str:
    """The sha256 of the shipped tiny-moe weights, as recorded when they were pretrained."""
    return json.loads(PRETRAINED_RECORD.read_text())["sha256"]


def load_pretrained_state() -> dict:
    """The shipped tiny-moe weights, checked against their recorded sha256 (a ModelError names the fix)."""
    from safetensors.torch import load_file

    from studio.errors import ModelError
    from studio.models.pretrain import file_sha256

    if not PRETRAINED_WEIGHTS.is_file():
        raise ModelError(f"{PRETRAINED_WEIGHTS} is missing: restore it from git (it is committed) or rebuild it with "
                         f"`studio models pretrain tiny-moe`")
    actual, expected = file_sha256(PRETRAINED_WEIGHTS), pretrained_sha256()
    if actual != expected:
        raise ModelError(f"{PRETRAINED_WEIGHTS} has sha256 {actual}, not the recorded {expected}: restore it from "
                         f"git or rebuild it with `studio models pretrain tiny-moe`")
    return load_file(str(PRETRAINED_WEIGHTS))


def build_model(name: str, seed: int = SEED):
    """Instantiate an embedded base in fp32: tiny-moe with its pretrained weights, the others (and tiny-moe-random)
    with deterministic random weights (CPU RNG, fixed seed)."""
    from transformers import AutoModelForCausalLM

    config = make_config(name)
    if name == "tiny-moe":
        with torch.device("cpu"):  # not meta: non-persistent buffers (rotary tables) are not in the state dict
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(load_pretrained_state(), strict=True)
        model.eval()
        return model
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Routers start at zero in some families (DeepSeek-V3, gpt-oss); a random router keeps routing
    # non-degenerate so expert usage statistics mean something on the smoke-test base.
    gen = torch.Generator().manual_seed(seed + 1)
    for module_name, module in model.named_modules():
        if module_name.endswith((".gate", ".router")) and hasattr(module, "weight") and module.weight.dim() == 2:
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * config.initializer_range)
    model.eval()
    return model


def weights_hash(model_or_state) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _target(name: str, cache_dir) -> Path:
    """<cache>/<name>-<digest of the config, and for tiny-moe of its shipped weights>."""
    cache = Path(cache_dir) if cache_dir else paths.models_cache()
    identity = json.dumps(make_config(name).to_dict(), sort_keys=True, default=str)
    if name == "tiny-moe":
        identity += pretrained_sha256()
    return cache / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def built_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cache directory of a base if it has been built, else None (builds nothing)."""
    target = _target(name, cache_dir)
    return target if (target / "studio_base.json").exists() else None


def ensure_built(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Build an embedded base once into the cache (`save_pretrained` + tokenizer) and return its directory.

    The directory is written under a temporary name and renamed last, so its existence means it is complete.
    """
    if name not in BUILDABLE:
        raise KeyError(name)
    target = _target(name, cache_dir)
    cache = target.parent
    if (target / "studio_base.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        model = build_model(name)
        model.save_pretrained(tmp, safe_serialization=True)
        from studio.models.tokenizer import load_tokenizer

        load_tokenizer().save_pretrained(tmp)
        (tmp / "studio_base.json").write_text(json.dumps(
            {"name": name, "seed": SEED, "weights_hash": weights_hash(model),
             "pretrained_sha256": pretrained_sha256() if name == "tiny-moe" else None}, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: theirs is identical
            if not (target / "studio_base.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BUILDABLE, help="which embedded base to build")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $STUDIO_MODELS_CACHE)")
    args = parser.parse_args(argv)
    path = ensure_built(args.name, args.cache_dir)
    print(path)
    print(json.loads((path / "studio_base.json").read_text())["weights_hash"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
