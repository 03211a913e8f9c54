"""`studio registry ...`: a thin shell over AdapterRegistry. Tables for people, `--json` for scripts.

Run `studio registry --help`; the root is `--root DIR`, else $STUDIO_ADAPTERS_ROOT, else ./adapters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import warnings

from studio.errors import RegistryError


def register(subparsers) -> None:
    # ---- arguments ----------------------------------------------------------------------------
    def common(parser, top=False):
        # accepted before or after the subcommand; a leaf leaves them unset unless given
        default = None if top else argparse.SUPPRESS
        parser.add_argument("--root", default=default,
                            help="registry root directory (default: $STUDIO_ADAPTERS_ROOT or ./adapters)")
        parser.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                            help="print machine-readable JSON instead of tables")
        return parser

    p = common(subparsers.add_parser("registry", help="versioned adapter registry",
                                     description="Versioned domain adapters: register, resolve, alias, diff, "
                                                 "push/pull."), top=True)
    p.set_defaults(func=lambda a: p.print_help() or 2)
    sub = p.add_subparsers(dest="registry_command", metavar="COMMAND")

    def cmd(name, func, help_, **kw):
        sp = common(sub.add_parser(name, help=help_, description=help_, **kw))
        sp.set_defaults(func=_run(func))
        return sp

    def fingerprint_flags(sp):
        sp.add_argument("--base-fingerprint", help="fingerprint of the base you will load it on; checked")
        sp.add_argument("--allow-base-mismatch", action="store_true", help="warn instead of failing on a mismatch")

    sp = cmd("list", _list, "list versions (all domains, or one)")
    sp.add_argument("domain", nargs="?", help="only this domain")
    sp = cmd("show", _show, "show one version: lineage, metrics, files, aliases")
    sp.add_argument("ref", help="law, law@v3, law@prod or law@<sha prefix>")
    fingerprint_flags(sp)
    sp = cmd("path", _path, "print a read-only directory with the version's PEFT files")
    sp.add_argument("ref", help="law, law@v3, law@prod or law@<sha prefix>")
    fingerprint_flags(sp)
    sp = cmd("register", _register, "register a trainer output directory as the next version")
    sp.add_argument("dir", help="directory with adapter_config.json, adapter_model.safetensors, studio_adapter.json")
    sp.add_argument("--domain", help="domain (default: 'domain' in studio_adapter.json)")
    sp.add_argument("--parent", help="version this one was trained from (default: from studio_adapter.json)")
    sp.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    sp.add_argument("--notes", default="", help="free-text notes")
    sp = cmd("promote", _promote, "point an alias (prod, staging, any name) at a version")
    sp.add_argument("ref", help="version to promote, e.g. law@v3")
    sp.add_argument("alias", help="alias name, e.g. prod")
    sp = cmd("rollback", _rollback, "move an alias back to its previous target (history kept)")
    sp.add_argument("domain", help="domain, or DOMAIN@ALIAS")
    sp.add_argument("alias", nargs="?", help="alias name, e.g. prod")
    sp = cmd("history", _history, "every move of an alias")
    sp.add_argument("domain", help="domain, or DOMAIN@ALIAS")
    sp.add_argument("alias", nargs="?", help="alias name, e.g. prod")
    sp = cmd("diff", _diff, "compare two versions: config, plan, base, dataset, hyperparameters, metrics, files")
    sp.add_argument("a")
    sp.add_argument("b")
    sp = cmd("rm", _rm, "remove a version (refused while an alias points at it)")
    sp.add_argument("ref")
    sp.add_argument("--force", action="store_true", help="remove even if aliases point at it (deletes them)")
    cmd("gc", _gc, "delete blobs no version references, temp files, stale checkouts")
    cmd("verify", _verify, "check the catalog and re-hash every blob (exit 1 on problems)")
    sp = cmd("metrics", _metrics, "append eval results to a version")
    sp.add_argument("ref")
    sp.add_argument("source", help="where the numbers come from, e.g. eval-heldout")
    sp.add_argument("values", nargs="+", metavar="KEY=VALUE", help="e.g. perplexity=3.2")

    rp = common(sub.add_parser("remote", help="manage remote stores"))
    rp.set_defaults(func=lambda a: rp.print_help() or 2)
    rsub = rp.add_subparsers(dest="remote_command", metavar="COMMAND")
    sp = common(rsub.add_parser("add", help="add a remote: file://..., s3://bucket/prefix, hf://org"))
    sp.add_argument("name")
    sp.add_argument("url")
    sp.add_argument("--endpoint-url", help="S3-compatible endpoint (sets client_kwargs.endpoint_url)")
    sp.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                    help="an fsspec storage option (repeatable); credentials belong in the environment")
    sp.add_argument("--create", action="store_true",
                    help="create a file:// remote directory that does not exist yet (refused otherwise: a typo in "
                         "the path would silently start an empty remote)")
    sp.set_defaults(func=_run(_remote_add))
    sp = common(rsub.add_parser("list", help="list remotes"))
    sp.set_defaults(func=_run(_remote_list))
    sp = common(rsub.add_parser("rm", help="forget a remote (nothing on it is deleted)"))
    sp.add_argument("name")
    sp.set_defaults(func=_run(_remote_rm))

    sp = cmd("push", _push, "upload a version (and move the remote alias for law@prod)")
    sp.add_argument("ref")
    sp.add_argument("remote", nargs="?", help="remote name (default: the only one, or origin)")
    sp.add_argument("--force", action="store_true", help="move the remote alias even if someone else moved it")
    sp.add_argument("--verify-remote", action="store_true",
                    help="re-hash blobs already on the remote and re-upload damaged ones (slower)")
    sp = cmd("pull", _pull, "download and verify a version (and set the local alias for law@prod)")
    sp.add_argument("ref")
    sp.add_argument("remote", nargs="?", help="remote name (default: the only one, or origin)")
    sp = cmd("sync", _sync, "push what the remote lacks, pull what it has, reconcile aliases")
    sp.add_argument("remote", nargs="?", help="remote name (default: the only one, or origin)")


# ---- plumbing ---------------------------------------------------------------------------------

def _run(func):
    def wrapped(args):
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
        from studio.registry import AdapterRegistry
        reg = AdapterRegistry(args.root)
        try:
            return func(reg, args) or 0
        finally:
            reg.close()
    return wrapped


def _emit(args, data, human) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        human()


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(c) if c is not None else "-" for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(row):
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def _width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 160))


def _print_tree(val, depth: int) -> None:
    """Nested lineage (plan, base, hyperparameters) as indented `key: value` lines; long lists of names wrap at the
    terminal width instead of one JSON line thousands of characters long (`--json` keeps the machine form)."""
    pad = "  " * depth
    if isinstance(val, dict):
        for k, x in val.items():
            if isinstance(x, dict) or (isinstance(x, list) and not _flat(x)):
                print(f"{pad}{k}:")
                _print_tree(x, depth + 1)
            else:
                _print_leaf(f"{pad}{k}: ", x)
    elif isinstance(val, list):
        for i, x in enumerate(val):
            if isinstance(x, (dict, list)):
                print(f"{pad}- [{i}]")
                _print_tree(x, depth + 1)
            else:
                _print_leaf(f"{pad}- ", x)


def _flat(items: list) -> bool:
    """Names, numbers, or shapes (lists of numbers): printed on one wrapped line (`8x128x64, 8x64x64`)."""
    return all(not isinstance(i, (dict, list)) or (isinstance(i, list) and
                                                    not any(isinstance(j, (dict, list)) for j in i)) for i in items)


def _print_leaf(head: str, x) -> None:
    if isinstance(x, list):
        text = ", ".join("x".join(map(str, i)) if isinstance(i, list) else str(i) for i in x) or "[]"
    else:
        text = "-" if x is None else str(_num(x))
    print(textwrap.fill(text, _width(), initial_indent=head, subsequent_indent=" " * len(head),
                        break_on_hyphens=False, break_long_words=False))


def _cell(x, n: int = 40) -> str:
    """A diff cell: short enough that the table stays readable (`--json` has the full values)."""
    text = json.dumps(x, sort_keys=True) if isinstance(x, (dict, list)) else ("-" if x is None else str(_num(x)))
    return text if len(text) <= n else text[: n - 1] + "…"


def _num(x):
    return f"{x:.4g}" if isinstance(x, float) else x


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def _row(v) -> list:
    ds = v.metadata.get("dataset") or {}
    base = v.metadata.get("base") or {}
    return [v.ref, v.short_sha, v.created[:19].replace("T", " "), ",".join(v.aliases) or None, base.get("id"),
            ds.get("ref") or ds.get("name"), _num(v.metrics.get("train_loss")), _num(v.metrics.get("eval_loss")),
            _size(v.size), ",".join(v.tags) or None]


HEADERS = ["REF", "SHA", "CREATED (UTC)", "ALIASES", "BASE", "DATASET", "TRAIN_LOSS", "EVAL_LOSS", "SIZE", "TAGS"]


# ---- commands ---------------------------------------------------------------------------------

def _list(reg, args):
    versions = reg.list(args.domain)
    _emit(args, [v.to_dict() for v in versions],
          lambda: print(table([_row(v) for v in versions], HEADERS) if versions else
                        f"no adapters registered in {reg.root}"))


def _show(reg, args):
    v = reg.resolve(args.ref, base_fingerprint=args.base_fingerprint, allow_mismatch=args.allow_base_mismatch)

    def human():
        print(f"{v.ref}  sha256:{v.sha}")
        print(f"  created   {v.created}   origin {v.origin}")
        print(f"  aliases   {', '.join(v.aliases) or '-'}")
        print(f"  parent    {v.parent or '-'}")
        print(f"  tags      {', '.join(v.tags) or '-'}")
        if v.notes:
            print(f"  notes     {v.notes}")
        for key, val in v.lineage.items():
            if key not in ("parent", "created") and val:
                print(f"  {key}:" if isinstance(val, (dict, list)) else f"  {key:<9} {val}")
                if isinstance(val, (dict, list)):
                    _print_tree(val, 2)
        print("metrics:")
        for e in v.metrics_history or [{"source": "-", "at": "", "metrics": {}}]:
            values = ", ".join(f"{k}={_num(x)}" for k, x in e["metrics"].items())
            print(f"  {e['source']:<14} {e['at'][:19]}  {values}")
        print("files:")
        print(table([[f["path"], _size(f["size"]), f["sha256"][:12]] for f in v.files], ["PATH", "SIZE", "SHA"]))
    _emit(args, v.to_dict(), human)


def _path(reg, args):
    path = reg.path(args.ref, base_fingerprint=args.base_fingerprint, allow_mismatch=args.allow_base_mismatch)
    _emit(args, {"ref": reg.resolve(args.ref).ref, "path": str(path)}, lambda: print(path))


def _register(reg, args):
    before = {v.sha for v in reg.list()} if not args.json else None
    v = reg.register(args.dir, domain=args.domain, parent=args.parent, tags=args.tag, notes=args.notes)
    again = before is not None and v.sha in before
    _emit(args, v.to_dict(), lambda: print(f"{'already registered as' if again else 'registered'} {v.ref} "
                                          f"(sha {v.short_sha}, {len(v.files)} files, {_size(v.size)})"))


def _promote(reg, args):
    v = reg.promote(args.ref, args.alias)
    _emit(args, v.to_dict(), lambda: print(f"{v.domain}@{args.alias} -> {v.ref}"))


def _domain_alias(args) -> tuple[str, str]:
    """`rollback law prod` or `rollback law@prod`."""
    if args.alias is None:
        domain, at, alias = args.domain.partition("@")
        if not at or not alias:
            raise RegistryError(f"name the alias: `{args.domain} ALIAS` or `{args.domain}@ALIAS` (e.g. law prod)")
        args.domain, args.alias = domain, alias
    return args.domain, args.alias


def _rollback(reg, args):
    v = reg.rollback(*_domain_alias(args))
    _emit(args, v.to_dict(), lambda: print(f"{args.domain}@{args.alias} rolled back to {v.ref}"))


def _history(reg, args):
    h = reg.alias_history(*_domain_alias(args))
    rows = [[e["at"][:19].replace("T", " "), e["action"], e["previous"], e["ref"], e["note"]] for e in h]
    _emit(args, h, lambda: print(table(rows, ["AT (UTC)", "ACTION", "FROM", "TO", "NOTE"])))


def _diff(reg, args):
    d = reg.diff(args.a, args.b)

    def human():
        rows = []
        for section, changes in d.items():
            if section in ("a", "b", "files"):
                continue
            for key, pair in changes.items():
                rows.append([section, key, _cell(pair["a"]), _cell(pair["b"]),
                             _num(pair["delta"]) if "delta" in pair else None])
        for kind, paths in d["files"].items():
            rows += [["files", p, None, kind, None] for p in paths]
        print(f"{d['a']} vs {d['b']}")
        print(table(rows, ["SECTION", "KEY", d["a"], d["b"], "DELTA"]) if rows else "identical")
    _emit(args, d, human)


def _rm(reg, args):
    v = reg.remove(args.ref, force=args.force)
    _emit(args, {"removed": v.ref, "sha": v.sha},
          lambda: print(f"removed {v.ref} (blobs are freed by `studio registry gc`)"))


def _gc(reg, args):
    s = reg.gc()
    _emit(args, s, lambda: print(f"removed {s['blobs_removed']} blobs ({_size(s['bytes_freed'])}), kept "
                                 f"{s['blobs_kept']}; {s['tmp_removed']} temp entries, "
                                 f"{s['checkouts_removed']} checkouts"))


def _verify(reg, args):
    r = reg.verify()
    _emit(args, r.to_dict(), lambda: print(
        f"{'ok' if r.ok else 'PROBLEMS'}: integrity_check={r.integrity_check}, {r.versions} versions, "
        f"{r.blobs} blobs checked"
        + "".join(f"\n  {p}" for p in r.problems)))
    return 0 if r.ok else 1


def _metrics(reg, args):
    values = {}
    for item in args.values:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise RegistryError(f"metric {item!r} is not KEY=VALUE (e.g. perplexity=3.2)")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    entry = reg.append_metrics(args.ref, values, args.source)
    _emit(args, entry, lambda: print(f"recorded {args.source} metrics for {reg.resolve(args.ref).ref}"))


def _remote_add(reg, args):
    options = {}
    for item in args.option:
        key, eq, raw = item.partition("=")
        if not eq:
            raise RegistryError(f"--option {item!r} is not KEY=JSON (e.g. --option anon=true)")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    if args.endpoint_url:
        options.setdefault("client_kwargs", {})["endpoint_url"] = args.endpoint_url
    r = reg.remote_add(args.name, args.url, create=args.create, **options)
    _emit(args, r, lambda: print(f"added remote {r['name']} -> {r['url']}"))


def _remote_list(reg, args):
    rs = reg.remotes()
    _emit(args, rs, lambda: print(table([[r["name"], r["url"], json.dumps(r["options"]) if r["options"] else None]
                                         for r in rs], ["NAME", "URL", "OPTIONS"]) if rs else "no remotes"))


def _remote_rm(reg, args):
    reg.remote_remove(args.name)
    _emit(args, {"removed": args.name}, lambda: print(f"removed remote {args.name}"))


def _push(reg, args):
    r = reg.push(args.ref, args.remote, force=args.force, verify_remote=args.verify_remote)

    def human():
        metrics = f", {r['metrics']} metrics entries" if r["metrics"] else ""
        print(f"{r['ref']} -> {r['remote']}: {r['version']}{metrics}")
        if r["alias"]:
            print(f"alias {r['alias']['alias']}: {r['alias']['status']} (generation {r['alias']['generation']})")
    _emit(args, r, human)


def _pull(reg, args):
    v = reg.pull(args.ref, args.remote)
    _emit(args, v.to_dict(), lambda: print(f"pulled {v.ref} (sha {v.short_sha}, all checksums verified)"))


def _sync(reg, args):
    s = reg.sync(args.remote)

    def human():
        for key in ("pushed", "pulled", "aliases_pushed", "aliases_pulled", "skipped_removed"):
            print(f"{key.replace('_', ' ')}: {', '.join(s[key]) or '-'}")
        for c in s["conflicts"]:
            print(f"conflict: {c}")
    _emit(args, s, human)
    return 1 if s["conflicts"] else 0
