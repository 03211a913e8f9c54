"""One quantized base in memory, many LoRA adapters hot-swapped per request, rows of different adapters batched.

    engine = Engine("tiny-moe")                                    # loads the base once (4-bit, experts included)
    engine.generate(["Define tort."], adapters="law@prod")         # registry reference, resolved per request
    engine.generate([chat_a, chat_b, chat_c], adapters=["law@v3", "medicine@prod", None])   # one mixed batch
    for chunk in engine.stream(chat, adapter="law@prod"): print(chunk.text, end="")
    engine.generate([token_ids], params=SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=1))  # scoring

Adapters are loaded from the registry on first use and kept resident, least recently used evicted first
(`max_resident`); an adapter in use by a request in flight is never evicted. A registry alias (`law@prod`) is
resolved on every request, so a promote or rollback takes effect on the next request without a restart.

The scheduler is continuous batching at token granularity: a single background thread owns the model; each
iteration it admits waiting requests (up to `max_batch_size` rows, after waiting at most `max_wait_ms` for
company when idle), prefills them as one left-padded group, merges their KV cache into the running batch, then
decodes one token for every running row. Rows whose adapters differ share the forward pass: each LoRA layer
(PEFT's on attention, the studio's on the experts) adds every row's own adapter's update from the batch's adapters'
factors stacked along the rank (PEFT's own `ParamWrapper` refuses mixed batches; its `adapter_names` path for
linears works but pays a gather/scatter per adapter). Finished rows leave the batch at once.

Hand-written because transformers' `generate` has no per-row adapters, admits no rows mid-flight, and vLLM /
LoRAX / S-LoRA have no LoRA on MoE experts.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from studio.errors import ModelError, RegistryError, RequestError, StudioError
from studio.moe.experts import StudioExperts, rank_block_mask, stack_lora

logger = logging.getLogger(__name__)

BASE_NAMES = ("", "base")
MAX_LOGPROBS = 20          # alternatives per token (OpenAI's chat limit; its legacy completions allow 5)


# --------------------------------------------------------------------------- request / result types


@dataclass
class SamplingParams:
    """Decoding settings of one request. temperature 0 is greedy decoding."""
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False     # keep going past the end-of-sequence token (benchmarks: fixed token counts)
    # Log-probabilities are the model's own distribution (log-softmax of its logits, before logit_bias, penalties,
    # temperature, top-k and top-p), as vLLM returns by default: what evaluation harnesses score.
    logprobs: int | None = None  # None: none; N >= 0: each generated token's logprob and its top N alternatives
    prompt_logprobs: bool = False  # also the prompt's own tokens' logprobs (OpenAI's `echo`); max_tokens may be 0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling, in [-100, 100]
    presence_penalty: float = 0.0   # subtracted once from the logit of every token already generated, in [-2, 2]
    frequency_penalty: float = 0.0  # subtracted per occurrence in the tokens generated so far, in [-2, 2]

    def validate(self, limit: int) -> None:
        """Raise RequestError naming the bad setting (max_tokens over `limit`, temperature, top_p, ...)."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise RequestError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if self.max_tokens > limit:
            raise RequestError(f"max_tokens={self.max_tokens} is over this server's limit of {limit}; ask for fewer")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise RequestError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if self.stop is not None:
            if isinstance(self.stop, str):
                self.stop = [self.stop]
            if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
                raise RequestError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestError(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be a number between -2 and 2, got {value!r}")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise RequestError(f"logit_bias keys must be token ids (non-negative integers), got {token!r}")
            if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not -100.0 <= bias <= 100.0:
                raise RequestError(f"logit_bias values must be between -100 and 100, got {bias!r} for token {token}")

    @property
    def adjusts_logits(self) -> bool:
        """Whether logit_bias or a presence/frequency penalty changes the logits before sampling."""
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty)


@dataclass
class TokenLogprob:
    """One token's log-probability under the model and its `top` most likely alternatives [(id, logprob)]."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str          # "stop" | "length"
    adapter: str | None         # canonical registry reference ("law@v3"), None for the bare base
    latency_s: float
    ttft_s: float
    prompt_token_ids: list[int] = field(default_factory=list)
    # prompt_logprobs: one per prompt token, the first None (nothing predicts it); asked with prompt_logprobs.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # logprobs: one per generated token, asked with logprobs; it also scores an end-of-sequence token that
    # ended the row (which token_ids and the text leave out), as vLLM's output does.
    logprobs: list[TokenLogprob] | None = None


@dataclass
class StreamChunk:
    text: str
    finish_reason: str | None = None
    completion: Completion | None = None
    logprobs: list[TokenLogprob] | None = None  # the generated tokens' entries not sent in an earlier chunk


@dataclass
class _Adapter:
    ref: str            # canonical "domain@vN"
    slot: str           # the adapter's name inside the model (module dict keys may not contain dots)
    sha: str
    users: int = 0      # requests in flight using it: never evicted while > 0


@dataclass
class _Request:
    prompt_ids: list[int]
    adapter: str | None          # canonical ref (None = base)
    params: SamplingParams
    out: queue.Queue = field(default_factory=queue.Queue)
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0             # characters of decoded text already sent
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    prompt_logprobs: list[TokenLogprob | None] | None = None
    logprobs: list[TokenLogprob] | None = None
    logprobs_sent: int = 0       # entries of `logprobs` already sent in stream chunks
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (token ids, values)
    counts: torch.Tensor | None = None  # penalties: occurrences of each token id among `tokens[:counted]`
    counted: int = 0


_DONE = object()


# --------------------------------------------------------------------------- engine


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
        self.registry = registry if registry is not None else AdapterRegistry()
        self.max_resident = max_resident
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_tokens_limit = max_tokens_limit
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.allow_base_mismatch = allow_base_mismatch
        # a prompt longer than this many characters cannot fit the context whatever it says, so it is refused before
        # tokenizing (tokenizing megabytes costs gigabytes): no token decodes to more characters than its longest
        # vocabulary entry has (byte-level and sentencepiece vocabularies spell a token with one symbol per byte)
        if max_prompt_chars is None:
            longest = max((len(t) for t in self.tokenizer.get_vocab()), default=16)
            max_prompt_chars = self.context_length * max(longest, 1)
        if not isinstance(max_prompt_chars, int) or max_prompt_chars < 1:
            raise StudioError(f"max_prompt_chars must be a positive integer, got {max_prompt_chars!r}")
        self.max_prompt_chars = max_prompt_chars
        self.eos_ids = self._eos_ids()
        self.model_lock = threading.RLock()          # held for every forward pass and every adapter load/evict
        self._resident: collections.OrderedDict[str, _Adapter] = collections.OrderedDict()
        self._slots = itertools.count()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._lora_hooks: list = []
        self._linear_stacks: dict = {}
        self._keep_cache: dict = {}
        self._row_slots: list[str | None] | None = None
        self._mixed_distinct: list[str] = []
        self._last_mode = None
        self._running_count = 0
        self._expert_modules = [m for m in self.model.modules() if isinstance(m, StudioExperts)]
        self.counters = collections.Counter()         # adapter_loads, adapter_evictions, adapter_switches, steps, ...
        self.listeners: list = []                     # callables(event: str, **info), e.g. the server's metrics
        self._padded_merge = self._cache_is_plain()

    # ---- public API --------------------------------------------------------------------------

    def resolve(self, ref: str | None):
        """None / "" / "base" / the base id -> None; else the AdapterVersion, checked against the loaded base."""
        if ref is None or ref in BASE_NAMES or ref == self.base_id:
            return None
        try:
            return self.registry.resolve(ref, base_fingerprint=self.base.fingerprint,
                                         allow_mismatch=self.allow_base_mismatch)
        except RegistryError as exc:
            if "was trained on base" in str(exc):
                raise ModelError(str(exc)) from exc
            raise

    def load(self, ref: str | None) -> str | None:
        """Make the adapter resident (loading it if needed); returns its canonical reference."""
        version = self.resolve(ref)
        if version is None:
            return None
        with self.model_lock:
            self._ensure_resident(version)
        return version.ref

    def resident(self) -> list[str]:
        """The adapters loaded now, least recently used first."""
        return list(self._resident)

    def unload(self, ref: str) -> bool:
        """Evict an adapter now (refused while a request uses it)."""
        version = self.resolve(ref)
        with self.model_lock:
            entry = self._resident.get(version.ref) if version else None
            if entry is None:
                return False
            if entry.users:
                raise StudioError(f"{version.ref} is in use by {entry.users} request(s); unload it when they finish")
            self._evict(entry)
            return True

    @contextmanager
    def using(self, ref: str | None):
        """Exclusive use of the model with `ref` active (None = bare base); generation waits meanwhile."""
        version = self.resolve(ref)
        with self.model_lock:
            entry = self._ensure_resident(version) if version else None
            if entry:
                entry.users += 1
            try:
                self._set_uniform(entry.slot if entry else None)
                with torch.no_grad():
                    yield self.model
            finally:
                if entry:
                    entry.users -= 1
                self._set_uniform(None)
                self._last_mode = None

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
        results = []
        for req in requests:
            results.append(self._drain(req))
        return results

    def stream(self, prompt, adapter=None, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Validate and queue the request now (a bad request raises here, before anything is sent), and return an
        iterator of text deltas; the last chunk carries finish_reason and the Completion.

        Closing the iterator early (a client that went away) cancels the request."""
        (req,) = self._prepare([prompt], [adapter], params or SamplingParams())
        self._submit([req])
        return self._chunks(req)

    @staticmethod
    def _chunks(req: _Request) -> Iterator[StreamChunk]:
        try:
            while True:
                item = req.out.get()
                if item is _DONE:
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

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the ids a token-id prompt or a logit_bias key may use."""
        return int(self.model.get_input_embeddings().num_embeddings)

    def _check_text(self, text: str, what: str) -> None:
        """Size and encoding before any tokenizer work: a prompt that cannot fit, or is not text, is refused."""
        if len(text) > self.max_prompt_chars:
            raise RequestError(f"{what} has {len(text):,} characters, over the limit of {self.max_prompt_chars:,} "
                               f"(the base's context is {self.context_length} tokens): shorten it")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"{what} holds an unpaired surrogate ({text[exc.start]!a}) at character {exc.start}, "
                               "which is not text") from None

    def _encode(self, prompt) -> list[int]:
        from studio.data.chat import encode_chat

        tok = self.tokenizer
        if isinstance(prompt, str):
            self._check_text(prompt, "the prompt")
            return tok(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"token ids {bad[:5]} are outside this base's vocabulary of {self.vocab_size} ids "
                                   "(0 to vocab size - 1): tokenize the prompt with this base's tokenizer")
            return list(prompt)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            for i, m in enumerate(prompt):
                if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                    raise RequestError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': "
                                       f"str}}, got {str(m)[:120]}")
                self._check_text(m["content"], f"message {i}")
            if not prompt:
                raise RequestError("messages is empty: send at least one user message")
            if sum(len(m["content"]) for m in prompt) > self.max_prompt_chars:
                raise RequestError(f"the messages hold over {self.max_prompt_chars:,} characters together (the "
                                   f"base's context is {self.context_length} tokens): shorten them")
            # control tokens typed inside a message are text, never turn markers (no forged assistant turns)
            try:
                return encode_chat(tok, prompt, add_generation_prompt=True).input_ids
            except (ValueError, StudioError) as exc:  # text the tokenizer cannot keep apart from its control tokens
                raise RequestError(f"the messages cannot be encoded: {exc}") from None
        raise RequestError(f"a prompt must be a string, a list of chat messages or a non-empty list of token ids, "
                           f"got {type(prompt).__name__}")

    def _prepare(self, prompts, adapters, params: SamplingParams) -> list[_Request]:
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
        for prompt, ref in zip(prompts, adapters):
            ids = self._encode(prompt)
            if not ids:
                raise RequestError("the prompt is empty after tokenization")
            if len(ids) + params.max_tokens > self.context_length:
                raise RequestError(f"the prompt has {len(ids)} tokens; with max_tokens={params.max_tokens} that is "
                                   f"over the base's context of {self.context_length} tokens: shorten the prompt "
                                   "or lower max_tokens")
            version = self.resolve(ref)
            gen = None
            if params.temperature > 0:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(params.seed if params.seed is not None else torch.seed())
            out.append(_Request(ids, version.ref if version else None,
                                SamplingParams(**asdict(params)), generator=gen, bias=bias,
                                logprobs=[] if params.logprobs is not None else None))
        return out

    def _submit(self, requests: list[_Request]) -> None:
        with self._cv:
            if self._closed:
                raise StudioError("the engine is closed")
            self._waiting.extend(requests)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="studio-engine", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    @staticmethod
    def _drain(req: _Request) -> Completion:
        while True:
            item = req.out.get()
            if item is _DONE:
                raise StudioError("the request ended without a result")
            if isinstance(item, BaseException):
                raise item
            if item.completion is not None:
                req.out.get()  # the _DONE marker
                return item.completion

    # ---- adapters -----------------------------------------------------------------------------

    def _ensure_resident(self, version) -> _Adapter:
        from studio.adapters import load_adapter

        entry = self._resident.get(version.ref)
        if entry is not None and entry.sha == version.sha:
            self._resident.move_to_end(version.ref)
            return entry
        if entry is not None:  # same name, other content (should not happen: versions are immutable)
            self._evict(entry)
        while len(self._resident) >= self.max_resident:
            idle = [e for e in self._resident.values() if e.users == 0]
            if not idle:
                raise _NoRoom(f"all {self.max_resident} resident adapters are in use by requests in flight; "
                              f"retry when they finish, or raise max_resident (studio serve --max-resident)")
            self._evict(idle[0])
        path = self.registry.path(version.ref)
        slot = f"adapter_{next(self._slots)}"
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():  # PEFT warns that a second adapter joins the model: that is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                load_adapter(self.model, path, slot)
        except ModelError as exc:
            raise ModelError(f"{version.ref}: {exc}") from exc
        self.model.eval()  # new LoRA modules start in training mode: their dropout would act at inference
        entry = _Adapter(version.ref, slot, version.sha)
        self._resident[version.ref] = entry
        self._install_hooks()
        self.counters["adapter_loads"] += 1
        self._notify("adapter_load", ref=version.ref, seconds=time.perf_counter() - t0)
        logger.info("loaded adapter %s in %.3fs (%d resident)", version.ref, time.perf_counter() - t0,
                    len(self._resident))
        return entry

    def _evict(self, entry: _Adapter) -> None:
        from studio.adapters import delete_adapter

        delete_adapter(self.model, entry.slot)
        del self._resident[entry.ref]
        self._linear_stacks = {}
        self._last_mode = None
        self.counters["adapter_evictions"] += 1
        self._notify("adapter_evict", ref=entry.ref)

    def _notify(self, event: str, **info) -> None:
        for fn in self.listeners:
            try:
                fn(event, **info)
            except Exception:  # a metrics listener must never break serving
                logger.exception("engine listener failed")

    def _install_hooks(self) -> None:
        """Mixed batches on PEFT's LoRA linears: PEFT computes the base only (adapters disabled) and this hook adds
        every row's own adapter's update in two matmuls over the adapters' stacked factors.
        PEFT's own `adapter_names` path gathers, multiplies and scatters once per adapter, which costs several
        times more at decode batch sizes."""
        from peft.tuners.lora import LoraLayer

        for h in self._lora_hooks:
            h.remove()
        self._lora_hooks = []
        self._linear_stacks = {}
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                self._lora_hooks.append(module.register_forward_hook(self._linear_hook))

    def _linear_hook(self, module, args, output):
        if self._row_slots is None:
            return None
        names = tuple(s for s in self._mixed_distinct if s in module.lora_A)
        if not names:
            return None
        x = args[0]
        key = (id(module), names)
        stack = self._linear_stacks.get(key)
        if stack is None:
            a, b, r = stack_lora([(module.lora_A[s].weight, module.lora_B[s].weight * module.scaling[s])
                                  for s in names])
            stack = self._linear_stacks[key] = (a.to(x.dtype), b.to(x.dtype), r)
        a, b, r = stack
        if len(self._mixed_distinct) == 1 and None not in self._row_slots:  # one adapter on every row
            return output + F.linear(F.linear(x.to(a.dtype), a), b).to(output.dtype)
        keep = self._row_keep(names, r, x)
        h = F.linear(x.to(a.dtype), a)
        if x.shape[0] == len(self._row_slots) and h.dim() > 2:  # [rows, ..., features]: broadcast per row
            keep = keep.view(keep.shape[0], *([1] * (h.dim() - 2)), keep.shape[1])
        h = h * keep
        return output + F.linear(h, b).to(output.dtype)

    def _row_keep(self, names: tuple[str, ...], r: int, x: torch.Tensor) -> torch.Tensor:
        """[rows (or tokens of flattened inputs), len(names) * r]: 1 on the rank block of the row's adapter."""
        rows = len(self._row_slots)
        flat = x.dim() == 2 and x.shape[0] != rows  # flattened [rows * tokens, features] input
        key = (names, r, x.shape[0] if flat else -1)
        keep = self._keep_cache.get(key)
        if keep is None:
            col = torch.tensor([names.index(s) if s in names else -1 for s in self._row_slots])
            if flat:
                col = col.repeat_interleave(x.shape[0] // rows)
            keep = rank_block_mask(col, len(names), r)
            keep = self._keep_cache[key] = keep.to(device=x.device, dtype=x.dtype)
        return keep

    def _set_uniform(self, slot: str | None) -> None:
        from studio.adapters import set_active_adapter

        self._row_slots = None
        set_active_adapter(self.model, slot)

    def _set_rows(self, slots: list[str | None]) -> None:
        """Arrange the model for one forward over rows using `slots` (None = base).

        PEFT's layers always compute the base alone; _linear_hook adds the LoRA update (one adapter or each row's
        own), which is also faster than PEFT's per-layer adapter dispatch for a single adapter. The experts apply
        one active adapter directly, or each row's own from `row_adapters`."""
        distinct = set(slots)
        mode = tuple(slots) if len(distinct) > 1 else (slots[0],)
        if mode != self._last_mode:
            if self._last_mode is not None and set(self._last_mode) != distinct:
                self.counters["adapter_switches"] += 1
                self._notify("adapter_switch")
            self._set_uniform(None)
            if distinct != {None}:
                self._row_slots = list(slots)
                self._mixed_distinct = sorted(s for s in distinct if s is not None)
                self._keep_cache = {}
            if len(distinct) == 1 and slots[0] is not None:
                for m in self._expert_modules:
                    m.active_adapters = [slots[0]] if slots[0] in m.adapters else []
            self._last_mode = mode
        row_adapters = list(slots) if len(distinct) > 1 else None
        for m in self._expert_modules:
            m.row_adapters = row_adapters

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
                        req.out.put(_DONE)
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
                if not batch.rows:
                    with self._cv:  # every request held back (all resident adapters busy elsewhere): do not spin
                        if self._waiting:
                            self._cv.wait(timeout=0.01)
            except Exception as exc:  # fail every request in the batch, keep the engine alive
                logger.exception("engine step failed")
                for row in batch.rows:
                    self._finish(row, error=exc)
                batch.reset()

    def _admit(self, batch: "_Batch", admit: list[_Request]) -> None:
        ready, held = [], []
        for req in admit:
            if req.cancelled:
                req.out.put(_DONE)
                continue
            try:
                entry = self._ensure_resident(self.resolve(req.adapter)) if req.adapter else None
            except _NoRoom:
                held.append(req)
                continue
            except StudioError as exc:
                req.out.put(exc)
                req.out.put(_DONE)
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
                    self._finish(_Row(req, entry, 0), error=exc)

    def _finish(self, row: "_Row", error: BaseException | None = None) -> None:
        req = row.req
        if row.entry is not None:
            row.entry.users -= 1
        if error is not None:
            req.out.put(error if isinstance(error, StudioError) else StudioError(f"generation failed: {error}"))
            req.out.put(_DONE)
            return
        now = time.perf_counter()
        final_text = self._decoded(req)[0]
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
        req.out.put(_DONE)

    @staticmethod
    def _unsent_logprobs(req: _Request) -> list[TokenLogprob] | None:
        if req.logprobs is None:
            return None
        new = req.logprobs[req.logprobs_sent:]
        req.logprobs_sent = len(req.logprobs)
        return new

    def _decoded(self, req: _Request) -> tuple[str, bool]:
        """The row's text so far (end-of-sequence tokens left out), cut at a stop string; and whether one was found."""
        text = self.tokenizer.decode([t for t in req.tokens if t not in self.eos_ids], skip_special_tokens=True)
        for s in req.params.stop or []:
            at = text.find(s)
            if at >= 0:
                return text[:at], True
        return text, False

    def _emit(self, row: "_Row", token: int, logprob: TokenLogprob | None = None) -> bool:
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
        text, stopped = self._decoded(req)
        if stopped:
            req.finish_reason = "stop"
            return True
        if len(req.tokens) >= req.params.max_tokens:
            req.finish_reason = "length"
            return True
        # hold back an incomplete UTF-8 sequence and anything that could be the start of a stop string
        safe = len(text) - max((len(s) - 1 for s in req.params.stop or []), default=0)
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > req.emitted:
            req.out.put(StreamChunk(text[req.emitted:safe], logprobs=self._unsent_logprobs(req)))
            req.emitted = safe
        return req.cancelled

    def _eos_ids(self) -> set[int]:
        ids = set()
        for tok in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(tok, int):
                ids.add(tok)
            elif isinstance(tok, (list, tuple)):
                ids.update(t for t in tok if isinstance(t, int))
        return ids

    def _sample(self, logits: torch.Tensor, rows: list["_Row"]) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row from its last-position logits, with that row's own settings and generator; and, for
        rows that ask for logprobs, the chosen token's log-probability under the model with its top alternatives."""
        from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)

        out = []
        logits = logits.float()
        want = [row.req.params.logprobs is not None for row in rows]
        logp = F.log_softmax(logits, dim=-1) if any(want) else None
        if any(row.req.params.adjusts_logits for row in rows):
            logits = logits.clone()
            for i, row in enumerate(rows):
                self._adjust(logits[i], row.req)
        greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            p = row.req.params
            if p.temperature <= 0:
                out.append(greedy[i])
                continue
            warpers = LogitsProcessorList([TemperatureLogitsWarper(float(p.temperature))])
            if p.top_k:
                warpers.append(TopKLogitsWarper(int(p.top_k)))
            if p.top_p < 1.0:
                warpers.append(TopPLogitsWarper(float(p.top_p)))
            scores = warpers(None, logits[i:i + 1])
            probs = F.softmax(scores, dim=-1).cpu()
            out.append(int(torch.multinomial(probs, 1, generator=row.req.generator).item()))
        entries: list[TokenLogprob | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            if want[i]:
                entries[i] = _token_logprob(logp[i], out[i], row.req.params.logprobs)
        return out, entries

    @staticmethod
    def _adjust(logits: torch.Tensor, req: _Request) -> None:
        """logit_bias, then OpenAI's penalties over the tokens generated so far (in place, one row [V]):
        logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)."""
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

    def _prompt_logprobs(self, logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob | None]:
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


def _token_logprob(logp: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """logp: one position's log-softmax [V]."""
    alternatives = []
    if top:
        values, indices = logp.topk(top)
        alternatives = list(zip(indices.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), alternatives)


class _NoRoom(StudioError):
    """Every resident adapter is in use: a queued request waits for one to finish; a direct load() fails."""


@dataclass
class _Row:
    req: _Request
    entry: _Adapter | None
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
        e._set_rows(slots)
        try:
            out = e.model(input_ids=input_ids.to(e.device), attention_mask=mask.to(e.device),
                          position_ids=positions.to(e.device), past_key_values=cache, use_cache=True)
        finally:
            for m in e._expert_modules:
                m.row_adapters = None
        e.counters["forward_passes"] += 1
        return (out.logits if every_position else out.logits[:, -1, :]), out.past_key_values

    def prefill(self, ready: list[tuple[_Request, _Adapter | None]]) -> None:
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
                    req.prompt_logprobs = e._prompt_logprobs(logits[i, width - len(req.prompt_ids):],
                                                             req.prompt_ids, req.params.logprobs or 0)
            logits = logits[:, -1, :]
        rows = [_Row(req, ent, position=len(req.prompt_ids)) for req, ent in ready]
        # max_tokens=0 (scoring a prompt): finished now, and their cache rows are dropped before the merge
        keep = [i for i, r in enumerate(rows) if r.req.params.max_tokens > 0]
        if len(keep) < len(rows):
            for row in rows:
                if row.req.params.max_tokens == 0:
                    row.req.finish_reason = "length"
                    e._finish(row)
            if not keep:
                return
            idx = torch.tensor(keep)
            cache.batch_select_indices(idx.to(e.device))
            rows, mask, logits = [rows[i] for i in keep], mask[idx], logits[idx.to(logits.device)]
        tokens, entries = e._sample(logits, rows)
        self._merge(rows, cache, mask)
        self._advance(rows, tokens, entries)

    def step(self) -> None:
        """Decode one token for every running row: the cache holds each row's context up to, not including, the
        row's last sampled token, whether the row was prefilled just now or long ago."""
        e = self.engine
        ids = torch.tensor([[r.last] for r in self.rows])
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        positions = torch.tensor([[r.position] for r in self.rows])
        logits, self.cache = self._forward(ids, self.mask, positions, self.cache,
                                           [r.entry.slot if r.entry else None for r in self.rows])
        self._advance(list(self.rows), *e._sample(logits, self.rows))

    def _advance(self, rows: list[_Row], tokens: list[int], entries: list[TokenLogprob | None]) -> None:
        e = self.engine
        done = []
        for row, tok, entry in zip(rows, tokens, entries):
            row.position += 1
            row.last = tok
            if e._emit(row, tok, entry):
                done.append(row)
        if done:
            for row in done:
                e._finish(row)
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
