"""Known-harmless library noise, filtered once when `studio` is imported (before bitsandbytes is).

Each filter names exactly one message and says why it is safe to hide; everything else still shows.
"""

from __future__ import annotations

import logging


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes 0.50 tries an optional hub kernel (`kernels-community/quantization-bitsandbytes`) for 4-bit matmuls
# on AVX512-BF16 CPUs and logs a warning when the `kernels` package is absent; it then uses its built-in CPU path,
# which is what the studio tests and benchmarks. The hub is unreachable offline anyway.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
