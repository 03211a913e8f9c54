"""The serving engine: mixed-adapter batches equal per-adapter runs, LRU residency, hot swap, streaming."""

import threading

import pytest
import torch

from serving_fixtures import build_registry, make_real_adapter
from studio.engine import Engine, SamplingParams
from studio.errors import ModelError, RegistryError, RequestError

PROMPTS = [
    [{"role": "user", "content": "What is a tort?"}],
    "The court held that the contract",
    [{"role": "user", "content": "Explain sepsis."}],
    "def add(a, b):",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define negligence in one line."}],
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-registry")
    registry = build_registry(root / "reg", root / "work", [
        ("law", 1, "attention,experts"), ("medicine", 2, "attention,experts"),
        ("code", 3, "experts"), ("style", 4, "attention")])
    eng = Engine("tiny-moe", registry=registry, max_resident=8, max_batch_size=8, max_wait_ms=20)
    yield eng
    eng.close()


def test_mixed_batch_greedy_outputs_equal_per_adapter_runs(engine):
    adapters = ["law", "medicine", None, "code", "style"]  # attention+experts, experts only, attention only, base
    params = SamplingParams(max_tokens=12)
    mixed = engine.generate(PROMPTS, adapters=adapters, params=params)
    singles = [engine.generate([p], adapters=a, params=params)[0] for p, a in zip(PROMPTS, adapters)]
    for a, m, s in zip(adapters, mixed, singles):
        assert m.token_ids == s.token_ids, a
        assert m.adapter == (None if a is None else f"{a}@v1")
    # the adapters do change the output (the comparison above is not between identical functions)
    base_rows = engine.generate(PROMPTS, adapters=None, params=params)
    differ = [m.token_ids != b.token_ids for m, b, a in zip(mixed, base_rows, adapters) if a is not None]
    assert all(differ), differ


def test_rows_differ_by_adapter_in_one_batch(engine):
    """The same prompt in every row with a different adapter per row gives each adapter's own output."""
    params = SamplingParams(max_tokens=8)
    refs = ["law", "medicine", "code", "style", None]
    mixed = engine.generate([PROMPTS[0]] * len(refs), adapters=refs, params=params)
    for ref, m in zip(refs, mixed):
        assert m.token_ids == engine.generate(PROMPTS[0], adapters=ref, params=params)[0].token_ids
    assert len({tuple(m.token_ids) for m in mixed}) >= 4


def test_streaming_equals_non_streaming_and_seeded_sampling_repeats(engine):
    params = SamplingParams(max_tokens=16)
    whole = engine.generate(PROMPTS[1], adapters="law", params=params)[0]
    chunks = list(engine.stream(PROMPTS[1], adapter="law", params=params))
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason and chunks[-1].completion.token_ids == whole.token_ids
    assert all(c.finish_reason is None for c in chunks[:-1])
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    a = engine.generate(PROMPTS[0], adapters="medicine", params=sampled)[0]
    b = engine.generate([PROMPTS[0], PROMPTS[1]], adapters=["medicine", "law"], params=sampled)[0]
    assert a.token_ids == b.token_ids  # a seeded row does not depend on its batch neighbours
    other = engine.generate(PROMPTS[0], adapters="medicine",
                            params=SamplingParams(max_tokens=16, temperature=0.9, seed=8))[0]
    assert other.token_ids != a.token_ids


def test_stop_strings_and_max_tokens(engine):
    full = engine.generate(PROMPTS[3], params=SamplingParams(max_tokens=16))[0]
    assert full.finish_reason == "length" and full.completion_tokens == 16
    cut = full.text[3:6]
    stopped = engine.generate(PROMPTS[3], params=SamplingParams(max_tokens=16, stop=[cut]))[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:full.text.find(cut)]


def test_bad_requests_name_the_problem(engine):
    with pytest.raises(RegistryError, match="nosuch"):
        engine.generate("hi", adapters="nosuch")
    with pytest.raises(RegistryError, match="v99 does not exist"):
        engine.generate("hi", adapters="law@v99")
    with pytest.raises(RequestError, match="max_tokens"):
        engine.generate("hi", params=SamplingParams(max_tokens=engine.max_tokens_limit + 1))
    with pytest.raises(RequestError, match="context"):
        engine.generate("word " * 4000, params=SamplingParams(max_tokens=8))
    with pytest.raises(RequestError, match="temperature"):
        engine.generate("hi", params=SamplingParams(temperature=-1))
    with pytest.raises(RequestError, match="role"):
        engine.generate([[{"role": "robot", "content": "x"}]])
    # the engine still serves
    assert engine.generate("hi", params=SamplingParams(max_tokens=2))[0].completion_tokens >= 1


def test_adapter_for_another_base_is_refused(engine, tmp_path):
    from studio.models.loading import QuantSpec, load_base

    other = load_base("tiny-mixtral", QuantSpec("4bit"))
    path = make_real_adapter(other, tmp_path / "mix", "mixlaw", 5)
    engine.registry.register(path, "mixlaw")
    with pytest.raises(ModelError, match="fingerprint"):
        engine.generate("hi", adapters="mixlaw")


def test_lru_eviction_and_loading_do_not_disturb_requests_in_flight(tmp_path):
    registry = build_registry(tmp_path / "reg", tmp_path / "work", [
        ("law", 1, "attention,experts"), ("medicine", 2, "attention,experts"), ("code", 3, "attention,experts")])
    eng = Engine("tiny-moe", registry=registry, max_resident=2, max_batch_size=4, max_wait_ms=0)
    try:
        long = SamplingParams(max_tokens=48)
        solo = eng.generate(PROMPTS[0], adapters="law", params=long)[0]
        # a long law stream runs while medicine and code are loaded (code evicts the LRU idle one, not law)
        got = {}

        def run():
            got["law"] = "".join(c.text for c in eng.stream(PROMPTS[0], adapter="law", params=long))

        t = threading.Thread(target=run)
        t.start()
        for ref in ["medicine", "code", "medicine"]:
            eng.generate(PROMPTS[2], adapters=ref, params=SamplingParams(max_tokens=4))
        t.join(timeout=120)
        assert got["law"] == solo.text
        assert len(eng.resident()) <= 2
        assert eng.counters["adapter_evictions"] >= 1
        # evicted adapters come back on demand with the same outputs
        again = eng.generate(PROMPTS[0], adapters="law", params=long)[0]
        assert again.token_ids == solo.token_ids
        # one call needing more adapters than may be resident: the third row waits for a slot, then runs
        short = SamplingParams(max_tokens=6)
        rows = eng.generate([PROMPTS[1]] * 3, adapters=["law", "medicine", "code"], params=short)
        for ref, row in zip(["law", "medicine", "code"], rows):
            assert row.token_ids == eng.generate(PROMPTS[1], adapters=ref, params=short)[0].token_ids
        assert len(eng.resident()) <= 2
    finally:
        eng.close()


def test_using_gives_the_model_with_the_adapter_active(engine):
    ids = torch.tensor([engine.tokenizer("The court held", add_special_tokens=False)["input_ids"]])
    with engine.using(None) as model:
        base = model(input_ids=ids).logits
    with engine.using("law") as model:
        law = model(input_ids=ids).logits
    with engine.using("base") as model:
        again = model(input_ids=ids).logits
    assert torch.equal(base, again)
    assert (law - base).abs().max() > 1e-3


def test_loading_and_evicting_another_adapter_does_not_disturb_a_running_stream(engine):
    """The bug of one owner too many: Engine.load() used to switch the model's active adapter while a uniform batch of
    another adapter ran, whose next steps then got the new adapter's expert LoRA and both linear LoRAs. Now loading
    writes a free slot and evicting clears that slot only. Base with expert LoRA; greedy, so the text must match."""
    params = SamplingParams(max_tokens=320, ignore_eos=True)
    alone = engine.generate(PROMPTS[0], adapters="law", params=params)[0]
    engine.unload("medicine")  # so that the load below really loads (if an earlier test made it resident)
    stream = engine.stream(PROMPTS[0], adapter="law", params=params)
    first = next(stream)
    loader = threading.Thread(target=engine.load, args=("medicine",))
    loader.start()
    loader.join(timeout=60)
    assert "medicine@v1" in engine.resident()
    running_after_load = engine.stats()["running"]
    second = next(stream)
    assert engine.unload("medicine")
    running_after_evict = engine.stats()["running"]
    rest = list(stream)
    assert running_after_load >= 1 and running_after_evict >= 1  # both happened while the stream was running
    assert first.text + second.text + "".join(c.text for c in rest) == alone.text
    assert rest[-1].completion.token_ids == alone.token_ids


def test_streamed_text_with_stop_strings_equals_whole_text(engine):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    whole = engine.generate(PROMPTS[1], adapters="medicine", params=params)[0]
    assert whole.text == engine.tokenizer.decode(whole.token_ids, skip_special_tokens=True)
    stop = whole.text[len(whole.text) // 2: len(whole.text) // 2 + 3]
    cut = SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop, "no such stop string"])
    chunks = list(engine.stream(PROMPTS[1], adapter="medicine", params=cut))
    streamed = "".join(c.text for c in chunks)
    assert streamed == chunks[-1].completion.text == whole.text[:whole.text.find(stop)]
    assert chunks[-1].finish_reason == "stop" and stop not in streamed
