"""Acceptance of the pretrained base: it knows language (held-out loss on the three domains far below the random
base's ~8.75, greedy answers made of real words) and routes the domains apart where the random base does not; and on
the shipped quickstart recipes every domain adapter beats the base on its own domain with its largest improvement
there (the cross-domain diagonal), the law adapter still answering in real words.

Slow (about 4 minutes on 2 idle CPU cores): the second test runs the three shipped recipes as they ship (200 steps each),
then one evaluation over the three held-out sets; both are marked slow and run in CI.
"""

import pytest

import studio
from studio.eval.routing import domain_divergence
from studio.models import corpus

DOMAINS = ("law", "medicine", "code")
EVAL = dict(dataset="law", domains=",".join(DOMAINS), max_eval_examples=32, record=False)


@pytest.mark.slow
def test_pretrained_base_knows_words_and_routes_domains_apart():
    report = studio.evaluate("tiny-moe", models=["base"], gen_prompts=4, max_new_tokens=24, **EVAL)
    random_report = studio.evaluate("tiny-moe-random", models=["base"], gen_prompts=0, **EVAL)
    losses = {d: report.loss("base", d).loss for d in DOMAINS}
    random_losses = {d: random_report.loss("base", d).loss for d in DOMAINS}
    print("base held-out loss", losses, "random base", random_losses)  # figures README quotes (run with -s)
    # Measured on the shipped weights: law 6.38, medicine 6.72, code 5.19 nats against the random base's 8.72-8.79
    for d in DOMAINS:
        assert losses[d] < random_losses[d] - 1.5, (d, losses[d], random_losses[d])
    share = corpus.real_word_share(" ".join(report.generation["base"].outputs), corpus.corpus_vocabulary())
    print(f"base real-word share on law prompts {share:.3f}", report.generation["base"].outputs)
    assert share >= 0.8  # measured 0.979
    pretrained, random = _js_by_pair(report.routing["base"]), _js_by_pair(random_report.routing["base"])
    print("mean JS distance between domains: pretrained", pretrained, "random", random)
    # A random router already routes two sets apart when their tokens differ (measured mean 0.17: law/medicine
    # 0.17, law/code 0.20, medicine/code 0.15), so "differs" is measured against it. The pretrained base routes
    # the two prose domains alike and code apart (0.09 against 0.27 and 0.27), a structure the random base lacks.
    assert _mean(pretrained) > _mean(random) + 0.02
    assert _prose_and_code_apart(pretrained), pretrained
    assert not _prose_and_code_apart(random), random
    assert "Routing differences between held-out sets" in report.to_markdown()


@pytest.mark.slow
def test_recipes_specialise_on_their_domain(tmp_path):
    adapters = {}  # registered in this test's own registry root (conftest isolates it)
    for domain in DOMAINS:
        result = studio.finetune(f"recipes/tiny-moe-{domain}.yaml", output=str(tmp_path / domain), eval_steps=0,
                                 save_steps=1000, verbose=False)
        print(domain, "held-out loss", result.metrics["eval_loss_before"], "->", result.metrics["eval_loss"])
        assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
        adapters[domain], result.model = result.registry_ref, None
    report = studio.evaluate("tiny-moe", models=["base", *adapters.values()], gen_prompts=4, max_new_tokens=24,
                             **EVAL)
    print(report.cross_domain_table().to_string())
    # each adapter beats the base on its own domain, and improves its own domain the most
    for domain, ref in adapters.items():
        gains = {d: report.loss("base", d).loss - report.loss(ref, d).loss for d in DOMAINS}
        assert gains[domain] > 0, (ref, gains)
        assert max(gains, key=gains.get) == domain, (ref, gains)
    # greedy generations of the law adapter on law prompts are mostly real words. The corpus (Python's documentation)
    # lacks about a quarter of the law sample's own words (its held-out answers score 0.77 against the corpus
    # vocabulary alone), so a word counts as real when the corpus or the law training split has it.
    vocab = corpus.corpus_vocabulary()
    law_vocab = vocab | corpus.domain_vocabulary("law")
    outputs = " ".join(report.generation[adapters["law"]].outputs)
    share, corpus_only = corpus.real_word_share(outputs, law_vocab), corpus.real_word_share(outputs, vocab)
    print(f"law adapter: real-word share {share:.3f} (corpus vocabulary alone {corpus_only:.3f})",
          report.generation[adapters["law"]].outputs)
    # Measured 0.851 (corpus alone 0.702), e.g. "A fair is the principle that the princts the principle that": words,
    # some half-spelled law words among them, not yet sense.
    assert share >= 0.8, share


def _js_by_pair(per_domain) -> dict:
    rows = domain_divergence(per_domain)
    assert len(rows) == 3
    return {r["domains"]: round(r["mean_js_distance"], 4) for r in rows}


def _mean(pairs: dict) -> float:
    return sum(pairs.values()) / len(pairs)


def _prose_and_code_apart(js: dict) -> bool:
    """Both prose domains are routed more than twice as far from code as from each other."""
    return min(js[("law", "code")], js[("medicine", "code")]) > 2 * js[("law", "medicine")]
