"""Side-by-side evaluation of a base and its adapters: held-out loss, reference metrics, generations, routing.

Python: `evaluate(engine_or_base, models=[...], dataset="law") -> EvalReport`; CLI: `python -m studio.eval --help`.
"""

from studio.eval.cli import register
from studio.eval.plots import plot_cross_domain, plot_expert_usage, plot_heldout_loss, plot_routing_drift
from studio.eval.report import EvalReport, GenerationResult, LossCell, ModelInfo
from studio.eval.routing import RoutingRecorder, RoutingStats, routing_drift
from studio.eval.runner import evaluate, record_results, registry_metrics

__all__ = ["EvalReport", "GenerationResult", "LossCell", "ModelInfo", "RoutingRecorder", "RoutingStats", "evaluate",
           "plot_cross_domain", "plot_expert_usage", "plot_heldout_loss", "plot_routing_drift", "record_results",
           "register", "registry_metrics", "routing_drift"]
