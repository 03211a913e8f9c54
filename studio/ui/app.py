"""The Gradio studio: `python app.py` (or `studio ui`) serves it on http://127.0.0.1:7860.

Tabs: Train, Jobs, Datasets, Registry, Playground, Compare. The app holds no logic of its own: every action calls
the Python API (studio.data, studio.train, studio.registry, studio.engine, studio.eval) and shows its errors.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
import sys

from studio.errors import StudioError

AUTH_ENV = "STUDIO_UI_AUTH"

CSS = """
.studio-progress { position: relative; height: 28px; border-radius: 8px; background: var(--neutral-200);
  overflow: hidden; margin: 4px 0 8px 0; }
.dark .studio-progress { background: var(--neutral-700); }
.studio-progress-fill { height: 100%; background: linear-gradient(90deg, #f97316, #fb923c);
  transition: width 0.6s ease; }
.studio-done .studio-progress-fill { background: linear-gradient(90deg, #16a34a, #22c55e); }
.studio-failed .studio-progress-fill, .studio-cancelled .studio-progress-fill { background: #9ca3af; }
.studio-progress-label { position: absolute; inset: 0; display: flex; align-items: center; padding: 0 12px;
  font-size: 0.85rem; font-weight: 600; color: var(--body-text-color); }
.studio-pane { min-height: 160px; }
.studio-figure img { max-width: 100%; height: auto; object-fit: contain; }
.studio-pane textarea { font-size: 0.95rem !important; line-height: 1.45 !important; }
/* table headers wrap between words, never inside one ("perplexi ty", "tur ns") */
.gradio-container th, .gradio-container th * { word-break: keep-all !important; overflow-wrap: normal !important;
  hyphens: none !important; }
/* the label column of a Markdown fact table (lineage) keeps its words whole ("quantizatio n") */
.prose table td:first-child { white-space: nowrap; }
/* a phone-width page: tables keep readable columns and scroll sideways instead of one letter per line (Gradio
   sizes the columns from its container's width, so the container gets the minimum width) */
@media (max-width: 760px) { .studio-table { overflow-x: auto !important; } .studio-table > * { min-width: 720px; } }
"""

HEADER = """
<div style="display:flex;align-items:baseline;gap:14px;margin:4px 0 2px 0">
  <span style="font-size:1.5rem;font-weight:700">MoE LoRA Studio</span>
  <span style="opacity:0.75">train LoRA adapters on quantized Mixture-of-Experts models, version them, serve them
  with hot-swap, compare them side by side</span>
</div>
"""


def build_app(ctx):
    """The Blocks app over a StudioContext (registries, jobs, engine)."""
    import gradio as gr

    from studio.ui import compare_tab, datasets_tab, playground_tab, registry_tab, train_tab

    with gr.Blocks(title="MoE LoRA Studio", analytics_enabled=False) as demo:  # offline: no telemetry calls
        gr.HTML(HEADER)
        info = gr.Markdown(_context_line(ctx), elem_id="studio-context")
        with gr.Tabs(selected="train") as tabs:
            train = train_tab.build(ctx)
            datasets = datasets_tab.build(ctx)
            registry = registry_tab.build(ctx)
            playground = playground_tab.build(ctx)
            compare = compare_tab.build(ctx)
        _wire_across(ctx, tabs, train, registry, compare)
        train_tab.wire_load(demo, ctx, train)
        demo.load(functools.partial(_fresh_choices, ctx), [compare.adapters, playground.model],
                  [compare.adapters, compare.dataset, playground.model, registry.diff_a, registry.diff_b,
                   registry.remote], api_visibility="private")
        for tab in (train, datasets, registry, playground, compare):
            for fn, name in tab.apis:  # JSON endpoints for scripts (gr.api must sit outside gr.Tabs)
                gr.api(fn, api_name=name)
        demo.load(lambda: _context_line(ctx), None, info, api_visibility="private")
    return demo


def _fresh_choices(ctx, picked_adapters, model):
    """Page load: pickers list what is registered now, not what was registered when the app started."""
    import gradio as gr

    from studio.ui import playground_tab, registry_tab, train_tab

    refs = registry_tab.adapter_refs(ctx)
    datasets = train_tab.dataset_choices(ctx)
    models = playground_tab.model_choices(ctx)
    remotes = [r["name"] for r in ctx.adapters.remotes()]
    return (gr.update(choices=refs, value=[r for r in (picked_adapters or []) if r in refs]),
            gr.update(choices=datasets, value=datasets[0] if datasets else None),
            gr.update(choices=models, value=model if model in [v for _, v in models] else playground_tab.BASE_CHOICE),
            gr.update(choices=refs, value=refs[1] if len(refs) > 1 else None),  # diff: the one before ...
            gr.update(choices=refs, value=refs[0] if refs else None),            # ... and the newest
            gr.update(choices=remotes, value=remotes[0] if remotes else None))


def _context_line(ctx) -> str:
    engine = "loaded" if ctx.engine_loaded else "loads on first use"
    return (f"<small>datasets `{ctx.datasets_root}` · adapters `{ctx.adapters_root}` · jobs `{ctx.jobs_root}` · "
            f"serving base `{ctx.base}` ({ctx.quant}, {engine})</small>")


def _wire_across(ctx, tabs, train, registry, compare) -> None:
    """Events that move between tabs: a finished job -> Registry / Compare; a Jobs row -> the Train monitor."""
    import gradio as gr

    from studio.ui import compare_tab, registry_tab, train_tab

    train.jobs_table.select(train_tab.open_job, train.jobs_table, [train.job_id, tabs], api_visibility="private")
    train.to_registry.click(functools.partial(registry_tab.show_version, ctx), train.new_ref,
                            registry.outputs_for_show, api_visibility="private") \
        .then(lambda: gr.Tabs(selected="registry"), None, tabs, api_visibility="private")

    def to_compare(ref: str):
        """Compare a fresh adapter with the base on its own training data."""
        v = ctx.adapters.resolve(ref)
        ds = (v.metadata.get("dataset") or {}).get("ref")
        refs = registry_tab.adapter_refs(ctx)
        datasets = compare_tab.dataset_choices(ctx)
        return (True, gr.update(choices=refs, value=[v.ref]),
                gr.update(choices=datasets, value=ds if ds in datasets else (datasets[0] if datasets else None)),
                gr.Tabs(selected="compare"))

    train.to_compare.click(to_compare, train.new_ref, [compare.include_base, compare.adapters, compare.dataset, tabs],
                           api_visibility="private")


# ---------------------------------------------------------------------------------------------------------------
# command line


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """`user:pass`, several separated by commas -> [(user, pass), ...]."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise StudioError(f"--auth / ${AUTH_ENV} must be user:password (several separated by commas); "
                              f"got {item.strip()!r}")
        pairs.append((user, password))
    return pairs


def add_arguments(p: argparse.ArgumentParser) -> None:
    # ---- network
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all, with --auth)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                   help="port (default 7860, or $GRADIO_SERVER_PORT)")
    p.add_argument("--auth", default=None,
                   help=f"require a login, user:password (several comma separated); default ${AUTH_ENV}")
    p.add_argument("--max-file-size", default=None,
                   help="largest upload, e.g. 256mb (default: $STUDIO_DATASET_MAX_BYTES if set, else 64 MiB; "
                        "register bigger files with `studio datasets add`)")
    # ---- what it serves
    p.add_argument("--base", default="tiny-moe", help="base model the Playground and Compare serve (default tiny-moe)")
    p.add_argument("--quant", default="4bit", choices=["4bit", "8bit", "none"],
                   help="quantization of that base (default 4bit, experts included)")
    p.add_argument("--max-jobs", type=int, default=1,
                   help="training jobs running at once; more wait in a queue (default 1)")
    p.add_argument("--jobs-root", default=None, help="job table and job directories (default $STUDIO_JOBS_ROOT "
                                                      "or runs/ui-jobs in the checkout)")


UI_DEFAULT_MAX_UPLOAD = 64 * 1024 * 1024


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(args: argparse.Namespace, block: bool = True):
    """Build the context and the app from parsed arguments and serve it. Returns (demo, ctx)."""
    from studio.data.formats import max_bytes_from_env
    from studio.ui.context import StudioContext

    auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV))
    if not _is_loopback(args.host) and not auth:
        print(f"warning: serving on {args.host} without --auth: anyone who can reach this port can train, delete "
              "and push adapters", file=sys.stderr)
    # a browser upload is buffered to disk and inspected in the app's process: keep the default modest
    max_file_size = args.max_file_size or max_bytes_from_env(UI_DEFAULT_MAX_UPLOAD)
    ctx = StudioContext(base=args.base, quant=args.quant, jobs_root=args.jobs_root, max_running_jobs=args.max_jobs)
    ctx.jobs.start_scheduler()
    from studio.ui.train_tab import warm_up

    warm_up()
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=args.port, auth=auth, max_file_size=max_file_size,
                show_error=True, prevent_thread_lock=not block, css=CSS, footer_links=["api"],
                auth_message="MoE LoRA Studio: sign in")
    return demo, ctx


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    launch(args, block=True)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("ui", help="launch the Gradio studio", description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python app.py ...` is `studio ui ...` (same flags, same error handling)."""
    from studio.cli import main as cli_main

    return cli_main(["ui", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
