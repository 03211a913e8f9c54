"""`studio datasets ...`: add, list, show, inspect and remove datasets. A thin shell over
`studio.data` (run `studio datasets --help`)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from pathlib import Path

from studio.data.formats import inspect_file
from studio.data.registry import DatasetRegistry, sanitise_name


def register(subparsers) -> None:
    p = subparsers.add_parser("datasets", help="register, list, inspect and remove datasets",
                              description="The datasets registry: versioned, normalised chat datasets.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = sub.add_parser("add", help="register a file (JSONL, JSON, CSV, Parquet, TXT) under a name")
    add.add_argument("file", help="the dataset file")
    add.add_argument("--name", help="dataset name (default: the file stem, sanitised)")
    add.add_argument("--eval-file", help="an explicit held-out eval file (instead of a ratio split)")
    add.add_argument("--eval-ratio", type=float, default=0.1, help="fraction held out for eval (default 0.1)")
    add.add_argument("--seed", type=int, default=0, help="seed of the deterministic split (default 0)")
    add.add_argument("--on-empty-assistant", choices=("drop", "error"), default="drop",
                     help="rows with an empty assistant turn: drop and count them (default) or fail")
    add.add_argument("--allow-system-file", action="store_true",
                     help="read a file under /etc, /proc, /sys, /dev ... (refused by default)")
    add.add_argument("--json", action="store_true", help="print the version as JSON")
    add.set_defaults(func=_add)

    ls = sub.add_parser("list", help="list registered versions and the shipped samples")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    show = sub.add_parser("show", help="preview rows and statistics of a version")
    show.add_argument("ref", help="`law` (latest), `law@v2` or `law@<hash prefix>`")
    show.add_argument("--rows", type=int, default=3, help="rows to preview (default 3)")
    show.add_argument("--no-stats", action="store_true", help="skip token statistics")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)

    insp = sub.add_parser("inspect", help="detect a file's format and preview it without registering")
    insp.add_argument("file", help="the dataset file")
    insp.add_argument("--rows", type=int, default=3, help="rows to preview (default 3)")
    insp.add_argument("--allow-system-file", action="store_true",
                      help="read a file under /etc, /proc, /sys, /dev ... (refused by default)")
    insp.add_argument("--json", action="store_true", help="print JSON")
    insp.set_defaults(func=_inspect)

    rm = sub.add_parser("rm", help="remove `law@v2` (one version) or `law` (all its versions)")
    rm.add_argument("ref", help="dataset reference")
    rm.add_argument("--force", action="store_true", help="remove it even if adapters were trained on it")
    rm.set_defaults(func=_rm)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _print_rows(rows) -> None:
    for i, messages in enumerate(rows, start=1):
        print(f"--- row {i}")
        for m in messages:
            content = m["content"] if len(m["content"]) <= 300 else m["content"][:300] + " ..."
            print(f"  [{m['role']}] {content}")


def _describe(v) -> str:
    dropped = sum(v.dropped.values())
    extra = f", {dropped} dropped ({', '.join(f'{k}: {n}' for k, n in v.dropped.items())})" if dropped else ""
    return f"{v.ref}  {v.hash[:12]}  {v.format}  train {v.rows_train}, eval {v.rows_eval}{extra}"


def _add(args) -> int:
    reg = DatasetRegistry(allow_system_files=args.allow_system_file)
    # an explicit --name "" is a mistake to report, not a request for the default
    name = args.name if args.name is not None else sanitise_name(Path(args.file).stem)
    before = {v.hash for v in reg.versions(name)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = reg.add(args.file, name, eval_path=args.eval_file, eval_ratio=args.eval_ratio, seed=args.seed,
                    on_empty_assistant=args.on_empty_assistant)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.json:
        _print_json(v.to_dict())
    else:
        print(("already registered: " if v.hash in before else "registered ") + _describe(v))
    return 0


def _list(args) -> int:
    reg = DatasetRegistry()
    versions = reg.list()
    registered = {v.name for v in versions}
    samples = [s for s in reg.shipped_samples() if s["name"] not in registered]
    if args.json:
        _print_json({"versions": [v.to_dict() for v in versions],
                     "samples_available": [s["name"] for s in samples]})
        return 0
    if versions:
        table = [("REF", "HASH", "FORMAT", "TRAIN", "EVAL", "DROPPED", "CREATED")]
        table += [(v.ref, v.hash[:12], v.format, str(v.rows_train), str(v.rows_eval),
                   str(sum(v.dropped.values())), v.created) for v in versions]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    else:
        print(f"no datasets registered in {reg.root}")
    if samples:
        print("shipped samples (registered on first use): " + ", ".join(s["name"] for s in samples))
    return 0


def _show(args) -> int:
    reg = DatasetRegistry()
    v = reg.get(args.ref)
    rows = reg.preview(v.ref, n=args.rows)
    stats = None if args.no_stats else reg.stats(v.ref)
    if args.json:
        _print_json({"version": v.to_dict(), "preview": rows, "stats": stats})
        return 0
    print(_describe(v))
    print(f"created {v.created}  source {v.source}  split {json.dumps(v.split)}")
    if stats:
        for split, t in stats["tokens"].items():
            print(f"tokens/{split}: min {t['min']}, median {t['median']}, max {t['max']}, total {t['total']} "
                  f"({stats['tokenizer']})")
        if stats.get("estimated_rows"):
            print(f"token counts of {stats['estimated_rows']} very long row(s) are estimated from samples")
    _print_rows(rows)
    return 0


def _inspect(args) -> int:
    info = inspect_file(args.file, n=args.rows, allow_system_files=args.allow_system_file)
    if args.json:
        _print_json(info)
    else:
        if info["errors"]:
            for e in info["errors"]:
                print(f"error: {e}")
        else:
            print(f"{info['path']}: {info['file_format']} file, format {info['format']}, {info['rows']} rows"
                  + (f", dropped {info['dropped']}" if info["dropped"] else ""))
            _print_rows(info["preview"])
    return 2 if info["errors"] else 0


def _rm(args) -> int:
    removed = DatasetRegistry().remove(args.ref, force=args.force)
    for v in removed:
        print(f"removed {v.ref} ({v.hash[:12]})")
    return 0
