"""The trainable LoRA of routed experts: `ExpertAdapter`, one adapter's per-expert factors in PEFT's
`target_parameters` layout (optionally over a selection of experts), held by a StudioExperts as `adapters[name]`.

Owns PEFT's fused expert layout: the factors (expand / compact for expert selections), `peft_to_slot_layout`
(PEFT's layout -> the expert-major slot layout A^T [E, in, r], B^T [E, r, out] scaled, which serving's slot buffers
and this adapter's inference copies both hold) and the forms the expert products read (per-expert factors for the
eager loop, the hit experts' factors for the grouped path through GroupedExpertProjection's fused backward). The
serving slot buffers are ExpertSlots (studio/lora/layers.py); the quantized expert weights and the forward stay in
studio/moe/experts.py. Written by hand: PEFT's ParamWrapper cannot wrap a quantized tensor, re-materialises W + BA
for the whole expert stack and refuses dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from studio.lora.layers import _expert_lora, lora_scaling
from studio.moe.grouped import Routing


def peft_to_slot_layout(a: torch.Tensor, b: torch.Tensor, r: int, scaling: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's fused expert factors, lora_A [r*E, in] (expert-major rows) and lora_B [out, r*E] (rank-major
    columns, expert fastest), as the slot layout: A^T [E, in, r] (a view) and scaling * B^T as [E, r, out].

    Transposed so that the products x A^T and (x A^T) B^T read each expert's factors as the plain right-hand
    operand: in the served models a single adapter's added time per decode step fell to 0.44-0.81x of the
    transposed operands' (BENCHMARKS.md, serving with LoRA slots, seventh pass; bench/expert_lora_paths.py keeps
    the untransposed grid as a reference column)."""
    e = a.shape[0] // r
    return a.view(e, r, a.shape[-1]).transpose(1, 2), b.view(b.shape[0], r, e).permute(2, 1, 0) * scaling


class _SlotGather(torch.autograd.Function):
    """out [G, ...] = zeros with out[dst] = src[idx] (each slot at most once), backward a plain indexed write into
    zeros. index_select with a shared zero row for the unselected experts would do the same, but its backward
    (scatter_add over repeated indices) took longer than the whole LoRA product on 2 CPU cores."""

    @staticmethod
    def forward(ctx, src, idx, dst, groups):
        ctx.save_for_backward(idx, dst)
        ctx.slots = src.shape[0]
        out = src.new_zeros(groups, *src.shape[1:])
        out.index_put_((dst,), src.index_select(0, idx))
        return out

    @staticmethod
    def backward(ctx, grad):
        idx, dst = ctx.saved_tensors
        out = grad.new_zeros(ctx.slots, *grad.shape[1:])
        out.index_put_((idx,), grad.index_select(0, dst))
        return out, None, None, None


class ExpertAdapter(nn.Module):
    """One adapter's trainable LoRA on a StudioExperts' fused parameters, in PEFT's `target_parameters` layout:
    for every targeted parameter (`layouts`: name -> (experts, in, out)) lora_A [r*E, in] (expert-major rows) and
    lora_B [out, r*E] (rank-major columns), trainable parameters whose dim 0 FSDP2 shards, the scaling kept apart
    from B, dropout on the LoRA input.

    With `experts` (expert-specialised fine-tuning, studio/experts/), factors exist only for those expert ids, in
    the same layout over S = len(experts) slots (lora_A [r*S, in], lora_B [out, r*S]): the other experts get no
    parameters, hence no gradients and no optimizer state, and no LoRA compute in the eager path. `expand` maps the
    factors back to PEFT's full layout (zeros for the unselected experts) when an adapter is saved.

    In inference (eval mode, or no gradient wanted) it computes what a uniform serving slot holding the same file
    computes: the same slot layout (`inference_factors`) and the same product (`grouped_delta`)."""

    def __init__(self, layouts: dict[str, tuple[int, int, int]], r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, experts: list[int] | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.r, self.alpha, self.num_experts = r, alpha, None
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        e = next(iter(layouts.values()))[0] if layouts else 0
        self.expert_ids: list[int] | None = None
        if experts is not None:
            ids = sorted({int(i) for i in experts})
            if not ids or ids[0] < 0 or ids[-1] >= e:
                raise ValueError(f"selected experts must be a non-empty subset of 0..{e - 1}, got {experts}")
            self.expert_ids = ids if len(ids) < e else None
        slots = len(self.expert_ids) if self.expert_ids is not None else e
        self.num_slots = slots
        # expert id -> slot (-1: not selected); a buffer so it follows the module's device
        slot_of = torch.full((e,), -1, dtype=torch.long)
        slot_of[torch.tensor(self.expert_ids if self.expert_ids is not None else range(e), dtype=torch.long)] = \
            torch.arange(slots)
        self.register_buffer("slot_of", slot_of, persistent=False)
        for name, (e, fan_in, fan_out) in layouts.items():
            self.num_experts = e
            a = torch.empty(r * slots, fan_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init for lora_A
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(fan_out, r * slots))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._inference_cache: dict = {}

    def trains(self, name: str) -> bool:
        """Whether `name`'s products must run on the parameters themselves (training mode, or gradients wanted for
        them); otherwise they run on the cached inference copies."""
        return self.training or (torch.is_grad_enabled() and self.lora_A[name].requires_grad)

    @property
    def selective(self) -> bool:
        return self.expert_ids is not None

    def slot(self, expert: int) -> int | None:
        """The factors' slot of expert `expert` (None: the expert has no LoRA in this adapter)."""
        if self.expert_ids is None:
            return expert
        s = int(self.slot_of[expert])
        return s if s >= 0 else None

    def expand(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        """Slot-layout factors (kind "A": [r*S, in], "B": [out, r*S]) -> PEFT's full layout over all E experts,
        zeros for the unselected ones."""
        if self.expert_ids is None:
            return t
        e, s, r = self.num_experts, self.num_slots, self.r
        ids = torch.tensor(self.expert_ids, dtype=torch.long, device=t.device)
        if kind == "A":
            full = t.new_zeros(e, r, t.shape[-1])
            full[ids] = t.reshape(s, r, t.shape[-1])
            return full.reshape(e * r, t.shape[-1])
        full = t.new_zeros(t.shape[0], r, e)
        full[:, :, ids] = t.reshape(t.shape[0], r, s)
        return full.reshape(t.shape[0], r * e)

    def full_shape(self, kind: str, t: torch.Tensor) -> tuple[int, int]:
        """The shape `expand(kind, t)` returns, without building it."""
        width = self.r * self.num_experts
        return (width, t.shape[-1]) if kind == "A" else (t.shape[0], width)

    def compact(self, kind: str, full: torch.Tensor, key: str = "") -> torch.Tensor:
        """PEFT's full layout -> this adapter's slots (the inverse of `expand`). Non-zero factors for an unselected
        expert mean the file does not belong to this selection: that is an error, not a silent drop."""
        if self.expert_ids is None:
            return full
        e, r = self.num_experts, self.r
        ids = torch.tensor(self.expert_ids, dtype=torch.long, device=full.device)
        rest = self.slot_of.to(full.device) < 0
        per = full.reshape(e, r, full.shape[-1]) if kind == "A" else full.reshape(full.shape[0], r, e)
        unselected = per[rest] if kind == "A" else per[:, :, rest]
        if unselected.numel() and bool(unselected.ne(0).any()):
            raise ValueError(f"{key}: factors of unselected experts are non-zero; this adapter file does not match "
                             f"its recorded expert selection {self.expert_ids}")
        if kind == "A":
            return per[ids].reshape(-1, full.shape[-1])
        return per[:, :, ids].reshape(full.shape[0], -1)

    def factors(self, name: str, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Expert `expert`'s (A [r, in], B [out, r]), or None when the expert is not selected."""
        slot = self.slot(expert)
        if slot is None:
            return None
        a, b = self.lora_A[name], self.lora_B[name]
        s = self.num_slots
        a_e = a.view(s, self.r, a.shape[-1])[slot]           # [r, in]
        b_e = b.view(b.shape[0], self.r, s)[:, :, slot]      # [out, r]
        return a_e.to(dtype), b_e.to(dtype)

    def delta(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA update of expert `expert` on its tokens x (None: the expert is not selected, nothing to add)."""
        if self.trains(name):
            f = self.factors(name, expert, x.dtype)
            if f is None:
                return None
            a_e, b_e = f
            return F.linear(F.linear(self.dropout(x), a_e), b_e) * self.scaling
        if self.slot(expert) is None:
            return None
        a_all, b_all = self.inference_factors(name, x.dtype)
        return (x @ a_all[expert]) @ b_all[expert]

    def grouped_factors(self, name: str, routing: Routing, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """Training: the hit experts' factors as A [G, r, in], B [G, out, r] (views of the parameters: gradients
        flow back into them) and the scaling to apply. With an expert selection, hit experts that are not selected
        get zero factors that are not parameters (no gradient reaches anything for them); None when no hit expert
        is selected (the adapter adds nothing here)."""
        a, b = self.lora_A[name], self.lora_B[name]
        s = self.num_slots
        a_s = a.view(s, self.r, a.shape[-1])
        # lora_B's columns are rank-major (expert fastest): one copy to expert-major for the batched products
        b_s = b.view(b.shape[0], self.r, s).permute(2, 0, 1)
        if self.expert_ids is None:
            return routing.select(a_s).to(dtype), routing.select(b_s).contiguous().to(dtype), self.scaling
        slots = self.slot_of.index_select(0, routing.hit)
        dst = (slots >= 0).nonzero().flatten()  # the hit experts that are selected ...
        if dst.numel() == 0:
            return None
        idx = slots.index_select(0, dst)       # ... and their slots; the other hit experts get zero factors
        a_g = _SlotGather.apply(a_s, idx, dst, routing.groups)
        b_g = _SlotGather.apply(b_s, idx, dst, routing.groups)
        return a_g.to(dtype), b_g.to(dtype), self.scaling

    def grouped_delta(self, name: str, routing: Routing, x: torch.Tensor) -> torch.Tensor | None:
        """Inference: this adapter's update of the rows x (`routing`'s layout) by the product a uniform serving slot
        runs (studio.lora.layers._expert_lora) on the cached scaled factors; None when no hit expert is selected."""
        if self.expert_ids is not None and not bool((self.slot_of.index_select(0, routing.hit) >= 0).any()):
            return None
        a_all, b_all = self.inference_factors(name, x.dtype)
        return _expert_lora(routing, x, a_all, b_all)

    def train(self, mode: bool = True):
        # Fused AdamW updates parameters without bumping their version counter, so the inference cache is also
        # dropped on every train()/eval() switch (the trainer calls model.eval() before each evaluation).
        getattr(self, "_inference_cache", {}).clear()
        return super().train(mode)

    def inference_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert contiguous factors for inference: A^T [E, in, r] and scaling * B^T as [E, r, out] (zeros for
        experts outside an expert selection): this adapter as one serving slot, the layout of the slot buffers.

        lora_B's expert slice is strided (PEFT's rank-major column layout), which makes every small matmul copy
        it; serving builds the contiguous copy once and rebuilds it when the parameters change (their version
        counter moves on every in-place update: loading, optimizer steps)."""
        a, b = self.lora_A[name], self.lora_B[name]
        key = (name, dtype, a.device)
        version = (a._version, b._version)
        hit = self._inference_cache.get(key)
        if hit is None or hit[0] != version:
            a_all, b_all = peft_to_slot_layout(self.expand("A", a.detach()), self.expand("B", b.detach()), self.r,
                                               self.scaling)
            hit = (version, a_all.to(dtype).contiguous(), b_all.to(dtype).contiguous())
            self._inference_cache[key] = hit
        return hit[1], hit[2]
