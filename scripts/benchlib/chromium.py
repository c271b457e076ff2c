"""Headless Chromium driven by Selenium, for the browser tests, the dashboard's bench rows and
scripts/dashboard-shots. It is Debian's browser and driver (the packages chromium and
chromium-driver, which scripts/setup-host installs): Selenium is told where both are, so it
never downloads a browser of its own (nothing can be downloaded on an air-gapped box)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

CHROMIUM = os.environ.get("GPUBOX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GPUBOX_CHROMEDRIVER", "/usr/bin/chromedriver")


def missing() -> str:
    """Why no browser can be started here, or "" when one can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} is missing: apt-get install {package} (scripts/setup-host does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "Selenium is missing: pip install -e '.[test]' (scripts/setup-host does)"
    return ""


def start(width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium window of this size. The console is kept (get_log("browser")),
    and a dialog a page opens stays open for the caller to find (switch_to.alert) instead
    of being dismissed on the next command."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",  # a container's /dev/shm is often 64 MiB
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.set_capability("unhandledPromptBehavior", "ignore")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def sign_in(driver: Any, url: str, token: str) -> None:
    """Sign in through the dashboard's form, as a person would, and wait for the queue."""
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait(lambda: driver.title.startswith("Queue"), 10, "the queue page after signing in")


def wait(predicate: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.02) -> Any:
    """The first true value of predicate(), asked every `every_s`; TimeoutError after
    `timeout_s`. An exception from predicate() counts as a false value (a page between two
    states), and is named in the TimeoutError if it was the last answer."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            found = predicate()
            last = None
        except Exception as exc:
            found, last = None, exc
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}: {last!r}")
        time.sleep(every_s)
