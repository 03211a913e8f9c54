"""The LoRA layers shared by training and serving: `SlotLinear` (a base linear with named and serving slots),
`ExpertSlots` (a StudioExperts' serving slot buffers), the per-forward `LoraBatch` and the expert LoRA product.

Owns: the layers' slot buffers, as vLLM's punica wrapper: every SlotLinear holds A [S, R, in] and B^T [S, R, out],
every ExpertSlots A^T [S, E, in, R] and B^T [S, E, R, out], for S = max_slots at the largest rank R seen so far, LoRA
scaling folded into B, smaller ranks zero-padded (zero columns add nothing); the `LoraBatch` (token -> slot index,
built once per forward on the device, read by every layer); and `_expert_lora`, the expert LoRA product on the hit
experts (serving slots and an ExpertAdapter in inference run it). Which adapter is in which slot is not decided
here (the engine's residency does) and saved files are not read here (studio/lora/slots.py writes them in).

A forward where every row uses one slot runs two plain matmuls per linear, and per expert projection two batched
matmuls over a padded grid of the hit experts, their factors gathered from the slot's buffers (grouped products
once an expert holds many rows, as in prefills, or for skewed routing: `_grid_pays`). A mixed forward runs, while
it has few tokens (decode), every token through the used slots' linear factors as one masked rank (two matmuls on
views of the buffers), else sorts its tokens by slot once for all linears; its experts sort the (slot, expert)
assignments once per MoE layer over the used slots lo..hi (a view of the buffers) and run the same grid on the hit
(slot, expert) groups. Nothing is rebuilt per adapter set and no PEFT code runs at serving time.

Training (studio.lora.io.apply_plan) uses SlotLinear with one named slot per adapter in PEFT's layout
(`lora_A[name].weight` [r, in] / `lora_B[name].weight` [out, r]); routed experts train an ExpertAdapter
(studio/lora/experts.py) instead of an ExpertSlots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from studio.moe.experts import StudioExperts
from studio.moe.grouped import GroupedExpertProjection, Routing


class LoraBatch:
    """Which slot every row of the current forward uses (-1: the bare base). Set by the engine once per forward;
    read by every slot layer. `uniform` is the one slot of a batch whose rows all use it (or None).

    A layer's input holds the rows' tokens row-major ([rows, L, d] or flattened [rows * L, d]); L is the forward's
    new tokens for most layers but the whole cached length for some (DeepSeek's MLA expands its cached latents with
    kv_b_proj every step), so the token -> slot index and the tokens' sort by slot are built once per forward for
    each length seen and reused by every layer."""

    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.active = False        # False: no LoRA at all this forward
        self.uniform: int | None = None
        self.rows = 0
        self.row_slot: torch.Tensor | None = None  # [rows] long on the device, mixed batches only
        self.slot_range = (0, max_slots - 1)       # lowest and highest slot a mixed batch uses
        self._tokens: dict = {}    # tokens -> token_slot [tokens]
        self._routing: dict = {}   # (tokens, device, dtype) -> Routing of the tokens by slot (the linears' segments)

    def set(self, row_slots: list[int | None], device=None) -> None:
        """Rows' slots for the next forward(s); `device`: where the model runs."""
        self._tokens, self._routing = {}, {}
        distinct = set(row_slots)
        if distinct == {None}:
            self.active, self.uniform, self.row_slot = False, None, None
            return
        self.active = True
        if len(distinct) == 1:
            self.uniform, self.row_slot = row_slots[0], None
            return
        self.uniform = None
        self.rows = len(row_slots)
        used = [s for s in row_slots if s is not None]
        self.slot_range = (min(used), max(used))  # the slots' buffers lo..hi are one view of every layer's
        self.row_slot = torch.tensor([-1 if s is None else s for s in row_slots], dtype=torch.long,
                                     device=device or "cpu")

    def clear(self) -> None:
        self.active, self.uniform, self.row_slot, self._tokens, self._routing = False, None, None, {}, {}

    def token_slot(self, tokens: int) -> torch.Tensor:
        """[tokens] slot of every token of a row-major input holding `tokens` tokens (-1: the bare base)."""
        hit = self._tokens.get(tokens)
        if hit is None:
            if tokens % self.rows:
                raise RuntimeError(f"a LoRA layer got {tokens} tokens, not a multiple of the batch's {self.rows} rows")
            hit = self._tokens[tokens] = self.row_slot.repeat_interleave(tokens // self.rows)
        return hit

    def slot_mask(self, tokens: int, rank: int, device, dtype) -> torch.Tensor:
        """[tokens, n * rank] 1 where a column (slot lo + c // rank) is the token's slot, for the slots lo..hi of
        `slot_range` (built once per forward and length; every linear reuses it)."""
        key = ("mask", tokens, rank, device, dtype)
        hit = self._routing.get(key)
        if hit is None:
            lo, hi = self.slot_range
            columns = torch.arange(lo, hi + 1, device=device).repeat_interleave(rank)
            hit = self._routing[key] = (self.token_slot(tokens).to(device)[:, None] == columns).to(dtype)
        return hit

    def linear_routing(self, tokens: int, device, dtype) -> Routing:
        """The tokens sorted by slot (base tokens left out), once per forward and length; every linear reuses it."""
        key = (tokens, device, dtype)
        hit = self._routing.get(key)
        if hit is None:
            slot = self.token_slot(tokens).to(device)
            ids = torch.where(slot < 0, self.max_slots, slot)
            hit = self._routing[key] = Routing(ids[:, None], self.max_slots, "auto", dtype)
        return hit


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _grow(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """A zero tensor of `shape` holding `t` in its leading corner (slot buffers growing to a larger rank)."""
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


# A mixed batch's linear LoRA runs every token through all the batch's slots (masked) while that costs at most this
# many multiply-adds (decode steps); beyond it (long prefills) the tokens are sorted by slot for grouped products.
DENSE_MIXED_MACS = 2 ** 22


class _Factor(nn.Module):
    """One trainable LoRA factor, held as `.weight` so that its name is PEFT's (`lora_A.<adapter>.weight`): the
    checkpoint keys, optimizer state names (FSDP2's distributed checkpoints are keyed by them) and saved files stay
    what they were with PEFT's layers."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class SlotLinear(nn.Module):
    """A base linear (nn.Linear, bitsandbytes Linear4bit/8bit) plus LoRA slots: y = base(x) + B[s] (A[s] x).

    Two kinds of slot, one layer (training and serving share it):
    * serving slots (`enable_slots`, written by LoraSlots from saved files): stacked buffers slot_A [S, R, in] and
      slot_B [S, R, out], scaling folded into B, the slot of every row read from the LoraBatch;
    * named slots (`add_adapter`, studio.lora.io.apply_plan): one adapter's factors in PEFT's layout and init,
      lora_A[name].weight [r, in] (kaiming-uniform) and lora_B[name].weight [out, r] (zeros), as parameters that
      train, with the scaling kept apart from B (so Adam sees PEFT's parameters: the same lr trains the same) and
      dropout on the LoRA input. One named slot is active at a time (`set_adapter`), applied while no serving
      batch is active (serving rows take precedence, as in StudioExperts)."""

    def __init__(self, base_layer: nn.Module, batch: LoraBatch | None = None, max_slots: int = 0, rank: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.batch = None
        self.register_buffer("slot_A", None)
        self.register_buffer("slot_B", None)
        self.filled: list[bool] = []
        if max_slots:
            self.enable_slots(batch, max_slots, rank, dtype)

    # ---- named slots (training, single-adapter inference) ----
    def add_adapter(self, adapter: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        """A named slot with PEFT's initialisation. The random draws are PEFT's too (its update_layer builds two
        nn.Linear, each initialised on construction, then re-initialises A), so a seeded run starts from the
        same factors as it did with PEFT's layers."""
        if adapter in self.lora_A:
            raise ValueError(f"adapter {adapter!r} already exists on this layer")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        weight = getattr(self.base_layer, "weight", None)
        device = weight.device if weight is not None else next(self.base_layer.parameters()).device
        # PEFT's dtype rule: the base weight's dtype when it is a float, float32 for quantized weights
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        a = torch.empty(r, self.in_features)
        b = torch.empty(self.out_features, r)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r)'s own init (PEFT's RNG stream) ...
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))  # ... nn.Linear(r, out)'s ...
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # ... and PEFT's reset of A; B starts at zero
        b.zero_()
        self.lora_A[adapter] = _Factor(a.to(device, dtype))
        self.lora_B[adapter] = _Factor(b.to(device, dtype))
        self.lora_dropout[adapter] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[adapter] = lora_scaling(r, alpha, use_rslora)

    def set_adapter(self, adapter: str | None) -> None:
        """Apply named slot `adapter` from now on (None, or a name this layer does not have: none)."""
        self.active_adapter = adapter if adapter in self.lora_A else None

    def delete_adapter(self, adapter: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            if adapter in d:
                del d[adapter]
        self.scaling.pop(adapter, None)
        if self.active_adapter == adapter:
            self.active_adapter = None

    def _named_forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + s * B (A dropout(x)) for the active named slot (PEFT's lora.Linear forward, same order of ops)."""
        n = self.active_adapter
        a, b = self.lora_A[n].weight, self.lora_B[n].weight
        d = F.linear(F.linear(self.lora_dropout[n](x.to(a.dtype)), a), b) * self.scaling[n]
        return y + d.to(y.dtype)

    # ---- serving slots ----
    def enable_slots(self, batch: LoraBatch, max_slots: int, rank: int, dtype: torch.dtype) -> None:
        """Allocate the serving slot buffers (zeros: every slot empty)."""
        device = next(self.base_layer.parameters()).device
        self.batch = batch
        self.register_buffer("slot_A", torch.zeros(max_slots, rank, self.in_features, dtype=dtype, device=device))
        # B stored transposed, [S, R, out]: the slots lo..hi of a mixed batch are then one [n * R, out] view
        self.register_buffer("slot_B", torch.zeros(max_slots, rank, self.out_features, dtype=dtype, device=device))
        self.filled = [False] * max_slots  # slots whose adapter targets this layer

    def grow(self, rank: int) -> None:
        s, _, i = self.slot_A.shape
        self.slot_A = _grow(self.slot_A, (s, rank, i))
        self.slot_B = _grow(self.slot_B, (s, rank, self.out_features))

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [r, in], b [out, r] already scaled."""
        r = a.shape[0]
        self.slot_A[slot].zero_()
        self.slot_B[slot].zero_()
        self.slot_A[slot, :r] = a.to(self.slot_A.dtype)
        self.slot_B[slot, :r] = b.t().to(self.slot_B.dtype)
        self.filled[slot] = True

    def clear(self, slot: int) -> None:
        self.slot_A[slot].zero_()
        self.slot_B[slot].zero_()
        self.filled[slot] = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        batch = self.batch
        if batch is None or not batch.active:  # no serving rows (as in StudioExperts): the named slot, if any
            return y if self.active_adapter is None else self._named_forward(y, x)
        if batch.uniform is not None:
            s = batch.uniform
            if not self.filled[s]:
                return y
            xa = F.linear(x.to(self.slot_A.dtype), self.slot_A[s])
            if y.dtype == xa.dtype:  # one fused kernel for the product and the sum (fewer ops: decode is op-bound)
                return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), self.slot_B[s]).view_as(y)
            return y + (xa @ self.slot_B[s]).to(y.dtype)
        flat = x.reshape(-1, x.shape[-1]).to(self.slot_A.dtype)
        lo, hi = batch.slot_range
        n, rank = hi - lo + 1, self.slot_A.shape[1]
        if flat.shape[0] * n * rank * (self.in_features + self.out_features) <= DENSE_MIXED_MACS:
            # few tokens (decode): every token through the used slots' factors as one [n * R] rank, the columns of
            # the other slots zeroed by the batch's mask; two plain matmuls on views of the buffers, no sort
            xa = F.linear(flat, self.slot_A[lo:hi + 1].reshape(n * rank, -1))
            xa.mul_(batch.slot_mask(flat.shape[0], rank, flat.device, flat.dtype))
            b = self.slot_B[lo:hi + 1].reshape(n * rank, -1)
            if y.dtype == xa.dtype:
                return torch.addmm(y.reshape(-1, y.shape[-1]), xa, b).view_as(y)
            return y + (xa @ b).view(*y.shape[:-1], -1).to(y.dtype)
        routing = batch.linear_routing(flat.shape[0], flat.device, flat.dtype)
        if routing.groups == 0:
            return y
        h = routing.mm(routing.gather_tokens(flat), routing.select(self.slot_A).transpose(1, 2))
        d = routing.from_layout(routing.mm(h, routing.select(self.slot_B)))
        out = y.reshape(-1, y.shape[-1])  # the base's fresh output, added to in place (inference only)
        out.index_add_(0, routing.slot, d.to(out.dtype))
        return out.view_as(y)

    def extra_repr(self) -> str:
        serving = "" if self.slot_A is None else f"slots={self.slot_A.shape[0]}, rank={self.slot_A.shape[1]}, "
        return f"{serving}adapters={list(self.lora_A)}"


# Expert LoRA runs as two bmm over a padded [hit groups, cap] grid (padded routing is that grid already) while
# the fullest group holds few rows (decode); beyond that, or when jagged routing (one group far larger than the
# others) would make the grid mostly padding, grouped products (torch._grouped_mm) run instead. On the CPU the grouped
# products are a loop of small matmuls, one group after another, while bmm spreads its batch over the threads, so the
# grid keeps paying up to a larger cap with more threads. bench/expert_lora_paths.py (2026-12-01, idle, warm caches,
# r=16, the bench/serve.py models' shapes): the grid took 0.6-0.8x the grouped loop's time at cap 4-5, ties at cap 7-9
# and 1.2-1.45x at cap 19-21 with 1 thread; with 2 threads 0.35-0.7x up to cap 21; at cap 61-62 (384-token prefills)
# the grid took 1.5-9x the grouped loop's time with either (its zero-filled grid and outputs of several MiB each).
GRID_MAX_CAP = 32             # largest cap the grid runs on with 2 or more torch threads ...
GRID_MAX_CAP_ONE_THREAD = 12  # ... and with one
GRID_MACS_PER_GROUP = 2 ** 21  # padding multiply-adds per hit group beyond which jagged routing goes grouped


def _grid_pays(routing: Routing, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `_expert_lora` runs on the grid of the hit groups rather than on grouped products: always for padded
    routing (x is that grid); for jagged routing while the fullest group holds at most GRID_MAX_CAP rows
    (GRID_MAX_CAP_ONE_THREAD with one torch thread) and the grid's padding costs less than GRID_MACS_PER_GROUP per
    hit group."""
    if routing.layout == "padded":
        return True
    if routing.cap > (GRID_MAX_CAP_ONE_THREAD if torch.get_num_threads() == 1 else GRID_MAX_CAP):
        return False
    padding_macs = (routing.groups * routing.cap - routing.rows) * (a.shape[1] + b.shape[2]) * a.shape[2]
    return padding_macs <= GRID_MACS_PER_GROUP * routing.groups


def _expert_lora(routing: Routing, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """(x A_g^T) B_g^T for every row of `routing`'s layout x, g the row's group (its expert, or its (slot, expert)
    pair in a mixed batch), in the same layout (inference only); a = A^T [groups, in, R] and b = B^T [groups, R, out]
    (the slot layout) hold the factors of every group `routing` can hit, cast to `dtype` (if given) after the
    gather, so that buffers of another dtype than the activations cost a copy of the hit groups' factors only.

    The hit groups' factors are gathered (a view when every group is hit) and the rows go through them as two
    batched matmuls over a padded [hit groups, cap] grid, or as grouped products where `_grid_pays` says the
    grid does not pay. A grid over all groups would use the slot buffers in
    place, without the gather, but its unhit groups' factors and zero rows cost more than the gather did
    (bench/expert_lora_paths.py: 1.15-1.5x slower at 12 of 16 and 48 of 64 experts hit, cold caches)."""
    a, b = routing.select(a), routing.select(b)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    if routing.layout == "padded":  # x [G, cap, in] is the grid
        return torch.bmm(torch.bmm(x, a), b)
    if not _grid_pays(routing, a, b):  # many rows per group (prefill) or skewed: grouped products on the jagged rows
        return routing.mm(routing.mm(x, a), b)
    g, cap = routing.groups, routing.cap
    # x [rows, in], rows sorted by group, into the grid in one gather: padding cells get a copy of a real row
    # instead of zeros (no fill), and their products are never read back
    grid = x.index_select(0, routing.grid_rows())
    d = torch.bmm(torch.bmm(grid.view(g, cap, -1), a), b)
    return d.view(g * cap, -1).index_select(0, routing.grid_index())


class ExpertSlots(nn.Module):
    """Serving LoRA slots of one StudioExperts module: slot buffers per targeted fused projection, A^T [S, E, in, R],
    B^T [S, E, R, out] (expert-major, transposed, scaled; studio.lora.experts.peft_to_slot_layout converts a saved
    adapter's factors to it), installed as `experts.lora_slots`. StudioExperts.forward hands over to `forward` when
    the batch has LoRA rows. Inference only: an adapter trains as an ExpertAdapter (studio/lora/experts.py)."""

    def __init__(self, owner: StudioExperts, batch: LoraBatch, max_slots: int, rank: int, dtype: torch.dtype):
        super().__init__()
        self.batch = batch
        self.max_slots = max_slots
        self.num_experts = owner.num_experts
        self.lora_A = nn.ParameterDict()  # plain tensors would do; buffers in a dict need names, so frozen params
        self.lora_B = nn.ParameterDict()
        device = next(iter(owner.buffers()), next(iter(owner.parameters()), torch.empty(0))).device
        for name in owner.weight_names:
            e, fan_in, fan_out, _ = owner.layout(name)
            self.lora_A[name] = nn.Parameter(torch.zeros(max_slots, e, fan_in, rank, dtype=dtype, device=device),
                                             requires_grad=False)
            self.lora_B[name] = nn.Parameter(torch.zeros(max_slots, e, rank, fan_out, dtype=dtype, device=device),
                                             requires_grad=False)
        self.filled = {name: [False] * max_slots for name in owner.weight_names}

    def grow(self, rank: int) -> None:
        for name in list(self.lora_A):
            s, e, i, _ = self.lora_A[name].shape
            o = self.lora_B[name].shape[3]
            self.lora_A[name] = nn.Parameter(_grow(self.lora_A[name].data, (s, e, i, rank)), requires_grad=False)
            self.lora_B[name] = nn.Parameter(_grow(self.lora_B[name].data, (s, e, rank, o)), requires_grad=False)

    def write(self, slot: int, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [E, in, r], b [E, r, out] (the slot layout, studio.lora.experts.peft_to_slot_layout) already scaled."""
        r = a.shape[2]
        A, B = self.lora_A[name].data, self.lora_B[name].data
        A[slot].zero_()
        B[slot].zero_()
        A[slot, :, :, :r] = a.to(A.dtype)
        B[slot, :, :r] = b.to(B.dtype)
        self.filled[name][slot] = True

    def clear(self, slot: int) -> None:
        for name in self.lora_A:
            self.lora_A[name].data[slot].zero_()
            self.lora_B[name].data[slot].zero_()
            self.filled[name][slot] = False

    def applies(self) -> bool:
        b = self.batch
        return b.active and (b.uniform is None or any(f[b.uniform] for f in self.filled.values()))

    def forward(self, owner: StudioExperts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """StudioExperts' grouped forward with every token's slot LoRA (inference only)."""
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            raise RuntimeError("slot LoRA is for inference: train with the adapter's own layers (studio.lora.io)")
        routing = Routing(top_k_index, owner.num_experts, owner.grouped_layout, hidden_states.dtype)
        if routing.groups == 0:
            return torch.zeros_like(hidden_states)
        mixed = None if self.batch.uniform is not None else self._mixed_routing(hidden_states, top_k_index, routing)
        first, second = owner.weight_names
        x = routing.gather_tokens(hidden_states)
        h = owner._gate(self._project(owner, first, x, routing, mixed))
        out = self._project(owner, second, h, routing, mixed)
        return routing.combine(out, top_k_weights).to(hidden_states.dtype)

    def _mixed_routing(self, hidden_states, top_k_index, routing: Routing):
        """The assignments sorted by (slot, expert), once per layer, over the slots lo..hi the batch uses (their
        buffers are one view, [n * E, ...]), and where each of its rows sits in `routing`'s layout (flattened to
        rows, or to the cells of the padded grid): one gather takes them out of x, one index_add puts them back."""
        e = self.num_experts
        lo, hi = self.batch.slot_range
        slot = self.batch.token_slot(hidden_states.shape[0]).to(top_k_index.device)[:, None]
        n = hi - lo + 1
        key = torch.where((slot >= 0) & (top_k_index < e), (slot - lo) * e + top_k_index, n * e)
        # jagged: its rows are the gathered rows as they come; _expert_lora picks the grid or grouped products
        by_slot = Routing(key, n * e, "jagged", hidden_states.dtype)
        row = (routing.pad_index if routing.layout == "padded"
               else torch.arange(routing.rows, device=top_k_index.device))
        where = torch.empty(top_k_index.numel(), dtype=torch.long, device=top_k_index.device)
        where[routing.slot] = row
        return by_slot, where[by_slot.slot], lo, hi

    def _project(self, owner, name, x, routing: Routing, mixed) -> torch.Tensor:
        filled = self.filled.get(name)
        A, B = self.lora_A[name], self.lora_B[name]
        y = GroupedExpertProjection.apply(x, owner, name, routing, ())
        if mixed is None:  # one slot on every row
            s = self.batch.uniform
            if filled is None or not filled[s]:
                return y
            return y.add_(_expert_lora(routing, x, A[s], B[s], x.dtype))
        if filled is None or not any(filled):
            return y
        by_slot, where, lo, hi = mixed
        if by_slot.groups == 0:
            return y
        # slots lo..hi over all experts: group g of by_slot is slot lo + g // E, expert g % E (a view, no copy)
        flat_a = A[lo:hi + 1].reshape(-1, *A.shape[2:])
        flat_b = B[lo:hi + 1].reshape(-1, *B.shape[2:])
        rows = x.reshape(-1, x.shape[-1]).index_select(0, where)
        d = _expert_lora(by_slot, rows, flat_a, flat_b, x.dtype)  # x's dtype, the projection's
        # y is the base's fresh output in `routing`'s layout: added to in place (no autograd here)
        y.view(-1, y.shape[-1]).index_add_(0, where, d)
        return y


