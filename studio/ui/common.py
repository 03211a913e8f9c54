"""Helpers the tabs share: turning studio errors into messages in the page, and small renderers (tables,
progress bar, chat previews). Presentation only; every decision is made by the Python API the tabs call.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import time

import gradio as gr
import pandas as pd

from studio.errors import StudioError

log = logging.getLogger("studio.ui")

TITLES = {"DatasetError": "Dataset problem", "ModelError": "Model problem", "PlanError": "LoRA plan problem",
          "RegistryError": "Registry problem", "RegistryConflict": "Registry conflict", "JobError": "Job problem",
          "RequestError": "Request problem", "EvalError": "Evaluation problem"}


def _to_gr_error(exc: Exception) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, StudioError):
        # the message is the whole story: no traceback in the app log for an ordinary bad input
        return gr.Error(str(exc), title=TITLES.get(type(exc).__name__, "Studio error"), duration=None,
                        print_exception=False)
    # a bug, not a user error: keep the traceback in the server log and tell the user what happened
    log.exception("unexpected error in a UI action")
    return gr.Error(f"{type(exc).__name__}: {exc} (unexpected; the server log has the traceback)",
                    title="Internal error", duration=None)


def user_errors(fn):
    """Show StudioError messages (which name the problem and the fix) in the page as an error toast; the app
    keeps working. Works for plain and generator (streaming) handlers."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise _to_gr_error(exc) from (None if isinstance(exc, StudioError) else exc)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # a user error's message is the whole story: no chained traceback in the log
            raise _to_gr_error(exc) from (None if isinstance(exc, StudioError) else exc)
    return wrapper


def status(kind: str, text: str) -> str:
    """A one-line status message (Markdown) with an icon for ok / info / warn / error."""
    # glyphs every system font has (colour emoji are missing on many Linux desktops), coloured by kind
    icon, color = {"ok": ("✔", "#16a34a"), "info": ("ℹ", "#2563eb"), "warn": ("⚠", "#d97706"),
                   "error": ("✖", "#dc2626"), "busy": ("●", "#f97316")}[kind]
    return (f'<span class="studio-status studio-status-{kind}" style="color:{color};font-weight:700">{icon}</span> '
            f"{text}")


def frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame([{c: r.get(c, "") for c in columns} for r in rows], columns=columns)


def progress_bar(fraction: float, label: str, state: str = "running") -> str:
    """An HTML progress bar (Gradio has no standalone one: gr.Progress only decorates a running event)."""
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="studio-progress studio-{html.escape(state)}">'
            f'<div class="studio-progress-fill" style="width:{pct:.1f}%"></div>'
            f'<span class="studio-progress-label">{html.escape(label)}</span></div>')


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def chat_preview(rows: list[list[dict]], max_chars: int = 400) -> pd.DataFrame:
    """Normalised chat rows as a table: one line per example with system / user / assistant text."""
    out = []
    for i, messages in enumerate(rows, 1):
        by_role: dict[str, list[str]] = {}
        for m in messages:
            by_role.setdefault(m["role"], []).append(m["content"])
        cell = {role: _clip(" | ".join(parts), max_chars) for role, parts in by_role.items()}
        out.append({"#": i, "turns": len(messages), **cell})
    return frame(out, ["#", "turns", "system", "user", "assistant"])


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def markdown_table(rows: list[list], header: list[str]) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_number(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"
