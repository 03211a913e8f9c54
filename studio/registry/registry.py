"""AdapterRegistry: versioned domain adapters with lineage, aliases and metrics, in one local root.

Used by the trainer (register), the engine (resolve, path), eval (append_metrics) and the UI;
`studio registry ...` is its CLI. Remote push/pull/sync live in `studio.registry.transfer`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.errors import RegistryError
from studio.paths import adapters_root
from studio.registry import catalog
from studio.registry.blobs import (BlobStore, RegistryLock, disk_error, fsync_dir, remove_tree, sha256_bytes,
                                   sha256_file, tmp_name)
from studio.registry.catalog import utcnow
from studio.registry.hooks import pause_point
from studio.registry.manifest import (
    FORMAT, METADATA_FILE, canonical_json, check_json_object, check_safetensors, files_digest,
    load_metadata, scan_adapter_dir,
)
from studio.registry.maintenance import VerifyReport
from studio.registry.refs import MIN_SHA_PREFIX, check_alias, check_domain, format_numbers, format_ref, parse_ref

# (path, inode, size, mtime_ns, ctime_ns) -> sha256 of checkout files already hashed in this process
_VERIFIED: dict[tuple, str] = {}


@dataclass
class AdapterVersion:
    """One registered adapter version. `metadata` is the trainer's studio_adapter.json."""

    domain: str
    number: int
    sha: str  # sha256 of the manifest
    ref: str  # "law@v3"
    created: str
    aliases: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # trainer metrics, updated by appended ones (latest wins)
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    parent: str | None = None
    parent_sha: str | None = None
    files: list[dict] = field(default_factory=list)  # [{"path", "sha256", "size"}]
    metrics_history: list[dict] = field(default_factory=list)  # [{"source", "at", "metrics"}]
    origin: str = "register"

    @property
    def short_sha(self) -> str:
        return self.sha[:12]

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files)

    @property
    def lineage(self) -> dict:
        m = self.metadata
        return {
            "base": m.get("base"), "quantization": m.get("quantization"), "plan": m.get("plan"),
            "dataset": m.get("dataset"), "hyperparameters": m.get("hyperparameters"),
            "expert_selection": _selection_lineage(m.get("expert_selection")),
            "library_versions": m.get("library_versions"), "parent": self.parent, "created": self.created,
            "metrics": self.metrics, "tags": self.tags, "notes": self.notes,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = self.size
        return d


def _selection_lineage(sel: dict | None) -> dict | None:
    """An expert-selective adapter's selection for lineage: spec, experts per layer and the profile it came from
    (the per-expert shares stay in studio_adapter.json)."""
    if not sel:
        return None
    return {k: sel.get(k) for k in ("spec", "seed", "experts", "profile")}


class AdapterRegistry:
    """A local adapter registry rooted at `root` (default: `studio.paths.adapters_root()`).

    Layout: `catalog.sqlite`, `blobs/sha256/ab/<sha>`, `checkouts/<domain>/v<N>-<sha12>/`, `tmp/`.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser().absolute() if root is not None else adapters_root().absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the registry root {self.root}: {exc}; pick another --root") from None
        self.blobs = BlobStore(self.root)
        self.lock = RegistryLock(self.root)
        self._local = threading.local()  # one sqlite connection per thread (and per process)
        self._conns: list = []

    def __repr__(self) -> str:
        return f"AdapterRegistry({str(self.root)!r})"

    # ---- catalog plumbing -------------------------------------------------------------------

    @property
    def db(self):
        """This thread's connection to the SQLite catalog (one per thread and process)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():  # never reuse a connection across fork
            conn = catalog.connect(self.root / "catalog.sqlite")
            self._local.conn, self._local.pid = conn, os.getpid()
            self._conns.append((conn, os.getpid()))
        return conn

    def _tx(self):
        return catalog.transaction(self.db)

    def close(self) -> None:
        """Close this process's catalog connections (they reopen on next use)."""
        for conn, pid in self._conns:
            if pid == os.getpid():
                conn.close()
        self._conns = []
        self._local = threading.local()

    def _rows_to_versions(self, rows) -> list[AdapterVersion]:
        if not rows:
            return []
        domains = sorted({r["domain"] for r in rows})
        qs = ",".join("?" * len(domains))
        aliases: dict[tuple, list] = {}
        for a in self.db.execute(f"SELECT domain, alias, number FROM aliases WHERE domain IN ({qs}) ORDER BY alias",
                                 domains):
            aliases.setdefault((a["domain"], a["number"]), []).append(a["alias"])
        extra: dict[tuple, list] = {}
        for m in self.db.execute(
            f"SELECT domain, number, source, at, metrics FROM metrics WHERE domain IN ({qs}) ORDER BY at, id", domains
        ):
            extra.setdefault((m["domain"], m["number"]), []).append(
                {"source": m["source"], "at": m["at"], "metrics": json.loads(m["metrics"])})
        out = []
        for r in rows:
            man = json.loads(r["manifest"])
            meta = man.get("metadata") or {}
            key = (r["domain"], r["number"])
            train = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
            history = [{"source": "train", "at": man["created"], "metrics": train}] if train else []
            history += extra.get(key, [])
            flat: dict = {}
            for entry in history:
                flat.update(entry["metrics"])
            out.append(AdapterVersion(
                domain=r["domain"], number=r["number"], sha=r["sha"], ref=format_ref(r["domain"], r["number"]),
                created=man["created"], aliases=aliases.get(key, []), metadata=meta, metrics=flat,
                tags=list(man.get("tags") or []), notes=man.get("notes") or "", parent=man.get("parent"),
                parent_sha=man.get("parent_sha"), files=man["files"], metrics_history=history, origin=r["origin"],
            ))
        return out

    def _get(self, domain: str, number: int) -> AdapterVersion:
        rows = self.db.execute("SELECT * FROM versions WHERE domain=? AND number=?", (domain, number)).fetchall()
        if not rows:
            raise RegistryError(f"{format_ref(domain, number)} does not exist (it may have just been removed)")
        return self._rows_to_versions(rows)[0]

    def _manifest_bytes(self, v: AdapterVersion) -> bytes:
        row = self.db.execute("SELECT manifest FROM versions WHERE domain=? AND number=?",
                              (v.domain, v.number)).fetchone()
        return row["manifest"].encode("utf-8")

    # ---- register ---------------------------------------------------------------------------

    def register(self, adapter_dir, domain: str | None = None, parent: str | None = None,
                 tags=(), notes: str = "") -> AdapterVersion:
        """Store a trainer output directory as the next version of its domain and return it.

        Every file is content: copied into the blob store and hash-checked before the catalog
        row appears. Registering content already registered in the domain returns that version.
        """
        src = Path(adapter_dir).expanduser()
        found, skipped = scan_adapter_dir(src)
        meta = load_metadata(src)
        if not meta:
            warnings.warn(f"{src} has no {METADATA_FILE}: the version will have no lineage (base, dataset, plan)",
                          stacklevel=2)
        domain = domain or meta.get("domain")
        if not domain:
            raise RegistryError(f"no domain for {src}: pass --domain NAME (or domain=...) "
                                f"or set 'domain' in {METADATA_FILE}")
        check_domain(domain)
        check_json_object(src / "adapter_config.json")
        check_safetensors(src / "adapter_model.safetensors")
        if skipped:
            warnings.warn(f"not registering pickle files {skipped}: the registry stores safetensors only", stacklevel=2)
        tags = [str(t).strip() for t in ([tags] if isinstance(tags, str) else tags) if str(t).strip()]
        parent_ref, parent_sha = self._resolve_parent(parent if parent is not None else meta.get("parent"),
                                                      explicit=parent is not None)
        try:
            return self._store(src, found, skipped, meta, domain, parent_ref, parent_sha, tags, notes)
        except OSError as exc:  # a full disk, a read-only root: temp files are already gone, no row was written
            raise disk_error(exc, self.root, f"registering {src}") from None

    def _store(self, src, found, skipped, meta, domain, parent_ref, parent_sha, tags, notes) -> AdapterVersion:
        with self.lock.shared():
            files = []
            for rel, path in found:
                sha, size = self.blobs.put_file(path)
                files.append({"path": rel, "sha256": sha, "size": size})
            digest = files_digest(files)
            pause_point("register:blobs-written")
            existing = self._find_digest(domain, digest)
            if existing:
                return existing
            manifest = {
                "format": FORMAT, "domain": domain, "created": utcnow(), "files": files,
                "metadata": meta, "parent": parent_ref, "parent_sha": parent_sha, "tags": tags,
                "notes": notes or "", "excluded": skipped,
                "registry": {"studio_version": _studio_version()},
            }
            data = canonical_json(manifest)
            sha = self.blobs.put_bytes(data)
            pause_point("register:before-commit")
            with self._tx():
                row = self.db.execute("SELECT number FROM versions WHERE domain=? AND files_digest=? "
                                      "ORDER BY number LIMIT 1", (domain, digest)).fetchone()
                if row is None:  # written last: the row's existence means the version is complete
                    number = self._next_number(domain)
                    self.db.execute(
                        "INSERT INTO versions(domain, number, sha, files_digest, created, registered, origin, "
                        "manifest) VALUES (?,?,?,?,?,?,?,?)",
                        (domain, number, sha, digest, manifest["created"], utcnow(), "register", data.decode("utf-8")))
                else:
                    number = row["number"]
        return self._get(domain, number)

    def _find_digest(self, domain: str, digest: str) -> AdapterVersion | None:
        row = self.db.execute("SELECT number FROM versions WHERE domain=? AND files_digest=? ORDER BY number LIMIT 1",
                              (domain, digest)).fetchone()
        return self._get(domain, row["number"]) if row else None

    def _next_number(self, domain: str) -> int:
        """Inside a write transaction: allocate the next number; numbers are never reused."""
        self.db.execute("INSERT OR IGNORE INTO domains(name, last_number) VALUES (?, 0)", (domain,))
        last = self.db.execute("SELECT last_number FROM domains WHERE name=?", (domain,)).fetchone()[0]
        top = self.db.execute("SELECT COALESCE(MAX(number), 0) FROM versions WHERE domain=?", (domain,)).fetchone()[0]
        number = max(last, top) + 1
        self.db.execute("UPDATE domains SET last_number=? WHERE name=?", (number, domain))
        return number

    def _resolve_parent(self, parent, explicit: bool):
        if not parent:
            return None, None
        if isinstance(parent, AdapterVersion):
            return parent.ref, parent.sha
        try:
            v = self.resolve(str(parent))
        except RegistryError as exc:
            if explicit:
                raise RegistryError(f"parent {parent!r} cannot be resolved: {exc}") from None
            warnings.warn(f"parent {parent!r} from {METADATA_FILE} is not in this registry; recorded as given",
                          stacklevel=3)
            return str(parent), None
        return v.ref, v.sha

    # ---- read -------------------------------------------------------------------------------

    def domains(self) -> list[str]:
        """Every domain with at least one registered version, sorted."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT domain FROM versions ORDER BY domain")]

    def list(self, domain: str | None = None) -> list[AdapterVersion]:
        """Every version (of one domain, or of all), by domain then number, with aliases and metrics."""
        if domain is None:
            rows = self.db.execute("SELECT * FROM versions ORDER BY domain, number").fetchall()
        else:
            check_domain(domain)
            rows = self.db.execute("SELECT * FROM versions WHERE domain=? ORDER BY number", (domain,)).fetchall()
            if not rows and not self.db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise RegistryError(self._unknown_domain(domain))
        return self._rows_to_versions(rows)

    def show(self, ref) -> AdapterVersion:
        """One version with everything `studio registry show` prints: lineage (base, quantization, plan,
        dataset, hyperparameters), aliases, parent, metrics and their history, files."""
        return self.resolve(ref)

    def _unknown_domain(self, domain: str) -> str:
        known = self.domains()
        where = f"registered domains: {', '.join(known)}" if known else f"the registry at {self.root} is empty"
        return (f"no adapters registered for domain {domain!r} ({where}); "
                f"register one with `studio registry register DIR --domain {domain}`")

    def resolve(self, ref, base_fingerprint: str | None = None, allow_mismatch: bool = False) -> AdapterVersion:
        """`law` (latest), `law@v3`, `law@prod`, `law@<sha prefix>` -> AdapterVersion.

        With `base_fingerprint`, also checks the adapter was trained on that base (see check_compatible).
        """
        if isinstance(ref, AdapterVersion):
            ref = ref.ref
        r = parse_ref(ref)
        versions = {row["number"]: row["sha"] for row in
                    self.db.execute("SELECT number, sha FROM versions WHERE domain=?", (r.domain,))}
        if not versions:
            raise RegistryError(self._unknown_domain(r.domain))
        have = f"{r.domain} has {format_numbers(versions)} (latest v{max(versions)})"
        if r.is_latest:
            number = max(versions)
        elif r.number is not None:
            if r.number not in versions:
                raise RegistryError(f"{r.text} does not exist: {have}; see `studio registry list {r.domain}`")
            number = r.number
        elif r.alias is not None:
            row = self.db.execute("SELECT number FROM aliases WHERE domain=? AND alias=?",
                                  (r.domain, r.alias)).fetchone()
            if row is None:
                aliases = self._alias_map(r.domain)
                known = ", ".join(f"{a}->v{n}" for a, n in aliases.items()) or "none"
                raise RegistryError(
                    f"{r.text}: {r.domain} has no alias or version named {r.alias!r} (aliases: {known}; {have}); "
                    f"create it with `studio registry promote {r.domain}@v{max(versions)} {r.alias}`")
            number = row["number"]
        else:
            hits = [n for n, sha in versions.items() if sha.startswith(r.sha_prefix)]
            if not hits:
                raise RegistryError(f"{r.text}: no version of {r.domain} has a manifest sha starting with "
                                    f"{r.sha_prefix!r} ({have}); `studio registry list {r.domain}` shows the shas")
            if len(hits) > 1:
                raise RegistryError(f"{r.text}: sha prefix {r.sha_prefix!r} is ambiguous "
                                    f"({format_numbers(hits)} match); give more digits (at least {MIN_SHA_PREFIX})")
            number = hits[0]
        v = self._get(r.domain, number)
        if base_fingerprint is not None:
            self._check_fingerprint(v, base_fingerprint, allow_mismatch)
        return v

    def _alias_map(self, domain: str) -> dict[str, int]:
        return {r["alias"]: r["number"] for r in
                self.db.execute("SELECT alias, number FROM aliases WHERE domain=? ORDER BY alias", (domain,))}

    def path(self, ref, base_fingerprint: str | None = None, allow_mismatch: bool = False) -> Path:
        """A read-only directory with the version's files, loadable by `PeftModel.from_pretrained`.

        Built once under `checkouts/` (hard links to the blobs, copies where links are impossible),
        assembled in `tmp/` and renamed into place, so it is either complete or absent.
        """
        v = self.resolve(ref, base_fingerprint=base_fingerprint, allow_mismatch=allow_mismatch)
        dest = self.root / "checkouts" / v.domain / f"v{v.number}-{v.sha[:12]}"
        if self._checkout_ok(dest, v):
            bad = self._corrupt_files(dest, v)
            if not bad:
                return dest
            # a checkout shares its inodes with the blobs (hard links): a damaged blob means a damaged checkout
            self._refuse_damaged(v)
        with self.lock.shared():
            tmp = self.root / "tmp" / tmp_name("checkout")
            try:
                self._refuse_damaged(v)
                for f in v.files:
                    target = tmp / f["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(self.blobs.path(f["sha256"]), target)
                    except OSError:  # another filesystem, or links not allowed: copy
                        shutil.copyfile(self.blobs.path(f["sha256"]), target)
                        os.chmod(target, 0o444)
                for dirpath, _, _ in sorted(os.walk(tmp), reverse=True):
                    if Path(dirpath) != tmp:  # the top stays writable until renamed (rename needs it)
                        os.chmod(dirpath, 0o555)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists():  # a broken checkout (edited by hand?): replace it
                    remove_tree(dest)
                try:
                    os.rename(tmp, dest)
                    os.chmod(dest, 0o555)
                except OSError:
                    if not self._checkout_ok(dest, v):  # lost a race to a broken one: should not happen
                        raise
                fsync_dir(dest.parent)
            finally:
                remove_tree(tmp)
        if self._corrupt_files(dest, v):  # built from verified blobs: only a concurrent writer could cause this
            raise RegistryError(f"{v.ref}: its checkout changed while it was built; run `studio registry verify` "
                                "and retry")
        return dest

    def _refuse_damaged(self, v: AdapterVersion) -> None:
        damaged = [f"{f['path']}: {p}" for f in v.files if (p := self.blobs.verify(f["sha256"], f["size"]))]
        if damaged:
            raise RegistryError(
                f"{v.ref} is corrupt in this registry ({'; '.join(damaged)}); refusing to load it. Run `studio "
                f"registry verify` to see the damage, then `studio registry pull {v.ref} REMOTE` to restore a good "
                "copy (or remove it and register the adapter again)")

    @staticmethod
    def _corrupt_files(dest: Path, v: AdapterVersion) -> list[str]:
        """Paths of a checkout whose content does not hash to the manifest's sha256. Each file is hashed once per
        (inode, size, mtime, ctime): any write to it, through any hard link, changes its ctime."""
        bad = []
        for f in v.files:
            p = dest / f["path"]
            st = p.stat()
            key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if _VERIFIED.get(key) == f["sha256"]:
                continue
            sha, _ = sha256_file(p)
            if sha != f["sha256"]:
                bad.append(f["path"])
            else:
                _VERIFIED[key] = sha
        return bad

    @staticmethod
    def _checkout_ok(dest: Path, v: AdapterVersion) -> bool:
        if not dest.is_dir():
            return False
        for f in v.files:
            p = dest / f["path"]
            if not p.is_file() or p.stat().st_size != f["size"]:
                return False
        return True

    # ---- compatibility ----------------------------------------------------------------------

    def check_compatible(self, ref, base_fingerprint, allow_mismatch: bool = False) -> AdapterVersion:
        """Raise RegistryError if `ref` was trained on a base with another fingerprint.

        `base_fingerprint` is the loaded base's fingerprint string (or a dict with a
        "fingerprint" key). `allow_mismatch=True` turns the error into a warning.
        """
        return self.resolve(ref, base_fingerprint=base_fingerprint, allow_mismatch=allow_mismatch)

    def _check_fingerprint(self, v: AdapterVersion, base_fingerprint, allow_mismatch: bool) -> None:
        if isinstance(base_fingerprint, dict):
            base_fingerprint = base_fingerprint.get("fingerprint")
        if not base_fingerprint:
            raise RegistryError("check_compatible needs the loaded base's fingerprint (e.g. 'sha256:...')")
        base = v.metadata.get("base") if isinstance(v.metadata.get("base"), dict) else {}
        want = base.get("fingerprint")
        if not want:
            warnings.warn(f"{v.ref} records no base fingerprint: cannot check it matches the loaded base", stacklevel=3)
            return
        if want == base_fingerprint:
            return
        msg = (f"{v.ref} was trained on base {base.get('id', '?')!r} with fingerprint {want}, but the base you are "
               f"using has fingerprint {base_fingerprint}: its LoRA weights may not fit or may behave differently. "
               "Load the base it was trained on, or override with allow_mismatch=True (CLI: --allow-base-mismatch)")
        if not allow_mismatch:
            raise RegistryError(msg)
        warnings.warn(msg.split(". Load")[0] + " (allowed by override)", stacklevel=3)

    # ---- aliases ----------------------------------------------------------------------------

    def promote(self, ref, alias: str) -> AdapterVersion:
        """Point `domain@alias` at `ref`'s version; the move is appended to the alias history."""
        check_alias(alias)
        v = self.resolve(ref)
        self._set_alias(v.domain, alias, v.number, "promote")
        return self._get(v.domain, v.number)

    def _set_alias(self, domain: str, alias: str, number: int, action: str, note: str = "") -> bool:
        with self._tx():
            if not self.db.execute("SELECT 1 FROM versions WHERE domain=? AND number=?", (domain, number)).fetchone():
                raise RegistryError(f"{format_ref(domain, number)} was removed meanwhile; pick another version")
            row = self.db.execute("SELECT number FROM aliases WHERE domain=? AND alias=?", (domain, alias)).fetchone()
            previous = row["number"] if row else None
            if previous == number:
                return False
            now = utcnow()
            self.db.execute("INSERT INTO aliases(domain, alias, number, updated) VALUES (?,?,?,?) "
                            "ON CONFLICT(domain, alias) DO UPDATE SET number=excluded.number, updated=excluded.updated",
                            (domain, alias, number, now))
            self.db.execute("INSERT INTO alias_events(domain, alias, action, number, previous, at, note) "
                            "VALUES (?,?,?,?,?,?,?)", (domain, alias, action, number, previous, now, note))
        return True

    def _alias_stack(self, domain: str, alias: str) -> list[int]:
        """Replay the history: promote/pull push a target, rollback pops, a forced rm drops one."""
        stack: list[int] = []
        for e in self.db.execute("SELECT action, number FROM alias_events WHERE domain=? AND alias=? ORDER BY id",
                                 (domain, alias)):
            if e["action"] == "rollback":
                if stack:
                    stack.pop()
                if not stack or stack[-1] != e["number"]:
                    stack.append(e["number"])
            elif e["action"] == "remove":
                stack = [n for n in stack if n != e["number"]]
                stack = [n for i, n in enumerate(stack) if i == 0 or stack[i - 1] != n]
            elif not stack or stack[-1] != e["number"]:
                stack.append(e["number"])
        return stack

    def rollback(self, domain: str, alias: str) -> AdapterVersion:
        """Move `domain@alias` back to the target it had before its current one (history kept).

        Repeated rollbacks walk further back (v3 -> v2 -> v1), like an undo stack.
        """
        check_domain(domain)
        check_alias(alias)
        with self._tx():
            cur = self.db.execute("SELECT number FROM aliases WHERE domain=? AND alias=?", (domain, alias)).fetchone()
            if cur is None:
                raise RegistryError(self._no_alias(domain, alias))
            stack = self._alias_stack(domain, alias)
            if len(stack) < 2:
                raise RegistryError(f"{domain}@{alias} has no earlier target to roll back to (it points at "
                                    f"v{cur['number']}; see `studio registry history {domain} {alias}`); "
                                    f"promote a version explicitly instead")
            target = stack[-2]
            now = utcnow()
            self.db.execute("UPDATE aliases SET number=?, updated=? WHERE domain=? AND alias=?",
                            (target, now, domain, alias))
            self.db.execute("INSERT INTO alias_events(domain, alias, action, number, previous, at) "
                            "VALUES (?,?,?,?,?,?)", (domain, alias, "rollback", target, cur["number"], now))
        return self._get(domain, target)

    def _no_alias(self, domain: str, alias: str) -> str:
        known = ", ".join(f"{a}->v{n}" for a, n in self._alias_map(domain).items()) or "none"
        return (f"{domain}@{alias}: no such alias (aliases of {domain}: {known}); "
                f"create it with `studio registry promote {domain}@vN {alias}`")

    def alias_history(self, domain: str, alias: str) -> list[dict]:
        """Every move of `domain@alias`, oldest first: action, ref, previous, at, note."""
        check_domain(domain)
        check_alias(alias)
        rows = self.db.execute("SELECT * FROM alias_events WHERE domain=? AND alias=? ORDER BY id",
                               (domain, alias)).fetchall()
        if not rows:
            raise RegistryError(self._no_alias(domain, alias))
        return [{"action": r["action"], "number": r["number"],
                 "ref": format_ref(domain, r["number"]) if r["number"] else None,
                 "previous": format_ref(domain, r["previous"]) if r["previous"] else None,
                 "at": r["at"], "note": r["note"]} for r in rows]

    def aliases(self, domain: str) -> dict[str, int]:
        """A domain's aliases and the version number each points at, e.g. {"prod": 3}."""
        check_domain(domain)
        return self._alias_map(domain)

    # ---- metrics, diff ----------------------------------------------------------------------

    def append_metrics(self, ref, metrics: dict, source: str) -> dict:
        """Record eval results for a version (kept in the catalog; the manifest stays immutable)."""
        if not isinstance(source, str) or not source.strip():
            raise RegistryError("append_metrics needs a source name, e.g. source='eval-heldout'")
        if not isinstance(metrics, dict) or not metrics or not all(isinstance(k, str) for k in metrics):
            raise RegistryError("metrics must be a non-empty dict with string keys, e.g. {'perplexity': 3.2}")
        try:
            json.dumps(metrics, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"metrics must be JSON numbers/strings/lists without NaN ({exc})") from None
        v = self.resolve(ref)
        entry = {"source": source.strip(), "at": utcnow(), "metrics": metrics}
        self._insert_metrics(v, entry)
        return entry

    def _insert_metrics(self, v: AdapterVersion, entry: dict) -> bool:
        digest = sha256_bytes(canonical_json({"version": v.sha, **entry}))
        with self._tx():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO metrics(domain, number, sha, source, at, metrics, digest) "
                "VALUES (?,?,?,?,?,?,?)",
                (v.domain, v.number, v.sha, entry["source"], entry["at"], json.dumps(entry["metrics"]), digest))
        return cur.rowcount > 0

    def diff(self, ref_a, ref_b) -> dict:
        """What differs between two versions: adapter config, plan, base, dataset, hyperparameters,
        quantization and metrics (with deltas), files. Each section maps a dotted key to {"a", "b"}."""
        a, b = self.resolve(ref_a), self.resolve(ref_b)
        cfg_a = json.loads(self._file_bytes(a, "adapter_config.json"))
        cfg_b = json.loads(self._file_bytes(b, "adapter_config.json"))
        out = {"a": a.ref, "b": b.ref, "config": _dict_diff(_config_sets(cfg_a), _config_sets(cfg_b))}
        for section in ("plan", "base", "dataset", "hyperparameters", "quantization", "library_versions"):
            out[section] = _dict_diff(a.metadata.get(section), b.metadata.get(section))
        metrics = _dict_diff(a.metrics, b.metrics)
        for pair in metrics.values():
            if all(isinstance(pair[s], (int, float)) and not isinstance(pair[s], bool) for s in ("a", "b")):
                pair["delta"] = pair["b"] - pair["a"]
        out["metrics"] = metrics
        fa, fb = {f["path"]: f["sha256"] for f in a.files}, {f["path"]: f["sha256"] for f in b.files}
        out["files"] = {"added": sorted(fb.keys() - fa.keys()), "removed": sorted(fa.keys() - fb.keys()),
                        "changed": sorted(p for p in fa.keys() & fb.keys() if fa[p] != fb[p])}
        return out

    def _file_bytes(self, v: AdapterVersion, path: str) -> bytes:
        for f in v.files:
            if f["path"] == path:
                return self.blobs.read_bytes(f["sha256"])
        return b"{}"

    # ---- remove, gc, verify -----------------------------------------------------------------

    def remove(self, ref, force: bool = False) -> AdapterVersion:
        """Delete a version from the catalog (its blobs go at the next gc). Refused while an alias
        points at it unless `force`, which also drops those aliases (recorded in their history)."""
        v = self.resolve(ref)
        with self._tx():
            held = [r["alias"] for r in self.db.execute(
                "SELECT alias FROM aliases WHERE domain=? AND number=? ORDER BY alias", (v.domain, v.number))]
            if held and not force:
                names = ", ".join(f"{v.domain}@{a}" for a in held)
                raise RegistryError(f"{v.ref} is the target of {names}; move the alias first "
                                    f"(`studio registry promote {v.domain}@vN {held[0]}` or "
                                    f"`studio registry rollback {v.domain} {held[0]}`), or remove anyway with --force "
                                    "(force=True), which deletes the alias")
            now = utcnow()
            for alias in held:
                self.db.execute("DELETE FROM aliases WHERE domain=? AND alias=?", (v.domain, alias))
                self.db.execute("INSERT INTO alias_events(domain, alias, action, number, previous, at, note) "
                                "VALUES (?,?,?,?,?,?,?)", (v.domain, alias, "remove", v.number, v.number, now,
                                                          f"{v.ref} removed with force"))
            self.db.execute("DELETE FROM versions WHERE domain=? AND number=?", (v.domain, v.number))
            self.db.execute("INSERT OR REPLACE INTO removed(domain, number, sha, at) VALUES (?,?,?,?)",
                            (v.domain, v.number, v.sha, now))
            self.db.execute("DELETE FROM metrics WHERE domain=? AND number=?", (v.domain, v.number))
        remove_tree(self.root / "checkouts" / v.domain / f"v{v.number}-{v.sha[:12]}")
        return v

    def gc(self) -> dict:
        """Delete blobs no version references, stale temp files and checkouts of removed versions.

        Holds the registry lock exclusively, so it waits for registers and pulls in flight.
        """
        from studio.registry import maintenance
        return maintenance.gc(self)

    def verify(self) -> VerifyReport:
        """SQLite `PRAGMA integrity_check`, then every manifest and file blob re-hashed, aliases
        checked. Returns a VerifyReport (`.ok`, `.problems`)."""
        from studio.registry import maintenance
        return maintenance.verify(self)

    # ---- remotes ----------------------------------------------------------------------------

    def remote_add(self, name: str, url: str, create: bool = False, **storage_options) -> dict:
        """Remember a remote store (fsspec URL: file://, s3://, hf://...). Options are fsspec
        storage options (e.g. client_kwargs={"endpoint_url": ...}); credentials come from the
        environment and are refused here so they never land in the catalog."""
        from studio.registry import transfer
        return transfer.remote_add(self, name, url, storage_options, create=create)

    def remote_remove(self, name: str) -> None:
        """Forget a named remote (its store is left as it is)."""
        from studio.registry import transfer
        transfer.remote_remove(self, name)

    def remotes(self) -> list[dict]:
        """The configured remotes: name, fsspec URL and storage options."""
        return [{"name": r["name"], "url": r["url"], "options": json.loads(r["options"])}
                for r in self.db.execute("SELECT * FROM remotes ORDER BY name")]

    def remote(self, name: str | None = None):
        """The store behind a remote name; None picks the only remote, or the one named origin."""
        from studio.registry import transfer
        return transfer.open_named_remote(self, name)

    def push(self, ref, remote: str | None = None, force: bool = False, verify_remote: bool = False) -> dict:
        """Upload `ref` to a remote; `law@prod` also moves the remote alias. See transfer.push."""
        from studio.registry import transfer
        return transfer.push(self, ref, remote, force=force, verify_remote=verify_remote)

    def pull(self, ref, remote: str | None = None) -> AdapterVersion:
        """Download and verify `ref` from a remote (same version number here). See transfer.pull."""
        from studio.registry import transfer
        return transfer.pull(self, ref, remote)

    def sync(self, remote: str | None = None) -> dict:
        """Exchange versions, metrics and aliases with a remote; conflicts are reported. See transfer.sync."""
        from studio.registry import transfer
        return transfer.sync(self, remote)


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: obj} if prefix else {"": obj}


def _config_sets(cfg: dict) -> dict:
    """PEFT's name lists are sets (older adapters saved them in hash order): compare them order-free."""
    return {k: sorted(v) if k in ("target_modules", "target_parameters", "modules_to_save") and isinstance(v, list)
            else v for k, v in cfg.items()}


def _dict_diff(a, b) -> dict:
    fa, fb = _flatten(a or {}), _flatten(b or {})
    return {k: {"a": fa.get(k), "b": fb.get(k)} for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}


def _studio_version() -> str:
    from studio import __version__
    return __version__
