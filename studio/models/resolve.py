"""Turn a `--base` reference into a local directory and a transformers config, and fingerprint bases.

A reference is an embedded name (`tiny-moe`), a local directory or `config.json` path, or a hub id
(`org/name`). Used by `studio models`, the trainer and the engine; nothing here loads weights.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio import paths
from studio.errors import ModelError

KNOWN_CONFIGS_DIR = Path(__file__).resolve().parent / "known_configs"
HUB_TIMEOUT_S = 5.0  # an unreachable hub must fail at once, not after minutes of retries
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 1 << 20
# Files a base needs from the hub: config, weights (safetensors only, never pickle), tokenizer.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_CONFIG_KEYS_IGNORED = ("transformers_version",)  # volatile keys, not part of a base's identity


@dataclass
class ResolvedBase:
    """Where a base lives and what it is."""

    ref: str  # what the user wrote
    kind: str  # "embedded" | "local" | "hub"
    path: Path | None  # local directory with config.json (+ weights unless config-only); None if none
    config: Any  # transformers.PretrainedConfig

    @property
    def has_weights(self) -> bool:
        return self.path is not None and any(self.path.glob("*.safetensors"))

    @property
    def name(self) -> str:
        """A short display name: the embedded name, the hub id, or the directory name."""
        if self.kind == "local" and self.path is not None:
            return self.path.name
        return self.ref


# --------------------------------------------------------------------------- configs


def config_from_dict(data: dict, source: str = "config"):
    """A transformers config from a config.json dict, picking the class from `model_type`."""
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not model_type:
        raise ModelError(f"{source} has no `model_type`; it is not a transformers config.json")
    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"{source}: model_type {model_type!r} is not supported by the installed transformers; "
                         f"upgrade transformers or use a supported MoE architecture")
    return CONFIG_MAPPING[model_type].from_dict(dict(data))


def load_config_file(path: str | os.PathLike):
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object; expected a transformers config.json")
    return config_from_dict(data, source=str(path))


def _known_config_file(hub_id: str) -> Path:
    return KNOWN_CONFIGS_DIR / (hub_id.replace("/", "--") + ".json")


def known_configs() -> list[str]:
    """Hub ids whose published architecture config ships with the studio (for offline planning)."""
    return sorted(p.stem.replace("--", "/", 1) for p in KNOWN_CONFIGS_DIR.glob("*.json"))


def known_config(hub_id: str):
    """The shipped copy of a hub model's published config, or None."""
    path = _known_config_file(hub_id)
    return load_config_file(path) if path.is_file() else None


# --------------------------------------------------------------------------- MoE check


def moe_shape(config) -> tuple[int, int]:
    """(routed experts, experts per token) of a config; (0, 0) for a dense one."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts = 0
    for key in ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            experts = value
            break
    top_k = 0
    for key in ("num_experts_per_tok", "experts_per_token", "moe_top_k", "top_k"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            top_k = value
            break
    return experts, top_k


def is_moe_config(config) -> bool:
    """True when the config describes a Mixture-of-Experts model (more than one routed expert)."""
    return moe_shape(config)[0] > 1


def require_moe(config, ref: str | None = None) -> None:
    """Raise a ModelError a user can act on when the base is dense."""
    if is_moe_config(config):
        return
    model_type = getattr(config, "model_type", "?")
    what = f"base {ref!r}" if ref else "this base"
    raise ModelError(
        f"{what} (model_type {model_type!r}) is a dense model: its config declares no routed experts "
        f"(num_local_experts / n_routed_experts / num_experts). MoE LoRA Studio adapts Mixture-of-Experts "
        f"models (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, OLMoE, gpt-oss); pick an MoE base, e.g. "
        f"`--base tiny-moe` or `--base Qwen/Qwen3-30B-A3B`. For a dense model use plain PEFT LoRA.")


# --------------------------------------------------------------------------- resolution


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().lower() in ("1", "true", "yes", "on")


def _unreachable(hub_id: str, why: str) -> ModelError:
    return ModelError(
        f"cannot get {hub_id!r}: the Hugging Face hub is unreachable ({why}) and it is not in the local HF "
        f"cache. Point at a local copy instead: `--base /path/to/dir` (a directory containing config.json and "
        f"*.safetensors), made on a machine with hub access by `hf download {hub_id} --local-dir DIR` "
        f"(formerly `huggingface-cli download`), or copy its HF cache folder models--{hub_id.replace('/', '--')} "
        f"here.")


def _looks_like_path(ref: str) -> bool:
    return (ref.startswith(("/", "./", "../", "~", ".\\")) or ref in (".", "..") or ref.endswith(".json")
            or ref.count("/") > 1 or "\\" in ref)


def _resolve_local(ref: str, config_only: bool) -> ResolvedBase:
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise ModelError(f"{ref!r} is a file but not a config.json; pass the model directory or its config.json")
        config = load_config_file(path)
        base = ResolvedBase(ref=ref, kind="local", path=path.resolve().parent, config=config)
        if not config_only and not base.has_weights:
            raise ModelError(f"{ref!r} is a config file with no *.safetensors weights beside it: it can be used "
                             f"for planning (`studio models plan`) but training needs the model directory")
        return base
    if not (path / "config.json").is_file():
        raise ModelError(f"{ref!r} is a directory without config.json; pass the directory that holds the "
                         f"model's config.json and *.safetensors")
    base = ResolvedBase(ref=ref, kind="local", path=path.resolve(), config=load_config_file(path / "config.json"))
    if not config_only and not base.has_weights:
        hint = " (it has pickle .bin weights, which the studio does not load)" if any(path.glob("*.bin")) else ""
        raise ModelError(f"{ref!r} has config.json but no *.safetensors weights{hint}; convert or re-download "
                         f"the model in safetensors format")
    return base


def _from_hub_cache(hub_id: str, config_only: bool, cache_dir) -> Path | None:
    """The cached snapshot directory of a hub model, or None (never touches the network)."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if config_only:
        found = try_to_load_from_cache(hub_id, "config.json", cache_dir=cache_dir)
        return Path(found).parent if isinstance(found, str) else None
    try:
        snapshot = Path(snapshot_download(hub_id, local_files_only=True, cache_dir=cache_dir,
                                          allow_patterns=_HUB_PATTERNS))
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return None
    if (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors")):
        return snapshot
    return None


def _download(hub_id: str, config_only: bool, cache_dir) -> Path:
    """Fetch from the hub with a short timeout; every failure becomes a ModelError that names the fix."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        HfApi().model_info(hub_id, timeout=HUB_TIMEOUT_S)  # cheap probe: fails fast when unreachable
        if config_only:
            return Path(hf_hub_download(hub_id, "config.json", cache_dir=cache_dir, etag_timeout=HUB_TIMEOUT_S)).parent
        return Path(snapshot_download(hub_id, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS,
                                      etag_timeout=HUB_TIMEOUT_S))
    except hf_errors.GatedRepoError as exc:
        raise ModelError(f"{hub_id!r} is gated: accept its license on the hub and log in with `hf auth login` "
                         f"(or set HF_TOKEN)") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise ModelError(f"{hub_id!r} was not found on the hub (check the spelling; private repos need "
                         f"`hf auth login`)") from exc
    except hf_errors.HFValidationError as exc:
        raise ModelError(f"{hub_id!r} is not a valid hub id (expected org/name): {exc}") from exc
    except hf_errors.HfHubHTTPError as exc:
        raise ModelError(f"the hub refused {hub_id!r}: {exc}") from exc
    except (OSError, ValueError, hf_errors.LocalEntryNotFoundError) as exc:
        raise _unreachable(hub_id, type(exc).__name__) from exc
    except Exception as exc:  # httpx timeouts/connect errors are not OSError subclasses
        if "Timeout" in type(exc).__name__ or "Connect" in type(exc).__name__:
            raise _unreachable(hub_id, type(exc).__name__) from exc
        raise


def _resolve_hub(hub_id: str, config_only: bool, cache_dir) -> ResolvedBase:
    snapshot = _from_hub_cache(hub_id, config_only, cache_dir)
    if snapshot is not None:
        return ResolvedBase(ref=hub_id, kind="hub", path=snapshot, config=load_config_file(snapshot / "config.json"))
    if config_only:
        config = known_config(hub_id)
        if config is not None:  # planning needs no weights: the shipped copy of the published config will do
            return ResolvedBase(ref=hub_id, kind="hub", path=None, config=config)
    if _hub_offline():
        raise _unreachable(hub_id, "HF_HUB_OFFLINE is set")
    snapshot = _download(hub_id, config_only, cache_dir)
    return ResolvedBase(ref=hub_id, kind="hub", path=snapshot, config=load_config_file(snapshot / "config.json"))


def _resolve_embedded(name: str, config_only: bool, cache_dir) -> ResolvedBase:
    from studio.models import tiny

    if config_only:
        return ResolvedBase(ref=name, kind="embedded", path=embedded_built_path(name, cache_dir),
                            config=tiny.make_config(name))
    path = tiny.ensure_built(name, cache_dir)
    return ResolvedBase(ref=name, kind="embedded", path=path, config=tiny.make_config(name))


def embedded_built_path(name: str, cache_dir=None) -> Path | None:
    """The cache directory of an embedded base if it has been built, else None (builds nothing)."""
    from studio.models import tiny

    built_path = getattr(tiny, "built_path", None)
    if built_path is not None:
        return built_path(name, cache_dir)
    # Mirrors the target naming of `tiny.ensure_built`: <cache>/<name>-<config digest>/studio_base.json.
    digest = hashlib.sha256(json.dumps(tiny.make_config(name).to_dict(), sort_keys=True, default=str)
                            .encode()).hexdigest()[:12]
    target = (Path(cache_dir) if cache_dir else paths.models_cache()) / f"{name}-{digest}"
    return target if (target / "studio_base.json").exists() else None


def resolve_base(ref: str, config_only: bool = False, cache_dir: str | os.PathLike | None = None) -> ResolvedBase:
    """Resolve `ref`: embedded name | local directory (or config.json file) | hub id `org/name`.

    `config_only=True` is for planning: embedded bases are not built, a config.json without weights is
    accepted, and an uncached hub id falls back to the shipped copy of its published config (path None).
    `cache_dir` is the models cache for embedded bases and the HF cache for hub ids (defaults otherwise).
    Raises ModelError with the fix when the base cannot be found.
    """
    from studio.models import tiny

    ref = str(ref).strip()
    if not ref:
        raise ModelError("no base given: pass an embedded name (e.g. `tiny-moe`), a local directory or a hub id")
    if ref in tiny.BUILDABLE:
        return _resolve_embedded(ref, config_only, cache_dir)
    path = Path(ref).expanduser()
    if path.exists():
        return _resolve_local(ref, config_only)
    if _looks_like_path(ref):
        raise ModelError(f"{ref!r} does not exist; pass an existing directory with config.json and "
                         f"*.safetensors (or a config.json file for planning)")
    if _HUB_ID.match(ref):
        return _resolve_hub(ref, config_only, cache_dir)
    candidates = list(tiny.EMBEDDED) + known_configs() + [h.split("/", 1)[1] for h in known_configs()]
    close = difflib.get_close_matches(ref, candidates, n=3, cutoff=0.6)
    close = [next((h for h in known_configs() if h.endswith("/" + c)), c) for c in close]
    hint = f" Did you mean {' or '.join(repr(c) for c in dict.fromkeys(close))}?" if close else ""
    raise ModelError(f"unknown base {ref!r}: not an embedded base ({', '.join(tiny.EMBEDDED)}), an existing "
                     f"path, or a hub id of the form org/name.{hint}")


# --------------------------------------------------------------------------- fingerprints


def _config_hash(data: dict) -> str:
    data = {k: v for k, v in data.items() if not k.startswith("_") and k not in _CONFIG_KEYS_IGNORED}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint_cache_file() -> Path:
    return paths.models_cache() / "fingerprints.json"


def _read_cache() -> dict:
    try:
        data = json.loads(_fingerprint_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    target = _fingerprint_cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, target)  # atomic: readers never see half a file
    except OSError:
        pass  # the cache only saves time


def _file_sha256(path: Path, cache: dict) -> str:
    real = path.resolve()  # HF cache snapshots are symlinks into content-addressed blobs
    st = real.stat()
    key = f"{real}|{st.st_mtime_ns}|{st.st_size}"
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(real, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    cache[key] = h.hexdigest()
    return cache[key]


def _dir_weights_hash(directory: Path) -> str:
    marker = directory / "studio_base.json"
    if marker.is_file():  # embedded bases record a hash of their tensors when built
        try:
            recorded = json.loads(marker.read_text()).get("weights_hash")
        except (OSError, ValueError):
            recorded = None
        if recorded:
            return recorded
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{directory} has no *.safetensors weights to fingerprint")
    cache = _read_cache()
    before = dict(cache)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{_file_sha256(f, cache)}\n".encode())
    if cache != before:
        _write_cache(cache)
    return "sha256:" + h.hexdigest()


def base_fingerprint(path_or_model) -> str:
    """A stable identity of a base: `sha256:` over its config hash and its weights hash.

    Accepts a local model directory, a ResolvedBase with a path, or a loaded model (`nn.Module` with
    `.config`). Directory weights are hashed from the safetensors bytes (streamed in 1 MiB chunks and cached in
    `<models cache>/fingerprints.json` by path, mtime and size); embedded bases reuse the weights hash recorded in
    their `studio_base.json`; a loaded model hashes its tensors (`tiny.weights_hash`).
    """
    if isinstance(path_or_model, ResolvedBase):
        if path_or_model.path is None:
            raise ModelError(f"{path_or_model.ref!r} has no local copy to fingerprint")
        path_or_model = path_or_model.path
    if isinstance(path_or_model, (str, os.PathLike)):
        directory = Path(path_or_model).expanduser()
        if directory.is_file():
            directory = directory.parent
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{directory} has no config.json to fingerprint")
        try:
            config_data = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {config_file}: {exc}") from exc
        weights = _dir_weights_hash(directory)
    elif hasattr(path_or_model, "state_dict") and hasattr(path_or_model, "config"):
        from studio.models.tiny import weights_hash

        config_data = path_or_model.config.to_dict()
        weights = weights_hash(path_or_model)
    else:
        raise TypeError(f"base_fingerprint expects a directory or a model, got {type(path_or_model).__name__}")
    combined = f"config:{_config_hash(config_data)}\nweights:{weights}"
    return "sha256:" + hashlib.sha256(combined.encode()).hexdigest()
