"""Experiment trackers (``output.trackers``): the records metrics.jsonl gets, also sent to
TensorBoard, MLflow or Weights & Biases, with the run's config and, at the end, its summary.

Each tracker is an optional package (``pip install 'cotune[trackers]'`` for TensorBoard and
MLflow; ``wandb`` on its own, offline unless ``WANDB_MODE`` says otherwise). A tracker that
fails while the run goes on is reported once and dropped: the run's own files are the record.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from cotune.config import RunConfig, dump_config
from cotune.errors import ConfigError
from cotune.report.metrics import is_number

log = logging.getLogger(__name__)

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(cfg: RunConfig) -> None:
    """Every tracker the config names can be imported (checked before anything is written)."""
    for name in cfg.output.trackers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            extra = "cotune[trackers]" if name != "wandb" else "wandb"
            raise ConfigError(
                f"output.trackers: {name!r} needs the {PACKAGES[name]} package "
                f"(pip install '{extra}'), or leave it out"
            )


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers as ``<event>/<role>/<field>`` (its step and clocks left out)."""
    event, role = record.get("event", "?"), record.get("role", "?")
    skip = {"event", "role", "step", "round", "sim_time_s", "host_time_s"}
    return {
        f"{event}/{role}/{k}": float(v)
        for k, v in record.items()
        if k not in skip and is_number(v) and not isinstance(v, bool)
    }


class TensorBoard:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{dump_config(cfg)}\n```")

    def record(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.writer.add_text("summary", f"```\n{json.dumps(summary, indent=2)[:60000]}\n```")
        self.writer.close()


class MLflow:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        import os

        import mlflow

        self.mlflow = mlflow
        uri = cfg.output.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.output.tracker_project)
        self.run = mlflow.start_run(run_name=cfg.name)
        params = _flatten(cfg.to_dict())
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def record(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        self.mlflow.log_metrics(scalars(record), step=step)

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.mlflow.log_dict(summary, "summary.json")
        self.mlflow.end_run(status="FINISHED" if summary is not None else "FAILED")


class Wandb:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        import os

        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.output.tracker_project, name=cfg.name,
                              dir=str(run_dir), config=cfg.to_dict(),
                              mode=os.environ.get("WANDB_MODE", "offline"))  # fmt: skip

    def record(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self.run.log({**values, "step": int(record.get("step", 0))})

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.run.summary.update({k: v for k, v in summary.items() if k != "costs"})
        self.run.finish(exit_code=0 if summary is not None else 1)


KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Trackers:
    """The run's trackers: each record goes to all; one that fails is dropped (said once)."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.open: dict[str, Any] = {}
        for name in cfg.output.trackers:
            self._guard(name, lambda n=name: self.open.__setitem__(n, KINDS[n](cfg, run_dir)))

    def _guard(self, name: str, call: Any) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - a tracker never takes the run down
            log.warning("tracker %s failed (%s: %s); the run goes on without it", name,
                        type(err).__name__, err)  # fmt: skip
            self.open.pop(name, None)

    def record(self, record: dict[str, Any]) -> None:
        for name, t in list(self.open.items()):
            self._guard(name, lambda t=t: t.record(record))

    def finish(self, summary: dict[str, Any] | None) -> None:
        for name, t in list(self.open.items()):
            self._guard(name, lambda t=t: t.finish(summary))
        self.open.clear()
