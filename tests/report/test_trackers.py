"""output.trackers: TensorBoard and MLflow (a file store) receive the run's records, config and
summary, for real; a missing package is a config error naming the field; a tracker that fails
mid-run is dropped and the run finishes."""

import json
from pathlib import Path

import pytest

from cotune.errors import ConfigError
from cotune.run import run_experiment
from tests.paradigms.test_central_local import records


def test_tensorboard_and_mlflow_get_the_records(tiny_config):
    cfg = tiny_config(name="tracked", output={"trackers": ["tensorboard", "mlflow"]})
    run_dir = run_experiment(cfg, quiet=True, report=False)
    losses = [r["loss"] for r in records(run_dir, "train", "server")]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    seen = [e.value for e in acc.Scalars("train/server/loss")]
    assert seen == pytest.approx(losses, rel=1e-6)
    assert "eval/server/accuracy" in acc.Tags()["scalars"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "cotune"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/server/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses)
    assert run.data.params["paradigm.name"] == "central"
    summary = json.loads((run_dir / "summary.json").read_text())
    local = client.download_artifacts(run.info.run_id, "summary.json", str(run_dir / "dl"))
    with open(local) as fh:
        assert json.load(fh)["final"] == summary["final"]


def test_a_missing_tracker_package_names_the_field(tiny_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))  # fmt: skip
    cfg = tiny_config(output={"trackers": ["wandb"]})
    with pytest.raises(ConfigError, match=r"output.trackers: 'wandb' needs the wandb package"):
        run_experiment(cfg, quiet=True, report=False)
    assert not (Path(cfg.output.dir) / cfg.name).exists()  # refused before anything is written
    assert (tiny_config().output.dir and (tiny_config().output.dir + "/tiny")).__class__ is not None


def test_a_tracker_that_fails_is_dropped_and_the_run_finishes(tiny_config, monkeypatch, caplog):
    from cotune.report import trackers

    def broken(self, record):
        raise RuntimeError("server went away")

    monkeypatch.setattr(trackers.TensorBoard, "record", broken)
    run_dir = run_experiment(tiny_config(name="t", output={"trackers": ["tensorboard"]}),
                             quiet=True, report=False)  # fmt: skip
    assert (run_dir / "summary.json").is_file()
    assert sum("tracker tensorboard failed" in r.message for r in caplog.records) == 1
