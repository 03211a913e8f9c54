"""Version manifests: the immutable JSON record of one adapter version (files + lineage).

A manifest is stored as a blob; its sha256 is the version's identity (`law@<sha prefix>`).
Canonical bytes (sorted keys, fixed indent) make the same content hash the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path, PurePosixPath

from studio.errors import RegistryError, read_json_object
from studio.paths import METADATA_FILE
from studio.registry.refs import DOMAIN_RE

FORMAT = "studio.adapter-manifest/1"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
# PEFT can also write pickles (adapter_model.bin, training_args.bin): the registry never stores them
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HEX = set("0123456789abcdef")


def canonical_json(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def json_safe(obj):
    """Strict JSON for manifests: NaN/Infinity (a diverged loss) become the strings "NaN", "Infinity"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def files_digest(files: list[dict]) -> str:
    """Identity of an adapter's content, independent of when and where it was registered."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f["path"]):
        h.update(f"{f['path']}\0{f['sha256']}\0{f['size']}\n".encode())
    return h.hexdigest()


def scan_adapter_dir(src: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Every regular file under `src` as (posix relative path, absolute path), and the pickles skipped."""
    if not src.exists():
        raise RegistryError(f"adapter directory {src} does not exist; pass the trainer's output directory")
    if not src.is_dir():
        raise RegistryError(f"{src} is not a directory; pass the directory holding adapter_config.json")
    found, skipped = [], []
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(src).as_posix()
        if rel.endswith(PICKLE_SUFFIXES):
            skipped.append(rel)
            continue
        found.append((rel, path))
    names = {rel for rel, _ in found}
    missing = [f for f in REQUIRED_FILES if f not in names]
    if missing:
        extra = " (a pickle adapter_model.bin is not accepted: save with safe_serialization=True)" if (
            "adapter_model.safetensors" in missing and "adapter_model.bin" in skipped) else ""
        raise RegistryError(
            f"{src} is not a PEFT adapter directory: missing {', '.join(missing)}{extra}; "
            "pass the directory the trainer wrote (model.save_pretrained(dir))"
        )
    return found, skipped


def check_safetensors(path: Path) -> None:
    """Parse the safetensors header without loading tensors (no torch needed)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_len = size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= data_len:
                raise ValueError(f"tensor {name!r} points outside the file")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise RegistryError(f"{path} is not a valid safetensors file ({exc}); re-save the adapter") from None


def load_metadata(src: Path) -> dict:
    path = src / METADATA_FILE
    if not path.exists():
        return {}
    meta = read_json_object(path, RegistryError,
                            "it holds the studio metadata (domain, base, dataset, ...): fix or regenerate it")
    return json_safe(meta)


def check_json_object(path: Path) -> dict:
    return read_json_object(path, RegistryError, "re-save the adapter")


def _safe_relpath(p) -> bool:
    if not isinstance(p, str) or not p or "\\" in p or "\0" in p:
        return False
    pp = PurePosixPath(p)
    return not pp.is_absolute() and all(part not in ("", ".", "..") for part in pp.parts)


def _is_sha(s) -> bool:
    return isinstance(s, str) and len(s) == 64 and set(s) <= HEX


def parse_manifest(data: bytes, where: str) -> dict:
    """Decode and validate a manifest that may come from an untrusted remote."""
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"manifest {where} is corrupt (not JSON: {exc}); re-push it from a good copy") from None
    problems = []
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        problems.append(f"format is not {FORMAT!r}")
    else:
        if not isinstance(m.get("domain"), str) or not DOMAIN_RE.match(m["domain"]):
            problems.append("bad domain")
        files = m.get("files")
        if not isinstance(files, list) or not files:
            problems.append("no files")
        else:
            seen = set()
            for f in files:
                if not isinstance(f, dict) or not _safe_relpath(f.get("path")) or not _is_sha(f.get("sha256")) \
                        or not isinstance(f.get("size"), int) or f["size"] < 0:
                    problems.append(f"bad file entry {f!r:.80}")
                    break
                if f["path"] in seen:
                    problems.append(f"duplicate path {f['path']}")
                seen.add(f["path"])
        if not isinstance(m.get("created"), str):
            problems.append("no created time")
        if not isinstance(m.get("metadata", {}), dict):
            problems.append("metadata is not an object")
    if problems:
        raise RegistryError(f"manifest {where} is invalid ({'; '.join(problems)}); re-push it from a good copy")
    return m
