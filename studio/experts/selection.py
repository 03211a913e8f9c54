"""Which routed experts of each MoE layer get LoRA: `all`, ESFT's `token:P` / `gate:P`, `top:K`, and `random:<spec>`.

Pure functions over per-layer expert scores (a routing profile's token shares or mean gate scores); the trainer
calls `select_experts(profile, parse_selection("token:0.2"))` and the planner allocates factors for the result.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from studio.errors import PlanError

MODES = ("all", "token", "gate", "top", "random")
# Cumulative shares are sums of floats: a share that reaches P up to rounding counts as reaching it, so
# `token:0.5` over [0.25, 0.25, 0.25, 0.25] picks two experts, not three.
TOLERANCE = 1e-9
HELP = ("all | token:P (ESFT-Token: the smallest set of experts whose token share reaches P) | gate:P (ESFT-Gate: "
        "the same over the mean gate score) | top:K (the K most-routed experts) | random:<spec> (random experts, "
        "as many per layer as <spec> selects; a control)")


@dataclass(frozen=True)
class ExpertSelection:
    """A parsed `--expert-selection` value. `inner` is set for random:<spec> (the selection whose sizes it copies)."""
    mode: str
    value: float | None = None
    inner: ExpertSelection | None = None

    @property
    def spec(self) -> str:
        if self.mode == "all":
            return "all"
        if self.mode == "random":
            return f"random:{self.inner.spec}"
        if self.mode == "top":
            return f"top:{int(self.value)}"
        return f"{self.mode}:{self.value:g}"

    @property
    def is_all(self) -> bool:
        return self.mode == "all"


def parse_selection(spec: str | ExpertSelection | None) -> ExpertSelection:
    """`all`, `token:0.2`, `gate:0.1`, `top:4`, `random:token:0.2` -> ExpertSelection; anything else is a PlanError
    that lists the accepted forms."""
    if isinstance(spec, ExpertSelection):
        return spec
    text = (spec or "all").strip().lower()
    if text == "all":
        return ExpertSelection("all")
    mode, sep, rest = text.partition(":")
    if not sep or mode not in MODES or mode == "all":
        raise PlanError(f"--expert-selection {spec!r} is not understood; use {HELP}")
    if mode == "random":
        inner = parse_selection(rest)
        if inner.mode in ("all", "random"):
            raise PlanError(f"--expert-selection {spec!r}: random:<spec> needs a sized selection such as "
                            "random:token:0.2 or random:top:4")
        return ExpertSelection("random", inner=inner)
    if mode == "top":
        try:
            k = int(rest)
        except ValueError:
            k = 0
        if k < 1 or str(k) != rest.strip():
            raise PlanError(f"--expert-selection {spec!r}: top:K needs a whole number of experts K >= 1, e.g. top:4")
        return ExpertSelection("top", float(k))
    try:
        p = float(rest)
    except ValueError:
        p = math.nan
    if not 0 < p <= 1:
        raise PlanError(f"--expert-selection {spec!r}: {mode}:P needs a share P in (0, 1], e.g. {mode}:0.2")
    return ExpertSelection(mode, p)


def ranked(scores: list[float]) -> list[int]:
    """Expert ids by score, highest first; ties go to the lower expert id (so selections are deterministic)."""
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))


def cumulative_set(scores: list[float], p: float) -> list[int]:
    """The smallest set of experts whose share of the layer's total score reaches p (ties: lower ids first)."""
    total = float(sum(scores))
    if not total > 0:
        raise PlanError("a layer of the routing profile has no routed tokens, so no expert can be selected by share; "
                        "profile more data (or use --expert-selection all)")
    chosen, acc = [], 0.0
    for e in ranked(scores):
        chosen.append(e)
        acc += scores[e] / total
        if acc >= p - TOLERANCE:
            break
    return sorted(chosen)


def select_layer(token_share: list[float], mean_gate: list[float], selection: ExpertSelection,
                 rng: random.Random | None = None) -> list[int]:
    """The selected expert ids (sorted) of one layer."""
    n = len(token_share)
    if selection.mode == "all":
        return list(range(n))
    if selection.mode == "token":
        return cumulative_set(token_share, selection.value)
    if selection.mode == "gate":
        return cumulative_set(mean_gate, selection.value)
    if selection.mode == "top":
        k = int(selection.value)
        if k > n:
            raise PlanError(f"--expert-selection top:{k} asks for more experts than the layer has ({n})")
        return sorted(ranked(token_share)[:k])
    size = len(select_layer(token_share, mean_gate, selection.inner))
    return sorted((rng or random.Random(0)).sample(range(n), size))


def select_experts(profile, selection: ExpertSelection | str, seed: int = 0) -> dict[str, list[int]]:
    """{layer path: selected expert ids} for every layer of a routing profile (`layers`, `token_share()`,
    `mean_gate()`). `seed` drives random:<spec> only."""
    selection = parse_selection(selection)
    rng = random.Random(seed)
    shares, gates = profile.token_share(), profile.mean_gate()
    return {path: select_layer(shares[i], gates[i], selection, rng) for i, path in enumerate(profile.layers)}


def format_selection(experts: dict[str, list[int]], num_experts: dict[str, int], limit: int = 24) -> list[str]:
    """One line per layer: `model.layers.1.mlp.experts: 3/8 [0, 2, 5]` (long id lists are cut at `limit`)."""
    lines = []
    for path, ids in experts.items():
        shown = ", ".join(map(str, ids[:limit])) + (", ..." if len(ids) > limit else "")
        lines.append(f"  {path}: {len(ids)}/{num_experts.get(path, '?')} [{shown}]")
    return lines
