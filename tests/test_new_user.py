"""What a new user reads: `registry diff` of runs that differ only by seed, a readable `registry show`, one
definition of the trainable-parameter share everywhere, plain progress lines when output goes to a file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

try:
    from registry_fixtures import REPO, cli_env, studio_cli
except ImportError:  # run from the repository root as a package
    from tests.registry_fixtures import REPO, cli_env, studio_cli

SAVE = textwrap.dedent("""
    import sys
    from studio.adapters import save_random_adapter
    from studio.models.loading import QuantSpec, load_base
    loaded = load_base("tiny-mixtral", QuantSpec(mode="none"))
    save_random_adapter(loaded, sys.argv[1], "law", seed=int(sys.argv[2]))
""")


def test_diff_of_two_seeds_shows_no_config_change(tmp_path):
    """Two adapters saved by separate processes (PEFT keeps target_modules as a set, so its order follows each
    process's string hash seed) that differ only by seed: the diff lists weights, seed and metrics, no config."""
    root = str(tmp_path / "reg")
    for seed, hash_seed in ((1, "1"), (2, "2")):
        out = tmp_path / f"a{seed}"
        subprocess.run([sys.executable, "-c", SAVE, str(out), str(seed)], check=True, timeout=300, cwd=REPO,
                       env=cli_env({"PYTHONHASHSEED": hash_seed}))
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["target_modules"] == sorted(cfg["target_modules"]) and len(cfg["target_modules"]) > 1
        assert studio_cli("--root", root, "register", str(out)).returncode == 0
    d = json.loads(studio_cli("--root", root, "--json", "diff", "law@v1", "law@v2").stdout)
    assert d["config"] == {} and d["plan"] == {}
    assert d["hyperparameters"] == {"seed": {"a": 1, "b": 2}}
    assert d["files"]["changed"] == ["adapter_model.safetensors", "studio_adapter.json"]
    text = studio_cli("--root", root, "diff", "law@v1", "law@v2").stdout
    assert "config" not in text and "seed" in text
    assert max(len(line) for line in text.splitlines()) <= 160, text  # no columns hundreds of characters wide

    # `registry show`: the plan and lineage as wrapped, indented lines (no one-line JSON); --json stays JSON
    show = studio_cli("--root", root, "show", "law@v2", env={"COLUMNS": "100"}).stdout
    assert max(len(line) for line in show.splitlines()) <= 100, show
    assert "\n  plan:\n" in show and "\n    targets: attention, experts\n" in show and "{\"" not in show, show
    assert json.loads(studio_cli("--root", root, "--json", "show", "law@v2").stdout)["ref"] == "law@v2"


def test_one_trainable_share_in_dry_run_models_plan_and_ui():
    """The trainable share has one definition (LoRA parameters over the base's unquantized count) and
    `studio models plan` defaults to the same targets as finetune and the UI."""
    from studio.finetune import plan_and_estimate
    from studio.moe.plan import trainable_line
    from studio.train import TrainConfig
    from studio.ui.train_tab import plan_estimate

    plan, _ = plan_and_estimate(TrainConfig(base="tiny-moe"))
    line = trainable_line(plan.trainable_params, plan.total_params)
    assert line == ("trainable parameters (LoRA): 452,608 = 6.829% of the base's 6,628,096 "
                    "(all weights, counted unquantized)")  # tiny-moe: 6.63M published count, r=16 attention+experts
    models = subprocess.run([sys.executable, "-m", "studio.cli", "models", "plan", "--base", "tiny-moe"],
                            capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert line in models.stdout, models.stdout + models.stderr
    _, summary, _ = plan_estimate(None, "tiny-moe", "4bit", "attention,experts", 16, 32, 256, 4)
    assert line[1:] in summary  # capitalised first letter in the page
