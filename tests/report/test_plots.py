from cotune.report.metrics import main_series, series_by_role
from cotune.report.plots import _Line, _mark_flat, plot_compare, plot_run, stage_marks
from cotune.report.steps import step_note


def _records():
    out = []
    for step, stage in enumerate(["universal", "universal", "domain", "domain", "router"], 1):
        out.append({"event": "train", "step": step, "role": "server", "loss": 1.0 / step,
                    "sim_time_s": 0.5 * step, "stage": stage})  # fmt: skip
        out.append({"event": "eval", "step": step, "role": "server", "accuracy": 0.1 * step,
                    "sim_time_s": 0.5 * step + 0.1, "stage": stage})  # fmt: skip
    return out


def test_stage_marks_name_where_each_later_stage_starts():
    recs = _records()
    assert stage_marks(recs, "step") == [(3.0, "domain"), (5.0, "router")]
    assert stage_marks(recs, "sim_time_s") == [(1.5, "domain"), (2.5, "router")]
    plain = [{k: v for k, v in r.items() if k != "stage"} for r in recs]
    assert stage_marks(plain, "step") == []


def test_plot_run_draws_a_staged_run(tmp_path):
    plots = plot_run(_records(), tmp_path)
    names = {p.path.name for p in plots}
    assert {"train_loss.png", "eval_accuracy.png", "eval_accuracy_vs_sim_time.png"} <= names
    assert all(p.path.stat().st_size > 1000 for p in plots)


def test_an_all_zero_metric_is_not_plotted(tmp_path):
    recs = [{"event": "round", "step": s, "role": "server", "dropped": 0, "reported": 3}
            for s in (1, 2, 3)]  # fmt: skip
    names = {p.path.name for p in plot_run(recs, tmp_path)}
    assert names == {"round_reported.png"}


def test_a_run_squeezed_into_a_sliver_of_the_time_axis_is_drawn_flat(tmp_path):
    def evals(ts):
        return [{"event": "eval", "step": i, "role": "server", "accuracy": 0.5 + 0.1 * i,
                 "sim_time_s": t} for i, t in enumerate(ts)]  # fmt: skip

    runs = [("central", evals([0.1, 0.2])), ("fedavg", evals([20.0, 40.0, 60.0]))]
    lines = [_Line(lab, main_series(series_by_role(r, "eval", "accuracy", "sim_time_s")), "k")
             for lab, r in runs]  # fmt: skip
    _mark_flat(lines)
    assert [ln.flat for ln in lines] == [True, False]
    plots = plot_compare(runs, tmp_path, step_note="steps differ")
    by_name = {p.path.name: p for p in plots}
    assert by_name["eval_accuracy.png"].note == "steps differ"
    assert by_name["eval_accuracy_vs_sim_time.png"].note == ""


def test_step_note_only_when_a_step_is_different_work():
    assert step_note(["splitfed", "splitfrozen", "splitfed"]) == ""
    note = step_note(["central", "fedavg", None])
    assert "central: one batch of the pooled data" in note and "fedavg:" in note
