"""Evaluation metrics as small pure functions: held-out NLL/perplexity, reference metrics, expert load balance.

Reference metrics come from well-kept packages (sacrebleu for BLEU and chrF, Google's rouge-score for ROUGE-L);
only exact match and the load-balance statistics are a line of arithmetic each.
"""

from __future__ import annotations

import math
import re

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# held-out loss


def token_nll(logits, labels, ignore_index: int = -100):
    """Per-sequence summed negative log-likelihood and scored-token count of a causal LM.

    `logits` [B, T, V] predict the next token, so position t is scored against `labels[:, t + 1]` (the shift
    transformers' causal-LM loss applies); labels equal to `ignore_index` (prompt, padding) are not scored.
    Returns (nll [B] float64, tokens [B] int64). Computed row by row in float32 so a long vocabulary does not
    need a float32 copy of the whole batch's logits.
    """
    import torch
    import torch.nn.functional as F

    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    nll = torch.zeros(logits.shape[0], dtype=torch.float64)
    count = torch.zeros(logits.shape[0], dtype=torch.int64)
    for i in range(logits.shape[0]):
        target = labels[i, 1:]
        keep = target != ignore_index
        if not bool(keep.any()):
            continue
        scored = logits[i, :-1][keep].float()
        nll[i] = F.cross_entropy(scored, target[keep], reduction="sum").double().cpu()
        count[i] = int(keep.sum())
    return nll, count


def mean_nll(total_nll: float, tokens: int) -> float:
    """Token-weighted mean NLL (nats per scored token)."""
    if tokens <= 0:
        raise ValueError("no scored tokens: every example was prompt or padding only")
    return float(total_nll) / int(tokens)


def perplexity(mean_nll_value: float) -> float:
    """exp(mean NLL), capped at exp(50) so a diverged model reports a huge finite number, not inf."""
    return math.exp(min(float(mean_nll_value), 50.0))


# ---------------------------------------------------------------------------------------------------------------
# reference metrics (generation vs reference answer)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after collapsing whitespace (case and punctuation count:
    for code and legal text they carry meaning). Written by hand: it is one comparison per pair."""
    _check_pairs(predictions, references)
    if not predictions:
        return 0.0
    return sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references)) / len(predictions)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score's default tokenizer: lowercased alphanumeric tokens, no stemming), 0..1."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (0..100, default 13a tokenization, one reference per prediction)."""
    import sacrebleu

    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def chrf(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus chrF (0..100, character n-grams up to 6, beta 2)."""
    import sacrebleu

    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_chrf(predictions, [references]).score)


def reference_metrics(predictions: list[str], references: list[str]) -> dict:
    """All reference metrics at once: exact_match and rouge_l in 0..1, bleu and chrf in 0..100."""
    return {"exact_match": exact_match(predictions, references), "rouge_l": rouge_l(predictions, references),
            "bleu": bleu(predictions, references), "chrf": chrf(predictions, references), "n": len(predictions)}


def _check_pairs(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: they must pair up")


# ---------------------------------------------------------------------------------------------------------------
# expert load balance


def usage_entropy(counts) -> tuple[float, float]:
    """Shannon entropy (nats) of an expert-usage count vector and the same divided by log(num_experts):
    1.0 is perfectly balanced, 0.0 is every token on one expert. Zero counts contribute nothing."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if c.ndim != 1 or c.size == 0 or total <= 0:
        return 0.0, 0.0
    p = c[c > 0] / total
    h = float(-(p * np.log(p)).sum())
    return h, (h / math.log(c.size) if c.size > 1 else 1.0)


def usage_cv(counts) -> float:
    """Coefficient of variation (population std / mean) of expert-usage counts: 0 is perfectly balanced."""
    c = np.asarray(counts, dtype=np.float64)
    if c.size == 0 or c.mean() <= 0:
        return 0.0
    return float(c.std() / c.mean())
