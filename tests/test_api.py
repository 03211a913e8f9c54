"""The Python API (`import studio`): its surface, lazy imports, docstrings, option checking, plan, datasets,
training events and a short finetune whose events are checked against the trainer's own log."""

import argparse
import dataclasses
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import studio
from studio.errors import DatasetError, StudioError

ROOT = Path(__file__).resolve().parent.parent

EXPECTED_API = ["Engine", "EvalReport", "LossCurve", "Registry", "SamplingParams", "StudioError", "TrainConfig",
                "TrainEvent", "TrainResult", "TrainingPlan", "datasets", "evaluate", "finetune", "plan"]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_studio_is_fast_and_does_not_import_torch():
    """Median of 5 fresh interpreters under 0.5 s on 2 cores; torch, transformers and the studio's heavy modules
    stay unimported until a name that needs them is used."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        proc = _python("import studio")
        times.append(time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr
    assert statistics.median(times) < 0.5, f"import studio took {sorted(times)} s"
    proc = _python("import sys, studio; studio.__all__; dir(studio); studio.datasets.list; studio.Registry\n"
                   "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'studio.train', 'studio.engine')"
                   " if m in sys.modules)\nprint(heavy)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout  # datasets and the registry do not need torch either
    proc = _python("import sys, studio; studio.finetune; print('torch' in sys.modules)")
    assert proc.stdout.strip() == "True"  # the lazy import really happens on first use


def test_all_is_the_public_api_and_every_name_is_documented():
    assert studio.__all__ == EXPECTED_API
    assert set(EXPECTED_API) <= set(dir(studio))
    for name in studio.__all__:
        obj = getattr(studio, name)
        doc = inspect.getdoc(obj) or ""
        # a dataclass without a docstring gets its signature as __doc__: that does not count
        assert doc.strip() and not doc.startswith(f"{getattr(obj, '__name__', name)}("), f"studio.{name} has no docstring"
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if callable(fn) or isinstance(value, property):
                    assert (fn.__doc__ or "").strip(), f"studio.{name}.{attr} has no docstring"
    for name in studio.datasets.__all__:
        assert (getattr(studio.datasets, name).__doc__ or "").strip(), f"studio.datasets.{name} has no docstring"
    # what the issue names on each object is there
    for cls, methods in ((studio.Registry, ["list", "show", "promote", "rollback", "diff", "push", "pull"]),
                         (studio.Engine, ["generate", "stream", "using"]),
                         (studio.EvalReport, ["to_markdown", "_repr_markdown_"])):
        assert all(callable(getattr(cls, m)) for m in methods), cls
    assert {"register", "list", "get", "inspect"} <= set(studio.datasets.__all__)
    with pytest.raises(AttributeError, match="finetune"):  # the message lists the API
        studio.fine_tune


def test_finetune_function_survives_importing_the_cli_module():
    """`python -m studio.finetune` is a module of the same name: importing it must not replace the function."""
    proc = _python("import studio.finetune, studio\nfrom studio.finetune import config_from_args\n"
                   "print(callable(studio.finetune), type(studio.finetune).__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "function"]


def test_finetune_takes_the_cli_options_with_their_help():
    from studio.finetune import add_arguments
    from studio.train import TrainConfig

    sig = inspect.signature(studio.finetune)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, f in fields.items():
        assert sig.parameters[name].default == f.default and sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert f.metadata["help"] in studio.finetune.__doc__
    assert list(sig.parameters)[0] == "recipe" and sig.return_annotation is studio.TrainResult
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    planning = {"device_memory", "num_devices"}  # --dry-run options: keywords of studio.plan only
    cli = {a.dest for a in parser._actions} - {"help", "config", "dry_run"} - planning
    assert cli == set(fields)  # every CLI flag is a keyword of studio.finetune and of studio.plan
    assert set(fields) | planning <= set(inspect.signature(studio.plan).parameters)


@pytest.mark.parametrize("options, message", [
    ({"lr": 1e-3}, "unknown option 'lr' (did you mean learning_rate?)"),
    ({"max_step": 5}, "did you mean max_steps?"),
    ({"max_steps": "10"}, "max_steps='10' must be int, got str"),
    ({"r": 8.5}, "r=8.5 must be int, got float"),
    ({"packing": "yes"}, "packing='yes' must be bool"),
    ({"r": 0}, "LoRA rank r must be a positive integer"),
    ({"recipe": "nope.yaml"}, "recipe nope.yaml does not exist"),
])
def test_bad_options_fail_before_anything_loads(options, message):
    with pytest.raises(StudioError) as err:
        studio.finetune(**options)
    assert message in str(err.value)


def test_recipe_values_are_used_and_keywords_override_them(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: tiny-mixtral\nr: 4\nseq_len: 96\ntargets: attention\n")
    p = studio.plan(recipe, r=2, quant="none")
    assert (p.config.base, p.config.r, p.config.seq_len, p.config.quant) == ("tiny-mixtral", 2, 96, "none")
    assert [g.group for g in p.lora.groups] == ["attention"]


def test_plan_is_the_dry_run_as_an_object(capsys):
    from studio.finetune import dry_run
    from studio.train import TrainConfig

    p = studio.plan(base="tiny-moe", r=8, seq_len=128, device_memory="1GiB")
    assert isinstance(p, studio.TrainingPlan)
    assert p.trainable_params == p.lora.trainable_params > 0
    assert [e.quant for e in p.estimates] == ["4bit", "none"]  # the chosen setup, then the 16-bit comparison
    assert p.device_memory == 2 ** 30 and p.fits is (p.memory_bytes <= 2 ** 30)
    dry_run(TrainConfig(base="tiny-moe", r=8, seq_len=128), "1GiB")
    assert str(p) in capsys.readouterr().out  # the same text `studio finetune --dry-run` prints
    md = p._repr_markdown_()
    assert f"{p.trainable_params:,} trainable LoRA parameters" in md and p.table() in md
    assert json.loads(json.dumps(p.to_dict()))["plan"]["trainable_params"] == p.trainable_params
    big = studio.plan("recipes/mixtral-8x7b-law.yaml", device_memory="8GiB")  # a shipped recipe, offline
    assert big.config.base == "mistralai/Mixtral-8x7B-v0.1" and not big.fits


def test_datasets_namespace_registers_lists_gets_inspects_and_removes(tmp_path):
    good = tmp_path / "contracts.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"Define clause {i}.", "output": f"Clause {i} is a term."})
                            + "\n" for i in range(20)))
    info = studio.datasets.inspect(good)
    assert (info["format"], info["rows"], info["errors"]) == ("alpaca", 20, [])
    v = studio.datasets.register(good, name="contracts", eval_ratio=0.25)
    assert (v.ref, v.rows_train, v.rows_eval) == ("contracts@v1", 15, 5)
    assert studio.datasets.get("contracts").hash == v.hash
    assert [x.ref for x in studio.datasets.list()] == ["contracts@v1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{not json\n')
    assert "line 2" in studio.datasets.inspect(bad)["errors"][0]
    with pytest.raises(DatasetError, match="line 2"):
        studio.datasets.register(bad, name="bad")
    assert [x.ref for x in studio.datasets.list()] == ["contracts@v1"]  # nothing stored for the bad file
    assert {s["name"] for s in studio.datasets.samples()} >= {"law", "medicine", "code"}
    assert all(Path(s["train_path"]).is_file() for s in studio.datasets.samples())
    assert [x.ref for x in studio.datasets.remove("contracts")] == ["contracts@v1"]
    with pytest.raises(DatasetError, match="no dataset 'contracts'"):
        studio.datasets.get("contracts")


def test_loss_curve_records_events_and_draws_a_png():
    curve = studio.LossCurve(live=False)
    raw = [{"event": "train_begin", "max_steps": 2, "time": 1.0},
           {"event": "log", "step": 0, "max_steps": 2, "eval_loss": 9.0, "time": 1.5},
           {"event": "log", "step": 1, "max_steps": 2, "loss": 8.5, "learning_rate": 1e-3, "tokens_per_s": 120.0,
            "time": 2.0},
           {"event": "log", "step": 2, "max_steps": 2, "loss": 8.0, "aux_loss": 0.1, "time": 3.0},
           {"event": "log", "step": 2, "max_steps": 2, "eval_loss": 8.2, "time": 4.0},
           {"event": "log", "step": 2, "max_steps": 2, "train_runtime": 3.0, "train_loss": 8.25, "time": 4.0}]
    events = [studio.TrainEvent.from_log(r) for r in raw]
    assert [e.kind for e in events] == ["begin", "eval", "step", "step", "eval", "summary"]
    assert events[3].data["aux_loss"] == 0.1 and events[2].tokens_per_s == 120.0
    for e in events:
        curve(e)
    assert (curve.steps, curve.losses, curve.eval_steps, curve.eval_losses) == ([1, 2], [8.5, 8.0], [0, 2],
                                                                                [9.0, 8.2])
    png = curve._repr_png_()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_finetune_events_match_the_training_log(tmp_path):
    """A 3-step run on a 16-row file through a recipe + keyword overrides: the events a notebook receives are the
    trainer's logged values, in order, and the result is registered. (~20 s: one tiny training run.)"""
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Define term {i % 4}.",
                                        "output": f"Term {i % 4} is a rule of contract law."}) + "\n"
                            for i in range(16)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: tiny-moe\ndataset: {data}\nr: 4\nalpha: 8\nmax_steps: 50\nseq_len: 64\n")
    events = []
    result = studio.finetune(recipe, max_steps=3, domain="contracts", batch_size=4, dropout=0.0, learning_rate=5e-3,
                             logging_steps=1, eval_steps=0, save_steps=100, output=tmp_path / "run",
                             on_event=events.append, verbose=False)
    assert isinstance(result, studio.TrainResult) and result.registry_ref == "contracts@v1"
    kinds = [e.kind for e in events]
    # the held-out loss before training comes first (step 0), then the run begins
    assert kinds[:2] == ["eval", "begin"] and kinds[-1] == "end" and kinds.count("step") == 3
    logged = [json.loads(line) for line in open(Path(result.run_dir) / "training_log.jsonl")]
    assert [e.data for e in events[:-1]] == logged  # every logged line, as an event, in order
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3] and all(e.loss > 0 for e in steps)
    evals = [e for e in events if e.kind == "eval"]
    assert evals[0].step == 0 and evals[0].eval_loss == pytest.approx(result.metrics["eval_loss_before"], abs=1e-6)
    end = events[-1]
    assert end.data["registry_ref"] == "contracts@v1" and end.eval_loss == result.metrics["eval_loss"]
    meta = json.loads((Path(result.adapter_dir) / "studio_adapter.json").read_text())
    assert meta["hyperparameters"]["r"] == 4 and meta["hyperparameters"]["max_steps"] == 3  # recipe, then keywords
    assert studio.Registry().show("contracts@v1").metrics["eval_loss"] == result.metrics["eval_loss"]
