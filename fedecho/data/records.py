"""What every echo source produces: video records with targets, and problems with reasons.

A bad file never stops a pass: a source turns it into a `Problem` (path, reason, detail) and
carries on. Dataset-level mistakes (a CSV without its required columns) are `SourceError`s,
which name the file and the field.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGETS = ("ef", "esv", "edv", "ef_class", "as_class")
"""Target names: EF in percent, ESV/EDV in mL, ef_class 1 when EF >= the source's threshold
(the Echo-Vision-FM code's convention), as_class the 5-grade aortic-stenosis index."""

AS_CLASSES = ("no_AS", "mild_AS", "mildtomod_AS", "moderate_AS", "severe_AS")
SPLITS = ("train", "val", "test")


class Reason(enum.StrEnum):
    """Why a file was skipped (stable codes: they are stored and reported)."""

    UNREADABLE = "unreadable"
    NOT_ULTRASOUND = "not_ultrasound"
    SINGLE_FRAME = "single_frame"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    TOO_FEW_FRAMES = "too_few_frames"
    MISSING_LABEL = "missing_label"
    EMPTY = "empty"  # a zero-byte file
    NOT_DICOM = "not_dicom"  # no DICOM preamble/prefix: some other file in the archive
    TRUNCATED = "truncated"  # the file ends inside an element (an interrupted copy)
    CORRUPT_PIXEL_DATA = "corrupt_pixel_data"  # the codec is available but the pixel data does not decode
    FRAME_COUNT_MISMATCH = "frame_count_mismatch"  # Number of Frames disagrees with the pixel data
    BAD_DIMENSIONS = "bad_dimensions"  # rows, columns or frames outside what a cine can be
    DUPLICATE = "duplicate"  # the same bytes were already registered (site ingest)
    NO_SECTOR = "no_sector"  # no ultrasound sector found, so burned-in text cannot be blanked (site ingest)
    DECODE_ERROR = "decode_error"  # a sound codestream the decoder fails on (the detail names codec and plugin)
    VOLUME_3D = "volume_3d"  # an Enhanced US Volume (3-D), not a 2-D cine
    BAD_HEADER = "bad_header"  # the element structure or the Image Pixel module makes no sense (not a cut)
    NO_PIXEL_DATA = "no_pixel_data"  # a DICOM object without pixels (a report, a presentation state)
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"  # valid DICOM pixels a cine is not (float, 1-bit, CMYK)


class BadFile(Exception):
    """One file cannot be used; raised inside a source, caught and reported as a Problem."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[BadFile], tuple[Reason, str]]:
        return BadFile, (self.reason, self.detail)  # crosses process boundaries (parallel scans) intact


class SourceError(ValueError):
    """The dataset as a whole is malformed (missing index file or column)."""


@dataclass(frozen=True)
class Problem:
    path: str  # relative to the source root
    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason.value} ({self.detail})"


@dataclass(frozen=True)
class VideoRecord:
    """One video (or pseudo-video) a source can decode, with whatever targets it has."""

    key: str  # unique within the source; relative path or the dataset's own id
    files: tuple[Path, ...]  # what decoding reads (the cache key hashes their contents)
    split: str  # train / val / test, or "" when the source has no split for it
    targets: dict[str, float] = field(default_factory=dict)
    fps: float | None = None
    n_frames: int | None = None
    group: str | None = None  # patient or study id, for grouping (never leaves the site)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class StudyCounts:
    """What joining study rows to cines did (all zero when the CSV has no study rows)."""

    studies: int = 0  # study rows in the CSV
    labelled_cines: int = 0  # cines that took their study's label
    no_accepted_cine: int = 0  # labelled studies none of whose cines the view filter accepted ...
    no_cine: int = 0  # ... of which: studies with no readable cine in the archive at all
    other_view: int = 0  # cines of labelled studies whose header names a view the filter does not accept
    unnamed: int = 0  # cines of labelled studies whose header names no view
    view_sources: dict[str, int] = field(default_factory=dict)  # where accepted cines' views came from

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class ScanResult:
    records: list[VideoRecord]
    problems: list[Problem]
    studies: StudyCounts | None = None  # sources with study-level labels: what the join did

    def summary(self) -> dict[str, int]:
        return dict(Counter(p.reason.value for p in self.problems))


def relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
