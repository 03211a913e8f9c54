"""Incremental detokenization of one generated row: amortised O(1) tokenizer work per token, with stop strings.

Owns turning a row's token ids into its text as they arrive; the scheduler (studio/engine.py) feeds it.

Decoding the whole row again for every new token costs O(n) per token (O(n^2) per row). Here each step decodes only
a short window: the tokens since the last committed text plus the few before them, whose decoded text is known, so
tokenizers that spell a token differently at the start of a text (sentencepiece's leading space) or that need the
next bytes of a multi-byte character (byte-level BPE) commit exactly the characters a whole decode would give. Text
is committed only when it does not end in an incomplete character (U+FFFD); what is left is flushed at the end.
The same algorithm as vLLM's and TGI's `decode_token`, written out because transformers has no incremental decoder.
"""

from __future__ import annotations


class Detokenizer:
    """Text of one row so far. `add(token)` returns the number of new committed characters; `text` is cut at the
    first stop string once one appears (`stopped`). `skip` ids (end-of-sequence) are left out of the text."""

    def __init__(self, tokenizer, skip: set[int] | frozenset = frozenset(), stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.skip = skip
        self.stop = [s for s in (stop or []) if s]
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0              # ids[prefix:read] decode to `prefix_text`, already committed
        self.read = 0                # ids before `read` are committed
        self.prefix_text = ""
        self.text = ""
        self.stopped = False
        self.decoded_tokens = 0      # tokens passed to the tokenizer so far (the cost, for tests)

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> int:
        if self.stopped or token in self.skip:
            return 0
        self.ids.append(token)
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) <= len(self.prefix_text) or new_text.endswith("\ufffd"):
            return 0  # nothing printable yet (an incomplete character, or a token that adds no text)
        delta = new_text[len(self.prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        self.prefix_text = self._decode(self.ids[self.prefix:self.read])
        return self._append(delta)

    def flush(self) -> int:
        """Commit whatever is pending (an incomplete character at the very end decodes as U+FFFD, as in a whole
        decode)."""
        if self.stopped or self.read == len(self.ids):
            return 0
        new_text = self._decode(self.ids[self.prefix:])
        delta = new_text[len(self.prefix_text):]
        self.prefix = self.read = len(self.ids)
        self.prefix_text = ""
        return self._append(delta)

    def _append(self, delta: str) -> int:
        before = len(self.text)
        self.text += delta
        if self.stop:
            # only the new characters and the stop length before them can hold a stop string that was not there yet
            start = max(0, before - self.longest_stop + 1)
            hits = [at for at in (self.text.find(s, start) for s in self.stop) if at >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return len(self.text) - before

    def safe_length(self) -> int:
        """Characters that can be streamed now: all but a tail that could still become the start of a stop string."""
        if self.stopped or not self.stop:
            return len(self.text)
        return max(0, len(self.text) - (self.longest_stop - 1))
