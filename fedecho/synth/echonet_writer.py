"""Writes phantom cines in the exact EchoNet-Dynamic on-disk layout (BRIEF section 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedecho.data.video import write_avi
from fedecho.storage.files import atomic_write_csv
from fedecho.synth.phantom import PhantomVideo

FILELIST_COLUMNS = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split"]
TRACING_COLUMNS = ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]


def echonet_name(rng: np.random.Generator) -> str:
    """A FileName like EchoNet's: '0X' and 16 upper-case hex digits, no extension."""
    return "0X" + "".join(f"{b:02X}" for b in rng.integers(0, 256, size=8))


class EchoNetWriter:
    """Accumulates videos into Videos/, FileList.csv and VolumeTracings.csv under root."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "Videos").mkdir(parents=True, exist_ok=True)
        self.filelist: list[list[object]] = []
        self.tracings: list[list[object]] = []

    def add(self, name: str, video: PhantomVideo, split: str) -> None:
        frames = video.frames
        write_avi(self.root / "Videos" / f"{name}.avi", frames, video.fps)
        t, h, w = frames.shape[:3]
        self.filelist.append(
            [name, f"{video.ef:.8f}", f"{video.esv:.8f}", f"{video.edv:.8f}", h, w, f"{video.fps:g}", t, split]
        )
        # EchoNet lists ES first, then ED; each traced frame is the long axis, then 20 chords.
        for tr in (video.es_tracing, video.ed_tracing):
            for seg in [tr.axis, *tr.chords]:
                (x1, y1), (x2, y2) = seg
                self.tracings.append([f"{name}.avi", f"{x1:.4f}", f"{y1:.4f}", f"{x2:.4f}", f"{y2:.4f}", tr.frame])

    def close(self) -> None:
        atomic_write_csv(self.root / "FileList.csv", FILELIST_COLUMNS, self.filelist)
        atomic_write_csv(self.root / "VolumeTracings.csv", TRACING_COLUMNS, self.tracings)
