"""MoE LoRA Studio: adapt Mixture-of-Experts language models to a domain with LoRA.

Entry points: `studio` (CLI), `python -m studio.finetune`, `python app.py`.
"""

__version__ = "0.1.0"

from studio import _quiet  # noqa: E402,F401  (filters known-harmless library warnings; see the module)
