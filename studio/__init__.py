"""MoE LoRA Studio: adapt Mixture-of-Experts language models to a domain with LoRA.

    import studio
    studio.plan(base="tiny-moe", quant="4bit", r=16)                 # LoRA plan + memory estimate, no weights
    result = studio.finetune(dataset="law", max_steps=20)            # -> TrainResult, registered as law@vN
    studio.Registry().promote(result.registry_ref, "prod")
    with studio.Engine("tiny-moe") as engine:                        # one base, adapters hot-swapped per row
        engine.generate(["Define tort.", "What is asthma?"], adapters=["law@prod", "medicine"])
        report = studio.evaluate(engine, models=["base", "law@prod"], dataset="law")   # -> EvalReport

Entry points: `studio` (CLI), `python -m studio.finetune`, `python app.py`. Every name below is imported on
first use (PEP 562), so `import studio` stays fast and does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from studio import _quiet  # noqa: E402,F401  (filters known-harmless library warnings; see the module)

# public name -> (module, attribute in it; None = the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "finetune": ("studio.api", "finetune"),
    "plan": ("studio.api", "plan"),
    "TrainEvent": ("studio.api", "TrainEvent"),
    "TrainingPlan": ("studio.api", "TrainingPlan"),
    "LossCurve": ("studio.api", "LossCurve"),
    "TrainConfig": ("studio.train", "TrainConfig"),
    "TrainResult": ("studio.train", "TrainResult"),
    "datasets": ("studio.datasets", None),
    "Registry": ("studio.registry.registry", "AdapterRegistry"),
    "Engine": ("studio.engine", "Engine"),
    "SamplingParams": ("studio.engine", "SamplingParams"),
    "evaluate": ("studio.eval.runner", "evaluate"),
    "EvalReport": ("studio.eval.report", "EvalReport"),
    "StudioError": ("studio.errors", "StudioError"),
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # static checkers and IDEs see the real objects
    from studio import datasets
    from studio.api import LossCurve, TrainEvent, TrainingPlan, finetune, plan
    from studio.engine import Engine, SamplingParams
    from studio.errors import StudioError
    from studio.eval.report import EvalReport
    from studio.eval.runner import evaluate
    from studio.registry.registry import AdapterRegistry as Registry
    from studio.train import TrainConfig, TrainResult


# `studio.finetune` is the API function, while `python -m studio.finetune` is the CLI module of the same name.
_FUNCTIONS_OVER_MODULES = {"finetune"}


class _StudioModule(types.ModuleType):
    """The package's module type: importing the submodule studio.finetune must not rebind `studio.finetune`.

    The import system sets every loaded submodule as an attribute of its package, which would replace the
    function with the module; `from studio.finetune import ...`, `importlib.import_module` and `python -m` still
    work, as they read sys.modules (only `import studio.finetune as m` gives the function)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _FUNCTIONS_OVER_MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _StudioModule


def __getattr__(name: str):
    """Import a public name's module on first access and cache the object here."""
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'studio' has no attribute {name!r}; the Python API is "
                             f"{', '.join(__all__)} (see help(studio))") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
