"""Helpers of the UI tests: a UI server in a thread, a headless Chromium, polling with a deadline."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def wait_until(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)  # polling interval of a deadline loop, not a fixed wait


@contextmanager
def ui_server(settings: Any) -> Iterator[str]:
    """Serve the UI for ``settings`` on a free loopback port in a thread; yields its base URL."""
    from tunelab.serve.server import GracefulServer, server_config
    from tunelab.ui.app import create_ui_app

    ready: list[str] = []
    server = GracefulServer(server_config(create_ui_app(settings), "127.0.0.1", 0, read_timeout=30.0,
                                          graceful_timeout=2.0), on_ready=ready.append)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield wait_until(lambda: ready and ready[0], 30, what="the UI server to start")
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Debian Chromium driven by Playwright (no browser download); skips when either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the UI tests drive Chromium)")
    if not Path(CHROMIUM).exists():
        pytest.skip("the UI tests need Debian's chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def goto(page: Any, url: str) -> None:
    """Navigate and wait until the page's module has rendered (main[data-ready])."""
    page.goto(url)
    page.wait_for_selector("main[data-ready]", timeout=60_000)


def assert_fits_width(page: Any) -> None:
    """No horizontal scrolling at the window's width."""
    scroll, client = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert scroll <= client, f"the page scrolls horizontally ({scroll} > {client} px)"


def shown_number(text: str) -> float:
    """A number as the page shows it (``1,234``, ``6.722``, ``7.50e-4``) as a float."""
    return float(text.replace(",", "").strip())
