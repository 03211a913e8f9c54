"""The one place chat messages become token ids, for training, eval, the engine and the server alike.

`encode_chat(tokenizer, messages)` renders the chat template and tokenizes it so that control tokens typed inside a
message (`<|end|>`, `<|assistant|>`, `<|im_start|>` ...) are encoded as plain text, never as the real control tokens:
a user cannot forge a turn. Messages without such text tokenize exactly as `apply_chat_template` tokenizes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.errors import DatasetError


@dataclass
class EncodedChat:
    input_ids: list[int]
    assistant_masks: list[int] | None = None   # 1 on tokens the assistant wrote (and its end-of-turn token)


def control_tokens(tokenizer, chat_template: str | None = None) -> tuple[str, ...]:
    """The added tokens the template uses as structure (transformers' own choice for `sanitize_control_tokens`)."""
    template = chat_template or getattr(tokenizer, "chat_template", None) or ""
    try:
        return tuple(tokenizer._get_control_tokens(template))
    except AttributeError:  # a tokenizer class without the helper: every special added token
        return tuple(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)


def _ids(encoded) -> list[int]:
    """apply_chat_template returns a BatchEncoding in transformers 5 and a plain list in 4."""
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def has_control_text(tokenizer, messages: list[dict], chat_template: str | None = None) -> bool:
    tokens = control_tokens(tokenizer, chat_template)
    return any(isinstance(m.get("content"), str) and any(t in m["content"] for t in tokens) for m in messages)


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                chat_template: str | None = None, assistant_mask: bool = False) -> EncodedChat:
    """Token ids (and with `assistant_mask`, the assistant-token mask of `{% generation %}` templates) of one chat."""
    kwargs = {"add_generation_prompt": add_generation_prompt, "tokenize": True, "return_dict": True}
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    if not has_control_text(tokenizer, messages, chat_template):  # the common case: exactly transformers' encoding
        out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=assistant_mask, **kwargs)
        return EncodedChat(_ids(out), list(out["assistant_masks"]) if assistant_mask else None)
    if not assistant_mask:
        # transformers marks control tokens in the messages and encodes the marked ones as text
        out = tokenizer.apply_chat_template(messages, sanitize_control_tokens=True, **kwargs)
        return EncodedChat(_ids(out))
    return _encode_marked_with_mask(tokenizer, messages, chat_template or tokenizer.chat_template,
                                    add_generation_prompt)


def _encode_marked_with_mask(tokenizer, messages, template: str, add_generation_prompt: bool) -> EncodedChat:
    """transformers' `sanitize_control_tokens` refuses `return_assistant_tokens_mask`; this does both: the same
    marking and piecewise encoding, with each piece's token offsets mapped onto the template's generation spans."""
    from transformers.utils import chat_template_utils as ctu

    control_re, _ = ctu._get_control_token_patterns(control_tokens(tokenizer, template))
    marked = ctu.mark_control_tokens(messages, control_re)
    (rendered,), (spans,) = ctu.render_jinja_template(
        conversations=[marked], chat_template=template, return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)
    _, markers_re = ctu._get_control_token_patterns(tuple(tokenizer.added_tokens_encoder))
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    mask: list[int] = []

    def in_generation(pos: int) -> int:
        return int(any(s <= pos < e for s, e in spans))

    def add(piece: str, start: int, as_text: bool) -> None:
        if not piece:
            return
        # after a newline, so SentencePiece adds no prefix space (as transformers' encode_marked_chat does)
        enc = tokenizer("\n" + piece, add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=as_text)
        piece_ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        shift = -1
        if piece_ids[:len(newline)] == newline:
            piece_ids, offsets = piece_ids[len(newline):], offsets[len(newline):]
        else:
            enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
            piece_ids, offsets, shift = list(enc["input_ids"]), list(enc["offset_mapping"]), 0
        if as_text and tokenizer.convert_tokens_to_ids(piece) in piece_ids:
            raise DatasetError(f"cannot encode {piece!r} as text: this tokenizer produces the control token from "
                               "plain text")
        ids.extend(piece_ids)
        mask.extend(in_generation(start + max(o[0] + shift, 0)) for o in offsets)

    pos = 0
    for m in markers_re.finditer(rendered):
        add(rendered[pos:m.start()], pos, False)
        if m.group(1) is not None:  # a marked control token from a message: text
            add(m.group(1), m.start() + 1, True)
        pos = m.end()
    add(rendered[pos:], pos, False)
    return EncodedChat(ids, mask)
