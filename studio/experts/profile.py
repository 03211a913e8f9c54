"""Routing profiles: route a dataset's split through a base and count, per MoE layer and expert, the share of
token-slots and the mean gate score. Cached by base fingerprint + dataset hash; `studio experts profile` writes
JSON, CSV and a heatmap PNG, and the trainer's `--expert-selection` reads the same profile.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from studio.errors import DatasetError

PROFILE_VERSION = 1  # bump when what is measured changes: old cache entries are then never read
SPLITS = ("train", "eval")


def profiles_cache() -> Path:
    """Where profiles are cached (`$STUDIO_PROFILES_CACHE`, else `<studio home>/expert_profiles`)."""
    from studio import paths

    return Path(os.environ.get("STUDIO_PROFILES_CACHE", paths.studio_home() / "expert_profiles")).expanduser()


@dataclass
class ExpertProfile:
    """Expert usage of one base on one dataset split. counts[layer][expert]: token-slots routed to the expert;
    gate_sums[layer][expert]: the routing weights those slots carried, summed."""
    base: str
    base_fingerprint: str
    dataset: str              # dataset ref, e.g. law@v1
    dataset_hash: str
    split: str
    seq_len: int
    quant: str                # e.g. "4bit/nf4", "none"
    max_examples: int         # 0: every row of the split
    layers: list[str]
    counts: list[list[int]]
    gate_sums: list[list[float]]
    tokens: int               # tokens routed (every non-padding token of the encoded rows)
    examples: int
    top_k: int
    key: str
    version: int = PROFILE_VERSION
    from_cache: bool = field(default=False, compare=False)

    @property
    def num_experts(self) -> int:
        return len(self.counts[0]) if self.counts else 0

    def token_share(self) -> list[list[float]]:
        """Per layer, each expert's share of the layer's routed token-slots (rows sum to 1)."""
        c = np.asarray(self.counts, dtype=float)
        return (c / np.maximum(c.sum(axis=1, keepdims=True), 1)).tolist()

    def mean_gate(self) -> list[list[float]]:
        """Per layer, each expert's routing weight averaged over all routed tokens (0 where never chosen)."""
        return (np.asarray(self.gate_sums, dtype=float) / max(self.tokens, 1)).tolist()

    def summary(self) -> dict:
        """What adapters record about the profile their selection came from (the counts stay in the cache)."""
        return {"key": self.key, "base": self.base, "base_fingerprint": self.base_fingerprint,
                "dataset": self.dataset, "dataset_hash": self.dataset_hash, "split": self.split,
                "seq_len": self.seq_len, "quant": self.quant, "tokens": self.tokens, "examples": self.examples}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("from_cache")
        d["token_share"] = self.token_share()
        d["mean_gate"] = self.mean_gate()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExpertProfile:
        names = {f for f in cls.__dataclass_fields__ if f != "from_cache"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, out_dir: str | os.PathLike, selection: dict[str, list[int]] | None = None) -> dict[str, Path]:
        """profile.json, profile.csv (one row per layer and expert) and heatmap.png (selected experts outlined)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": out / "profile.json", "csv": out / "profile.csv", "png": out / "heatmap.png"}
        d = self.to_dict()
        if selection is not None:
            d["selection"] = selection
        files["json"].write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
        from studio.eval.routing import layer_number

        share, gate = self.token_share(), self.mean_gate()
        with open(files["csv"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", "layer_path", "expert", "token_slots", "token_share", "mean_gate"]
                       + (["selected"] if selection is not None else []))
            for i, path in enumerate(self.layers):
                for e in range(self.num_experts):
                    row = [layer_number(path), path, e, self.counts[i][e], f"{share[i][e]:.6f}", f"{gate[i][e]:.6f}"]
                    if selection is not None:
                        row.append(int(e in selection.get(path, ())))
                    w.writerow(row)
        from studio.eval.plots import save_png

        save_png(plot_profile(self, selection), files["png"])
        return files

    def table(self, selection: dict[str, list[int]] | None = None, top: int = 4) -> str:
        """A text summary: per layer, the most-used experts with their token share and mean gate."""
        from studio.eval.routing import layer_number

        share, gate = self.token_share(), self.mean_gate()
        lines = [f"expert profile of {self.base} on {self.dataset} ({self.split}, {self.examples} examples, "
                 f"{self.tokens:,} tokens, top-{self.top_k} of {self.num_experts} experts){' [cached]' if self.from_cache else ''}",
                 f"{'layer':>5}  top experts by token share (share / mean gate)"]
        for i, path in enumerate(self.layers):
            from studio.experts.selection import ranked

            best = ranked(share[i])[:top]
            txt = "  ".join(f"e{e} {share[i][e]:.3f}/{gate[i][e]:.3f}" for e in best)
            sel = f"   selected {len(selection[path])}: {selection[path]}" if selection and path in selection else ""
            lines.append(f"{layer_number(path):>5}  {txt}{sel}")
        return "\n".join(lines)


def plot_profile(profile: ExpertProfile, selection: dict[str, list[int]] | None = None, title: str | None = None):
    """Two heatmaps, MoE layers x experts: token share and mean gate score; selected experts outlined in red."""
    from matplotlib.patches import Rectangle

    from studio.eval.plots import _figure
    from studio.eval.routing import layer_number

    e, n = profile.num_experts, len(profile.layers)
    fig = _figure(min(2.0 + 2 * (1.5 + 0.13 * min(e, 64)), 24.0), 1.6 + 0.3 * n)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, values, label in ((axes[0], profile.token_share(), "token share"),
                              (axes[1], profile.mean_gate(), "mean gate score")):
        im = ax.imshow(np.asarray(values), cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(n), [str(layer_number(p)) for p in profile.layers])
        if e <= 32:
            ax.set_xticks(range(e))
            ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.01)
        for i, path in enumerate(profile.layers):
            for x in (selection or {}).get(path, ()):
                ax.add_patch(Rectangle((x - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    axes[0].set_ylabel("MoE layer")
    fig.suptitle(title or f"{profile.base} on {profile.dataset} ({profile.split})"
                 + (" - selected experts outlined" if selection else ""), fontsize=10)
    return fig


def profile_key(base_fingerprint: str, dataset_hash: str, split: str, seq_len: int, quant: str,
                max_examples: int) -> str:
    """The cache key: everything that changes what the profile measures."""
    payload = json.dumps({"version": PROFILE_VERSION, "base": base_fingerprint, "dataset": dataset_hash,
                          "split": split, "seq_len": seq_len, "quant": quant, "max_examples": max_examples},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def quant_label(quant) -> str:
    """A QuantSpec as the profile records it (the routing of a 4-bit base differs slightly from the fp32 one)."""
    if quant.mode == "none":
        return f"none/{quant.compute_dtype}"
    return f"{quant.mode}/{quant.quant_type}{'/dq' if quant.double_quant else ''}/{quant.compute_dtype}"


def _rows(dataset, split: str):
    if split not in SPLITS:
        raise DatasetError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    rows = dataset.train_messages() if split == "train" else dataset.eval_messages()
    if not rows:
        raise DatasetError(f"dataset {dataset.ref} has no {split} rows to profile; use --split "
                           f"{'eval' if split == 'train' else 'train'}")
    return rows


def profile_experts(base: str = "tiny-moe", dataset: str = "law", split: str = "train", quant=None,
                    seq_len: int = 512, batch_size: int = 8, max_examples: int = 0, refresh: bool = False,
                    loaded=None, device=None, log=print) -> ExpertProfile:
    """The routing profile of `base` on `dataset`'s `split`, from the cache when base and data are unchanged.

    `loaded` (a LoadedBase, e.g. the trainer's) is used instead of loading `base` again; it must carry no active
    adapter. `max_examples` > 0 profiles the first rows only (the split order is deterministic)."""
    from studio.data import resolve_dataset
    from studio.models.loading import QuantSpec

    quant = quant or (loaded.quant if loaded is not None else QuantSpec("4bit"))
    if isinstance(quant, str):
        quant = QuantSpec(quant)
    ds = resolve_dataset(dataset)
    rows = _rows(ds, split)
    if loaded is not None:
        base_ref, fingerprint = loaded.ref, loaded.fingerprint
    else:
        from studio.models.resolve import base_fingerprint, resolve_base

        base_ref = base
        fingerprint = base_fingerprint(resolve_base(base).path)
    label = quant_label(quant)
    key = profile_key(fingerprint, ds.hash, split, seq_len, label, max_examples)
    cached = profiles_cache() / f"{key}.json"
    if cached.exists() and not refresh:
        try:
            prof = ExpertProfile.from_dict(json.loads(cached.read_text()))
            prof.from_cache = True
            log(f"expert profile {key} from the cache ({prof.dataset}, {prof.tokens:,} tokens)")
            return prof
        except (ValueError, TypeError, KeyError):
            log(f"expert profile cache entry {cached} is unreadable; profiling again")
    if loaded is None:
        from studio.models.loading import load_base

        loaded = load_base(base, quant, device=device)
    prof = _measure(loaded, ds, rows, split, seq_len, batch_size, max_examples, label, key, log)
    prof.base = base_ref
    _write_atomic(cached, json.dumps(prof.to_dict(), sort_keys=True))
    return prof


def _measure(loaded, ds, rows, split, seq_len, batch_size, max_examples, label, key, log) -> ExpertProfile:
    """Teacher-forced no-grad forwards over the encoded rows, recording every non-padding token's routing."""
    import torch

    from studio.eval.heldout import batches, encode, training_chat_template
    from studio.eval.routing import RoutingRecorder

    model, tok = loaded.model, loaded.tokenizer
    template = training_chat_template(tok)
    rows = rows[:max_examples] if max_examples else rows
    examples = [e for e in (encode(tok, m, seq_len, template) for m in rows) if e is not None]
    if not examples:
        raise DatasetError(f"dataset {ds.ref}: no {split} row keeps an assistant token within --seq-len {seq_len}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = (len(examples) + batch_size - 1) // batch_size
    every = max(1, total // 10)
    try:
        with torch.no_grad(), RoutingRecorder(model) as rec:
            for i, (ids, attn, _, _) in enumerate(batches(examples, batch_size, pad)):
                rec.select(attn.bool())
                model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
                if (i + 1) % every == 0 or i + 1 == total:
                    log(f"profiling experts: batch {i + 1}/{total} ({rec.tokens:,} tokens)")
            stats = rec.stats()
            gates = rec.gate_sums()
    finally:
        model.train(was_training)
    return ExpertProfile(base=loaded.ref, base_fingerprint=loaded.fingerprint, dataset=ds.ref, dataset_hash=ds.hash,
                         split=split, seq_len=seq_len, quant=label, max_examples=max_examples, layers=stats.layers,
                         counts=stats.counts, gate_sums=[[round(g, 9) for g in row] for row in gates],
                         tokens=stats.tokens, examples=len(examples), top_k=stats.top_k, key=key)


def _write_atomic(path: Path, text: str) -> None:
    """Written to a temporary file and renamed last, so a reader never sees half a profile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
