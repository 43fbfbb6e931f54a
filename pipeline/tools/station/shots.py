"""The station's page in a headless browser (Playwright, Debian's chromium): the README's screenshots, and the
benchmark's page."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.alarms.rules import ALARM_TYPES

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

log = logging.getLogger(__name__)


def open_wall(playwright: Playwright, url: str, user: str, password: str, width: int, height: int
              ) -> tuple[Browser, Page]:
    """Debian's chromium (headless) logged in to the station's page at `url`, its viewport `width` x `height` px."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise FileNotFoundError("this needs Debian's chromium (apt-get install chromium)")
    browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#submit")
    return browser, page


def take_screenshots(url: str, user: str, password: str, out_dir: Path, alarm_type: str) -> list[Path]:
    """Log in at `url`, photograph the bed wall (`wall.png`), then the review strip of the newest open
    `alarm_type` alarm (`review.png`); returns the files written."""
    from playwright.sync_api import sync_playwright  # the dev extra: only the screenshots and the benchmark need it

    out_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = open_wall(p, url, user, password, 1600, 900)
        page.wait_for_selector(".tile[data-playhead]")
        page.wait_for_timeout(4000)  # let the traces sweep across their tiles
        page.screenshot(path=str(out_dir / "wall.png"))
        page.locator("#alarms tbody tr", has_text=ALARM_TYPES[alarm_type][2]).first.click()
        page.wait_for_selector("#review[open] canvas.strip")
        page.screenshot(path=str(out_dir / "review.png"))
        browser.close()
    log.info("station screenshots in %s", out_dir)
    return [out_dir / "wall.png", out_dir / "review.png"]
