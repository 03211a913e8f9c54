"""The memory planner: parameter counts of real architectures from their shipped configs (meta device),
training-memory estimates, and `studio models plan` / `list`. Offline."""

from __future__ import annotations

import json

import pytest

from studio.cli import main
from studio.errors import PlanError
from studio.models import memory as M
from studio.models.resolve import known_config, known_configs
from studio.models.tiny import EMBEDDED, TOKENIZER_DIR, make_config

needs_tokenizer = pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.json").is_file(),
                                     reason="the tiny-moe tokenizer asset is not written yet")

# hub id -> (published total, published active, which active count the model card uses). Model cards differ:
# Mixtral, Qwen and OLMoE count the embedding table as active; OpenAI (gpt-oss) and DeepSeek-V2 do not.
PUBLISHED = {
    "mistralai/Mixtral-8x7B-v0.1": (46.7e9, 12.9e9, "active"),
    "Qwen/Qwen3-30B-A3B": (30.5e9, 3.3e9, "active"),
    "Qwen/Qwen1.5-MoE-A2.7B": (14.3e9, 2.7e9, "active"),
    "allenai/OLMoE-1B-7B-0924": (6.9e9, 1.3e9, "active"),
    "openai/gpt-oss-20b": (21e9, 3.6e9, "active_non_embedding"),
    "deepseek-ai/DeepSeek-V2-Lite": (15.7e9, 2.4e9, "active_non_embedding"),
    "deepseek-ai/DeepSeek-V3": (671e9, 37e9, "active"),  # main model, without the MTP module
}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("STUDIO_MODELS_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_every_shipped_config_has_an_expected_total():
    assert set(known_configs()) == set(PUBLISHED)
    for hub_id in PUBLISHED:
        assert known_config(hub_id).name_or_path == hub_id


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_counts_match_published_totals(hub_id):
    total, active, convention = PUBLISHED[hub_id]
    counts = M.count_parameters(known_config(hub_id))
    assert counts.total == pytest.approx(total, rel=0.03)
    assert getattr(counts, convention) == pytest.approx(active, rel=0.03)
    assert sum(counts.components.values()) == counts.total
    assert counts.components["other"] == 0, [p.name for p in counts.params if p.component == "other"][:5]
    assert counts.components["routed_experts"] > 0.85 * counts.total
    assert counts.num_experts > 1 and 1 <= counts.top_k < counts.num_experts
    assert counts.active_non_embedding < counts.active < counts.total


def test_deepseek_v3_layout_is_classified():
    counts = M.count_parameters(known_config("deepseek-ai/DeepSeek-V3"))
    comp = {p.name.split("layers.", 1)[-1].split(".", 1)[-1]: p.component for p in counts.params if p.layer == 5}
    for name in ("self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
                 "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight"):
        assert comp[name] == "attention"
    assert comp["self_attn.q_a_layernorm.weight"] == "norms"
    assert comp["mlp.experts.gate_up_proj"] == "routed_experts"
    assert comp["mlp.shared_experts.down_proj.weight"] == "shared_experts"
    assert comp["mlp.gate.weight"] == "router"
    assert counts.num_layers == 61 and counts.moe_layers == 58
    assert counts.components["dense_mlp"] == 3 * 3 * 7168 * 18432


@needs_tokenizer
@pytest.mark.parametrize("name", EMBEDDED)
def test_tiny_architectures_are_classified(name):
    counts = M.count_parameters(make_config(name))
    c = counts.components
    assert c["attention"] and c["routed_experts"] and c["router"] and c["embeddings"] and c["lm_head"]
    assert c["other"] == 0
    assert (c["shared_experts"] > 0) == (name in ("tiny-moe", "tiny-qwen2-moe"))
    assert (c["dense_mlp"] > 0) == (name == "tiny-moe")


def _mixtral():
    return known_config("mistralai/Mixtral-8x7B-v0.1")


def test_nf4_and_int8_bytes_follow_the_formulas():
    cfg = _mixtral()
    counts = M.count_parameters(cfg)
    e4 = M.estimate_training_memory(cfg, "4bit", device_bytes=0, counts=counts)
    rows = {r.component: r for r in e4.base_rows}
    routed = counts.components["routed_experts"]
    assert rows["routed_experts"].bytes == routed // 2 + 4 * routed // 64 and rows["routed_experts"].dtype == "nf4"
    for kept in ("router", "embeddings", "lm_head", "norms"):
        assert rows[kept].bytes == 2 * rows[kept].params and rows[kept].dtype == "bf16"
    dq = M.estimate_training_memory(cfg, "4bit", double_quant=True, device_bytes=0, counts=counts)
    assert dq.base_weight_bytes < e4.base_weight_bytes
    e8 = M.estimate_training_memory(cfg, "8bit", device_bytes=0, counts=counts)
    assert {r.component: r for r in e8.base_rows}["routed_experts"].bytes == pytest.approx(routed, rel=0.01)
    e16 = M.estimate_training_memory(cfg, "none", device_bytes=0, counts=counts)
    assert e16.base_weight_bytes == 2 * counts.total
    assert e4.total_bytes < e8.total_bytes < e16.total_bytes


def test_lora_sizes():
    cfg = _mixtral()
    r = 8
    est = M.estimate_training_memory(cfg, r=r, targets="all", device_bytes=0)
    h, i, e, layers = 4096, 14336, 8, 32
    expert = r * e * ((h + 2 * i) + (i + h))  # gate_up [E, 2I, H] + down [E, H, I]
    attn = r * ((h + 4096) * 2 + (h + 1024) * 2)  # q, o: 4096x4096; k, v: 1024x4096
    assert est.lora_by_component == {"attention": layers * attn, "routed_experts": layers * expert}
    assert est.optimizer_bytes == 8 * est.lora_params and est.lora_weight_bytes == 4 * est.lora_params
    attn_only = M.estimate_training_memory(cfg, r=r, targets="attention", device_bytes=0)
    assert attn_only.lora_params == layers * attn
    with pytest.raises(PlanError):
        M.estimate_training_memory(cfg, targets="nonsense", device_bytes=0)
    with pytest.raises(PlanError):
        M.estimate_training_memory(cfg, targets="dense_mlp", device_bytes=0)  # Mixtral has none: adapts nothing
    with pytest.raises(PlanError):
        M.estimate_training_memory(cfg, r=0, device_bytes=0)


@pytest.mark.parametrize("knob, values", [("r", (4, 16, 64)), ("seq_len", (256, 2048, 8192)),
                                          ("batch_size", (1, 2, 8))])
def test_estimates_are_monotonic(knob, values):
    cfg = known_config("Qwen/Qwen3-30B-A3B")
    totals = [M.estimate_training_memory(cfg, **{knob: v}, device_bytes=0).total_bytes for v in values]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_checkpointing_and_fit():
    cfg = known_config("Qwen/Qwen3-30B-A3B")
    on = M.estimate_training_memory(cfg, seq_len=4096, device_bytes=80 * M.GiB)
    off = M.estimate_training_memory(cfg, seq_len=4096, grad_checkpointing=False, device_bytes=80 * M.GiB)
    assert off.activation_bytes > 4 * on.activation_bytes
    assert on.fits() and not on.warnings
    assert not on.fits(8 * M.GiB) and on.fits(10**13)
    small = M.estimate_training_memory(cfg, "none", device_bytes=24 * M.GiB)
    assert not small.fits() and "exceeds" in small.warnings[0] and "--quant 4bit" in small.warnings[0]
    report = small.format_report()
    assert "estimate" in report and "routed_experts" in report and "does NOT fit" in report
    assert json.loads(json.dumps(small.to_dict()))["fits"] is False


def test_default_device_is_detected():
    est = M.estimate_training_memory(_mixtral())
    assert est.device_bytes and est.device_bytes > 0 and est.device_name


def test_parse_bytes():
    assert M.parse_bytes("80GiB") == 80 * M.GiB
    assert M.parse_bytes("24GB") == 24 * 10**9
    assert M.parse_bytes("1.5T") == int(1.5 * 2**40)
    assert M.parse_bytes("4096") == 4096
    with pytest.raises(PlanError):
        M.parse_bytes("lots")


def test_cli_plan_known_config(capsys):
    rc = main(["models", "plan", "--base", "mistralai/Mixtral-8x7B-v0.1", "--device-memory", "80GiB"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "46.70B" in out and "12.88B" in out
    assert "QLoRA 4-bit" in out and "LoRA 16-bit" in out and "rough" in out
    assert "exceeds" in out  # Mixtral in 16-bit does not fit 80 GiB
    rc = main(["models", "plan", "--base", "mistralai/Mixtral-8x7B-v0.1", "--device-memory", "80GiB", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["base"]["kind"] == "hub" and data["counts"]["total"] == pytest.approx(46.7e9, rel=0.01)
    assert data["estimates"]["4bit"]["fits"] is True and data["estimates"]["none"]["fits"] is False


@needs_tokenizer
def test_cli_plan_tiny_moe_and_list(capsys):
    rc = main(["models", "plan", "--base", "tiny-moe", "--r", "8", "--seq-len", "128", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["base"]["kind"] == "embedded" and data["counts"]["model_type"] == "deepseek_v3"
    assert data["estimates"]["4bit"]["r"] == 8
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed["embedded"]] == list(EMBEDDED)
    assert not any(e["built"] for e in listed["embedded"])
    assert {k["id"] for k in listed["known_configs"]} == set(PUBLISHED)


def test_cli_errors_are_one_line(capsys):
    assert main(["models", "plan", "--base", "tiny-moee"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tiny-moe" in err
    assert main(["models", "plan", "--base", "mistralai/Mixtral-8x7B-v0.1", "--device-memory", "huge"]) == 2


@needs_tokenizer
def test_every_recipe_base_can_be_planned_offline():
    import yaml

    from studio.models.resolve import resolve_base
    from studio.paths import repo_root

    root = repo_root()
    recipes = sorted((root / "recipes").glob("*.yaml")) if root else []
    if not recipes:
        pytest.skip("no recipes in this checkout")
    for recipe in recipes:
        base = (yaml.safe_load(recipe.read_text()) or {}).get("base")
        if base:
            counts = M.count_parameters(resolve_base(base, config_only=True).config)
            assert counts.num_experts > 1, recipe.name


def test_fsdp2_per_device_estimate_for_deepseek_v3_4bit_on_8_devices_by_hand():
    """QLoRA 4-bit r=16 on attention + routed experts, 8 devices under FSDP2, computed from DeepSeek-V3's shapes."""
    cfg = known_config("deepseek-ai/DeepSeek-V3")
    n, r, h, bf16 = 8, 16, 7168, 2
    est = M.estimate_training_memory(cfg, "4bit", r=r, targets="attention,experts", seq_len=2048, batch_size=1,
                                     device_bytes=80 * M.GiB, num_devices=n)
    one = M.estimate_training_memory(cfg, "4bit", r=r, targets="attention,experts", seq_len=2048, batch_size=1,
                                     device_bytes=80 * M.GiB)

    def nf4(numel):  # packed codes + one fp32 absmax per 64 weights
        return numel // 2 + 4 * (numel // 64)

    layers, moe_layers, experts, inter = 61, 58, 256, 2048
    attn = [(1536, h), (24576, 1536), (576, h), (32768, 512), (h, 16384)]  # MLA: q_a, q_b, kv_a, kv_b, o
    routed_layer = nf4(experts * 2 * inter * h) + nf4(experts * h * inter)
    rows = {row.component: row.bytes for row in est.base_rows}
    # routed experts: the studio's frozen parameters, sharded: 1/8 each
    assert rows["routed_experts"] == moe_layers * routed_layer // n
    # attention and shared experts are bitsandbytes Linear4bit: left out of fully_shard, whole on every device
    assert rows["attention"] == layers * sum(nf4(o * i) for o, i in attn)
    assert rows["shared_experts"] == moe_layers * 3 * nf4(inter * h)
    # bf16 tensors are sharded
    assert rows["lm_head"] == 129280 * h * bf16 // n
    assert rows["router"] == moe_layers * experts * h * bf16 // n
    # LoRA: r*(in+out) per attention linear, r*(in+out)*E per fused expert stack; weights, grads, AdamW all 1/8
    lora = layers * r * sum(o + i for o, i in attn) + moe_layers * r * experts * ((2 * inter + h) + (h + inter))
    assert est.lora_params == lora
    assert est.lora_weight_bytes == est.lora_grad_bytes == 4 * lora // n and est.optimizer_bytes == 8 * lora // n
    # gathered: the largest layer (a MoE layer) at full size, twice (current + prefetched), with its LoRA weights
    # and gradients (fp32); plus lm_head and the final norm, kept gathered from forward to backward
    norms_layer = (1536 + 512 + 2 * h) * bf16
    lora_layer = r * sum(o + i for o, i in attn) + r * experts * ((2 * inter + h) + (h + inter))
    layer_full = routed_layer + experts * h * bf16 + norms_layer + 8 * lora_layer
    assert est.gathered_bytes == 2 * layer_full + 129280 * h * bf16 + h * bf16
    # activations, logits, workspace and overhead are per-device-batch figures, as on one device
    for attr in ("activation_bytes", "logits_bytes", "workspace_bytes", "overhead_bytes", "load_peak_bytes"):
        assert getattr(est, attr) == getattr(one, attr), attr
    expected = (sum(rows.values()) + 16 * lora // n + est.gathered_bytes + est.activation_bytes + est.logits_bytes
                + est.workspace_bytes + est.overhead_bytes)
    assert est.total_bytes == expected
    print(f"DeepSeek-V3 QLoRA 4-bit, per device of 8: {M.human_bytes(est.total_bytes)} "
          f"(one device: {M.human_bytes(one.total_bytes)})")
    assert 75 * M.GiB < est.total_bytes < 90 * M.GiB  # 83.4 GiB: just over an 80 GiB device
    assert not est.fits() and est.fits(141 * M.GiB)  # 8 x H200 (141 GiB) hold it
    assert M.smallest_num_devices(cfg, 80 * M.GiB, quant="4bit", r=r, targets="attention,experts",
                                  seq_len=2048) == 9
    # the unsharded load (every process loads the whole 4-bit base first) is reported, not hidden
    assert est.load_peak_bytes > 300 * M.GiB and est.fits(141 * M.GiB) and not est.load_fits(141 * M.GiB)


def test_cli_plan_and_dry_run_take_num_devices(capsys):
    rc = main(["models", "plan", "--base", "deepseek-ai/DeepSeek-V3", "--device-memory", "80GiB",
               "--num-devices", "8", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["estimates"]["4bit"]["num_devices"] == 8
    assert data["smallest_num_devices"] == {"4bit": 9, "none": 51}
    rc = main(["models", "plan", "--base", "deepseek-ai/DeepSeek-V3", "--device-memory", "141GiB",
               "--num-devices", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "per device of 8 under FSDP2" in out and "FSDP2 gathered layers" in out
    assert "smallest number of devices of 141.00 GiB" in out and "loading is not sharded yet" in out
    from studio.finetune import main as finetune_main

    rc = finetune_main(["--config", "recipes/mixtral-8x7b-law.yaml", "--dry-run", "--device-memory", "24GiB",
                        "--num-devices", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "per device of 4 under FSDP2" in out and "smallest number of devices of 24.00 GiB" in out
    with pytest.raises(PlanError, match="num-devices"):
        M.estimate_training_memory(known_config("deepseek-ai/DeepSeek-V3"), device_bytes=0, num_devices=0)
