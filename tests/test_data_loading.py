"""load_examples: local json/jsonl/parquet/csv files and directories through `datasets`, chat rows, errors."""
from __future__ import annotations

import json

import pytest

from fusion_jax.data.loading import group_by_domain, load_examples
from fusion_jax.errors import DataError

ROWS = [
    {"prompt": "Add 2 and 3.", "response": "5", "source": "a"},
    {"prompt": "Write `print`", "response": "print('héllo, 世界')\n", "source": "b"},
    {"prompt": "Multi\nline", "response": "  leading spaces kept", "source": "c"},
]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf_cache"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _expected(rows, domain):
    return [{"prompt": r["prompt"], "response": r["response"], "domain": domain} for r in rows]


def test_jsonl_json_parquet_csv_and_directory(tmp_path, cache):
    import pandas as pd

    want = _expected(ROWS, "code")
    f_jsonl = _jsonl(tmp_path / "a.jsonl", ROWS)
    f_json = tmp_path / "b.json"
    f_json.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    f_parquet = tmp_path / "c.parquet"
    pd.DataFrame(ROWS).to_parquet(f_parquet)
    f_csv = tmp_path / "d.csv"
    pd.DataFrame(ROWS).to_csv(f_csv, index=False)
    for f in (f_jsonl, f_json, f_parquet, f_csv):
        assert load_examples(f, domain="code", cache_dir=cache) == want, f
    # a directory: its files in name order; limit cuts across files
    both = load_examples(tmp_path, domain="code", cache_dir=cache)
    assert both == want * 4
    assert load_examples(tmp_path, domain="code", limit=4, cache_dir=cache) == want + want[:1]
    # custom field names, domain from a column
    rows = [{"instruction": r["prompt"], "output": r["response"], "area": "math"} for r in ROWS]
    (tmp_path / "sub").mkdir()
    got = load_examples(_jsonl(tmp_path / "sub" / "x.jsonl", rows), prompt_field="instruction",
                        response_field="output", domain_field="area", cache_dir=cache)
    assert got == _expected(ROWS, "math")


def test_directory_with_split_files(tmp_path, cache):
    d = tmp_path / "ds"
    d.mkdir()
    _jsonl(d / "train-00000-of-00002.jsonl", ROWS[:1])
    _jsonl(d / "train-00001-of-00002.jsonl", ROWS[1:2])
    _jsonl(d / "test.jsonl", ROWS[2:])
    assert load_examples(d, domain="x", cache_dir=cache) == _expected(ROWS[:2], "x")
    assert load_examples(d, split="test", domain="x", cache_dir=cache) == _expected(ROWS[2:], "x")
    with pytest.raises(DataError, match=r"ds: no files of split 'validation' \(files are named for splits test, train\)"):
        load_examples(d, split="validation", domain="x", cache_dir=cache)


def test_chat_rows(tmp_path, cache):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                      {"role": "assistant", "content": "6"}]},
    ]
    got = load_examples(_jsonl(tmp_path / "chat.jsonl", rows), domain="text", cache_dir=cache)
    assert got[0] == {"prompt": "hi", "response": "hello!", "domain": "text",
                      "messages": [{"role": "user", "content": "hi"}]}
    assert got[1]["prompt"] == "and 3+3?" and got[1]["response"] == "6"
    assert [t["role"] for t in got[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert got[1]["messages"][2]["content"] == "4"
    bad = [rows[0], {"messages": [{"role": "user", "content": "no answer"}]}]
    with pytest.raises(DataError, match=r"chat_bad.jsonl: row 2: field 'messages' has no assistant turn"):
        load_examples(_jsonl(tmp_path / "chat_bad.jsonl", bad), domain="text", cache_dir=cache)


def test_errors_name_file_row_and_field(tmp_path, cache):
    with pytest.raises(DataError, match=r"nothere.jsonl: no such file or directory"):
        load_examples(tmp_path / "nothere.jsonl", domain="x")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: file is empty"):
        load_examples(empty, domain="x", cache_dir=cache)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match=r"emptydir: directory holds no"):
        load_examples(tmp_path / "emptydir", domain="x")
    rows = [ROWS[0], {"prompt": "p", "answer": "r"}]
    with pytest.raises(DataError, match=r"missing.jsonl: row 2: field 'response' is missing"):
        load_examples(_jsonl(tmp_path / "missing.jsonl", rows), domain="x", cache_dir=cache)
    with pytest.raises(DataError, match=r"nodomain.jsonl: row 1: field 'domain' is missing \(or pass domain"):
        load_examples(_jsonl(tmp_path / "nodomain.jsonl", ROWS), cache_dir=cache)
    with pytest.raises(DataError, match=r"other.jsonl: row 1: field 'question' is missing"):
        load_examples(_jsonl(tmp_path / "other.jsonl", ROWS), prompt_field="question", domain="x", cache_dir=cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: cannot read as json"):
        load_examples(broken, domain="x", cache_dir=cache)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.txt: unsupported file type '.txt'"):
        load_examples(tmp_path / "notes.txt", domain="x")


def test_group_by_domain():
    ex = [{"domain": "a", "prompt": "p", "response": "r"}, {"domain": "b", "prompt": "q", "response": "s"}]
    assert [len(v) for v in group_by_domain(ex, ["b", "a"]).values()] == [1, 1]
    with pytest.raises(DataError, match=r"domain 'c' has no examples"):
        group_by_domain(ex, ["a", "b", "c"])
    with pytest.raises(DataError, match=r"example 1: domain 'b' is not one of"):
        group_by_domain(ex, ["a"])
