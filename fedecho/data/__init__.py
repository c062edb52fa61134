"""Data layer: every echo source a user brings, read through one interface.

from fedecho.data import open_source, EchoVideoDataset, ClipSampler
src = open_source("EchoNet-Dynamic/")           # or CAMUS, TMED-2, a DICOM archive
ds = EchoVideoDataset(src, split="train", targets=["ef"], sampler=ClipSampler(32, 2))
"""

from fedecho.data.cache import FrameCache, decode_video
from fedecho.data.clips import Augment, ClipSampler, channel_stats, fit_square
from fedecho.data.dataset import EchoVideoDataset, average_over_clips
from fedecho.data.records import (
    AS_CLASSES,
    TARGETS,
    BadFile,
    Problem,
    Reason,
    ScanResult,
    SourceError,
    StudyCounts,
    VideoRecord,
)
from fedecho.data.source import SOURCES, EchoSource, detect_source, open_source

__all__ = [
    "AS_CLASSES",
    "SOURCES",
    "TARGETS",
    "Augment",
    "BadFile",
    "ClipSampler",
    "EchoSource",
    "EchoVideoDataset",
    "FrameCache",
    "Problem",
    "Reason",
    "ScanResult",
    "SourceError",
    "StudyCounts",
    "VideoRecord",
    "average_over_clips",
    "channel_stats",
    "decode_video",
    "detect_source",
    "fit_square",
    "open_source",
]
