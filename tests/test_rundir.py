"""Never lose a run: run-directory safety, checkpoints by default, resume edge cases (issue: run
safety, cases 1, 2, 4-7). Each test names the case it guards."""

import json
import logging

import pytest
import yaml

from cotune.cli import main
from cotune.config import load_config
from cotune.errors import CheckpointError, ConfigError, RunDirError
from cotune.run import run_experiment
from cotune.rundir import checkpoints, truncate_metrics
from tests.conftest import tiny_config_dict


def write_cfg(tmp_path, **sections):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, **sections)))
    return p


def finished_run(tmp_path, **sections):
    cfg = load_config(write_cfg(tmp_path, **sections))
    run_dir = run_experiment(cfg, quiet=True, report=False)
    return cfg, run_dir, sorted(p.name for p in run_dir.iterdir())


# ---------------------------------------------------------------- cases 1 and 2


def test_bad_paradigm_option_fails_at_load_naming_the_field(tmp_path):
    """Case 1: paradigm options are validated with the config, naming field and value."""
    p = write_cfg(tmp_path, paradigm={"name": "fedavg"})
    with pytest.raises(
        ConfigError, match=r"paradigm\.options\.fraction: .*less than or equal to 1.*\(got 2\.0\)"
    ):
        load_config(p, ["paradigm.options.fraction=2.0"])
    with pytest.raises(
        ConfigError, match=r"paradigm\.options\.aggregator: 'fedavgx' is not an aggregator"
    ):
        load_config(p, ["paradigm.options.aggregator=fedavgx"])
    with pytest.raises(
        ConfigError, match=r"paradigm\.options\.aggregator_options: momentum not taken by fedavg"
    ):
        load_config(p, ["paradigm.options.aggregator_options={momentum: 0.9}"])
    with pytest.raises(ConfigError, match=r"paradigm\.options\.active_fraction"):
        load_config(p, ["paradigm.name=dlora", "paradigm.options.active_fraction=0"])
    with pytest.raises(ConfigError, match=r"paradigm\.options\.server_batch: 'pooled' needs"):
        load_config(
            p,
            [
                "paradigm.name=splitfed",
                "paradigm.options={server_batch: pooled, server_side: per_device}",
            ],
        )
    with pytest.raises(ConfigError, match=r"paradigm\.options\.cuts: 3 cuts for 2 devices"):
        load_config(p, ["paradigm.name=splitfrozen", "paradigm.options.cuts=[0, 1, 1]"])
    with pytest.raises(ConfigError, match=r"paradigm\.options\.depth: unknown option"):
        load_config(p, ["paradigm.options.depth=1"])  # fedavg has no depth
    with pytest.raises(
        ConfigError, match=r"paradigm\.options\.fraction: unknown option \(allowed: none\)"
    ):
        load_config(p, ["paradigm.name=central", "paradigm.options.fraction=0.5"])


def test_overwrite_with_bad_option_keeps_the_finished_run(tmp_path, capsys):
    """Case 1: `--overwrite` with a bad option must not delete the finished run."""
    _, run_dir, before = finished_run(tmp_path)
    cfg_file = tmp_path / "tiny.yaml"
    rc = main(
        ["run", str(cfg_file), "--overwrite", "--quiet", "--set", "paradigm.options.fraction=2.0"]
    )
    assert rc == 2 and "paradigm.options.fraction" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.parametrize("overwrite", [True, False])
def test_preflight_failure_leaves_nothing_and_keeps_the_old_run(tmp_path, overwrite):
    """Cases 1 and 2: a check that needs the model (a cut outside a 2-block model) fails before
    the run directory is touched: the old run stays whole, no new directory is left behind."""
    if overwrite:
        _, run_dir, before = finished_run(tmp_path, name="same")
    bad = load_config(
        write_cfg(tmp_path, name="same" if overwrite else "fresh"),
        ["paradigm.name=splitfed", "paradigm.options.cut=5"],
    )
    with pytest.raises(ConfigError, match=r"paradigm\.options\.cut: 5 is outside the model"):
        run_experiment(bad, quiet=True, overwrite=overwrite, report=False)
    if overwrite:
        assert sorted(p.name for p in run_dir.iterdir()) == before
    else:
        assert not (tmp_path / "runs" / "fresh").exists()
    assert not list((tmp_path / "runs").glob(".*"))  # nothing set aside either


@pytest.mark.parametrize("overwrite", [True, False])
def test_failure_before_the_run_starts_is_undone(tmp_path, monkeypatch, overwrite):
    """Cases 1 and 2: whatever fails after the directory was prepared but before the run logged
    or checkpointed anything is undone: the old run returns, a new directory goes."""
    import cotune.paradigms.central as central

    if overwrite:
        cfg, run_dir, before = finished_run(tmp_path)
        old_summary = (run_dir / "summary.json").read_text()
    else:
        cfg = load_config(write_cfg(tmp_path))
        run_dir = tmp_path / "runs" / "tiny"

    def fail(exp):
        raise ConfigError("paradigm.options.x: a late check failed")

    monkeypatch.setattr(central, "run", fail)
    with pytest.raises(ConfigError, match="late check"):
        run_experiment(cfg, quiet=True, overwrite=overwrite, report=False)
    if overwrite:
        assert sorted(p.name for p in run_dir.iterdir()) == before
        assert (run_dir / "summary.json").read_text() == old_summary
    else:
        assert not run_dir.exists()
    # A rerun is not blocked by leftovers.
    monkeypatch.undo()
    run_experiment(cfg, quiet=True, overwrite=overwrite, report=False)


def test_overwrite_replaces_the_old_run_once_the_new_one_started(tmp_path):
    cfg, run_dir, _ = finished_run(tmp_path)
    old = (run_dir / "metrics.jsonl").read_text()
    run_experiment(cfg.model_copy(update={"seed": 3}), quiet=True, overwrite=True, report=False)
    assert (run_dir / "metrics.jsonl").read_text() != old
    assert not list((tmp_path / "runs").glob(".*"))


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    d = tmp_path / "runs" / "tiny"
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("mine")
    cfg = load_config(write_cfg(tmp_path))
    with pytest.raises(RunDirError, match="not a cotune run directory"):
        run_experiment(cfg, quiet=True, overwrite=True, report=False)
    assert (d / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- case 4


def test_empty_config_file_is_an_error(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the config file is empty"):
        load_config(p)


# ---------------------------------------------------------------- case 5


def test_checkpoints_at_eval_points_by_default_keeping_two(tmp_path):
    """Case 5: the default checkpoints at every eval point and keeps the newest two."""
    cfg, run_dir, _ = finished_run(tmp_path, train={"steps": 9}, eval={"every": 3})
    assert cfg.output.checkpoint_every == "eval"
    assert [c.parent.name for c in checkpoints(run_dir)] == ["step-0000006", "step-0000009"]


def test_torn_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    """Case 5: a truncated newest checkpoint falls back to the previous one."""
    cfg, run_dir, _ = finished_run(tmp_path, train={"steps": 9}, eval={"every": 3})
    newest = checkpoints(run_dir)[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    (run_dir / "summary.json").unlink()
    with caplog.at_level(logging.WARNING):
        run_experiment(cfg, quiet=True, resume=True, report=False)
    assert "falling back to the previous checkpoint" in caplog.text
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 9


def interrupt_after(monkeypatch, steps):
    """Raise KeyboardInterrupt at the optimizer step after ``steps`` steps of a training role."""
    import cotune.paradigms.base as base

    real = base.train_step
    seen = {"n": 0}

    def train_step(*args, **kw):
        if seen["n"] >= steps:
            raise KeyboardInterrupt
        seen["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(base, "train_step", train_step)


def test_ctrl_c_says_resume_only_when_a_checkpoint_exists(tmp_path, monkeypatch, capsys):
    """Case 5: the Ctrl-C message is true in each situation."""
    cfg_file = write_cfg(tmp_path, train={"steps": 9}, eval={"every": 3})
    interrupt_after(monkeypatch, 0)  # at the first step: nothing logged yet
    assert main(["run", str(cfg_file), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "before the run started: nothing was kept" in err and "--resume" not in err
    assert not (tmp_path / "runs" / "tiny").exists()
    monkeypatch.undo()
    interrupt_after(monkeypatch, 4)  # records logged, but only the final checkpoint is asked for
    argv = ["run", str(cfg_file), "--quiet", "--set", "output.checkpoint_every=0"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--resume" not in err
    monkeypatch.undo()
    interrupt_after(monkeypatch, 4)  # after the step-3 checkpoint
    assert main(["run", str(cfg_file), "--quiet", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "step-0000003" in err and "--resume" in err


# ---------------------------------------------------------------- case 6


def test_resume_without_a_checkpoint_starts_afresh(tmp_path, monkeypatch, caplog):
    """Case 6: a run killed before its first checkpoint restarts on --resume (and says so)."""
    cfg_file = write_cfg(
        tmp_path, train={"steps": 6}, eval={"every": 3}, output={"checkpoint_every": 0}
    )
    interrupt_after(monkeypatch, 4)
    assert main(["run", str(cfg_file), "--quiet"]) == 130
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "metrics.jsonl").is_file() and not checkpoints(run_dir)
    monkeypatch.undo()
    cfg = load_config(cfg_file)
    with caplog.at_level(logging.WARNING):
        run_experiment(cfg, quiet=True, resume=True, report=False)
    assert "starting the run afresh" in caplog.text
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed attempt's records went


def test_resume_completes_the_outputs_of_a_run_killed_while_reporting(tmp_path):
    """Case 6: a run killed after its final checkpoint completes its outputs on --resume."""
    cfg, run_dir, _ = finished_run(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("summary.json", "costs.csv"):
        (run_dir / name).unlink()
    import shutil

    shutil.rmtree(run_dir / "adapter")
    run_experiment(cfg, quiet=True, resume=True)
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["final"] == summary["final"] and again["sim_time_s"] == summary["sim_time_s"]
    assert again["messages"] == summary["messages"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "report.html").is_file()
    with pytest.raises(RunDirError, match="already finished"):
        run_experiment(cfg, quiet=True, resume=True)


# ---------------------------------------------------------------- case 7


@pytest.mark.parametrize(
    "bad, match",
    [
        ("[1, 2]", r"m\.jsonl:2: a record must be a JSON object, got list"),
        ('{"event": "train", "step": "3"}', r"m\.jsonl:2: 'step' must be an integer, got '3'"),
        ('{"event": "train", "step": 2.5}', r"m\.jsonl:2: 'step' must be an integer"),
        ("{not json", r"m\.jsonl:2: not valid JSON"),
    ],
)
def test_malformed_metrics_line_names_file_and_line(tmp_path, bad, match):
    """Case 7: malformed metrics lines are clear errors (and nothing is rewritten)."""
    p = tmp_path / "m.jsonl"
    text = '{"event": "train", "step": 1}\n' + bad + '\n{"event": "train", "step": 2}\n'
    p.write_text(text)
    with pytest.raises(CheckpointError, match=match):
        truncate_metrics(p, 1)
    assert p.read_text() == text


def test_torn_last_metrics_line_is_dropped(tmp_path, caplog):
    p = tmp_path / "m.jsonl"
    p.write_text('{"event": "train", "step": 1}\n{"event": "train", "step": 2}\n{"event": "tr')
    with caplog.at_level(logging.WARNING):
        truncate_metrics(p, 5)
    assert "torn last line" in caplog.text
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2]
