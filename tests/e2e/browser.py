"""A real headless browser for the UI tests: Debian's Chromium driven by Playwright (``playwright install``
cannot download browsers here, ../shared/ENVIRONMENT.md §12). Screenshots are kept as test artifacts in
``$VMMIGRATION_ARTIFACTS/screenshots`` (default ``var/artifacts/screenshots`` in the project)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"


def artifacts_dir() -> Path:
    path = Path(os.environ.get("VMMIGRATION_ARTIFACTS") or ROOT / "var" / "artifacts") / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def chromium_page(*, width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A fresh page of a headless Chromium (skips the test when Chromium or Playwright is missing)."""
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (scripts/bootstrap.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot ``<name>.png`` among the test artifacts; returns its path."""
    path = artifacts_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0, f"empty screenshot {path}"
    return path
