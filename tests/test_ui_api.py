"""The web app's named API endpoints, called with gradio_client against `python app.py` in a subprocess:
one main action per tab (Train/Jobs, Datasets, Registry, Playground, Compare), errors, and the job table.

The app runs once per module on a free port with its own datasets / adapters / jobs roots; one tiny-moe job
trains a few steps and the later tests use the adapter it registers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(600)  # a hung request must fail the test, not stall CI

REPO = Path(__file__).resolve().parent.parent
TRAIN = dict(source="Upload a file", eval_ratio=0.2, dataset_ref=None, base="tiny-moe", quant="4bit",
             targets="attention,experts", r=8, alpha=16, learning_rate=5e-3, steps=6, batch_size=4, seq_len=64,
             eval_steps=3, seed=7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(root: Path, *extra_args: str, timeout: float = 180.0):
    """`python app.py` on 127.0.0.1:<free port> with roots under `root`; yields (url, env); stops it after."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STUDIO_DATASETS_ROOT": str(root / "datasets"),
           "STUDIO_ADAPTERS_ROOT": str(root / "adapters"), "STUDIO_JOBS_ROOT": str(root / "jobs"),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("STUDIO_UI_AUTH", None)
    log = open(root / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), *extra_args], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{(root / 'app.log').read_text()[-3000:]}")
            try:
                if httpx.get(url + "/config", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"app.py did not answer in {timeout}s:\n{(root / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, env
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def write_jsonl(path: Path, rows: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Define term {i % 4}.",
                                "output": f"Term {i % 4} is a rule of contract law."}) + "\n")
    return path


def write_bad(path: Path) -> Path:
    path.write_text('{"instruction": "Define tort.", "output": "A civil wrong."}\n{"instruction": "Define", \n')
    return path


def wait_job(client, job_id: str, timeout: float = 240.0, until=lambda j: j["status"] not in
             ("queued", "running", "cancelling")) -> dict:
    deadline = time.time() + timeout
    while True:
        job = client.predict(job_id, api_name="/job_status")
        if until(job):
            return job
        if time.time() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from gradio_client import Client, handle_file

    root = tmp_path_factory.mktemp("ui_api")
    with serve_app(root) as (url, env):
        client = Client(url, verbose=False)
        data = write_jsonl(root / "contracts.jsonl")
        job_id, _ = client.predict(file=handle_file(str(data)), name="contracts", **TRAIN, api_name="/start_training")
        job = wait_job(client, job_id)
        assert job["status"] == "done", (root / "jobs" / job_id / "worker.log").read_text()[-3000:]
        yield {"client": client, "root": root, "job": job, "ref": job["registry_ref"], "url": url}


@pytest.fixture
def client(app):
    return app["client"]


# ---- Train / Jobs ------------------------------------------------------------------------------------------


def test_training_job_runs_in_a_worker_and_registers_a_version(app, client):
    job = app["job"]
    assert job["registry_ref"] == "contracts@v1"
    p = job["progress"]
    assert p["step"] == p["max_steps"] == 6 and p["fraction"] == 1.0
    assert len(p["loss"]) >= 3 and p["eval_loss"], p  # the plot's data: train loss and held-out loss points
    assert p["tokens_per_s"] > 0
    assert job["metrics"]["eval_loss"] < job["metrics"]["eval_loss_before"]
    assert job["pid"] != os.getpid()  # trained in its own process
    jobs = client.predict(api_name="/list_jobs")
    assert [r[:2] for r in jobs["data"]] == [[job["id"], "done"]]
    adapters = client.predict(api_name="/list_adapters")
    assert [r[0] for r in adapters["data"]] == ["contracts@v1"]


def test_job_table_survives_an_app_restart(app):
    from studio.ui.jobs import JobManager

    jobs = JobManager(app["root"] / "jobs").list()  # what a restarted app reads
    assert [(j.id, j.status, j.registry_ref) for j in jobs] == [(app["job"]["id"], "done", "contracts@v1")]
    assert "registered contracts@v1" in jobs[0].log_tail()


def test_inspect_upload_shows_format_preview_and_errors(app, client, tmp_path):
    from gradio_client import handle_file

    report, preview, name = client.predict(handle_file(str(write_jsonl(tmp_path / "My Notes.jsonl", 5))),
                                           api_name="/inspect_file")
    assert "`alpaca`" in report and "usable 5" in report
    assert name == "My-Notes"
    assert preview["headers"][:5] == ["#", "turns", "system", "user", "assistant"]
    assert preview["data"][0][3] == "Define term 0."
    report, preview, _ = client.predict(handle_file(str(write_bad(tmp_path / "broken.jsonl"))),
                                        api_name="/inspect_file")
    assert "cannot be used" in report and "broken.jsonl: line 2" in report and "invalid JSON" in report
    assert "/tmp/gradio" not in report  # the user's file name, not Gradio's temporary copy
    assert preview["data"] in ([], [["", "", "", "", ""]])


def test_a_10mb_line_is_refused_by_the_inspect_handler_without_blowing_up(app, client, tmp_path):
    """Issue 13: the inspect handler read, previewed and tokenized a 10 MB line (2.4 GB); now the per-record limit
    refuses it before any of that."""
    from gradio_client import handle_file

    big = tmp_path / "one-huge-line.jsonl"
    big.write_text(json.dumps({"instruction": "Summarise.", "output": "word " * 2_000_000}) + "\n")
    report, preview, _ = client.predict(handle_file(str(big)), api_name="/inspect_file")
    assert "cannot be used" in report and "per-record limit" in report
    assert preview["data"] in ([], [["", "", "", "", ""]])


def test_bad_upload_is_refused_and_registers_nothing(app, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    before_ds = client.predict(api_name="/list_datasets")["data"]
    before_jobs = client.predict(api_name="/list_jobs")["data"]
    log_start = (app["root"] / "app.log").stat().st_size
    with pytest.raises(AppError, match=r"broken\.jsonl: line 2, column \d+: invalid JSON"):
        client.predict(file=handle_file(str(write_bad(tmp_path / "broken.jsonl"))), name="broken", **TRAIN,
                       api_name="/start_training")
    with pytest.raises(AppError, match="LoRA target .nonsense_proj. matches nothing"):
        client.predict(file=handle_file(str(write_jsonl(tmp_path / "ok.jsonl"))), name="ok",
                       **{**TRAIN, "targets": "o_proj,nonsense_proj"}, api_name="/start_training")
    with pytest.raises(AppError, match="unknown base 'tiny-mo'.*Did you mean 'tiny-moe'"):
        client.predict(file=handle_file(str(write_jsonl(tmp_path / "ok.jsonl"))), name="ok",
                       **{**TRAIN, "base": "tiny-mo"}, api_name="/start_training")
    assert client.predict(api_name="/list_datasets")["data"] == before_ds
    assert [r[0] for r in client.predict(api_name="/list_jobs")["data"]] == [r[0] for r in before_jobs]
    assert client.predict(api_name="/plan")["plan"].startswith("LoRA plan")  # and the app still answers
    with open(app["root"] / "app.log", "rb") as f:  # ordinary bad input: a message for the user, no log traceback
        f.seek(log_start)
        assert b"Traceback" not in f.read()


def test_plan_shows_the_lora_plan_and_memory_estimates(client):
    from gradio_client.exceptions import AppError

    out = client.predict(base="tiny-moe", quant="4bit", targets="attention,experts", r=8, alpha=16, seq_len=128,
                         batch_size=2, api_name="/plan")
    assert "routed_experts" in out["plan"] and "attention" in out["plan"] and "trainable parameters" in out["plan"]
    setups = {row["setup"] for row in out["memory_gib"]}
    assert setups == {"QLoRA 4-bit", "LoRA 16-bit"}
    assert all(row["GiB"] > 0 for row in out["memory_gib"])
    mixtral = client.predict(base="mistralai/Mixtral-8x7B-v0.1", quant="4bit", targets="all", r=16, alpha=32,
                             seq_len=2048, batch_size=1, api_name="/plan")  # planned offline from its config
    assert "shared_experts" not in mixtral["plan"].split("trainable parameters")[0].split("\n", 2)[2]
    assert "QLoRA 4-bit" in mixtral["summary"]
    with pytest.raises(AppError, match="matches nothing|no dense_mlp|dense_mlp"):
        client.predict(base="tiny-mixtral", targets="dense_mlp", api_name="/plan")


def test_cancel_stops_a_running_job_without_registering(app, client):
    job_id, msg = client.predict(file=None, name="", **{**TRAIN, "source": "Registered dataset", "steps": 2000,
                                                         "dataset_ref": "contracts@v1", "eval_steps": 0},
                                 api_name="/start_training")
    assert "contracts@v1" in msg
    wait_job(client, job_id, 180, until=lambda j: j["progress"]["step"] >= 1 or j["status"] != "running")
    assert "Cancelling" in client.predict(job_id, api_name="/cancel_job")
    job = wait_job(client, job_id, 120)
    assert job["status"] == "cancelled" and job["registry_ref"] is None
    assert job["progress"]["step"] < 2000
    assert [r[0] for r in client.predict(api_name="/list_adapters")["data"]] == ["contracts@v1"]
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="already ended"):
        client.predict(job_id, api_name="/cancel_job")


# ---- Datasets ----------------------------------------------------------------------------------------------


def test_datasets_register_preview_versions_delete(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    msg, table, ref = client.predict(handle_file(str(write_jsonl(tmp_path / "terms.jsonl", 10))), "terms", 0.2,
                                     None, api_name="/register_dataset")
    assert ref == "terms@v1" and "Registered **terms@v1**: 8 train / 2 held-out rows" in msg
    assert "terms@v1" in [r[0] for r in table["data"]]
    msg, _, ref2 = client.predict(handle_file(str(write_jsonl(tmp_path / "terms.jsonl", 10))), "terms", 0.2, None,
                                  api_name="/register_dataset")
    assert ref2 == "terms@v1" and "already registered" in msg  # same content, same version
    preview = client.predict("terms@v1", 3, api_name="/preview_dataset")
    assert preview["stats"]["rows"] == {"train": 8, "eval": 2} and len(preview["rows"]) == 3
    assert preview["rows"][0][0] == {"role": "user", "content": "Define term 0."}
    assert [v["dataset"] for v in client.predict("terms", api_name="/dataset_versions")] == ["terms@v1"]
    with pytest.raises(AppError, match="tick 'I understand'"):
        client.predict("terms@v1", False, api_name="/delete_dataset")
    msg, table = client.predict("terms@v1", True, api_name="/delete_dataset")
    assert "Deleted terms@v1" in msg and "terms@v1" not in [r[0] for r in table["data"]]
    with pytest.raises(AppError, match="no dataset 'terms@v1'"):
        client.predict("terms@v1", True, api_name="/delete_dataset")


# ---- Registry ----------------------------------------------------------------------------------------------


def test_registry_details_promote_rollback_push_pull_diff(app, client, tmp_path):
    from gradio_client.exceptions import AppError

    ref = app["ref"]
    details = json.loads(client.predict(ref, api_name="/adapter_details"))
    assert details["lineage"]["base"]["id"] == "tiny-moe"
    assert details["lineage"]["dataset"]["ref"] == "contracts@v1"
    assert "eval_loss" in details["lineage"]["metrics"]
    assert "now points at **contracts@v1**" in client.predict(ref, "prod", api_name="/promote")
    with pytest.raises(AppError, match="no earlier target to roll back to"):
        client.predict("contracts", "prod", api_name="/rollback")
    with pytest.raises(AppError, match="no alias or version named 'nope'"):
        client.predict("contracts@nope", "prod", api_name="/promote")
    remote = tmp_path / "remote"
    msg, remotes_md, _ = client.predict("origin", remote.as_uri(), True, api_name="/add_remote")
    assert "Remote **origin** added" in msg and "origin" in remotes_md
    assert "Pushed **contracts@v1** to origin" in client.predict("contracts@prod", "origin", api_name="/push")
    assert any(remote.rglob("*"))
    msg, _ = client.predict("contracts@v1", "origin", api_name="/pull")
    assert "Pulled **contracts@v1**" in msg
    head, diff = client.predict(ref, "contracts@prod", api_name="/diff")
    assert "do not differ" in head and diff["data"] in ([], [["", "", "", "", ""]])


# ---- Playground --------------------------------------------------------------------------------------------


def test_playground_streams_and_hot_swaps_adapters(app, client):
    from gradio_client.exceptions import AppError

    job = client.submit("Define term 1.", [], app["ref"], "", 0.0, 1.0, 12, 0, api_name="/chat")
    updates = list(job)
    history, status = job.outputs()[-1]
    assert len(updates) >= 3  # streamed: several partial histories before the final one
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"]
    assert re.search(r"contracts@v1 · \d+ tokens in [\d.]+s .* finish: (stop|length)", status), status
    history, status = client.predict("And term 2?", history, "base", "Be brief.", 0.0, 1.0, 8, 0, api_name="/chat")
    assert len(history) == 4 and re.search(r"base tiny-moe · \d+ tokens", status), status
    history, status = client.predict("And term 3?", history, app["ref"], "", 0.7, 0.9, 8, 3, api_name="/chat")
    assert len(history) == 6 and "contracts@v1" in status
    stats = client.predict(api_name="/engine_stats")
    assert stats["base"] == "tiny-moe" and app["ref"] in stats["resident"]
    assert stats["adapter_loads"] == 1  # swapped in once and kept resident; the base was never reloaded
    with pytest.raises(AppError, match="no adapters registered for domain 'law'"):
        client.predict("hi", [], "law@v1", "", 0.0, 1.0, 8, 0, api_name="/chat")
    with pytest.raises(AppError, match="type a message first"):
        client.predict("  ", [], "base", "", 0.0, 1.0, 8, 0, api_name="/chat")
    with pytest.raises(AppError, match="greater than maximum value 2"):  # Gradio checks the slider's range
        client.predict("hi", [], "base", "", 5.0, 1.0, 8, 0, api_name="/chat")


# ---- Compare -----------------------------------------------------------------------------------------------


def test_compare_generates_side_by_side_and_reports_metrics(app, client):
    from gradio_client.exceptions import AppError

    out = client.predict(True, [app["ref"]], "Held-out prompts of the dataset", "contracts@v1", 2, "", 10, 0.0, 0,
                         api_name="/compare_generate")
    prompts_md, panes, status = out[0], out[1:6], out[6]  # panes are updates: value, label (the model), visible
    assert "Define term" in prompts_md and "2 models × 2 prompts generated" in status
    assert [p["visible"] for p in panes] == [True, True, False, False, False]
    assert panes[0]["label"].startswith("base (tiny-moe)") and panes[1]["label"].startswith("contracts@v1")
    assert all(p["value"].startswith("[1] ") and "\n\n[2] " in p["value"] for p in panes[:2])
    typed = client.predict(False, [app["ref"]], "My prompts", None, 1, "What is a contract?\nDefine tort.", 6,
                           0.0, 0, api_name="/compare_generate")
    assert "1 models × 2 prompts" in typed[6] and typed[1]["label"].startswith("contracts@v1")
    assert "1. What is a contract?" in typed[0] and "2. Define tort." in typed[0]
    verdict, table, loss_plot, usage_plot, drift_plot, report = client.predict(
        True, [app["ref"]], "contracts@v1", 8, 2, 8, False, True, api_name="/compare_metrics")
    assert [r[0] for r in table["data"]] == ["base", "contracts@v1"]
    assert table["headers"][:3] == ["model", "held-out loss", "perplexity"]
    assert "contracts@v1" in verdict and "Recorded in the adapter registry: contracts@v1" in verdict
    assert loss_plot and usage_plot and drift_plot  # the eval module's figures
    assert "# Evaluation of base, contracts@v1" in report
    history = json.loads(client.predict(app["ref"], api_name="/adapter_details"))["metrics_history"]
    assert any(e["source"] == "eval" for e in history)
    with pytest.raises(AppError, match="pick at most 4 adapters"):
        client.predict(True, [app["ref"]] * 5 + ["x@v1"], "My prompts", None, 1, "hi", 4, 0.0, 0,
                       api_name="/compare_generate")


# ---- options -----------------------------------------------------------------------------------------------


def test_auth_option_is_checked(monkeypatch, capsys):
    from studio.ui.app import main, parse_auth

    assert parse_auth("ann:pw1, bob:pw:2") == [("ann", "pw1"), ("bob", "pw:2")]
    assert parse_auth(None) is None
    assert main(["--auth", "annpw"]) == 2
    assert "must be user:password" in capsys.readouterr().err
    monkeypatch.setenv("STUDIO_UI_AUTH", ":pw")
    assert main([]) == 2


def test_jobs_queue_and_report_worker_errors(tmp_path):
    """One job runs at a time, the next waits; a job that fails in its worker carries the studio error."""
    from studio.train import TrainConfig
    from studio.ui.jobs import JobManager

    jobs = JobManager(tmp_path / "jobs", max_running=1,
                      env={"STUDIO_DATASETS_ROOT": str(tmp_path / "ds"), "STUDIO_ADAPTERS_ROOT": str(tmp_path / "ad")})
    first = jobs.submit(TrainConfig(dataset="no-such-dataset", max_steps=2))
    second = jobs.submit(TrainConfig(dataset="law", max_steps=2))
    assert first.status == "running" and second.status == "queued" and jobs.queue_position(second.id) == 1
    assert jobs.cancel(second.id).status == "cancelled"
    deadline = time.time() + 120
    while jobs.get(first.id).active and time.time() < deadline:
        time.sleep(0.5)
        jobs.refresh()
    failed = jobs.get(first.id)
    assert failed.status == "failed" and "no dataset 'no-such-dataset'" in failed.error, failed
    assert "error: no dataset 'no-such-dataset'" in failed.log_tail()
    assert not (tmp_path / "ad").exists() or not any((tmp_path / "ad").rglob("*.safetensors"))
    assert jobs.get(second.id).started is None  # never ran


def test_jobs_root_follows_the_environment(monkeypatch, tmp_path):
    from studio.ui.jobs import jobs_root

    monkeypatch.setenv("STUDIO_JOBS_ROOT", str(tmp_path / "j"))
    assert jobs_root() == tmp_path / "j"
    monkeypatch.delenv("STUDIO_JOBS_ROOT")
    assert jobs_root().parts[-2:] == ("runs", "ui-jobs")


def test_login_and_upload_limit_options(tmp_path):
    from gradio_client import Client, handle_file

    with serve_app(tmp_path, "--auth", "ann:secret", "--max-file-size", "1kb") as (url, _):
        assert httpx.get(url + "/gradio_api/info", timeout=10).status_code in (401, 403)
        with pytest.raises(Exception):
            Client(url, auth=("ann", "wrong"), verbose=False)
        c = Client(url, auth=("ann", "secret"), verbose=False)
        assert "LoRA plan" in c.predict(api_name="/plan")["plan"]
        report, _, _ = c.predict(handle_file(str(write_jsonl(tmp_path / "small.jsonl", 4))), api_name="/inspect_file")
        assert "`alpaca`" in report  # 4 rows fit in 1 kB
        with pytest.raises(ValueError, match="exceeds the maximum file size of 1024 bytes"):
            c.predict(handle_file(str(write_jsonl(tmp_path / "big.jsonl", 40))), api_name="/inspect_file")


def test_defaults_are_local_only():
    import argparse

    from studio.ui.app import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.host == "127.0.0.1" and args.auth is None and args.base == "tiny-moe"


def test_registry_export_action(app, client, tmp_path):
    """The Registry tab's Export action runs studio.export on the selected version (per-expert and merged)."""
    from gradio_client.exceptions import AppError

    out = tmp_path / "per-expert"
    msg = client.predict(app["ref"], "per-expert", str(out), "fp32", api_name="/export_adapter")
    assert f"Exported **{app['ref']}** as per-expert" in msg and "export_manifest.json" in msg
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    merged = client.predict(app["ref"], "merged", str(tmp_path / "merged"), "bf16", api_name="/export_adapter")
    assert "as merged" in merged and "4bit quantized base" in merged  # the app trains on a 4-bit base
    with pytest.raises(AppError, match="already exists"):
        client.predict(app["ref"], "peft", str(out), "fp32", api_name="/export_adapter")
