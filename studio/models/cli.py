"""`studio models ...`: list and build the embedded bases, show how a `--base` resolves, and plan training
memory. A thin shell over `studio.models.resolve` and `studio.models.memory` (run `studio models --help`)."""

from __future__ import annotations

import json

from studio.errors import ModelError
from studio.models import memory, resolve


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="build, inspect and plan memory for base models",
                              description="Base models: the embedded tiny MoEs, local directories and hub ids.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    ls = sub.add_parser("list", help="embedded bases (parameter counts, built or not) and shipped known configs")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    build = sub.add_parser("build", help="build an embedded base into the models cache")
    build.add_argument("name", help="embedded base name, e.g. tiny-moe")
    build.add_argument("--json", action="store_true", help="print JSON")
    build.set_defaults(func=_build)

    pre = sub.add_parser("pretrain", help="pretrain tiny-moe on the shipped corpus (rebuilds its committed weights)",
                         description="Full-parameter pretraining of tiny-moe on the committed CPython-documentation "
                                     "corpus, deterministic on one machine type; compares the result's sha256 with "
                                     "the shipped weights'. 600 steps: about 7 minutes on an idle 2-core VM.")
    pre.add_argument("name", help="the base to pretrain: tiny-moe")
    pre.add_argument("--out", default=None,
                     help="folder for model.safetensors and pretrained.json (default: the shipped assets, "
                          "studio/assets/tiny-moe, which the embedded base loads)")
    pre.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the shipped run's)")
    pre.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the shipped run's, 2)")
    pre.set_defaults(func=_pretrain)

    show = sub.add_parser("show", help="resolve a --base reference and print what it is")
    show.add_argument("--base", required=True, help="embedded name, local directory, config.json or hub id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)

    plan = sub.add_parser("plan", help="parameter counts and LoRA / QLoRA training-memory estimates",
                          description="Counts parameters from the config alone (meta device) and estimates "
                                      "training memory. Estimates are rough (expect +-20%%).")
    # what to plan for
    plan.add_argument("--base", required=True,
                      help="embedded name, local directory, config.json path, or hub id (uncached hub ids use the "
                           "shipped copy of their published config when known)")
    plan.add_argument("--quant", choices=memory.QUANT_MODES, default="4bit",
                      help="base quantization to estimate (default 4bit); 16-bit is always shown beside it")
    plan.add_argument("--double-quant", action="store_true", help="4-bit: also quantize the absmax statistics")
    # LoRA and batch shape
    plan.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    plan.add_argument("--targets", default="attention,experts",
                      help="LoRA targets: a preset (attention, experts, shared_experts, all, full) or groups, "
                           "comma-separated (default attention,experts, as in finetune and the web UI)")
    plan.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    plan.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    plan.add_argument("--no-grad-checkpointing", action="store_true", help="estimate without gradient checkpointing")
    plan.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                      help="dtype of activations and unquantized weights (default bfloat16)")
    # device
    plan.add_argument("--device-memory", default=None,
                      help="memory to fit, e.g. 80GiB, 24GB (default: the CUDA GPU if any, else system RAM)")
    plan.add_argument("--num-devices", type=int, default=1,
                      help="estimate per device for FSDP2 over N devices (default 1: one device, no sharding)")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(func=_plan)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _list(args) -> int:
    from studio.models import tiny

    embedded = []
    for name in tiny.EMBEDDED:
        counts = memory.count_parameters(tiny.make_config(name))
        path = resolve.embedded_built_path(name)
        embedded.append({"name": name, "model_type": counts.model_type, "total": counts.total,
                         "active": counts.active, "built": path is not None, "path": str(path) if path else None})
    known = []
    for hub_id in resolve.known_configs():
        counts = memory.count_parameters(resolve.known_config(hub_id))
        known.append({"id": hub_id, "model_type": counts.model_type, "total": counts.total, "active": counts.active})
    if args.json:
        _print_json({"embedded": embedded, "known_configs": known})
        return 0
    print("embedded bases (built locally, offline):")
    print(f"  {'name':<16}{'model_type':<14}{'total':>10}{'active':>10}  built")
    for e in embedded:
        built = e["path"] if e["built"] else f"no (studio models build {e['name']})"
        print(f"  {e['name']:<16}{e['model_type']:<14}{memory.human_count(e['total']):>10}"
              f"{memory.human_count(e['active']):>10}  {built}")
    print("known configs (offline planning only; training needs a local copy of the weights):")
    print(f"  {'id':<32}{'model_type':<14}{'total':>10}{'active':>10}")
    for k in known:
        print(f"  {k['id']:<32}{k['model_type']:<14}{memory.human_count(k['total']):>10}"
              f"{memory.human_count(k['active']):>10}")
    return 0


def _build(args) -> int:
    from studio.models import tiny

    if args.name not in tiny.BUILDABLE:
        resolve.resolve_base(args.name, config_only=True)  # raises with a did-you-mean suggestion
        raise ModelError(f"{args.name!r} is not an embedded base; only {', '.join(tiny.EMBEDDED)} can "
                                 f"be built")
    path = tiny.ensure_built(args.name)
    fingerprint = resolve.base_fingerprint(path)
    if args.json:
        _print_json({"name": args.name, "path": str(path), "fingerprint": fingerprint})
    else:
        print(f"built {args.name}: {path}")
        print(f"fingerprint {fingerprint}")
    return 0


def _pretrain(args) -> int:
    from pathlib import Path

    from studio.models import pretrain, tiny

    if args.name != "tiny-moe":
        raise ModelError(f"only tiny-moe has a pretraining recipe; {args.name!r} is built from its config "
                         f"(`studio models build {args.name}`)")
    shipped = json.loads(tiny.PRETRAINED_RECORD.read_text()) if tiny.PRETRAINED_RECORD.is_file() else None
    cfg = pretrain.PretrainConfig(**(shipped["config"] if shipped else {}))
    if args.steps is not None:
        cfg.steps = args.steps
    if args.threads is not None:
        cfg.threads = args.threads
    out = Path(args.out) if args.out else tiny.PRETRAINED_WEIGHTS.parent
    record = pretrain.pretrain_and_save(cfg, out, log=lambda line: print(line, flush=True))
    print(f"wrote {out / tiny.PRETRAINED_WEIGHTS.name} (sha256 {record['sha256']}) in {record['wall_seconds']:.0f} s; "
          f"held-out loss on the corpus {record['heldout_loss']:.4f}")
    if shipped and record.get("config") != shipped["config"]:
        changed = sorted(k for k in set(record.get("config", {})) | set(shipped["config"])
                         if record.get("config", {}).get(k) != shipped["config"].get(k))
        print(f"not compared with the shipped weights: this run's recipe differs from theirs in {', '.join(changed)}")
    elif shipped:
        same = record["sha256"] == shipped["sha256"]
        print(f"shipped weights' sha256 {shipped['sha256']}: {'identical' if same else 'DIFFERENT'}"
              + ("" if same else " (expected only on another machine type, thread count or torch build)"))
    return 0


def _show(args) -> int:
    base = resolve.resolve_base(args.base, config_only=True)
    experts, top_k = resolve.moe_shape(base.config)
    info = {"ref": base.ref, "kind": base.kind, "path": str(base.path) if base.path else None,
            "model_type": getattr(base.config, "model_type", None), "moe": resolve.is_moe_config(base.config),
            "num_experts": experts, "top_k": top_k, "has_weights": base.has_weights,
            "fingerprint": resolve.base_fingerprint(base.path) if base.has_weights else None}
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:<12}{value}")
    return 0


def _plan(args) -> int:
    from studio.moe.plan import trainable_line

    base = resolve.resolve_base(args.base, config_only=True)
    counts = memory.count_parameters(base.config)
    device_bytes = memory.parse_bytes(args.device_memory) if args.device_memory else None
    quants = [args.quant] + (["none"] if args.quant != "none" else [])
    estimates = [memory.estimate_training_memory(
        base.config, quant=q, r=args.r, targets=args.targets, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_checkpointing=not args.no_grad_checkpointing, compute_dtype=args.compute_dtype,
        double_quant=args.double_quant, device_bytes=device_bytes, counts=counts, num_devices=args.num_devices)
        for q in quants]
    smallest = {e.quant: memory.smallest_num_devices(
        base.config, e.device_bytes, quant=e.quant, r=args.r, targets=args.targets, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_checkpointing=not args.no_grad_checkpointing,
        compute_dtype=args.compute_dtype, double_quant=args.double_quant, counts=counts)
        for e in estimates if e.device_bytes}
    if args.json:
        _print_json({"base": {"ref": base.ref, "kind": base.kind, "path": str(base.path) if base.path else None},
                     "counts": counts.to_dict(), "estimates": {e.quant: e.to_dict() for e in estimates},
                     "smallest_num_devices": smallest})
        return 0
    source = f"{base.kind}" + (f", {base.path}" if base.path else ", shipped copy of the published config"
                                                                    if base.kind == "hub" else "")
    print(f"base {base.ref} ({source})")
    print(counts.format_report())
    print(trainable_line(estimates[0].lora_params, counts.total) + f" with --targets {args.targets} --r {args.r}")
    print()
    print(memory.format_comparison(estimates))
    if smallest:
        print(f"smallest number of devices of {memory.human_bytes(estimates[0].device_bytes)} that fits (training "
              f"peak; FSDP2 beyond 1): "
              + ", ".join(f"{e.label} {smallest[e.quant] or 'none up to 4096'}" for e in estimates))
    if not resolve.is_moe_config(base.config):
        print("warning: this base is dense (no routed experts); the studio's trainer adapts MoE bases")
    return 0

