"""Real headless Chromium for the browser tests, driven by Selenium.

Debian's ``chromium`` and ``chromium-driver`` (and ``libnss3-tools`` for :func:`nss_trust`)
are installed with apt-get when missing, and Selenium with pip; if that is impossible the
calling test FAILS with the installer's output (it never skips).

:class:`Browsers` starts them: each gets its own profile and, when given, its own ``HOME``
(Chromium on Linux reads the certificate authorities a user added from the NSS database in
``$HOME/.pki/nssdb``; :func:`nss_trust` makes one).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: Seconds a page load or a wait may take.
WAIT = 20.0


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return p.returncode, (p.stdout + p.stderr)[-3000:]


def _apt_install(commands: list[str], packages: list[str]) -> None:
    """Install Debian ``packages`` unless every one of ``commands`` is on PATH; fails the test
    if they are still missing afterwards."""
    if all(shutil.which(c) for c in commands):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    install = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    code, out = _run(install, 900)
    if code != 0:
        _run([*sudo, "apt-get", "update", "-q"], 600)
        code, out = _run(install, 900)
    if not all(shutil.which(c) for c in commands):
        pytest.fail(f"could not install {' and '.join(packages)} with apt-get (exit {code}):\n{out}", pytrace=False)


#: A font with Chinese glyphs (the desk's pages and the demo are partly in Chinese).
CJK_FONT = "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def ensure_browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages when missing (and
    a CJK font, so screenshots show Chinese labels, not boxes: best effort, since no
    assertion reads glyphs)."""
    _apt_install(["chromium", "chromedriver"], ["chromium", "chromium-driver"])
    if not (os.path.exists(CJK_FONT) and os.path.exists(EMOJI_FONT)):
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        code, out = _run([*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "fonts-wqy-zenhei", "fonts-noto-color-emoji"], 900)
        if code != 0:
            print(f"warning: no CJK font for the screenshots (apt-get exit {code}): {out[-300:]}", file=sys.stderr)
    return shutil.which("chromium") or "", shutil.which("chromedriver") or ""


def ensure_selenium() -> Any:
    try:
        return importlib.import_module("selenium")
    except ImportError:
        code, out = _run([sys.executable, "-m", "pip", "install", "-q", "selenium>=4.10"], 600)
        importlib.invalidate_caches()
        try:
            return importlib.import_module("selenium")
        except ImportError:
            pytest.fail(f"could not install selenium with pip (exit {code}):\n{out}", pytrace=False)


def nss_trust(home: Path, root_pem: Path, nickname: str = "livegate test root") -> Path:
    """An NSS database in ``home/.pki/nssdb`` (Chromium's on Linux for ``HOME=home``) that
    trusts ``root_pem`` as a CA for TLS servers (trust ``C,,``) and nothing else; returns
    ``home``. ``certutil`` (Debian's libnss3-tools) is installed when missing."""
    _apt_install(["certutil"], ["libnss3-tools"])
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, exist_ok=True)
    for cmd in (
        ["certutil", "-d", f"sql:{db}", "-N", "--empty-password"],
        ["certutil", "-d", f"sql:{db}", "-A", "-t", "C,,", "-n", nickname, "-i", str(root_pem)],
    ):
        code, out = _run(cmd, 60)
        assert code == 0, f"{' '.join(cmd)} failed (exit {code}):\n{out}"
    return home


class Browsers:
    """Starts headless Chromiums (``make(name, home=None)``); :meth:`quit` stops them all."""

    def __init__(self, paths: tuple[str, str], base: Path) -> None:
        self.chromium, self.driver = paths
        self.base = base
        self.started: list[Any] = []

    def make(self, name: str, home: Path | None = None) -> Any:
        """A Chromium with the profile ``base/name``; with ``home``, ``HOME`` is that
        directory (its NSS database decides which extra CAs are trusted)."""
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        opts = Options()
        opts.binary_location = self.chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=960,720", "--lang=en-US", f"--user-data-dir={self.base / name}"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        env = {**os.environ, "HOME": str(home)} if home is not None else None
        service = Service(executable_path=self.driver, log_output=str(self.base / f"chromedriver-{name}.log"), env=env)
        d = webdriver.Chrome(service=service, options=opts)
        d.set_page_load_timeout(WAIT)
        self.started.append(d)
        return d

    __call__ = make

    def quit(self) -> None:
        for d in self.started:
            try:
                d.quit()
            except Exception:  # best effort teardown
                pass


def wait(driver: Any, cond: Any, what: str, timeout: float = WAIT) -> Any:
    """WebDriverWait(cond); on timeout an AssertionError with the page's status and log."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)
    except TimeoutException:
        log = driver.find_element("id", "log").text if driver.find_elements("id", "log") else ""
        status = driver.find_element("id", "status").text if driver.find_elements("id", "status") else ""
        raise AssertionError(f"timed out waiting for {what}; status={status!r}\nlog:\n{log}\nconsole:\n{console(driver)}") from None


def texts(driver: Any, css: str) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", css)]


def console(driver: Any) -> list[str]:
    """The browser console's messages so far (each read once)."""
    try:
        return [e["message"] for e in driver.get_log("browser")]
    except Exception:  # logging not supported
        return []


def js_errors(driver: Any) -> list[str]:
    try:
        entries = driver.get_log("browser")
    except Exception:  # logging not supported
        return []
    return [e["message"] for e in entries if e.get("level") == "SEVERE" and "favicon" not in e["message"]]
