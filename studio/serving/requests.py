"""Requests of the serving engine: sampling settings, completions, stream chunks, queued requests, prompt encoding.

Owns what a request is and how it is checked and tokenized; no model, no scheduling (studio/engine.py does that).
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import torch

from studio.errors import RequestError, StudioError
from studio.serving.detokenize import Detokenizer

BASE_NAMES = ("", "base")
MAX_LOGPROBS = 20          # alternatives per token (OpenAI's chat limit; its legacy completions allow 5)


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
class Request:
    prompt_ids: list[int]
    adapter: str | None          # canonical ref (None = base)
    params: SamplingParams
    version: object = None       # the registry's AdapterVersion, resolved once when the request was made
    out: queue.Queue = field(default_factory=queue.Queue)
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    detok: "Detokenizer | None" = None  # the row's text so far, grown incrementally
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


DONE = object()  # the last item of every request's output queue


class PromptEncoder:
    """Prompts (text, chat messages or token ids) -> token ids, refusing what cannot fit or is not text."""

    def __init__(self, tokenizer, vocab_size: int, context_length: int, max_prompt_chars: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        # a prompt longer than this many characters cannot fit the context whatever it says, so it is refused before
        # tokenizing (tokenizing megabytes costs gigabytes): no token decodes to more characters than its longest
        # vocabulary entry has (byte-level and sentencepiece vocabularies spell a token with one symbol per byte)
        if max_prompt_chars is None:
            longest = max((len(t) for t in tokenizer.get_vocab()), default=16)
            max_prompt_chars = context_length * max(longest, 1)
        if not isinstance(max_prompt_chars, int) or max_prompt_chars < 1:
            raise StudioError(f"max_prompt_chars must be a positive integer, got {max_prompt_chars!r}")
        self.max_prompt_chars = max_prompt_chars

    def check_text(self, text: str, what: str) -> None:
        """Size and encoding before any tokenizer work: a prompt that cannot fit, or is not text, is refused."""
        if len(text) > self.max_prompt_chars:
            raise RequestError(f"{what} has {len(text):,} characters, over the limit of {self.max_prompt_chars:,} "
                               f"(the base's context is {self.context_length} tokens): shorten it")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"{what} holds an unpaired surrogate ({text[exc.start]!a}) at character {exc.start}, "
                               "which is not text") from None

    def encode(self, prompt) -> list[int]:
        from studio.data.chat import encode_chat

        tok = self.tokenizer
        if isinstance(prompt, str):
            self.check_text(prompt, "the prompt")
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
                self.check_text(m["content"], f"message {i}")
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

