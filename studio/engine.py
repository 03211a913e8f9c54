"""The serving scheduler: one quantized base, many LoRA adapters in slots, rows of different adapters in one batch.

    engine = Engine("tiny-moe")                                    # loads the base once (4-bit, experts included)
    engine.generate(["Define tort."], adapters="law@prod")         # registry reference, resolved per request
    engine.generate([chat_a, chat_b, chat_c], adapters=["law@v3", "medicine@prod", None])   # one mixed batch
    for chunk in engine.stream(chat, adapter="law@prod"): print(chunk.text, end="")
    engine.generate([token_ids], params=SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=1))  # scoring

Owns continuous batching and the KV cache: a single background thread owns the model; each iteration it admits
waiting requests (up to `max_batch_size` rows, after waiting at most `max_wait_ms` for company when idle), prefills
them as one left-padded group, merges their KV cache into the running batch, then decodes one token for every running
row. Finished rows leave the batch at once. The rest lives beside it in studio/serving/: requests and prompt encoding
(requests.py), which adapter sits in which LoRA slot (residency.py: LRU, load, evict, base fingerprint), next-token
sampling (sampling.py) and incremental detokenization with stop strings (detokenize.py). LoRA arithmetic is
studio/lora/layers.py (its slots filled by studio/lora/slots.py): each forward the scheduler only says which rows use
which slots (`LoraBatch`).

A registry reference (`law@prod`) is resolved once per request, when it is made, in the caller's thread: a promote
or rollback takes effect on the next request without a restart. An adapter in use by a request in flight is never
evicted, and loading or evicting another adapter never touches its slot.

Hand-written because transformers' `generate` has no per-row adapters and admits no rows mid-flight, and vLLM /
LoRAX / S-LoRA have no LoRA on MoE experts.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from studio import _openmp
from studio.errors import RequestError, StudioError
from studio.serving import sampling
from studio.serving.detokenize import Detokenizer
from studio.serving.requests import (BASE_NAMES, DONE, MAX_LOGPROBS, Completion, PromptEncoder, Request,  # noqa: F401
                                     SamplingParams, StreamChunk, TokenLogprob)
from studio.serving.residency import NoRoom, Residency, Resident

logger = logging.getLogger(__name__)


class Engine:
    """See the module docstring. Thread-safe: any thread may call generate/stream/load/using."""

    def __init__(self, base: str = "tiny-moe", quant=None, device=None, registry=None, max_resident: int = 8,
                 max_batch_size: int = 8, max_wait_ms: float = 10.0, max_tokens_limit: int = 1024,
                 allow_base_mismatch: bool = False, max_prompt_chars: int | None = None):
        from studio.models.loading import QuantSpec, load_base
        from studio.registry import AdapterRegistry

        if max_resident < 1 or max_batch_size < 1:
            raise StudioError("max_resident and max_batch_size must be at least 1")
        self.base = load_base(base, quant or QuantSpec("4bit"), device)
        self.base_id = self.base.ref
        self.model = self.base.model
        self.tokenizer = self.base.tokenizer
        self.device = next(self.model.parameters()).device
        slow = _openmp.slow_decoding_warning(self.device, torch.get_num_threads())
        if slow:
            logger.warning(slow)
        self.registry = registry if registry is not None else AdapterRegistry()
        self.max_resident = max_resident
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_tokens_limit = max_tokens_limit
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.allow_base_mismatch = allow_base_mismatch
        self.encoder = PromptEncoder(self.tokenizer, self.vocab_size, self.context_length, max_prompt_chars)
        self.eos_ids = self._eos_ids()
        self.model_lock = threading.RLock()          # held for every forward pass and every adapter load/evict
        self._turn_waiters = 0                       # callers of _model_turn() waiting for model_lock
        self._turn_count = threading.Lock()
        self.counters = collections.Counter()         # adapter_loads, adapter_evictions, adapter_switches, steps, ...
        self.listeners: list = []                     # callables(event: str, **info), e.g. the server's metrics
        self.residency = Residency(self.base, self.registry, max_resident, allow_base_mismatch, self._notify,
                                   self.counters)
        self.lora = self.residency.slots.batch        # which rows use which slot, set before every forward
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._running_count = 0
        self._last_set: frozenset | None = None
        self._padded_merge = self._cache_is_plain()

    # ---- public API --------------------------------------------------------------------------

    @property
    def max_prompt_chars(self) -> int:
        """Longest prompt in characters, refused before tokenizing (studio serve --max-prompt-chars)."""
        return self.encoder.max_prompt_chars

    @max_prompt_chars.setter
    def max_prompt_chars(self, value: int) -> None:
        self.encoder.max_prompt_chars = value

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the ids a token-id prompt or a logit_bias key may use."""
        return int(self.model.get_input_embeddings().num_embeddings)

    def resolve(self, ref: str | None):
        """None / "" / "base" / the base id -> None; else the AdapterVersion, checked against the loaded base."""
        return self.residency.resolve(ref)

    def load(self, ref: str | None) -> str | None:
        """Make the adapter resident (loading it into a free slot if needed); returns its canonical reference."""
        version = self.resolve(ref)
        if version is None:
            return None
        with self._model_turn():
            self.residency.acquire(version)
        return version.ref

    @contextmanager
    def _model_turn(self):
        """model_lock for work outside the scheduler (adapter load and evict, exclusive use). The scheduler takes the
        lock once per decode step and, Python's locks being unfair, would win every re-acquire: a load or evict
        would wait until every running generation ended. It steps aside while _turn_waiters > 0 (see _loop)."""
        with self._turn_count:
            self._turn_waiters += 1
        try:
            self.model_lock.acquire()
        finally:
            with self._turn_count:
                self._turn_waiters -= 1
        try:
            yield
        finally:
            self.model_lock.release()

    def resident(self) -> list[str]:
        """The adapters loaded now, least recently used first."""
        return self.residency.resident()

    def unload(self, ref: str) -> bool:
        """Evict an adapter now (refused while a request uses it)."""
        version = self.resolve(ref)
        with self._model_turn():
            entry = self.residency.entries.get(version.ref) if version else None
            if entry is None:
                return False
            self.residency.evict(entry)
            return True

    @contextmanager
    def using(self, ref: str | None):
        """Exclusive use of the model with `ref` active (None = bare base) for inputs of any shape; generation waits
        meanwhile."""
        version = self.resolve(ref)
        with self._model_turn():
            entry = self.residency.acquire(version) if version else None
            if entry:
                entry.users += 1
            try:
                self.lora.set([entry.slot if entry else None])
                with torch.no_grad():
                    yield self.model
            finally:
                self.lora.clear()
                if entry:
                    entry.users -= 1

    def generate(self, prompts, adapters=None, params: SamplingParams | None = None) -> list[Completion]:
        """Complete every prompt (a str, a chat: list of {"role", "content"}, or a list of token ids); rows may use
        different adapters."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], (dict, int))):
            prompts = [prompts]
        if not isinstance(adapters, (list, tuple)):
            adapters = [adapters] * len(prompts)
        if len(adapters) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(adapters)} adapters: give one adapter, "
                               "or one per prompt")
        requests = self._prepare(list(prompts), list(adapters), params or SamplingParams())
        self._submit(requests)
        return [self._drain(req) for req in requests]

    def stream(self, prompt, adapter=None, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Validate and queue the request now (a bad request raises here, before anything is sent), and return an
        iterator of text deltas; the last chunk carries finish_reason and the Completion.

        Closing the iterator early (a client that went away) cancels the request."""
        (req,) = self._prepare([prompt], [adapter], params or SamplingParams())
        self._submit([req])
        return self._chunks(req)

    @staticmethod
    def _chunks(req: Request) -> Iterator[StreamChunk]:
        try:
            while True:
                item = req.out.get()
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled = True

    def stats(self) -> dict:
        """Base, resident adapters, queue lengths and counters (loads, evictions, switches, steps)."""
        with self._cv:
            waiting = len(self._waiting)
        return {"base": self.base_id, "resident": self.resident(), "max_resident": self.max_resident,
                "waiting": waiting, "running": self._running_count, **dict(self.counters)}

    def close(self) -> None:
        """Stop the scheduler thread (requests in flight finish first); `with Engine(...)` calls it."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- requests -----------------------------------------------------------------------------

    def _encode(self, prompt) -> list[int]:
        return self.encoder.encode(prompt)

    def _prepare(self, prompts, adapters, params: SamplingParams) -> list[Request]:
        """Checked, tokenized requests, each adapter reference resolved here, once, outside every lock."""
        params.validate(self.max_tokens_limit)
        bias = None
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= self.vocab_size]
            if bad:
                raise RequestError(f"logit_bias names token ids {bad[:5]} outside this base's vocabulary of "
                                   f"{self.vocab_size} ids")
            ids = list(params.logit_bias)
            bias = (torch.tensor(ids), torch.tensor([float(params.logit_bias[t]) for t in ids]))
        out = []
        versions: dict = {}
        for prompt, ref in zip(prompts, adapters):
            ids = self._encode(prompt)
            if not ids:
                raise RequestError("the prompt is empty after tokenization")
            if len(ids) + params.max_tokens > self.context_length:
                raise RequestError(f"the prompt has {len(ids)} tokens; with max_tokens={params.max_tokens} that is "
                                   f"over the base's context of {self.context_length} tokens: shorten the prompt "
                                   "or lower max_tokens")
            if ref not in versions:
                versions[ref] = self.resolve(ref)
            version = versions[ref]
            gen = None
            if params.temperature > 0:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(params.seed if params.seed is not None else torch.seed())
            own = SamplingParams(**asdict(params))
            out.append(Request(ids, version.ref if version else None, own, version=version, generator=gen,
                               bias=bias, logprobs=[] if params.logprobs is not None else None,
                               detok=Detokenizer(self.tokenizer, self.eos_ids, own.stop)))
        return out

    def _submit(self, requests: list[Request]) -> None:
        with self._cv:
            if self._closed:
                raise StudioError("the engine is closed")
            self._waiting.extend(requests)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="studio-engine", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    @staticmethod
    def _drain(req: Request) -> Completion:
        while True:
            item = req.out.get()
            if item is DONE:
                raise StudioError("the request ended without a result")
            if isinstance(item, BaseException):
                raise item
            if item.completion is not None:
                req.out.get()  # the DONE marker
                return item.completion

    def _notify(self, event: str, **info) -> None:
        for fn in self.listeners:
            try:
                fn(event, **info)
            except Exception:  # a metrics listener must never break serving
                logger.exception("engine listener failed")

    def _eos_ids(self) -> set[int]:
        ids = set()
        for tok in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(tok, int):
                ids.add(tok)
            elif isinstance(tok, (list, tuple)):
                ids.update(t for t in tok if isinstance(t, int))
        return ids

    # ---- the scheduler --------------------------------------------------------------------------

    def _cache_is_plain(self) -> bool:
        """Merging running and newly prefilled KV caches needs plain full-attention cache layers."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:
            return True
        layers = getattr(cache, "layers", [])
        return all(type(layer) is DynamicLayer for layer in layers)

    def _loop(self) -> None:
        batch = _Batch(self)
        while True:
            with self._cv:
                while not self._waiting and not batch.rows and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for req in list(self._waiting) + [r.req for r in batch.rows]:
                        req.out.put(StudioError("the engine was closed"))
                        req.out.put(DONE)
                    return
                if not batch.rows and self._waiting and self.max_wait > 0:
                    # idle: wait briefly for company so concurrent requests share the first forward pass
                    deadline = time.monotonic() + self.max_wait
                    while len(self._waiting) < self.max_batch_size and time.monotonic() < deadline:
                        self._cv.wait(timeout=max(0.0, deadline - time.monotonic()))
                admit = []
                room = self.max_batch_size - len(batch.rows)
                if room > 0 and (self._padded_merge or not batch.rows):
                    while self._waiting and len(admit) < room:
                        admit.append(self._waiting.popleft())
            try:
                with self.model_lock, torch.no_grad():
                    self._admit(batch, admit)
                    if batch.rows:
                        batch.step()
                self._running_count = len(batch.rows)
                deadline = time.monotonic() + 0.05
                while self._turn_waiters and time.monotonic() < deadline:  # let a load/evict/using() in between steps
                    time.sleep(0.0005)
                if not batch.rows:
                    with self._cv:  # every request held back (all resident adapters busy elsewhere): do not spin
                        if self._waiting:
                            self._cv.wait(timeout=0.01)
            except Exception as exc:  # fail every request in the batch, keep the engine alive
                logger.exception("engine step failed")
                for row in batch.rows:
                    self.finish_row(row, error=exc)
                batch.reset()

    def _admit(self, batch: "_Batch", admit: list[Request]) -> None:
        ready, held = [], []
        for req in admit:
            if req.cancelled:
                req.out.put(DONE)
                continue
            try:
                entry = self.residency.acquire(req.version) if req.version is not None else None
            except NoRoom:
                held.append(req)
                continue
            except StudioError as exc:
                req.out.put(exc)
                req.out.put(DONE)
                continue
            if entry:
                entry.users += 1
            ready.append((req, entry))
        if held:
            with self._cv:
                self._waiting.extendleft(reversed(held))
        if ready:
            try:
                batch.prefill(ready)
            except Exception as exc:  # fail these requests, keep the running batch and the engine
                logger.exception("prefill failed")
                for req, entry in ready:
                    self.finish_row(_Row(req, entry, 0), error=exc)

    # ---- the rows' side, called by _Batch ------------------------------------------------------------

    def finish_row(self, row: "_Row", error: BaseException | None = None) -> None:
        """Send a finished row's last chunk and its Completion (or its error), and release its adapter."""
        req = row.req
        if row.entry is not None:
            row.entry.users -= 1
        if error is not None:
            req.out.put(error if isinstance(error, StudioError) else StudioError(f"generation failed: {error}"))
            req.out.put(DONE)
            return
        now = time.perf_counter()
        req.detok.flush()
        final_text = req.detok.text
        delta = final_text[req.emitted:]
        req.emitted = len(final_text)
        completion = Completion(text=final_text, token_ids=list(req.tokens), prompt_tokens=len(req.prompt_ids),
                                completion_tokens=len(req.tokens), finish_reason=req.finish_reason or "length",
                                adapter=req.adapter, latency_s=now - req.submitted,
                                ttft_s=(req.first_token or now) - req.submitted,
                                prompt_token_ids=list(req.prompt_ids), prompt_logprobs=req.prompt_logprobs,
                                logprobs=req.logprobs)
        self.counters["requests"] += 1
        self.counters["completion_tokens"] += len(req.tokens)
        self.counters["prompt_tokens"] += len(req.prompt_ids)
        self._notify("request_done", completion=completion)
        req.out.put(StreamChunk(delta, finish_reason=completion.finish_reason, completion=completion,
                                logprobs=self._unsent_logprobs(req)))
        req.out.put(DONE)

    @staticmethod
    def _unsent_logprobs(req: Request) -> list[TokenLogprob] | None:
        if req.logprobs is None:
            return None
        new = req.logprobs[req.logprobs_sent:]
        req.logprobs_sent = len(req.logprobs)
        return new

    def emit_token(self, row: "_Row", token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record one new token for a row; return True when the row is finished."""
        req = row.req
        if req.first_token is None:
            req.first_token = time.perf_counter()
        if logprob is not None:
            req.logprobs.append(logprob)
        if token in self.eos_ids and not req.params.ignore_eos:
            req.finish_reason = "stop"
            return True
        req.tokens.append(token)
        detok = req.detok
        detok.add(token)
        if detok.stopped:
            req.finish_reason = "stop"
            return True
        if len(req.tokens) >= req.params.max_tokens:
            req.finish_reason = "length"
            return True
        # hold back anything that could be the start of a stop string (incomplete characters are never committed)
        safe = detok.safe_length()
        if safe > req.emitted:
            req.out.put(StreamChunk(detok.text[req.emitted:safe], logprobs=self._unsent_logprobs(req)))
            req.emitted = safe
        return req.cancelled

    def set_rows(self, slots: list[int | None]) -> None:
        """Say which slot each row of the next forward uses; count a switch when the set of adapters changes."""
        self.lora.set(slots, device=self.device)
        distinct = frozenset(slots)
        if self._last_set is not None and distinct != self._last_set:
            self.counters["adapter_switches"] += 1
            self._notify("adapter_switch")
        self._last_set = distinct


@dataclass
class _Row:
    req: Request
    entry: Resident | None
    position: int          # position id of the next token
    last: int = -1         # the token to feed next


class _Batch:
    """The running rows, their shared left-padded KV cache and attention mask."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.reset()

    def reset(self) -> None:
        self.rows: list[_Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None

    def _forward(self, input_ids, mask, positions, cache, slots, every_position: bool = False):
        e = self.engine
        e.set_rows(slots)
        # no router aux loss at inference (Mixtral-style families compute it when their config asks, and its
        # attention-mask arithmetic assumes no KV cache)
        extra = {"output_router_logits": False} if hasattr(e.model.config, "output_router_logits") else {}
        try:
            out = e.model(input_ids=input_ids.to(e.device), attention_mask=mask.to(e.device),
                          position_ids=positions.to(e.device), past_key_values=cache, use_cache=True, **extra)
        finally:
            e.lora.clear()
        e.counters["forward_passes"] += 1
        return (out.logits if every_position else out.logits[:, -1, :]), out.past_key_values

    def prefill(self, ready: list[tuple[Request, Resident | None]]) -> None:
        from transformers.cache_utils import DynamicCache

        e = self.engine
        pad = e.tokenizer.pad_token_id if e.tokenizer.pad_token_id is not None else 0
        width = max(len(r.prompt_ids) for r, _ in ready)
        ids = torch.full((len(ready), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ready), width), dtype=torch.long)
        for i, (req, _) in enumerate(ready):
            n = len(req.prompt_ids)
            ids[i, width - n:] = torch.tensor(req.prompt_ids)
            mask[i, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=e.model.config)
        echo = any(req.params.prompt_logprobs for req, _ in ready)
        logits, cache = self._forward(ids, mask, positions, cache, [ent.slot if ent else None for _, ent in ready],
                                      every_position=echo)
        if echo:  # the prompt's own tokens' logprobs come from this same (possibly mixed-adapter) forward pass
            for i, (req, _) in enumerate(ready):
                if req.params.prompt_logprobs:
                    req.prompt_logprobs = sampling.prompt_logprobs(logits[i, width - len(req.prompt_ids):],
                                                                   req.prompt_ids, req.params.logprobs or 0)
            logits = logits[:, -1, :]
        rows = [_Row(req, ent, position=len(req.prompt_ids)) for req, ent in ready]
        # max_tokens=0 (scoring a prompt): finished now, and their cache rows are dropped before the merge
        keep = [i for i, r in enumerate(rows) if r.req.params.max_tokens > 0]
        if len(keep) < len(rows):
            for row in rows:
                if row.req.params.max_tokens == 0:
                    row.req.finish_reason = "length"
                    e.finish_row(row)
            if not keep:
                return
            idx = torch.tensor(keep)
            cache.batch_select_indices(idx.to(e.device))
            rows, mask, logits = [rows[i] for i in keep], mask[idx], logits[idx.to(logits.device)]
        tokens, entries = sampling.sample(logits, [r.req for r in rows])
        self._merge(rows, cache, mask)
        self._advance(rows, tokens, entries)

    def step(self) -> None:
        """Decode one token for every running row: the cache holds each row's context up to, not including, the
        row's last sampled token, whether the row was prefilled just now or long ago."""
        ids = torch.tensor([[r.last] for r in self.rows])
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        positions = torch.tensor([[r.position] for r in self.rows])
        logits, self.cache = self._forward(ids, self.mask, positions, self.cache,
                                           [r.entry.slot if r.entry else None for r in self.rows])
        self._advance(list(self.rows), *sampling.sample(logits, [r.req for r in self.rows]))

    def _advance(self, rows: list[_Row], tokens: list[int], entries: list[TokenLogprob | None]) -> None:
        e = self.engine
        done = []
        for row, tok, entry in zip(rows, tokens, entries):
            row.position += 1
            row.last = tok
            if e.emit_token(row, tok, entry):
                done.append(row)
        if done:
            for row in done:
                e.finish_row(row)
            keep = [i for i, r in enumerate(self.rows) if r not in done]
            if not keep:
                self.reset()
                return
            self._select(torch.tensor(keep))

    def _select(self, idx: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in idx.tolist()]
        self.cache.batch_select_indices(idx.to(self.engine.device))
        self.mask = self.mask[idx]
        # drop leading columns no remaining row attends to
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.mask.shape[1]
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        a, b = self.mask.shape[1], mask.shape[1]
        width = max(a, b)

        def left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        self.mask = torch.cat([left_pad(self.mask, width - a, 1), left_pad(mask, width - b, 1)], dim=0)
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([left_pad(old.keys, width - a, 2), left_pad(new.keys, width - b, 2)], dim=0)
            old.values = torch.cat([left_pad(old.values, width - a, 2), left_pad(new.values, width - b, 2)], dim=0)
        self.rows = self.rows + rows
