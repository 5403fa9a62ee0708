"""``cotune compare``: several configs run into one directory, a comparison report written after
every run; ``--resume`` keeps finished runs (of the same config), ``--seeds`` repeats each
config over seeds and reports means with 95% intervals."""

from __future__ import annotations

import logging
from pathlib import Path

from cotune.config import RunConfig
from cotune.errors import ConfigError, CotuneError, RunDirError
from cotune.run import missing_outputs, run_experiment
from cotune.rundir import check_run_dir, run_dir_for

log = logging.getLogger(__name__)


def compare(
    config_paths: list[str],
    out_dir: str | Path,
    *,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: bool = False,
    seeds: int = 1,
) -> Path:
    """Run several configs into ``out_dir/<name>`` and write a comparison report over them,
    updated after every run. ``resume``: a run that finished is kept as it is (if its config
    is the one given), an unfinished one continues from its checkpoint, a missing one starts.
    ``seeds``: each config runs with seeds ``seed .. seed + seeds - 1`` (``<name>-seed<s>``),
    and the report adds every figure's mean and 95% interval over them."""
    from cotune.config import load_config
    from cotune.report import write_compare_report

    out = Path(out_dir)
    cfgs = [load_config(p, overrides) for p in config_paths]  # validate all before running any
    groups: dict[str, list[int]] | None = None
    if seeds < 1:
        raise ConfigError(f"compare --seeds: {seeds} (give at least 1)")
    if seeds > 1:
        groups = {c.name: list(range(i * seeds, (i + 1) * seeds)) for i, c in enumerate(cfgs)}
        cfgs = [c.model_copy(update={"seed": c.seed + k, "name": f"{c.name}-seed{c.seed + k}"})
                for c in cfgs for k in range(seeds)]  # fmt: skip
    names = [c.name for c in cfgs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise RunDirError(
            f"compare: run names must differ, {sorted(dupes)} appear twice (set `name:` in each config)"
        )
    finished = {c.name for c in cfgs if resume and finished_run(run_dir_for(c, out), c)}
    for c in cfgs:
        if c.name not in finished:
            check_run_dir(run_dir_for(c, out), overwrite=overwrite, resume=resume)
    run_dirs: list[Path] = []
    report, written = out, -1  # the report, and how many runs it covers
    for c in cfgs:
        if c.name in finished:
            log.info("%s finished before: kept", c.name)
            run_dirs.append(run_dir_for(c, out))
            continue
        if not quiet:
            log.info("running %s (%s)", c.name, c.paradigm.name)
        run_dirs.append(
            run_experiment(c, out_root=out, overwrite=overwrite, resume=resume, quiet=quiet)
        )
        # After every run: an interrupted comparison still shows what finished.
        report = write_compare_report(run_dirs, out, seed_groups(groups, len(run_dirs)))
        written = len(run_dirs)
    if written < len(run_dirs) or not run_dirs:  # kept runs after the last one run here
        report = write_compare_report(run_dirs, out, groups)
    return report


def seed_groups(groups: dict[str, list[int]] | None, done: int) -> dict[str, list[int]] | None:
    """The seed groups restricted to the first ``done`` runs (a comparison written midway)."""
    if groups is None:
        return None
    return {k: [i for i in v if i < done] for k, v in groups.items() if v[0] < done}


def finished_run(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cfg`` (its summary and every output);
    a finished run of another config is a ``RunDirError`` (it would be compared as this one)."""
    from cotune.config import load_config

    if not (run_dir / "summary.json").is_file() or missing_outputs(run_dir, cfg):
        return False
    try:
        same = load_config(run_dir / "config.yaml").fingerprint() == cfg.fingerprint()
    except CotuneError:
        same = False
    if not same:
        raise RunDirError(
            f"compare --resume: {run_dir} holds a finished run of a different config; use "
            "--overwrite to run this one there, or another --out"
        )
    return True
