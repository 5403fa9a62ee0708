from cotune.report.plots import plot_run, stage_marks


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
