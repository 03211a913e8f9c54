"""The datasets registry: versioned, normalised, split datasets under `studio.paths.datasets_root()`.

A version is the sha256 of the normalised rows and the split settings, numbered per name
(`law@v1`, `law@v2`). Layout of the root: `catalog.sqlite` (names, numbers, hashes) and
`store/<hash>/{train.jsonl,eval.jsonl,meta.json}` (content-addressed, shared between names).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import tempfile
import uuid
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio import paths
from studio.data import formats
from studio.data.formats import Messages
from studio.errors import DatasetError

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_NAME_LEN = 100
MIN_HASH_PREFIX = 6
MAX_VERSION = 2**63 - 1  # SQLite's INTEGER range
STATS_CHUNK_CHARS = 32768  # token statistics tokenize a long row in windows of this size (bounded memory)
# A message longer than this gets an estimated token count: tokenizers run at ~1 MB/s on a small CPU, so counting
# a 50 MB row exactly would take a minute; STATS_SAMPLE_WINDOWS evenly spaced windows give the tokens per character.
STATS_EXACT_CHARS = 1 << 20
STATS_SAMPLE_WINDOWS = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name       TEXT NOT NULL,
    number     INTEGER NOT NULL,
    hash       TEXT NOT NULL,
    format     TEXT NOT NULL,
    created    TEXT NOT NULL,
    rows_train INTEGER NOT NULL,
    rows_eval  INTEGER NOT NULL,
    dropped    TEXT NOT NULL,
    source     TEXT NOT NULL,
    split      TEXT NOT NULL,
    PRIMARY KEY (name, number),
    UNIQUE (name, hash)
);
-- the next number per name: numbers are never reused, even after `remove`
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    next INTEGER NOT NULL
);
"""
_COLUMNS = "name, number, hash, format, created, rows_train, rows_eval, dropped, source, split"


@dataclass
class DatasetVersion:
    """One registered version of a dataset; its rows are read from the store on demand."""

    name: str
    number: int
    hash: str
    ref: str
    format: str
    created: str
    rows_train: int
    rows_eval: int
    dropped: dict = field(default_factory=dict)
    source: str = ""
    split: dict = field(default_factory=dict)
    path: Path | None = field(default=None, repr=False)

    def _read(self, split: str, limit: int | None = None) -> list[Messages]:
        if split not in ("train", "eval"):
            raise DatasetError(f"split must be 'train' or 'eval', got {split!r}")
        if self.path is None:
            raise DatasetError(f"{self.ref}: no stored data path")
        file = self.path / f"{split}.jsonl"
        if not file.is_file():
            raise DatasetError(f"{self.ref}: stored data is missing ({file}); remove and re-register it")
        rows = []
        with open(file, encoding="utf-8") as f:
            for line in f:
                if limit is not None and len(rows) >= limit:
                    break
                if line.strip():
                    rows.append(json.loads(line)["messages"])
        return rows

    def iter_rows(self, split: str = "train"):
        """The rows of a split, one at a time (statistics over big datasets without holding them)."""
        if split not in ("train", "eval"):
            raise DatasetError(f"split must be 'train' or 'eval', got {split!r}")
        file = (self.path or Path(".")) / f"{split}.jsonl"
        if self.path is None or not file.is_file():
            raise DatasetError(f"{self.ref}: stored data is missing ({file}); remove and re-register it")
        with open(file, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)["messages"]

    def head(self, n: int = 5, split: str = "train") -> list[Messages]:
        """The first `n` rows of a split, read without loading the rest."""
        return self._read(split, limit=max(0, int(n)))

    def train_messages(self) -> list[Messages]:
        return self._read("train")

    def eval_messages(self) -> list[Messages]:
        return self._read("eval")

    def load_split(self, split: str = "train"):
        """The split as a `datasets.Dataset` with one `messages` column (TRL's conversational format)."""
        import datasets

        features = datasets.Features({"messages": datasets.List(
            {"role": datasets.Value("string"), "content": datasets.Value("string")})})
        rows = self._read(split)
        return datasets.Dataset.from_dict({"messages": rows}, features=features)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path) if self.path else None
        return d


# -----------------------------------------------------------------------------
# pure helpers


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise DatasetError("a dataset name is required")
    if "/" in name or "\\" in name or ".." in name or len(name) > MAX_NAME_LEN or not NAME_RE.fullmatch(name):
        raise DatasetError(
            f"invalid dataset name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter "
            f"or digit, at most {MAX_NAME_LEN} characters, with no path separators and no '..'")
    return name


def sanitise_name(stem: str) -> str:
    """A valid dataset name made from a file stem (`My Data (v2)` -> `My-Data-v2`)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)
    name = re.sub(r"\.{2,}", ".", name).strip("-._")[:MAX_NAME_LEN]
    return name or "dataset"


def _canonical(row: Messages) -> str:
    return json.dumps({"messages": row}, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def split_rows(rows: list[Messages], eval_ratio: float, seed: int) -> tuple[list[Messages], list[Messages]]:
    """Deterministic split: each row is ranked by sha256(seed, index, content) and the lowest
    round(n * eval_ratio) go to eval. Both splits keep the file's order; stable across Python versions."""
    if not 0 <= eval_ratio < 1:
        raise DatasetError(f"eval_ratio must be in [0, 1), got {eval_ratio}")
    n = len(rows)
    n_eval = 0 if eval_ratio == 0 or n < 2 else min(n - 1, max(1, round(n * eval_ratio)))

    def score(i: int) -> str:
        return hashlib.sha256(f"{seed}\0{i}\0{_canonical(rows[i])}".encode()).hexdigest()

    eval_idx = set(sorted(range(n), key=score)[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in eval_idx], [r for i, r in enumerate(rows) if i in eval_idx])


def content_hash(train: list[Messages], eval_: list[Messages], split: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"schema": SCHEMA_VERSION, "split": split}, sort_keys=True).encode())
    for tag, rows in ((b"\ntrain\n", train), (b"\neval\n", eval_)):
        h.update(tag)
        for row in rows:
            h.update(_canonical(row).encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


def _jsonl_bytes(rows: list[Messages]) -> bytes:
    return "".join(_canonical(r) + "\n" for r in rows).encode("utf-8")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -----------------------------------------------------------------------------
# the registry


class DatasetRegistry:
    """Catalog + store of dataset versions. `root` defaults to `studio.paths.datasets_root()`;
    `max_bytes` limits each input file (default: env STUDIO_DATASET_MAX_BYTES or 256 MiB)."""

    def __init__(self, root: str | Path | None = None, max_bytes: int | None = None,
                 max_record_bytes: int | None = None, allow_system_files: bool = False):
        self.root = Path(root) if root is not None else paths.datasets_root()
        self.max_bytes = formats.max_bytes_from_env() if max_bytes is None else int(max_bytes)
        if self.max_bytes <= 0:
            raise DatasetError(f"max_bytes must be positive, got {max_bytes}")
        self.max_record_bytes = (formats.max_record_bytes_from_env() if max_record_bytes is None
                                 else int(max_record_bytes))
        if self.max_record_bytes <= 0:
            raise DatasetError(f"max_record_bytes must be positive, got {max_record_bytes}")
        self.allow_system_files = allow_system_files
        self.catalog_path = self.root / "catalog.sqlite"
        self.store = self.root / "store"
        self._tmp = self.root / ".tmp"

    def __repr__(self) -> str:
        return f"DatasetRegistry(root={str(self.root)!r})"

    # -- catalog plumbing

    def _connect(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.catalog_path, timeout=60, isolation_level=None)
        con.execute("PRAGMA busy_timeout = 60000")
        con.executescript(_SCHEMA)
        return con

    def _row_to_version(self, row) -> DatasetVersion:
        name, number, hash_, fmt, created, rows_train, rows_eval, dropped, source, split = row
        return DatasetVersion(name=name, number=number, hash=hash_, ref=f"{name}@v{number}", format=fmt,
                              created=created, rows_train=rows_train, rows_eval=rows_eval,
                              dropped=json.loads(dropped), source=source, split=json.loads(split),
                              path=self.store / hash_)

    def _query(self, sql: str, args=()) -> list[DatasetVersion]:
        if not self.catalog_path.exists():
            return []
        con = self._connect()
        try:
            return [self._row_to_version(r) for r in con.execute(sql, args).fetchall()]
        finally:
            con.close()

    # -- registration

    def add(self, path: str | Path, name: str, eval_path: str | Path | None = None, eval_ratio: float = 0.1,
            seed: int = 0, on_empty_assistant: str = "drop") -> DatasetVersion:
        """Register `path` under `name`. Identical content (and split settings) returns the existing
        version; anything else becomes the next number. Atomic: on failure nothing changes."""
        validate_name(name)
        path = Path(path)
        limits = dict(max_record_bytes=self.max_record_bytes, allow_system_files=self.allow_system_files)
        train_res = formats.load_file(path, self.max_bytes, on_empty_assistant, **limits)
        dropped = Counter(train_res.dropped)
        if eval_path is not None:
            eval_res = formats.load_file(Path(eval_path), self.max_bytes, on_empty_assistant, **limits)
            dropped.update(eval_res.dropped)
            train, eval_ = train_res.rows, eval_res.rows
            split = {"mode": "file"}
            # held-out rows also in the training data measure memorisation, not generalisation: warn and record it
            seen = {_canonical(r) for r in train}
            overlap = sum(_canonical(r) in seen for r in eval_)
            split_info = {**split, "eval_source": str(Path(eval_path).resolve()), "eval_overlap": overlap}
            if overlap:
                warnings.warn(f"{overlap} of {len(eval_)} eval rows ({overlap / len(eval_):.0%}) also appear in the "
                              f"training file{' (the same file)' if _same_file(path, Path(eval_path)) else ''}: "
                              "held-out loss on them measures memorisation; use a disjoint --eval-file or "
                              "--eval-ratio", EvalOverlapWarning, stacklevel=2)
        else:
            try:
                eval_ratio, seed = float(eval_ratio), int(seed)
            except (TypeError, ValueError):
                raise DatasetError(f"eval_ratio must be a number and seed an integer, got "
                                   f"{eval_ratio!r} and {seed!r}") from None
            train, eval_ = split_rows(train_res.rows, eval_ratio, seed)
            split = {"mode": "ratio", "eval_ratio": eval_ratio, "seed": seed}
            split_info = split
        digest = content_hash(train, eval_, split)
        meta = {
            "schema": SCHEMA_VERSION, "hash": digest, "format": train_res.format,
            "file_format": train_res.file_format, "source": str(path.resolve()), "split": split_info,
            "rows": {"train": len(train), "eval": len(eval_)}, "dropped": dict(sorted(dropped.items())),
        }
        return self._commit(name, digest, train, eval_, meta)

    def _materialise(self, digest: str, train, eval_, meta) -> bool:
        """Ensure store/<digest> holds the data; True if this call created it. meta.json is written
        last, so its presence means the folder is complete."""
        final = self.store / digest
        if (final / "meta.json").is_file():
            return False
        if final.exists():  # a leftover without meta.json: incomplete, replace it
            shutil.rmtree(final)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{digest[:12]}-", dir=self._tmp))
        try:
            _write_synced(tmp / "train.jsonl", _jsonl_bytes(train))
            _write_synced(tmp / "eval.jsonl", _jsonl_bytes(eval_))
            _write_synced(tmp / "meta.json", (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.store)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True

    def _commit(self, name: str, digest: str, train, eval_, meta) -> DatasetVersion:
        con = self._connect()
        created_dir = False
        try:
            # the write lock is held from here to COMMIT: concurrent adds of the same name queue up
            # and each sees the numbers the others committed, so no version is lost or duplicated
            con.execute("BEGIN IMMEDIATE")
            row = con.execute(f"SELECT {_COLUMNS} FROM versions WHERE name = ? AND hash = ?",
                              (name, digest)).fetchone()
            if row is not None:
                con.execute("COMMIT")
                version = self._row_to_version(row)
                self._materialise(digest, train, eval_, meta)  # repair a store folder deleted by hand
                return version
            created_dir = self._materialise(digest, train, eval_, meta)
            counter = con.execute("SELECT next FROM counters WHERE name = ?", (name,)).fetchone()
            latest = con.execute("SELECT MAX(number) FROM versions WHERE name = ?", (name,)).fetchone()[0]
            number = max(counter[0] if counter else 1, (latest or 0) + 1)
            values = (name, number, digest, meta["format"], _now(), meta["rows"]["train"], meta["rows"]["eval"],
                      json.dumps(meta["dropped"], sort_keys=True), meta["source"],
                      json.dumps(meta["split"], sort_keys=True))
            con.execute(f"INSERT INTO versions ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
            con.execute("INSERT INTO counters (name, next) VALUES (?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET next = excluded.next", (name, number + 1))
            con.execute("COMMIT")
            return self._row_to_version(values)
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            if created_dir:
                still_used = con.execute("SELECT 1 FROM versions WHERE hash = ? LIMIT 1", (digest,)).fetchone()
                if not still_used:
                    shutil.rmtree(self.store / digest, ignore_errors=True)
            raise
        finally:
            con.close()

    # -- shipped samples

    def shipped_samples(self) -> list[dict]:
        """Manifest entries of the sample datasets that ship with the studio (law, medicine, code)."""
        return paths.shipped_samples()

    def _register_sample(self, name: str) -> bool:
        for sample in self.shipped_samples():
            if sample["name"] == name:
                base = paths.shipped_datasets_dir()
                self.add(base / sample["train_file"], name, eval_path=base / sample["eval_file"])
                return True
        return False

    # -- lookup

    def _lookup(self, ref: str) -> list[DatasetVersion]:
        if not isinstance(ref, str) or not ref:
            raise DatasetError("a dataset reference is required, e.g. `law`, `law@v2` or `law@<hash>`")
        name, at, selector = ref.partition("@")
        validate_name(name)
        if at and not selector:
            raise DatasetError(f"invalid reference {ref!r}: nothing after '@'; use `{name}` for the latest version, "
                               f"`{name}@vN` or `{name}@<hash prefix>`")
        if not selector:
            return self._query(f"SELECT {_COLUMNS} FROM versions WHERE name = ? ORDER BY number DESC LIMIT 1",
                               (name,))
        m = re.fullmatch(r"v(\d+)", selector)
        if m:
            if len(m.group(1)) > 19 or int(m.group(1)) > MAX_VERSION:  # no such number can exist (nor bind)
                return []
            return self._query(f"SELECT {_COLUMNS} FROM versions WHERE name = ? AND number = ?",
                               (name, int(m.group(1))))
        if re.fullmatch(r"[0-9a-fA-F]+", selector) and len(selector) >= MIN_HASH_PREFIX:
            return self._query(f"SELECT {_COLUMNS} FROM versions WHERE name = ? AND hash LIKE ? ORDER BY number",
                               (name, selector.lower() + "%"))
        raise DatasetError(f"invalid reference {ref!r}: use `NAME` (latest), `NAME@vN` or `NAME@<hash prefix>` "
                           f"with at least {MIN_HASH_PREFIX} hex characters")

    def get(self, ref: str) -> DatasetVersion:
        """Resolve `law`, `law@v2` or `law@<hash prefix>`. A shipped sample name missing from the
        catalog is registered first (with its explicit eval file)."""
        found = self._lookup(ref)
        name = ref.partition("@")[0]
        if not found and not self.versions(name) and self._register_sample(name):
            found = self._lookup(ref)
        if len(found) > 1:
            refs = ", ".join(v.ref for v in found)
            raise DatasetError(f"reference {ref!r} is ambiguous ({refs}); give more hash characters or `@vN`")
        if not found:
            known = ", ".join(f"v{v.number}" for v in self.versions(name))
            hint = f" (known versions: {known})" if known else \
                "; register it with `studio datasets add FILE --name NAME`"
            raise DatasetError(f"no dataset {ref!r}{hint}")
        return found[0]

    def list(self) -> list[DatasetVersion]:
        """Every registered version, by name then number (shipped samples appear once referenced)."""
        return self._query(f"SELECT {_COLUMNS} FROM versions ORDER BY name, number")

    def versions(self, name: str) -> list[DatasetVersion]:
        validate_name(name)
        return self._query(f"SELECT {_COLUMNS} FROM versions WHERE name = ? ORDER BY number", (name,))

    def remove(self, ref: str, force: bool = False, adapters=None) -> list[DatasetVersion]:
        """Remove `law@v2` / `law@<hash>` (one version) or `law` (every version of the name).
        Stored data no other version uses is deleted. Returns what was removed. A version named in a registered
        adapter's lineage is kept unless `force` (`adapters`: the AdapterRegistry to check, default the local one)."""
        if not isinstance(ref, str) or not ref:
            raise DatasetError("a dataset reference is required, e.g. `law`, `law@v2` or `law@<hash>`")
        name, at, selector = ref.partition("@")
        if at and not selector:
            raise DatasetError(f"invalid reference {ref!r}: nothing after '@'; `{name}` removes every version")
        targets = self.versions(name) if not selector else self._lookup(ref)
        if not targets:
            raise DatasetError(f"no dataset {ref!r} to remove")
        if len(targets) > 1 and selector:
            raise DatasetError(f"reference {ref!r} is ambiguous ({', '.join(v.ref for v in targets)})")
        if not force:
            used = adapters_using(targets, adapters)
            if used:
                listing = "; ".join(f"{d} <- {', '.join(a[:5])}{' ...' if len(a) > 5 else ''}"
                                    for d, a in sorted(used.items()))
                raise DatasetError(f"not removed: adapters were trained on it ({listing}); their lineage would "
                                   f"name data that no longer exists. Remove those adapter versions first, or pass "
                                   f"--force (force=True) to remove it anyway")
        con = self._connect()
        trash: list[tuple[Path, Path]] = []
        try:
            con.execute("BEGIN IMMEDIATE")
            for v in targets:
                con.execute("DELETE FROM versions WHERE name = ? AND number = ?", (v.name, v.number))
            for digest in sorted({v.hash for v in targets}):
                if con.execute("SELECT 1 FROM versions WHERE hash = ? LIMIT 1", (digest,)).fetchone():
                    continue
                src = self.store / digest
                if src.exists():
                    # moved aside under the lock, deleted after COMMIT, moved back if COMMIT fails
                    self._tmp.mkdir(parents=True, exist_ok=True)
                    dst = self._tmp / f"trash-{digest[:12]}-{uuid.uuid4().hex[:8]}"
                    os.rename(src, dst)
                    trash.append((src, dst))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            for src, dst in trash:
                os.rename(dst, src)
            raise
        finally:
            con.close()
        for _, dst in trash:
            shutil.rmtree(dst, ignore_errors=True)
        return targets

    def verify(self) -> list[str]:
        """Problems found (empty: healthy): SQLite's integrity check, and every version's stored rows re-hashed
        against its content hash."""
        if not self.catalog_path.exists():
            return []
        con = self._connect()
        try:
            problems = [f"catalog: {r[0]}" for r in con.execute("PRAGMA integrity_check") if r[0] != "ok"]
        finally:
            con.close()
        for v in self.list():
            try:
                split = {k: val for k, val in v.split.items() if k not in ("eval_source", "eval_overlap")}
                digest = content_hash(v._read("train"), v._read("eval"), split)
            except (DatasetError, OSError, ValueError, KeyError) as exc:
                problems.append(f"{v.ref}: stored data unreadable ({exc})")
                continue
            if digest != v.hash:
                problems.append(f"{v.ref}: stored rows hash to {digest[:12]}, not {v.hash[:12]}")
        return problems

    # -- reading

    def preview(self, ref: str, n: int = 5, max_chars: int | None = formats.PREVIEW_CHARS) -> list[Messages]:
        """The first `n` training rows of a version, as message lists, each message cut to `max_chars`
        (None: whole)."""
        rows = self.get(ref).head(n)
        return rows if max_chars is None else [formats.truncate_row(r, max_chars) for r in rows]

    def stats(self, ref: str, tokenizer=None) -> dict:
        """Rows, tokens per example (min/median/max/total per split, chat template applied) and
        dropped rows by reason. `tokenizer`: any HF tokenizer; default the studio's tiny-moe one.
        Rows are streamed from the store one at a time and long rows tokenized in windows, so memory stays
        bounded by the longest row, not by the tokenizer's per-token bookkeeping of it."""
        version = self.get(ref)
        if tokenizer is None:
            from studio.models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        tokens = {}
        estimated = 0
        for split in ("train", "eval"):
            counts = []
            for r in version.iter_rows(split):
                counts.append(row_tokens(r, tokenizer))
                estimated += any(len(m["content"]) > STATS_EXACT_CHARS for m in r)
            tokens[split] = ({"min": min(counts), "median": statistics.median(counts), "max": max(counts),
                              "total": sum(counts)} if counts else
                             {"min": 0, "median": 0, "max": 0, "total": 0})
        return {
            "ref": version.ref, "hash": version.hash, "format": version.format,
            "rows": {"train": version.rows_train, "eval": version.rows_eval},
            "dropped": dict(version.dropped), "dropped_total": sum(version.dropped.values()),
            "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
            "tokens": tokens, "estimated_rows": estimated,
        }


def token_counts(rows: list[Messages], tokenizer) -> list[int]:
    """Tokens per row: the chat template rendered when the tokenizer has one, else `role: content` lines."""
    return [row_tokens(r, tokenizer) for r in rows]


def row_tokens(row: Messages, tokenizer) -> int:
    """Tokens of one row as the trainer encodes it (control tokens in content count as text). A row longer than
    STATS_CHUNK_CHARS is counted window by window, cut at whitespace, so a 50 MB row costs megabytes, not
    gigabytes (a window edge can shift a token or two); a message over STATS_EXACT_CHARS is estimated from
    STATS_SAMPLE_WINDOWS sampled windows."""
    from studio.data.chat import encode_chat

    if not getattr(tokenizer, "chat_template", None):
        return _windowed_count("\n".join(f"{m['role']}: {m['content']}" for m in row), tokenizer)
    if sum(len(m["content"]) for m in row) <= STATS_CHUNK_CHARS:
        return len(encode_chat(tokenizer, row).input_ids)
    # the template's own tokens (the chat with empty contents) plus each content window by window, every window
    # encoded by the same chat encoder as a one-message chat minus that chat's own template tokens
    skeleton = len(encode_chat(tokenizer, [{**m, "content": ""} for m in row]).input_ids)
    total = skeleton
    for m in row:
        empty = len(encode_chat(tokenizer, [{"role": m["role"], "content": ""}]).input_ids)
        windows = list(_windows(m["content"]))
        if len(m["content"]) > STATS_EXACT_CHARS:  # sample evenly spaced windows, scale by characters
            step = len(windows) / STATS_SAMPLE_WINDOWS
            windows = [windows[int(i * step)] for i in range(STATS_SAMPLE_WINDOWS)]
        tokens = sum(len(encode_chat(tokenizer, [{"role": m["role"], "content": w}]).input_ids) - empty
                     for w in windows)
        chars = sum(map(len, windows))
        total += tokens if chars == len(m["content"]) else round(tokens * len(m["content"]) / max(chars, 1))
    return total


def _windows(text: str):
    """`text` in pieces of at most STATS_CHUNK_CHARS, cut at whitespace where there is some."""
    start = 0
    while start < len(text):
        end = min(start + STATS_CHUNK_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start + STATS_CHUNK_CHARS // 2, end), text.rfind("\n", start, end))
            end = cut if cut > start else end
        yield text[start:end]
        start = end


def _windowed_count(text: str, tokenizer) -> int:
    return sum(len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in _windows(text))


class EvalOverlapWarning(UserWarning):
    """An explicit eval file shares rows with the training file."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def adapters_using(versions: list[DatasetVersion], adapters=None) -> dict[str, list[str]]:
    """{dataset ref: [adapter refs]} for the adapters whose recorded lineage names one of `versions` (by hash, or
    by name@version when no hash was recorded)."""
    from studio.registry import AdapterRegistry
    from studio.errors import RegistryError

    try:
        reg = adapters if adapters is not None else AdapterRegistry()
        listed = reg.list()
    except RegistryError:  # no readable adapter registry: nothing can depend on the data
        return {}
    by_hash = {v.hash: v.ref for v in versions}
    by_ref = {v.ref: v.ref for v in versions}
    used: dict[str, list[str]] = {}
    for a in listed:
        ds = (a.metadata or {}).get("dataset") or {}
        if not isinstance(ds, dict):
            continue
        hit = by_hash.get(ds.get("hash")) or by_ref.get(ds.get("ref"))
        if hit:
            used.setdefault(hit, []).append(a.ref)
    return used


def resolve_dataset(ref_or_path: str | Path, registry: DatasetRegistry | None = None) -> DatasetVersion:
    """A registry reference (`law`, `law@v2`, `law@<hash>`), or an existing file, which is
    registered under its sanitised file stem."""
    registry = registry or DatasetRegistry()
    text = str(ref_or_path)
    if isinstance(ref_or_path, Path) or ("@" not in text and Path(text).is_file()):
        path = Path(ref_or_path)
        if not path.is_file():
            raise DatasetError(f"{path}: no such file")
        return registry.add(path, sanitise_name(path.stem))
    looks_like_path = "/" in text or "\\" in text or Path(text).suffix.lower() in formats.FILE_FORMATS
    if looks_like_path and "@" not in text:
        try:
            return registry.get(text)
        except DatasetError:
            raise DatasetError(f"{text}: no such file, and no registered dataset of that name") from None
    return registry.get(text)
