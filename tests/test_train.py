"""The trainer and `python -m studio.finetune`: losses, aux loss, resume, cancel, recipes, bad input."""

import json
import re
from pathlib import Path

import pytest

from studio.errors import DatasetError, ModelError, PlanError, StudioError
from studio.finetune import config_from_args, load_recipe, main as finetune_main
from studio.models.tiny import EMBEDDED
from studio.train import TrainConfig, run_training

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _tiny_dataset(tmp_path: Path, rows: int = 16) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Define term {i % 4}.",
                                "output": f"Term {i % 4} is a rule of contract law."}) + "\n")
    return str(path)


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(base="tiny-moe", dataset=_tiny_dataset(tmp_path), quant="4bit", targets="attention,experts", r=8,
                alpha=16, dropout=0.0, learning_rate=5e-3, max_steps=5, batch_size=4, seq_len=64, eval_steps=0,
                save_steps=100, logging_steps=1, output=str(tmp_path / "run"), register=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "training_log.jsonl")]


@pytest.mark.parametrize("name", EMBEDDED)
def test_trainer_lowers_loss_and_logs_aux_loss_where_defined(name, tmp_path):
    result = run_training(_cfg(tmp_path, base=name), log=lambda *_: None)
    logs = [e for e in _logged(result.run_dir) if e.get("event") == "log" and "loss" in e]
    assert len(logs) == 5
    assert logs[-1]["loss"] < logs[0]["loss"]
    from studio.moe.arch import arch_for
    from studio.models.tiny import make_config

    has_aux = arch_for(make_config(name)).aux_loss
    assert all(("aux_loss" in e) == has_aux for e in logs)
    if has_aux:
        assert all("lm_loss" in e for e in logs)
    adapter = Path(result.adapter_dir)
    meta = json.loads((adapter / "studio_adapter.json").read_text())
    assert meta["base"]["id"] == name and meta["base"]["fingerprint"].startswith("sha256:")
    assert meta["quantization"]["mode"] == "4bit"
    assert meta["plan"]["trainable_params"] > 0
    assert meta["memory"]["routed_experts"]["bytes"] > 0
    assert "peft" in meta["library_versions"]


def test_resume_continues_with_the_same_losses(tmp_path):
    full = run_training(_cfg(tmp_path / "a", max_steps=6, save_steps=3), log=lambda *_: None)
    ref = {e["step"]: e["loss"] for e in _logged(full.run_dir) if e.get("event") == "log" and "loss" in e}

    cancel_file = tmp_path / "b" / "CANCEL"

    def on_event(event):
        if event.get("step") == 3:
            cancel_file.write_text("stop")

    cfg = _cfg(tmp_path / "b", max_steps=6, save_steps=100, cancel_file=str(cancel_file))
    part = run_training(cfg, log=lambda *_: None, on_event=on_event)
    assert part.cancelled
    stopped = part.metrics["steps"]  # the step during which the cancel was seen
    assert 3 <= stopped < 6
    assert (Path(part.run_dir) / "checkpoints" / f"checkpoint-{stopped}" / "adapter_model.safetensors").exists()
    cancel_file.unlink()
    cfg.resume = "latest"
    resumed = run_training(cfg, log=lambda *_: None)
    assert not resumed.cancelled and resumed.metrics["steps"] == 6
    got = {e["step"]: e["loss"] for e in _logged(resumed.run_dir) if e.get("event") == "log" and "loss" in e}
    for step in range(stopped + 1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


def test_quickstart_recipe_lowers_held_out_loss_and_registers(tmp_path, capsys):
    code = finetune_main(["--config", "recipes/tiny-moe-law.yaml", "--max-steps", "40", "--eval-steps", "0",
                          "--output", str(tmp_path / "run")])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "held-out loss on law: before" in out
    # captured output is not a terminal: one plain line per logging step, no redrawn bars or escape codes
    assert re.search(r"^step 40/40  loss \d+\.\d{4}", out, flags=re.M), out[-2000:]
    assert "\x1b[" not in out + captured.err and "it/s]" not in out + captured.err
    assert "trainable parameters (LoRA): 905,216 = 13.657% of the base's 6,628,096" in out  # the recipe's r=32
    meta = json.loads((tmp_path / "run" / "adapter" / "studio_adapter.json").read_text())
    assert meta["metrics"]["eval_loss"] < meta["metrics"]["eval_loss_before"]
    assert meta["dataset"]["ref"] == "law@v1"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_loads_and_plans(recipe, capsys):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# python -m studio.finetune --config recipes/"), "recipes open with their command"
    data = load_recipe(str(recipe))
    import argparse

    from studio.finetune import add_arguments, dry_run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(recipe)]))
    assert cfg.base == data["base"]
    assert dry_run(cfg, "1TiB") == 0
    out = capsys.readouterr().out
    assert "routed_experts" in out and "trainable parameters" in out


def test_dry_run_warns_before_loading_when_the_plan_does_not_fit(capsys):
    code = finetune_main(["--base", "mistralai/Mixtral-8x7B-v0.1", "--quant", "none", "--dry-run",
                          "--device-memory", "24GiB"])
    assert code == 0
    assert "NOT to fit" in capsys.readouterr().err


def test_bad_input_errors(tmp_path):
    with pytest.raises(DatasetError, match="too short"):
        run_training(_cfg(tmp_path, seq_len=4), log=lambda *_: None)
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"instruction": "word " * 400, "output": "ok"}) + "\n")
    with pytest.raises(DatasetError, match="empty after filtering"):
        run_training(_cfg(tmp_path, dataset=str(long_prompt)), log=lambda *_: None)
    with pytest.raises(PlanError, match="matches nothing"):
        run_training(_cfg(tmp_path, targets="wq_proj"), log=lambda *_: None)
    with pytest.raises(PlanError, match="positive integer"):
        run_training(_cfg(tmp_path, r=0), log=lambda *_: None)
    with pytest.raises(ModelError):
        run_training(_cfg(tmp_path, base="tiny-moee"), log=lambda *_: None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny-moe\nlearnin_rate: 0.1\n")
    with pytest.raises(StudioError, match="did you mean learning_rate"):
        load_recipe(str(bad))
    assert finetune_main(["--base", "tiny-moe", "--dataset", "law", "--r", "0", "--dry-run"]) == 2
