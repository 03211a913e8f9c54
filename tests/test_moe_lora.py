"""Quantized experts + expert LoRA on the six supported MoE families (tiny models, CPU)."""

import copy

import pytest
import torch
from torch import nn

from studio.adapters import adapter_parameters, apply_plan, load_adapter, save_adapter, set_active_adapter
from studio.errors import ModelError, PlanError
from studio.models.loading import QuantSpec, load_base
from studio.models.tiny import EMBEDDED, build_model
from studio.moe.experts import StudioExperts
from studio.moe.plan import LoraSettings, build_plan

ARCHS = list(EMBEDDED)


def _tokens(n=2, s=24, seed=0):
    return torch.randint(6, 2000, (n, s), generator=torch.Generator().manual_seed(seed))


def plain_peft_logits(base_path, adapter_dir, x):
    """Logits of the fp32 base from `base_path` for tokens `x`, bare and with `adapter_dir` loaded by plain PEFT:
    what a user without the studio gets from a saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        bare = base(input_ids=x).logits
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return bare, peft_model(input_ids=x).logits


def _randomize_lora(model, adapter="default", seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, adapter).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("name", ARCHS)
def test_4bit_stores_routed_experts_in_under_0_3x_bf16(name):
    loaded = load_base(name, QuantSpec("4bit"))
    experts = [m for m in loaded.model.modules() if isinstance(m, StudioExperts)]
    assert experts
    for m in experts:
        bf16 = sum(2 * torch.Size(m._shapes[n]).numel() for n in m.weight_names)
        assert m.storage_bytes() <= 0.3 * bf16, (name, m.storage_bytes() / bf16)
    assert loaded.memory["routed_experts"]["bytes"] == sum(m.storage_bytes() for m in experts)
    assert "uint8" in loaded.memory["routed_experts"]["dtypes"]
    # router, embeddings, lm_head stay in the compute dtype
    assert loaded.memory["router"]["dtypes"] == ["float32"]
    assert loaded.memory["embeddings"]["dtypes"] == ["float32"]


@pytest.mark.parametrize("name", ARCHS)
def test_plan_covers_every_attention_projection_and_every_routed_expert(name):
    reference = build_model(name)  # the plain transformers model, independent of the studio table
    expected_experts = {(n.rsplit(".", 1)[0], n.rsplit(".", 1)[1]) for n, p in reference.named_parameters()
                        if p.dim() == 3 and ".experts." in n}
    expected_attention = {n for n, m in reference.named_modules()
                          if isinstance(m, nn.Linear) and ".self_attn." in n}
    moe_layers = {n.split(".mlp")[0] for n, _ in expected_experts}
    assert moe_layers
    loaded = load_base(name, QuantSpec("4bit"))
    plan = build_plan(loaded.model, loaded.arch, loaded.components, "attention,experts", LoraSettings(r=4))
    got_experts = {(path, p) for path, params in plan.expert_targets.items() for p in params}
    assert got_experts == expected_experts
    assert set(plan.linear_targets) == expected_attention
    text = plan.format()
    assert "routed_experts" in text and "attention" in text and "trainable parameters" in text


@pytest.mark.parametrize("name", ARCHS)
def test_five_steps_lower_loss_change_lora_keep_base(name):
    loaded = load_base(name, QuantSpec("4bit"))
    model = loaded.model
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    plan = build_plan(model, loaded.arch, loaded.components, "all", LoraSettings(r=8, alpha=16, dropout=0.0))
    apply_plan(model, plan, "default")
    lora = {k: v.detach().clone() for k, v in adapter_parameters(model, "default").items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(model, "default").values()}
    opt = torch.optim.AdamW(trainable, lr=5e-3)
    x = _tokens(4, 32)
    model.train()
    losses, aux = [], []
    for _ in range(5):
        out = model(input_ids=x, labels=x, output_router_logits=loaded.arch.aux_loss)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        if out.aux_loss is not None:
            aux.append(out.aux_loss.item())
    assert losses[-1] < losses[0], losses
    assert bool(aux) == loaded.arch.aux_loss
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"base tensor {k} changed"
    changed = [k for k, v in adapter_parameters(model, "default").items() if not torch.equal(v, lora[k])]
    assert len(changed) == len(lora), "every LoRA tensor should have been updated"


@pytest.mark.parametrize("name", ARCHS)
def test_saved_adapter_loads_in_plain_peft_and_matches(name, tmp_path):
    loaded = load_base(name, QuantSpec("none"))
    plan = build_plan(loaded.model, loaded.arch, loaded.components, "attention,experts", LoraSettings(r=4, alpha=8))
    apply_plan(loaded.model, plan, "default")
    _randomize_lora(loaded.model)
    loaded.model.eval()
    x = _tokens()
    with torch.no_grad():
        ours = loaded.model(input_ids=x).logits
    out = save_adapter(loaded.model, plan, tmp_path / "adapter", base_id=name)
    assert {"adapter_config.json", "adapter_model.safetensors", "studio_adapter.json"} <= {p.name for p in out.iterdir()}
    bare, theirs = plain_peft_logits(loaded.path, out, x)
    assert (ours - bare).abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()

    # the same adapter on the 4-bit base stays close to the fp32 function (documented tolerance)
    q = load_base(name, QuantSpec("4bit"))
    load_adapter(q.model, out, "default")
    q.model.eval()
    with torch.no_grad():
        quant = q.model(input_ids=x).logits
    # NF4 tolerance (README): mean |logit difference| below 0.1 and logits' cosine similarity above 0.95
    cos = torch.nn.functional.cosine_similarity(quant.flatten(), ours.flatten(), dim=0).item()
    assert (quant - ours).abs().mean() < 0.1
    assert cos > 0.95


def test_named_adapters_switch_between_single_runs():
    loaded = load_base("tiny-qwen2-moe", QuantSpec("4bit"))
    model = loaded.model
    for i, adapter in enumerate(["law", "code"]):
        torch.manual_seed(i)
        plan = build_plan(model, loaded.arch, loaded.components, "attention,experts", LoraSettings(r=4, dropout=0.0))
        apply_plan(model, plan, adapter, trainable=False)
        _randomize_lora(model, adapter, seed=i + 1)
    model.eval()
    x = _tokens(3, 16)
    single = {}
    with torch.no_grad():
        for adapter in ["law", "code", None]:
            set_active_adapter(model, adapter)
            single[adapter] = model(input_ids=x).logits
    assert (single["law"] - single["code"]).abs().max() > 1e-3
    assert (single["law"] - single[None]).abs().max() > 1e-3
    with torch.no_grad():  # switching back gives the same function again
        set_active_adapter(model, "law")
        assert torch.equal(model(input_ids=x).logits, single["law"])
    # mixed-adapter batches are served from slot buffers: tests/test_lora_slots.py


def test_bad_plans_and_bases_give_specific_errors(tmp_path):
    loaded = load_base("tiny-mixtral", QuantSpec("4bit"))
    with pytest.raises(PlanError, match="matches nothing"):
        build_plan(loaded.model, loaded.arch, loaded.components, "nonexistent_proj")
    with pytest.raises(PlanError, match="no shared_experts"):
        build_plan(loaded.model, loaded.arch, loaded.components, "shared_experts")
    with pytest.raises(PlanError, match="positive integer"):
        LoraSettings(r=0)
    with pytest.raises(ModelError):
        load_base("no-such-base-anywhere")
    # a dense (non-MoE) base is refused with a clear message
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.models.tokenizer import load_tokenizer

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=6144, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    dense.save_pretrained(tmp_path / "dense")
    load_tokenizer().save_pretrained(tmp_path / "dense")
    with pytest.raises(ModelError, match="dense"):
        load_base(str(tmp_path / "dense"), QuantSpec("none"))


def test_slot_linear_trains_and_saves_exactly_as_peft_layers(tmp_path):
    """apply_plan's linear LoRA (studio SlotLinear, one named slot) against PEFT's own layers injected the way the
    studio did before: from the same seed, the same initial factors, the same losses and factors after AdamW steps
    with dropout (bit for bit: same ops in the same order), and a saved file holding the same keys and tensors."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from studio.lora.layers import SlotLinear

    settings = LoraSettings(r=4, alpha=8, dropout=0.1)
    runs = {}
    for impl in ("studio", "peft"):
        loaded = load_base("tiny-qwen2-moe", QuantSpec("4bit"))  # attention and shared experts are bnb Linear4bit
        model = loaded.model
        plan = build_plan(model, loaded.arch, loaded.components, "attention,shared_experts,experts", settings)
        torch.manual_seed(0)
        if impl == "studio":
            apply_plan(model, plan, "default")
            assert all(isinstance(model.get_submodule(p), SlotLinear) for p in plan.linear_targets)
            live = adapter_parameters(model, "default")
        else:  # what apply_plan did before: PEFT's layers on the decoder-layer list, same settings
            layers = "model.layers"
            cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                             target_modules=[t[len(layers) + 1:] for t in plan.linear_targets])
            inject_adapter_in_model(cfg, model.get_submodule(layers), adapter_name="default")
            for path, params in plan.expert_targets.items():
                model.get_submodule(path).add_adapter("default", 4, 8, 0.1, tuple(params))
            for p in model.parameters():
                p.requires_grad_(False)
            live = {}
            for name, m in model.named_modules():
                if isinstance(m, LoraLayer):
                    live[f"base_model.model.{name}.lora_A.weight"] = m.lora_A["default"].weight
                    live[f"base_model.model.{name}.lora_B.weight"] = m.lora_B["default"].weight
            live.update({k: v for k, v in adapter_parameters(model, "default").items() if "experts" in k})
            for p in live.values():
                p.requires_grad_(True)
        initial = {k: v.detach().clone() for k, v in live.items()}
        # the trainable parameters' names and order: what optimizer.pt (by position) and FSDP2's distributed
        # optimizer checkpoints (by name) are keyed by, so checkpoints made with PEFT's layers resume
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x = _tokens(2, 16)
        model.train()
        losses = []
        torch.manual_seed(1)
        for _ in range(3):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[impl] = (initial, losses, {k: v.detach().clone() for k, v in live.items()}, names)
        if impl == "studio":
            out = save_adapter(model, plan, tmp_path / "studio", base_id="tiny-qwen2-moe")
            saved = load_file(str(out / "adapter_model.safetensors"))
    (init_s, loss_s, final_s, names_s), (init_p, loss_p, final_p, names_p) = runs["studio"], runs["peft"]
    assert names_s == names_p and any(n.endswith("q_proj.lora_A.default.weight") for n in names_s)
    assert init_s.keys() == init_p.keys() == final_s.keys() and any("self_attn" in k for k in init_s)
    for k in init_s:
        assert torch.equal(init_s[k], init_p[k]), k
    assert loss_s == loss_p and loss_s[-1] < loss_s[0], (loss_s, loss_p)
    for k in final_s:
        assert torch.equal(final_s[k], final_p[k]), k
        assert not torch.equal(final_s[k], init_s[k]), k  # every factor trained
    assert saved.keys() == final_p.keys()
    for k, v in saved.items():
        assert v.dtype == torch.float32 and torch.equal(v, final_p[k].float()), k


@pytest.mark.parametrize("use_rslora", [False, True])
def test_slot_linear_named_slot_is_peft_lora_linear(use_rslora):
    """SlotLinear's named slot against PEFT's lora.Linear on the same nn.Linear: same init from the same seed, same
    output with dropout in training, same gradients, rank-stabilised scaling included; off when deactivated."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    from studio.lora.layers import SlotLinear

    base = nn.Linear(12, 10)
    torch.manual_seed(0)
    ours = SlotLinear(copy.deepcopy(base))
    ours.add_adapter("a", r=4, alpha=16, dropout=0.3, use_rslora=use_rslora)
    ours.set_adapter("a")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.3, use_rslora=use_rslora)
    theirs = PeftLinear(copy.deepcopy(base), "a", config, r=4, lora_alpha=16)
    assert torch.equal(ours.lora_A["a"].weight, theirs.lora_A["a"].weight)
    with torch.no_grad():  # a non-zero B so that the LoRA term (and its scaling) shows in the output
        b = torch.randn(10, 4)
        ours.lora_B["a"].weight.copy_(b)
        theirs.lora_B["a"].weight.copy_(b)
    x = torch.randn(3, 5, 12)
    outs = []
    for layer in (ours, theirs):
        layer.train()
        torch.manual_seed(1)
        y = layer(x)
        y.pow(2).sum().backward()
        outs.append((y.detach(), layer.lora_A["a"].weight.grad, layer.lora_B["a"].weight.grad))
    for mine, peft in zip(*outs):
        assert torch.equal(mine, peft)
    assert not torch.allclose(outs[0][0], base(x))
    ours.set_adapter(None)
    assert torch.equal(ours(x), base(x))
