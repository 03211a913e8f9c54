"""Read a dataset file (JSONL, JSON, CSV/TSV, Parquet, TXT), detect its format and normalise it
to chat messages. Pure functions; `load_file` is what the registry calls, `inspect_file` the UI.

Formats, detected from the keys of the first record (case-insensitive):
  messages           `messages`: [{role, content}]            (OpenAI / TRL conversational)
  sharegpt           `conversations`: [{from, value}]          (human/gpt/system mapped)
  alpaca             `instruction`, `output` (+ `input`)       (also CSV/Parquet columns)
  prompt_completion  `prompt`, `completion`                    (strings or message lists)
  question_answer    `question`, `answer`
  text               plain .txt: one document per blank-line-separated paragraph, or a `text` field.
                     A document becomes a single assistant turn with no user turn, so
                     assistant-only loss trains on the whole document (continued pre-training).
Column formats take an optional `system` field. Every normalised row is a list of
{"role": "system"|"user"|"assistant", "content": str} with content stripped of outer whitespace.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import DatasetError

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_BYTES_ENV = "STUDIO_DATASET_MAX_BYTES"

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
                ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".md": "text", ".text": "text"}

# (format, required keys, optional keys) in detection priority order
COLUMN_FORMATS = [
    ("alpaca", ("instruction", "output"), ("input", "system")),
    ("prompt_completion", ("prompt", "completion"), ("system",)),
    ("question_answer", ("question", "answer"), ("system",)),
]
EXPECTED_FORMATS = (
    "`messages` (a list of {role, content} turns), `conversations` (ShareGPT: a list of "
    "{from, value} turns), `instruction` + `output` (+ optional `input`), `prompt` + `completion`, "
    "`question` + `answer` (each + optional `system`), or `text`"
)
ROLE_MAP = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant",
}

# reasons a row is dropped (counted, reported by stats)
EMPTY_ASSISTANT = "empty_assistant"
NO_ASSISTANT = "no_assistant_turn"
NO_USER = "no_user_turn"
UNSUPPORTED_ROLE = "unsupported_role"

Messages = list[dict]


@dataclass
class LoadResult:
    """A file read and normalised: rows of messages plus what was dropped and why."""

    path: Path
    file_format: str                  # jsonl | json | csv | parquet | text
    format: str                       # messages | sharegpt | alpaca | ... | text
    rows: list[Messages]
    dropped: Counter = field(default_factory=Counter)
    raw_rows: int = 0


# -----------------------------------------------------------------------------
# reading bytes -> records


def max_bytes_from_env(default: int = DEFAULT_MAX_BYTES) -> int:
    raw = os.environ.get(MAX_BYTES_ENV)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DatasetError(f"{MAX_BYTES_ENV}={raw!r} is not an integer number of bytes") from None
    if value <= 0:
        raise DatasetError(f"{MAX_BYTES_ENV} must be a positive number of bytes, got {value}")
    return value


def _check_size(path: Path, max_bytes: int) -> int:
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if not path.is_file():
        raise DatasetError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise DatasetError(
            f"{path}: file is {size:,} bytes, over the limit of {max_bytes:,} bytes; split it, or raise "
            f"the limit with DatasetRegistry(max_bytes=...) or the {MAX_BYTES_ENV} environment variable")
    if size == 0:
        raise DatasetError(f"{path}: the file is empty; expected {_expected_for(path)}")
    return size


def _expected_for(path: Path) -> str:
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind == "jsonl":
        return "one JSON object per line with " + EXPECTED_FORMATS
    if kind == "json":
        return "a JSON list of records with " + EXPECTED_FORMATS
    if kind in ("csv", "parquet"):
        return "a header row / columns: " + EXPECTED_FORMATS
    if kind == "text":
        return "UTF-8 text, one document per blank-line-separated paragraph"
    return "JSONL, JSON, CSV, Parquet or UTF-8 text with " + EXPECTED_FORMATS


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{path}: the file is UTF-16 encoded; re-encode it as UTF-8 "
                           f"(e.g. `iconv -f UTF-16 -t UTF-8`)")
    nul = data.find(b"\x00", 0, 8192)
    if nul != -1:
        raise DatasetError(f"{path}: looks like a binary file (NUL byte at offset {nul}), not UTF-8 text; "
                           f"expected {_expected_for(path)}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DatasetError(
            f"{path}: not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"(line {line}, column {col}); re-encode the file as UTF-8 "
            f"(e.g. `iconv -f latin1 -t UTF-8`)") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty (only whitespace); expected {_expected_for(path)}")
    return text


def _sniff_kind(path: Path, data: bytes) -> str:
    kind = FILE_FORMATS.get(path.suffix.lower())
    if data[:4] == b"PAR1":
        return "parquet"
    if kind:
        return kind
    head = data.lstrip()[:1]
    return {b"[": "json", b"{": "jsonl"}.get(head, "text")


def _json_error(path: Path, exc: json.JSONDecodeError, line: int | None = None) -> DatasetError:
    where = f"line {line}, column {exc.colno}" if line is not None else f"line {exc.lineno}, column {exc.colno}"
    return DatasetError(f"{path}: {where}: invalid JSON ({exc.msg})")


def _read_jsonl(path: Path, text: str) -> list[tuple[str, object]]:
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: line {i}, column {exc.colno}: invalid JSON ({exc.msg}); "
                               f"expected one JSON object per line") from None
        records.append((f"line {i}", obj))
    return records


def _read_json(path: Path, text: str) -> tuple[str, list[tuple[str, object]]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return "jsonl", _read_jsonl(path, text)  # JSON Lines saved with a .json name
        raise DatasetError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}); "
                           f"expected a JSON list of records") from None
    if isinstance(obj, dict):
        keys = ", ".join(list(obj)[:8])
        raise DatasetError(f"{path}: the JSON top level is an object (keys: {keys}), not a list of records; "
                           f"expected [{{...}}, {{...}}] where each record has " + EXPECTED_FORMATS)
    if not isinstance(obj, list):
        raise DatasetError(f"{path}: the JSON top level is a {type(obj).__name__}, not a list of records; "
                           f"expected [{{...}}, {{...}}] where each record has " + EXPECTED_FORMATS)
    return "json", [(f"record {i}", r) for i, r in enumerate(obj, start=1)]


def _read_csv(path: Path, text: str) -> list[tuple[str, object]]:
    header = text.lstrip("\n").split("\n", 1)[0]
    delimiter = "\t" if path.suffix.lower() == ".tsv" else max(",\t;", key=header.count)
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = []
        columns = None
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if columns is None:
                columns = [c.strip().lower() for c in row]
                continue
            record = {c: (row[j] if j < len(row) else "") for j, c in enumerate(columns) if c}
            rows.append((f"line {reader.line_num}", record))
    except csv.Error as exc:
        raise DatasetError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    if columns is None:
        raise DatasetError(f"{path}: the file is empty; expected {_expected_for(path)}")
    _check_columns(path, columns)
    return rows


def _check_columns(path: Path, columns: list[str]) -> None:
    cols = set(columns)
    if {"messages"} & cols or {"conversations"} & cols or "text" in cols:
        return
    if any(set(req) <= cols for _, req, _ in COLUMN_FORMATS):
        return
    raise DatasetError(
        f"{path}: no recognisable columns (found: {', '.join(c for c in columns if c) or 'none'}); "
        f"accepted column sets: instruction + output (+ input), prompt + completion, question + answer "
        f"(each + optional system), messages, conversations, or text")


def _read_parquet(path: Path) -> list[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
    _check_columns(path, [c.strip().lower() for c in table.column_names])
    return [(f"row {i}", r) for i, r in enumerate(table.to_pylist(), start=1)]


def _read_text(text: str) -> list[tuple[str, object]]:
    records = []
    line = 1
    for block in re.split(r"(\n[ \t\r\f\v]*\n)", text):
        if block.strip() and not re.fullmatch(r"\n[ \t\r\f\v]*\n", block):
            lead = len(block) - len(block.lstrip("\n"))
            records.append((f"line {line + lead}", {"text": block}))
        line += block.count("\n")
    return records


def read_records(path: str | Path, max_bytes: int | None = None) -> tuple[str, list[tuple[str, object]]]:
    """(file format, [(where, record)]) for a file; raises DatasetError naming file, line and fix."""
    path = Path(path)
    max_bytes = max_bytes_from_env() if max_bytes is None else max_bytes
    _check_size(path, max_bytes)
    data = path.read_bytes()
    kind = _sniff_kind(path, data)
    if kind == "parquet":
        return kind, _read_parquet(path)
    text = _decode(path, data)
    if kind == "jsonl":
        return kind, _read_jsonl(path, text)
    if kind == "json":
        return _read_json(path, text)
    if kind == "csv":
        return kind, _read_csv(path, text)
    return "text", _read_text(text)


# -----------------------------------------------------------------------------
# records -> format -> messages


def _lower_keys(record: dict) -> dict:
    return {str(k).strip().lower(): v for k, v in record.items()}


def detect_format(record: dict) -> str | None:
    keys = set(_lower_keys(record))
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    for name, required, _ in COLUMN_FORMATS:
        if set(required) <= keys:
            return name
    if "text" in keys:
        return "text"
    return None


def _text(value, path: Path, where: str, what: str) -> str:
    """A field's text: strings as is, None as empty, OpenAI content parts joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text").strip()
    raise DatasetError(f"{path}: {where}: {what} must be a string, got {type(value).__name__}")


def _turns(value, path: Path, where: str, key: str) -> list[tuple[str, str]]:
    """(raw role, content) pairs of a messages / conversations list; tolerant of either key pair."""
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV cells holding a JSON list
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list):
        raise DatasetError(f"{path}: {where}: `{key}` must be a list of turns, got {type(value).__name__}")
    turns = []
    for j, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise DatasetError(f"{path}: {where}: `{key}` turn {j} must be an object, got {type(turn).__name__}")
        t = _lower_keys(turn)
        role = t.get("role", t.get("from"))
        if role is None or not ("content" in t or "value" in t):
            expected = "{role, content}" if key == "messages" else "{from, value}"
            raise DatasetError(f"{path}: {where}: `{key}` turn {j} has keys {sorted(t)}; expected {expected}")
        content = t["content"] if "content" in t else t["value"]
        turns.append((str(role).strip().lower(), _text(content, path, where, f"`{key}` turn {j} content")))
    return turns


def _column_messages(fmt: str, rec: dict, path: Path, where: str) -> list[tuple[str, str]]:
    system = _text(rec.get("system"), path, where, "`system`")
    turns = [("system", system)] if system else []
    if fmt == "alpaca":
        instruction = _text(rec.get("instruction"), path, where, "`instruction`")
        input_ = _text(rec.get("input"), path, where, "`input`")
        user = f"{instruction}\n\n{input_}" if instruction and input_ else instruction or input_
        return turns + [("user", user), ("assistant", _text(rec.get("output"), path, where, "`output`"))]
    prompt_key, answer_key = {"prompt_completion": ("prompt", "completion"),
                              "question_answer": ("question", "answer")}[fmt]
    prompt, answer = rec.get(prompt_key), rec.get(answer_key)
    if isinstance(prompt, list) or isinstance(answer, list):  # conversational prompt/completion (TRL)
        return (turns + _turns(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}],
                               path, where, prompt_key)
                + _turns(answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}],
                         path, where, answer_key))
    return turns + [("user", _text(prompt, path, where, f"`{prompt_key}`")),
                    ("assistant", _text(answer, path, where, f"`{answer_key}`"))]


def record_to_turns(fmt: str, record, path: Path, where: str) -> list[tuple[str, str]]:
    """Raw (role, content) turns of one record in format `fmt`; structural problems raise."""
    if not isinstance(record, dict):
        raise DatasetError(f"{path}: {where}: expected a JSON object with {EXPECTED_FORMATS}; "
                           f"got a {type(record).__name__}")
    rec = _lower_keys(record)
    if detect_format(rec) != fmt:
        raise DatasetError(f"{path}: {where}: has keys {sorted(rec)}, which do not match the `{fmt}` "
                           f"format detected from the first record; expected one format per file")
    if fmt == "messages":
        return _turns(rec["messages"], path, where, "messages")
    if fmt == "sharegpt":
        return _turns(rec["conversations"], path, where, "conversations")
    if fmt == "text":
        return [("assistant", _text(rec.get("text"), path, where, "`text`"))]
    return _column_messages(fmt, rec, path, where)


def check_turns(fmt: str, turns: list[tuple[str, str]]) -> tuple[Messages | None, str | None]:
    """(messages, None) for a usable row, or (None, drop reason)."""
    messages = []
    for role, content in turns:
        mapped = ROLE_MAP.get(role)
        if mapped is None:
            return None, UNSUPPORTED_ROLE
        if mapped == "system" and not content:
            continue  # an empty system prompt carries nothing
        messages.append({"role": mapped, "content": content})
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        return None, NO_ASSISTANT
    if any(not m["content"] for m in assistants):
        return None, EMPTY_ASSISTANT
    if fmt != "text" and not any(m["role"] == "user" and m["content"] for m in messages):
        return None, NO_USER
    return messages, None


def load_file(path: str | Path, max_bytes: int | None = None, on_empty_assistant: str = "drop") -> LoadResult:
    """Read, detect and normalise a file. Raises DatasetError for unusable files or (with
    on_empty_assistant="error") the first row whose assistant turn is empty."""
    if on_empty_assistant not in ("drop", "error"):
        raise DatasetError(f"on_empty_assistant must be 'drop' or 'error', got {on_empty_assistant!r}")
    path = Path(path)
    file_format, records = read_records(path, max_bytes)
    if not records:
        raise DatasetError(f"{path}: contains no records; expected {_expected_for(path)}")
    where0, first = records[0]
    if not isinstance(first, dict):
        raise DatasetError(f"{path}: {where0}: expected a JSON object with {EXPECTED_FORMATS}; "
                           f"got a {type(first).__name__}")
    fmt = detect_format(first)
    if fmt is None:
        raise DatasetError(f"{path}: {where0}: unrecognised record with keys {sorted(_lower_keys(first))}; "
                           f"expected {EXPECTED_FORMATS}")
    result = LoadResult(path=path, file_format=file_format, format=fmt, rows=[], raw_rows=len(records))
    for where, record in records:
        messages, reason = check_turns(fmt, record_to_turns(fmt, record, path, where))
        if reason == EMPTY_ASSISTANT and on_empty_assistant == "error":
            raise DatasetError(f"{path}: {where}: empty assistant turn; fill it in, remove the row, or "
                               f"register with on_empty_assistant='drop' to skip such rows")
        if reason:
            result.dropped[reason] += 1
        else:
            result.rows.append(messages)
    if not result.rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result.dropped.items()))
        raise DatasetError(f"{path}: no usable rows ({len(records)} read, all dropped: {reasons})")
    return result


def inspect_file(path: str | Path, n: int = 5, max_bytes: int | None = None) -> dict:
    """What a file holds, without registering it: format, rows, a preview, and errors (never raises
    for a bad file: the message is in `errors`)."""
    path = Path(path)
    info = {"path": str(path), "file_format": None, "format": None, "rows": 0, "dropped": {},
            "preview": [], "errors": []}
    try:
        res = load_file(path, max_bytes=max_bytes)
    except DatasetError as exc:
        info["errors"].append(str(exc))
        return info
    info.update(file_format=res.file_format, format=res.format, rows=len(res.rows),
                dropped=dict(res.dropped), preview=res.rows[:n])
    return info
