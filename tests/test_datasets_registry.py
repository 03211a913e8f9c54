"""The datasets registry: shipped samples, versions, references, splits, atomicity, CLI."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from studio import cli
from studio.data import DatasetRegistry, DatasetVersion, resolve_dataset
from studio.data.registry import sanitise_name, split_rows, validate_name
from studio.errors import DatasetError


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "registry"
    monkeypatch.setenv("STUDIO_DATASETS_ROOT", str(r))
    monkeypatch.delenv("STUDIO_DATASET_MAX_BYTES", raising=False)
    return r


@pytest.fixture
def reg(root):
    return DatasetRegistry()


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n, tag=""):
    return [{"question": f"question {i}{tag}", "answer": f"answer {i}{tag}"} for i in range(n)]


def snapshot(reg: DatasetRegistry):
    """Catalog rows and stored folders: what a failed registration must leave unchanged."""
    rows = []
    if reg.catalog_path.exists():
        con = sqlite3.connect(reg.catalog_path)
        rows = con.execute("SELECT * FROM versions ORDER BY name, number").fetchall()
        rows += con.execute("SELECT * FROM counters ORDER BY name").fetchall()
        con.close()
    stored = sorted(p.name for p in reg.store.iterdir()) if reg.store.exists() else []
    return rows, stored


# -----------------------------------------------------------------------------
# shipped samples


@pytest.mark.parametrize("name,fmt", [("law", "alpaca"), ("medicine", "sharegpt"), ("code", "messages")])
def test_shipped_sample_registers_on_first_reference(reg, name, fmt):
    assert reg.list() == []
    v = reg.get(name)
    assert (v.name, v.number, v.ref, v.format) == (name, 1, f"{name}@v1", fmt)
    assert v.rows_train >= 300 and v.rows_eval >= 60 and v.dropped == {}
    assert v.split["mode"] == "file"
    train, eval_ = v.train_messages(), v.eval_messages()
    assert (len(train), len(eval_)) == (v.rows_train, v.rows_eval)
    for row in train[:50] + eval_[:50]:
        assert {m["role"] for m in row} <= {"system", "user", "assistant"}
        assert row[-1]["role"] == "assistant" and row[-1]["content"]
    # eval rows are not copies of train rows
    seen = {json.dumps(r) for r in train}
    assert not any(json.dumps(r) in seen for r in eval_)
    # second reference: same version, nothing new
    assert reg.get(name) == v and [x.ref for x in reg.list()] == [f"{name}@v1"]


def test_manifest_matches_sample_files(reg):
    samples = {s["name"]: s for s in reg.shipped_samples()}
    assert set(samples) == {"law", "medicine", "code"}
    for name, s in samples.items():
        v = reg.get(name)
        assert s["rows"] == {"train": v.rows_train, "eval": v.rows_eval}
        assert s["licence"] and s["provenance"]


def test_load_split_gives_messages_dataset(reg):
    ds = reg.get("code").load_split("train")
    assert ds.column_names == ["messages"] and len(ds) >= 300
    assert set(ds[0]["messages"][0]) == {"role", "content"}
    with pytest.raises(DatasetError, match="split"):
        reg.get("code").load_split("test")


# -----------------------------------------------------------------------------
# versions and references


def test_versions_and_references(reg, tmp_path):
    f = jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    v1 = reg.add(f, "qa")
    assert (v1.ref, v1.rows_train, v1.rows_eval, v1.format) == ("qa@v1", 36, 4, "question_answer")
    assert len(v1.hash) == 64

    # identical content, even from another path: same version, no new number
    same = reg.add(jsonl(tmp_path / "copy.jsonl", qa_rows(40)), "qa")
    assert same == v1 and len(reg.versions("qa")) == 1

    # changed content: the next number
    v2 = reg.add(jsonl(f, qa_rows(41)), "qa")
    assert (v2.ref, v2.number) == ("qa@v2", 2) and v2.hash != v1.hash
    # changed split settings are a new version too
    v3 = reg.add(f, "qa", eval_ratio=0.2)
    assert v3.ref == "qa@v3"

    assert reg.get("qa") == v3
    assert reg.get("qa@v1") == v1
    assert reg.get(f"qa@{v2.hash[:6]}") == v2
    assert reg.get(f"qa@{v2.hash.upper()}") == v2
    assert [v.ref for v in reg.versions("qa")] == ["qa@v1", "qa@v2", "qa@v3"]
    for bad in ("qa@v9", "qa@abc", "qa@zzzzzzzz", "nothere"):
        with pytest.raises(DatasetError):
            reg.get(bad)

    # re-registering v1's content returns v1 (content-addressed), latest stays v3
    assert reg.add(jsonl(f, qa_rows(40)), "qa") == v1 and reg.get("qa") == v3

    # the same content under another name shares the stored folder
    other = reg.add(f, "qa-copy")
    assert other.hash == v1.hash and other.ref == "qa-copy@v1" and other.path == v1.path


def test_remove_version_and_name(reg, tmp_path):
    f = tmp_path / "qa.jsonl"
    v1 = reg.add(jsonl(f, qa_rows(10)), "qa")
    v2 = reg.add(jsonl(f, qa_rows(11)), "qa")
    shared = reg.add(jsonl(f, qa_rows(10)), "other")  # same data as qa@v1
    assert [v.ref for v in reg.remove("qa@v1")] == ["qa@v1"]
    assert v1.path.is_dir()  # still used by other@v1
    assert reg.get("qa") == v2
    # numbers are never reused
    assert reg.add(jsonl(f, qa_rows(12)), "qa").ref == "qa@v3"
    removed = reg.remove("qa")
    assert {v.ref for v in removed} == {"qa@v2", "qa@v3"} and not v2.path.exists()
    reg.remove(shared.ref)
    assert not v1.path.exists() and reg.list() == []
    with pytest.raises(DatasetError, match="no dataset"):
        reg.remove("qa")


def test_removed_sample_comes_back_on_reference(reg):
    v = reg.get("law")
    reg.remove("law")
    assert reg.list() == []
    again = reg.get("law")
    assert again.hash == v.hash and again.number == 2


# -----------------------------------------------------------------------------
# split


def test_split_is_deterministic_and_seeded(reg, tmp_path):
    rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(200)]
    t1, e1 = split_rows(rows, 0.1, seed=0)
    t2, e2 = split_rows(rows, 0.1, seed=0)
    assert (t1, e1) == (t2, e2) and len(e1) == 20 and len(t1) == 180
    assert split_rows(rows, 0.1, seed=1)[1] != e1
    # order within each split follows the file
    assert [rows.index(r) for r in e1] == sorted(rows.index(r) for r in e1)
    assert split_rows(rows, 0.0, 0) == (rows, [])
    assert len(split_rows(rows[:3], 0.5, 0)[1]) in (1, 2)
    with pytest.raises(DatasetError, match="eval_ratio"):
        split_rows(rows, 1.0, 0)

    f = jsonl(tmp_path / "qa.jsonl", qa_rows(50))
    a = reg.add(f, "a", seed=3)
    b = DatasetRegistry(root=tmp_path / "elsewhere").add(f, "b", seed=3)
    assert a.hash == b.hash and a.eval_messages() == b.eval_messages()
    assert reg.add(f, "a", seed=4).hash != a.hash


def test_explicit_eval_file(reg, tmp_path):
    v = reg.add(jsonl(tmp_path / "t.jsonl", qa_rows(30)), "qa",
                eval_path=jsonl(tmp_path / "e.jsonl", qa_rows(7, tag="e")))
    assert (v.rows_train, v.rows_eval, v.split["mode"]) == (30, 7, "file")
    assert v.eval_messages()[0][0]["content"] == "question 0e"


# -----------------------------------------------------------------------------
# bad input leaves the catalog and the store unchanged


BAD_FILES = {
    "malformed.jsonl": ('{"question": "q", "answer": "a"}\n{"question": oops}\n', "line 2, column 14"),
    "notlist.json": ('{"question": "q", "answer": "a"}', "not a list of records"),
    "nocols.csv": ("alpha,beta\n1,2\n", "accepted column sets: instruction + output"),
    "empty.jsonl": ("", "empty"),
    "latin1.csv": (b"question,answer\ncaf\xe9,ok\n", "offset 19"),
    "binary.jsonl": (b"\x00\x01\x02\x03binary", "binary"),
    "emptyanswer.jsonl": ('{"question": "q", "answer": ""}\n', "no usable rows"),
}


@pytest.mark.parametrize("filename", sorted(BAD_FILES))
def test_bad_input_leaves_catalog_unchanged(reg, tmp_path, filename):
    reg.get("law")
    reg.add(jsonl(tmp_path / "good.jsonl", qa_rows(20)), "target")
    before = snapshot(reg)
    content, fragment = BAD_FILES[filename]
    bad = tmp_path / filename
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError) as info:
        reg.add(bad, "target")
    assert fragment in str(info.value) and filename in str(info.value)
    # also as an explicit eval file next to a good train file
    with pytest.raises(DatasetError):
        reg.add(tmp_path / "good.jsonl", "target", eval_path=bad)
    assert snapshot(reg) == before
    assert reg.get("target").ref == "target@v1"


def test_empty_assistant_drop_or_error(reg, tmp_path):
    rows = qa_rows(20) + [{"question": "unanswered", "answer": "  "}]
    f = jsonl(tmp_path / "qa.jsonl", rows)
    before = snapshot(reg)
    with pytest.raises(DatasetError, match="line 21: empty assistant turn"):
        reg.add(f, "qa", on_empty_assistant="error")
    assert snapshot(reg) == before
    v = reg.add(f, "qa")
    assert v.dropped == {"empty_assistant": 1} and v.rows_train + v.rows_eval == 20
    assert reg.stats("qa", tokenizer=_WhitespaceTokenizer())["dropped"] == {"empty_assistant": 1}


def test_size_limit(root, tmp_path, monkeypatch):
    f = jsonl(tmp_path / "qa.jsonl", qa_rows(20))
    reg = DatasetRegistry(max_bytes=100)
    with pytest.raises(DatasetError, match="over the limit of 100 bytes"):
        reg.add(f, "qa")
    monkeypatch.setenv("STUDIO_DATASET_MAX_BYTES", "200")
    with pytest.raises(DatasetError, match="over the limit of 200 bytes"):
        DatasetRegistry().add(f, "qa")
    assert snapshot(reg) == ([], [])
    assert DatasetRegistry(max_bytes=10_000).add(f, "qa").ref == "qa@v1"


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", "a..b", ".hidden", "-x", "", "sp ace",
                                  "law@v1", "x" * 101, "é"])
def test_invalid_names(reg, tmp_path, name):
    f = jsonl(tmp_path / "qa.jsonl", qa_rows(5))
    reg.add(f, "ok")
    before = snapshot(reg)
    with pytest.raises(DatasetError, match="name"):
        reg.add(f, name)
    assert snapshot(reg) == before
    assert not (tmp_path / "evil").exists()


def test_valid_names_and_sanitise():
    for name in ("law", "Law_2", "a.b-c", "9lives"):
        assert validate_name(name) == name
    assert sanitise_name("My Data (v2)") == "My-Data-v2"
    assert sanitise_name("..") == "dataset"
    assert validate_name(sanitise_name("a..b c")) == "a.b-c"


def test_failed_sql_leaves_no_stored_data(reg, tmp_path, monkeypatch):
    reg.add(jsonl(tmp_path / "a.jsonl", qa_rows(5)), "a")
    before = snapshot(reg)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("studio.data.registry._now", boom)  # fails after the data is stored
    with pytest.raises(RuntimeError):
        reg.add(jsonl(tmp_path / "b.jsonl", qa_rows(6)), "b")
    assert snapshot(reg) == before


def test_concurrent_registrations_lose_no_versions(root, tmp_path):
    files = [jsonl(tmp_path / f"f{i}.jsonl", qa_rows(5, tag=f"-{i}")) for i in range(6)]
    results, errors = [], []

    def work(f):
        try:
            results.append(DatasetRegistry().add(f, "shared"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v.number for v in results) == [1, 2, 3, 4, 5, 6]
    assert len({v.hash for v in DatasetRegistry().versions("shared")}) == 6


# -----------------------------------------------------------------------------
# preview, stats, resolve_dataset


class _WhitespaceTokenizer:
    """Any HF-like tokenizer works; this one has no chat template and splits on whitespace."""

    name_or_path = "whitespace"
    chat_template = None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def test_preview_and_stats(reg):
    rows = reg.preview("medicine", n=2)
    assert len(rows) == 2 and rows[0][-1]["role"] == "assistant"
    s = reg.stats("medicine")
    assert s["ref"] == "medicine@v1" and s["rows"] == {"train": 330, "eval": 110}
    t = s["tokens"]["train"]
    assert 0 < t["min"] <= t["median"] <= t["max"] and t["total"] > 330 * t["min"] - 1
    s2 = reg.stats("medicine", tokenizer=_WhitespaceTokenizer())
    assert s2["tokenizer"] == "whitespace" and s2["tokens"]["eval"]["min"] > 0


def test_resolve_dataset_ref_or_path(reg, tmp_path):
    assert resolve_dataset("law", reg).ref == "law@v1"
    f = jsonl(tmp_path / "My Notes.jsonl", qa_rows(12))
    v = resolve_dataset(str(f), reg)
    assert v.name == "My-Notes" and isinstance(v, DatasetVersion)
    assert resolve_dataset(f, reg) == v
    assert resolve_dataset("My-Notes@v1", reg) == v


# -----------------------------------------------------------------------------
# CLI


def run_cli(capsys, *argv):
    code = cli.main(["datasets", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_add_list_show_rm(root, tmp_path, capsys):
    f = jsonl(tmp_path / "qa.jsonl", qa_rows(30))
    code, out, _ = run_cli(capsys, "add", str(f), "--name", "qa", "--eval-ratio", "0.2", "--seed", "1")
    assert code == 0 and "registered qa@v1" in out and "train 24, eval 6" in out
    code, out, _ = run_cli(capsys, "add", str(f), "--name", "qa", "--eval-ratio", "0.2", "--seed", "1")
    assert code == 0 and "already registered: qa@v1" in out

    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "qa@v1" in out and "law" in out  # samples listed as available
    code, out, _ = run_cli(capsys, "list", "--json")
    data = json.loads(out)
    assert [v["ref"] for v in data["versions"]] == ["qa@v1"] and "law" in data["samples_available"]

    code, out, _ = run_cli(capsys, "show", "qa", "--rows", "2")
    assert code == 0 and "qa@v1" in out and "[user] question 0" in out and "tokens/train" in out
    code, out, _ = run_cli(capsys, "show", "qa@v1", "--json", "--rows", "1", "--no-stats")
    data = json.loads(out)
    assert data["version"]["rows_train"] == 24 and len(data["preview"]) == 1

    code, out, _ = run_cli(capsys, "inspect", str(f), "--rows", "1")
    assert code == 0 and "question_answer" in out and "30 rows" in out

    code, out, _ = run_cli(capsys, "rm", "qa@v1")
    assert code == 0 and "removed qa@v1" in out
    code, out, err = run_cli(capsys, "show", "qa")
    assert code == 2 and err.startswith("error: no dataset 'qa'")


def test_cli_errors_are_clean(root, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{broken\n', encoding="utf-8")
    code, out, err = run_cli(capsys, "add", str(bad), "--name", "qa")
    assert code == 2 and "line 2" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "add", str(bad), "--name", "../x")
    assert code == 2 and "invalid dataset name" in err
    code, out, _ = run_cli(capsys, "inspect", str(bad))
    assert code == 2 and "line 2" in out


def test_resolve_missing_path_says_no_such_file(reg, tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        resolve_dataset(str(tmp_path / "missing.jsonl"), reg)
    with pytest.raises(DatasetError, match="no such file"):
        resolve_dataset(tmp_path / "missing.jsonl", reg)
