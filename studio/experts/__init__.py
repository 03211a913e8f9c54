"""Expert-specialised fine-tuning (ESFT, MoE-Sieve): profile which routed experts a domain uses, select some per
layer, and train LoRA only on those. `studio experts profile --base B --dataset law` runs the profiling.
"""

from studio.experts.selection import ExpertSelection, parse_selection, select_experts

__all__ = ["ExpertSelection", "parse_selection", "select_experts"]
