"""Serving slots on a loaded base: `LoraSlots` writes a saved PEFT adapter's factors into one slot of every LoRA layer
it targets, clears slots, and says which rows of the next forwards use which slot (`rows`).

Owns: which layers got slot buffers (linears are wrapped in a SlotLinear, experts given an ExpertSlots when an
adapter first targets them), the buffers' common rank (they grow to the largest rank loaded), the check that a saved
adapter fits the base, and the one LoraBatch every layer reads. The layers themselves are studio/lora/layers.py;
which adapter lives in which slot is decided by the engine's residency (studio/serving/residency.py).

    slots = LoraSlots(model, max_slots=8)
    slots.load(0, "adapters/law/v3"); slots.load(1, "adapters/code/v1")
    with slots.rows([0, None, 1]):                      # row 0 -> slot 0, row 1 -> bare base, row 2 -> slot 1
        logits = model(input_ids=ids).logits            # ids: [3, T]
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from studio.errors import ModelError
from studio.lora.experts import peft_to_slot_layout
from studio.lora.layers import ExpertSlots, LoraBatch, SlotLinear, lora_scaling
from studio.moe.experts import StudioExperts

PREFIX = "base_model.model."


class LoraSlots:
    """Slot buffers on a loaded base and the one LoraBatch its layers read. Layers are wrapped (linears) or given
    slot buffers (experts) when an adapter first targets them; each holds `max_slots` slots from then on."""

    def __init__(self, model: nn.Module, max_slots: int, rank: int = 8, dtype: torch.dtype | None = None):
        if max_slots < 1:
            raise ValueError("max_slots must be at least 1")
        self.model = model
        self.max_slots = max_slots
        self.rank = rank
        self.dtype = dtype or model.get_input_embeddings().weight.dtype
        if not self.dtype.is_floating_point:
            self.dtype = torch.float32
        self.batch = LoraBatch(max_slots)
        self.linears: dict[str, SlotLinear] = {}
        self.experts: dict[str, ExpertSlots] = {}
        self.ranks: dict[int, int] = {}   # slot -> rank of the adapter in it

    # ---- layers --------------------------------------------------------------------------------
    def _linear(self, path: str) -> SlotLinear:
        layer = self.linears.get(path)
        if layer is None:
            parent_name, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            base = getattr(parent, child)
            if not hasattr(base, "in_features"):
                raise ModelError(f"{path} is not a linear layer; slot LoRA wraps linears and fused experts only")
            if isinstance(base, SlotLinear):  # already wrapped for named adapters (apply_plan): add serving slots
                layer = base
                layer.enable_slots(self.batch, self.max_slots, self.rank, self.dtype)
            else:
                layer = SlotLinear(base, self.batch, self.max_slots, self.rank, self.dtype)
                setattr(parent, child, layer)
            self.linears[path] = layer
        return layer

    def _experts(self, path: str) -> ExpertSlots:
        slots = self.experts.get(path)
        if slots is None:
            owner = self.model.get_submodule(path)
            if not isinstance(owner, StudioExperts):
                raise ModelError(f"{path} is not a studio experts module; load the base with studio.models.load_base")
            slots = ExpertSlots(owner, self.batch, self.max_slots, self.rank, self.dtype)
            owner.lora_slots = slots
            self.experts[path] = slots
        return slots

    def _ensure_rank(self, r: int) -> None:
        """A larger rank than any so far: every layer's buffers grow once (slots already written keep their
        factors, zero-padded); ranks up to the largest seen reuse the buffers."""
        if r <= self.rank:
            return
        self.rank = r
        for layer in self.linears.values():
            layer.grow(r)
        for slots in self.experts.values():
            slots.grow(r)

    # ---- adapters ------------------------------------------------------------------------------
    def load(self, slot: int, adapter_dir: str | os.PathLike):
        """Write a saved PEFT adapter's factors into `slot` of every layer it targets (other layers' slot is
        cleared). Every tensor must fit: missing / unexpected keys and shape mismatches raise ModelError."""
        from safetensors.torch import load_file

        from studio.lora.io import plan_from_config

        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range 0..{self.max_slots - 1}")
        plan = plan_from_config(self.model, adapter_dir)
        if plan.router_targets:
            raise ModelError("this adapter retrains the router; serving it beside other adapters is not supported yet")
        r = plan.settings.r  # plan_from_config read r, lora_alpha and use_rslora from adapter_config.json
        scaling = lora_scaling(r, plan.settings.alpha, plan.settings.use_rslora)
        weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
        expected: dict[str, tuple[int, ...]] = {}
        for path in plan.linear_targets:
            module = self.model.get_submodule(path)
            base = module.base_layer if isinstance(module, SlotLinear) else module
            expected[f"{PREFIX}{path}.lora_A.weight"] = (r, base.in_features)
            expected[f"{PREFIX}{path}.lora_B.weight"] = (base.out_features, r)
        expert_keys = {}
        for path, params in plan.expert_targets.items():
            owner = self.model.get_submodule(path)
            targeted = [n for n in owner.weight_names if n in params]
            for i, name in enumerate(targeted):  # PEFT nests one ParamWrapper per parameter, the first innermost
                key = f"{PREFIX}{path}" + ".base_layer" * (len(targeted) - 1 - i)
                e, fan_in, fan_out, _ = owner.layout(name)
                expected[f"{key}.lora_A.weight"] = (r * e, fan_in)
                expected[f"{key}.lora_B.weight"] = (fan_out, r * e)
                expert_keys[(path, name)] = key
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ModelError(f"adapter {adapter_dir} does not fit this base: missing {missing[:3]} unexpected "
                             f"{unexpected[:3]} (was it trained on another base?)")
        for key, shape in expected.items():
            if tuple(weights[key].shape) != shape:
                raise ModelError(f"adapter tensor {key} has shape {tuple(weights[key].shape)}, this base expects "
                                 f"{shape}: trained on another base?")
        self._ensure_rank(r)
        self.clear(slot)
        with torch.no_grad():
            for path in plan.linear_targets:
                layer = self._linear(path)
                a, b = weights[f"{PREFIX}{path}.lora_A.weight"], weights[f"{PREFIX}{path}.lora_B.weight"]
                layer.write(slot, a.to(layer.slot_A.device), b.to(layer.slot_B.device) * scaling)
            for (path, name), key in expert_keys.items():
                slots = self._experts(path)
                a, b = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
                device = slots.lora_A[name].device
                slots.write(slot, name, *peft_to_slot_layout(a.to(device), b.to(device), r, scaling))
        self.ranks[slot] = r
        return plan

    def clear(self, slot: int) -> None:
        """Empty a slot in every layer (its adapter is gone; the buffers stay)."""
        with torch.no_grad():
            for layer in self.linears.values():
                layer.clear(slot)
            for slots in self.experts.values():
                slots.clear(slot)
        self.ranks.pop(slot, None)

    @contextmanager
    def rows(self, row_slots: list[int | None], device=None):
        """Within the block, row i of every forward uses slot row_slots[i] (None: the bare base)."""
        self.batch.set(row_slots, device=device)
        try:
            yield
        finally:
            self.batch.clear()

    def nbytes(self) -> int:
        """Bytes of every slot buffer (fixed once allocated: it does not depend on which adapters are mixed)."""
        total = sum(m.slot_A.nbytes + m.slot_B.nbytes for m in self.linears.values())
        for slots in self.experts.values():
            total += sum(p.nbytes for p in list(slots.lora_A.values()) + list(slots.lora_B.values()))
        return total
