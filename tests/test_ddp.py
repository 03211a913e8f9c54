"""Two-process data-parallel training on CPU (gloo): `accelerate launch ... -m studio.finetune`.

accelerate 1.15 note: `accelerate launch --cpu --num_processes 2` does NOT start two processes; its simple
launcher only fans out through `mpirun` (with a hostfile) and otherwise runs the script once. The torchrun-based
launcher (`--multi_gpu`) is the one that starts N local processes; on a machine without CUDA, `TrainingArguments`
(`use_cpu=True`, set by studio.train on CPU) makes accelerate pick DistributedType.MULTI_CPU with gloo.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

pytestmark = pytest.mark.slow


def _launch_cmd(output: Path, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0",          # a free port: parallel test runs do not collide
            "--log_dir", str(log_dir), "--tee", "3",  # per-rank stdout/stderr files: proof of two ranks
            "-m", "studio.finetune",
            "--base", "tiny-moe", "--dataset", "law", "--max-steps", str(STEPS), "--batch-size", "2",
            "--seq-len", "128", "--eval-steps", "0", "--save-steps", str(STEPS), "--no-register",
            "--output", str(output)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-rank training run shared by the tests of this module."""
    from studio.models.tiny import ensure_built

    root = tmp_path_factory.mktemp("ddp")
    models = root / "models"
    base_dir = ensure_built("tiny-moe", models)  # built once here, so the two ranks do not both build it
    env = dict(os.environ,
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1",  # two ranks share the machine's cores
               STUDIO_MODELS_CACHE=str(models),
               STUDIO_DATASETS_ROOT=str(root / "datasets_root"),
               STUDIO_ADAPTERS_ROOT=str(root / "adapters_root"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    output, log_dir = root / "run", root / "rank_logs"
    proc = subprocess.run(_launch_cmd(output, log_dir), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    return dict(proc=proc, output=output, log_dir=log_dir, base_dir=base_dir)


def _explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}"


def test_ddp_two_ranks_train_and_save_a_peft_loadable_adapter(ddp_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc, output = ddp_run["proc"], ddp_run["output"]
    assert proc.returncode == 0, _explain(proc)

    # two ranks really ran (torchrun writes one log folder per local rank)
    ranks = {p.parent.name for p in ddp_run["log_dir"].rglob("stdout.log")}
    assert ranks == {"0", "1"}, f"expected logs of ranks 0 and 1, found {sorted(ranks)}\n{_explain(proc)}"
    # ...and split the data: with world size 2 an epoch is ceil(n / (2 * 2)) steps, not ceil(n / 2)
    from studio.data import resolve_dataset

    state = json.loads((output / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    steps_per_epoch = round(STEPS / state["epoch"])
    n_train = len(resolve_dataset("law").train_messages())  # before the seq-len filter: an upper bound
    assert steps_per_epoch <= math.ceil(n_train / (2 * 2)), (steps_per_epoch, n_train)

    adapter = output / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file(), _explain(proc)
    assert (adapter / "adapter_config.json").is_file()

    # plain PEFT on the unquantized base loads it and runs
    base = AutoModelForCausalLM.from_pretrained(ddp_run["base_dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    ids = torch.randint(6, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 16, base.config.vocab_size)
    assert torch.isfinite(logits).all()
    # training moved the adapter away from its zero-initialised lora_B: the update reached the saved weights
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def test_ddp_checkpoint_and_log_are_complete(ddp_run):
    proc, output = ddp_run["proc"], ddp_run["output"]
    assert proc.returncode == 0, _explain(proc)
    ckpt = output / "checkpoints" / f"checkpoint-{STEPS}"
    # every rank's RNG state survives in the checkpoint (needed for an exact --resume)
    assert (ckpt / "rng_state_0.pth").is_file()
    assert (ckpt / "rng_state_1.pth").is_file(), sorted(p.name for p in ckpt.iterdir())
    # the event log the UI plots has each event once, not once per rank
    events = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines() if line]
    assert sum(e["event"] == "train_begin" for e in events) == 1
    # the plan, the memory table and the summary are printed by rank 0 only
    logs = {p.parent.name: p.read_text() for p in ddp_run["log_dir"].rglob("stdout.log")}
    assert "trainable parameters" in logs["0"] and "adapter:" in logs["0"], logs["0"][-2000:]
    assert "trainable parameters" not in logs["1"] and "adapter:" not in logs["1"], logs["1"][-2000:]
