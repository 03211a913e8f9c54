"""The SQLite catalog of an adapter registry: versions, aliases and their history, metrics, remotes.

WAL mode so readers never block; every write is a short `BEGIN IMMEDIATE` transaction, which
is what serialises version numbering across processes. A version row is inserted last, after
its blobs and manifest are on disk, so a row's existence means the version is complete.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from studio.errors import RegistryError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name        TEXT PRIMARY KEY,
    last_number INTEGER NOT NULL DEFAULT 0       -- numbers are never reused, even after rm
);
CREATE TABLE IF NOT EXISTS versions (
    domain       TEXT NOT NULL REFERENCES domains(name),
    number       INTEGER NOT NULL,
    sha          TEXT NOT NULL,                  -- sha256 of the manifest blob
    files_digest TEXT NOT NULL,                  -- sha256 over (path, sha256) of every file: dedupe key
    created      TEXT NOT NULL,
    registered   TEXT NOT NULL,                  -- when it entered *this* catalog
    origin       TEXT NOT NULL,                  -- 'register' or 'pull:<remote>'
    manifest     TEXT NOT NULL,                  -- same bytes as the manifest blob, for fast listing
    PRIMARY KEY (domain, number)
);
CREATE INDEX IF NOT EXISTS versions_sha ON versions(sha);
CREATE TABLE IF NOT EXISTS aliases (
    domain  TEXT NOT NULL,
    alias   TEXT NOT NULL,
    number  INTEGER NOT NULL,
    updated TEXT NOT NULL,
    PRIMARY KEY (domain, alias)
);
CREATE TABLE IF NOT EXISTS alias_events (      -- append-only: promote, rollback, pull, remove
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    domain   TEXT NOT NULL,
    alias    TEXT NOT NULL,
    action   TEXT NOT NULL,
    number   INTEGER,
    previous INTEGER,
    at       TEXT NOT NULL,
    note     TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS metrics (           -- eval results appended after registration
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    domain  TEXT NOT NULL,
    number  INTEGER NOT NULL,
    sha     TEXT NOT NULL,
    source  TEXT NOT NULL,
    at      TEXT NOT NULL,
    metrics TEXT NOT NULL,
    digest  TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS remotes (
    name    TEXT PRIMARY KEY,
    url     TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    added   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS removed (           -- tombstones: sync does not pull these back
    domain TEXT NOT NULL,
    number INTEGER NOT NULL,
    sha    TEXT NOT NULL,
    at     TEXT NOT NULL,
    PRIMARY KEY (domain, number)
);
CREATE TABLE IF NOT EXISTS remote_aliases (    -- last alias generation seen on each remote
    remote     TEXT NOT NULL,
    domain     TEXT NOT NULL,
    alias      TEXT NOT NULL,
    generation INTEGER NOT NULL,
    number     INTEGER,
    PRIMARY KEY (remote, domain, alias)
);
"""


def utcnow() -> str:
    """Timestamps in the catalog and manifests: ISO 8601, UTC, microseconds (sortable as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _retry_locked(fn, what: str):
    """Some pragmas (journal_mode) return SQLITE_BUSY without honouring busy_timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"the registry catalog stayed locked for {BUSY_TIMEOUT_S:.0f}s while {what}; "
                    "another process holds it: retry when it finishes"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _writable(path: Path) -> bool:
    """SQLite needs to write the catalog and create its -wal/-shm/-journal files next to it."""
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A catalog on read-only storage (a mounted snapshot, a shared read-only share): reads work, writes raise
    `readonly` errors that `transaction` turns into a RegistryError. `immutable=1`: no lock or -shm file is needed
    (a writer cannot exist where nothing is writable)."""
    if not path.is_file():
        raise RegistryError(f"the registry root {path.parent} is read-only and holds no catalog; point --root at a "
                            "registry, or at a writable directory for a new one")
    uri = f"{path.absolute().as_uri()}?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot read the registry catalog {path} ({exc}); check the --root directory") from exc
    if version > SCHEMA_VERSION:
        raise RegistryError(f"the catalog {path} was written by a newer studio; upgrade moe-lora-studio to read it")
    if version < SCHEMA_VERSION:
        raise RegistryError(f"the catalog {path} is read-only and was never initialised; open it once where it is "
                            "writable")
    return conn


def connect(path: Path) -> sqlite3.Connection:
    if not _writable(path):
        return connect_read_only(path)
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot open the registry catalog {path}: {exc}; check the --root directory") from exc
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    # WAL lets readers run during writes; where a filesystem cannot do WAL sqlite keeps its default
    _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone(), "enabling WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
        with transaction(conn):
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    elif conn.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
        raise RegistryError(f"the catalog {path} was written by a newer studio; upgrade moe-lora-studio to read it")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection):
    """`BEGIN IMMEDIATE` takes the write lock up front, so read-then-write sequences are atomic."""
    try:
        _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"), "starting a write")
    except sqlite3.OperationalError as exc:
        raise _write_error(exc) from None
    try:
        yield conn
    except sqlite3.OperationalError as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise _write_error(exc) from None
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    else:
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _write_error(exc) from None


def _write_error(exc: sqlite3.OperationalError) -> Exception:
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        return RegistryError("the registry is read-only here (its directory or catalog cannot be written): reading "
                             "works, changes need a writable --root; nothing was changed")
    if "full" in text:
        return RegistryError("the disk holding the registry is full: free some space and retry; nothing was changed")
    return RegistryError(f"the registry catalog could not be written ({text}); nothing was changed")
