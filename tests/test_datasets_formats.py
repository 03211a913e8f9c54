"""Format detection, normalisation to chat messages and the errors bad files get."""

from __future__ import annotations

import json

import pytest

from studio.data import formats
from studio.data.formats import inspect_file, load_file
from studio.errors import DatasetError


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


U, A, S = "user", "assistant", "system"


def msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


# -----------------------------------------------------------------------------
# detection and normalisation, one case per format


def test_alpaca_jsonl(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Define it.", "input": "offer", "output": "A proposal."},
        {"instruction": "Say hi", "input": "", "output": " Hi! "},
    ])
    res = load_file(p)
    assert (res.file_format, res.format) == ("jsonl", "alpaca")
    assert res.rows == [msgs((U, "Define it.\n\noffer"), (A, "A proposal.")), msgs((U, "Say hi"), (A, "Hi!"))]


def test_sharegpt_json_with_system(tmp_path):
    p = write(tmp_path / "s.json", json.dumps([
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                           {"from": "gpt", "value": "Bye!"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ]))
    res = load_file(p)
    assert (res.file_format, res.format) == ("json", "sharegpt")
    assert res.rows[0] == msgs((S, "Be kind."), (U, "Hi"), (A, "Hello"), (U, "Bye"), (A, "Bye!"))
    assert res.rows[1] == msgs((U, "Q"), (A, "A"))


def test_messages_jsonl_with_content_parts(tmp_path):
    p = jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                      {"role": "assistant", "content": "Hey"}]},
    ])
    res = load_file(p)
    assert res.format == "messages"
    assert res.rows == [msgs((U, "2+2?"), (A, "4")), msgs((U, "Hi"), (A, "Hey"))]


@pytest.mark.parametrize("header,row,fmt,expected", [
    ("prompt,completion", '"Capital of France?",Paris', "prompt_completion", msgs((U, "Capital of France?"), (A, "Paris"))),
    ("Question,Answer,System", 'Why?,"Because, reasons",Be brief', "question_answer",
     msgs((S, "Be brief"), (U, "Why?"), (A, "Because, reasons"))),
    ("instruction,input,output", "Translate,chat,cat", "alpaca", msgs((U, "Translate\n\nchat"), (A, "cat"))),
])
def test_csv_columns(tmp_path, header, row, fmt, expected):
    res = load_file(write(tmp_path / "d.csv", f"{header}\n{row}\n"))
    assert (res.file_format, res.format, res.rows) == ("csv", fmt, [expected])


def test_csv_multiline_cell_and_tsv(tmp_path):
    res = load_file(write(tmp_path / "d.csv", 'question,answer\n"line one\nline two",ok\n'))
    assert res.rows == [msgs((U, "line one\nline two"), (A, "ok"))]
    res = load_file(write(tmp_path / "d.tsv", "prompt\tcompletion\na, b\tc\n"))
    assert res.rows == [msgs((U, "a, b"), (A, "c"))]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "answer": ["A1", "A2"]}), p)
    res = load_file(p)
    assert (res.file_format, res.format) == ("parquet", "question_answer")
    assert res.rows[1] == msgs((U, "Q2"), (A, "A2"))
    # a messages column stored as a list of structs
    p2 = tmp_path / "m.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]}), p2)
    assert load_file(p2).rows == [msgs((U, "x"), (A, "y"))]


def test_plain_text_paragraphs_become_assistant_documents(tmp_path):
    res = load_file(write(tmp_path / "d.txt", "First paragraph\nstill first.\n\n  \nSecond one.\n\n\nThird.\n"))
    assert (res.file_format, res.format) == ("text", "text")
    assert res.rows == [msgs((A, "First paragraph\nstill first.")), msgs((A, "Second one.")), msgs((A, "Third."))]


def test_text_field_and_jsonl_named_json(tmp_path):
    p = write(tmp_path / "t.json", '{"text": "doc one"}\n{"text": "doc two"}\n')
    res = load_file(p)
    assert (res.file_format, res.format, len(res.rows)) == ("jsonl", "text", 2)


def test_sniffs_unknown_extension(tmp_path):
    p = jsonl(tmp_path / "data.dat", [{"prompt": "p", "completion": "c"}])
    assert load_file(p).format == "prompt_completion"


def test_drop_reasons_are_counted(tmp_path):
    p = jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]},
        {"messages": [{"role": "user", "content": "empty"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]},
    ])
    res = load_file(p)
    assert len(res.rows) == 1 and res.raw_rows == 5
    assert dict(res.dropped) == {"empty_assistant": 1, "no_assistant_turn": 1, "unsupported_role": 1,
                                 "no_user_turn": 1}


def test_deterministic_normalisation(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    assert load_file(p).rows == load_file(p).rows


# -----------------------------------------------------------------------------
# bad input: specific messages naming file, line and the expected format


def raises(path, *fragments, **kw):
    with pytest.raises(DatasetError) as info:
        load_file(path, **kw)
    msg = str(info.value)
    assert path.name in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_malformed_jsonl_names_line_and_column(tmp_path):
    p = write(tmp_path / "bad.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "a" "completion": "b"}\n')
    raises(p, "line 3, column 16", "invalid JSON", "one JSON object per line")


def test_malformed_json_names_line_and_column(tmp_path):
    p = write(tmp_path / "bad.json", '[\n  {"prompt": "a",\n   "completion": }\n]')
    raises(p, "line 3, column 18", "invalid JSON")


@pytest.mark.parametrize("content,fragment", [
    ('{"data": [{"prompt": "a", "completion": "b"}]}', "top level is an object (keys: data)"),
    ('"just a string"', "top level is a str"),
    ("[1, 2, 3]", "record 1: expected a JSON object"),
])
def test_json_not_a_list_of_records(tmp_path, content, fragment):
    raises(write(tmp_path / "bad.json", content), fragment, "instruction")


def test_csv_without_recognisable_columns_lists_accepted(tmp_path):
    msg = raises(write(tmp_path / "bad.csv", "foo,bar\n1,2\n"), "no recognisable columns", "found: foo, bar")
    for name in ("instruction", "output", "prompt", "completion", "question", "answer", "messages", "text"):
        assert name in msg


def test_unrecognised_record_keys(tmp_path):
    raises(jsonl(tmp_path / "bad.jsonl", [{"foo": 1}]), "line 1", "unrecognised record", "`messages`")


def test_mixed_formats_in_one_file(tmp_path):
    p = jsonl(tmp_path / "mix.jsonl", [{"prompt": "p", "completion": "c"}, {"question": "q", "answer": "a"}])
    raises(p, "line 2", "prompt_completion")


@pytest.mark.parametrize("content", [b"", b"  \n\n \n", "\ufeff".encode()])
def test_empty_file(tmp_path, content):
    raises(write(tmp_path / "empty.jsonl", content), "empty")


def test_empty_csv_header_only_has_no_records(tmp_path):
    raises(write(tmp_path / "h.csv", "prompt,completion\n"), "no records")


def test_non_utf8_names_byte_offset(tmp_path):
    p = write(tmp_path / "latin.jsonl", '{"prompt": "caf'.encode() + b"\xe9" + b'", "completion": "x"}\n')
    raises(p, "not valid UTF-8", "offset 15", "line 1", "re-encode", "UTF-8")


def test_utf16_is_explained(tmp_path):
    raises(write(tmp_path / "u16.jsonl", '{"prompt": "a"}'.encode("utf-16")), "UTF-16", "re-encode")


def test_binary_file(tmp_path):
    p = write(tmp_path / "blob.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    raises(p, "binary", "NUL byte at offset 8")


def test_corrupt_parquet(tmp_path):
    raises(write(tmp_path / "c.parquet", b"PAR1 this is not really parquet PAR1"), "Parquet")


def test_empty_assistant_dropped_or_rejected(tmp_path):
    p = jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}])
    res = load_file(p)
    assert len(res.rows) == 1 and res.dropped == {"empty_assistant": 1}
    raises(p, "line 2", "empty assistant turn", on_empty_assistant="error")
    with pytest.raises(DatasetError, match="on_empty_assistant"):
        load_file(p, on_empty_assistant="keep")


def test_all_rows_dropped_is_an_error(tmp_path):
    raises(jsonl(tmp_path / "e.jsonl", [{"instruction": "c", "output": ""}]), "no usable rows", "empty_assistant: 1")


def test_size_limit_argument_and_env(tmp_path, monkeypatch):
    p = jsonl(tmp_path / "big.jsonl", [{"prompt": "p" * 100, "completion": "c"}])
    raises(p, "over the limit of 50 bytes", "STUDIO_DATASET_MAX_BYTES", max_bytes=50)
    monkeypatch.setenv("STUDIO_DATASET_MAX_BYTES", "60")
    raises(p, "over the limit of 60 bytes")
    monkeypatch.setenv("STUDIO_DATASET_MAX_BYTES", "lots")
    with pytest.raises(DatasetError, match="not an integer"):
        load_file(p)


def test_wrong_turn_shape(tmp_path):
    raises(jsonl(tmp_path / "t.jsonl", [{"messages": [{"speaker": "u", "text": "x"}]}]), "line 1", "{role, content}")
    raises(jsonl(tmp_path / "t2.jsonl", [{"messages": "hello"}]), "must be a list of turns")


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_file(tmp_path / "nope.jsonl")


# -----------------------------------------------------------------------------
# inspect_file: the UI's look at an upload before registering it


def test_inspect_file_ok_and_bad(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)])
    info = inspect_file(p, n=2)
    assert (info["format"], info["file_format"], info["rows"], info["errors"]) == ("alpaca", "jsonl", 8, [])
    assert info["preview"] == [msgs((U, "q0"), (A, "a0")), msgs((U, "q1"), (A, "a1"))]
    bad = inspect_file(write(tmp_path / "bad.jsonl", "{nope"))
    assert bad["format"] is None and bad["rows"] == 0 and "line 1" in bad["errors"][0]


def test_max_bytes_default(monkeypatch):
    monkeypatch.delenv(formats.MAX_BYTES_ENV, raising=False)
    assert formats.max_bytes_from_env() == formats.DEFAULT_MAX_BYTES
