"""Next-token choice for a batch of rows, vectorised over rows: greedy, temperature, top-k, top-p, per-row seeds,
logit_bias and penalties; and the log-probabilities the OpenAI API returns.

Owns the arithmetic from last-position logits to token ids. The scheduler (studio/engine.py) calls `sample` once per
step with every running row. Each sampled row draws one uniform number from its own generator (so a seeded row does
not depend on its neighbours); everything else is one set of batched tensor ops on the logits' device and one copy of
the chosen ids to the host. Written by hand because transformers' logits processors take one setting for a whole
batch (a processor list per row would run per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from studio.serving.requests import Request, TokenLogprob


def adjust(logits: torch.Tensor, req: Request) -> None:
    """logit_bias, then OpenAI's penalties over the tokens generated so far (in place, one row [V]):
    logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0). Per row: the counts are the row's
    own state, kept on the device and updated with the one new token per step."""
    p = req.params
    if req.bias is not None:
        if req.bias[0].device != logits.device:
            req.bias = (req.bias[0].to(logits.device), req.bias[1].to(logits.device))
        ids, values = req.bias
        logits[ids] += values
    if p.presence_penalty or p.frequency_penalty:
        if req.counts is None:
            req.counts = torch.zeros(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        for token in req.tokens[req.counted:]:  # one new token per step: counted incrementally
            req.counts[token] += 1
        req.counted = len(req.tokens)
        logits -= p.frequency_penalty * req.counts + p.presence_penalty * (req.counts > 0).to(logits.dtype)


def filtered_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` [n, V] from softmax(logits / temperature) restricted to the row's top_k
    (0: all) most likely tokens and then to its smallest set of most likely tokens whose probability reaches top_p,
    by inverse-CDF sampling with the row's uniform number in [0, 1). All arguments are per-row tensors [n]."""
    scaled = logits / temperature[:, None]
    vocab = scaled.shape[-1]
    # always in descending order (even with no filter), so that the token a row's uniform number picks never depends
    # on the other rows' settings
    scaled, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    scaled = scaled.masked_fill(rank >= k, float("-inf"))
    probs = F.softmax(scaled, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens; the first is always kept
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    cdf = probs.cumsum(dim=-1)
    # the first token whose cumulative probability exceeds u * total: never a zero-probability token
    choice = torch.searchsorted(cdf, (uniform[:, None] * cdf[:, -1:]).to(cdf.dtype), right=True).clamp_(max=vocab - 1)
    return order.gather(1, choice)[:, 0]


def sample(logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row from its last-position logits [n, V] with that row's own settings and generator; and, for
    rows that ask for logprobs, the chosen token's log-probability under the model with its top alternatives."""
    logits = logits.float()
    want = [r.params.logprobs is not None for r in reqs]
    logp = F.log_softmax(logits, dim=-1) if any(want) else None
    if any(r.params.adjusts_logits for r in reqs):
        logits = logits.clone()
        for i, r in enumerate(reqs):
            if r.params.adjusts_logits:
                adjust(logits[i], r)
    tokens = logits.argmax(dim=-1)
    hot = [i for i, r in enumerate(reqs) if r.params.temperature > 0]
    if hot:
        device = logits.device
        rows = [reqs[i] for i in hot]
        idx = torch.tensor(hot, device=device)
        tokens[idx] = filtered_sample(
            logits.index_select(0, idx),
            torch.tensor([float(r.params.temperature) for r in rows], device=device),
            torch.tensor([min(int(r.params.top_k), logits.shape[-1]) for r in rows], device=device),  # 2**64 = all
            torch.tensor([float(r.params.top_p) for r in rows], device=device),
            torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(device))
    out = tokens.tolist()  # the one copy of the step's choices to the host
    entries: list[TokenLogprob | None] = [None] * len(reqs)
    if any(want):
        rows = [i for i, w in enumerate(want) if w]
        top = max(reqs[i].params.logprobs for i in rows)
        sel = logp.index_select(0, torch.tensor(rows, device=logp.device))
        chosen = sel.gather(1, torch.tensor([[out[i]] for i in rows], device=sel.device))[:, 0].tolist()
        values, indices = sel.topk(top, dim=-1) if top else (sel[:, :0], sel[:, :0].long())
        values, indices = values.tolist(), indices.tolist()
        for j, i in enumerate(rows):
            n = reqs[i].params.logprobs
            entries[i] = TokenLogprob(out[i], chosen[j], list(zip(indices[j][:n], values[j][:n])))
    return out, entries


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Teacher-forced logprobs of a prompt's own tokens from the prefill logits of its positions [n, V]:
    position t predicts token t + 1; the first token has none."""
    logp = F.log_softmax(logits[:-1].float(), dim=-1)
    target = torch.tensor(ids[1:], device=logp.device)
    chosen = logp.gather(1, target[:, None])[:, 0].tolist()
    if top:
        values, indices = logp.topk(top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [None] + [TokenLogprob(t, lp, tp) for t, lp, tp in zip(ids[1:], chosen, tops)]
