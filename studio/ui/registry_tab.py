"""The Registry tab: adapter domains and versions with lineage and metrics, alias promote / rollback, push and pull
to remotes, and a diff of two versions."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from studio.errors import RegistryError
from studio.ui.common import fmt_number, frame, markdown_table, status, user_errors

COLUMNS = ["adapter", "domain", "v", "aliases", "created", "base", "dataset", "held-out loss", "ppl", "size",
           "sha"]
DIFF_COLUMNS = ["section", "key", "a", "b", "delta"]


def _metric(v, key) -> str:
    val = v.metrics.get(key)
    return f"{val:.4f}" if isinstance(val, (int, float)) else ""


def _row(v) -> dict:
    base = (v.metadata.get("base") or {}).get("id", "")
    return {"adapter": v.ref, "domain": v.domain, "v": v.number, "aliases": ", ".join(sorted(v.aliases)),
            "created": v.created.replace("T", " ")[:19], "base": base,
            "dataset": (v.metadata.get("dataset") or {}).get("ref", ""), "held-out loss": _metric(v, "eval_loss"),
            "ppl": _metric(v, "eval_perplexity"), "size": f"{v.size / 1024:.0f} KiB", "sha": v.short_sha}


def adapter_refs(ctx) -> list[str]:
    """Every version, newest first per domain, then each domain's aliases (`law@prod`)."""
    versions = ctx.adapters.list()
    refs = [v.ref for v in sorted(versions, key=lambda v: (v.domain, -v.number))]
    for domain in ctx.adapters.domains():
        refs += [f"{domain}@{a}" for a in ctx.adapters.aliases(domain)]
    return refs


@user_errors
def list_adapters(ctx, domain: str | None = None):
    """Every registered version (or one domain's) as a table, plus the refs for the pickers."""
    versions = ctx.adapters.list(domain or None)
    rows = [_row(v) for v in sorted(versions, key=lambda v: (v.domain, -v.number))]
    return frame(rows, COLUMNS)


def _lineage_markdown(ctx, v) -> str:
    m = v.metadata
    base = m.get("base") or {}
    quant = m.get("quantization") or {}
    plan = m.get("plan") or {}
    ds = m.get("dataset") or {}
    hp = m.get("hyperparameters") or {}
    lines = [f"### {v.ref}" + (f"  ·  aliases: **{', '.join(sorted(v.aliases))}**" if v.aliases else ""),
             f"sha `{v.short_sha}` · created {v.created} · {v.size / 1024:.0f} KiB · origin {v.origin}"
             + (f" · parent **{v.parent}**" if v.parent else "")]
    facts = [["base", f"{base.get('id', '?')} ({base.get('family', base.get('arch', ''))})".replace(" ()", "")],
             ["base fingerprint", f"`{str(base.get('fingerprint', ''))[:23]}`"],
             ["quantization", quant.get("mode", "?") + (f" {quant.get('quant_type')}" if quant.get("mode") == "4bit"
                                                        else "")],
             ["LoRA", f"targets {','.join(plan.get('targets', [])) or '?'} · r {hp.get('r', '?')} · alpha "
                      f"{hp.get('alpha', '?')} · {fmt_number(plan.get('trainable_params', 0))} trainable params"],
             ["dataset", f"{ds.get('ref', '?')} (sha256 {str(ds.get('hash', ''))[:12]})"],
             ["training", f"{hp.get('max_steps', '?')} steps · lr {hp.get('learning_rate', '?')} · batch "
                          f"{hp.get('batch_size', '?')} · seq {hp.get('seq_len', '?')} · seed {hp.get('seed', '?')}"]]
    if v.tags:
        facts.append(["tags", ", ".join(v.tags)])
    if v.notes:
        facts.append(["notes", v.notes])
    lines += ["", markdown_table(facts, ["lineage", ""])]
    if v.metrics:
        lines += ["", markdown_table([[k, fmt_number(val)] for k, val in sorted(v.metrics.items())],
                                     ["metric", "value"])]
    sources = [e for e in v.metrics_history if e.get("source") != "train"]
    if sources:
        lines += ["", "**Metrics recorded later:** " + "; ".join(
            f"{e['source']} at {e['at']}: " + ", ".join(f"{k} {fmt_number(x)}" for k, x in e["metrics"].items()
                                                         if not isinstance(x, (dict, list)))
            for e in sources)]
    for alias in sorted(v.aliases):
        hist = ctx.adapters.alias_history(v.domain, alias)
        lines += ["", f"**{v.domain}@{alias} history:** " + " → ".join(
            f"{e['ref'] or '-'} ({e['action']})" for e in hist)]
    return "\n".join(lines)


def _domain_plot(ctx, domain: str):
    """Held-out loss of the base and of each version (as measured at training), one bar each, in version order."""
    rows = []  # one bar per (version, model): distinct x values, so Vega does not stack them
    for v in ctx.adapters.list(domain):
        for key, who in (("eval_loss_before", "base"), ("eval_loss", "adapter")):
            if isinstance(v.metrics.get(key), (int, float)):
                rows.append({"version": f"v{v.number} {who}", "loss": v.metrics[key], "metric": who})
    if not rows:  # None, not an empty frame: an empty native plot without a fixed height grows without bound
        return gr.BarPlot(None)
    df = pd.DataFrame(rows, columns=["version", "loss", "metric"])
    # the y axis spans the losses, not 0..max: 8.78 vs 8.38 is a visible step, not two bars of equal height
    lo, hi = float(df["loss"].min()), float(df["loss"].max())
    pad = max(hi - lo, 0.05 * abs(hi), 1e-3) * 0.25
    return gr.BarPlot(df, sort=list(df["version"]), y_lim=[lo - 2 * pad, hi + pad])


@user_errors
def show_version(ctx, ref: str):
    """Lineage, metrics and alias history of one version, and its domain's held-out loss by version."""
    ref = (ref or "").strip()
    if not ref:
        return ref, status("info", "Click a version in the table to see its lineage and metrics."), \
            gr.BarPlot(None), ""
    v = ctx.adapters.resolve(ref)
    return v.ref, _lineage_markdown(ctx, v), _domain_plot(ctx, v.domain), v.domain


@user_errors
def promote(ctx, ref: str, alias: str):
    if not (ref or "").strip():
        raise RegistryError("no version selected: click a version in the table (or type e.g. law@v3)")
    v = ctx.adapters.promote(ref.strip(), (alias or "").strip())
    return status("ok", f"{v.domain}@{alias.strip()} now points at **{v.ref}**.")


@user_errors
def rollback(ctx, domain_or_ref: str, alias: str):
    domain = (domain_or_ref or "").strip().partition("@")[0]
    if not domain:
        raise RegistryError("no domain selected: click a version in the table first")
    v = ctx.adapters.rollback(domain, (alias or "").strip())
    return status("ok", f"{domain}@{alias.strip()} rolled back to **{v.ref}**.")


def _remotes_markdown(ctx) -> str:
    remotes = ctx.adapters.remotes()
    if not remotes:
        return status("info", "No remote configured. Add one (an fsspec URL: file:///path, s3://bucket/prefix, "
                              "hf://...) to push and pull adapters.")
    return markdown_table([[r["name"], f"`{r['url']}`"] for r in remotes], ["remote", "url"])


@user_errors
def add_remote(ctx, name: str, url: str, create: bool = False):
    ctx.adapters.remote_add((name or "").strip(), (url or "").strip(), create=bool(create))
    return status("ok", f"Remote **{name.strip()}** added."), _remotes_markdown(ctx), _remote_choices(ctx)


def _remote_choices(ctx):
    names = [r["name"] for r in ctx.adapters.remotes()]
    return gr.update(choices=names, value=names[0] if names else None)


@user_errors
def push(ctx, ref: str, remote: str | None):
    if not (ref or "").strip():
        raise RegistryError("no version selected to push: click a version in the table (or type law@prod to "
                            "push the version and move the remote alias)")
    r = ctx.adapters.push(ref.strip(), remote or None)
    alias = r.get("alias") or {}
    extra = f"; remote alias {alias['alias']} {alias['status']}" if alias else ""
    return status("ok", f"Pushed **{r['ref']}** to {r['remote']} ({r['url']}): version {r['version']}, "
                        f"{r['metrics']} metric records{extra}.")


@user_errors
def pull(ctx, ref: str, remote: str | None):
    if not (ref or "").strip():
        raise RegistryError("type what to pull, e.g. law, law@v3 or law@prod")
    v = ctx.adapters.pull(ref.strip(), remote or None)
    return status("ok", f"Pulled **{v.ref}** (sha {v.short_sha})."), list_adapters(ctx)


@user_errors
def diff(ctx, ref_a: str, ref_b: str):
    """What differs between two versions, one row per changed key (with the delta of numeric metrics)."""
    if not ref_a or not ref_b:
        raise RegistryError("pick two versions to diff")
    d = ctx.adapters.diff(ref_a, ref_b)
    rows = []
    for section in ("metrics", "hyperparameters", "plan", "dataset", "base", "quantization", "config",
                    "library_versions"):
        for key, pair in (d.get(section) or {}).items():
            rows.append({"section": section, "key": key, "a": _cell(pair.get("a")), "b": _cell(pair.get("b")),
                         "delta": fmt_number(pair["delta"]) if "delta" in pair else ""})
    files = d.get("files") or {}
    for kind in ("added", "removed", "changed"):
        for path in files.get(kind, []):
            rows.append({"section": "files", "key": path, "a": "", "b": kind, "delta": ""})
    head = status("info", f"**{d['a']}** vs **{d['b']}**: {len(rows)} differences" if rows else
                  f"**{d['a']}** and **{d['b']}** do not differ")
    return head, frame(rows, DIFF_COLUMNS)


def _cell(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v)[:200]
    return fmt_number(v) if v is not None else "-"


def build(ctx) -> SimpleNamespace:
    ui = SimpleNamespace(apis=[])
    c = functools.partial
    with gr.Tab("Registry", id="registry") as ui.tab:
        gr.Markdown("Every trained adapter is a numbered version of its domain (`law@v3`) with lineage; aliases "
                    "such as `law@prod` move between versions and keep their history. Click a version.")
        with gr.Row():
            ui.refresh = gr.Button("Refresh", size="sm", elem_id="registry-refresh", scale=0, min_width=100)
        ui.table = gr.Dataframe(c(list_adapters, ctx), interactive=False, wrap=True, elem_id="registry-table",
                                elem_classes=["studio-table"],
                                max_height=320)  # a callable value is re-read on every page load
        ui.status = gr.Markdown(elem_id="registry-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                ui.selected = gr.Textbox(label="Selected version", placeholder="law@v3", max_lines=1,
                                         elem_id="registry-selected")
                ui.download = gr.DownloadButton("Download selected (zip)", value=None, size="sm",
                                                elem_id="registry-download", interactive=False)
                ui.details = gr.Markdown(elem_id="registry-details")
            with gr.Column(scale=2):
                ui.domain = gr.Textbox(visible=False)
                ui.plot = gr.BarPlot(x="version", y="loss", color="metric", color_title="",
                                     label="Held-out loss by version (at training)", elem_id="registry-plot")
                gr.Markdown("**Aliases**: point `domain@alias` at the selected version, or move it back")
                with gr.Row(equal_height=True):
                    ui.alias = gr.Textbox("prod", label="Alias", max_lines=1, scale=2, min_width=100)
                    ui.promote = gr.Button("Promote selected", variant="primary", scale=2, min_width=120,
                                           elem_id="registry-promote")
                    ui.rollback = gr.Button("Roll back", scale=1, min_width=110, elem_id="registry-rollback")
        with gr.Row(equal_height=False):
            with gr.Column():
                with gr.Accordion("Remotes: push and pull", open=False):
                    ui.remotes = gr.Markdown(c(_remotes_markdown, ctx))
                    with gr.Row():
                        ui.remote_name = gr.Textbox("origin", label="Remote name", max_lines=1)
                        ui.remote_url = gr.Textbox(label="URL", placeholder="file:///srv/adapters or s3://bucket/x",
                                                   max_lines=1, scale=2)
                        ui.remote_create = gr.Checkbox(False, label="Create the directory if missing (file://)")
                        ui.remote_add = gr.Button("Add remote", scale=1)
                    names = [r["name"] for r in ctx.adapters.remotes()]
                    with gr.Row():
                        ui.remote = gr.Dropdown(names, value=names[0] if names else None, label="Remote")
                        ui.pull_ref = gr.Textbox(label="Pull", placeholder="law, law@v3 or law@prod", max_lines=1)
                    with gr.Row():
                        ui.push = gr.Button("Push selected version")
                        ui.pull = gr.Button("Pull")
            with gr.Column():
                with gr.Accordion("Diff two versions", open=False):
                    refs = adapter_refs(ctx)
                    with gr.Row():
                        ui.diff_a = gr.Dropdown(refs, label="A", allow_custom_value=True)
                        ui.diff_b = gr.Dropdown(refs, label="B", allow_custom_value=True)
                        ui.diff_go = gr.Button("Diff", scale=0, min_width=80)
                    ui.diff_head = gr.Markdown()
                    ui.diff_table = gr.Dataframe(frame([], DIFF_COLUMNS), interactive=False, wrap=True,
                                                 elem_classes=["studio-table"],
                                                 max_height=360)
        _build_export(ctx, ui)

    ui.outputs_for_show = [ui.selected, ui.details, ui.plot, ui.domain]
    _wire_download(ctx, ui)

    def refresh_all():
        refs = adapter_refs(ctx)
        return list_adapters(ctx), gr.update(choices=refs), gr.update(choices=refs)

    ui.refresh.click(c(list_adapters, ctx), None, ui.table, api_name="list_adapters") \
        .then(refresh_all, None, [ui.table, ui.diff_a, ui.diff_b], api_visibility="private")
    ui.tab.select(refresh_all, None, [ui.table, ui.diff_a, ui.diff_b], api_visibility="private")

    def pick(evt: gr.SelectData, table):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return _show_quiet(ctx, table.iloc[row]["adapter"])

    ui.table.select(pick, ui.table, ui.outputs_for_show, api_visibility="private")
    ui.selected.submit(c(show_version, ctx), ui.selected, ui.outputs_for_show, api_visibility="private")
    ui.apis.append((_details_api(ctx), "adapter_details"))

    after = dict(fn=lambda ref: (*_show_quiet(ctx, ref), list_adapters(ctx)), inputs=ui.selected,
                 outputs=[*ui.outputs_for_show, ui.table], api_visibility="private")
    ui.promote.click(c(promote, ctx), [ui.selected, ui.alias], ui.status, api_name="promote").success(**after)
    ui.rollback.click(c(rollback, ctx), [ui.selected, ui.alias], ui.status, api_name="rollback").success(**after)
    ui.remote_add.click(c(add_remote, ctx), [ui.remote_name, ui.remote_url, ui.remote_create], [ui.status, ui.remotes, ui.remote],
                        api_name="add_remote")
    ui.push.click(c(push, ctx), [ui.selected, ui.remote], ui.status, api_name="push")
    ui.pull.click(c(pull, ctx), [ui.pull_ref, ui.remote], [ui.status, ui.table], api_name="pull")
    ui.diff_go.click(c(diff, ctx), [ui.diff_a, ui.diff_b], [ui.diff_head, ui.diff_table], api_name="diff")
    return ui


# --------------------------------------------------------------------------- export (studio.export)


@user_errors
def export_version(ctx, ref: str, fmt: str, output: str, dtype: str = "fp32"):
    """Write the selected version as PEFT files, per-expert LoRA or a merged checkpoint (`studio export`)."""
    import warnings
    from pathlib import Path

    from studio.export import FORMATS, export_adapter

    ref = (ref or "").strip()
    if not ref:
        raise RegistryError("no version selected to export: click a version in the table (or type law@v3)")
    if fmt not in FORMATS:
        raise RegistryError(f"pick an export format: {', '.join(FORMATS)}")
    out = Path((output or "").strip() or Path("exports") / f"{ref.replace('@', '-')}-{fmt}").expanduser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes come back in result.warnings and are shown below
        result = export_adapter(ref, fmt, out, registry=ctx.adapters, dtype=dtype)
    size = sum(f["size"] for f in result.files)
    notes = "".join(f"<br>{status('warn', n)}" for n in result.warnings)
    return status("ok", f"Exported **{result.ref}** as {fmt} to `{result.path.resolve()}`: {len(result.files)} "
                        f"files, {size / 1024:.0f} KiB, sha256 manifest `export_manifest.json`.") + notes


def _build_export(ctx, ui) -> None:
    """The Export accordion: format, dtype (merged), output directory; runs studio.export on the selected version."""
    with gr.Accordion("Export: PEFT, per-expert LoRA (vLLM) or merged checkpoint", open=False):
        gr.Markdown("`peft`: the registry's files + a model card. `per-expert`: expert LoRA as per-expert 2D modules, "
                    "the layout vLLM loads for Mixtral / Qwen-MoE / OLMoE / DeepSeek. `merged`: a transformers "
                    "checkpoint with every delta merged into the base (a 4-bit-trained adapter is merged into the "
                    "full-precision base). An existing output directory is never overwritten.")
        with gr.Row(equal_height=True):
            ui.export_format = gr.Dropdown(["peft", "per-expert", "merged"], value="peft", label="Format", scale=1,
                                           elem_id="registry-export-format")
            ui.export_dtype = gr.Dropdown(["fp32", "bf16"], value="fp32", label="dtype (merged)", scale=1)
            ui.export_output = gr.Textbox(label="Output directory", placeholder="exports/<version>-<format>",
                                          max_lines=1, scale=3, elem_id="registry-export-output")
            ui.export_go = gr.Button("Export selected", scale=1, min_width=120, elem_id="registry-export")
        ui.export_status = gr.Markdown(elem_id="registry-export-status")
    ui.export_go.click(functools.partial(export_version, ctx),
                       [ui.selected, ui.export_format, ui.export_output, ui.export_dtype], ui.export_status,
                       api_name="export_adapter")


def _show_quiet(ctx, ref: str):
    try:
        return show_version(ctx, ref)
    except gr.Error as exc:
        return ref, status("error", exc.message), gr.BarPlot(None), ""


def _details_api(ctx):
    @user_errors
    def details(ref: str) -> str:
        """One version as JSON text: ref, sha, aliases, lineage, metrics history, files. (Text, not a dict:
        Gradio treats any returned dict with a "path" key as a file to serve, and lineage and files have them.)"""
        v = ctx.adapters.resolve(ref)
        return json.dumps({"ref": v.ref, "sha": v.sha, "aliases": v.aliases, "lineage": v.lineage,
                           "metrics_history": v.metrics_history, "files": v.files})
    return details


# ---------------------------------------------------------------------------------------------------------------
# download: the selected version's files as a zip


def download_zip(ctx, ref: str) -> str:
    """A zip of one version's files as registered: the PEFT files (adapter_config.json, adapter_model.safetensors),
    studio_adapter.json (lineage) and whatever else the run registered. Built from the registry's verified
    read-only checkout into a temporary folder Gradio serves; named `<domain>-v<N>-<sha12>.zip`."""
    import os
    import tempfile
    import zipfile
    from pathlib import Path

    v = ctx.adapters.resolve(ref)
    src = Path(ctx.adapters.path(v.ref))
    # one zip per content hash (versions are immutable), written under a temporary name and renamed last
    out = Path(tempfile.gettempdir()) / "studio-downloads" / f"{v.domain}-v{v.number}-{v.sha[:12]}.zip"
    if out.is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in sorted(v.files, key=lambda f: f["path"]):
            z.write(src / f["path"], f"{v.domain}-v{v.number}/{f['path']}")
    os.replace(tmp, out)
    return str(out)


def _wire_download(ctx, ui) -> None:
    """Whenever a version is shown, the Download button holds its zip (a few hundred KiB for LoRA factors)."""
    def ready(ref: str):
        ref = (ref or "").strip()
        try:
            path = download_zip(ctx, ref) if ref else None
        except Exception:  # an unknown ref is reported in the details pane already
            path = None
        label = f"Download {ctx.adapters.resolve(ref).ref} (zip)" if path else "Download selected (zip)"
        return gr.DownloadButton(label, value=path, interactive=bool(path))

    ui.selected.change(ready, ui.selected, ui.download, api_visibility="private", show_progress="hidden")
