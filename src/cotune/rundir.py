"""Run directories that never lose work: checks, a start that can be undone, checkpoints.

The rules (docs/architecture.md, "What cotune guarantees about your files"):

- Nothing is written or deleted until every input has been validated (``cotune.run`` validates
  the config, data, model and paradigm preflight before it calls :meth:`RunDirTxn.begin`).
- ``--overwrite`` never deletes an old run before the new one has *started* (logged its first
  record or written its first checkpoint): the old run is moved to a hidden sibling
  (``.<name>.replaced``), and put back if the new run fails before it starts.
- A run that fails before it starts leaves nothing behind: the directory it created goes.
- Checkpoints are written atomically, the newest ``output.keep_checkpoints`` are kept, and a
  torn newest checkpoint falls back to the previous one with a warning.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from cotune.config import RunConfig
from cotune.errors import CheckpointError, RunDirError

log = logging.getLogger(__name__)

RUN_MARKER = "config.yaml"


def run_dir_for(cfg: RunConfig, out_root: str | Path | None = None) -> Path:
    return Path(out_root if out_root is not None else cfg.output.dir) / cfg.name


def _backup_of(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.replaced")


def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing run unless told to overwrite or resume it (writes nothing)."""
    backup = _backup_of(run_dir)
    if backup.exists():
        log.warning(
            "%s holds a run that an interrupted --overwrite had set aside; it is kept until a "
            "new run there starts (move it back by hand to keep it)",
            backup,
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory; refusing to touch it")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return  # --resume of a run with nothing on disk starts it afresh (run.py says so)
    is_run = (run_dir / RUN_MARKER).is_file()
    if resume:
        if not is_run:
            raise RunDirError(
                f"--resume: {run_dir} is not a cotune run directory (no {RUN_MARKER})"
            )
        return
    if not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already exists and is not empty; "
            "pass --overwrite to replace it or --resume to continue it"
        )
    if not is_run:
        raise RunDirError(
            f"--overwrite: {run_dir} is not a cotune run directory (no {RUN_MARKER}); "
            "refusing to delete it"
        )


class RunDirTxn:
    """The run directory's life: ``begin`` (set an old run aside), ``started`` (commit), ``abort``.

    Until ``started`` is called, ``abort`` puts everything back as it was: the directory this run
    created goes, and an old run set aside by ``--overwrite`` returns.
    """

    def __init__(self, run_dir: Path, *, overwrite: bool, resume: bool) -> None:
        self.run_dir, self.overwrite, self.resume = run_dir, overwrite, resume
        self.backup = _backup_of(run_dir)
        self.created = False
        self.was_empty = False
        self.set_aside = False
        self.is_started = False

    def begin(self) -> None:
        existed = self.run_dir.is_dir() and any(self.run_dir.iterdir())
        self.was_empty = self.run_dir.is_dir() and not existed
        if self.overwrite and not self.resume and existed:
            if self.backup.exists():
                shutil.rmtree(self.backup)  # the older of two set-aside runs: superseded twice
            self.run_dir.rename(self.backup)
            self.set_aside = True
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def started(self) -> None:
        """The new run has produced something of its own: the old one may go now."""
        if self.is_started:
            return
        self.is_started = True
        if self.set_aside and self.backup.exists():
            shutil.rmtree(self.backup, ignore_errors=True)

    def abort(self) -> None:
        """Undo ``begin`` when the run fails before it started; after that, keep everything."""
        if self.is_started:
            return
        if self.created or self.set_aside:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self.was_empty:  # an empty directory the user made: empty it again, keep it
            for child in self.run_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        if self.set_aside:
            self.backup.rename(self.run_dir)


# ---------------------------------------------------------------- checkpoints


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    return sorted((run_dir / "checkpoints").glob("step-*/state.pt"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def write_checkpoint(
    run_dir: Path,
    cfg: RunConfig,
    step: int,
    states: dict,
    extra: dict,
    *,
    sim: Any = None,
    final: bool = False,
    final_eval: dict | None = None,
    messages: int | None = None,
) -> Path:
    """Every role's state, the driver's extra state and the simulator's clock, atomically.

    The final checkpoint also carries what the summary needs (the final evaluation, the message
    count), so a run killed while writing its outputs can complete them on ``--resume``.
    """
    import torch

    out = run_dir / "checkpoints" / f"step-{step:07d}"
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "step": step,
        "paradigm": cfg.paradigm.name,
        # None: a deployed device that never joined (no state yet; it starts fresh on resume).
        "states": {k: s.state_dict() for k, s in states.items() if s is not None},
        "extra": extra,
        "final": final,
        "final_eval": final_eval,
        "messages": messages,
        # The clock and FLOP meter, so a resumed run's simulated time and costs carry on.
        "sim": {"clock": vars(sim.clock), "flops": vars(sim.flops)} if sim is not None else None,
    }
    tmp = out / "state.pt.tmp"
    torch.save(payload, tmp)
    tmp.replace(out / "state.pt")  # atomic: a killed run never leaves a half checkpoint
    prune_checkpoints(run_dir, cfg.output.keep_checkpoints)
    return out


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (and any step dir without a state.pt)."""
    ckpts = checkpoints(run_dir)
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(old.parent, ignore_errors=True)


def load_checkpoint(path: Path, cfg: RunConfig, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint's payload, its tensors on ``map_location`` (the server's device; a role on
    another node moves its own state there when it next trains)."""
    import torch

    from cotune.train import RoleState

    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from None
    if not isinstance(payload, dict) or "states" not in payload or "step" not in payload:
        raise CheckpointError(f"{path}: not a cotune checkpoint (no states/step)")
    if payload.get("fingerprint") != cfg.fingerprint():
        diffs = _config_diff(payload.get("config", {}), cfg.to_dict())
        raise CheckpointError(
            f"{path} was written by another config; differing fields: {', '.join(diffs[:8]) or 'unknown'}"
        )
    payload["states"] = {k: RoleState.from_state_dict(v) for k, v in payload["states"].items()}
    return payload


def load_latest_checkpoint(
    run_dir: Path, cfg: RunConfig, map_location: Any = "cpu"
) -> dict[str, Any] | None:
    """The newest readable checkpoint; a torn newest one falls back to the previous with a
    warning. A config mismatch is not damage: it is raised at once."""
    ckpts = checkpoints(run_dir)
    for i, path in enumerate(reversed(ckpts)):
        try:
            payload = load_checkpoint(path, cfg, map_location)
        except CheckpointError as err:
            if "another config" in str(err) or i == len(ckpts) - 1:
                raise
            log.warning("%s; falling back to the previous checkpoint", err)
            continue
        payload["path"] = path
        return payload
    return None


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb and key not in ("output", "eval", "name"):
            out.append(f"{prefix}{key} ({va!r} vs {vb!r})")
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint so the log reads as one run.

    A malformed line is an error naming the file and line, except a torn last line (a run killed
    mid-write), which is dropped with a warning.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            problem = f"not valid JSON ({err.msg})"
        else:
            if not isinstance(rec, dict):
                problem = f"a record must be a JSON object, got {type(rec).__name__}"
            elif not isinstance(rec.get("step", 0), int) or isinstance(rec.get("step"), bool):
                problem = f"'step' must be an integer, got {rec.get('step')!r}"
        if problem is not None:
            if n == len(lines):
                log.warning("%s:%d: dropping the torn last line (%s)", path, n, problem)
                continue
            raise CheckpointError(
                f"{path}:{n}: {problem}; fix or delete that line, then --resume again"
            )
        if rec.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    tmp.replace(path)
