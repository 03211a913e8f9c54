"""Interoperability of the OpenAI-compatible server: logprobs/echo and token-id prompts for evaluation harnesses
(lm-evaluation-harness against a real `studio serve` subprocess), logit_bias and penalties, vLLM-style adapter
load/unload endpoints."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch

from serving_fixtures import build_registry, wait_until_serving
from studio.engine import Engine, SamplingParams
from studio.server import BackgroundServer, Server

ASSETS = Path(__file__).parent / "assets" / "lm_eval"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`studio serve` as a subprocess on a registry with two adapters, and an in-process engine on the same
    4-bit base (quantization is deterministic, so both hold the same weights) for the reference scoring."""
    root = tmp_path_factory.mktemp("interop")
    registry = build_registry(root / "reg", root / "work", [("law", 1, "attention,experts"),
                                                           ("medicine", 2, "attention,experts")])
    engine = Engine("tiny-moe", registry=registry, max_wait_ms=0, max_tokens_limit=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "studio.server", "--registry", str(root / "reg"),
                             "--adapters", "law,medicine", "--port", str(port), "--max-wait-ms", "0"],
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, timeout=120, interval=0.3)
        yield {"engine": engine, "url": url, "root": root, "registry": registry,
               "client": openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)}
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        engine.close()


def _studio_nll_per_token(engine, adapter, ids: list[int]) -> list[float]:
    """The eval module's teacher-forced NLL of each token of `ids` (one Encoded example per scored token, so
    token_nll's per-example sum is that token's NLL)."""
    from studio.eval.heldout import Encoded, HeldOut, teacher_forced_pass

    examples = [Encoded(ids, [int(j == t) for j in range(len(ids))]) for t in range(1, len(ids))]
    held = HeldOut("probe", "probe", examples, len(examples), 0, len(ids))
    with engine.using(adapter) as model:
        result = teacher_forced_pass(model, held, pad_id=0, batch_size=len(examples), routing=None)
    assert result.tokens == [1] * len(examples)
    return result.nll


def _studio_loglikelihood(engine, adapter, context: str, continuation: str) -> float:
    """Log-likelihood of `continuation` after `context` by the eval module's scoring (token_nll on the
    continuation's tokens), splitting the tokens the way harnesses do: encode the whole, cut at the context."""
    from studio.eval.metrics import token_nll

    tok = engine.tokenizer
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    labels = torch.tensor([[-100] * n_ctx + whole[n_ctx:]])
    with engine.using(adapter) as model:
        logits = model(input_ids=torch.tensor([whole])).logits
    nll, count = token_nll(logits, labels)
    assert int(count[0]) == len(whole) - n_ctx
    return -float(nll[0])


# --------------------------------------------------------------------------- echo + logprobs


def test_echo_logprobs_equal_the_eval_modules_per_token_nll(served):
    engine = served["engine"]
    ids = engine.tokenizer("The court held that the contract was void for mistake.",
                           add_special_tokens=False)["input_ids"]
    reference = _studio_nll_per_token(engine, "law@v1", ids)
    for prompt in (ids, "The court held that the contract was void for mistake."):  # token ids and text
        r = httpx.post(f"{served['url']}/v1/completions", json={
            "model": "law", "prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 0}, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"] == engine.tokenizer.decode(ids)
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = [-x for x in lp["token_logprobs"][1:]]
        assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-4
        # top alternatives: at most logprobs + 1 (the chosen token is always there), the best first
        for top, chosen in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
            assert 3 <= len(top) <= 4 and max(top.values()) >= chosen - 1e-6
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    base = httpx.post(f"{served['url']}/v1/completions", json={
        "model": "tiny-moe", "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}, timeout=60).json()
    assert abs(base["choices"][0]["logprobs"]["token_logprobs"][1] + reference[0]) > 1e-3  # the adapter matters


def test_generated_token_logprobs_and_chat_format(served):
    client, engine = served["client"], served["engine"]
    r = client.completions.create(model="medicine", prompt="A patient", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    direct = engine.generate(["A patient"], adapters="medicine@v1",
                             params=SamplingParams(max_tokens=6, logprobs=2))[0]
    assert len(lp.token_logprobs) == len(direct.logprobs)
    for got, entry in zip(lp.token_logprobs, direct.logprobs):
        assert abs(got - entry.logprob) < 1e-5
    # greedy: the chosen token is the most likely one
    assert all(abs(max(top.values()) - got) < 1e-6 for top, got in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and "".join(lp.tokens).startswith(r.choices[0].text)
    chunks = list(client.completions.create(model="medicine", prompt="A patient", max_tokens=6, temperature=0,
                                            logprobs=2, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    offsets = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6) and offsets == lp.text_offset

    chat = client.chat.completions.create(model="law", messages=[{"role": "user", "content": "Define tort."}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=4)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 4 for c in content)
    for c in content:
        tops = [t.logprob for t in c.top_logprobs]
        assert tops == sorted(tops, reverse=True) and c.bytes == list(c.token.encode())
        assert abs(tops[0] - c.logprob) < 1e-6  # greedy: the chosen token is the most likely
        assert sum(math.exp(t) for t in tops) < 1.0  # probabilities of distinct tokens
    plain = client.chat.completions.create(model="law", messages=[{"role": "user", "content": "Define tort."}],
                                           max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content

    # streamed: every generated token's logprob arrives once, in order
    stream = client.chat.completions.create(model="law", messages=[{"role": "user", "content": "Define tort."}],
                                            max_tokens=5, temperature=0, logprobs=True, top_logprobs=1, stream=True)
    streamed = [t.logprob for ch in stream if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([c.logprob for c in content], abs=1e-6)


def test_token_id_prompts_single_and_batched(served):
    client, engine = served["client"], served["engine"]
    a = engine.tokenizer("The court", add_special_tokens=False)["input_ids"]
    b = engine.tokenizer("A patient with", add_special_tokens=False)["input_ids"]
    one = client.completions.create(model="law", prompt=a, max_tokens=5, temperature=0)
    by_text = client.completions.create(model="law", prompt="The court", max_tokens=5, temperature=0)
    assert one.choices[0].text == by_text.choices[0].text and one.usage.prompt_tokens == len(a)
    many = client.completions.create(model="law", prompt=[a, b], max_tokens=5, temperature=0)
    assert [c.text for c in many.choices][0] == one.choices[0].text and len(many.choices) == 2
    for bad, what in (([[]], "non-empty"), (a + [10 ** 7], "outside this base's vocabulary"), ([-1, 2], "outside")):
        r = httpx.post(f"{served['url']}/v1/completions", json={"model": "law", "prompt": bad, "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 400 and what in r.json()["error"]["message"], r.text


def test_mixed_adapter_batches_keep_each_rows_logprobs_bias_and_penalties(served):
    """One engine call with rows of three adapters (one forward per step) equals the rows run alone."""
    engine = served["engine"]
    prompts = ["The court held", "A patient with", "def add(a, b):"]
    adapters = ["law@v1", "medicine@v1", None]
    params = SamplingParams(max_tokens=4, logprobs=2, prompt_logprobs=True, logit_bias={17: 5.0},
                            frequency_penalty=0.5, presence_penalty=0.3)
    mixed = engine.generate(prompts, adapters=adapters, params=params)
    for prompt, adapter, m in zip(prompts, adapters, mixed):
        alone = engine.generate([prompt], adapters=adapter, params=params)[0]
        assert m.token_ids == alone.token_ids
        for x, y in zip(m.prompt_logprobs[1:] + m.logprobs, alone.prompt_logprobs[1:] + alone.logprobs):
            assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_scoring_rows_and_generating_rows_share_a_prefill(served):
    """A max_tokens=0 scoring row leaves the batch right after the prefill it shares with generating rows (its
    cache row dropped); the others decode on unchanged. Both requests are queued together so they share it."""
    engine = served["engine"]
    score = SamplingParams(max_tokens=0, logprobs=1, prompt_logprobs=True)
    gen = SamplingParams(max_tokens=6)
    requests = (engine._prepare(["The court held that"], ["law@v1"], score)
                + engine._prepare(["A patient"], ["medicine@v1"], gen))
    engine._submit(requests)
    scored, generated = [engine._drain(r) for r in requests]
    assert scored.completion_tokens == 0 and scored.text == "" and scored.finish_reason == "length"
    alone = engine.generate(["The court held that"], adapters="law@v1", params=score)[0]
    assert [e.logprob for e in scored.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in alone.prompt_logprobs[1:]], abs=1e-4)
    assert generated.token_ids == engine.generate(["A patient"], adapters="medicine@v1", params=gen)[0].token_ids


# --------------------------------------------------------------------------- logit_bias and penalties


def test_logit_bias_forces_and_bans_tokens(served):
    client = served["client"]
    forced = client.completions.create(model="law", prompt="The court", max_tokens=4, temperature=0,
                                       logit_bias={"42": 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [served["engine"].tokenizer.decode([42])] * 4
    plain = client.completions.create(model="law", prompt="The court", max_tokens=4, temperature=0, logprobs=0)
    first = served["engine"].tokenizer("The court", add_special_tokens=False)["input_ids"]
    greedy_ids = served["engine"].generate([first], adapters="law@v1", params=SamplingParams(max_tokens=4))[0]
    banned = client.completions.create(model="law", prompt="The court", max_tokens=4, temperature=0,
                                       logit_bias={str(greedy_ids.token_ids[0]): -100})
    assert banned.choices[0].text != plain.choices[0].text
    # sampling at a high temperature still always picks the forced token
    hot = client.completions.create(model="law", prompt="The court", max_tokens=3, temperature=2.0, seed=3,
                                    logit_bias={"42": 100}, logprobs=0)
    assert hot.choices[0].logprobs.tokens == [served["engine"].tokenizer.decode([42])] * 3


@pytest.mark.parametrize("kind", ["frequency", "presence"])
def test_penalties_change_the_distribution_as_specified(served, kind):
    """Replay: under greedy decoding each chosen token must be the argmax, over the model's top-20 logprobs, of
    logprob - frequency_penalty * count (or - presence_penalty * [count > 0]) over the tokens generated before
    it; a positive penalty only lowers scores, so no token outside the top 20 can win once the chosen token's
    score is at least the 20th logprob."""
    client, engine = served["client"], served["engine"]
    penalty, n = 2.0, 12
    kwargs = {f"{kind}_penalty": penalty}
    chat = [{"role": "user", "content": "Define tort."}]  # the random base repeats itself here (11 of 12 tokens)
    r = client.chat.completions.create(model="tiny-moe", messages=chat, max_tokens=n, temperature=0, logprobs=True,
                                       top_logprobs=20, **kwargs)
    plain = client.chat.completions.create(model="tiny-moe", messages=chat, max_tokens=n, temperature=0)
    direct = engine.generate([chat], params=SamplingParams(max_tokens=n, logprobs=20, **kwargs))[0]
    assert r.choices[0].message.content == direct.text != plain.choices[0].message.content
    assert [c.logprob for c in r.choices[0].logprobs.content] == pytest.approx(
        [e.logprob for e in direct.logprobs], abs=1e-5)
    counts: dict[int, int] = {}

    def score(tid, lp):
        seen = counts.get(tid, 0)
        return lp - (penalty * seen if kind == "frequency" else penalty * (seen > 0))

    for entry in direct.logprobs:
        chosen = score(entry.token, entry.logprob)
        assert all(chosen >= score(t, lp) - 1e-5 for t, lp in entry.top), entry
        assert chosen >= entry.top[-1][1] - 1e-5
        counts[entry.token] = counts.get(entry.token, 0) + 1
    if kind == "presence":  # a +2 presence penalty on this random base: no token twice in 12
        assert max(counts.values()) == 1


@pytest.mark.parametrize("endpoint,field,value", [
    ("completions", "logit_bias", {"42": 101}),
    ("completions", "logit_bias", {"42": -100.5}),
    ("completions", "logit_bias", {"not-a-token": 1}),
    ("completions", "logit_bias", {"99999999": 1}),
    ("completions", "presence_penalty", 2.5),
    ("completions", "frequency_penalty", -2.01),
    ("completions", "logprobs", 6),
    ("completions", "logprobs", -1),
    ("completions", "max_tokens", -1),
    ("chat", "top_logprobs", 21),
    ("chat", "presence_penalty", -3),
    ("chat", "frequency_penalty", 2.1),
    ("chat", "logit_bias", {"5": 1000}),
])
def test_out_of_range_parameters_get_a_400_naming_them(served, endpoint, field, value):
    body = {"model": "law", "max_tokens": 2, field: value}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
        if field == "top_logprobs":
            body["logprobs"] = True
    else:
        body["prompt"] = "The court"
    r = httpx.post(f"{served['url']}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body,
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] or field == (err.get("param") or ""), err


def test_parameter_combinations_that_make_no_sense_get_a_400(served):
    url = served["url"]
    cases = [({"prompt": "x", "max_tokens": 0}, "echo=true"),
             ({"prompt": "x", "echo": True, "stream": True}, "stream"),
             ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "logprobs=true")]
    for body, what in cases:
        path = "chat/completions" if "messages" in body else "completions"
        r = httpx.post(f"{url}/v1/{path}", json={"model": "law", **body}, timeout=30)
        assert r.status_code == 400 and what in r.json()["error"]["message"], r.text


# --------------------------------------------------------------------------- lm-evaluation-harness


def test_lm_eval_harness_runs_generate_until_and_multiple_choice_against_studio_serve(served, monkeypatch):
    """lm-eval's `local-completions` model (token-id prompts, echo + logprobs for loglikelihood) on two tiny local
    tasks; its per-choice log-likelihoods and accuracy equal the eval module's scoring of the same items, and its
    generations equal the engine's greedy completions. Slow (~25 s): lm-eval imports its task registry, builds
    the task datasets with `datasets` and sends ~30 HTTP requests."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    engine = served["engine"]
    monkeypatch.chdir(ASSETS)  # the task YAMLs name their jsonl files relative to this directory
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "law", "base_url": f"{served['url']}/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": engine.base.path, "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True},
        tasks=["studio_tiny_mc", "studio_tiny_gen"], task_manager=TaskManager(include_path=str(ASSETS)),
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)

    samples = results["samples"]["studio_tiny_mc"]
    assert len(samples) == 6
    correct = 0
    for sample in samples:
        ours = [_studio_loglikelihood(engine, "law@v1", ctx, cont) for ctx, cont in
                (a[:2] for a in sample["arguments"])]
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, (ours, theirs)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == sample["target"])
    assert results["results"]["studio_tiny_mc"]["acc,none"] == pytest.approx(correct / len(samples))

    gen = results["samples"]["studio_tiny_gen"]
    assert len(gen) == 4
    for sample in gen:
        prompt = sample["arguments"][0][0]
        direct = engine.generate([prompt], adapters="law@v1", params=SamplingParams(max_tokens=8, stop=["\n"]))[0]
        assert sample["resps"][0][0] == direct.text
    assert "exact_match,none" in results["results"]["studio_tiny_gen"]


# --------------------------------------------------------------------------- vLLM-style dynamic adapters


def test_load_and_unload_lora_adapter_endpoints(served, tmp_path):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, with httpx: behind the API key, paths only under
    the allowed roots (symlinks included), registry references, and the name served until unloaded."""
    import shutil

    engine, registry = served["engine"], served["registry"]
    allowed = tmp_path / "allowed"
    shutil.copytree(registry.path("medicine@v1"), allowed / "med-copy")
    outside = tmp_path / "outside"
    shutil.copytree(registry.path("law@v1"), outside / "law-copy")
    (allowed / "sneaky").mkdir()
    for f in (outside / "law-copy").iterdir():
        (allowed / "sneaky" / f.name).symlink_to(f)

    server = Server(engine, ["law"], api_key="k3y", allowed_lora_roots=[str(allowed)])
    with BackgroundServer(server.app) as bg:
        key = {"Authorization": "Bearer k3y"}

        def post(path, body, headers=key):
            return httpx.post(f"{bg.url}/v1/{path}", json=body, headers=headers, timeout=60)

        body = {"lora_name": "med", "lora_path": str(allowed / "med-copy")}
        assert post("load_lora_adapter", body, headers={}).status_code == 401
        assert post("load_lora_adapter", body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert post("unload_lora_adapter", {"lora_name": "med"}, headers={}).status_code == 401
        for bad_path in (str(outside / "law-copy"), str(allowed / ".." / "outside" / "law-copy"),
                         str(allowed / "sneaky")):
            r = post("load_lora_adapter", {"lora_name": "evil", "lora_path": bad_path})
            assert r.status_code == 403 and "outside the allowed roots" in r.json()["error"]["message"], r.text
        assert "evil" not in registry.domains()

        r = post("load_lora_adapter", body)
        assert r.status_code == 200 and r.text.startswith("Success"), r.text
        assert post("load_lora_adapter", body).status_code == 400  # already loaded
        version = registry.resolve("med")
        assert version.ref in engine.resident() and version.files == registry.resolve("medicine@v1").files
        ids = [m["id"] for m in httpx.get(f"{bg.url}/v1/models", headers=key).json()["data"]]
        assert "med" in ids
        client = openai.OpenAI(base_url=f"{bg.url}/v1", api_key="k3y", max_retries=0)
        got = client.completions.create(model="med", prompt="A patient", max_tokens=5, temperature=0)
        want = engine.generate(["A patient"], adapters="medicine@v1", params=SamplingParams(max_tokens=5))[0]
        assert got.choices[0].text == want.text and got.system_fingerprint == f"tiny-moe+{version.ref}"

        # a registry reference: no path involved, so no root needed
        r = post("load_lora_adapter", {"lora_name": "law-old", "lora_path": "law@v1"})
        assert r.status_code == 200, r.text
        assert client.completions.create(model="law-old", prompt="x", max_tokens=1).system_fingerprint.endswith(
            "law@v1")
        r = post("load_lora_adapter", {"lora_name": "nope", "lora_path": "no-such-domain@v9"})
        assert r.status_code == 400 and "no-such-domain" in r.json()["error"]["message"]

        assert post("unload_lora_adapter", {"lora_name": "med"}).text.startswith("Success")
        assert version.ref not in engine.resident()
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="med", prompt="A patient", max_tokens=2)
        assert post("unload_lora_adapter", {"lora_name": "med"}).status_code == 404
        assert post("unload_lora_adapter", {"lora_name": "law-old"}).status_code == 200

    # with no allowed roots, paths are refused and the error names the flag
    with BackgroundServer(Server(engine, ["law"]).app) as bg:
        r = httpx.post(f"{bg.url}/v1/load_lora_adapter", json=body, timeout=30)
        assert r.status_code == 403 and "--allowed-lora-roots" in r.json()["error"]["message"]
