"""Headless Chromium for the web console's browser tests, driven by selenium.

The browser and its driver are the system's (Debian ``chromium`` and ``chromium-driver``,
installed by ``.ci/run``); selenium is told both paths, so it never downloads either. Absent
ones skip the tests outside CI and fail them in CI. Screenshots go to
``$EVENTSCHED_TEST_SCREENSHOTS`` when set, else to ``console-screenshots/`` under pytest's
base temporary directory (``--basetemp``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

CHROMIUM = os.environ.get("EVENTSCHED_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EVENTSCHED_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_browser() -> tuple[str, str]:
    """The paths of Chromium and chromedriver; skip (outside CI) or fail (in CI)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (shutil.which(p) or Path(p).is_file())]
    if missing:
        message = (
            f"{', '.join(missing)} not installed"
            " (apt-get install -y --no-install-recommends chromium chromium-driver)"
        )
        if in_ci():
            pytest.fail(f"{message}; CI must provide it")
        pytest.skip(message)
    return CHROMIUM, CHROMEDRIVER


def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("EVENTSCHED_TEST_SCREENSHOTS")
    path = (
        Path(configured) if configured else tmp_path_factory.getbasetemp() / "console-screenshots"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium (a selenium WebDriver) whose console log is readable."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check: Callable[[], T | None], timeout: float = 30.0, what: str = "") -> T:
    """Poll ``check`` (blocking) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.2)
