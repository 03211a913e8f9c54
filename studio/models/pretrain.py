"""Pretrain the embedded `tiny-moe` base on the committed corpus (`studio.models.corpus`): full-parameter training of
the DeepSeek-V3-style MoE with a router load-balancing loss. Run `studio models pretrain tiny-moe` (or
`python -m studio.models.pretrain`); it rewrites studio/assets/tiny-moe/model.safetensors and pretrained.json.

Deterministic on one machine type: fixed seed, fixed torch thread count, a fixed data order, fp32 on the CPU and no
data-loader workers, so the same command gives the same bytes (the sha256 recorded in pretrained.json).

Written as a plain loop rather than on the studio trainer: `studio.train` is a LoRA trainer over SFTTrainer
(adapters only, assistant-only loss on chat data), while this is causal-LM pretraining of every weight on packed
plain text; the loop is ~100 lines and keeps every source of nondeterminism in sight.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from studio.models.tiny import PRETRAINED_RECORD, PRETRAINED_WEIGHTS

# the shipped weights and their record: the files the embedded base loads (`studio.models.tiny`)
WEIGHTS_FILE, RECORD_FILE = PRETRAINED_WEIGHTS, PRETRAINED_RECORD


@dataclass
class PretrainConfig:
    """Pretraining options (the CLI's flags)."""

    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed sequence"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a share of the peak"})
    warmup_steps: int = field(default=40, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    aux_coef: float = field(default=0.01, metadata={"help": "router load-balancing loss coefficient"})
    bias_update: float = field(default=1e-3, metadata={"help": "DeepSeek-V3 aux-loss-free bias step per update"})
    seed: int = field(default=1234, metadata={"help": "seed for init and data order"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads (fixed: results depend on it)"})
    eval_every: int = field(default=150, metadata={"help": "held-out loss every N steps (0: only at the end)"})
    eval_batches: int = field(default=8, metadata={"help": "held-out batches per evaluation"})
    prefix_steps: int = field(default=5, metadata={
        "help": "record the weights hash and losses after this many steps: a short rerun checks reproduction"})


# --------------------------------------------------------------------------- data


def tokenize_corpus(records: list[dict], tokenizer) -> dict[str, list[list[int]]]:
    """Token ids per record, split into train and heldout; every document ends with <|endoftext|>."""
    from studio.data.chat import encode_chat
    from studio.models.tokenizer import ENDOFTEXT

    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    out: dict[str, list[list[int]]] = {"train": [], "heldout": []}
    for r in records:
        if "messages" in r:
            ids = encode_chat(tokenizer, r["messages"]).input_ids
        else:
            ids = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
        out[r["split"]].append(list(ids) + [eot])
    return out


def pack(docs: list[list[int]], seq_len: int, seed: int, epoch: int) -> torch.Tensor:
    """Documents shuffled with (seed, epoch), concatenated and cut into [n, seq_len] blocks (the tail dropped)."""
    order = list(range(len(docs)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    flat = [t for i in order for t in docs[i]]
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


class Batches:
    """An endless, deterministic stream of [batch, seq_len] training blocks, reshuffled every epoch."""

    def __init__(self, docs, batch_size: int, seq_len: int, seed: int):
        self.docs, self.batch_size, self.seq_len, self.seed = docs, batch_size, seq_len, seed
        self.epoch, self.pos = 0, 0
        self.blocks = pack(docs, seq_len, seed, 0)
        self.tokens_per_epoch = self.blocks.numel()

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.blocks):
            self.epoch += 1
            self.blocks, self.pos = pack(self.docs, self.seq_len, self.seed, self.epoch), 0
        batch = self.blocks[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch


# --------------------------------------------------------------------------- router balance


class RouterBalance:
    """Hooks every router: collects its logits for the load-balancing loss and counts its choices for the bias step.

    DeepSeek-V3 balances with a per-expert bias added to the scores when choosing (`e_score_correction_bias`, moved
    towards underused experts after each step) plus a small sequence-wise balance loss; transformers defines
    neither in training, so both are here: loss = E * sum_i f_i * P_i over the batch (f_i share of slots routed to
    expert i, P_i mean normalised score), as in Switch Transformer and DeepSeek-V3's complementary loss.
    """

    def __init__(self, model):
        self.routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "top_k")]
        self.records: list[tuple] = []
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module, args, output):
        logits, _, indices = output
        self.records.append((module, logits, indices))

    def loss(self) -> torch.Tensor:
        total = 0.0
        for module, logits, indices in self.records:
            experts = logits.shape[-1]
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
            counts = torch.bincount(indices.reshape(-1), minlength=experts).float()
            f = counts / indices.numel()
            total = total + experts * (f * probs.mean(0)).sum()
        return total / max(len(self.records), 1)

    @torch.no_grad()
    def update_bias(self, step_size: float) -> None:
        for module, _, indices in self.records:
            counts = torch.bincount(indices.reshape(-1), minlength=module.e_score_correction_bias.numel()).float()
            module.e_score_correction_bias += step_size * torch.sign(counts.mean() - counts)

    def clear(self) -> None:
        self.records.clear()


# --------------------------------------------------------------------------- loop


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(model, docs: list[list[int]], seq_len: int, batch_size: int, max_batches: int | None = None) -> float:
    """Mean next-token loss (nats) over packed held-out blocks (fixed order)."""
    blocks = pack(docs, seq_len, seed=0, epoch=0)
    if max_batches:
        blocks = blocks[: max_batches * batch_size]
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i:i + batch_size]
        out = model(input_ids=b, labels=b)
        n = b.numel() - b.shape[0]
        total, count = total + out.loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


def pretrain(cfg: PretrainConfig, log=print, final_eval_batches: int | None = None):
    """Train tiny-moe from its seeded random init on the committed corpus; returns (model, record dict).

    The final held-out loss covers the whole held-out split unless `final_eval_batches` caps it (short test runs).
    """
    from studio.models import corpus, tiny
    from studio.models.tokenizer import load_tokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    data = tokenize_corpus(corpus.load_corpus(), load_tokenizer())
    model = tiny.build_model("tiny-moe-random", seed=cfg.seed)
    model.train()
    batches = Batches(data["train"], cfg.batch_size, cfg.seq_len, cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "gate.weight" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}],
                            lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    balance = RouterBalance(model)
    log(f"pretraining tiny-moe: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{batches.tokens_per_epoch:,} training tokens per epoch, {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.seq_len} tokens, {cfg.threads} threads")
    history = []
    prefix: dict = {"steps": cfg.prefix_steps, "losses": []}
    loss_ema = None
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = batches.next()
        out = model(input_ids=batch, labels=batch)
        aux = balance.loss()
        (out.loss + cfg.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.bias_update:
            balance.update_bias(cfg.bias_update)
        balance.clear()
        if step < cfg.prefix_steps:
            prefix["losses"].append(out.loss.item())
            if step + 1 == cfg.prefix_steps:
                prefix["weights_hash"] = tiny.weights_hash(model)
        loss_ema = out.loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * out.loss.item()
        last = step + 1 == cfg.steps
        if (step + 1) % 10 == 0 or last:
            elapsed = time.time() - t0
            eta = elapsed / (step + 1) * (cfg.steps - step - 1)
            log(f"step {step + 1}/{cfg.steps} loss {out.loss.item():.4f} (ema {loss_ema:.4f}) aux {aux.item():.3f} "
                f"lr {lr_at(step, cfg):.2e} epoch {batches.epoch} elapsed {elapsed:.0f}s eta {eta:.0f}s")
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            balance.clear()
            ho = heldout_loss(model, data["heldout"], cfg.seq_len, cfg.batch_size,
                              final_eval_batches if last else cfg.eval_batches)
            balance.clear()
            history.append({"step": step + 1, "train_loss_ema": round(loss_ema, 4), "heldout_loss": round(ho, 4)})
            log(f"step {step + 1}: held-out loss {ho:.4f}")
    for h in balance.handles:
        h.remove()
    model.eval()
    record = {
        "config": asdict(cfg), "history": history, "prefix_check": prefix, "heldout_loss": history[-1]["heldout_loss"],
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "train_tokens_per_epoch": batches.tokens_per_epoch, "epochs": round(
            cfg.steps * cfg.batch_size * cfg.seq_len / batches.tokens_per_epoch, 2),
        "corpus_sha256": json.loads((corpus.CORPUS_DIR / corpus.MANIFEST_FILE).read_text())["sha256"],
        "wall_seconds": round(time.time() - t0, 1),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    return model, record


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else platform's answer): part of what "same machine type" means."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_weights(model, path: Path) -> str:
    """Write the state dict as safetensors (sorted keys, fixed metadata: byte-stable) and return its sha256."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in sorted(model.state_dict().items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(prefix=".model-", suffix=".safetensors", dir=path.parent)[1])
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the shipped weights are read by every user
    os.replace(tmp, path)  # written under a temporary name, renamed last
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def pretrain_and_save(cfg: PretrainConfig, out: Path, log=print) -> dict:
    """Pretrain, write `out`/model.safetensors and `out`/pretrained.json (the record, with the weights' sha256) and
    return the record: what `studio models pretrain` and this module's command both run."""
    model, record = pretrain(cfg, log=log)
    record["sha256"] = save_weights(model, out / WEIGHTS_FILE.name)
    (out / RECORD_FILE.name).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.models.pretrain", description=__doc__.splitlines()[0])
    defaults = PretrainConfig()
    for name, f in PretrainConfig.__dataclass_fields__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)),
                            default=getattr(defaults, name), help=f"{f.metadata['help']} (default %(default)s)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE.parent,
                        help="folder for model.safetensors and pretrained.json (default: the shipped assets)")
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(args, k) for k in PretrainConfig.__dataclass_fields__})
    record = pretrain_and_save(cfg, args.out, log=lambda s: print(s, flush=True))
    print(f"wrote {args.out / WEIGHTS_FILE.name} sha256 {record['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
