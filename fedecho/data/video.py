"""AVI reading and writing (OpenCV), as EchoNet-Dynamic stores its videos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from fedecho.storage.files import atomic_path


def read_avi(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame: (T, H, W, 3) uint8 RGB, and the container's frame rate."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: OpenCV cannot open this video")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"{path}: no decodable frames")
    return np.stack(frames), fps


def write_avi(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Write (T, H, W) or (T, H, W, 3) uint8 frames as Motion-JPEG AVI, atomically."""
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    _t, h, w, _ = frames.shape
    with atomic_path(path, suffix=".avi") as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), float(fps), (w, h))
        if not writer.isOpened():
            raise OSError(f"{path}: OpenCV cannot write MJPG AVI")
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
