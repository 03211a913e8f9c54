"""Acceptance of the pretrained base on the shipped quickstart recipes: every domain adapter beats the base on its own
domain with its largest improvement there (the cross-domain diagonal), greedy generations of the base and of the law
adapter on law prompts are made of real words, and the base's routing tells the domains apart where the random
base's does not.

Slow (a few minutes on 2 CPU cores): it runs the three shipped recipes as they ship (200 steps each), then one
evaluation over the three held-out sets; marked slow, and it runs in CI.
"""

import pytest

import studio
from studio.eval.routing import domain_divergence
from studio.models import corpus

DOMAINS = ("law", "medicine", "code")


@pytest.mark.slow
def test_recipes_specialise_speak_and_route_by_domain(tmp_path):
    adapters = {}  # registered in this test's own registry root (conftest isolates it)
    for domain in DOMAINS:
        result = studio.finetune(f"recipes/tiny-moe-{domain}.yaml", output=str(tmp_path / domain), eval_steps=0,
                                 save_steps=1000, verbose=False)
        print(domain, "held-out loss", result.metrics["eval_loss_before"], "->", result.metrics["eval_loss"])
        assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
        adapters[domain], result.model = result.registry_ref, None
    report = studio.evaluate("tiny-moe", models=["base", *adapters.values()], dataset="law", domains=",".join(DOMAINS),
                             max_eval_examples=32, gen_prompts=4, max_new_tokens=24, record=False)
    print(report.cross_domain_table().to_string())  # the figures README and BENCHMARKS quote (run with -s)
    # each adapter beats the base on its own domain, and improves its own domain the most
    for domain, ref in adapters.items():
        gains = {d: report.loss("base", d).loss - report.loss(ref, d).loss for d in DOMAINS}
        assert gains[domain] > 0, (ref, gains)
        assert max(gains, key=gains.get) == domain, (ref, gains)
    # the base already knows language: well below the random base's ~8.75 nats on every domain
    for d in DOMAINS:
        assert report.loss("base", d).loss < 7.0, (d, report.loss("base", d).loss)
    # greedy generations on law prompts are mostly real words (found in the pretraining corpus's vocabulary)
    vocab = corpus.corpus_vocabulary()
    for model in ("base", adapters["law"]):
        text = " ".join(report.generation[model].outputs)
        share = corpus.real_word_share(text, vocab)
        print(f"{model}: real-word share {share:.3f}", report.generation[model].outputs[:3])
        assert share >= 0.8, (model, share, report.generation[model].outputs)
    # the base routes the three domains measurably differently; the random base does not
    pretrained = _mean_js(report.routing["base"])
    random_report = studio.evaluate("tiny-moe-random", models=["base"], dataset="law", domains=",".join(DOMAINS),
                                    max_eval_examples=32, gen_prompts=0, record=False)
    random = _mean_js(random_report.routing["base"])
    print(f"mean JS distance between domains: pretrained {pretrained:.4f}, random {random:.4f}; random base losses",
          {d: round(random_report.loss("base", d).loss, 4) for d in DOMAINS})
    assert pretrained > 2 * random, (pretrained, random)
    assert "Routing differences between held-out sets" in report.to_markdown()


def _mean_js(per_domain) -> float:
    rows = domain_divergence(per_domain)
    assert len(rows) == 3
    return sum(r["mean_js_distance"] for r in rows) / len(rows)
