"""Human units in tables and on axes."""

import pytest

from cotune.report.units import fmt_bytes, fmt_energy, fmt_flops, fmt_seconds, fmt_value


@pytest.mark.parametrize(
    ("fmt", "value", "text"),
    [
        (fmt_bytes, 999, "999 B"),
        (fmt_bytes, 777_777, "777.8 KB"),
        (fmt_bytes, 512_000_000, "512 MB"),
        (fmt_bytes, 2.5e9, "2.5 GB"),
        (fmt_flops, 1.532e9, "1.532 GFLOP"),
        (fmt_flops, 3e12, "3 TFLOP"),
        (fmt_flops, 0, "0 FLOP"),
        (fmt_energy, 0.7276, "727.6 mJ"),
        (fmt_energy, 12.5, "12.5 J"),
        (fmt_energy, 4200, "4.2 kJ"),
        (fmt_seconds, 6.9e-9, "6.9 ns"),
        (fmt_seconds, 0.0516, "51.6 ms"),
        (fmt_seconds, 12.5, "12.5 s"),
        (fmt_seconds, 600, "10 min"),
        (fmt_seconds, 3 * 3600, "3 h"),
    ],
)
def test_formatters(fmt, value, text) -> None:
    assert fmt(value) == text


def test_fmt_value_picks_unit_from_key() -> None:
    assert fmt_value("costs.devices.flops", 2e9) == "2 GFLOP"
    assert fmt_value("bytes.total", 777777) == "777.8 KB"
    assert fmt_value("device_energy_j", 3.0) == "3 J"
    assert fmt_value("time_to_target.sim_time_s", 9.0) == "9 s"
    assert fmt_value("time_to_target.step", 30) == "30"
    assert fmt_value("memory_fits", False) == "NO" and fmt_value("memory_fits", None) == "—"
    assert fmt_value("final.accuracy", 0.80001) == "0.8"
