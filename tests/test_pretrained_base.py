"""The pretrained embedded base: its corpus (committed, rebuildable, disjoint from the domain samples), its shipped
weights (sha256-checked, far better than the random init), the reproducibility of its pretraining, the real-word
measure and the routing divergence the eval report shows."""

import json
import sys

import numpy as np
import pytest
import torch

from studio.eval.routing import RoutingStats, domain_divergence, js_distance
from studio.models import corpus, pretrain, tiny


@pytest.fixture(scope="module")
def records():
    return corpus.load_corpus()


@pytest.fixture(scope="module")
def record():
    return json.loads(tiny.PRETRAINED_RECORD.read_text())


def test_corpus_is_committed_verified_and_disjoint_from_the_samples(records):
    manifest = json.loads((corpus.CORPUS_DIR / corpus.MANIFEST_FILE).read_text())
    assert len(records) == manifest["records"] > 1000
    assert {r["split"] for r in records} == {"train", "heldout"}
    assert manifest["licence"].startswith("PSF") and manifest["python_version"]
    # no normalised line of the corpus is a normalised line of a law/medicine/code sample
    sample_lines = {corpus.normalise(line) for t in corpus.sample_texts() for line in t.splitlines()}
    sample_lines.discard("")
    corpus_lines = {corpus.normalise(line) for r in records for line in corpus._record_text(r).splitlines()}
    # a line that is only a name (e.g. `json`) is not text worth counting
    shared = {line for line in corpus_lines & sample_lines if len(line.split()) >= corpus.MIN_PARA_WORDS}
    assert not shared, sorted(shared)[:5]
    # the modules the code sample was mined from are not in the corpus
    ids = {r["id"] for r in records}
    assert "doc:json.dumps" not in ids and "doc:pathlib.Path" not in ids


def test_corpus_file_is_rejected_when_it_does_not_match_its_sha256(tmp_path):
    from studio.errors import ModelError

    (tmp_path / corpus.CORPUS_FILE).write_bytes((corpus.CORPUS_DIR / corpus.CORPUS_FILE).read_bytes()[:-10])
    (tmp_path / corpus.MANIFEST_FILE).write_text((corpus.CORPUS_DIR / corpus.MANIFEST_FILE).read_text())
    with pytest.raises(ModelError, match="python -m studio.models.corpus"):
        corpus.load_corpus(tmp_path)


def test_corpus_rebuilds_byte_identical_on_the_recorded_python(tmp_path):
    """The standard library's text differs between Python releases: on the recorded version the rebuild is
    byte-identical; on another the build still runs and stays disjoint (the committed file is what ships)."""
    manifest = json.loads((corpus.CORPUS_DIR / corpus.MANIFEST_FILE).read_text())
    rebuilt = corpus.write_corpus(tmp_path)
    assert rebuilt["overlap_removed_exact_line"] + rebuilt["overlap_removed_8gram"] <= 20
    if ".".join(map(str, sys.version_info[:3])) == manifest["python_version"]:
        assert rebuilt["sha256"] == manifest["sha256"]
        assert rebuilt == manifest
    else:
        assert rebuilt["records"] > 1000


def test_shipped_weights_are_the_recorded_ones_and_know_the_corpus(records, record):
    from studio.models.tokenizer import load_tokenizer

    assert tiny.PRETRAINED_WEIGHTS.stat().st_size <= 50 * 2 ** 20
    assert pretrain.file_sha256(tiny.PRETRAINED_WEIGHTS) == record["sha256"] == tiny.pretrained_sha256()
    data = pretrain.tokenize_corpus([r for r in records if r["split"] == "heldout"], load_tokenizer())
    trained, random = tiny.build_model("tiny-moe"), tiny.build_model("tiny-moe-random")
    torch.set_num_threads(2)
    loss = pretrain.heldout_loss(trained, data["heldout"], 256, 8, max_batches=2)
    random_loss = pretrain.heldout_loss(random, data["heldout"], 256, 8, max_batches=2)
    print(f"corpus held-out loss (2 batches): pretrained {loss:.4f}, random {random_loss:.4f}")
    assert random_loss > 8.0 and loss < random_loss - 3.0, (loss, random_loss)


def test_embedded_tiny_moe_resolves_to_the_pretrained_weights(tmp_path):
    from studio.models import resolve

    base = resolve.resolve_base("tiny-moe", cache_dir=tmp_path)
    meta = json.loads((base.path / "studio_base.json").read_text())
    assert meta["pretrained_sha256"] == tiny.pretrained_sha256()
    assert meta["weights_hash"] == tiny.weights_hash(tiny.build_model("tiny-moe"))
    random = resolve.resolve_base("tiny-moe-random", cache_dir=tmp_path)
    assert random.path != base.path and json.loads((random.path / "studio_base.json").read_text())[
        "weights_hash"] != meta["weights_hash"]
    assert "tiny-moe-random" not in tiny.EMBEDDED  # listed bases stay the six families


def test_pretraining_reproduces_the_shipped_runs_first_steps(record):
    """The first `prefix_steps` of the shipped run are re-run (the warmup, so the learning rate does not depend on
    the total step count): on the recorded machine type, thread count and torch build the weights are bit-identical;
    elsewhere float kernels may sum in another order, so the losses must agree to 1e-3 relative."""
    cfg = pretrain.PretrainConfig(**dict(record["config"], steps=record["prefix_check"]["steps"], eval_every=0))
    assert cfg.steps <= cfg.warmup_steps
    model, rerun = pretrain.pretrain(cfg, log=lambda s: None, final_eval_batches=1)
    same_machine = (rerun["machine"]["cpu"] == record["machine"]["cpu"]
                    and rerun["machine"]["torch"] == record["machine"]["torch"])
    np.testing.assert_allclose(rerun["prefix_check"]["losses"], record["prefix_check"]["losses"], rtol=1e-3)
    if same_machine:
        assert rerun["prefix_check"]["weights_hash"] == record["prefix_check"]["weights_hash"]
        assert rerun["prefix_check"]["losses"] == record["prefix_check"]["losses"]


def test_real_word_share():
    vocab = {"the", "court", "held", "a", "contract"}
    assert corpus.real_word_share("The court held: a contract.", vocab) == 1.0
    assert corpus.real_word_share("The cuort hled a -- contract", vocab) == pytest.approx(3 / 5)
    assert corpus.real_word_share("", vocab) == 0.0
    assert "function" in corpus.corpus_vocabulary([{"text": "A function returns."}])


def test_js_distance_and_domain_divergence():
    assert js_distance([5, 5, 0, 0], [10, 10, 0, 0]) == pytest.approx(0.0, abs=1e-9)
    assert js_distance([5, 5, 0, 0], [0, 0, 3, 3]) == pytest.approx(1.0)
    mid = js_distance([9, 1], [1, 9])
    assert 0.0 < mid < 1.0
    # hand-computed: p=(.9,.1), q=(.1,.9), m=(.5,.5): JS = .9 log2 1.8 + .1 log2 .2
    assert mid == pytest.approx(np.sqrt(0.9 * np.log2(1.8) + 0.1 * np.log2(0.2)))
    layers = ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    per = {"law": RoutingStats(layers, [[4, 0], [2, 2]], tokens=2, top_k=2),
           "code": RoutingStats(layers, [[0, 4], [2, 2]], tokens=2, top_k=2)}
    (row,) = domain_divergence(per)
    assert row["domains"] == ("law", "code") and row["layers"] == [1, 2]
    assert row["js_distance"] == pytest.approx([1.0, 0.0]) and row["mean_js_distance"] == pytest.approx(0.5)


def test_models_pretrain_refuses_other_bases(capsys):
    from studio.cli import main

    assert main(["models", "pretrain", "tiny-mixtral"]) == 2
    assert "only tiny-moe" in capsys.readouterr().err


def test_pretrain_cli_compares_with_the_shipped_weights_only_for_the_shipped_recipe(tmp_path, capsys):
    """A 2-step run (about 7 s) writes weights and a record, and does not call its weights DIFFERENT from the
    shipped ones: its recipe differs (steps), so a different sha256 says nothing about the machine."""
    from studio.cli import main

    assert main(["models", "pretrain", "tiny-moe", "--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "pretrained.json").read_text())
    assert record["config"]["steps"] == 2 and pretrain.file_sha256(tmp_path / "model.safetensors") == record["sha256"]
    assert "not compared with the shipped weights" in out and "in steps" in out and "DIFFERENT" not in out
