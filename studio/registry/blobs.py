"""Content-addressed blob store: `blobs/sha256/ab/<sha256>`, written temp -> fsync -> verify -> rename.

A blob path exists only once its bytes are complete and hash-checked, so a crash at any
point leaves at most an orphaned temp file (removed by `gc`), never a wrong blob.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import uuid
from pathlib import Path

from studio.errors import RegistryError

CHUNK = 1 << 20
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH

try:  # POSIX advisory locks; without them (Windows) gc simply must not run during writes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


def sha256_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_error(exc: OSError, root: Path, what: str) -> RegistryError:
    """An OSError while writing a registry, as a RegistryError that says what to do (no traceback)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RegistryError(f"{what}: no space left on the device holding {root}; free some space and retry "
                             "(nothing was registered: the catalog is unchanged)")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return RegistryError(f"{what}: the registry at {root} is not writable ({exc.strerror}); reading works, "
                             "changes need a writable --root")
    return RegistryError(f"{what}: {exc.strerror or exc} ({exc.filename or root}); nothing was changed")


def tmp_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def make_writable_tree(path: Path) -> None:
    """Checkouts and blobs are read-only; restore write permission on directories before deleting."""
    for dirpath, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)


def remove_tree(path: Path) -> None:
    if path.exists():
        make_writable_tree(path)
        shutil.rmtree(path, ignore_errors=True)


class RegistryLock:
    """Shared lock for writers (register, pull, path, push), exclusive for gc.

    gc deletes blobs no catalog row references; a register in flight has written blobs but
    not yet its row, so gc must wait for it. flock locks die with their process (SIGKILL too).
    """

    def __init__(self, root: Path):
        self.path = root / ".lock"

    @contextlib.contextmanager
    def _hold(self, mode: int):
        if fcntl is None:  # pragma: no cover
            yield
            return
        try:
            f = open(self.path, "a+b")
        except OSError as exc:  # a read-only root: every writer stops here, before touching anything
            raise disk_error(exc, self.path.parent, "locking the registry") from None
        with f:
            fcntl.flock(f.fileno(), mode)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def shared(self):
        return self._hold(fcntl.LOCK_SH if fcntl else 0)

    def exclusive(self):
        return self._hold(fcntl.LOCK_EX if fcntl else 0)


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "blobs" / "sha256"
        self.tmp = root / "tmp"

    def path(self, sha: str) -> Path:
        return self.dir / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def verify(self, sha: str, size: int | None = None) -> str | None:
        """None when the blob is present and hashes to its name, else a description of the problem."""
        p = self.path(sha)
        if not p.is_file():
            return "missing"
        actual, actual_size = sha256_file(p)
        if actual != sha:
            return f"content hashes to {actual[:12]}..., not {sha[:12]}..."
        if size is not None and actual_size != size:
            return f"size {actual_size} != {size}"
        return None

    def _install(self, tmp: Path, sha: str) -> Path:
        """Move a complete, fsynced, verified temp file to its content address."""
        final = self.path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, READ_ONLY)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return final

    def _new_tmp(self, prefix: str) -> Path:
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / tmp_name(prefix)

    def put_file(self, src: Path) -> tuple[str, int]:
        """Store a copy of `src`; returns (sha256, size). Reuses an existing blob after checking it."""
        sha, size = sha256_file(src)
        if self.has(sha) and self.verify(sha, size) is None:
            return sha, size
        tmp = self._new_tmp("blob")
        try:
            h = hashlib.sha256()
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            if h.hexdigest() != sha:
                raise RegistryError(f"{src} changed while it was being registered; "
                                    "wait for the writer to finish and retry")
            self.adopt(tmp, sha)
        finally:
            tmp.unlink(missing_ok=True)
        return sha, size

    def put_bytes(self, data: bytes) -> str:
        sha = sha256_bytes(data)
        if self.has(sha) and self.verify(sha, len(data)) is None:
            return sha
        tmp = self._new_tmp("blob")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.adopt(tmp, sha)
        finally:
            tmp.unlink(missing_ok=True)
        return sha

    def adopt(self, tmp: Path, sha: str) -> Path:
        """Re-read a fsynced temp file, check it hashes to `sha`, then move it into place."""
        actual, _ = sha256_file(tmp)
        if actual != sha:
            raise RegistryError(
                f"blob {sha[:12]}... did not verify after writing (got {actual[:12]}...): the disk under "
                f"{self.root} may be failing; run `studio registry verify`"
            )
        return self._install(tmp, sha)

    def install_verified(self, path: Path, sha: str) -> Path:
        """Move a file whose hash the caller has just checked (pull staging) into place."""
        return self._install(path, sha)

    def read_bytes(self, sha: str) -> bytes:
        p = self.path(sha)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise RegistryError(
                f"blob {sha[:12]}... is missing from {self.dir}; run `studio registry verify` and re-pull the version"
            ) from None
        if sha256_bytes(data) != sha:
            raise RegistryError(
                f"blob {sha[:12]}... under {self.dir} is corrupt; run `studio registry verify` and re-pull the version"
            )
        return data

    def all_shas(self):
        if not self.dir.is_dir():
            return
        for sub in sorted(self.dir.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    if f.is_file() and len(f.name) == 64:
                        yield f.name
