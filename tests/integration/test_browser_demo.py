"""The demo page (served by ``gateway run`` at ``/``, built on the JS SDK) in two real
headless Chromium browsers.

- The live room: they join a room, chat with each other, see the online count, a
  highlighted gift and an aggregated like counter (screenshot ``target/artifacts/demo.png``).
- The chat view (conversations, protocol 1.1): alice dms bob while bob is offline; bob
  comes back and sees the conversation with its badge and last message, opens it (the
  messages in order, the badge clears, alice sees the read receipts), types and replies
  (alice sees the typing indicator, then her badges); a recall shows as a tombstone;
  history pages back (screenshots ``target/artifacts/demo-chat.png``, ``demo-chat-bob.png`` and
  ``demo-chat-badge.png``: bob's list when he comes back).

Debian's ``chromium`` and ``chromium-driver`` are installed with apt-get when missing, and
Selenium with pip (``support.browser``); if that is impossible the test FAILS (it never
skips).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support.browser import Browsers, js_errors, texts, wait
from support.fixtures import GatewayFactory
from support.gateway import ROOT, uniq

ARTIFACTS = ROOT / "target" / "artifacts"



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


# ---------------------------------------------------------------- the chat view

#: Everything the chat view shows, read in one script (the page re-renders its lists).
SNAPSHOT = """
const text = (el) => (el ? el.textContent : null);
const shown = (id) => { const e = document.getElementById(id); return !!e && !e.hidden && e.offsetParent !== null; };
return {
  view: shown("view-chat") ? "chat" : "live",
  status: text(document.getElementById("status")),
  total: shown("chat-badge") ? text(document.getElementById("chat-badge")) : null,
  title: text(document.getElementById("chat-title")),
  typing: text(document.getElementById("typing")),
  note: text(document.getElementById("chat-note")),
  older: !!document.querySelector("#chat-log button.older"),
  convs: Array.from(document.querySelectorAll("#conv-list .conv")).map((r) => ({
    room: r.dataset.room, title: text(r.querySelector(".title")), preview: text(r.querySelector(".preview")),
    badge: text(r.querySelector(".badge")), active: r.classList.contains("active"),
  })),
  msgs: Array.from(document.querySelectorAll("#chat-log .cmsg")).map((m) => ({
    seq: m.dataset.seq ? Number(m.dataset.seq) : null, cid: m.dataset.cid || null,
    mine: m.classList.contains("mine"), pending: m.classList.contains("pending"), tomb: m.classList.contains("tomb"),
    text: text(m.querySelector(".bubble") || m), receipt: text(m.querySelector(".receipt")),
  })),
};
"""


def snap(d: Any) -> dict[str, Any]:
    return d.execute_script(SNAPSHOT)


def see(d: Any, cond: Callable[[dict[str, Any]], Any], what: str) -> dict[str, Any]:
    """Waits until ``cond(snapshot)`` holds; the assertion shows the last snapshot."""
    last: dict[str, Any] = {}

    def check(d: Any) -> Any:
        last.clear()
        last.update(snap(d))
        return last if cond(last) else None

    try:
        return wait(d, check, what)
    except AssertionError as e:
        raise AssertionError(f"{e}\nlast snapshot of the chat view: {last}") from None


def click(d: Any, css: str, what: str) -> None:
    """Clicks ``css`` once it is there (re-rendered elements go stale: find it again)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def attempt(d: Any) -> bool:
        try:
            d.find_element("css selector", css).click()
            return True
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    wait(d, attempt, what)


def conv_row(s: dict[str, Any], room: str) -> dict[str, Any] | None:
    return next((c for c in s["convs"] if c["room"] == room), None)


def stored(s: dict[str, Any]) -> list[tuple[int, str]]:
    """(seq, text) of the messages shown as stored, in page order."""
    return [(m["seq"], m["text"]) for m in s["msgs"] if m["seq"] is not None]


@pytest.mark.timeout(3060)
def test_chat_view_dm_to_an_offline_user_badge_read_receipts_typing_reply_recall(gateway_factory: GatewayFactory, browsers: Browsers) -> None:
    # The default routes: dm:{a}:{b} keeps messages (durable), read receipts on, 5 msgs/s per user.
    gw = gateway_factory("auth.mode=dev")
    room = "dm:alice:bob"
    lines = ["hi bob", "are you there?", "call me when you're back <3"]

    # Alice opens the chat view and starts a dm with bob, who has never connected.
    alice = browsers("alice")
    alice.get(f"{gw.http_url}/?user=alice")
    click(alice, "#tab-chat", "alice opens the chat tab")
    see(alice, lambda s: s["view"] == "chat" and s["status"] == "connected as alice", "alice connected in the chat view")
    alice.find_element("id", "new-peer").send_keys("bob\n")
    see(alice, lambda s: s["title"] == "bob" and s["msgs"] == [], "alice's new, empty chat with bob")
    for line in lines:
        alice.find_element("id", "chat-text").send_keys(line + "\n")
    s = see(alice, lambda s: len(stored(s)) == 3 and not any(m["pending"] for m in s["msgs"]), "alice's three messages stored")
    assert stored(s) == [(1, lines[0]), (2, lines[1]), (3, lines[2])], s["msgs"]
    assert all(m["mine"] and m["receipt"] == "✓ sent" for m in s["msgs"]), s["msgs"]
    assert all(m["cid"] for m in s["msgs"]), f"the stored messages keep the cid of their optimistic bubble: {s['msgs']}"
    s = see(alice, lambda s: conv_row(s, room) is not None, "the dm in alice's list")
    row = conv_row(s, room)
    assert row["title"] == "bob" and row["preview"] == "You: " + lines[2] and row["badge"] is None and row["active"], row
    assert s["total"] is None, "own messages are not unread"

    # Bob comes online: the conversation is there with its badge and the last message.
    bob = browsers("bob")
    bob.get(f"{gw.http_url}/?user=bob")
    click(bob, "#tab-chat", "bob opens the chat tab")
    s = see(bob, lambda s: (conv_row(s, room) or {}).get("badge") == "3" and s["total"] == "3", "bob's badge 3 on the dm and on the tab")
    row = conv_row(s, room)
    assert row["title"] == "alice" and row["preview"] == lines[2] and not row["active"], row
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    bob.save_screenshot(str(ARTIFACTS / "demo-chat-badge.png"))

    # Bob opens it: the three messages in order, the badges clear, alice gets read receipts.
    click(bob, f'.conv[data-room="{room}"]', "bob opens the dm")
    s = see(bob, lambda s: len(stored(s)) == 3, "bob sees the three messages")
    assert stored(s) == [(1, lines[0]), (2, lines[1]), (3, lines[2])], s["msgs"]
    assert not any(m["mine"] for m in s["msgs"]) and s["title"] == "alice"
    see(bob, lambda s: (conv_row(s, room) or {}).get("badge") is None and s["total"] is None, "bob's badges cleared")
    see(alice, lambda s: [m["receipt"] for m in s["msgs"]] == ["✓✓ read"] * 3, "alice sees that bob read them")

    # Bob types: alice sees it. Then alice closes the conversation and bob's reply arrives.
    bob.find_element("id", "chat-text").send_keys("on my way")
    see(alice, lambda s: s["typing"] == "bob is typing…", "alice sees bob typing")
    click(alice, "#chat-close", "alice closes the conversation")
    see(alice, lambda s: s["title"] == "Chat" and s["msgs"] == [], "alice's conversation closed")
    bob.find_element("id", "chat-text").send_keys("\n")
    s = see(alice, lambda s: (conv_row(s, room) or {}).get("badge") == "1" and s["total"] == "1", "alice's badge 1, live")
    assert conv_row(s, room)["preview"] == "on my way", conv_row(s, room)
    see(bob, lambda s: stored(s)[-1:] == [(4, "on my way")] and s["msgs"][-1]["receipt"] == "✓ sent", "bob's reply stored")

    # Alice opens it: the reply after her messages, badges cleared, bob's reply marked read.
    click(alice, f'.conv[data-room="{room}"]', "alice opens the dm again")
    s = see(alice, lambda s: len(stored(s)) == 4, "alice sees bob's reply")
    assert stored(s) == [(1, lines[0]), (2, lines[1]), (3, lines[2]), (4, "on my way")], s["msgs"]
    assert [m["mine"] for m in s["msgs"]] == [True, True, True, False]
    see(alice, lambda s: (conv_row(s, room) or {}).get("badge") is None and s["total"] is None, "alice's badges cleared")
    see(bob, lambda s: s["msgs"][-1]["receipt"] == "✓✓ read", "bob sees that alice read his reply")

    # Alice recalls her second message: a tombstone on both pages, the others unchanged.
    click(alice, '.cmsg.mine[data-seq="2"] button.recall', "alice recalls message 2")
    s = see(bob, lambda s: any(m["tomb"] for m in s["msgs"]), "bob sees the recall")
    assert [(m["seq"], m["text"], m["tomb"]) for m in s["msgs"]] == [
        (1, lines[0], False),
        (2, "alice recalled a message", True),
        (3, lines[2], False),
        (4, "on my way", False),
    ], s["msgs"]
    see(alice, lambda s: [m["text"] for m in s["msgs"] if m["tomb"]] == ["You recalled a message"], "alice sees her recall")

    assert alice.save_screenshot(str(ARTIFACTS / "demo-chat.png")), "screenshot saved"
    bob.save_screenshot(str(ARTIFACTS / "demo-chat-bob.png"))
    assert (ARTIFACTS / "demo-chat.png").stat().st_size > 10_000

    # History paging: bob reloads with pages of 2 (the list comes from localStorage, then
    # the sync); the newest page, then the older one on demand.
    bob.get(f"{gw.http_url}/?user=bob&view=chat&page=2")
    see(bob, lambda s: s["view"] == "chat" and conv_row(s, room) is not None, "bob's list after a reload")
    click(bob, f'.conv[data-room="{room}"]', "bob opens the dm after the reload")
    s = see(bob, lambda s: s["older"] and len(stored(s)) == 2, "the newest page of 2")
    assert stored(s) == [(3, lines[2]), (4, "on my way")], s["msgs"]
    click(bob, "#chat-log button.older", "bob asks for older messages")
    s = see(bob, lambda s: len(stored(s)) == 4 and not s["older"], "all four messages, nothing older")
    assert [(m["seq"], m["tomb"]) for m in s["msgs"]] == [(1, False), (2, True), (3, False), (4, False)], s["msgs"]

    for d, user in ((alice, "alice"), (bob, "bob")):
        errors = js_errors(d)
        assert not errors, f"JavaScript errors in {user}'s page: {errors}"
