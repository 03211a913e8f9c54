"""Real LoRA adapters for serving tests, made without training: PEFT-format files with random (non-zero) LoRA
factors on attention and routed experts of the embedded base, registered in an isolated adapter registry."""

from __future__ import annotations

from pathlib import Path


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


def wait_until_serving(proc, url: str, timeout: float = 120, interval: float = 0.3) -> None:
    """Poll `url`/health until the `studio serve` subprocess `proc` answers 200; fail with its output if it exits
    first or is not up within `timeout` seconds."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "studio serve did not come up"
        time.sleep(interval)
