"""The evaluation report: results of N models on held-out sets, as JSON, Markdown, CSV/DataFrames and PNG plots.

`EvalReport` holds plain data (no model, no engine), so it can be saved, loaded back (`EvalReport.load`) and
rendered by the CLI or the web UI alike.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.eval.routing import RoutingStats, domain_divergence

BASE = "base"


@dataclass
class ModelInfo:
    name: str                      # "base" or the canonical registry reference "law@v3"
    ref: str | None = None         # None for the bare base
    domain: str | None = None      # the adapter's registry domain
    sha: str | None = None         # registry manifest sha
    trained_on: str | None = None  # dataset ref recorded by the trainer
    selected_experts: dict[str, list[int]] | None = None  # expert-selective adapters: layer path -> trained experts


@dataclass
class LossCell:
    """Held-out loss of one model on one dataset: NLL per assistant token, token-weighted over examples."""
    loss: float
    perplexity: float
    tokens: int
    examples: int
    seconds: float
    example_loss: list[float] = field(default_factory=list)  # mean NLL per example, in dataset order


@dataclass
class GenerationResult:
    """One model's generations (same prompts, seed and decoding for every model)."""
    outputs: list[str]
    latency_s: float               # mean request latency (submit -> last token)
    ttft_s: float                  # mean time to first token
    tokens_per_s: float            # completion tokens / wall time of the whole batch
    completion_tokens: int
    wall_s: float
    reference: dict | None = None  # exact_match, rouge_l (0..1), bleu, chrf (0..100), n


@dataclass
class EvalReport:
    """The results of `studio.evaluate`: per model and held-out set, loss, routing, generations, metrics.

    `to_markdown()` is report.md; `table()` a DataFrame; `save(dir)` writes JSON, Markdown, CSVs and plots; a
    notebook renders the report as its Markdown.
    """

    base: str
    base_fingerprint: str
    dataset: str                                   # the main dataset's name (its domain key)
    models: list[ModelInfo]
    domains: dict[str, dict]                       # name -> {"ref", "examples", "available", "dropped", "tokens"}
    losses: dict[str, dict[str, LossCell]]         # model -> domain -> cell
    routing: dict[str, dict[str, RoutingStats]] = field(default_factory=dict)  # model -> domain -> stats
    generation: dict[str, GenerationResult] = field(default_factory=dict)      # model -> result
    prompts: list[dict] = field(default_factory=list)   # side-by-side: {"prompt", "messages", "reference"}
    reference_prompts: int = 0                     # how many generations had a reference answer
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recorded: list[dict] = field(default_factory=list)  # registry entries written: {"ref", "source", "at", ...}
    created: str = ""

    # ---- derived numbers ------------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        """The evaluated models' names, the base first."""
        return [m.name for m in self.models]

    @property
    def adapters(self) -> list[ModelInfo]:
        """The evaluated adapters (every model but the base)."""
        return [m for m in self.models if m.ref is not None]

    def loss(self, model: str, domain: str | None = None) -> LossCell | None:
        """The held-out loss cell of a model on a domain (default: the main dataset), None if not evaluated."""
        return self.losses.get(model, {}).get(domain or self.dataset)

    def own_domain(self, m: ModelInfo) -> str | None:
        """The evaluated held-out set that is the adapter's own: its registry domain, else its training data."""
        for key in (m.domain, (m.trained_on or "").split("@")[0] or None):
            if key and key in self.domains:
                return key
        return None

    def verdicts(self) -> list[dict]:
        """Per adapter: does it beat the base on its own domain's held-out loss? With the numbers."""
        out = []
        for m in self.adapters:
            domain = self.own_domain(m)
            base, mine = (self.loss(BASE, domain), self.loss(m.name, domain)) if domain else (None, None)
            if base is None or mine is None:
                out.append({"adapter": m.name, "domain": m.domain, "beats_base": None,
                            "text": f"{m.name}: its own domain ({m.domain}) was not among the evaluated held-out "
                                    f"sets ({', '.join(self.domains)}), so there is no verdict"})
                continue
            delta = mine.loss - base.loss
            rel = delta / base.loss if base.loss else 0.0
            beats = delta < 0
            wins = _share_better(mine.example_loss, base.example_loss)
            word = "beats" if beats else "does NOT beat"
            text = (f"{m.name} {word} the base on its own domain ({domain}): held-out loss {mine.loss:.4f} vs "
                    f"{base.loss:.4f} for the base ({delta:+.4f}, {100 * rel:+.1f}%), perplexity "
                    f"{mine.perplexity:.4g} vs {base.perplexity:.4g}")
            if wins is not None:
                text += f"; lower loss on {100 * wins:.0f}% of the {len(mine.example_loss)} examples"
            out.append({"adapter": m.name, "domain": domain, "beats_base": beats, "loss": mine.loss,
                        "base_loss": base.loss, "delta": delta, "relative": rel, "perplexity": mine.perplexity,
                        "base_perplexity": base.perplexity, "examples_better": wins, "text": text})
        return out

    # ---- tables ---------------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """One row per model on the main dataset: loss, perplexity, delta vs base, reference metrics, speed,
        routing balance and drift."""
        base = self.loss(BASE)
        rows = []
        for m in self.models:
            cell = self.loss(m.name)
            row = {"model": m.name, "dataset": self.domains.get(self.dataset, {}).get("ref", self.dataset)}
            if cell:
                row.update(loss=cell.loss, perplexity=cell.perplexity, tokens=cell.tokens, examples=cell.examples,
                           loss_vs_base=(cell.loss - base.loss) if base and m.name != BASE else None,
                           examples_better_than_base=(_share_better(cell.example_loss, base.example_loss)
                                                      if base and m.name != BASE else None))
            gen = self.generation.get(m.name)
            ref = gen.reference if gen else None
            for key in ("exact_match", "rouge_l", "bleu", "chrf"):
                row[key] = ref.get(key) if ref else None
            row.update(latency_s=gen.latency_s if gen else None, ttft_s=gen.ttft_s if gen else None,
                       tokens_per_s=gen.tokens_per_s if gen else None)
            stats = self.routing.get(m.name, {}).get(self.dataset)
            summary = stats.summary() if stats else {}
            row.update(routing_entropy=summary.get("routing_entropy"), routing_cv=summary.get("routing_cv"),
                       routing_drift=summary.get("routing_drift"))
            rows.append(row)
        return rows

    def table(self):
        """rows() as a pandas DataFrame (index: model)."""
        import pandas as pd

        return pd.DataFrame(self.rows()).set_index("model")

    def cross_domain_rows(self) -> list[dict]:
        """Every model against every held-out set: loss and the change against the base on that set."""
        rows = []
        for m in self.models:
            row: dict = {"model": m.name}
            for d in self.domains:
                cell, base = self.loss(m.name, d), self.loss(BASE, d)
                row[f"{d}_loss"] = cell.loss if cell else None
                row[f"{d}_vs_base"] = (cell.loss - base.loss) if cell and base else None
            rows.append(row)
        return rows

    def cross_domain_table(self):
        """cross_domain_rows() as a pandas DataFrame (index: model)."""
        import pandas as pd

        return pd.DataFrame(self.cross_domain_rows()).set_index("model")

    def routing_rows(self) -> list[dict]:
        """Long format: model, dataset, layer, expert, count, share of the layer's routed slots."""
        rows = []
        for model, per in self.routing.items():
            for domain, stats in per.items():
                for layer, counts, drift in zip(stats.layer_numbers, stats.counts,
                                                stats.drift or [None] * len(stats.counts)):
                    slots = sum(counts) or 1
                    for expert, count in enumerate(counts):
                        rows.append({"model": model, "dataset": domain, "layer": layer, "expert": expert,
                                     "count": count, "share": count / slots, "layer_drift": drift})
        return rows

    def routing_divergence_rows(self) -> list[dict]:
        """Per model and pair of held-out sets: how differently the model routes them (Jensen-Shannon distance of
        each layer's expert usage, 0 = same proportions, 1 = disjoint experts)."""
        rows = []
        for model, per in self.routing.items():
            for r in domain_divergence(per):
                row = {"model": model, "domain_a": r["domains"][0], "domain_b": r["domains"][1],
                       "mean_js_distance": r["mean_js_distance"]}
                row.update({f"layer_{n}": v for n, v in zip(r["layers"], r["js_distance"])})
                rows.append(row)
        return rows

    # ---- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Everything, JSON-ready (report.json), with the verdicts and tables derived from it."""
        return {
            "base": self.base, "base_fingerprint": self.base_fingerprint, "dataset": self.dataset,
            "created": self.created, "settings": self.settings,
            "models": [asdict(m) for m in self.models], "domains": self.domains,
            "losses": {m: {d: asdict(c) for d, c in per.items()} for m, per in self.losses.items()},
            "routing": {m: {d: s.to_dict() for d, s in per.items()} for m, per in self.routing.items()},
            "generation": {m: asdict(g) for m, g in self.generation.items()},
            "prompts": self.prompts, "reference_prompts": self.reference_prompts,
            "verdicts": self.verdicts(), "table": self.rows(), "cross_domain": self.cross_domain_rows(),
            "routing_divergence": self.routing_divergence_rows(), "notes": self.notes, "recorded": self.recorded,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """to_dict() as JSON; non-finite numbers become null."""
        return json.dumps(_finite(self.to_dict()), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        """The report back from to_dict()."""
        return cls(
            base=d["base"], base_fingerprint=d.get("base_fingerprint", ""), dataset=d["dataset"],
            models=[ModelInfo(**m) for m in d["models"]], domains=d["domains"],
            losses={m: {k: LossCell(**c) for k, c in per.items()} for m, per in d["losses"].items()},
            routing={m: {k: RoutingStats.from_dict(s) for k, s in per.items()}
                     for m, per in d.get("routing", {}).items()},
            generation={m: GenerationResult(**g) for m, g in d.get("generation", {}).items()},
            prompts=d.get("prompts", []), reference_prompts=d.get("reference_prompts", 0),
            settings=d.get("settings", {}), notes=d.get("notes", []), recorded=d.get("recorded", []),
            created=d.get("created", ""))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        """A saved report: its report.json, or the directory holding it."""
        p = Path(path)
        return cls.from_dict(json.loads((p / "report.json" if p.is_dir() else p).read_text(encoding="utf-8")))

    # ---- Markdown -------------------------------------------------------------------------------

    def to_markdown(self) -> str:
        """The report as Markdown (report.md): verdicts, the metric table, cross-domain losses, routing, and
        the side-by-side generations."""
        return self.markdown()

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def markdown(self) -> str:
        """The report as Markdown; the same as to_markdown()."""
        ds = self.domains.get(self.dataset, {})
        s = self.settings
        lines = [f"# Evaluation of {', '.join(self.model_names)} on {ds.get('ref', self.dataset)}", "",
                 f"Base `{self.base}` ({self.base_fingerprint[:19]}). Held-out loss is the mean negative "
                 f"log-likelihood per assistant token (the tokens the trainer computes loss on), over "
                 f"{ds.get('examples', '?')} held-out examples ({ds.get('tokens', '?')} tokens) of "
                 f"{ds.get('ref', self.dataset)}; perplexity = exp(loss).", ""]
        verdicts = self.verdicts()
        if verdicts:
            lines += ["## Verdict", ""] + [f"- {v['text']}." for v in verdicts] + [""]
        lines += [f"## Results on {ds.get('ref', self.dataset)}", ""]
        cols = [("model", "model", None), ("loss", "loss", ".4f"), ("perplexity", "ppl", ".4g"),
                ("loss_vs_base", "Δ loss vs base", "+.4f"), ("examples_better_than_base", "better than base", "%"),
                ("exact_match", "exact match", "%"), ("rouge_l", "ROUGE-L", ".3f"), ("bleu", "BLEU", ".2f"),
                ("chrf", "chrF", ".2f"), ("latency_s", "latency s", ".3f"), ("tokens_per_s", "tokens/s", ".1f"),
                ("routing_entropy", "routing entropy", ".3f"), ("routing_cv", "routing CV", ".3f"),
                ("routing_drift", "routing drift", "%")]
        lines += _md_table([[_fmt(r.get(k), f) for k, _, f in cols] for r in self.rows()], [h for _, h, _ in cols])
        lines += ["", "Exact match, ROUGE-L (F1, 0-1), BLEU and chrF (sacrebleu, 0-100) compare greedy generations "
                  f"with the reference answers of {self.reference_prompts} held-out prompts; routing entropy is "
                  "normalised (1 = perfectly balanced), CV is std/mean of expert counts, drift is the share of "
                  "tokens whose top-k experts differ from the base's, all averaged over MoE layers.", ""]
        if len(self.domains) > 1:
            lines += ["## Cross-domain held-out loss", "",
                      "Rows: models; columns: held-out sets; in brackets the change against the base (negative "
                      "is better).", ""]
            body = []
            for r in self.cross_domain_rows():
                body.append([r["model"]] + [
                    "-" if r[f"{d}_loss"] is None else
                    f"{r[f'{d}_loss']:.4f}" + ("" if r["model"] == BASE or r[f"{d}_vs_base"] is None
                                               else f" ({r[f'{d}_vs_base']:+.4f})")
                    for d in self.domains])
            lines += _md_table(body, ["model"] + [self.domains[d].get("ref", d) for d in self.domains]) + [""]
        lines += self._routing_markdown()
        lines += self._generations_markdown()
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        if self.recorded:
            lines += ["## Recorded in the adapter registry", ""] + [
                f"- {r['ref']}: {len(r['metrics'])} metrics (source `{r['source']}`, {r['at']})"
                for r in self.recorded] + [""]
        return "\n".join(lines)

    def _routing_markdown(self) -> list[str]:
        if not any(self.dataset in per for per in self.routing.values()):
            return []
        lines = [f"## Routing on {self.domains[self.dataset].get('ref', self.dataset)}", ""]
        body = []
        for model, per in self.routing.items():
            stats = per.get(self.dataset)
            if stats is None:
                continue
            ent, cv, drift = stats.normalized_entropy(), stats.cv(), stats.drift or [None] * len(stats.counts)
            for i, layer in enumerate(stats.layer_numbers):
                counts = stats.counts[i]
                top = sorted(range(len(counts)), key=lambda e: -counts[e])[:3]
                slots = sum(counts) or 1
                body.append([model, str(layer), _fmt(ent[i], ".3f"), _fmt(cv[i], ".3f"), _fmt(drift[i], "%"),
                             ", ".join(f"e{e} {100 * counts[e] / slots:.0f}%" for e in top)])
        first = next(s for per in self.routing.values() for d, s in per.items() if d == self.dataset)
        lines += [f"{first.tokens} tokens x top-{first.top_k} = {first.slots()} routed slots per layer.", ""]
        lines += _md_table(body, ["model", "layer", "entropy", "CV", "drift", "most used experts"]) + [""]
        div = self.routing_divergence_rows()
        if div:
            layers = [k for k in div[0] if k.startswith("layer_")]
            lines += ["### Routing differences between held-out sets", "",
                      "Jensen-Shannon distance between two sets' expert usage, per layer (0: same proportions, "
                      "1: disjoint experts). Experts that specialise by domain show as larger distances.", ""]
            lines += _md_table([[r["model"], f"{r['domain_a']} vs {r['domain_b']}", _fmt(r["mean_js_distance"], ".3f")]
                                + [_fmt(r.get(k), ".3f") for k in layers] for r in div],
                               ["model", "sets", "mean"] + [k.replace("_", " ") for k in layers]) + [""]
        return lines

    def _generations_markdown(self) -> list[str]:
        if not self.prompts or not self.generation:
            return []
        s = self.settings
        decoding = "greedy" if not s.get("temperature") else f"temperature {s.get('temperature')}"
        lines = ["## Side-by-side generations", "",
                 f"Same prompts, seed {s.get('seed')}, {decoding}, at most {s.get('max_new_tokens')} new tokens.", ""]
        for i, p in enumerate(self.prompts):
            lines += [f"### {i + 1}. {_one_line(p['prompt'], 200)}", ""]
            body = [[m, _one_line(self.generation[m].outputs[i], 400)] for m in self.model_names
                    if m in self.generation and i < len(self.generation[m].outputs)]
            if p.get("reference") is not None:
                body.append(["*reference*", _one_line(p["reference"], 400)])
            lines += _md_table(body, ["model", "output"]) + [""]
        return lines

    # ---- files ----------------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """Write report.json, report.md, results.csv, cross_domain.csv, routing.csv and the PNG plots into
        `out_dir`; returns {kind: path}. report.json is written last, so its presence means the set is complete."""
        import pandas as pd

        from studio.eval import plots

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        _write(out / "report.md", self.markdown())
        paths["markdown"] = str(out / "report.md")
        for name, rows in (("results", self.rows()), ("cross_domain", self.cross_domain_rows()),
                           ("routing", self.routing_rows()),
                           ("routing_divergence", self.routing_divergence_rows())):
            if rows:
                _write(out / f"{name}.csv", pd.DataFrame(rows).to_csv(index=False))
                paths[f"{name}_csv"] = str(out / f"{name}.csv")
        for name, fn in (("heldout_loss", plots.plot_heldout_loss), ("cross_domain", plots.plot_cross_domain),
                         ("expert_usage", plots.plot_expert_usage), ("routing_drift", plots.plot_routing_drift)):
            fig = fn(self)
            if fig is not None:
                path = out / f"{name}.png"
                plots.save_png(fig, path)
                paths[f"{name}_png"] = str(path)
        _write(out / "report.json", self.to_json())
        paths["json"] = str(out / "report.json")
        return paths


# ---- helpers ------------------------------------------------------------------------------------


def _share_better(mine: list[float], base: list[float]) -> float | None:
    if not mine or len(mine) != len(base):
        return None
    return sum(a < b for a, b in zip(mine, base)) / len(mine)


def _finite(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _fmt(value, spec: str | None) -> str:
    if value is None:
        return "-"
    if spec is None:
        return str(value)
    if spec == "%":
        return f"{100 * value:.1f}%"
    return format(value, spec)


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _md_table(body: list[list[str]], header: list[str]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(row) + " |" for row in body])


def _write(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
