"""Serving benchmark: adapter hot-swap against reloading, mixed-adapter batches against single-adapter and base.

    python bench/serve.py                          # CPU defaults: a few minutes on 2 idle cores
    python bench/serve.py --device cuda --layers 8 --batch-size 32 --new-tokens 64
    python bench/serve.py --base tiny-moe          # any studio base reference instead of the synthetic Qwen3-MoE
    python bench/serve.py --experts 64 --top-k 8 --moe-intermediate 192   # a 64-expert top-8 Qwen3-MoE
    python bench/serve.py --streams 1,8,32         # also decode tokens/s of concurrent streams through `studio serve`

One invocation, one process, one base (by default the deterministic Qwen3-MoE of bench/train_step.py: 85M
parameters, 16 experts, top-2, NF4 with the experts quantized), three registered adapters with LoRA on attention
AND routed experts (random non-zero factors, rank 16; a trained adapter costs the same to run):

* switch:  switching the adapter of the next request between resident adapters (the engine's activation step,
           as it runs between forward passes), and loading a not-resident adapter from the registry (LRU miss),
           against reloading the base with that adapter (load_base + load_adapter, what a one-model-per-process
           server does). Target: reload / switch >= 100.
* batches: decode throughput (generated tokens/s, fixed token counts, greedy) of B rows all on one adapter, of B
           rows spread over the three adapters and the bare base in one batch, and of B rows on the bare base
           with no adapter active. Rounds are interleaved round-robin (the order rotated every round); the ratios
           use each kind's best round (the round least disturbed by other work on a shared machine), and the
           medians and the median of each round's paired ratios are printed beside them, with the load average.
           --profile adds torch.profiler's operators whose self time grows most over the base's. Targets:
           mixed / single >= 0.9; single / base >= 0.9 (adapter overhead at most 10%). Each kind generates its
           own text: the share of its tokens equal to the bare base's is printed (--adapter-scale sets how far
           the random adapters move the outputs).
* forwards: the model's forwards alone, the three kinds alternating every forward (--step-rounds rounds, each a
           prefill of the prompts and new-tokens - 1 decode steps per kind): a round of forwards per kind (median
           prefill + new-tokens - 1 median steps) and the ratios of those, with the targets again, and the medians of
           the steps' paired ratios. A shared machine's slow spells then fall on every kind within milliseconds,
           where the rounds above are seconds apart; they leave out the engine's sampling, scheduling and
           detokenizing, which cost every kind the same.
* streams (--streams): a `studio serve` subprocess on the same base and adapters; N concurrent OpenAI streaming
           clients (the three adapters and the base in turn), decode tokens/s summed over the streams.

Exit status 0 when it ran (met or not), 1 on failure.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

SWITCH_TARGET = 100.0
MIXED_TARGET = 0.9
OVERHEAD_TARGET = 0.9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="synthetic-qwen3-moe",
                   help="synthetic-qwen3-moe (bench/train_step.py's model) or any studio base reference")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quant", default="4bit", choices=["none", "8bit", "4bit"])
    p.add_argument("--r", type=int, default=16, help="LoRA rank of the adapters")
    p.add_argument("--adapter-scale", type=float, default=0.05,
                   help="standard deviation of the adapters' random factors (their cost does not depend on it)")
    p.add_argument("--batch-size", type=int, default=12, help="rows per batch (a multiple of 4 mixes evenly)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of each batch kind")
    p.add_argument("--switches", type=int, default=200, help="timed adapter switches")
    p.add_argument("--reloads", type=int, default=3, help="timed base reloads")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default). On small CPU machines 1 thread avoids OpenMP "
                        "wake-up costs on the many small decode ops")
    p.add_argument("--step-rounds", type=int, default=5,
                   help="rounds of the alternating-forwards measurement (kinds alternating every forward); 0: skip")
    p.add_argument("--openmp", default="studio", choices=["studio", "library"],
                   help="studio: the OpenMP wait settings `studio serve` runs with (studio/_openmp.py); library: "
                        "libgomp's defaults, for an A/B (set before torch is imported; the streams' server inherits "
                        "them)")
    p.add_argument("--streams", default="", help="comma-separated concurrent stream counts to measure through "
                   "`studio serve` (e.g. 1,8,32); empty: skip")
    p.add_argument("--stream-tokens", type=int, default=32, help="tokens generated per stream")
    p.add_argument("--profile", action="store_true",
                   help="after the timed rounds, profile one batch of each kind with torch.profiler and print the "
                        "operators whose self time grows most over the bare base (where adapter overhead goes)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def synthetic_base(args, out: Path) -> str:
    from bench.train_step import build_model_dir

    ns = argparse.Namespace(hidden=args.hidden, head_dim=64, heads=0, kv_heads=0, layers=args.layers,
                            experts=args.experts, top_k=args.top_k,
                            moe_intermediate=args.moe_intermediate, seq_len=max(512, args.prompt_tokens * 4),
                            seed=0, batch_size=1)
    build_model_dir(ns, out)
    return str(out)


def stream_bench(args, device: str, base_ref: str, registry_root: Path, models: list[str], prompts: list[str],
                 counts: list[int]) -> dict:
    """Decode tokens/s of N concurrent streaming clients through a `studio serve` subprocess, for each N in counts."""
    import os
    import socket
    import subprocess
    import threading

    import httpx

    from studio.serving.health import wait_until_serving

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "studio.cli", "serve", "--base", base_ref, "--registry", str(registry_root),
           "--adapters", ",".join(m for m in models if m != "base"), "--port", str(port), "--quant", args.quant,
           "--device", device, "--max-batch-size", str(max(counts)), "--max-wait-ms", "10",
           "--max-tokens-limit", "4096"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = registry_root.parent / "serve.log"  # a file, not a pipe nobody reads while the streams run
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    out = {}
    try:
        try:
            wait_until_serving(proc, url, timeout=300, interval=0.5)
        except Exception as exc:
            raise RuntimeError(f"{exc}; its log: {log_path.read_text()[-2000:]}") from exc

        def one(i: int, sink: list) -> None:
            body = {"model": models[i % len(models)], "prompt": prompts[i % len(prompts)],
                    "max_tokens": args.stream_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            tokens = 0
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage["completion_tokens"]
            sink.append(tokens)

        for n in [1] + counts:  # the first, untimed run warms the server up
            sink: list = []
            workers = [threading.Thread(target=one, args=(i, sink)) for i in range(n)]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - t0
            out[n] = {"streams": n, "tokens": sum(sink), "seconds": elapsed, "tokens_per_s": sum(sink) / elapsed}
        return {n: v for n, v in out.items() if n in counts}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def direct_decoder(engine, prompts, kinds):
    """The engine's model and slots driven on the calling thread (the profiler sees only the thread that starts it,
    and per-step timing needs the forwards in its own hands; the engine's scheduler runs elsewhere): the prompts cut
    to one length (no padding or attention mask needed) as ids, and step(kind, input_ids, cache=None) -> (the next
    greedy ids, the cache), a forward of `kind`'s rows (a new cache for the prefill). Call it under
    engine.model_lock and torch.no_grad()."""
    import torch
    from transformers.cache_utils import DynamicCache

    model, slots = engine.model, engine.residency.slots
    encoded = [engine.tokenizer(p).input_ids for p in prompts]
    width = min(len(e) for e in encoded)
    ids = torch.tensor([e[:width] for e in encoded], device=engine.device)
    slot_of = {ref: engine.residency.entries[ref].slot for ref in engine.resident()}
    rows = {kind: [None if a is None else slot_of[a] for a in adapters] for kind, adapters in kinds.items()}

    def step(kind, input_ids, cache=None):
        cache = DynamicCache(config=model.config) if cache is None else cache
        with slots.rows(rows[kind], device=engine.device):
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[:, -1:].argmax(-1), out.past_key_values

    return ids, step


def operator_profile(engine, prompts, kinds, params, top: int = 12) -> dict:
    """Self CPU time per operator (ms) of one batch of each kind under torch.profiler: the prompts' prefill and
    `params.max_tokens` greedy decode steps, run on this thread with the engine's model and slots (direct_decoder).
    Prints, for the adapter kinds, the operators whose self time grew most over the bare base's: where the adapter
    overhead goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    ids, step = direct_decoder(engine, prompts, kinds)

    def run(kind):
        token, cache = ids, None
        for _ in range(params.max_tokens):
            token, cache = step(kind, token, cache)

    self_ms = {}
    with engine.model_lock, torch.no_grad():
        for kind in kinds:
            run(kind)  # warm
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(kind)
            self_ms[kind] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    base = self_ms["base"]
    for kind in kinds:
        if kind == "base":
            continue
        total, total_base = sum(self_ms[kind].values()), sum(base.values())
        grown = sorted(((v - base.get(k, 0.0), k) for k, v in self_ms[kind].items()), reverse=True)[:top]
        print(f"\nprofile {kind}: self CPU {total:.0f} ms vs base {total_base:.0f} ms (+{total - total_base:.0f} ms, "
              f"{(total - total_base) / total:.1%} of {kind}); operators that grew most:")
        for d, k in grown:
            print(f"  {k:<48} {self_ms[kind][k]:9.1f} ms  (base {base.get(k, 0.0):9.1f} ms, +{d:.1f})")
    return self_ms


def paired_steps(engine, prompts, kinds, params, rounds: int) -> dict:
    """The model's forwards, the kinds alternating every forward (each with a cache of its own, the order rotated
    every time): a slow spell of other work on a shared machine then falls on all kinds within milliseconds, where
    whole rounds of `engine.generate` are seconds apart. Each round runs every kind's prefill of the prompts, then
    `params.max_tokens` - 1 decode steps, on this thread with the engine's model and slots (direct_decoder). Every
    kind decodes the bare base's greedy tokens, so all kinds run one token stream: each kind's own text would hit
    other experts, and a step's cost follows the experts hit. Only the forwards are timed: no sampling, scheduling
    or detokenizing, which cost every kind the same.

    Per kind: the median prefill and decode step (ms), and a round of forwards, the median prefill plus
    max_tokens - 1 median steps (what a round of the engine runs on the model). Per pair of kinds: the ratio of
    those rounds (tokens/s), and the median over steps of the steps' paired ratio."""
    import torch

    ids, step = direct_decoder(engine, prompts, kinds)
    sync = torch.cuda.synchronize if str(engine.device).startswith("cuda") else (lambda: None)
    times = {kind: [] for kind in kinds}
    prefills = {kind: [] for kind in kinds}
    order = list(kinds)

    def timed(kind, *state):
        sync()
        t0 = time.perf_counter()
        out = step(kind, *state)
        sync()
        return out, time.perf_counter() - t0

    with engine.model_lock, torch.no_grad():
        for r in range(rounds):
            caches, tokens = {}, {}
            for kind in order[r % len(order):] + order[:r % len(order)]:
                (tokens[kind], caches[kind]), seconds = timed(kind, ids)
                prefills[kind].append(seconds)
            for i in range(params.max_tokens - 1):
                feed = tokens["base"]
                for kind in order[i % len(order):] + order[:i % len(order)]:
                    (tokens[kind], caches[kind]), seconds = timed(kind, feed, caches[kind])
                    times[kind].append(seconds)

    def paired(a, b):
        return statistics.median(x / y for x, y in zip(times[b], times[a]))  # tokens/s ratio a / b

    step_ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    prefill_ms = {k: statistics.median(v) * 1e3 for k, v in prefills.items()}
    round_ms = {k: prefill_ms[k] + (params.max_tokens - 1) * step_ms[k] for k in kinds}
    return {"step_ms_median": step_ms, "prefill_ms_median": prefill_ms, "round_of_forwards_ms": round_ms,
            "steps": len(times["base"]), "rounds": rounds,
            "single_over_base": paired("single", "base"), "mixed_over_single": paired("mixed", "single"),
            "mixed_over_base": paired("mixed", "base"),
            "forwards_single_over_base": round_ms["base"] / round_ms["single"],
            "forwards_mixed_over_single": round_ms["single"] / round_ms["mixed"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    from studio import _openmp

    if args.openmp == "library":  # libgomp's defaults, in this process and the streams' `studio serve`
        os.environ[_openmp.OPT_OUT] = "library"
    _openmp.spin_between_operators()
    import torch

    from studio.adapters import load_adapter, save_random_adapter
    from studio.engine import Engine, SamplingParams
    from studio.models.loading import QuantSpec, load_base
    from studio.registry import AdapterRegistry

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    atexit.register(shutil.rmtree, work, True)  # its base, adapters and registry: hundreds of MB a run
    base_ref = synthetic_base(args, work / "base") if args.base == "synthetic-qwen3-moe" else args.base
    quant = QuantSpec(args.quant)
    print(f"base {args.base} ({args.experts} experts, top-{args.top_k}) on {device} ({torch.get_num_threads()} torch "
          f"threads), quant {args.quant}, LoRA r={args.r} on attention + routed experts; OpenMP: {_openmp.describe()}")

    # the adapters are made on a copy of the base of their own: the served model is never given PEFT's layers
    maker = load_base(base_ref, quant, "cpu")
    registry = AdapterRegistry(work / "registry")
    domains = ["law", "medicine", "code", "spare"]
    for i, d in enumerate(domains):
        path = save_random_adapter(maker, work / "adapters" / d, d, seed=i + 1 if d != "spare" else 9, r=args.r,
                                   scale=args.adapter_scale)
        registry.register(path, d)
    del maker
    engine = Engine(base_ref, quant, device, registry=registry, max_resident=8,
                    max_batch_size=args.batch_size, max_wait_ms=0, max_tokens_limit=4096)
    from studio.models.memory import count_parameters

    params = count_parameters(engine.model.config).total  # as built, not as packed 4-bit storage
    domains = domains[:3]
    refs = [engine.load(d) for d in domains]

    # ---- switching --------------------------------------------------------------------------------
    slots = [engine.residency.entries[r].slot for r in refs]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with engine.model_lock:
        for i in range(args.switches):
            slot = slots[i % len(slots)]
            sync()
            t0 = time.perf_counter()
            engine.set_rows([slot] * args.batch_size)  # what the scheduler does before a forward
            sync()
            times.append(time.perf_counter() - t0)
        engine.lora.clear()
    switch = statistics.median(times)
    cold = []
    for _ in range(args.reloads):
        engine.unload("spare")
        t0 = time.perf_counter()
        engine.load("spare")
        sync()
        cold.append(time.perf_counter() - t0)
    cold_load = statistics.median(cold)
    reloads = []
    adapter_dir = engine.registry.path(refs[0])
    for _ in range(args.reloads):
        t0 = time.perf_counter()
        fresh = load_base(base_ref, quant, device)
        load_adapter(fresh.model, adapter_dir, "default")
        sync()
        reloads.append(time.perf_counter() - t0)
        del fresh
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    reload = statistics.median(reloads)

    # ---- batches ----------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    vocab = len(engine.tokenizer)
    prompts = [engine.tokenizer.decode(torch.randint(300, vocab - 10, (args.prompt_tokens,), generator=gen))
               for _ in range(args.batch_size)]
    sp = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    mix_cycle = refs + [None]
    kinds = {
        "base": [None] * args.batch_size,
        "single": [refs[0]] * args.batch_size,
        "mixed": [mix_cycle[i % len(mix_cycle)] for i in range(args.batch_size)],
    }
    engine.generate(prompts, adapters=kinds["mixed"], params=sp)  # warm-up
    rates = {k: [] for k in kinds}
    tokens = {}
    order = list(kinds)
    load_before = os.getloadavg()
    for i in range(args.rounds):
        # round-robin, the order rotated every round: a slow spell of other work on a shared machine falls on
        # every kind in turn instead of always on the same one, and each round gives paired ratios
        for kind in order[i % len(order):] + order[:i % len(order)]:
            sync()
            t0 = time.perf_counter()
            out = engine.generate(prompts, adapters=kinds[kind], params=sp)
            sync()
            rates[kind].append(sum(c.completion_tokens for c in out) / (time.perf_counter() - t0))
            tokens[kind] = [c.token_ids for c in out]
    load_after = os.getloadavg()
    # a step costs what its hit experts cost, and the experts hit follow the generated text: the share of generated
    # tokens that equal the bare base's tells how far the kinds' work differed
    same_as_base = {k: sum(a == b for r, q in zip(tokens[k], tokens["base"]) for a, b in zip(r, q))
                    / max(1, sum(len(r) for r in tokens["base"])) for k in kinds}
    tps = {k: max(v) for k, v in rates.items()}
    medians = {k: statistics.median(v) for k, v in rates.items()}
    paired = {"single_over_base": statistics.median(s / b for s, b in zip(rates["single"], rates["base"])),
              "mixed_over_single": statistics.median(m / s for m, s in zip(rates["mixed"], rates["single"]))}
    steps = paired_steps(engine, prompts, kinds, sp, args.step_rounds) if args.step_rounds else {}
    profile = operator_profile(engine, prompts, kinds, sp) if args.profile else {}
    engine.close()
    streams = {}
    if args.streams:
        counts = [int(n) for n in args.streams.split(",") if n.strip()]
        try:
            streams = stream_bench(args, device, base_ref, work / "registry", refs + ["base"], prompts, counts)
        except Exception as exc:  # the in-process figures above still count (e.g. a machine without uvicorn)
            print(f"streams through studio serve failed: {exc}")

    results = {
        "device": device, "threads": torch.get_num_threads(), "openmp": _openmp.describe(), "experts": args.experts, "top_k": args.top_k, "torch": torch.__version__, "platform": platform.platform(), "base": args.base,
        "base_params": params, "quant": args.quant, "r": args.r, "batch_size": args.batch_size,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "switch_s": switch, "cold_load_s": cold_load, "reload_s": reload,
        "reload_over_switch": reload / switch, "reload_over_cold_load": reload / cold_load,
        "tokens_per_s": tps, "tokens_per_s_median": medians, "tokens_per_s_rounds": rates,
        "mixed_over_single": tps["mixed"] / tps["single"],
        "single_over_base": tps["single"] / tps["base"], "mixed_over_base": tps["mixed"] / tps["base"],
        "paired_round_ratios": paired, "tokens_same_as_base": same_as_base,
        "load_average_before": load_before, "load_average_after": load_after,
        "streams": streams, "profile_self_ms": profile, "paired_steps": steps,
    }
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731

    def ratio(label: str, value: float, target: float) -> None:
        # three decimals, cut rather than rounded: 0.8997 must not print as a "0.900x" that is NOT met
        print(f"{label + ':':<40}{math.floor(value * 1000) / 1000:6.3f}x  (target >= {target}: "
              f"{met(value >= target)})")
    print(f"\nbase parameters: {params / 1e6:.1f}M; batch {args.batch_size} rows x {args.new_tokens} new tokens")
    print(f"adapter switch (resident):      {switch * 1e3:9.3f} ms")
    print(f"adapter load (LRU miss):        {cold_load * 1e3:9.3f} ms")
    print(f"reload base + adapter:          {reload * 1e3:9.1f} ms")
    print(f"reload / switch:                {results['reload_over_switch']:9.0f}x   (target >= {SWITCH_TARGET:.0f}x: "
          f"{met(results['reload_over_switch'] >= SWITCH_TARGET)})")
    print(f"reload / load from registry:    {results['reload_over_cold_load']:9.1f}x")
    for k in kinds:
        print(f"tokens/s {k:<8} best / median  {tps[k]:9.1f} / {medians[k]:.1f}   "
              f"(rounds: {', '.join(f'{x:.1f}' for x in rates[k])})")
    ratio("mixed / single-adapter, rounds", results["mixed_over_single"], MIXED_TARGET)
    ratio("single-adapter / bare base, rounds", results["single_over_base"], OVERHEAD_TARGET)
    print(f"mixed / bare base, rounds:      {results['mixed_over_base']:9.2f}x")
    print(f"(rounds' medians: mixed / single {medians['mixed'] / medians['single']:.2f}x, single / base "
          f"{medians['single'] / medians['base']:.2f}x; median of the rounds' paired ratios: mixed / single "
          f"{paired['mixed_over_single']:.2f}x, single / base {paired['single_over_base']:.2f}x)")
    print(f"generated tokens equal to the bare base's: single {same_as_base['single']:.0%}, "
          f"mixed {same_as_base['mixed']:.0%} (adapter factors' scale {args.adapter_scale})")
    if steps:
        ms, pre, fw = steps["step_ms_median"], steps["prefill_ms_median"], steps["round_of_forwards_ms"]
        print(f"forwards, kinds alternating every forward ({steps['rounds']} prefills and {steps['steps']} decode "
              f"steps each), medians base / single / mixed: prefill {pre['base']:.1f} / {pre['single']:.1f} / "
              f"{pre['mixed']:.1f} ms, decode step {ms['base']:.1f} / {ms['single']:.1f} / {ms['mixed']:.1f} ms; "
              f"a round of forwards {fw['base']:.0f} / {fw['single']:.0f} / {fw['mixed']:.0f} ms")
        ratio("mixed / single-adapter, forwards", steps["forwards_mixed_over_single"], MIXED_TARGET)
        ratio("single-adapter / bare base, forwards", steps["forwards_single_over_base"], OVERHEAD_TARGET)
        print(f"(medians of the decode steps' paired ratios: single / base {steps['single_over_base']:.2f}x, "
              f"mixed / single {steps['mixed_over_single']:.2f}x, mixed / base {steps['mixed_over_base']:.2f}x)")
    print(f"load average (1, 5, 15 min) before the rounds {', '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{', '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} CPUs")
    for n, v in streams.items():
        print(f"studio serve, {n:>3} concurrent streams: {v['tokens_per_s']:9.1f} decode tokens/s "
              f"({v['tokens']} tokens in {v['seconds']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
