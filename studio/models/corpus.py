"""The pretraining corpus of the embedded `tiny-moe` base: general English technical text from CPython's own
documentation (standard-library docstrings and the Language Reference topics of `pydoc_data`), PSF-licensed.

Rebuild the committed corpus with `python -m studio.models.corpus` (deterministic for a given Python version; the
version is recorded in PROVENANCE.md); read it with `load_corpus()`.

Docstrings are read from the source files with `ast` (no module is imported, so nothing runs and nothing depends
on the platform's import side effects). Modules the shipped `code` sample was mined from are skipped, and any
paragraph sharing a normalised line or an 8-word run with the law/medicine/code samples is dropped, so the domains
stay something to adapt to: the counts of what was removed are written into the manifest.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import importlib.util
import io
import json
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from studio.paths import ASSETS_DIR, shipped_datasets_dir

CORPUS_DIR = ASSETS_DIR / "tiny-moe" / "pretrain"
CORPUS_FILE = "corpus.jsonl.gz"
MANIFEST_FILE = "corpus_manifest.json"
HELDOUT_EVERY = 40          # 1 document in 40 (by a stable hash of its id) is held out: the corpus's eval split
CHAT_EVERY = 2              # 1 docstring in 2 also becomes a chat turn, so the base has seen the chat format
SHINGLE_WORDS = 8           # a paragraph sharing an 8-word run with a domain sample counts as overlap
MIN_PARA_WORDS = 3
# Parts of the standard library that are not documentation prose (tests, GUIs, bundled tools).
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
             "dist-packages", "__pycache__", "pydoc_data"}
CHAT_TEMPLATES = ("Explain `{name}`.", "What is `{name}` for?", "Describe `{name}` briefly.",
                  "Tell me about `{name}`.")


def _stable(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def normalise(line: str) -> str:
    """Lowercase, whitespace collapsed: the form lines are compared in."""
    return " ".join(line.lower().split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _code_sample_modules() -> list[str]:
    """The modules `datasets_registry/scripts/build_code.py` mines (read from that script, one source of truth)."""
    script = shipped_datasets_dir() / "scripts" / "build_code.py"
    spec = importlib.util.spec_from_file_location("_studio_build_code", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.MODULES)


def _stdlib_files(root: Path, skip_modules: set[str]) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or parts[-1].startswith("_") and parts[-1] != "__main__" and len(parts) == 1:
            continue  # private top-level modules (_pydecimal, _collections_abc ...) duplicate public docs
        dotted = ".".join(parts)
        if any(dotted == m or dotted.startswith(m + ".") for m in skip_modules):
            continue
        yield dotted, path


def _docstrings(dotted: str, path: Path) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) for the module and its public classes and functions, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return

    def visit(node, prefix: str):
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name.startswith("_") and child.name != "__init__":
                    continue
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                if isinstance(child, ast.ClassDef):
                    yield from visit(child, name)

    doc = ast.get_docstring(tree)
    if doc:
        yield dotted, doc
    yield from visit(tree, dotted)


def paragraphs(doc: str) -> list[str]:
    """Paragraphs of a docstring or reference text, each on one line (whitespace collapsed)."""
    out = []
    for para in re.split(r"\n\s*\n", doc.strip()):
        line = " ".join(para.split())
        if len(line.split()) >= MIN_PARA_WORDS and not set(line) <= set("*=-~^ "):
            out.append(line)
    return out


def sample_texts() -> list[str]:
    """Every string of the shipped law/medicine/code samples, train and eval."""
    from studio.models.tokenizer import iter_texts, sample_files

    return list(iter_texts(sample_files()))


class OverlapFilter:
    """Drops paragraphs that share a normalised line or an 8-word run with the domain samples."""

    def __init__(self, texts: list[str]):
        self.lines = {hashlib.sha256(normalise(l).encode()).digest()
                      for t in texts for l in t.splitlines() if normalise(l)}
        self.shingles = set()
        for t in texts:
            w = words(t)
            for i in range(len(w) - SHINGLE_WORDS + 1):
                self.shingles.add(hash(tuple(w[i:i + SHINGLE_WORDS])))
        self.line_hits = 0
        self.shingle_hits = 0

    def keep(self, para: str) -> bool:
        if hashlib.sha256(normalise(para).encode()).digest() in self.lines:
            self.line_hits += 1
            return False
        w = words(para)
        if any(hash(tuple(w[i:i + SHINGLE_WORDS])) in self.shingles for i in range(len(w) - SHINGLE_WORDS + 1)):
            self.shingle_hits += 1
            return False
        return True


def build_records(stdlib: Path | None = None) -> tuple[list[dict], dict]:
    """The corpus records (in a fixed order) and the build statistics."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    skip = set(_code_sample_modules())
    filt = OverlapFilter(sample_texts())
    records: list[dict] = []
    total_paras = 0

    def add(doc_id: str, name: str, text: str, chat_ok: bool):
        nonlocal total_paras
        paras = paragraphs(text)
        total_paras += len(paras)
        kept = [p for p in paras if filt.keep(p)]
        if not kept:
            return
        split = "heldout" if _stable(doc_id) % HELDOUT_EVERY == 0 else "train"
        records.append({"id": doc_id, "split": split, "text": f"{name}\n\n" + "\n\n".join(kept)})
        if chat_ok and kept[0] == paras[0] and len(kept[0].split()) >= 6 and _stable("chat:" + doc_id) % CHAT_EVERY == 0:
            question = CHAT_TEMPLATES[_stable("q:" + doc_id) % len(CHAT_TEMPLATES)].format(name=name)
            records.append({"id": "chat:" + doc_id, "split": split,
                            "messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": kept[0]}]})

    for dotted, path in _stdlib_files(root, skip):
        for name, doc in _docstrings(dotted, path):
            add(f"doc:{name}", name, doc, chat_ok=True)
    import pydoc_data.topics  # the Language Reference, as pydoc ships it

    for topic in sorted(pydoc_data.topics.topics):
        add(f"topic:{topic}", topic, pydoc_data.topics.topics[topic], chat_ok=False)
    stats = {"paragraphs_seen": total_paras, "overlap_removed_exact_line": filt.line_hits,
             "overlap_removed_8gram": filt.shingle_hits, "skipped_code_sample_modules": sorted(skip)}
    return records, stats


def write_corpus(out: Path = CORPUS_DIR, stdlib: Path | None = None) -> dict:
    """Build and write corpus.jsonl.gz (gzip with mtime 0: byte-stable) and its manifest; return the manifest."""
    records, stats = build_records(stdlib)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode())
    out.mkdir(parents=True, exist_ok=True)
    data = buf.getvalue()
    (out / CORPUS_FILE).write_bytes(data)
    texts = [_record_text(r) for r in records]
    manifest = {
        "file": CORPUS_FILE, "sha256": hashlib.sha256(data).hexdigest(),
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "licence": "PSF-2.0 (CPython documentation and docstrings)",
        "records": len(records), "chat_records": sum("messages" in r for r in records),
        "heldout_records": sum(r["split"] == "heldout" for r in records),
        "characters": sum(map(len, texts)), "words": sum(len(t.split()) for t in texts), **stats,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _record_text(record: dict) -> str:
    if "text" in record:
        return record["text"]
    return "\n".join(m["content"] for m in record["messages"])


def load_corpus(path: Path = CORPUS_DIR, verify: bool = True) -> list[dict]:
    """The committed corpus records; `verify` checks the file against the sha256 in its manifest."""
    from studio.errors import ModelError

    data = (path / CORPUS_FILE).read_bytes()
    if verify:
        expected = json.loads((path / MANIFEST_FILE).read_text())["sha256"]
        if hashlib.sha256(data).hexdigest() != expected:
            raise ModelError(f"{path / CORPUS_FILE} does not match the sha256 in {MANIFEST_FILE}; rebuild it with "
                             f"`python -m studio.models.corpus` or restore it from git")
    return [json.loads(line) for line in gzip.decompress(data).decode().splitlines()]


def _word_tokens(text: str) -> list[str]:
    """Whitespace-separated tokens, lower-cased, with everything but letters and digits removed (empty ones dropped):
    the unit `real_word_share` counts."""
    return [t for t in (re.sub(r"[^a-z0-9]+", "", t.lower()) for t in text.split()) if t]


def text_vocabulary(texts) -> set[str]:
    """The words of `texts` in both forms a look-up may need: split at punctuation (`words`) and as whole
    whitespace tokens with punctuation removed (so "plaintiff's" is found as "plaintiffs" too)."""
    vocab: set[str] = set()
    for text in texts:
        vocab.update(words(text))
        vocab.update(_word_tokens(text))
    return vocab


def corpus_vocabulary(records: list[dict] | None = None) -> set[str]:
    """Lower-cased words of the corpus: the vocabulary a 'real word' is looked up in."""
    records = load_corpus() if records is None else records
    return text_vocabulary(_record_text(r) for r in records)


def domain_vocabulary(dataset: str) -> set[str]:
    """Lower-cased words of a shipped sample's train split (e.g. 'law'): the words an adapter trained on it learned,
    which the general corpus lacks (about a quarter of the law sample's own words are not in the corpus)."""
    from studio.models.tokenizer import iter_texts, shipped_samples

    samples = shipped_samples()
    if dataset not in samples:
        raise KeyError(f"no shipped sample named {dataset!r}")
    return text_vocabulary(iter_texts([samples[dataset][0]]))


def real_word_share(text: str, vocabulary: set[str]) -> float:
    """Share of whitespace-separated tokens (punctuation stripped, lower-cased) found in `vocabulary`.

    Tokens with no letter or digit (pure punctuation) are not counted; an empty text scores 0.
    """
    tokens = _word_tokens(text)
    return sum(t in vocabulary for t in tokens) / len(tokens) if tokens else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.models.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="folder to write the corpus into")
    parser.add_argument("--stdlib", type=Path, default=None, help="standard library root (default: this Python's)")
    args = parser.parse_args(argv)
    manifest = write_corpus(args.out, args.stdlib)
    print(json.dumps({k: v for k, v in manifest.items() if k != "skipped_code_sample_modules"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
