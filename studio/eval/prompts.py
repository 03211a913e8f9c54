"""Prompts for generation: (prompt, reference answer) pairs from a dataset's held-out rows, or a prompts file.

A prompts file is `.txt` (one prompt per non-empty line) or `.json`/`.jsonl` whose items are strings or objects
with `prompt` (a string or a list of chat messages) or `messages` (a chat; a final assistant turn becomes the
reference), and optionally `reference` (also read from `completion`, `answer`, `output`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from studio.errors import DatasetError

_REFERENCE_KEYS = ("reference", "completion", "answer", "output")


@dataclass
class PromptItem:
    prompt: list[dict]              # chat messages, rendered by the engine with the chat template
    reference: str | None = None

    def text(self) -> str:
        """The last user turn, for tables."""
        users = [m["content"] for m in self.prompt if m.get("role") == "user"]
        return users[-1] if users else self.prompt[-1]["content"]


def reference_pairs(rows: list[list[dict]]) -> list[PromptItem]:
    """Rows whose last assistant turn answers a user turn: the conversation before it is the prompt, its content
    the reference. Rows without a user turn (plain-text documents) have no reference answer."""
    out = []
    for messages in rows:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or not any(m.get("role") == "user" for m in messages[:last]):
            continue
        out.append(PromptItem(prompt=[dict(m) for m in messages[:last]], reference=messages[last]["content"]))
    return out


def _as_chat(prompt, where: str) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DatasetError(f"{where}: empty prompt")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                  for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DatasetError(f"{where}: a prompt must be a string or a list of {{role, content}} messages")


def _item(obj, where: str) -> PromptItem:
    if isinstance(obj, str):
        return PromptItem(_as_chat(obj, where))
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a string or an object with `prompt` or `messages`, "
                           f"got {type(obj).__name__}")
    reference = next((obj[k] for k in _REFERENCE_KEYS if isinstance(obj.get(k), str)), None)
    if "prompt" in obj:
        return PromptItem(_as_chat(obj["prompt"], where), reference)
    if "messages" in obj:
        chat = _as_chat(obj["messages"], where)
        if chat[-1]["role"] == "assistant":
            reference = reference or chat[-1]["content"]
            chat = chat[:-1]
        if not chat:
            raise DatasetError(f"{where}: `messages` holds only an assistant turn; there is nothing to prompt with")
        return PromptItem(chat, reference)
    raise DatasetError(f"{where}: an object needs a `prompt` (string or messages) or a `messages` key; "
                       f"found keys {sorted(obj)}")


def load_prompts(path: str | Path) -> list[PromptItem]:
    """Read a prompts file (see the module docstring); errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"--prompts {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"--prompts {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    items: list[PromptItem] = []
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}, line {n}: invalid JSON ({exc.msg})") from None
                items.append(_item(obj, f"{path}, line {n}"))
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
        items = [_item(obj, f"{path}, item {i}") for i, obj in enumerate(data)]
    else:
        items = [PromptItem(_as_chat(line.strip(), f"{path}, line {n}"))
                 for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not items:
        raise DatasetError(f"--prompts {path}: no prompts found (one per line in .txt, or a JSON/JSONL list)")
    return items
