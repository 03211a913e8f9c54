"""Real LoRA adapters for serving tests, made without training: PEFT-format files with random (non-zero) LoRA
factors on attention and routed experts of the embedded base, registered in an isolated adapter registry."""

from __future__ import annotations

from pathlib import Path

import torch


def make_real_adapter(loaded, out_dir: Path, domain: str, seed: int, targets: str = "attention,experts",
                      scale: float = 0.2, r: int = 4) -> Path:
    """Attach a random adapter to `loaded.model`, save it (PEFT files + studio metadata), detach it again."""
    from studio.adapters import adapter_parameters, apply_plan, delete_adapter, save_adapter, set_active_adapter
    from studio.moe.plan import LoraSettings, build_plan

    name = f"make_{domain}_{seed}"
    plan = build_plan(loaded.model, loaded.arch, loaded.components, targets, LoraSettings(r=r, alpha=2 * r))
    apply_plan(loaded.model, plan, name, trainable=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(loaded.model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    meta = {"domain": domain, "base": loaded.describe(), "metrics": {}, "hyperparameters": {"seed": seed}}
    path = save_adapter(loaded.model, plan, out_dir, name, base_id=loaded.ref, metadata=meta)
    delete_adapter(loaded.model, name)
    set_active_adapter(loaded.model, None)
    return path


def build_registry(root: Path, work: Path, specs) -> "object":
    """Register adapters made by make_real_adapter: specs = [(domain, seed, targets), ...]."""
    from studio.models.loading import QuantSpec, load_base
    from studio.registry import AdapterRegistry

    maker = load_base("tiny-moe", QuantSpec("4bit"))
    registry = AdapterRegistry(root)
    for domain, seed, targets in specs:
        registry.register(make_real_adapter(maker, work / f"{domain}-{seed}", domain, seed, targets), domain)
    return registry
