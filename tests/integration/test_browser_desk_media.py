"""Media in the customer-service desk's pages (docs/customer-service.md, docs/media.md), in two
real headless Chromium browsers: the shopper (``/shop``) opens a session and sends a photo
of the damaged parcel (a PNG made with Pillow, picked in the file input); alice's agent
console (``/console``) accepts the session and shows it as an ``<img>`` that loaded
(naturalWidth > 0); alice sends a PDF (the size chart) from the console's file input, with
the upload bar; the shopper's page shows it as a file link whose href downloads the same
bytes. Both pages render and send through the shared ``clients/js/demo/media-ui.js``.

Screenshots: ``target/artifacts/desk-media-console.png`` and ``desk-media-shop.png``.
Chromium and Selenium as in test_browser_demo.py (never skipped).
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.browser import Browsers, js_errors, wait
from support.fixtures import GatewayFactory
from support.gateway import ROOT
from test_browser_desk import DESK_CONFIG, click, one
from test_browser_media import make_pdf, make_photo

ARTIFACTS = ROOT / "target" / "artifacts"

#: The media bubbles of a transcript (``#transcript``), read in one script.
MEDIA = """
return Array.from(document.querySelectorAll("#transcript [data-seq][data-type]")).map((m) => {
  const img = m.querySelector("img.media-img"), a = m.querySelector("a.media-file");
  return {
    seq: Number(m.dataset.seq), type: m.dataset.type, cls: m.className,
    img: img ? { src: img.currentSrc || img.src, complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight, full: img.parentElement.href } : null,
    file: a ? { href: a.href, text: a.textContent, download: a.getAttribute("download"), size: (m.querySelector(".size") || {}).textContent } : null,
  };
}).filter((m) => m.img || m.file);
"""


def media(d: Any) -> list[dict[str, Any]]:
    return list(d.execute_script(MEDIA))


def loaded_photo(d: Any) -> dict[str, Any] | None:
    return next((m for m in media(d) if m["img"] and m["img"]["complete"] and m["img"]["naturalWidth"] > 0), None)


def file_link(d: Any) -> dict[str, Any] | None:
    return next((m for m in media(d) if m["file"]), None)



@pytest.mark.timeout(3060)
def test_shopper_sends_a_photo_agent_sends_a_pdf(gateway_factory: GatewayFactory, browsers: Browsers, tmp_path: Path) -> None:
    gw = gateway_factory("auth.mode=dev", config=DESK_CONFIG)
    photo = make_photo(tmp_path / "parcel.png")
    chart = make_pdf(tmp_path / "size-chart.pdf")
    shop, alice = browsers("shop"), browsers("alice")
    alice.set_window_size(1400, 860)

    alice.get(f"{gw.http_url}/console?user=alice&role=agent")
    assert alice.execute_script("return typeof LiveGateMedia === 'object'"), "the console has the shared media module"
    wait(alice, lambda d: d.find_element("id", "status").text == "connected as alice", "alice's console connected")
    wait(alice, lambda d: one(d, ".seg button.on[data-status=online]"), "alice is online")
    assert not alice.find_element("id", "attach").is_enabled(), "no session open: nothing to attach to"

    # The shopper opens a session and sends the photo of the parcel from the file input.
    shop.get(f"{gw.http_url}/shop?user=carol")
    wait(shop, lambda d: d.find_element("id", "status").text == "connected as carol", "the shop page connected")
    click(shop, "#ask")
    sid = wait(shop, lambda d: d.execute_script("return deskShop.desk.current && deskShop.desk.current.session"), "cs.open gave a session")
    wait(shop, lambda d: d.find_element("id", "attach").is_enabled(), "the shopper's file picker is enabled")
    shop.find_element("id", "attach").send_keys(str(photo))
    mine = wait(shop, loaded_photo, "the shopper sees the photo loaded")
    assert mine["type"] == "image" and " me" in f" {mine['cls']}", mine
    assert "/media/t/" in mine["img"]["src"] or "/media/f/" in mine["img"]["src"], mine
    wait(shop, lambda d: not d.find_element("id", "upload").is_displayed(), "the shopper's upload bar is gone")

    # alice accepts: the photo is in the transcript (the history before she joined), loaded.
    q = f'.qitem[data-session="{sid}"]'
    wait(alice, lambda d: one(d, q), "the session in alice's queue")
    click(alice, q + " .accept")
    wait(alice, lambda d: one(d, f'.mitem[data-session="{sid}"]'), "the session in alice's chats")
    theirs = wait(alice, loaded_photo, "alice sees the shopper's photo loaded")
    assert theirs["type"] == "image" and "shopper" in theirs["cls"], theirs
    assert theirs["img"]["naturalWidth"] > 0 and theirs["img"]["naturalHeight"] > 0
    assert abs(theirs["img"]["naturalWidth"] / theirs["img"]["naturalHeight"] - 480 / 360) < 0.02, theirs["img"]
    with urllib.request.urlopen(theirs["img"]["full"], timeout=10) as r:
        assert r.status == 200 and r.read() == photo.read_bytes(), "the full-size link downloads the photo as sent"

    # alice sends the size chart (a PDF) from the console's file input, with the upload bar.
    wait(alice, lambda d: d.find_element("id", "attach").is_enabled(), "alice's file picker is enabled")
    alice.execute_script("window.__uploads = []; deskConsole.client.on('upload', (e) => window.__uploads.push([e.state, e.kind, e.progress]));")
    alice.find_element("id", "attach").send_keys(str(chart))
    sent = wait(alice, file_link, "alice sees the PDF she sent")
    assert "agent" in sent["cls"] and sent["type"] == "file", sent
    uploads = alice.execute_script("return window.__uploads")
    assert uploads and uploads[-1][:2] == ["done", "file"] and uploads[-1][2] == 100, uploads
    wait(alice, lambda d: not d.find_element("id", "upload").is_displayed(), "alice's upload bar is gone")
    wait(
        alice,
        lambda d: d.execute_script(f"return (document.querySelector('.mitem[data-session=\"{sid}\"] .sub') || {{}}).textContent") == "[file] size-chart.pdf",
        "the chat's preview in alice's list",
    )

    # The shopper's page: a link with the name and size that downloads the same bytes.
    link = wait(shop, file_link, "the shopper sees the file link")
    assert "agent" in link["cls"] and link["type"] == "file", link
    assert "size-chart.pdf" in link["file"]["text"] and link["file"]["download"] == "size-chart.pdf", link
    assert link["file"]["size"] == f"{chart.stat().st_size} B", link
    with urllib.request.urlopen(link["file"]["href"], timeout=10) as r:
        assert r.status == 200 and r.read() == chart.read_bytes(), "the link downloads the PDF as sent"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert alice.save_screenshot(str(ARTIFACTS / "desk-media-console.png")), "screenshot saved"
    assert shop.save_screenshot(str(ARTIFACTS / "desk-media-shop.png")), "screenshot saved"
    assert (ARTIFACTS / "desk-media-console.png").stat().st_size > 10_000

    for d, who in ((shop, "shop"), (alice, "alice")):
        errors = js_errors(d)
        assert not errors, f"JavaScript errors in {who}'s page: {errors}"


@pytest.mark.timeout(600)
def test_refused_upload_is_shown(gateway_factory: GatewayFactory, browsers: Browsers, tmp_path: Path) -> None:
    """An upload the gateway refuses (413: over the image limit) is reported on the shop
    page, and nothing is sent."""
    gw = gateway_factory("auth.mode=dev", "media.limits.image=1000", config=DESK_CONFIG)
    photo = make_photo(tmp_path / "big.png")
    assert photo.stat().st_size > 1000
    shop = browsers("shop")
    shop.get(f"{gw.http_url}/shop?user=dave")
    wait(shop, lambda d: d.find_element("id", "status").text == "connected as dave", "the shop page connected")
    click(shop, "#ask")
    wait(shop, lambda d: d.find_element("id", "attach").is_enabled(), "the shopper's file picker is enabled")
    shop.find_element("id", "attach").send_keys(str(photo))
    toast = wait(shop, lambda d: next((t.text for t in d.find_elements("css selector", ".toast") if "413" in t.text), None), "the refusal is shown")
    assert "not sent" in toast.lower() or "未发送" in toast, toast
    assert not media(shop), "nothing was sent"
