"""The `studio` command: one subcommand per job, each a thin shell over the Python API.

Run `studio --help`. Each subcommand lives next to the code it drives and exposes
`register(subparsers)`; the module is imported only when its subcommand is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from studio import _openmp
from studio.errors import StudioError

# subcommand -> (module holding `register(subparsers)`, one-line help)
SUBCOMMANDS = {
    "datasets": ("studio.data.cli", "register, list, inspect and remove datasets"),
    "models": ("studio.models.cli", "build, inspect and plan memory for base models"),
    "finetune": ("studio.finetune", "train a LoRA adapter on a (quantized) MoE base"),
    "registry": ("studio.registry.cli", "versioned adapter registry: list, show, promote, push, pull"),
    "serve": ("studio.server", "OpenAI-compatible server with per-request adapter hot-swap"),
    "experts": ("studio.experts.cli", "profile which experts a dataset routes to; preview expert selections"),
    "eval": ("studio.eval", "compare the base and adapters on held-out domain data"),
    "export": ("studio.export", "write a registered adapter as PEFT files, per-expert LoRA or a merged checkpoint"),
    "ui": ("studio.ui.app", "launch the Gradio studio"),
}
# subcommands that decode from several threads: OpenMP workers spin between operators (studio/_openmp.py)
DECODING = {"serve", "ui", "eval"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="studio", description="MoE LoRA Studio")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module_name, help_ = SUBCOMMANDS[name]
    if name in DECODING:
        _openmp.spin_between_operators()  # before the subcommand's module imports torch
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"error: `studio {name}` is not available in this version", file=sys.stderr)
            return 2
        raise
    real = argparse.ArgumentParser(prog="studio")
    real_sub = real.add_subparsers(dest="command", required=True)
    module.register(real_sub)
    args = real.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the filesystem said no (full disk, read-only, permissions): say so, no traceback
        print(f"error: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def os_error_text(exc: OSError) -> str:
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    fix = {errno.ENOSPC: "free some space and retry", errno.EROFS: "this location is read-only; use a writable one",
           errno.EACCES: "check the permissions", errno.EPERM: "check the permissions"}.get(exc.errno, "")
    return f"{exc.strerror or exc}{where}" + (f": {fix}" if fix else "")


if __name__ == "__main__":
    sys.exit(main())
