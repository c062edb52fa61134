"""The shortcuts registration takes for speed give the frames the plain computation gives.

Each fast path (uint8 frames) is checked against the general one the same function keeps for other
inputs (np.median over time, boolean assignment, whole-video arithmetic, per-frame float scaling), on
gray and colour cines, odd and even sample counts, and tests that sit at their limits; the lossless
JPEG and JPEG-LS decoder against pydicom's own plugins, on phantom files of every such encoding."""

from __future__ import annotations

from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pytest
from pydicom.dataset import Dataset

from fedecho.data import lossless, open_source
from fedecho.data.cache import decode_video
from fedecho.data.clips import gray_frames, to_uint8_gray_or_rgb
from fedecho.data.dicom_file import to_uint8
from fedecho.privacy.deid import _median_change, _row_ends, blank_outside_sector, motion_map
from fedecho.synth import synthesize


def _sector_cine(rng: np.random.Generator, t: int, colour: bool) -> np.ndarray:
    """(t, 60, 80[, 3]) uint8: moving speckle in a disc, static text-like blocks around it."""
    y, x = np.mgrid[0:60, 0:80]
    disc = np.hypot(x - 40, y - 28) < 22
    frames = np.zeros((t, 60, 80), np.uint8)
    frames[:, disc] = rng.integers(0, 256, (t, int(disc.sum())), dtype=np.uint8)
    frames[:, 52:58, 2:30] = 200  # burned-in text, static
    if not colour:
        return frames
    out = np.repeat(frames[..., None], 3, -1)
    out[:, 2:8, 60:78] = (230, 220, 60)  # a yellow label, static
    return out


@pytest.mark.parametrize("t", [2, 3, 4, 17, 32, 33, 64, 70])
@pytest.mark.parametrize("colour", [False, True])
def test_motion_median_is_numpy_median(t: int, colour: bool) -> None:
    rng = np.random.default_rng(t)
    frames = rng.integers(0, 256, (t, 23, 31, 3) if colour else (t, 23, 31), dtype=np.uint8)
    idx = np.unique(np.linspace(0, t - 1, min(t, 32)).round().astype(int))
    sample = frames[idx]
    level = sample.sum(-1, dtype=np.int32) if colour else sample.astype(np.int32)
    expected = np.median(np.abs(np.diff(level, axis=0)), axis=0).astype(np.float32)
    got = _median_change(frames, idx)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    # motion_map's uint8 path and its general path (any other sample type) agree
    assert np.array_equal(motion_map(frames), motion_map(frames.astype(np.int16)))


@pytest.mark.parametrize("colour", [False, True])
def test_blanking_fast_path_keeps_the_same_pixels(colour: bool) -> None:
    """uint8 frames (median network, one multiply) against float frames (np.median, assignment)."""
    frames = _sector_cine(np.random.default_rng(1), 24, colour)
    for region in (None, [(10, 4, 70, 50)]):
        fast, how = blank_outside_sector(frames, region)
        slow, how_slow = blank_outside_sector(frames.astype(np.float32), region)
        assert how == how_slow and fast.dtype == np.uint8 and np.array_equal(fast, slow.astype(np.uint8))


def _gray_reference(frames: np.ndarray, tolerance: int = 8, fraction: float = 1e-3) -> np.ndarray:
    """to_uint8_gray_or_rgb as whole-video arithmetic."""
    f = frames.astype(np.int16)
    spread = np.maximum(np.abs(f[..., 0] - f[..., 1]), np.abs(f[..., 0] - f[..., 2]))
    if np.count_nonzero(spread > tolerance) < fraction * spread.size:
        return ((f.sum(-1) + 1) // 3).astype(np.uint8)
    return frames


def test_gray_test_frame_by_frame_decides_as_the_whole_video() -> None:
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (12, 40, 50, 1), dtype=np.uint8)
    base = np.clip(np.repeat(gray, 3, -1).astype(np.int16) + rng.integers(-4, 5, (12, 40, 50, 3)), 0, 255)
    limit = int(np.ceil(1e-3 * base[..., 0].size))  # differing pixels that make a video colour: 24
    cases = {"gray with chroma noise": base}
    for n, name in ((limit - 1, "just under the limit"), (limit, "at the limit")):
        v = base.copy()
        where = rng.choice(base[..., 0].size, n, replace=False)
        v.reshape(-1, 3)[where, 1] = (v.reshape(-1, 3)[where, 0] + 100) % 256
        cases[name] = v
    late = base.copy()
    late[-1, :10, :10] = (255, 0, 0)  # colour only in the last frame
    cases["colour in the last frame"] = late
    cases["colour"] = rng.integers(0, 256, (5, 20, 30, 3))
    decisions = {}
    for name, v in cases.items():
        v = v.astype(np.uint8)
        expected = _gray_reference(v)
        got = to_uint8_gray_or_rgb(v)
        assert got.shape == expected.shape and np.array_equal(got, expected), name
        listed = gray_frames(list(v))
        assert (listed is None) == (expected.ndim == 4), name
        assert listed is None or np.array_equal(listed, expected), name
        decisions[name] = "colour" if got.ndim == 4 else "gray"
    assert decisions == {
        "gray with chroma noise": "gray",
        "just under the limit": "gray",
        "at the limit": "colour",
        "colour in the last frame": "colour",
        "colour": "colour",
    }


def test_every_rgb_triple_averages_as_rounded_mean() -> None:
    v = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], -1).astype(np.uint8).reshape(1, 4096, 4096, 3)
    got = gray_frames(rgb, tolerance=255)  # nothing counts as colour: every triple is averaged
    assert got is not None
    assert np.array_equal(got[0].reshape(-1), np.round(rgb.reshape(-1, 3).sum(-1) / 3).astype(np.uint8))


class _Source:
    """An EchoSource stand-in that yields given frames (decode_video reads nothing else from it)."""

    def __init__(self, frames: list[np.ndarray]):
        self._frames = frames

    def frames(self, record: object) -> list[np.ndarray]:
        return self._frames


@pytest.mark.parametrize("colour", [False, True])
def test_decode_video_gray_shortcut(colour: bool) -> None:
    frames = _sector_cine(np.random.default_rng(3), 10, True)
    if not colour:
        frames[:, 2:8, 60:78] = 120  # the label gray too: a grayscale cine in RGB clothing
    got = decode_video(_Source(list(frames)), None, None)  # type: ignore[arg-type]
    expected = _gray_reference(frames)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert got.ndim == (4 if colour else 3)


def test_hull_from_row_ends_is_the_hull_of_every_pixel() -> None:
    rng = np.random.default_rng(4)
    for _ in range(300):
        h, w = rng.integers(1, 50, 2)
        area = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if rng.random() < 0.5:
            area = cv2.morphologyEx(area, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        if not area.any():
            continue
        assert np.array_equal(cv2.convexHull(_row_ends(area > 0)), cv2.convexHull(cv2.findNonZero(area)))


def _header(photometric: str, bits: int) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.BitsStored = bits
    return ds


def _palette(entries: int, bits: int) -> Dataset:
    ds = _header("PALETTE COLOR", 8)
    rng = np.random.default_rng(entries + bits)
    dtype = np.uint8 if bits == 8 else np.uint16
    for c in ("Red", "Green", "Blue"):
        setattr(ds, f"{c}PaletteColorLookupTableDescriptor", [entries, 5, bits])
        lut = rng.integers(0, 1 << bits, entries, dtype=np.int64).astype(dtype)
        setattr(ds, f"{c}PaletteColorLookupTableData", lut.tobytes())
    return ds


@pytest.mark.parametrize(
    ("ds", "dtype"),
    [
        (_header("MONOCHROME2", 12), np.uint16),
        (_header("MONOCHROME1", 16), np.uint16),
        (_header("MONOCHROME2", 12), np.int16),
        (_header("MONOCHROME2", 10), np.dtype(">u2")),
        (_header("RGB", 16), np.uint16),
        (_palette(200, 8), np.uint8),
        (_palette(200, 16), np.uint8),
    ],
)
def test_to_uint8_lookup_table_is_the_arithmetic(ds: Dataset, dtype: np.dtype) -> None:
    rng = np.random.default_rng(5)
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype)
    shape = (30, 40, 3) if ds.PhotometricInterpretation == "RGB" else (30, 40)
    tables: dict[np.dtype, np.ndarray] = {}
    for _ in range(2):  # the second frame reuses the table
        frame = rng.integers(info.min, info.max + 1, shape, dtype=np.int64).astype(dtype)
        expected = to_uint8(frame, ds)
        got = to_uint8(frame, ds, tables=tables)
        assert got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected)
    assert list(tables) == [dtype]


LOSSLESS = (
    "jpeg_lossless_rgb,jpeg_lossless_mono2_12,jpegls_lossless_mono2,jpegls_lossless_rgb,jpegls_near_lossless_mono2"
)


@pytest.fixture(scope="module")
def lossless_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lossless")
    synthesize(root, videos=5, fmt="dicom", seed=3, max_frames=6, progress=False, encodings=LOSSLESS)
    return root


def _all_frames(root: Path) -> dict[str, list[np.ndarray]]:
    src = open_source(root, "dicom", require_labels=False, crop_region=False)
    return {r.key: list(src.frames(r)) for r in src.scan().records}


def _same(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k])
        and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True))
        for k in a
    )


@pytest.mark.slow
def test_lossless_decoder_gives_pydicoms_frames(lossless_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"jpegls": 0, "jpeg8": 0}
    for name in calls:
        real = getattr(imagecodecs, f"{name}_decode")

        def spy(data: bytes, *a: object, _real=real, _name=name, **k: object) -> np.ndarray:
            calls[_name] += 1
            return _real(data, *a, **k)

        monkeypatch.setattr(imagecodecs, f"{name}_decode", spy)
    fast = _all_frames(lossless_archive)
    assert calls["jpegls"] >= 3 * 4 and calls["jpeg8"] >= 2 * 4  # the faster decoder did decode them
    monkeypatch.setattr(lossless, "exact_decoder", lambda ts: None)  # pydicom's plugins only
    assert _same(fast, _all_frames(lossless_archive))


@pytest.mark.slow
def test_lossless_decoder_hands_over_to_pydicom(lossless_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame it cannot decode: pydicom's plugins decode the rest. A first frame it reads otherwise:
    pydicom's plugins decode them all. Either way the frames are pydicom's."""
    with monkeypatch.context() as m:
        m.setattr(lossless, "exact_decoder", lambda ts: None)
        plain = _all_frames(lossless_archive)
    real = imagecodecs.jpegls_decode
    count = {"n": 0}

    def fails_at_third(data: bytes) -> np.ndarray:
        count["n"] += 1
        if count["n"] % 6 == 3:
            raise ValueError("not this one")
        return real(data)

    monkeypatch.setattr(imagecodecs, "jpegls_decode", fails_at_third)
    assert _same(plain, _all_frames(lossless_archive))
    monkeypatch.setattr(imagecodecs, "jpegls_decode", lambda data: real(data) ^ 1)  # reads every sample otherwise
    assert _same(plain, _all_frames(lossless_archive))
