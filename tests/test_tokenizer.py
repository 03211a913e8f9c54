"""The tiny-moe tokenizer: committed files, special tokens, chat template and assistant mask."""

from __future__ import annotations

import json

import pytest

from studio.models import tokenizer as T


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer()


CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is an offer?"},
    {"role": "assistant", "content": "A definite proposal.\nIt binds once accepted."},
    {"role": "user", "content": "And acceptance?"},
    {"role": "assistant", "content": "Agreement to all the terms."},
]


def test_committed_files_and_vocab(tok):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (T.DEFAULT_DIR / name).is_file()
    cfg = json.loads((T.DEFAULT_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == T.CHAT_TEMPLATE
    assert 4000 <= len(tok) <= 8000
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.bos_token is None


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "  leading spaces\tand tabs\n\nnew paragraphs  ",
    "def f(x: int) -> int:\n    return x ** 2  # café, naïve, 東京 🙂",
    "",
])
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
    ids = []
    for i, special in enumerate(T.SPECIAL_TOKENS):
        enc = tok(f"a{special}b", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(special) in enc
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
        ids.append(tok.convert_tokens_to_ids(special))
    assert ids == list(range(len(T.SPECIAL_TOKENS)))
    # no BOS/EOS are silently added to plain encodes
    assert tok("abc")["input_ids"] == tok("abc", add_special_tokens=False)["input_ids"]


def test_chat_template_rendering(tok):
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nYou are brief.<|end|>\n<|user|>\nWhat is an offer?<|end|>\n<|assistant|>\n"
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert full.endswith("<|assistant|>\nAgreement to all the terms.<|end|>\n")


def test_assistant_mask_covers_content_and_end_only(tok):
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    spans, current = [], []
    for token_id, m in zip(ids, mask):
        if m:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    expected = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert [tok.decode(s) for s in spans] == [c + "<|end|>" for c in expected]
    end_id = tok.convert_tokens_to_ids("<|end|>")
    assert all(s[-1] == end_id for s in spans)


def test_trl_sees_generation_markers_and_trained_stop_token(tok):
    chat_utils = pytest.importorskip("trl.chat_template_utils")
    assert chat_utils.has_generation_markers(tok.chat_template)
    assert chat_utils.is_chat_template_stop_token_trained(tok)


def test_training_is_deterministic_and_matches_committed(tmp_path):
    a = T.save_tokenizer(T.train_tokenizer(), tmp_path / "a")
    b = T.save_tokenizer(T.train_tokenizer(), tmp_path / "b")
    data = (a / "tokenizer.json").read_bytes()
    assert data == (b / "tokenizer.json").read_bytes()
    # the committed assets are what the entry point builds from the shipped samples
    assert data == (T.DEFAULT_DIR / "tokenizer.json").read_bytes()
    assert (a / "tokenizer_config.json").read_bytes() == (T.DEFAULT_DIR / "tokenizer_config.json").read_bytes()


def test_entry_point_writes_loadable_tokenizer(tmp_path):
    assert T.main(["--out", str(tmp_path / "tok"), "--vocab-size", "4096"]) == 0
    tok = T.load_tokenizer(tmp_path / "tok")
    assert len(tok) == 4096
    assert tok.decode(tok("round trip")["input_ids"]) == "round trip"
