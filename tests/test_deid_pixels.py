"""Pixel de-identification: only the moving ultrasound fan survives, whatever the region declares.

The cines are built here: a pie-slice fan of moving speckle (apex at the top, a static dark rim,
a beating dark blood pool) with burned-in names, dates, readouts, a frame counter and a toolbar,
several of them inside a declared region larger than the fan, then passed through the lossy codecs
archives use (JPEG per frame, H.264, MPEG-2), which make static text flicker.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import av
import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from fedecho.privacy.deid import Box, NoSector, blank_outside_sector, sector_mask

H, W, T = 240, 320, 30
APEX, RADIUS, HALF_ANGLE = (160.0, 12.0), 205.0, np.radians(38)
REGION: Box = (20, 2, 300, 226)  # holds the fan, and in its corners names, readouts and the counter
WHITE, YELLOW, GREEN = (235, 235, 235), (230, 220, 60), (90, 230, 90)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _fan(rng: np.random.Generator, apex: tuple[float, float], w: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, w) float speckle fan and its (H, w) mask: speckle decorrelates, the rim stays dark."""
    y, x = np.mgrid[0:H, 0:w].astype(np.float32)
    dx, dy = x - apex[0], y - apex[1]
    r = np.hypot(dx, dy)
    fan = (r <= RADIUS) & (np.abs(np.arctan2(dx, dy)) <= HALF_ANGLE) & (dy >= 0)
    rim = cv2.distanceTransform(fan.astype(np.uint8), cv2.DIST_L2, 3) <= 3
    static = cv2.GaussianBlur(rng.standard_normal((H, w)).astype(np.float32), (0, 0), 1.2)
    out = np.zeros((T, H, w), np.float32)
    for t in range(T):
        fresh = cv2.GaussianBlur(rng.standard_normal((H, w)).astype(np.float32), (0, 0), 1.2)
        img = 330 * np.abs(0.8 * static + 0.6 * fresh) * np.exp(-r / 400)
        beat = 30 + 12 * np.sin(2 * np.pi * t / 15)
        img[np.hypot(dx, (dy - 98) / 1.6) < beat] *= 0.15  # the blood pool
        img[rim] = 8.0
        out[t] = np.where(fan, np.clip(img, 0, 255), 0)
    return out, fan


def _overlay(colour: bool) -> np.ndarray:
    """(H, W, 3) static burned-in text: inside the region, across its edge and below it."""
    img = Image.new("RGB", (W, H))
    d, f = ImageDraw.Draw(img), _font()
    yellow, green = (YELLOW, GREEN) if colour else (WHITE, (200, 200, 200))
    d.text((24, 4), "DOE, JANE", fill=WHITE, font=f)
    d.text((24, 16), "ID 12345678", fill=WHITE, font=f)
    d.text((W - 2, 4), "03/12/2024 10:22", fill=WHITE, font=f, anchor="ra")
    d.text((189, 22), "MI 1.2 TIS 0.4", fill=yellow, font=f)
    d.text((22, 205), "16 cm", fill=green, font=f)
    d.text((262, 205), "HR 72", fill=green, font=f)
    for i, label in enumerate(["2D", "CF", "PW", "FRZ", "SAVE"]):  # the toolbar
        x0 = 8 + i * 62
        d.rectangle((x0, 229, x0 + 54, 239), outline=WHITE)
        d.text((x0 + 4, 229), label, fill=WHITE, font=f)
    return np.asarray(img)


def _counter(t: int) -> np.ndarray:
    """(H, W) frame counter inside the region: it changes every frame, so it moves."""
    img = Image.new("L", (W, H))
    ImageDraw.Draw(img).text((219, 60), f"{t + 1}/{T}", fill=230, font=_font())
    return np.asarray(img)


@functools.cache
def scanner_cine(layout: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames, fan mask, text mask) for 'gray' (T, H, W), 'rgb' (colour text) or 'rgb-grey'."""
    fan, fan_mask = _fan(np.random.default_rng(7), APEX, W)
    overlay = _overlay(colour=layout == "rgb")
    static = overlay.max(-1) > 0
    frames = np.repeat(fan[..., None], 3, -1)
    text = static.copy()
    for t in range(T):
        counter = _counter(t)
        frames[t][static] = overlay[static]
        frames[t][counter > 0] = counter[counter > 0, None]
        text |= counter > 0
    frames = frames.round().astype(np.uint8)
    if layout == "gray":
        frames = frames.mean(-1).round().astype(np.uint8)
    return frames, fan_mask, text


def jpeg(frames: np.ndarray, quality: int = 50) -> np.ndarray:
    """Each frame through a lossy JPEG round trip (as JPEG Baseline DICOM stores them)."""
    out = []
    for f in frames:
        ok, buf = cv2.imencode(
            ".jpg", np.ascontiguousarray(f[..., ::-1] if f.ndim == 3 else f), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        assert ok
        g = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        out.append(g[..., ::-1] if f.ndim == 3 else g)
    return np.stack(out)


def video(frames: np.ndarray, codec: str) -> np.ndarray:
    """Frames through a video codec (libx264 or mpeg2video, 4:2:0) and back, in the input's layout."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "28", "preset": "veryfast"}
        for f in frames:
            rgb = f if f.ndim == 3 else np.repeat(f[..., None], 3, -1)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        out.mux(stream.encode())
    buf.seek(0)
    with av.open(buf) as inp:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in inp.decode(video=0)])
    return decoded if frames.ndim == 4 else decoded.mean(-1).round().astype(np.uint8)


CODECS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "raw": lambda f: f,
    "jpeg50": jpeg,
    "h264": lambda f: video(f, "libx264"),
    "mpeg2": lambda f: video(f, "mpeg2video"),
}
REGIONS: dict[str, tuple[list[Box] | None, str]] = {
    "declared": ([REGION], "region"),
    "resized": ([tuple(2 * v for v in REGION)], "image (declared region does not fit the 320x240 frame)"),
    "whole frame": ([(0, 0, W - 1, H - 1)], "image (declared region covers nearly the whole 320x240 frame)"),
    "misplaced": ([(10, 5, 150, 113)], "image (declared region misses most of the moving sector)"),
    "none": (None, "image"),
}


REACH = 7.0  # px: how far beyond the fan's edge the kept area may reach (codec ringing, margin)


def _reach(mask: np.ndarray, fan: np.ndarray) -> float:
    """How far (px) the kept area reaches beyond the fan."""
    return float(cv2.distanceTransform((~fan).astype(np.uint8), cv2.DIST_L2, 5)[mask].max())


def blanked_in_place(frames: np.ndarray, region: list[Box] | None) -> tuple[np.ndarray, np.ndarray, str]:
    """blank_outside_sector's output put back at its place in the frame, with the mask and label.

    The output must be the input inside the mask and zero elsewhere, cropped to the mask's box.
    """
    out, how = blank_outside_sector(frames, region)
    mask, how_mask = sector_mask(frames, region)
    assert how == how_mask
    ys, xs = np.nonzero(mask)
    placed = np.zeros_like(frames)
    placed[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = out
    keep = mask[None, ..., None] if frames.ndim == 4 else mask[None]
    assert np.array_equal(placed, np.where(keep, frames, 0))
    return placed, mask, how


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("layout", ["gray", "rgb", "rgb-grey"])
def test_burned_in_text_goes_and_the_fan_stays(layout: str, codec: str) -> None:
    frames, fan, text = scanner_cine(layout)
    frames = CODECS[codec](frames)
    # The codec's ringing around glyphs is part of the text too.
    halo = cv2.dilate(text.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    for name, (region, label) in REGIONS.items():
        placed, mask, how = blanked_in_place(frames, region)
        assert how == label, name
        assert placed[:, halo].max() == 0, f"{name}: text survives at {np.argwhere(mask & halo)[:5].tolist()}"
        assert (mask & fan).sum() >= 0.95 * fan.sum(), name
        assert _reach(mask, fan) <= REACH, name


def test_each_declared_view_keeps_its_own_fan() -> None:
    """Two 2-D views side by side, each declared: both fans stay, the text between them goes."""
    rng = np.random.default_rng(3)
    left, left_fan = _fan(rng, (160.0, 12.0), 320)
    right, right_fan = _fan(rng, (160.0, 12.0), 320)
    frames = np.concatenate([left, right], axis=2).round().astype(np.uint8)
    fan = np.concatenate([left_fan, right_fan], axis=1)
    frames[:, 4:16, 290:350] = 220  # a label straddling the two boxes
    boxes = [(20, 2, 300, 226), (340, 2, 620, 226)]
    placed, mask, how = blanked_in_place(frames, boxes)
    assert how == "region" and placed[:, 4:16, 290:350].max() == 0
    assert (mask[:, :320] & left_fan).sum() >= 0.95 * left_fan.sum()
    assert (mask[:, 320:] & right_fan).sum() >= 0.95 * right_fan.sum()
    assert _reach(mask, fan) <= REACH


def test_a_cine_where_nothing_moves_is_not_registered() -> None:
    """Without motion the fan cannot be told from text: the cine is refused, not kept whole."""
    frames, _, _ = scanner_cine("rgb")
    still = np.repeat(frames[:1], 8, axis=0)
    for region in ([REGION], None):
        with pytest.raises(NoSector, match="no moving sector found"):
            blank_outside_sector(still, region)
