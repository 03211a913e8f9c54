"""`studio experts profile --base B --dataset law`: which routed experts a domain uses, per layer (JSON, CSV, PNG).

Add `--selection token:0.2` to see (and outline in the heatmap) the experts `--expert-selection` would train.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("experts", help="profile expert routing on a dataset; preview expert selections",
                              description=__doc__)
    sub = p.add_subparsers(dest="experts_command", required=True)
    pr = sub.add_parser("profile", help="route a dataset split through the base; per layer and expert: token share "
                                        "and mean gate score", description=__doc__)
    # ---- what
    pr.add_argument("--base", default="tiny-moe", help="embedded name | local dir | hub id (default: tiny-moe)")
    pr.add_argument("--dataset", required=True, help="dataset registry ref (law, law@v2) or a file path")
    pr.add_argument("--split", default="train", choices=("train", "eval"), help="which split to route (default: train)")
    # ---- how (the same values as training, so the trainer reuses the cached profile)
    pr.add_argument("--quant", default="4bit", choices=("none", "8bit", "4bit"), help="base quantization (default: 4bit)")
    pr.add_argument("--seq-len", type=int, default=512, help="max tokens per example (default: 512)")
    pr.add_argument("--batch-size", type=int, default=8, help="examples per forward (default: 8)")
    pr.add_argument("--max-examples", type=int, default=0, help="profile only the first N rows (default: 0 = all)")
    pr.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    pr.add_argument("--refresh", action="store_true", help="measure again even when a cached profile exists")
    # ---- output
    pr.add_argument("--selection", default=None, help="also show the experts this --expert-selection would train")
    pr.add_argument("--seed", type=int, default=42, help="seed for random:<spec> selections (default: 42)")
    pr.add_argument("--output", default=None,
                    help="directory for profile.json, profile.csv, heatmap.png (default: runs/profiles/<dataset>-<key>)")
    pr.add_argument("--json", action="store_true", help="print the profile summary as JSON")
    pr.set_defaults(func=_profile)


def _profile(args: argparse.Namespace) -> int:
    from studio.experts.profile import profile_experts
    from studio.experts.selection import parse_selection, select_experts
    from studio.models.loading import QuantSpec

    selection = parse_selection(args.selection) if args.selection else None  # a bad spec fails before any loading
    log = (lambda *a, **k: None) if args.json else print
    prof = profile_experts(args.base, args.dataset, args.split, QuantSpec(args.quant), seq_len=args.seq_len,
                           batch_size=args.batch_size, max_examples=args.max_examples, refresh=args.refresh,
                           device=args.device, log=log)
    chosen = select_experts(prof, selection, seed=args.seed) if selection else None
    out = Path(args.output) if args.output else Path("runs") / "profiles" / f"{prof.dataset.replace('@', '-')}-{prof.key[:12]}"
    files = prof.write(out, chosen)
    if args.json:
        print(json.dumps({**prof.summary(), "layers": prof.layers, "from_cache": prof.from_cache,
                          "selection": chosen, "files": {k: str(v) for k, v in files.items()}}, indent=2))
        return 0
    print(prof.table(chosen))
    if chosen:
        print(f"--expert-selection {selection.spec}: {sum(len(v) for v in chosen.values())} of "
              f"{prof.num_experts * len(chosen)} experts")
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0
