"""Remote stores for push/pull: any fsspec URL (file://, s3://, ...) plus hf:// (see hub.py).

Layout under an fsspec URL (everything immutable except the alias generation list):
    blobs/sha256/<sha256>                    file contents, content-addressed
    <domain>/versions/v<N>.json              the manifest, created only after its blobs exist
    <domain>/aliases/<alias>/<gen>.json      alias moves; the highest generation is current
    <domain>/metrics/v<N>/<digest>.json      eval results appended after registration
Manifests and alias generations are created with write-if-absent (`xb`: S3 `If-None-Match`,
a hard link locally), so a version number or alias generation can only be claimed once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path, PurePosixPath

from studio.errors import RegistryError
from studio.registry.blobs import CHUNK, fsync_dir
from studio.registry.manifest import canonical_json
from studio.registry.refs import DOMAIN_RE, check_alias

GEN_RE = re.compile(r"^([0-9]{1,12})\.json$")
VERSION_FILE_RE = re.compile(r"^v([0-9]{1,9})\.json$")


class RegistryConflict(RegistryError):
    """A remote changed under us: a version number or alias generation was claimed by someone else."""


def valid_alias(name: str) -> bool:
    """Names read from a remote are untrusted: keep only well-formed aliases."""
    try:
        check_alias(name)
    except RegistryError:
        return False
    return True


def normalise_url(url: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise RegistryError("empty remote URL: use file:///path, s3://bucket/prefix or hf://org")
    url = url.strip()
    if "://" not in url:  # a plain path: make it an absolute file:// URL
        return Path(url).expanduser().absolute().as_uri()
    protocol = url.split("://", 1)[0].lower()
    if protocol == "hf":
        return url.rstrip("/")
    import fsspec
    if protocol not in fsspec.available_protocols():
        raise RegistryError(f"unknown remote protocol {protocol!r} in {url!r}: use file://, s3:// or hf:// "
                            "(or another fsspec protocol whose package is installed)")
    stripped = url.rstrip("/")
    return stripped if not stripped.endswith(":") else url


def check_local_remote(url: str, create: bool) -> None:
    """A file:// remote's directory exists and is writable (or is created now when `create`)."""
    if not url.startswith("file://"):
        return
    from urllib.parse import unquote, urlparse

    path = Path(unquote(urlparse(url).path))
    if not path.exists():
        if not create:
            raise RegistryError(f"remote directory {path} does not exist; check the path, or create it with "
                                "`studio registry remote add ... --create` (create=True)")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the remote directory {path} ({exc.strerror}); pick a writable "
                                "location") from None
    if not path.is_dir():
        raise RegistryError(f"remote {url}: {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RegistryError(f"remote directory {path} is not writable by this user; pick a writable location or "
                            "fix its permissions")


def open_remote(name: str, url: str, options: dict):
    if url.startswith("hf://"):
        from studio.registry.hub import HubRemote
        return HubRemote(name, url, options)
    return FsspecRemote(name, url, options)


class RemoteStore:
    """What push/pull/sync need from a remote. Numbers are ints, shas hex sha256 strings."""

    name: str
    url: str

    def domains(self) -> list[str]: ...
    def versions(self, domain: str) -> list[int]: ...
    def read_manifest(self, domain: str, number: int) -> bytes | None: ...
    def upload_version(self, domain: str, number: int, manifest: bytes, files: list[dict], blob_path,
                       verify_existing: bool = False) -> str: ...
    def fetch_file(self, domain: str, number: int, entry: dict, dest: Path) -> None: ...
    def identity_problem(self, domain: str, number: int, manifest_sha: str) -> str | None: ...
    def alias_names(self, domain: str) -> list[str]: ...
    def alias_head(self, domain: str, alias: str) -> dict | None: ...
    def write_alias(self, domain: str, alias: str, record: dict, expected_generation: int) -> int: ...
    def metrics(self, domain: str, number: int) -> list[dict]: ...
    def put_metrics(self, domain: str, number: int, entry: dict, digest: str) -> bool: ...


class FsspecRemote(RemoteStore):
    def __init__(self, name: str, url: str, options: dict):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.name, self.url = name, url
        opts = dict(options or {})
        # listings must be fresh: other machines write here concurrently
        opts.setdefault("use_listings_cache", False)
        opts.setdefault("skip_instance_cache", True)
        with self._io("connecting"):
            self.fs, base = fsspec.core.url_to_fs(url, **opts)
        self.base = base.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)

    # ---- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _io(self, what: str):
        try:
            yield
        except (RegistryError, FileExistsError):
            raise
        except Exception as exc:  # network, credentials, missing bucket: one actionable message
            hint = "check the URL, credentials (AWS_* / endpoint in the environment) and network"
            if isinstance(exc, FileNotFoundError):
                hint = "does the bucket / directory exist? create it, or fix the URL with `studio registry remote`"
            elif isinstance(exc, PermissionError):
                hint = "the credentials in the environment are not allowed to do this"
            raise RegistryError(
                f"remote {self.name!r} ({self.url}): {what} failed: {type(exc).__name__}: {exc}; {hint}") from exc

    def _p(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/")] + list(parts)) if self.base != "/" else "/" + "/".join(parts)

    def _ls_names(self, path: str) -> list[str]:
        try:
            with self._io(f"listing {path}"):
                entries = self.fs.ls(path, detail=False)
        except RegistryError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return []
            raise
        return [PurePosixPath(str(e).rstrip("/")).name for e in entries]

    def _read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception:
            with self._io(f"reading {path}"):
                raise

    def _size(self, path: str) -> int | None:
        try:
            return int(self.fs.info(path)["size"])
        except FileNotFoundError:
            return None
        except Exception:
            with self._io(f"checking {path}"):
                raise

    def _sha256(self, path: str) -> str:
        import hashlib
        h = hashlib.sha256()
        with self._io(f"reading {path}"), self.fs.open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Write `data` at `path` only if nothing is there; False if something already is."""
        if self.local:
            with self._io(f"writing {path}"):
                return self._create_local(Path(path), data)
        return self._create_remote(path, data)

    @staticmethod
    def _create_local(target: Path, data: bytes) -> bool:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)  # atomic and exclusive: the file appears complete or not at all
                created = True
            except FileExistsError:
                created = False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)
        return created

    def _create_remote(self, path: str, data: bytes) -> bool:
        try:
            with self._io(f"writing {path}"):
                with self.fs.open(path, "xb") as f:
                    f.write(data)
            return True
        except FileExistsError:
            return False
        except RegistryError as exc:
            if not isinstance(exc.__cause__, (NotImplementedError, ValueError, TypeError)):
                raise
        # backend without write-if-absent: check, write, read back (a narrow race remains)
        with self._io(f"writing {path}"):
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return self.fs.cat_file(path) == data

    def _put_blob(self, local: Path, path: str) -> None:
        if self.local:  # temp + rename so a killed push never leaves a truncated blob
            with self._io(f"writing {path}"):
                self._put_local(local, Path(path))
            return
        with self._io(f"uploading {path}"):  # object stores publish a PUT atomically
            self.fs.put_file(str(local), path)

    @staticmethod
    def _put_local(local: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(local, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    # ---- RemoteStore ------------------------------------------------------------------------

    def domains(self) -> list[str]:
        return sorted(n for n in self._ls_names(self.base) if n != "blobs" and DOMAIN_RE.match(n))

    def versions(self, domain: str) -> list[int]:
        return sorted(int(m.group(1)) for n in self._ls_names(self._p(domain, "versions"))
                      if (m := VERSION_FILE_RE.match(n)))

    def read_manifest(self, domain: str, number: int) -> bytes | None:
        return self._read(self._p(domain, "versions", f"v{number}.json"))

    def upload_version(self, domain, number, manifest, files, blob_path, verify_existing: bool = False) -> str:
        """Blobs first (skipping ones already there with the right size, or, with `verify_existing`,
        the right sha256), then the manifest, created only if absent."""
        from studio.registry.hooks import pause_point

        mpath = self._p(domain, "versions", f"v{number}.json")
        existing = self._read(mpath)
        if existing is not None and existing != manifest:
            raise self._number_taken(domain, number, existing, manifest)
        for f in {f["sha256"]: f for f in files}.values():  # blobs first, manifest last
            rp = self._p("blobs", "sha256", f["sha256"])
            size = self._size(rp)
            if size != f["size"] or (verify_existing and self._sha256(rp) != f["sha256"]):
                self._put_blob(blob_path(f["sha256"]), rp)
        # the manifest is stored as a blob too: its content address is the version's identity as pushed, which a
        # puller checks, so an edited versions/vN.json (naming other blobs) is refused, whatever the ref form
        from studio.registry.blobs import sha256_bytes
        msha = sha256_bytes(manifest)
        mblob = self._p("blobs", "sha256", msha)
        if self._size(mblob) != len(manifest):
            self._put_blob(blob_path(msha), mblob)
        pause_point("push:blobs-uploaded")
        if existing is not None:
            return "present"
        if self._create_exclusive(mpath, manifest):
            return "created"
        existing = self._read(mpath)
        if existing == manifest:
            return "present"
        raise self._number_taken(domain, number, existing or b"", manifest)

    def _number_taken(self, domain, number, remote: bytes, local: bytes) -> RegistryConflict:
        from studio.registry.blobs import sha256_bytes
        ref = f"{domain}@v{number}"
        return RegistryConflict(
            f"remote {self.name!r} already has {ref} with different content (remote manifest "
            f"{sha256_bytes(remote)[:12]}, yours {sha256_bytes(local)[:12]}): two registries numbered versions "
            f"independently; nothing was overwritten. To publish yours under a new number: copy it out "
            f"(`studio registry path {ref}`), `studio registry rm {ref} --force`, `studio registry sync {self.name}`, "
            f"then register the copy again (it gets the next free number) and push that")

    def identity_problem(self, domain: str, number: int, manifest_sha: str) -> str | None:
        from studio.registry.blobs import sha256_bytes
        data = self._read(self._p("blobs", "sha256", manifest_sha))
        if data is None:
            return (f"no push recorded a manifest with sha {manifest_sha[:12]} (every push stores its manifest as a "
                    "blob)")
        if sha256_bytes(data) != manifest_sha:
            return f"the remote's manifest blob {manifest_sha[:12]} is itself corrupt"
        return None

    def fetch_file(self, domain, number, entry, dest: Path) -> None:
        rp = self._p("blobs", "sha256", entry["sha256"])
        try:
            fin = self.fs.open(rp, "rb")
        except FileNotFoundError:
            raise RegistryError(
                f"remote {self.name!r} lacks blob {entry['sha256'][:12]} ({entry['path']}) of {domain}@v{number}: "
                f"a push was interrupted or the blob was deleted; push {domain}@v{number} again from a registry "
                "that has it") from None
        except Exception:
            with self._io(f"opening {rp}"):
                raise
        with self._io(f"downloading {rp}"), fin, open(dest, "wb") as fout:
            while chunk := fin.read(CHUNK):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())

    def alias_names(self, domain: str) -> list[str]:
        return sorted(n for n in self._ls_names(self._p(domain, "aliases")) if valid_alias(n))

    def alias_head(self, domain: str, alias: str) -> dict | None:
        gens = [int(m.group(1)) for n in self._ls_names(self._p(domain, "aliases", alias)) if (m := GEN_RE.match(n))]
        if not gens:
            return None
        gen = max(gens)
        data = self._read(self._p(domain, "aliases", alias, f"{gen:010d}.json"))
        try:
            record = json.loads(data or b"")
            int(record["number"])
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"remote {self.name!r}: alias {domain}@{alias} generation {gen} is unreadable; "
                                "promote and push the alias again with --force") from None
        record["generation"] = gen
        return record

    def write_alias(self, domain, alias, record, expected_generation) -> int:
        gen = expected_generation + 1
        body = canonical_json({**record, "generation": gen})
        if not self._create_exclusive(self._p(domain, "aliases", alias, f"{gen:010d}.json"), body):
            head = self.alias_head(domain, alias) or {}
            raise RegistryConflict(
                f"remote {self.name!r}: {domain}@{alias} was moved concurrently (now generation "
                f"{head.get('generation')}, v{head.get('number')}); nothing was overwritten. Pull it "
                f"(`studio registry pull {domain}@{alias} {self.name}`), decide, then push again")
        return gen

    def metrics(self, domain: str, number: int) -> list[dict]:
        out = []
        for n in self._ls_names(self._p(domain, "metrics", f"v{number}")):
            if n.endswith(".json"):
                data = self._read(self._p(domain, "metrics", f"v{number}", n))
                with contextlib.suppress(ValueError, TypeError):
                    entry = json.loads(data or b"")
                    if isinstance(entry.get("metrics"), dict) and entry.get("source") and entry.get("at"):
                        out.append({"source": entry["source"], "at": entry["at"], "metrics": entry["metrics"]})
        return out

    def put_metrics(self, domain: str, number: int, entry: dict, digest: str) -> bool:
        return self._create_exclusive(self._p(domain, "metrics", f"v{number}", f"{digest}.json"), canonical_json(entry))
