"""Load a base MoE once, optionally quantized: bitsandbytes 4/8-bit for attention and shared-expert linears
(through transformers' BitsAndBytesConfig) AND for the fused routed experts (studio.moe.experts).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from studio.errors import ModelError
from studio.moe.arch import Components, MoEArch, find_components, resolve_arch
from studio.moe.experts import ExpertQuant, StudioExperts, replace_experts

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "8bit", "4bit")


@dataclass
class QuantSpec:
    """How the base is stored in memory while training or serving."""
    mode: str = "4bit"               # none | 8bit | 4bit
    quant_type: str = "nf4"          # nf4 | fp4 (4-bit)
    double_quant: bool = False       # also quantize the 4-bit statistics
    compute_dtype: str = "auto"      # auto | float32 | bfloat16 | float16

    def __post_init__(self):
        if self.mode not in QUANT_MODES:
            raise ModelError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {self.mode!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ModelError(f"--quant-type must be nf4 or fp4, got {self.quant_type!r}")

    def torch_compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype != "auto":
            return getattr(torch, self.compute_dtype)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def expert_quant(self) -> ExpertQuant | None:
        if self.mode == "none":
            return None
        return ExpertQuant(bits=4 if self.mode == "4bit" else 8, quant_type=self.quant_type,
                           double_quant=self.double_quant)


@dataclass
class LoadedBase:
    model: nn.Module
    tokenizer: object
    ref: str
    path: str
    fingerprint: str
    arch: MoEArch
    components: Components
    quant: QuantSpec
    memory: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"id": self.ref, "path": self.path, "fingerprint": self.fingerprint, "family": self.arch.family,
                "model_type": getattr(self.model.config, "model_type", None), "quantization": asdict(self.quant)}


def default_device() -> torch.device:
    """CUDA if available (under a multi-process launch, this process's GPU: LOCAL_RANK), else the CPU."""
    import os

    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local_rank)) if local_rank is not None else torch.device("cuda")


def _bnb_config(quant: QuantSpec, arch: MoEArch, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    skip = list(arch.high_precision) + ["lm_head"]
    if quant.mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                                  bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=dtype,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _flatten_int8_inputs(model: nn.Module) -> None:
    """bitsandbytes' CPU int8 matmul mis-broadcasts 3D inputs (0.50.2); feed it 2D rows instead."""
    import bitsandbytes as bnb

    class Linear8bitFlat(bnb.nn.Linear8bitLt):
        def forward(self, x):
            shape = x.shape
            return super().forward(x.reshape(-1, shape[-1])).reshape(*shape[:-1], -1)

    for module in model.modules():
        if type(module) is bnb.nn.Linear8bitLt:
            module.__class__ = Linear8bitFlat


def _keep_4bit_layout(model: nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first no-grad eval forward, and
    that packed path then breaks training steps with biased linears (in-place bias add on a leaf view). Keep the
    standard layout so eval and training can alternate."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


class _QuantizeExpertsWhileLoading:
    """Quantize each fused routed-expert weight the moment transformers assigns it to its module, and leave a
    weightless (meta) parameter in its place, so the dense 16/32-bit expert stack never exists as a whole: at most
    one projection of one layer is dense at a time (plus, for checkpoints that store experts one by one, the
    per-layer merge transformers does). Without this, Mixtral-8x7B's ~87 GB of bf16 experts would have to fit on
    the device (or in host memory) before a 4-bit form of ~25 GB is made.

    transformers 5 loads every parameter through `setattr(module, name, Parameter)`; torch's global parameter
    registration hook sees that call. Only this thread and only the expert classes of this model are touched: a
    parameter it does not take is left dense and `replace_experts` quantizes it afterwards as before."""

    def __init__(self, expert_types: set[type], quant: ExpertQuant):
        import threading

        self.expert_types, self.quant, self.thread = expert_types, quant, threading.get_ident()
        self.quantized = 0
        self._handle = None

    def _hook(self, module: nn.Module, name: str, param):
        import threading

        from studio.moe.experts import quantize_expert_stack

        if (param is None or type(module) not in self.expert_types or param.dim() != 3
                or param.device.type == "meta" or threading.get_ident() != self.thread):
            return None
        stored = getattr(module, "_studio_quantized", None)
        if stored is None:
            stored = {}
            object.__setattr__(module, "_studio_quantized", stored)
        stored[name] = quantize_expert_stack(param.detach(), self.quant)
        self.quantized += 1
        placeholder = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)
        placeholder._is_hf_initialized = True  # transformers must not initialise it again
        return placeholder

    def __enter__(self):
        self._handle = torch.nn.modules.module.register_module_parameter_registration_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def load_base(ref: str = "tiny-moe", quant: QuantSpec | None = None, device: str | torch.device | None = None,
              allow_dense: bool = False, experts_impl: str = "grouped") -> LoadedBase:
    """Resolve `ref` (embedded name | local dir | hub id), load it with the requested quantization and swap the
    fused routed experts for quantized StudioExperts (`experts_impl`: "grouped", or the per-expert "eager"
    reference loop). Routed experts are quantized one tensor at a time while loading, on the target device. The
    router, norms, embeddings and lm_head stay in the compute dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from studio.models.resolve import base_fingerprint, require_moe, resolve_base
    from studio.models.tokenizer import load_tokenizer

    from studio.moe.experts import EXPERTS_IMPLS

    if experts_impl not in EXPERTS_IMPLS:
        raise ModelError(f"--experts-impl must be one of {', '.join(EXPERTS_IMPLS)}, got {experts_impl!r}")
    quant = quant or QuantSpec()
    device = torch.device(device) if device else default_device()
    resolved = resolve_base(ref)
    if resolved.path is None:
        raise ModelError(f"base {ref!r} has no local weights; download it and pass --base /path/to/dir")
    config = AutoConfig.from_pretrained(resolved.path)
    if not allow_dense:
        require_moe(config, ref)
    dtype = quant.torch_compute_dtype(device)
    kwargs = dict(dtype=dtype, experts_implementation="eager")
    try:
        from studio.models.memory import meta_model

        probe_model = meta_model(config)
        arch_probe = resolve_arch(probe_model)
        expert_types = {type(probe_model.get_submodule(p))
                        for p in find_components(probe_model, arch_probe).routed_experts}
    except ValueError as exc:
        raise ModelError(f"base {ref!r}: {exc}") from exc
    loading = contextlib.nullcontext()
    if quant.mode != "none":
        kwargs["quantization_config"] = _bnb_config(quant, arch_probe, dtype)
        kwargs["device_map"] = {"": str(device)} if device.type != "cpu" else "cpu"
        loading = _QuantizeExpertsWhileLoading(expert_types, quant.expert_quant())
    with loading:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    if quant.mode == "none":
        model.to(device)
    if quant.mode == "8bit" and device.type == "cpu":
        _flatten_int8_inputs(model)
    if quant.mode == "4bit" and device.type == "cpu":
        _keep_4bit_layout(model)
    arch = resolve_arch(model)
    comps = find_components(model, arch)
    if not comps.routed_experts:
        raise ModelError(f"base {ref!r}: no fused routed experts found under `{arch.experts_module}`")
    replace_experts(model, comps.routed_experts, quant.expert_quant(), dtype, experts_impl)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    tokenizer = load_tokenizer(resolved.path)
    loaded = LoadedBase(model=model, tokenizer=tokenizer, ref=ref, path=str(resolved.path),
                        fingerprint=base_fingerprint(resolved.path), arch=arch, components=comps, quant=quant)
    loaded.memory = memory_report(model, comps)
    return loaded


def _module_bytes(module: nn.Module) -> tuple[int, set[str]]:
    total, dtypes = 0, set()
    for t in module.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
            dtypes.add(str(t.dtype).replace("torch.", ""))
    return total, dtypes


def memory_report(model: nn.Module, comps: Components) -> dict:
    """Bytes and dtypes per component as held in memory right now (LoRA factors excluded)."""
    groups = {"attention": comps.attention, "routed_experts": comps.routed_experts,
              "shared_experts": comps.shared_experts, "router": comps.routers, "dense_mlp": comps.dense_mlp}
    report, seen = {}, set()
    for group, names in groups.items():
        total, dtypes = 0, set()
        for name in names:
            module = model.get_submodule(name)
            base = getattr(module, "base_layer", module)
            if isinstance(base, StudioExperts):
                b, d = base.storage_bytes(), {str(t.dtype).replace("torch.", "") for n, t in
                                              list(base.named_buffers(recurse=False)) +
                                              list(base.named_parameters(recurse=False))}
            else:
                b, d = _module_bytes(base)
            total += b
            dtypes |= d
            seen.add(name)
        report[group] = {"bytes": total, "dtypes": sorted(dtypes), "modules": len(names)}
    emb = model.get_input_embeddings()
    report["embeddings"] = {"bytes": emb.weight.numel() * emb.weight.element_size(),
                            "dtypes": [str(emb.weight.dtype).replace("torch.", "")], "modules": 1}
    head = model.get_output_embeddings()
    if head is not None:
        report["lm_head"] = {"bytes": head.weight.numel() * head.weight.element_size(),
                             "dtypes": [str(head.weight.dtype).replace("torch.", "")], "modules": 1}
    everything = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                     if isinstance(t, torch.Tensor))
    report["total"] = {"bytes": everything, "dtypes": [], "modules": 0}
    return report


def format_memory(report: dict) -> str:
    lines = [f"{'component':<16}{'bytes':>14}{'MiB':>10}  dtypes"]
    for group, info in report.items():
        lines.append(f"{group:<16}{info['bytes']:>14,}{info['bytes'] / 2**20:>10.2f}  {','.join(info['dtypes'])}")
    return "\n".join(lines)
