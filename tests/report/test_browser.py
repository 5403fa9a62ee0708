"""The comparison page as a person sees it: rendered by a headless browser where one is
installed (Chromium or Chrome), the screenshot must show the plots, not broken images."""

import shutil
import subprocess
from pathlib import Path

import pytest

from cotune.report import write_compare_report, write_run_report

BROWSER = next(
    (b for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)),
    None,
)


def _screenshot(page: Path, out: Path) -> Path:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1200,2600", f"--screenshot={out}", page.resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    return out


def _palette_pixels(png: Path, rgb: tuple[int, int, int]) -> int:
    from PIL import Image

    img = Image.open(png).convert("RGB")
    near = 0
    for r, g, b in img.getdata():
        near += abs(r - rgb[0]) + abs(g - rgb[1]) + abs(b - rgb[2]) < 30
    return near


@pytest.mark.skipif(BROWSER is None, reason="no headless browser (chromium/chrome) installed")
def test_the_comparison_page_renders_with_its_plots(tmp_path: Path, make_run) -> None:
    runs = [make_run(tmp_path, n, devices=3, sim_time=True, costs=True) for n in ("a", "b")]
    for r in runs:
        write_run_report(r)
    page = write_compare_report(runs, tmp_path / "cmp")
    shot = _screenshot(page, tmp_path / "shot.png")
    # Plot lines and bars use the palette; a page of broken images and text has none of it.
    assert _palette_pixels(shot, (0x1F, 0x77, 0xB4)) > 2000  # run "a", first palette colour
    assert _palette_pixels(shot, (0xD6, 0x27, 0x28)) > 2000  # run "b"
    blank = _screenshot(tmp_path / "cmp" / "missing.html", tmp_path / "blank.png")
    assert _palette_pixels(blank, (0x1F, 0x77, 0xB4)) == 0  # the check can fail
