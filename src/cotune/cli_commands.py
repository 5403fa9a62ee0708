"""The ``cotune`` subcommands that train, compare, report, export, search and list: one typed
function each (their docstrings are the CLI's help). The deployment commands are in
``cli_deploy.py``; the parser and ``main`` in ``cli.py``. Standard library at import time: torch
and the rest load inside the commands.
"""

from __future__ import annotations

from pathlib import Path

from cotune.errors import CotuneError


def run_command(
    config: Path,
    overrides: list[str],
    *,
    overwrite: bool,
    resume: bool,
    quiet: bool,
    out: Path | None,
    dry_run: bool = False,
) -> int:
    """Fine-tune as CONFIG says and write a run directory (config, metrics, summary, adapter, report)."""
    from cotune.config import load_config
    from cotune.run import run_experiment

    cfg = load_config(config, overrides)
    if dry_run:
        from cotune.dryrun import dry_run_text

        print(dry_run_text(cfg))
        return 0
    run_dir = run_experiment(cfg, out_root=out, overwrite=overwrite, resume=resume, quiet=quiet)
    print_summary(run_dir, quiet)
    return 0


def compare_command(
    configs: list[Path],
    overrides: list[str],
    *,
    out: Path,
    overwrite: bool,
    quiet: bool,
    resume: bool = False,
    dry_run: bool = False,
    seeds: int = 1,
) -> int:
    """Run each CONFIG into OUT/<name> and write one comparison report over all of them."""
    from cotune.compare import compare

    if dry_run:
        from cotune.dryrun import main_for

        print(main_for(list(configs), overrides))
        return 0

    report = compare([str(c) for c in configs], out, overrides=overrides, overwrite=overwrite,
                     quiet=quiet, resume=resume, seeds=seeds)  # fmt: skip
    print(f"comparison report: {report}")
    return 0


def report_command(run_dirs: list[Path], *, out: Path | None) -> int:
    """Re-render the report of one run directory, or a comparison of several into OUT."""
    from cotune.report import write_compare_report, write_run_report

    for d in run_dirs:
        if not (d / "config.yaml").is_file():
            raise CotuneError(f"{d} is not a cotune run directory (no config.yaml)")
    if len(run_dirs) == 1 and out is None:
        print(f"report: {write_run_report(run_dirs[0])}")
    else:
        target = out or Path("runs/compare")
        print(f"comparison report: {write_compare_report(run_dirs, target)}")
    return 0


def export_command(
    run_dir: Path, out: Path, *, merge: bool, role: str | None, overwrite: bool
) -> int:
    """Copy a run's adapter (PEFT layout) to OUT, or with --merge write full merged weights."""
    from cotune.export import export_run

    print(f"exported: {export_run(run_dir, out, merge=merge, role=role, overwrite=overwrite)}")
    return 0


def mixture_command(
    config: Path, overrides: list[str], *, budget_flops: float | None, out: Path | None
) -> int:
    """Search the domain mixture to train on (CONFIG's mixture section): multi-fidelity BO,
    random search and Hyperband, each a series of real runs under a FLOP budget."""
    from cotune.config import load_config
    from cotune.mixture.command import format_result, mixture_search

    cfg = load_config(config, overrides)
    print(format_result(mixture_search(cfg, budget_flops=budget_flops, out=out)))
    return 0


def infer_command(run_dir: Path, opts: object, *, json_out: Path | None) -> int:
    """Generate with RUN_DIR's fine-tuned model cut U-shaped between device and cloud (HAT):
    an on-device drafter, the cloud verifying; prints the text and each token's timing."""
    from cotune.infer.command import format_result, infer, write_json

    res = infer(run_dir, opts)  # type: ignore[arg-type]
    print(format_result(res))
    if json_out is not None:
        write_json(res, json_out)
    return 0


def datasets_command() -> int:
    """List the built-in datasets."""
    from cotune.data.registry import format_datasets_table

    print(format_datasets_table())
    return 0


def devices_command(profile_file: Path | None) -> int:
    """List the device profiles (built-in, plus those in PROFILE_FILE)."""
    from cotune.sim.profiles import all_profiles, format_profiles_table

    print(format_profiles_table(all_profiles(str(profile_file) if profile_file else None)))
    return 0


def print_summary(run_dir: Path, quiet: bool) -> None:
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    # Always, --quiet too: the result is what the command is for (quiet only drops progress).
    ev = summary.get("final", {})
    final = ", ".join(
        f"eval {k}={ev[k]:.4g}" for k in ("accuracy", "exact_match", "perplexity", "loss")
        if isinstance(ev.get(k), int | float)
    )  # fmt: skip
    if isinstance(ev.get("examples"), int | float):
        final += f" (on {int(ev['examples'])} test examples)"
    print(f"{summary['name']} ({summary['paradigm']}): {final}")
    print(f"run directory: {run_dir}")
