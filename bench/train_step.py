"""Training-step benchmark: the studio stack vs the plain stack on the same quantized MoE.

    python bench/train_step.py                      # CPU defaults: about 30 s on 2 idle cores
    python bench/train_step.py --device cuda --batch-size 8 --seq-len 1024 --layers 8

Both stacks load the same weights from disk (a deterministic Qwen3-MoE written to a temporary directory) and
train LoRA on attention (q, k, v, o) AND the fused routed experts (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`) with the same rank, batch, optimizer and seed:

* plain:  transformers `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4))`
          + PEFT `get_peft_model(LoraConfig(target_modules=[q,k,v,o], target_parameters=[...experts...]))`.
          bitsandbytes quantizes only nn.Linear, so the fused experts stay in the compute dtype, and PEFT's
          ParamWrapper rebuilds W + BA for the whole expert stack on every forward.
* studio: `studio.models.loading.load_base(dir, QuantSpec("4bit"))` (experts quantized to NF4 too)
          + `studio.moe.plan.build_plan(..., "attention,experts")` + `studio.adapters.apply_plan`.

A step is forward + backward + AdamW step on one fixed batch of token ids. Reported per stack: tokens/s, median
step time, peak memory during the training steps (CUDA: `torch.cuda.max_memory_allocated`; CPU: the peak of a
child process that runs only that stack, over its own post-import baseline: anonymous RSS plus the weights that are
views of the mmapped checkpoint, see HostMemory; total RSS is printed too; the peak is the warmup steps', which
run, as loading does, with small malloc thresholds so that RSS tracks live memory, while the timed steps run with
them raised), the peak including loading, the bytes
held by routed-expert weights, a torch-side breakdown (weights, gradients, AdamW state, tensors saved for backward),
and the initial loss of each stack next to the unquantized fp32 reference. Dropout is 0 for both: PEFT's
ParamWrapper refuses any other value.

Exit status: 0 when both stacks ran (whether or not the targets are met), 1 when one failed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

STACKS = ("plain", "eager", "studio")  # eager: the studio with its per-expert reference loop
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER_MODULES = ["mlp.gate"]  # Qwen3-MoE's router; kept unquantized by both stacks, like lm_head
MEMORY_TARGET = 0.35           # studio peak training memory <= 0.35 x plain (--memory-target to change)
SPEED_TARGET = 2.0             # studio tokens/s >= 2 x plain
MiB = 2 ** 20


# --------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per stack")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first builds AdamW state)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16, help="routed experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-intermediate", type=int, default=768, help="intermediate size of one expert")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 on CUDA, fp32 on CPU) | float32 | "
                                                   "bfloat16 | float16")
    p.add_argument("--plain-experts-impl", default="default",
                   help="experts_implementation for the plain stack: default (what transformers picks) | eager | "
                        "grouped_mm | batched_mm")
    p.add_argument("--studio-layout", default="auto", choices=["auto", "padded", "jagged"],
                   help="row layout of the studio's grouped experts (auto: jagged torch._grouped_mm on sm90+ bf16, "
                        "padded bmm elsewhere)")
    p.add_argument("--stacks", default="plain,eager,studio",
                   help="which stacks to run, comma separated: plain (transformers + PEFT + bnb), eager (the studio "
                        "with its per-expert reference loop), studio (grouped experts)")
    p.add_argument("--memory-target", type=float, default=MEMORY_TARGET, help="studio/plain peak training memory "
                                                                              "target")
    p.add_argument("--speed-target", type=float, default=SPEED_TARGET, help="studio/plain tokens/s target")
    p.add_argument("--config", default=None,
                   help="a Qwen3-MoE config.json (e.g. studio/models/known_configs/Qwen--Qwen3-30B-A3B.json) whose "
                        "shape replaces --hidden/--experts/--top-k/--moe-intermediate/--head-dim; --layers still "
                        "sets the depth (a slice of the real model, random weights)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak for the compute dtype, for MFU (default: 989 on H100/H200 bf16)")
    p.add_argument("--sweep", action="store_true",
                   help="instead of one comparison: step time of each stack for experts 16/64/128 (same total and "
                        "active expert size) x tokens 512/2048, as a table")
    p.add_argument("--isolation", default="auto", choices=["auto", "process", "inline"],
                   help="process: each stack in a child process (CPU default: RSS is per process); inline: one after "
                        "the other in this process, freeing in between (CUDA default: peak counters reset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="reuse a model written by an earlier run (default: build a "
                                                   "fresh one in a temporary directory)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    # internal: one stack in a child process
    p.add_argument("--stack", choices=STACKS, help=argparse.SUPPRESS)
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    p.add_argument("--ref-loss", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.heads = args.kv_heads = None
    if args.config:  # the real model's shape, its depth cut to --layers, the studio tokenizer's vocabulary
        cfg = json.loads(Path(args.config).read_text())
        args.hidden, args.experts = cfg["hidden_size"], cfg["num_experts"]
        args.top_k, args.moe_intermediate = cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
        args.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        args.heads, args.kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads")
    args.stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    unknown = set(args.stacks) - set(STACKS)
    if unknown or not args.stacks:
        p.error(f"--stacks takes {','.join(STACKS)}, got {sorted(unknown) or 'nothing'}")
    if args.hidden % args.head_dim and not args.heads:
        p.error("--hidden must be a multiple of --head-dim")
    if args.top_k > args.experts:
        p.error("--top-k cannot exceed --experts")
    return args


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------- the model


def model_config(args):
    from transformers import Qwen3MoeConfig

    from studio.models.tokenizer import load_tokenizer

    tok = load_tokenizer()
    heads = args.heads or args.hidden // args.head_dim
    return Qwen3MoeConfig(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
        num_key_value_heads=args.kv_heads or max(1, heads // 2), head_dim=args.head_dim,
        intermediate_size=2 * args.moe_intermediate, moe_intermediate_size=args.moe_intermediate,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
        max_position_embeddings=max(512, args.seq_len), tie_word_embeddings=False)


def make_batch(args, vocab_size: int):
    """Fixed token ids: seeded CPU generator, ids past the special tokens."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(8, vocab_size, (args.batch_size, args.seq_len), generator=gen)


def build_model_dir(args, out_dir: Path) -> dict:
    """Write a deterministic fp32 Qwen3-MoE + the studio tokenizer to `out_dir`; return sizes and the fp32 loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from studio.models.tokenizer import load_tokenizer

    config = model_config(args)
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 3)
    ids = make_batch(args, config.vocab_size)
    with torch.no_grad():
        ref_loss = float(model(input_ids=ids, labels=ids).loss)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer().save_pretrained(out_dir)
    emb = model.get_input_embeddings().weight.numel()
    active = total - emb - experts + experts * config.num_experts_per_tok // config.num_experts
    info = {"params": total, "expert_params": experts, "ref_loss": ref_loss, "vocab": config.vocab_size,
            "active_params": active}
    (out_dir / "bench_model.json").write_text(json.dumps(info))
    del model
    gc.collect()
    return info


# --------------------------------------------------------------------------- memory probes


class HostMemory:
    """Memory of this process from /proc (Linux): RSS, its resettable peak (VmHWM), and the anonymous part.

    RSS also counts file-backed pages. transformers 5.23 loads safetensors through a private mmap and keeps
    tensors that need no conversion (fp32 embeddings, lm_head, norms, router here) as views into it, which keeps
    the whole checkpoint mapped; the pages read while loading the other (converted or quantized) tensors stay
    resident as clean file pages the kernel may drop. That is the same in both stacks, so what a stack holds is
    its anonymous memory (RssAnon: tensors, heap) plus the weights that are views of the file
    (`file_mapped_weight_bytes`). The anonymous training peak is VmHWM minus the file-backed pages, which barely
    move while training (checked and reported).
    """

    def __init__(self):
        self.can_reset = True

    @staticmethod
    def status() -> dict:
        out = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in out:
                        out[key] = int(value.split()[0]) * 1024
        except OSError:  # not Linux: the lifetime peak is all there is
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out.update(VmRSS=peak, VmHWM=peak, RssAnon=peak)
        return out

    def rss(self) -> int:
        return self.status()["VmRSS"]

    def anon(self) -> int:
        return self.status()["RssAnon"]

    def file(self) -> int:
        s = self.status()
        return s["RssFile"] + s["RssShmem"]

    def peak(self) -> int:
        return self.status()["VmHWM"]

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.can_reset = False  # then the training peak also covers loading

    @staticmethod
    def thresholds_for_speed() -> bool:
        """Raise glibc's mmap and trim thresholds (mallopt) for the timed steps. The child runs with
        MALLOC_MMAP_THRESHOLD_=128 KiB so that RSS tracks live memory while memory is measured (loading, the warmup
        steps), but that maps and unmaps every allocation over 128 KiB: it doubled CPU step times (studio stack, 1
        thread: 1.34-1.37 s against 0.66-0.70 s). 32 MiB is glibc's largest mmap threshold on 64-bit."""
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return False
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2 ** 20)) and bool(libc.mallopt(m_trim_threshold, 2 ** 30))

    @staticmethod
    def trim() -> None:
        """Give freed heap back to the OS so RSS reflects live memory (glibc)."""
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class AnonSampler:
    """Highest RssAnon seen by a background thread sampling every `interval` seconds (used while loading, where
    the file-backed pages grow as the checkpoint is read, so VmHWM cannot be split)."""

    def __init__(self, mem: HostMemory, interval: float = 0.005):
        import threading

        self.mem, self.interval, self.max = mem, interval, mem.anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.max = max(self.max, self.mem.anon())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.max = max(self.max, self.mem.anon())


class CudaMemory:
    def __init__(self, device):
        import torch

        self.torch, self.device, self.can_reset = torch, device, True

    def rss(self) -> int:
        return self.torch.cuda.memory_allocated(self.device)

    anon = rss

    def file(self) -> int:
        return 0

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def trim(self) -> None:
        gc.collect()
        self.torch.cuda.empty_cache()


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def _unique_tensors(model):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            yield t


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (each once), plus bitsandbytes 4-bit statistics."""
    total = 0
    for t in _unique_tensors(model):
        total += _tensor_bytes(t)
        state = getattr(t, "quant_state", None)  # bnb Params4bit keep absmax outside the module's tensors
        if state is not None:
            total += _tensor_bytes(state.absmax)
            if getattr(state, "state2", None) is not None:
                total += _tensor_bytes(state.state2.absmax)
    return total


def file_mapped_weight_bytes(model, model_dir: Path) -> int:
    """Bytes of weights that are zero-copy views of the memory-mapped checkpoint (Linux /proc/self/maps).

    transformers keeps unquantized tensors whose dtype already matches (embeddings, lm_head, norms, router) as
    views into the mmapped safetensors file: they are file-backed pages, not anonymous memory, yet live weights.
    """
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().startswith(str(model_dir.resolve())):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return 0
    return sum(_tensor_bytes(t) for t in _unique_tensors(model)
               if t.device.type == "cpu" and any(lo <= t.data_ptr() < hi for lo, hi in ranges))


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward in one forward pass, each storage once, not counting the
    model's own parameters and buffers (those are already counted as weights)."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self.exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self.seen: dict[int, int] = {}

    def _pack(self, t):
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.exclude and key not in self.seen:
                self.seen[key] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def __enter__(self):
        self._ctx = self.torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


# --------------------------------------------------------------------------- the two stacks


def load_plain(model_dir: Path, args, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                             llm_int8_skip_modules=ROUTER_MODULES + ["lm_head"])
    kwargs = dict(quantization_config=bnb, dtype=dtype,
                  device_map={"": str(device)} if device.type != "cpu" else "cpu")
    if args.plain_experts_impl != "default":
        kwargs["experts_implementation"] = args.plain_experts_impl
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    expert_bytes = sum(_tensor_bytes(p) for p in model.parameters() if p.dim() == 3)
    impl = getattr(model.config, "_experts_implementation", None) or "eager"
    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(ATTENTION),
                     target_parameters=list(EXPERT_PARAMS), task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    return model, {"routed_expert_bytes": expert_bytes, "experts_impl": impl}


def load_studio(model_dir: Path, args, device, dtype, experts_impl: str = "grouped"):
    import torch

    from studio.adapters import apply_plan
    from studio.models.loading import QuantSpec, load_base
    from studio.moe.experts import StudioExperts
    from studio.moe.plan import LoraSettings, build_plan

    dtype_name = str(dtype).replace("torch.", "")
    loaded = load_base(str(model_dir), QuantSpec(mode="4bit", quant_type="nf4", compute_dtype=dtype_name),
                       device=device, experts_impl=experts_impl)
    for m in loaded.model.modules():
        if isinstance(m, StudioExperts):
            m.grouped_layout = args.studio_layout
    plan = build_plan(loaded.model, loaded.arch, loaded.components, "attention,experts",
                      LoraSettings(r=args.r, alpha=args.alpha, dropout=0.0))
    torch.manual_seed(args.seed)
    apply_plan(loaded.model, plan, "default", trainable=True)
    impl = "studio per-expert loop" if experts_impl == "eager" else f"studio grouped ({args.studio_layout})"
    return loaded.model, {"routed_expert_bytes": loaded.memory["routed_experts"]["bytes"], "experts_impl": impl}


def load_eager(model_dir: Path, args, device, dtype):
    return load_studio(model_dir, args, device, dtype, experts_impl="eager")


LOADERS = {"plain": load_plain, "eager": load_eager, "studio": load_studio}


def preload_libraries() -> None:
    """Import everything either stack uses before the memory baseline, so both baselines hold the same code."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: F401

    import studio.adapters  # noqa: F401
    import studio.models.loading  # noqa: F401
    import studio.moe.plan  # noqa: F401


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def measure_stack(stack: str, args, model_dir: Path, device) -> dict:
    """Load one stack, train it for warmup + timed steps, and measure. Runs in a fresh process on CPU."""
    import torch

    dtype = resolve_dtype(args.dtype, device)
    preload_libraries()
    mem = CudaMemory(device) if device.type == "cuda" else HostMemory()
    mem.trim()
    base_total, base_anon = mem.rss(), mem.anon()
    mem.reset_peak()

    t0 = time.perf_counter()
    sampler = AnonSampler(mem) if isinstance(mem, HostMemory) else contextlib.nullcontext()
    with sampler:
        model, info = LOADERS[stack](model_dir, args, device, dtype)
        model.train()
        _sync(device)
    load_s = time.perf_counter() - t0
    load_peak_total = mem.peak() - base_total
    load_peak = (sampler.max if isinstance(mem, HostMemory) else mem.peak()) - base_anon  # + mapped: below

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    ids = make_batch(args, model.config.vocab_size).to(device)
    weights = weight_bytes(model)
    mapped = file_mapped_weight_bytes(model, model_dir) if device.type == "cpu" else 0
    mem.trim()
    resident_total, resident = mem.rss() - base_total, mem.anon() - base_anon + mapped
    file_before = mem.file()
    mem.reset_peak()

    def step(meter=None):
        if meter is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with meter:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = sum(_tensor_bytes(p.grad) for p in trainable if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    losses, times = [], []
    meter = SavedTensorMeter(model)
    grad_bytes = 0
    hwm = file_after = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup and i and isinstance(mem, HostMemory):
            # the memory peak is the warmup steps' (the first builds AdamW state: every later step peaks as high);
            # the timed steps then run with glibc's thresholds raised (see thresholds_for_speed)
            hwm, file_after = mem.peak(), mem.file()
            mem.thresholds_for_speed()
        _sync(device)
        t = time.perf_counter()
        # the tensor meter only watches the last warmup step: its hook is not part of any timed step
        loss, g = step(meter if i == args.warmup - 1 or (args.warmup == 0 and i == 0) else None)
        _sync(device)
        dt = time.perf_counter() - t
        losses.append(loss)
        grad_bytes = max(grad_bytes, g)
        if i >= args.warmup:
            times.append(dt)
        print(f"  [{stack}] step {i + 1}/{args.warmup + args.steps}{' (warmup)' if i < args.warmup else ''}: "
              f"loss {loss:.4f}  {dt:.2f}s", flush=True)
    if hwm is None:  # CUDA, or no warmup step: the peak over every step
        hwm, file_after = mem.peak(), mem.file()
    train_peak_total = hwm - base_total
    # CPU: anonymous peak plus the weights that live in the mapped checkpoint (live memory either way);
    # CUDA: file() and mapped are 0 and base_anon is the allocation before loading.
    # File pages may move a little while training (lm_head/embedding pages dropped and faulted back in); taking
    # the smaller file figure makes the anonymous peak an upper bound, never an underestimate.
    train_peak = hwm - min(file_before, file_after) - base_anon + mapped
    opt_bytes = sum(_tensor_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    tokens = args.batch_size * args.seq_len
    return {
        "stack": stack,
        "experts_impl": info["experts_impl"],
        "trainable_params": sum(p.numel() for p in trainable),
        "tokens_per_s": tokens * len(times) / sum(times) if times else float("nan"),
        "step_s_median": statistics.median(times) if times else float("nan"),
        "step_s_all": times,
        "load_s": load_s,
        "initial_loss": losses[0],
        "losses": losses,
        "peak_train_bytes": train_peak,
        "peak_with_load_bytes": max(load_peak + mapped, train_peak),
        "mapped_weight_bytes": mapped,
        "peak_train_total_bytes": train_peak_total,
        "peak_with_load_total_bytes": max(load_peak_total, train_peak_total),
        "file_backed_bytes": file_after,
        "file_backed_change_bytes": file_after - file_before,
        "peak_reset_ok": mem.can_reset,
        "resident_after_load_bytes": resident,
        "resident_after_load_total_bytes": resident_total,
        "baseline_bytes": base_total,
        "routed_expert_bytes": info["routed_expert_bytes"],
        "weight_bytes": weights,
        "grad_bytes": grad_bytes,
        "optimizer_bytes": opt_bytes,
        "saved_activation_bytes": meter.bytes,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process anonymous RSS",
    }


def run_child(stack: str, args, model_dir: Path, device) -> dict:
    """Run one stack in a fresh interpreter (same script, --stack) and read its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stack", stack, "--model-dir", str(model_dir),
           "--result-json", str(result_path), "--device", str(device)]
    for flag in ("steps", "warmup", "batch_size", "seq_len", "r", "alpha", "lr", "seed", "dtype",
                 "plain_experts_impl", "studio_layout"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072"))
    try:
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            return {"stack": stack, "error": f"child process exited with {proc.returncode}"}
        return json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)


def run_inline(stack: str, args, model_dir: Path, device) -> dict:
    try:
        return measure_stack(stack, args, model_dir, device)
    except Exception as exc:  # report the other stack anyway
        import traceback

        traceback.print_exc()
        return {"stack": stack, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- report


def _mib(b) -> str:
    return f"{b / MiB:,.1f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def format_report(results: dict, model: dict, args, device, dtype) -> str:
    plain, studio = results.get("plain"), results.get("studio")
    cpu = device.type != "cuda"
    mem = "memory" if cpu else "CUDA allocated"
    rows = [
        ("trainable LoRA params", lambda r: f"{r['trainable_params']:,}", None),
        ("experts forward", lambda r: r["experts_impl"], None),
        ("tokens/s (timed steps)", lambda r: f"{r['tokens_per_s']:,.1f}", "tokens_per_s"),
        ("step time, median (s)", lambda r: f"{r['step_s_median']:.3f}", "step_s_median"),
        ("step time, best (s)", lambda r: f"{min(r['step_s_all']):.3f}", "step_s_best"),
        (f"peak {mem}, training (MiB)", lambda r: _mib(r["peak_train_bytes"]), "peak_train_bytes"),
        (f"peak {mem}, incl. load (MiB)", lambda r: _mib(r["peak_with_load_bytes"]), "peak_with_load_bytes"),
        (f"{mem} after load (MiB)", lambda r: _mib(r["resident_after_load_bytes"]), "resident_after_load_bytes"),
    ]
    if cpu:
        rows += [
            ("peak total RSS, training (MiB)", lambda r: _mib(r["peak_train_total_bytes"]), "peak_train_total_bytes"),
            ("peak total RSS, incl. load (MiB)", lambda r: _mib(r["peak_with_load_total_bytes"]),
             "peak_with_load_total_bytes"),
            ("file-backed RSS after load (MiB)", lambda r: _mib(r["file_backed_bytes"]), "file_backed_bytes"),
            ("  of which weights (mmap views)", lambda r: _mib(r["mapped_weight_bytes"]), "mapped_weight_bytes"),
        ]
    rows += [
        ("routed-expert weights (MiB)", lambda r: _mib(r["routed_expert_bytes"]), "routed_expert_bytes"),
        ("all weights, torch (MiB)", lambda r: _mib(r["weight_bytes"]), "weight_bytes"),
        ("LoRA gradients, torch (MiB)", lambda r: _mib(r["grad_bytes"]), "grad_bytes"),
        ("AdamW state, torch (MiB)", lambda r: _mib(r["optimizer_bytes"]), "optimizer_bytes"),
        ("saved for backward, torch (MiB)", lambda r: _mib(r["saved_activation_bytes"]), "saved_activation_bytes"),
        ("initial loss", lambda r: f"{r['initial_loss']:.4f}", None),
        ("load time (s)", lambda r: f"{r['load_s']:.1f}", "load_s"),
    ]
    for r in results.values():
        if "error" not in r:
            r["step_s_best"] = min(r["step_s_all"]) if r["step_s_all"] else float("nan")
    ok = {k: v for k, v in results.items() if "error" not in v}
    w = 36
    shown = [s for s in STACKS if s in results]
    pairs = [(a, b) for a, b in (("studio", "plain"), ("studio", "eager")) if a in ok and b in ok]
    lines = [f"{'':<{w}}" + "".join(f"{s:>16}" for s in shown) + "".join(f"{a + '/' + b:>15}" for a, b in pairs),
             "-" * (w + 16 * len(shown) + 15 * len(pairs))]
    for label, fmt, key in rows:
        cells = "".join(f"{fmt(ok[s]) if s in ok else '-':>16}" for s in shown)
        ratios = "".join(f"{_ratio(ok[a][key], ok[b][key]) if key else '':>15}" for a, b in pairs)
        lines.append(f"{label:<{w}}{cells}{ratios}")
    for s, r in results.items():
        if "error" in r:
            lines.append(f"{s} stack FAILED: {r['error']}")
    lines.append(f"{'reference loss, unquantized fp32':<{w}}{model['ref_loss']:>16.4f}")
    peak = args.peak_tflops or _default_peak_tflops(device, dtype)
    if peak and "active_params" in model:
        # model FLOPs utilisation on the active (per-token) parameters, the usual 6 * N * tokens per step
        flops = 6 * model["active_params"] * args.batch_size * args.seq_len
        lines.append(f"{'MFU on active params (6N/token)':<{w}}" + "".join(
            f"{flops / r['step_s_median'] / (peak * 1e12) * 100:>15.1f}%" if s in ok else f"{'-':>16}"
            for s, r in ((s, ok.get(s)) for s in shown)) + f"   (active params {model['active_params'] / 1e6:.0f}M, "
                                                            f"peak {peak:g} TFLOP/s)")
    eager = ok.get("eager")
    if studio and eager and "error" not in studio:
        lines += ["", f"tokens/s studio (grouped) / studio eager loop = "
                      f"{studio['tokens_per_s'] / eager['tokens_per_s']:.3f}; peak {mem} grouped/eager = "
                      f"{studio['peak_train_bytes'] / eager['peak_train_bytes']:.3f}"]
    if plain and studio and "error" not in plain and "error" not in studio:
        mem_ratio = studio["peak_train_bytes"] / plain["peak_train_bytes"]
        speed_ratio = studio["tokens_per_s"] / plain["tokens_per_s"]
        loss_gap = abs(studio["initial_loss"] - plain["initial_loss"])
        lines += [
            "",
            f"peak {mem} (training steps) studio/plain = {mem_ratio:.3f}  (target <= {args.memory_target}): "
            f"{'MET' if mem_ratio <= args.memory_target else 'NOT MET'}",
            f"tokens/s studio/plain = {speed_ratio:.3f}  (target >= {args.speed_target}): "
            f"{'MET' if speed_ratio >= args.speed_target else 'NOT MET'}",
            f"initial loss |studio - plain| = {loss_gap:.4f}; vs fp32 reference: "
            f"plain {plain['initial_loss'] - model['ref_loss']:+.4f}, "
            f"studio {studio['initial_loss'] - model['ref_loss']:+.4f}"
            f"  ({'close' if loss_gap < 0.05 else 'NOT close: check the stacks load the same weights'})",
        ]
        if plain["trainable_params"] != studio["trainable_params"]:
            lines.append("WARNING: the stacks train different numbers of LoRA parameters")
        if cpu:
            total_ratio = studio["peak_train_total_bytes"] / plain["peak_train_total_bytes"]
            lines.append(f"peak total RSS (training steps, incl. the checkpoint pages transformers leaves mapped) "
                         f"studio/plain = {total_ratio:.2f}")
            moved = max(abs(r["file_backed_change_bytes"]) for r in (plain, studio))
            if moved > 16 * MiB:
                lines.append(f"note: file-backed RSS moved by up to {_mib(moved)} MiB during training; the "
                             "memory peaks above are upper bounds by at most that much")
        if not all(r["peak_reset_ok"] for r in ok.values()):
            lines.append("note: the peak could not be reset after loading; training peaks include loading")
    return "\n".join(lines)


def _default_peak_tflops(device, dtype) -> float | None:
    import torch

    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return 989.0 if ("H100" in name or "H200" in name) else None


SWEEP = [(16, 2, 768), (64, 8, 192), (128, 16, 96)]  # experts, top-k, expert intermediate: same total and active size
SWEEP_TOKENS = [(2, 256), (2, 1024)]                  # batch x seq_len: 512 and 2048 tokens


def run_sweep(args, device, dtype, tmp: Path) -> str:
    """Median step time of each stack against the number of experts and the tokens per step."""
    import copy

    rows = []
    for experts, top_k, inter in SWEEP:
        a = copy.copy(args)
        a.experts, a.top_k, a.moe_intermediate = experts, top_k, inter
        model_dir = tmp / f"model-{experts}"
        model_dir.mkdir()
        build_model_dir(a, model_dir)
        for batch, seq in SWEEP_TOKENS:
            a.batch_size, a.seq_len = batch, seq
            print(f"--- {experts} experts top-{top_k}, {batch * seq} tokens", flush=True)
            res = {stack: run_child(stack, a, model_dir, device) for stack in args.stacks}
            rows.append((experts, top_k, batch * seq, res))
    shown = [s for s in STACKS if s in args.stacks]
    head = f"{'experts':>8}{'top-k':>6}{'tokens':>8}" + "".join(f"{s + ' step s':>16}" for s in shown)
    head += f"{'studio/plain':>14}{'studio/eager':>14}"
    lines = ["step time (median, s) against experts and tokens; tokens/s ratios on the right", head]
    for experts, top_k, tokens, res in rows:
        cells = "".join(f"{res[s]['step_s_median']:>16.3f}" if "error" not in res[s] else f"{'FAILED':>16}"
                        for s in shown)
        ratio = []
        for other in ("plain", "eager"):
            a_, b_ = res.get("studio", {}), res.get(other, {})
            ok = a_ and b_ and "error" not in a_ and "error" not in b_
            ratio.append(f"{b_['step_s_median'] / a_['step_s_median']:.2f}x" if ok else "-")
        lines.append(f"{experts:>8}{top_k:>6}{tokens:>8}{cells}{ratio[0]:>14}{ratio[1]:>14}")
    return "\n".join(lines)


def header(args, model: dict, device, dtype) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        where = f"{torch.cuda.get_device_name(device)}, {total:.0f} GiB"
    else:
        where = f"CPU {cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"
    import importlib.metadata as md

    versions = ", ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "peft", "bitsandbytes"))
    return "\n".join([
        f"device: {device} ({where}); compute dtype {str(dtype).replace('torch.', '')}",
        f"libraries: {versions}",
        f"model: Qwen3-MoE, {args.layers} layers, hidden {args.hidden}, {args.experts} routed experts "
        f"top-{args.top_k}, expert intermediate {args.moe_intermediate}, vocab {model['vocab']}: "
        f"{model['params'] / 1e6:.1f}M parameters ({model['expert_params'] / 1e6:.1f}M in routed experts)",
        f"batch: {args.batch_size} x {args.seq_len} tokens (fixed random ids, seed {args.seed}); LoRA r={args.r} "
        f"alpha={args.alpha:g} dropout=0 on q,k,v,o + experts gate_up_proj, down_proj; AdamW lr {args.lr:g}; "
        f"{args.warmup} warmup + {args.steps} timed steps per stack",
        "memory: " + ("torch.cuda.max_memory_allocated over the allocation before loading; 'training' resets the "
                      "peak after loading"
                      if device.type == "cuda" else
                      "each stack in its own child process, over that process's memory after imports. 'memory' = "
                      "anonymous RSS (tensors, heap) + weights that are views of the mmapped checkpoint; its training "
                      "peak = VmHWM over the warmup steps (reset after loading) - file-backed RSS + those weights; the "
                      "timed steps run with glibc's malloc thresholds raised; the load peak samples "
                      "RssAnon every 5 ms. 'total RSS' also counts the rest of the checkpoint file, which stays "
                      "mapped (same in both stacks)"),
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    device = resolve_device(args.device)

    if args.stack:  # child: one stack, result to --result-json
        result = measure_stack(args.stack, args, Path(args.model_dir), device)
        Path(args.result_json).write_text(json.dumps(result))
        return 0

    argv_shown = sys.argv[1:] if argv is None else argv
    print("command: python bench/train_step.py" + "".join(" " + shlex.quote(a) for a in argv_shown), flush=True)
    dtype = resolve_dtype(args.dtype, device)
    isolation = args.isolation if args.isolation != "auto" else ("inline" if device.type == "cuda" else "process")
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        # The studio keeps a fingerprint cache in its models cache: keep this run's out of the user's.
        os.environ.setdefault("STUDIO_MODELS_CACHE", str(Path(tmp) / "studio-cache"))
        if args.sweep:
            print(run_sweep(args, device, dtype, Path(tmp)))
            return 0
        if args.model_dir:
            model_dir = Path(args.model_dir)
            model = json.loads((model_dir / "bench_model.json").read_text())
        else:
            model_dir = Path(tmp) / "model"
            model_dir.mkdir()
            t0 = time.perf_counter()
            model = build_model_dir(args, model_dir)
            print(f"built the base in {time.perf_counter() - t0:.1f}s", flush=True)
        print(header(args, model, device, dtype), flush=True)
        print(f"isolation: {isolation}" + ("  (note: on CPU, inline RSS figures of the second stack include what "
                                           "the first left behind; use --isolation process)"
                                           if isolation == "inline" and device.type == "cpu" else ""), flush=True)
        results = {}
        for stack in args.stacks:
            print(f"--- {stack} stack", flush=True)
            runner = run_child if isolation == "process" else run_inline
            results[stack] = runner(stack, args, model_dir, device)
    print()
    print(format_report(results, model, args, device, dtype))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "model": model, "results": results,
                                               "device": str(device)}, indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
