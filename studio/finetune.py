"""Fine-tune a LoRA adapter on a (quantized) MoE base: `python -m studio.finetune --dataset law`.

Flags override `--config recipe.yaml`; `--dry-run` prints the plan and a memory estimate without loading weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

from studio.errors import StudioError
from studio.train import TrainConfig

_BOOL_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("bool", bool)}
_SHORT = {"grad_accum": "--grad-accum", "seq_len": "--seq-len", "learning_rate": "--lr"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # ---- recipe & modes
    parser.add_argument("--config", help="YAML recipe; command-line flags override its values")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the LoRA plan and a memory estimate, then exit without loading weights")
    parser.add_argument("--device-memory", default=None,
                        help="memory budget for the dry-run check, e.g. 80GiB (default: this machine's)")
    parser.add_argument("--num-devices", type=int, default=1,
                        help="dry run: estimate per device for FSDP2 over N devices (default 1)")
    # ---- every TrainConfig field, with its help text
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + ([_SHORT[f.name]] if f.name in _SHORT and _SHORT[f.name] != flag else [])
        help_ = f.metadata.get("help", "")
        if f.name in _BOOL_FIELDS:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_} (default: {f.default})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], None)
            if f.name in ("router_aux_coef",):
                kind = float
            parser.add_argument(*names, dest=f.name, type=kind or str, default=None,
                                help=f"{help_} (default: {f.default})")


def load_recipe(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise StudioError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise StudioError(f"recipe {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise StudioError(f"recipe {path} must be a mapping of TrainConfig fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {difflib.get_close_matches(u, known, 1)[0]}?)"
                 if difflib.get_close_matches(u, known, 1) else u for u in unknown]
        raise StudioError(f"recipe {path}: unknown keys {', '.join(hints)}")
    return data


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return build_config(args.config, {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)})


def build_config(recipe: str | None, overrides: dict) -> TrainConfig:
    """The recipe's values (if any), overridden by every option that is not None: the CLI and `studio.finetune`."""
    values = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:
        raise StudioError(f"invalid training configuration: {exc}") from exc
    cfg.lora_settings()  # validates r, alpha, dropout early
    from studio.experts.selection import parse_selection

    parse_selection(cfg.expert_selection)  # and the expert selection's form
    return cfg


@functools.lru_cache(maxsize=8)
def meta_parts(base: str):
    """A weightless (meta-device) copy of the base with its MoE components, the experts swapped for the studio's:
    what dry runs and the web UI plan on. Cached per base (building the config and the meta model is the slow part).
    """
    from studio.models.memory import meta_model
    from studio.models.resolve import require_moe, resolve_base
    from studio.moe.arch import find_components, resolve_arch
    from studio.moe.experts import replace_experts

    config = resolve_base(base, config_only=True).config
    require_moe(config, base)
    model = meta_model(config)
    arch = resolve_arch(model)
    comps = find_components(model, arch)
    replace_experts(model, comps.routed_experts, None)
    return config, model, arch, comps


def plan_and_estimate(cfg: TrainConfig, device_memory: str | None = None, num_devices: int = 1):
    """The LoRA plan of `cfg` on its base and training-memory estimates for the chosen quantization, QLoRA 4-bit and
    16-bit LoRA (in that order, without repeats), per device of `num_devices` under FSDP2; loads no weights."""
    from studio.models.memory import estimate_training_memory, parse_bytes
    from studio.moe.plan import build_plan

    config, model, arch, comps = meta_parts(cfg.base)
    plan = build_plan(model, arch, comps, cfg.targets, cfg.lora_settings())
    budget = parse_bytes(device_memory) if device_memory else None
    groups = sorted({g.group for g in plan.groups})
    estimates = [estimate_training_memory(config, quant=q, r=cfg.r, targets=groups, seq_len=cfg.seq_len,
                                          batch_size=cfg.batch_size, grad_checkpointing=cfg.grad_checkpointing,
                                          double_quant=cfg.double_quant, device_bytes=budget,
                                          num_devices=num_devices)
                 for q in dict.fromkeys([cfg.quant, "4bit", "none"])]
    return plan, estimates


def dry_run(cfg: TrainConfig, device_memory: str | None = None, num_devices: int = 1) -> int:
    """Plan on a weightless (meta-device) copy of the base and estimate memory; loads no weights."""
    from studio.models.memory import count_parameters, format_comparison, min_devices_line, parse_bytes

    plan, estimates = plan_and_estimate(cfg, device_memory, num_devices)
    print(f"base {cfg.base}")
    print(count_parameters(meta_parts(cfg.base)[0]).format_report())  # total and active-per-token parameters
    print()
    print(plan.format())
    if cfg.expert_selection != "all":
        print(f"--expert-selection {cfg.expert_selection}: the experts are chosen from a routing profile of the "
              "training split when training starts (`studio experts profile` shows them now); the count above is for "
              "LoRA on every expert")
    print()
    print(format_comparison(estimates))
    line = min_devices_line(meta_parts(cfg.base)[0], estimates, double_quant=cfg.double_quant)
    if line:
        print(line)
    if not estimates[0].fits(parse_bytes(device_memory) if device_memory else None):
        print(f"\nwarning: quant={cfg.quant} is estimated NOT to fit; try --quant 4bit, a smaller --batch-size or "
              f"--seq-len, or --grad-checkpointing", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from studio.train import is_main_process, run_training

    cfg = config_from_args(args)
    if args.dry_run:
        return dry_run(cfg, args.device_memory, args.num_devices)
    result = run_training(cfg)
    if not is_main_process():  # the summary once, from the process that wrote the adapter
        return 0
    m = result.metrics
    print()
    if "eval_loss_before" in m and "eval_loss" in m:
        delta = m["eval_loss"] - m["eval_loss_before"]
        print(f"held-out loss on {cfg.dataset}: before {m['eval_loss_before']:.4f} -> after {m['eval_loss']:.4f} "
              f"({delta:+.4f}, perplexity {m.get('eval_perplexity', float('nan')):.2f})")
    print(f"adapter: {result.adapter_dir}" + (f"  registry: {result.registry_ref}" if result.registry_ref else ""))
    if result.cancelled:
        print(f"training was cancelled; resume with --output {result.run_dir} --resume latest")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="train a LoRA adapter on a (quantized) MoE base",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python -m studio.finetune ...` is `studio finetune ...` (same flags, same error handling)."""
    from studio.cli import main as cli_main

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
