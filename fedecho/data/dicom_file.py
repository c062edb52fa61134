"""One DICOM file read, whatever folder it lies in (its header walked and checked, its frames decoded to uint8).

Kept apart from the archive source (fedecho.data.dicom, which walks a folder and joins labels) because
the archive scan, site ingest and prediction all read single files, and read them the same way.
Multi-frame ultrasound cines in every encoding scanners and PACS exports write: native (implicit/explicit
VR, little/big endian, deflated), RLE, JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000 and HTJ2K
through pydicom and its plugins, and the MPEG-2, H.264 and HEVC video transfer syntaxes through PyAV.
Files without the 128-byte preamble or without File Meta Information (old PACS exports) are recognised
by their content and their transfer syntax inferred. Frames can be cropped to the 2-D tissue region the
scanner declares (Sequence of Ultrasound Regions), which also drops burned-in annotations around it.

A file that cannot be used gets the reason that tells what it is (a still, a 3-D volume, cut
short, a codestream that is damaged, ...). Details name tags, codecs and counts, never header
values: those can hold patient data.
"""

from __future__ import annotations

import io
import itertools
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom import datadict
from pydicom import uid as uids
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.tag import Tag
from pydicom.uid import UID

from fedecho.data.records import BadFile, Reason
from fedecho.data.source import parse_float

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_SOP_CLASSES = {
    US_MULTIFRAME,
    "1.2.840.10008.5.1.4.1.1.3",
    "1.2.840.10008.5.1.4.1.1.6.1",
    "1.2.840.10008.5.1.4.1.1.6",
}
ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
NOT_DICOM_SUFFIXES = {
    ".csv",
    ".txt",
    ".json",
    ".md",
    ".xml",
    ".html",
    ".pdf",
    ".zip",
    ".gz",
    ".py",
    ".toml",
    ".log",
    ".npy",
}

MAX_SIDE = 8192  # rows/columns: larger is not an echo cine (and would exhaust memory decoding it)
MIN_SIDE = 8
MAX_FRAMES = 20_000
MAX_DECODED_BYTES = 16 << 30  # a whole decoded cine must fit in memory at ingest

# The video transfer syntaxes pydicom knows (it decodes none of them): FFmpeg decoder for each.
VIDEO_CODECS: dict[str, str] = {
    **dict.fromkeys((uids.MPEG2MPML, uids.MPEG2MPMLF, uids.MPEG2MPHL, uids.MPEG2MPHLF), "mpeg2video"),
    **dict.fromkeys(
        (
            uids.MPEG4HP41,
            uids.MPEG4HP41F,
            uids.MPEG4HP41BD,
            uids.MPEG4HP41BDF,
            uids.MPEG4HP422D,
            uids.MPEG4HP422DF,
            uids.MPEG4HP423D,
            uids.MPEG4HP423DF,
            uids.MPEG4HP42STEREO,
            uids.MPEG4HP42STEREOF,
        ),
        "h264",
    ),
    **dict.fromkeys((uids.HEVCMP51, uids.HEVCM10P51), "hevc"),
}
JPEG_FAMILY = frozenset({*uids.JPEGTransferSyntaxes, *uids.JPEGLSTransferSyntaxes})
J2K_FAMILY = frozenset({uids.JPEG2000Lossless, uids.JPEG2000, uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL, uids.HTJ2K})
# Photometric interpretations a cine can be decoded from, and those DICOM allows but this reader does not.
PHOTOMETRIC_SAMPLES = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_PARTIAL_420": 3,
    "YBR_RCT": 3,
    "YBR_ICT": 3,
}
UNSUPPORTED_PHOTOMETRIC = {"YBR_PARTIAL_422", "ARGB", "CMYK", "HSV", "XYB"}
MODALITIES = {"US", "CT", "MR", "CR", "DX", "MG", "NM", "PT", "XA", "RF", "OT", "SR", "SC", "ECG", "IVUS", "OP", "XC"}

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_KEYWORDS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_MAX_DEPTH = 32
_SNIFF_BYTES = 4096  # the first elements of a data set; detection reads this much of every candidate


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def codec_label(ts: str) -> str:
    """A transfer syntax by name and UID: what the details of decoding problems name."""
    uid = UID(ts)
    return f"{uid.name} ({uid})" if uid.is_transfer_syntax else "a transfer syntax pydicom does not know"


def _plugin_label(ts: UID) -> str:
    """The packages that decode ts, as the detail of a decoding problem names them."""
    if VIDEO_CODECS.get(ts):
        return f"PyAV (FFmpeg {VIDEO_CODECS[ts]})"
    if not ts.is_compressed:
        return "pydicom"
    names = []
    for plugin in get_decoder(ts).available_plugins:
        if plugin == "pylibjpeg":
            names.append(
                "pylibjpeg-openjpeg"
                if ts in J2K_FAMILY
                else "pylibjpeg-rle"
                if ts == uids.RLELossless
                else "pylibjpeg-libjpeg"
            )
        else:
            names.append({"pillow": "Pillow", "gdcm": "GDCM", "pydicom": "pydicom (RLE)"}.get(plugin, plugin))
    return " or ".join(names) or "no installed plugin"


# ---------------------------------------------------------------------------------------------
# Recognising a DICOM data set by its content (no preamble, no File Meta Information)


def _probe(buf: bytes, implicit: bool, little: bool, size: int) -> bool:
    """Whether buf starts with data set elements in this encoding: a known first tag, tags in
    ascending order, valid VRs, lengths that fit the file. Three elements (or the end) suffice."""
    e = "<" if little else ">"
    pos, last, seen = 0, -1, 0
    while seen < 3:
        if pos == size and seen:
            return True
        if pos + 12 > len(buf):
            return seen >= 2 and pos < size  # the next element lies past what was read
        group, elem = struct.unpack_from(f"{e}HH", buf, pos)
        tag = group << 16 | elem
        if tag <= last or group in (0x0000, 0x0002, 0xFFFE):
            return False
        known = datadict.dictionary_has_tag(tag) or (elem == 0 and group % 2 == 0)  # or a group length
        if seen == 0 and not (group % 2 == 0 and 0x0008 <= group <= 0x0028 and known):
            return False
        if implicit:
            (length,) = struct.unpack_from(f"{e}L", buf, pos + 4)
            header = 8
        else:
            vr = buf[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                (length,) = struct.unpack_from(f"{e}L", buf, pos + 8)
                header = 12
            elif vr in _SHORT_VRS:
                (length,) = struct.unpack_from(f"{e}H", buf, pos + 6)
                header = 8
            else:
                return False
        if length == _UNDEFINED:  # a sequence: its first item (or its end) must follow
            nxt = buf[pos + header : pos + header + 4]
            if len(nxt) < 4:
                return False
            item_group, item_elem = struct.unpack(f"{e}HH", nxt)
            return seen >= 1 and item_group << 16 | item_elem in (_ITEM, _SEQ_END)
        pos += header + length
        if pos > size:
            return False
        last, seen = tag, seen + 1
    return True


def _sniff_encoding(buf: bytes, size: int) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a data set that starts buf, or None when it does not start like one."""
    for implicit, little in ((False, True), (True, True), (False, False)):
        if _probe(buf, implicit, little, size):
            return implicit, little
    return None


def looks_like_dicom(path: Path) -> bool:
    """The 'DICM' prefix, or File Meta Information or a data set at the start of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if head[:2] == b"\x02\x00" and head[4:6] in _LONG_VRS | _SHORT_VRS:
        return True
    return _sniff_encoding(head, size) is not None


# ---------------------------------------------------------------------------------------------
# Walking the elements: truncation, nested sequences of undefined length, where the pixels lie


@dataclass(frozen=True)
class PixelLayout:
    """Where the top-level pixel data element lies in the data set stream."""

    tag: int
    vr: str | None  # None in implicit VR
    offset: int  # first byte of the value
    length: int | None  # native value length; None when encapsulated
    end: int  # first byte after the element (after the sequence delimiter when encapsulated)
    fragments: tuple[tuple[int, int], ...] = ()  # encapsulated: (offset, length) of each item after the offset table
    heads: tuple[bytes, ...] = ()  # encapsulated: the first bytes of each fragment
    offset_table_entries: int = 0

    @property
    def encapsulated(self) -> bool:
        return self.length is None

    @property
    def keyword(self) -> str:
        return _PIXEL_KEYWORDS[self.tag]


class _Cut(Exception):
    """The file ends inside an element: an interrupted copy."""


class _Malformed(Exception):
    """The element structure makes no sense (not a cut: the bytes are there)."""


class _Walker:
    """Reads element headers only, seeking past values, so a cine of any size walks in milliseconds.

    pydicom reads a cut file without complaint (it returns the short value), so the declared
    lengths are compared with the stream size here.
    """

    def __init__(self, fp: BinaryIO, size: int):
        self.fp, self.size = fp, size
        self.pixels: PixelLayout | None = None

    def _read(self, n: int, where: str) -> bytes:
        b = self.fp.read(n)
        if len(b) < n:
            raise _Cut(f"the file ends inside {where}")
        return b

    def _skip(self, length: int, where: str) -> None:
        pos = self.fp.tell()
        if pos + length > self.size:
            raise _Cut(f"the file ends inside {where}")
        self.fp.seek(pos + length)

    def _trailing_zeros(self, pos: int) -> bool:
        """Zero padding from pos to the end of the file (some writers pad the last block)."""
        if self.size - pos > 4096:
            return False
        here = self.fp.tell()
        self.fp.seek(pos)
        zeros = not self.fp.read().strip(b"\x00")
        self.fp.seek(here)
        return zeros

    def _first_is_implicit(self, implicit: bool, little: bool) -> bool:
        """pydicom's rule: the first element of a data set decides implicit or explicit VR,
        whatever the transfer syntax says (writers get it wrong)."""
        pos = self.fp.tell()
        head = self.fp.read(6)
        self.fp.seek(pos)
        if len(head) < 6:
            return implicit
        (group,) = struct.unpack("<H" if little else ">H", head[:2])
        if group == 0xFFFE:
            return implicit
        looks_explicit = head[4:6] in _LONG_VRS or head[4:6] in _SHORT_VRS
        if implicit and looks_explicit and head[4:6].isupper():
            return False
        if not implicit and not looks_explicit:
            return True
        return implicit

    def dataset(self, implicit: bool, little: bool, depth: int, in_item: bool) -> bool:
        """Walk one data set to its end (EOF at the top, the item delimiter inside an item).
        Returns the implicit-VR flag actually used."""
        e = "<" if little else ">"
        implicit = self._first_is_implicit(implicit, little)
        while True:
            pos = self.fp.tell()
            head = self.fp.read(4)
            if not head:
                if in_item:
                    raise _Cut("the file ends inside a sequence item")
                return implicit
            if len(head) < 4:
                raise _Cut("the file ends inside an element header")
            group, elem = struct.unpack(f"{e}HH", head)
            tag = group << 16 | elem
            if group == 0xFFFE:
                (length,) = struct.unpack(f"{e}L", self._read(4, "an item header"))
                if tag == _ITEM_END and in_item:
                    return implicit
                raise _Malformed(f"a sequence delimiter {_tag(tag)} where an element should be")
            if tag == 0 and not in_item and self._trailing_zeros(pos):
                self.fp.seek(self.size)
                return implicit
            vr: bytes | None = None
            if implicit:
                (length,) = struct.unpack(f"{e}L", self._read(4, f"the header of element {_tag(tag)}"))
            else:
                vr = self._read(2, f"the header of element {_tag(tag)}")
                if vr in _LONG_VRS:
                    (length,) = struct.unpack(f"{e}2xL", self._read(6, f"the header of element {_tag(tag)}"))
                elif vr in _SHORT_VRS:
                    (length,) = struct.unpack(f"{e}H", self._read(2, f"the header of element {_tag(tag)}"))
                else:
                    raise _Malformed(f"element {_tag(tag)} has no valid VR")
            where = f"element {_tag(tag)}"
            value_at = self.fp.tell()
            if length != _UNDEFINED:
                self._skip(length, where)
                if depth == 0 and tag in _PIXEL_KEYWORDS:
                    self.pixels = PixelLayout(tag, vr and vr.decode(), value_at, length, value_at + length)
            elif depth == 0 and tag == 0x7FE00010:
                self._encapsulated(vr, value_at)
            elif vr == b"UN":  # an undefined-length UN is a sequence in implicit VR little endian (PS3.5 6.2.2)
                self._sequence(True, True, depth + 1, where)
            elif implicit or vr == b"SQ":
                self._sequence(implicit, little, depth + 1, where)
            else:
                self._skip_to_delimiter(where)

    def _sequence(self, implicit: bool, little: bool, depth: int, where: str) -> None:
        if depth > _MAX_DEPTH:
            raise _Malformed(f"sequences nested more than {_MAX_DEPTH} deep")
        e = "<" if little else ">"
        while True:
            group, elem, length = struct.unpack(f"{e}HHL", self._read(8, f"sequence {where}"))
            tag = group << 16 | elem
            if tag == _SEQ_END:
                return
            if tag != _ITEM:
                raise _Malformed(f"sequence {where} holds an element that is not an item")
            if length == _UNDEFINED:
                self.dataset(implicit, little, depth, in_item=True)
            else:
                self._skip(length, f"an item of sequence {where}")

    def _skip_to_delimiter(self, where: str) -> None:
        """An undefined-length value that is not a sequence (some vendors' private OB): its end is
        the sequence delimiter, as pydicom reads it."""
        marker = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        start = self.fp.tell()
        carry = b""
        while True:
            chunk = self.fp.read(1 << 20)
            if not chunk:
                raise _Cut(f"the file ends inside {where}")
            buf = carry + chunk
            i = buf.find(marker)
            if i >= 0:
                self.fp.seek(self.fp.tell() - len(buf) + i + len(marker))
                return
            carry = buf[-7:]
            if self.fp.tell() - start > self.size:
                raise _Cut(f"the file ends inside {where}")

    def _encapsulated(self, vr: bytes | None, value_at: int) -> None:
        fragments: list[tuple[int, int]] = []
        heads: list[bytes] = []
        table: int | None = None
        while True:
            got = len(fragments)
            group, elem, length = struct.unpack(
                "<HHL", self._read(8, f"the encapsulated Pixel Data after {got} complete fragments")
            )
            tag = group << 16 | elem
            if tag == _SEQ_END:
                break
            if tag != _ITEM or length == _UNDEFINED:
                raise _Malformed("the encapsulated Pixel Data holds something other than items of defined length")
            at = self.fp.tell()
            if table is None:
                table = length
            else:
                fragments.append((at, length))
                heads.append(self.fp.read(min(length, 64)))
            self.fp.seek(at)
            self._skip(length, f"the encapsulated Pixel Data after {got} complete fragments")
        if table is None:
            raise _Malformed("the encapsulated Pixel Data has no Basic Offset Table item")
        self.pixels = PixelLayout(
            0x7FE00010,
            vr.decode() if vr else None,
            value_at,
            None,
            self.fp.tell(),
            tuple(fragments),
            tuple(heads),
            table // 4,
        )


def _inflate(fp: BinaryIO) -> bytes:
    """The deflated data set that follows the File Meta Information, inflated."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        while not d.eof and (chunk := fp.read(1 << 20)):
            out += d.decompress(chunk)
            if len(out) > MAX_DECODED_BYTES:
                raise _Malformed("the deflated data set inflates past the memory limit")
    except zlib.error as e:
        raise _Malformed("the deflated data set does not inflate") from e
    if not d.eof:
        raise _Cut("the file ends inside the deflated data set (no end of stream)")
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Reading a file's header


def _infer_encapsulated(head: bytes) -> UID | None:
    """The transfer syntax of encapsulated pixel data in a file without one, from its first fragment."""
    if head[:2] == b"\xff\xd8":  # a JPEG-family codestream: the frame header names the process
        i = 2
        while i + 4 <= len(head) and head[i] == 0xFF:
            marker, length = head[i + 1], int.from_bytes(head[i + 2 : i + 4], "big")
            if marker == 0xF7:
                return uids.JPEGLSLossless
            if marker in (0xC0, 0xC1, 0xC3):
                return {0xC0: uids.JPEGBaseline8Bit, 0xC1: uids.JPEGExtended12Bit, 0xC3: uids.JPEGLossless}[marker]
            i += 2 + length
        return None
    if head[:4] == b"\xff\x4f\xff\x51" or head[4:8] == b"jP  ":
        return uids.JPEG2000
    if head[:3] == b"\x00\x00\x01" or head[:4] == b"\x00\x00\x00\x01":
        nal = head[3] if head[2] == 1 else head[4]
        if head[2] == 1 and nal == 0xB3:
            return uids.MPEG2MPML
        return uids.HEVCMP51 if (nal >> 1) & 0x3F in (32, 33, 34, 35, 39) and nal & 0x81 == 0 else uids.MPEG4HP41
    if len(head) >= 8 and 1 <= int.from_bytes(head[:4], "little") <= 15 and int.from_bytes(head[4:8], "little") == 64:
        return uids.RLELossless
    return None


@dataclass
class DicomHeader:
    """A file's data set (pixel values not read) and where its pixel data lie."""

    path: Path
    ds: FileDataset
    transfer_syntax: UID
    inferred: bool  # the file names no transfer syntax: inferred from its content
    deflated: bool
    pixels: PixelLayout | None


@contextmanager
def _quiet() -> Iterator[None]:
    """pydicom's and the codecs' warnings about a damaged file can quote header values: the reason names the fault."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _dataset_stream(header: DicomHeader) -> Iterator[BinaryIO]:
    """The data set's bytes (inflated when deflated), in which PixelLayout offsets point."""
    with open(header.path, "rb") as f:
        if header.deflated:
            read_preamble(f, True)
            _read_file_meta_info(f)
            yield io.BytesIO(_inflate(f))
        else:
            yield f


def read_file_header(path: Path) -> DicomHeader:
    """Read a file's header (pixel data located, not read), telling the ways a file can be bad
    apart: unreadable, empty, not DICOM, truncated, a malformed header."""
    try:
        size = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the header is read
    except OSError as e:
        raise BadFile(Reason.UNREADABLE, f"cannot read ({e.strerror or type(e).__name__})") from e
    with f, _quiet():
        if size == 0:
            raise BadFile(Reason.EMPTY, "zero bytes")
        try:
            return _read_open(path, f, size)
        except _Cut as e:
            raise BadFile(Reason.TRUNCATED, str(e)) from e
        except _Malformed as e:
            raise BadFile(Reason.BAD_HEADER, str(e)) from e
        except OSError as e:
            raise BadFile(Reason.UNREADABLE, f"cannot read ({e.strerror or type(e).__name__})") from e


def _read_open(path: Path, f: BinaryIO, size: int) -> DicomHeader:
    head = f.read(_SNIFF_BYTES)
    f.seek(0)
    preamble = read_preamble(f, True)
    if preamble is not None or head[:2] == b"\x02\x00":
        try:
            meta = _read_file_meta_info(f)
        except EOFError as e:
            raise _Cut("the file ends inside the File Meta Information") from e
        except Exception as e:  # pydicom's reading of a damaged group 0002: its message may quote values
            raise _Malformed(f"the File Meta Information is malformed ({type(e).__name__})") from e
    else:
        meta = FileMetaDataset()
    start = f.tell()
    declared = meta.get("TransferSyntaxUID")
    ts = UID(str(declared)) if declared else None
    deflated = ts == uids.DeflatedExplicitVRLittleEndian
    stream: BinaryIO = f
    stream_size = size
    if deflated:
        stream = io.BytesIO(_inflate(f))
        stream_size = len(stream.getvalue())
        start = 0
    stream.seek(start)
    if ts is not None and ts.is_transfer_syntax:
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    else:
        sniffed = _sniff_encoding(stream.read(_SNIFF_BYTES), stream_size - start)
        stream.seek(start)
        if sniffed is None:
            if preamble is None and not meta:
                raise BadFile(
                    Reason.NOT_DICOM, "no 'DICM' prefix, and the content does not start like a DICOM data set"
                )
            if start == stream_size:
                raise BadFile(Reason.NO_PIXEL_DATA, "File Meta Information only, no data set")
            raise _Malformed("the data set after the File Meta Information does not start like one")
        implicit, little = sniffed
    walker = _Walker(stream, stream_size)
    implicit = walker.dataset(implicit, little, 0, in_item=False)
    pixels = walker.pixels
    inferred = ts is None
    if ts is None:
        ts = (
            uids.ImplicitVRLittleEndian
            if implicit
            else uids.ExplicitVRLittleEndian
            if little
            else uids.ExplicitVRBigEndian
        )
        if pixels is not None and pixels.encapsulated:
            if implicit or not little:
                raise _Malformed("encapsulated Pixel Data in an implicit VR or big endian data set")
            guess = _infer_encapsulated(pixels.heads[0] if pixels.heads else b"")
            if guess is None:
                raise BadFile(
                    Reason.UNSUPPORTED_TRANSFER_SYNTAX, "no transfer syntax, and the encapsulated codestream is unknown"
                )
            ts = guess
    stream.seek(start)
    try:
        ds = read_dataset(
            stream,
            implicit,
            little,
            stop_when=lambda tag, vr, length: tag in _PIXEL_KEYWORDS,
            defer_size=None if deflated else 256 << 10,
        )
    except EOFError as e:
        raise _Cut("the file ends inside the data set") from e
    except Exception as e:  # pydicom cannot interpret what the walk found well-formed
        raise _Malformed(f"pydicom cannot parse the data set ({type(e).__name__})") from e
    if inferred:
        meta.TransferSyntaxUID = ts
    fds = FileDataset(str(path) if not deflated else stream, ds, preamble, meta, implicit, little)
    fds.set_original_encoding(implicit, little, ds._character_set)
    if pixels is not None:
        # The pixel data element, deferred as pydicom defers it: "PixelData" in ds holds, nothing is read.
        value = None
        if deflated:
            stream.seek(pixels.offset)
            value = stream.read((pixels.end - 8 if pixels.encapsulated else pixels.end) - pixels.offset)
        length = _UNDEFINED if pixels.encapsulated else int(pixels.length or 0)
        fds._dict[Tag(pixels.tag)] = RawDataElement(
            Tag(pixels.tag), pixels.vr, length, value, pixels.offset, implicit, little
        )
    return DicomHeader(path, fds, ts, inferred, deflated, pixels)


def read_header(path: Path) -> tuple[Dataset, int | None]:
    """Read a file's header (pixel data deferred): (dataset, native Pixel Data length or None).
    Raises BadFile with the reason when the file cannot be a cine's header."""
    header = read_file_header(path)
    px = header.pixels
    return header.ds, (px.length if px is not None and not px.encapsulated else None)


def _value(ds: Dataset, keyword: str, default: object = None) -> object:
    """An attribute's value; one pydicom cannot convert makes a bad header (named, never quoted)."""
    try:
        value = ds.get(keyword, default)
    except Exception as e:  # a value pydicom's converters reject: the attribute is what is wrong
        raise BadFile(Reason.BAD_HEADER, f"{keyword} cannot be read") from e
    return default if value is None else value


def _text(ds: Dataset, keyword: str) -> str:
    return str(_value(ds, keyword, "") or "").strip()


def _sop_class(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return _text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta is not None else "")


def is_dicomdir(ds: Dataset) -> bool:
    """A DICOMDIR (Media Storage Directory): an index of the archive, not a bad file."""
    return _sop_class(ds) == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds


# ---------------------------------------------------------------------------------------------
# Validating a cine's header


def int_value(ds: Dataset, keyword: str, default: int) -> int:
    """An integer attribute; a value that is not one is a bad header (the value is not quoted)."""
    value = _value(ds, keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise BadFile(Reason.BAD_HEADER, f"{keyword} is not an integer") from e


def _frame_bytes(ds: Dataset) -> int:
    """Bytes of one native (uncompressed) frame."""
    rows, cols = int_value(ds, "Rows", 0), int_value(ds, "Columns", 0)
    spp, bits = int_value(ds, "SamplesPerPixel", 1) or 1, int_value(ds, "BitsAllocated", 8) or 8
    if _text(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        return rows * cols * 2 * bits // 8
    return (rows * cols * spp * bits + 7) // 8


def _is_frame_start(ts: UID, head: bytes) -> bool:
    """Whether a fragment begins a frame's codestream (a frame may span several fragments)."""
    if ts in J2K_FAMILY:
        return head[:2] == b"\xff\x4f" or head[4:8] == b"jP  "
    if ts in JPEG_FAMILY:
        return head[:2] == b"\xff\xd8"
    return True  # RLE: exactly one fragment per frame (PS3.5 A.4.2)


def _has_start_code(head: bytes) -> bool:
    """An MPEG-2, H.264 or HEVC elementary stream (byte stream format) begins with a start code
    (00 00 01, after any number of leading zero bytes)."""
    zeros = len(head) - len(head.lstrip(b"\x00"))
    return zeros >= 2 and head[zeros : zeros + 1] == b"\x01"


def _check_pixel_module(ds: Dataset, ts: UID) -> None:
    """The Image Pixel module must describe pixels this reader can turn into display frames."""
    photometric = _text(ds, "PhotometricInterpretation")
    spp = int_value(ds, "SamplesPerPixel", 1)
    bits = int_value(ds, "BitsAllocated", 0)
    stored = int_value(ds, "BitsStored", bits)
    if not photometric:
        raise BadFile(Reason.BAD_HEADER, "no Photometric Interpretation")
    if photometric in UNSUPPORTED_PHOTOMETRIC:
        raise BadFile(Reason.UNSUPPORTED_PIXEL_FORMAT, f"Photometric Interpretation {photometric}")
    if photometric not in PHOTOMETRIC_SAMPLES:
        raise BadFile(Reason.BAD_HEADER, "Photometric Interpretation is not a defined term")
    if spp != PHOTOMETRIC_SAMPLES[photometric]:
        raise BadFile(Reason.BAD_HEADER, f"{spp} samples per pixel for {photometric}")
    if ts in VIDEO_CODECS:
        return  # the stream describes its own pixels; FFmpeg converts them
    if bits not in (8, 16, 32):
        if bits in (1, 64):
            raise BadFile(Reason.UNSUPPORTED_PIXEL_FORMAT, f"Bits Allocated {bits}")
        raise BadFile(Reason.BAD_HEADER, "Bits Allocated is not 1, 8, 16, 32 or 64")
    if not 1 <= stored <= bits or int_value(ds, "PixelRepresentation", 0) not in (0, 1):
        raise BadFile(Reason.BAD_HEADER, "Bits Stored or Pixel Representation does not fit Bits Allocated")
    if spp == 3 and int_value(ds, "PlanarConfiguration", 0) not in (0, 1):
        raise BadFile(Reason.BAD_HEADER, "Planar Configuration is not 0 or 1")
    if photometric == "PALETTE COLOR":
        for colour in ("Red", "Green", "Blue"):
            if f"{colour}PaletteColorLookupTableDescriptor" not in ds or not (
                f"{colour}PaletteColorLookupTableData" in ds or f"Segmented{colour}PaletteColorLookupTableData" in ds
            ):
                raise BadFile(Reason.BAD_HEADER, f"PALETTE COLOR without the {colour} palette lookup table")
        try:
            palette_shift(ds)
        except Exception as e:  # pydicom's checks of the tables (lengths, entry sizes)
            raise BadFile(Reason.BAD_HEADER, "the palette lookup tables are inconsistent") from e


def check_header(
    ds: Dataset, min_frames: int, pixel_length: int | None = None, *, layout: PixelLayout | None = None
) -> int:
    """Validate a cine's header; return its frame count or raise BadFile with the reason.

    pixel_length: the native Pixel Data length (from read_header), checked against the frame count.
    layout: where the pixel data lie (read_file_header); encapsulated frames are counted from it.
    """
    meta = getattr(ds, "file_meta", None)
    sop = _sop_class(ds)
    modality = _text(ds, "Modality")
    if modality != "US" and sop not in US_SOP_CLASSES and sop != ENHANCED_US_VOLUME:
        sop_name = UID(sop).name if sop and UID(sop).name != sop else "not given or not one pydicom knows"
        raise BadFile(
            Reason.NOT_ULTRASOUND,
            f"modality {modality if modality in MODALITIES else 'not given or unknown'}, SOP class {sop_name}",
        )
    if sop == ENHANCED_US_VOLUME or _text(ds, "DimensionOrganizationType") in ("3D", "3D_TEMPORAL"):
        raise BadFile(Reason.VOLUME_3D, "an Enhanced US Volume (3-D), not a 2-D cine")
    present = [k for k in _PIXEL_KEYWORDS.values() if k in ds]
    pixel_keyword = layout.keyword if layout is not None else (present[0] if present else "")
    if not pixel_keyword:
        raise BadFile(Reason.NO_PIXEL_DATA, "no Pixel Data element")
    if pixel_keyword != "PixelData":
        raise BadFile(Reason.UNSUPPORTED_PIXEL_FORMAT, f"{pixel_keyword}, not integer Pixel Data")
    frames = int_value(ds, "NumberOfFrames", 1) or 1
    if frames <= 1:
        raise BadFile(Reason.SINGLE_FRAME, "a still image, not a cine")
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        raise BadFile(Reason.UNSUPPORTED_TRANSFER_SYNTAX, "no transfer syntax in the file meta information")
    tsyntax = UID(str(tsyntax))
    if not transfer_syntax_supported(tsyntax):
        raise BadFile(Reason.UNSUPPORTED_TRANSFER_SYNTAX, codec_label(tsyntax))
    rows, cols = int_value(ds, "Rows", 0), int_value(ds, "Columns", 0)
    spp = int_value(ds, "SamplesPerPixel", 1) or 1
    if not (MIN_SIDE <= rows <= MAX_SIDE and MIN_SIDE <= cols <= MAX_SIDE) or frames > MAX_FRAMES:
        raise BadFile(
            Reason.BAD_DIMENSIONS,
            f"{frames} frames of {rows} x {cols} (allowed: {MIN_SIDE}-{MAX_SIDE} pixels, up to {MAX_FRAMES} frames)",
        )
    if frames * rows * cols * max(spp, 3) > MAX_DECODED_BYTES:
        raise BadFile(Reason.BAD_DIMENSIONS, f"{frames} frames of {rows} x {cols} do not fit in memory decoded")
    _check_pixel_module(ds, tsyntax)
    if frames < min_frames:
        raise BadFile(Reason.TOO_FEW_FRAMES, f"{frames} frames < {min_frames}")
    if layout is not None and not layout.encapsulated:
        pixel_length = layout.length
    if pixel_length is not None and not tsyntax.is_encapsulated:
        per_frame = _frame_bytes(ds)
        if per_frame and (pixel_length < frames * per_frame or pixel_length - frames * per_frame >= per_frame):
            raise BadFile(
                Reason.FRAME_COUNT_MISMATCH,
                f"Number of Frames is {frames} but the pixel data holds {pixel_length / per_frame:.4g} frames",
            )
    if layout is not None and tsyntax.is_encapsulated:
        if not layout.encapsulated:
            raise BadFile(Reason.CORRUPT_PIXEL_DATA, f"{codec_label(tsyntax)} requires encapsulated Pixel Data")
        heads = [h for h in layout.heads if h]
        if not heads:
            raise BadFile(Reason.CORRUPT_PIXEL_DATA, "the encapsulated Pixel Data holds no fragments")
        if tsyntax in VIDEO_CODECS:
            if not _has_start_code(heads[0]):
                raise BadFile(Reason.CORRUPT_PIXEL_DATA, f"the {codec_label(tsyntax)} stream has no start code")
        else:
            starts = sum(_is_frame_start(tsyntax, h) for h in heads)
            if starts == 0:
                raise BadFile(Reason.CORRUPT_PIXEL_DATA, f"no fragment begins a {codec_label(tsyntax)} codestream")
            if starts != frames:
                raise BadFile(
                    Reason.FRAME_COUNT_MISMATCH,
                    f"Number of Frames is {frames} but the pixel data holds {starts} frames",
                )
    return frames


def transfer_syntax_supported(ts: str) -> bool:
    """Whether this reader decodes ts with what is installed."""
    uid = UID(ts)
    if uid in VIDEO_CODECS:
        try:
            import av
        except ImportError:
            return False
        return VIDEO_CODECS[uid] in av.codecs_available
    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


# ---------------------------------------------------------------------------------------------
# Telling a damaged codestream from a decoder that fails


def _jpeg_fault(data: bytes, rows: int, cols: int, spp: int) -> str | None:
    if data[:2] != b"\xff\xd8":
        return "the frame does not begin with a JPEG start-of-image marker"
    i, sof = 2, None
    while True:
        if i + 4 > len(data):
            return "the JPEG codestream ends inside its header"
        if data[i] != 0xFF:
            return "the JPEG header holds bytes that are not a marker"
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xD9:
            return "the JPEG codestream ends before its image data"
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > len(data):
            return "a JPEG marker segment runs past the end of the frame"
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            if length < 8:
                return "the JPEG frame header is too short"
            sof = (int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big"), data[i + 9])
        if marker == 0xDA:
            break
        i += 2 + length
    if sof is None:
        return "the JPEG codestream has no frame header before its scan"
    height, width, comps = sof
    if width != cols or height not in (0, rows):
        return f"the JPEG codestream is {width} x {height} pixels, the header declares {cols} x {rows}"
    return _ending_fault("JPEG", comps, spp, data, "end-of-image")


def _j2k_fault(data: bytes, rows: int, cols: int, spp: int) -> str | None:
    at = data.find(b"\xff\x4f\xff\x51") if data[4:8] == b"jP  " else 0
    if at < 0 or data[at : at + 4] != b"\xff\x4f\xff\x51":
        return "the frame does not begin with a JPEG 2000 codestream (SOC and SIZ markers)"
    if len(data) < at + 42:
        return "the JPEG 2000 codestream ends inside its SIZ header"
    xsiz, ysiz, xo, yo = struct.unpack_from(">4L", data, at + 8)
    comps = int.from_bytes(data[at + 40 : at + 42], "big")
    if (xsiz - xo, ysiz - yo) != (cols, rows):
        return f"the JPEG 2000 codestream is {xsiz - xo} x {ysiz - yo} pixels, the header declares {cols} x {rows}"
    return _ending_fault("JPEG 2000", comps, spp, data, "end-of-codestream")


def _ending_fault(codec: str, comps: int, spp: int, data: bytes, end: str) -> str | None:
    """What JPEG and JPEG 2000 share: the component count the header declares, and the closing FFD9 marker."""
    if comps != spp:
        return f"the {codec} codestream has {comps} components, the header declares {spp} samples per pixel"
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return f"the {codec} codestream has no {end} marker (cut short)"
    return None


def _rle_fault(data: bytes, spp: int, bits: int) -> str | None:
    if len(data) < 64:
        return "the RLE frame is shorter than its 64-byte header"
    header = struct.unpack_from("<16L", data)
    n, offsets = header[0], header[1:]
    if n != spp * (bits // 8):
        return f"the RLE header lists {n} segments, the image needs {spp * (bits // 8)}"
    used = offsets[:n]
    if used[0] != 64 or any(b <= a for a, b in itertools.pairwise(used)) or used[-1] >= len(data):
        return "the RLE segment offsets are out of order or past the end of the frame"
    return None


def codestream_fault(ts: UID, data: bytes, ds: Dataset) -> str | None:
    """What is structurally wrong with one frame's codestream, or None when it looks sound
    (then a failure to decode it is the decoder's, not the file's)."""
    rows, cols, spp = int_value(ds, "Rows", 0), int_value(ds, "Columns", 0), int_value(ds, "SamplesPerPixel", 1)
    if ts in J2K_FAMILY:
        return _j2k_fault(data, rows, cols, spp)
    if ts in JPEG_FAMILY:
        return _jpeg_fault(data, rows, cols, spp)
    if ts == uids.RLELossless:
        return _rle_fault(data, spp, int_value(ds, "BitsAllocated", 8))
    return None


def _failure(header: DicomHeader, index: int, error: Exception, stream: BinaryIO | None) -> BadFile:
    """Frame index failed to decode: corrupt pixel data when its codestream is damaged, else a decoder error."""
    ts, px = header.transfer_syntax, header.pixels
    if stream is not None and px is not None and px.encapsulated and ts not in VIDEO_CODECS:
        try:
            stream.seek(px.offset)
            data = get_frame(stream, index, number_of_frames=int_value(header.ds, "NumberOfFrames", 1))
        except Exception:  # the fragments cannot be split into frames at all
            return BadFile(Reason.CORRUPT_PIXEL_DATA, f"frame {index + 1}: the fragments do not split into frames")
        fault = codestream_fault(ts, data, header.ds)
        if fault:
            return BadFile(Reason.CORRUPT_PIXEL_DATA, f"frame {index + 1}: {fault}")
    # Type only: a codec's message is not ours to vouch for (it could quote header values).
    return BadFile(
        Reason.DECODE_ERROR,
        f"{codec_label(ts)} via {_plugin_label(ts)}: frame {index + 1} does not decode ({type(error).__name__})",
    )


# ---------------------------------------------------------------------------------------------
# Decoding


def _native_ybr422(stream: BinaryIO, ds: Dataset, opts: dict) -> Iterator[tuple[np.ndarray, dict]]:
    """Native YBR_FULL_422 one frame at a time: pydicom 3.0's multi-frame iteration over a file
    loses the subsampled frame length after the first frame (it reads past the data)."""
    per_frame = _frame_bytes(ds)
    decoder = get_decoder(opts["transfer_syntax_uid"])
    for _ in range(int(opts["number_of_frames"])):
        data = stream.read(per_frame)
        yield from decoder.iter_array(data, validate=True, **{**opts, "number_of_frames": 1})


def _image_frames(header: DicomHeader, as_rgb: bool) -> Iterator[np.ndarray]:
    """Frames through pydicom's decoder for the transfer syntax, read from the pixel data in place."""
    ds, ts, px = header.ds, header.transfer_syntax, header.pixels
    assert px is not None
    opts = as_pixel_options(ds)
    opts.update(transfer_syntax_uid=ts, pixel_keyword=px.keyword, as_rgb=as_rgb)
    if px.vr:
        opts["pixel_vr"] = px.vr
    if opts.get("samples_per_pixel", 1) > 1:
        opts.setdefault("planar_configuration", 0)
    with _dataset_stream(header) as stream:
        done = yield from _exact_frames(header, stream, opts)  # lossless: a faster decoder, the same frames
        if done < 0:
            return
        stream.seek(px.offset)
        if not ts.is_encapsulated and opts.get("photometric_interpretation") == "YBR_FULL_422":
            frames = _native_ybr422(stream, ds, opts)
        else:
            frames = get_decoder(ts).iter_array(stream, validate=True, **opts)
        index = 0
        while True:
            try:
                with _quiet():
                    arr, _ = next(frames)
            except StopIteration:
                return
            except Exception as e:  # classified below: damaged data or the decoder's failure
                raise _failure(header, index, e, stream) from e
            if index >= done:  # the frames before `done` were yielded by the faster decoder
                yield arr
            index += 1


def _exact_frames(header: DicomHeader, stream: BinaryIO, opts: dict) -> Iterator[np.ndarray]:
    """Lossless JPEG and JPEG-LS frames through fedecho.data.lossless's decoder while it decodes; returns
    -1 when it decoded them all, else how many it yielded, 0 for another transfer syntax (pydicom's own
    plugins take over from there: what they make of the rest, a failure too, is what the file gets).
    The first frame must come out as pydicom's plugins decode it, or none is taken: a codestream feature
    the two would read differently is a property of the file, not of one frame."""
    from fedecho.data.lossless import SYNTAXES, exact_decoder

    ts, offset = header.transfer_syntax, header.pixels.offset if header.pixels is not None else 0
    exact = exact_decoder(ts) if ts in SYNTAXES else None
    if exact is None:
        return 0
    usual = get_decoder(ts)
    try:
        stream.seek(offset)
        reference = usual.iter_array(stream, validate=True, **opts)
        with _quiet():
            first, _ = next(reference)
        reference.close()
        stream.seek(offset)
        frames = exact.iter_array(stream, validate=True, **opts)
        with _quiet():
            arr, _ = next(frames)
    except Exception:  # pydicom's plugins then decide (and name the failure)
        return 0
    if arr.dtype != first.dtype or arr.shape != first.shape or not np.array_equal(arr, first):
        return 0
    index = 0
    while True:
        yield arr
        index += 1
        try:
            with _quiet():
                arr, _ = next(frames)
        except StopIteration:
            return -1
        except Exception:
            return index


def _video_frames(header: DicomHeader, gray: bool) -> Iterator[np.ndarray]:
    """Frames of an MPEG-2/H.264/HEVC cine: the fragments are one elementary stream, parsed and
    decoded by FFmpeg (through PyAV) as it is read."""
    import av

    ts, px = header.transfer_syntax, header.pixels
    assert px is not None
    codec = av.CodecContext.create(VIDEO_CODECS[ts], "r")
    fmt = "gray" if gray else "rgb24"
    index = 0
    with _dataset_stream(header) as stream:
        for offset, length in [*px.fragments, (0, -1)]:
            chunk: bytes | None = None
            if length >= 0:
                stream.seek(offset)
                chunk = stream.read(length)
            try:  # chunk None flushes the parser, then packet None the decoder
                packets = [*codec.parse(chunk), *([None] if chunk is None else [])]
                for packet in packets:
                    for frame in codec.decode(packet):
                        yield frame.to_ndarray(format=fmt)
                        index += 1
            except av.FFmpegError as e:
                raise _failure(header, index, e, None) from e
    if index == 0:
        raise BadFile(Reason.CORRUPT_PIXEL_DATA, f"no frame decodes from the {codec_label(ts)} stream")


def frame_rate(ds: Dataset) -> float | None:
    """Frames per second from Frame Time (ms), Frame Time Vector, Cine Rate or display rate."""
    ft = parse_float(str(ds.get("FrameTime", "")))
    if ft and ft > 0:
        return 1000.0 / ft
    vec = ds.get("FrameTimeVector")
    if vec is not None and vec != "":
        values = list(vec) if isinstance(vec, MultiValue | list | tuple) else [vec]
        # The first entry is the time to the first frame (0); the rest are the increments.
        vals = [v for v in (parse_float(str(x)) for x in values[1:]) if v and v > 0]
        if vals:
            return 1000.0 / float(np.mean(vals))
    for tag in ("CineRate", "RecommendedDisplayFrameRate"):
        v = parse_float(str(ds.get(tag, "")))
        if v and v > 0:
            return v
    return None


def tissue_boxes(ds: Dataset) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) inclusive bounds of each 2-D tissue region the scanner declares."""
    boxes = []
    keys = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")
    for r in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            if int(r.get("RegionSpatialFormat", 0)) == 1:
                x0, y0, x1, y1 = (int(r.get(k)) for k in keys)
                boxes.append((x0, y0, x1, y1))
        except (TypeError, ValueError):
            continue  # a region without its bounds locates nothing
    return boxes


def tissue_region(ds: Dataset) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) inclusive bounds of the 2-D tissue regions, if the scanner declares any."""
    boxes = tissue_boxes(ds)
    if not boxes:
        return None
    xs0, ys0, xs1, ys1 = zip(*boxes, strict=True)
    return min(xs0), min(ys0), max(xs1), max(ys1)


def palette_shift(ds: Dataset) -> int:
    """Bits to drop from palette entries to reach 8: 8 when the lookup tables hold 16-bit values.

    Decided once from the whole table (some writers declare 16-bit entries that hold 8-bit values),
    so every frame of a cine maps the same index to the same colour."""
    desc = ds.get("RedPaletteColorLookupTableDescriptor")
    n = (int(desc[0]) or 65536) if desc else 256
    first = int(desc[1]) if desc else 0
    table = apply_color_lut(np.arange(first, first + n, dtype=np.int64), ds)
    return 8 if table.dtype != np.uint8 and int(table.max()) > 255 else 0


def to_uint8(
    frame: np.ndarray, ds: Dataset, shift: int | None = None, tables: dict[np.dtype, np.ndarray] | None = None
) -> np.ndarray:
    """One decoded frame to (H, W) or (H, W, 3) uint8 for display-like intensities.

    Samples scale from Bits Stored to 8 bits (signed ones offset to unsigned first, the same for
    every frame); palette indices go through the colour lookup tables; MONOCHROME1 is inverted.
    shift: palette_shift(ds), when the caller has it. tables: a dict the caller keeps over one
    cine's frames: samples of up to 16 bits then go through a table of this function's result for
    every value they can hold (computed once, by the code below: the same bytes), not through float
    arithmetic or the palette's parsing for every frame.
    """
    photometric = str(ds.get("PhotometricInterpretation", ""))
    palette = photometric == "PALETTE COLOR"
    dtype = frame.dtype
    if (
        tables is not None
        and dtype.kind in "ui"
        and dtype.itemsize <= 2
        and (dtype != np.uint8 or palette)  # other 8-bit samples stay as they are, or are only inverted
        and (frame.ndim == 2 or not palette)  # each sample on its own: the table applies to any shape
    ):
        unsigned = np.dtype(dtype.str.replace("i", "u"))
        if dtype not in tables:
            values = np.arange(1 << (8 * dtype.itemsize), dtype=unsigned).view(dtype)
            tables[dtype] = to_uint8(values.reshape(1, -1), ds, shift)[0]
        return np.take(tables[dtype], frame.view(unsigned), axis=0)
    if photometric == "PALETTE COLOR" and frame.ndim == 2:
        frame = apply_color_lut(frame, ds)
        if frame.dtype != np.uint8:
            frame = (frame >> (palette_shift(ds) if shift is None else shift)).astype(np.uint8)
        return frame
    if frame.dtype != np.uint8:
        bits = int(ds.get("BitsStored", 0) or 0) or frame.dtype.itemsize * 8
        f = frame.astype(np.float64)
        if frame.dtype.kind == "i":
            f += float(1 << (bits - 1))
        f = f / max((1 << bits) - 1, 1) * 255.0
        frame = np.clip(np.round(f), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        frame = 255 - frame
    return frame


def read_frames(path: Path, crop_region: bool = True) -> Iterator[np.ndarray]:
    """A cine's frames as uint8, decoded as they are read: checked against the header's size and frame
    count, cropped to the declared tissue region when crop_region."""
    header = read_file_header(path)
    ds = header.ds
    declared = check_header(ds, 0, layout=header.pixels)
    box = tissue_region(ds) if crop_region else None
    rows, cols = int_value(ds, "Rows", 0), int_value(ds, "Columns", 0)
    if box is not None:  # clipped to the frame (writers are off by one); a region outside it crops nothing
        box = (max(box[0], 0), max(box[1], 0), min(box[2], cols - 1), min(box[3], rows - 1))
        box = box if box[0] <= box[2] and box[1] <= box[3] else None
    photometric = _text(ds, "PhotometricInterpretation")
    shift = palette_shift(ds) if photometric == "PALETTE COLOR" else None
    if header.transfer_syntax in VIDEO_CODECS:
        source = _video_frames(header, gray=photometric.startswith("MONOCHROME"))
    else:
        source = _image_frames(header, as_rgb=photometric != "PALETTE COLOR")
    count = 0
    tables: dict[np.dtype, np.ndarray] = {}  # to_uint8 as lookup tables, for this cine's frames
    for frame in source:
        if frame.shape[:2] != (rows, cols):
            raise BadFile(
                Reason.CORRUPT_PIXEL_DATA,
                f"frame {count + 1} decodes to {frame.shape[1]} x {frame.shape[0]}, the header declares "
                f"{cols} x {rows}",
            )
        frame = to_uint8(frame, ds, shift, tables)
        if box is not None:
            x0, y0, x1, y1 = box
            frame = frame[y0 : y1 + 1, x0 : x1 + 1]
        count += 1
        if count > declared:
            break
        yield frame
    if count != declared:
        raise BadFile(
            Reason.FRAME_COUNT_MISMATCH,
            f"Number of Frames is {declared} but {'more' if count > declared else count} frames decoded",
        )
