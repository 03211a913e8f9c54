"""Grouped routed-expert projections: the token->expert assignments of a layer sorted once, the hit experts
dequantized in batched calls under a workspace budget, and base + LoRA products as batched matmuls.

Used by `StudioExperts` (studio/moe/experts.py), whose per-expert eager loop stays as the reference. Written by
hand: bitsandbytes has no grouped kernel for packed experts on CPU, and transformers' grouped_mm experts
(`experts_implementation="grouped_mm"`) expect dense 3D parameters and no LoRA.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

MiB = 2 ** 20
# Transient dense weights (the dequantized hit experts of one projection) are bounded by this budget: the expert
# range is chunked when a projection's hit experts would exceed it. Larger chunks amortise kernel launches;
# smaller ones cap the training peak. Overridable per module (`StudioExperts.workspace_bytes`) or globally.
DEFAULT_WORKSPACE_BYTES = int(float(os.environ.get("STUDIO_EXPERT_WORKSPACE_MB", "16")) * MiB)
# Padding every expert's rows to the largest group costs G * cap rows; beyond this factor of the real rows the
# jagged layout is used instead (torch._grouped_mm, which also handles skewed routing without waste). The rule for
# training, and for inference off the CPU.
MAX_PADDING_WASTE = 2.0
# Inference on the CPU, where torch._grouped_mm is a loop of one matmul per group (bench/expert_layouts.py, one layer
# of the bench/serve.py models' experts): with one torch thread the loop was as fast as the padded bmm at decode
# and 4-25% faster from 96 tokens on, so it is always jagged; with more threads every group's matmul pays an OpenMP
# fork and join, and the padded bmm was 25-30% faster at decode (cap about 4) but 4-10% slower from 384 tokens
# (cap 60 and more), so it is padded while the fullest group holds at most this many rows ...
CPU_INFERENCE_PADDED_MAX_CAP = 32
# ... and the padding stays within this factor of the real rows (a decode step of 12 rows sits at 2.1-2.2)
CPU_INFERENCE_MAX_PADDING_WASTE = 4.0
LAYOUTS = ("auto", "padded", "jagged")


def _pad16(n: int, element_size: int) -> int:
    """Elements to add so that n elements span a multiple of 16 bytes (torch._grouped_mm's stride rule)."""
    per = 16 // element_size
    return (-n) % per


def _grouped_mm_fast(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm has fused kernels for bf16 on sm90+ GPUs; elsewhere it loops over the groups (CPU) or is
    unsupported, and `_auto_layout` weighs it against a padded batched matmul (one bmm)."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _auto_layout(groups: int, cap: int, rows: int, device: torch.device, dtype: torch.dtype) -> str:
    """The layout for `groups` hit groups of `rows` rows, the fullest holding `cap` (see the constants above)."""
    if _grouped_mm_fast(device, dtype):
        return "jagged"
    waste = groups * cap / max(rows, 1)
    if device.type != "cpu" or torch.is_grad_enabled():
        return "jagged" if waste > MAX_PADDING_WASTE else "padded"
    if (torch.get_num_threads() == 1 or cap > CPU_INFERENCE_PADDED_MAX_CAP
            or waste > CPU_INFERENCE_MAX_PADDING_WASTE):
        return "jagged"
    return "padded"


class _Rows(torch.autograd.Function):
    """out = src[index] (forward) with a backward that writes instead of accumulating: `index` never repeats a
    position of src here, so the gradient is a plain indexed write into zeros (parallel), where index_select's own
    backward (index_add) accumulates row by row. `fold` > 1 sums groups of `fold` consecutive positions of src
    afterwards (src = tokens repeated top_k times, see gather_tokens)."""

    @staticmethod
    def forward(ctx, src, index, rows, fold):
        ctx.save_for_backward(index)
        ctx.rows, ctx.fold = rows, fold
        return src.index_select(0, index // fold if fold > 1 else index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.rows * ctx.fold, grad.shape[-1])
        out.index_put_((index,), grad)
        if ctx.fold > 1:
            out = out.view(ctx.rows, ctx.fold, -1).sum(1)
        return out, None, None, None


class _Place(torch.autograd.Function):
    """out = zeros(size); out[index] = src (forward, `index` without repeats), then optionally the sum of groups
    of `fold` consecutive rows; backward is a gather. Replaces index_add_, which adds row by row on the CPU."""

    @staticmethod
    def forward(ctx, src, index, size, fold):
        ctx.save_for_backward(index)
        ctx.fold = fold
        out = src.new_zeros(size * fold, src.shape[-1])
        out.index_put_((index,), src)
        return out.view(size, fold, -1).sum(1) if fold > 1 else out

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index // ctx.fold if ctx.fold > 1 else index), None, None, None


class Routing:
    """One layer's assignments sorted by expert: which experts are hit (`hit`, G of them), their row counts, and,
    for the sorted rows, the flat top-k slot (`slot`, token * top_k + position) each came from.

    Rows live in one of two layouts, chosen per layer:
    * padded [G, cap, d]: each hit expert's rows zero-padded to the largest count; products are `torch.bmm`.
    * jagged [n, d]: rows back to back with int32 `offs`; products are `torch._grouped_mm`.
    """

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, layout: str = "auto",
                 dtype: torch.dtype = torch.float32):
        k = top_k_index.shape[-1]
        self.top_k, self.tokens = k, top_k_index.shape[0]
        flat = top_k_index.reshape(-1)
        device = flat.device
        with torch.no_grad():
            counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
            # stable: rows of one expert keep token order, as in the eager loop. Ids >= num_experts (the unused-slot
            # sentinel some families use) sort last and are cut off below.
            order = torch.sort(flat, stable=True).indices
        host = counts.tolist()  # the one host sync per layer (the eager loop syncs once per hit expert)
        hit = [e for e, c in enumerate(host) if c]
        self.num_experts = num_experts
        self.hit = torch.tensor(hit, dtype=torch.long, device=device)
        self.counts = [host[e] for e in hit]
        self.groups = len(hit)
        self.rows = sum(self.counts)
        self.slot = order[: self.rows]
        self.cap = max(self.counts, default=0)
        if layout == "auto":
            layout = _auto_layout(self.groups, self.cap, self.rows, device, dtype)
        if layout not in ("padded", "jagged"):
            raise ValueError(f"grouped layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        counts_t = torch.tensor(self.counts, dtype=torch.long, device=device)
        ends = torch.cumsum(counts_t, 0)
        self.group_of_row = torch.repeat_interleave(torch.arange(self.groups, device=device), counts_t)
        self.offs = ends.to(torch.int32)
        self.starts = [0] + ends.tolist()[:-1] if self.groups else []
        self._first_row = ends - counts_t
        self._grid_index = None
        self._grid_rows = None
        if layout == "padded":
            self.pad_index = self.group_of_row * self.cap + self.rank_in_group()

    def rank_in_group(self) -> torch.Tensor:
        """[rows] each sorted row's position among its expert's rows."""
        return torch.arange(self.rows, device=self.hit.device) - self._first_row[self.group_of_row]

    def grid_index(self) -> torch.Tensor:
        """[rows] each sorted row's place in a zero-padded [groups, cap] grid of the hit groups (the padded layout's
        own index; for jagged rows, the grid that per-group batched matmuls run on)."""
        if self._grid_index is None:
            self._grid_index = (self.pad_index if self.layout == "padded"
                                else self.group_of_row * self.cap + self.rank_in_group())
        return self._grid_index

    def grid_rows(self) -> torch.Tensor:
        """[groups * cap] for every cell of the [groups, cap] grid the sorted row it holds; padding cells name row 0
        (`rows.index_select(0, grid_rows())` fills the grid in one op; what lands in padding cells is never read)."""
        if self._grid_rows is None:
            idx = self.grid_index()
            self._grid_rows = torch.zeros(self.groups * self.cap, dtype=torch.long, device=idx.device).index_copy_(
                0, idx, torch.arange(self.rows, device=idx.device))
        return self._grid_rows

    # ---- moving rows in and out of the layout ----
    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d] token states -> the layout: each token once per expert it is routed to (differentiable)."""
        rows = _Rows.apply(x, self.slot, self.tokens, self.top_k)
        return self.to_layout(rows)

    def combine(self, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The layout -> [T, d]: each token's expert outputs times its routing weights, summed (differentiable)."""
        rows = self.from_layout(t) * weights.reshape(-1).index_select(0, self.slot).unsqueeze(1).to(t.dtype)
        return _Place.apply(rows, self.slot, self.tokens, self.top_k)

    def to_layout(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, d] sorted rows -> the layout (differentiable)."""
        if self.layout == "jagged":
            return rows
        return _Place.apply(rows, self.pad_index, self.groups * self.cap, 1).view(self.groups, self.cap, -1)

    def from_layout(self, t: torch.Tensor) -> torch.Tensor:
        """The layout -> [n, d] sorted rows (differentiable)."""
        if self.layout == "jagged":
            return t
        return _Rows.apply(t.reshape(-1, t.shape[-1]), self.pad_index, self.groups * self.cap, 1)

    def select(self, per_expert: torch.Tensor) -> torch.Tensor:
        """[E, ...] per-expert tensors -> [G, ...] for the hit experts (a view when every expert is hit)."""
        if self.groups == self.num_experts:
            return per_expert
        return per_expert.index_select(0, self.hit)

    def per_group(self, values: torch.Tensor) -> torch.Tensor:
        """[G, d] per-expert values broadcast onto the layout's rows (biases)."""
        if self.layout == "jagged":
            return values.index_select(0, self.group_of_row)
        return values.unsqueeze(1)

    # ---- products ----
    def span(self, g0: int, g1: int) -> tuple[slice, torch.Tensor | None]:
        """The layout's index for groups g0..g1 and, for the jagged layout, their offsets relative to the span."""
        if self.layout == "padded":
            return slice(g0, g1), None
        start = self.starts[g0]
        end = self.starts[g1] if g1 < self.groups else self.rows
        return slice(start, end), self.offs[g0:g1] - start

    def mm(self, a: torch.Tensor, w: torch.Tensor, g0: int = 0, g1: int | None = None) -> torch.Tensor:
        """Each group's rows of `a` (the layout, or the span g0..g1 of it) times that group's w [G, K, M]."""
        g1 = self.groups if g1 is None else g1
        if self.layout == "padded":
            return torch.bmm(a, w)
        _, offs = self.span(g0, g1)
        k, m = w.shape[-2:]
        pk, pm = _pad16(k, a.element_size()), _pad16(m, a.element_size())
        if pk or pm:  # LoRA ranks such as 6 or 18: zero columns/rows change no product
            a, w = F.pad(a, (0, pk)), F.pad(w, (0, pm, 0, pk))
        out = torch._grouped_mm(a, w, offs=offs)
        return out[:, :m] if pm else out

    def wgrad(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per group a_g^T b_g -> [G, p, q] (weight gradients), for a [rows, p] and b [rows, q] in the layout."""
        if self.layout == "padded":
            return torch.bmm(a.transpose(1, 2), b)
        p, q = a.shape[-1], b.shape[-1]
        pp, pq = _pad16(p, a.element_size()), _pad16(q, b.element_size())
        if pp or pq:
            a, b = F.pad(a, (0, pp)), F.pad(b, (0, pq))
        return torch._grouped_mm(a.t(), b, offs=self.offs)[:, :p, :q]

    def chunks(self, bytes_per_expert: int, budget: int) -> list[tuple[int, int]]:
        """Ranges of hit experts whose dense weights fit the workspace budget (at least one expert each)."""
        per = max(1, budget // max(bytes_per_expert, 1))
        return [(g, min(g + per, self.groups)) for g in range(0, self.groups, per)]


def _base_product(owner, name: str, x: torch.Tensor, routing: Routing, transpose: bool) -> torch.Tensor:
    """Each row times its expert's frozen weight (transpose=False: the forward x W; True: the backward g W^T),
    dequantizing the hit experts chunk by chunk so no more than the workspace budget is dense at once."""
    e, a, b = owner._shapes[name]
    fan_in, fan_out = (a, b) if owner.is_transposed else (b, a)
    width = fan_in if transpose else fan_out
    out_shape = ((routing.groups, routing.cap, width) if routing.layout == "padded" else (routing.rows, width))
    out = x.new_empty(out_shape)
    bytes_per_expert = a * b * x.element_size()
    for g0, g1 in routing.chunks(bytes_per_expert, owner.workspace_bytes):
        experts = slice(g0, g1) if routing.groups == routing.num_experts else routing.hit[g0:g1]
        w = owner.dense_experts(name, experts, x.dtype)  # stored orientation [n, a, b]
        # as [n, in, out] for the forward product; its transpose [n, out, in] for the input gradient
        w = w if owner.is_transposed else w.transpose(1, 2)
        if transpose:
            w = w.transpose(1, 2)
        span, _ = routing.span(g0, g1)
        out[span] = routing.mm(x[span], w, g0, g1)
        del w
    return out


class GroupedExpertProjection(torch.autograd.Function):
    """y = x W_e (+ b_e) + sum over adapters of s * (xd A_e^T) B_e^T for every row, e its expert, rows in a
    Routing layout. Saves no dense weight: backward dequantizes the hit experts again (chunked), as bitsandbytes
    does for its 4-bit linears. Returns gradients for x, each adapter's dropped-out input xd and its factors
    A [G, r, in] and B [G, out, r] (the hit experts' slices; autograd scatters them into the parameters)."""

    @staticmethod
    def forward(ctx, x, owner, name, routing, scalings, *lora):
        y = _base_product(owner, name, x, routing, transpose=False)
        bias = getattr(owner, f"{name}_bias", None)
        if bias is not None:
            y += routing.per_group(bias.index_select(0, routing.hit).to(y.dtype))
        saved = []
        for i, s in enumerate(scalings):
            xd, a, b = lora[3 * i: 3 * i + 3]
            xa = routing.mm(xd, a.transpose(1, 2))
            y += routing.mm(xa, b.transpose(1, 2)).mul_(s)
            saved += [xd, xa, a, b]
        ctx.owner, ctx.name, ctx.routing, ctx.scalings = owner, name, routing, scalings
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad):
        routing = ctx.routing
        grad = grad.contiguous()
        grad_x = (_base_product(ctx.owner, ctx.name, grad, routing, transpose=True)
                  if ctx.needs_input_grad[0] else None)
        saved = ctx.saved_tensors
        grads = []
        for i, s in enumerate(ctx.scalings):
            xd, xa, a, b = saved[4 * i: 4 * i + 4]
            gs = grad * s
            grad_b = routing.wgrad(gs, xa)             # [G, out, r]
            grad_xa = routing.mm(gs, b)                # [rows, r]
            grad_a = routing.wgrad(grad_xa, xd)        # [G, r, in]
            grad_xd = routing.mm(grad_xa, a) if ctx.needs_input_grad[5 + 3 * i] else None
            grads += [grad_xd, grad_a, grad_b]
        return (grad_x, None, None, None, None, *grads)
