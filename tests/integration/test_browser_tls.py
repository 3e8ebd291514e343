"""Headless Chromium over ``https://`` and ``wss://`` on the gateway's own TLS listener
(issue 13): two browsers load the demo page from ``https://localhost:<tls_port>/``, the
page's SDK connects to ``wss://localhost:<tls_port>/ws`` (same origin, so no mixed
content), they join a room and chat both ways.

How Chromium trusts the test CA: through an NSS database, the way a user adds a CA on
Linux. :func:`support.browser.nss_trust` makes ``$HOME/.pki/nssdb`` under a temporary
``HOME`` with the throw-away root (``support.certs.TestCA``) trusted for TLS servers
(``certutil -t C,,``, Debian's libnss3-tools), and the browser is started with that
``HOME``. Chromium then verifies the whole chain the gateway serves (leaf + intermediate
up to that root) and the name ``localhost``, as it would for a public CA; no flag turns
verification off or pins a key (``--ignore-certificate-errors-spki-list`` would accept
the leaf's key whatever its chain, so it would not show that the chain is served and
valid). The second test is the control: a browser whose NSS database lacks the root gets
the certificate error page and cannot open the ``wss://`` socket, and the gateway counts
the handshakes it refused.

Chromium, chromedriver, certutil and Selenium are installed on demand
(``support.browser``); if that is impossible the tests FAIL (they never skip).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.browser import Browsers, js_errors, nss_trust, texts, wait
from support.certs import TestCA
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess, uniq

#: Runs before the page's own scripts: records every WebSocket the page opens (its URL and
#: what happened to it), without changing how it works.
WS_RECORDER = """
(() => {
  const Native = window.WebSocket;
  const log = (window.__wsLog = []);
  function Recorded(url, protocols) {
    const ws = protocols === undefined ? new Native(url) : new Native(url, protocols);
    const entry = { url: String(url), events: [] };
    log.push(entry);
    ws.addEventListener("open", () => entry.events.push("open"));
    ws.addEventListener("error", () => entry.events.push("error"));
    ws.addEventListener("close", (e) => entry.events.push("close " + e.code));
    return ws;
  }
  Recorded.prototype = Native.prototype;
  for (const k of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) Recorded[k] = Native[k];
  window.WebSocket = Recorded;
})();
"""



@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_gw(module_gateway_factory: GatewayFactory, pki: TestCA) -> GatewayProcess:
    leaf = pki.issue("server")
    return module_gateway_factory("auth.mode=dev", "presence.interval=1", tls=(leaf.cert_file, leaf.key_file))


def tls_counters(gw: GatewayProcess) -> dict[str, float]:
    """``handshakes`` (full + resumed) and ``failures`` (every reason) of the TLS listener,
    and each failure reason on its own."""
    out: dict[str, float] = {"handshakes": 0.0, "failures": 0.0}
    for line in gw.metrics().splitlines():
        if line.startswith("gateway_tls_handshakes_total{"):
            out["handshakes"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gateway_tls_handshake_failures_total{"):
            value = float(line.rsplit(" ", 1)[1])
            out["failures"] += value
            out[line.split('reason="', 1)[1].split('"', 1)[0]] = value
    return out


def open_page(d: Any, url: str) -> None:
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WS_RECORDER})
    d.get(url)


def page_problem(d: Any) -> str:
    """What the browser shows instead of the page (an error page's text), for messages."""
    try:
        return f"title={d.title!r}, text={d.find_element('tag name', 'body').text[:300]!r}"
    except Exception:  # the page may not even have a body
        return f"title={d.title!r}"


def try_wss(d: Any, url: str) -> str:
    """Open a plain ``new WebSocket(url)`` in the page: "open" or "error"."""
    return str(d.execute_async_script(
        """const [url, done] = arguments;
        const ws = new WebSocket(url);
        ws.onopen = () => { ws.close(); done("open"); };
        ws.onerror = () => done("error");""",
        url,
    ))


# First use installs chromium (apt-get, bounded at 2,400 s), certutil and selenium.
@pytest.mark.timeout(3060)
def test_two_browsers_chat_over_wss_with_the_test_ca_in_their_nss_db(tls_gw: GatewayProcess, pki: TestCA, browsers: Browsers, tmp_path: Path) -> None:
    gw = tls_gw
    home = nss_trust(tmp_path / "home", pki.root_file)
    before = tls_counters(gw)
    room = f"live:{uniq('tls')}"
    alice, bob = browsers("alice", home), browsers("bob", home)
    for d, user in ((alice, "alice"), (bob, "bob")):
        open_page(d, f"https://localhost:{gw.tls_port}/?user={user}&room={room}")
        loaded = d.execute_script("return typeof LiveGate === 'object' && location.protocol")
        assert loaded == "https:", f"{user}'s browser did not load the demo page over https: {page_problem(d)}\n{gw.log_tail(20)}"
        d.find_element("id", "join").click()
    for d, user in ((alice, "alice"), (bob, "bob")):
        wait(d, lambda d: f"joined {room}" in texts(d, ".msg.joined"), f"{user} joined over wss")
        wait(d, lambda d, user=user: d.find_element("id", "status").text == f"connected as {user}", f"{user} status")
        sockets = d.execute_script("return window.__wsLog")
        assert sockets, f"{user}'s page opened no WebSocket"
        for s in sockets:
            assert s["url"].startswith(f"wss://localhost:{gw.tls_port}/ws?"), f"{user}'s page opened {s['url']}"
        assert sockets[-1]["events"] == ["open"], sockets

    alice.find_element("id", "text").send_keys("hello over wss\n")
    wait(bob, lambda d: "alice: hello over wss" in texts(d, ".msg.chat"), "bob sees alice's message")
    bob.find_element("id", "text").send_keys("hi alice, bob over wss\n")
    wait(alice, lambda d: "bob: hi alice, bob over wss" in texts(d, ".msg.chat"), "alice sees bob's message")
    assert "alice: hello over wss" in texts(alice, ".msg.chat.mine"), "own messages come back"
    bob.find_element("id", "gift").click()
    wait(alice, lambda d: any("bob" in t and "rocket" in t for t in texts(d, ".msg.gift")), "alice sees bob's gift")

    # The gateway's side: TLS handshakes completed (two pages, two sockets at least), none failed.
    after = tls_counters(gw)
    assert after["handshakes"] - before["handshakes"] >= 4, (before, after)
    assert after["failures"] == before["failures"], (before, after)
    for d, user in ((alice, "alice"), (bob, "bob")):
        errors = js_errors(d)
        assert not errors, f"JavaScript errors in {user}'s page: {errors}"


@pytest.mark.timeout(3060)
def test_without_the_root_in_its_nss_db_chromium_refuses_the_gateway(tls_gw: GatewayProcess, browsers: Browsers, tmp_path: Path) -> None:
    gw = tls_gw
    home = tmp_path / "empty-home"  # Chromium makes an empty NSS database here
    home.mkdir()
    before = tls_counters(gw)
    d = browsers("stranger", home)
    d.get(f"https://localhost:{gw.tls_port}/?user=stranger")
    assert d.execute_script("return typeof LiveGate") == "undefined", "the page must not load from an untrusted server"
    assert "ERR_CERT_AUTHORITY_INVALID" in d.page_source or "not private" in d.page_source, page_problem(d)

    # A wss:// socket opened from a page that does load (the plain listener's demo page).
    d.get(f"{gw.http_url}/?user=stranger")
    assert try_wss(d, gw.wss_url(user="stranger")) == "error"

    after = tls_counters(gw)
    assert after["handshakes"] == before["handshakes"], (before, after)
    assert after["failures"] - before["failures"] >= 2, (before, after)
