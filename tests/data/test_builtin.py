import gzip
import json
import subprocess
import sys

import pytest

from cotune.config import DataSection
from cotune.data import format_datasets_table, get_dataset_info, list_datasets, load_task_data
from cotune.data.registry import BUILTIN_DIR
from cotune.errors import DataError


def _records(name: str) -> list[dict]:
    with gzip.open(BUILTIN_DIR / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_shipped_files_match_registry_and_are_small():
    infos = {i.name: i for i in list_datasets()}
    assert set(infos) == {"fortunes", "austen"}
    total = sum((BUILTIN_DIR / i.file).stat().st_size for i in infos.values())
    assert total < 4_000_000
    assert "fortunes" in (BUILTIN_DIR / "LICENSES.md").read_text()
    for name, key in (("fortunes", "label"), ("austen", "novel")):
        rows = _records(name)
        meta, recs = rows[0]["_meta"], rows[1:]
        assert meta["size"] == len(recs) == infos[name].size
        assert sorted({r[key] for r in recs}) == sorted(meta["label_counts"])
        assert all(r["text"].strip() for r in recs)


def test_fortunes_labels_and_lengths():
    info = get_dataset_info("fortunes")
    names = info.label_names["topic"]
    assert len(names) >= 30 and {"computers", "linux", "science"} <= set(names)
    assert 10_000 < info.size < 16_000
    assert max(len(r["text"]) for r in _records("fortunes")[1:]) <= 600


def test_austen_views():
    info = get_dataset_info("austen")
    novels = [
        "Emma",
        "Mansfield Park",
        "Northanger Abbey",
        "Persuasion",
        "Pride and Prejudice",
        "Sense and Sensibility",
    ]
    assert info.label_names["novel"] == novels
    cls = load_task_data(DataSection(dataset="austen"), "classification", seed=0)
    assert cls.name == "austen/novel" and cls.label_names == novels
    lm = load_task_data(DataSection(dataset="austen"), "causal_lm", seed=0)
    assert lm.label_names is None and all(e.label is None for e in lm.train[:50])
    assert lm.domain_names is None and all(e.domain is None for e in lm.train)
    assert len(lm.train) + len(lm.test) == info.size
    # Language modelling on the labelled view: the novel is each passage's domain, and the
    # split keeps every novel's share (stratified by domain).
    by_novel = load_task_data(DataSection(dataset="austen", view="novel"), "causal_lm", seed=0)
    assert by_novel.label_names is None and by_novel.domain_names == novels
    assert all(e.label is None and e.domain is not None for e in by_novel.train)
    assert by_novel.group_names == novels and by_novel.train[0].group == by_novel.train[0].domain
    share = [sum(e.domain == i for e in by_novel.test) / len(by_novel.test) for i in range(6)]
    assert all(0.1 < x < 0.25 for x in share), share  # 1168..1500 passages per novel
    with pytest.raises(DataError, match="no labels"):
        load_task_data(DataSection(dataset="austen", view="text"), "classification", seed=0)
    with pytest.raises(DataError, match="no view 'bogus'"):
        load_task_data(DataSection(dataset="austen", view="bogus"), "classification", seed=0)


def test_builtin_split_filter_and_cap_are_seeded():
    cfg = DataSection(dataset="fortunes", labels=["linux", "perl"], max_examples=50)
    a = load_task_data(cfg, "classification", seed=3)
    b = load_task_data(cfg, "classification", seed=3)
    c = load_task_data(cfg, "classification", seed=4)
    assert a == b and a.train != c.train
    assert a.label_names == ["linux", "perl"] and len(a.train) == 50
    assert {e.label for e in a.train} == {0, 1}


def test_datasets_table_without_torch():
    assert "fortunes" in format_datasets_table() and "novel" in format_datasets_table()
    code = "import sys, cotune.data as d; d.format_datasets_table(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
