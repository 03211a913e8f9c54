"""CUDA checks of the grouped experts that CPU CI cannot make; run by bench/gpu.sh on a GPU machine.

    python bench/gpu_checks.py            # about 2 minutes on one H100/H200

1. Parity on CUDA: grouped (jagged, torch._grouped_mm on sm90+ bf16; padded bmm) vs the eager loop, forward and
   gradients, NF4 experts in bf16 compute, on tiny-qwen3-moe and tiny-gpt-oss (transposed layout, biases).
2. Loading without a dense copy on the device: a Qwen3-MoE of ~1.6B parameters written in bf16, loaded in 4-bit
   straight to the GPU; the peak allocation minus the final one, against one layer's bf16 experts.
Prints one JSON line per check; exits 1 if a check fails.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parity() -> list[dict]:
    import torch

    from studio.models.loading import QuantSpec, load_base
    from studio.moe.experts import StudioExperts

    out = []
    for name in ("tiny-qwen3-moe", "tiny-gpt-oss"):
        loaded = load_base(name, QuantSpec("4bit", compute_dtype="bfloat16"), device="cuda")
        module = next(m for m in loaded.model.modules() if isinstance(m, StudioExperts))
        lora = module.add_adapter("t", r=8, alpha=16)
        with torch.no_grad():
            for p in lora.parameters():
                p.normal_(0, 0.05)
        lora.train()
        hidden = module.layout(module.weight_names[0])[1]
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(257, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        idx = torch.stack([torch.randperm(module.num_experts, device="cuda", generator=gen)[:2] for _ in range(257)])
        w = torch.rand(257, 2, device="cuda", generator=gen).to(torch.bfloat16)
        results = {}
        for impl, layout in (("eager", "auto"), ("grouped", "jagged"), ("grouped", "padded")):
            module.experts_impl, module.grouped_layout = impl, layout
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            for p in lora.parameters():
                p.grad = None
            y = module(xx, idx, ww)
            (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
            results[layout if impl == "grouped" else "eager"] = [y, xx.grad, ww.grad] + [p.grad for p in lora.parameters()]
        for layout in ("jagged", "padded"):
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                      for a, b in zip(results[layout], results["eager"]))
            out.append({"check": "parity", "family": name, "layout": layout, "max_rel_err": err, "ok": err < 3e-2})
    return out


def load_without_dense_copy() -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from studio.models.loading import QuantSpec, load_base
    from studio.models.tokenizer import load_tokenizer

    tok = load_tokenizer()
    layers, experts, hidden, inter = 8, 64, 2048, 512
    config = Qwen3MoeConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            bos_token_id=None, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16,
                            num_key_value_heads=4, head_dim=128, intermediate_size=4096, moe_intermediate_size=inter,
                            num_experts=experts, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                            tie_word_embeddings=False, max_position_embeddings=1024)
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        expert_params = sum(p.numel() for p in model.parameters() if p.dim() == 3)
        total = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loaded = load_base(tmp, QuantSpec("4bit", compute_dtype="bfloat16"), device="cuda")
        load_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        final = torch.cuda.memory_allocated() - before
        peak = torch.cuda.max_memory_allocated() - before
        del loaded
    layer_bf16 = expert_params // layers * 2
    extra = peak - final
    return {"check": "load", "params": total, "expert_params": expert_params, "final_bytes": final,
            "peak_bytes": peak, "transient_over_one_layer_bf16": extra / layer_bf16,
            "dense_bf16_expert_stack_bytes": expert_params * 2, "load_s": load_s, "ok": extra <= 1.75 * layer_bf16}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                      "capability": torch.cuda.get_device_capability(0)}), flush=True)
    ok = True
    for result in parity() + [load_without_dense_copy()]:
        print(json.dumps(result), flush=True)
        ok &= result["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
