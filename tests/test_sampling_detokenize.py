"""Vectorised sampling (studio/serving/sampling.py) against the distributions it must draw from, and incremental
detokenization (studio/serving/detokenize.py) against whole decodes, with a per-token cost that does not grow."""

import pytest
import torch

from studio.models.tokenizer import load_tokenizer
from studio.serving.detokenize import Detokenizer
from studio.serving.sampling import filtered_sample

TEXTS = ["The court held that the contract was void.", "Ünïcödé: naïve café — 日本語のテキスト, emoji 🙂🚀 done.",
         "def add(a, b):\n    return a + b\n\n\tTabs  and   spaces.", "Ωμέγα Ελληνικά и кириллица ½ ≤ ≥ ∑"]


def _grid(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def test_inverse_cdf_sampling_matches_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    n = 20000
    u = _grid(n).float()
    rows = logits.expand(n, -1)
    ones = torch.ones(n)

    def freq(temperature=1.0, top_k=0, top_p=1.0):
        got = filtered_sample(rows, ones * temperature, torch.full((n,), top_k), ones * top_p, u)
        return torch.bincount(got, minlength=6).double() / n

    # u on a uniform grid: each token's share equals its probability to within 1/n
    assert torch.allclose(freq(), torch.softmax(logits.double(), 0), atol=2 / n)
    assert torch.allclose(freq(temperature=0.5), torch.softmax(logits.double() / 0.5, 0), atol=2 / n)
    top3 = torch.softmax(torch.tensor([2.0, 1.0, 3.0]).double(), 0)
    assert torch.allclose(freq(top_k=3)[[0, 1, 5]], top3, atol=2 / n) and freq(top_k=3)[[2, 3, 4]].sum() == 0
    # top_p: the smallest set of most likely tokens reaching p (3.0 and 2.0 hold 0.87 of the mass, 3.0 alone 0.63)
    p = torch.softmax(logits.double(), 0)
    assert p[5] < 0.7 < p[5] + p[0]
    kept = freq(top_p=0.7)
    assert torch.allclose(kept[[0, 5]], p[[0, 5]] / (p[0] + p[5]), atol=2 / n) and kept[[1, 2, 3, 4]].sum() == 0
    assert freq(top_k=1)[5] == 1.0 and freq(top_p=0.01)[5] == 1.0  # both reduce to greedy


def test_rows_keep_their_own_settings_in_one_call():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    u = torch.tensor([0.3, 0.9, 0.5, 0.999])
    t, k, p = torch.tensor([1.0, 0.7, 1.3, 1.0]), torch.tensor([0, 5, 0, 1]), torch.tensor([1.0, 1.0, 0.8, 1.0])
    together = filtered_sample(logits, t, k, p, u)
    for i in range(4):
        alone = filtered_sample(logits[i:i + 1], t[i:i + 1], k[i:i + 1], p[i:i + 1], u[i:i + 1])
        assert together[i] == alone[0]
    assert together[3] == logits[3].argmax()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _incremental(tokenizer, ids, stop=None):
    d = Detokenizer(tokenizer, stop=stop)
    for t in ids:
        d.add(t)
    d.flush()
    return d


def test_incremental_text_equals_whole_decode(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert _incremental(tokenizer, ids).text == tokenizer.decode(ids, skip_special_tokens=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):  # arbitrary token runs, including byte tokens that split characters
        ids = torch.randint(0, len(tokenizer), (60,), generator=gen).tolist()
        assert _incremental(tokenizer, ids).text == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_strings_cut_at_the_earliest_one(tokenizer):
    text = "alpha beta gamma delta beta"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = _incremental(tokenizer, ids, stop=["delta", "ta g"])
    assert d.stopped and d.text == "alpha be"
    assert _incremental(tokenizer, ids, stop=["zeta"]).text == text


def test_per_token_cost_does_not_grow_with_the_length(tokenizer):
    """The tokenizer work per added token (tokens passed to decode) is bounded by a constant at any length: 4,000
    tokens of mixed-script text, the last thousand cost no more than the first thousand."""
    ids = tokenizer(" ".join(TEXTS * 60), add_special_tokens=False)["input_ids"][:4000]
    assert len(ids) == 4000
    d = Detokenizer(tokenizer)
    per_token = []
    for t in ids:
        before = d.decoded_tokens
        d.add(t)
        per_token.append(d.decoded_tokens - before)
    assert max(per_token) <= 16
    assert sum(per_token[-1000:]) <= sum(per_token[:1000]) * 1.2
    d.flush()
    assert d.text == tokenizer.decode(ids, skip_special_tokens=True)
