"""Moved to studio.lora.plan (the LoRA planner); this name stays importable for one release.

The module object is the same (`studio.moe.plan is studio.lora.plan`), so patches and imports see one module."""

import sys

from studio.lora import plan as _plan

sys.modules[__name__] = _plan
