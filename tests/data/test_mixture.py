"""Domain mixtures: shards and evaluation data resampled to chosen shares."""

from collections import Counter

import pytest

from cotune.data.examples import Example
from cotune.data.mixture import mix_examples, mix_parts, mixture_weights, quotas, resample
from cotune.errors import ConfigError

NAMES = ["a", "b", "c"]


def test_quotas_split_exactly():
    assert quotas(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert sum(quotas(7, [1, 1, 1])) == 7
    assert quotas(4, [0, 1, 0]) == [0, 4, 0]


def test_resample_keeps_size_and_follows_the_weights_among_present_domains():
    groups = [0] * 50 + [1] * 30 + [2] * 20
    out = resample(range(100), groups, [0.2, 0.2, 0.6], seed=0)
    assert len(out) == 100
    assert Counter(groups[i] for i in out) == {0: 20, 1: 20, 2: 60}
    assert Counter(out[:0]) == Counter()  # plain list
    # Domain 2 holds 20 examples but gets 60 draws: each used 3 times, none more.
    assert max(Counter(i for i in out if groups[i] == 2).values()) == 3
    # A shard without domain 2 spreads the weight over what it holds.
    part = list(range(80))
    assert Counter(groups[i] for i in resample(part, groups, [0.2, 0.2, 0.6], 1)) == {0: 40, 1: 40}
    assert resample(part, groups, [0.0, 0.0, 1.0], 1) == part  # nothing it holds has weight


def test_mix_parts_and_the_field_errors(caplog):
    groups = [0] * 10 + [1] * 10 + [2] * 10
    parts = [list(range(0, 15)), list(range(15, 30)), list(range(20, 30))]
    mixed = mix_parts(parts, groups, {"a": 1, "c": 1}, NAMES, seed=0)
    assert [len(p) for p in mixed] == [15, 15, 10]
    assert Counter(groups[i] for i in mixed[0]) == {0: 15}
    assert Counter(groups[i] for i in mixed[1]) == {2: 15}
    with caplog.at_level("WARNING"):
        mix_parts([list(range(10, 20))], groups, {"a": 1}, NAMES, seed=0)
    assert "weight 0" in caplog.text
    with pytest.raises(ConfigError, match=r"data.mixture: unknown domain\(s\) \['z'\]"):
        mixture_weights({"z": 1.0}, NAMES, "data.mixture")
    with pytest.raises(ConfigError, match="the weights sum to 0"):
        mixture_weights({"a": 0.0}, NAMES, "data.mixture")
    with pytest.raises(ConfigError, match="weights must be >= 0"):
        mixture_weights({"a": -1.0}, NAMES, "data.mixture")


def test_mixed_evaluation_data_keeps_its_shares_when_cut():
    examples = [Example("x", domain=i % 3) for i in range(300)]
    mixed = mix_examples(examples, {"a": 3, "b": 1}, NAMES, seed=0)
    first = Counter(e.group for e in mixed[:100])
    assert set(first) == {0, 1} and 60 <= first[0] <= 90
    with pytest.raises(ConfigError, match="eval.mixture: none of its domains occurs"):
        mix_examples([Example("x", domain=0)], {"b": 1}, NAMES, seed=0)


def test_a_run_trains_and_evaluates_on_its_mixture(tiny_config, tmp_path):
    from cotune.build import build_experiment

    cfg = tiny_config(data={"mixture": {"science": 1.0}}, eval={"mixture": {"politics": 1.0}})
    exp, _ = build_experiment(cfg, tmp_path, quiet=True)
    try:
        names = exp.data.group_names
        science, politics = names.index("science"), names.index("politics")
        for part in exp.parts:  # iid shards: every device holds science, and trains on it alone
            assert {exp.data.train[i].group for i in part} == {science}
        assert {int(x) for x in exp.test_set.labels} == {politics}
    finally:
        exp.grid.close()


def test_schedule_steps_make_a_short_run_the_start_of_a_long_one(tiny_config):
    import json

    from cotune.run import run_experiment

    def losses(steps, name):
        cfg = tiny_config(name=name, train={"steps": steps, "schedule_steps": 8},
                          eval={"every": 4, "max_examples": 16})  # fmt: skip
        run = run_experiment(cfg, quiet=True, report=False)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if json.loads(x)["event"] == "train"]

    short, long = losses(4, "short"), losses(8, "long")
    assert short == long[:4]
