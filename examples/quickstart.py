"""Quickstart: data -> train -> registry -> serve two adapters in one batch -> compare, all through `import studio`.

    python examples/quickstart.py [--steps 8] [--out runs/quickstart]      # a few minutes on 2 CPU cores

It runs on `tiny-moe`, a 6.6M-parameter MoE the studio pretrained on CPython's documentation (shipped weights): it
writes Python-doc English but knows little else, and a few steps move the held-out loss only a little. For real
adaptation pass base="/models/Mixtral-8x7B-v0.1" (or a hub id in the local cache) and train for longer.
Adapters and datasets go to the default registries; set STUDIO_ADAPTERS_ROOT / STUDIO_DATASETS_ROOT to keep them
elsewhere. examples/quickstart.ipynb is the same walk-through as a notebook, with plots.
"""

import argparse
import json
from pathlib import Path

import studio

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=8, help="training steps per adapter")
parser.add_argument("--out", default="runs/quickstart", help="where run directories and the report are written")
args = parser.parse_args()
work = Path(args.out)
work.mkdir(parents=True, exist_ok=True)

# ---- 1. data: two small files of "your" data (slices of the shipped samples), inspected, then registered
datasets = {}
for domain in ("law", "medicine"):
    sample = studio.datasets.get(domain)  # a shipped sample, registered on first use
    path = work / f"{domain}.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in sample.head(48)))
    info = studio.datasets.inspect(path)
    version = studio.datasets.register(path, name=f"{domain}-mini", eval_ratio=0.25)
    datasets[domain] = version.ref
    print(f"{path}: {info['rows']} rows in {info['format']} format -> {version.ref} "
          f"({version.rows_train} train / {version.rows_eval} held-out)")

# ---- 2. the plan: what LoRA adapts and how much memory training takes, before any weight is loaded
options = dict(base="tiny-moe", quant="4bit", targets="attention,experts", r=8, alpha=16, seq_len=128, batch_size=4)
plan = studio.plan(**options)
print(plan)

# ---- 3. train one adapter per domain; the loss curve of the first is recorded from the training events
curve = studio.LossCurve()
results = {}
for domain, dataset in datasets.items():
    results[domain] = studio.finetune(
        **options, dataset=dataset, domain=domain, max_steps=args.steps, learning_rate=3e-3, dropout=0.0,
        logging_steps=1, eval_steps=0, save_steps=1000, output=str(work / domain),
        on_event=curve if domain == "law" else None, verbose=False)
    m = results[domain].metrics
    print(f"{domain}: held-out loss before {m['eval_loss_before']:.4f} -> after {m['eval_loss']:.4f}, "
          f"registered as {results[domain].registry_ref}")
curve.figure().savefig(work / "law_loss.png")
print(f"law training losses: {', '.join(f'{x:.3f}' for x in curve.losses)} (plot: {work / 'law_loss.png'})")

# ---- 4. the registry: versions with lineage and metrics; an alias that serving resolves per request
registry = studio.Registry()
registry.promote(results["law"].registry_ref, "prod")
for v in registry.list():
    print(f"registry: {v.ref:<14} aliases={','.join(v.aliases) or '-':<6} trained on {v.lineage['dataset']['ref']}, "
          f"eval_loss={v.metrics['eval_loss']:.4f}")

# ---- 5. serve: one base loaded once; rows for two adapters and the bare base share one batch
with studio.Engine("tiny-moe") as engine:
    prompts = ["Define tort.", "What is asthma?", "Define tort."]
    outs = engine.generate(prompts, adapters=["law@prod", "medicine", None],
                           params=studio.SamplingParams(max_tokens=12, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        print(f"{out.adapter or 'base':<12} {prompt!r} -> {out.text!r}")
    print(f"engine: {engine.stats()}")

    # ---- 6. compare: base and both adapters on both held-out sets (the cross-domain matrix), routing too
    report = studio.evaluate(engine, models=["base", "law@prod", "medicine"], dataset=datasets["law"],
                             domains=list(datasets.values()), max_eval_examples=12, gen_prompts=2,
                             max_new_tokens=8)
print(report.to_markdown())
saved = report.save(work / "report")
print(f"report: {saved['markdown']}")
