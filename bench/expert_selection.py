"""Expert-specialised fine-tuning experiment (ESFT / MoE-Sieve): LoRA on all routed experts vs on selected ones.

    python bench/expert_selection.py --bases tiny-moe,tiny-moe-64 --domains law,medicine,code --steps 30

For every base, domain and `--expert-selection` value: held-out loss on the own domain and on the other domains
(forgetting), trainable parameters, median step time and adapter size, printed as one markdown table (and written as
JSON with --json). `tiny-moe-64` is the embedded tiny-moe with 64 routed experts, top-8 (built locally); any
`--base` reference works, e.g. the pretrained embedded base once it exists.

Written as one loop over one loaded base (not `studio finetune` runs): twenty or thirty adapters are trained and
compared per base, and reloading the base, re-tokenizing and evaluating every split for each of them would cost
more than the training itself on 2 CPU cores. The adapters are the studio's (apply_plan / save_adapter); the loop is
plain AdamW on assistant-only loss, as the trainer computes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# ---------------------------------------------------------------------------------------------------- arguments
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# what
parser.add_argument("--bases", default="tiny-moe,tiny-moe-64", help="comma-separated base references "
                    "(tiny-moe-64: tiny-moe with 64 experts, top-8)")
parser.add_argument("--domains", default="law,medicine,code", help="comma-separated dataset refs")
parser.add_argument("--selections", default="all,token:0.2,gate:0.1,top:quarter,random:token:0.2",
                    help="comma-separated --expert-selection values; top:quarter = top:E/4 (MoE-Sieve's 25%%)")
parser.add_argument("--targets", default="experts", help="LoRA targets (default: routed experts only, as ESFT)")
# training
parser.add_argument("--steps", type=int, default=30, help="optimizer steps per adapter")
parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
parser.add_argument("--seq-len", type=int, default=128, help="max tokens per example")
parser.add_argument("--r", type=int, default=8, help="LoRA rank")
parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
parser.add_argument("--quant", default="4bit", choices=("none", "8bit", "4bit"), help="base quantization")
parser.add_argument("--seed", type=int, default=0, help="seed for LoRA init, data order and random selections")
# measurement
parser.add_argument("--eval-examples", type=int, default=32, help="held-out examples per domain")
parser.add_argument("--profile-examples", type=int, default=128, help="training rows routed for the profile")
parser.add_argument("--json", default=None, help="also write the results here (updated after every adapter)")
parser.add_argument("--table-from", default=None, help="print the table of these JSON result files (comma-separated) "
                    "and exit, e.g. of runs for different bases made in parallel")
args = parser.parse_args()

import studio  # noqa: E402,F401  (filters known-harmless library chatter before the heavy imports)
from studio.adapters import adapter_state, apply_plan, delete_adapter, save_adapter, set_active_adapter  # noqa: E402
from studio.data import resolve_dataset  # noqa: E402
from studio.eval.heldout import batches, encode, load_heldout, teacher_forced_pass, training_chat_template  # noqa: E402
from studio.experts.profile import profile_experts  # noqa: E402
from studio.experts.selection import parse_selection, select_experts  # noqa: E402
from studio.models.loading import QuantSpec, load_base  # noqa: E402
from studio.moe.plan import LoraSettings, build_plan  # noqa: E402


def tiny_moe_64() -> str:
    """tiny-moe with 64 routed experts, top-8, expert width 32 (the same active expert width as 8 x top-2 x 128),
    built once into the models cache with the embedded base's seed and router initialisation."""
    from studio import paths
    from studio.models import tiny

    target = paths.models_cache() / "bench-tiny-moe-64"
    if (target / "studio_base.json").exists():
        return str(target)
    config = tiny.make_config("tiny-moe")
    config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size = 64, 8, 32
    from transformers import AutoModelForCausalLM

    torch.manual_seed(tiny.SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(tiny.SEED + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(".gate") and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * config.initializer_range)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-tiny-moe-64-", dir=paths.models_cache()))
    model.save_pretrained(tmp, safe_serialization=True)
    from studio.models.tokenizer import load_tokenizer

    load_tokenizer().save_pretrained(tmp)
    (tmp / "studio_base.json").write_text(json.dumps({"name": "bench-tiny-moe-64", "seed": tiny.SEED,
                                                      "weights_hash": tiny.weights_hash(model)}))
    tmp.rename(target)
    return str(target)


def mean_loss(model, heldout, pad) -> float:
    r = teacher_forced_pass(model, heldout, pad, batch_size=16, routing=None)
    return sum(r.nll) / max(sum(r.tokens), 1)


def nonzero_factor_bytes(state: dict) -> int:
    """Bytes of the saved factors that are not all-zero expert slices: what a compact (selected-only) file holds."""
    total = 0
    for key, t in state.items():
        total += int(t.ne(0).sum()) * 4  # fp32 on disk; unselected experts' slices are exact zeros
    return total


def run_base(base_ref: str) -> list[dict]:
    label = base_ref
    if base_ref == "tiny-moe-64":
        base_ref = tiny_moe_64()
    loaded = load_base(base_ref, QuantSpec(args.quant))
    model, tok = loaded.model, loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    template = training_chat_template(tok)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    data = {d: resolve_dataset(d) for d in domains}
    heldout = {d: load_heldout(data[d], tok, args.seq_len, args.eval_examples) for d in domains}
    model.eval()
    base_loss = {d: mean_loss(model, heldout[d], pad) for d in domains}
    print(f"[{label}] base held-out loss: " + ", ".join(f"{d} {v:.4f}" for d, v in base_loss.items()), flush=True)
    rows = []
    for domain in domains:
        train = [e for e in (encode(tok, m, args.seq_len, template) for m in data[domain].train_messages()) if e]
        profile = profile_experts(base_ref, data[domain].ref, "train", seq_len=args.seq_len, batch_size=16,
                                  max_examples=args.profile_examples, loaded=loaded, log=lambda *_: None)
        num_experts = profile.num_experts
        for spec in [s.strip() for s in args.selections.split(",") if s.strip()]:
            spec = spec.replace("quarter", str(max(1, num_experts // 4)))
            sel = parse_selection(spec)
            ids = None if sel.is_all else select_experts(profile, sel, seed=args.seed)
            plan = build_plan(model, loaded.arch, loaded.components, args.targets,
                              LoraSettings(r=args.r, alpha=2 * args.r, dropout=0.0), expert_ids=ids,
                              expert_selection={"spec": sel.spec})
            name = f"bench_{domain}"
            torch.manual_seed(args.seed)
            apply_plan(model, plan, name, trainable=True)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
            model.train()
            times = []
            for step in range(args.steps):
                chunk = [train[order[(step * args.batch_size + i) % len(order)]] for i in range(args.batch_size)]
                ids_t, attn, labels, _ = next(batches(chunk, args.batch_size, pad))
                t0 = time.perf_counter()
                loss = model(input_ids=ids_t, attention_mask=attn, labels=labels, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            model.eval()
            after = {d: mean_loss(model, heldout[d], pad) for d in domains}
            with tempfile.TemporaryDirectory() as tmp:
                out = save_adapter(model, plan, Path(tmp) / "a", name, base_id=base_ref)
                file_bytes = (out / "adapter_model.safetensors").stat().st_size
                compact = nonzero_factor_bytes(adapter_state(model, plan, name))
            opt_state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
            delete_adapter(model, name)
            set_active_adapter(model, None)
            others = [d for d in domains if d != domain]
            row = {"base": label, "domain": domain, "selection": sel.spec,
                   "experts": sum(len(v) for v in ids.values()) if ids else num_experts * len(profile.layers),
                   "experts_total": num_experts * len(profile.layers), "trainable": plan.trainable_params,
                   "optimizer_state": opt_state, "step_ms": 1000 * statistics.median(times[2:] or times),
                   "own_before": base_loss[domain], "own_after": after[domain],
                   "others_delta": statistics.mean(after[d] - base_loss[d] for d in others) if others else None,
                   "file_bytes": file_bytes, "nonzero_bytes": compact}
            rows.append(row)
            if args.json:  # after every adapter, so an interrupted run keeps what it measured
                Path(args.json).write_text(json.dumps(DONE + rows, indent=2))
            print(f"[{label}] {domain:<9} {sel.spec:<18} own {row['own_after']:.4f} ({row['own_after'] - row['own_before']:+.4f})"
                  f"  others {row['others_delta'] if row['others_delta'] is not None else float('nan'):+.4f}"
                  f"  trainable {row['trainable']:,}  step {row['step_ms']:.0f} ms", flush=True)
    return rows


DONE: list[dict] = []  # rows of the bases already finished


def summary(rows: list[dict]) -> str:
    """Per base and selection, averaged over the domains: own-domain loss gain as a share of `all`'s, forgetting,
    trainable parameters and step time relative to `all`."""
    lines = ["| base | selection | own Δ loss (mean) | share of all's gain | others Δ loss (mean) | trainable vs all | "
             "step time vs all |", "|" + "---|" * 7]
    for base in dict.fromkeys(r["base"] for r in rows):
        mine = [r for r in rows if r["base"] == base]
        ref = {r["domain"]: r for r in mine if r["selection"] == "all"}
        for sel in dict.fromkeys(r["selection"] for r in mine):
            group = [r for r in mine if r["selection"] == sel and r["domain"] in ref]
            if not group:
                continue
            own = statistics.mean(r["own_after"] - r["own_before"] for r in group)
            own_all = statistics.mean(ref[r["domain"]]["own_after"] - ref[r["domain"]]["own_before"] for r in group)
            others = [r["others_delta"] for r in group if r["others_delta"] is not None]
            trainable = statistics.mean(r["trainable"] / ref[r["domain"]]["trainable"] for r in group)
            step = statistics.mean(r["step_ms"] / ref[r["domain"]]["step_ms"] for r in group)
            lines.append(f"| {base} | {sel} | {own:+.4f} | {own / own_all:.0%} | "
                         f"{statistics.mean(others) if others else float('nan'):+.4f} | {trainable:.1%} | {step:.2f}x |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| base | domain | selection | experts trained | trainable params | step ms | own loss (Δ vs base) | "
            "others Δ loss | adapter file KiB | non-zero KiB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        others = f"{r['others_delta']:+.4f}" if r["others_delta"] is not None else "-"
        lines.append(f"| {r['base']} | {r['domain']} | {r['selection']} | {r['experts']}/{r['experts_total']} | "
                     f"{r['trainable']:,} | {r['step_ms']:.0f} | {r['own_after']:.4f} ({r['own_after'] - r['own_before']:+.4f}) | "
                     f"{others} | {r['file_bytes'] / 1024:.0f} | {r['nonzero_bytes'] / 1024:.0f} |")
    return "\n".join(lines)


def main() -> int:
    if args.table_from:
        rows = [r for f in args.table_from.split(",") for r in json.loads(Path(f).read_text())]
        print(table(rows))
        print()
        print(summary(rows))
        return 0
    rows = []
    for base in [b.strip() for b in args.bases.split(",") if b.strip()]:
        rows += run_base(base)
        DONE[:] = rows
    print()
    print(table(rows))
    print()
    print(summary(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
