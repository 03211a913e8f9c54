"""The memory planner: parameter counts (total, active per token) and a training-memory estimate for LoRA /
QLoRA on an MoE, from a config alone (the model is built on the `meta` device). Run `studio models plan`.

Every number below the parameter counts is an ESTIMATE from explicit formulas (see `estimate_training_memory`);
real peaks depend on kernels, allocator fragmentation and framework versions. Expect roughly +-20%.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
from dataclasses import dataclass, field

from studio.errors import ModelError, PlanError

COMPONENTS = ("attention", "routed_experts", "shared_experts", "router", "dense_mlp", "embeddings", "lm_head",
              "norms", "other")
QUANT_MODES = ("4bit", "8bit", "none")
GiB = 1 << 30
DEFAULT_OVERHEAD_BYTES = int(1.5 * GiB)  # CUDA context + cuBLAS workspaces + caching-allocator slack
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize used by the studio (one fp32 absmax per 64 weights)
DQ_BLOCK = 256  # double quant: 8-bit absmax, one fp32 second-level absmax per 256 blocks
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# Fallback classification by parameter name, used for parameters the architecture table (studio.moe.arch)
# does not place: norms, attention sinks, and whole unknown families. First match wins.
_NAME_PATTERNS = (
    ("norms", re.compile(r"norm[^.]*\.(weight|bias)$")),
    ("router", re.compile(r"\.(gate|router|shared_expert_gate)\.(weight|bias|e_score_correction_bias)$")),
    ("shared_experts", re.compile(r"\.shared_experts?\.")),
    ("routed_experts", re.compile(r"\.experts\.")),
    ("attention", re.compile(r"\.(self_attn|attention|attn)\.")),
    ("dense_mlp", re.compile(r"\.(mlp|feed_forward|ffn)\.")),
    ("embeddings", re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings)\.")),
    ("lm_head", re.compile(r"(^|\.)(lm_head|embed_out)\.")),
)
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    component: str
    layer: int | None  # decoder layer index, None outside the layer stack

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_bias(self) -> bool:
        return self.name.endswith("bias") or len(self.shape) < 2


@dataclass
class ParamCounts:
    """Parameter counts of an architecture, by component.

    `active` = every parameter except routed experts, plus routed_experts * top_k / num_experts: the parameters
    one token touches (the convention of the Mixtral, Qwen, DeepSeek and OLMoE model cards, which count the
    embedding table). `active_non_embedding` leaves out the input embedding table (a lookup reads one row), the
    convention of the gpt-oss model card; with tied embeddings the shared table counts as the unembedding.
    """

    model_type: str
    total: int
    components: dict[str, int]
    num_experts: int
    top_k: int
    num_layers: int
    moe_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    params: list[ParamInfo] = field(default_factory=list, repr=False)

    @property
    def active(self) -> int:
        routed = self.components.get("routed_experts", 0)
        if not routed or not self.num_experts:
            return self.total
        return self.total - routed + round(routed * min(self.top_k, self.num_experts) / self.num_experts)

    @property
    def active_non_embedding(self) -> int:
        return self.active if self.tied_embeddings else self.active - self.components.get("embeddings", 0)

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "total": self.total, "active": self.active,
                "active_non_embedding": self.active_non_embedding, "components": dict(self.components),
                "num_experts": self.num_experts, "top_k": self.top_k, "num_layers": self.num_layers,
                "moe_layers": self.moe_layers, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "tied_embeddings": self.tied_embeddings}

    def format_report(self) -> str:
        moe = (f"{self.num_experts} routed experts, top-{self.top_k}, {self.moe_layers} of {self.num_layers} layers MoE"
               if self.num_experts else f"dense, {self.num_layers} layers")
        lines = [f"{self.model_type}: {moe}, hidden {self.hidden_size}, vocab {self.vocab_size}",
                 f"total parameters       {human_count(self.total):>10}",
                 f"active per token       {human_count(self.active):>10}  "
                 f"({human_count(self.active_non_embedding)} without the embedding table)",
                 f"{'component':<16}{'params':>10}{'share':>8}"]
        for comp in COMPONENTS:
            n = self.components.get(comp, 0)
            if n:
                lines.append(f"{comp:<16}{human_count(n):>10}{100 * n / max(self.total, 1):>7.1f}%")
        return "\n".join(lines)


# --------------------------------------------------------------------------- counting


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def meta_model(config):
    """The architecture of `config` on the meta device: every shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # e.g. gpt-oss mxfp4: irrelevant for counting, may need kernels
        delattr(config, "quantization_config")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, ImportError) as exc:
        raise ModelError(f"cannot build a {getattr(config, 'model_type', '?')} model from its config on the meta device: "
                         f"{exc}") from exc


def _component_prefixes(model) -> dict[str, str]:
    """Module path -> component, from the architecture table; {} when the family is unknown and undiscoverable."""
    try:
        from studio.moe.arch import find_components, resolve_arch

        comps = find_components(model, resolve_arch(model))
    except Exception:  # dense models, or families the table and discovery cannot place: use name patterns
        return {}
    table = {}
    for comp, paths in (("attention", comps.attention), ("routed_experts", comps.routed_experts),
                        ("shared_experts", comps.shared_experts), ("router", comps.routers),
                        ("dense_mlp", comps.dense_mlp)):
        for path in paths:
            table[path] = comp
    return table


def classify(name: str, prefixes: dict[str, str] | None = None) -> str:
    """The component of one parameter: the architecture table's module paths first, then name patterns."""
    if prefixes:
        module = name
        while "." in module:
            module = module.rsplit(".", 1)[0]
            if module in prefixes:
                return prefixes[module]
    for comp, pattern in _NAME_PATTERNS:
        if pattern.search(name):
            return comp
    return "other"


_COUNT_CACHE: dict[str, ParamCounts] = {}


def _config_key(config) -> str:
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()


def count_parameters(config) -> ParamCounts:
    """Count and classify every parameter of `config`'s architecture, built on the meta device (no memory)."""
    from studio.models.resolve import moe_shape

    key = _config_key(config)
    if key in _COUNT_CACHE:
        return _COUNT_CACHE[key]
    model = meta_model(config)
    prefixes = _component_prefixes(model)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_w = getattr(embed, "weight", None)
    head_w = getattr(head, "weight", None)
    params, components = [], dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # tied parameters are listed once
        if p is embed_w:
            comp = "embeddings"
        elif p is head_w:
            comp = "lm_head"
        else:
            comp = classify(name, prefixes)
        layer = _LAYER_INDEX.search(name)
        info = ParamInfo(name, tuple(p.shape), comp, int(layer.group(1)) if layer else None)
        params.append(info)
        components[comp] += info.numel
    text = _text_config(config)
    experts, top_k = moe_shape(config)
    layers = {p.layer for p in params if p.layer is not None}
    moe_layers = {p.layer for p in params if p.component == "routed_experts" and p.layer is not None}
    counts = ParamCounts(
        model_type=getattr(config, "model_type", "?"), total=sum(components.values()), components=components,
        num_experts=experts if components["routed_experts"] else 0, top_k=top_k if components["routed_experts"] else 0,
        num_layers=len(layers), moe_layers=len(moe_layers), hidden_size=int(getattr(text, "hidden_size", 0) or 0),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        tied_embeddings=embed_w is not None and head_w is not None and embed_w is head_w, params=params)
    if len(_COUNT_CACHE) >= 64:  # a long-running app plans many bases; keep the cache small
        _COUNT_CACHE.pop(next(iter(_COUNT_CACHE)))
    _COUNT_CACHE[key] = counts
    return counts


# --------------------------------------------------------------------------- estimating


@dataclass
class Row:
    """One line of the breakdown: a component of the frozen base, or a training cost."""
    component: str
    params: int
    bytes: int
    dtype: str


@dataclass
class MemoryEstimate:
    """Estimated peak memory of one LoRA training setup, broken down by component (bytes)."""

    model_type: str
    quant: str
    r: int
    targets: tuple[str, ...]
    seq_len: int
    batch_size: int
    grad_checkpointing: bool
    compute_dtype: str
    counts: ParamCounts = field(repr=False)
    base_rows: list[Row] = field(default_factory=list)
    lora_params: int = 0
    lora_by_component: dict[str, int] = field(default_factory=dict)
    lora_weight_bytes: int = 0
    lora_grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0
    logits_bytes: int = 0
    workspace_bytes: int = 0
    load_transient_bytes: int = 0
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES
    num_devices: int = 1                # FSDP2 over this many devices: the rows are per device
    gathered_bytes: int = 0             # FSDP2: layers all-gathered at a time (see estimate_training_memory)
    full_base_weight_bytes: int = 0     # the whole frozen base, as one process loads it
    device_bytes: int | None = None
    device_name: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def base_weight_bytes(self) -> int:
        return sum(r.bytes for r in self.base_rows)

    @property
    def training_rows(self) -> list[Row]:
        act = "checkpointed" if self.grad_checkpointing else "all layers kept"
        return [Row(f"LoRA weights (r={self.r})", self.lora_params, self.lora_weight_bytes, "fp32"),
                Row("LoRA gradients", self.lora_params, self.lora_grad_bytes, "fp32"),
                Row("AdamW states (m, v)", 2 * self.lora_params, self.optimizer_bytes, "fp32"),
                Row(f"activations ({act})", 0, self.activation_bytes, _DTYPE_SHORT[self.compute_dtype]),
                Row("logits + loss", 0, self.logits_bytes, "fp32"),
                Row("dequant workspace", 0, self.workspace_bytes, _DTYPE_SHORT[self.compute_dtype]),
                Row("FSDP2 gathered layers", 0, self.gathered_bytes, "-"),
                Row("runtime overhead", 0, self.overhead_bytes, "-")]

    @property
    def total_bytes(self) -> int:
        return self.base_weight_bytes + sum(r.bytes for r in self.training_rows)

    @property
    def load_peak_bytes(self) -> int:
        """Peak while loading: the frozen weights in their final form + the largest transient dense tensors. Under
        FSDP2 every process loads the whole (quantized) base before fully_shard keeps its shards: the loader is not
        sharded, so this is the single-device figure whatever the number of devices."""
        return (self.full_base_weight_bytes or self.base_weight_bytes) + self.load_transient_bytes + self.overhead_bytes

    @property
    def label(self) -> str:
        return {"4bit": "QLoRA 4-bit", "8bit": "LoRA 8-bit", "none": f"LoRA {8 * _DTYPE_BYTES[self.compute_dtype]}-bit"}[
            self.quant]

    def fits(self, device_bytes: int | None = None) -> bool:
        """Whether the estimate fits `device_bytes` (default: the device memory it was estimated against): the
        training peak and, on one device, the load peak. Under FSDP2 (num_devices > 1) the verdict is the training
        peak per device; the unsharded load peak is reported apart (`load_fits`)."""
        limit = self.device_bytes if device_bytes is None else device_bytes
        if limit is None:
            return True
        return self.total_bytes <= limit and (self.num_devices > 1 or self.load_peak_bytes <= limit)

    def load_fits(self, device_bytes: int | None = None) -> bool:
        limit = self.device_bytes if device_bytes is None else device_bytes
        return limit is None or self.load_peak_bytes <= limit

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "quant": self.quant, "label": self.label, "r": self.r,
                "targets": list(self.targets), "seq_len": self.seq_len, "batch_size": self.batch_size,
                "grad_checkpointing": self.grad_checkpointing, "compute_dtype": self.compute_dtype,
                "estimate": True,
                "base": [vars(r) for r in self.base_rows], "training": [vars(r) for r in self.training_rows],
                "lora_params": self.lora_params, "lora_by_component": dict(self.lora_by_component),
                "base_weight_bytes": self.base_weight_bytes, "total_bytes": self.total_bytes,
                "load_peak_bytes": self.load_peak_bytes, "num_devices": self.num_devices,
                "gathered_bytes": self.gathered_bytes, "full_base_weight_bytes": self.full_base_weight_bytes,
                "device_bytes": self.device_bytes, "device_name": self.device_name, "fits": self.fits(),
                "warnings": list(self.warnings)}

    def format_report(self) -> str:
        """A readable table: component, params, bytes, dtype; then the total and the fit verdict."""
        ckpt = "on" if self.grad_checkpointing else "off"
        where = f", per device of {self.num_devices} under FSDP2" if self.num_devices > 1 else ""
        lines = [f"{self.label} estimate (rough, expect +-20%): r={self.r}, targets={'+'.join(self.targets)}, "
                 f"seq_len={self.seq_len}, batch={self.batch_size}, gradient checkpointing {ckpt}, "
                 f"{self.compute_dtype} compute{where}",
                 f"{'component':<28}{'params':>10}{'bytes':>12}  dtype"]
        for row in self.base_rows:
            lines.append(f"{row.component:<28}{human_count(row.params):>10}{human_bytes(row.bytes):>12}  {row.dtype}")
        lines.append(f"{'base weights':<28}{human_count(sum(r.params for r in self.base_rows)):>10}"
                     f"{human_bytes(self.base_weight_bytes):>12}")
        for row in self.training_rows:
            if row.component == "FSDP2 gathered layers" and self.num_devices == 1:
                continue
            params = human_count(row.params) if row.params else ""
            lines.append(f"{row.component:<28}{params:>10}{human_bytes(row.bytes):>12}  {row.dtype}")
        lines.append(f"{'TOTAL (estimated peak)':<28}{'':>10}{human_bytes(self.total_bytes):>12}")
        lines.append(f"{'load peak (estimated)':<28}{'':>10}{human_bytes(self.load_peak_bytes):>12}")
        if self.device_bytes:
            verdict = "fits" if self.fits() else "does NOT fit"
            lines.append(f"device: {human_bytes(self.device_bytes)} ({self.device_name}) -> {verdict}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _targets(targets) -> tuple[tuple[str, ...], set[str]]:
    """Resolve LoRA target presets / group names (the LoRA planner's vocabulary) to component names; also
    return the groups named explicitly (a preset may include groups a family lacks, a named group may not)."""
    from studio.moe.plan import GROUPS, PRESETS

    items = [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    explicit: set[str] = set()
    for item in items:
        for t in (x.strip() for x in str(item).replace("+", ",").split(",")):
            if not t:
                continue
            groups = PRESETS.get(t) or ((t,) if t in GROUPS else None)
            if groups is None:
                raise PlanError(f"unknown LoRA target {t!r} for the memory planner; use a preset "
                                f"({', '.join(PRESETS)}) or a group ({', '.join(GROUPS)})")
            out.extend(g for g in groups if g not in out)
            if t in GROUPS:
                explicit.add(t)
    if not out:
        raise PlanError("no LoRA targets given; use a preset such as `all`")
    return tuple(out), explicit


def _quantized_bytes(info: ParamInfo, quant: str, double_quant: bool) -> int:
    n = info.numel
    if quant == "4bit":
        blocks = math.ceil(n / NF4_BLOCK)
        if double_quant:  # 8-bit absmax + fp32 absmax per 256 blocks + a 256-entry fp32 code
            return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4 * 256
        return math.ceil(n / 2) + 4 * blocks
    # int8 (LLM.int8 / vector-wise): one byte per weight + one fp32 scale per stored row
    return n + 4 * (n // info.shape[-1])


_QUANTIZED_COMPONENTS = {"attention", "routed_experts", "shared_experts", "dense_mlp", "other"}


def _lora_params(info: ParamInfo, r: int) -> int:
    """LoRA factors for one weight: r*(in+out) for a linear; r*(in+out)*E for a fused [E, a, b] expert stack."""
    if info.is_bias:
        return 0
    if len(info.shape) == 3:
        e, a, b = info.shape
        return r * (a + b) * e
    if len(info.shape) == 2:
        return r * sum(info.shape)
    return 0


def estimate_training_memory(config, quant: str = "4bit", r: int = 16, targets="all", seq_len: int = 2048,
                             batch_size: int = 1, grad_checkpointing: bool = True, compute_dtype: str = "bfloat16",
                             *, double_quant: bool = False, device_bytes: int | None = None,
                             overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
                             counts: ParamCounts | None = None, num_devices: int = 1) -> MemoryEstimate:
    """Estimate the peak memory of LoRA training on `config`'s architecture. The formulas (all estimates):

    Frozen base weights, per parameter tensor:
      * quantized (quant 4bit/8bit) = weight matrices of attention, routed experts (fused 3D stacks, quantized
        per expert by the studio), shared experts and dense MLPs:
          4bit NF4: 0.5 B/weight + one fp32 absmax per 64 weights (= 0.5625 B/weight);
                    with double_quant: 8-bit absmax + one fp32 per 256 blocks (~0.516 B/weight).
          8bit:     1 B/weight + one fp32 scale per stored row.
      * everything else (router, norms, embeddings, lm_head, biases) and quant "none": compute dtype (2 B bf16).
    LoRA (targets: the planner's presets, `all` = attention + routed + shared experts): r*(in+out) per linear,
      r*(in+out)*E per fused expert stack; kept in fp32: weights 4 B + gradients 4 B + AdamW m,v 8 B per param.
    Activations, with T = seq_len*batch tokens, h = hidden, a = bytes of the compute dtype, k = top_k; per token
    and layer the elements kept for backward are
          attention: 2h + sum of the attention projections' output widths (q, k, v / MLA latents, o);
          MoE MLP:   k * (2h + P_e/h) routed (each token is expanded to k expert copies; P_e = params of one
                     expert, so P_e/h = 3 * expert intermediate for a gated MLP) + (2h + P_s/h) shared experts
                     + 2E fp32 router logits/probabilities;  dense MLP: 2h + P_d/h;
          LoRA:      r per adapted linear, r*k per adapted expert stack.
      W_l = T * a * elements_l.  Gradient checkpointing on: L*T*h*a (each layer's input) + 2*max_l W_l (one
      layer recomputed, plus its gradients). Off: sum_l W_l + max_l W_l. Attention is assumed memory-efficient
      (SDPA / flash: no seq_len^2 score matrix).
    Logits + loss: T * vocab * (a + 4 + 4) (logits, their fp32 upcast, the fp32 gradient).
    Dequant workspace (quantized bases): the grouped experts dequantize the hit experts of one projection at a time,
      at most `studio.moe.grouped.DEFAULT_WORKSPACE_BYTES` (or one expert if larger), plus the largest quantized
      linear; counted twice (the chunk and the next one's allocation can overlap).
    Load peak: the base weights in their final form + the largest transient while loading. Routed experts are
      quantized tensor by tensor as transformers assigns them; for checkpoints that store experts one by one,
      transformers' merge holds the per-expert tensors, their stack and the fused result: about 2.5x the largest
      fused expert tensor in the compute dtype (measured on CPU: 2.4x). Unquantized bases load each tensor
      straight into place: the largest tensor once.
    Runtime overhead: fixed `overhead_bytes` (default 1.5 GiB: CUDA context, cuBLAS workspaces, allocator slack).

    FSDP2 over `num_devices` = N > 1 (`accelerate launch --config_file recipes/accelerate/fsdp2.yaml`), per device:
      * sharded (1/N each, rounded up): the routed experts' stores (the studio's frozen parameters), every
        unquantized tensor (router, norms, embeddings, lm_head; the whole base with quant "none"), and the LoRA
        weights, gradients and AdamW states;
      * replicated: bitsandbytes' quantized linears (attention, shared experts, dense MLPs with quant 4bit/8bit),
        which accelerate leaves out of fully_shard (their quantization state cannot live in a DTensor);
      * gathered: one FSDP unit per decoder layer is all-gathered for its forward and backward, and the next one is
        prefetched: 2 x (the largest layer's sharded tensors at full size + its LoRA weights and gradients, fp32),
        or 2 x the embeddings if larger; plus lm_head (+ final norm), kept gathered from forward to backward.
      * activations, logits, workspace and overhead: as on one device, for the per-device batch.
      * load peak: unchanged (every process loads the whole quantized base before fully_shard shards it).
    """
    if quant not in QUANT_MODES:
        raise PlanError(f"quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    if compute_dtype not in _DTYPE_BYTES:
        raise PlanError(f"compute_dtype must be one of {', '.join(_DTYPE_BYTES)}, got {compute_dtype!r}")
    for label, value in (("LoRA rank r", r), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{label} must be a positive integer, got {value!r}")
    if not isinstance(num_devices, int) or num_devices < 1:
        raise PlanError(f"--num-devices must be a positive integer, got {num_devices!r}")
    counts = counts or count_parameters(config)
    target_components, explicit = _targets(targets)
    a = _DTYPE_BYTES[compute_dtype]
    short = _DTYPE_SHORT[compute_dtype]
    qlabel = {"4bit": "nf4+dq" if double_quant else "nf4", "8bit": "int8", "none": short}[quant]

    est = MemoryEstimate(model_type=counts.model_type, quant=quant, r=r, targets=target_components, seq_len=seq_len,
                         batch_size=batch_size, grad_checkpointing=grad_checkpointing, compute_dtype=compute_dtype,
                         counts=counts, overhead_bytes=overhead_bytes)

    # Frozen base weights and LoRA sizes, tensor by tensor.
    rows: dict[str, list[int]] = {c: [0, 0, 0, 0] for c in COMPONENTS}  # params, bytes, quantized params, sharded
    largest_slice = largest_stack = largest_tensor = 0
    lora: dict[str, int] = {}
    layer_sharded: dict[int, int] = {}  # FSDP2: bytes of each decoder layer's sharded tensors, at full size
    layer_lora: dict[int, int] = {}
    for info in counts.params:
        row = rows[info.component]
        row[0] += info.numel
        quantized = quant != "none" and info.component in _QUANTIZED_COMPONENTS and not info.is_bias
        if quantized:
            nbytes = _quantized_bytes(info, quant, double_quant)
            row[2] += info.numel
            slice_numel = info.numel // info.shape[0] if len(info.shape) == 3 else info.numel
            largest_slice = max(largest_slice, slice_numel)
            if len(info.shape) == 3:
                largest_stack = max(largest_stack, info.numel)
        else:
            nbytes = info.numel * a
        row[1] += nbytes
        # bitsandbytes' quantized linears stay whole on every rank under FSDP2; everything else is sharded
        if not (quantized and len(info.shape) == 2):
            row[3] += nbytes
            if info.layer is not None:
                layer_sharded[info.layer] = layer_sharded.get(info.layer, 0) + nbytes
        largest_tensor = max(largest_tensor, info.numel)
        if info.component in target_components:
            n = _lora_params(info, r)
            if n:
                lora[info.component] = lora.get(info.component, 0) + n
                if info.layer is not None:
                    layer_lora[info.layer] = layer_lora.get(info.layer, 0) + n
    est.full_base_weight_bytes = sum(row[1] for row in rows.values())
    n_dev = num_devices
    est.num_devices = n_dev
    for comp in COMPONENTS:
        params, nbytes, qparams, sharded = rows[comp]
        if params:
            dtype = qlabel if qparams == params else (f"{qlabel}+{short}" if qparams else short)
            per_device = nbytes - sharded + math.ceil(sharded / n_dev)
            est.base_rows.append(Row(comp, params, per_device, dtype))
    if not lora:
        raise PlanError(f"LoRA targets {'+'.join(target_components)} adapt nothing in {counts.model_type}; "
                        f"use a preset such as `all`")
    for comp in sorted(explicit - set(lora)):
        est.warnings.append(f"LoRA target {comp!r} matches nothing in {counts.model_type}")
    est.lora_by_component = lora
    est.lora_params = sum(lora.values())
    est.lora_weight_bytes = math.ceil(4 * est.lora_params / n_dev)
    est.lora_grad_bytes = math.ceil(4 * est.lora_params / n_dev)
    est.optimizer_bytes = math.ceil(8 * est.lora_params / n_dev)
    if n_dev > 1:
        layer_full = max((layer_sharded.get(i, 0) + 8 * layer_lora.get(i, 0)
                          for i in set(layer_sharded) | set(layer_lora)), default=0)
        embed = rows["embeddings"][3]
        tail = rows["lm_head"][3] + sum(i.numel * a for i in counts.params
                                        if i.component == "norms" and i.layer is None)
        est.gathered_bytes = 2 * max(layer_full, embed) + tail

    # Activations (see the docstring).
    tokens = seq_len * batch_size
    h = max(counts.hidden_size, 1)
    k = counts.top_k or 1
    per_layer: dict[int, dict[str, float]] = {}
    for info in counts.params:
        if info.layer is None:
            continue
        layer = per_layer.setdefault(info.layer, {"attn_out": 0, "routed": 0, "shared": 0, "dense": 0,
                                                  "lora_lin": 0, "lora_exp": 0, "router": 0})
        adapted = info.component in target_components and _lora_params(info, r) > 0
        if info.component == "attention" and len(info.shape) == 2 and not info.is_bias:
            layer["attn_out"] += info.shape[0]
        elif info.component == "routed_experts":
            layer["routed"] += info.numel
        elif info.component == "shared_experts":
            layer["shared"] += info.numel
        elif info.component == "dense_mlp":
            layer["dense"] += info.numel
        elif info.component == "router" and len(info.shape) == 2:
            layer["router"] += info.shape[0]
        if adapted:
            layer["lora_exp" if info.component == "routed_experts" else "lora_lin"] += 1
    working = []
    for layer in per_layer.values():
        elems = 2 * h + layer["attn_out"]
        if layer["routed"] and counts.num_experts:
            per_expert = layer["routed"] / counts.num_experts
            elems += k * (2 * h + per_expert / h)
        if layer["shared"]:
            elems += 2 * h + layer["shared"] / h
        if layer["dense"]:
            elems += 2 * h + layer["dense"] / h
        elems += r * (layer["lora_lin"] + k * layer["lora_exp"])
        working.append(tokens * (a * elems + 8 * layer["router"]))
    n_layers = max(len(working), 1)
    peak_layer = max(working, default=0)
    if grad_checkpointing:
        est.activation_bytes = int(n_layers * tokens * h * a + 2 * peak_layer)
    else:
        est.activation_bytes = int(sum(working) + peak_layer)
    est.logits_bytes = int(tokens * counts.vocab_size * (a + 8))
    if quant != "none":
        from studio.moe.grouped import DEFAULT_WORKSPACE_BYTES

        chunk = min(max(DEFAULT_WORKSPACE_BYTES, largest_slice * a), largest_stack * a) if largest_stack else 0
        est.workspace_bytes = 2 * max(chunk, largest_slice * a)
        est.load_transient_bytes = int(2.5 * largest_stack * a) if largest_stack else largest_tensor * a
    else:
        est.load_transient_bytes = largest_tensor * a

    # Fit against the device.
    if device_bytes is None:
        device_bytes, est.device_name = detect_device_memory()
    else:
        est.device_name = "the given device"
    est.device_bytes = device_bytes or None
    if est.device_bytes and n_dev > 1 and est.fits() and not est.load_fits():
        est.warnings.append(f"{est.label}: training fits {n_dev} x {human_bytes(est.device_bytes)}, but loading is not "
                            f"sharded yet: every process first loads the whole base ({human_bytes(est.load_peak_bytes)}"
                            f" estimated) before FSDP2 keeps its 1/{n_dev}")
    if est.device_bytes and not est.fits():
        hints = []
        if quant == "none":
            hints.append("--quant 4bit")
        if not grad_checkpointing:
            hints.append("gradient checkpointing")
        if seq_len > 512:
            hints.append("a shorter --seq-len")
        if batch_size > 1:
            hints.append("a smaller --batch-size (with gradient accumulation)")
        if est.base_weight_bytes > est.device_bytes:
            hints.append("a device with more memory or a smaller base (the frozen weights alone do not fit)")
        hints.append("more devices under FSDP2 (--num-devices)")
        est.warnings.append(f"{est.label}: estimated {human_bytes(est.total_bytes)} exceeds the "
                            f"{human_bytes(est.device_bytes)} of {est.device_name}"
                            + (f"; try {', '.join(hints)}" if hints else ""))
    return est


def smallest_num_devices(config, device_bytes: int, max_devices: int = 4096, **kwargs) -> int | None:
    """The smallest number of devices of `device_bytes` each on which `estimate_training_memory(config, **kwargs)`
    fits under FSDP2 (one device: no FSDP), or None when even `max_devices` do not (the replicated quantized
    linears, the activations or a gathered layer alone exceed a device). The per-device peak never grows with N,
    so a doubling search then a bisection find it."""
    kwargs = dict(kwargs, device_bytes=device_bytes)
    kwargs.setdefault("counts", count_parameters(config))

    def fits(n: int) -> bool:
        return estimate_training_memory(config, num_devices=n, **kwargs).fits()

    if fits(1):
        return 1
    lo, hi = 1, 2
    while not fits(hi):
        if hi >= max_devices:
            return None
        lo, hi = hi, min(2 * hi, max_devices)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def min_devices_line(config, estimates: list[MemoryEstimate], **kwargs) -> str:
    """'smallest number of devices of X under FSDP2: QLoRA 4-bit 8, LoRA 16-bit 24' for the estimates' setups."""
    first = estimates[0]
    if not first.device_bytes:
        return ""
    parts = []
    for e in estimates:
        n = smallest_num_devices(config, first.device_bytes, quant=e.quant, r=e.r, targets=e.targets,
                                 seq_len=e.seq_len, batch_size=e.batch_size, grad_checkpointing=e.grad_checkpointing,
                                 compute_dtype=e.compute_dtype, counts=e.counts, **kwargs)
        parts.append(f"{e.label} {n if n else 'none up to 4096'}")
    return (f"smallest number of devices of {human_bytes(first.device_bytes)} that fits (training peak, FSDP2 "
            f"beyond 1): " + ", ".join(parts))


# --------------------------------------------------------------------------- helpers


def detect_device_memory() -> tuple[int, str]:
    """(bytes, description) of the training device: CUDA GPU 0 if available, else system RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"GPU 0, {props.name}"
    except Exception:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().total), "system RAM (no CUDA GPU)"
    except Exception:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "system RAM (no CUDA GPU)"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown device"


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """`80GiB`, `80GB` (decimal), `24G` (binary), `1.5TiB` or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read memory size {text!r}; write e.g. 80GiB, 24GB or 48G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: int | float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def human_count(n: int | float) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_comparison(estimates: list[MemoryEstimate]) -> str:
    """Estimates side by side (e.g. QLoRA 4-bit vs LoRA 16-bit): one column of bytes per estimate."""
    if not estimates:
        return ""
    first = estimates[0]
    width = max(22, *(len(e.label) + 2 for e in estimates))
    head = f"{'component':<28}{'params':>10}" + "".join(f"{e.label:>{width}}" for e in estimates)
    where = f", per device of {first.num_devices} under FSDP2" if first.num_devices > 1 else ""
    lines = [f"memory estimates (rough, expect +-20%): r={first.r}, targets={'+'.join(first.targets)}, "
             f"seq_len={first.seq_len}, batch={first.batch_size}, gradient checkpointing "
             f"{'on' if first.grad_checkpointing else 'off'}{where}", head]
    by_comp = [{r.component: r for r in e.base_rows} for e in estimates]
    for comp in COMPONENTS:
        rows = [b.get(comp) for b in by_comp]
        if not any(rows):
            continue
        params = next(r.params for r in rows if r)
        cells = "".join(f"{(human_bytes(r.bytes) + ' ' + r.dtype) if r else '-':>{width}}" for r in rows)
        lines.append(f"{comp:<28}{human_count(params):>10}{cells}")
    lines.append(f"{'base weights':<28}{'':>10}" + "".join(f"{human_bytes(e.base_weight_bytes):>{width}}"
                                                           for e in estimates))
    for i, row in enumerate(first.training_rows):
        name = row.component
        if name == "FSDP2 gathered layers" and first.num_devices == 1:
            continue
        params = human_count(row.params) if row.params else ""
        lines.append(f"{name:<28}{params:>10}" + "".join(f"{human_bytes(e.training_rows[i].bytes):>{width}}"
                                                         for e in estimates))
    lines.append(f"{'TOTAL (estimated peak)':<28}{'':>10}" + "".join(f"{human_bytes(e.total_bytes):>{width}}"
                                                                     for e in estimates))
    lines.append(f"{'load peak (estimated)':<28}{'':>10}" + "".join(f"{human_bytes(e.load_peak_bytes):>{width}}"
                                                                    for e in estimates))
    if first.device_bytes:
        lines.append(f"{'fits ' + human_bytes(first.device_bytes) + '?':<38}"
                     + "".join(f"{'yes' if e.fits() else 'NO':>{width}}" for e in estimates))
        lines.append(f"device: {first.device_name}")
    for e in estimates:
        lines.extend(f"warning: {w}" for w in e.warnings)
    return "\n".join(lines)
