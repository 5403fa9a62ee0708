"""The comparison's conclusions: accuracy against the test set's noise, the fastest to target,
the cheapest on the devices among paradigms that keep data there, and who ships raw data."""

from cotune.report.conclusions import conclusions


def row(name, paradigm, acc, ci, **kw):
    return {"name": name, "paradigm": paradigm, "final_accuracy": acc, "accuracy_ci95": ci, **kw}


def test_a_lead_within_the_test_sets_noise_is_called_so():
    text = conclusions([row("a", "fedavg", 0.80, 0.05), row("b", "splitfed", 0.78, 0.05)])
    assert text[0].startswith("Most accurate: a (0.800), ahead of b by 0.020, within")


def test_a_clear_lead_and_costs_leave_raw_data_shippers_out():
    rows = [
        row("central", "central", 0.6, 0.01, device_bytes=1.0, time_to_target_sim_s=1.0),
        row("fed", "fedavg", 0.9, 0.01, device_bytes=5e6),
        row("split", "splitfed", 0.7, 0.01, device_bytes=2e8, time_to_target_sim_s=9.0),
    ]
    text = conclusions(rows)
    assert "more than the test set's noise" in text[0]
    assert any(t.startswith("First to the target") and "never reached it: fed" in t for t in text)
    assert any(t.startswith("Least bytes moved") and "fed (" in t for t in text)
    assert text[-1].endswith("central.") and "raw data" in text[-1]


def test_one_run_has_nothing_to_conclude():
    assert conclusions([row("a", "fedavg", 0.8, 0.05)]) == []


def test_the_trade_off_names_the_runs_no_other_beats_on_quality_and_device_compute():
    rows = [
        row("central", "central", 0.95, 0.01, device_compute_s=0.0),  # not a contender
        row("cheap", "splitfrozen", 0.80, 0.01, device_compute_s=1.0),
        row("good", "splitfed", 0.90, 0.01, device_compute_s=10.0),
        row("worse", "fedavg", 0.70, 0.01, device_compute_s=100.0),
    ]
    text = [t for t in conclusions(rows) if t.startswith("Best trade-offs")]
    assert text and text[0].endswith(": cheap, good.")
