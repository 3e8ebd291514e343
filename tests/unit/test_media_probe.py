"""gateway.media.probe on real files made here: Pillow images (EXIF orientation, RGBA,
animated GIF, decompression bombs), ``wave`` WAVs, and hand-built but valid MP3 and ADTS
frame sequences, AMR and SILK files, Ogg pages with correct checksums, FLAC, WebM and
MP4 box trees. ``test_lame_mp3`` also checks MP3s from a real encoder (Debian's lame,
installed on demand)."""

from __future__ import annotations

import io
import random
import struct
import subprocess
import wave
from pathlib import Path

import pytest
from PIL import Image

from gateway.media import probe, sniff
from gateway.media.probe import MAX_PIXELS, ImageInfo, ProbeError, audio_duration_ms, probe_image, thumbnail, video_info
from gateway.media.sniff import detect

# ---- builders ------------------------------------------------------------------------------


def write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def duration(path: Path) -> int | None:
    s = detect(path.read_bytes()[:sniff.HEAD_BYTES])
    assert s is not None, path
    return audio_duration_ms(path, s)


def make_wav(path: Path, rate: int, seconds: float, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x01\x00" * channels * int(rate * seconds))
    return path


def mp3_frame(mpeg1: bool = True, mono: bool = False, payload: bytes = b"") -> bytes:
    """A frame header and zero payload: MPEG-1 layer III 128 kbit/s 44.1 kHz (417 bytes,
    1152 samples) or MPEG-2 layer III 64 kbit/s 22.05 kHz (208 bytes, 576 samples)."""
    if mpeg1:
        hdr, size = bytes([0xFF, 0xFB, 0x90, 0xC0 if mono else 0x00]), 417
    else:
        hdr, size = bytes([0xFF, 0xF3, 0x80, 0xC0 if mono else 0x00]), 208
    return hdr + payload + b"\0" * (size - 4 - len(payload))


def id3v2(size: int) -> bytes:
    ss = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x04\x00\x00" + ss + b"\0" * size


def adts_frame(payload: int = 200, sf_index: int = 4, blocks: int = 1) -> bytes:
    fl = 7 + payload
    return bytes([0xFF, 0xF1, (1 << 6) | (sf_index << 2), (2 << 6) | (fl >> 11), (fl >> 3) & 0xFF,
                  ((fl & 7) << 5) | 0x1F, 0xFC | (blocks - 1)]) + b"\0" * payload


def crc_ogg(data: bytes) -> int:
    """Bit by bit (the module uses a table): CRC-32, polynomial 0x04C11DB7, MSB first."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def ogg_page(packets: list[bytes], granule: int, seq: int, serial: int = 0x1234, flags: int = 0) -> bytes:
    lacing = bytearray()
    for p in packets:
        n = len(p)
        lacing += b"\xff" * (n // 255) + bytes([n % 255])
    body = b"".join(packets)
    hdr = b"OggS" + bytes([0, flags]) + struct.pack("<qII", granule, serial, seq) + b"\0\0\0\0" + bytes([len(lacing)]) + bytes(lacing)
    page = hdr + body
    return page[:22] + struct.pack("<I", crc_ogg(page)) + page[26:]


def ogg_opus(seconds: float, pre_skip: int = 312, pages: int = 5) -> bytes:
    head = b"OpusHead" + bytes([1, 1]) + struct.pack("<HIhB", pre_skip, 48000, 0, 0)
    tags = b"OpusTags" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0)
    out = ogg_page([head], 0, 0, flags=0x02) + ogg_page([tags], 0, 1)
    total = pre_skip + int(48000 * seconds)
    for i in range(1, pages + 1):
        out += ogg_page([b"\xfc" + b"\0" * 60] * 10, total * i // pages, 1 + i, flags=0x04 if i == pages else 0)
    return out


def ogg_vorbis(rate: int, samples: int) -> bytes:
    ident = b"\x01vorbis" + struct.pack("<IBIiiiBB", 0, 2, rate, 0, 128000, 0, 0xB8, 1)
    return ogg_page([ident], 0, 0, flags=0x02) + ogg_page([b"\x03vorbis" + b"\0" * 20], 0, 1) + ogg_page([b"\0" * 300], samples, 2, flags=0x04)


def box(typ: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + typ + payload


def full(typ: bytes, version: int, payload: bytes) -> bytes:
    return box(typ, bytes([version, 0, 0, 0]) + payload)


def mvhd(timescale: int, dur: int, version: int = 0) -> bytes:
    body = struct.pack(">QQIQ", 0, 0, timescale, dur) if version == 1 else struct.pack(">IIII", 0, 0, timescale, dur)
    return full(b"mvhd", version, body + b"\0" * 80)


ROT90 = (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
IDENTITY = (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def tkhd(w: int, h: int, version: int = 0, matrix: tuple[int, ...] = IDENTITY) -> bytes:
    times = struct.pack(">QQIIQ", 0, 0, 1, 0, 0) if version == 1 else struct.pack(">IIIII", 0, 0, 1, 0, 0)
    return full(b"tkhd", version, times + b"\0" * 16 + struct.pack(">9i", *matrix) + struct.pack(">II", w << 16, h << 16))


def hdlr(handler: bytes) -> bytes:
    return full(b"hdlr", 0, b"\0" * 4 + handler + b"\0" * 12 + b"\0")


def trak(handler: bytes, w: int = 0, h: int = 0, version: int = 0, matrix: tuple[int, ...] = IDENTITY) -> bytes:
    return box(b"trak", tkhd(w, h, version, matrix) + box(b"mdia", hdlr(handler)))


def mp4(moov_payload: bytes, brand: bytes = b"isom", moov_last: bool = False) -> bytes:
    f = box(b"ftyp", brand + b"\0\0\0\0" + brand + b"mp41")
    moov, mdat = box(b"moov", moov_payload), box(b"mdat", b"\0" * 5000)
    return f + (mdat + moov if moov_last else moov + mdat)


# ---- images --------------------------------------------------------------------------------


def jpeg_with_orientation(path: Path, orientation: int, size: tuple[int, int] = (400, 200)) -> Path:
    im = Image.new("RGB", size, "white")
    im.paste((255, 0, 0), (0, 0, 40, 40))  # a red square in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path


def test_jpeg_orientation(tmp_path: Path) -> None:
    plain = jpeg_with_orientation(tmp_path / "a.jpg", 1)
    assert probe_image(plain) == ImageInfo(400, 200)
    rotated = jpeg_with_orientation(tmp_path / "b.jpg", 6)  # displayed turned 90 degrees clockwise
    assert probe_image(rotated) == ImageInfo(200, 400)
    out = tmp_path / "b.thumb.jpg"
    assert thumbnail(rotated, out) == (160, 320)
    with Image.open(out) as t:
        assert t.format == "JPEG" and t.size == (160, 320) and t.mode == "RGB"
        assert not t.getexif().get(0x0112)
        r, g, b = t.getpixel((155, 4))  # the red corner is now top-right
        assert r > 200 and g < 60 and b < 60
        assert t.getpixel((4, 4)) == pytest.approx((255, 255, 255), abs=8)
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left"


def test_png_rgba_flattened_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (600, 300), (0, 0, 0, 0))
    im.paste((0, 0, 255, 255), (300, 0, 600, 300))
    p = tmp_path / "a.png"
    im.save(p)
    assert probe_image(p) == ImageInfo(600, 300)
    out = tmp_path / "t.jpg"
    assert thumbnail(p, out, max_side=320) == (320, 160)
    with Image.open(out) as t:
        assert t.getpixel((10, 80)) == pytest.approx((255, 255, 255), abs=6)
        assert t.getpixel((300, 80)) == pytest.approx((0, 0, 255), abs=12)


def test_gif_animated_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (100, 80), c) for c in ("red", "blue", "green")]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert probe_image(p) == ImageInfo(100, 80)
    out = tmp_path / "t.jpg"
    assert thumbnail(p, out) == (100, 80), "never enlarged"
    with Image.open(out) as t:
        r, g, b = t.getpixel((50, 40))
        assert r > 200 and g < 60 and b < 60


def test_palette_png_with_transparency_and_webp_bmp(tmp_path: Path) -> None:
    p = tmp_path / "p.png"
    im = Image.new("P", (50, 50), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 0
    im.save(p, transparency=0)
    out = tmp_path / "t.jpg"
    thumbnail(p, out)
    with Image.open(out) as t:
        assert t.getpixel((25, 25)) == pytest.approx((255, 255, 255), abs=6)
    for fmt in ("WEBP", "BMP"):
        q = tmp_path / f"x.{fmt.lower()}"
        Image.new("RGB", (700, 350), "green").save(q, fmt)
        assert probe_image(q) == ImageInfo(700, 350)
        assert thumbnail(q, tmp_path / f"x.{fmt}.jpg") == (320, 160)


def test_heic_size_from_ispe(tmp_path: Path) -> None:
    ipco = box(b"ipco", full(b"ispe", 0, struct.pack(">II", 320, 240)) + full(b"ispe", 0, struct.pack(">II", 4032, 3024)) + box(b"irot", b"\x01"))
    data = box(b"ftyp", b"heic\0\0\0\0mif1heic") + full(b"meta", 0, hdlr(b"pict") + box(b"iprp", ipco)) + box(b"mdat", b"\0" * 100)
    p = write(tmp_path, "a.heic", data)
    assert detect(data) == sniff.HEIC
    assert probe_image(p) == ImageInfo(3024, 4032)
    with pytest.raises(ProbeError):
        thumbnail(p, tmp_path / "t.jpg")


def test_decompression_bombs_refused(tmp_path: Path) -> None:
    """Over MAX_PIXELS (Pillow's limit is set to it): refused before anything is decoded,
    whether Pillow itself refuses (over twice the limit) or this module does."""
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS
    for i, size in enumerate(((10_000, MAX_PIXELS // 10_000 + 1), (20_000, MAX_PIXELS // 10_000 + 1))):
        p = tmp_path / f"bomb{i}.png"
        Image.new("1", size).save(p)
        assert p.stat().st_size < 200_000
        with pytest.raises(ProbeError, match=r"(?i)too large|pixels|bomb"):
            probe_image(p)
        with pytest.raises(ProbeError):
            thumbnail(p, tmp_path / "t.jpg")


def test_broken_images(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.new("RGB", (300, 300), "red").save(good, "JPEG")
    for name, data in (("empty", b""), ("text", b"hello"), ("truncated", good.getvalue()[:400]),
                       ("elf", b"\x7fELF" + b"\0" * 100), ("tiff", b"II*\x00" + b"\0" * 100)):
        p = write(tmp_path, name, data)
        with pytest.raises(ProbeError):
            thumbnail(p, tmp_path / "t.jpg")
        if name != "truncated":
            with pytest.raises(ProbeError):
                probe_image(p)
    with pytest.raises(ProbeError):
        probe_image(tmp_path / "missing.jpg")


# ---- audio ---------------------------------------------------------------------------------


def test_wav(tmp_path: Path) -> None:
    assert duration(make_wav(tmp_path / "a.wav", 8000, 1.5)) == 1500
    assert duration(make_wav(tmp_path / "b.wav", 44100, 2.0, channels=2)) == 2000
    # a recorder that streamed it and never patched the sizes (0 in the data chunk)
    data = bytearray(make_wav(tmp_path / "c.wav", 16000, 3.0).read_bytes())
    i = data.find(b"data")
    data[i + 4:i + 8] = b"\0\0\0\0"
    data[4:8] = b"\0\0\0\0"
    assert duration(write(tmp_path, "d.wav", bytes(data))) == 3000
    data[i + 4:i + 8] = b"\xff\xff\xff\xff"
    assert duration(write(tmp_path, "e.wav", bytes(data))) == 3000


def test_mp3_frames(tmp_path: Path) -> None:
    # 100 frames x 1152 samples at 44.1 kHz = 2612 ms
    assert duration(write(tmp_path, "a.mp3", mp3_frame() * 100)) == 2612
    # an ID3v2 tag first, junk between frames, an ID3v1 tag at the end
    data = id3v2(3000) + mp3_frame() * 50 + b"\x00junk\xff\x00" + mp3_frame() * 50 + b"TAG" + b"\0" * 125
    assert duration(write(tmp_path, "b.mp3", data)) == 2612
    # MPEG-2 layer III: 576 samples at 22.05 kHz
    assert duration(write(tmp_path, "c.mp3", mp3_frame(mpeg1=False, mono=True) * 383)) == 383 * 576 * 1000 // 22050
    # a truncated last frame is not counted
    assert duration(write(tmp_path, "d.mp3", (mp3_frame() * 10)[:-100])) == 9 * 1152 * 1000 // 44100


def test_mp3_xing_and_vbri(tmp_path: Path) -> None:
    """The frame count of a Xing/Info or VBRI header wins over walking (10 real frames,
    the header says 1000)."""
    xing = mp3_frame(payload=b"\0" * 32 + b"Xing" + struct.pack(">II", 1, 1000))
    assert duration(write(tmp_path, "x.mp3", xing + mp3_frame() * 10)) == 1000 * 1152 * 1000 // 44100
    info_mono = mp3_frame(mono=True, payload=b"\0" * 17 + b"Info" + struct.pack(">II", 0x0F, 500))
    assert duration(write(tmp_path, "i.mp3", id3v2(100) + info_mono + mp3_frame(mono=True) * 10)) == 500 * 1152 * 1000 // 44100
    vbri = mp3_frame(payload=b"\0" * 32 + b"VBRI" + struct.pack(">HHHII", 1, 0, 0, 0, 2000))
    assert duration(write(tmp_path, "v.mp3", vbri + mp3_frame() * 10)) == 2000 * 1152 * 1000 // 44100
    # a Xing header without the frame count flag: walk
    noflag = mp3_frame(payload=b"\0" * 32 + b"Xing" + struct.pack(">II", 0, 1000))
    assert duration(write(tmp_path, "n.mp3", noflag + mp3_frame() * 9)) == 10 * 1152 * 1000 // 44100


def test_aac_adts(tmp_path: Path) -> None:
    # 430 frames x 1024 samples at 44.1 kHz = 9984 ms
    assert duration(write(tmp_path, "a.aac", adts_frame() * 430)) == 430 * 1024 * 1000 // 44100
    # 16 kHz (index 8), two raw blocks per frame
    assert duration(write(tmp_path, "b.aac", adts_frame(sf_index=8, blocks=2) * 100)) == 100 * 2048 * 1000 // 16000


def test_amr(tmp_path: Path) -> None:
    nb = b"#!AMR\n" + (b"\x3c" + b"\0" * 31) * 150 + (b"\x44" + b"\0" * 5) * 10 + b"\x7c" * 40  # 12.2k, SID, NO_DATA
    assert duration(write(tmp_path, "a.amr", nb)) == 200 * 20
    wb = b"#!AMR-WB\n" + (b"\x44" + b"\0" * 60) * 250
    assert duration(write(tmp_path, "b.awb", wb)) == 5000
    truncated = b"#!AMR\n" + (b"\x3c" + b"\0" * 31) * 199 + b"\x3c" + b"\0" * 5
    assert duration(write(tmp_path, "c.amr", truncated)) == 199 * 20, "a truncated frame is not counted"


def test_silk(tmp_path: Path) -> None:
    frames = b"".join(struct.pack("<H", 30 + i % 7) + b"\x55" * (30 + i % 7) for i in range(250))
    assert duration(write(tmp_path, "a.silk", b"\x02#!SILK_V3" + frames + b"\xff\xff")) == 5000
    assert duration(write(tmp_path, "b.silk", b"#!SILK_V3" + frames)) == 5000


def test_ogg(tmp_path: Path) -> None:
    data = ogg_opus(3.5)
    assert detect(data) == sniff.OPUS
    assert duration(write(tmp_path, "a.opus", data)) == 3500
    # a last page with a bad checksum is skipped: the one before it counts
    bad = bytearray(data)
    bad[-5] ^= 0xFF
    assert duration(write(tmp_path, "b.opus", bytes(bad))) == (int(48000 * 3.5 + 312) * 4 // 5 - 312) * 1000 // 48000
    assert duration(write(tmp_path, "c.ogg", ogg_vorbis(44100, 44100 * 7))) == 7000
    assert probe.ogg_crc(data[:58]) == crc_ogg(data[:22] + b"\0\0\0\0" + data[26:58])


def test_flac_and_webm(tmp_path: Path) -> None:
    si = struct.pack(">HH", 4096, 4096) + b"\0" * 6 + bytes([(44100 >> 12) & 0xFF, (44100 >> 4) & 0xFF, ((44100 & 0xF) << 4) | 0x02, 0xF0]) \
        + struct.pack(">I", 44100 * 4) + b"\0" * 16
    assert duration(write(tmp_path, "a.flac", b"fLaC\x80\x00\x00\x22" + si)) == 4000

    def el(eid: int, payload: bytes) -> bytes:
        return eid.to_bytes((eid.bit_length() + 7) // 8, "big") + bytes([0x08]) + len(payload).to_bytes(4, "big") + payload

    header = el(0x1A45DFA3, el(0x4282, b"webm"))
    tracks = el(0x1654AE6B, el(0xAE, el(0x83, b"\x02")))
    info = el(0x1549A966, el(0x2AD7B1, (1_000_000).to_bytes(3, "big")) + el(0x4489, struct.pack(">d", 6250.0)))
    data = header + el(0x18538067, info + tracks + el(0x1F43B675, b"\0" * 50))
    assert detect(data) == sniff.WEBM_AUDIO
    assert duration(write(tmp_path, "a.weba", data)) == 6250
    no_duration = header + el(0x18538067, el(0x1549A966, el(0x2AD7B1, b"\x0f\x42\x40")) + tracks)
    assert duration(write(tmp_path, "b.weba", no_duration)) is None


def test_m4a_and_mp4(tmp_path: Path) -> None:
    m4a = mp4(mvhd(44100, 44100 * 12) + trak(b"soun"), brand=b"M4A ")
    p = write(tmp_path, "a.m4a", m4a)
    assert detect(m4a) == sniff.M4A
    assert duration(p) == 12000
    assert video_info(p) == (12000, None, None)
    # version 1 mvhd, moov after mdat, a rotated (portrait) phone video
    v = mp4(mvhd(90000, 90000 * 5 + 45000, version=1) + trak(b"soun") + trak(b"vide", 1920, 1080, version=1, matrix=ROT90), moov_last=True)
    q = write(tmp_path, "b.mp4", v)
    assert detect(v) == sniff.MP4
    assert video_info(q) == (5500, 1080, 1920)
    assert duration(q) == 5500
    r = write(tmp_path, "c.mov", mp4(mvhd(600, 600 * 3) + trak(b"vide", 640, 480), brand=b"qt  "))
    assert video_info(r) == (3000, 640, 480)
    # fragmented: mvhd says 0, mehd has it
    frag = mp4(mvhd(1000, 0) + box(b"mvex", full(b"mehd", 0, struct.pack(">I", 4321))) + trak(b"vide", 320, 240))
    assert video_info(write(tmp_path, "d.mp4", frag)) == (4321, 320, 240)
    # unknown duration (all ones), no moov at all
    assert video_info(write(tmp_path, "e.mp4", mp4(mvhd(1000, 0xFFFFFFFF) + trak(b"vide", 2, 2)))) == (None, 2, 2)
    assert video_info(write(tmp_path, "f.mp4", box(b"ftyp", b"isom\0\0\0\0isom") + box(b"mdat", b"\0" * 10))) == (None, None, None)


def test_unknown_types_and_missing_files(tmp_path: Path) -> None:
    p = write(tmp_path, "a.pdf", b"%PDF-1.4\n")
    assert audio_duration_ms(p, sniff.PDF) is None
    assert audio_duration_ms(write(tmp_path, "b.mp3", b"\0" * 1000), sniff.MP3) is None
    assert audio_duration_ms(write(tmp_path, "c.wav", b"RIFF\0\0\0\0WAVEfmt "), sniff.WAV) is None
    with pytest.raises(ProbeError):
        audio_duration_ms(tmp_path / "missing.mp3", sniff.MP3)
    with pytest.raises(ProbeError):
        video_info(tmp_path / "missing.mp4")


def test_hostile_files_only_raise_probe_error(tmp_path: Path) -> None:
    """Valid files of every type cut short and with random bytes overwritten (sizes
    included): each probe returns or raises ProbeError, quickly."""
    samples = {
        sniff.WAV: make_wav(tmp_path / "w.wav", 8000, 0.2).read_bytes(),
        sniff.MP3: id3v2(50) + mp3_frame(payload=b"\0" * 32 + b"Xing" + struct.pack(">II", 1, 9)) + mp3_frame() * 8,
        sniff.AAC: adts_frame() * 10,
        sniff.M4A: mp4(mvhd(1000, 5000, version=1) + trak(b"soun") + trak(b"vide", 10, 10, version=1)),
        sniff.AMR: b"#!AMR\n" + (b"\x3c" + b"\0" * 31) * 10,
        sniff.OPUS: ogg_opus(0.5, pages=2),
        sniff.OGG: ogg_vorbis(8000, 800),
        sniff.SILK: b"\x02#!SILK_V3" + (b"\x04\x00abcd") * 10 + b"\xff\xff",
        sniff.FLAC: b"fLaC\x80\x00\x00\x22" + b"\x10\x00" * 17,
    }
    rnd = random.Random(17)
    p = tmp_path / "x"
    for kind, good in samples.items():
        for i in range(150):
            b = bytearray(good[: rnd.randint(0, len(good))] if i % 3 == 0 else good)
            for _ in range(rnd.randint(1, 8)):
                if b:
                    b[rnd.randrange(len(b))] = rnd.choice((0, 0xFF, rnd.randrange(256)))
            p.write_bytes(bytes(b))
            for fn in (lambda k=kind: audio_duration_ms(p, k), lambda: video_info(p), lambda: probe_image(p)):
                try:
                    r = fn()
                except ProbeError:
                    continue
                assert r is None or isinstance(r, (int, tuple)), r


def test_lame_mp3(tmp_path: Path) -> None:
    """MP3s from a real encoder (Debian's lame, installed on demand): CBR (walked, with
    lame's Info header) and VBR (Xing) durations within a frame of the WAV's."""
    from support.debian import require_program

    lame = require_program("lame", "lame")
    src = make_wav(tmp_path / "src.wav", 44100, 3.0)
    for args, name in ((["-b", "64"], "cbr"), (["-V", "5"], "vbr"), (["-b", "64", "-t"], "cbr-no-info")):
        out = tmp_path / f"{name}.mp3"
        subprocess.run([lame, "--quiet", *args, str(src), str(out)], check=True, timeout=60)
        ms = duration(out)
        assert ms is not None and abs(ms - 3000) <= 60, (name, ms)
