"""One table of MoE architecture knowledge: which modules are attention, routed experts, shared experts,
routers and dense MLPs for each supported family. Everything else in the studio asks this table.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoEArch:
    family: str
    model_types: tuple[str, ...]
    attention: tuple[str, ...]                 # linear leaf names inside the attention block
    experts_module: str = "mlp.experts"        # routed experts, relative to a decoder layer
    expert_params: tuple[str, ...] = ("gate_up_proj", "down_proj")  # fused 3D parameters
    shared_experts: tuple[str, ...] = ()       # linear paths relative to a decoder layer
    routers: tuple[str, ...] = ("mlp.gate",)   # module paths relative to a decoder layer (kept high precision)
    extra_high_precision: tuple[str, ...] = ()  # other small gates kept unquantized
    dense_mlp: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    aux_loss: bool = True                      # does the family define a router auxiliary loss?
    notes: str = ""
    # How the family's checkpoints (and vLLM's 2D MoE models) name one routed expert's projections: the parent
    # of the per-expert modules relative to a decoder layer, and the (gate, up, down) leaf names. The fused
    # gate_up_proj holds gate then up along its output, or alternating (gate_up_interleaved, gpt-oss).
    checkpoint_experts: str = "mlp.experts"
    checkpoint_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    gate_up_interleaved: bool = False

    @property
    def high_precision(self) -> tuple[str, ...]:
        return self.routers + self.extra_high_precision


_MHA = ("q_proj", "k_proj", "v_proj", "o_proj")
_SWIGLU = ("gate_proj", "up_proj", "down_proj")

ARCHS: dict[str, MoEArch] = {a.family: a for a in [
    MoEArch("deepseek_v3", ("deepseek_v3",),
            attention=("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
            shared_experts=tuple(f"mlp.shared_experts.{n}" for n in _SWIGLU),
            aux_loss=False, notes="MLA attention; aux-loss-free balancing (router bias), no aux loss defined"),
    MoEArch("deepseek_v2", ("deepseek_v2",),
            attention=("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
            shared_experts=tuple(f"mlp.shared_experts.{n}" for n in _SWIGLU),
            aux_loss=False, notes="MLA attention"),
    MoEArch("mixtral", ("mixtral",), attention=_MHA, checkpoint_experts="block_sparse_moe.experts",
            checkpoint_expert_names=("w1", "w3", "w2")),
    MoEArch("qwen2_moe", ("qwen2_moe",), attention=_MHA,
            shared_experts=tuple(f"mlp.shared_expert.{n}" for n in _SWIGLU),
            extra_high_precision=("mlp.shared_expert_gate",)),
    MoEArch("qwen3_moe", ("qwen3_moe",), attention=_MHA),
    MoEArch("olmoe", ("olmoe",), attention=_MHA),
    MoEArch("gpt_oss", ("gpt_oss",), attention=_MHA, routers=("mlp.router",), gate_up_interleaved=True,
            notes="experts stored [E, in, out] with biases; interleaved gate/up"),
]}


def arch_for(config) -> MoEArch:
    """The table entry for a transformers config; unknown MoE families fall back to discovery."""
    model_type = getattr(config, "model_type", "")
    for arch in ARCHS.values():
        if model_type in arch.model_types:
            return arch
    raise KeyError(model_type)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every decoder layer, found as the longest ModuleList of the model."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            if re.search(r"(^|\.)(layers|h|blocks)$", name):
                best = (name, module)
    if best is None:
        raise ValueError("could not find the decoder layers (a ModuleList named layers/h/blocks)")
    return [(f"{best[0]}.{i}", layer) for i, layer in enumerate(best[1])]


def is_fused_experts(module: nn.Module) -> bool:
    """A routed-experts container storing its experts as 3D tensors (transformers 5.x layout)."""
    from studio.moe.experts import StudioExperts

    if isinstance(module, StudioExperts):
        return True
    params = dict(module.named_parameters(recurse=False))
    return any(p.dim() == 3 for p in params.values()) and hasattr(module, "num_experts")


def discover_arch(model: nn.Module) -> MoEArch:
    """Best-effort architecture entry for an unknown MoE family, found by module names and shapes."""
    layers = decoder_layers(model)
    attention, shared, routers, experts_module, expert_params = set(), set(), set(), None, ()
    for _, layer in layers:
        for name, module in layer.named_modules():
            if is_fused_experts(module) and experts_module is None:
                experts_module = name
                expert_params = tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() == 3)
            elif isinstance(module, nn.Linear):
                leaf = name.rsplit(".", 1)[-1]
                if re.search(r"attn|attention", name):
                    attention.add(leaf)
                elif "shared" in name and "gate" != leaf:
                    shared.add(name)
                elif leaf in ("gate", "router") or name.endswith((".gate", ".router")):
                    routers.add(name)
    if experts_module is None:
        raise ValueError("no fused routed experts found")
    arch = MoEArch("discovered", (), attention=tuple(sorted(attention)), experts_module=experts_module,
                   expert_params=expert_params, shared_experts=tuple(sorted(shared)),
                   routers=tuple(sorted(routers)) or ("mlp.gate",), aux_loss=True,
                   notes="discovered from module names; check the printed plan")
    logger.warning("Unknown MoE family: discovered attention=%s experts=%s shared=%s routers=%s. "
                   "Check the plan before training.", arch.attention, experts_module, arch.shared_experts,
                   arch.routers)
    return arch


def resolve_arch(model: nn.Module) -> MoEArch:
    try:
        return arch_for(model.config)
    except KeyError:
        return discover_arch(model)


@dataclass
class Components:
    """Module paths of a loaded model, grouped by role."""
    attention: list[str] = field(default_factory=list)
    routed_experts: list[str] = field(default_factory=list)   # experts container modules
    shared_experts: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)
    dense_mlp: list[str] = field(default_factory=list)


def find_components(model: nn.Module, arch: MoEArch) -> Components:
    comp = Components()
    for layer_name, layer in decoder_layers(model):
        names = dict(layer.named_modules())
        for rel, module in names.items():
            full = f"{layer_name}.{rel}"
            leaf = rel.rsplit(".", 1)[-1]
            if rel == arch.experts_module and is_fused_experts(module):
                comp.routed_experts.append(full)
            elif rel in arch.shared_experts:
                comp.shared_experts.append(full)
            elif rel in arch.high_precision:
                comp.routers.append(full)
            elif rel in arch.dense_mlp:
                comp.dense_mlp.append(full)
            elif leaf in arch.attention and ("attn" in rel or "attention" in rel) and _is_linear(module):
                comp.attention.append(full)
    return comp


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes and PEFT wrappers keep nn.Linear semantics
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


def expert_param_layout(module: nn.Module, param: str) -> tuple[int, int, int, bool]:
    """(num_experts, in_features, out_features, transposed) of a fused expert parameter.

    transformers stores most families as [E, out, in] (used as F.linear(x, W[e])); families flagged
    `is_transposed` (gpt-oss) store [E, in, out] (used as x @ W[e]).
    """
    from studio.moe.experts import StudioExperts

    if isinstance(module, StudioExperts):
        return module.layout(param)
    shape = getattr(module, param).shape
    transposed = bool(getattr(module, "is_transposed", False))
    e, a, b = shape
    return (e, a, b, True) if transposed else (e, b, a, False)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
