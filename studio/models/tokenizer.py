"""The tokenizer of the embedded `tiny-moe` base: byte-level BPE trained on the pretraining corpus's train split.

It is trained on the general corpus (`studio.models.corpus`), not on the law/medicine/code samples: a token made
from domain words would never be seen in pretraining, so the base would know nothing of it and an adapter (which
trains no embeddings) could hardly learn to use it. Domain words are instead spelled with pieces the base knows.

Rebuild the committed files with `python -m studio.models.tokenizer --out studio/assets/tiny-moe`;
load them with `load_tokenizer()`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from studio import paths
from studio.paths import ASSETS_DIR, shipped_datasets_dir

DEFAULT_DIR = ASSETS_DIR / "tiny-moe"
DEFAULT_VOCAB_SIZE = 6144

ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END = (
    "<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# the order fixes their ids: 0..5
SPECIAL_TOKENS = [ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END]

# Each message is `<|role|>\n{content}<|end|>\n`. The assistant's content and its `<|end|>` sit
# inside {% generation %} so `return_assistant_tokens_mask=True` (TRL's `assistant_only_loss`)
# trains exactly the answer and the token that ends it: the model learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\\n' }}"
    "{%- generation -%}{{ message['content'] }}{{ '<|end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# role/from values are structure, not text worth spending merges on
_STRUCTURE_KEYS = {"role", "from"}


def default_training_texts() -> Iterator[str]:
    """The pretraining corpus's train split, in file order: the fixed tokenizer training text."""
    from studio.models.corpus import _record_text, load_corpus

    return (_record_text(r) for r in load_corpus() if r["split"] == "train")


def shipped_samples() -> dict[str, tuple[Path, Path]]:
    """The shipped samples' (train file, eval file) by name, in manifest order."""
    root = shipped_datasets_dir()
    return {s["name"]: (root / s["train_file"], root / s["eval_file"]) for s in paths.shipped_samples()}


def sample_files() -> list[Path]:
    """The shipped samples, train then eval, in manifest order."""
    return [f for pair in shipped_samples().values() for f in pair]


def _strings(obj) -> Iterator[str]:
    """String values of a JSON record, depth first in document order, skipping role names."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for item in obj:
            yield from _strings(item)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key not in _STRUCTURE_KEYS:
                yield from _strings(value)


def iter_texts(files: Iterable[str | Path]) -> Iterator[str]:
    """The text in `files`, in order: string values of JSON/JSONL records, or lines of other files."""
    for path in map(Path, files):
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for line in raw.splitlines():
                if line.strip():
                    yield from _strings(json.loads(line))
        elif path.suffix == ".json":
            yield from _strings(json.loads(raw))
        else:
            yield from (line for line in raw.splitlines() if line.strip())


def train_tokenizer(files: Iterable[str | Path] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE `tokenizers.Tokenizer` on `files` (default: the pretraining corpus's train split).

    Deterministic: the same text in the same order gives byte-identical `tokenizer.json`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = default_training_texts() if files is None else iter_texts(list(files))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # offsets must map back to characters exactly: the assistant mask is built from them
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": END,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [ENDOFTEXT, SYSTEM, USER, ASSISTANT],
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    return {"eos_token": END, "pad_token": PAD,
            "additional_special_tokens": [ENDOFTEXT, SYSTEM, USER, ASSISTANT]}


def save_tokenizer(tok, out: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # written by hand rather than by save_pretrained so the bytes are stable across library versions
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    for name, data in (("tokenizer_config.json", tokenizer_config()),
                       ("special_tokens_map.json", special_tokens_map())):
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def load_tokenizer(path: str | Path | None = None):
    """The studio tokenizer as a `transformers.PreTrainedTokenizerFast` (default: the tiny-moe assets)."""
    from transformers import PreTrainedTokenizerFast

    from studio.errors import ModelError

    path = Path(path) if path is not None else DEFAULT_DIR
    if not (path / "tokenizer.json").is_file():
        raise ModelError(f"no tokenizer.json in {path}; rebuild it with "
                         f"`python -m studio.models.tokenizer --out {path}`")
    cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (path / "tokenizer_config.json").is_file() else tokenizer_config()
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"),
        eos_token=cfg.get("eos_token"),
        pad_token=cfg.get("pad_token"),
        bos_token=cfg.get("bos_token"),
        additional_special_tokens=cfg.get("additional_special_tokens"),
        clean_up_tokenization_spaces=cfg.get("clean_up_tokenization_spaces", False),
        padding_side=cfg.get("padding_side", "right"),
    )
    tok.chat_template = cfg.get("chat_template", CHAT_TEMPLATE)
    tok.name_or_path = str(path)
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.models.tokenizer", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder to write the tokenizer files into")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary size")
    parser.add_argument("files", nargs="*", type=Path,
                        help="training files (default: the pretraining corpus's train split)")
    args = parser.parse_args(argv)
    tok = train_tokenizer(args.files or None, vocab_size=args.vocab_size)
    out = save_tokenizer(tok, args.out)
    print(f"wrote {out} (vocab {tok.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
