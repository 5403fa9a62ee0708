"""metrics.jsonl writing and reading, including damage from killed runs."""

import logging
from pathlib import Path

import pytest

from cotune.errors import CotuneError
from cotune.report import MetricsLog, read_metrics
from cotune.report.metrics import main_series, series_by_role


def test_log_writes_one_flushed_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "m" / "metrics.jsonl"
    log = MetricsLog(path)
    log.log({"event": "train", "step": 1, "loss": 2.0})
    # Flushed: readable before close.
    assert read_metrics(path) == [{"event": "train", "step": 1, "loss": 2.0}]
    log.log({"event": "eval", "step": 1, "accuracy": 0.5})
    log.close()
    assert path.read_text().count("\n") == 2
    with pytest.raises(CotuneError, match="event"):
        MetricsLog(path).log({"step": 3})


def test_bad_middle_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event":"train","step":1}\n{"event": oops}\n{"event":"train","step":2}\n')
    with pytest.raises(CotuneError, match=r"metrics.jsonl:2: "):
        read_metrics(path)
    path.write_text('{"event":"train","step":1}\n[1, 2]\n')
    with pytest.raises(CotuneError, match=r":2: .*JSON object"):
        read_metrics(path)


def test_truncated_last_line_is_skipped_and_repaired(tmp_path: Path, caplog) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event":"train","step":1}\n{"event":"train","st')
    with caplog.at_level(logging.WARNING):
        assert read_metrics(path) == [{"event": "train", "step": 1}]
    assert "truncated last line" in caplog.text
    # A resumed run appending to the same file must not glue onto the partial line.
    with MetricsLog(path) as log:
        log.log({"event": "train", "step": 2})
        assert [r["step"] for r in log.records] == [1, 2]
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CotuneError, match="does not exist"):
        read_metrics(tmp_path / "nope.jsonl")


def test_series_dedupes_resumed_steps_and_averages_devices() -> None:
    recs = [
        {"event": "train", "step": 1, "role": "device-0", "loss": 4.0},
        {"event": "train", "step": 1, "role": "device-1", "loss": 2.0},
        {"event": "train", "step": 2, "role": "device-0", "loss": 9.0},
        {"event": "train", "step": 2, "role": "device-0", "loss": 1.0},  # re-logged after resume
        {"event": "train", "step": 3, "role": "device-10"},  # no loss: ignored
        {"event": "eval", "step": 1, "role": "server", "loss": 5.0},
    ]
    by_role = series_by_role(recs, "train", "loss")
    assert by_role["device-0"] == ([1.0, 2.0], [4.0, 1.0])
    assert main_series(by_role) == ([1.0, 2.0], [3.0, 1.0])
