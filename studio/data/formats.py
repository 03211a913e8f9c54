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
import math
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import DatasetError

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_BYTES_ENV = "STUDIO_DATASET_MAX_BYTES"
# One record (a JSONL line, a JSON list item, a CSV row, a text paragraph): a chat example is kilobytes; a record of
# megabytes is a mistake (a file pasted into one cell) that would cost gigabytes to tokenize and preview.
DEFAULT_MAX_RECORD_BYTES = 8 * 1024 * 1024
MAX_RECORD_BYTES_ENV = "STUDIO_DATASET_MAX_RECORD_BYTES"
# Files a dataset never comes from: reading them would leak system data into a catalog (a symlink to /etc/shadow).
SYSTEM_DIRS = ("/etc", "/proc", "/sys", "/dev", "/boot", "/root", "/run", "/var/run", "/var/log", "/var/lib")
PREVIEW_CHARS = 2000  # characters of a message shown in previews

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


def max_bytes_from_env(default: int = DEFAULT_MAX_BYTES, env: str = MAX_BYTES_ENV) -> int:
    raw = os.environ.get(env)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DatasetError(f"{env}={raw!r} is not an integer number of bytes") from None
    if value <= 0:
        raise DatasetError(f"{env} must be a positive number of bytes, got {value}")
    return value


def max_record_bytes_from_env() -> int:
    return max_bytes_from_env(DEFAULT_MAX_RECORD_BYTES, MAX_RECORD_BYTES_ENV)


def _check_source(path: Path, allow_system_files: bool) -> None:
    """Refuse device files, FIFOs and sockets always, and files under system directories (also through a symlink)
    unless `allow_system_files`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
        raise DatasetError(f"{path}: not a regular file ({kind}); give a dataset file")
    real = os.path.realpath(path)
    system = next((d for d in SYSTEM_DIRS if real == d or real.startswith(d + "/")), None)
    if system and not allow_system_files:
        via = f" (a link to {real})" if real != os.path.abspath(path) else ""
        raise DatasetError(f"{path}{via} is a system file under {system}, not a dataset; copy the data elsewhere, "
                           "or pass --allow-system-file (allow_system_files=True) if you really mean it")


def _check_size(path: Path, max_bytes: int, allow_system_files: bool = False) -> int:
    _check_source(path, allow_system_files)
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
    nul = data.find(b"\x00")  # anywhere: a NUL is never text, and stored data must not carry one
    if nul != -1:
        line = data.count(b"\n", 0, nul) + 1
        raise DatasetError(f"{path}: NUL byte at offset {nul} (line {line}): a binary file or a corrupt line, not "
                           f"UTF-8 text; remove it. Expected {_expected_for(path)}")
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


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (use null or a quoted string)")


def _loads(text: str, path: Path, where: str):
    """json.loads for untrusted input: NaN/Infinity, absurd nesting and 5000-digit numbers become DatasetErrors
    naming the place (json.JSONDecodeError passes through for the callers' line/column messages)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise DatasetError(f"{path}: {where}: JSON nested too deeply to be a dataset record; flatten it") from None
    except ValueError as exc:  # NaN/Infinity, or an integer over Python's digit limit
        raise DatasetError(f"{path}: {where}: unusable JSON value ({exc}); write it as a string") from None


def _check_record_size(path: Path, where: str, size: int, limit: int) -> None:
    if size > limit:
        raise DatasetError(f"{path}: {where}: the record is {size:,} bytes, over the per-record limit of {limit:,}; "
                           f"split it, or raise the limit with DatasetRegistry(max_record_bytes=...) or the "
                           f"{MAX_RECORD_BYTES_ENV} environment variable")


def _json_error(path: Path, exc: json.JSONDecodeError, line: int | None = None) -> DatasetError:
    where = f"line {line}, column {exc.colno}" if line is not None else f"line {exc.lineno}, column {exc.colno}"
    return DatasetError(f"{path}: {where}: invalid JSON ({exc.msg})")


def _read_jsonl(path: Path, text: str, max_record: int) -> list[tuple[str, object]]:
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        _check_record_size(path, f"line {i}", len(line), max_record)  # characters: a lower bound on bytes
        try:
            obj = _loads(line, path, f"line {i}")
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: line {i}, column {exc.colno}: invalid JSON ({exc.msg}); "
                               f"expected one JSON object per line") from None
        records.append((f"line {i}", obj))
    return records


def _read_json(path: Path, text: str, max_record: int) -> tuple[str, list[tuple[str, object]]]:
    try:
        obj = _loads(text, path, "the document")
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return "jsonl", _read_jsonl(path, text, max_record)  # JSON Lines saved with a .json name
        raise DatasetError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}); "
                           f"expected a JSON list of records") from None
    if isinstance(obj, dict):
        keys = ", ".join(list(obj)[:8])
        raise DatasetError(f"{path}: the JSON top level is an object (keys: {keys}), not a list of records; "
                           f"expected [{{...}}, {{...}}] where each record has " + EXPECTED_FORMATS)
    if not isinstance(obj, list):
        raise DatasetError(f"{path}: the JSON top level is a {type(obj).__name__}, not a list of records; "
                           f"expected [{{...}}, {{...}}] where each record has " + EXPECTED_FORMATS)
    if len(text) > max_record:  # only then can one record be over the limit: measure each
        for i, r in enumerate(obj, start=1):
            _check_record_size(path, f"record {i}", len(json.dumps(r, ensure_ascii=False)), max_record)
    return "json", [(f"record {i}", r) for i, r in enumerate(obj, start=1)]


def _read_csv(path: Path, text: str, max_record: int) -> list[tuple[str, object]]:
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
            _check_record_size(path, f"line {reader.line_num}", sum(map(len, row)), max_record)
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


def _read_text(path: Path, text: str, max_record: int) -> list[tuple[str, object]]:
    records = []
    line = 1
    for block in re.split(r"(\n[ \t\r\f\v]*\n)", text):
        if block.strip() and not re.fullmatch(r"\n[ \t\r\f\v]*\n", block):
            lead = len(block) - len(block.lstrip("\n"))
            _check_record_size(path, f"line {line + lead}", len(block), max_record)
            records.append((f"line {line + lead}", {"text": block}))
        line += block.count("\n")
    return records


def read_records(path: str | Path, max_bytes: int | None = None, max_record_bytes: int | None = None,
                 allow_system_files: bool = False) -> tuple[str, list[tuple[str, object]]]:
    """(file format, [(where, record)]) for a file; raises DatasetError naming file, line and fix."""
    path = Path(path)
    max_bytes = max_bytes_from_env() if max_bytes is None else max_bytes
    max_record = max_record_bytes_from_env() if max_record_bytes is None else max_record_bytes
    _check_size(path, max_bytes, allow_system_files)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror})") from None
    kind = _sniff_kind(path, data)
    if kind == "parquet":
        return kind, _read_parquet(path)
    text = _decode(path, data)
    del data
    if kind == "jsonl":
        return kind, _read_jsonl(path, text, max_record)
    if kind == "json":
        return _read_json(path, text, max_record)
    if kind == "csv":
        return kind, _read_csv(path, text, max_record)
    return "text", _read_text(path, text, max_record)


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
    if isinstance(value, float) and not math.isfinite(value):  # Parquet/CSV NaN: a missing value, not the text "nan"
        raise DatasetError(f"{path}: {where}: {what} is {value}, not text; fill it in or drop the row")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text").strip()
    raise DatasetError(f"{path}: {where}: {what} must be a string, got {type(value).__name__}")


def _turns(value, path: Path, where: str, key: str) -> list[tuple[str, str]]:
    """(raw role, content) pairs of a messages / conversations list; tolerant of either key pair."""
    if isinstance(value, str):
        try:
            value = _loads(value, path, where)  # CSV cells holding a JSON list
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


def load_file(path: str | Path, max_bytes: int | None = None, on_empty_assistant: str = "drop",
              max_record_bytes: int | None = None, allow_system_files: bool = False) -> LoadResult:
    """Read, detect and normalise a file. Raises DatasetError for unusable files or (with
    on_empty_assistant="error") the first row whose assistant turn is empty."""
    if on_empty_assistant not in ("drop", "error"):
        raise DatasetError(f"on_empty_assistant must be 'drop' or 'error', got {on_empty_assistant!r}")
    path = Path(path)
    file_format, records = read_records(path, max_bytes, max_record_bytes, allow_system_files)
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


def truncate_row(messages: Messages, max_chars: int = PREVIEW_CHARS) -> Messages:
    """A row for display: each message's content cut to `max_chars`, saying how much was left out."""
    out = []
    for m in messages:
        c = m["content"]
        if len(c) > max_chars:
            c = c[:max_chars] + f" ... [{len(c) - max_chars:,} more characters]"
        out.append({**m, "content": c})
    return out


def inspect_file(path: str | Path, n: int = 5, max_bytes: int | None = None, max_record_bytes: int | None = None,
                 allow_system_files: bool = False) -> dict:
    """What a file holds, without registering it: format, rows, a preview (messages cut to PREVIEW_CHARS), and
    errors (never raises for a bad file: the message is in `errors`)."""
    path = Path(path)
    info = {"path": str(path), "file_format": None, "format": None, "rows": 0, "dropped": {},
            "preview": [], "errors": []}
    try:
        res = load_file(path, max_bytes=max_bytes, max_record_bytes=max_record_bytes,
                        allow_system_files=allow_system_files)
    except DatasetError as exc:
        info["errors"].append(str(exc))
        return info
    info.update(file_format=res.file_format, format=res.format, rows=len(res.rows),
                dropped=dict(res.dropped), preview=[truncate_row(r) for r in res.rows[:n]])
    return info
