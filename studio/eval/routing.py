"""Routing statistics: which experts each MoE layer picks on a domain, how balanced that is, and how an adapter
moves it. `RoutingRecorder` hooks the routed-experts modules during teacher-forced forwards; the rest is numpy.

Every supported family calls its experts module as `experts(hidden [tokens, H], top_k_index [tokens, k],
top_k_weights)` with the batch flattened row-major, so a forward pre-hook sees the chosen experts of every token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from studio.eval.metrics import usage_cv, usage_entropy


@dataclass
class RoutingStats:
    """Expert usage of one model on one dataset. counts[layer][expert] = token-slots routed to that expert."""
    layers: list[str]                  # module paths of the routed-experts containers
    counts: list[list[int]]            # [num_layers][num_experts]
    tokens: int                        # tokens recorded (the same in every layer)
    top_k: int
    drift: list[float] | None = None   # per layer: share of tokens whose top-k set differs from the base's
    drift_tokens: int = 0              # tokens compared for drift

    @property
    def num_experts(self) -> int:
        return len(self.counts[0]) if self.counts else 0

    @property
    def layer_numbers(self) -> list[int]:
        return [layer_number(p) for p in self.layers]

    def slots(self) -> int:
        """Routed token-slots per layer: tokens x top_k (what each row of counts adds up to)."""
        return self.tokens * self.top_k

    def entropy(self) -> list[float]:
        return [usage_entropy(c)[0] for c in self.counts]

    def normalized_entropy(self) -> list[float]:
        return [usage_entropy(c)[1] for c in self.counts]

    def cv(self) -> list[float]:
        return [usage_cv(c) for c in self.counts]

    def mean_drift(self) -> float | None:
        return float(np.mean(self.drift)) if self.drift else None

    def summary(self) -> dict:
        """Layer-averaged numbers for tables: normalized entropy, CV, drift."""
        return {"routing_entropy": float(np.mean(self.normalized_entropy())) if self.counts else None,
                "routing_cv": float(np.mean(self.cv())) if self.counts else None,
                "routing_drift": self.mean_drift()}

    def to_dict(self) -> dict:
        return {"layers": self.layers, "layer_numbers": self.layer_numbers, "counts": self.counts,
                "tokens": self.tokens, "top_k": self.top_k, "entropy": self.entropy(),
                "normalized_entropy": self.normalized_entropy(), "cv": self.cv(), "drift": self.drift,
                "drift_tokens": self.drift_tokens, **self.summary()}

    @classmethod
    def from_dict(cls, d: dict) -> RoutingStats:
        return cls(layers=list(d["layers"]), counts=[list(map(int, c)) for c in d["counts"]], tokens=int(d["tokens"]),
                   top_k=int(d["top_k"]), drift=d.get("drift"), drift_tokens=int(d.get("drift_tokens", 0)))


def layer_number(path: str) -> int:
    """The decoder-layer index in a module path such as `model.layers.3.mlp.experts` (-1 if none)."""
    m = re.search(r"\.(\d+)\.", f".{path}.")
    return int(m.group(1)) if m else -1


def experts_modules(model) -> dict[str, object]:
    """{path: module} of every routed-experts container (studio's quantized StudioExperts or a transformers fused
    experts module), in model order."""
    from studio.moe.arch import is_fused_experts

    return {name: m for name, m in model.named_modules() if name and is_fused_experts(m)}


@dataclass
class _Layer:
    counts: np.ndarray
    gates: np.ndarray = None                   # per expert: summed routing weight of the recorded tokens
    sets: list = field(default_factory=list)   # sorted top-k index arrays of the recorded tokens, batch by batch


class RoutingRecorder:
    """Context manager: while active, every forward of the model's experts modules adds the experts chosen for the
    tokens selected by `select(mask)` (e.g. assistant tokens, never padding) to per-layer counts.

        with RoutingRecorder(model, keep_sets=True) as rec:
            for batch in batches:
                rec.select(batch.routing_mask)       # [B, T] bool, True = record this token
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        stats = rec.stats()

    With `keep_sets`, the sorted top-k set of every recorded token is kept (int16) so `drift_against` can compare
    two models on the same tokens.
    """

    def __init__(self, model, keep_sets: bool = False):
        self.modules = experts_modules(model)
        if not self.modules:
            raise ValueError("the model has no routed-experts modules to record: is it a Mixture-of-Experts?")
        self.keep_sets = keep_sets
        self.top_k: int | None = None
        self.tokens = 0
        self._mask = None
        self._handles = []
        self._layers = {p: _Layer(np.zeros(int(m.num_experts), dtype=np.int64), np.zeros(int(m.num_experts)))
                        for p, m in self.modules.items()}
        self._seen: dict[str, int] = {}

    def __enter__(self):
        for path, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(path), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def select(self, mask) -> None:
        """Tokens of the next forward to record: a [B, T] boolean mask (row-major like the experts' input)."""
        import torch

        self._mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
        self.tokens += int(self._mask.sum())

    def _hook(self, path: str):
        def hook(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            if index is None:
                raise RuntimeError(f"{path}: could not find the top-k expert indices in the experts' forward inputs")
            if self._mask is None:
                raise RuntimeError("RoutingRecorder.select(mask) must be called before each forward")
            if index.shape[0] != self._mask.numel():
                raise RuntimeError(f"{path}: experts saw {index.shape[0]} tokens but the selection mask has "
                                   f"{self._mask.numel()}; record teacher-forced forwards over the whole batch only")
            chosen = index.detach().reshape(index.shape[0], -1)[self._mask.to(index.device)].cpu()
            k = chosen.shape[1]
            if self.top_k is None:
                self.top_k = k
            layer = self._layers[path]
            num_experts = layer.counts.shape[0]
            flat = chosen.reshape(-1).numpy()
            # some families mark unused slots with index == num_experts (see StudioExperts.forward): not routed
            flat = flat[(flat >= 0) & (flat < num_experts)]
            layer.counts += np.bincount(flat, minlength=num_experts)[:num_experts]
            weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
            if weights is not None and weights.numel() == index.numel():  # the routing weight of each chosen slot
                w = weights.detach().reshape(index.shape[0], -1)[self._mask.to(index.device)].cpu().double()
                idx = chosen.reshape(-1).numpy()
                keep = (idx >= 0) & (idx < num_experts)
                layer.gates += np.bincount(idx[keep], weights=w.reshape(-1).numpy()[keep],
                                           minlength=num_experts)[:num_experts]
            self._seen[path] = self._seen.get(path, 0) + chosen.shape[0]
            if self.keep_sets:
                layer.sets.append(np.sort(chosen.numpy(), axis=1).astype(np.int16))
        return hook

    def stats(self) -> RoutingStats:
        for path, seen in self._seen.items():
            if seen != self.tokens:
                raise RuntimeError(f"{path} recorded {seen} tokens, expected {self.tokens}: a forward ran without "
                                   "select() or with a different mask")
        return RoutingStats(layers=list(self._layers), counts=[ly.counts.tolist() for ly in self._layers.values()],
                            tokens=self.tokens, top_k=self.top_k or 0)

    def gate_sums(self) -> list[list[float]]:
        """[layer][expert]: the routing weights the recorded tokens gave each expert, summed (0 where not chosen)."""
        return [ly.gates.tolist() for ly in self._layers.values()]

    def sets(self) -> dict[str, np.ndarray]:
        """{layer path: [tokens, k] sorted top-k sets} (needs keep_sets=True)."""
        if not self.keep_sets:
            raise RuntimeError("RoutingRecorder(keep_sets=True) is needed to compare routing between models")
        return {p: (np.concatenate(ly.sets) if ly.sets else np.zeros((0, self.top_k or 0), np.int16))
                for p, ly in self._layers.items()}


def routing_drift(sets: dict[str, np.ndarray], base_sets: dict[str, np.ndarray]) -> list[float]:
    """Per layer, the share of tokens whose top-k expert set differs from the base's on the same tokens."""
    if list(sets) != list(base_sets):
        raise ValueError("routing of the two models was recorded on different layers")
    out = []
    for path, s in sets.items():
        b = base_sets[path]
        if s.shape != b.shape:
            raise ValueError(f"{path}: {s.shape[0]} tokens recorded against {b.shape[0]} for the base; drift needs "
                             "the same tokens in the same order")
        out.append(float((s != b).any(axis=1).mean()) if len(s) else 0.0)
    return out


def js_distance(p_counts, q_counts) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two expert-usage count vectors of one layer.

    0 when the two domains use the experts in the same proportions, 1 when they use disjoint experts. Empty counts
    give NaN (nothing to compare).
    """
    p, q = np.asarray(p_counts, dtype=np.float64), np.asarray(q_counts, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return float(np.sqrt(max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))))


def domain_divergence(per_domain: dict[str, RoutingStats]) -> list[dict]:
    """For every pair of domains one model was recorded on: the per-layer Jensen-Shannon distance of their expert
    usage and its layer mean. Routing that specialises by domain gives clearly larger distances than a random
    router, whose usage differs between domains only by sampling noise and token statistics."""
    names = list(per_domain)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = per_domain[a], per_domain[b]
            if sa.layers != sb.layers:
                continue
            per_layer = [js_distance(x, y) for x, y in zip(sa.counts, sb.counts)]
            finite = [v for v in per_layer if np.isfinite(v)]
            rows.append({"domains": (a, b), "layers": sa.layer_numbers, "js_distance": per_layer,
                         "mean_js_distance": float(np.mean(finite)) if finite else None})
    return rows
