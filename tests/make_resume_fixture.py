"""Write the old-release checkpoint fixture that tests/test_resume_old_checkpoint.py resumes with today's code.

    python tests/make_resume_fixture.py [--commit 9da9c50] [--out tests/assets/resume_9da9c50] [--compare-commit C]
    python tests/make_resume_fixture.py --expert-selection top:2 --out tests/assets/resume_9da9c50_top2

It extracts the studio at --commit (`git archive`, into a temporary directory outside the repository; nothing in
the repository's git metadata changes), runs that commit's trainer in a subprocess on the embedded tiny-moe base
(4-bit experts, attention + expert LoRA, a quickstart-like recipe at r=4 to keep the files small) for 6 steps with
a checkpoint at step 3 (with --expert-selection, LoRA on the selected experts only), and copies into --out: the checkpoint directory exactly as that trainer wrote it, the
training data, the run's config and the per-step losses the uninterrupted run logged (expected.json), and a
PROVENANCE.md. Needs the same venv as the tests (the libraries are recorded in expected.json); ~30 s on 2 cores
(twice that with --compare-commit, which also runs an older trainer and records whether its checkpoint is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The run: a quickstart-like recipe (recipes/tiny-moe-law.yaml: 4-bit, attention + experts, alpha = 2r, dropout,
# cosine schedule with warmup, seed 42), shrunk so that the committed checkpoint stays under 2 MB (r=4: 113k
# trainable parameters, 0.45 MB of factors + 0.9 MB of Adam moments) and a run takes seconds.
CONFIG = dict(base="tiny-moe", quant="4bit", targets="attention,experts", r=4, alpha=8, dropout=0.05,
              learning_rate=3e-3, max_steps=6, batch_size=4, grad_accum=1, seq_len=64, eval_steps=0,
              save_steps=3, logging_steps=1, seed=42, register=False)
CHECKPOINT_STEP = 3
ROWS = 16  # training data: 16 short instruction/answer pairs (the dataset registry holds some out for eval)

# Runs inside the old tree (its studio/ first on sys.path); uses only run_training and TrainConfig, whose
# signatures this fixture's commit shares with today's code.
DRIVER = r"""
import json, sys
import torch
from studio.train import TrainConfig, run_training
cfg = TrainConfig(**json.loads(sys.argv[1]))
result = run_training(cfg, log=lambda *a: print(*a, file=sys.stderr))
print(json.dumps({"steps": result.metrics["steps"], "threads": torch.get_num_threads()}))
"""


def write_dataset(path: Path) -> None:
    with open(path, "w") as f:
        for i in range(ROWS):
            f.write(json.dumps({"instruction": f"Define term {i % 4} of clause {i}.",
                                "output": f"Term {i % 4} is a rule of contract law, clause {i}."}) + "\n")


def subject_of(commit: str) -> str:
    subject = git("log", "-1", "--format=%s", commit)
    return subject if len(subject) <= 90 else subject[:90].rsplit(" ", 1)[0] + " ..."


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


class OldRunFailed(RuntimeError):
    pass


def train_at(commit: str, tmp: Path, data: Path, config: dict) -> tuple[Path, dict, dict]:
    """Run `commit`'s trainer (extracted under `tmp`) with `config` on `data`; returns its run directory, its losses
    by step and what the driver printed."""
    old = tmp / "old"
    old.mkdir()
    archive = tmp / "old.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, stdout=f)
    with tarfile.open(archive) as tar:
        tar.extractall(old, filter="data")
    cfg = dict(config, dataset=str(data), output=str(tmp / "run"))
    # the old code alone on sys.path; every registry and cache in the temporary directory; offline
    env = dict(os.environ, PYTHONPATH=str(old), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               STUDIO_MODELS_CACHE=str(tmp / "models"), STUDIO_DATASETS_ROOT=str(tmp / "datasets"),
               STUDIO_ADAPTERS_ROOT=str(tmp / "adapters"), STUDIO_PROFILES_CACHE=str(tmp / "profiles"))
    print(f"training {CONFIG['max_steps']} steps with the trainer of {commit[:10]} (checkpoint at step "
          f"{CHECKPOINT_STEP}) ...", flush=True)
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg)], cwd=old, env=env, text=True,
                          stdout=subprocess.PIPE)
    if proc.returncode:
        raise OldRunFailed(f"the trainer of {commit[:10]} failed (exit {proc.returncode}); its log is above")
    ran = json.loads(proc.stdout.strip().splitlines()[-1])
    run = tmp / "run"
    events = [json.loads(line) for line in open(run / "training_log.jsonl")]
    losses = {str(e["step"]): e["loss"] for e in events if e.get("event") == "log" and "loss" in e}
    if sorted(map(int, losses)) != list(range(1, CONFIG["max_steps"] + 1)):
        raise OldRunFailed(f"expected one logged loss per step, got steps {sorted(losses)}")
    return run, losses, ran


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="9da9c50", help="the older commit whose trainer writes the checkpoint")
    parser.add_argument("--out", default=str(REPO / "tests" / "assets" / "resume_9da9c50"),
                        help="fixture directory (replaced)")
    parser.add_argument("--expert-selection", default="all",
                        help="the run's --expert-selection (e.g. top:2: a checkpoint of an expert-selective adapter)")
    parser.add_argument("--compare-commit", default=None,
                        help="also run this commit's trainer and record whether it writes the same checkpoint bytes "
                             "and losses (e.g. b698ba8, the last with PEFT's LoRA layers in training)")
    args = parser.parse_args(argv)
    config = CONFIG if args.expert_selection == "all" else dict(CONFIG, expert_selection=args.expert_selection)
    commit = git("rev-parse", "--verify", f"{args.commit}^{{commit}}")
    subject = subject_of(commit)
    out = Path(args.out)
    same_as = ""
    with tempfile.TemporaryDirectory(prefix="studio-old-") as tmp:
        tmp = Path(tmp)
        data = tmp / "train.jsonl"
        write_dataset(data)
        try:
            (tmp / "a").mkdir()
            run, losses, ran = train_at(commit, tmp / "a", data, config)
            if args.compare_commit:
                other = git("rev-parse", "--verify", f"{args.compare_commit}^{{commit}}")
                (tmp / "b").mkdir()
                run_b, losses_b, _ = train_at(other, tmp / "b", data, config)
                ckpt_a, ckpt_b = (r / "checkpoints" / f"checkpoint-{CHECKPOINT_STEP}" for r in (run, run_b))
                names = sorted(p.name for p in ckpt_a.iterdir())
                differ = [n for n in names if not (ckpt_b / n).is_file()
                          or (ckpt_a / n).read_bytes() != (ckpt_b / n).read_bytes()]
                other_subject = subject_of(other)
                verdict = ("writes byte-identical checkpoint files and logs the same losses" if not differ
                           and losses == losses_b else f"writes different files ({', '.join(differ) or 'none'}) "
                           f"and losses {'equal' if losses == losses_b else losses_b}")
                same_as = f"- Checked against commit {other} (\"{other_subject}\"): it {verdict}.\n"
                print(same_as.strip(), flush=True)
        except OldRunFailed as exc:
            print(exc, file=sys.stderr)
            return 1
        meta = json.loads((run / "adapter" / "studio_adapter.json").read_text())
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shutil.copytree(run / "checkpoints" / f"checkpoint-{CHECKPOINT_STEP}", out / f"checkpoint-{CHECKPOINT_STEP}")
        shutil.copy(data, out / "train.jsonl")
        expected = {
            "commit": commit, "subject": subject, "checkpoint": f"checkpoint-{CHECKPOINT_STEP}",
            "config": config, "losses": losses, "torch_threads": ran["threads"],
            "base_fingerprint": meta["base"]["fingerprint"], "library_versions": meta["library_versions"],
            "trainable_params": meta["plan"]["trainable_params"],
        }
        (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shown = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    versions = ", ".join(f"{k} {v}" for k, v in meta["library_versions"].items())
    (out / "PROVENANCE.md").write_text(PROVENANCE.format(
        commit=commit, short=commit[:7], subject=subject, step=CHECKPOINT_STEP, step_next=CHECKPOINT_STEP + 1,
        steps=CONFIG["max_steps"], config=json.dumps(config), threads=ran["threads"], out=shown, size=size,
        versions=versions, same_as=same_as,
        compare=(f" --expert-selection {args.expert_selection}" if args.expert_selection != "all" else "")
        + (f" --compare-commit {args.compare_commit}" if args.compare_commit else "")))
    print(f"wrote {out} ({size / 1e6:.2f} MB); losses by step: {losses}")
    return 0


PROVENANCE = """\
# A training checkpoint written by an older release

`tests/test_resume_old_checkpoint.py` resumes it with today's code, so that a change to the LoRA layers, the
trainer or the adapter files that stops checkpoints users already have from resuming fails CI.

- Written by the trainer (`studio/train.py`) of commit {commit}
  ("{subject}"), older than that test, in a subprocess with that commit's `studio/` alone on `sys.path`
  (extracted with `git archive`), on 2 CPU cores ({threads} torch threads).
- Made by, from the repository root in the project's venv (offline; ~30 s on 2 cores; it replaces this directory):

      python tests/make_resume_fixture.py --commit {short} --out {out}{compare}

  Libraries: {versions}.
- The run: `TrainConfig(**config, dataset="train.jsonl")`, the embedded tiny-moe base with NF4 experts,
  attention + routed-expert LoRA with dropout, {steps} steps, a checkpoint after step {step}; config =
  `{config}`.
- Files ({size:,} bytes besides this one): `checkpoint-{step}/` exactly as the trainer wrote it (PEFT-format
  adapter, optimizer, scheduler, RNG state, trainer state); `train.jsonl`, the training data; `expected.json`,
  the commit, the config, the base's fingerprint and every step's loss as the uninterrupted run logged it (steps
  {step_next}..{steps} are what a resume must reproduce).
{same_as}
Regenerate only when a change is meant to alter training numerics (the tiny-moe weights, the data split, the
loss); a change that merely breaks resuming must be fixed in the code, not here. A regenerated fixture should still
come from a commit older than the change it guards.
"""

if __name__ == "__main__":
    sys.exit(main())
