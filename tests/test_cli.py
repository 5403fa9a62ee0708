import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cotune.cli import main
from tests.conftest import tiny_config_dict


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\nfrom cotune.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("[]")


def test_datasets_lists_builtins(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "fortunes" in out and "austen" in out


def test_bad_config_exits_2_with_field(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: -3\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "greater than or equal to 1" in err


def test_run_report_export(tmp_path, capsys):
    cfg = tiny_config_dict(tmp_path, name="cli")
    p = tmp_path / "cli.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "--quiet", "--set", "train.steps=4", "--set", "eval.every=2"]) == 0
    assert "cli (central): eval accuracy=" in capsys.readouterr().out  # --quiet keeps the result
    run_dir = tmp_path / "runs" / "cli"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert main(["run", str(p), "--quiet"]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0 and (run_dir / "report.html").is_file()
    assert main(["export", str(run_dir), str(tmp_path / "ad")]) == 0
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert main(["export", str(run_dir), str(tmp_path / "merged"), "--merge"]) == 0
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    labels = json.loads((run_dir / "labels.json").read_text())
    # A pipeline on the export says the run's labels, not LABEL_0..
    assert merged["id2label"] == {str(i): n for i, n in enumerate(labels)}
    assert merged["label2id"] == {n: i for i, n in enumerate(labels)}


def test_an_adapter_names_its_base_by_the_id_other_tools_know():
    from cotune.models.loading import public_model_id

    assert public_model_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert public_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def two_configs(tmp_path):
    """Config files of a tiny central run ("c") and a tiny local run ("l")."""
    paths = []
    for name, paradigm in (("c", "central"), ("l", "local")):
        cfg = tiny_config_dict(tmp_path, name=name, paradigm={"name": paradigm})
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        paths.append(str(p))
    return paths


def test_compare_writes_one_report(tmp_path):
    paths = two_configs(tmp_path)
    out = tmp_path / "cmp"
    assert main(["compare", *paths, "--out", str(out), "--quiet", "--set", "train.steps=3"]) == 0
    assert (out / "report.html").is_file() and (out / "c" / "summary.json").is_file()


def test_an_interrupted_compare_resumes(tmp_path, capsys):
    paths = two_configs(tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", *paths, "--out", str(out), "--quiet", "--set", "train.steps=3"]
    assert main(args) == 0
    kept = (out / "c" / "summary.json").stat().st_mtime_ns
    # The second run was cut short after its final checkpoint: its outputs are missing.
    (out / "l" / "summary.json").unlink()
    (out / "report.html").unlink()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # refused, not resumed
    assert main([*args, "--resume"]) == 0
    assert (out / "c" / "summary.json").stat().st_mtime_ns == kept  # the finished run is kept
    assert (out / "l" / "summary.json").is_file() and (out / "report.html").is_file()
    # A finished run of another config is not passed off as this one.
    assert main([*args[:-1], "train.steps=2", "--resume"]) == 2
    assert "different config" in capsys.readouterr().err


def assert_page_is_whole(page: Path) -> None:
    """The HTML parses with every tag closed, and every image or page it links exists."""
    from html.parser import HTMLParser

    class Check(HTMLParser):
        void = {"img", "br", "meta", "link", "hr", "input", "col", "source"}

        def __init__(self):
            super().__init__()
            self.open, self.refs = [], []

        def handle_starttag(self, tag, attrs):
            self.refs += [v for k, v in attrs if k in ("src", "href") and v]
            if tag not in self.void:
                self.open.append(tag)

        def handle_endtag(self, tag):
            assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing open"

    check = Check()
    check.feed(page.read_text())
    assert check.open == [], f"unclosed: {check.open}"
    local = [r for r in check.refs if not r.startswith(("http", "#", "data:", "mailto:"))]
    assert local and all((page.parent / r).exists() for r in local), local


def test_compare_over_seeds_reports_mean_and_interval(tmp_path):
    paths = two_configs(tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", *paths, "--out", str(out), "--quiet", "--seeds", "2",
            "--set", "train.steps=2", "--set", "eval.every=2"]  # fmt: skip
    assert main(args) == 0
    assert {d.name for d in out.iterdir() if d.is_dir() and d.name != "plots"} == {
        "c-seed0", "c-seed1", "l-seed0", "l-seed1"}  # fmt: skip
    rows = {r["name"]: r for r in json.loads((out / "seeds.json").read_text())}
    assert set(rows) == {"c", "l"} and rows["c"]["seeds"] == 2
    accs = [json.loads((out / f"c-seed{k}" / "summary.json").read_text())["final"]["accuracy"]
            for k in (0, 1)]  # fmt: skip
    assert rows["c"]["final_accuracy_mean"] == pytest.approx(sum(accs) / 2)
    page = (out / "report.html").read_text()
    assert "Over seeds" in page and "Conclusions" in page and "Ships raw data" in page
    assert_page_is_whole(out / "report.html")
    compare = json.loads((out / "compare.json").read_text())
    assert all(0 < r["accuracy_ci95"] < 0.5 and r["eval_examples"] > 0 for r in compare)
    assert main([*args[:-4], "--seeds", "0"]) == 2


def test_devices_lists_profiles(capsys, tmp_path):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "phone-low" in out and "jetson" in out and "a100" in out
    extra = tmp_path / "p.yaml"
    extra.write_text("profiles:\n  my-board:\n    base: jetson\n    flops: 2.0e12\n")
    assert main(["devices", "--profile-file", str(extra)]) == 0
    assert "my-board" in capsys.readouterr().out
    extra.write_text("profiles:\n  bad-board:\n    base: jetson\n    up_bps: 0\n")
    assert main(["devices", "--profile-file", str(extra)]) == 2
    assert "up_bps" in capsys.readouterr().err
