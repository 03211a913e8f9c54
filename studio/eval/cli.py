"""`studio eval` / `python -m studio.eval`: compare the base and adapters on held-out domain data.

    python -m studio.eval --base tiny-moe --models base,law@v2,law@v3 --dataset law --out runs/eval-law
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    # ---- what to compare
    p.add_argument("--base", default="tiny-moe", help="base model: embedded name | local dir | hub id "
                                                      "(default: tiny-moe)")
    p.add_argument("--models", default=None,
                   help="comma-separated models: base and registry references, e.g. base,law@v2,law@prod "
                        "(default: base and the latest adapter of the dataset's domain)")
    p.add_argument("--dataset", default="law", help="main held-out set: dataset ref (law, law@v2) or a file "
                                                    "(default: law)")
    p.add_argument("--domains", default=None,
                   help="held-out sets for the cross-domain matrix, comma-separated, or 'none' "
                        "(default: the dataset plus every shipped domain: law, medicine, code)")
    p.add_argument("--prompts", default=None, help="prompts file for side-by-side generations (.txt one per line, "
                                                  ".json/.jsonl with prompt/messages and optional reference)")
    # ---- how much
    p.add_argument("--max-examples", type=int, default=64, help="held-out examples per domain for loss and routing")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--seq-len", type=int, default=512, help="truncate held-out sequences to this many tokens")
    p.add_argument("--gen-prompts", type=int, default=8,
                   help="held-out prompts generated for reference metrics and side by side (0: none)")
    # ---- decoding (the same for every model)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, identical for every model")
    # ---- base loading and routing
    p.add_argument("--quant", default="4bit", choices=["none", "8bit", "4bit"], help="how the base is loaded")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--routing", default="assistant", choices=["assistant", "all", "off"],
                   help="record expert routing on assistant tokens, all non-padding tokens, or off")
    # ---- output
    p.add_argument("--out", default=None, help="output directory (default: runs/eval-<dataset>-<time>)")
    p.add_argument("--no-record", action="store_true", help="do not write results into the adapter registry")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of Markdown")


def run(args) -> int:
    from studio.eval.runner import evaluate

    def progress(fraction: float, message: str) -> None:
        print(f"[{100 * fraction:3.0f}%] {message}", file=sys.stderr, flush=True)

    report = evaluate(args.base, models=args.models, dataset=args.dataset, domains=args.domains,
                      prompts=args.prompts, max_eval_examples=args.max_examples, batch_size=args.batch_size,
                      seq_len=args.seq_len, gen_prompts=args.gen_prompts, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      routing=None if args.routing == "off" else args.routing, record=not args.no_record,
                      quant=args.quant, device=args.device, progress=progress)
    out = Path(args.out) if args.out else Path("runs") / f"eval-{report.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = report.save(out)
    print(report.to_json() if args.json else report.markdown())
    print(f"wrote {', '.join(Path(p).name for p in paths.values())} to {out}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="compare the base and adapters on held-out domain data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    from studio.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])
