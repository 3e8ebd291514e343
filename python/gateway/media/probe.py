"""Facts about an upload read from its content: image size and thumbnail (Pillow),
audio duration (WAV, MP3, AAC ADTS, M4A/MP4, AMR, Ogg Opus/Vorbis/Speex, SILK, FLAC,
WebM/Matroska) and video duration and size (MP4/MOV/3GP).

Every function is synchronous and blocking: callers run it in a thread
(``loop.run_in_executor``). All of them are meant for hostile input: they raise nothing
but :class:`ProbeError`, read boxes, chunks and pages through bounds-checked offsets
(never a whole file into memory), bound the frames they walk (:data:`MAX_FRAMES`) and the
pixels Pillow may decode (:data:`MAX_PIXELS`, also set as Pillow's decompression-bomb
limit), and decode JPEG thumbnails at a reduced DCT scale.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from PIL import Image, ImageFile

from . import sniff
from .sniff import HEAD_BYTES, Sniffed, adts_frame, ebml_children, id3v2_size, mpeg_frame

#: The most pixels an image may have (width x height): 50 MP is a 48 MP phone photo with
#: room to spare; decoding one as RGBA takes 200 MB, the worst one upload can cost.
#: Pillow's own decompression-bomb limit is set to it (Pillow warns above it and refuses
#: above twice it; this module refuses above it).
MAX_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: The most frames :func:`audio_duration_ms` walks in a file without a frame count in a
#: header (MP3 without Xing/VBRI, AAC ADTS, AMR, SILK): a million MP3 frames are over
#: 7 hours at 44.1 kHz; more gives None.
MAX_FRAMES = 1_000_000

#: The Pillow plugins this module lets open a file (nothing else is tried).
PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")


class ProbeError(Exception):
    """The content could not be read (not an image Pillow decodes, too many pixels, an
    I/O error, or a parser failure): ``str(e)`` says which."""


class ImageInfo(NamedTuple):
    """An image's displayed size: EXIF orientation (rotated 90 or 270 degrees) applied."""

    w: int
    h: int


# ---- images ------------------------------------------------------------------------------

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def _check_pixels(w: int, h: int) -> None:
    if w <= 0 or h <= 0:
        raise ProbeError(f"image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ProbeError(f"image too large: {w}x{h} is over {MAX_PIXELS} pixels")


def _orientation(im: Image.Image) -> int:
    try:
        v = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not a broken image
        return 1
    return v if isinstance(v, int) and 1 <= v <= 8 else 1


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Width and height of an image as displayed (EXIF orientation applied). JPEG, PNG,
    GIF, WebP and BMP through Pillow (header only, nothing decoded); HEIC/HEIF/AVIF from
    their ``ispe`` property (the largest one; swapped when an ``irot`` turns it a
    quarter). :class:`ProbeError` when it is not such an image or has more than
    :data:`MAX_PIXELS` pixels."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            if sniff.detect(head) in (sniff.HEIC, sniff.HEIF, sniff.AVIF):
                return _heif_size(f, os.fstat(f.fileno()).st_size)
            f.seek(0)
            with Image.open(f, formats=PIL_FORMATS) as im:
                w, h = im.size
                _check_pixels(w, h)
                if _orientation(im) >= 5:
                    w, h = h, w
                return ImageInfo(w, h)
    except ProbeError:
        raise
    except Exception as e:
        raise ProbeError(f"not a readable image: {type(e).__name__}: {e}") from None


def thumbnail(path: str | os.PathLike[str], out_path: str | os.PathLike[str], max_side: int = 320) -> tuple[int, int]:
    """Write a JPEG thumbnail of the image at ``path`` to ``out_path`` (atomically: a
    temporary file beside it, then renamed) and return its (width, height): at most
    ``max_side`` on the longer side (never enlarged), EXIF orientation applied,
    transparency flattened on white, the first frame of an animation.
    :class:`ProbeError` when Pillow cannot decode it (HEIC: no thumbnail)."""
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        with Image.open(path, formats=PIL_FORMATS) as im:
            _check_pixels(*im.size)
            orientation = _orientation(im)
            if im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))  # decode at 1/2 .. 1/8 scale: bounded CPU and memory
            im.seek(0)
            frame: Image.Image = im
            if im.mode == "P":
                frame = im.convert("RGBA" if "transparency" in im.info else "RGB")
            frame.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
            if frame.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
                rgba = frame.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                frame = flat
            elif frame.mode != "RGB":
                frame = frame.convert("RGB")
            if orientation in _TRANSPOSE:
                frame = frame.transpose(_TRANSPOSE[orientation])
            frame.save(tmp, "JPEG", quality=82, optimize=True)
            os.replace(tmp, out)
            return frame.size
    except ProbeError:
        raise
    except Exception as e:
        raise ProbeError(f"cannot make a thumbnail: {type(e).__name__}: {e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


# ---- ISO base media boxes (MP4, MOV, M4A, HEIF) -------------------------------------------

def _boxes(f: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the boxes in ``[start, end)``; a box that
    runs past ``end`` is cut at it and ends the walk."""
    pos = start
    for _ in range(100_000):
        if pos + 8 > end:
            return
        f.seek(pos)
        hdr = f.read(16)
        if len(hdr) < 8:
            return
        size, typ, hl = int.from_bytes(hdr[:4], "big"), hdr[4:8], 8
        if size == 1:
            if len(hdr) < 16:
                return
            size, hl = int.from_bytes(hdr[8:16], "big"), 16
        elif size == 0:
            size = end - pos
        if size < hl:
            return
        stop = pos + size
        yield typ, pos + hl, min(stop, end)
        if stop >= end:
            return
        pos = stop


def _find(f: BinaryIO, start: int, end: int, *path: bytes) -> tuple[int, int] | None:
    """The payload of the first box at ``path`` (e.g. ``b"moov", b"mvhd"``)."""
    for typ, s, e in _boxes(f, start, end):
        if typ == path[0]:
            return (s, e) if len(path) == 1 else _find(f, s, e, *path[1:])
    return None


def _read(f: BinaryIO, at: int, n: int) -> bytes:
    f.seek(at)
    return f.read(n)


def _mvhd_ms(f: BinaryIO, size: int) -> int | None:
    moov = _find(f, 0, size, b"moov")
    if moov is None:
        return None
    mvhd = _find(f, *moov, b"mvhd")
    if mvhd is not None:
        d = _read(f, mvhd[0], min(32, mvhd[1] - mvhd[0]))
        if d[:1] == b"\x01" and len(d) >= 32:
            timescale, duration, unknown = int.from_bytes(d[20:24], "big"), int.from_bytes(d[24:32], "big"), (1 << 64) - 1
        elif len(d) >= 20:
            timescale, duration, unknown = int.from_bytes(d[12:16], "big"), int.from_bytes(d[16:20], "big"), (1 << 32) - 1
        else:
            return None
        if duration == 0:  # fragmented: the movie extends header has it
            mehd = _find(f, *moov, b"mvex", b"mehd")
            if mehd is not None:
                m = _read(f, mehd[0], 12)
                duration = int.from_bytes(m[4:12], "big") if m[:1] == b"\x01" and len(m) >= 12 else int.from_bytes(m[4:8], "big")
        if timescale and 0 < duration < unknown:
            return duration * 1000 // timescale
    return None


def _mp4_duration(f: BinaryIO, size: int) -> int | None:
    return _mvhd_ms(f, size)


def video_info(path: str | os.PathLike[str]) -> tuple[int | None, int | None, int | None]:
    """(duration in ms, width, height) of an MP4/MOV/3GP video from its ``mvhd`` and the
    first video track's ``tkhd`` (width and height swapped when the track matrix turns
    it a quarter, as phones record portrait video). Each is None when the file does not
    say (no ``moov``, an audio-only file, a fragmented file without ``mehd``)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            duration = _mvhd_ms(f, size)
            moov = _find(f, 0, size, b"moov")
            w = h = None
            if moov is not None:
                for typ, s, e in _boxes(f, *moov):
                    if typ != b"trak":
                        continue
                    hdlr = _find(f, s, e, b"mdia", b"hdlr")
                    handler = _read(f, hdlr[0] + 8, 4) if hdlr else b""
                    tkhd = _find(f, s, e, b"tkhd")
                    if tkhd is None or handler not in (b"vide", b""):
                        continue
                    d = _read(f, tkhd[0], min(96, tkhd[1] - tkhd[0]))
                    m = 52 if d[:1] == b"\x01" else 40
                    if len(d) < m + 44:
                        continue
                    tw, th = int.from_bytes(d[m + 36:m + 40], "big") >> 16, int.from_bytes(d[m + 40:m + 44], "big") >> 16
                    if tw and th:
                        a, b, c, dd = struct.unpack(">iiii", d[m:m + 8] + d[m + 12:m + 20])
                        if a == 0 and dd == 0 and b and c:
                            tw, th = th, tw
                        w, h = tw, th
                        break
            return duration, w, h
    except Exception as e:
        raise ProbeError(f"cannot read the video: {type(e).__name__}: {e}") from None


def _heif_size(f: BinaryIO, size: int) -> ImageInfo:
    meta = _find(f, 0, size, b"meta")
    if meta is None:
        raise ProbeError("HEIF without a meta box")
    ipco = _find(f, meta[0] + 4, meta[1], b"iprp", b"ipco")  # meta is a full box: 4 bytes version/flags
    if ipco is None:
        raise ProbeError("HEIF without item properties")
    best, quarter = (0, 0), False
    for typ, s, e in _boxes(f, *ipco):
        if typ == b"ispe" and e - s >= 12:
            d = _read(f, s, 12)
            w, h = int.from_bytes(d[4:8], "big"), int.from_bytes(d[8:12], "big")
            if w * h > best[0] * best[1]:
                best = (w, h)
        elif typ == b"irot" and e > s:
            quarter = quarter or bool(_read(f, s, 1)[0] & 1)
    _check_pixels(*best)
    return ImageInfo(best[1], best[0]) if quarter else ImageInfo(*best)


# ---- audio -------------------------------------------------------------------------------

def _wav(f: BinaryIO, size: int) -> int | None:
    h = f.read(12)
    if len(h) < 12 or h[8:12] != b"WAVE":
        return None
    rf64 = h[:4] == b"RF64"
    pos, byte_rate, data, ds64 = 12, 0, -1, -1
    for _ in range(10_000):
        if pos + 8 > size:
            break
        ch = _read(f, pos, 8)
        cid, clen = ch[:4], int.from_bytes(ch[4:8], "little")
        if cid == b"ds64" and rf64:
            d = f.read(16)
            ds64 = int.from_bytes(d[8:16], "little") if len(d) == 16 else -1
        elif cid == b"fmt ":
            fmt = f.read(16)
            byte_rate = int.from_bytes(fmt[8:12], "little") if len(fmt) >= 12 else 0
        elif cid == b"data":
            avail = size - pos - 8
            n = ds64 if rf64 and clen == 0xFFFFFFFF else clen
            # recorders that stream a WAV write 0 or ~0 here and never patch it
            data = avail if n <= 0 or n > avail else n
            if byte_rate:
                break
            if clen == 0 or clen == 0xFFFFFFFF:
                break
        pos += 8 + clen + (clen & 1)
    if byte_rate <= 0 or data < 0:
        return None
    return data * 1000 // byte_rate


class _Walker:
    """Reads a file front to back in 64 KiB blocks, for frame walks."""

    def __init__(self, f: BinaryIO, start: int) -> None:
        self.f = f
        self.base = start  # file offset of buf[0]
        f.seek(start)
        self.buf = f.read(65536)

    def at(self, pos: int, n: int) -> bytes:
        """``n`` bytes at file offset ``pos`` (fewer at the end of the file)."""
        if pos < self.base or pos + n > self.base + len(self.buf):
            self.f.seek(pos)
            self.base, self.buf = pos, self.f.read(max(n, 65536))
        return self.buf[pos - self.base:pos - self.base + n]


_SYNC_LIMIT = 1 << 20  # junk skipped between MPEG/ADTS frames, at most, before giving up


def _frames(f: BinaryIO, size: int, start: int, parse: Callable[[bytes], tuple[int, int, int] | None]) -> int | None:
    """Walk frames from ``start``: ``parse(bytes)`` gives (length, samples, rate) or None.
    Junk between frames is skipped (resync) up to :data:`_SYNC_LIMIT` bytes; an ID3v1
    or APE tag ends the walk. Returns the duration in ms, None when no frame was found."""
    w = _Walker(f, start)
    pos, samples, rate, frames, junk = start, 0, 0, 0, 0
    while pos + 4 <= size and frames < MAX_FRAMES:
        hdr = w.at(pos, 10)
        fr = parse(hdr)
        if fr is not None and (rate == 0 or fr[2] == rate) and pos + fr[0] <= size:
            length, n, r = fr
            if rate == 0:
                nxt = w.at(pos + length, 10)  # the first frame must be followed by another (or the end)
                nf = parse(nxt) if len(nxt) >= 4 else None
                if len(nxt) >= 4 and (nf is None or nf[2] != r):
                    pos, junk = pos + 1, junk + 1
                    if junk > _SYNC_LIMIT:
                        return None
                    continue
            rate, samples, frames, pos = r, samples + n, frames + 1, pos + length
            continue
        if hdr[:3] == b"TAG" or hdr[:8] == b"APETAGEX" or hdr[:6] == b"LYRICS":
            break
        # resync: the next 0xFF
        block = w.at(pos + 1, 65536)
        i = block.find(b"\xff")
        step = len(block) + 1 if i < 0 else i + 1
        pos, junk = pos + step, junk + step
        if junk > _SYNC_LIMIT or not block:
            break
    if frames >= MAX_FRAMES or not rate:
        return None
    return samples * 1000 // rate


def _mpeg_parse(h: bytes) -> tuple[int, int, int] | None:
    fr = mpeg_frame(h)
    return (fr.length, fr.samples, fr.rate) if fr is not None and fr.length >= 4 else None


def _adts_parse(h: bytes) -> tuple[int, int, int] | None:
    fr = adts_frame(h)
    return (fr.length, fr.blocks * 1024, fr.rate) if fr is not None else None


def _mp3(f: BinaryIO, size: int) -> int | None:
    start = id3v2_size(f.read(10))
    first = _Walker(f, start)
    # the first frame (skipping up to 4 KiB of junk) may be a Xing/Info or VBRI header
    buf = first.at(start, HEAD_BYTES + 200)
    for o in range(min(HEAD_BYTES, max(0, len(buf) - 4))):
        if buf[o] == 0xFF and (fr := mpeg_frame(buf, o)) is not None:
            side = (32 if not fr.mono else 17) if fr.mpeg1 else (17 if not fr.mono else 9)
            x = o + 4 + side
            if buf[x:x + 4] in (b"Xing", b"Info") and len(buf) >= x + 12 and buf[x + 7] & 1:
                frames = int.from_bytes(buf[x + 8:x + 12], "big")
                if frames:
                    return frames * fr.samples * 1000 // fr.rate
            if buf[o + 36:o + 40] == b"VBRI" and len(buf) >= o + 36 + 18:
                frames = int.from_bytes(buf[o + 36 + 14:o + 36 + 18], "big")
                if frames:
                    return frames * fr.samples * 1000 // fr.rate
            break
    return _frames(f, size, start, _mpeg_parse)


def _aac(f: BinaryIO, size: int) -> int | None:
    return _frames(f, size, id3v2_size(f.read(10)), _adts_parse)


# bytes per AMR frame, the 1-byte frame header included, by frame type (as ffmpeg's amr.c)
_AMR_NB = (13, 14, 16, 18, 20, 21, 27, 32, 6, 1, 1, 1, 1, 1, 1, 1)
_AMR_WB = (18, 24, 33, 37, 41, 47, 51, 59, 61, 6, 1, 1, 1, 1, 1, 1)


def _amr(f: BinaryIO, size: int) -> int | None:
    head = f.read(12)
    if head.startswith(b"#!AMR-WB\n"):
        pos, table = 9, _AMR_WB
    elif head.startswith(b"#!AMR\n"):
        pos, table = 6, _AMR_NB
    else:
        return None  # multichannel AMR_MC1.0: not counted
    w = _Walker(f, pos)
    frames = 0
    while pos < size and frames < MAX_FRAMES:
        b = w.at(pos, 1)
        if not b or b[0] & 0x83:  # storage format: padding bits are zero
            break
        n = table[(b[0] >> 3) & 0x0F]
        if pos + n > size:
            break
        frames, pos = frames + 1, pos + n
    return frames * 20 if frames < MAX_FRAMES else None


def _silk(f: BinaryIO, size: int) -> int | None:
    head = f.read(10)
    pos = 10 if head.startswith(b"\x02#!SILK_V3") else 9 if head.startswith(b"#!SILK_V3") else -1
    if pos < 0:
        return None
    w = _Walker(f, pos)
    frames = 0
    while pos + 2 <= size and frames < MAX_FRAMES:
        n = int.from_bytes(w.at(pos, 2), "little")
        if n == 0xFFFF or pos + 2 + n > size:
            break
        frames, pos = frames + 1, pos + 2 + n
    return frames * 20 if frames < MAX_FRAMES else None


def _flac(f: BinaryIO, size: int) -> int | None:
    d = f.read(4 + 4 + 34)
    if d[:4] != b"fLaC" or len(d) < 42 or d[4] & 0x7F != 0:
        return None
    si = d[8:]
    rate = (si[10] << 12) | (si[11] << 4) | (si[12] >> 4)
    total = ((si[13] & 0x0F) << 32) | int.from_bytes(si[14:18], "big")
    return total * 1000 // rate if rate and total else None


def _ogg_crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


_OGG_CRC = _ogg_crc_table()


def ogg_crc(page: bytes) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, not reflected, zero initial
    value) of ``page`` with its checksum field zeroed."""
    crc = 0
    data = page[:22] + b"\0\0\0\0" + page[26:]
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[((crc >> 24) ^ b) & 0xFF]
    return crc


def _ogg(f: BinaryIO, size: int) -> int | None:
    first = f.read(27 + 255 + 512)
    if len(first) < 28 or first[:4] != b"OggS":
        return None
    serial = first[14:18]
    nseg = first[26]
    packet = first[27 + nseg:]
    if packet.startswith(b"OpusHead") and len(packet) >= 12:
        rate, skip = 48000, int.from_bytes(packet[10:12], "little")
    elif packet.startswith(b"\x01vorbis") and len(packet) >= 16:
        rate, skip = int.from_bytes(packet[12:16], "little"), 0
    elif packet.startswith(b"Speex   ") and len(packet) >= 40:
        rate, skip = int.from_bytes(packet[36:40], "little"), 0
    else:
        return None
    if not rate:
        return None
    # the last page of this stream with a granule position and a good checksum, found
    # backwards in the last 192 KiB (a page is at most 65307 bytes)
    tail_at = max(0, size - 3 * 65536)
    tail = _read(f, tail_at, size - tail_at)
    end = len(tail)
    for _ in range(10_000):
        i = tail.rfind(b"OggS", 0, end)
        if i < 0:
            return None
        end = i
        if i + 27 > len(tail) or tail[i + 4] != 0 or tail[i + 14:i + 18] != serial:
            continue
        granule = int.from_bytes(tail[i + 6:i + 14], "little", signed=True)
        n = tail[i + 26]
        if granule < 0 or i + 27 + n > len(tail):
            continue
        plen = 27 + n + sum(tail[i + 27:i + 27 + n])
        page = tail[i:i + plen]
        if len(page) < plen or ogg_crc(page) != int.from_bytes(page[22:26], "little"):
            continue
        return max(0, granule - skip) * 1000 // rate
    return None


def _matroska(f: BinaryIO, size: int) -> int | None:
    h = f.read(65536)
    top = ebml_children(h, 0, len(h))
    for eid, s, e in top:
        if eid != 0x18538067:  # Segment
            continue
        for cid, cs, ce in ebml_children(h, s, e):
            if cid != 0x1549A966:  # Info
                continue
            scale, duration = 1_000_000, None
            for iid, i_s, i_e in ebml_children(h, cs, ce):
                if iid == 0x2AD7B1 and 0 < i_e - i_s <= 8:  # TimecodeScale (ns)
                    scale = int.from_bytes(h[i_s:i_e], "big")
                elif iid == 0x4489 and i_e - i_s in (4, 8):  # Duration (float, in TimecodeScale units)
                    duration = struct.unpack(">f" if i_e - i_s == 4 else ">d", h[i_s:i_e])[0]
            if duration is None or not math.isfinite(duration) or duration <= 0 or duration > 1e15:
                return None  # MediaRecorder's WebM has none
            return int(duration * scale / 1_000_000)
        return None
    return None


_AUDIO: dict[Sniffed, Callable[[BinaryIO, int], int | None]] = {
    sniff.WAV: _wav, sniff.MP3: _mp3, sniff.AAC: _aac, sniff.M4A: _mp4_duration, sniff.MP4: _mp4_duration,
    sniff.MOV: _mp4_duration, sniff.THREE_GP: _mp4_duration, sniff.AMR: _amr, sniff.AMR_WB: _amr, sniff.OPUS: _ogg,
    sniff.OGG: _ogg, sniff.SILK: _silk, sniff.FLAC: _flac, sniff.WEBM_AUDIO: _matroska, sniff.MKA: _matroska,
    sniff.WEBM: _matroska, sniff.MKV: _matroska,
}


def audio_duration_ms(path: str | os.PathLike[str], sniffed: Sniffed) -> int | None:
    """The duration in ms of the audio at ``path`` whose type is ``sniffed`` (from
    :func:`gateway.media.sniff.detect`), computed from the content:

    - WAV: data chunk size / the fmt chunk's byte rate (a streamed WAV whose header
      says 0 or ~0: the bytes after the data chunk header; RF64's ds64);
    - MP3: the Xing/Info or VBRI frame count when the first frame has one, else the
      frames walked (ID3v2 skipped, junk between frames resynced, ID3v1/APE ends it);
    - AAC ADTS: frames x raw blocks x 1024 / sample rate;
    - M4A/MP4/MOV: the ``mvhd`` duration / timescale (version 0 or 1; ``mehd`` for a
      fragmented file);
    - AMR-NB/WB: frames x 20 ms; SILK v3 (WeChat): frames x 20 ms;
    - Ogg: the last page's granule position (of the first stream, checksum verified)
      / 48000 less the pre-skip for Opus, / the rate for Vorbis and Speex;
    - FLAC: STREAMINFO total samples / rate; WebM/Matroska: the ``Info`` Duration.

    None when it cannot tell (a type not listed, a header without the numbers, no
    frames); :class:`ProbeError` when the file cannot be read."""
    parse = _AUDIO.get(sniffed)
    if parse is None:
        return None
    try:
        with open(path, "rb") as f:
            ms = parse(f, os.fstat(f.fileno()).st_size)
            return ms if ms is None or ms >= 0 else None
    except Exception as e:
        raise ProbeError(f"cannot read the audio: {type(e).__name__}: {e}") from None
