"""Regenerate docs/images/digits-inspect.png and digits-check.png: the digits sample's HTML pages in Chromium.

Run from the repository root: ``python docs/screenshots.py`` (needs Debian's chromium at
/usr/bin/chromium and the test extras' Playwright). The pages are the README's quick-start run
written with ``--format html``; the inspect page shows its first departing layer opened.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from bn_inspect.cli.main import run  # noqa: E402

DIGITS = ROOT / "sample_models" / "digits_cnn"
MODEL, IMAGES_FILE = DIGITS / "torchscript.pt", DIGITS / "test_images_unscaled.npy"
IMAGES = ROOT / "docs" / "images"
# The inspect page down to the end of the opened layer's channel plots; the check page whole.
CLIPS = {"inspect": "#details details[open]", "check": None}


def main() -> None:
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900}, device_scale_factor=1)
        for command, last in CLIPS.items():
            html = Path(folder) / f"{command}.html"
            # Relative paths, as the README's quick start runs from the repository root.
            model, images = (str(path.relative_to(ROOT)) for path in (MODEL, IMAGES_FILE))
            run([command, model, "--input", images, "--format", "html", "--output", str(html), "--quiet"])
            page.goto(html.as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg")
            page.wait_for_timeout(500)
            target = IMAGES / f"digits-{command}.png"
            if last is None:
                page.screenshot(path=str(target), full_page=True)
            else:
                box = page.locator(last).bounding_box()
                assert box is not None
                clip = {"x": 0, "y": 0, "width": 1200, "height": box["y"] + box["height"] + 16}
                page.screenshot(path=str(target), full_page=True, clip=clip)
            print(f"wrote {target.relative_to(ROOT)}")
        browser.close()


if __name__ == "__main__":
    main()
