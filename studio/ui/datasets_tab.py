"""The Datasets tab: registered datasets and their versions, a preview with statistics, register and delete."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio.data.registry import sanitise_name
from studio.errors import DatasetError
from studio.ui.common import chat_preview, frame, status, user_errors
from studio.ui.train_tab import FILE_TYPES, friendly_paths, registered_info

COLUMNS = ["dataset", "name", "v", "format", "train", "held-out", "dropped", "created", "hash", "source"]


def _source(path: str) -> str:
    """Uploads are registered from Gradio's temporary copy; show the file name the user uploaded."""
    gradio_tmp = os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")
    return f"upload: {Path(path).name}" if path.startswith(gradio_tmp + os.sep) else path


def _row(v) -> dict:
    return {"dataset": v.ref, "name": v.name, "v": v.number, "format": v.format, "train": v.rows_train,
            "held-out": v.rows_eval, "dropped": sum(v.dropped.values()), "created": v.created.replace("T", " ")[:19],
            "hash": v.hash[:12], "source": _source(v.source)}


@user_errors
def list_datasets(ctx):
    """Every registered version (newest first per name) as a table."""
    versions = sorted(ctx.datasets.list(), key=lambda v: (v.name, -v.number))
    return frame([_row(v) for v in versions], COLUMNS)


@user_errors
def dataset_versions(ctx, name: str):
    """The versions of one dataset name."""
    name = (name or "").partition("@")[0]
    if not name:
        raise DatasetError("no dataset selected: click a row or type a name")
    return frame([_row(v) for v in reversed(ctx.datasets.versions(name))], COLUMNS)


@user_errors
def register_dataset(ctx, file: str | None, name: str, eval_ratio: float, eval_file: str | None = None):
    """Register a file (atomically: a bad file registers nothing). Returns (status, table, new ref)."""
    if not file:
        raise DatasetError("no file uploaded: drop a JSONL, JSON, CSV, Parquet or TXT file first")
    name = (name or "").strip() or sanitise_name(Path(file).stem)
    before = {v.ref for v in ctx.datasets.versions(name)} if name else set()
    with friendly_paths(file, eval_file):
        version = ctx.datasets.add(file, name, eval_path=eval_file or None,
                                   eval_ratio=float(0.1 if eval_ratio is None else eval_ratio))
    again = version.ref in before
    msg = (f"`{Path(file).name}` is identical to **{version.ref}**, which is already registered." if again else
           f"Registered **{version.ref}**: {version.rows_train:,} train / {version.rows_eval:,} held-out rows "
           f"({version.format}).")
    return status("ok", msg), list_datasets(ctx), version.ref


@user_errors
def delete_dataset(ctx, ref: str, confirm: bool):
    """Remove `name@vN` (one version) or `name` (all versions); needs the confirmation box ticked."""
    ref = (ref or "").strip()
    if not ref:
        raise DatasetError("no dataset selected: click a row or type a reference such as law@v2")
    if not confirm:
        raise DatasetError(f"tick 'I understand' to delete {ref}: its stored rows are removed (adapters trained "
                           "on it keep their recorded hash)")
    removed = ctx.datasets.remove(ref)
    return status("ok", "Deleted " + ", ".join(v.ref for v in removed) + "."), list_datasets(ctx)


@user_errors
def register_samples(ctx):
    """Register the shipped sample datasets (law, medicine, code) now instead of on first use."""
    names = [s["name"] for s in ctx.datasets.shipped_samples()]
    refs = [ctx.datasets.get(n).ref for n in names]
    return status("ok", "Samples registered: " + ", ".join(refs) + "."), list_datasets(ctx)


def build(ctx) -> SimpleNamespace:
    ui = SimpleNamespace(apis=[])
    c = functools.partial
    with gr.Tab("Datasets", id="datasets") as ui.tab:
        gr.Markdown("Datasets are normalised to chat messages and versioned by content: the same file registered "
                    "twice is one version. Click a row to preview it.")
        with gr.Row():
            ui.refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
            ui.samples = gr.Button("Register shipped samples (law, medicine, code)", size="sm", scale=0,
                                   min_width=320)
        ui.table = gr.Dataframe(c(list_datasets, ctx), interactive=False, wrap=True, elem_id="datasets-table",
                                elem_classes=["studio-table"],
                                max_height=300,  # a callable value is re-read on every page load
                                column_widths=["11%", "9%", "4%", "8%", "6%", "7%", "7%", "13%", "10%", "25%"])
        ui.status = gr.Markdown(elem_id="datasets-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                ui.selected = gr.Textbox(label="Selected dataset", placeholder="law@v1", elem_id="datasets-selected",
                                         max_lines=1)
                ui.info = gr.Markdown()
                ui.preview = gr.Dataframe(chat_preview([]), label="Preview (first training rows)",
                                          column_widths=["6%", "10%", "18%", "30%", "36%"],
                                          elem_classes=["studio-table"], interactive=False, wrap=True, max_height=300)
                with gr.Accordion("Versions of this dataset", open=False):
                    ui.versions = gr.Dataframe(frame([], COLUMNS), interactive=False, wrap=True,
                                               elem_classes=["studio-table"])
            with gr.Column(scale=2):
                gr.Markdown("**Register a file**")
                with gr.Group():
                    ui.file = gr.File(label="Dataset file", file_types=FILE_TYPES, elem_id="datasets-file")
                    with gr.Accordion("Held-out file (optional; else a share is split off)", open=False):
                        ui.eval_file = gr.File(label="Held-out file", file_types=FILE_TYPES)
                    with gr.Row():
                        ui.name = gr.Textbox(label="Name", placeholder="from the file name", elem_id="datasets-name")
                        ui.eval_ratio = gr.Slider(0.0, 0.5, value=0.1, step=0.05, label="Held-out share")
                    ui.register = gr.Button("Register", variant="primary", elem_id="datasets-register")
                gr.Markdown("**Delete the selected dataset**")
                ui.confirm = gr.Checkbox(label="I understand its stored rows are removed", elem_id="datasets-confirm")
                ui.delete = gr.Button("Delete selected", variant="stop", elem_id="datasets-delete")
        ui.new_ref = gr.Textbox(visible=False)

    ui.refresh.click(c(list_datasets, ctx), None, ui.table, api_name="list_datasets")
    # opened after a dataset was registered elsewhere (a training start from the Train tab): list it without Refresh
    ui.tab.select(c(list_datasets, ctx), None, ui.table, api_visibility="private", show_progress="hidden")
    ui.samples.click(c(register_samples, ctx), None, [ui.status, ui.table], api_name="register_samples")

    def pick(evt: gr.SelectData, table):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return table.iloc[row]["dataset"]

    ui.table.select(pick, ui.table, ui.selected, api_visibility="private")
    ui.selected.change(c(_selected_quiet, ctx), ui.selected, [ui.info, ui.preview, ui.versions],
                       api_visibility="private", trigger_mode="always_last")
    ui.apis.append((_preview_api(ctx), "preview_dataset"))
    ui.apis.append((_versions_api(ctx), "dataset_versions"))
    ui.register.click(c(register_dataset, ctx), [ui.file, ui.name, ui.eval_ratio, ui.eval_file],
                      [ui.status, ui.table, ui.selected], api_name="register_dataset")
    ui.file.change(lambda f: sanitise_name(Path(f).stem) if f else "", ui.file, ui.name, api_visibility="private")
    ui.delete.click(c(delete_dataset, ctx), [ui.selected, ui.confirm], [ui.status, ui.table],
                    api_name="delete_dataset").success(lambda: ("", False), None, [ui.selected, ui.confirm],
                                                    api_visibility="private")
    return ui


def _selected_quiet(ctx, ref: str):
    """Selection changes (also while typing) show problems in place rather than as pop-ups."""
    if not (ref or "").strip():
        return "", chat_preview([]), frame([], COLUMNS)
    try:
        info, preview = registered_info(ctx, ref.strip())
        return info, preview, dataset_versions(ctx, ref.strip())
    except gr.Error as exc:
        return status("error", exc.message), chat_preview([]), frame([], COLUMNS)


def _preview_api(ctx):
    @user_errors
    def preview(ref: str, n: int = 5) -> dict:
        """Statistics and the first `n` training rows (chat messages) of a dataset version."""
        return {"stats": ctx.datasets.stats(ref), "rows": ctx.datasets.preview(ref, int(n))}
    return preview


def _versions_api(ctx):
    @user_errors
    def versions(name: str) -> list[dict]:
        """The versions of a dataset name as records (newest first)."""
        return dataset_versions(ctx, name).to_dict(orient="records")
    return versions
