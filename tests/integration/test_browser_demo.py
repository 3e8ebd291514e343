"""The live-room demo page (served by ``gateway run`` at ``/``, built on the JS SDK) in two
real headless Chromium browsers: they join a room, chat with each other, see the online
count, a highlighted gift and an aggregated like counter. A screenshot is saved to
``target/artifacts/demo.png``.

Debian's ``chromium`` and ``chromium-driver`` are installed with apt-get when missing, and
Selenium with pip; if that is impossible the test FAILS (it never skips).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import GatewayFactory
from support.gateway import ROOT, uniq

ARTIFACTS = ROOT / "target" / "artifacts"
WAIT = 20.0


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return p.returncode, (p.stdout + p.stderr)[-3000:]


def _ensure_browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages when missing."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    install = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
    code, out = _run(install, 900)
    if code != 0:
        _run([*sudo, "apt-get", "update", "-q"], 600)
        code, out = _run(install, 900)
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(f"could not install chromium and chromium-driver with apt-get (exit {code}):\n{out}", pytrace=False)
    return chromium, driver


def _ensure_selenium() -> Any:
    try:
        return importlib.import_module("selenium")
    except ImportError:
        code, out = _run([sys.executable, "-m", "pip", "install", "-q", "selenium>=4.10"], 600)
        importlib.invalidate_caches()
        try:
            return importlib.import_module("selenium")
        except ImportError:
            pytest.fail(f"could not install selenium with pip (exit {code}):\n{out}", pytrace=False)


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    paths = _ensure_browser()
    _ensure_selenium()
    return paths


@pytest.fixture
def browsers(browser_paths: tuple[str, str], tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths
    started: list[Any] = []

    def make(name: str) -> Any:
        opts = Options()
        opts.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=960,720", "--lang=en-US", f"--user-data-dir={tmp_path / name}"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=driver_path, log_output=str(tmp_path / f"chromedriver-{name}.log"))
        d = webdriver.Chrome(service=service, options=opts)
        d.set_page_load_timeout(WAIT)
        started.append(d)
        return d

    yield make
    for d in started:
        try:
            d.quit()
        except Exception:  # noqa: BLE001 - best effort teardown
            pass


def _wait(driver: Any, cond: Any, what: str, timeout: float = WAIT) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)
    except TimeoutException:
        log = driver.find_element("id", "log").text if driver.find_elements("id", "log") else ""
        status = driver.find_element("id", "status").text if driver.find_elements("id", "status") else ""
        raise AssertionError(f"timed out waiting for {what}; status={status!r}\nlog:\n{log}") from None


def _texts(driver: Any, css: str) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", css)]


def _js_errors(driver: Any) -> list[str]:
    try:
        entries = driver.get_log("browser")
    except Exception:  # noqa: BLE001 - logging not supported
        return []
    return [e["message"] for e in entries if e.get("level") == "SEVERE" and "favicon" not in e["message"]]


# First use installs chromium with apt-get (bounded at 2,400 s) and selenium with pip (600 s).
@pytest.mark.timeout(3060)
def test_two_browsers_chat_gift_and_likes(gateway_factory: GatewayFactory, browsers: Any) -> None:
    gw = gateway_factory("auth.mode=dev", "presence.interval=1")
    room = f"live:{uniq('browser')}"
    alice, bob = browsers("alice"), browsers("bob")
    for d, user in ((alice, "alice"), (bob, "bob")):
        d.get(f"{gw.http_url}/?user={user}&room={room}")
        assert "__WS_PATH__" not in d.page_source, "the ws path placeholder was substituted"
        assert d.execute_script("return typeof LiveGate === 'object' && LiveGate.VERSION"), "the page runs the SDK"
        d.find_element("id", "join").click()
    for d, user in ((alice, "alice"), (bob, "bob")):
        _wait(d, lambda d: f"joined {room}" in _texts(d, ".msg.joined"), f"{user} joined")
        _wait(d, lambda d, user=user: d.find_element("id", "status").text == f"connected as {user}", f"{user} status")

    # Chat both ways.
    alice.find_element("id", "text").send_keys("hello from alice\n")
    _wait(bob, lambda d: "alice: hello from alice" in _texts(d, ".msg.chat"), "bob sees alice's message")
    bob.find_element("id", "text").send_keys("hi alice, bob here")
    bob.find_element("id", "send").click()
    _wait(alice, lambda d: "bob: hi alice, bob here" in _texts(d, ".msg.chat"), "alice sees bob's message")
    assert "alice: hello from alice" in _texts(alice, ".msg.chat.mine"), "own messages come back and are marked"

    # The online count (presence frames, every second here).
    for d, user in ((alice, "alice"), (bob, "bob")):
        _wait(d, lambda d: d.find_element("id", "online").text == "2", f"online count 2 for {user}")

    # A gift is highlighted (a high-priority message).
    bob.find_element("id", "gift").click()
    gift = _wait(alice, lambda d: next((e for e in d.find_elements("css selector", ".msg.gift") if "bob" in e.text), None), "alice sees bob's gift")
    assert "rocket" in gift.text
    bg = alice.execute_script("return getComputedStyle(arguments[0]).backgroundImage", gift)
    assert "gradient" in bg, f"gift highlighted, got background {bg!r}"
    assert not _texts(alice, ".msg.chat") or all("rocket" not in t for t in _texts(alice, ".msg.chat")), "the gift is not a plain chat line"

    # Likes: aggregated client side into one message, counted on both pages.
    assert alice.find_element("id", "likes").text == "0"
    like = alice.find_element("id", "like")
    for _ in range(3):
        like.click()
    for d, user in ((alice, "alice"), (bob, "bob")):
        _wait(d, lambda d: d.find_element("id", "likes").text == "3", f"like counter 3 for {user}")
    bob.find_element("id", "like").click()
    for d, user in ((alice, "alice"), (bob, "bob")):
        _wait(d, lambda d: d.find_element("id", "likes").text == "4", f"like counter 4 for {user}")
    assert not [t for t in _texts(alice, ".msg") if "like" in t.lower()], "likes are a counter, not log lines"

    alice.find_element("id", "text").send_keys("see you!\n")
    _wait(bob, lambda d: "alice: see you!" in _texts(d, ".msg.chat"), "bob sees the last message")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert alice.save_screenshot(str(ARTIFACTS / "demo.png")), "screenshot saved"
    bob.save_screenshot(str(ARTIFACTS / "demo-bob.png"))
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000

    for d, user in ((alice, "alice"), (bob, "bob")):
        errors = _js_errors(d)
        assert not errors, f"JavaScript errors in {user}'s page: {errors}"
