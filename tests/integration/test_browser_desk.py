"""The customer-service desk's pages (served by ``gateway run``, built on the JS SDK) in
three real headless Chromium browsers (docs/customer-service.md):

- a shopper on the product page (``/shop``) taps "客服" and a session opens with the
  product card;
- alice's agent console (``/console?user=alice&role=agent``) sees it waiting in the queue
  (live wait time), accepts it, sees the card, answers with a canned reply, writes an
  internal note (never shown to the shopper), and transfers it with a note to bob;
- bob's console gets it in "my chats" with an unread badge, opens it (the transcript, the
  notes), answers and closes it;
- the shopper gets the rating card and rates it (4 stars and a comment), which bob sees.

Screenshots of the consoles and the shop page: ``target/artifacts/desk-console*.png`` and
``desk-shop.png``. Chromium and Selenium as in test_browser_demo.py (never skipped).
"""

from __future__ import annotations

from typing import Any

import pytest
from support.browser import Browsers, js_errors, wait
from support.desk import DESK_ROUTES
from support.fixtures import GatewayFactory
from support.gateway import ROOT

ARTIFACTS = ROOT / "target" / "artifacts"

CANNED = ["您好，请问有什么可以帮您？", "稍等，我帮您查一下。"]

#: The desk's routes and settings (docs/customer-service.md "Set-up"): no bot, manual claim.
DESK_CONFIG = DESK_ROUTES + f"""
[[routes]]
pattern = "*"

[plugins.desk]
enabled = true
strategy = "manual"
sticky = false
grace = 60
bot_turns = 0
agents_from = "role"

[[plugins.desk.departments]]
name = "presales"
title = "售前咨询"
canned = {CANNED!r}

[[plugins.desk.departments]]
name = "aftersales"
title = "售后服务"
canned = ["请提供订单号。"]

[[plugins.desk.agents]]
user = "alice"
departments = ["presales", "aftersales"]
capacity = 5

[[plugins.desk.agents]]
user = "bob"
departments = ["presales", "aftersales"]
capacity = 5
""".replace("'", '"')



def click(d: Any, css: str) -> None:
    """Clicks the first match, found again if the page re-rendered it meanwhile (the
    console re-renders its lists whenever the queue or the chats change)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            d.find_element("css selector", css).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{css} kept being re-rendered")


def one(d: Any, css: str) -> Any:
    found = d.find_elements("css selector", css)
    return found[0] if found else None


def texts(d: Any, css: str) -> list[str]:
    """innerText of every match, read in the page (the transcripts re-render as messages
    come: elements found by Selenium may be stale by the time their text is read)."""
    return list(d.execute_script("return Array.from(document.querySelectorAll(arguments[0])).map((e) => e.innerText.trim());", css))


def text(d: Any, css: str) -> str | None:
    """textContent of the first match (read in the page: no stale element)."""
    return d.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)


def type_and_send(d: Any, text: str) -> None:
    box = d.find_element("id", "input")
    box.clear()
    box.send_keys(text)
    click(d, "#send")


@pytest.mark.timeout(3060)
def test_shopper_opens_agent_accepts_chats_notes_transfers_closes_rating(gateway_factory: GatewayFactory, browsers: Browsers) -> None:
    gw = gateway_factory("auth.mode=dev", config=DESK_CONFIG)
    shop, alice, bob = browsers("shop"), browsers("alice"), browsers("bob")
    for d in (alice, bob):
        d.set_window_size(1400, 860)

    # The consoles: signed in by the URL (dev mode), online.
    for d, user in ((alice, "alice"), (bob, "bob")):
        d.get(f"{gw.http_url}/console?user={user}&role=agent")
        assert "__WS_PATH__" not in d.page_source
        assert d.execute_script("return typeof LiveGate === 'object' && typeof deskConsole === 'object'"), "the console runs the SDK"
        wait(d, lambda d, user=user: d.find_element("id", "status").text == f"connected as {user}", f"{user}'s console connected")
        wait(d, lambda d: one(d, ".seg button.on[data-status=online]"), f"{user} is online")

    # The shopper taps "客服" on the product page: a session with the product card.
    shop.get(f"{gw.http_url}/shop?user=carol")
    wait(shop, lambda d: d.find_element("id", "status").text == "connected as carol", "the shop page connected")
    title = shop.find_element("id", "product-title").text
    click(shop, "#ask")
    wait(shop, lambda d: title in texts(d, "#transcript .m.card .pt"), "the card in the shopper's chat")
    sid = shop.execute_script("return deskShop.desk.current && deskShop.desk.current.session")
    assert sid, "cs.open gave a session"

    # alice: the session waits in the queue, with the shopper, the product and a wait time.
    q = f'.qitem[data-session="{sid}"]'
    wait(alice, lambda d: one(d, q), "the session in alice's queue")
    assert text(alice, q + " .title") == "carol"
    assert title in (text(alice, q + " .sub") or "")
    wait(alice, lambda d: "⏱" in (text(d, q + " .wait") or ""), "a live wait time")
    first = text(alice, q + " .wait")
    wait(alice, lambda d: text(d, q + " .wait") != first, "the wait time ticks", timeout=5)
    click(alice, q + " .accept")

    # Accepted: in alice's chats, gone from the queue; the transcript shows the card.
    wait(alice, lambda d: one(d, f'.mitem[data-session="{sid}"]'), "the session in alice's chats")
    wait(alice, lambda d: not one(d, f'.qitem[data-session="{sid}"]'), "gone from the queue")
    wait(alice, lambda d: title in texts(d, "#transcript .tmsg.card .ptitle"), "the card in alice's transcript")
    card_price = text(alice, "#transcript .tmsg.card .price")
    assert card_price == shop.execute_script("return '¥' + document.getElementById('product-price').textContent")
    assert one(alice, "#transcript .tmsg.card img"), "the card has its image"
    wait(alice, lambda d: one(d, "#transcript .tmsg.system[data-state=assigned]"), "the assigned state line")
    wait(alice, lambda d: title in d.find_element("id", "ctx-card").text, "the context card on the right")
    wait(shop, lambda d: "alice" in d.find_element("id", "chat-state").text, "the shopper sees alice joined")

    # A canned reply of the department, then a chat both ways.
    wait(alice, lambda d: texts(d, "#canned .chip") == CANNED, "the department's canned replies")
    click(alice, "#canned .chip")
    assert alice.find_element("id", "input").get_attribute("value") == CANNED[0]
    click(alice, "#send")
    wait(shop, lambda d: CANNED[0] in texts(d, "#transcript .m.agent .bubble"), "the shopper gets the canned reply")
    shop.find_element("id", "input").send_keys("这款有白色吗？\n")
    wait(alice, lambda d: "这款有白色吗？" in texts(d, "#transcript .tmsg.shopper .bubble"), "alice gets the question")

    # An internal note: shown distinctly to agents, never to the shopper.
    click(alice, "#mode-note")
    type_and_send(alice, "VIP 顾客，注意库存")
    wait(alice, lambda d: "VIP 顾客，注意库存" in texts(d, "#transcript .tmsg.note .bubble"), "the note in alice's transcript")
    click(alice, "#mode-reply")

    # Transfer to bob with a note.
    click(alice, "#btn-transfer")
    alice.find_element("id", "transfer-to").send_keys("bob")
    alice.find_element("id", "transfer-note").send_keys("顾客要白色，请跟进")
    click(alice, "#transfer-ok")
    wait(alice, lambda d: not one(d, f'.mitem[data-session="{sid}"]'), "gone from alice's chats")
    wait(bob, lambda d: one(d, f'.mitem[data-session="{sid}"]'), "the session in bob's chats")
    wait(shop, lambda d: "bob" in d.find_element("id", "chat-state").text, "the shopper sees bob")

    # The shopper writes while bob has not opened it: a badge in bob's list.
    shop.find_element("id", "input").send_keys("还在吗？\n")
    wait(bob, lambda d: one(d, f'.mitem[data-session="{sid}"] .badge'), "an unread badge in bob's chats")
    click(bob, f'.mitem[data-session="{sid}"]')
    wait(bob, lambda d: not one(d, f'.mitem[data-session="{sid}"] .badge'), "the badge clears when bob opens it")
    wait(bob, lambda d: "还在吗？" in texts(d, "#transcript .tmsg.shopper .bubble"), "bob sees the transcript")
    assert CANNED[0] in texts(bob, "#transcript .tmsg.agent .bubble"), "with alice's answer"
    wait(bob, lambda d: "VIP 顾客，注意库存" in texts(d, "#transcript .tmsg.note .bubble"), "and alice's internal note")
    assert any("顾客要白色，请跟进" in t for t in texts(bob, "#transcript .tmsg.note .bubble")), "and the transfer note"
    type_and_send(bob, "您好，我是 bob，白色有现货。")
    wait(shop, lambda d: "您好，我是 bob，白色有现货。" in texts(d, "#transcript .m.agent .bubble"), "the shopper gets bob's answer")
    assert not [t for t in texts(shop, "#transcript") if "VIP" in t or "请跟进" in t], "notes never reach the shopper"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert bob.save_screenshot(str(ARTIFACTS / "desk-console.png")), "screenshot saved"
    alice.save_screenshot(str(ARTIFACTS / "desk-console-alice.png"))
    assert (ARTIFACTS / "desk-console.png").stat().st_size > 10_000

    # bob closes; the shopper rates 4 stars with a comment; bob sees the rating.
    click(bob, "#btn-close")
    wait(bob, lambda d: one(d, "#transcript .tmsg.system[data-state=closed]"), "closed in bob's transcript")
    wait(shop, lambda d: one(d, "#rating .star"), "the rating card")
    click(shop, '#rating .star[data-score="4"]')
    shop.find_element("id", "rate-comment").send_keys("回复很快")
    click(shop, "#rate-submit")
    wait(shop, lambda d: one(d, "#rated"), "thanks for rating")
    shop.save_screenshot(str(ARTIFACTS / "desk-shop.png"))
    wait(bob, lambda d: one(d, "#transcript .tmsg.rated"), "bob sees the rating")
    rated = text(bob, "#transcript .tmsg.rated") or ""
    assert "★★★★☆" in rated and "回复很快" in rated, rated
    bob.save_screenshot(str(ARTIFACTS / "desk-console-closed.png"))

    for d, who in ((shop, "shop"), (alice, "alice"), (bob, "bob")):
        errors = js_errors(d)
        assert not errors, f"JavaScript errors in {who}'s page: {errors}"
