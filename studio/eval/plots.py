"""Plots of an EvalReport as matplotlib Figures (Agg canvas, no pyplot state): held-out loss bars, the
cross-domain matrix, expert-usage heatmaps and routing drift. The CLI saves them as PNG; the web UI shows them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path) -> Path:
    fig.savefig(path, format="png")
    return Path(path)


def plot_heldout_loss(report):
    """Grouped bars: held-out loss of every model (bars) on every held-out set (groups), base bar hatched."""
    domains, models = list(report.domains), report.model_names
    if not domains or not models:
        return None
    fig = _figure(max(5.0, 1.2 + 0.9 * len(domains) * max(1, len(models)) * 0.45), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    x = np.arange(len(domains))
    for i, m in enumerate(models):
        values = [getattr(report.loss(m, d), "loss", np.nan) for d in domains]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=m,
                      hatch="//" if m == "base" else None, edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(x, [report.domains[d].get("ref", d) for d in domains])
    ax.set_ylabel("held-out loss (nats / assistant token)")
    ax.set_title(f"Held-out loss on {report.base} (lower is better)")
    finite = [c.loss for per in report.losses.values() for c in per.values() if np.isfinite(c.loss)]
    if finite:  # zoom on the differences: losses of related models sit close together
        lo, hi = min(finite), max(finite)
        pad = max(0.15 * (hi - lo), 0.02 * hi, 1e-3)
        ax.set_ylim(max(0.0, lo - 3 * pad), hi + 2 * pad)
    ax.legend(fontsize=8, ncols=min(4, len(models)))
    return fig


def plot_cross_domain(report):
    """Heatmap of loss change against the base: rows = adapters, columns = held-out sets (blue = better)."""
    adapters = [m.name for m in report.adapters]
    domains = list(report.domains)
    if not adapters or not domains:
        return None
    data = np.full((len(adapters), len(domains)), np.nan)
    for i, m in enumerate(adapters):
        for j, d in enumerate(domains):
            cell, base = report.loss(m, d), report.loss("base", d)
            if cell and base:
                data[i, j] = cell.loss - base.loss
    fig = _figure(1.8 + 1.3 * len(domains), 1.4 + 0.5 * len(adapters))
    ax = fig.add_subplot()
    lim = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    im = ax.imshow(data, cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1, aspect="auto")
    for i in range(len(adapters)):
        for j in range(len(domains)):
            if np.isfinite(data[i, j]):
                dark = abs(data[i, j]) > 0.6 * lim
                ax.text(j, i, f"{data[i, j]:+.3f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    ax.set_xticks(range(len(domains)), [report.domains[d].get("ref", d) for d in domains])
    ax.set_yticks(range(len(adapters)), adapters)
    ax.set_title("Held-out loss vs base (negative = better)")
    fig.colorbar(im, ax=ax, label="Δ loss")
    return fig


def plot_expert_usage(report, domain: str | None = None):
    """One heatmap per model: MoE layers (rows) x experts (columns), share of the layer's routed token-slots.
    An expert-selective adapter's trained experts are outlined in red on its heatmap."""
    domain = domain or report.dataset
    stats = [(m, report.routing[m][domain]) for m in report.model_names
             if domain in report.routing.get(m, {})]
    if not stats:
        return None
    n = len(stats)
    num_layers, num_experts = len(stats[0][1].counts), stats[0][1].num_experts
    fig = _figure(min(1.0 + (2.2 + 0.12 * min(num_experts, 64)) * n, 24.0), 1.4 + 0.3 * num_layers)
    axes = fig.subplots(1, n, squeeze=False)[0]
    shares = []
    for _, s in stats:
        c = np.asarray(s.counts, dtype=float)
        shares.append(c / np.maximum(c.sum(axis=1, keepdims=True), 1))
    vmax = max(float(a.max()) for a in shares) or 1.0
    im = None
    selected = {m.name: m.selected_experts for m in report.models if getattr(m, "selected_experts", None)}
    for ax, (model, s), share in zip(axes, stats, shares):
        im = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(model + (" (trained experts outlined)" if model in selected else ""), fontsize=9)
        if model in selected:
            _outline(ax, s.layers, selected[model])
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(s.layer_numbers)), [str(n) for n in s.layer_numbers])
        if num_experts <= 32:
            ax.set_xticks(range(num_experts))
            ax.tick_params(axis="x", labelsize=7)
    axes[0].set_ylabel("MoE layer")
    fig.suptitle(f"Expert usage on {report.domains.get(domain, {}).get('ref', domain)} "
                 f"(share of routed token-slots per layer)", fontsize=10)
    fig.colorbar(im, ax=list(axes), label="share", fraction=0.03, pad=0.01)
    return fig


def _outline(ax, layers: list[str], selected: dict[str, list[int]]) -> None:
    """Red boxes on the cells (layer row, expert column) of the selected experts."""
    from matplotlib.patches import Rectangle

    for row, path in enumerate(layers):
        for e in selected.get(path, ()):
            ax.add_patch(Rectangle((e - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))


def plot_routing_drift(report, domain: str | None = None):
    """Per adapter, per MoE layer: share of tokens whose top-k experts differ from the base's."""
    domain = domain or report.dataset
    series = [(m.name, report.routing[m.name][domain]) for m in report.adapters
              if domain in report.routing.get(m.name, {}) and report.routing[m.name][domain].drift is not None]
    if not series:
        return None
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot()
    for name, s in series:
        ax.plot(s.layer_numbers, [100 * d for d in s.drift], marker="o", label=name)
    layers = sorted({n for _, s in series for n in s.layer_numbers})
    if len(layers) <= 40:
        ax.set_xticks(layers)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("tokens with changed top-k (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Routing drift against the base on {report.domains.get(domain, {}).get('ref', domain)}")
    ax.legend(fontsize=8)
    return fig
