"""report.html: one static page, checked in a real headless browser (Chromium from Debian's
packages, installed by .ci/run): it loads without console errors, its script sorts nothing
wrongly, and a screenshot shows the case table and the pictures. Also: the page's content
(settings, Dice by round, the cases sorted by the quality score, relative links to the labels)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from semisam_o1.pipeline.report_html import render, write_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MAGENTA = (1.0, 0.0, 1.0)


def _report() -> dict:
    quality = [{"case": f"case_{i}", "agreement": a, "foreground_entropy": 0.1 * i, "dice_real": None}
               for i, a in enumerate([0.41, 0.77, 0.93])]
    return {"method": "SemiSAM-O1", "template": "case_t", "n_unlabeled": 3, "n_test": 1,
            "config": {"preset": "quick", "seed": 0},
            "rounds": [{"round": 0, "pseudo_label_dice_unlabeled": {"mean_foreground_dice": 0.7}},
                       {"round": 1, "pseudo_label_dice_unlabeled": None,
                        "test_metrics": {"dice": {"first": 0.8, "second": 0.75}}}],
            "final": {"round": 1, "reason": "the last round", "quality": quality,
                      "labels": {q["case"]: f"labels/{q['case']}.nii.gz" for q in quality}}}


def _pictures(folder: Path) -> None:
    """The two pictures, each a solid magenta square (found again in the screenshot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in ("report_dice_by_round.png", "report_montage.png"):
        plt.imsave(folder / name, np.ones((60, 60, 3)) * np.array(MAGENTA))


def test_page_content():
    page = render(_report(), settings={"preset": "quick", "images": "/data/scans"})
    assert page.startswith("<!DOCTYPE html>") and "/data/scans" in page
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td><td>(case_\d)</td>", page)
    assert [c for _, c in rows] == ["case_0", "case_1", "case_2"]  # the order of the quality score
    assert 'href="labels/case_0.nii.gz"' in page and 'src="report_montage.png"' in page
    assert "0.8000" in page and "0.7500" in page  # test Dice by round
    assert "http://" not in page and "https://" not in page  # nothing outside the folder


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs Debian's chromium in .ci/run)")
def test_page_in_a_headless_browser(tmp_path):
    import matplotlib.image as mpimg

    _pictures(tmp_path)
    page = write_page(tmp_path / "report.html", _report(), settings={"preset": "quick"})
    shot = tmp_path / "shot.png"
    out = _chromium("--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1200,1600",
                    page.as_uri())
    console = [line for line in out.stderr.decode(errors="replace").splitlines() if ":CONSOLE" in line]
    assert console == [], console  # the page logs nothing: no script error, no console.error
    img = mpimg.imread(shot)[..., :3]
    magenta = (img[..., 0] > 0.9) & (img[..., 1] < 0.1) & (img[..., 2] > 0.9)
    assert magenta.sum() > 2 * 50 * 50, "the pictures are not on the screenshot"
    dom = _chromium("--dump-dom", page.as_uri()).stdout.decode()
    assert dom.count("labels/case_") == 6 and 'id="cases"' in dom  # the table, with its links, after the script

    broken = tmp_path / "broken.html"  # the check above can fail: a page with a script error
    broken.write_text(page.read_text().replace("rows.forEach", "rows.forEach(undefinedName);rows.forEach")
                      .replace("document.querySelectorAll", "undefinedName;document.querySelectorAll"))
    out = _chromium("--enable-logging=stderr", "--v=0", f"--screenshot={tmp_path / 'b.png'}", broken.as_uri())
    assert any(":CONSOLE" in line for line in out.stderr.decode(errors="replace").splitlines())
