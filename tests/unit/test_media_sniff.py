"""gateway.media.sniff: types from content, never from names; what each kind accepts.

Samples are real files where Python can make them (Pillow images, ``wave``, ``zipfile``,
``gzip``, ``tarfile``, ``bz2``, ``lzma``) and hand-built headers elsewhere."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import struct
import tarfile
import wave
import zipfile

import pytest
from PIL import Image

from gateway.media import sniff
from gateway.media.sniff import HEAD_BYTES, KINDS, Sniffed, allowed, detect, kind_of


def image(fmt: str, mode: str = "RGB", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (40, 30), "red").save(buf, fmt, **kw)
    return buf.getvalue()


def wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    return buf.getvalue()


def zip_of(*entries: tuple[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_STORED if name == "mimetype" else compression)
    return buf.getvalue()


def content_types(main: str) -> bytes:
    return (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            b'<Default Extension="xml" ContentType="application/xml"/><Override PartName="/x.xml" ContentType="application/vnd.'
            + main.encode() + b'+xml"/></Types>')


def box(typ: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + typ + payload


def ftyp(major: bytes, *compat: bytes) -> bytes:
    return box(b"ftyp", major + b"\0\0\0\0" + b"".join(compat))


def hdlr(handler: bytes) -> bytes:
    return box(b"hdlr", b"\0" * 8 + handler + b"\0" * 12 + b"\0")


MP3_FRAME = b"\xff\xfb\x90\x00" + b"\0" * 413  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz: 417 bytes


def adts(n: int) -> bytes:
    fl = 7 + 100
    hdr = bytes([0xFF, 0xF1, (1 << 6) | (4 << 2), (2 << 6) | (fl >> 11), (fl >> 3) & 0xFF, ((fl & 7) << 5) | 0x1F, 0xFC])
    return (hdr + b"\0" * 100) * n


def ebml(eid: int, payload: bytes) -> bytes:
    idb = eid.to_bytes((eid.bit_length() + 7) // 8, "big")
    return idb + bytes([0x08]) + len(payload).to_bytes(4, "big") + payload  # 5-byte size (0x08 marker)


def matroska(doctype: bytes, *track_types: int) -> bytes:
    header = ebml(0x1A45DFA3, ebml(0x4286, b"\x01") + ebml(0x4282, doctype))
    tracks = ebml(0x1654AE6B, b"".join(ebml(0xAE, ebml(0xD7, bytes([i + 1])) + ebml(0x83, bytes([t]))) for i, t in enumerate(track_types)))
    segment = b"\x18\x53\x80\x67" + b"\x01\xff\xff\xff\xff\xff\xff\xff" + ebml(0x1549A966, ebml(0x2AD7B1, b"\x0f\x42\x40")) + tracks
    return header + segment + ebml(0x1F43B675, b"\0" * 16)


def ogg_page(packet: bytes) -> bytes:
    return b"OggS\x00\x02" + b"\0" * 8 + b"\x01\0\0\0" + b"\0" * 8 + bytes([1, len(packet)]) + packet


def ole2(names: list[str], root_clsid: bytes = b"\0" * 16) -> bytes:
    header = bytearray(512)
    header[:8] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
    header[0x1A:0x1C] = b"\x3e\x00"
    header[0x1C:0x1E] = b"\xfe\xff"
    header[0x1E:0x20] = struct.pack("<H", 9)
    header[0x30:0x34] = struct.pack("<I", 0)  # the directory starts at sector 0 (file offset 512)
    d = bytearray()
    for i, name in enumerate(["Root Entry", *names]):
        e = bytearray(128)
        n = name.encode("utf-16-le") + b"\0\0"
        e[:len(n)] = n
        e[0x40:0x42] = struct.pack("<H", len(n))
        e[0x42] = 5 if i == 0 else 2
        if i == 0:
            e[0x50:0x60] = root_clsid
        d += e
    return bytes(header) + bytes(d) + b"\0" * (512 - len(d) % 512)


MSI_CLSID = bytes.fromhex("84100c00" "0000" "0000" "c000000000000046")

SAMPLES: list[tuple[str, bytes, Sniffed | None]] = [
    ("jpeg", image("JPEG"), sniff.JPEG),
    ("png", image("PNG"), sniff.PNG),
    ("gif", image("GIF"), sniff.GIF),
    ("webp", image("WEBP"), sniff.WEBP),
    ("bmp", image("BMP"), sniff.BMP),
    ("tiff", image("TIFF"), sniff.TIFF),
    ("heic", ftyp(b"heic", b"mif1", b"heic") + box(b"meta", b"\0" * 4), sniff.HEIC),
    ("heix", ftyp(b"heix", b"mif1"), sniff.HEIC),
    ("mif1 heic", ftyp(b"mif1", b"mif1", b"heic"), sniff.HEIC),
    ("mif1 only", ftyp(b"mif1", b"mif1"), sniff.HEIF),
    ("avif", ftyp(b"avif", b"mif1", b"avif"), sniff.AVIF),
    ("wav", wav(), sniff.WAV),
    ("mp3 frames", MP3_FRAME * 12, sniff.MP3),
    ("mp3 id3", b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\0" * 10 + MP3_FRAME * 3, sniff.MP3),
    ("mp3 big id3", b"ID3\x03\x00\x00\x00\x01\x00\x00" + b"\0" * 5000, sniff.MP3),
    ("aac adts", adts(20), sniff.AAC),
    ("m4a brand", ftyp(b"M4A ", b"M4A ", b"mp42", b"isom"), sniff.M4A),
    ("isom audio only", ftyp(b"isom", b"isom", b"mp41") + box(b"moov", box(b"trak", box(b"mdia", hdlr(b"soun")))), sniff.M4A),
    ("isom video", ftyp(b"isom", b"isom", b"avc1") + box(b"moov", box(b"trak", box(b"mdia", hdlr(b"vide"))) + box(b"trak", box(b"mdia", hdlr(b"soun")))), sniff.MP4),
    ("mp4 moov at the end", ftyp(b"mp42", b"mp42", b"isom") + box(b"mdat", b"\0" * 100), sniff.MP4),
    ("mov", ftyp(b"qt  ", b"qt  "), sniff.MOV),
    ("3gp", ftyp(b"3gp4", b"3gp4", b"isom"), sniff.THREE_GP),
    ("amr", b"#!AMR\n" + b"\x3c" + b"\0" * 31, sniff.AMR),
    ("amr-wb", b"#!AMR-WB\n" + b"\x44" + b"\0" * 60, sniff.AMR_WB),
    ("silk", b"#!SILK_V3\x10\x00" + b"\0" * 16, sniff.SILK),
    ("silk wechat", b"\x02#!SILK_V3\x10\x00" + b"\0" * 16, sniff.SILK),
    ("ogg opus", ogg_page(b"OpusHead\x01\x01\x38\x01\x80\xbb\0\0\0\0\0"), sniff.OPUS),
    ("ogg vorbis", ogg_page(b"\x01vorbis" + b"\0" * 22), sniff.OGG),
    ("ogg theora", ogg_page(b"\x80theora" + b"\0" * 30), sniff.OGV),
    ("flac", b"fLaC\x00\x00\x00\x22" + b"\0" * 34, sniff.FLAC),
    ("webm video", matroska(b"webm", 1, 2), sniff.WEBM),
    ("webm audio (MediaRecorder)", matroska(b"webm", 2), sniff.WEBM_AUDIO),
    ("matroska", matroska(b"matroska", 1), sniff.MKV),
    ("mka", matroska(b"matroska", 2), sniff.MKA),
    ("avi", b"RIFF\0\0\0\0AVI LIST", sniff.AVI),
    ("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", sniff.PDF),
    ("zip", zip_of(("a.txt", b"hello"), ("b/c.bin", b"\0" * 100)), sniff.ZIP),
    ("docx", zip_of(("[Content_Types].xml", content_types("openxmlformats-officedocument.wordprocessingml.document.main")), ("word/document.xml", b"<w/>")), sniff.DOCX),
    ("xlsx", zip_of(("[Content_Types].xml", content_types("openxmlformats-officedocument.spreadsheetml.sheet.main")), ("xl/workbook.xml", b"<w/>")), sniff.XLSX),
    ("pptx", zip_of(("[Content_Types].xml", content_types("openxmlformats-officedocument.presentationml.presentation.main")), ("ppt/p.xml", b"<p/>")), sniff.PPTX),
    ("ooxml whose parts are past the head", zip_of(("_rels/.rels", b"<r/>" * 2000), ("word/document.xml", b"<w/>"), compression=zipfile.ZIP_STORED)[:200], sniff.ZIP),
    ("docx by word/ with no content types", zip_of(("word/document.xml", b"<w/>")), sniff.DOCX),
    ("docm", zip_of(("[Content_Types].xml", content_types("ms-word.document.macroEnabled.main"))), sniff.DOCM),
    ("odt", zip_of(("mimetype", b"application/vnd.oasis.opendocument.text"), ("content.xml", b"<x/>")), sniff.ODT),
    ("ods", zip_of(("mimetype", b"application/vnd.oasis.opendocument.spreadsheet"), ("content.xml", b"<x/>")), sniff.ODS),
    ("odp", zip_of(("mimetype", b"application/vnd.oasis.opendocument.presentation"), ("content.xml", b"<x/>")), sniff.ODP),
    ("epub", zip_of(("mimetype", b"application/epub+zip"), ("META-INF/container.xml", b"<x/>")), sniff.EPUB),
    ("doc", ole2(["WordDocument", "1Table"]), sniff.DOC),
    ("xls", ole2(["Workbook"]), sniff.XLS),
    ("ppt", ole2(["PowerPoint Document"]), sniff.PPT),
    ("ole2 directory past the head", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 22 + b"\x09\x00" + b"\0" * 16 + b"\x40\x00\x00\x00", sniff.OLE2),
    ("rtf", b"{\\rtf1\\ansi\\deff0 hello}", sniff.RTF),
    ("7z", b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\0" * 24, sniff.SEVEN_Z),
    ("rar4", b"Rar!\x1a\x07\x00\xcf\x90\x73", sniff.RAR),
    ("rar5", b"Rar!\x1a\x07\x01\x00\x33\x92", sniff.RAR),
    ("gzip", gzip.compress(b"hello " * 100), sniff.GZIP),
    ("bzip2", bz2.compress(b"hello " * 100), sniff.BZIP2),
    ("xz", lzma.compress(b"hello " * 100), sniff.XZ),
    ("text", "hello, 世界\nsecond line\n".encode(), sniff.TEXT),
    ("csv", b"name,qty\r\nwidget,3\r\n", sniff.TEXT),
    ("utf-8 bom", b"\xef\xbb\xbfa,b\n1,2\n", sniff.TEXT),
    ("utf-16 bom", "\ufeffname\tqty\r\n苹果\t3\r\n".encode("utf-16-le"), sniff.TEXT),
    ("html", b"<!DOCTYPE html><html><script>alert(1)</script>", sniff.HTML),
    ("svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', sniff.SVG),
    ("xml", b'<?xml version="1.0"?><a/>', sniff.XML),
    # refused
    ("pe", b"MZ\x90\x00\x03" + b"\0" * 55 + b"\x80\0\0\0" + b"\0" * 64 + b"PE\0\0", sniff.EXE),
    ("elf", b"\x7fELF\x02\x01\x01" + b"\0" * 9, sniff.ELF),
    *[(f"mach-o {m.hex()}", m + b"\x07\x00\x00\x01" + b"\0" * 24, sniff.MACHO)
      for m in (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbf")],
    ("mach-o fat", b"\xca\xfe\xba\xbe\x00\x00\x00\x02" + b"\0" * 40, sniff.MACHO),
    ("java class", b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + b"\0" * 40, sniff.JAVA_CLASS),
    ("jar", zip_of(("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\n"), ("a/B.class", b"\xca\xfe\xba\xbe")), sniff.JAR),
    ("apk", zip_of(("AndroidManifest.xml", b"\x03\x00"), ("classes.dex", b"dex\n035\0")), sniff.APK),
    ("dex", b"dex\n035\x00" + b"\0" * 100, sniff.DEX),
    ("wasm", b"\x00asm\x01\x00\x00\x00", sniff.WASM),
    ("msi", ole2(["\u4840\u3f3f"], MSI_CLSID), sniff.MSI),
    ("lnk", b"L\x00\x00\x00\x01\x14\x02\x00" + b"\0" * 68, sniff.LNK),
    ("shebang", b"#!/bin/sh\nrm -rf /\n", sniff.SCRIPT),
    ("shebang env", b"#!/usr/bin/env python3\nprint(1)\n", sniff.SCRIPT),
    # unknown
    ("empty", b"", None),
    ("binary junk", bytes(range(256)) * 4, None),
    ("nul in text", b"hello\0world", None),
    ("latin-1 text", "café crème".encode("latin-1"), None),
    ("bare sync bytes", b"\xff\xfb\x90\x00" + b"\x12" * 500, None),
]


@pytest.mark.parametrize(("name", "data", "expected"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_detect(name: str, data: bytes, expected: Sniffed | None) -> None:
    assert detect(data) == expected
    assert detect(data[:HEAD_BYTES]) == expected, "HEAD_BYTES are enough"


def test_tar() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        t.addfile(info, io.BytesIO(b"hello"))
    assert detect(buf.getvalue()) == sniff.TAR


def test_only_the_head_counts() -> None:
    """Bytes past HEAD_BYTES change nothing: an ELF appended after text is still text,
    and text truncated inside a multi-byte character at the boundary is still text."""
    text = ("汉字" * 3000).encode()
    assert len(text) > HEAD_BYTES and text[HEAD_BYTES - 1] >= 0x80
    assert detect(text) == sniff.TEXT
    assert detect(b"a" * HEAD_BYTES + b"\x7fELF") == sniff.TEXT
    assert detect(b"a" * (HEAD_BYTES - 1) + b"\0") is None


def test_names_and_declared_types_play_no_part() -> None:
    # detect takes bytes only: a PNG called "x.exe" is a PNG, an ELF called "a.jpg" is an ELF
    assert detect(image("PNG")) == sniff.PNG
    assert detect(b"\x7fELF\x02\x01\x01\0") == sniff.ELF


def test_amr_and_silk_are_not_scripts() -> None:
    for head in (b"#!AMR\n", b"#!AMR-WB\n", b"#!SILK_V3", b"\x02#!SILK_V3"):
        s = detect(head + b"\0" * 40)
        assert s is not None and s.family == "audio"
    assert detect(b"#!AMRX\n") == sniff.SCRIPT
    assert detect(b"#!SILK_V2") == sniff.SCRIPT


def test_kinds() -> None:
    assert allowed("image", sniff.JPEG) and allowed("image", sniff.HEIC) and allowed("image", sniff.WEBP)
    assert not allowed("image", sniff.TIFF) and not allowed("image", sniff.SVG) and not allowed("image", sniff.PDF)
    assert allowed("voice", sniff.SILK) and allowed("voice", sniff.AMR) and allowed("voice", sniff.M4A) and allowed("voice", sniff.OPUS)
    assert not allowed("voice", sniff.MP4) and not allowed("voice", sniff.JPEG)
    assert allowed("video", sniff.MP4) and allowed("video", sniff.MOV) and allowed("video", sniff.WEBM)
    assert not allowed("video", sniff.M4A) and not allowed("video", sniff.WEBM_AUDIO)
    for t in (sniff.PDF, sniff.DOCX, sniff.XLS, sniff.OLE2, sniff.ZIP, sniff.SEVEN_Z, sniff.RAR, sniff.GZIP, sniff.TEXT,
              sniff.JPEG, sniff.TIFF, sniff.MP3, sniff.MP4):
        assert allowed("file", t), t
    for t in (sniff.HTML, sniff.SVG, sniff.XML, sniff.DOCM):
        assert not allowed("file", t), t
    for _, _, t in SAMPLES:
        if t is not None and t.refused:
            assert not any(allowed(k, t) for k in KINDS), t
            assert kind_of(t) is None
    assert not allowed("file", None) and not allowed("sticker", sniff.JPEG)
    assert kind_of(sniff.PNG) == "image" and kind_of(sniff.HEIC) == "image" and kind_of(sniff.TIFF) == "file"
    assert kind_of(sniff.AMR) == "voice" and kind_of(sniff.MP4) == "video" and kind_of(sniff.PDF) == "file"
    every = {t.mime for _, _, t in SAMPLES if t is not None}
    assert set().union(*KINDS.values()) <= every | {sniff.TAR.mime}, "every accepted type has a sample (tar: test_tar)"
    assert {t.family for _, _, t in SAMPLES if t is not None} == set(sniff.FAMILIES)


def test_hostile_heads_never_raise() -> None:
    """Random bytes, and every sample cut short and with bytes flipped: detect answers."""
    rnd = random.Random(17)
    for _ in range(3000):
        detect(rnd.randbytes(rnd.randint(0, 300)))
    for _, data, _ in SAMPLES:
        head = data[:HEAD_BYTES]
        for n in range(0, min(len(head), 80)):
            detect(head[:n])
        for _ in range(60):
            b = bytearray(head)
            for _ in range(rnd.randint(1, 6)):
                if b:
                    b[rnd.randrange(len(b))] = rnd.randrange(256)
            s = detect(bytes(b))
            assert s is None or s.family in sniff.FAMILIES
