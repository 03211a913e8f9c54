"""`studio export`: PEFT files with a model card, per-expert 2D LoRA (vLLM's layout for 2D MoE models) and merged
transformers checkpoints, on the six supported MoE families (tiny models, CPU)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from studio.adapters import load_adapter, save_random_adapter, set_active_adapter
from studio.errors import StudioError
from studio.export import MANIFEST_FILE, export_adapter, fused_factors, verify_export
from studio.models.loading import QuantSpec, load_base
from studio.models.tiny import TINY_ARCHS
from studio.moe.arch import ARCHS
from studio.registry import AdapterRegistry

FAMILIES = {"tiny-moe": "deepseek_v3", "tiny-mixtral": "mixtral", "tiny-qwen2-moe": "qwen2_moe",
            "tiny-qwen3-moe": "qwen3_moe", "tiny-olmoe": "olmoe", "tiny-gpt-oss": "gpt_oss"}
assert set(FAMILIES) - {"tiny-moe"} == set(TINY_ARCHS)
TOKENS = torch.randint(6, 2000, (2, 16), generator=torch.Generator().manual_seed(0))


def _domain(name: str) -> str:
    return name.replace("tiny-", "fam-")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """For each family: a random adapter on attention, routed and shared experts (fp32 base), registered, exported
    per-expert and merged; plus the adapter-on-base logits of the studio's own model."""
    root = tmp_path_factory.mktemp("export")
    registry = AdapterRegistry(root / "reg")
    out = {}
    for name in FAMILIES:
        loaded = load_base(name, QuantSpec("none"))
        registry.register(save_random_adapter(loaded, root / "work" / name, _domain(name), seed=7, targets="all",
                                              scale=0.05), _domain(name))
        load_adapter(loaded.model, registry.path(_domain(name)), "exported")
        set_active_adapter(loaded.model, "exported")
        with torch.no_grad():
            logits = loaded.model(input_ids=TOKENS).logits
        out[name] = {"logits": logits, "base_path": loaded.path,
                     "per_expert": export_adapter(_domain(name), "per-expert", root / "per-expert" / name,
                                                  registry=registry).path,
                     "merged": export_adapter(_domain(name), "merged", root / "merged" / name,
                                              registry=registry).path}
        del loaded
    return {"root": root, "registry": registry, "families": out}


def _peft_expert_deltas(base_path: str, adapter_dir, work) -> dict[tuple[str, str], torch.Tensor]:
    """PEFT's own ΔW of every fused expert parameter, in float64, as [E, out, in] (the oracle). PEFT loads the
    adapter's expert part alone: given shared-expert `gate_proj` targets on a fused-experts model, PEFT's v4->v5
    target conversion would also put LoRA on `gate_up_proj` (with another rank) and refuse the weights."""
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["target_modules"] = []
    work.mkdir()
    (work / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
               if ".mlp.experts." in k},
              str(work / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(work)).double()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            path = name.removeprefix("base_model.model.").replace(".base_layer", "")
            delta = module.get_delta_weight("default")
            experts = model.get_submodule(name.split(".base_layer")[0]).get_base_layer()
            while hasattr(experts, "base_layer"):
                experts = experts.base_layer
            if getattr(experts, "is_transposed", False):
                delta = delta.transpose(1, 2)
            out[(path, module.parameter_name)] = delta
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_per_expert_factors_reassemble_the_fused_delta(exported, name, tmp_path):
    """ΔW per expert computed both ways: PEFT's fused einsum vs the exported 2D modules' B @ A (gate and up
    concatenated, or interleaved for gpt-oss), in float64. Reading lora_B expert-slowest must not match."""
    arch = ARCHS[FAMILIES[name]]
    fam = exported["families"][name]
    oracle = _peft_expert_deltas(fam["base_path"], exported["registry"].path(_domain(name)), tmp_path / "experts")
    assert {p for _, p in oracle} == {"gate_up_proj", "down_proj"}
    d = fam["per_expert"]
    config = json.loads((d / "adapter_config.json").read_text())
    weights = load_file(str(d / "adapter_model.safetensors"))
    scaling = config["lora_alpha"] / config["r"]
    assert "target_parameters" not in config or not config["target_parameters"]
    assert set(config["target_modules"]) == {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                                             for k in weights}
    assert all(w.shape[0 if ".lora_A." in k else 1] == config["r"] for k, w in weights.items())  # one rank
    gate, up, down = arch.checkpoint_expert_names

    def module_delta(module: str) -> torch.Tensor:
        a = weights[f"base_model.model.{module}.lora_A.weight"].double()
        b = weights[f"base_model.model.{module}.lora_B.weight"].double()
        return scaling * b @ a

    for (path, param), delta in oracle.items():
        parent = path[:-len(arch.experts_module)] + arch.checkpoint_experts
        for e in range(delta.shape[0]):
            if param == "gate_up_proj":
                g, u = module_delta(f"{parent}.{e}.{gate}"), module_delta(f"{parent}.{e}.{up}")
                ours = torch.stack([g, u], dim=1).flatten(0, 1) if arch.gate_up_interleaved else torch.cat([g, u])
            else:
                ours = module_delta(f"{parent}.{e}.{down}")
            assert (ours - delta[e]).abs().max() < 1e-12, (path, param, e)
    # the classic export bug (unsloth#5410): lora_B read expert-major gives other experts' deltas
    fused = load_file(str(exported["registry"].path(_domain(name)) / "adapter_model.safetensors"))
    key = next(k for k in fused if k.endswith("experts.lora_B.weight"))
    b, r = fused[key].double(), config["r"]
    a = fused[key.replace("lora_B", "lora_A")].double()
    e_count = a.shape[0] // r
    wrong = scaling * b.view(b.shape[0], e_count, r)[:, 1] @ a.view(e_count, r, -1)[1]
    a_e, b_e = fused_factors(a, b, r)
    assert (wrong - scaling * b_e[1] @ a_e[1]).abs().max() > 1e-4


def test_merged_checkpoints_load_without_studio_or_peft_and_match_adapter_on_base(exported, tmp_path):
    """One fresh interpreter loads all six merged checkpoints with plain transformers (asserting that neither
    studio nor peft was imported) and writes their logits; each equals the studio's adapter-on-base fp32 logits."""
    dirs = {name: str(fam["merged"]) for name, fam in exported["families"].items()}
    script = textwrap.dedent(f"""
        import json, sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokens = torch.tensor({TOKENS.tolist()})
        out = {{}}
        for name, path in json.loads(sys.argv[1]).items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            AutoTokenizer.from_pretrained(path)
            with torch.no_grad():
                out[name] = model(input_ids=tokens).logits.contiguous()
        assert not [m for m in sys.modules if m.split('.')[0] in ('studio', 'peft')], 'studio or peft imported'
        save_file(out, sys.argv[2])
    """)
    result = tmp_path / "logits.safetensors"
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(dirs), str(result)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(result))
    for name, fam in exported["families"].items():
        ours = fam["logits"]
        assert (ours - theirs[name]).abs().max() < 1e-4, (name, (ours - theirs[name]).abs().max())
    # the merge did something: the base alone is far from the adapter-on-base logits
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(exported["families"]["tiny-mixtral"]["base_path"], dtype=torch.float32)
    with torch.no_grad():
        assert (base(input_ids=TOKENS).logits - exported["families"]["tiny-mixtral"]["logits"]).abs().max() > 1e-2


def test_merged_checkpoint_layout_bf16_and_4bit_warning(tmp_path):
    """A merged checkpoint is safetensors + config + tokenizer with every tensor in the asked dtype; an adapter
    trained on a 4-bit base warns that the merge uses the full-precision (dequantized) base."""
    registry = AdapterRegistry(tmp_path / "reg")
    q = load_base("tiny-olmoe", QuantSpec("4bit"))
    registry.register(save_random_adapter(q, tmp_path / "w", "olmoe4", seed=1), "olmoe4")
    with pytest.warns(UserWarning, match="4bit quantized base"):
        result = export_adapter("olmoe4", "merged", tmp_path / "out", registry=registry, dtype="bf16")
    names = {f["path"] for f in result.files}
    assert {"config.json", "tokenizer.json", "README.md"} <= names and any(n.endswith(".safetensors") for n in names)
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"
    for f in result.path.glob("*.safetensors"):
        assert {t.dtype for t in load_file(str(f)).values()} == {torch.bfloat16}
    assert "4bit" in json.loads((result.path / MANIFEST_FILE).read_text())["warnings"][0]


def test_peft_export_model_card_manifest_atomic_and_cli(exported, tmp_path, capsys):
    from studio.cli import main

    registry = exported["registry"]
    ref = _domain("tiny-qwen3-moe")
    registry.append_metrics(f"{ref}@v1", {"eval_loss": 1.25}, source="test")
    code = main(["export", ref, "--format", "peft", "--output", str(tmp_path / "peft"), "--registry",
                 str(exported["root"] / "reg")])
    assert code == 0 and "exported fam-qwen3-moe@v1 as peft" in capsys.readouterr().out
    d = tmp_path / "peft"
    card = (d / "README.md").read_text()
    for needed in ("tiny-qwen3-moe", "eval_loss: 1.25", "rank 4, alpha 8", "routed_experts",
                   "PeftModel.from_pretrained"):
        assert needed in card, needed
    # the registry's files, byte for byte, and a manifest with every file's sha256
    version = registry.resolve(ref)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    by_path = {f["path"]: f["sha256"] for f in manifest["files"]}
    for f in version.files:
        assert by_path[f["path"]] == f["sha256"]
    assert verify_export(d) == []
    (d / "adapter_config.json").write_text("{}")
    assert verify_export(d) == ["adapter_config.json"]

    # an existing output is refused unless --force; --force replaces it whole
    with pytest.raises(StudioError, match="--force"):
        export_adapter(ref, "peft", d, registry=registry)
    export_adapter(ref, "peft", d, registry=registry, force=True)
    assert verify_export(d) == []

    # a failed export leaves neither the output nor a temporary directory behind
    before = set(tmp_path.iterdir())
    with pytest.raises(StudioError, match="not the base the adapter was trained on"):
        export_adapter(ref, "merged", tmp_path / "wrong", registry=registry, base="tiny-olmoe")
    assert set(tmp_path.iterdir()) == before
    assert main(["export", ref, "--format", "merged", "--output", str(tmp_path / "wrong"), "--registry",
                 str(exported["root"] / "reg"), "--base", "tiny-olmoe"]) == 2
    assert "--allow-base-mismatch" in capsys.readouterr().err
    with pytest.raises(StudioError, match="unknown export format"):
        export_adapter(ref, "gguf", tmp_path / "x", registry=registry)


def test_per_expert_uses_the_family_checkpoint_names(exported):
    mixtral = load_file(str(exported["families"]["tiny-mixtral"]["per_expert"] / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.block_sparse_moe.experts.7.w2.lora_B.weight" in mixtral
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in mixtral
    qwen = load_file(str(exported["families"]["tiny-qwen2-moe"]["per_expert"] / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_A.weight" in qwen
    assert "base_model.model.model.layers.1.mlp.shared_expert.down_proj.lora_A.weight" in qwen  # shared: as is
    assert not [k for k in qwen if "base_layer" in k]
