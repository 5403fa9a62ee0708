"""The claims suite's harness (benchmarks/claims): intervals, verdicts, and the generated page."""

import json
import sys
from pathlib import Path

import pytest

CLAIMS = Path(__file__).resolve().parents[1] / "benchmarks" / "claims"


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.syspath_prepend(str(CLAIMS))
    for name in ("harness", "render", "run_all"):
        sys.modules.pop(name, None)
    import harness

    return harness


def test_mean_ci_and_verdicts(harness):
    m, h = harness.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert harness.verdict([0.02, 0.03, 0.025], expect="positive") == "reproduced"
    assert harness.verdict([-0.02, 0.03, 0.01], expect="positive") == "inconclusive"
    assert harness.verdict([-0.02, -0.03, -0.025], expect="positive") == "not reproduced"
    # "at least 0.8 saved": 0.9 ± small is reproduced, 0.7 ± small is not
    assert harness.verdict([0.9, 0.91, 0.9], expect="positive", margin=0.8) == "reproduced"
    assert harness.verdict([0.7, 0.71, 0.7], expect="positive", margin=0.8) == "not reproduced"
    assert harness.verdict([-0.5, -0.6, -0.55], expect="negative") == "reproduced"
    assert harness.verdict([0.5], expect="positive") == "inconclusive"  # one seed: no interval


def test_page_is_generated_from_result_files(harness, tmp_path, monkeypatch):
    import render

    results = tmp_path / "results"
    results.mkdir()
    (tmp_path / "docs").mkdir()
    fig = harness.figure("X − LoRA (points)", [1.0, 2.0, 3.0], "points")
    (results / "d2lora.json").write_text(json.dumps({
        "claim": "d2lora", "date": "2026-12-01", "command": ".venv/bin/python benchmarks/claims/d2lora.py",
        "paper": "P", "setting": "S", "reconstruction": "R", "figures": [fig],
        "verdict": "inconclusive", "expect": "diff > 0",
    }))  # fmt: skip
    monkeypatch.setattr(render, "RESULTS", results)
    monkeypatch.setattr(render, "ROOT", tmp_path)
    render.main()
    page = (tmp_path / "docs" / "claims.md").read_text()
    assert "| D²LoRA: data-driven init helps at low resource | inconclusive |" in page
    assert "2.0 ± 2.5 points" in page and "2026-12-01" in page
    assert "**Not run yet**" in page  # every claim without a result says so


def test_the_suite_runner_balances_its_lanes_and_knows_every_claim(harness):
    import render
    import run_all

    lanes = run_all.lanes_for(list(run_all.MINUTES), 2)
    load = [sum(run_all.MINUTES[c] for c in lane) for lane in lanes]
    assert sorted(c for lane in lanes for c in lane) == sorted(run_all.MINUTES)
    assert max(load) - min(load) <= max(run_all.MINUTES.values())
    # Every claim on the page has a script the runner starts, in a lane or alone.
    assert {cid for cid, _, _ in render.CLAIMS} == set(run_all.MINUTES) | set(run_all.ALONE)
    assert all((CLAIMS / script).is_file() for _, _, script in render.CLAIMS)


@pytest.fixture
def side_by_side(monkeypatch):
    monkeypatch.syspath_prepend(str(CLAIMS))
    sys.modules.pop("splitlora_reference", None)
    import splitlora_reference

    return splitlora_reference


def test_reference_harness_skips_with_a_reason_when_the_source_is_absent(
    side_by_side, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("COTUNE_SPLITLORA_REF", raising=False)
    with pytest.raises(side_by_side.Skip, match="--reference PATH"):
        side_by_side.reference_root(None)
    with pytest.raises(side_by_side.Skip, match="no SplitLoRA/examples/src/gpt2_ft_sfl.py"):
        side_by_side.reference_root(str(tmp_path))
    # a checkout (SplitLoRA/ inside) or the SplitLoRA folder itself; from the environment too
    src = tmp_path / "SplitLoRA" / "examples" / "src"
    src.mkdir(parents=True)
    (src / "gpt2_ft_sfl.py").write_text("")
    (tmp_path / "SplitLoRA" / "loralib").mkdir()
    (tmp_path / "SplitLoRA" / "loralib" / "__init__.py").write_text("")
    assert side_by_side.reference_root(str(tmp_path)) == (tmp_path / "SplitLoRA").resolve()
    monkeypatch.setenv("COTUNE_SPLITLORA_REF", str(tmp_path / "SplitLoRA"))
    assert side_by_side.reference_root(None) == (tmp_path / "SplitLoRA").resolve()
    # main() prints the reason and returns (exit 0): a benchmark run without the reference
    monkeypatch.setattr(sys, "argv", ["splitlora_reference.py", "--reference", str(src)])
    side_by_side.main()
    assert capsys.readouterr().out.startswith(f"skipped: {src}: no SplitLoRA/")


def test_reference_harness_edits_only_what_it_knows_and_reads_the_log(side_by_side):
    text = 'd = torch.device("cuda")\nm = m.cuda()\n'
    assert side_by_side.cpu_source(text, "x.py") == 'd = torch.device("cpu")\nm = m\n'
    with pytest.raises(side_by_side.Skip, match=r"x.py: expected '\.cuda\(\)'"):
        side_by_side.cpu_source('d = torch.device("cuda")\n', "x.py")
    log = (
        "| epoch   1 step        3 |      7 batches | lr 0.0002 | ms/batch 900.00 | "
        "loss 10.80 | avg loss 10.85 | ppl 51000.00\nsaving checkpoint\n"
        "| epoch   1 step        6 |     10 batches | lr 0.0002 | ms/batch 1000.50 | "
        "loss 10.70 | avg loss 10.75 | ppl 46000.00\n"
    )
    secs, losses = side_by_side.parse_reference_log(log)
    assert secs == pytest.approx([2.7, 3.0015]) and losses == [10.85, 10.75]
