"""Grouped routed experts (studio/moe/grouped.py) against the per-expert eager loop they replace: same function,
same gradients, on all six families, quantized and not; storage made in batched calls equals per-expert storage;
the workspace budget; loading a MoE without its dense expert stack; the trainer's tokens/s and final eval."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from studio.models.loading import QuantSpec, load_base
from studio.models.tiny import EMBEDDED
from studio.moe import grouped
from studio.moe.experts import ExpertQuant, StudioExperts, quantize_expert_stack

ARCHS = list(EMBEDDED)
# Documented tolerances of the grouped path against the eager loop (max |difference| / max |eager value|): the
# products are the same but summed in another order (batched matmuls), so they agree to rounding of the dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _experts(name: str, mode: str, compute_dtype: str = "float32"):
    loaded = load_base(name, QuantSpec(mode, compute_dtype=compute_dtype))
    return loaded, [m for m in loaded.model.modules() if isinstance(m, StudioExperts)]


def _random_lora(module: StudioExperts, r: int = 4, seed: int = 0, dropout: float = 0.0, name: str = "t"):
    lora = module.add_adapter(name, r=r, alpha=2 * r, dropout=dropout)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(lora.lora_A.values()) + list(lora.lora_B.values()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return lora


def _routing(module: StudioExperts, tokens: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(module.num_experts, generator=gen)[:k] for _ in range(tokens)])
    return idx, torch.rand(tokens, k, generator=gen)


def _run(module: StudioExperts, x, idx, weights, lora, impl: str, layout: str = "auto"):
    """Output and the gradients of x, the routing weights and every LoRA factor under a fixed upstream gradient."""
    module.experts_impl, module.grouped_layout = impl, layout
    x = x.detach().clone().requires_grad_()
    w = weights.detach().clone().requires_grad_()
    for p in lora.parameters():
        p.grad = None
    y = module(x, idx, w)
    upstream = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).view_as(y).to(y.dtype)
    (y * upstream).sum().backward()
    return [y.detach(), x.grad, w.grad] + [p.grad.detach().clone() for p in lora.parameters()]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _per_expert_storage(w: torch.Tensor, quant: ExpertQuant) -> dict:
    """The storage as the landed code made it: one bitsandbytes call per expert (the oracle for the batched one)."""
    import bitsandbytes.functional as bnbf

    if quant.bits == 8:
        pairs = [bnbf.int8_vectorwise_quant(w[e].to(torch.float16))[:2] for e in range(w.shape[0])]
        return {"int8": torch.stack([p[0] for p in pairs]), "scale": torch.stack([p[1].float() for p in pairs])}
    out: dict = {"nf4": [], "absmax": [], "absmax2": [], "offset": []}
    for e in range(w.shape[0]):
        packed, state = bnbf.quantize_4bit(w[e].contiguous(), blocksize=quant.blocksize,
                                           compress_statistics=quant.double_quant, quant_type=quant.quant_type)
        out["nf4"].append(packed.view(-1))
        out["absmax"].append(state.absmax)
        out["code"] = state.code
        if state.nested:
            out["absmax2"].append(state.state2.absmax)
            out["offset"].append(state.offset.reshape(1).float())
            out["code2"] = state.state2.code
    result = {k: torch.stack(out[k]) for k in ("nf4", "absmax")} | {"code": out["code"]}
    if quant.double_quant:
        result |= {"absmax2": torch.stack(out["absmax2"]), "offset": torch.cat(out["offset"]), "code2": out["code2"]}
    return result


@pytest.mark.parametrize("shape", [(8, 96, 64), (3, 10, 7), (40, 64, 32)])
@pytest.mark.parametrize("quant", [ExpertQuant(4), ExpertQuant(4, "fp4"), ExpertQuant(4, double_quant=True),
                                   ExpertQuant(8)], ids=["nf4", "fp4", "nf4-dq", "int8"])
def test_batched_quantization_is_bit_identical_to_per_expert(shape, quant, monkeypatch):
    # a small chunk size so the (40, 64, 32) stack is quantized over several calls
    monkeypatch.setattr("studio.moe.experts.QUANTIZE_CHUNK_ELEMENTS", 64 * 32 * 7)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours, oracle = quantize_expert_stack(w, quant), _per_expert_storage(w, quant)
    assert ours.keys() == oracle.keys()
    for key in ours:
        assert torch.equal(ours[key], oracle[key]), key


@pytest.mark.parametrize("mode", ["4bit", "8bit", "none"])
@pytest.mark.parametrize("name", ARCHS)
def test_grouped_equals_eager_forward_and_gradients(name, mode):
    _, modules = _experts(name, mode)
    module = modules[0]
    lora = _random_lora(module)
    lora.train()
    hidden = module.layout(module.weight_names[0])[1]
    x = torch.randn(37, hidden, generator=torch.Generator().manual_seed(2))
    idx, weights = _routing(module, 37, 2)
    eager = _run(module, x, idx, weights, lora, "eager")
    assert eager[0].abs().max() > 0 and all(g.abs().max() > 0 for g in eager[1:])
    for layout in ("padded", "jagged"):
        ours = _run(module, x, idx, weights, lora, "grouped", layout)
        labels = ["output", "grad x", "grad routing weights"] + [n for n, _ in lora.named_parameters()]
        for label, a, b in zip(labels, ours, eager):
            assert _rel(a, b) < TOLERANCE[torch.float32], (name, mode, layout, label, _rel(a, b))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_grouped_equals_eager_in_16_bit_compute(dtype):
    _, modules = _experts("tiny-qwen3-moe", "4bit", compute_dtype=dtype)
    module = modules[0]
    torch_dtype = getattr(torch, dtype)
    lora = _random_lora(module)
    lora.train()
    hidden = module.layout(module.weight_names[0])[1]
    x = torch.randn(29, hidden, generator=torch.Generator().manual_seed(3)).to(torch_dtype)
    idx, weights = _routing(module, 29, 2)
    weights = weights.to(torch_dtype)
    eager = _run(module, x, idx, weights, lora, "eager")
    ours = _run(module, x, idx, weights, lora, "grouped")
    assert ours[0].dtype == torch_dtype
    for a, b in zip(ours, eager):
        assert _rel(a, b) < TOLERANCE[torch_dtype]


def test_workspace_budget_chunks_the_expert_range_and_keeps_the_function(monkeypatch):
    _, modules = _experts("tiny-moe", "4bit")
    module = modules[0]
    lora = _random_lora(module)
    lora.train()
    hidden = module.layout(module.weight_names[0])[1]
    x = torch.randn(40, hidden, generator=torch.Generator().manual_seed(4))
    idx, weights = _routing(module, 40, 2)
    whole = _run(module, x, idx, weights, lora, "grouped")
    sizes = []
    original = StudioExperts.dense_experts

    def spy(self, name, experts, dtype=None):
        out = original(self, name, experts, dtype)
        sizes.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(StudioExperts, "dense_experts", spy)
    e, a, b = module._shapes[module.weight_names[0]]
    module.workspace_bytes = 2 * a * b * 4  # two fp32 experts of the larger projection
    chunked = _run(module, x, idx, weights, lora, "grouped")
    assert max(sizes) <= module.workspace_bytes
    assert len(sizes) >= 2 * module.num_experts // 2  # forward + backward of both projections, several chunks each
    for p, q in zip(chunked, whole):
        assert _rel(p, q) < 1e-6


def test_skewed_routing_and_unused_slots():
    """Every token on one expert (the padded layout would waste rows: the jagged layout is chosen), and the
    `num_experts` sentinel some families use for unused top-k slots contributes nothing."""
    _, modules = _experts("tiny-mixtral", "4bit")
    module = modules[0]
    lora = _random_lora(module)
    lora.train()
    hidden = module.layout(module.weight_names[0])[1]
    x = torch.randn(24, hidden, generator=torch.Generator().manual_seed(5))
    idx = torch.zeros(24, 2, dtype=torch.long)
    idx[:4, 1] = torch.tensor([1, 2, 3, 4])  # one token each; every other assignment goes to expert 0
    idx[20:, 1] = module.num_experts  # sentinel: not routed
    weights = torch.rand(24, 2, generator=torch.Generator().manual_seed(6))
    routing = grouped.Routing(idx, module.num_experts)
    assert routing.layout == "jagged" and routing.rows == 44 and routing.hit.tolist() == [0, 1, 2, 3, 4]
    eager = _run(module, x, idx, weights, lora, "eager")
    ours = _run(module, x, idx, weights, lora, "grouped")
    for a, b in zip(ours, eager):
        assert _rel(a, b) < TOLERANCE[torch.float32]
    assert torch.equal(ours[2][20:, 1], torch.zeros(4))  # the sentinel slots' weights get no gradient


def test_automatic_layout_follows_the_measured_costs():
    """Routing's automatic layout (bench/expert_layouts.py): training keeps the padded grid while it wastes at most
    MAX_PADDING_WASTE; CPU inference runs jagged with one torch thread (torch._grouped_mm's loop of matmuls was as
    fast at decode and faster from 96 tokens on) and, with more threads, the padded grid at decode sizes (one bmm
    instead of one OpenMP fork and join per expert, 25-30% faster) but jagged for prefills and skewed routing."""
    g = torch.Generator().manual_seed(0)
    decode = torch.rand(12, 64, generator=g).topk(8, -1).indices
    prefill = torch.rand(384, 64, generator=g).topk(8, -1).indices
    skewed = decode.clone()
    skewed[:, 0] = 5  # every token's first choice: one expert holds 12 rows, the others about 1
    threads = torch.get_num_threads()

    def layout(index):
        return grouped.Routing(index, 64).layout

    def waste(index):
        r = grouped.Routing(index, 64, "jagged")
        return r.groups * r.cap / r.rows

    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            assert (layout(decode), layout(prefill)) == ("padded", "jagged")
            assert waste(skewed) > grouped.CPU_INFERENCE_MAX_PADDING_WASTE and layout(skewed) == "jagged"
        for index in (decode, prefill):  # training: the padding-waste rule alone
            assert layout(index) == ("padded" if waste(index) <= grouped.MAX_PADDING_WASTE else "jagged")
        assert layout(prefill) == "padded"
        torch.set_num_threads(1)
        with torch.no_grad():
            assert (layout(decode), layout(prefill)) == ("jagged", "jagged")
    finally:
        torch.set_num_threads(threads)


def test_dropout_applies_in_training_only():
    _, modules = _experts("tiny-qwen3-moe", "4bit")
    module = modules[0]
    lora = _random_lora(module, dropout=0.5)
    hidden = module.layout(module.weight_names[0])[1]
    x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(7))
    idx, weights = _routing(module, 16, 2)
    lora.eval()
    evaluated = _run(module, x, idx, weights, lora, "grouped")
    eager_eval = _run(module, x, idx, weights, lora, "eager")
    assert _rel(evaluated[0], eager_eval[0]) < TOLERANCE[torch.float32]
    lora.train()
    torch.manual_seed(0)
    trained = _run(module, x, idx, weights, lora, "grouped")
    assert _rel(trained[0], evaluated[0]) > 1e-3  # half of the LoRA input was dropped
    assert all(torch.isfinite(g).all() for g in trained[1:])


def test_frozen_adapter_runs_the_serving_product_and_passes_input_gradients(monkeypatch):
    """An adapter in inference (eval mode, frozen) runs the product a serving slot runs (studio.lora.layers.
    _expert_lora, on its cached slot-layout factors) in the grouped path: same output as the eager loop, with and
    without gradients, and the input's gradient still flows through it (a frozen adapter under one that trains)."""
    from studio.lora import experts as lora_experts
    from studio.lora import layers

    _, modules = _experts("tiny-qwen3-moe", "4bit")
    module = modules[0]
    lora = _random_lora(module)
    lora.eval().requires_grad_(False)
    hidden = module.layout(module.weight_names[0])[1]
    x = torch.randn(23, hidden, generator=torch.Generator().manual_seed(8))
    idx, weights = _routing(module, 23, 2)
    results = {}
    for impl, layout in (("eager", "auto"), ("grouped", "padded"), ("grouped", "jagged")):
        module.experts_impl, module.grouped_layout = impl, layout
        xg = x.clone().requires_grad_()
        y = module(xg, idx, weights)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        with torch.no_grad():
            results[impl, layout] = (y.detach(), xg.grad, module(x, idx, weights))
    calls = []
    monkeypatch.setattr(lora_experts, "_expert_lora", lambda *args: calls.append(1) or layers._expert_lora(*args))
    with torch.no_grad():
        module(x, idx, weights)
    assert len(calls) == 2  # one per projection
    eager = results["eager", "auto"]
    for key in (("grouped", "padded"), ("grouped", "jagged")):
        for label, a, b in zip(("output", "grad x", "output without grad"), results[key], eager):
            assert _rel(a, b) < TOLERANCE[torch.float32], (key, label, _rel(a, b))
    module.active_adapters = []
    assert _rel(module(x, idx, weights), eager[0]) > 1e-2  # the adapter does change the output


@pytest.mark.parametrize("name", ARCHS)
def test_training_from_the_same_seed_gives_the_same_loss_curve(name):
    from studio.adapters import apply_plan
    from studio.moe.plan import LoraSettings, build_plan

    curves = {}
    for impl in ("eager", "grouped"):
        loaded = load_base(name, QuantSpec("4bit"), experts_impl=impl)
        torch.manual_seed(0)
        plan = build_plan(loaded.model, loaded.arch, loaded.components, "attention,experts",
                          LoraSettings(r=4, alpha=8, dropout=0.0))
        apply_plan(loaded.model, plan, "default")
        opt = torch.optim.AdamW([p for p in loaded.model.parameters() if p.requires_grad], lr=5e-3)
        ids = torch.randint(6, 2000, (2, 24), generator=torch.Generator().manual_seed(8))
        loaded.model.train()
        losses = []
        for _ in range(4):
            loss = loaded.model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[impl] = losses
    assert curves["grouped"][-1] < curves["grouped"][0]
    for a, b in zip(curves["grouped"], curves["eager"]):
        assert abs(a - b) <= 1e-4 * abs(b), curves


def test_experts_impl_is_checked():
    from studio.errors import ModelError

    with pytest.raises(ModelError, match="--experts-impl must be one of grouped, eager"):
        load_base("tiny-moe", QuantSpec("4bit"), experts_impl="loop")


_LOAD_PROBE = textwrap.dedent("""
    import ctypes, gc, json, sys, threading

    def anon():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    import bitsandbytes, torch, transformers  # noqa: F401  (imported before the baseline)
    from studio.models.loading import QuantSpec, load_base

    gc.collect()
    base = peak = anon()
    stop = threading.Event()

    def sample():
        global peak
        while not stop.wait(0.002):
            peak = max(peak, anon())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    loaded = load_base(sys.argv[1], QuantSpec("4bit"))
    stop.set()
    thread.join()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    final = anon()
    print(json.dumps({"peak": max(peak, final) - base, "final": final - base,
                      "experts": loaded.memory["routed_experts"]["bytes"]}))
""")


@pytest.mark.slow
def test_4bit_load_never_holds_the_dense_expert_stack(tmp_path):
    """Slow (about a minute on 2 cores): writes a 353M-parameter Qwen3-MoE (302M in routed experts, bf16 on disk,
    per-expert tensors as transformers saves them) and loads it in 4-bit in a fresh process, sampling its anonymous
    memory every 2 ms the way bench/train_step.py does.

    Bound: peak <= final resident + 1.75 x one layer's dense experts in the compute dtype. transformers' merge of a
    per-expert checkpoint into fused tensors holds the per-expert tensors, their stack and the fused result at once
    (measured: 2.4x the gate_up tensor, 1.56x one layer); the studio adds only the quantized codes. Before, the whole
    dense stack (12 layers) was resident before quantizing."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from studio.models.tokenizer import load_tokenizer

    tok = load_tokenizer()
    layers, experts, hidden, inter = 12, 32, 1024, 256
    config = Qwen3MoeConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            bos_token_id=None, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=128, intermediate_size=2048, moe_intermediate_size=inter,
                            num_experts=experts, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                            tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    expert_params = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    assert sum(p.numel() for p in model.parameters()) >= 300e6 and expert_params >= 300e6
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    del model
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1",
               STUDIO_MODELS_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(tmp_path / "m")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    layer_dense = expert_params // layers * 4  # fp32 compute dtype on CPU
    extra = got["peak"] - got["final"]
    print(f"load: peak {got['peak'] / 2**20:.0f} MiB, final {got['final'] / 2**20:.0f} MiB, transient "
          f"{extra / 2**20:.0f} MiB = {extra / layer_dense:.2f}x one layer's dense experts "
          f"({layer_dense / 2**20:.0f} MiB); all dense experts would be {expert_params * 4 / 2**20:.0f} MiB")
    assert got["experts"] < 0.15 * expert_params * 4  # the experts are stored in 4-bit
    assert extra <= 1.75 * layer_dense, got


def test_trainer_tokens_per_s_leaves_out_evals_and_evaluates_the_end_once(tmp_path, monkeypatch):
    """The held-out eval before training is not training time, and the eval the trainer runs after its last step is
    reused instead of being run again. The eval moves the trainer's clock (time.perf_counter) on by 1000 s instead
    of sleeping, so counting it would make the first rate about 1000x lower than the rest, far beyond what a first
    step's warm-up or a busy machine does (a 1.5 s sleep against real step times failed under load)."""
    import time

    import transformers

    from test_train import _cfg, _logged

    from studio.train import run_training

    calls = []
    original = transformers.Trainer.evaluate
    real_clock, skipped = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skipped[0])

    def slow_evaluate(self, *args, **kwargs):
        calls.append(self.state.global_step)
        skipped[0] += 1000.0
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", slow_evaluate)
    result = run_training(_cfg(tmp_path, max_steps=4, eval_steps=4, logging_steps=1), log=lambda *_: None)
    assert calls == [0, 4]  # before training, and once at the end (not a second time after it)
    logs = [e for e in _logged(result.run_dir) if e.get("event") == "log" and "tokens_per_s" in e]
    assert len(logs) == 4
    rates = [e["tokens_per_s"] for e in logs]
    # with the eval's 1000 s counted the first rate would be ~1000x lower than the others; a first step's warm-up
    # on a busy machine made it up to 5x lower
    assert rates[0] > 0.05 * sorted(rates[1:])[1], rates
    ends = [e for e in _logged(result.run_dir) if e.get("event") == "log" and "eval_loss" in e]
    assert result.metrics["eval_loss"] == pytest.approx(ends[-1]["eval_loss"])


def test_dry_run_prints_active_parameters_and_the_load_peak(capsys):
    from studio.finetune import main as finetune_main
    from studio.models.memory import count_parameters, estimate_training_memory, human_bytes
    from studio.models.resolve import resolve_base

    assert finetune_main(["--base", "Qwen/Qwen3-30B-A3B", "--dataset", "law", "--dry-run",
                          "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    config = resolve_base("Qwen/Qwen3-30B-A3B", config_only=True).config
    counts = count_parameters(config)
    assert "active per token" in out and f"{counts.active / 1e9:.2f}B" in out
    est = estimate_training_memory(config, quant="4bit", r=16, targets=["attention", "routed_experts"],
                                   seq_len=512, batch_size=4, device_bytes=80 * 2**30)
    # hand computation: the fused gate_up stack [128, 2 * 768, 2048] in bf16, 2.5 times (transformers' merge)
    assert est.load_transient_bytes == int(2.5 * 128 * 2 * 768 * 2048 * 2)
    assert est.load_peak_bytes == est.base_weight_bytes + est.load_transient_bytes + est.overhead_bytes
    assert "load peak (estimated)" in out and human_bytes(est.load_peak_bytes) in out
