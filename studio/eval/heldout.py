"""Held-out data for evaluation, formatted exactly as the trainer formats it, and the teacher-forced pass that
measures loss (assistant tokens only) and records routing in one forward per batch.

Formatting follows TRL's SFTTrainer with `assistant_only_loss=True` (what studio.train runs): the tokenizer's
chat template (or TRL's training copy of it with `{% generation %}` markers), `return_assistant_tokens_mask`,
labels = input ids on assistant tokens and -100 elsewhere, truncation keeping the start at `seq_len`, and
examples left without an assistant token dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from studio.errors import DatasetError


@dataclass
class Encoded:
    input_ids: list[int]
    assistant_mask: list[int]   # 1 on tokens the trainer computes loss on (the assistant's answers)


@dataclass
class HeldOut:
    """A dataset's held-out split, encoded for one tokenizer."""
    dataset: str                # dataset ref, e.g. "law@v1"
    name: str                   # dataset name = domain key in reports, e.g. "law"
    examples: list[Encoded]
    available: int              # held-out rows in the dataset
    dropped: int                # rows dropped: prompt alone fills seq_len
    seq_len: int


def training_chat_template(tokenizer) -> str | None:
    """The chat template override SFTTrainer uses for assistant-only loss (None: the tokenizer's own has
    `{% generation %}` markers and is used as is)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DatasetError("the base's tokenizer has no chat template, so held-out chat data cannot be formatted "
                           "the way the trainer formats it; use a base whose tokenizer defines one")
    return None if has_generation_markers(template) else get_training_chat_template(tokenizer)


def encode(tokenizer, messages: list[dict], seq_len: int, chat_template: str | None) -> Encoded | None:
    """One conversation -> input ids + assistant mask, truncated to seq_len (keep the start). None when no
    assistant token survives truncation (SFTTrainer drops such examples too)."""
    from studio.data.chat import encode_chat

    out = encode_chat(tokenizer, messages, chat_template=chat_template, assistant_mask=True)
    ids, mask = out.input_ids[:seq_len], out.assistant_masks[:seq_len]
    if not any(mask):
        return None
    return Encoded(ids, mask)


def load_heldout(dataset, tokenizer, seq_len: int, max_examples: int | None) -> HeldOut:
    """The first `max_examples` encodable held-out rows of a DatasetVersion (the split is deterministic, so the
    same rows are scored every time and results stay comparable across versions)."""
    rows = dataset.eval_messages()
    if not rows:
        raise DatasetError(f"dataset {dataset.ref} has no held-out rows; re-register it with --eval-ratio > 0 or "
                           "--eval-file")
    template = training_chat_template(tokenizer)
    examples, dropped = [], 0
    for messages in rows:
        if max_examples is not None and len(examples) >= max_examples:
            break
        enc = encode(tokenizer, messages, seq_len, template)
        if enc is None:
            dropped += 1
        else:
            examples.append(enc)
    if not examples:
        raise DatasetError(f"dataset {dataset.ref}: no held-out row keeps an assistant token within --seq-len "
                           f"{seq_len} ({dropped} dropped); raise --seq-len")
    return HeldOut(dataset=dataset.ref, name=dataset.name, examples=examples, available=len(rows), dropped=dropped,
                   seq_len=seq_len)


def batches(examples: list[Encoded], batch_size: int, pad_id: int):
    """Right-padded tensors (input_ids, attention_mask, labels, assistant_mask) in dataset order."""
    import torch

    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        assistant = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            attn[i, :n] = 1
            assistant[i, :n] = torch.tensor(e.assistant_mask, dtype=torch.bool)
        labels = torch.where(assistant, ids, torch.full_like(ids, -100))
        yield ids, attn, labels, assistant


@dataclass
class PassResult:
    nll: list[float]          # per example, summed over its assistant tokens
    tokens: list[int]         # per example, assistant tokens scored
    seconds: float
    routing: object = None    # RoutingStats
    sets: dict | None = None  # per-layer top-k sets (for drift), when asked


def teacher_forced_pass(model, heldout: HeldOut, pad_id: int, batch_size: int = 8, routing: str | None = "assistant",
                        keep_sets: bool = False, on_batch: Callable[[int, int], None] | None = None) -> PassResult:
    """One no-grad forward per batch: per-example NLL on assistant tokens and, unless `routing` is None, the
    experts chosen for the recorded tokens ('assistant': answer tokens; 'all': every non-padding token)."""
    import time

    import torch

    from studio.eval.metrics import token_nll
    from studio.eval.routing import RoutingRecorder

    if routing not in (None, "assistant", "all"):
        raise ValueError(f"routing must be 'assistant', 'all' or None, got {routing!r}")
    device = next(model.parameters()).device
    recorder = RoutingRecorder(model, keep_sets=keep_sets) if routing else None
    nll, tokens = [], []
    total = (len(heldout.examples) + batch_size - 1) // batch_size
    t0 = time.perf_counter()
    with torch.no_grad(), (recorder if recorder else contextlib.nullcontext()):
        for i, (ids, attn, labels, assistant) in enumerate(batches(heldout.examples, batch_size, pad_id)):
            if recorder:
                recorder.select(assistant if routing == "assistant" else attn.bool())
            out = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
            n, c = token_nll(out.logits, labels.to(device))
            nll += n.tolist()
            tokens += c.tolist()
            if on_batch:
                on_batch(i + 1, total)
    result = PassResult(nll=nll, tokens=tokens, seconds=time.perf_counter() - t0)
    if recorder:
        result.routing = recorder.stats()
        result.sets = recorder.sets() if keep_sets else None
    return result
