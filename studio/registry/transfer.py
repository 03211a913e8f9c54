"""push / pull / sync between a local AdapterRegistry and a remote store.

Pull stages every blob under `tmp/pull-<manifest sha>/`, verifies each sha256, and publishes
blobs, manifest and (last) the catalog row only when all are good: a corrupt or interrupted
pull leaves the registry as it was, and a re-run resumes from the verified staged blobs.
Version numbers are shared with the remote: pushing a vN the remote already holds with other
content is refused (RegistryConflict), never overwritten and never renumbered silently.
"""

from __future__ import annotations

import json
import os
import uuid

from studio.errors import RegistryError
from studio.registry.blobs import remove_tree, sha256_bytes, sha256_file
from studio.registry.hooks import pause_point
from studio.registry.manifest import canonical_json, files_digest, parse_manifest
from studio.registry.catalog import utcnow
from studio.registry.refs import Ref, check_remote_name, format_numbers, parse_ref
from studio.registry.remotes import RegistryConflict


# ---- remote configuration ---------------------------------------------------------------

SECRET_WORDS = ("secret", "password", "token", "key", "credential")


def remote_add(reg, name: str, url: str, storage_options: dict, create: bool = False) -> dict:
    """Remember a remote store (fsspec URL: file://, s3://, hf://...). Options are fsspec
    storage options (e.g. client_kwargs={"endpoint_url": ...}); credentials come from the
    environment and are refused here so they never land in the catalog. A file:// directory must exist and be
    writable, or be created now with `create` (a mistyped path must not silently become a new, empty remote)."""
    check_remote_name(name)
    from studio.registry.remotes import check_local_remote, normalise_url
    url = normalise_url(url)
    if reg.db.execute("SELECT 1 FROM remotes WHERE name=?", (name,)).fetchone():
        raise RegistryError(f"remote {name!r} already exists; remove it first (`studio registry remote rm {name}`)")
    check_local_remote(url, create)
    secret = [k for k in _walk_keys(storage_options) if any(w in k.lower() for w in SECRET_WORDS)
              and k not in ("use_listings_cache", "skip_instance_cache")]
    if secret:
        raise RegistryError(f"remote option(s) {', '.join(secret)} look like credentials; the catalog never stores "
                            "them: set them in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, HF_TOKEN)")
    try:
        options = json.dumps(storage_options, sort_keys=True)
    except TypeError as exc:
        raise RegistryError(f"remote options must be JSON-serialisable ({exc})") from None
    with reg._tx():
        if reg.db.execute("SELECT 1 FROM remotes WHERE name=?", (name,)).fetchone():
            raise RegistryError(f"remote {name!r} already exists; remove it first (`studio registry remote rm {name}`)")
        reg.db.execute("INSERT INTO remotes(name, url, options, added) VALUES (?,?,?,?)",
                       (name, url, options, utcnow()))
    return {"name": name, "url": url, "options": storage_options}


def remote_remove(reg, name: str) -> None:
    with reg._tx():
        if not reg.db.execute("DELETE FROM remotes WHERE name=?", (name,)).rowcount:
            raise RegistryError(unknown_remote(reg, name))
        reg.db.execute("DELETE FROM remote_aliases WHERE remote=?", (name,))


def unknown_remote(reg, name: str) -> str:
    known = ", ".join(f"{r['name']} ({r['url']})" for r in reg.remotes()) or "none"
    return f"unknown remote {name!r} (remotes: {known}); add one with `studio registry remote add NAME URL`"


def open_named_remote(reg, name: str | None = None):
    """The store behind a remote name; None picks the only remote, or the one named origin."""
    rs = reg.remotes()
    if name is None:
        if len(rs) == 1:
            chosen = rs[0]
        else:
            chosen = next((r for r in rs if r["name"] == "origin"), None)
            if chosen is None:
                known = ", ".join(r["name"] for r in rs)
                raise RegistryError("no remote given and " + (f"several exist ({known}): name one" if rs else
                                    "none configured: add one with `studio registry remote add origin URL`"))
    else:
        chosen = next((r for r in rs if r["name"] == name), None)
        if chosen is None:
            raise RegistryError(unknown_remote(reg, name))
    from studio.registry.remotes import open_remote
    return open_remote(chosen["name"], chosen["url"], chosen["options"])


def _walk_keys(d: dict, prefix: str = ""):
    for k, v in d.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk_keys(v, f"{prefix}{k}.")


# ---- push ---------------------------------------------------------------------------------

def push(reg, ref, remote=None, force: bool = False, verify_remote: bool = False) -> dict:
    """Upload a version (blobs, then manifest) and, for `law@prod`, move the remote alias too.

    Idempotent and resumable: blobs already there with the right size (with `verify_remote`: the
    right sha256, re-uploading damaged ones) and an identical manifest are skipped. An alias
    moved on the remote since this registry last saw it is a conflict unless `force`.
    """
    rem = reg.remote(remote)
    r = parse_ref(ref.ref if hasattr(ref, "ref") else ref)
    v = reg.resolve(r.text)
    status = _push_version(reg, rem, v, verify_remote)
    result = {"ref": v.ref, "sha": v.sha, "remote": rem.name, "url": rem.url, "version": status,
              "metrics": _push_metrics(reg, rem, v), "alias": None}
    if r.alias:
        result["alias"] = _push_alias(reg, rem, v, r.alias, force)
    return result


def _push_version(reg, rem, v, verify_remote: bool = False) -> str:
    with reg.lock.shared():
        bad = [f"{f['path']}: {p}" for f in v.files if (p := reg.blobs.verify(f["sha256"], f["size"]))]
        if bad:
            raise RegistryError(f"{v.ref} is damaged in the local registry ({'; '.join(bad)}); not pushing it. "
                                "Run `studio registry verify` and re-pull it from a good copy")
        return rem.upload_version(v.domain, v.number, reg._manifest_bytes(v), v.files, reg.blobs.path,
                                  verify_existing=verify_remote)


def _metrics_digest(v, entry: dict) -> str:
    return sha256_bytes(canonical_json({"version": v.sha, **entry}))


def _push_metrics(reg, rem, v) -> int:
    """Upload eval results appended here (the trainer's metrics travel inside the manifest)."""
    n = 0
    for m in reg.db.execute("SELECT source, at, metrics FROM metrics WHERE domain=? AND number=? ORDER BY id",
                            (v.domain, v.number)).fetchall():
        entry = {"source": m["source"], "at": m["at"], "metrics": json.loads(m["metrics"])}
        n += bool(rem.put_metrics(v.domain, v.number, entry, _metrics_digest(v, entry)))
    return n


def _pull_metrics(reg, rem, v) -> int:
    return sum(reg._insert_metrics(v, entry) for entry in rem.metrics(v.domain, v.number))


def _seen(reg, remote: str, domain: str, alias: str):
    return reg.db.execute("SELECT generation, number FROM remote_aliases WHERE remote=? AND domain=? AND alias=?",
                          (remote, domain, alias)).fetchone()


def _record_seen(reg, remote: str, domain: str, alias: str, generation: int, number: int) -> None:
    with reg._tx():
        reg.db.execute("INSERT OR REPLACE INTO remote_aliases(remote, domain, alias, generation, number) "
                       "VALUES (?,?,?,?,?)", (remote, domain, alias, generation, number))


def _push_alias(reg, rem, v, alias: str, force: bool) -> dict:
    head = rem.alias_head(v.domain, alias)
    if head and head["number"] == v.number:
        _record_seen(reg, rem.name, v.domain, alias, head["generation"], v.number)
        return {"alias": alias, "status": "unchanged", "generation": head["generation"]}
    seen = _seen(reg, rem.name, v.domain, alias)
    if head and not force and (seen is None or seen["generation"] != head["generation"]):
        last = f"generation {seen['generation']}" if seen else "never"
        raise RegistryConflict(
            f"remote {rem.name!r}: {v.domain}@{alias} was moved to v{head['number']} (generation {head['generation']}) "
            f"by someone else since this registry last saw it ({last}); nothing was overwritten. "
            f"Pull it (`studio registry pull {v.domain}@{alias} {rem.name}`), promote again if you still want "
            f"{v.ref}, then push; or replace it with `studio registry push {v.domain}@{alias} {rem.name} --force`")
    record = {"domain": v.domain, "alias": alias, "number": v.number, "sha": v.sha,
              "previous": head["number"] if head else None, "at": utcnow()}
    gen = rem.write_alias(v.domain, alias, record, head["generation"] if head else 0)
    _record_seen(reg, rem.name, v.domain, alias, gen, v.number)
    return {"alias": alias, "status": "moved", "generation": gen, "previous": record["previous"]}


# ---- pull ---------------------------------------------------------------------------------

def pull(reg, ref, remote=None):
    """Download a version into the local registry (same number), verifying every checksum.

    For `law@prod` the local alias is moved to the remote's target as well (history kept).
    """
    rem = reg.remote(remote)
    r = parse_ref(ref)
    number, head = _resolve_remote(rem, r)
    v = _import(reg, rem, r.domain, number, expect_sha=head.get("sha") if head else None, explicit=True)
    if r.alias:
        reg._set_alias(r.domain, r.alias, number, "pull", note=f"remote {rem.name} generation {head['generation']}")
        _record_seen(reg, rem.name, r.domain, r.alias, head["generation"], number)
        v = reg._get(r.domain, number)
    return v


def _resolve_remote(rem, r: Ref) -> tuple[int, dict | None]:
    versions = rem.versions(r.domain)
    if not versions:
        there = ", ".join(rem.domains()) or "none"
        raise RegistryError(f"remote {rem.name!r} ({rem.url}) has no versions of {r.domain!r} "
                            f"(domains there: {there}); push one first with "
                            f"`studio registry push {r.domain}@vN {rem.name}`")
    have = f"remote {rem.name!r} has {r.domain} {format_numbers(versions)}"
    if r.is_latest:
        return max(versions), None
    if r.number is not None:
        if r.number not in versions:
            raise RegistryError(f"{r.text} is not on remote {rem.name!r}: {have}")
        return r.number, None
    if r.alias is not None:
        head = rem.alias_head(r.domain, r.alias)
        if head is None:
            names = ", ".join(rem.alias_names(r.domain)) or "none"
            raise RegistryError(f"{r.text}: remote {rem.name!r} has no alias {r.alias!r} for {r.domain} "
                                f"(aliases there: {names}; {have})")
        if head["number"] not in versions:
            raise RegistryError(f"remote {rem.name!r}: {r.text} points at v{head['number']}, whose manifest is missing "
                                "there; push that version again from a registry that has it")
        return head["number"], head
    hits = [n for n in versions if sha256_bytes(rem.read_manifest(r.domain, n) or b"").startswith(r.sha_prefix)]
    if len(hits) != 1:
        raise RegistryError(f"{r.text}: {'no' if not hits else 'more than one'} version on remote {rem.name!r} has a "
                            f"manifest sha starting with {r.sha_prefix!r} ({have})")
    return hits[0], None


def _import(reg, rem, domain: str, number: int, expect_sha: str | None = None, explicit: bool = False):
    where = f"{domain}@v{number} on remote {rem.name!r}"
    data = rem.read_manifest(domain, number)
    if data is None:
        raise RegistryError(f"{where} has no manifest; push it again from a registry that has it")
    msha = sha256_bytes(data)
    if expect_sha and msha != expect_sha:
        raise RegistryError(f"{where}: the manifest hashes to {msha[:12]} but the alias recorded {expect_sha[:12]}: "
                            "the remote manifest is corrupt or was replaced; nothing was changed locally. "
                            "Re-push the version from a good copy")
    man = parse_manifest(data, where)
    # the same identity checks whether the version was named by number, alias, sha or found by sync
    problem = rem.identity_problem(domain, number, msha)
    if problem is None:
        for alias in rem.alias_names(domain):
            head = rem.alias_head(domain, alias)
            if head and head.get("number") == number and head.get("sha") not in (None, msha):
                problem = f"alias {alias!r} records v{number} as manifest {str(head['sha'])[:12]}"
                break
    if problem:
        raise RegistryError(f"{where}: the manifest (sha {msha[:12]}) is not the version that was pushed: {problem}. "
                            "The remote manifest was edited or replaced; nothing was changed locally. Re-push the "
                            "version from a registry with a good copy")
    if man["domain"] != domain:
        raise RegistryError(f"{where}: the manifest belongs to domain {man['domain']!r}; the remote is inconsistent")
    row = reg.db.execute("SELECT sha FROM versions WHERE domain=? AND number=?", (domain, number)).fetchone()
    if row and row["sha"] != msha:
        raise RegistryConflict(
            f"local {domain}@v{number} ({row['sha'][:12]}) differs from {where} ({msha[:12]}): the two registries "
            f"numbered versions independently; nothing was changed. Pull into another --root, or remove the local one "
            f"(`studio registry rm {domain}@v{number} --force`) if you want the remote's")
    files = list({f["sha256"]: f for f in man["files"]}.values())
    if row and all(reg.blobs.verify(f["sha256"], f["size"]) is None for f in files):
        v = reg._get(domain, number)  # already here and intact: nothing to download
        _pull_metrics(reg, rem, v)
        return reg._get(domain, number)
    with reg.lock.shared():
        staging = reg.root / "tmp" / f"pull-{msha[:16]}"
        staged = {}
        for f in files:
            sha, size = f["sha256"], f["size"]
            if reg.blobs.verify(sha, size) is None:
                continue
            staging.mkdir(parents=True, exist_ok=True)
            dest = staging / sha
            if dest.is_file() and sha256_file(dest) == (sha, size):  # verified by an interrupted run
                staged[sha] = dest
                continue
            part = staging / f"{sha}.part-{uuid.uuid4().hex[:8]}"
            try:
                rem.fetch_file(domain, number, f, part)
                actual, got = sha256_file(part)
                if actual != sha or got != size:
                    remove_tree(staging)  # discard everything staged for this version
                    raise RegistryError(
                        f"checksum mismatch pulling {where}: {f['path']} should be sha256 {sha[:12]}... "
                        f"({size} bytes) but the remote blob is {actual[:12]}... ({got} bytes). The remote copy is "
                        f"corrupt; nothing was added to the local registry. From a registry with a good copy run "
                        f"`studio registry push {domain}@v{number} {rem.name} --verify-remote`, then pull again")
                staging.mkdir(parents=True, exist_ok=True)
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)
            staged[sha] = dest
            pause_point("pull:blob-staged")
        # every blob verified: publish blobs, then manifest, then the catalog row (written last)
        for sha, path in staged.items():
            if path.is_file():
                reg.blobs.install_verified(path, sha)
            elif reg.blobs.verify(sha) is not None:
                raise RegistryError(f"staged blob {sha[:12]} of {where} vanished (a concurrent gc?); pull again")
        reg.blobs.put_bytes(data)
        pause_point("pull:before-commit")
        with reg._tx():
            row = reg.db.execute("SELECT sha FROM versions WHERE domain=? AND number=?", (domain, number)).fetchone()
            if row is None:
                reg.db.execute("INSERT OR IGNORE INTO domains(name, last_number) VALUES (?, 0)", (domain,))
                reg.db.execute(
                    "INSERT INTO versions(domain, number, sha, files_digest, created, registered, origin, manifest) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (domain, number, msha, files_digest(man["files"]), man["created"], utcnow(), f"pull:{rem.name}",
                     data.decode("utf-8")))
                reg.db.execute("UPDATE domains SET last_number=MAX(last_number, ?) WHERE name=?", (number, domain))
                if explicit:
                    reg.db.execute("DELETE FROM removed WHERE domain=? AND number=?", (domain, number))
            elif row["sha"] != msha:
                raise RegistryConflict(f"local {domain}@v{number} was registered meanwhile with other content; "
                                       "nothing was changed")
        remove_tree(staging)
    v = reg._get(domain, number)
    _pull_metrics(reg, rem, v)
    return reg._get(domain, number)


# ---- sync ---------------------------------------------------------------------------------

def sync(reg, remote=None) -> dict:
    """Push local versions the remote lacks, pull remote versions this registry lacks (except ones
    removed here), exchange appended metrics, and reconcile aliases three-way against the
    generation last seen. Conflicts are collected, not fatal: see the returned `conflicts`."""
    rem = reg.remote(remote)
    stats = {"remote": rem.name, "pushed": [], "pulled": [], "skipped_removed": [], "aliases_pushed": [],
             "aliases_pulled": [], "conflicts": []}
    for domain in sorted(set(reg.domains()) | set(rem.domains())):
        remote_versions = set(rem.versions(domain))
        local = {v.number: v for v in reg.list(domain)} if domain in reg.domains() else {}
        removed = {r["number"]: r["sha"] for r in
                   reg.db.execute("SELECT number, sha FROM removed WHERE domain=?", (domain,))}
        for n, v in sorted(local.items()):
            try:
                if n in remote_versions:
                    remote_sha = sha256_bytes(rem.read_manifest(domain, n) or b"")
                    if remote_sha != v.sha:
                        raise RegistryConflict(f"{v.ref}: local {v.sha[:12]} and remote {remote_sha[:12]} differ "
                                               "(numbered independently); neither was changed")
                    _pull_metrics(reg, rem, v)
                    _push_metrics(reg, rem, reg._get(domain, n))
                else:
                    _push_version(reg, rem, v)
                    _push_metrics(reg, rem, v)
                    stats["pushed"].append(v.ref)
            except RegistryConflict as exc:
                stats["conflicts"].append(str(exc))
        for n in sorted(remote_versions - set(local)):
            if n in removed:
                stats["skipped_removed"].append(f"{domain}@v{n}")
                continue
            try:
                stats["pulled"].append(_import(reg, rem, domain, n).ref)
            except RegistryConflict as exc:
                stats["conflicts"].append(str(exc))
        for alias in sorted(set(reg._alias_map(domain)) | set(rem.alias_names(domain))):
            try:
                _sync_alias(reg, rem, domain, alias, stats)
            except RegistryConflict as exc:
                stats["conflicts"].append(str(exc))
    return stats


def _sync_alias(reg, rem, domain: str, alias: str, stats: dict) -> None:
    local = reg._alias_map(domain).get(alias)
    head = rem.alias_head(domain, alias)
    seen = _seen(reg, rem.name, domain, alias)
    name = f"{domain}@{alias}"
    if head is None and local is None:
        return
    if head is not None and local == head["number"]:
        _record_seen(reg, rem.name, domain, alias, head["generation"], local)
        return
    remote_changed = head is not None and (seen is None or seen["generation"] != head["generation"])
    local_changed = local is not None and (seen is None or seen["number"] != local)
    if head is not None and local is not None and remote_changed and local_changed:
        raise RegistryConflict(f"{name} moved both here (v{local}) and on remote {rem.name!r} (v{head['number']}, "
                               f"generation {head['generation']}); neither was changed. Pick one: "
                               f"`studio registry pull {name} {rem.name}` or "
                               f"`studio registry push {name} {rem.name} --force`")
    if local is not None and (head is None or not remote_changed):
        v = reg._get(domain, local)
        if local not in set(rem.versions(domain)):
            raise RegistryConflict(f"{name}: cannot move the remote alias to {v.ref}, which is not on {rem.name!r}")
        _push_alias(reg, rem, v, alias, force=False)
        stats["aliases_pushed"].append(f"{name} -> v{local}")
    elif head is not None:
        if not reg.db.execute("SELECT 1 FROM versions WHERE domain=? AND number=?",
                              (domain, head["number"])).fetchone():
            raise RegistryConflict(f"{name}: remote points at v{head['number']}, which is not in this registry "
                                   f"(removed here?); pull it explicitly with `studio registry pull {name} {rem.name}`")
        reg._set_alias(domain, alias, head["number"], "pull",
                       note=f"sync from {rem.name} generation {head['generation']}")
        _record_seen(reg, rem.name, domain, alias, head["generation"], head["number"])
        stats["aliases_pulled"].append(f"{name} -> v{head['number']}")
