"""`cotune export --overwrite` replaces only a previous export (run safety, case 3), and the
smaller bad-input cases of the same issue (data paths, dataset typos, offline hub ids, methods)."""

import time

import pytest

from cotune.cli import main
from cotune.errors import AdapterError, DataError, ModelError, RunDirError
from cotune.export import EXPORT_MARKER, export_run
from cotune.run import run_experiment


@pytest.fixture
def run_dir(tiny_config):
    return run_experiment(tiny_config(), quiet=True, report=False)


def test_export_overwrite_replaces_a_previous_export(run_dir, tmp_path):
    out = tmp_path / "out"
    export_run(run_dir, out)
    assert (out / EXPORT_MARKER).is_file() and (out / "adapter_config.json").is_file()
    with pytest.raises(RunDirError, match="already exists"):
        export_run(run_dir, out)
    export_run(run_dir, out, overwrite=True)
    assert (out / "adapter_config.json").is_file()
    assert not list(tmp_path.glob(".out*"))  # no temp or old copy left behind


def test_export_overwrite_refuses_what_is_not_an_export(run_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(RunDirError, match="not a cotune export.*refusing to delete"):
        export_run(run_dir, mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "precious"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(RunDirError, match="is a file"):
        export_run(run_dir, a_file, overwrite=True)
    for target in (run_dir, run_dir.parent):  # the run itself, or a folder holding it
        with pytest.raises(RunDirError, match="is the run directory .* or contains it"):
            export_run(run_dir, target, overwrite=True)
        assert (run_dir / "config.yaml").is_file()
    # Through the CLI: a clear message, exit 2, no traceback.
    assert main(["export", str(run_dir), str(run_dir), "--overwrite"]) == 2
    assert "contains it" in capsys.readouterr().err


# ---------------------------------------------------------------- smaller cases


def test_a_directory_given_as_data_file_says_so(tiny_config, tmp_path):
    d = tmp_path / "data_dir"
    d.mkdir()
    with pytest.raises(DataError, match="is a directory, not a data file"):
        run_experiment(tiny_config(data={"dataset": str(d)}), quiet=True, report=False)


def test_builtin_dataset_typo_suggests_the_closest(tiny_config):
    with pytest.raises(
        DataError, match=r"did you mean the built-in dataset 'fortunes'\?.*cotune datasets"
    ):
        run_experiment(tiny_config(data={"dataset": "fortunse"}), quiet=True, report=False)


def test_offline_hub_id_fails_fast_with_a_suggestion(tiny_config, monkeypatch):
    import cotune.models.loading as loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"'gpt2' is not a local directory.*random:gpt2"):
        run_experiment(tiny_config(model={"name_or_path": "gpt2"}), quiet=True, report=False)
    assert time.perf_counter() - start < 20  # not ~30 s of network retries


def test_unknown_peft_method_is_reported_before_loading_anything(tiny_config, monkeypatch):
    import cotune.data as data

    def no_loading(*a, **k):
        raise AssertionError("data was loaded before the method name was checked")

    monkeypatch.setattr(data, "load_task_data", no_loading)
    with pytest.raises(AdapterError, match=r"peft.method: unknown PEFT method 'loraa'"):
        run_experiment(tiny_config(peft={"method": "loraa"}), quiet=True, report=False)
    with pytest.raises(AdapterError, match=r"^peft.options: unknown option"):
        run_experiment(tiny_config(peft={"options": {"bogus": 1}}), quiet=True, report=False)
