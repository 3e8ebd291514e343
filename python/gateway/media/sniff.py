"""What an upload is, from its first bytes (magic numbers), never from its name or the
MIME type the client declared.

:func:`detect` looks at no more than :data:`HEAD_BYTES` bytes from the start of the file
and returns a :class:`Sniffed` (or None: not a type this module knows). :data:`KINDS` and
:func:`allowed` say which detected types each upload kind (image, voice, video, file)
accepts. Executables and scripts are recognised explicitly (family ``"executable"``) and
no kind accepts them: a PE/MZ, ELF or Mach-O binary, a Java class, a JAR/APK/DEX, a
WebAssembly module, an MSI installer (OLE2 with the installer CLSID, when the directory is
within the head), a Windows shortcut and a ``#!`` script.

Pure functions on bytes: no I/O, no exceptions on hostile input (every offset is
bounds-checked), cost linear in ``len(head)``.
"""

from __future__ import annotations

import codecs
import zlib
from typing import NamedTuple

#: How many bytes from the start of a file :func:`detect` needs (it reads no further).
#: 4 KiB covers an ID3v2 tag's start and the first MPEG frame after a small one, the
#: first local headers of a ZIP (and the deflated ``[Content_Types].xml`` of an OOXML
#: file, written first), the ``Tracks`` element of a WebM from a browser's
#: MediaRecorder, the OLE2 directory when it is the first sector, and the ``moov`` of a
#: short "fast start" MP4 (to tell audio-only from video).
HEAD_BYTES = 4096

FAMILIES = frozenset({"image", "audio", "video", "document", "archive", "text", "executable"})


class Sniffed(NamedTuple):
    """A detected type: ``mime`` (what to serve it as), ``ext`` (a file name extension
    without the dot) and ``family``: image, audio, video, document, archive, text, or
    executable (refused by every kind)."""

    mime: str
    ext: str
    family: str

    @property
    def refused(self) -> bool:
        """An executable or a script: never accepted."""
        return self.family == "executable"


def _t(mime: str, ext: str, family: str) -> Sniffed:
    return Sniffed(mime, ext, family)


# ---- the types -------------------------------------------------------------------------
JPEG = _t("image/jpeg", "jpg", "image")
PNG = _t("image/png", "png", "image")
GIF = _t("image/gif", "gif", "image")
WEBP = _t("image/webp", "webp", "image")
BMP = _t("image/bmp", "bmp", "image")
HEIC = _t("image/heic", "heic", "image")
HEIF = _t("image/heif", "heif", "image")
AVIF = _t("image/avif", "avif", "image")
TIFF = _t("image/tiff", "tif", "image")
SVG = _t("image/svg+xml", "svg", "image")

MP3 = _t("audio/mpeg", "mp3", "audio")
AAC = _t("audio/aac", "aac", "audio")
M4A = _t("audio/mp4", "m4a", "audio")
WAV = _t("audio/wav", "wav", "audio")
AMR = _t("audio/amr", "amr", "audio")
AMR_WB = _t("audio/amr-wb", "awb", "audio")
OPUS = _t("audio/ogg", "opus", "audio")  # Ogg Opus
OGG = _t("audio/ogg", "ogg", "audio")  # Ogg Vorbis, Speex, FLAC
SILK = _t("audio/silk", "silk", "audio")  # WeChat voice (SILK v3)
FLAC = _t("audio/flac", "flac", "audio")
WEBM_AUDIO = _t("audio/webm", "weba", "audio")
MKA = _t("audio/x-matroska", "mka", "audio")

MP4 = _t("video/mp4", "mp4", "video")
MOV = _t("video/quicktime", "mov", "video")
THREE_GP = _t("video/3gpp", "3gp", "video")
WEBM = _t("video/webm", "webm", "video")
MKV = _t("video/x-matroska", "mkv", "video")
AVI = _t("video/x-msvideo", "avi", "video")
OGV = _t("video/ogg", "ogv", "video")

PDF = _t("application/pdf", "pdf", "document")
RTF = _t("application/rtf", "rtf", "document")
DOC = _t("application/msword", "doc", "document")
XLS = _t("application/vnd.ms-excel", "xls", "document")
PPT = _t("application/vnd.ms-powerpoint", "ppt", "document")
OLE2 = _t("application/x-ole-storage", "ole", "document")  # doc/xls/ppt whose directory is past the head
DOCX = _t("application/vnd.openxmlformats-officedocument.wordprocessingml.document", "docx", "document")
XLSX = _t("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx", "document")
PPTX = _t("application/vnd.openxmlformats-officedocument.presentationml.presentation", "pptx", "document")
DOCM = _t("application/vnd.ms-word.document.macroEnabled.12", "docm", "document")
XLSM = _t("application/vnd.ms-excel.sheet.macroEnabled.12", "xlsm", "document")
PPTM = _t("application/vnd.ms-powerpoint.presentation.macroEnabled.12", "pptm", "document")
ODT = _t("application/vnd.oasis.opendocument.text", "odt", "document")
ODS = _t("application/vnd.oasis.opendocument.spreadsheet", "ods", "document")
ODP = _t("application/vnd.oasis.opendocument.presentation", "odp", "document")
EPUB = _t("application/epub+zip", "epub", "document")

ZIP = _t("application/zip", "zip", "archive")
SEVEN_Z = _t("application/x-7z-compressed", "7z", "archive")
RAR = _t("application/vnd.rar", "rar", "archive")
GZIP = _t("application/gzip", "gz", "archive")
BZIP2 = _t("application/x-bzip2", "bz2", "archive")
XZ = _t("application/x-xz", "xz", "archive")
TAR = _t("application/x-tar", "tar", "archive")

TEXT = _t("text/plain", "txt", "text")
HTML = _t("text/html", "html", "text")
XML = _t("application/xml", "xml", "text")

EXE = _t("application/vnd.microsoft.portable-executable", "exe", "executable")
ELF = _t("application/x-elf", "elf", "executable")
MACHO = _t("application/x-mach-binary", "macho", "executable")
JAVA_CLASS = _t("application/java-vm", "class", "executable")
JAR = _t("application/java-archive", "jar", "executable")
APK = _t("application/vnd.android.package-archive", "apk", "executable")
DEX = _t("application/x-dex", "dex", "executable")
WASM = _t("application/wasm", "wasm", "executable")
MSI = _t("application/x-msi", "msi", "executable")
LNK = _t("application/x-ms-shortcut", "lnk", "executable")
SCRIPT = _t("text/x-script", "sh", "executable")

#: Image types Pillow decodes (a thumbnail and the size come from Pillow).
THUMBNAILABLE = frozenset({JPEG.mime, PNG.mime, GIF.mime, WEBP.mime, BMP.mime})

#: What each upload kind accepts, by detected MIME type. HEIC/HEIF/AVIF images are
#: accepted without a thumbnail (:func:`gateway.media.probe.probe_image` still reads
#: their size from the ``ispe`` box). ``file`` takes documents, archives, plain text,
#: images, audio and video, but not active content a browser would run if it were
#: ever served inline (HTML, SVG, XML) nor Office documents with macros.
KINDS: dict[str, frozenset[str]] = {
    "image": THUMBNAILABLE | {HEIC.mime, HEIF.mime, AVIF.mime},
    "voice": frozenset(t.mime for t in (MP3, AAC, M4A, WAV, AMR, AMR_WB, OPUS, OGG, SILK, FLAC, WEBM_AUDIO, MKA)),
    "video": frozenset(t.mime for t in (MP4, MOV, THREE_GP, WEBM, MKV, AVI, OGV)),
}
KINDS["file"] = (
    KINDS["image"] | KINDS["voice"] | KINDS["video"] | {TIFF.mime}
    | frozenset(t.mime for t in (PDF, RTF, DOC, XLS, PPT, OLE2, DOCX, XLSX, PPTX, ODT, ODS, ODP, EPUB))
    | frozenset(t.mime for t in (ZIP, SEVEN_Z, RAR, GZIP, BZIP2, XZ, TAR))
    | {TEXT.mime}
)


def allowed(kind: str, sniffed: Sniffed | None) -> bool:
    """Whether an upload of ``kind`` (image, voice, video, file) may be ``sniffed``.
    Unknown kinds, undetected content and executables are never allowed."""
    if sniffed is None or sniffed.refused:
        return False
    return sniffed.mime in KINDS.get(kind, frozenset())


def kind_of(sniffed: Sniffed) -> str | None:
    """The upload kind to use when the client named none: image (a decodable image),
    voice (audio), video, else file; None for what no kind accepts."""
    for kind in ("image", "voice", "video", "file"):
        if allowed(kind, sniffed):
            return kind
    return None


# ---- helpers ---------------------------------------------------------------------------

def _u16le(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 2], "little") if o + 2 <= len(b) else -1


def _u32le(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 4], "little") if o + 4 <= len(b) else -1


def _u32be(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 4], "big") if o + 4 <= len(b) else -1


# MPEG audio (MP3) frame headers --------------------------------------------------------
_MPEG_BITRATES = {  # kbit/s by (version is MPEG-1, layer) for bitrate index 0..14
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


class MpegFrame(NamedTuple):
    """One MPEG-1/2/2.5 audio frame header: its length in bytes (with the header),
    samples per frame, sample rate, whether it is MPEG-1 and whether it is mono."""

    length: int
    samples: int
    rate: int
    mpeg1: bool
    mono: bool


def mpeg_frame(h: bytes, o: int = 0) -> MpegFrame | None:
    """The MPEG audio frame header at ``h[o:o+4]``, or None when those bytes are not one
    (free-format bitrates are not accepted)."""
    if o + 4 > len(h) or h[o] != 0xFF or h[o + 1] & 0xE0 != 0xE0:
        return None
    version = (h[o + 1] >> 3) & 3  # 0: 2.5, 1: reserved, 2: MPEG-2, 3: MPEG-1
    layer = 4 - ((h[o + 1] >> 1) & 3)  # 4 = reserved
    br_index = h[o + 2] >> 4
    sr_index = (h[o + 2] >> 2) & 3
    if version == 1 or layer == 4 or br_index in (0, 15) or sr_index == 3:
        return None
    mpeg1 = version == 3
    bitrate = _MPEG_BITRATES[(mpeg1, layer)][br_index] * 1000
    rate = _MPEG_RATES[version][sr_index]
    pad = (h[o + 2] >> 1) & 1
    if layer == 1:
        length, samples = (12 * bitrate // rate + pad) * 4, 384
    elif layer == 2 or mpeg1:
        length, samples = 144 * bitrate // rate + pad, 1152
    else:
        length, samples = 72 * bitrate // rate + pad, 576
    return MpegFrame(length, samples, rate, mpeg1, (h[o + 3] >> 6) == 3)


ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


class AdtsFrame(NamedTuple):
    """One AAC ADTS frame header: frame length in bytes (with the header), sample rate,
    and the number of raw data blocks (1024 samples each) in the frame."""

    length: int
    rate: int
    blocks: int


def adts_frame(h: bytes, o: int = 0) -> AdtsFrame | None:
    """The ADTS header at ``h[o:o+7]``, or None."""
    if o + 7 > len(h) or h[o] != 0xFF or h[o + 1] & 0xF6 != 0xF0:
        return None
    sf = (h[o + 2] >> 2) & 0x0F
    if sf >= len(ADTS_RATES):
        return None
    length = ((h[o + 3] & 0x03) << 11) | (h[o + 4] << 3) | (h[o + 5] >> 5)
    header = 7 if h[o + 1] & 1 else 9
    if length < header:
        return None
    return AdtsFrame(length, ADTS_RATES[sf], (h[o + 6] & 0x03) + 1)


def id3v2_size(h: bytes) -> int:
    """The total size of the ID3v2 tag at the start of ``h`` (header and footer
    included), 0 when there is none."""
    if len(h) < 10 or h[:3] != b"ID3" or h[3] == 0xFF or h[4] == 0xFF or any(b & 0x80 for b in h[6:10]):
        return 0
    size = (h[6] << 21) | (h[7] << 14) | (h[8] << 7) | h[9]
    return 10 + size + (10 if h[5] & 0x10 else 0)


def _mpeg_audio(h: bytes, o: int, id3: bool) -> Sniffed | None:
    if o >= len(h):
        return MP3 if id3 else None  # an ID3 tag larger than the head: MP3 is what carries them
    if (fr := mpeg_frame(h, o)) is not None:
        nxt = o + fr.length
        if nxt + 4 <= len(h):  # the next frame is within the head: it must be one too
            nf = mpeg_frame(h, nxt)
            if nf is None or nf.rate != fr.rate:
                return None
        return MP3
    if (af := adts_frame(h, o)) is not None:
        nxt = o + af.length
        if nxt + 7 <= len(h) and adts_frame(h, nxt) is None:
            return None
        return AAC
    return None


# ISO base media (MP4, MOV, M4A, HEIF) ----------------------------------------------------
_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"mif2"}
_AVIF_BRANDS = {b"avif", b"avis"}
_M4A_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}


def _ftyp(h: bytes) -> Sniffed | None:
    size = _u32be(h, 0)
    if size < 16 or h[4:8] != b"ftyp":
        return None
    major = h[8:12]
    brands = [major] + [h[i:i + 4] for i in range(16, min(size, len(h)) - 3, 4)]
    for b in brands:  # the major brand first, then the compatible ones in order
        if b in _AVIF_BRANDS:
            return AVIF
        if b in _HEIC_BRANDS:
            return HEIC
        if b in _HEIF_BRANDS:
            # "mif1" is also listed by AVIF/HEIC files whose major brand says which
            rest = set(brands)
            return AVIF if rest & _AVIF_BRANDS else HEIC if rest & _HEIC_BRANDS else HEIF
        if b in _M4A_BRANDS:
            return M4A
        if b == b"qt  ":
            return MOV
        if b[:3] in (b"3gp", b"3g2"):
            return _mp4_tracks(h, size, THREE_GP)
        if b in (b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"dash", b"MSNV", b"mmp4", b"f4v ", b"M4V ", b"M4VH", b"M4VP", b"XAVC", b"NDAS"):
            return _mp4_tracks(h, size, MP4)
    return None


def _mp4_tracks(h: bytes, start: int, video: Sniffed) -> Sniffed:
    """Audio-only (M4A) when the ``moov`` is within the head and has a sound track and
    no video track; else the video type."""
    handlers = set()
    i = h.find(b"hdlr", start)
    while i != -1 and i + 16 <= len(h):
        handlers.add(h[i + 12:i + 16])
        i = h.find(b"hdlr", i + 4)
    if b"soun" in handlers and b"vide" not in handlers:
        return M4A
    return video


# EBML (Matroska, WebM) --------------------------------------------------------------------

def _vint(h: bytes, o: int, keep_marker: bool) -> tuple[int, int] | None:
    """An EBML variable-size integer at ``o``: (value, next offset); the value is -1
    for an unknown size (all ones)."""
    if o >= len(h) or h[o] == 0:
        return None
    first = h[o]
    n = 8 - first.bit_length() + 1
    if o + n > len(h):
        return None
    v = first if keep_marker else first & ((1 << (8 - n)) - 1)
    for b in h[o + 1:o + n]:
        v = (v << 8) | b
    if not keep_marker and v == (1 << (7 * n)) - 1:
        return -1, o + n
    return v, o + n


def ebml_children(h: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(id, data start, data end) of the elements in ``h[start:end]`` (end clipped to
    the head; an unknown size runs to ``end``)."""
    out: list[tuple[int, int, int]] = []
    o = start
    end = min(end, len(h))
    while o < end and len(out) < 512:
        i = _vint(h, o, True)
        if i is None:
            break
        eid, o = i
        s = _vint(h, o, False)
        if s is None:
            break
        size, o = s
        stop = end if size < 0 else min(o + size, end)
        out.append((eid, o, stop))
        if size < 0 or o + size > end:
            break
        o += size
    return out


def _matroska(h: bytes) -> Sniffed | None:
    top = ebml_children(h, 0, len(h))
    if not top or top[0][0] != 0x1A45DFA3:
        return None
    doctype = b""
    for eid, s, e in ebml_children(h, top[0][1], top[0][2]):
        if eid == 0x4282:
            doctype = h[s:e]
    if doctype not in (b"webm", b"matroska"):
        return None
    types: set[int] = set()
    for eid, s, e in top[1:]:
        if eid != 0x18538067:  # Segment
            continue
        for cid, cs, ce in ebml_children(h, s, e):
            if cid == 0x1654AE6B:  # Tracks
                for tid, ts, te in ebml_children(h, cs, ce):
                    if tid == 0xAE:  # TrackEntry
                        for fid, fs, fe in ebml_children(h, ts, te):
                            if fid == 0x83 and fe - fs <= 8:  # TrackType
                                types.add(int.from_bytes(h[fs:fe], "big"))
            elif cid == 0x1F43B675:  # Cluster: the tracks come before it
                break
    audio_only = types and 2 in types and 1 not in types
    if doctype == b"webm":
        return WEBM_AUDIO if audio_only else WEBM
    return MKA if audio_only else MKV


# ZIP and the formats built on it ---------------------------------------------------------

def _zip_entries(h: bytes) -> list[tuple[str, bytes, int, int]]:
    """(name, data visible in the head, compression method, flags) of the local file
    headers within the head."""
    out: list[tuple[str, bytes, int, int]] = []
    o = 0
    while o + 30 <= len(h) and h[o:o + 4] == b"PK\x03\x04" and len(out) < 64:
        flags, method = _u16le(h, o + 6), _u16le(h, o + 8)
        csize, nlen, elen = _u32le(h, o + 18), _u16le(h, o + 26), _u16le(h, o + 28)
        name = h[o + 30:o + 30 + nlen].decode("utf-8", "replace")
        data_at = o + 30 + nlen + elen
        if flags & 0x08 and csize == 0:  # sizes in a data descriptor after the data
            nxt = h.find(b"PK\x03\x04", data_at)
            out.append((name, h[data_at:nxt if nxt >= 0 else len(h)], method, flags))
            if nxt < 0:
                break
            o = nxt
            continue
        out.append((name, h[data_at:data_at + csize], method, flags))
        o = data_at + csize
    return out


_OOXML_MAIN = (
    (b"wordprocessingml.document.main", DOCX), (b"spreadsheetml.sheet.main", XLSX),
    (b"presentationml.presentation.main", PPTX), (b"presentationml.slideshow.main", PPTX),
    (b"ms-word.document.macroEnabled.main", DOCM), (b"ms-excel.sheet.macroEnabled.main", XLSM),
    (b"ms-powerpoint.presentation.macroEnabled.main", PPTM),
)
_ODF = {b"application/vnd.oasis.opendocument.text": ODT, b"application/vnd.oasis.opendocument.spreadsheet": ODS,
        b"application/vnd.oasis.opendocument.presentation": ODP, b"application/epub+zip": EPUB}


def _zip(h: bytes) -> Sniffed:
    entries = _zip_entries(h)
    names = [e[0] for e in entries]
    odf = _ODF.get(entries[0][1].strip()) if names and names[0] == "mimetype" and entries[0][2] == 0 else None
    if odf is not None:  # ODF and EPUB: a stored "mimetype" entry first
        return odf
    if any(n in ("AndroidManifest.xml", "classes.dex") for n in names):
        return APK
    if any(n == "META-INF/MANIFEST.MF" for n in names[:3]):
        return JAR
    for name, data, method, _flags in entries:
        if name == "[Content_Types].xml":
            xml = data
            if method == 8:
                try:
                    xml = zlib.decompressobj(-15).decompress(data, 65536)
                except zlib.error:
                    xml = b""
            for marker, t in _OOXML_MAIN:
                if marker in xml:
                    return t
    for prefix, t in (("word/", DOCX), ("xl/", XLSX), ("ppt/", PPTX)):
        if any(n.startswith(prefix) for n in names):
            return t
    return ZIP


# OLE2 compound files (doc, xls, ppt, msi) -------------------------------------------------
_MSI_CLSIDS = {  # {000C1084-...} installer, {000C1086-...} patch, {000C1082-...} transform
    bytes.fromhex(x + "00000000c000000000000046") for x in ("84100c00", "86100c00", "82100c00")
}


def _ole2(h: bytes) -> Sniffed:
    shift = _u16le(h, 0x1E)
    first_dir = _u32le(h, 0x30)
    if shift not in (9, 12) or first_dir < 0 or first_dir >= 0xFFFFFFFA:
        return OLE2
    sector = 1 << shift
    at = (first_dir + 1) * sector
    names: set[str] = set()
    for e in range(at, min(at + sector, len(h)) - 127, 128):
        nlen = _u16le(h, e + 0x40)
        name = h[e:e + max(0, min(nlen, 64) - 2)].decode("utf-16-le", "replace")
        if h[e + 0x42] == 5 and h[e + 0x50:e + 0x60] in _MSI_CLSIDS:  # root entry
            return MSI
        names.add(name)
    if "WordDocument" in names:
        return DOC
    if names & {"Workbook", "Book"}:
        return XLS
    if "PowerPoint Document" in names:
        return PPT
    return OLE2


# text -------------------------------------------------------------------------------------
_CONTROL_OK = frozenset("\t\n\r\f\v\x1a\x1b")


def _text(h: bytes) -> Sniffed | None:
    if h.startswith(codecs.BOM_UTF8):
        enc, body = "utf-8", h[3:]
    elif h.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        enc, body = "utf-16", h
    else:
        if b"\x00" in h:
            return None
        enc, body = "utf-8", h
    try:
        # final=False: the head may end inside a multi-byte character
        s = codecs.getincrementaldecoder(enc)("strict").decode(body, final=False)
    except UnicodeDecodeError:
        return None
    if any((c < " " and c not in _CONTROL_OK) or c == "\x7f" for c in s):
        return None
    if not s.strip():
        return TEXT if s else None
    start = s.lstrip().lower()
    if start.startswith("<?xml"):
        return SVG if "<svg" in start else HTML if "<html" in start else XML
    if start.startswith("<svg"):
        return SVG
    if start.startswith(("<!doctype html", "<html", "<head", "<body", "<script", "<iframe")):
        return HTML
    return TEXT


# ---- detect ------------------------------------------------------------------------------

def detect(head: bytes) -> Sniffed | None:
    """The type of a file whose first bytes are ``head`` (at least :data:`HEAD_BYTES`
    of them, or the whole file when it is shorter; bytes past that are ignored). None
    when the content is of no type this module knows (including an empty file)."""
    h = bytes(head[:HEAD_BYTES])
    if not h:
        return None
    m4 = h[:4]
    # images
    if h.startswith(b"\xff\xd8\xff"):
        return JPEG
    if h.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if h.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if m4 in (b"RIFF", b"RF64") and len(h) >= 12:
        form = h[8:12]
        if form == b"WEBP" and m4 == b"RIFF":
            return WEBP
        if form == b"WAVE":
            return WAV
        if form == b"AVI ":
            return AVI
        return None
    if h.startswith(b"BM") and len(h) >= 18 and _u32le(h, 14) in (12, 16, 40, 52, 56, 64, 108, 124) and h[6:10] == b"\0\0\0\0":
        return BMP
    if h.startswith((b"II*\x00", b"MM\x00*")):
        return TIFF
    if h[4:8] == b"ftyp":
        return _ftyp(h)
    # executables (before the text and shebang checks)
    if h.startswith(b"MZ"):
        return EXE
    if h.startswith(b"\x7fELF"):
        return ELF
    if m4 in (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbf", b"\xbf\xba\xfe\xca"):
        return MACHO
    if m4 == b"\xca\xfe\xba\xbe":
        # a fat Mach-O (a small count of architectures) or a Java class (major version >= 45)
        return JAVA_CLASS if _u32be(h, 4) & 0xFFFF >= 45 else MACHO
    if h.startswith(b"\x00asm"):
        return WASM
    if h.startswith(b"dex\n") and h[7:8] == b"\x00":
        return DEX
    if h.startswith(b"L\x00\x00\x00\x01\x14\x02\x00"):
        return LNK
    # audio with text-like magics
    if h.startswith(b"#!AMR-WB\n"):
        return AMR_WB
    if h.startswith((b"#!AMR\n", b"#!AMR_MC1.0\n")):
        return AMR
    if h.startswith((b"#!SILK_V3", b"\x02#!SILK_V3")):
        return SILK
    if h.startswith(b"#!"):
        return SCRIPT
    # audio, video
    if h.startswith(b"OggS"):
        return _ogg(h)
    if h.startswith(b"fLaC"):
        return FLAC
    if h.startswith(b"\x1a\x45\xdf\xa3"):
        return _matroska(h)
    if ((n := id3v2_size(h)) or h[0] == 0xFF) and (t := _mpeg_audio(h, n, bool(n))) is not None:
        return t
    # documents, archives
    if h.startswith(b"%PDF-"):
        return PDF
    if h.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip(h)
    if h.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return _ole2(h)
    if h.startswith(b"{\\rtf"):
        return RTF
    if h.startswith(b"7z\xbc\xaf\x27\x1c"):
        return SEVEN_Z
    if h.startswith((b"Rar!\x1a\x07\x00", b"Rar!\x1a\x07\x01\x00")):
        return RAR
    if h.startswith(b"\x1f\x8b\x08"):
        return GZIP
    if h.startswith(b"BZh") and len(h) >= 10 and h[3:4] in b"123456789" and h[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return BZIP2
    if h.startswith(b"\xfd7zXZ\x00"):
        return XZ
    if len(h) >= 262 and h[257:262] == b"ustar":
        return TAR
    return _text(h)


def _ogg(h: bytes) -> Sniffed | None:
    if len(h) < 27 or h[4] != 0:
        return None
    nseg = h[26]
    first = h[27 + nseg:27 + nseg + 16]
    if first.startswith(b"OpusHead"):
        return OPUS
    if first.startswith((b"\x01vorbis", b"Speex   ", b"\x7fFLAC")):
        return OGG
    if first.startswith(b"\x80theora"):
        return OGV
    return None
