"""docs/config.md is the config models' own description: regenerated, it must not change."""

import subprocess
import sys
from pathlib import Path

from cotune.config import RunConfig
from cotune.config_reference import comments_of, render

ROOT = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_up_to_date():
    assert (ROOT / "docs/config.md").read_text() == render(), (
        "docs/config.md is stale: run `python -m cotune.config_reference > docs/config.md`"
    )


def test_every_section_field_has_a_line_of_meaning():
    missing = [line.split("|")[1].strip() for line in render().splitlines()
               if line.startswith("| `") and line.rstrip().endswith("|  |")]  # fmt: skip
    assert not missing, f"fields without a comment in the code: {missing}"


def test_comments_come_from_the_line_above_and_the_line_end():
    notes = comments_of(RunConfig)
    assert notes["seed"].startswith("Seeds everything")


def test_the_generator_imports_no_torch():
    code = "import sys, cotune.config_reference as r; r.render(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
