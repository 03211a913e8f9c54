"""Registry upkeep: `gc` (drop unreferenced blobs, temp files, stale checkouts) and `verify`.

Called through AdapterRegistry.gc() / .verify(), or `studio registry gc|verify`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from studio.errors import RegistryError
from studio.registry.blobs import remove_tree, sha256_bytes
from studio.registry.manifest import files_digest, parse_manifest
from studio.registry.refs import format_ref


@dataclass
class VerifyReport:
    ok: bool
    integrity_check: str
    versions: int
    blobs: int
    problems: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _referenced(reg) -> set[str]:
    keep = set()
    for r in reg.db.execute("SELECT sha, manifest FROM versions"):
        keep.add(r["sha"])
        keep.update(f["sha256"] for f in json.loads(r["manifest"])["files"])
    return keep


def gc(reg) -> dict:
    """Delete blobs no version references, stale temp files and checkouts of removed versions.

    Holds the registry lock exclusively, so it waits for registers and pulls in flight.
    """
    stats = {"blobs_removed": 0, "bytes_freed": 0, "blobs_kept": 0, "tmp_removed": 0, "checkouts_removed": 0}
    with reg.lock.exclusive():
        keep = _referenced(reg)
        for sha in list(reg.blobs.all_shas()):
            if sha in keep:
                stats["blobs_kept"] += 1
                continue
            p = reg.blobs.path(sha)
            stats["bytes_freed"] += p.stat().st_size
            p.unlink()
            stats["blobs_removed"] += 1
        if reg.blobs.dir.is_dir():
            for sub in reg.blobs.dir.iterdir():
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
        tmp = reg.root / "tmp"
        if tmp.is_dir():
            for p in tmp.iterdir():  # nobody holds the lock: every temp entry is an orphan
                if p.is_dir():
                    remove_tree(p)
                else:
                    p.unlink(missing_ok=True)
                stats["tmp_removed"] += 1
        live = {(r["domain"], f"v{r['number']}-{r['sha'][:12]}")
                for r in reg.db.execute("SELECT domain, number, sha FROM versions")}
        checkouts = reg.root / "checkouts"
        if checkouts.is_dir():
            for ddir in checkouts.iterdir():
                for co in (ddir.iterdir() if ddir.is_dir() else []):
                    if (ddir.name, co.name) not in live:
                        remove_tree(co)
                        stats["checkouts_removed"] += 1
    return stats


def verify(reg) -> VerifyReport:
    """SQLite `PRAGMA integrity_check`, then every manifest and file blob re-hashed, aliases checked."""
    problems: list[str] = []
    rows = reg.db.execute("PRAGMA integrity_check").fetchall()
    integrity = "; ".join(str(r[0]) for r in rows)
    if integrity != "ok":
        problems.append(f"sqlite integrity_check: {integrity}")
    checked: dict[tuple, str | None] = {}
    versions = reg.db.execute("SELECT domain, number, sha, manifest, files_digest FROM versions "
                              "ORDER BY domain, number").fetchall()
    for r in versions:
        ref = format_ref(r["domain"], r["number"])
        data = r["manifest"].encode("utf-8")
        if sha256_bytes(data) != r["sha"]:
            problems.append(f"{ref}: catalog manifest does not hash to its sha {r['sha'][:12]}")
        mp = reg.blobs.verify(r["sha"])
        if mp:
            problems.append(f"{ref}: manifest blob {r['sha'][:12]} is {mp}")
        try:
            man = parse_manifest(data, ref)
        except RegistryError as exc:
            problems.append(str(exc))
            continue
        if man["domain"] != r["domain"]:
            problems.append(f"{ref}: manifest names domain {man['domain']!r}")
        if files_digest(man["files"]) != r["files_digest"]:
            problems.append(f"{ref}: files digest mismatch")
        for f in man["files"]:
            key = (f["sha256"], f["size"])
            if key not in checked:
                checked[key] = reg.blobs.verify(f["sha256"], f["size"])
            if checked[key]:
                problems.append(f"{ref}: blob for {f['path']} ({f['sha256'][:12]}) is {checked[key]}")
    for a in reg.db.execute("SELECT a.domain, a.alias, a.number FROM aliases a LEFT JOIN versions v "
                            "ON v.domain=a.domain AND v.number=a.number WHERE v.sha IS NULL"):
        problems.append(f"alias {a['domain']}@{a['alias']} points at missing v{a['number']}")
    for d in reg.db.execute("SELECT d.name, d.last_number, MAX(v.number) AS top FROM domains d "
                            "JOIN versions v ON v.domain=d.name GROUP BY d.name"):
        if d["top"] > d["last_number"]:
            problems.append(f"domain {d['name']}: last_number {d['last_number']} < v{d['top']}")
    return VerifyReport(ok=not problems, integrity_check=integrity, versions=len(versions),
                        blobs=len(checked) + len(versions), problems=problems)
