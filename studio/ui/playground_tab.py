"""The Playground tab: chat with the base or any adapter, hot-swapped per message on one loaded base
(studio.engine.Engine), with streaming tokens and sampling controls."""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace

import gradio as gr

from studio.errors import RequestError
from studio.ui.common import status, user_errors
from studio.ui.registry_tab import adapter_refs

BASE_CHOICE = "base"


def model_choices(ctx) -> list[tuple[str, str]]:
    """(label, value) pairs: the bare base first, then every adapter version and alias."""
    return [(f"base ({ctx.base}, no adapter)", BASE_CHOICE)] + [(r, r) for r in adapter_refs(ctx)]


def engine_markdown(ctx) -> str:
    if not ctx.engine_loaded:
        return status("info", f"The base `{ctx.base}` ({ctx.quant}) loads on the first message; adapters then "
                              "swap per message without reloading it.")
    s = ctx.engine().stats()
    resident = ", ".join(s.get("resident") or []) or "none"
    return (f"**Engine:** base `{s['base']}` loaded once · resident adapters: {resident} "
            f"(max {s['max_resident']}) · adapter loads {s.get('adapter_loads', 0)}, evictions "
            f"{s.get('adapter_evictions', 0)}, swaps {s.get('adapter_switches', 0)}")


def _params(max_tokens, temperature, top_p, seed):
    from studio.engine import SamplingParams

    try:
        return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                              seed=None if seed in (None, "") or int(seed) < 0 else int(seed))
    except (TypeError, ValueError) as exc:
        raise RequestError(f"sampling settings must be numbers ({exc})") from None


def _adapter(model: str | None) -> str | None:
    return None if not model or model == BASE_CHOICE else model


@user_errors
def chat(ctx, message: str, history: list | None, model: str, system: str, temperature: float, top_p: float,
         max_tokens: float, seed: float):
    """Send one user message; yields (history, status) as tokens stream in. The model is `base` or any
    adapter reference (law@v3, law@prod); switching it does not reload the base."""
    message = (message or "").strip()
    if not message:
        raise RequestError("type a message first")
    history = [{"role": m["role"], "content": _text(m["content"])} for m in (history or [])]
    params = _params(max_tokens, temperature, top_p, seed)
    history.append({"role": "user", "content": message})
    if not ctx.engine_loaded:
        yield history, status("busy", f"Loading the base `{ctx.base}` ({ctx.quant}) once…")
    engine = ctx.engine()
    ref = engine.load(_adapter(model))  # resolves (errors name the fix) and makes the adapter resident
    prompt = ([{"role": "system", "content": system.strip()}] if (system or "").strip() else []) + history
    history.append({"role": "assistant", "content": ""})
    t0 = time.perf_counter()
    who = ref or f"base {engine.base_id}"
    completion = None
    for chunk in engine.stream(prompt, adapter=ref, params=params):
        history[-1]["content"] += chunk.text
        if chunk.completion is not None:
            completion = chunk.completion
        yield history, status("busy", f"{who} is writing…")
    if completion is None:
        yield history, status("warn", f"{who}: the stream ended without a result")
        return
    took = time.perf_counter() - t0
    rate = completion.completion_tokens / took if took > 0 else 0.0
    yield history, status("ok", f"{who} · {completion.completion_tokens} tokens in {took:.2f}s ({rate:.0f} tok/s, "
                                f"first token {1000 * completion.ttft_s:.0f} ms) · finish: "
                                f"{completion.finish_reason}")


def _text(content) -> str:
    """Chatbot history content may come back as a list of parts; the engine takes plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def build(ctx) -> SimpleNamespace:
    ui = SimpleNamespace(apis=[])
    c = functools.partial
    with gr.Tab("Playground", id="playground") as ui.tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                ui.model = gr.Dropdown(model_choices(ctx), value=BASE_CHOICE, label="Model",
                                       info="switch any time: the adapter is swapped on the loaded base",
                                       elem_id="playground-model", allow_custom_value=True)
                ui.system = gr.Textbox(label="System prompt (optional)", lines=2)
                ui.temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                ui.top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                ui.max_tokens = gr.Slider(1, 512, value=96, step=1, label="Max new tokens")
                ui.seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                ui.engine = gr.Markdown(engine_markdown(ctx), elem_id="playground-engine")
            with gr.Column(scale=3):
                ui.chatbot = gr.Chatbot(label="Chat", height=460, elem_id="playground-chat",
                                        placeholder="Pick a model and say something. `tiny-moe` is a 6.6M-parameter "
                                                    "base pretrained on CPython's documentation: expect Python-doc "
                                                    "English, not knowledge.")
                with gr.Row():
                    ui.message = gr.Textbox(placeholder="Your message (Enter to send)", show_label=False, scale=5,
                                            elem_id="playground-message", max_lines=6)
                    ui.send = gr.Button("Send", variant="primary", scale=1, elem_id="playground-send")
                    ui.clear = gr.Button("Clear", scale=0, min_width=80)
                ui.status = gr.Markdown(elem_id="playground-status")

    inputs = [ui.message, ui.chatbot, ui.model, ui.system, ui.temperature, ui.top_p, ui.max_tokens, ui.seed]
    for i, trigger in enumerate((ui.send.click, ui.message.submit)):
        kw = dict(api_name="chat") if i == 0 else dict(api_visibility="private")
        trigger(c(chat, ctx), inputs, [ui.chatbot, ui.status], **kw) \
            .success(lambda: ("", engine_markdown(ctx)), None, [ui.message, ui.engine], api_visibility="private")
    def engine_stats() -> dict:
        """The shared engine's state: base, resident adapters, adapter loads / evictions / swaps, steps."""
        return ctx.engine().stats() if ctx.engine_loaded else {"base": ctx.base, "loaded": False}

    ui.apis.append((engine_stats, "engine_stats"))
    ui.clear.click(lambda: ([], ""), None, [ui.chatbot, ui.status], api_visibility="private")
    ui.tab.select(lambda m: (gr.update(choices=model_choices(ctx), value=m), engine_markdown(ctx)), ui.model,
                  [ui.model, ui.engine], api_visibility="private")
    return ui
