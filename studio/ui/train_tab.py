"""The Train and Jobs tabs: pick or upload data, choose base / quantization / LoRA targets (plan and memory estimate
shown), start a background training job and watch it (progress, loss plot, tokens/s, ETA, log); cancel it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from studio.data.registry import sanitise_name, token_counts
from studio.errors import DatasetError
from studio.train import TrainConfig
from studio.ui.common import (chat_preview, duration, fmt_number, frame, markdown_table, progress_bar, status,
                              user_errors, when)

UPLOAD, REGISTERED = "Upload a file", "Registered dataset"
TARGET_PRESETS = ["attention,experts", "attention", "experts", "shared_experts", "all", "full"]
QUANTS = ["4bit", "8bit", "none"]
SELECTIONS = ["all", "token:0.2", "gate:0.1", "top:2", "random:token:0.2"]
FILE_TYPES = [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq", ".txt", ".md"]
TOKEN_STATS_ROWS = 2000  # token statistics of an upload read at most this many rows (keeps big files quick)
JOB_COLUMNS = ["job", "status", "dataset", "base", "steps", "adapter", "started", "duration", "note"]


def base_choices() -> list[str]:
    from studio.models.resolve import known_configs
    from studio.models.tiny import EMBEDDED

    return list(EMBEDDED) + known_configs()


def dataset_choices(ctx) -> list[str]:
    """Registered versions, newest first per name, plus shipped samples not registered yet (they are on first use)."""
    versions = ctx.datasets.list()
    refs = [v.ref for v in sorted(versions, key=lambda v: (v.name, -v.number))]
    names = {v.name for v in versions}
    samples = [s["name"] for s in ctx.datasets.shipped_samples() if s["name"] not in names]
    return refs + samples


# ---------------------------------------------------------------------------------------------------------------
# data


def uploaded_name(message: str, path) -> str:
    """Errors name the file; for an upload that is Gradio's temporary copy, so show the name the user knows."""
    return message.replace(str(path), Path(path).name) if path else message


@contextlib.contextmanager
def friendly_paths(*paths):
    try:
        yield
    except DatasetError as exc:
        msg = str(exc)
        for p in paths:
            msg = uploaded_name(msg, p)
        raise DatasetError(msg) from exc


def _stats_markdown(fmt: str, file_format: str | None, rows: dict, dropped: dict, tokens: dict | None,
                    note: str = "") -> str:
    dropped_txt = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(dropped.items())) or "none"
    lines = [f"**Detected format:** `{fmt}`" + (f" ({file_format} file)" if file_format else ""),
             f"**Rows:** " + ", ".join(f"{k} {v:,}" for k, v in rows.items()) + f" · **dropped:** {dropped_txt}"]
    if tokens:
        table = [[split, fmt_number(t["min"]), fmt_number(t["median"]), fmt_number(t["max"]), fmt_number(t["total"])]
                 for split, t in tokens.items()]
        lines += ["", markdown_table(table, ["tokens / example", "min", "median", "max", "total"])]
    if note:
        lines += ["", f"<small>{note}</small>"]
    return "\n".join(lines)


@user_errors
def inspect_upload(ctx, file: str | None):
    """Detected format, statistics, preview and errors of an uploaded file, without registering it.
    Returns (report markdown, preview table, suggested dataset name)."""
    from studio.data import inspect_file, load_file
    from studio.models.tokenizer import load_tokenizer

    if not file:
        return status("info", "Upload a JSONL, JSON, CSV, Parquet or TXT file to see its format and a preview."), \
            chat_preview([]), ""
    path = Path(file)
    info = inspect_file(path, n=5, max_bytes=ctx.datasets.max_bytes)
    name = sanitise_name(path.stem)
    if info["errors"]:
        msg = "\n\n".join(status("error", uploaded_name(e, path)) for e in info["errors"])
        return f"**This file cannot be used:**\n\n{msg}", chat_preview([]), name
    rows = load_file(path, max_bytes=ctx.datasets.max_bytes).rows[:TOKEN_STATS_ROWS]
    counts = token_counts(rows, load_tokenizer())
    tokens = {"all": {"min": min(counts), "median": sorted(counts)[len(counts) // 2], "max": max(counts),
                      "total": sum(counts)}}
    note = (f"token counts of the first {len(rows):,} rows" if info["rows"] > len(rows) else "") + \
        " (tiny-moe tokenizer, chat template applied). Not registered yet: it is registered when training starts " \
        "or from the Datasets tab."
    md = status("ok", f"`{path.name}` looks good.") + "\n\n" + \
        _stats_markdown(info["format"], info["file_format"], {"usable": info["rows"]}, info["dropped"], tokens,
                        note.strip())
    return md, chat_preview(info["preview"]), name


@user_errors
def registered_info(ctx, ref: str | None):
    """Statistics and a preview of a registered dataset version (shipped samples are registered on first use)."""
    if not ref:
        return status("info", "Pick a registered dataset."), chat_preview([])
    stats = ctx.datasets.stats(ref)
    md = f"**{stats['ref']}** · sha256 `{stats['hash'][:12]}`\n\n" + _stats_markdown(
        stats["format"], None, stats["rows"], stats["dropped"], stats["tokens"], "tiny-moe tokenizer, chat template")
    return md, chat_preview(ctx.datasets.preview(ref, 5))


# ---------------------------------------------------------------------------------------------------------------
# plan and memory estimate


@user_errors
def plan_estimate(ctx, base: str, quant: str, targets: str, r: float, alpha: float, seq_len: float,
                  batch_size: float):
    """The LoRA plan and memory estimates (the chosen quantization vs QLoRA 4-bit vs 16-bit LoRA), computed the way
    `python -m studio.finetune --dry-run` does, without loading weights. Returns (plan text, summary, bar data)."""
    from studio.finetune import plan_and_estimate
    from studio.models.memory import GiB, human_bytes
    from studio.moe.plan import trainable_line

    cfg = TrainConfig(base=base, quant=quant, targets=targets, r=int(r), alpha=float(alpha), seq_len=int(seq_len),
                      batch_size=int(batch_size))
    plan, estimates = plan_and_estimate(cfg)
    bars = []
    for e in estimates:
        # the fixed runtime overhead (CUDA context, allocator slack: the same in every bar, and on a small base the
        # whole bar) is stated in the summary instead of drawn, so the bars compare what the setups change
        parts = {"frozen base weights": e.base_weight_bytes,
                 "LoRA + gradients + AdamW": e.lora_weight_bytes + e.lora_grad_bytes + e.optimizer_bytes,
                 "activations + logits": e.activation_bytes + e.logits_bytes,
                 "dequant workspace": e.workspace_bytes}
        bars += [{"setup": e.label, "part": k, "GiB": v / GiB} for k, v in parts.items() if v > 0]
    chosen = estimates[0]
    verdict = "fits in" if chosen.fits() else "does **not** fit in"
    summary = (f"**{chosen.label}:** about **{human_bytes(chosen.total_bytes)}** peak (±20%), {verdict} the "
               f"{human_bytes(chosen.device_bytes or 0)} of {chosen.device_name}. "
               f"{_first_upper(trainable_line(plan.trainable_params, plan.total_params))}.")
    others = ", ".join(f"{e.label} {human_bytes(e.total_bytes)}" for e in estimates[1:])
    if others:
        summary += f" Compare: {others}."
    summary += (f" Totals include {human_bytes(chosen.overhead_bytes)} of fixed runtime overhead, not drawn in the "
                "chart.")
    for e in estimates:
        summary += "".join(f"\n\n{status('warn', w)}" for w in e.warnings)
    return plan.format(), summary, pd.DataFrame(bars, columns=["setup", "part", "GiB"])


@user_errors
def profile_preview(ctx, source: str, dataset_ref: str | None, base: str, quant: str, seq_len: float,
                    selection: str, seed: float):
    """The routing profile of the picked dataset's training split on the base (cached by base fingerprint + dataset
    hash, the one the trainer reads) and the experts `selection` would train. Returns (heatmap figure, markdown)."""
    from studio.experts.profile import plot_profile, profile_experts
    from studio.experts.selection import parse_selection, select_experts
    from studio.models.loading import QuantSpec

    sel = parse_selection(selection or "all")
    if source == UPLOAD or not dataset_ref:
        raise DatasetError("pick a registered dataset to profile (an uploaded file is registered when training "
                           "starts; profile it afterwards from the Registered dataset list)")
    prof = profile_experts(base, dataset_ref, "train", QuantSpec(quant), seq_len=int(seq_len), log=lambda *_: None)
    chosen = None if sel.is_all else select_experts(prof, sel, seed=int(seed or 0))
    total = prof.num_experts * len(prof.layers)
    picked = sum(len(v) for v in chosen.values()) if chosen else total
    text = (f"Routing of **{prof.dataset}** ({prof.examples} training examples, {prof.tokens:,} tokens) through "
            f"{base}: **{sel.spec}** trains LoRA on **{picked} of {total}** routed experts"
            + (" (outlined)." if chosen else ".") + (" From the cache." if prof.from_cache else ""))
    return plot_profile(prof, chosen), text


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------------------------------------
# jobs


@user_errors
def start_training(ctx, source: str, file: str | None, name: str, eval_ratio: float, dataset_ref: str | None,
                   base: str, quant: str, targets: str, r: float, alpha: float, learning_rate: float,
                   steps: float, batch_size: float, seq_len: float, eval_steps: float, seed: float,
                   expert_selection: str = "all"):
    """Register the uploaded file (or use the picked dataset), then queue a training job in a worker process.
    Returns (job id, status). Bad input raises before anything is registered or queued."""
    for label, value in (("steps", steps), ("batch size", batch_size), ("sequence length", seq_len),
                         ("rank", r)):
        if value is None or int(value) < 1 or int(value) != value:
            raise DatasetError(f"{label} must be a positive whole number, got {value!r}")
    cfg = TrainConfig(base=base, dataset="?", quant=quant, targets=targets, r=int(r), alpha=float(alpha),
                      learning_rate=float(learning_rate), max_steps=int(steps), batch_size=int(batch_size),
                      seq_len=int(seq_len), eval_steps=auto_eval_steps(eval_steps, steps), seed=int(seed or 0),
                      save_steps=max(int(steps), 1), logging_steps=max(1, min(10, int(steps) // 20 or 1)),
                      expert_selection=(expert_selection or "all").strip())
    from studio.experts.selection import parse_selection
    from studio.moe.plan import build_plan

    parse_selection(cfg.expert_selection)  # a bad selection fails here, before registering

    # rank / alpha, an unknown or non-MoE base and targets that match nothing fail here, before registering
    from studio.finetune import meta_parts

    _, model, arch, comps = meta_parts(base)
    build_plan(model, arch, comps, cfg.targets, cfg.lora_settings())
    if source == UPLOAD:
        if not file:
            raise DatasetError("no file uploaded: drop a JSONL, JSON, CSV, Parquet or TXT file, or pick a "
                               "registered dataset")
        with friendly_paths(file):
            version = ctx.datasets.add(file, (name or "").strip() or sanitise_name(Path(file).stem),
                                       eval_ratio=float(eval_ratio))
    else:
        if not dataset_ref:
            raise DatasetError("no dataset picked: choose a registered dataset or upload a file")
        version = ctx.datasets.get(dataset_ref)
    cfg = dataclasses.replace(cfg, dataset=version.ref, domain=version.name)
    job = ctx.jobs.submit(cfg)
    where = "started" if job.status != "queued" else f"queued (position {ctx.jobs.queue_position(job.id)})"
    return job.id, status("busy", f"Job `{job.id}` {where}: training {base} ({quant}) on **{version.ref}** "
                                  f"for {int(steps)} steps.")


def auto_eval_steps(eval_steps, steps) -> int:
    """0 (the default) evaluates five times over the run, so a short run still draws a held-out line (a fixed 25
    gave a 10-step run just its start and end points)."""
    n = int(eval_steps or 0)
    return n if n > 0 else max(1, int(steps) // 5)


def _loss_frame(progress: dict) -> pd.DataFrame | None:
    """Plot data, or None before the first point: Gradio's native plots given an empty frame and no fixed height
    grow without bound (a 33-million-pixel page), and a fixed height clips their legend."""
    rows = [{"step": s, "loss": v, "series": "train loss"} for s, v in progress["loss"]]
    rows += [{"step": s, "loss": v, "series": "held-out loss"} for s, v in progress["eval_loss"]]
    return pd.DataFrame(rows, columns=["step", "loss", "series"]) if rows else None


def _result_markdown(job) -> str:
    m = job.metrics or {}
    loss = ""
    if "eval_loss_before" in m and "eval_loss" in m:
        loss = (f" Held-out loss **{m['eval_loss_before']:.4f} → {m['eval_loss']:.4f}** "
                f"(perplexity {m.get('eval_perplexity', float('nan')):.2f}).")
    if job.status == "done" and job.registry_ref:
        return status("ok", f"Registered **{job.registry_ref}** in the adapter registry.{loss}")
    if job.status == "done":
        return status("ok", f"Finished; the adapter is in `{job.run_dir / 'adapter'}`.{loss}")
    if job.status == "cancelled" and job.registry_ref:
        return status("ok", f"Cancelled at step {job.progress()['step']}; its saved adapter is registered as "
                            f"**{job.registry_ref}**.")
    if job.status == "cancelled":
        where = (f"the adapter of its last step is saved in `{job.run_dir / 'adapter'}` but not registered: "
                 "register it or discard it" if _saved_adapter(job) else "no adapter was kept")
        return status("warn", f"Cancelled at step {job.progress()['step']}; {where}.")
    if job.status == "failed":
        return status("error", f"Failed: {job.error}")
    return ""


@user_errors
def job_status(ctx, job_id: str):
    """The state of one job: (progress bar html, status markdown, loss plot data, log tail, result markdown,
    registered ref or "")."""
    if not job_id:
        return (progress_bar(0, "no job yet", "idle"), status("info", "No training job yet: set up a run above "
                "and press Start."), _loss_frame({"loss": [], "eval_loss": []}), "", "", "")
    ctx.jobs.refresh()
    job = ctx.jobs.get(job_id)
    p = job.progress()
    steps = f"step {p['step']}/{p['max_steps']}" if p["max_steps"] else f"step {p['step']}"
    bar = progress_bar(p["fraction"], f"{steps} · {p['phase']}", job.status)
    facts = [f"**{job.status}**", p["phase"], steps]
    if p["loss"]:
        facts.append(f"loss {p['loss'][-1][1]:.4f}")
    if p["eval_loss"]:
        facts.append(f"held-out {p['eval_loss'][-1][1]:.4f}")
    if p["tokens_per_s"] is not None and job.active:
        facts.append(f"{p['tokens_per_s']:,.0f} tokens/s")
    if p["eta_s"] is not None and job.active:
        facts.append(f"ETA {duration(p['eta_s'])}")
    elapsed = (job.finished or time.time()) - job.started if job.started else None
    facts.append(f"elapsed {duration(elapsed)}")
    if job.status == "queued":
        facts.append(f"queue position {ctx.jobs.queue_position(job.id)}")
    head = f"Job `{job.id}` · {job.dataset} on {job.config.get('base')} ({job.config.get('quant')})"
    return (bar, head + "\n\n" + " · ".join(facts), _loss_frame(p), job.log_tail(), _result_markdown(job),
            job.registry_ref if job.status == "done" and job.registry_ref else "")


@user_errors
def cancel_job(ctx, job_id: str):
    """Ask a job to stop (after the current step, with a checkpoint); a second cancel terminates the worker."""
    job = ctx.jobs.cancel(job_id)
    if job.status == "cancelling":
        return status("busy", f"Cancelling `{job.id}`: it stops after the current step and saves a checkpoint. "
                              "Press Cancel again to terminate it at once.")
    return status("warn", f"`{job.id}` is {job.status}.")


@user_errors
def list_jobs(ctx):
    """Every job, newest first, as a table."""
    ctx.jobs.refresh()
    rows = []
    for j in ctx.jobs.list():
        p = j.progress() if j.status != "queued" else {"step": 0, "max_steps": j.config.get("max_steps")}
        end = j.finished or (time.time() if j.active else None)
        rows.append({"job": j.id, "status": j.status, "dataset": j.dataset, "base": j.config.get("base"),
                     "steps": f"{p['step']}/{p['max_steps']}", "adapter": j.registry_ref or "",
                     "started": when(j.started), "duration": duration(end - j.started if j.started and end else None),
                     "note": (j.error or "")[:120]})
    return frame(rows, JOB_COLUMNS)


def latest_job_id(ctx) -> str:
    jobs = ctx.jobs.list()
    active = [j for j in jobs if j.active]
    return (active or jobs)[0].id if jobs else ""


# ---------------------------------------------------------------------------------------------------------------
# layout


def build(ctx) -> SimpleNamespace:
    ui = SimpleNamespace(apis=[])
    with gr.Tab("Train", id="train"):
        gr.Markdown("Fine-tune a LoRA adapter on a quantized MoE base. Training runs in a background worker "
                    "process: you can reload the page, browse other tabs, or start more jobs (they queue).")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                gr.Markdown("### 1 · Data")
                ui.source = gr.Radio([UPLOAD, REGISTERED], value=REGISTERED, label="Training data",
                                     elem_id="train-source")
                with gr.Group(visible=False) as ui.upload_group:
                    ui.file = gr.File(label="Dataset file (JSONL, JSON, CSV, Parquet, TXT)", file_types=FILE_TYPES,
                                      elem_id="train-file", height=120)
                    with gr.Row():
                        ui.name = gr.Textbox(label="Register as", placeholder="dataset name", elem_id="train-name",
                                             scale=2)
                        ui.eval_ratio = gr.Slider(0.0, 0.5, value=0.1, step=0.05, label="Held-out share", scale=1)
                choices = dataset_choices(ctx)
                ui.dataset = gr.Dropdown(choices, value=choices[0] if choices else None, label="Registered dataset",
                                         elem_id="train-dataset", allow_custom_value=True)
                ui.data_info = gr.Markdown(elem_id="train-data-info")
                ui.preview = gr.Dataframe(chat_preview([]), label="Preview (normalised to chat messages)", wrap=True,
                                          max_height=360, interactive=False, elem_id="train-preview",
                                          elem_classes=["studio-table"],
                                          column_widths=["6%", "10%", "18%", "30%", "36%"])
            with gr.Column(scale=1):
                gr.Markdown("### 2 · Base model and LoRA")
                with gr.Row():
                    ui.base = gr.Dropdown(base_choices(), value="tiny-moe", label="Base model",
                                          allow_custom_value=True, scale=2, elem_id="train-base",
                                          info="embedded name, hub id (local cache) or a local directory")
                    ui.quant = gr.Radio(QUANTS, value="4bit", label="Quantization (experts included)", scale=2)
                ui.targets = gr.Dropdown(TARGET_PRESETS, value="attention,experts", label="LoRA targets",
                                         allow_custom_value=True,
                                         info="preset, or names such as q_proj,gate_up_proj")
                with gr.Row():
                    ui.r = gr.Number(16, label="Rank r", precision=0, minimum=1)
                    ui.alpha = gr.Number(32, label="Alpha", minimum=0.0001)
                    ui.lr = gr.Number(3e-3, label="Learning rate", minimum=0)
                    ui.steps = gr.Number(50, label="Steps", precision=0, minimum=1, elem_id="train-steps")
                with gr.Accordion("More settings", open=False):
                    with gr.Row():
                        ui.batch_size = gr.Number(4, label="Batch size", precision=0, minimum=1)
                        ui.seq_len = gr.Number(256, label="Sequence length", precision=0, minimum=16)
                        ui.eval_steps = gr.Number(0, label="Held-out eval every N steps (0: auto, 5 points)",
                                                  precision=0, minimum=0)
                        ui.seed = gr.Number(42, label="Seed", precision=0)
                with gr.Accordion("Expert selection (ESFT): adapt only the experts the data routes to", open=False):
                    with gr.Row():
                        ui.expert_selection = gr.Dropdown(
                            SELECTIONS, value="all", label="Experts that get LoRA", allow_custom_value=True, scale=3,
                            elem_id="train-expert-selection",
                            info="token:P / gate:P: the fewest experts reaching share P of the layer's tokens / "
                                 "gate score; top:K; random:<spec> as a control")
                        ui.profile_button = gr.Button("Profile the dataset", scale=1, elem_id="train-profile")
                    ui.profile_text = gr.Markdown(elem_id="train-profile-text")
                    ui.profile_plot = gr.Plot(label="Routing profile (token share, mean gate)",
                                              elem_id="train-profile-plot")
                ui.plan_summary = gr.Markdown(elem_id="train-plan-summary")
                # no fixed height: Gradio clips the colour legend of a plot given one
                ui.memory_plot = gr.BarPlot(x="setup", y="GiB", color="part",
                                            label="Estimated peak memory (without the fixed runtime overhead)",
                                            color_title="", sort=None, elem_id="train-memory-plot")
                with gr.Accordion("LoRA plan", open=False):
                    ui.plan = gr.Code(label="What gets LoRA", language=None, elem_id="train-plan")
        gr.Markdown("### 3 · Run")
        with gr.Row():
            ui.start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=3)
            # red and clickable only while the watched job runs (the monitor switches it)
            ui.cancel = gr.Button("Cancel", variant="secondary", interactive=False, elem_id="train-cancel", scale=1)
        ui.start_status = gr.Markdown(elem_id="train-start-status")
        ui.new_job = gr.Textbox(visible=False)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                ui.job_id = gr.Textbox(label="Job", interactive=False, elem_id="train-job-id", max_lines=1)
                ui.bar = gr.HTML(progress_bar(0, "no job yet", "idle"), elem_id="train-progress")
                ui.job_facts = gr.Markdown(elem_id="train-job-facts")
                ui.result = gr.Markdown(elem_id="train-result")
                with gr.Row():
                    ui.new_ref = gr.Textbox(visible=False)
                    ui.to_compare = gr.Button("Compare with the base", visible=False, variant="primary",
                                              elem_id="train-to-compare", scale=2, min_width=280)
                    ui.to_registry = gr.Button("Show in Registry", visible=False, elem_id="train-to-registry",
                                               scale=1, min_width=150)
                with gr.Row():  # a cancelled job's saved adapter: keep it as a version, or delete it
                    ui.register_saved = gr.Button("Register the saved adapter", visible=False, size="sm",
                                                  elem_id="train-register-saved")
                    ui.discard_saved = gr.Button("Discard it", visible=False, size="sm", variant="stop",
                                                 elem_id="train-discard-saved")
            with gr.Column(scale=4):
                ui.loss_plot = gr.LinePlot(x="step", y="loss", color="series", label="Loss", color_title="",
                                           elem_id="train-loss-plot")
        with gr.Accordion("Worker log", open=False):
            ui.log = gr.Code(label="log (last lines)", language=None, elem_id="train-log", max_lines=30)
        ui.timer = gr.Timer(1.0, active=False)
        ui.remember = gr.BrowserState("", storage_key="studio-current-job")

    with gr.Tab("Jobs", id="jobs") as ui.jobs_tab:
        gr.Markdown("Every training job with its status; jobs and their logs are kept on disk and survive page "
                    "reloads and app restarts. Click a row to watch it in the Train tab.")
        with gr.Row():
            ui.jobs_refresh = gr.Button("Refresh", size="sm", elem_id="jobs-refresh", scale=0, min_width=100)
        ui.jobs_table = gr.Dataframe(functools.partial(list_jobs, ctx), interactive=False, wrap=True,
                                     elem_id="jobs-table", elem_classes=["studio-table"])  # re-read on every page load
        ui.jobs_timer = gr.Timer(3.0)
    _wire(ctx, ui)
    return ui


def _wire(ctx, ui) -> None:
    c = functools.partial
    ui.source.change(lambda s: (gr.update(visible=s == UPLOAD), gr.update(visible=s == REGISTERED)),
                     ui.source, [ui.upload_group, ui.dataset], api_visibility="private")
    ui.file.change(c(inspect_upload, ctx), ui.file, [ui.data_info, ui.preview, ui.name], api_name="inspect_file")
    ui.dataset.change(c(_dataset_inline, ctx), ui.dataset, [ui.data_info, ui.preview], api_visibility="private")
    plan_inputs = [ui.base, ui.quant, ui.targets, ui.r, ui.alpha, ui.seq_len, ui.batch_size]
    plan_outputs = [ui.plan, ui.plan_summary, ui.memory_plot]
    for comp in plan_inputs:
        comp.change(c(_plan_inline, ctx), plan_inputs, plan_outputs, api_visibility="private",
                    trigger_mode="always_last", show_progress="hidden")

    @user_errors
    def plan(base: str = "tiny-moe", quant: str = "4bit", targets: str = "attention,experts", r: int = 16,
             alpha: float = 32.0, seq_len: int = 256, batch_size: int = 4) -> dict:
        """The LoRA plan and memory estimates as data (raises on a bad base or targets)."""
        text, summary, bars = plan_estimate(ctx, base, quant, targets, r, alpha, seq_len, batch_size)
        return {"plan": text, "summary": summary, "memory_gib": bars.to_dict(orient="records")}

    ui.apis.append((plan, "plan"))

    monitor_outputs = [ui.bar, ui.job_facts, ui.loss_plot, ui.log, ui.result, ui.new_ref]
    start_inputs = [ui.source, ui.file, ui.name, ui.eval_ratio, ui.dataset, ui.base, ui.quant, ui.targets, ui.r,
                    ui.alpha, ui.lr, ui.steps, ui.batch_size, ui.seq_len, ui.eval_steps, ui.seed, ui.expert_selection]
    # the new id goes through a hidden box, so a refused start marks only the status line, not the monitor
    started = ui.start.click(c(start_training, ctx), start_inputs, [ui.new_job, ui.start_status],
                             api_name="start_training", concurrency_limit=1)
    started.success(lambda j: j, ui.new_job, ui.job_id, api_visibility="private")
    started.success(c(_after_start, ctx), [ui.source, ui.new_job], [ui.data_info, ui.dataset],
                    api_visibility="private", show_progress="hidden")
    ui.cancel.click(c(cancel_job, ctx), ui.job_id, ui.start_status, api_name="cancel_job")
    ui.profile_button.click(c(profile_preview, ctx),
                            [ui.source, ui.dataset, ui.base, ui.quant, ui.seq_len, ui.expert_selection, ui.seed],
                            [ui.profile_plot, ui.profile_text], api_name="profile_experts", concurrency_limit=1)
    # the job id drives the monitor: remember it in the browser, poll while it runs
    monitor_all = [*monitor_outputs, ui.timer, ui.to_compare, ui.to_registry, ui.start_status, ui.cancel,
                   ui.register_saved, ui.discard_saved]
    ui.job_id.change(lambda j: j, ui.job_id, ui.remember, api_visibility="private") \
        .then(c(_monitor, ctx), ui.job_id, monitor_all, api_visibility="private", show_progress="hidden")
    ui.timer.tick(c(_monitor, ctx), ui.job_id, monitor_all, api_visibility="private", show_progress="hidden")

    @user_errors
    def register_saved(job_id: str):
        ctx.jobs.register_saved(job_id, ctx.adapters)
        return _monitor(ctx, job_id)

    @user_errors
    def discard_saved(job_id: str):
        ctx.jobs.discard_saved(job_id)
        return _monitor(ctx, job_id)

    ui.register_saved.click(register_saved, ui.job_id, monitor_all, api_visibility="private")
    ui.discard_saved.click(discard_saved, ui.job_id, monitor_all, api_visibility="private")

    @user_errors
    def job_info(job_id: str) -> dict:
        """One job as data: status, phase, step / max_steps, losses, tokens/s, ETA, registered ref, error."""
        ctx.jobs.refresh()
        job = ctx.jobs.get(job_id)
        return {**job.to_dict(), "progress": job.progress()}

    ui.apis.append((job_info, "job_status"))

    ui.jobs_refresh.click(c(list_jobs, ctx), None, ui.jobs_table, api_name="list_jobs")
    ui.jobs_timer.tick(c(list_jobs, ctx), None, ui.jobs_table, api_visibility="private", show_progress="hidden")
    ui.jobs_tab.select(c(list_jobs, ctx), None, ui.jobs_table, api_visibility="private", show_progress="hidden")


def _after_start(ctx, source: str, job_id: str):
    """An uploaded file is registered when its job starts: show it as the registered version it now is (no stale
    "not registered yet"), and offer it in the registered-dataset picker."""
    ref = ctx.jobs.get(job_id).dataset
    choices = dataset_choices(ctx)
    if source != UPLOAD:
        return gr.update(), gr.update(choices=choices)
    info, _ = _dataset_inline(ctx, ref)
    return status("ok", f"Registered as **{ref}** (listed in the Datasets tab).") + "\n\n" + info, \
        gr.update(choices=choices, value=ref)


def _plan_inline(ctx, *args):
    """Plan updates while typing: an error is shown in place of the plan instead of a pop-up per keystroke."""
    try:
        return plan_estimate(ctx, *args)
    except gr.Error as exc:
        return "", status("error", exc.message), None  # None, not an empty frame: see _loss_frame


def _monitor(ctx, job_id: str):
    out = job_status(ctx, job_id)
    job = None
    if job_id:
        try:
            job = ctx.jobs.get(job_id)
        except Exception:
            job = None
    active = bool(job and job.active)
    ref = out[-1]
    return (*out, gr.Timer(active=active), gr.update(visible=bool(ref), value=f"Compare {ref} with the base"),
            gr.update(visible=bool(ref)), run_status(job),
            gr.update(variant="stop" if active else "secondary", interactive=active),
            *[gr.update(visible=bool(job and job.status == "cancelled" and not job.registry_ref
                                     and _saved_adapter(job)))] * 2)


def _saved_adapter(job) -> bool:
    return (job.run_dir / "adapter" / "adapter_config.json").is_file()


def run_status(job) -> str:
    """The line under Start / Cancel, kept true as the job moves: started, cancelling, then how it ended."""
    if job is None:
        return ""
    p = job.progress()
    if job.status == "queued":
        return status("busy", f"Job `{job.id}` is queued: it starts when a worker slot is free.")
    if job.status == "running":
        return status("busy", f"Job `{job.id}` is running: training {job.config.get('base')} "
                              f"({job.config.get('quant')}) on **{job.dataset}**.")
    if job.status == "cancelling":
        return status("busy", f"Cancelling `{job.id}`: it stops after the current step and saves a checkpoint. "
                              "Press Cancel again to terminate it at once.")
    if job.status == "done":
        return status("ok", f"Job `{job.id}` finished" + (f": registered **{job.registry_ref}**." if job.registry_ref
                                                          else "."))
    if job.status == "cancelled":
        return status("warn", f"Job `{job.id}` was cancelled at step {p['step']}.")
    return status("error", f"Job `{job.id}` failed: see the result below and the worker log.")


def on_load(ctx, remembered: str):
    """Page (re)load: show the job this browser watched last, else the newest running or finished job."""
    if remembered:
        try:
            ctx.jobs.get(remembered)
            return remembered
        except Exception:
            pass
    return latest_job_id(ctx)


def open_job(evt: gr.SelectData, table):
    """A click in the Jobs table: watch that job in the Train tab."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    return table.iloc[row]["job"], gr.Tabs(selected="train")


def wire_load(demo, ctx, ui) -> None:
    """On page load (one event): fresh dataset choices with the picked one's preview, the plan, and the job this
    browser watched last. Values built into the page are from start-up; everything shown must be current."""
    plan_inputs = [ui.base, ui.quant, ui.targets, ui.r, ui.alpha, ui.seq_len, ui.batch_size]

    def page_load(dataset, remembered, *plan_args):
        choices = dataset_choices(ctx)
        dataset = dataset if dataset in choices else (choices[0] if choices else None)
        return (gr.update(choices=choices, value=dataset), *_dataset_inline(ctx, dataset),
                *_plan_inline(ctx, *plan_args), on_load(ctx, remembered))

    demo.load(page_load, [ui.dataset, ui.remember, *plan_inputs],
              [ui.dataset, ui.data_info, ui.preview, ui.plan, ui.plan_summary, ui.memory_plot, ui.job_id],
              api_visibility="private")


def _dataset_inline(ctx, ref):
    try:
        return registered_info(ctx, ref)
    except gr.Error as exc:
        return status("error", exc.message), chat_preview([])


def warm_up(base: str = "tiny-moe") -> None:
    """Import transformers' lazy classes once in the main thread: its lazy module is not thread-safe, and the page's
    first events (plan, dataset statistics) run concurrently and would otherwise race on the same import."""
    from studio.models.tokenizer import load_tokenizer

    load_tokenizer()
    try:
        from studio.finetune import meta_parts

        meta_parts(base)
    except Exception:  # a bad --base is reported in the page, where the user can change it
        pass
