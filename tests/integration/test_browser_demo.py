"""The live-room demo page (served by ``gateway run`` at ``/``, built on the JS SDK) in two
real headless Chromium browsers: they join a room, chat with each other, see the online
count, a highlighted gift and an aggregated like counter. A screenshot is saved to
``target/artifacts/demo.png``.

Debian's ``chromium`` and ``chromium-driver`` are installed with apt-get when missing, and
Selenium with pip (``support.browser``); if that is impossible the test FAILS (it never
skips).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.browser import Browsers, ensure_browser, ensure_selenium, js_errors, texts, wait
from support.fixtures import GatewayFactory
from support.gateway import ROOT, uniq

ARTIFACTS = ROOT / "target" / "artifacts"


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    paths = ensure_browser()
    ensure_selenium()
    return paths


@pytest.fixture
def browsers(browser_paths: tuple[str, str], tmp_path: Path) -> Iterator[Browsers]:
    b = Browsers(browser_paths, tmp_path)
    yield b
    b.quit()


# First use installs chromium with apt-get (bounded at 2,400 s) and selenium with pip (600 s).
@pytest.mark.timeout(3060)
def test_two_browsers_chat_gift_and_likes(gateway_factory: GatewayFactory, browsers: Browsers) -> None:
    gw = gateway_factory("auth.mode=dev", "presence.interval=1")
    room = f"live:{uniq('browser')}"
    alice, bob = browsers("alice"), browsers("bob")
    for d, user in ((alice, "alice"), (bob, "bob")):
        d.get(f"{gw.http_url}/?user={user}&room={room}")
        assert "__WS_PATH__" not in d.page_source, "the ws path placeholder was substituted"
        assert d.execute_script("return typeof LiveGate === 'object' && LiveGate.VERSION"), "the page runs the SDK"
        d.find_element("id", "join").click()
    for d, user in ((alice, "alice"), (bob, "bob")):
        wait(d, lambda d: f"joined {room}" in texts(d, ".msg.joined"), f"{user} joined")
        wait(d, lambda d, user=user: d.find_element("id", "status").text == f"connected as {user}", f"{user} status")

    # Chat both ways.
    alice.find_element("id", "text").send_keys("hello from alice\n")
    wait(bob, lambda d: "alice: hello from alice" in texts(d, ".msg.chat"), "bob sees alice's message")
    bob.find_element("id", "text").send_keys("hi alice, bob here")
    bob.find_element("id", "send").click()
    wait(alice, lambda d: "bob: hi alice, bob here" in texts(d, ".msg.chat"), "alice sees bob's message")
    assert "alice: hello from alice" in texts(alice, ".msg.chat.mine"), "own messages come back and are marked"

    # The online count (presence frames, every second here).
    for d, user in ((alice, "alice"), (bob, "bob")):
        wait(d, lambda d: d.find_element("id", "online").text == "2", f"online count 2 for {user}")

    # A gift is highlighted (a high-priority message).
    bob.find_element("id", "gift").click()
    gift = wait(alice, lambda d: next((e for e in d.find_elements("css selector", ".msg.gift") if "bob" in e.text), None), "alice sees bob's gift")
    assert "rocket" in gift.text
    bg = alice.execute_script("return getComputedStyle(arguments[0]).backgroundImage", gift)
    assert "gradient" in bg, f"gift highlighted, got background {bg!r}"
    assert not texts(alice, ".msg.chat") or all("rocket" not in t for t in texts(alice, ".msg.chat")), "the gift is not a plain chat line"

    # Likes: aggregated client side into one message, counted on both pages.
    assert alice.find_element("id", "likes").text == "0"
    like = alice.find_element("id", "like")
    for _ in range(3):
        like.click()
    for d, user in ((alice, "alice"), (bob, "bob")):
        wait(d, lambda d: d.find_element("id", "likes").text == "3", f"like counter 3 for {user}")
    bob.find_element("id", "like").click()
    for d, user in ((alice, "alice"), (bob, "bob")):
        wait(d, lambda d: d.find_element("id", "likes").text == "4", f"like counter 4 for {user}")
    assert not [t for t in texts(alice, ".msg") if "like" in t.lower()], "likes are a counter, not log lines"

    alice.find_element("id", "text").send_keys("see you!\n")
    wait(bob, lambda d: "alice: see you!" in texts(d, ".msg.chat"), "bob sees the last message")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert alice.save_screenshot(str(ARTIFACTS / "demo.png")), "screenshot saved"
    bob.save_screenshot(str(ARTIFACTS / "demo-bob.png"))
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000

    for d, user in ((alice, "alice"), (bob, "bob")):
        errors = js_errors(d)
        assert not errors, f"JavaScript errors in {user}'s page: {errors}"
