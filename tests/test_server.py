"""The OpenAI-compatible server, driven by the official `openai` client on 127.0.0.1."""

import concurrent.futures
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from serving_fixtures import build_registry, make_real_adapter, wait_until_serving
from studio.engine import Engine, SamplingParams
from studio.server import BackgroundServer, Server

CHAT = [{"role": "user", "content": "What is a tort?"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    registry = build_registry(root / "reg", root / "work", [
        ("law", 1, "attention,experts"), ("medicine", 2, "attention,experts"), ("code", 3, "attention,experts")])
    registry.promote("law@v1", "prod")
    registry.promote("medicine@v1", "prod")
    engine = Engine("tiny-moe", registry=registry, max_resident=3, max_batch_size=16, max_wait_ms=10,
                    max_tokens_limit=256)
    server = Server(engine, ["law@prod", "medicine@prod", "code"])
    with BackgroundServer(server.app) as bg:
        client = openai.OpenAI(base_url=f"{bg.url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield {"engine": engine, "server": server, "url": bg.url, "client": client, "root": root,
               "registry": registry}
    engine.close()


def test_model_listing(stack):
    ids = [m.id for m in stack["client"].models.list().data]
    assert ids == ["tiny-moe", "law@prod", "medicine@prod", "code"]
    law = stack["client"].models.retrieve("law@prod")
    assert law.id == "law@prod" and law.resolves_to == "law@v1"


def test_chat_completion_matches_the_engine(stack):
    client, engine = stack["client"], stack["engine"]
    r = client.chat.completions.create(model="law@prod", messages=CHAT, max_tokens=12, temperature=0)
    direct = engine.generate([CHAT], adapters="law@v1", params=SamplingParams(max_tokens=12))[0]
    assert r.choices[0].message.content == direct.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == direct.completion_tokens and r.usage.prompt_tokens == direct.prompt_tokens
    assert r.model == "law@prod" and r.system_fingerprint == "tiny-moe+law@v1"


def test_text_completion_single_and_batched(stack):
    client, engine = stack["client"], stack["engine"]
    one = client.completions.create(model="code", prompt="def add(a, b):", max_tokens=10, temperature=0)
    direct = engine.generate(["def add(a, b):"], adapters="code", params=SamplingParams(max_tokens=10))[0]
    assert one.choices[0].text == direct.text and one.object == "text_completion"
    many = client.completions.create(model="tiny-moe", prompt=["The court", "A patient"], max_tokens=6,
                                     temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.usage.completion_tokens == sum(
        c.completion_tokens for c in engine.generate(["The court", "A patient"], params=SamplingParams(max_tokens=6)))


def test_streaming_chat_and_completion(stack):
    client = stack["client"]
    whole = client.chat.completions.create(model="medicine@prod", messages=CHAT, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="medicine@prod", messages=CHAT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed
    ctext = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-moe", prompt="The court held", max_tokens=10, temperature=0, stream=True))
    assert ctext == client.completions.create(model="tiny-moe", prompt="The court held", max_tokens=10,
                                              temperature=0).choices[0].text


def test_adapter_selection_changes_output(stack):
    client = stack["client"]
    outs = {m: client.chat.completions.create(model=m, messages=CHAT, max_tokens=10, temperature=0)
            for m in ["tiny-moe", "law@prod", "medicine@prod", "code", "law@v1", "base"]}
    texts = {m: r.choices[0].message.content for m, r in outs.items()}
    assert len({texts["tiny-moe"], texts["law@prod"], texts["medicine@prod"], texts["code"]}) == 4
    assert texts["law@v1"] == texts["law@prod"] and texts["base"] == texts["tiny-moe"]
    assert outs["code"].system_fingerprint == "tiny-moe+code@v1"


def test_errors_in_openai_format_and_the_server_keeps_serving(stack):
    client, url = stack["client"], stack["url"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="tax@prod", messages=CHAT)
    assert e.value.body["code"] == "model_not_found" and "tax@prod" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError, match="v9 does not exist"):
        client.chat.completions.create(model="law@v9", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="max_tokens=5000 is over"):
        client.chat.completions.create(model="law@prod", messages=CHAT, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-moe", prompt="word " * 3000, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="law@prod", messages=CHAT, temperature=7)
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model="law@prod", messages=CHAT, n=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="law@prod", messages=[])
    with pytest.raises(openai.BadRequestError, match="context"):  # a long prompt is refused before streaming
        list(client.completions.create(model="tiny-moe", prompt="word " * 3000, max_tokens=8, stream=True))
    bad = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "law@prod", "messages": [', timeout=30,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    typed = httpx.post(f"{url}/v1/chat/completions", json={"model": "law@prod", "messages": "hi"}, timeout=30)
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.completions.create(model="tiny-moe", prompt=["x"] * 65, max_tokens=2)
    missing = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=30)
    assert missing.status_code == 400 and "model" in missing.json()["error"]["message"]
    ok = client.chat.completions.create(model="law@prod", messages=CHAT, max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_promoted_alias_is_picked_up_without_restart(stack):
    client, registry, engine = stack["client"], stack["registry"], stack["engine"]
    from studio.models.loading import QuantSpec, load_base

    maker = load_base("tiny-moe", QuantSpec("4bit"))
    v2 = registry.register(make_real_adapter(maker, stack["root"] / "law-v2", "law", 11), "law")
    assert v2.ref == "law@v2"
    before = client.chat.completions.create(model="law@prod", messages=CHAT, max_tokens=10, temperature=0)
    assert before.system_fingerprint == "tiny-moe+law@v1"
    registry.promote("law@v2", "prod")
    after = client.chat.completions.create(model="law@prod", messages=CHAT, max_tokens=10, temperature=0)
    assert after.system_fingerprint == "tiny-moe+law@v2"
    direct = engine.generate([CHAT], adapters="law@v2", params=SamplingParams(max_tokens=10))[0]
    assert after.choices[0].message.content == direct.text != before.choices[0].message.content
    assert client.models.retrieve("law@prod").resolves_to == "law@v2"
    registry.rollback("law", "prod")
    back = client.chat.completions.create(model="law@prod", messages=CHAT, max_tokens=10, temperature=0)
    assert back.system_fingerprint == "tiny-moe+law@v1"
    assert back.choices[0].message.content == before.choices[0].message.content


def test_health_and_prometheus_metrics(stack):
    client, url = stack["client"], stack["url"]
    client.chat.completions.create(model="medicine@prod", messages=CHAT, max_tokens=4)
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["base"] == "tiny-moe"
    text = httpx.get(f"{url}/metrics", timeout=30).text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    ok = [s for s in families["studio_requests"].samples
          if s.name == "studio_requests_total" and s.labels["status"] == "200"]
    assert sum(s.value for s in ok) >= 1
    assert any(s.labels["status"] == "404" for s in families["studio_requests"].samples)
    count = [s for s in families["studio_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in count) >= 1
    assert [s.value for s in families["studio_adapter_loads"].samples if s.name.endswith("_total")][0] >= 3
    assert families["studio_resident_adapters"].samples[0].value == len(stack["engine"].resident()) <= 3
    assert "studio_adapter_switches" in families and "studio_completion_tokens" in families


def test_load_16_concurrent_streams_200_requests(stack):
    """200 streamed requests over 3 adapters and the base, 16 at a time: no errors, bounded memory."""
    import resource

    client, engine = stack["client"], stack["engine"]
    models = ["law@prod", "medicine@prod", "code", "tiny-moe"]

    def one(i):
        stream = client.chat.completions.create(
            model=models[i % 4], messages=[{"role": "user", "content": f"Question {i}: what is a tort?"}],
            max_tokens=8, temperature=0.7, seed=i, stream=True)
        parts = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        return parts

    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    elapsed = time.perf_counter() - t0
    assert all(r in (["stop"], ["length"]) for r in results)
    growth = _rss_bytes() - rss_before
    print(f"200 requests in {elapsed:.1f}s; RSS growth {growth / 2**20:.1f} MiB; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    assert growth < 256 * 2**20  # the stated bound: serving 200 requests adds < 256 MiB
    assert len(engine.resident()) <= engine.max_resident


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_api_key_is_required_when_set(stack):
    server = Server(stack["engine"], ["law@prod"], api_key="s3cret")
    with BackgroundServer(server.app) as bg:
        anon = openai.OpenAI(base_url=f"{bg.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anon.models.list()
        good = openai.OpenAI(base_url=f"{bg.url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["tiny-moe", "law@prod"]


def test_studio_serve_command(tmp_path, stack):
    """The real CLI: `studio serve` on a free port, with the registry given on the command line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "studio.server", "--registry", str(stack["root"] / "reg"),
                             "--adapters", "medicine@prod", "--port", str(port), "--max-wait-ms", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(proc, f"http://127.0.0.1:{port}", timeout=120, interval=0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="medicine@prod", messages=CHAT, max_tokens=5, temperature=0)
        assert r.system_fingerprint == "tiny-moe+medicine@v1"
        with pytest.raises(openai.NotFoundError):  # only the medicine domain is served
            client.chat.completions.create(model="law@prod", messages=CHAT)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "serving medicine@prod -> medicine@v1" in out


def test_wait_until_serving_names_a_server_that_exited_and_shows_its_output():
    """The helper bench/serve.py and the server tests wait with: a process that dies before answering fails at
    once with its exit code and the end of its output, instead of polling until the timeout."""
    import subprocess
    import sys
    import time

    from studio.errors import StudioError
    from studio.serving.health import wait_until_serving

    proc = subprocess.Popen([sys.executable, "-c", "print('port already in use'); raise SystemExit(3)"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    with pytest.raises(StudioError, match="exited with code 3") as err:
        wait_until_serving(proc, "http://127.0.0.1:9", timeout=60, interval=0.1)
    assert "port already in use" in str(err.value) and time.monotonic() - t0 < 30
