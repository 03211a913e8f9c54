"""studio.eval: metrics against known values, routing statistics, the report, and base vs trained adapters on
tiny-moe (held-out loss, cross-domain matrix, registry metrics, bad input, the CLI)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch

from studio.errors import DatasetError, ModelError, RegistryError, StudioError
from studio.eval import EvalReport, evaluate
from studio.eval import metrics as M
from studio.eval.heldout import load_heldout, teacher_forced_pass
from studio.eval.prompts import load_prompts, reference_pairs
from studio.eval.report import GenerationResult, LossCell, ModelInfo
from studio.eval.routing import RoutingStats, routing_drift

DOMAINS = {"law", "medicine", "code"}


# ---------------------------------------------------------------------------------------------------------------
# metrics against known values


def test_exact_match_and_rouge_l_on_hand_computed_strings():
    assert M.exact_match(["a  b ", "x"], ["a b", "y"]) == 0.5          # whitespace collapsed, content compared
    assert M.exact_match(["Foo"], ["foo"]) == 0.0                        # case counts
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens each way -> F1 = 5/6
    assert M.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # prediction "a b c d", reference "a c": LCS 2, P = 2/4, R = 2/2, F1 = 2/3; the mean of the two pairs is 0.75
    assert M.rouge_l(["a b c d"], ["a c"]) == pytest.approx(2 / 3)
    assert M.rouge_l(["the cat sat on the mat", "a b c d"], ["the cat is on the mat", "a c"]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="pair up"):
        M.exact_match(["a"], ["a", "b"])


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    preds = ["the cat sat on the mat", "a contract needs an offer and an acceptance", "def f(x): return x"]
    refs = ["the cat is on the mat", "a contract requires offer, acceptance and consideration", "def f(x): return x"]
    assert M.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert M.chrf(preds, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert M.bleu(refs, refs) == pytest.approx(100.0) and M.chrf(refs, refs) == pytest.approx(100.0)
    assert 0.0 < M.bleu(preds, refs) < 100.0
    all_ = M.reference_metrics(preds, refs)
    assert all_["n"] == 3 and all_["exact_match"] == pytest.approx(1 / 3)


def test_token_nll_and_perplexity_on_hand_made_logits():
    # vocab 2; position t predicts labels[t+1]. Row 0: uniform logits -> NLL ln 2; then p(1) = 1/(3+1) -> NLL ln 4.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]],
                           [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1], [-100, -100, -100]])  # row 1 is padding / prompt only
    nll, count = M.token_nll(logits, labels)
    assert nll[0].item() == pytest.approx(math.log(2) + math.log(4))
    assert count.tolist() == [2, 0] and nll[1].item() == 0.0
    mean = M.mean_nll(nll.sum().item(), int(count.sum()))
    assert mean == pytest.approx(math.log(8) / 2)
    assert M.perplexity(mean) == pytest.approx(2 * math.sqrt(2))      # exp(mean NLL)
    with pytest.raises(ValueError, match="no scored tokens"):
        M.mean_nll(0.0, 0)


def test_entropy_and_cv_of_known_count_vectors():
    assert M.usage_entropy([5, 5, 5, 5]) == pytest.approx((math.log(4), 1.0))
    assert M.usage_cv([5, 5, 5, 5]) == 0.0
    assert M.usage_entropy([20, 0, 0, 0]) == (0.0, 0.0)
    assert M.usage_cv([20, 0, 0, 0]) == pytest.approx(math.sqrt(3))       # std sqrt(75) / mean 5
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert M.usage_entropy([1, 3]) == pytest.approx((h, h / math.log(2)))
    assert M.usage_cv([1, 3]) == pytest.approx(0.5)


def test_routing_drift_counts_tokens_whose_top_k_set_changed():
    base = {"l1": np.array([[0, 1], [2, 3], [1, 4]]), "l2": np.array([[0, 1], [0, 1], [0, 1]])}
    other = {"l1": np.array([[0, 1], [2, 5], [1, 4]]), "l2": np.array([[0, 2], [3, 4], [0, 1]])}
    assert routing_drift(base, base) == [0.0, 0.0]
    assert routing_drift(other, base) == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(ValueError, match="same tokens"):
        routing_drift({"l1": base["l1"][:2], "l2": base["l2"]}, base)


# ---------------------------------------------------------------------------------------------------------------
# prompts and the report, without a model


def test_reference_pairs_and_prompt_files(tmp_path):
    rows = [[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
            [{"role": "assistant", "content": "a plain document"}],
            [{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"},
             {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"},
             {"role": "assistant", "content": "A3"}]]
    pairs = reference_pairs(rows)
    assert [p.reference for p in pairs] == ["A1", "A3"]               # the document has no reference answer
    assert [m["content"] for m in pairs[1].prompt] == ["S", "Q2", "A2", "Q3"] and pairs[1].text() == "Q3"

    (tmp_path / "p.txt").write_text("first prompt\n\n second prompt \n")
    assert [p.text() for p in load_prompts(tmp_path / "p.txt")] == ["first prompt", "second prompt"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Define tort.", "reference": "A civil wrong."}) + "\n"
                                      + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "Hello"}]}) + "\n")
    items = load_prompts(tmp_path / "p.jsonl")
    assert [(i.text(), i.reference) for i in items] == [("Define tort.", "A civil wrong."), ("Hi", "Hello")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"bad.jsonl, line 2: invalid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "keys.json").write_text(json.dumps([{"question": "x"}]))
    with pytest.raises(DatasetError, match="needs a `prompt`"):
        load_prompts(tmp_path / "keys.json")
    with pytest.raises(DatasetError, match="no such file"):
        load_prompts(tmp_path / "missing.txt")


def _synthetic_report() -> EvalReport:
    def cell(loss, examples):
        return LossCell(loss=loss, perplexity=math.exp(loss), tokens=100, examples=len(examples), seconds=0.1,
                        example_loss=examples)

    routing = RoutingStats(layers=["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"],
                           counts=[[30, 10, 0, 10], [25, 25, 0, 0]], tokens=25, top_k=2)
    drifted = RoutingStats(layers=routing.layers, counts=[[10, 10, 10, 20], [0, 25, 25, 0]], tokens=25, top_k=2,
                           drift=[0.2, 0.6])
    routing.drift = [0.0, 0.0]
    return EvalReport(
        base="tiny-moe", base_fingerprint="sha256:" + "0" * 64, dataset="law",
        models=[ModelInfo("base"), ModelInfo("law@v1", "law@v1", "law"), ModelInfo("code@v1", "code@v1", "code")],
        domains={"law": {"ref": "law@v1", "examples": 2, "tokens": 100}, "code": {"ref": "code@v1", "examples": 2}},
        losses={"base": {"law": cell(3.0, [3.0, 3.0]), "code": cell(2.0, [2.0, 2.0])},
                "law@v1": {"law": cell(2.5, [2.0, 3.5]), "code": cell(2.2, [2.2, 2.2])},
                "code@v1": {"law": cell(3.1, [3.1, 3.1]), "code": cell(2.1, [2.1, 2.1])}},
        routing={"base": {"law": routing}, "law@v1": {"law": drifted}},
        generation={m: GenerationResult(outputs=[f"{m} says hi"], latency_s=0.5, ttft_s=0.1, tokens_per_s=20.0,
                                        completion_tokens=10, wall_s=0.5,
                                        reference={"exact_match": 0.0, "rouge_l": 0.5, "bleu": 10.0, "chrf": 30.0,
                                                   "n": 1}) for m in ("base", "law@v1", "code@v1")},
        prompts=[{"prompt": "Define | tort", "messages": [], "reference": "A civil wrong."}], reference_prompts=1,
        settings={"seed": 0, "temperature": 0.0, "max_new_tokens": 8}, notes=["a note"])


def test_report_verdicts_tables_and_saved_files(tmp_path):
    report = _synthetic_report()
    v = {x["adapter"]: x for x in report.verdicts()}
    assert v["law@v1"]["beats_base"] is True and v["law@v1"]["delta"] == pytest.approx(-0.5)
    assert v["law@v1"]["examples_better"] == 0.5
    assert "law@v1 beats the base on its own domain (law): held-out loss 2.5000 vs 3.0000" in v["law@v1"]["text"]
    assert v["code@v1"]["beats_base"] is False and "does NOT beat" in v["code@v1"]["text"]
    table = report.table()
    assert list(table.index) == ["base", "law@v1", "code@v1"]
    assert table.loc["law@v1", "loss_vs_base"] == pytest.approx(-0.5)
    assert table.loc["law@v1", "routing_drift"] == pytest.approx(0.4)
    assert report.cross_domain_table().loc["code@v1", "code_vs_base"] == pytest.approx(0.1)
    md = report.markdown()
    assert "## Verdict" in md and "## Cross-domain held-out loss" in md and "Define \\| tort" in md
    assert "25 tokens x top-2 = 50 routed slots per layer" in md and "- a note" in md

    paths = report.save(tmp_path / "out")
    assert set(paths) == {"markdown", "results_csv", "cross_domain_csv", "routing_csv", "heldout_loss_png",
                          "cross_domain_png", "expert_usage_png", "routing_drift_png", "json"}
    for key, path in paths.items():
        data = Path(path).read_bytes()
        assert data, key
        if key.endswith("_png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    routing_csv = (tmp_path / "out" / "routing.csv").read_text().splitlines()
    assert routing_csv[0] == "model,dataset,layer,expert,count,share,layer_drift" and len(routing_csv) == 1 + 16
    again = EvalReport.load(tmp_path / "out")
    assert again.to_dict() == json.loads(report.to_json())
    assert again.verdicts() == report.verdicts()


def test_report_without_own_domain_gives_no_verdict():
    report = _synthetic_report()
    report.models.append(ModelInfo("medicine@v1", "medicine@v1", "medicine"))
    v = report.verdicts()[-1]
    assert v["beats_base"] is None and "was not among the evaluated held-out sets" in v["text"]


def test_cli_rejects_bad_settings_before_loading_a_model(capsys):
    from studio.cli import main

    assert main(["eval", "--max-examples", "0"]) == 2
    assert "max_eval_examples must be an integer >= 1" in capsys.readouterr().err
    assert main(["eval", "--models", "base,,law"]) == 2
    assert "has an empty entry" in capsys.readouterr().err
    assert main(["eval", "--dataset", "no_such_dataset"]) == 2
    assert "no dataset 'no_such_dataset'" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "studio.eval", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--models" in out.stdout and "--domains" in out.stdout


# ---------------------------------------------------------------------------------------------------------------
# tiny-moe with trained adapters


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A law adapter (the quickstart recipe's settings, 30 steps at seq-len 128) and a short code adapter, trained
    once, registered in a module registry, and an Engine on tiny-moe sharing that registry."""
    from studio.engine import Engine
    from studio.registry import AdapterRegistry
    from studio.train import TrainConfig, run_training

    root = tmp_path_factory.mktemp("eval_module")
    registry = AdapterRegistry(root / "adapters")
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_DATASETS_ROOT", str(root / "datasets"))
        for domain, steps in (("law", 30), ("code", 12)):
            cfg = TrainConfig(base="tiny-moe", dataset=domain, quant="4bit", targets="attention,experts", r=16,
                              alpha=32, dropout=0.0, learning_rate=3e-3, max_steps=steps, batch_size=8, seq_len=128,
                              eval_steps=0, save_steps=1000, logging_steps=10, output=str(root / f"run-{domain}"),
                              register=False, seed=42)
            result = run_training(cfg, log=lambda *_: None)
            result.model = None
            results[domain] = result
            registry.register(result.adapter_dir, domain=domain)
    engine = Engine("tiny-moe", registry=registry)
    yield {"engine": engine, "registry": registry, "results": results, "root": root}
    engine.close()


def test_law_adapter_beats_base_on_law_and_the_matrix_covers_all_domains(trained, tmp_path):
    engine, registry = trained["engine"], trained["registry"]
    seen = []
    report = evaluate(engine, models="base,law@v1,code", dataset="law", max_eval_examples=32, gen_prompts=4,
                      max_new_tokens=16, seed=3, progress=lambda f, m: seen.append(f))
    assert report.model_names == ["base", "law@v1", "code@v1"]
    assert set(report.domains) == DOMAINS and list(report.domains)[0] == "law"
    for m in report.model_names:
        assert set(report.losses[m]) == DOMAINS
        for d in DOMAINS:
            cell = report.loss(m, d)
            assert cell.examples == 32 and cell.tokens > 0
            assert cell.perplexity == pytest.approx(math.exp(cell.loss))
    base, law = report.loss("base", "law"), report.loss("law@v1", "law")
    assert law.loss < base.loss
    verdict = next(v for v in report.verdicts() if v["adapter"] == "law@v1")
    assert verdict["beats_base"] is True
    expected = f"held-out loss {law.loss:.4f} vs {base.loss:.4f} for the base ({law.loss - base.loss:+.4f}"
    assert expected in verdict["text"] and verdict["text"] in report.markdown()
    assert seen == sorted(seen) and seen[-1] == 1.0

    # routing: every layer's counts add up to tokens x top_k; tokens are the assistant tokens the loss scored
    for m in report.model_names:
        for d in DOMAINS:
            stats = report.routing[m][d]
            assert len(stats.layers) == 3 and stats.num_experts == 8 and stats.top_k == 2
            assert stats.tokens == report.loss(m, d).tokens
            assert all(sum(c) == stats.tokens * stats.top_k for c in stats.counts)
            assert all(0.0 <= x <= 1.0 for x in stats.drift)
    assert report.routing["base"]["law"].drift == [0.0, 0.0, 0.0]
    assert report.routing["law@v1"]["law"].mean_drift() > 0.0     # the attention LoRA moves the routers' inputs

    # generations: same prompts for every model, reference metrics in range, speed measured
    for m in report.model_names:
        gen = report.generation[m]
        assert len(gen.outputs) == 4 and gen.completion_tokens > 0 and gen.tokens_per_s > 0
        assert 0.0 <= gen.reference["rouge_l"] <= 1.0 and 0.0 <= gen.reference["chrf"] <= 100.0
        assert gen.reference["n"] == 4
    assert len(report.prompts) == 4 and all(p["reference"] for p in report.prompts)

    # registry: each adapter version carries its results, per domain
    for ref in ("law@v1", "code@v1"):
        version = registry.resolve(ref)
        assert version.metrics_history[-1]["source"] == "eval"
        for d in DOMAINS:
            assert version.metrics[f"eval.{d}.loss"] == pytest.approx(report.loss(ref, d).loss)
            assert version.metrics[f"eval.{d}.dataset"] == report.domains[d]["ref"]
    law_metrics = registry.resolve("law@v1").metrics
    assert law_metrics["eval.law.beats_base"] is True
    assert law_metrics["eval.law.loss_vs_base"] == pytest.approx(law.loss - base.loss)
    assert [r["ref"] for r in report.recorded] == ["law@v1", "code@v1"]

    paths = report.save(tmp_path / "out")
    saved = json.loads(Path(paths["json"]).read_text())
    assert saved["verdicts"][0]["beats_base"] is True and len(saved["cross_domain"]) == 3


def test_base_routing_is_deterministic_so_its_drift_against_itself_is_zero(trained):
    from studio.data import resolve_dataset

    engine = trained["engine"]
    held = load_heldout(resolve_dataset("medicine"), engine.base.tokenizer, seq_len=128, max_examples=12)
    with engine.using("base") as model:
        first = teacher_forced_pass(model, held, engine.tokenizer.pad_token_id, batch_size=4, keep_sets=True)
        second = teacher_forced_pass(model, held, engine.tokenizer.pad_token_id, batch_size=5, keep_sets=True,
                                     routing="assistant")
    assert routing_drift(second.sets, first.sets) == [0.0] * len(first.sets)
    from studio.eval.routing import experts_modules

    assert all(not m._forward_pre_hooks for m in experts_modules(engine.model).values())  # hooks removed
    assert first.routing.counts == second.routing.counts
    assert first.routing.tokens == sum(sum(e.assistant_mask) for e in held.examples)
    with engine.using("law@v1") as model:
        alls = teacher_forced_pass(model, held, engine.tokenizer.pad_token_id, batch_size=4, routing="all")
    non_pad = sum(len(e.input_ids) for e in held.examples)
    assert alls.routing.tokens == non_pad and all(sum(c) == 2 * non_pad for c in alls.routing.counts)


def test_heldout_loss_uses_the_trainers_formatting(trained):
    """With the trainer's seq-len over the whole held-out split, the eval loss of the base and of the law adapter
    match what SFTTrainer measured before and after training (up to its per-batch averaging)."""
    report = evaluate(trained["engine"], models="base,law@v1", dataset="law", domains="none", max_eval_examples=1000,
                      seq_len=128, gen_prompts=0, routing=None, record=False)
    trainer = trained["results"]["law"].metrics
    assert report.domains["law"]["examples"] == 140
    assert report.loss("base").loss == pytest.approx(trainer["eval_loss_before"], abs=0.01)
    assert report.loss("law@v1").loss == pytest.approx(trainer["eval_loss"], abs=0.01)
    assert report.routing == {} and report.generation == {} and report.recorded == []
    assert any("no generations" in n for n in report.notes)


def test_bad_references_get_specific_errors(trained, tmp_path):
    engine, registry = trained["engine"], trained["registry"]
    with pytest.raises(RegistryError, match=r"law@v9 does not exist"):
        evaluate(engine, models="base,law@v9", dataset="law", domains="none", gen_prompts=0)
    with pytest.raises(RegistryError, match="nosuch"):
        evaluate(engine, models="nosuch@v1", dataset="law", domains="none", gen_prompts=0)
    # an adapter trained on another base: same files, another base fingerprint in its metadata
    alien = tmp_path / "alien"
    shutil.copytree(trained["results"]["law"].adapter_dir, alien)
    meta = json.loads((alien / "studio_adapter.json").read_text())
    meta["base"] = {**meta["base"], "id": "tiny-mixtral", "fingerprint": "sha256:" + "f" * 64}
    (alien / "studio_adapter.json").write_text(json.dumps(meta))
    registry.register(alien, domain="alien")
    before = len(registry.resolve("law@v1").metrics_history)
    with pytest.raises(ModelError, match="was trained on base 'tiny-mixtral'"):
        evaluate(engine, models="base,law@v1,alien", dataset="law", domains="none", gen_prompts=0)
    assert len(registry.resolve("law@v1").metrics_history) == before     # nothing half-recorded
    with pytest.raises(StudioError, match="routing must be"):
        evaluate(engine, models="base", dataset="law", routing="router")


def test_dataset_without_references_skips_reference_metrics_with_a_note(trained, tmp_path):
    from studio.data import DatasetRegistry

    docs = tmp_path / "notes.txt"
    docs.write_text("\n\n".join(f"Note {i}: a contract is an agreement the law enforces, clause {i}."
                                  for i in range(12)))
    DatasetRegistry().add(docs, "notes", eval_ratio=0.5)
    report = evaluate(trained["engine"], models="base,law@v1", dataset="notes", domains="none", gen_prompts=4,
                      max_new_tokens=8, record=False, prompts=["Define consideration.", "What is a tort?"])
    assert set(report.domains) == {"notes"} and report.loss("law@v1", "notes").examples == 6
    assert any("has no reference answers" in n and "skipped" in n for n in report.notes)
    assert report.reference_prompts == 0
    for m in ("base", "law@v1"):
        assert report.generation[m].reference is None and len(report.generation[m].outputs) == 2
    assert [p["prompt"] for p in report.prompts] == ["Define consideration.", "What is a tort?"]
    row = report.table().loc["law@v1"]
    assert row["rouge_l"] is None or math.isnan(row["rouge_l"])
    md = report.markdown()
    assert "has no reference answers" in md and "### 2. What is a tort?" in md
    # law@v1's own domain was not evaluated: no verdict, said plainly
    assert "was not among the evaluated held-out sets" in report.verdicts()[0]["text"]


def test_cli_writes_every_output_and_records_versions(trained, tmp_path, monkeypatch, capsys):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_ADAPTERS_ROOT", str(trained["registry"].root))
    (tmp_path / "prompts.txt").write_text("Define tort.\nWhat is an offer?\n")
    out = tmp_path / "eval-out"
    code = main(["eval", "--base", "tiny-moe", "--models", "base,law@v1", "--dataset", "law", "--domains",
                 "law,code", "--max-examples", "8", "--gen-prompts", "2", "--max-new-tokens", "8",
                 "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "law@v1 beats the base on its own domain (law)" in captured.out or \
        "law@v1 does NOT beat the base on its own domain (law)" in captured.out
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "results.csv", "cross_domain.csv", "routing.csv", "heldout_loss.png",
            "cross_domain.png", "expert_usage.png", "routing_drift.png"} <= names
    saved = EvalReport.load(out)
    assert set(saved.domains) == {"law", "code"} and len(saved.prompts) == 2
    assert saved.generation["law@v1"].reference["n"] == 2
    history = [e for e in trained["registry"].resolve("law@v1").metrics_history if e["source"] == "eval"]
    assert history and history[-1]["metrics"]["eval.law.examples"] == 8

    assert main(["eval", "--base", "tiny-moe", "--models", "law@v7", "--domains", "none", "--gen-prompts", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "law@v7 does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
