"""Write `datasets_registry/manifest.json`: one entry per shipped sample, with row counts.

Run from the repository root after the build_<name>.py scripts:
`python datasets_registry/scripts/build_manifest.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_PYTHON_VERSION = "3.11.7"  # the interpreter build_code.py was run with; docstrings depend on it

SAMPLES = [
    {
        "name": "law",
        "domain": "law",
        "format": "alpaca",
        "file_format": "jsonl",
        "train_file": "samples/law/train.jsonl",
        "eval_file": "samples/law/eval.jsonl",
        "licence": "Apache-2.0",
        "provenance": "Written for this project: 140 hand-written general common-law concepts "
                      "(definition, area, example) expanded into question styles by "
                      "scripts/build_law.py. Not legal advice.",
        "build_script": "scripts/build_law.py",
    },
    {
        "name": "medicine",
        "domain": "medicine",
        "format": "sharegpt",
        "file_format": "json",
        "train_file": "samples/medicine/train.json",
        "eval_file": "samples/medicine/eval.json",
        "licence": "Apache-2.0",
        "provenance": "Written for this project: 110 hand-written textbook-level facts (conditions, "
                      "medicines, anatomy, measurements) expanded into single- and multi-turn "
                      "conversations by scripts/build_medicine.py. Not medical advice.",
        "build_script": "scripts/build_medicine.py",
    },
    {
        "name": "code",
        "domain": "code",
        "format": "messages",
        "file_format": "jsonl",
        "train_file": "samples/code/train.jsonl",
        "eval_file": "samples/code/eval.jsonl",
        "licence": "PSF-2.0",
        "provenance": "Derived from CPython standard-library docstrings and signatures read with "
                      f"`inspect` on Python {CODE_PYTHON_VERSION} by scripts/build_code.py "
                      "(pinned module list); held-out functions form the eval split.",
        "build_script": "scripts/build_code.py",
        "python_version": CODE_PYTHON_VERSION,
    },
]


def count_rows(path: Path) -> int:
    if path.suffix == ".jsonl":
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return len(json.loads(path.read_text(encoding="utf-8")))


def main() -> None:
    entries = []
    for sample in SAMPLES:
        entry = dict(sample)
        entry["rows"] = {"train": count_rows(ROOT / sample["train_file"]),
                         "eval": count_rows(ROOT / sample["eval_file"])}
        entry["provenance_file"] = f"samples/{sample['name']}/PROVENANCE.md"
        entries.append(entry)
    manifest = {"version": 1, "description": "Sample domain datasets shipped with MoE LoRA Studio. "
                "Paths are relative to this file.", "samples": entries}
    (ROOT / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    for e in entries:
        print(f"{e['name']}: {e['rows']['train']} train, {e['rows']['eval']} eval")


if __name__ == "__main__":
    main()
