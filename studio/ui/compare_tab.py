"""The Compare tab: the base and up to four adapters side by side on the same prompts (streamed into one pane per
model, batched together by the engine), then the metric table and plots of studio.eval on held-out data."""

from __future__ import annotations

import functools
import queue
import threading
import time
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from studio.errors import DatasetError, RequestError
from studio.ui.common import status, user_errors
from studio.ui.registry_tab import adapter_refs
from studio.ui.train_tab import dataset_choices

MAX_ADAPTERS = 4
PANES = MAX_ADAPTERS + 1
HELD_OUT, TYPED = "Held-out prompts of the dataset", "My prompts"
METRIC_COLUMNS = [("model", "model", None), ("loss", "held-out loss", ".4f"), ("perplexity", "perplexity", ".4g"),
                  ("loss_vs_base", "Δ loss vs base", "+.4f"), ("examples_better_than_base", "examples better", "%"),
                  ("exact_match", "exact match", "%"), ("rouge_l", "ROUGE-L", ".3f"), ("bleu", "BLEU", ".2f"),
                  ("chrf", "chrF", ".2f"), ("tokens_per_s", "tokens/s", ".1f"), ("latency_s", "latency s", ".3f"),
                  ("routing_entropy", "routing entropy", ".3f"), ("routing_drift", "routing drift", "%")]


def _models(include_base: bool, adapters: list[str] | None) -> list[str | None]:
    adapters = [a for a in (adapters or []) if a]
    if len(adapters) > MAX_ADAPTERS:
        raise RequestError(f"pick at most {MAX_ADAPTERS} adapters (got {len(adapters)})")
    models = ([None] if include_base else []) + list(dict.fromkeys(adapters))
    if not models:
        raise RequestError("nothing to compare: tick the base and/or pick adapters")
    return models


def _prompts(ctx, source: str, dataset: str | None, n: float, typed: str) -> list:
    """Chats to generate from: the first n held-out user turns of the dataset, or the typed lines."""
    if source == TYPED:
        lines = [line.strip() for line in (typed or "").splitlines() if line.strip()]
        if not lines:
            raise RequestError("type at least one prompt (one per line), or use the dataset's held-out prompts")
        return [[{"role": "user", "content": line}] for line in lines[:16]]
    if not dataset:
        raise DatasetError("pick a dataset for the held-out prompts")
    from studio.eval.prompts import reference_pairs

    version = ctx.datasets.get(dataset)
    items = reference_pairs(version.eval_messages())[: int(n)]
    if not items:
        raise DatasetError(f"{version.ref} has no held-out row with a user turn before an answer; type prompts "
                           "instead")
    return [it.prompt for it in items]


def _prompt_text(chat: list[dict]) -> str:
    return next((m["content"] for m in reversed(chat) if m["role"] == "user"), "")


def _pane_text(outputs: list[str], n: int) -> str:
    if n == 1:
        return outputs[0]
    return "\n\n".join(f"[{i + 1}] {o}" for i, o in enumerate(outputs))


@user_errors
def compare_generate(ctx, include_base: bool, adapters: list[str] | None, source: str, dataset: str | None,
                     n_prompts: float, typed: str, max_tokens: float, temperature: float, seed: float):
    """Stream every model's answers to the same prompts into its own pane. Yields (prompts markdown, 5 panes,
    status). All models run at once; the engine batches their rows, adapters differing per row."""
    from studio.engine import SamplingParams

    models = _models(include_base, adapters)
    chats = _prompts(ctx, source, dataset, n_prompts, typed)
    params = SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), seed=int(seed or 0))
    engine = ctx.engine()
    refs = [engine.load(m) for m in models]  # resolve all first: a bad reference fails before any output
    names = [r or f"base ({engine.base_id})" for r in refs]
    outputs = [[""] * len(chats) for _ in refs]
    stats = [{"tokens": 0, "t0": time.perf_counter(), "t1": None} for _ in refs]
    errors: queue.Queue = queue.Queue()

    def run(k: int, ref: str | None):
        try:
            for i, chat in enumerate(chats):
                for chunk in engine.stream(chat, adapter=ref, params=params):
                    outputs[k][i] += chunk.text
                    if chunk.completion is not None:
                        stats[k]["tokens"] += chunk.completion.completion_tokens
        except Exception as exc:  # reported in the page by the generator below
            errors.put(exc)
        finally:
            stats[k]["t1"] = time.perf_counter()

    prompts_md = "**Prompts** (same for every model; " + \
        ("greedy" if params.temperature == 0 else f"temperature {params.temperature}, seed {params.seed}") + \
        f", at most {params.max_tokens} new tokens):\n\n" + \
        "\n".join(f"{i + 1}. {_prompt_text(c)[:300]}" for i, c in enumerate(chats))
    threads = [threading.Thread(target=run, args=(k, r), daemon=True) for k, r in enumerate(refs)]
    for t in threads:
        t.start()

    def panes(final: bool):
        out = []
        for k in range(PANES):
            if k < len(refs):
                st = stats[k]
                label = names[k]
                if final and st["t1"]:
                    label += f" · {st['tokens']} tokens, {st['tokens'] / max(st['t1'] - st['t0'], 1e-9):.0f} tok/s"
                out.append(gr.update(visible=True, label=label, value=_pane_text(outputs[k], len(chats))))
            else:
                out.append(gr.update(visible=False, value=""))
        return out

    while any(t.is_alive() for t in threads):
        yield prompts_md, *panes(False), status("busy", f"Generating with {len(refs)} models in one batch…")
        time.sleep(0.15)
    for t in threads:
        t.join()
    if not errors.empty():
        raise errors.get()
    yield prompts_md, *panes(True), status("ok", f"{len(refs)} models × {len(chats)} prompts generated.")


def _fmt(value, spec):
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if spec == "%":
        return f"{100 * value:.0f}%"
    return format(value, spec) if spec else str(value)


@user_errors
def compare_metrics(ctx, include_base: bool, adapters: list[str] | None, dataset: str | None, examples: float,
                    gen_prompts: float, max_tokens: float, cross_domain: bool, record: bool,
                    progress=gr.Progress()):
    """studio.eval.evaluate on held-out data: returns (verdict markdown, metric table, held-out loss plot,
    expert usage plot, routing drift plot, full report markdown). Adapter results go to the registry if asked."""
    from studio.eval import evaluate, plot_expert_usage, plot_heldout_loss, plot_routing_drift

    models = _models(include_base, adapters)
    if not dataset:
        raise DatasetError("pick the held-out dataset to measure loss and reference metrics on")
    names = ["base"] + [m for m in models if m]
    progress(0.0, desc="loading the base" if not ctx.engine_loaded else "starting")
    report = evaluate(ctx.engine(), models=names, dataset=dataset, domains=None if cross_domain else "none",
                      max_eval_examples=int(examples), gen_prompts=int(gen_prompts), max_new_tokens=int(max_tokens),
                      record=bool(record), registry=ctx.adapters,
                      progress=lambda f, msg: progress(f, desc=msg))
    rows = report.rows()
    table = pd.DataFrame([{label: _fmt(r.get(key), spec) for key, label, spec in METRIC_COLUMNS} for r in rows])
    verdicts = [v["text"] for v in report.verdicts()]
    head = "\n".join(f"- {t}." for t in verdicts) if verdicts else \
        status("info", "Only the base was evaluated: pick adapters to get a verdict.")
    if report.recorded:
        head += "\n\n" + status("ok", "Recorded in the adapter registry: " +
                                ", ".join(r["ref"] for r in report.recorded) + ".")
    if report.notes:
        head += "\n\n" + "\n".join(f"<small>note: {n}</small><br>" for n in report.notes)
    return head, table, plot_heldout_loss(report), plot_expert_usage(report), plot_routing_drift(report), \
        report.markdown()


def build(ctx) -> SimpleNamespace:
    ui = SimpleNamespace(apis=[])
    c = functools.partial
    datasets = dataset_choices(ctx)
    with gr.Tab("Compare", id="compare") as ui.tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                with gr.Row():
                    ui.include_base = gr.Checkbox(True, label="Include the base", scale=1, elem_id="compare-base")
                    ui.adapters = gr.Dropdown(adapter_refs(ctx), multiselect=True, max_choices=MAX_ADAPTERS,
                                              label=f"Adapters (up to {MAX_ADAPTERS})", scale=4,
                                              allow_custom_value=True,  # adapters registered after start-up
                                              elem_id="compare-adapters")
                with gr.Row():
                    ui.dataset = gr.Dropdown(datasets, value=datasets[0] if datasets else None,
                                             label="Held-out data (loss, perplexity, reference answers)",
                                             allow_custom_value=True, elem_id="compare-dataset", scale=3)
                    ui.source = gr.Radio([HELD_OUT, TYPED], value=HELD_OUT, label="Prompts", scale=3)
                    ui.n_prompts = gr.Slider(1, 8, value=3, step=1, label="Held-out prompts", scale=2)
                ui.typed = gr.Textbox(label="My prompts (one per line)", lines=3, visible=False,
                                      elem_id="compare-typed")
            with gr.Column(scale=1):
                with gr.Row():
                    ui.max_tokens = gr.Slider(1, 256, value=40, step=1, label="Max new tokens")
                    ui.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                with gr.Row():
                    ui.seed = gr.Number(0, label="Seed", precision=0, min_width=80)
                    ui.examples = gr.Number(32, label="Held-out examples for loss", precision=0, minimum=1,
                                            min_width=120)
                with gr.Row():
                    ui.cross = gr.Checkbox(False, label="Also the other domains (cross-domain loss)")
                    ui.record = gr.Checkbox(True, label="Record results in the registry")
        with gr.Row():
            ui.run = gr.Button("Compare", variant="primary", elem_id="compare-run", scale=3)
            ui.gen_only = gr.Button("Generate only", scale=1, elem_id="compare-generate")
        ui.status = gr.Markdown(elem_id="compare-status")
        ui.prompts = gr.Markdown(elem_id="compare-prompts")
        with gr.Row(equal_height=True, elem_id="compare-panes"):
            ui.panes = [gr.Textbox(label=f"model {k + 1}", lines=8, max_lines=40, interactive=False, visible=False,
                                   elem_id=f"compare-pane-{k}", elem_classes="studio-pane", buttons=["copy"])
                        for k in range(PANES)]
        gr.Markdown("### Metrics")
        ui.verdict = gr.Markdown(elem_id="compare-verdict")
        ui.table = gr.Dataframe(pd.DataFrame(columns=[label for _, label, _ in METRIC_COLUMNS]), interactive=False,
                                wrap=True, elem_id="compare-metrics", elem_classes=["studio-table"])
        with gr.Row(equal_height=False):  # the figures carry their own titles
            ui.loss_plot = gr.Plot(show_label=False, elem_id="compare-loss-plot", elem_classes="studio-figure")
            ui.drift_plot = gr.Plot(show_label=False, elem_classes="studio-figure")
        ui.usage_plot = gr.Plot(show_label=False, elem_classes="studio-figure")
        with gr.Accordion("Full report", open=False):
            ui.report = gr.Markdown()
        ui.metrics_api = gr.Button(visible=False)  # gives the metrics their own API endpoint (see below)

    gen_inputs = [ui.include_base, ui.adapters, ui.source, ui.dataset, ui.n_prompts, ui.typed, ui.max_tokens,
                  ui.temperature, ui.seed]
    gen_outputs = [ui.prompts, *ui.panes, ui.status]
    metric_inputs = [ui.include_base, ui.adapters, ui.dataset, ui.examples, ui.n_prompts, ui.max_tokens, ui.cross,
                     ui.record]
    metric_outputs = [ui.verdict, ui.table, ui.loss_plot, ui.usage_plot, ui.drift_plot, ui.report]
    ui.run.click(c(compare_generate, ctx), gen_inputs, gen_outputs, api_visibility="private") \
        .success(c(compare_metrics, ctx), metric_inputs, metric_outputs, api_visibility="private",
                 show_progress_on=ui.verdict)
    ui.gen_only.click(c(compare_generate, ctx), gen_inputs, gen_outputs, api_name="compare_generate")
    # the Compare button chains generation and metrics; a hidden trigger exposes the metrics alone
    ui.metrics_api.click(c(compare_metrics, ctx), metric_inputs, metric_outputs, api_name="compare_metrics")
    ui.source.change(lambda s: (gr.update(visible=s == TYPED), gr.update(visible=s == HELD_OUT)), ui.source,
                     [ui.typed, ui.n_prompts], api_visibility="private")

    def refresh(selected):
        refs = adapter_refs(ctx)
        return gr.update(choices=refs, value=[s for s in (selected or []) if s in refs]), \
            gr.update(choices=dataset_choices(ctx))

    ui.tab.select(refresh, ui.adapters, [ui.adapters, ui.dataset], api_visibility="private")
    return ui
