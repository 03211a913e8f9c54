"""Expert-specialised fine-tuning (studio/experts/): selection math on constructed profiles, selective expert LoRA
(parity with full-layout factors, no gradient or state for unselected experts), plain-PEFT loading on three
families, training with a selection, and the routing profile's determinism and cache."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from studio.adapters import adapter_parameters, apply_plan, load_adapter, save_adapter
from studio.errors import ModelError, PlanError
from studio.experts.selection import cumulative_set, parse_selection, select_experts, select_layer
from studio.models.loading import QuantSpec, load_base
from studio.lora.experts import ExpertAdapter
from studio.moe.experts import StudioExperts
from studio.moe.plan import LoraSettings, build_plan


@dataclass
class _Profile:
    """A constructed routing profile: what select_experts reads."""
    layers: list
    shares: list
    gates: list

    def token_share(self):
        return self.shares

    def mean_gate(self):
        return self.gates


# --------------------------------------------------------------------------- selection math


def test_token_selection_is_the_smallest_set_reaching_the_share():
    share = [0.05, 0.40, 0.10, 0.30, 0.15]
    sel = lambda spec: select_layer(share, share, parse_selection(spec))  # noqa: E731
    assert sel("token:0.4") == [1]              # one expert reaches 0.4 exactly
    assert sel("token:0.41") == [1, 3]
    assert sel("token:0.7") == [1, 3]           # 0.40 + 0.30 reaches 0.7 (up to float rounding)
    assert sel("token:0.71") == [1, 3, 4]
    assert sel("token:1") == [0, 1, 2, 3, 4]
    assert sel("top:2") == [1, 3]
    assert sel("top:5") == [0, 1, 2, 3, 4]


def test_gate_selection_uses_gate_scores_not_token_shares():
    tokens = [0.30, 0.30, 0.20, 0.20]
    gates = [0.05, 0.10, 0.50, 0.05]            # need not sum to 1: shares of the total are used
    assert select_layer(tokens, gates, parse_selection("gate:0.5")) == [2]
    assert select_layer(tokens, gates, parse_selection("gate:0.75")) == [1, 2]
    assert select_layer(tokens, gates, parse_selection("token:0.5")) == [0, 1]


def test_ties_go_to_the_lower_expert_id():
    even = [0.25, 0.25, 0.25, 0.25]
    assert cumulative_set(even, 0.5) == [0, 1]
    assert cumulative_set(even, 0.26) == [0, 1]
    assert cumulative_set(even, 0.25) == [0]
    assert select_layer([0.1, 0.3, 0.3, 0.3], even, parse_selection("top:2")) == [1, 2]
    assert select_layer([0.3, 0.1, 0.3, 0.3], even, parse_selection("top:1")) == [0]


def test_a_layer_where_one_expert_takes_everything():
    share = [0.0, 0.0, 1.0, 0.0]
    for spec in ("token:0.01", "token:1", "gate:0.2", "gate:1"):
        assert select_layer(share, share, parse_selection(spec)) == [2], spec
    # top:K still returns K experts: the zero-share ones by id
    assert select_layer(share, share, parse_selection("top:2")) == [0, 2]


def test_select_experts_per_layer_and_random_control_of_the_same_size():
    prof = _Profile(layers=["l.1.experts", "l.2.experts"],
                    shares=[[0.5, 0.3, 0.1, 0.1, 0, 0, 0, 0], [0.125] * 8],
                    gates=[[0.5, 0.3, 0.1, 0.1, 0, 0, 0, 0], [0.125] * 8])
    chosen = select_experts(prof, "token:0.6")
    assert chosen == {"l.1.experts": [0, 1], "l.2.experts": [0, 1, 2, 3, 4]}
    rand = select_experts(prof, "random:token:0.6", seed=3)
    assert {k: len(v) for k, v in rand.items()} == {"l.1.experts": 2, "l.2.experts": 5}
    assert rand == select_experts(prof, "random:token:0.6", seed=3)          # seeded: reproducible
    assert any(select_experts(prof, "random:token:0.6", seed=s) != rand for s in range(4, 10))


@pytest.mark.parametrize("spec, match", [("token:0", r"\(0, 1\]"), ("token:1.5", r"\(0, 1\]"), ("gate:x", "share P"),
                                         ("top:0", "K >= 1"), ("top:2.5", "whole number"), ("best:3", "not understood"),
                                         ("random:all", "sized selection"), ("token", "not understood")])
def test_bad_selection_specs_name_the_accepted_forms(spec, match):
    with pytest.raises(PlanError, match=match):
        parse_selection(spec)


def test_a_layer_without_tokens_or_too_large_top_k_is_an_error():
    with pytest.raises(PlanError, match="no routed tokens"):
        select_layer([0.0] * 4, [0.0] * 4, parse_selection("token:0.2"))
    with pytest.raises(PlanError, match="more experts than the layer has"):
        select_layer([0.25] * 4, [0.25] * 4, parse_selection("top:5"))


# --------------------------------------------------------------------------- selective factors


@pytest.mark.parametrize("impl", ["grouped", "eager"])
def test_selective_factors_compute_the_full_layout_function_and_gradients(impl):
    """A selective adapter is the full-layout adapter with zero factors outside the selection: same outputs, and the
    selected experts' gradients equal the full adapter's; the unselected experts have no parameters at all."""
    loaded = load_base("tiny-qwen3-moe", QuantSpec("4bit"), experts_impl=impl)
    experts = next(m for m in loaded.model.modules() if isinstance(m, StudioExperts))
    ids = [1, 4, 6]
    sel = experts.add_adapter("sel", r=4, alpha=8, experts=ids)
    full = experts.add_adapter("full", r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in experts.weight_names:
            sel.lora_A[name].copy_(torch.randn(sel.lora_A[name].shape, generator=gen))
            sel.lora_B[name].copy_(torch.randn(sel.lora_B[name].shape, generator=gen) * 0.1)
            # the full adapter's unselected experts as freshly initialised (A random, B zero): the same function
            rest = torch.randn(8, 4, sel.lora_A[name].shape[1], generator=gen)
            rest[ids] = 0
            full.lora_A[name].copy_(sel.expand("A", sel.lora_A[name]) + rest.view(32, -1))
            full.lora_B[name].copy_(sel.expand("B", sel.lora_B[name]))
        assert sel.lora_A[name].shape[0] == 4 * len(ids) and full.lora_A[name].shape[0] == 4 * 8
    x = torch.randn(40, 64, generator=gen)
    idx = torch.randint(0, 8, (40, 2), generator=gen)
    w = torch.softmax(torch.randn(40, 2, generator=gen), -1)
    outs, grads = {}, {}
    experts.train()
    for adapter in ("sel", "full"):
        experts.active_adapters = [adapter]
        y = experts(x, idx, w)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[adapter] = y.detach()
        lora = experts.adapters[adapter]
        grads[adapter] = {n: (lora.lora_A[n].grad, lora.lora_B[n].grad) for n in experts.weight_names}
    assert torch.allclose(outs["sel"], outs["full"], atol=1e-5)
    for name in experts.weight_names:
        ga, gb = grads["sel"][name]
        fa, fb = grads["full"][name]
        assert ga.shape == sel.lora_A[name].shape  # gradients exist only for the selected slots
        assert torch.allclose(sel.expand("A", ga), fa.view(8, 4, -1).index_fill(0, torch.tensor([0, 2, 3, 5, 7]), 0)
                              .view_as(fa), atol=1e-5)
        assert torch.allclose(sel.expand("B", gb), fb.view(fb.shape[0], 4, 8).index_fill(
            2, torch.tensor([0, 2, 3, 5, 7]), 0).view_as(fb), atol=1e-5)
        # a full adapter trains them (B first: their A gets gradient once B is non-zero)
        assert fb.view(fb.shape[0], 4, 8)[:, :, [0, 2, 3, 5, 7]].abs().sum() > 0
    # inference (cached, mixed-batch) factors: zeros outside the selection
    experts.eval()
    with torch.no_grad():
        experts.active_adapters = ["sel"]
        # the inference product reads the factors transposed (the slot layout): other kernels, other rounding
        assert torch.allclose(experts(x, idx, w), outs["sel"], atol=1e-4)
        a_all, _ = sel.inference_factors(experts.weight_names[0], torch.float32)
        assert a_all[[0, 2, 3, 5, 7]].abs().sum() == 0 and a_all[ids].abs().sum() > 0


def test_expand_and_compact_round_trip_and_refuse_foreign_factors():
    lora = ExpertAdapter({"p": (6, 5, 3)}, r=2, alpha=4, experts=[4, 1])
    assert lora.expert_ids == [1, 4] and lora.lora_A["p"].shape == (4, 5) and lora.lora_B["p"].shape == (3, 4)
    a, b = torch.randn(4, 5), torch.randn(3, 4)
    fa, fb = lora.expand("A", a), lora.expand("B", b)
    assert fa.shape == (12, 5) and fb.shape == (3, 12)
    assert torch.equal(lora.compact("A", fa), a) and torch.equal(lora.compact("B", fb), b)
    fa[0, 0] = 1.0  # expert 0 is not selected
    with pytest.raises(ValueError, match="unselected experts are non-zero"):
        lora.compact("A", fa)
    assert ExpertAdapter({"p": (6, 5, 3)}, r=2, alpha=4, experts=range(6)).expert_ids is None  # all = no selection
    with pytest.raises(ValueError, match="non-empty subset"):
        ExpertAdapter({"p": (6, 5, 3)}, r=2, alpha=4, experts=[6])


def _selective_plan(loaded, settings=None):
    """A plan adapting attention and, per MoE layer, a different pair of experts."""
    plain = build_plan(loaded.model, loaded.arch, loaded.components, "attention,experts", settings)
    ids = {path: sorted({i % 8, (3 * i + 5) % 8}) for i, path in enumerate(plain.expert_targets)}
    return build_plan(loaded.model, loaded.arch, loaded.components, "attention,experts", settings,
                      expert_ids=ids, expert_selection={"spec": "explicit"}), plain, ids


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-mixtral", "tiny-qwen3-moe", "tiny-gpt-oss"])
def test_selected_expert_adapter_loads_in_plain_peft_and_matches(name, tmp_path):
    from test_moe_lora import plain_peft_logits

    loaded = load_base(name, QuantSpec("none"))
    plan, plain, ids = _selective_plan(loaded, LoraSettings(r=4, alpha=8))
    assert plan.trainable_params < plain.trainable_params
    assert "expert selection explicit" in plan.format()
    apply_plan(loaded.model, plan, "default")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(loaded.model, "default").values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    loaded.model.eval()
    x = torch.randint(6, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.model(input_ids=x).logits
    out = save_adapter(loaded.model, plan, tmp_path / "adapter", base_id=name)
    meta = json.loads((out / "studio_adapter.json").read_text())
    assert meta["plan"]["expert_ids"] == ids
    bare, theirs = plain_peft_logits(loaded.path, out, x)
    assert (ours - bare).abs().max() > 1e-2
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # the studio loads it back selective (only the selected slots allocated), with the same function
    fresh = load_base(name, QuantSpec("none"))
    back = load_adapter(fresh.model, out, "law")
    assert back.expert_ids == ids
    sizes = {p: fresh.model.get_submodule(p).adapters["law"].num_slots for p in ids}
    assert sizes == {p: len(v) for p, v in ids.items()}
    with torch.no_grad():
        assert torch.allclose(fresh.model(input_ids=x).logits, ours, atol=1e-5)


def test_a_file_with_factors_outside_its_recorded_selection_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    loaded = load_base("tiny-mixtral", QuantSpec("none"))
    plan, _, ids = _selective_plan(loaded, LoraSettings(r=4, alpha=8))
    apply_plan(loaded.model, plan, "default")
    out = save_adapter(loaded.model, plan, tmp_path / "adapter", base_id="tiny-mixtral")
    weights = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in weights if "experts" in k and "lora_A" in k)
    weights[key] = weights[key] + 1.0
    save_file(weights, str(out / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="unselected experts are non-zero"):
        load_adapter(load_base("tiny-mixtral", QuantSpec("none")).model, out, "x")


def test_selection_of_layers_the_plan_does_not_adapt_is_refused():
    loaded = load_base("tiny-mixtral", QuantSpec("4bit"))
    with pytest.raises(PlanError, match="does not adapt"):
        build_plan(loaded.model, loaded.arch, loaded.components, "attention", expert_ids={"model.layers.0.mlp.experts": [0]})


# --------------------------------------------------------------------------- profiles and training


def _rows_file(path: Path, rows: int = 16, topic: str = "contract law") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Define term {i % 4}.", "output": f"Term {i % 4} is a rule of {topic}."})
                    + "\n")
    return str(path)


def test_profile_is_deterministic_cached_and_invalidated_by_base_or_data(tmp_path, monkeypatch):
    from studio.experts.profile import profile_experts

    monkeypatch.setenv("STUDIO_PROFILES_CACHE", str(tmp_path / "profiles"))
    data = _rows_file(tmp_path / "law.jsonl")
    kw = dict(seq_len=64, batch_size=8, log=lambda *_: None)
    first = profile_experts("tiny-mixtral", data, **kw)
    again = profile_experts("tiny-mixtral", data, refresh=True, **kw)
    assert not first.from_cache and not again.from_cache
    assert first.to_dict() == again.to_dict()  # measured twice: the same numbers
    cached = profile_experts("tiny-mixtral", data, **kw)
    assert cached.from_cache and cached.to_dict() == first.to_dict()
    assert first.tokens > 0 and len(first.layers) == 2 and first.num_experts == 8
    assert all(sum(row) == first.tokens * first.top_k for row in first.counts)
    assert all(abs(sum(row) - 1) < 1e-6 for row in first.token_share())
    assert all(abs(sum(row) - 1) < 1e-5 for row in first.mean_gate())  # Mixtral renormalises its top-k weights
    # other data (a new dataset version) or another base: another key, measured afresh
    changed = profile_experts("tiny-mixtral", _rows_file(tmp_path / "law.jsonl", topic="tort law"), **kw)
    assert changed.dataset_hash != first.dataset_hash and changed.key != first.key and not changed.from_cache
    other_base = profile_experts("tiny-olmoe", data, **kw)
    assert other_base.base_fingerprint != first.base_fingerprint and other_base.key != first.key
    assert not other_base.from_cache and other_base.counts != first.counts
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 3


def test_experts_profile_cli_writes_json_csv_and_heatmap(tmp_path, monkeypatch, capsys):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_PROFILES_CACHE", str(tmp_path / "profiles"))
    data = _rows_file(tmp_path / "law.jsonl")
    out = tmp_path / "prof"
    assert main(["experts", "profile", "--base", "tiny-qwen2-moe", "--dataset", data, "--seq-len", "64",
                 "--selection", "top:3", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selected 3" in text and "top:3: 6 of 16 experts" in text
    prof = json.loads((out / "profile.json").read_text())
    assert {len(v) for v in prof["selection"].values()} == {3}
    rows = (out / "profile.csv").read_text().splitlines()
    assert rows[0].startswith("layer,layer_path,expert,token_slots,token_share,mean_gate,selected")
    assert len(rows) == 1 + 2 * 8 and sum(int(r.rsplit(",", 1)[1]) for r in rows[1:]) == 6
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["experts", "profile", "--dataset", data, "--selection", "token:2"]) == 2
    assert "(0, 1]" in capsys.readouterr().err


def test_training_with_a_selection_trains_only_the_selected_experts(tmp_path, monkeypatch):
    """Slow-ish (two short training runs on tiny-moe, ~1 min on 2 cores): the trainer's whole selection path."""
    from safetensors.torch import load_file

    from studio.registry import AdapterRegistry
    from studio.train import TrainConfig, run_training

    monkeypatch.setenv("STUDIO_PROFILES_CACHE", str(tmp_path / "profiles"))
    data = _rows_file(tmp_path / "law.jsonl")
    logs: list[str] = []
    cfg = TrainConfig(base="tiny-moe", dataset=data, quant="4bit", targets="attention,experts", r=4, alpha=8,
                      dropout=0.0, learning_rate=5e-3, max_steps=3, batch_size=4, seq_len=64, eval_steps=0,
                      save_steps=100, logging_steps=1, output=str(tmp_path / "run"), seed=7,
                      expert_selection="token:0.3")
    result = run_training(cfg, log=lambda *a: logs.append(" ".join(map(str, a))))
    text = "\n".join(logs)
    assert "expert selection token:0.3: LoRA on" in text and "model.layers.1.mlp.experts:" in text
    meta = json.loads((Path(result.adapter_dir) / "studio_adapter.json").read_text())
    chosen = meta["expert_selection"]["experts"]
    assert meta["plan"]["expert_ids"] == chosen and meta["expert_selection"]["spec"] == "token:0.3"
    assert meta["expert_selection"]["profile"]["dataset_hash"] == meta["dataset"]["hash"]
    assert all(0 < len(v) < 8 for v in chosen.values())
    # trainable = the plan's count, and only compact expert factors require gradients
    model = result.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == meta["plan"]["trainable_params"]
    weights = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    r = 4
    for path, ids in chosen.items():
        rest = [e for e in range(8) if e not in ids]
        for key in (f"base_model.model.{path}.base_layer", f"base_model.model.{path}"):
            a, b = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
            a, b = a.view(8, r, -1), b.view(b.shape[0], r, 8)
            assert a[rest].eq(0).all() and b[:, :, rest].eq(0).all()  # exactly zero, never trained
            assert b[:, :, ids].ne(0).any(dim=0).any(dim=0).all()   # every selected expert's B moved off zero
            assert a[ids].ne(0).all()
    lineage = AdapterRegistry().show(result.registry_ref).lineage
    assert lineage["expert_selection"]["experts"] == chosen
    assert lineage["expert_selection"]["profile"]["key"] == meta["expert_selection"]["profile"]["key"]
    # a second run on the same base and data reuses the cached profile
    logs.clear()
    again = run_training(TrainConfig(**{**cfg.__dict__, "output": str(tmp_path / "run2"), "register": False,
                                        "expert_selection": "random:token:0.3"}),
                         log=lambda *a: logs.append(" ".join(map(str, a))))
    assert any("from the cache" in line for line in logs)
    chosen2 = json.loads((Path(again.adapter_dir) / "studio_adapter.json").read_text())["expert_selection"]["experts"]
    assert {k: len(v) for k, v in chosen2.items()} == {k: len(v) for k, v in chosen.items()}


# --------------------------------------------------------------------------- serving, eval overlay, UI


def _selective_random_adapter(loaded, out: Path, seed: int) -> Path:
    """A selective adapter with random non-zero factors (as a trained one would have), saved like the trainer."""
    plan, _, _ = _selective_plan(loaded, LoraSettings(r=4, alpha=8))
    name = f"sel{seed}"
    apply_plan(loaded.model, plan, name, trainable=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(loaded.model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    from studio.adapters import delete_adapter, set_active_adapter

    meta = {"domain": "law", "base": loaded.describe(), "dataset": {"ref": "law@v1"}, "plan": plan.to_dict()}
    try:
        return save_adapter(loaded.model, plan, out, name, base_id=loaded.ref, metadata=meta)
    finally:
        delete_adapter(loaded.model, name)
        set_active_adapter(loaded.model, None)


def test_engine_serves_selective_adapters_in_mixed_batches_and_eval_outlines_their_experts(tmp_path):
    from serving_fixtures import make_real_adapter

    from studio.engine import Engine, SamplingParams
    from studio.eval import evaluate, plot_expert_usage
    from studio.registry import AdapterRegistry

    maker = load_base("tiny-moe", QuantSpec("4bit"))
    registry = AdapterRegistry(tmp_path / "reg")
    registry.register(_selective_random_adapter(maker, tmp_path / "sel", 5), "law")
    registry.register(make_real_adapter(maker, tmp_path / "full", "medicine", 6), "medicine")
    prompts = ["The court held that the contract", [{"role": "user", "content": "Explain sepsis."}], "def add(a, b):"]
    adapters = ["law", "medicine", None]
    params = SamplingParams(max_tokens=8)
    with Engine("tiny-moe", registry=registry, max_batch_size=8, max_wait_ms=20) as engine:
        mixed = engine.generate(prompts, adapters=adapters, params=params)
        singles = [engine.generate([p], adapters=a, params=params)[0] for p, a in zip(prompts, adapters)]
        assert [m.token_ids for m in mixed] == [s.token_ids for s in singles]
        bare = engine.generate(prompts[0], adapters=None, params=params)[0]
        assert mixed[0].token_ids != bare.token_ids  # the selective adapter changes the output
        # served through the engine's LoRA slots: the selective adapter's slot holds exactly zero factors for
        # every unselected expert and non-zero ones for the selected
        selected = json.loads((registry.path("law@v1") / "studio_adapter.json").read_text())["plan"]["expert_ids"]
        slot = engine.residency.entries["law@v1"].slot
        for path, ids in selected.items():
            module = engine.base.model.get_submodule(path)
            assert isinstance(module, StudioExperts) and not module.adapters  # no training-side copies
            for name, a in module.lora_slots.lora_A.items():
                norms = a[slot].flatten(1).norm(dim=1)
                assert all(norms[e] > 0 for e in ids) and all(norms[e] == 0 for e in range(len(norms)) if e not in ids)
        report = evaluate(engine, models=["law", "medicine"], dataset=_rows_file(tmp_path / "d.jsonl"),
                          domains="none", max_eval_examples=4, gen_prompts=0, seq_len=64, record=False)
    info = {m.name: m.selected_experts for m in report.models}
    assert info["law@v1"] and info["medicine@v1"] is None
    fig = plot_expert_usage(report)
    titles = [ax.get_title() for ax in fig.axes]
    law_ax = fig.axes[titles.index("law@v1 (trained experts outlined)")]
    assert len(law_ax.patches) == sum(len(v) for v in info["law@v1"].values())
    assert not fig.axes[titles.index("medicine@v1")].patches


def test_train_tab_profiles_the_dataset_and_starts_with_the_selection(tmp_path):
    from studio.ui.train_tab import REGISTERED, profile_preview

    data = _rows_file(tmp_path / "law.jsonl")
    fig, text = profile_preview(None, REGISTERED, data, "tiny-mixtral", "4bit", 64, "top:2", 0)
    assert "trains LoRA on **4 of 16** routed experts" in text
    assert sum(len(ax.patches) for ax in fig.axes) == 2 * 4  # both heatmaps outline the 4 selected experts
    _, again = profile_preview(None, REGISTERED, data, "tiny-mixtral", "4bit", 64, "all", 0)
    assert "From the cache" in again and "16 of 16" in again
    import gradio as gr

    with pytest.raises(gr.Error, match="not understood"):
        profile_preview(None, REGISTERED, data, "tiny-mixtral", "4bit", 64, "most:3", 0)
