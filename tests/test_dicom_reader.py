"""The DICOM archive reader against every encoding, pixel layout and header form scanners and PACS exports write.

Each case is written with pydicom and the codec packages (imagecodecs, pyjpegls, pylibjpeg-openjpeg,
PyAV) into a folder of its own, scanned with DicomArchiveSource and decoded; decoded pixels are
compared with the source arrays: exactly for lossless encodings, within a stated mean (or maximum)
absolute error for lossy ones.
"""

from __future__ import annotations

import io
import itertools
import struct
from collections.abc import Callable
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    HEVCM10P51,
    HEVCMP51,
    JPEG2000,
    MPEG2MPHL,
    MPEG2MPML,
    MPEG4HP41,
    DeflatedExplicitVRLittleEndian,
    EnhancedUSVolumeStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MediaStorageDirectoryStorage,
    RLELossless,
    generate_uid,
)

from builders import us_cine
from fedecho.data.dicom import DicomArchiveSource
from fedecho.data.dicom_file import VIDEO_CODECS, read_file_header
from fedecho.data.records import Reason, VideoRecord

N, H, W = 6, 48, 64
H264_UIDS = sorted(uid for uid, codec in VIDEO_CODECS.items() if codec == "h264")


# ---------------------------------------------------------------------------------------------
# Source frames and expected display values


def gray8(n: int = N) -> np.ndarray:
    """Smooth enough for lossy codecs, varied enough that a wrong frame order or plane shows."""
    t, y, x = np.ogrid[:n, :H, :W]
    return np.clip(40 + 1.8 * x + 1.2 * y + 7 * t + 18 * np.sin(x / 6.0 + t), 0, 255).astype(np.uint8)


def rgb8(n: int = N) -> np.ndarray:
    g = gray8(n).astype(np.int16)
    return np.stack([g, 255 - g, np.clip(g // 2 + 60, 0, 255)], axis=-1).astype(np.uint8)


def stored16(n: int = N, bits: int = 12, signed: bool = False) -> np.ndarray:
    """Values over the whole Bits Stored range (signed: offset to negative), as int32."""
    t, y, x = np.ogrid[:n, :H, :W]
    v = (x * 53 + y * 31 + t * 97) % (1 << bits)
    return (v - (1 << (bits - 1)) if signed else v).astype(np.int32)


def scaled(v: np.ndarray, bits: int, signed: bool = False) -> np.ndarray:
    """What to_uint8 shows for stored values: offset to unsigned, Bits Stored range onto 0-255."""
    u = v.astype(np.float64) + ((1 << (bits - 1)) if signed else 0)
    return np.clip(np.round(u / ((1 << bits) - 1) * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Writing files


def cine(frames: np.ndarray, photometric: str = "MONOCHROME2", seed: str = "x", **extra: object) -> Dataset:
    ds = us_cine(frames if frames.dtype == np.uint8 else frames.astype(np.uint8), photometric, uid_seed=seed)
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def with_bits(ds: Dataset, values: np.ndarray, bits: int, signed: bool, ts: str = ExplicitVRLittleEndian) -> Dataset:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    dtype = (">" if ts == ExplicitVRBigEndian else "<") + ("i2" if signed else "u2")
    ds.PixelData = values.astype(dtype).tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def encapsulated(ds: Dataset, ts: str, codestreams: list[bytes], photometric: str | None = None) -> Dataset:
    ds.PixelData = encapsulate(codestreams)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ts
    if photometric:
        ds.PhotometricInterpretation = photometric
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def save_without_meta(ds: Dataset, path: Path, implicit: bool, little: bool) -> Path:
    """An old PACS export: the bare data set, no preamble, no 'DICM', no File Meta Information."""
    path.parent.mkdir(parents=True, exist_ok=True)
    del ds.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=little)
    path.write_bytes(buf.getvalue())
    return path


def regions(ds: Dataset, box: tuple[int, int, int, int] = (0, 0, W - 1, H - 1)) -> Dataset:
    """Sequence of Ultrasound Regions written as scanners write it: sequence and items of undefined length."""
    r = Dataset()
    r.RegionSpatialFormat = 1
    r.RegionDataType = 1
    r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = box
    r.is_undefined_length_sequence_item = True
    ds.SequenceOfUltrasoundRegions = Sequence([r])
    ds["SequenceOfUltrasoundRegions"].is_undefined_length = True
    return ds


def vendor_private(ds: Dataset) -> Dataset:
    """A vendor's private block: creators, a private SQ of undefined length nesting another, odd-group UN."""
    ds.add_new(0x00090010, "LO", "ACME ECHO 1.0")
    inner = Dataset()
    inner.add_new(0x00090010, "LO", "ACME ECHO 1.0")
    inner.add_new(0x00091001, "LO", "probe")
    inner.is_undefined_length_sequence_item = True
    outer = Dataset()
    outer.add_new(0x00090010, "LO", "ACME ECHO 1.0")
    outer.add_new(0x00091011, "SQ", Sequence([inner]))
    outer[0x00091011].is_undefined_length = True
    outer.add_new(0x00091012, "OB", b"\x01\x02\x03\x04")
    outer.is_undefined_length_sequence_item = True
    ds.add_new(0x00091010, "SQ", Sequence([outer]))
    ds[0x00091010].is_undefined_length = True
    ds.add_new(0x00110010, "LO", "ACME UN")
    ds.add_new(0x00111001, "UN", b"\x01\x02")
    return ds


# An undefined-length UN element (a private sequence written by a writer that did not know its VR):
# its items are in implicit VR little endian, one of them nesting a sequence of undefined length.
UN_SEQUENCE = (
    struct.pack("<HH2sHL", 0x0011, 0x1002, b"UN", 0, 0xFFFFFFFF)
    + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    + struct.pack("<HHL", 0x0011, 0x1003, 4)
    + b"ABCD"
    + struct.pack("<HHL", 0x0011, 0x1004, 0xFFFFFFFF)
    + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    + struct.pack("<HHL", 0x0011, 0x1005, 2)
    + b"xy"
    + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
)


def splice_un_sequence(path: Path) -> Path:
    """Insert UN_SEQUENCE right after the (0011,1001) UN element of an explicit VR little endian file."""
    data = path.read_bytes()
    anchor = struct.pack("<HH2sHL", 0x0011, 0x1001, b"UN", 0, 2) + b"\x01\x02"
    at = data.index(anchor) + len(anchor)
    path.write_bytes(data[:at] + UN_SEQUENCE + data[at:])
    return path


def jpeg8(frames: np.ndarray, **kw: object) -> list[bytes]:
    return [bytes(imagecodecs.jpeg8_encode(f, **kw)) for f in frames]


def video_stream(encoder: str, pix_fmt: str, frames: np.ndarray, **options: str) -> bytes:
    """An elementary stream (byte stream format) of the frames, as a scanner's video export holds it."""
    ctx = av.CodecContext.create(encoder, "w")
    ctx.width, ctx.height = W, H
    ctx.pix_fmt = pix_fmt
    ctx.time_base = Fraction(1, 25)
    ctx.framerate = Fraction(25, 1)
    ctx.options = {"x265-params": "log-level=error"} if encoder == "libx265" else options
    out = bytearray()
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(np.repeat(f[..., None], 3, -1), format="rgb24").reformat(format=pix_fmt)
        vf.pts = i
        for p in ctx.encode(vf):
            out += bytes(p)
    for p in ctx.encode(None):
        out += bytes(p)
    return bytes(out)


@cache
def encoded_video(encoder: str, pix_fmt: str) -> bytes:
    return video_stream(encoder, pix_fmt, gray8())


def video_cine(ts: str, stream: bytes, n_frames: int = N, seed: str = "video", main10: bool = False) -> Dataset:
    """The stream split over fragments at even offsets (only the last one padded), as DICOM requires."""
    cut = [0, (len(stream) // 3) & ~1, (2 * len(stream) // 3) & ~1, len(stream)]
    fragments = [stream[a:b] for a, b in itertools.pairwise(cut)]
    ds = encapsulated(cine(gray8(n_frames), seed=seed), ts, fragments, "YBR_PARTIAL_420")
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.NumberOfFrames = n_frames
    if main10:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 10, 9
    return ds


# ---------------------------------------------------------------------------------------------
# The cases: each writes one file and returns (expected frames, tolerance)

Exact = None
Case = Callable[[Path], tuple[np.ndarray, tuple[str, float] | None]]


def _rgb_as(photometric: str, planar: int = 0) -> Case:
    def build(p: Path) -> tuple[np.ndarray, tuple[str, float] | None]:
        src = rgb8()
        ds = cine(src, "RGB", seed=f"rgb{photometric}{planar}")
        tol: tuple[str, float] | None = Exact
        if photometric == "YBR_FULL":
            stored = convert_color_space(src, "RGB", "YBR_FULL")
            tol = ("max", 2)
        elif photometric == "YBR_FULL_422":
            ybr = convert_color_space(src, "RGB", "YBR_FULL").astype(np.int16)
            pairs = ybr.reshape(N, H, W // 2, 2, 3)
            y = pairs[..., 0]
            chroma = np.round(pairs[..., 1:].mean(axis=3)).astype(np.int16)  # Cb, Cr of each pixel pair
            stored = np.concatenate([y, chroma], axis=-1).astype(np.uint8)  # Y0 Y1 Cb Cr
            tol = ("mae", 2.0)
        else:
            stored = src
        if planar:
            stored = stored.transpose(0, 3, 1, 2)
        ds.PhotometricInterpretation, ds.PlanarConfiguration = photometric, planar
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        save(ds, p)
        return src, tol

    return build


def _mono(bits: int, signed: bool, photometric: str = "MONOCHROME2", ts: str = ExplicitVRLittleEndian) -> Case:
    def build(p: Path) -> tuple[np.ndarray, tuple[str, float] | None]:
        if bits == 8:
            values = gray8().astype(np.int32) - (128 if signed else 0)
            ds = cine(gray8(), photometric, seed=f"m{bits}{signed}{photometric}{ts}")
            ds.PixelRepresentation = int(signed)
            ds.PixelData = values.astype(np.int8 if signed else np.uint8).tobytes()
            ds.file_meta.TransferSyntaxUID = ts
            expected = scaled(values, 8, signed) if signed else gray8()
        else:
            values = stored16(bits=bits, signed=signed)
            ds = with_bits(
                cine(gray8(), photometric, seed=f"m{bits}{signed}{photometric}{ts}"), values, bits, signed, ts
            )
            expected = scaled(values, bits, signed)
        save(ds, p)
        return (255 - expected if photometric == "MONOCHROME1" else expected), Exact

    return build


def _palette(entry_bits: int) -> Case:
    def build(p: Path) -> tuple[np.ndarray, tuple[str, float] | None]:
        idx = np.arange(256)
        lut = np.stack([idx, np.full(256, 77), 255 - idx], -1).astype(np.uint8)  # red ramp, green flat, blue down
        data = lut.astype(np.uint16) * 257 if entry_bits == 16 else lut
        tables = {}
        for i, colour in enumerate(("Red", "Green", "Blue")):
            tables[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, entry_bits]
            tables[f"{colour}PaletteColorLookupTableData"] = (
                np.ascontiguousarray(data[:, i]).astype("<u2" if entry_bits == 16 else "u1").tobytes()
            )
        save(cine(gray8(), "PALETTE COLOR", seed=f"pal{entry_bits}", **tables), p)
        return lut[gray8()], Exact

    return build


def _native(ts: str) -> Case:
    def build(p: Path) -> tuple[np.ndarray, tuple[str, float] | None]:
        ds = cine(gray8(), seed=f"native{ts}")
        ds.file_meta.TransferSyntaxUID = ts
        save(ds, p)
        return gray8(), Exact

    return build


def _compressed(ts: str, source: str, **opts: object) -> Case:
    """Through pydicom's own encoders: RLE, JPEG-LS (pyjpegls), JPEG 2000 (pylibjpeg-openjpeg)."""

    def build(p: Path) -> tuple[np.ndarray, tuple[str, float] | None]:
        photometric = str(opts.pop("photometric", "")) if "photometric" in opts else ""
        tol = opts.pop("tol", Exact)
        if source == "rgb":
            ds, arr, expected = cine(rgb8(), "RGB", seed=f"c{ts}{photometric}"), rgb8(), rgb8()
        elif source == "gray16":
            values = stored16(bits=12)
            ds = with_bits(cine(gray8(), seed=f"c16{ts}"), values, 12, False)
            arr, expected = values.astype(np.uint16), scaled(values, 12)
        else:
            ds, arr, expected = cine(gray8(), seed=f"c{ts}"), gray8(), gray8()
        kwargs = dict(opts)
        if photometric:
            kwargs["photometric_interpretation"] = photometric
        ds.compress(ts, arr, **kwargs)
        save(ds, p)
        return expected, tol  # type: ignore[return-value]

    return build


def _jpeg(ts: str, source: str, photometric: str, tol: tuple[str, float] | None, **kw: object) -> Case:
    """JPEG processes through libjpeg-turbo (imagecodecs): baseline, extended 12-bit, lossless."""

    def build(p: Path) -> tuple[np.ndarray, tuple[str, float] | None]:
        if source == "rgb":
            ds, arr, expected = cine(rgb8(), "RGB", seed=f"j{ts}{photometric}"), rgb8(), rgb8()
        elif source == "gray16":
            values = stored16(bits=12)
            ds = with_bits(cine(gray8(), seed=f"j16{ts}"), values, 12, False)
            arr, expected = values.astype(np.uint16), scaled(values, 12)
        else:
            ds, arr, expected = cine(gray8(), seed=f"j{ts}"), gray8(), gray8()
        save(encapsulated(ds, ts, jpeg8(arr, **kw), photometric), p)
        return expected, tol

    return build


def _htj2k(p: Path) -> tuple[np.ndarray, tuple[str, float] | None]:
    codestreams = [bytes(imagecodecs.htj2k_encode(f)) for f in gray8()]
    save(encapsulated(cine(gray8(), seed="htj2k"), HTJ2KLossless, codestreams), p)
    return gray8(), Exact


def _video(ts: str, encoder: str, pix_fmt: str = "yuv420p") -> Case:
    def build(p: Path) -> tuple[np.ndarray, tuple[str, float] | None]:
        save(video_cine(ts, encoded_video(encoder, pix_fmt), main10=pix_fmt != "yuv420p", seed=f"v{ts}"), p)
        return np.repeat(gray8()[..., None], 3, -1), ("mae", 3.0 if pix_fmt != "yuv420p" else 2.0)

    return build


CASES: dict[str, Case] = {
    # transfer syntaxes, native
    "implicit_vr_little_endian": _native(ImplicitVRLittleEndian),
    "explicit_vr_little_endian": _native(ExplicitVRLittleEndian),
    "explicit_vr_big_endian_16bit": _mono(16, False, ts=ExplicitVRBigEndian),
    "explicit_vr_big_endian_8bit": _native(ExplicitVRBigEndian),
    "deflated_explicit_vr_little_endian": _native(DeflatedExplicitVRLittleEndian),
    # pixel layouts
    "monochrome1_8bit": _mono(8, False, "MONOCHROME1"),
    "monochrome1_16bit_signed": _mono(16, True, "MONOCHROME1"),
    "monochrome2_8bit_signed": _mono(8, True),
    "monochrome2_16bit_unsigned": _mono(16, False),
    "monochrome2_16bit_signed": _mono(16, True),
    "rgb_planar_0": _rgb_as("RGB", 0),
    "rgb_planar_1": _rgb_as("RGB", 1),
    "ybr_full_native": _rgb_as("YBR_FULL"),
    "ybr_full_422_native": _rgb_as("YBR_FULL_422"),
    "palette_8bit_entries": _palette(8),
    "palette_16bit_entries": _palette(16),
    # RLE
    "rle_monochrome2_8bit": _compressed(RLELossless, "gray"),
    "rle_monochrome2_16bit": _compressed(RLELossless, "gray16"),
    "rle_rgb": _compressed(RLELossless, "rgb"),
    # JPEG
    "jpeg_baseline_monochrome2": _jpeg(JPEGBaseline8Bit, "gray", "MONOCHROME2", ("mae", 1.0), level=95),
    "jpeg_baseline_ybr_full_422": _jpeg(
        JPEGBaseline8Bit, "rgb", "YBR_FULL_422", ("mae", 1.5), level=95, subsampling="422"
    ),
    "jpeg_baseline_ybr_full": _jpeg(JPEGBaseline8Bit, "rgb", "YBR_FULL", ("mae", 1.5), level=95, subsampling="444"),
    "jpeg_baseline_rgb": _jpeg(JPEGBaseline8Bit, "rgb", "RGB", ("mae", 1.0), level=95, outcolorspace="RGB"),
    "jpeg_extended_12bit": _jpeg(JPEGExtended12Bit, "gray16", "MONOCHROME2", ("mae", 1.0), level=95, bitspersample=12),
    "jpeg_lossless_sv1_8bit": _jpeg(JPEGLosslessSV1, "gray", "MONOCHROME2", Exact, lossless=True, predictor=1),
    "jpeg_lossless_sv1_16bit": _jpeg(
        JPEGLosslessSV1, "gray16", "MONOCHROME2", Exact, lossless=True, predictor=1, bitspersample=12
    ),
    "jpeg_lossless_sv1_rgb": _jpeg(JPEGLosslessSV1, "rgb", "RGB", Exact, lossless=True, predictor=1),
    "jpeg_lossless_process14_predictor6": _jpeg(JPEGLossless, "gray", "MONOCHROME2", Exact, lossless=True, predictor=6),
    # JPEG-LS
    "jpegls_lossless_8bit": _compressed(JPEGLSLossless, "gray"),
    "jpegls_lossless_16bit": _compressed(JPEGLSLossless, "gray16"),
    "jpegls_lossless_rgb": _compressed(JPEGLSLossless, "rgb"),
    "jpegls_near_lossless": _compressed(JPEGLSNearLossless, "gray", jls_error=2, tol=("max", 2)),
    # JPEG 2000
    "j2k_lossless_8bit": _compressed(JPEG2000Lossless, "gray"),
    "j2k_lossless_16bit": _compressed(JPEG2000Lossless, "gray16"),
    "j2k_lossless_ybr_rct": _compressed(JPEG2000Lossless, "rgb", photometric="YBR_RCT"),
    "j2k_lossy": _compressed(JPEG2000, "gray", j2k_cr=[8], tol=("mae", 1.0)),
    "j2k_lossy_ybr_ict": _compressed(JPEG2000, "rgb", photometric="YBR_ICT", j2k_cr=[8], tol=("mae", 1.0)),
    "htj2k_lossless": _htj2k,
    # video
    "mpeg2_main_profile_main_level": _video(MPEG2MPML, "mpeg2video"),
    "mpeg2_main_profile_high_level": _video(MPEG2MPHL, "mpeg2video"),
    **{f"h264_{uid}": _video(uid, "libx264") for uid in H264_UIDS},
    "hevc_main": _video(HEVCMP51, "libx265"),
    "hevc_main_10": _video(HEVCM10P51, "libx265", "yuv420p10le"),
}


def scan_one(root: Path, **options: object) -> tuple[DicomArchiveSource, VideoRecord]:
    src = DicomArchiveSource(root, min_frames=2, **options)
    result = src.scan()
    assert not result.problems, [str(p) for p in result.problems]
    assert len(result.records) == 1
    return src, result.records[0]


def decoded(src: DicomArchiveSource, record: VideoRecord) -> np.ndarray:
    return np.stack(list(src.frames(record)))


def assert_close(got: np.ndarray, expected: np.ndarray, tol: tuple[str, float] | None, name: str) -> None:
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    err = np.abs(got.astype(np.int32) - expected.astype(np.int32))
    if tol is None:
        assert np.array_equal(got, expected), f"{name}: {int((err > 0).sum())} pixels differ (max {err.max()})"
    elif tol[0] == "max":
        assert err.max() <= tol[1], f"{name}: max abs error {err.max()} > {tol[1]}"
    else:
        assert err.mean() <= tol[1], f"{name}: mean abs error {err.mean():.3f} > {tol[1]}"


@pytest.mark.parametrize("name", list(CASES))
def test_every_encoding_registers_and_decodes(tmp_path: Path, name: str) -> None:
    expected, tol = CASES[name](tmp_path / f"{name}.dcm")
    src, record = scan_one(tmp_path)
    assert record.n_frames == N and record.fps == pytest.approx(50.0)
    assert_close(decoded(src, record), expected, tol, name)


# ---------------------------------------------------------------------------------------------
# Header forms


@pytest.mark.parametrize(
    ("ts", "implicit"),
    [(ExplicitVRLittleEndian, False), (ImplicitVRLittleEndian, True), (ExplicitVRBigEndian, False)],
    ids=["explicit_le", "implicit_le", "explicit_be"],
)
def test_undefined_length_sequences_and_vendor_private_tags(tmp_path: Path, ts: str, implicit: bool) -> None:
    """Regions, private creators, nested private SQs and UN of undefined length: the tissue region crops,
    the truncation and frame-count checks still hold."""
    box = (8, 4, 55, 43)
    ds = vendor_private(regions(cine(gray8(), seed=f"seq{ts}"), box))
    ds.file_meta.TransferSyntaxUID = ts
    path = save(ds, tmp_path / "a" / "cine.dcm")
    if ts == ExplicitVRLittleEndian:
        splice_un_sequence(path)
        assert read_file_header(path).ds[0x00111002].VR in ("SQ", "UN")
    src, record = scan_one(tmp_path / "a")
    x0, y0, x1, y1 = box
    assert np.array_equal(decoded(src, record), gray8()[:, y0 : y1 + 1, x0 : x1 + 1])

    # Number of Frames says 8 for 6 frames of data: a mismatch, not a truncation or an unreadable file.
    ds.NumberOfFrames = 8
    save(ds, tmp_path / "b" / "count.dcm")
    # Cut inside the pixel data, and cut inside the undefined-length region sequence.
    blob = path.read_bytes()
    (tmp_path / "b" / "cut_pixels.dcm").write_bytes(blob[:-500])
    region_at = blob.index(struct.pack("<HH" if ts != ExplicitVRBigEndian else ">HH", 0x0018, 0x6011))
    (tmp_path / "b" / "cut_sequence.dcm").write_bytes(blob[: region_at + 30])
    problems = {p.path: p.reason for p in DicomArchiveSource(tmp_path / "b", min_frames=2).scan().problems}
    assert problems == {
        "count.dcm": Reason.FRAME_COUNT_MISMATCH,
        "cut_pixels.dcm": Reason.TRUNCATED,
        "cut_sequence.dcm": Reason.TRUNCATED,
    }


@pytest.mark.parametrize(
    ("form", "implicit", "little"),
    [
        ("no_preamble", None, None),
        ("no_meta_implicit_le", True, True),
        ("no_meta_explicit_le", False, True),
        ("no_meta_explicit_be", False, False),
    ],
)
def test_files_without_preamble_or_file_meta(tmp_path: Path, form: str, implicit: bool, little: bool) -> None:
    """Old PACS exports: recognised by content (no 'DICM' at 128, no .dcm suffix), transfer syntax inferred."""
    values = stored16(bits=10)
    ds = regions(with_bits(cine(gray8(), seed=form), values, 10, False))
    path = tmp_path / "IM000001"
    if form == "no_preamble":
        save(ds, path)
        path.write_bytes(path.read_bytes()[132:])
    else:
        if not little:
            ds.PixelData = values.astype(">u2").tobytes()
        save_without_meta(ds, path, implicit, little)
    assert path.read_bytes()[128:132] != b"DICM"
    assert DicomArchiveSource.detect(tmp_path)
    src, record = scan_one(tmp_path)
    expected_ts = {
        (True, True): ImplicitVRLittleEndian,
        (False, True): ExplicitVRLittleEndian,
        (False, False): ExplicitVRBigEndian,
    }.get((implicit, little), ExplicitVRLittleEndian)
    assert record.meta["transfer_syntax"] == expected_ts
    assert record.meta["transfer_syntax_inferred"] == (form != "no_preamble")
    assert np.array_equal(decoded(src, record), scaled(values, 10))


def test_encapsulated_file_without_meta_infers_the_codec(tmp_path: Path) -> None:
    ds = encapsulated(cine(gray8(), seed="nometa-jpeg"), JPEGLosslessSV1, jpeg8(gray8(), lossless=True, predictor=1))
    ds["PixelData"].is_undefined_length = True  # without a transfer syntax pydicom cannot know to encapsulate
    save_without_meta(ds, tmp_path / "export" / "IMG1", implicit=False, little=True)
    src, record = scan_one(tmp_path / "export")
    assert record.meta["transfer_syntax"] == JPEGLossless  # process 14 (any predictor) decodes SV1
    assert np.array_equal(decoded(src, record), gray8())


def test_frame_time_vector_dicomdir_and_3d_volume(tmp_path: Path) -> None:
    ds = cine(gray8(), seed="ftv")
    del ds.FrameTime
    ds.FrameTimeVector = [0, 25, 25, 25, 25, 25]
    ds.FrameIncrementPointer = 0x00181065
    save(ds, tmp_path / "ftv.dcm")
    # A DICOMDIR, by name and under another name: the archive's index, not a bad file.
    index = Dataset()
    index.FileSetID = "ECHO"
    index.DirectoryRecordSequence = Sequence()
    index["DirectoryRecordSequence"].is_undefined_length = True
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    index.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    save(index, tmp_path / "DICOMDIR")
    save(index, tmp_path / "sub" / "INDEX")
    # An Enhanced US Volume: 3-D, never a cine.
    vol = cine(gray8(), seed="vol")
    vol.SOPClassUID = vol.file_meta.MediaStorageSOPClassUID = EnhancedUSVolumeStorage
    vol.DimensionOrganizationType = "3D"
    save(vol, tmp_path / "volume.dcm")
    result = DicomArchiveSource(tmp_path, min_frames=2).scan()
    assert [(p.path, p.reason) for p in result.problems] == [("volume.dcm", Reason.VOLUME_3D)]
    assert [r.key for r in result.records] == ["ftv.dcm"]
    assert result.records[0].fps == pytest.approx(40.0)


# ---------------------------------------------------------------------------------------------
# Every file its true reason


def _corrupt_cod(codestream: bytes) -> bytes:
    """A JPEG 2000 codestream whose markers are all in place but whose COD asks for 200 decomposition
    levels (at most 32 exist): sound to a structural check, undecodable to the decoder."""
    i = codestream.index(b"\xff\x52")
    return codestream[: i + 9] + bytes([200]) + codestream[i + 10 :]


def test_every_file_gets_its_true_reason(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    save(regions(cine(gray8(), seed="good")), root / "good.dcm")
    save(regions(cine(gray8(2), seed="two")), root / "two_frames.dcm")  # a 2-frame cine
    save(regions(cine(gray8(1), seed="one")), root / "still.dcm")
    idx = np.arange(256)
    lut = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 8] for c in ("Red", "Green", "Blue")} | {
        f"{c}PaletteColorLookupTableData": idx.astype(np.uint8).tobytes() for c in ("Red", "Green", "Blue")
    }
    save(regions(cine(gray8(3), "PALETTE COLOR", seed="pal3", **lut)), root / "palette_short.dcm")
    short_j2k = regions(cine(gray8(3), seed="j2k3"))
    short_j2k.compress(JPEG2000Lossless)
    save(short_j2k, root / "j2k_short.dcm")
    save(regions(cine(rgb8(3), "RGB", seed="rgb3")), root / "rgb_short.dcm")
    # Encapsulated frame counts: 5 codestreams for Number of Frames 6.
    save(
        encapsulated(cine(gray8(), seed="five"), JPEGBaseline8Bit, jpeg8(gray8(5), level=90), "MONOCHROME2"),
        root / "five_of_six.dcm",
    )
    # Frame 3's JPEG marker segment runs past its end; frame 3 encoded at the wrong size.
    streams = jpeg8(gray8(), level=90)
    save(
        encapsulated(
            cine(gray8(), seed="jbroken"),
            JPEGBaseline8Bit,
            [*streams[:2], b"\xff\xd8\xff\xe0\x13\x13" + b"\x00" * 64, *streams[3:]],
        ),
        root / "jpeg_frame3_damaged.dcm",
    )
    wrong = jpeg8(np.ascontiguousarray(gray8()[:, :40]), level=90)
    save(
        encapsulated(cine(gray8(), seed="jsize"), JPEGBaseline8Bit, [*streams[:2], wrong[2], *streams[3:]]),
        root / "jpeg_frame3_wrong_size.dcm",
    )
    # A JPEG 2000 frame whose markers are sound but that the decoder cannot decode.
    j2k = cine(gray8(), seed="j2kbad")
    j2k.compress(JPEG2000Lossless)
    frames = [bytes(imagecodecs.jpeg2k_encode(f, level=0)) for f in gray8()]
    frames[2] = _corrupt_cod(frames[2])
    save(encapsulated(j2k, JPEG2000Lossless, frames), root / "j2k_frame3_undecodable.dcm")
    # RLE frame 2's segment offset points past the frame.
    rle = cine(gray8(), seed="rlebad")
    rle.compress(RLELossless)
    rle_frames = list(generate_frames(rle.PixelData, number_of_frames=N))
    rle_frames[1] = struct.pack("<LL", 1, 1 << 20) + rle_frames[1][8:]  # its one segment lies past its end
    save(encapsulated(rle, RLELossless, rle_frames), root / "rle_frame2_segments.dcm")
    # A cut encapsulated file, a cut video, an H.264 stream that is not one.
    cut = save(encapsulated(cine(gray8(), seed="jcut"), JPEGBaseline8Bit, streams), root / "jpeg_cut.dcm")
    cut.write_bytes(cut.read_bytes()[: -len(streams[-1]) // 2])
    save(encapsulated(cine(gray8(), seed="h264zero"), MPEG4HP41, [b"\x00" * 16]), root / "h264_garbage.dcm")
    save(video_cine(MPEG4HP41, encoded_video("libx264", "yuv420p"), 8, seed="h264eight"), root / "h264_8_of_6.dcm")
    deflated = cine(gray8(), seed="deflcut")
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated_cut = save(deflated, root / "deflated_cut.dcm")
    deflated_cut.write_bytes(deflated_cut.read_bytes()[:-200])
    private_ts = cine(gray8(), seed="privts")
    private_ts.file_meta.TransferSyntaxUID = "1.3.6.1.4.1.99999.1.2"
    private_ts.save_as(root / "private_ts.dcm", implicit_vr=False, little_endian=True, enforce_file_format=True)
    # Headers: bits allocated 12, a VR that is not one, no pixel data, ARGB, not ultrasound, garbage.
    save(cine(gray8(), seed="bits", BitsAllocated=12), root / "bits12.dcm")
    bad_vr = save(cine(gray8(), seed="badvr"), root / "bad_vr.dcm")
    data = bad_vr.read_bytes()
    at = data.index(struct.pack("<HH", 0x0008, 0x0060) + b"CS")
    bad_vr.write_bytes(data[: at + 4] + b"Z!" + data[at + 6 :])
    no_pixels = cine(gray8(), seed="nopix")
    del no_pixels.PixelData
    save(no_pixels, root / "no_pixels.dcm")
    save(cine(gray8(), "ARGB", seed="argb"), root / "argb.dcm")
    save(cine(gray8(), seed="ct", Modality="DOE", SOPClassUID="1.2.840.10008.5.1.4.1.1.2"), root / "ct.dcm")
    (root / "notes.dcm").write_bytes(b"\x00" * 64 + b"definitely not DICOM")
    (root / "README").write_text("exported from the PACS on Monday\n")
    (root / "empty.dcm").write_bytes(b"")

    src = DicomArchiveSource(root, min_frames=4)
    result = src.scan()
    reasons = {p.path: p.reason for p in result.problems}
    assert reasons == {
        "two_frames.dcm": Reason.TOO_FEW_FRAMES,
        "still.dcm": Reason.SINGLE_FRAME,
        "palette_short.dcm": Reason.TOO_FEW_FRAMES,
        "j2k_short.dcm": Reason.TOO_FEW_FRAMES,
        "rgb_short.dcm": Reason.TOO_FEW_FRAMES,
        "five_of_six.dcm": Reason.FRAME_COUNT_MISMATCH,
        "jpeg_cut.dcm": Reason.TRUNCATED,
        "deflated_cut.dcm": Reason.TRUNCATED,
        "private_ts.dcm": Reason.UNSUPPORTED_TRANSFER_SYNTAX,
        "h264_garbage.dcm": Reason.CORRUPT_PIXEL_DATA,
        "bits12.dcm": Reason.BAD_HEADER,
        "bad_vr.dcm": Reason.BAD_HEADER,
        "no_pixels.dcm": Reason.NO_PIXEL_DATA,
        "argb.dcm": Reason.UNSUPPORTED_PIXEL_FORMAT,
        "ct.dcm": Reason.NOT_ULTRASOUND,
        "notes.dcm": Reason.NOT_DICOM,
        "README": Reason.NOT_DICOM,
        "empty.dcm": Reason.EMPTY,
    }
    # Decoding tells a damaged codestream from a decoder that fails on a sound one.
    failures = {}
    for record in result.records:
        try:
            decoded(src, record)
        except Exception as e:  # BadFile: the reason and its detail
            failures[record.key] = (getattr(e, "reason", None), getattr(e, "detail", repr(e)))
    assert sorted(r.key for r in result.records) == sorted(["good.dcm", *failures])
    assert {k: v[0] for k, v in failures.items()} == {
        "jpeg_frame3_damaged.dcm": Reason.CORRUPT_PIXEL_DATA,
        "jpeg_frame3_wrong_size.dcm": Reason.CORRUPT_PIXEL_DATA,
        "j2k_frame3_undecodable.dcm": Reason.DECODE_ERROR,
        "rle_frame2_segments.dcm": Reason.CORRUPT_PIXEL_DATA,
        "h264_8_of_6.dcm": Reason.FRAME_COUNT_MISMATCH,
    }
    assert failures["jpeg_frame3_damaged.dcm"][1].startswith("frame 3: a JPEG marker segment runs past")
    assert "64 x 40 pixels" in failures["jpeg_frame3_wrong_size.dcm"][1]
    assert failures["j2k_frame3_undecodable.dcm"][1].startswith(
        "JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90) via "
    )
    assert "pylibjpeg-openjpeg" in failures["j2k_frame3_undecodable.dcm"][1]
    assert "frame 3 does not decode" in failures["j2k_frame3_undecodable.dcm"][1]
    assert failures["rle_frame2_segments.dcm"][1] == (
        "frame 2: the RLE segment offsets are out of order or past the end of the frame"
    )
    assert failures["h264_8_of_6.dcm"][1] == "Number of Frames is 8 but 6 frames decoded"
    # Details name tags, codecs and counts: never a header value.
    details = [p.detail for p in result.problems] + [d for _, d in failures.values()]
    assert not [d for d in details if "TEST^PATIENT" in d or "P1" in d.split() or "DOE" in d]


def test_site_ingest_registers_what_the_reader_registers(tmp_path: Path) -> None:
    """`data add` reads headers through the reader too: an export without File Meta Information
    and a video cine are registered, not quarantined as unreadable."""
    from fedecho.data.ingest import ingest

    root, n = tmp_path / "archive", 12  # site ingest keeps cines of 8 frames or more
    save_without_meta(regions(cine(gray8(n), seed="ing-nometa")), root / "IM000001", implicit=True, little=True)
    stream = video_stream("libx264", "yuv420p", gray8(n))
    save(regions(video_cine(MPEG4HP41, stream, n, seed="ing-h264")), root / "h264.dcm")
    result = ingest(root, tmp_path / "site", progress=False)
    assert [(q.path, q.reason) for q in result.quarantined] == []
    assert len(result.added) == 2 and result.frames == 2 * n
