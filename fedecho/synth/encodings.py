"""How the phantom archive stores a cine: pixel layout, transfer syntax and header form, one table.

Real archives hold whatever their scanners and PACS exports wrote: JPEG in three colour spaces,
lossless JPEG, JPEG-LS, JPEG 2000, RLE, raw pixels in either byte order, deflated headers, video
streams, files with no Part-10 meta, private sequences of undefined length. A reader is only as
good as the archive it was tested on, so the phantom writes all of them, each from this table
(ENCODINGS), through one function per codec family (CODECS), and hands back what a correct
decoder must return (the reference the conformance tests compare against).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    HEVCMP51,
    JPEG2000,
    MPEG2MPML,
    MPEG2MPMLF,
    MPEG4HP41,
    MPEG4HP41F,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

# Header forms: how the file around the pixels is written (the writer or write_bytes applies them).
UNDEFINED_LENGTH = "undefined_length"  # sequences and items with undefined length (PS3.5 7.5.1)
PRIVATE_TAGS = "private_tags"  # a private creator, private elements and nested private sequences
FRAME_TIME_VECTOR = "frame_time_vector"  # Frame Time Vector instead of Frame Time
NO_META = "no_meta"  # no preamble, no 'DICM', no file meta: an old PACS export (implicit VR LE)
DICOMDIR = "dicomdir"  # part of a media file-set with a DICOMDIR (a CD export)
RESIZED = "resized"  # frames downscaled after acquisition; the regions still declare the original
VOLUME_3D = "volume_3d"  # the study also holds an Enhanced US Volume (3-D) object
FORMS = frozenset({UNDEFINED_LENGTH, PRIVATE_TAGS, FRAME_TIME_VECTOR, NO_META, DICOMDIR, RESIZED, VOLUME_3D})


@dataclass(frozen=True)
class Layout:
    """The Image Pixel module of a stored frame (PS3.3 C.7.6.3)."""

    photometric: str
    samples: int
    bits_allocated: int = 8
    bits_stored: int = 8
    planar: int = 0  # Planar Configuration, colour only


LAYOUTS: dict[str, Layout] = {
    "mono2_8": Layout("MONOCHROME2", 1),
    "mono1_8": Layout("MONOCHROME1", 1),
    "mono2_12": Layout("MONOCHROME2", 1, 16, 12),
    "mono1_16": Layout("MONOCHROME1", 1, 16, 16),
    "rgb_planar0": Layout("RGB", 3),
    "rgb_planar1": Layout("RGB", 3, planar=1),
    "palette": Layout("PALETTE COLOR", 1),
    "ybr_full": Layout("YBR_FULL", 3),
    "ybr_full_422": Layout("YBR_FULL_422", 3),
    "ybr_rct": Layout("YBR_RCT", 3),  # JPEG 2000 reversible colour transform
    "ybr_ict": Layout("YBR_ICT", 3),  # JPEG 2000 irreversible colour transform
    "ybr_partial_420": Layout("YBR_PARTIAL_420", 3),  # the video syntaxes (PS3.5 8.2.5-8.2.8)
}


@dataclass(frozen=True)
class Tolerance:
    """How far a correct decoder's uint8 output may be from the reference: 'exact', 'max' (any
    pixel) or 'mean' (mean absolute difference) in grey levels."""

    kind: str = "exact"
    value: float = 0.0

    def __str__(self) -> str:
        return "exact" if self.kind == "exact" else f"{self.kind} abs error <= {self.value:g}"


EXACT = Tolerance()


@dataclass(frozen=True)
class Encoding:
    """One row of the table: how one cine is stored."""

    name: str
    transfer_syntax: UID
    layout: str
    codec: str  # a key of CODECS
    tolerance: Tolerance = EXACT
    forms: frozenset[str] = frozenset()
    options: tuple[tuple[str, object], ...] = ()  # codec options
    frame_rates: tuple[float, ...] = ()  # the stream must run at one of these (MPEG-2 MP@ML)
    max_rate: float | None = None  # ... or at most this fast (the H.264 / HEVC levels)

    @property
    def opts(self) -> dict[str, object]:
        return dict(self.options)

    @property
    def is_video(self) -> bool:
        return self.codec == "video"

    def stream_rate(self, fps: float) -> float:
        """The frame rate a cine must be rendered at to be stored this way."""
        if self.frame_rates and fps not in self.frame_rates:
            return min(self.frame_rates, key=lambda r: abs(r - fps))
        if self.max_rate is not None and fps > self.max_rate:
            return self.max_rate
        return fps

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "transfer_syntax": str(self.transfer_syntax),
            "transfer_syntax_name": self.transfer_syntax.name,
            "photometric": LAYOUTS[self.layout].photometric,
            "bits": LAYOUTS[self.layout].bits_stored,
            "forms": sorted(self.forms),
            "tolerance": str(self.tolerance),
        }


def _row(
    name: str,
    ts: UID,
    layout: str,
    codec: str,
    tolerance: Tolerance = EXACT,
    forms: tuple[str, ...] = (),
    *,
    frame_rates: tuple[float, ...] = (),
    max_rate: float | None = None,
    **options: object,
) -> Encoding:
    return Encoding(
        name, ts, layout, codec, tolerance, frozenset(forms), tuple(sorted(options.items())), frame_rates, max_rate
    )


JPEG_TOL = Tolerance("mean", 4.0)  # quality 90; measured about 1.3 on phantom frames
J2K_TOL = Tolerance("mean", 4.0)  # compression ratio 12; measured about 1
VIDEO_TOL = Tolerance("mean", 5.0)  # 4:2:0 and inter-frame coding; measured about 2
YBR_TOL = Tolerance("max", 2.0)  # YBR samples are stored losslessly; RGB differs by conversion rounding
ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        # Native (uncompressed) pixels in every byte order and VR form.
        _row("explicit_mono2", ExplicitVRLittleEndian, "mono2_8", "native"),
        _row("implicit_mono2", ImplicitVRLittleEndian, "mono2_8", "native", forms=(UNDEFINED_LENGTH,)),
        _row("explicit_mono1_16", ExplicitVRLittleEndian, "mono1_16", "native", forms=(PRIVATE_TAGS,)),
        _row("explicit_rgb_planar1", ExplicitVRLittleEndian, "rgb_planar1", "native", forms=(FRAME_TIME_VECTOR,)),
        _row("explicit_ybr_full_422", ExplicitVRLittleEndian, "ybr_full_422", "native", YBR_TOL),
        _row("big_endian_mono2_12", ExplicitVRBigEndian, "mono2_12", "native", forms=(FRAME_TIME_VECTOR,)),
        _row("big_endian_rgb", ExplicitVRBigEndian, "rgb_planar0", "native"),
        _row("deflated_rgb", DeflatedExplicitVRLittleEndian, "rgb_planar0", "native", forms=(PRIVATE_TAGS,)),
        _row("deflated_ybr_full", DeflatedExplicitVRLittleEndian, "ybr_full", "native", YBR_TOL),
        _row("no_meta_implicit", ImplicitVRLittleEndian, "mono2_8", "native", forms=(NO_META,)),
        _row("no_meta_palette", ImplicitVRLittleEndian, "palette", "native", forms=(NO_META, UNDEFINED_LENGTH)),
        # RLE Lossless (PS3.5 Annex G).
        _row("rle_rgb", RLELossless, "rgb_planar0", "pydicom"),
        _row("rle_palette", RLELossless, "palette", "pydicom", forms=(UNDEFINED_LENGTH, PRIVATE_TAGS)),
        _row("rle_mono2_12", RLELossless, "mono2_12", "pydicom"),
        _row("rle_mono1", RLELossless, "mono1_8", "pydicom"),
        # JPEG baseline (process 1) in the three colour spaces scanners write, and greyscale.
        _row("jpeg_ybr422", JPEGBaseline8Bit, "ybr_full_422", "jpeg", JPEG_TOL, quality=90),
        _row("jpeg_ybr_full", JPEGBaseline8Bit, "ybr_full", "jpeg", JPEG_TOL, quality=90),
        _row("jpeg_rgb", JPEGBaseline8Bit, "rgb_planar0", "jpeg", JPEG_TOL, quality=90),
        _row("jpeg_mono2", JPEGBaseline8Bit, "mono2_8", "jpeg", JPEG_TOL, (RESIZED,), quality=90),
        _row(
            "jpeg_ybr422_dicomdir",
            JPEGBaseline8Bit,
            "ybr_full_422",
            "jpeg",
            JPEG_TOL,
            (DICOMDIR, VOLUME_3D),
            quality=90,
        ),
        # Lossless JPEG, process 14, selection value 1.
        _row("jpeg_lossless_rgb", JPEGLosslessSV1, "rgb_planar0", "jpeg_lossless"),
        _row("jpeg_lossless_mono2_12", JPEGLosslessSV1, "mono2_12", "jpeg_lossless", forms=(UNDEFINED_LENGTH,)),
        # JPEG-LS, lossless and near-lossless (NEAR = 2).
        _row("jpegls_lossless_mono2", JPEGLSLossless, "mono2_8", "pydicom"),
        _row("jpegls_lossless_rgb", JPEGLSLossless, "rgb_planar0", "pydicom", forms=(RESIZED,)),
        _row(
            "jpegls_near_lossless_mono2", JPEGLSNearLossless, "mono2_8", "pydicom", Tolerance("max", 2.0), jls_error=2
        ),
        # JPEG 2000: reversible (RCT) and irreversible (ICT) colour transforms.
        _row("j2k_lossless_rct", JPEG2000Lossless, "ybr_rct", "pydicom", forms=(PRIVATE_TAGS,)),
        _row("j2k_lossless_mono2_12", JPEG2000Lossless, "mono2_12", "pydicom"),
        _row("j2k_lossy_ict", JPEG2000, "ybr_ict", "pydicom", J2K_TOL, j2k_cr=(12.0,)),
        # Video: one elementary stream; only the fragmentable syntaxes split it over several fragments.
        _row("h264", MPEG4HP41, "ybr_partial_420", "video", VIDEO_TOL, max_rate=60.0, format="h264"),
        _row(
            "h264_fragmented",
            MPEG4HP41F,
            "ybr_partial_420",
            "video",
            VIDEO_TOL,
            (UNDEFINED_LENGTH,),
            max_rate=60.0,
            format="h264",
            fragment=4096,
        ),
        _row("hevc", HEVCMP51, "ybr_partial_420", "video", VIDEO_TOL, max_rate=60.0, format="hevc"),
        _row("mpeg2", MPEG2MPML, "ybr_partial_420", "video", VIDEO_TOL, frame_rates=(25.0, 30.0), format="mpeg2video"),
        _row(
            "mpeg2_fragmented",
            MPEG2MPMLF,
            "ybr_partial_420",
            "video",
            VIDEO_TOL,
            (RESIZED,),
            frame_rates=(25.0, 30.0),
            format="mpeg2video",
            fragment=8192,
        ),
    )
}

# The phantom's default archive: what it wrote before the table existed.
DEFAULT_ENCODINGS = ("jpeg_ybr422", "explicit_mono2")


def resolve(spec: str) -> tuple[str, ...]:
    """'all', 'default' or a comma-separated list of names from ENCODINGS, as the CLI takes them."""
    spec = spec.strip()
    if spec == "all":
        return tuple(ENCODINGS)
    if spec == "default":
        return DEFAULT_ENCODINGS
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in ENCODINGS]
    if unknown or not names:
        raise ValueError(
            f"--encodings: unknown {', '.join(unknown) or '(empty)'}; use all, default or names from: "
            + ", ".join(ENCODINGS)
        )
    return names


# --- pixel layouts: from the composed RGB frames to what is stored, and what must come back ----------


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb.mean(axis=-1).round().astype(np.uint8) if rgb.ndim == 4 else rgb


def _to_bits(gray: np.ndarray, bits: int) -> np.ndarray:
    """8-bit grey to `bits` bits, rounded so that the usual linear display mapping
    (value / (2**bits - 1) * 255, rounded) gives the 8-bit grey back exactly."""
    top = (1 << bits) - 1
    return np.round(gray.astype(np.float64) * top / 255.0).astype(np.uint16)


def _ybr_full(rgb: np.ndarray) -> np.ndarray:
    """RGB to YBR_FULL (PS3.3 C.7.6.3.1.2)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    return np.clip(np.round(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def _ybr_full_422(rgb: np.ndarray) -> np.ndarray:
    """RGB to YBR_FULL with horizontally averaged chroma (what YBR_FULL_422 keeps), still full size."""
    ybr = _ybr_full(rgb).astype(np.float64)
    chroma = ybr[..., 1:]
    pairs = (chroma[..., 0::2, :] + chroma[..., 1::2, :]) / 2.0
    ybr[..., 1:] = np.repeat(pairs, 2, axis=-2)
    return np.clip(np.round(ybr), 0, 255).astype(np.uint8)


def _ybr_to_rgb(ybr: np.ndarray) -> np.ndarray:
    y, cb, cr = (ybr[..., i].astype(np.float64) for i in range(3))
    r = y + 1.402 * (cr - 128.0)
    g = y - 0.344136 * (cb - 128.0) - 0.714136 * (cr - 128.0)
    b = y + 1.772 * (cb - 128.0)
    return np.clip(np.round(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def palette(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices and a 256-entry, 16-bit palette for composed frames: 224 grey levels for the B-mode
    (and white text), 32 colours for the annotations, as scanners that export PALETTE COLOR do."""
    grey_levels = 224
    lut = np.zeros((256, 3), np.uint16)
    ramp = np.round(np.arange(grey_levels) * 255.0 / (grey_levels - 1)).astype(np.uint16)
    lut[:grey_levels] = ramp[:, None]
    key = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1).astype(np.int16)
    colours, counts = np.unique(key[spread > 24], return_counts=True)
    keys = np.sort(colours[np.argsort(-counts, kind="stable")[: 256 - grey_levels]])  # the 32 commonest
    uniq = np.stack([(keys >> 16) & 255, (keys >> 8) & 255, keys & 255], axis=-1).astype(np.uint16)
    lut[grey_levels : grey_levels + len(keys)] = uniq
    lut16 = lut * 257  # 8-bit to 16-bit entries: v * 257 >> 8 == v
    index = np.round(_gray(rgb).astype(np.float64) * (grey_levels - 1) / 255.0).astype(np.uint8)
    if len(keys):
        at = np.clip(np.searchsorted(keys, key), 0, len(keys) - 1)
        hit = keys[at] == key
        index[hit] = (grey_levels + at[hit]).astype(np.uint8)
    return index, lut16


@dataclass
class Stored:
    """The stored samples of every frame, and what a correct decoder returns as uint8 (display)."""

    samples: np.ndarray  # (T, H, W) or (T, H, W, 3), in the layout's colour space and bit depth
    reference: np.ndarray  # (T, H, W) grey or (T, H, W, 3) RGB, uint8
    lut: np.ndarray | None = None  # (256, 3) uint16 for PALETTE COLOR


def to_layout(rgb: np.ndarray, layout: Layout, native: bool = True) -> Stored:
    """Turn composed RGB frames into the layout's samples (the codec's input) and the reference.
    native False: a codec that does its own colour transform (JPEG baseline's YCbCr) takes RGB."""
    pi = layout.photometric
    if not native and pi.startswith("YBR"):
        return Stored(rgb, rgb)
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        gray = _gray(rgb)
        samples = gray if layout.bits_allocated == 8 else _to_bits(gray, layout.bits_stored)
        if pi == "MONOCHROME1":
            samples = ((1 << layout.bits_stored) - 1 - samples.astype(np.int64)).astype(samples.dtype)
        return Stored(samples, gray)
    if pi == "PALETTE COLOR":
        index, lut = palette(rgb)
        return Stored(index, (lut[index] >> 8).astype(np.uint8), lut)
    if pi == "RGB":
        return Stored(rgb, rgb)
    if pi == "YBR_FULL":  # the reference is what the stored YBR samples are in RGB
        ybr = _ybr_full(rgb)
        return Stored(ybr, _ybr_to_rgb(ybr))
    if pi == "YBR_FULL_422":  # ... after the chroma was halved horizontally
        ybr = _ybr_full_422(rgb)
        return Stored(ybr, _ybr_to_rgb(ybr))
    raise ValueError(f"no layout for {pi}")


# --- codecs: one function per family; each returns the Pixel Data value -----------------------------


def _native(stored: Stored, layout: Layout, enc: Encoding, fps: float) -> bytes:
    """Uncompressed: planar order, chroma packing and byte order as the transfer syntax says."""
    a = stored.samples
    if layout.photometric == "YBR_FULL_422":  # Y0 Y1 Cb Cr for each pair of pixels (PS3.3 C.7.6.3.1.2)
        t, h, w, _ = a.shape
        out = np.empty((t, h, w // 2, 4), np.uint8)
        out[..., 0], out[..., 1] = a[..., 0::2, 0], a[..., 1::2, 0]
        out[..., 2], out[..., 3] = a[..., 0::2, 1], a[..., 0::2, 2]
        a = out
    elif layout.samples == 3 and layout.planar == 1:
        a = a.transpose(0, 3, 1, 2)
    if layout.bits_allocated == 16:
        a = a.astype(">u2" if enc.transfer_syntax == ExplicitVRBigEndian else "<u2")
    data = np.ascontiguousarray(a).tobytes()
    return data + b"\x00" * (len(data) % 2)


def _pydicom(stored: Stored, layout: Layout, enc: Encoding, fps: float) -> bytes:
    """RLE, JPEG-LS and JPEG 2000 through pydicom's encoders (pylibjpeg-rle, pyjpegls, openjpeg)."""
    encoder = get_encoder(enc.transfer_syntax)
    opts = enc.opts
    if "j2k_cr" in opts:
        opts["j2k_cr"] = list(opts["j2k_cr"])  # type: ignore[call-overload]
    t = stored.samples.shape[0]
    kwargs = {
        "rows": stored.samples.shape[1],
        "columns": stored.samples.shape[2],
        "samples_per_pixel": layout.samples,
        "bits_allocated": layout.bits_allocated,
        "bits_stored": layout.bits_stored,
        "pixel_representation": 0,
        "photometric_interpretation": layout.photometric,
        "number_of_frames": 1,
        "planar_configuration": 0,
        **opts,
    }
    frames = [encoder.encode(stored.samples[i], **kwargs) for i in range(t)]
    return encapsulate(frames)


def _jpeg(stored: Stored, layout: Layout, enc: Encoding, fps: float) -> bytes:
    """JPEG baseline (process 1): YCbCr 4:2:2 or 4:4:4 through Pillow, RGB (no colour transform,
    an Adobe marker says so) and greyscale through libjpeg-turbo (imagecodecs)."""
    import imagecodecs

    quality = int(enc.opts.get("quality", 90))  # type: ignore[call-overload]
    pi = layout.photometric
    out = []
    for frame in stored.samples:
        if pi == "RGB":
            out.append(imagecodecs.jpeg8_encode(frame, level=quality, colorspace="RGB", outcolorspace="RGB"))
            continue
        buf = io.BytesIO()
        if pi == "MONOCHROME2":
            Image.fromarray(frame, "L").save(buf, format="JPEG", quality=quality)
        else:  # Pillow encodes RGB input as JFIF YCbCr; subsampling 1 is 4:2:2, 0 is 4:4:4
            sub = 1 if pi == "YBR_FULL_422" else 0
            Image.fromarray(frame, "RGB").save(buf, format="JPEG", quality=quality, subsampling=sub)
        out.append(buf.getvalue())
    return encapsulate(out)


def _jpeg_lossless(stored: Stored, layout: Layout, enc: Encoding, fps: float) -> bytes:
    """Lossless JPEG, process 14, first-order prediction (selection value 1), via libjpeg-turbo;
    colour is kept as RGB (no YCbCr transform, which would not be lossless)."""
    import imagecodecs

    out = []
    for frame in stored.samples:
        if layout.samples == 3:
            out.append(
                imagecodecs.jpeg8_encode(frame, lossless=True, predictor=1, colorspace="RGB", outcolorspace="RGB")
            )
        else:
            out.append(imagecodecs.jpeg8_encode(frame, lossless=True, predictor=1, bitspersample=layout.bits_stored))
    return encapsulate(out)


_VIDEO_CODECS = {
    "h264": ("libx264", {"profile": "high", "level": "4.1", "crf": "16", "preset": "veryfast", "bf": "0"}),
    "hevc": ("libx265", {"crf": "18", "preset": "ultrafast", "x265-params": "log-level=error:profile=main"}),
    "mpeg2video": ("mpeg2video", {"profile": "4", "level": "8", "qscale": "2", "g": "15", "bf": "2"}),
}


def video_stream(frames: np.ndarray, fps: float, fmt: str) -> bytes:
    """One elementary stream (H.264 Annex B, HEVC Annex B or MPEG-2 video) from RGB frames,
    BT.601 limited range 4:2:0, which is what YBR_PARTIAL_420 declares."""
    import av

    codec, options = _VIDEO_CODECS[fmt]
    t, h, w = frames.shape[:3]
    rgb = frames if frames.ndim == 4 else np.repeat(frames[..., None], 3, axis=-1)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = dict(options)
        stream.codec_context.color_range = 1  # MPEG (limited) range
        stream.codec_context.colorspace = 6  # SMPTE 170M (BT.601)
        if fmt == "mpeg2video":
            stream.codec_context.bit_rate = 8_000_000  # MP@ML allows up to 15 Mbit/s
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[i]), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU601", dst_color_range="MPEG")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _video(stored: Stored, layout: Layout, enc: Encoding, fps: float) -> bytes:
    """A video transfer syntax holds the whole stream; the Basic Offset Table is empty. The
    non-fragmentable syntaxes keep it in one fragment, the fragmentable ones split it."""
    stream = video_stream(stored.samples, fps, str(enc.opts["format"]))
    if len(stream) % 2:
        stream += b"\x00"  # trailing zero byte: allowed after the last NAL unit / start code
    size = int(enc.opts.get("fragment", 0))  # type: ignore[call-overload]
    if not size:
        return encapsulate([stream], has_bot=False)
    fragments = [stream[i : i + size] for i in range(0, len(stream), size)]
    return _items(fragments)


def _items(fragments: list[bytes]) -> bytes:
    """Encapsulated value: an empty Basic Offset Table item, then one item per fragment."""
    out = bytearray(b"\xfe\xff\x00\xe0\x00\x00\x00\x00")
    for f in fragments:
        if len(f) % 2:
            f += b"\x00"
        out += b"\xfe\xff\x00\xe0" + len(f).to_bytes(4, "little") + f
    return bytes(out)


CODECS: dict[str, Callable[[Stored, Layout, Encoding, float], bytes]] = {
    "native": _native,
    "pydicom": _pydicom,
    "jpeg": _jpeg,
    "jpeg_lossless": _jpeg_lossless,
    "video": _video,
}

_LOSSY_METHOD = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    MPEG4HP41: "ISO_14496_10",
    MPEG4HP41F: "ISO_14496_10",
    HEVCMP51: "ISO_23008_2",
    MPEG2MPML: "ISO_13818_2",
    MPEG2MPMLF: "ISO_13818_2",
}


def encode_pixels(ds: Dataset, rgb: np.ndarray, enc: Encoding, fps: float) -> np.ndarray:
    """Fill ds's Image Pixel module, Pixel Data and file meta for rgb (T, H, W, 3) uint8, stored as
    enc says. Returns the reference: what a correct decoder returns as uint8 (grey or RGB)."""
    layout = LAYOUTS[enc.layout]
    if enc.frame_rates and not any(math.isclose(fps, r) for r in enc.frame_rates):
        raise ValueError(f"{enc.name}: the stream must run at {enc.frame_rates} frames/s, not {fps:g}")
    stored = to_layout(rgb, layout, native=enc.codec == "native")
    n, rows, cols = rgb.shape[:3]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = layout.samples
    ds.PhotometricInterpretation = layout.photometric
    ds.BitsAllocated, ds.BitsStored = layout.bits_allocated, layout.bits_stored
    ds.HighBit, ds.PixelRepresentation = layout.bits_stored - 1, 0
    if layout.samples == 3:
        ds.PlanarConfiguration = layout.planar
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    if n > 1 or "NumberOfFrames" in ds:
        ds.NumberOfFrames = n
    if stored.lut is not None:
        ds.RedPaletteColorLookupTableDescriptor = [256, 0, 16]
        ds.GreenPaletteColorLookupTableDescriptor = [256, 0, 16]
        ds.BluePaletteColorLookupTableDescriptor = [256, 0, 16]
        order = ">u2" if enc.transfer_syntax == ExplicitVRBigEndian else "<u2"
        ds.RedPaletteColorLookupTableData = stored.lut[:, 0].astype(order).tobytes()
        ds.GreenPaletteColorLookupTableData = stored.lut[:, 1].astype(order).tobytes()
        ds.BluePaletteColorLookupTableData = stored.lut[:, 2].astype(order).tobytes()
    ds.PixelData = CODECS[enc.codec](stored, layout, enc, fps)
    ds["PixelData"].VR = "OW" if layout.bits_allocated > 8 and not enc.transfer_syntax.is_encapsulated else "OB"
    if enc.transfer_syntax.is_encapsulated:
        ds["PixelData"].is_undefined_length = True
    method = _LOSSY_METHOD.get(enc.transfer_syntax)
    if method:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = method
    elif "LossyImageCompression" in ds:
        del ds.LossyImageCompression
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = enc.transfer_syntax
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return stored.reference


# --- header forms -------------------------------------------------------------------------------


def frame_time_vector(ds: Dataset, n: int, frame_time_ms: float) -> None:
    """Frame Time Vector (first entry 0, then each interval) in place of Frame Time."""
    for keyword in ("FrameTime",):
        if keyword in ds:
            delattr(ds, keyword)
    ds.FrameTimeVector = [0.0] + [round(frame_time_ms, 3)] * (n - 1)
    ds.FrameIncrementPointer = 0x00181065


def undefined_lengths(ds: Dataset) -> None:
    """Every sequence and item of ds, nested ones included, written with undefined length."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True


def private_tags(ds: Dataset, manufacturer: str, patient_name: str, model: str) -> None:
    """A vendor's private block: creator, plain private elements, and a private sequence whose
    items hold a nested private sequence (acquisition settings, a copy of the patient's name and a
    raw blob, as real vendors store them)."""
    creator = f"{manufacturer.split()[0].upper()} US PRIVATE 1.0"
    block = ds.private_block(0x0009, creator, create=True)
    block.add_new(0x10, "LO", f"{model} PROBE 5-1")
    block.add_new(0x11, "DS", "0.72")
    block.add_new(0x12, "US", 3)
    inner = Dataset()
    inner_block = inner.private_block(0x0009, creator, create=True)
    inner_block.add_new(0x20, "LO", patient_name)  # vendors copy identity into private data too
    inner_block.add_new(0x21, "OB", bytes(range(32)))
    settings = Dataset()
    settings_block = settings.private_block(0x0009, creator, create=True)
    settings_block.add_new(0x18, "LO", "ADULT CARDIAC")
    settings_block.add_new(0x19, "SQ", Sequence([inner]))
    block.add_new(0x13, "SQ", Sequence([settings]))


def write_bytes(ds: Dataset, enc: Encoding) -> bytes:
    """The file's bytes: Part-10 (preamble, meta, data set in enc's transfer syntax), or for NO_META
    the bare implicit VR little endian data set an old PACS export holds."""
    buf = DicomBytesIO()
    if NO_META in enc.forms:
        bare = Dataset(ds)  # a shallow copy without the file meta and preamble
        bare.preamble = None
        if hasattr(bare, "file_meta"):
            del bare.file_meta
        dcmwrite(buf, bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        dcmwrite(buf, ds, enforce_file_format=True)
    return bytes(buf.getvalue())


__all__ = [
    "CODECS",
    "DEFAULT_ENCODINGS",
    "ENCODINGS",
    "FORMS",
    "LAYOUTS",
    "Encoding",
    "Layout",
    "Stored",
    "Tolerance",
    "encode_pixels",
    "frame_time_vector",
    "private_tags",
    "resolve",
    "to_layout",
    "undefined_lengths",
    "video_stream",
    "write_bytes",
]
