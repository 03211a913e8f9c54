"""MoE LoRA Studio: adapt Mixture-of-Experts language models to a domain with LoRA.

Entry points: `studio` (CLI), `python -m studio.finetune`, `python app.py`.
"""

__version__ = "0.1.0"
