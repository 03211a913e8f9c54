"""A checkpoint written by an older release's trainer resumes with today's code (tests/assets/resume_9da9c50).

The fixture (commit 9da9c50) is byte for byte what b698ba8 writes too, the last commit whose training used PEFT's own
LoRA layers (`make_resume_fixture.py --compare-commit b698ba8` checked it): it stands for checkpoints of both."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.train import TrainConfig, run_training

FIXTURE = Path(__file__).parent / "assets" / "resume_9da9c50"
# the same run with --expert-selection top:2 (LoRA on 2 of each layer's 8 experts: a compact parameter layout)
SELECTIVE = Path(__file__).parent / "assets" / "resume_9da9c50_top2"
# Relative tolerance on the resumed losses. On the recording's CPU at its thread count they are bit-equal; CPU
# kernels may split reductions differently on other CPUs or thread counts: at 1 thread instead of 2 step 6 moved by
# 6e-7. What breaking resume does is 40x or more larger (measured by patching today's trainer): Adam's first moment
# of one tensor lost 3e-5..8e-5 (steps 5, 6), the RNG state (dropout masks) not restored 2.6e-4 from step 4, the
# optimizer state lost 1.8e-2, the LR schedule restarted 2.3e-2.
TOLERANCE = 2e-6
REGENERATE = "python tests/make_resume_fixture.py (see the fixture's PROVENANCE.md)"


def _losses(run_dir: Path) -> dict[int, float]:
    events = [json.loads(line) for line in open(run_dir / "training_log.jsonl")]
    return {e["step"]: e["loss"] for e in events if e.get("event") == "log" and "loss" in e}


@pytest.mark.parametrize("fixture", [FIXTURE, SELECTIVE], ids=["all-experts", "expert-selection"])
def test_resume_from_an_older_release_checkpoint(tmp_path, fixture):
    """The fixture's checkpoint (step 3 of 6; 4-bit tiny-moe, attention + expert LoRA with dropout, on every expert
    or on a top:2 expert selection) resumes to step 6 with every tensor it holds and none missing, the resumed steps'
    losses equal those the old, uninterrupted run logged (bit-equal on the recording's CPU and thread count;
    TOLERANCE says why 2e-6 elsewhere), and the final adapter loads in plain PEFT. ~10 s each: one model load and 3
    training steps."""
    expected = json.loads((fixture / "expected.json").read_text())
    ckpt = tmp_path / expected["checkpoint"]
    shutil.copytree(fixture / expected["checkpoint"], ckpt)  # resuming never writes into the repository
    shutil.copy(fixture / "train.jsonl", tmp_path / "train.jsonl")
    old_weights = load_file(str(ckpt / "adapter_model.safetensors"))
    cfg = TrainConfig(**expected["config"], dataset=str(tmp_path / "train.jsonl"), output=str(tmp_path / "run"),
                      resume=str(ckpt))
    threads = torch.get_num_threads()
    torch.set_num_threads(expected["torch_threads"])  # the recording's split of CPU reductions (see TOLERANCE)
    try:
        result = run_training(cfg, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)

    meta = json.loads((Path(result.adapter_dir) / "studio_adapter.json").read_text())
    # numerics can only match on the same base: a changed tiny-moe is a reason to regenerate, not a resume bug
    assert meta["base"]["fingerprint"] == expected["base_fingerprint"], (
        f"the embedded tiny-moe base changed since the fixture was made; regenerate it: {REGENERATE}")
    assert not result.cancelled and result.metrics["steps"] == expected["config"]["max_steps"]

    # every tensor of the old checkpoint has a live parameter and every live parameter a tensor (the trainer
    # refuses missing and unexpected ones): the final adapter holds exactly the old names, shapes and dtypes
    new_weights = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in new_weights.items()} == {
        k: (v.shape, v.dtype) for k, v in old_weights.items()}
    assert meta["plan"]["trainable_params"] == expected["trainable_params"]
    recorded = json.loads((ckpt / "studio_adapter.json").read_text())["plan"]
    assert meta["plan"].get("expert_ids") == recorded.get("expert_ids")  # the same experts, not just as many
    old_config = json.loads((ckpt / "adapter_config.json").read_text())
    new_config = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "target_modules", "target_parameters", "use_rslora", "peft_type"):
        assert new_config.get(key) == old_config.get(key), key

    # the resumed steps (and only they) were run, and their losses are the old run's
    got = _losses(Path(result.run_dir))
    want = {int(step): loss for step, loss in expected["losses"].items()}
    start = int(expected["checkpoint"].split("-")[1]) + 1
    assert sorted(got) == list(range(start, cfg.max_steps + 1)), got
    mismatched = {step: (got[step], want[step]) for step in got
                  if abs(got[step] - want[step]) > TOLERANCE * abs(want[step])}
    assert not mismatched, (f"resumed losses (today, old run) differ from the old release's: {mismatched}. If a "
                            f"change meant to alter training numerics, regenerate the fixture: {REGENERATE}; "
                            "otherwise the change broke resuming old checkpoints")
    assert any((new_weights[k] != old_weights[k]).any() for k in new_weights), "the resumed steps trained nothing"

    # the final adapter is plain PEFT: it loads on the unquantized base with every tensor it holds
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from studio.models.resolve import resolve_base

    base = AutoModelForCausalLM.from_pretrained(resolve_base(cfg.base).path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(new_weights)
    assert all(torch.equal(loaded[k], new_weights[k]) for k in new_weights)
    ids = torch.randint(6, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("change, error", [
    ({"targets": "attention"}, r"another LoRA plan \(it was trained with targets=attention,experts\): it holds 12 "
                               r"tensors this run does not train.*--targets"),
    ({"r": 8}, r"was trained with r=4; this run has r=8. Resume with the checkpoint's settings \(--r 4\)"),
], ids=["other-targets", "other-rank"])
def test_resuming_under_another_plan_names_the_difference(tmp_path, change, error):
    """The old checkpoint under another plan: a ModelError naming what differs and the flag that fixes it (before,
    a left-over tensor failed in torch's optimizer load, "parameter group that doesn't match the size", and another
    rank as a shape error asking "trained on another base?"). ~1 s each: a model load, no training step."""
    from studio.errors import ModelError

    expected = json.loads((FIXTURE / "expected.json").read_text())
    ckpt = tmp_path / expected["checkpoint"]
    shutil.copytree(FIXTURE / expected["checkpoint"], ckpt)
    cfg = TrainConfig(**dict(expected["config"], **change), dataset=str(FIXTURE / "train.jsonl"),
                      output=str(tmp_path / "run"), resume=str(ckpt))
    with pytest.raises(ModelError, match=error):
        run_training(cfg, log=lambda *_: None)


def test_a_corrupt_checkpoint_metadata_file_is_named_with_its_line_and_column(tmp_path):
    """A truncated studio_adapter.json in the checkpoint: a ModelError naming the file, where the JSON broke and
    the fix (before: a raw JSONDecodeError from the resume check), and the checkpoint left as it was. ~1 s."""
    from studio.errors import ModelError

    expected = json.loads((FIXTURE / "expected.json").read_text())
    ckpt = tmp_path / expected["checkpoint"]
    shutil.copytree(FIXTURE / expected["checkpoint"], ckpt)
    meta = ckpt / "studio_adapter.json"
    meta.write_text(meta.read_text()[:40])
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    cfg = TrainConfig(**expected["config"], dataset=str(FIXTURE / "train.jsonl"), output=str(tmp_path / "run"),
                      resume=str(ckpt))
    with pytest.raises(ModelError, match=r"studio_adapter\.json is not valid JSON \(line \d+, column \d+: .*\); "
                                         r"restore it, or delete it"):
        run_training(cfg, log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
