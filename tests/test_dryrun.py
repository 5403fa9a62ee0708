"""--dry-run: the resolved config and a probe's estimate, scaled to the run; nothing written."""

import json

import yaml

from cotune.cli import main
from cotune.config import config_from_dict
from cotune.dryrun import dry_run
from cotune.run import run_experiment
from tests.conftest import tiny_config_dict


def test_the_estimate_scales_a_probe_to_the_whole_run(tmp_path):
    d = tiny_config_dict(tmp_path, name="fed", devices={"count": 2},
                         paradigm={"name": "fedavg", "options": {"local_steps": 2}},
                         train={"steps": 6})  # fmt: skip
    est = dry_run(config_from_dict(d))
    assert est.probe_steps == 2 and est.scale == 3  # one round of three
    full = run_experiment(config_from_dict(d), quiet=True, report=False)
    summary = json.loads((full / "summary.json").read_text())
    # Three rounds of the same messages (a round number's digits aside).
    assert abs(est.bytes_total - summary["bytes"]["total"]) <= 1e-3 * summary["bytes"]["total"]
    assert abs(est.sim_time_s - summary["sim_time_s"]) <= 0.2 * summary["sim_time_s"]
    assert est.warnings and "randomly initialised" in est.warnings[0]  # a tiny random model
    assert "paradigm:" in est.config_yaml and "local_steps: 2" in est.config_yaml


def test_cli_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    d = tiny_config_dict(tmp_path, name="c")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    assert main(["run", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "simulated time" in out and "host time" in out
    assert not (tmp_path / "runs").exists()
    assert main(["compare", str(p), str(p), "--dry-run", "--out", str(tmp_path / "cmp")]) == 0
    assert capsys.readouterr().out.count("# estimate") == 2
    assert not (tmp_path / "cmp").exists()
