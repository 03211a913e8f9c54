"""Routed experts with bitsandbytes-quantized fused weights: the quantized expert store and its forward.

Owns `StudioExperts`, which replaces a transformers fused-experts module (`mlp.experts` with 3D `gate_up_proj` /
`down_proj`): the quantized storage (NF4/FP4/int8 per expert, `ExpertQuant`, `quantize_expert_stack`), dequantizing
experts, and the forward (grouped path in studio/moe/grouped.py, eager per-expert loop as its reference), applying
the adapters it holds. Its LoRA layers: named adapters as ExpertAdapter (studio/lora/experts.py, trainable), serving
slots as ExpertSlots (studio/lora/layers.py, stacked slot buffers). Written by hand because neither
bitsandbytes (quantizes only nn.Linear) nor PEFT (its `ParamWrapper` re-materialises W + BA for the whole expert
stack, cannot wrap a quantized tensor and refuses dropout and mixed-adapter batches) covers it. It computes the same
function as PEFT's `target_parameters` LoRA and stores its factors in the same layout, so saved adapters load with
plain PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from studio.moe.grouped import DEFAULT_WORKSPACE_BYTES, GroupedExpertProjection, Routing

EXPERTS_IMPLS = ("grouped", "eager")
QUANTIZE_CHUNK_ELEMENTS = 2 ** 21  # elements per bitsandbytes call when quantizing an expert stack
# The quantized store's tensors that are one lookup table shared by all experts (bitsandbytes' 16-entry NF4/FP4
# code, the 256-entry code of the nested statistics): kept as buffers, replicated on every rank.
SHARED_SUFFIXES = ("code", "code2")
# STORAGE_NOTE: every other tensor of the store (packed 4-bit codes, int8 codes, absmax, nested statistics,
# offsets, scales) has the expert as its dim 0 and is a frozen (requires_grad=False) nn.Parameter, not a buffer:
# FSDP2's fully_shard shards parameters only (on dim 0), so under FSDP2 each rank holds 1/N of every layer's
# experts and all-gathers a layer just for its forward and backward. Being parameters changes nothing on one
# process: they are frozen, never handed to the optimizer, and read the same way as the buffers were.

@dataclass(frozen=True)
class ExpertQuant:
    """How fused expert weights are stored: bitsandbytes NF4/FP4 (blockwise) or int8 (row-wise absmax)."""
    bits: int = 4                      # 4 or 8
    quant_type: str = "nf4"            # nf4 | fp4 (4-bit only)
    double_quant: bool = False         # quantize the 4-bit absmax statistics too
    blocksize: int = 64

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"expert quantization bits must be 4 or 8, got {self.bits}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")


def quantize_expert_stack(w: torch.Tensor, quant: ExpertQuant) -> dict[str, torch.Tensor]:
    """A fused [E, a, b] expert weight as the studio's storage buffers (suffix -> tensor), each expert quantized on
    its own so any subset can be dequantized: int8 row-wise codes + scales, or bitsandbytes 4-bit packed codes +
    blockwise absmax (+ the nested statistics with double quantization, per expert as bitsandbytes makes them).

    When every expert's elements fill whole blocks, blocks never straddle two experts, so one bitsandbytes call
    over the whole stack gives exactly the per-expert result, several times faster than one call per expert."""
    import bitsandbytes.functional as bnbf

    e, rows, cols = w.shape
    # bitsandbytes' CPU quantizers make full-size temporaries of their input: calls over a few experts at a time
    # keep the transient memory small while loading (most of the speed of one call is already there).
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // (rows * cols))
    spans = [(i, min(i + step, e)) for i in range(0, e, step)]
    if quant.bits == 8:  # row-wise absmax: rows never straddle experts
        cb, scb = [], []
        for i, j in spans:
            c, sc, _ = bnbf.int8_vectorwise_quant(w[i:j].reshape((j - i) * rows, cols).to(torch.float16))
            cb.append(c.view(j - i, rows, cols))
            scb.append(sc.float().view(j - i, rows))
        return {"int8": torch.cat(cb), "scale": torch.cat(scb)}
    if (rows * cols) % quant.blocksize == 0:
        parts = [bnbf.quantize_4bit(w[i:j].reshape((j - i) * rows, cols).contiguous(), blocksize=quant.blocksize,
                                    compress_statistics=False, quant_type=quant.quant_type) for i, j in spans]
        absmax = torch.cat([st.absmax.view(j - i, -1) for (i, j), (_, st) in zip(spans, parts)])
        out = {"nf4": torch.cat([p.view(j - i, -1) for (i, j), (p, _) in zip(spans, parts)]), "absmax": absmax,
               "code": parts[0][1].code}
        if quant.double_quant:  # bitsandbytes' compress_statistics, applied to each expert's statistics
            q, a2, offsets, code2 = [], [], [], None
            for i in range(e):
                offset = absmax[i].mean()
                q_i, state2 = bnbf.quantize_blockwise(absmax[i] - offset, blocksize=256)
                q.append(q_i)
                a2.append(state2.absmax)
                offsets.append(offset.reshape(1).float())
                code2 = state2.code
            out.update(absmax=torch.stack(q), absmax2=torch.stack(a2), offset=torch.cat(offsets), code2=code2)
        return out
    packed, absmax, absmax2, offsets = [], [], [], []
    code = code2 = None
    for i in range(e):
        p, state = bnbf.quantize_4bit(w[i].contiguous(), blocksize=quant.blocksize,
                                      compress_statistics=quant.double_quant, quant_type=quant.quant_type)
        packed.append(p.view(-1))
        absmax.append(state.absmax)
        code = state.code
        if state.nested:
            absmax2.append(state.state2.absmax)
            offsets.append(state.offset.reshape(1).float())
            code2 = state.state2.code
    out = {"nf4": torch.stack(packed), "absmax": torch.stack(absmax), "code": code}
    if quant.double_quant:
        out.update(absmax2=torch.stack(absmax2), offset=torch.cat(offsets), code2=code2)
    return out


class _QuantizedExpertMatmul(torch.autograd.Function):
    """y = x @ W_e (or x W_e^T) with W_e dequantized on the fly. Saves nothing large for backward: the
    weight is frozen, so backward only needs W_e again, which is dequantized a second time (as bnb does)."""

    @staticmethod
    def forward(ctx, x, owner, name, expert):
        w = owner.expert_weight(name, expert, x.dtype)
        ctx.owner, ctx.name, ctx.expert = owner, name, expert
        return x @ w if owner.is_transposed else F.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.owner.expert_weight(ctx.name, ctx.expert, grad.dtype)
        grad_x = grad @ w.t() if ctx.owner.is_transposed else grad @ w
        return grad_x, None, None, None


class StudioExperts(nn.Module):
    """Fused routed experts: frozen (optionally quantized) weights + any number of named LoRA adapters.

    Forward signature and routing loop match transformers' eager experts; only the projections differ:
    each hit expert's weight is dequantized alone, and each adapter's low-rank update is applied only to the
    tokens routed to that expert. Serving installs slot buffers (`lora_slots`, studio.lora.layers), which then
    apply each token's own adapter; the adapters here are the trainable ones (and single-adapter inference).
    """

    def __init__(self, original: nn.Module, quant: ExpertQuant | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        params = dict(original.named_parameters(recurse=False))
        self.weight_names = tuple(n for n, p in params.items() if p.dim() == 3)
        if len(self.weight_names) != 2:
            raise ValueError(f"expected two fused expert projections, found {self.weight_names}")
        self.num_experts = params[self.weight_names[0]].shape[0]
        self.is_transposed = bool(getattr(original, "is_transposed", False))
        self.quant = quant
        self.compute_dtype = compute_dtype or params[self.weight_names[0]].dtype
        self.original_class = type(original)
        self._gate_fn = getattr(type(original), "_apply_gate", None)
        # Attributes the family's gate function reads (act_fn, alpha, limit, ...), shared not copied.
        for key, value in vars(original).items():
            if not key.startswith("_") and key not in ("training",) and not isinstance(value, torch.Tensor):
                setattr(self, key, value)
        for key, child in original.named_children():
            self.add_module(key, child)
        self._shapes: dict[str, tuple[int, int, int]] = {}
        for name in self.weight_names:
            w = params[name].detach()
            self._shapes[name] = tuple(w.shape)
            stored = getattr(original, "_studio_quantized", {}).get(name)  # quantized while loading
            if quant is None:
                self.register_parameter(name, nn.Parameter(w, requires_grad=False))
            else:
                for suffix, t in (stored or quantize_expert_stack(w, quant)).items():
                    if suffix in SHARED_SUFFIXES:  # one small lookup table for all experts: replicated
                        self.register_buffer(f"{name}_{suffix}", t)
                    else:  # per-expert codes and statistics (dim 0 = expert): frozen parameters, see STORAGE_NOTE
                        self.register_parameter(f"{name}_{suffix}", nn.Parameter(t, requires_grad=False))
            bias = params.get(f"{name}_bias")
            if bias is not None:
                self.register_parameter(f"{name}_bias", nn.Parameter(bias.detach(), requires_grad=False))
        # "grouped" (default): one sort per layer, batched dequantization and matmuls (studio/moe/grouped.py);
        # "eager": transformers' per-expert loop, kept as the reference the grouped path is tested against.
        self.experts_impl = "grouped"
        self.grouped_layout = "auto"
        self.workspace_bytes = DEFAULT_WORKSPACE_BYTES
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.lora_slots = None  # studio.lora.layers.ExpertSlots when a serving engine owns this base

    # ---------- storage ----------
    def layout(self, name: str) -> tuple[int, int, int, bool]:
        """(experts, in_features, out_features, transposed) of a fused parameter."""
        e, a, b = self._shapes[name]
        return (e, a, b, True) if self.is_transposed else (e, b, a, False)

    def expert_weight(self, name: str, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert `expert`'s weight of projection `name` as a dense tensor (dequantized if stored quantized)."""
        dtype = dtype or self.compute_dtype
        if self.quant is None:
            return getattr(self, name)[expert].to(dtype)
        import bitsandbytes.functional as bnbf

        _, rows, cols = self._shapes[name]
        if self.quant.bits == 8:
            cb = getattr(self, f"{name}_int8")[expert]
            scale = getattr(self, f"{name}_scale")[expert]
            return (cb.float() * (scale.unsqueeze(1) / 127.0)).to(dtype)
        q = self.quant
        state2 = None
        absmax = getattr(self, f"{name}_absmax")[expert]
        offset = None
        if q.double_quant:
            state2 = bnbf.QuantState(absmax=getattr(self, f"{name}_absmax2")[expert],
                                     code=getattr(self, f"{name}_code2"), blocksize=256, dtype=torch.float32)
            offset = getattr(self, f"{name}_offset")[expert]
        state = bnbf.QuantState(absmax=absmax, shape=torch.Size((rows, cols)), code=getattr(self, f"{name}_code"),
                                blocksize=q.blocksize, quant_type=q.quant_type, dtype=dtype,
                                offset=offset, state2=state2)
        packed = getattr(self, f"{name}_nf4")[expert].unsqueeze(1)
        return bnbf.dequantize_4bit(packed, state)

    def dense_experts(self, name: str, experts: torch.Tensor | slice, dtype: torch.dtype | None = None
                      ) -> torch.Tensor:
        """The weights of projection `name` for the expert ids `experts` (a tensor of ids, or a slice of the expert
        range) as one dense [n, a, b] tensor (stored orientation), dequantized in one bitsandbytes call when the
        experts' quantization blocks line up."""
        dtype = dtype or self.compute_dtype
        if isinstance(experts, slice):  # a contiguous range: views of the storage, no gather
            ids = torch.arange(self.num_experts)[experts]

            def take(t):
                return t[experts]
        else:
            ids = experts

            def take(t):
                return t.index_select(0, experts)
        if self.quant is None:
            return take(getattr(self, name)).to(dtype)
        if self.quant.bits == 8:
            cb = take(getattr(self, f"{name}_int8"))
            scale = take(getattr(self, f"{name}_scale"))
            return (cb.float() * (scale.unsqueeze(2) / 127.0)).to(dtype)
        import bitsandbytes.functional as bnbf

        _, rows, cols = self._shapes[name]
        q = self.quant
        if (rows * cols) % q.blocksize:  # blocks would straddle experts: one call per expert
            return torch.stack([self.expert_weight(name, int(e), dtype) for e in ids.tolist()])
        n = ids.numel()
        absmax = take(getattr(self, f"{name}_absmax"))
        if q.double_quant:  # the statistics are 8-bit codes with their own absmax (blocks of 256) and an offset
            absmax2 = take(getattr(self, f"{name}_absmax2"))
            code2 = getattr(self, f"{name}_code2")
            blocks = absmax.shape[1]
            if blocks % 256 == 0:
                state2 = bnbf.QuantState(absmax=absmax2.reshape(-1), code=code2, blocksize=256, dtype=torch.float32)
                absmax = bnbf.dequantize_blockwise(absmax.reshape(-1), state2).view(n, blocks)
            else:
                absmax = torch.stack([bnbf.dequantize_blockwise(
                    absmax[i], bnbf.QuantState(absmax=absmax2[i], code=code2, blocksize=256, dtype=torch.float32))
                    for i in range(n)])
            absmax = absmax + take(getattr(self, f"{name}_offset")).unsqueeze(1)
        state = bnbf.QuantState(absmax=absmax.reshape(-1).float(), shape=torch.Size((n * rows, cols)),
                                code=getattr(self, f"{name}_code"), blocksize=q.blocksize, quant_type=q.quant_type,
                                dtype=dtype)
        packed = take(getattr(self, f"{name}_nf4"))
        return bnbf.dequantize_4bit(packed.reshape(-1, 1), state).view(n, rows, cols)

    def storage_bytes(self, resident: bool = False) -> int:
        """Bytes of the fused expert weights (quantized data + statistics, or the dense tensors): their full size,
        or with `resident` what this process holds right now, i.e. under FSDP2 outside a forward its shards
        (the local storage of each DTensor, FSDP's padding included)."""
        total, seen = 0, set()
        for name in self.weight_names:
            for key, t in list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False)):
                if not (key == name or (key.startswith(f"{name}_") and not key.endswith("_bias"))):
                    continue
                if not resident:
                    total += t.numel() * t.element_size()
                    continue
                local = t.to_local() if hasattr(t, "to_local") else t
                storage = local.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    # ---------- adapters ----------
    def lora_layouts(self, names: tuple[str, ...] | None = None) -> dict[str, tuple[int, int, int]]:
        out = {}
        for name in names or self.weight_names:
            e, fan_in, fan_out, _ = self.layout(name)
            out[name] = (e, fan_in, fan_out)
        return out

    def add_adapter(self, adapter: str, r: int, alpha: float, dropout: float = 0.0,
                    targets: tuple[str, ...] | None = None, use_rslora: bool = False,
                    experts: list[int] | None = None):
        """A named adapter: an ExpertAdapter (studio/lora/experts.py), as `adapters[adapter]`."""
        from studio.lora.experts import ExpertAdapter

        if adapter in self.adapters:
            raise ValueError(f"adapter {adapter!r} already exists on this experts module")
        unknown = set(targets or ()) - set(self.weight_names)
        if unknown:
            raise ValueError(f"unknown expert parameters {sorted(unknown)}; have {list(self.weight_names)}")
        device = next(iter(self.buffers()), next(iter(self.parameters()), torch.empty(0))).device
        lora = ExpertAdapter(self.lora_layouts(targets), r, alpha, dropout, use_rslora, experts).to(device)
        self.adapters[adapter] = lora
        if not self.active_adapters:
            self.active_adapters = [adapter]
        return lora

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.adapters:
            del self.adapters[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    # ---------- forward ----------
    def _project(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x @ W_expert (+ bias) + the active adapters' LoRA on every token."""
        if self.quant is None:
            w = getattr(self, name)[expert].to(x.dtype)
            y = x @ w if self.is_transposed else F.linear(x, w)
        else:
            y = _QuantizedExpertMatmul.apply(x, self, name, expert)
        bias = getattr(self, f"{name}_bias", None)
        if bias is not None:
            y = y + bias[expert].to(y.dtype)
        in_place = not torch.is_grad_enabled()
        for adapter in self.active_adapters:
            lora = self.adapters[adapter]
            if name in lora.lora_A:
                d = lora.delta(name, expert, x)
                if d is not None:  # None: the expert is outside this adapter's expert selection
                    y = y.add_(d) if in_place else y + d
        return y

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        if self._gate_fn is not None:
            return self._gate_fn(self, h)
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                **kwargs) -> torch.Tensor:
        if self.lora_slots is not None and self.lora_slots.applies():  # serving: each token's slot LoRA
            return self.lora_slots(self, hidden_states, top_k_index, top_k_weights)
        if self.experts_impl == "eager":
            return self._forward_eager(hidden_states, top_k_index, top_k_weights)
        if self.experts_impl != "grouped":
            raise ValueError(f"experts_impl must be one of {EXPERTS_IMPLS}, got {self.experts_impl!r}")
        return self._forward_grouped(hidden_states, top_k_index, top_k_weights)

    def _forward_grouped(self, hidden_states, top_k_index, top_k_weights):
        """Same function as _forward_eager: the assignments sorted once, every projection one grouped product."""
        routing = Routing(top_k_index, self.num_experts, self.grouped_layout, hidden_states.dtype)
        if routing.groups == 0:
            return torch.zeros_like(hidden_states)
        first, second = self.weight_names
        x = routing.gather_tokens(hidden_states)
        h = self._grouped_project(first, x, routing)
        if torch.is_grad_enabled() and h.requires_grad:
            # keep only the gate's input for backward and recompute the activation there: the activation's own
            # saved outputs would be another [rows, intermediate] per layer (act(gate), and more for gpt-oss's clamp)
            h = torch.utils.checkpoint.checkpoint(self._gate, h, use_reentrant=False)
        else:
            h = self._gate(h)
        out = self._grouped_project(second, h, routing)
        return routing.combine(out, top_k_weights).to(hidden_states.dtype)

    def _grouped_project(self, name: str, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x W_e (+ bias) + the active adapters' LoRA for rows in `routing`'s layout: training adapters inside one
        autograd Function (its fused backward), adapters in inference by the product a serving slot runs."""
        scalings, lora, inference = [], [], []
        for adapter in self.active_adapters:
            ad = self.adapters[adapter]
            if name not in ad.lora_A:
                continue
            if not ad.trains(name):
                inference.append(ad)
                continue
            factors = ad.grouped_factors(name, routing, x.dtype)
            if factors is None:  # none of the hit experts is in this adapter's expert selection
                continue
            a, b, s = factors
            scalings.append(s)
            lora += [ad.dropout(x), a, b]
        y = GroupedExpertProjection.apply(x, self, name, routing, tuple(scalings), *lora)
        in_place = not torch.is_grad_enabled()
        for ad in inference:
            d = ad.grouped_delta(name, routing, x)
            if d is not None:  # None: no hit expert is in this adapter's expert selection
                y = y.add_(d) if in_place else y + d
        return y

    def _forward_eager(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        first, second = self.weight_names
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit.flatten().tolist():
            if expert == self.num_experts:
                continue
            pos, tok = torch.where(mask[expert])
            h = self._project(first, expert, hidden_states[tok])
            h = self._gate(h)
            out = self._project(second, expert, h)
            out = out * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        q = "none" if self.quant is None else f"{self.quant.bits}bit/{self.quant.quant_type}"
        return (f"experts={self.num_experts}, weights={self.weight_names}, transposed={self.is_transposed}, "
                f"quant={q}, adapters={list(self.adapters)}")


def replace_experts(model: nn.Module, paths: list[str], quant: ExpertQuant | None,
                    compute_dtype: torch.dtype | None = None, experts_impl: str = "grouped"
                    ) -> dict[str, StudioExperts]:
    """Swap each fused-experts module at `paths` for a StudioExperts (quantizing as asked, unless that was done
    while loading), freeing the original dense tensors one layer at a time."""
    if experts_impl not in EXPERTS_IMPLS:
        raise ValueError(f"experts_impl must be one of {', '.join(EXPERTS_IMPLS)}, got {experts_impl!r}")
    out = {}
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = getattr(parent, child)
        if isinstance(original, StudioExperts):
            out[path] = original
            continue
        new = StudioExperts(original, quant, compute_dtype)
        new.experts_impl = experts_impl
        setattr(parent, child, new)
        for name in new.weight_names:  # drop the dense copy now, not at the end
            if hasattr(original, name):
                delattr(original, name)
        out[path] = new
    return out
