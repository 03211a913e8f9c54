"""Deployable artifacts from a registered adapter:
`studio export law@prod --format peft|per-expert|merged --output DIR`.

    peft        the registry's PEFT files (fused 3D expert LoRA, as PEFT's `target_parameters` saves it) + a README
                model card. Loads with `peft.PeftModel.from_pretrained`; vLLM loads this layout for its 3D-MoE
                models (gpt-oss, ...).
    per-expert  routed-expert LoRA split into per-expert 2D modules (`mlp.experts.{e}.gate_proj|up_proj|down_proj`,
                Mixtral `block_sparse_moe.experts.{e}.w1|w3|w2`) with one rank and one scaling for every module:
                the layout vLLM expects for its 2D MoE models (Qwen-MoE, Mixtral, OLMoE, DeepSeek).
    merged      a transformers checkpoint (safetensors shards + config + tokenizer) with every LoRA delta, the
                experts' included, added to the base weights, in fp32 or bf16; `from_pretrained` loads it with
                no studio or PEFT import.

Every format is written to a temporary directory next to the output and renamed last, with a sha256 manifest
(export_manifest.json), so an output directory that exists is complete.

PEFT's fused expert layout (what `fused_factors` undoes): lora_A [r*E, in] holds expert e's rows at
e*r .. e*r+r-1 (expert-major); lora_B [out, r*E] holds expert e's columns at r_i*E + e (the expert index runs
fastest), i.e. B.view(out, r, E)[:, :, e]. Reading B expert-major instead silently mixes experts' deltas.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.errors import ModelError, StudioError
from studio.paths import replace_directory

FORMATS = ("peft", "per-expert", "merged")
MANIFEST_FILE = "export_manifest.json"
PREFIX = "base_model.model."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ExportResult:
    path: Path
    format: str
    ref: str
    files: list[dict] = field(default_factory=list)   # [{"path", "sha256", "size"}]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading a PEFT adapter


@dataclass
class AdapterFiles:
    """A PEFT adapter directory as plain tensors: LoRA factors by module, expert factors by fused parameter."""
    config: dict
    metadata: dict
    scaling: float
    r: int
    linear: dict[str, tuple[torch.Tensor, torch.Tensor]]            # module path -> (A [r, in], B [out, r])
    experts: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]  # (module path, param) -> fused (A, B)
    replaced: dict[str, torch.Tensor]                                # full weights (modules_to_save: routers)


def lora_scaling(config: dict) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_adapter(adapter_dir: str | os.PathLike) -> AdapterFiles:
    """Parse a studio/PEFT adapter directory. Expert keys follow PEFT's nesting for several `target_parameters` on
    one module: the first listed parameter sits innermost, under one `.base_layer` per parameter listed after it."""
    from safetensors.torch import load_file

    from studio.lora.io import read_adapter_config, read_adapter_metadata

    d = Path(adapter_dir)
    config = read_adapter_config(d)
    try:
        weights = load_file(str(d / "adapter_model.safetensors"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{d} is not a readable PEFT adapter directory: {exc}") from exc
    metadata = read_adapter_metadata(d)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ModelError(f"{d}: per-module ranks or alphas (rank_pattern/alpha_pattern) are not supported by "
                         "export; studio adapters use one rank and one alpha")
    if config.get("use_dora"):
        raise ModelError(f"{d}: DoRA adapters cannot be exported (their magnitude vectors do not merge linearly)")
    weights = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in weights.items()}
    by_module: dict[str, list[str]] = {}
    for target in config.get("target_parameters") or []:
        path, _, param = target.rpartition(".")
        by_module.setdefault(path, []).append(param)
    experts, used = {}, set()
    for path, params in by_module.items():
        for i, param in enumerate(params):
            key = path + ".base_layer" * (len(params) - 1 - i)
            a, b = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
            if a not in weights or b not in weights:
                raise ModelError(f"{d}: adapter_config.json targets {path}.{param} but the weights have no {a}")
            experts[(path, param)] = (weights[a], weights[b])
            used.update((a, b))
    linear, replaced = {}, {}
    for key, value in weights.items():
        if key in used:
            continue
        if key.endswith(".lora_A.weight"):
            path = key[:-len(".lora_A.weight")]
            if f"{path}.lora_B.weight" not in weights:
                raise ModelError(f"{d}: {key} has no matching lora_B weight; the adapter file is incomplete")
            linear[path] = (value, weights[f"{path}.lora_B.weight"])
        elif not key.endswith(".lora_B.weight"):
            replaced[key] = value
    return AdapterFiles(config, metadata, lora_scaling(config), int(config["r"]), linear, experts, replaced)


def fused_factors(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's fused expert factors -> per-expert A [E, r, in] and B [E, out, r] (see the module docstring)."""
    if a.shape[0] % r or b.shape[1] != a.shape[0]:
        raise ModelError(f"fused expert LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit rank {r}")
    e = a.shape[0] // r
    return a.reshape(e, r, a.shape[1]), b.reshape(b.shape[0], r, e).permute(2, 0, 1)


def expert_deltas(a: torch.Tensor, b: torch.Tensor, r: int, scaling: float) -> torch.Tensor:
    """ΔW per expert [E, out, in] (F.linear orientation) of one fused parameter's LoRA."""
    a_e, b_e = fused_factors(a.float(), b.float(), r)
    return scaling * torch.bmm(b_e, a_e)


# --------------------------------------------------------------------------- formats


def _base_dir(files: AdapterFiles, base: str | None, allow_mismatch: bool) -> tuple[Path, list[str]]:
    """The base checkpoint the adapter was trained on (or `base`), checked against the recorded fingerprint."""
    from studio.models.resolve import base_fingerprint, resolve_base

    recorded = files.metadata.get("base") or {}
    ref = base or recorded.get("id") or files.config.get("base_model_name_or_path")
    if not ref:
        raise ModelError("the adapter does not record its base; pass --base (an embedded name, directory or hub id)")
    resolved = resolve_base(ref)
    if resolved.path is None or not resolved.has_weights:
        raise ModelError(f"base {ref!r} has no local weights to export with; download it or pass --base DIR")
    notes = []
    want = recorded.get("fingerprint")
    if want:
        got = base_fingerprint(resolved.path)
        if got != want:
            msg = (f"base {ref!r} ({got[:19]}) is not the base the adapter was trained on ({want[:19]}); pass the "
                   "right --base, or --allow-base-mismatch to export anyway")
            if not allow_mismatch:
                raise ModelError(msg)
            notes.append(msg)
    return Path(resolved.path), notes


def _family(base_dir: Path):
    from studio.moe.arch import ARCHS, arch_for
    from studio.models.resolve import load_config_file

    config = load_config_file(base_dir / "config.json")
    try:
        return arch_for(config)
    except KeyError:
        raise ModelError(f"per-expert export needs a known MoE family ({', '.join(ARCHS)}); "
                         f"{getattr(config, 'model_type', '?')!r} is not one: export --format peft") from None


def per_expert_state(files: AdapterFiles, arch) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT-format state dict with every routed-expert LoRA as per-expert 2D modules (same rank and scaling as the
    linear modules, so nothing needs folding), and the list of target module paths."""
    gate_name, up_name, down_name = arch.checkpoint_expert_names
    state, targets = {}, []
    for path, (a, b) in files.linear.items():
        state[f"{PREFIX}{path}.lora_A.weight"], state[f"{PREFIX}{path}.lora_B.weight"] = a, b
        targets.append(path)
    for (path, param), (a, b) in files.experts.items():
        if not path.endswith("." + arch.experts_module):
            raise ModelError(f"expert LoRA on {path} is not under a layer's {arch.experts_module}")
        parent = path[:-len(arch.experts_module)] + arch.checkpoint_experts
        a_e, b_e = fused_factors(a, b, files.r)
        for e in range(a_e.shape[0]):
            if param == "gate_up_proj":
                half = b_e.shape[1] // 2
                if arch.gate_up_interleaved:
                    parts = {gate_name: b_e[e, 0::2], up_name: b_e[e, 1::2]}
                else:
                    parts = {gate_name: b_e[e, :half], up_name: b_e[e, half:]}
            elif param == "down_proj":
                parts = {down_name: b_e[e]}
            else:
                raise ModelError(f"cannot split fused expert parameter {param!r} into per-expert modules")
            for leaf, b_part in parts.items():
                module = f"{parent}.{e}.{leaf}"
                state[f"{PREFIX}{module}.lora_A.weight"] = a_e[e].contiguous()
                state[f"{PREFIX}{module}.lora_B.weight"] = b_part.contiguous()
                targets.append(module)
    if files.replaced:
        raise ModelError("this adapter retrains the router (modules_to_save), which per-expert LoRA formats cannot "
                         "carry; export --format peft or merged")
    return state, sorted(targets)


def _write_per_expert(files: AdapterFiles, adapter_dir: Path, tmp: Path, base: str | None,
                      allow_mismatch: bool) -> list[str]:
    from safetensors.torch import save_file

    base_dir, notes = _base_dir(files, base, allow_mismatch)
    state, targets = per_expert_state(files, _family(base_dir))
    # gate and up share expert e's lora_A: each key gets its own copy (safetensors refuses shared storage)
    save_file({k: v.float().clone().contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = dict(files.config)
    config.pop("target_parameters", None)
    config["target_modules"] = targets  # full module paths: exact matches, nothing else gets LoRA
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    _copy_metadata(adapter_dir, tmp)
    return notes


def _write_merged(files: AdapterFiles, adapter_dir: Path, tmp: Path, base: str | None, allow_mismatch: bool,
                  dtype: str) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.moe.arch import expert_param_layout

    base_dir, notes = _base_dir(files, base, allow_mismatch)
    quant = ((files.metadata.get("base") or {}).get("quantization") or {}).get("mode")
    if quant in ("4bit", "8bit"):
        notes.append(f"the adapter was trained on a {quant} quantized base; the merged checkpoint adds its deltas to "
                     "the full-precision base weights (a dequantized base), so its outputs differ from the "
                     f"{quant} base + adapter by the quantization error")
    # loaded in the output dtype (half the memory of fp32 for bf16); each delta is added in fp32, then rounded once
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=DTYPES[dtype])
    if getattr(model.config, "quantization_config", None) is not None:
        notes.append("the base checkpoint is quantized: it is dequantized before merging")
        model.dequantize()
    with torch.no_grad():
        for path, (a, b) in files.linear.items():
            weight = model.get_submodule(path).weight
            delta = files.scaling * (b.float() @ a.float())
            if tuple(delta.shape) != tuple(weight.shape):
                raise ModelError(f"LoRA on {path} has shape {tuple(delta.shape)}; the base has {tuple(weight.shape)}")
            weight.copy_((weight.float() + delta).to(weight.dtype))
        for (path, param), (a, b) in files.experts.items():
            module = model.get_submodule(path)
            weight = getattr(module, param)
            delta = expert_deltas(a, b, files.r, files.scaling)           # [E, out, in]
            if expert_param_layout(module, param)[3]:                     # stored [E, in, out] (gpt-oss)
                delta = delta.transpose(1, 2)
            if tuple(delta.shape) != tuple(weight.shape):
                raise ModelError(f"expert LoRA on {path}.{param} has shape {tuple(delta.shape)}; the base has "
                                 f"{tuple(weight.shape)}")
            weight.copy_((weight.float() + delta).to(weight.dtype))
        for key, value in files.replaced.items():  # retrained routers replace the base's
            model.get_parameter(key).copy_(value)
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="2GB")
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(tmp))
    return notes


def _copy_metadata(adapter_dir: Path, tmp: Path) -> None:
    from studio.adapters import METADATA_FILE

    if (adapter_dir / METADATA_FILE).exists():
        shutil.copy2(adapter_dir / METADATA_FILE, tmp / METADATA_FILE)


def model_card(version, fmt: str) -> str:
    """README.md for an exported adapter: what it is, what it was trained on, how well it did, how to load it."""
    meta = version.metadata or {}
    base = meta.get("base") or {}
    dataset = meta.get("dataset") or {}
    plan = meta.get("plan") or {}
    settings = plan.get("settings") or {}
    lines = [f"# {version.ref}", "", f"LoRA adapter exported from MoE LoRA Studio (`studio export {version.ref} "
             f"--format {fmt}`), registry version sha `{version.short_sha}`.", "",
             "## Base", "", f"- id: `{base.get('id', '?')}`", f"- family: {base.get('family', '?')}",
             f"- fingerprint: `{base.get('fingerprint', '?')}`",
             f"- quantization during training: {json.dumps(base.get('quantization') or meta.get('quantization'))}",
             "", "## Dataset", ""]
    if dataset:
        lines += [f"- {k}: {v}" for k, v in dataset.items() if not isinstance(v, (dict, list))]
    else:
        lines.append("- not recorded")
    lines += ["", "## Metrics", ""]
    lines += [f"- {k}: {v}" for k, v in (version.metrics or {}).items()] or ["- none recorded"]
    lines += ["", "## LoRA plan", "", f"- rank {settings.get('r', '?')}, alpha {settings.get('alpha', '?')}"
              f"{', rsLoRA' if settings.get('use_rslora') else ''}"]
    for group in plan.get("groups") or []:
        lines.append(f"- {group.get('group', '?')}: {group.get('count', '?')} modules, "
                     f"{group.get('trainable', '?')} trainable parameters")
    if plan.get("trainable_params") is not None:
        lines.append(f"- total trainable parameters: {plan['trainable_params']}")
    lines += ["", "## Load", ""]
    if fmt == "merged":
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained('PATH')",
                  "tokenizer = AutoTokenizer.from_pretrained('PATH')", "```"]
    elif fmt == "per-expert":
        lines += ["Per-expert 2D LoRA modules, the layout vLLM loads for its 2D MoE models:", "", "```bash",
                  f"vllm serve {base.get('id', 'BASE')} --enable-lora --lora-modules {version.domain}=PATH", "```"]
    else:
        lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f"base = AutoModelForCausalLM.from_pretrained('{base.get('id', 'BASE')}')",
                  "model = PeftModel.from_pretrained(base, 'PATH')", "```", "",
                  "Routed experts carry PEFT's fused `target_parameters` LoRA; for vLLM's 2D MoE models export "
                  "`--format per-expert`."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver


def _sha256(path: Path) -> str:
    from studio.registry.blobs import sha256_file

    return sha256_file(path)[0]


def export_adapter(ref: str, fmt: str, output: str | os.PathLike, registry=None, dtype: str = "fp32",
                   base: str | None = None, allow_base_mismatch: bool = False, force: bool = False) -> ExportResult:
    """Write registry adapter `ref` as `fmt` into `output` (see the module docstring)."""
    from studio.registry import AdapterRegistry
    from studio.registry.catalog import utcnow

    if fmt not in FORMATS:
        raise StudioError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise StudioError(f"unknown dtype {dtype!r}; choose fp32 or bf16")
    registry = registry if registry is not None else AdapterRegistry()
    version = registry.resolve(ref)
    adapter_dir = Path(registry.path(version.ref))
    out = Path(output).expanduser()
    if out.exists() and not force:
        raise StudioError(f"{out} already exists; choose another --output or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-export-", dir=out.parent))
    try:
        notes: list[str] = []
        if fmt == "peft":
            for f in version.files:
                dest = tmp / f["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(adapter_dir / f["path"], dest)
        else:
            files = read_adapter(adapter_dir)
            if fmt == "per-expert":
                notes = _write_per_expert(files, adapter_dir, tmp, base, allow_base_mismatch)
            else:
                notes = _write_merged(files, adapter_dir, tmp, base, allow_base_mismatch, dtype)
        (tmp / "README.md").write_text(model_card(version, fmt))
        listed = sorted(p for p in tmp.rglob("*") if p.is_file())
        entries = [{"path": str(p.relative_to(tmp)), "sha256": _sha256(p), "size": p.stat().st_size} for p in listed]
        manifest = {"format": fmt, "ref": version.ref, "sha": version.sha, "created": utcnow(),
                    "dtype": dtype if fmt == "merged" else None, "warnings": notes, "files": entries}
        # written last: its presence in the renamed directory means every file listed is complete
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return ExportResult(out, fmt, version.ref, entries, notes)


def verify_export(path: str | os.PathLike) -> list[str]:
    """Files whose sha256 differs from the export manifest (empty: intact)."""
    d = Path(path)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    return [f["path"] for f in manifest["files"] if not (d / f["path"]).is_file() or _sha256(d / f["path"]) !=
            f["sha256"]]


# --------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a registered adapter as PEFT files, per-expert LoRA or a merged "
                                             "checkpoint", description="\n\n".join(__doc__.split("\n\n")[:3]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", help="registry reference: law, law@v3, law@prod")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="peft: registry files + model card; per-expert: 2D expert LoRA for vLLM; merged: a "
                        "transformers checkpoint")
    p.add_argument("--output", required=True, help="directory to create (written elsewhere and renamed last)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="merged: weight dtype of the checkpoint (default fp32)")
    p.add_argument("--base", default=None, help="merged / per-expert: the base (default: the one the adapter "
                                                "records)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="export even if --base is not the base the adapter was trained on")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.add_argument("--registry", default=None, help="adapter registry root (default: STUDIO_ADAPTERS_ROOT)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from studio.registry import AdapterRegistry

    with warnings.catch_warnings(record=True):
        result = export_adapter(args.ref, args.format, args.output, AdapterRegistry(args.registry), args.dtype,
                                args.base, args.allow_base_mismatch, args.force)
    for note in result.warnings:
        print(f"warning: {note}")
    print(f"exported {result.ref} as {result.format} to {result.path} ({len(result.files)} files, manifest "
          f"{MANIFEST_FILE})")
    return 0
