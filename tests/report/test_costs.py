"""Cost sections of the reports: per-device plot and table, bytes per round, device cost compare."""

import csv
import json
import re
from pathlib import Path

from cotune.report import load_run, write_compare_report, write_run_report
from cotune.report.costs import role_costs
from cotune.report.runs import compare_row, summary_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_run_report_shows_costs(tmp_path: Path, make_run) -> None:
    d = make_run(tmp_path, "fed8", devices=8, sim_time=True, costs=True, target=0.6)
    page = write_run_report(d).read_text()
    plots = d / "plots"
    for name in ("cost_per_device.png", "bytes_per_round.png", "eval_accuracy_vs_sim_time.png"):
        w, h = _png(plots / name)
        assert w > 300 and h > 200, name
    # Generic per-field plots of round traffic are replaced by bytes_per_round.
    assert not (plots / "round_bytes_up.png").exists()
    # The headline comes first, then the cost plots.
    imgs = re.findall(r'<img src="plots/([^"]+)"', page)
    assert imgs[:3] == [
        "eval_accuracy_vs_sim_time.png",
        "cost_per_device.png",
        "bytes_per_round.png",
    ]
    for expected in (
        'simulated time</td><td class="num">15 s',
        'device FLOPs</td><td class="num">54 GFLOP',  # 1.5 GFLOP * (1 + ... + 8)
        'device energy</td><td class="num">48 J',
        'peak device memory</td><td class="num">512 MB',
        'time to target (simulated)</td><td class="num">9 s',
        '<td>device-7</td><td>jetson</td><td class="num">12 GFLOP</td>',
        "<td>NO</td>",  # device-3 does not fit
        "<td>all 8 devices</td>",
        '<a href="costs.csv">costs.csv</a>',
    ):
        assert expected in page, expected
    md = (d / "report.md").read_text()
    assert (
        "| device-0 | phone-low | 1.5 GFLOP | 150 KB | 100 KB | 750 ms | 2.5 J | 512 MB | yes |"
        in md
    )
    assert "[costs.csv](costs.csv)" in md and "![bytes per round](plots/bytes_per_round.png)" in md


def test_target_not_reached() -> None:
    # Rows only: no rendering needed.
    rows = summary_rows({"target_accuracy": 0.99, "time_to_target": None})
    assert ("time to target", "time_to_target", "not reached") in rows
    assert not [r for r in summary_rows({"time_to_target": None}) if "target" in r[0]]


def test_many_devices_truncate_table_and_switch_to_histograms(tmp_path: Path, make_run) -> None:
    d = make_run(tmp_path, "fed100", devices=100, costs=True)
    page = write_run_report(d).read_text()
    w, h = _png(d / "plots" / "cost_per_device.png")
    assert w < 1500 and h < 1000  # a distribution, not 100 bars side by side
    assert "distribution over 100 devices" in page
    assert "<td>device-19</td>" in page and "<td>device-20</td>" not in page
    assert "… 80 more devices" in page and "<td>all 100 devices</td>" in page


def test_costs_csv_without_summary_costs(tmp_path: Path, make_run) -> None:
    # A summary from before costs existed, but a costs.csv: costs are read from the CSV.
    d = make_run(tmp_path, "csvonly", devices=3, costs=True)
    summary = json.loads((d / "summary.json").read_text())
    del summary["costs"]
    (d / "summary.json").write_text(json.dumps(summary))
    run = load_run(d)
    roles = role_costs(run.summary, d)
    assert list(roles) == ["server", "device-0", "device-1", "device-2"]
    assert roles["device-2"]["flops"] == 4.5e9 and roles["server"]["memory_bytes"] is None
    assert roles["device-1"]["memory_fits"] is True and roles["device-1"]["profile"] == "jetson"
    row = compare_row(run)
    assert row["device_flops"] == 9e9 and row["device_peak_memory_bytes"] == 512_000_000


def test_old_run_without_costs_renders(run_dir: Path) -> None:
    page = write_run_report(run_dir).read_text()
    assert "Cost per role" not in page
    assert not (run_dir / "plots" / "cost_per_device.png").exists()
    assert not (run_dir / "plots" / "bytes_per_round.png").exists()


def test_compare_report_device_costs(tmp_path: Path, make_run) -> None:
    a = make_run(tmp_path, "central", devices=1, sim_time=True, costs=True, target=0.6)
    b = make_run(tmp_path, "fedavg", devices=8, sim_time=True, costs=True)
    c = make_run(tmp_path, "old", devices=2, sim_time=True)  # no costs at all
    out = write_compare_report([a, b, c], tmp_path / "cmp")
    page = out.read_text()
    imgs = re.findall(r'<img src="plots/([^"]+)"', page)
    assert imgs[:2] == ["eval_accuracy_vs_sim_time.png", "device_cost.png"]
    _png(tmp_path / "cmp" / "plots" / "device_cost.png")
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert rows[0]["time_to_target_sim_s"] == 9.0 and rows[1]["time_to_target_sim_s"] is None
    assert rows[1]["device_flops"] == 54e9 and rows[1]["device_peak_memory_bytes"] == 512_000_000
    assert rows[1]["device_compute_s"] == 4 * 0.5 + 4 * 0.02
    assert rows[1]["device_bytes"] == 8 * 250_000 and rows[1]["device_energy_j"] == 48.0
    assert rows[2]["device_flops"] is None and rows[2]["device_bytes"] == 777777
    with (tmp_path / "cmp" / "compare.csv").open() as fh:
        header = next(csv.reader(fh))
    assert {"device_flops", "device_energy_j", "time_to_target_sim_s"} <= set(header)
    for expected in ("54 GFLOP", "2 MB", "48 J", "512 MB", "2.08 s", "9 s"):
        assert f">{expected}<" in page, expected
