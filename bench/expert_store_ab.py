"""A/B in one process: one StudioExperts layer of tiny-moe (4-bit, expert LoRA r=16) with its quantized store as
frozen parameters (now: FSDP2 shards them) and as buffers (before), forward + backward of 512 tokens, the two forms
strictly alternating step by step so that machine load hits both alike.

    python bench/expert_store_ab.py
"""
import statistics, time, torch
from torch import nn
from studio.models.loading import QuantSpec, load_base
from studio.moe.experts import StudioExperts
from studio.moe.plan import build_plan, LoraSettings
from studio.adapters import apply_plan
torch.manual_seed(0)
loaded = load_base("tiny-moe", QuantSpec("4bit"), device="cpu")
plan = build_plan(loaded.model, loaded.arch, loaded.components, "experts", LoraSettings(r=16, alpha=32, dropout=0.0))
apply_plan(loaded.model, plan, "default", trainable=True)
m = [x for x in loaded.model.modules() if isinstance(x, StudioExperts)][0]
m.train()
keys = [k for k in m._parameters if any(k.startswith(w + "_") for w in m.weight_names) and not k.endswith("_bias")]
P = {k: m._parameters[k] for k in keys}
def to_buffers():
    for k in keys:
        del m._parameters[k]; m.register_buffer(k, P[k].data)
def to_params():
    for k in keys:
        del m._buffers[k]; m.register_parameter(k, P[k])
T = 512
x = torch.randn(T, 256)
idx = torch.stack([torch.randperm(m.num_experts)[:2] for _ in range(T)])
w = torch.rand(T, 2).softmax(-1)
def step():
    xx = x.clone().requires_grad_()
    t0 = time.perf_counter(); m(xx, idx, w).sum().backward(); return time.perf_counter() - t0
step(); step()
pa, bu = [], []
for i in range(40):
    pa.append(step()); to_buffers(); bu.append(step()); to_params()
print(f"alternating steps, 40 pairs: params median {statistics.median(pa)*1e3:.1f} ms (min {min(pa)*1e3:.1f}), "
      f"buffers median {statistics.median(bu)*1e3:.1f} ms (min {min(bu)*1e3:.1f}), ratio {statistics.median(pa)/statistics.median(bu):.3f}")
