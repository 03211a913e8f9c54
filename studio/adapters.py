"""Moved to studio.lora.io (save and load of PEFT-format adapters); this name stays importable for one release.

The module object is the same (`studio.adapters is studio.lora.io`), so patches and imports see one module."""

import sys

from studio.lora import io as _io

sys.modules[__name__] = _io
