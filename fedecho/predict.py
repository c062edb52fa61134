"""Prediction on videos a user points at: one file, a folder, a glob pattern or a CSV list.

One function (`predict_video`) serves `fedecho predict` for a single video and for many, so a video's
estimate is the same whichever way it was asked for. A video that cannot be decoded becomes a
`Prediction` with `error` set: a batch goes on past it.
"""

from __future__ import annotations

import csv
import glob
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.errors import InvalidDicomError

from fedecho.data import AS_CLASSES, BadFile, ClipSampler, VideoRecord, decode_video
from fedecho.data.clips import test_time_clips
from fedecho.data.records import Reason
from fedecho.models import CheckpointError, EchoVisionFM, load_checkpoint
from fedecho.train import predict_clips

AVI_SUFFIXES = {".avi"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
CSV_COLUMNS = ("file", "path", "FileName")  # FileName: EchoNet-Dynamic's FileList.csv (no extension)
GLOB_CHARS = set("*?[")


class InputError(ValueError):
    """The input (folder, pattern, CSV list) names no videos or is malformed; the message names it."""


@dataclass
class Prediction:
    """One video's estimates in dataset units (EF %, mL, probabilities), or why there are none."""

    file: Path
    estimates: dict[str, np.ndarray] = field(default_factory=dict)
    frames: int = 0
    clips: int = 0
    error: str = ""


def load_predictor(checkpoint: Path, device: str) -> EchoVisionFM:
    """A fine-tuned checkpoint on device; one without task heads cannot predict anything."""
    model = load_checkpoint(checkpoint).to(device)
    if not model.cfg.tasks:
        raise CheckpointError(f"{checkpoint}: has no task heads (a pre-training checkpoint?)")
    return model


def read_video(path: Path, size: int) -> np.ndarray:
    """Decode one file with the matching source's decoder, frames fit to size x size."""
    if not path.is_file():
        raise BadFile(Reason.UNREADABLE, "not found")
    if path.suffix.lower() in AVI_SUFFIXES:
        from fedecho.data.echonet import EchoNetSource as Source
    else:
        from fedecho.data.dicom import DicomArchiveSource as Source
        from fedecho.data.dicom_file import check_header, read_header

        with warnings.catch_warnings():  # pydicom's warnings about a damaged file: read_header names the fault
            warnings.simplefilter("ignore", UserWarning)
            ds, _ = read_header(path)  # unreadable, not DICOM, truncated: a BadFile with the reason
        check_header(ds, min_frames=2)
    return decode_video(Source(path.parent), VideoRecord(key=path.name, files=(path,), split=""), size)


def predict_video(model: EchoVisionFM, path: Path, period: int = 0, max_clips: int = 0) -> Prediction:
    """Every head's estimate for one video, averaged over its clips (period 0: frames spread evenly).

    Raises BadFile (or ValueError/OSError from a decoder) when the video cannot be used.
    """
    frames = read_video(path, model.cfg.img_size)
    clips, frame_index = test_time_clips(frames, ClipSampler(model.cfg.num_frames, period or None), max_clips or None)
    return Prediction(path, predict_clips(model, clips, frame_index), frames=len(frames), clips=len(clips))


def try_predict(model: EchoVisionFM, path: Path, period: int = 0, max_clips: int = 0) -> Prediction:
    """predict_video, with a file's own failure turned into an error row that names it."""
    try:
        return predict_video(model, path, period, max_clips)
    except (BadFile, ValueError, OSError, InvalidDicomError) as e:
        return Prediction(path, error=f"{path.name}: {e}")


def is_video(path: Path) -> bool:
    """A file fedecho predict can read: an .avi, a .dcm/.dicom, or any other file that is DICOM by content."""
    name, suffix = path.name, path.suffix.lower()
    if name.startswith(".") or name == "DICOMDIR":
        return False
    if suffix in AVI_SUFFIXES or suffix in DICOM_SUFFIXES:
        return True
    from fedecho.data.dicom_file import NOT_DICOM_SUFFIXES, looks_like_dicom

    return suffix not in NOT_DICOM_SUFFIXES and looks_like_dicom(path)  # old PACS exports lack the preamble


def videos_in_folder(root: Path) -> list[Path]:
    """Every readable video under root, recursively (hidden files and folders skipped), in sorted order."""
    found: list[Path] = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [p for n in sorted(names) if is_video(p := Path(dirpath) / n)]
    return found


def videos_in_csv(path: Path) -> list[Path]:
    """The files a CSV lists in its file, path or FileName column, resolved next to it or under Videos/ beside it.

    A listed file that is missing stays in the list (it becomes an error row, like an undecodable one).
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
            lookup = {h.lower(): h for h in header}
            column = next((lookup[c.lower()] for c in CSV_COLUMNS if c.lower() in lookup), None)
            if column is None:
                raise InputError(
                    f"{path}: no column naming the videos (expected one of {', '.join(CSV_COLUMNS)}; "
                    f"found: {', '.join(header) or 'no header'})"
                )
            values = [v for r in reader if (v := (r.get(column) or "").strip())]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read the CSV ({type(e).__name__})") from e
    return [_resolve_listed(v, path.parent) for v in values]


def _resolve_listed(value: str, base: Path) -> Path:
    """An entry of a CSV list: absolute, next to the CSV, or under Videos/ beside it; a name without a video
    extension (EchoNet's FileName) is also tried with .avi. A missing entry keeps its most likely path."""
    given = Path(value)
    dirs = [Path()] if given.is_absolute() else [base, base / "Videos"]
    names = [given]
    if given.suffix.lower() not in AVI_SUFFIXES | DICOM_SUFFIXES:
        names.append(given.with_name(given.name + ".avi"))
    candidates = [d / n for d in dirs for n in names]
    return next((c for c in candidates if c.is_file()), candidates[-1] if len(names) > 1 else candidates[0])


def expand_input(spec: str) -> tuple[list[Path], bool]:
    """The videos an input names, and whether it is the single-video form (one existing file, not a CSV)."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() != ".csv":
        return [path], True
    if path.is_file():
        videos = videos_in_csv(path)
        where = f"{path}: lists no files"
    elif path.is_dir():
        videos = videos_in_folder(path)
        where = f"{path}: no videos in this folder (.avi, .dcm or DICOM files)"
    elif GLOB_CHARS & set(spec):
        videos = []
        for match in sorted(glob.glob(spec, recursive=True)):
            m = Path(match)
            videos += videos_in_folder(m) if m.is_dir() else [m] if is_video(m) else []
        where = f"{spec}: the pattern matches no videos (.avi, .dcm or DICOM files)"
    else:
        raise InputError(f"{spec}: no such file or folder (nor a glob pattern)")
    if not videos:
        raise InputError(where)
    return list(dict.fromkeys(videos)), False


def columns(tasks: tuple[str, ...] | list[str]) -> list[str]:
    """CSV header: file, one column per head (as_class: one per grade), clips and frames used, error."""
    heads: list[str] = []
    for t in tasks:
        heads += [f"as_class_{c}" for c in AS_CLASSES] if t == "as_class" else [t]
    return ["file", *heads, "clips", "frames", "error"]


def row(p: Prediction, tasks: tuple[str, ...] | list[str]) -> list[object]:
    """One CSV row; estimates with 6 decimals (an error row leaves them blank)."""
    values: list[object] = []
    for t in tasks:
        n = len(AS_CLASSES) if t == "as_class" else 1
        if t not in p.estimates:
            values += [""] * n
        else:
            values += [f"{float(v):.6f}" for v in np.atleast_1d(p.estimates[t])]
    return [str(p.file), *values, p.clips if not p.error else "", p.frames if not p.error else "", p.error]
