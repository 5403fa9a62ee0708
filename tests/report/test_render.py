"""Run and comparison reports from synthetic run directories."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cotune.errors import RunDirError
from cotune.report import write_compare_report, write_run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pngs(d: Path) -> list[Path]:
    pngs = sorted((d / "plots").glob("*.png"))
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC, p
    return pngs


def test_run_report(run_dir: Path) -> None:
    out = write_run_report(run_dir)
    assert out == run_dir / "report.html"
    names = {p.name for p in _pngs(run_dir)}
    assert {"train_loss.png", "train_lr.png", "eval_loss.png", "eval_accuracy.png"} <= names
    assert {"eval_accuracy_vs_sim_time.png", "eval_bytes_up.png"} <= names
    page = out.read_text()
    for expected in (
        "fedavg-lora",
        "777.8 KB",
        "4,096",
        "12.5 s",
        "dirichlet",
        "plots/train_loss.png",
    ):
        assert expected in page, expected
    assert "<pre>name: fedavg-lora\nparadigm:" in page
    md = (run_dir / "report.md").read_text()
    assert "| final.accuracy | 0.8 |" in md and "![train loss](plots/train_loss.png)" in md
    assert "```yaml\nname: fedavg-lora" in md
    # Re-rendering is deterministic.
    write_run_report(run_dir)
    assert out.read_text() == page


def test_run_report_without_summary_or_optional_fields(tmp_path: Path, make_run) -> None:
    d = make_run(tmp_path, "early", summary=False, devices=1, task="causal_lm")
    (d / "metrics.jsonl").open("a").write('{"event":"eval","step":99')  # killed mid-line
    write_run_report(d)
    names = {p.name for p in _pngs(d)}
    assert "eval_perplexity.png" in names and "eval_accuracy.png" not in names
    assert "No summary.json yet." in (d / "report.html").read_text()


def test_not_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="not a run directory"):
        write_run_report(tmp_path)


def test_compare_report(tmp_path: Path, make_run) -> None:
    a = make_run(tmp_path, "central", devices=1, sim_time=True)
    b = make_run(tmp_path, "fedavg", devices=4, scale=1.3)
    c = make_run(tmp_path, "split", devices=2, summary=False)
    write_run_report(a)
    out = write_compare_report([a, b, c], tmp_path / "cmp")
    names = {p.name for p in _pngs(tmp_path / "cmp")}
    assert {"eval_accuracy.png", "eval_loss.png", "train_loss.png"} <= names
    assert {"eval_accuracy_vs_sim_time.png", "eval_accuracy_vs_host_time.png"} <= names
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in rows] == ["central", "fedavg", "split"]
    assert rows[1]["final_loss"] == pytest.approx(1.17) and rows[1]["device_bytes"] == 777777
    assert rows[2]["final_accuracy"] == pytest.approx(0.8)  # recovered from metrics
    assert rows[2]["trainable_params"] is None
    with (tmp_path / "cmp" / "compare.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert csv_rows[0]["trainable_params"] == "4096" and csv_rows[2]["trainable_params"] == ""
    page = out.read_text()
    assert '<a href="../central/report.html">central</a>' in page
    assert "777.8 KB" in page and "perplexity" not in page.split("<h2>Plots")[0]
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "[central](../central/report.md)" in md and "![eval accuracy vs step]" in md


def test_duplicate_run_names_are_disambiguated(tmp_path: Path, make_run) -> None:
    a = make_run(tmp_path / "x", "same")
    b = make_run(tmp_path / "y", "same")
    write_compare_report([a, b], tmp_path / "cmp")
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in rows] == ["same (x/same)", "same (y/same)"]


def test_import_does_not_load_torch() -> None:
    code = "import sys, cotune.report; print(sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_compare_page_reads_as_two_tables_with_human_columns(tmp_path: Path, make_run) -> None:
    a = make_run(tmp_path, "central", devices=1, sim_time=True, costs=True)
    b = make_run(tmp_path, "local", devices=3, costs=True)
    for d, paradigm in ((a, "central"), (b, "local")):
        s = json.loads((d / "summary.json").read_text())
        s["paradigm"] = paradigm
        if paradigm == "local":  # every device ends with its own adapter
            s["per_device_eval"] = {f"device-{k}": {"accuracy": 0.6 + 0.1 * k} for k in range(3)}
        (d / "summary.json").write_text(json.dumps(s))
    out = write_compare_report([a, b], tmp_path / "cmp")
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["raw_data_off_devices"] for r in rows] == [True, False]
    assert rows[1]["device_accuracy_min"] == pytest.approx(0.6)
    assert rows[1]["device_accuracy_max"] == pytest.approx(0.8)
    assert rows[0]["server_flops"] == pytest.approx(8.0e4)
    page = out.read_text()
    assert "<h2>What each run reached</h2>" in page and "<h2>What each run cost</h2>" in page
    assert '<div class="scroll"><table>' in page
    for title in ("per-device accuracy (min · mean · max)", "raw data leaves the devices",
                  "server FLOPs", "device traffic (up + down)"):  # fmt: skip
        assert f"<th>{title}</th>" in page
    assert "0.600 · 0.700 · 0.800" in page and "final_accuracy" not in page
    assert 'src="plots/pareto.png"' in page
    # central vs local: a step is different work, and the page says so under the step plots.
    assert "Steps are not the same work across these runs" in page
