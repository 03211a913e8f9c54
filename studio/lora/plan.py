"""The LoRA planner: which modules and fused expert parameters get LoRA, with what shapes and cost.

Plans are built from the architecture table (studio.moe.arch) and refuse silent no-ops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from studio.errors import PlanError
from studio.moe.arch import Components, MoEArch, expert_param_layout

GROUPS = ("attention", "routed_experts", "shared_experts", "dense_mlp")
PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "experts": ("routed_experts",),
    "shared_experts": ("shared_experts",),
    "all": ("attention", "routed_experts", "shared_experts"),
    "full": ("attention", "routed_experts", "shared_experts", "dense_mlp"),
}


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    use_rslora: bool = False
    train_router: bool = False

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise PlanError(f"LoRA rank r must be a positive integer (e.g. --r 16), got {self.r!r}")
        if self.alpha <= 0:
            raise PlanError(f"LoRA alpha must be positive (e.g. --alpha 32), got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise PlanError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class PlanGroup:
    group: str
    names: list[str]
    shapes: list[list[int]]
    trainable: int

    @property
    def count(self) -> int:
        return len(self.names)


@dataclass
class LoraPlan:
    targets: list[str]
    settings: LoraSettings
    linear_targets: list[str] = field(default_factory=list)            # module paths
    expert_targets: dict[str, list[str]] = field(default_factory=dict)  # experts path -> fused param names
    router_targets: list[str] = field(default_factory=list)
    groups: list[PlanGroup] = field(default_factory=list)
    total_params: int = 0
    # expert-specialised fine-tuning (studio/experts/): experts path -> the expert ids that get LoRA (a path not
    # listed: every expert), and the selection that chose them (spec, profile key, ...)
    expert_ids: dict[str, list[int]] = field(default_factory=dict)
    expert_selection: dict | None = None

    @property
    def trainable_params(self) -> int:
        return sum(g.trainable for g in self.groups)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trainable_params"] = self.trainable_params
        d["groups"] = [dict(asdict(g), count=g.count) for g in self.groups]
        return d

    def format(self) -> str:
        s = self.settings
        lines = [f"LoRA plan: targets={','.join(self.targets)} r={s.r} alpha={s.alpha} dropout={s.dropout}"
                 f"{' rslora' if s.use_rslora else ''} router={'trained' if s.train_router else 'frozen'}",
                 f"{'group':<16}{'count':>6}  {'shapes':<28}{'trainable':>12}  names"]
        for g in self.groups:
            shapes = sorted({tuple(x) for x in g.shapes})
            shape_txt = ", ".join("x".join(map(str, sh)) for sh in shapes[:3]) + (" ..." if len(shapes) > 3 else "")
            leaves = sorted({n.split(".", 3)[-1] if g.group != "routed_experts" else n.rsplit(".", 2)[-2] + "."
                             + n.rsplit(".", 1)[-1] for n in g.names})
            lines.append(f"{g.group:<16}{g.count:>6}  {shape_txt:<28}{g.trainable:>12,}  {', '.join(leaves[:6])}")
        if self.expert_ids:
            from studio.experts.selection import format_selection

            spec = (self.expert_selection or {}).get("spec", "explicit")
            chosen = sum(len(v) for v in self.expert_ids.values())
            lines.append(f"expert selection {spec}: LoRA on {chosen} experts in {len(self.expert_ids)} MoE layers "
                         "(unselected experts: no factors, no gradients, no optimizer state)")
            lines += format_selection(self.expert_ids, (self.expert_selection or {}).get("num_experts", {}))
        lines.append(trainable_line(self.trainable_params, self.total_params))
        return "\n".join(lines)


def trainable_line(trainable: int, total: int) -> str:
    """The one definition of the trainable share, used by the trainer, `--dry-run`, `studio models plan` and the web
    UI: LoRA parameters over every parameter of the base as published (embeddings and lm_head included, counted
    unquantized: a 4-bit tensor packs two values per stored element, so counting stored elements would vary with
    the quantization)."""
    pct = 100 * trainable / max(total, 1)
    return (f"trainable parameters (LoRA): {trainable:,} = {pct:.3f}% of the base's {total:,} "
            f"(all weights, counted unquantized)")


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    base = getattr(module, "base_layer", module)
    return base.out_features, base.in_features


def build_plan(model: nn.Module, arch: MoEArch, comps: Components, targets: str | list[str] = "all",
               settings: LoraSettings | None = None, total_params: int | None = None,
               expert_ids: dict[str, list[int]] | None = None, expert_selection: dict | None = None) -> LoraPlan:
    """Resolve presets / explicit names to concrete targets. Explicit names may be group names, preset names,
    leaf names (`q_proj`, `gate_up_proj`), or path suffixes (`shared_experts.down_proj`). `expert_ids` restricts
    routed-expert LoRA to those experts per layer (studio/experts/selection.py chooses them)."""
    settings = settings or LoraSettings()
    requested = [targets] if isinstance(targets, str) else list(targets)
    requested = [t.strip() for item in requested for t in item.split(",") if t.strip()]
    if not requested:
        raise PlanError("no LoRA targets given: use a preset (attention, experts, shared_experts, all, full) or names")
    by_group = {"attention": comps.attention, "shared_experts": comps.shared_experts, "dense_mlp": comps.dense_mlp}
    expert_params = {path: [p for p in _fused_params(model.get_submodule(path))] for path in comps.routed_experts}
    linear: dict[str, str] = {}       # path -> group
    experts: dict[str, list[str]] = {}
    wants_experts = False
    for t in requested:
        groups = PRESETS.get(t) or ((t,) if t in GROUPS else None)
        if groups:
            for g in groups:
                if g == "routed_experts":
                    wants_experts = True
                    for path, params in expert_params.items():
                        experts[path] = list(params)
                else:
                    if not by_group[g] and t == g:
                        raise PlanError(f"target group {g!r} matches nothing in {arch.family}: this model has no {g}")
                    linear.update({p: g for p in by_group[g]})
            continue
        hit = False
        for g, paths in by_group.items():
            for p in paths:
                if p == t or p.endswith("." + t):
                    linear[p] = g
                    hit = True
        for path, params in expert_params.items():
            for param in params:
                full = f"{path}.{param}"
                if full == t or full.endswith("." + t):
                    experts.setdefault(path, []).append(param)
                    wants_experts = hit = True
        if not hit:
            raise PlanError(f"LoRA target {t!r} matches nothing in this {arch.family} model. "
                            f"Presets: {', '.join(PRESETS)}; names: {', '.join(available_names(model, comps))}")
    if wants_experts and not experts:
        raise PlanError(f"routed experts were requested but none can be adapted in this {arch.family} model "
                        f"(expected fused expert parameters under `{arch.experts_module}`)")
    if not linear and not experts:
        raise PlanError("the LoRA plan adapts nothing; pick a preset: " + ", ".join(PRESETS))
    plan = LoraPlan(targets=requested, settings=settings,
                    linear_targets=sorted(linear), expert_targets={k: sorted(set(v), key=v.index)
                                                                   for k, v in sorted(experts.items())},
                    total_params=total_params or sum(p.numel() for p in model.parameters()))
    if expert_ids:
        unknown = sorted(set(expert_ids) - set(plan.expert_targets))
        if unknown:
            raise PlanError(f"the expert selection names layers the plan does not adapt: {unknown[:3]}; target the "
                            "routed experts (--targets experts or all) or use --expert-selection all")
        plan.expert_ids = {k: sorted(int(i) for i in v) for k, v in sorted(expert_ids.items())}
        plan.expert_selection = expert_selection
    if settings.train_router:
        plan.router_targets = [p for p in comps.routers if p.rsplit(".", 1)[-1] in
                               {r.rsplit(".", 1)[-1] for r in arch.routers}]
    r = settings.r
    for g in ("attention", "shared_experts", "dense_mlp"):
        names = [p for p, grp in linear.items() if grp == g]
        if names:
            shapes = [list(_linear_shape(model.get_submodule(n))) for n in sorted(names)]
            plan.groups.append(PlanGroup(g, sorted(names), shapes, sum(r * (o + i) for o, i in shapes)))
    if plan.expert_targets:
        names, shapes, trainable = [], [], 0
        for path, params in plan.expert_targets.items():
            module = model.get_submodule(path)
            for param in params:
                e, fan_in, fan_out, _ = expert_param_layout(module, param)
                names.append(f"{path}.{param}")
                shapes.append([e, fan_out, fan_in])
                trainable += r * len(plan.expert_ids.get(path, range(e))) * (fan_in + fan_out)
        plan.groups.insert(1 if plan.groups and plan.groups[0].group == "attention" else 0,
                           PlanGroup("routed_experts", names, shapes, trainable))
    if plan.router_targets:
        shapes = [list(model.get_submodule(p).weight.shape) for p in plan.router_targets]
        plan.groups.append(PlanGroup("router", plan.router_targets, shapes,
                                     sum(a * b for a, b in shapes)))
    return plan


def _fused_params(module: nn.Module) -> list[str]:
    names = getattr(module, "weight_names", None)
    if names:
        return list(names)
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]


def available_names(model: nn.Module, comps: Components) -> list[str]:
    leaves = set()
    for p in comps.attention + comps.shared_experts + comps.dense_mlp:
        leaves.add(p.rsplit(".", 1)[-1])
    for s in comps.shared_experts:
        leaves.add(".".join(s.rsplit(".", 2)[-2:]))
    for path in comps.routed_experts:
        leaves.update(_fused_params(model.get_submodule(path)))
    return sorted(leaves)
