"""Real LoRA adapters for serving tests, made without training: PEFT-format files with random (non-zero) LoRA
factors on attention and routed experts of the embedded base, registered in an isolated adapter registry."""

from __future__ import annotations

from pathlib import Path

from studio.serving.health import wait_until_serving  # noqa: F401  (the tests import it from here)


def make_real_adapter(loaded, out_dir: Path, domain: str, seed: int, targets: str = "attention,experts",
                      scale: float = 0.2, r: int = 4) -> Path:
    from studio.adapters import save_random_adapter

    return save_random_adapter(loaded, out_dir, domain, seed, targets, scale, r)


def build_registry(root: Path, work: Path, specs) -> "object":
    """Register adapters made by make_real_adapter: specs = [(domain, seed, targets), ...]."""
    from studio.models.loading import QuantSpec, load_base
    from studio.registry import AdapterRegistry

    maker = load_base("tiny-moe", QuantSpec("4bit"))
    registry = AdapterRegistry(root)
    for domain, seed, targets in specs:
        registry.register(make_real_adapter(maker, work / f"{domain}-{seed}", domain, seed, targets), domain)
    return registry
