"""Build the `code` sample dataset from CPython standard-library docstrings and signatures.

Run from the repository root: `python datasets_registry/scripts/build_code.py`. Output is
deterministic for a given Python minor version (docstrings change between releases); the
version used is written into the dataset's PROVENANCE.md and the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

# -----------------------------------------------------------------------------
# Pinned inputs: the modules mined, in this order. Pure-Python, platform-neutral
# modules only, so the docstrings do not depend on the operating system.
MODULES = [
    "base64", "bisect", "calendar", "colorsys", "copy", "csv", "dataclasses", "difflib",
    "fnmatch", "fractions", "functools", "glob", "gzip", "heapq", "html", "ipaddress",
    "itertools", "json", "keyword", "math", "operator", "pathlib", "pprint", "random",
    "re", "shlex", "shutil", "statistics", "string", "tempfile", "textwrap", "urllib.parse",
    "uuid", "zlib",
]
SYSTEM_PROMPT = "You are a concise Python assistant. Answer from the standard library documentation."
MAX_WORDS = 100          # keep answers short: a tiny model with a short context trains on them
EVAL_EVERY = 6           # every 6th function (by a stable hash) is held out for eval
MIN_DOC_WORDS = 4
HERE = Path(__file__).resolve().parent
OUT_DIR = HERE.parent / "samples" / "code"


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph, whitespace-collapsed and capped at MAX_WORDS words."""
    doc = inspect.cleandoc(doc)
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    words = para.split()
    text = " ".join(words[:MAX_WORDS])
    if len(words) > MAX_WORDS:
        text += " ..."
    return text


def signature_of(obj) -> str | None:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    # reprs holding memory addresses (sentinel defaults) would make the output non-deterministic
    if "0x" in sig or " at " in sig:
        return None
    return sig


def collect() -> list[tuple[str, str, str]]:
    """(qualified name, signature, docstring paragraph) for public functions of MODULES."""
    items = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        public = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for name in sorted(set(public)):
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            sig = signature_of(obj)
            if not doc or sig is None:
                continue
            para = first_paragraph(doc)
            # skip docstrings that merely restate the signature (common for C functions)
            if len(para.split()) < MIN_DOC_WORDS or para.startswith(name + "("):
                continue
            items.append((f"{mod_name}.{name}", sig, para))
    return items


def is_eval(qualname: str) -> bool:
    return int(hashlib.sha256(qualname.encode()).hexdigest(), 16) % EVAL_EVERY == 0


def chat(question: str, answer: str, with_system: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if with_system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def build() -> tuple[list[dict], list[dict], int]:
    train, eval_ = [], []
    items = collect()
    for i, (qual, sig, para) in enumerate(items):
        short = qual.rsplit(".", 1)[1]
        system = i % 4 == 0
        if is_eval(qual):
            # held-out functions, asked with phrasings that never appear in train
            eval_.append(chat(f"Briefly explain what the Python function `{qual}` is for.", para, system))
            eval_.append(chat(f"How would you call `{qual}`? Give its parameters.",
                              f"Call it as `{qual}{sig}`.", not system))
        else:
            train.append(chat(f"What does `{qual}` do?", para, system))
            train.append(chat(f"Write the signature of `{qual}`.", f"`{short}{sig}`", not system))
    return train, eval_, len(items)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, eval_, n = build()
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", eval_)
    print(f"python {sys.version.split()[0]}: {n} functions -> {len(train)} train, {len(eval_)} eval rows")


if __name__ == "__main__":
    main()
