"""Media in the demo page's chat view, in two real headless Chromium browsers: alice picks a
PNG (made with Pillow) and a PDF in the file input of a dm with bob; the page uploads them
with the SDK's browser path (XMLHttpRequest + FormData, progress events) and sends them;
both pages show the photo as an ``<img>`` that loaded (naturalWidth > 0) and the PDF as a
link with its name and size, and the link downloads the same bytes. Screenshots
``target/artifacts/demo-media.png`` (alice) and ``demo-media-bob.png``; the photo's pixels
are checked in bob's screenshot.

Debian's ``chromium`` and ``chromium-driver`` are installed with apt-get when missing, and
Selenium with pip (``support.browser``); if that is impossible the test FAILS (it never
skips).
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.browser import Browsers, js_errors, wait
from support.fixtures import GatewayFactory
from support.gateway import ROOT

ARTIFACTS = ROOT / "target" / "artifacts"

#: The quadrants of the test photo (RGB), checked in the screenshot.
QUADRANTS = {"top_left": (220, 30, 30), "top_right": (30, 180, 40), "bottom_left": (30, 60, 220), "bottom_right": (240, 200, 20)}



def make_photo(path: Path, w: int = 480, h: int = 360) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, w // 2 - 1, h // 2 - 1), fill=QUADRANTS["top_left"])
    d.rectangle((w // 2, 0, w - 1, h // 2 - 1), fill=QUADRANTS["top_right"])
    d.rectangle((0, h // 2, w // 2 - 1, h - 1), fill=QUADRANTS["bottom_left"])
    d.rectangle((w // 2, h // 2, w - 1, h - 1), fill=QUADRANTS["bottom_right"])
    img.save(path, "PNG")
    return path


def make_pdf(path: Path) -> Path:
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>", b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>"]
    out = bytearray(b"%PDF-1.4\n")
    offs = []
    for i, o in enumerate(objs):
        offs.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i + 1, o)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offs)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path.write_bytes(bytes(out))
    return path


#: The media bubbles of the chat view, read in one script.
MEDIA = """
return Array.from(document.querySelectorAll("#chat-log .cmsg[data-seq]")).map((m) => {
  const img = m.querySelector("img.media-img"), a = m.querySelector("a.media-file");
  const r = img ? img.getBoundingClientRect() : null;
  return {
    seq: Number(m.dataset.seq), type: m.dataset.type || null, mine: m.classList.contains("mine"),
    img: img ? { src: img.currentSrc || img.src, complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
                 full: img.parentElement.href, rect: [r.left, r.top, r.width, r.height] } : null,
    file: a ? { href: a.href, text: a.textContent, download: a.getAttribute("download"), size: (m.querySelector(".size") || {}).textContent } : null,
  };
});
"""


def media(d: Any) -> list[dict[str, Any]]:
    return d.execute_script(MEDIA)


def click_css(d: Any, css: str, what: str) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def attempt(d: Any) -> bool:
        try:
            d.find_element("css selector", css).click()
            return True
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    wait(d, attempt, what)


def loaded_photo(d: Any) -> dict[str, Any] | None:
    return next((m for m in media(d) if m["img"] and m["img"]["complete"] and m["img"]["naturalWidth"] > 0), None)


@pytest.mark.timeout(3060)
def test_chat_view_sends_a_photo_and_a_file_and_the_peer_sees_them(gateway_factory: GatewayFactory, browsers: Browsers, tmp_path: Path) -> None:
    gw = gateway_factory("auth.mode=dev")
    room = "dm:alice:bob"
    photo = make_photo(tmp_path / "photo.png")
    doc = make_pdf(tmp_path / "report.pdf")

    alice = browsers("alice")
    alice.get(f"{gw.http_url}/?user=alice&view=chat")
    wait(alice, lambda d: d.find_element("id", "status").text == "connected as alice", "alice connected")
    alice.find_element("id", "new-peer").send_keys("bob\n")
    wait(alice, lambda d: d.find_element("id", "chat-title").text == "bob", "alice's chat with bob is open")
    wait(alice, lambda d: d.find_element("id", "chat-file").is_enabled(), "the file picker is enabled")
    alice.execute_script("window.__uploads = []; window.livegateDemo.client().on('upload', (e) => window.__uploads.push([e.state, e.kind, e.progress]));")

    # The photo: the file input, as a user picks a file.
    alice.find_element("id", "chat-file").send_keys(str(photo))
    mine = wait(alice, loaded_photo, "alice sees her photo loaded")
    assert mine["mine"] and mine["type"] == "image", mine
    assert "/media/t/" in mine["img"]["src"] or "/media/f/" in mine["img"]["src"], mine
    assert mine["img"]["naturalWidth"] <= 480
    uploads = alice.execute_script("return window.__uploads")
    assert uploads[-1][:2] == ["done", "image"] and uploads[-1][2] == 100, uploads
    assert ["progress", "image"] in [u[:2] for u in uploads], f"XMLHttpRequest upload progress events: {uploads}"

    # The file: a link with its name and size.
    alice.find_element("id", "chat-file").send_keys(str(doc))
    link = wait(alice, lambda d: next((m["file"] for m in media(d) if m["file"]), None), "alice sees her file")
    assert "report.pdf" in link["text"] and link["download"] == "report.pdf", link
    assert link["size"] == f"{doc.stat().st_size} B", link
    with urllib.request.urlopen(link["href"], timeout=10) as r:
        assert r.status == 200 and r.read() == doc.read_bytes()

    # Bob comes online and opens the dm: the photo loads from its signed URL.
    bob = browsers("bob")
    bob.get(f"{gw.http_url}/?user=bob&view=chat")
    wait(bob, lambda d: d.find_element("id", "status").text == "connected as bob", "bob connected")
    click_css(bob, f'.conv[data-room="{room}"]', "bob opens the dm")
    theirs = wait(bob, loaded_photo, "bob sees alice's photo loaded")
    assert not theirs["mine"] and theirs["type"] == "image"
    assert theirs["img"]["naturalWidth"] > 0 and theirs["img"]["naturalHeight"] > 0
    assert abs(theirs["img"]["naturalWidth"] / theirs["img"]["naturalHeight"] - 480 / 360) < 0.02, theirs["img"]
    with urllib.request.urlopen(theirs["img"]["full"], timeout=10) as r:
        assert r.status == 200 and r.read() == photo.read_bytes(), "the full-size link downloads the photo as sent"
    wait(bob, lambda d: any(m["file"] and "report.pdf" in m["file"]["text"] for m in media(d)), "bob sees the file link")
    preview = bob.execute_script("return Array.from(document.querySelectorAll('#conv-list .preview')).map((e) => e.textContent)")
    assert any("[file] report.pdf" in p for p in preview), preview

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    bob.execute_script("arguments[0].scrollIntoView({block: 'center'})", bob.find_element("css selector", "img.media-img"))
    theirs = loaded_photo(bob)
    assert theirs is not None
    assert bob.save_screenshot(str(ARTIFACTS / "demo-media-bob.png")), "screenshot saved"
    assert alice.save_screenshot(str(ARTIFACTS / "demo-media.png")), "screenshot saved"
    assert (ARTIFACTS / "demo-media-bob.png").stat().st_size > 10_000

    # The photo is on bob's screenshot: each quadrant's colour at its centre.
    from PIL import Image

    shot = Image.open(ARTIFACTS / "demo-media-bob.png").convert("RGB")
    ratio = bob.execute_script("return window.devicePixelRatio") or 1
    left, top, width, height = (v * ratio for v in theirs["img"]["rect"])
    assert width > 50 and height > 40, theirs["img"]["rect"]
    centres = {
        "top_left": (left + width / 4, top + height / 4),
        "top_right": (left + 3 * width / 4, top + height / 4),
        "bottom_left": (left + width / 4, top + 3 * height / 4),
        "bottom_right": (left + 3 * width / 4, top + 3 * height / 4),
    }
    for name, (x, y) in centres.items():
        got = shot.getpixel((int(x), int(y)))
        assert isinstance(got, tuple), got
        want = QUADRANTS[name]
        assert all(abs(g - w) <= 24 for g, w in zip(got, want, strict=True)), f"{name} of the photo at ({x:.0f}, {y:.0f}): {got}, expected about {want}"

    for d, user in ((alice, "alice"), (bob, "bob")):
        errors = js_errors(d)
        assert not errors, f"JavaScript errors in {user}'s page: {errors}"
