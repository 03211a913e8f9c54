"""Attach, save and load LoRA adapters on a studio-loaded base.

Linear targets (attention, shared experts, dense MLP) are wrapped in the studio's SlotLinear (studio/lora/layers.py,
the layer serving uses too; here one named slot per adapter, PEFT's layout and init); routed experts get an
ExpertAdapter (studio/lora/experts.py) on their StudioExperts. Saved adapters are plain
PEFT artifacts: `adapter_config.json` (`target_modules` + `target_parameters`) and `adapter_model.safetensors`,
loadable by `peft.PeftModel.from_pretrained` on the unquantized base, plus `studio_adapter.json` metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from studio.errors import ModelError, read_json_object
from studio.lora.layers import SlotLinear
from studio.lora.plan import LoraPlan, LoraSettings
from studio.moe.experts import StudioExperts
from studio.paths import METADATA_FILE

PREFIX = "base_model.model."


def _lora_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, SlotLinear):
            yield name, module


def _peft_config(plan: LoraPlan, base_id: str | None, inference: bool):
    from peft import LoraConfig

    s = plan.settings
    target_parameters = [f"{p}.{n}" for p, names in plan.expert_targets.items() for n in names]
    # PEFT's ParamWrapper refuses dropout; dropout only acts in training, so the saved config says 0 when experts
    # are targeted and studio_adapter.json keeps the value used.
    dropout = 0.0 if (target_parameters or inference) else s.dropout
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=dropout, use_rslora=s.use_rslora,
                      target_modules=list(plan.linear_targets), target_parameters=target_parameters or None,
                      modules_to_save=list(plan.router_targets) or None, task_type="CAUSAL_LM",
                      base_model_name_or_path=base_id, inference_mode=inference)


def apply_plan(model: nn.Module, plan: LoraPlan, adapter: str = "default", trainable: bool = True) -> None:
    """Add adapter `adapter` to the model as planned (LoRA B starts at zero: the model is unchanged)."""
    s = plan.settings
    targets = set(plan.linear_targets)
    missing = sorted(targets - {n for n, _ in model.named_modules()})
    if missing:
        raise ModelError(f"LoRA targets {missing[:3]} are not modules of this model: was the plan built for "
                         f"another base?")
    # in module order, as PEFT injected its layers: the factors' random draws come in the same order
    for path in [n for n, _ in model.named_modules() if n in targets]:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if not isinstance(layer, SlotLinear):
            if not hasattr(layer, "in_features"):
                raise ModelError(f"LoRA target {path} is not a linear layer ({type(layer).__name__})")
            layer = SlotLinear(layer)
            setattr(parent, child, layer)
        layer.add_adapter(adapter, s.r, s.alpha, s.dropout, s.use_rslora)
    for path, params in plan.expert_targets.items():
        experts = model.get_submodule(path)
        if not isinstance(experts, StudioExperts):
            raise ModelError(f"{path} is not a studio experts module; load the base with studio.models.load_base")
        experts.add_adapter(adapter, s.r, s.alpha, s.dropout, tuple(params), s.use_rslora,
                            experts=plan.expert_ids.get(path))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, adapter).values():
        p.requires_grad_(trainable)
    if plan.router_targets and trainable:
        for path in plan.router_targets:
            model.get_submodule(path).weight.requires_grad_(True)
    set_active_adapter(model, adapter)


def adapter_parameters(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """PEFT-format key -> live parameter, for one adapter. An expert-selective adapter's expert parameters hold
    only the selected experts' slots (`adapter_state` gives PEFT's full layout)."""
    out: dict[str, nn.Parameter] = {}
    for name, module in _lora_layers(model):
        if adapter in module.lora_A:
            out[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A[adapter].weight
            out[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B[adapter].weight
    for key, (lora, param, kind) in _expert_entries(model, adapter).items():
        out[key] = (lora.lora_A if kind == "A" else lora.lora_B)[param]
    return out


def _expert_entries(model: nn.Module, adapter: str) -> dict[str, tuple]:
    """PEFT-format key -> (ExpertAdapter, fused parameter name, "A" | "B") for one adapter's routed-expert
    factors."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, StudioExperts) and adapter in module.adapters:
            lora = module.adapters[adapter]
            targeted = [n for n in module.weight_names if n in lora.lora_A]
            # PEFT nests one ParamWrapper per targeted parameter, the first registered innermost.
            for i, param in enumerate(targeted):
                key = f"{PREFIX}{name}" + ".base_layer" * (len(targeted) - 1 - i)
                out[f"{key}.lora_A.weight"] = (lora, param, "A")
                out[f"{key}.lora_B.weight"] = (lora, param, "B")
    return out


def copy_adapter_weights(model: nn.Module, adapter: str, live: dict[str, torch.Tensor],
                         weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-layout `weights` into the live parameters `live` (shapes checked; expert-selective factors
    compacted, refusing non-zero factors for unselected experts)."""
    entries = _expert_entries(model, adapter)
    with torch.no_grad():
        for key, param in live.items():
            w = weights[key]
            if key in entries:
                lora, _, kind = entries[key]
                full_shape = lora.full_shape(kind, param)
                if tuple(w.shape) != full_shape:
                    raise ModelError(f"adapter tensor {key} has shape {tuple(w.shape)}, this base expects "
                                     f"{full_shape}: trained on another base?")
                try:
                    w = lora.compact(kind, w, key)
                except ValueError as exc:
                    raise ModelError(f"{source}: {exc}") from None
            elif tuple(w.shape) != tuple(param.shape):
                raise ModelError(f"adapter tensor {key} has shape {tuple(w.shape)}, this base expects "
                                 f"{tuple(param.shape)}: trained on another base?")
            w = w.to(param.dtype)
            if hasattr(param, "device_mesh"):  # an FSDP2 shard: every rank read the same file, no communication
                from torch.distributed.tensor import distribute_tensor

                w = distribute_tensor(w.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(w)


def router_parameters(model: nn.Module, plan: LoraPlan) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}{p}.weight": model.get_submodule(p).weight for p in plan.router_targets}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: FSDP2 holds DTensor shards, gathered here (a collective: every rank calls it,
    in the same order, which the name-ordered dicts above give)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state(model: nn.Module, plan: LoraPlan, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-format key -> the adapter's full tensors on the CPU (LoRA factors in float32, trained router weights
    as stored). Expert-selective factors are expanded to all experts, zeros for the unselected ones, so plain PEFT
    loads the file. Under FSDP2 every rank must call this (the shards are all-gathered)."""
    entries = _expert_entries(model, adapter)
    state = {}
    for key, p in adapter_parameters(model, adapter).items():
        t = _full(p.detach())
        if key in entries:
            lora, _, kind = entries[key]
            t = lora.expand(kind, t)
        state[key] = t.to("cpu", torch.float32).contiguous()
    state.update({k: _full(v.detach()).to("cpu").contiguous() for k, v in router_parameters(model, plan).items()})
    return state


def set_active_adapter(model: nn.Module, adapter: str | None) -> None:
    """Route every LoRA layer to `adapter` (None: the bare base)."""
    for _, module in _lora_layers(model):
        module.set_adapter(adapter)
    for module in model.modules():
        if isinstance(module, StudioExperts):
            module.active_adapters = [adapter] if adapter in module.adapters else []


def delete_adapter(model: nn.Module, adapter: str) -> None:
    for _, module in _lora_layers(model):
        module.delete_adapter(adapter)
    for module in model.modules():
        if isinstance(module, StudioExperts):
            module.delete_adapter(adapter)


def save_adapter(model: nn.Module, plan: LoraPlan, out_dir: str | os.PathLike, adapter: str = "default",
                 base_id: str | None = None, metadata: dict | None = None, into_existing: bool = False,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter in PEFT's format (+ studio metadata) atomically: files go to a temp dir renamed last.
    `state`: the tensors as `adapter_state` returned them (under FSDP every rank gathers, one rank writes).

    `into_existing=True` (trainer checkpoints) moves each file into `out_dir` instead of replacing the folder,
    so files other processes wrote there (optimizer, RNG states of every rank) survive."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    state = adapter_state(model, plan, adapter) if state is None else state
    if not state:
        raise ModelError(f"adapter {adapter!r} has no weights on this model")
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    _peft_config(plan, base_id, inference=True).save_pretrained(str(tmp))
    _sort_config_lists(tmp / "adapter_config.json")
    meta = dict(metadata or {})
    meta.setdefault("plan", plan.to_dict())
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    if into_existing:
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
    else:
        from studio.paths import replace_directory

        replace_directory(tmp, out)
    return out


def _sort_config_lists(path: Path) -> None:
    """PEFT keeps target_modules as a set and saves it in hash order, which changes from run to run: the same plan
    would give different config bytes (a spurious `registry diff` change). Save those name lists sorted.
    `target_parameters` keeps its order: it is already deterministic (the plan's), and PEFT nests one ParamWrapper per
    listed parameter of a module in that order, which names the saved keys (`experts.base_layer.lora_A` is the first
    listed); sorting it would make PEFT and `studio export` read gate_up_proj's factors as down_proj's."""
    cfg = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """A saved adapter's adapter_config.json (PEFT's), or a ModelError saying what is wrong with it."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        raise ModelError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    return read_json_object(path, ModelError,
                            "save the adapter again, or restore the file from the registry or a remote store")


def read_adapter_metadata(adapter_dir: str | os.PathLike) -> dict:
    """A saved adapter's or checkpoint's studio metadata (METADATA_FILE): plan, base, dataset, metrics; {} for a
    plain PEFT adapter without one. A corrupt file is a ModelError naming it, not a raw JSONDecodeError."""
    path = Path(adapter_dir) / METADATA_FILE
    if not path.exists():
        return {}
    return read_json_object(path, ModelError, "restore it, or delete it to use the adapter as plain PEFT files "
                                              "without the studio's lineage and plan")


def plan_from_config(model: nn.Module, adapter_dir: str | os.PathLike) -> LoraPlan:
    """Rebuild the LoRA plan of a saved adapter from its adapter_config.json."""
    cfg = read_adapter_config(adapter_dir)
    meta = read_adapter_metadata(adapter_dir)
    settings = LoraSettings(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                            dropout=float(meta.get("plan", {}).get("settings", {}).get("dropout", 0.0)),
                            use_rslora=bool(cfg.get("use_rslora", False)))
    module_names = {n for n, _ in model.named_modules()}
    linear = []
    tm = cfg.get("target_modules") or []
    tm = [tm] if isinstance(tm, str) else tm
    for t in tm:
        matches = [n for n in module_names if n == t or n.endswith("." + t)]
        if not matches:
            raise ModelError(f"adapter targets module {t!r}, which this base does not have: wrong base?")
        linear.extend(m for m in matches if not isinstance(model.get_submodule(m), StudioExperts))
    experts: dict[str, list[str]] = {}
    for t in cfg.get("target_parameters") or []:
        path, _, param = t.rpartition(".")
        matches = [n for n in module_names if (n == path or n.endswith("." + path))
                   and isinstance(model.get_submodule(n), StudioExperts)]
        if not matches:
            raise ModelError(f"adapter targets expert parameter {t!r}, which this base does not have: wrong base?")
        for m in matches:
            experts.setdefault(m, []).append(param)
    for m, params in experts.items():
        order = model.get_submodule(m).weight_names
        experts[m] = [p for p in order if p in params]
    # an expert-selective adapter (studio/experts/) records its per-layer expert ids in the plan
    recorded_ids = meta.get("plan", {}).get("expert_ids") or {}
    expert_ids = {m: [int(i) for i in recorded_ids[m]] for m in experts if m in recorded_ids}
    return LoraPlan(targets=["from-adapter"], settings=settings, linear_targets=sorted(set(linear)),
                    expert_targets=dict(sorted(experts.items())), expert_ids=expert_ids,
                    expert_selection=meta.get("plan", {}).get("expert_selection"),
                    router_targets=list(cfg.get("modules_to_save") or []))


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, adapter: str, trainable: bool = False) -> LoraPlan:
    """Attach a saved adapter under the name `adapter`; every tensor must match (no missing/unexpected keys)."""
    plan = plan_from_config(model, adapter_dir)
    if plan.router_targets and not trainable:
        raise ModelError("this adapter retrains the router; serving it beside other adapters is not supported yet")
    apply_plan(model, plan, adapter, trainable=trainable)
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    live = adapter_parameters(model, adapter)
    live.update(router_parameters(model, plan))
    missing = sorted(set(live) - set(weights))
    unexpected = sorted(set(weights) - set(live))
    if missing or unexpected:
        delete_adapter(model, adapter)
        raise ModelError(f"adapter {adapter_dir} does not fit this base: missing {missing[:3]} unexpected "
                         f"{unexpected[:3]} (was it trained on another base?)")
    try:
        copy_adapter_weights(model, adapter, live, weights, str(adapter_dir))
    except ModelError:
        delete_adapter(model, adapter)
        raise
    if not trainable:  # new LoRA modules start in training mode, where their dropout would act
        model.eval()
    return plan


def save_random_adapter(loaded, out_dir: str | os.PathLike, domain: str, seed: int,
                        targets: str = "attention,experts", scale: float = 0.2, r: int = 4) -> Path:
    """An adapter with random non-zero LoRA factors, saved like a trained one (PEFT files + studio metadata).

    For benchmarks and tests of serving: it changes the base's outputs the way a trained adapter does, without
    a training run. `loaded` is a studio LoadedBase; the adapter is attached, saved and detached again."""
    from studio.lora.plan import build_plan

    name = f"random_{domain}_{seed}"
    plan = build_plan(loaded.model, loaded.arch, loaded.components, targets, LoraSettings(r=r, alpha=2 * r))
    apply_plan(loaded.model, plan, name, trainable=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(loaded.model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    meta = {"domain": domain, "base": loaded.describe(), "metrics": {},
            "hyperparameters": {"seed": seed, "random_init_scale": scale}, "plan": plan.to_dict()}
    try:
        return save_adapter(loaded.model, plan, out_dir, name, base_id=loaded.ref, metadata=meta)
    finally:
        delete_adapter(loaded.model, name)
        set_active_adapter(loaded.model, None)
