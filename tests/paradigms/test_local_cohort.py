"""The `local` paradigm's device cohort (`paradigm.options.cohort`): the devices' steps between
two evaluations run as one batch, each device on its own adapter tensors, and give the same run
as one device at a time (to float precision), with the same bytes, FLOPs and simulated time."""

import json

import pytest

from cotune.run import run_experiment
from tests.paradigms.test_central_local import final_params
from tests.paradigms.test_fed_cohort import CAUSAL, cohort_sizes, same_run


def local(tiny_config, name, cohort, **sections):
    sections = {**CAUSAL, **sections}
    cfg = tiny_config(name=name, paradigm={"name": "local", "options": {"cohort": cohort}},
                      **sections)  # fmt: skip
    run_dir = run_experiment(cfg, quiet=True, report=False)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def test_local_cohort_equals_one_device_at_a_time(tiny_config):
    a_dir, a = local(tiny_config, "seq", False)
    b_dir, b = local(tiny_config, "cohort", True)
    assert set(final_params(a_dir)) == set(final_params(b_dir)) == {
        "device-0", "device-1", "device-2"}  # fmt: skip
    for role in ("device-0", "device-1", "device-2"):
        same_run(a_dir, a, b_dir, b, role=role)


def test_the_local_cohort_really_batches_the_devices(tiny_config, monkeypatch):
    sizes = cohort_sizes(monkeypatch)
    local(tiny_config, "spy", True)
    assert sizes and set(sizes) == {3}


def test_an_unknown_local_option_is_refused(tiny_config):
    from cotune.errors import ConfigError

    with pytest.raises(ConfigError, match="paradigm.options"):
        tiny_config(paradigm={"name": "local", "options": {"local_steps": 3}})
