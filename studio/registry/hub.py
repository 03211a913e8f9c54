"""hf:// remote: one Hugging Face Hub model repo per domain, one git tag per version.

URL `hf://ORG` keeps domain `law` in repo `ORG/law`; `hf://ORG/PREFIX` in `ORG/PREFIX-law`.
Each version is one commit holding the adapter files at the repo root plus
`.studio/manifest.json`, tagged `v<N>`, so `PeftModel.from_pretrained("ORG/law", revision="v3")`
works without the studio. Aliases live on `main` as `.studio/aliases/<alias>.json` and move with
`create_commit(parent_commit=...)`, which the Hub checks server-side (compare-and-swap); appended
metrics as `.studio/metrics/v<N>/<digest>.json`.

NOT EXERCISED BY THE TEST SUITE: no Hub is reachable where the tests run. It fails fast with a
clear message when HF_HUB_OFFLINE is set; the token comes from HF_TOKEN / `hf auth login`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from studio.errors import RegistryError
from studio.registry.hooks import pause_point
from studio.registry.manifest import canonical_json
from studio.registry.refs import DOMAIN_RE
from studio.registry.remotes import RegistryConflict, RemoteStore, valid_alias

MANIFEST = ".studio/manifest.json"
TAG_RE = re.compile(r"^v([0-9]{1,9})$")
ORG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class HubRemote(RemoteStore):
    def __init__(self, name: str, url: str, options: dict):
        self.name, self.url = name, url
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            raise RegistryError(f"remote {name!r} ({url}) is on the Hugging Face Hub, but HF_HUB_OFFLINE is set: "
                                "unset it when the Hub is reachable, or use a file:// or s3:// remote")
        try:
            import huggingface_hub
            import huggingface_hub.errors
        except ImportError:
            raise RegistryError("hf:// remotes need huggingface_hub: `pip install huggingface_hub`") from None
        parts = url[len("hf://"):].strip("/").split("/")
        if not parts[0] or len(parts) > 2 or not all(ORG_RE.match(p) for p in parts):
            raise RegistryError(f"bad hf:// remote URL {url!r}: use hf://ORG (repos ORG/<domain>) "
                                "or hf://ORG/PREFIX (repos ORG/PREFIX-<domain>)")
        self.org = parts[0]
        self.prefix = f"{parts[1]}-" if len(parts) == 2 else ""
        self.private = bool((options or {}).get("private", True))
        self.hub = huggingface_hub
        self.api = huggingface_hub.HfApi(endpoint=(options or {}).get("endpoint"))

    def repo(self, domain: str) -> str:
        return f"{self.org}/{self.prefix}{domain}"

    @contextlib.contextmanager
    def _io(self, what: str):
        try:
            yield
        except (RegistryError, FileNotFoundError):
            raise
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (409, 412):
                raise RegistryConflict(f"remote {self.name!r}: {what}: the repo changed concurrently ({exc}); "
                                       "nothing was overwritten: pull, then retry") from exc
            raise RegistryError(f"remote {self.name!r} ({self.url}): {what} failed: {type(exc).__name__}: {exc}; "
                                "check the network and your token (HF_TOKEN)") from exc

    def _missing(self, exc: Exception) -> bool:
        errors = self.hub.errors
        return isinstance(exc, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
                                errors.EntryNotFoundError))

    def _download(self, domain: str, filename: str, revision: str, dest: Path | None = None) -> bytes | None:
        with tempfile.TemporaryDirectory(dir=dest.parent if dest else None) as tmp:
            try:
                path = self.api.hf_hub_download(self.repo(domain), filename, revision=revision, local_dir=tmp)
            except Exception as exc:
                if self._missing(exc):
                    return None
                with self._io(f"downloading {filename}@{revision}"):
                    raise
            if dest is not None:
                shutil.move(path, dest)
                return b""
            return Path(path).read_bytes()

    def _files(self, domain: str, revision: str = "main") -> list[str]:
        try:
            return self.api.list_repo_files(self.repo(domain), revision=revision)
        except Exception as exc:
            if self._missing(exc):
                return []
            with self._io(f"listing {self.repo(domain)}"):
                raise

    # ---- RemoteStore ------------------------------------------------------------------------

    def domains(self) -> list[str]:
        with self._io("listing repos"):
            ids = [m.id for m in self.api.list_models(author=self.org, search=self.prefix or None)]
        out = []
        for rid in ids:
            short = rid.split("/", 1)[-1]
            if short.startswith(self.prefix) and DOMAIN_RE.match(short[len(self.prefix):]):
                out.append(short[len(self.prefix):])
        return sorted(out)

    def versions(self, domain: str) -> list[int]:
        try:
            refs = self.api.list_repo_refs(self.repo(domain))
        except Exception as exc:
            if self._missing(exc):
                return []
            with self._io("listing tags"):
                raise
        return sorted(int(m.group(1)) for t in refs.tags if (m := TAG_RE.match(t.name)))

    def read_manifest(self, domain: str, number: int) -> bytes | None:
        if number not in self.versions(domain):
            return None
        return self._download(domain, MANIFEST, f"v{number}")

    def upload_version(self, domain, number, manifest, files, blob_path, verify_existing: bool = False) -> str:
        # the Hub stores each version as one commit: nothing partial to re-check (verify_existing unused)
        existing = self.read_manifest(domain, number)
        if existing is not None:
            if existing == manifest:
                return "present"
            raise RegistryConflict(f"remote {self.name!r} already has {domain}@v{number} with different content; "
                                   "nothing was overwritten (see `studio registry push --help`)")
        ops = self.hub
        repo = self.repo(domain)
        with self._io(f"uploading {domain}@v{number}"):
            self.api.create_repo(repo, private=self.private, exist_ok=True)
            head = self.api.repo_info(repo).sha
            keep = {f["path"] for f in files} | {MANIFEST, ".gitattributes"}
            operations = [ops.CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(blob_path(f["sha256"])))
                          for f in files]
            operations.append(ops.CommitOperationAdd(path_in_repo=MANIFEST, path_or_fileobj=manifest))
            operations += [ops.CommitOperationDelete(path_in_repo=p) for p in self._files(domain)
                           if p not in keep and not p.startswith(".studio/")]
            info = self.api.create_commit(repo, operations, commit_message=f"{domain}@v{number}", parent_commit=head)
        pause_point("push:blobs-uploaded")
        try:
            self.api.create_tag(repo, tag=f"v{number}", revision=info.oid)
        except Exception as exc:
            if getattr(getattr(exc, "response", None), "status_code", None) != 409:
                with self._io(f"tagging {domain}@v{number}"):
                    raise
            if self.read_manifest(domain, number) != manifest:  # someone else tagged vN first
                raise RegistryConflict(f"remote {self.name!r}: {domain}@v{number} was pushed concurrently with "
                                       "different content; nothing was overwritten") from None
            return "present"
        return "created"

    def identity_problem(self, domain: str, number: int, manifest_sha: str) -> str | None:
        # a Hub version is the commit its tag names: the manifest read at that tag is the one pushed with it
        return None

    def fetch_file(self, domain, number, entry, dest: Path) -> None:
        if self._download(domain, entry["path"], f"v{number}", dest=dest) is None:
            raise RegistryError(f"remote {self.name!r} lacks {entry['path']} of {domain}@v{number}; push it again")

    def alias_names(self, domain: str) -> list[str]:
        names = (p[len(".studio/aliases/"):-5] for p in self._files(domain)
                 if p.startswith(".studio/aliases/") and p.endswith(".json"))
        return sorted(n for n in names if valid_alias(n))

    def _alias_at(self, domain: str, alias: str, revision: str) -> dict | None:
        data = self._download(domain, f".studio/aliases/{alias}.json", revision)
        return json.loads(data) if data else None

    def alias_head(self, domain: str, alias: str) -> dict | None:
        return self._alias_at(domain, alias, "main")

    def write_alias(self, domain, alias, record, expected_generation) -> int:
        repo = self.repo(domain)
        with self._io(f"moving {domain}@{alias}"):
            head = self.api.repo_info(repo).sha
        current = self._alias_at(domain, alias, head) or {}
        if current.get("generation", 0) != expected_generation:
            raise RegistryConflict(f"remote {self.name!r}: {domain}@{alias} was moved concurrently (generation "
                                   f"{current.get('generation')}); nothing was overwritten: pull, then retry")
        gen = expected_generation + 1
        body = canonical_json({**record, "generation": gen})
        with self._io(f"moving {domain}@{alias}"):  # parent_commit: the Hub refuses if main moved meanwhile
            self.api.create_commit(repo, [self.hub.CommitOperationAdd(f".studio/aliases/{alias}.json", body)],
                                   commit_message=f"{domain}@{alias} -> v{record['number']}", parent_commit=head)
        return gen

    def metrics(self, domain: str, number: int) -> list[dict]:
        prefix = f".studio/metrics/v{number}/"
        return [json.loads(self._download(domain, p, "main") or b"{}") for p in self._files(domain)
                if p.startswith(prefix)]

    def put_metrics(self, domain: str, number: int, entry: dict, digest: str) -> bool:
        path = f".studio/metrics/v{number}/{digest}.json"
        if path in self._files(domain):
            return False
        with self._io("uploading metrics"):
            self.api.create_commit(self.repo(domain), [self.hub.CommitOperationAdd(path, canonical_json(entry))],
                                   commit_message=f"metrics for {domain}@v{number}")
        return True
