"""`evaluate()`: the base and N adapters on the same held-out data, through one Engine.

For every model: held-out loss/perplexity on assistant tokens of every requested domain (the cross-domain matrix),
expert routing on those tokens, greedy generations for reference metrics and side-by-side reading, latency and
tokens/s. Results go into an EvalReport and, per adapter version, into the adapter registry's metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from studio.errors import DatasetError, RegistryError, StudioError
from studio.eval import metrics as M
from studio.eval.heldout import load_heldout, teacher_forced_pass
from studio.eval.prompts import PromptItem, load_prompts, reference_pairs
from studio.eval.report import BASE, EvalReport, GenerationResult, LossCell, ModelInfo
from studio.eval.routing import routing_drift

logger = logging.getLogger(__name__)

SOURCE = "eval"  # the registry metrics source of these results

Progress = Callable[[float, str], None]


def parse_models(models: str | Sequence[str] | None) -> list[str]:
    """'base,law@v2,law@v3' or a list -> names in order, without duplicates. Empty entries are an error."""
    if models is None:
        return []
    items = models.split(",") if isinstance(models, str) else list(models)
    out = []
    for item in items:
        name = (item or "").strip() if isinstance(item, str) or item is None else item
        if not name:
            raise StudioError(f"--models {models!r} has an empty entry; give comma-separated references such as "
                              "base,law@v2,law@v3")
        if name not in out:
            out.append(name)
    return out


def default_domains(dataset_name: str) -> list[str]:
    """The main dataset first, then every shipped sample domain (law, medicine, code)."""
    from studio.data import DatasetRegistry

    names = [dataset_name]
    for sample in DatasetRegistry().shipped_samples():
        if sample["name"] not in names:
            names.append(sample["name"])
    return names


def evaluate(engine_or_base="tiny-moe", models: str | Sequence[str] | None = None, dataset: str = "law",
             domains: str | Sequence[str] | None = None, prompts: str | list | None = None,
             max_eval_examples: int = 64, batch_size: int = 8, seq_len: int = 512, gen_prompts: int = 8,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             routing: str | None = "assistant", record: bool = True, quant: str = "4bit", device: str | None = None,
             registry=None, progress: Progress | None = None) -> EvalReport:
    """Compare the base and adapters on held-out data.

    engine_or_base: a studio.engine.Engine (shared with serving / the UI), or a base reference to load one.
    models: "base,law@v2,law@v3" or a list; the base is always evaluated (first) since every comparison is
        against it. None: the base and the latest adapter of the dataset's domain, if one is registered.
    dataset: the main held-out set (a dataset registry ref or a file), used for reference metrics and generations.
    domains: held-out sets for the cross-domain matrix; None = the main dataset plus every shipped domain;
        [] or "none" = the main dataset only.
    prompts: a prompts file, or a list of strings / chats / {"prompt", "reference"} for side-by-side generations
        (default: the held-out prompts used for reference metrics).
    max_eval_examples: held-out examples per domain for loss and routing; gen_prompts: held-out prompts generated
        for reference metrics (0: no generations); max_new_tokens, temperature, top_p, seed: decoding, identical
        for every model.
    routing: record expert routing on 'assistant' tokens, 'all' non-padding tokens, or None (off).
    record: append each adapter version's results to the adapter registry (source 'eval').
    progress: called as progress(fraction, message).
    """
    from studio.data import resolve_dataset

    _check_settings(max_eval_examples, batch_size, seq_len, gen_prompts, max_new_tokens, routing)
    names = parse_models(models)       # bad input fails before a base is loaded
    main = resolve_dataset(dataset)
    say = _progress(progress)
    owned = not hasattr(engine_or_base, "using")
    if owned:
        from studio.engine import Engine
        from studio.models.loading import QuantSpec

        say(0.0, f"loading base {engine_or_base} ({quant})")
        engine = Engine(str(engine_or_base), quant=QuantSpec(quant), device=device, registry=registry)
    else:
        engine = engine_or_base
    try:
        notes: list[str] = []
        if not names:
            names = [BASE]
            try:
                names.append(engine.resolve(main.name).ref)
            except RegistryError:  # no such domain; an adapter of another base (ModelError) is still an error
                notes.append(f"no adapter is registered for domain {main.name!r}: only the base was evaluated")
        infos = _resolve_models(engine, names, notes)
        domain_sets = _resolve_domains(main, domains, resolve_dataset)
        tokenizer = engine.base.tokenizer
        context = int(getattr(engine.model.config, "max_position_embeddings", seq_len) or seq_len)
        if seq_len > context:
            notes.append(f"seq_len {seq_len} is over the base's context of {context} tokens: used {context}")
            seq_len = context
        heldouts = {d.name: load_heldout(d, tokenizer, seq_len, max_eval_examples) for d in domain_sets}
        for h in heldouts.values():
            if h.dropped:
                notes.append(f"{h.dataset}: {h.dropped} held-out rows dropped, their prompt alone fills seq_len "
                             f"{seq_len} (as the trainer drops them)")
        items, side_items, ref_count = _generation_items(main, prompts, gen_prompts, notes)

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        steps = len(infos) * (len(heldouts) + (1 if items else 0)) + 1
        done = 0
        losses: dict[str, dict[str, LossCell]] = {}
        routes: dict[str, dict] = {}
        base_sets: dict[str, dict] = {}
        for info in infos:
            losses[info.name], routes[info.name] = {}, {}
            with engine.using(info.ref) as model:
                for name, h in heldouts.items():
                    say(done / steps, f"{info.name}: held-out loss on {h.dataset}")
                    r = teacher_forced_pass(model, h, pad_id, batch_size, routing=routing, keep_sets=bool(routing))
                    total_tokens = sum(r.tokens)
                    loss = M.mean_nll(sum(r.nll), total_tokens)
                    losses[info.name][name] = LossCell(
                        loss=loss, perplexity=M.perplexity(loss), tokens=total_tokens, examples=len(r.tokens),
                        seconds=r.seconds, example_loss=[n / t for n, t in zip(r.nll, r.tokens)])
                    if routing:
                        if info.name == BASE:
                            base_sets[name] = r.sets
                        r.routing.drift = routing_drift(r.sets, base_sets[name])
                        r.routing.drift_tokens = r.routing.tokens
                        routes[info.name][name] = r.routing
                    done += 1
        generation = {}
        if items:
            from studio.engine import SamplingParams

            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
            # one untimed token first, so the first model's latency does not include the engine's start-up
            engine.generate([items[0].prompt], adapters=None, params=SamplingParams(max_tokens=1))
            for info in infos:
                say(done / steps, f"{info.name}: generating {len(items)} completions")
                generation[info.name] = _generate(engine, items, info.ref, params, ref_count)
                done += 1
        report = EvalReport(
            base=engine.base_id, base_fingerprint=engine.base.fingerprint, dataset=main.name, models=infos,
            domains={n: {"ref": h.dataset, "examples": len(h.examples), "available": h.available,
                         "dropped": h.dropped, "tokens": losses[BASE][n].tokens} for n, h in heldouts.items()},
            losses=losses, routing=routes if routing else {}, generation=generation,
            prompts=[{"prompt": it.text(), "messages": it.prompt, "reference": it.reference} for it in side_items],
            reference_prompts=ref_count,
            settings={"max_eval_examples": max_eval_examples, "batch_size": batch_size, "seq_len": seq_len,
                      "gen_prompts": gen_prompts, "max_new_tokens": max_new_tokens, "temperature": temperature,
                      "top_p": top_p, "seed": seed, "routing": routing, "quant": _quant_mode(engine),
                      "device": str(getattr(engine, "device", ""))},
            notes=notes, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if not routing:
            report.notes.append("routing statistics were not recorded (routing=None)")
        if record:
            say(done / steps, "recording results in the adapter registry")
            report.recorded = record_results(report, engine.registry)
        say(1.0, "done")
        return report
    finally:
        if owned:
            engine.close()


# ---- pieces ---------------------------------------------------------------------------------------


def _check_settings(max_eval_examples, batch_size, seq_len, gen_prompts, max_new_tokens, routing) -> None:
    for name, value, low in (("max_eval_examples", max_eval_examples, 1), ("batch_size", batch_size, 1),
                             ("seq_len", seq_len, 8), ("gen_prompts", gen_prompts, 0),
                             ("max_new_tokens", max_new_tokens, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise StudioError(f"{name} must be an integer >= {low}, got {value!r}")
    if routing not in (None, "assistant", "all"):
        raise StudioError(f"routing must be 'assistant', 'all' or None, got {routing!r}")


def _progress(progress: Progress | None) -> Progress:
    def say(fraction: float, message: str) -> None:
        logger.info("eval %3.0f%% %s", 100 * fraction, message)
        if progress is not None:
            progress(min(max(fraction, 0.0), 1.0), message)
    return say


def _resolve_models(engine, names: list[str], notes: list[str]) -> list[ModelInfo]:
    """Resolve every reference before any work: unknown references and adapters of another base fail here."""
    infos = [ModelInfo(BASE)]
    seen = {BASE}
    if not any(engine.resolve(n) is None for n in names):
        notes.append("the base was added to the models: every comparison is against it")
    for name in names:
        version = engine.resolve(name)  # RegistryError: no such ref; ModelError: trained on another base
        if version is None or version.ref in seen:
            continue
        seen.add(version.ref)
        ds = version.metadata.get("dataset") if isinstance(version.metadata.get("dataset"), dict) else {}
        plan = version.metadata.get("plan") if isinstance(version.metadata.get("plan"), dict) else {}
        infos.append(ModelInfo(name=version.ref, ref=version.ref, domain=version.domain, sha=version.sha,
                               trained_on=ds.get("ref"), selected_experts=plan.get("expert_ids") or None))
    return infos


def _resolve_domains(main, domains, resolve_dataset) -> list:
    if domains is None:
        refs = default_domains(main.name)
    elif isinstance(domains, str):
        refs = [] if domains.strip().lower() in ("", "none") else [d.strip() for d in domains.split(",")]
    else:
        refs = list(domains)
    out, names = [main], {main.name}
    for ref in refs:
        if not ref:
            raise DatasetError(f"--domains {domains!r} has an empty entry; give comma-separated dataset references")
        d = resolve_dataset(ref)
        if d.name in names:
            if d.name == main.name and d.hash != main.hash:
                raise DatasetError(f"--domains names {d.ref} but the main dataset is {main.ref}: two versions of one "
                                   "dataset cannot share a report; pick one")
            continue
        names.add(d.name)
        out.append(d)
    return out


def _generation_items(main, prompts, gen_prompts: int, notes: list[str]):
    """(items to generate, items shown side by side, how many leading items carry a reference answer)."""
    ref_items = reference_pairs(main.eval_messages())[:gen_prompts] if gen_prompts else []
    if gen_prompts and not ref_items:
        notes.append(f"{main.ref} has no reference answers (no held-out row has a user turn before the assistant's "
                     "answer): exact match, ROUGE-L, BLEU and chrF were skipped")
    user_items: list[PromptItem] = []
    if prompts is not None:
        user_items = load_prompts(prompts) if isinstance(prompts, (str, bytes)) or hasattr(prompts, "__fspath__") \
            else _prompt_list(prompts)
    side = user_items or ref_items
    if not side and not gen_prompts:
        notes.append("no generations: gen_prompts=0 and no prompts given")
    elif not side:
        notes.append("no side-by-side generations: the dataset has no prompts; pass --prompts FILE")
    return ref_items + user_items, side, len(ref_items)


def _prompt_list(prompts) -> list[PromptItem]:
    from studio.eval.prompts import _item

    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise DatasetError("prompts must be a file path or a non-empty list of strings, chats or "
                           "{'prompt', 'reference'} objects")
    return [_item(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


def _generate(engine, items: list[PromptItem], ref: str | None, params, ref_count: int) -> GenerationResult:
    t0 = time.perf_counter()
    completions = engine.generate([it.prompt for it in items], adapters=ref, params=params)
    wall = time.perf_counter() - t0
    outputs = [c.text.strip() for c in completions]
    tokens = sum(c.completion_tokens for c in completions)
    result = GenerationResult(
        outputs=outputs[ref_count:] if len(items) > ref_count else outputs,
        latency_s=sum(c.latency_s for c in completions) / len(completions),
        ttft_s=sum(c.ttft_s for c in completions) / len(completions),
        tokens_per_s=tokens / wall if wall > 0 else 0.0, completion_tokens=tokens, wall_s=wall)
    if ref_count:
        result.reference = M.reference_metrics(outputs[:ref_count], [it.reference for it in items[:ref_count]])
    return result


def _quant_mode(engine) -> str | None:
    quant = getattr(engine.base, "quant", None)
    return getattr(quant, "mode", None)


def registry_metrics(report: EvalReport, model: str) -> dict:
    """The flat metrics recorded for one adapter: `eval.<domain>.<metric>` so each domain's latest result wins
    and versions of a domain compare over time (`studio registry diff law@v2 law@v3`)."""
    out: dict = {"eval.base": report.base}
    for domain, info in report.domains.items():
        cell, base = report.loss(model, domain), report.loss(BASE, domain)
        if cell is None:
            continue
        key = f"eval.{domain}"
        out[f"{key}.dataset"] = info["ref"]
        out[f"{key}.examples"] = cell.examples
        out[f"{key}.loss"] = cell.loss
        out[f"{key}.perplexity"] = cell.perplexity
        if base is not None:
            out[f"{key}.base_loss"] = base.loss
            out[f"{key}.loss_vs_base"] = cell.loss - base.loss
        stats = report.routing.get(model, {}).get(domain)
        if stats is not None:
            for k, v in stats.summary().items():
                if v is not None:
                    out[f"{key}.{k}"] = v
    gen = report.generation.get(model)
    key = f"eval.{report.dataset}"
    if gen is not None:
        for k, v in (gen.reference or {}).items():
            if k != "n":
                out[f"{key}.{k}"] = v
        out[f"{key}.tokens_per_s"] = gen.tokens_per_s
        out[f"{key}.latency_s"] = gen.latency_s
    for v in report.verdicts():
        if v["adapter"] == model and v["beats_base"] is not None:
            out[f"eval.{v['domain']}.beats_base"] = v["beats_base"]
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items() if v is not None}


def record_results(report: EvalReport, registry) -> list[dict]:
    """Append each evaluated adapter version's results to its registry metrics (source 'eval')."""
    recorded = []
    for m in report.adapters:
        entry = registry.append_metrics(m.ref, registry_metrics(report, m.name), source=SOURCE)
        recorded.append({"ref": m.ref, **entry})
    if not report.adapters:
        report.notes.append("no adapter was evaluated, so nothing was recorded in the adapter registry")
    return recorded
