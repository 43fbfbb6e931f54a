"""Screenshots of the station's page (the README's pictures), taken with Playwright in Debian's chromium."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.alarms.rules import ALARM_TYPES

log = logging.getLogger(__name__)


def take_screenshots(url: str, user: str, password: str, out_dir: Path, alarm_type: str) -> list[Path]:
    """Log in at `url`, photograph the bed wall (`wall.png`), then the review strip of the newest open
    `alarm_type` alarm (`review.png`); returns the files written."""
    from playwright.sync_api import sync_playwright  # the dev extra: only this command needs it

    chromium = shutil.which("chromium")
    if chromium is None:
        raise FileNotFoundError("screenshots need Debian's chromium (apt-get install chromium)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(url)
        page.fill("#user", user)
        page.fill("#password", password)
        page.click("#submit")
        page.wait_for_selector(".tile[data-playhead]")
        page.wait_for_timeout(4000)  # let the traces sweep across their tiles
        page.screenshot(path=str(out_dir / "wall.png"))
        page.locator("#alarms tbody tr", has_text=ALARM_TYPES[alarm_type][2]).first.click()
        page.wait_for_selector("#review[open] canvas.strip")
        page.screenshot(path=str(out_dir / "review.png"))
        browser.close()
    log.info("station screenshots in %s", out_dir)
    return [out_dir / "wall.png", out_dir / "review.png"]
