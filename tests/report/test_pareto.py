"""The accuracy-vs-cost view: which runs are on the front, and the plot that shows it."""

import pytest

from cotune.report.pareto import front_names, pareto_front, plot_pareto, quality_key


def test_the_front_keeps_runs_no_other_beats_on_both():
    pts = [(1.0, 0.8), (10.0, 0.9), (100.0, 0.7), (10.0, 0.85), (1.0, 0.8)]
    # (1, .8) twice: neither beats the other strictly, both stay; (10, .85) loses to (10, .9).
    assert pareto_front(pts) == [0, 4, 1]
    assert pareto_front([(1.0, 30.0), (2.0, 10.0), (3.0, 20.0)], higher=False) == [0, 1]


def test_quality_prefers_accuracy_then_perplexity():
    assert quality_key([{"final_accuracy": 0.5}, {"final_accuracy": 0.6}]) == (
        "final_accuracy",
        True,
    )
    ppl = [{"final_perplexity": 30.0}, {"final_perplexity": 12.0}]
    assert quality_key(ppl) == ("final_perplexity", False)
    assert quality_key([{"final_accuracy": 0.5}]) is None


def _rows():
    return [
        {"name": "central", "paradigm": "central", "final_accuracy": 0.82,
         "device_compute_s": 0.0, "device_bytes": 2e5, "device_energy_j": 0.5},
        {"name": "fedavg", "paradigm": "fedavg", "final_accuracy": 0.70,
         "device_compute_s": 112.0, "device_bytes": 1.5e7, "device_energy_j": 555.0},
        {"name": "splitfrozen", "paradigm": "splitfrozen", "final_accuracy": 0.835,
         "device_compute_s": 0.09, "device_bytes": 1.2e8, "device_energy_j": 252.0},
    ]  # fmt: skip


def test_plot_pareto_draws_every_cost_panel(tmp_path):
    plot = plot_pareto(_rows(), tmp_path)
    assert plot is not None and plot.path.name == "pareto.png" and plot.wide
    assert plot.path.stat().st_size > 5000 and "Pareto front" in plot.note
    assert front_names(_rows(), "device_bytes") == ["central", "splitfrozen"]


@pytest.mark.parametrize("rows", [[], [{"name": "a", "final_accuracy": 0.5}]])
def test_nothing_to_draw(tmp_path, rows):
    assert plot_pareto(rows, tmp_path) is None
