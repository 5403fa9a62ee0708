import sys
from types import SimpleNamespace

import pytest

from cotune.errors import ConfigError
from cotune.sim.profiles import (
    BUILTIN_PROFILES,
    build_fleet,
    fleet_from_config,
    format_profiles_table,
    load_profiles,
    mix_counts,
)


def test_builtins_are_sane_and_cited():
    for name in ("phone-low", "phone-mid", "phone-high", "jetson", "laptop-cpu", "a100", "h100"):
        p = BUILTIN_PROFILES[name]
        assert p.flops > 0 and p.memory_bytes > 0 and p.up_bps > 0 and p.source
    assert (
        BUILTIN_PROFILES["phone-low"].flops
        < BUILTIN_PROFILES["jetson"].flops
        < BUILTIN_PROFILES["h100"].flops
    )
    table = format_profiles_table()
    assert "phone-high" in table and "GiB" in table


def test_profiles_module_does_not_import_torch():
    import subprocess

    code = "import cotune.sim.profiles, cotune.sim.clock, cotune.sim.availability, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_user_profiles_from_yaml(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("profiles:\n  tablet:\n    base: phone-high\n    flops: 2.0e11\n")
    p = load_profiles(f)["tablet"]
    assert p.flops == 2e11 and p.up_bps == BUILTIN_PROFILES["phone-high"].up_bps
    f.write_text("tablet:\n  base: phone-high\n  down_bps: 0\n")
    with pytest.raises(ConfigError, match=r"profile 'tablet': down_bps must be > 0"):
        load_profiles(f)
    f.write_text("tablet:\n  base: phone-high\n  memory_bytes: -1\n")
    with pytest.raises(ConfigError, match="tablet.*memory_bytes"):
        load_profiles(f)
    f.write_text("tablet:\n  flops: 1.0e9\n")
    with pytest.raises(ConfigError, match="missing field"):
        load_profiles(f)
    f.write_text("tablet:\n  base: phone-high\n  speed: 3\n")
    with pytest.raises(ConfigError, match="unknown field.*speed"):
        load_profiles(f)


def test_a_broken_profile_file_is_named_with_its_line(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("tablet:\n  base: phone-high\n    flops: [1e9\n")
    with pytest.raises(ConfigError, match=r"p.yaml:3: device profile file is not valid YAML"):
        load_profiles(f)
    with pytest.raises(ConfigError, match="device profile file not found: .*nope.yaml"):
        load_profiles(tmp_path / "nope.yaml")
    f.write_bytes(b"tablet: \xff\xfe\n")
    with pytest.raises(ConfigError, match="device profile file: .*p.yaml is not UTF-8"):
        load_profiles(f)


def test_fleet_mix_rounding_is_deterministic():
    assert mix_counts(10, {"phone-low": 0.25, "phone-mid": 0.25, "jetson": 0.5}) == {
        "phone-low": 3, "phone-mid": 2, "jetson": 5,
    }  # fmt: skip
    assert sum(mix_counts(7, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}).values()) == 7
    f1 = build_fleet(10, {"phone-low": 0.25, "phone-mid": 0.25, "jetson": 0.5}, seed=3)
    f2 = build_fleet(10, {"phone-low": 0.25, "phone-mid": 0.25, "jetson": 0.5}, seed=3)
    assert f1 == f2 and sum(p.name == "jetson" for p in f1) == 5
    assert [p.name for p in build_fleet(2, devices=["a100", "jetson"])] == ["a100", "jetson"]
    assert {p.name for p in build_fleet(3)} == {"phone-mid"}


def test_fleet_errors():
    with pytest.raises(ConfigError, match=r"devices.mix: fractions must sum to 1"):
        build_fleet(4, {"phone-low": 0.5, "jetson": 0.4})
    with pytest.raises(
        ConfigError, match=r"devices.mix: unknown profile 'pager' \(known: phone-low"
    ):
        build_fleet(4, {"pager": 1.0})
    with pytest.raises(
        ConfigError, match=r"devices.profiles lists 1 profiles but devices.count is 2"
    ):
        build_fleet(2, devices=["jetson"])
    with pytest.raises(ConfigError, match=r"devices.profiles\[1\]: unknown profile 'x'"):
        build_fleet(2, devices=["jetson", "x"])


def test_fleet_from_config_section(tmp_path):
    from cotune.config import DevicesSection

    f = tmp_path / "p.yaml"
    f.write_text("tablet:\n  base: phone-high\n")
    cfg = DevicesSection(
        count=4, mix={"tablet": 0.5, "phone-low": 0.5}, profile_file=str(f), server="h100"
    )
    fleet, server = fleet_from_config(cfg, seed=0)
    assert len(fleet) == 4 and server.name == "h100"
    with pytest.raises(ConfigError, match="devices.server"):
        fleet_from_config(
            SimpleNamespace(count=1, mix=None, profiles=None, profile_file=None, server="tpu")
        )
