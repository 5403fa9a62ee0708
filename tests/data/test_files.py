import json
import sys
import types

import pytest

from cotune.config import DataSection
from cotune.data import load_task_data, read_file
from cotune.errors import DataError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=40):
    return [{"text": f"text number {i}", "label": ["b", "a", "c"][i % 3]} for i in range(n)]


def test_jsonl_labels_sorted_split_and_cap(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", _rows(60))
    d = load_task_data(DataSection(dataset=str(f), test_fraction=0.25), "classification", seed=1)
    assert d.label_names == ["a", "b", "c"]
    assert len(d.train) == 45 and len(d.test) == 15
    # stratified: each label keeps its share of the test set
    assert sorted(e.label for e in d.test) == [0] * 5 + [1] * 5 + [2] * 5
    assert {e.text for e in d.train}.isdisjoint({e.text for e in d.test})
    capped = load_task_data(DataSection(dataset=str(f), max_examples=9), "classification", seed=1)
    assert sorted(e.label for e in capped.train) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_numeric_labels_sort_numerically(tmp_path):
    f = _jsonl(
        tmp_path / "d.jsonl", [{"text": f"t{i}", "label": [2, 10, 1][i % 3]} for i in range(9)]
    )
    assert load_task_data(DataSection(dataset=str(f)), "classification", 0).label_names == [
        "1",
        "2",
        "10",
    ]


def test_csv_fields_and_test_file(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('body,cls\n"hello, world",x\nsecond,y\n"multi\nline",x\n')
    t = tmp_path / "t.csv"
    t.write_text("body,cls\nthird,y\n")
    cfg = DataSection(dataset=str(f), text_field="body", label_field="cls", test_file=str(t))
    d = load_task_data(cfg, "classification", seed=0)
    assert [e.text for e in d.train] == ["hello, world", "second", "multi\nline"]
    assert d.label_names == ["x", "y"] and d.test[0].label == 1


def test_causal_lm_ignores_labels(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": f"only text {i}"} for i in range(10)])
    d = load_task_data(DataSection(dataset=str(f)), "causal_lm", seed=0)
    assert d.label_names is None and len(d.train) == 8


def test_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(
        DataError, match=r"bad\.jsonl:2: not valid JSON at column 10 \(Expecting value\)$"
    ):
        read_file(f, "text", "label")
    # json's message for a raw control character ends in "at": said once, with the column.
    f.write_text('{"text": "a\tb", "label": "x"}\n')
    with pytest.raises(
        DataError, match=r"bad\.jsonl:1: not valid JSON at column 12 \(Invalid control character\)$"
    ):
        read_file(f, "text", "label")


def test_missing_field_names_field_line_and_existing_fields(tmp_path):
    f = _jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "tag": "y"}])
    with pytest.raises(DataError) as err:
        read_file(f, "text", "label")
    msg = str(err.value)
    assert "m.jsonl:2" in msg and "'label'" in msg and "text, tag" in msg
    with pytest.raises(
        DataError, match=r"m\.jsonl:1: no text field 'body' \(fields there: text, label\)"
    ):
        read_file(f, "body", "label")


def test_csv_missing_label_column(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,category\na,x\n")
    with pytest.raises(
        DataError,
        match=r"d\.csv: no label column 'label' in the header \(columns: text, category\)",
    ):
        read_file(f, "text", "label")


def test_empty_files(tmp_path):
    for name in ("e.jsonl", "e.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match="empty file"):
            read_file(tmp_path / name, "text", "label")
    with pytest.raises(DataError, match="not found"):
        read_file(tmp_path / "nope.jsonl", "text", "label")


def test_label_filter_errors(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", _rows(9))
    with pytest.raises(DataError, match=r"\['zzz'\] do not occur .*labels there: a, b, c"):
        load_task_data(DataSection(dataset=str(f), labels=["zzz"]), "classification", 0)
    t = _jsonl(tmp_path / "t.jsonl", [{"text": "q", "label": "b"}])
    with pytest.raises(DataError, match="keeps no examples of the test file"):
        load_task_data(
            DataSection(dataset=str(f), labels=["a"], test_file=str(t)), "classification", 0
        )


def test_hf_missing_package_and_fake_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataError, match="pip install datasets"):
        load_task_data(DataSection(dataset="hf:imdb"), "classification", 0)

    class Split(list):
        features = {"label": types.SimpleNamespace(names=["neg", "pos"])}

    def load_dataset(name, config):
        assert (name, config) == ("fake", "cfg")
        mk = lambda n: Split({"sentence": f"s{i}", "label": i % 2} for i in range(n))  # noqa: E731
        return {"train": mk(10), "test": mk(4)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    d = load_task_data(
        DataSection(dataset="hf:fake:cfg", text_field="sentence"), "classification", 0
    )
    assert d.label_names == ["neg", "pos"] and len(d.train) == 10 and len(d.test) == 4
