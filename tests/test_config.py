import pytest

from cotune.config import RunConfig, apply_overrides, dump_config, load_config
from cotune.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_name_from_file(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  steps: 5\n", "myrun.yaml"))
    assert cfg.name == "myrun"
    assert cfg.train.steps == 5
    assert cfg.peft.method == "lora"


def test_overrides_are_yaml_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, "name: x\n"),
        [
            "train.lr=3e-4",
            "peft.target_modules=[q_proj, v_proj]",
            "devices.count=16",
            "eval.max_examples=null",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.devices.count == 16


def test_unknown_key_names_field_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  stepz: 5\n"))
    msg = str(e.value)
    assert "train.stepz" in msg and "unknown key" in msg and "steps" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_config(write(tmp_path, "trian:\n  steps: 5\n"))


def test_literal_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "name: x\n"), ["paradigm.name=fedavgg"])
    assert "paradigm.name" in str(e.value) and "allowed: central, local, fedavg" in str(e.value)


def test_wrong_type_names_field_and_value(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  batch_size: lots\n"))
    assert "train.batch_size" in str(e.value) and "lots" in str(e.value)


def test_a_check_across_sections_reads_as_its_field_and_message(tmp_path):
    """A check over the whole config names its fields itself: no '<root>' or pydantic's
    'Value error,' before it; one that starts with a dotted field is keyed by it."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "name: x\n"), ["data.chat_template=chatml"])
    line = str(e.value).splitlines()[1]
    assert (
        line
        == "  data.chat_template: conversations are for model.task=causal_lm, not classification"
    )
    with pytest.raises(ConfigError) as e:
        load_config(
            write(tmp_path, "name: x\n"), ["eval.target_accuracy=0.5", "model.task=causal_lm"]
        )
    line = str(e.value).splitlines()[1]
    assert line == "  eval.target_accuracy needs model.task=classification"


def test_bad_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:2"):
        load_config(write(tmp_path, "name: x\n  bad: indent\nfoo: 1\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_dump_round_trip_and_fingerprint():
    cfg = RunConfig(name="a")
    import yaml

    again = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    # Output/eval settings do not change what training computes.
    other = cfg.model_copy(deep=True)
    other.output.overwrite = True
    other.eval.every = 3
    assert other.fingerprint() == cfg.fingerprint()
    other.train.lr = 1.0
    assert other.fingerprint() != cfg.fingerprint()


def test_shipped_configs_validate():
    from pathlib import Path

    for p in sorted(Path(__file__).parents[1].glob("configs/**/*.yaml")):
        load_config(p)
