"""A hospital's DICOM archive: any folder of files (the MIMIC-IV-ECHO layout included).

Keeps multi-frame ultrasound cines; decodes uncompressed, RLE, JPEG baseline (YBR_FULL_422),
JPEG 2000 and palette-colour pixel data through pydicom and its plugins; crops each frame to
the 2-D tissue region the scanner declares (Sequence of Ultrasound Regions), which also drops
burned-in annotations around it. Labels come from a CSV the site provides, joined on the
file's path relative to the archive or on its SOP Instance UID.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.pixels import apply_color_lut, get_decoder, iter_pixels
from pydicom.uid import UID

from fedecho.data.records import (
    AS_CLASSES,
    BadFile,
    Problem,
    Reason,
    ScanResult,
    SourceError,
    VideoRecord,
    relative,
)
from fedecho.data.source import EchoSource, parse_float, read_csv_rows, register_source

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_SOP_CLASSES = {
    US_MULTIFRAME,
    "1.2.840.10008.5.1.4.1.1.3",
    "1.2.840.10008.5.1.4.1.1.6.1",
    "1.2.840.10008.5.1.4.1.1.6",
}
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
LABEL_ALIASES = {
    "path": ["dicom_filepath", "file", "filepath", "relative_path"],
    "sop_instance_uid": ["SOPInstanceUID", "sop_uid"],
    "ef": ["EF", "lvef"],
    "esv": ["ESV"],
    "edv": ["EDV"],
    "as": ["as_label", "aortic_stenosis", "diagnosis_label"],
    "split": ["Split"],
}


MAX_SIDE = 8192  # rows/columns: larger is not an echo cine (and would exhaust memory decoding it)
MIN_SIDE = 8
MAX_FRAMES = 20_000
MAX_DECODED_BYTES = 16 << 30  # a whole decoded cine must fit in memory at ingest

_READ_ERRORS = (OSError, EOFError, ValueError, AttributeError, KeyError, TypeError, IndexError)


def _is_candidate(path: Path) -> bool:
    name = path.name
    return not (name.startswith(".") or name == "DICOMDIR" or path.suffix.lower() in NOT_DICOM_SUFFIXES)


def frame_rate(ds: Dataset) -> float | None:
    """Frames per second from Frame Time (ms), Frame Time Vector, Cine Rate or display rate."""
    ft = parse_float(str(ds.get("FrameTime", "")))
    if ft and ft > 0:
        return 1000.0 / ft
    vec = ds.get("FrameTimeVector")
    if vec:
        vals = [float(v) for v in list(vec)[1:] if float(v) > 0]
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
    for r in ds.get("SequenceOfUltrasoundRegions", []):
        if int(r.get("RegionSpatialFormat", 0)) == 1:
            boxes.append(
                (
                    int(r.RegionLocationMinX0),
                    int(r.RegionLocationMinY0),
                    int(r.RegionLocationMaxX1),
                    int(r.RegionLocationMaxY1),
                )
            )
    return boxes


def tissue_region(ds: Dataset) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) inclusive bounds of the 2-D tissue regions, if the scanner declares any."""
    boxes = tissue_boxes(ds)
    if not boxes:
        return None
    xs0, ys0, xs1, ys1 = zip(*boxes, strict=True)
    return min(xs0), min(ys0), max(xs1), max(ys1)


def _pixel_data_extent(path: Path, size: int) -> int | None:
    """Walk the top-level elements without reading values: the Pixel Data length in bytes
    (None when encapsulated or absent); raise BadFile(TRUNCATED) when the file ends inside an element.

    pydicom reads a cut file without complaint (it returns the short value), so the declared
    lengths are compared with the file size here.
    """
    try:
        with open(path, "rb") as fp:
            read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
            tsyntax = UID(str(meta.get("TransferSyntaxUID", "")))
            implicit = tsyntax.is_implicit_VR if tsyntax.is_transfer_syntax else False
            little = tsyntax.is_little_endian if tsyntax.is_transfer_syntax else True
            length = None
            for elem in data_element_generator(fp, implicit, little, defer_size=256):
                if elem.length != 0xFFFFFFFF and elem.value_tell + elem.length > size:
                    raise BadFile(Reason.TRUNCATED, f"the file ends inside element {elem.tag}")
                if elem.tag == 0x7FE00010:
                    length = None if elem.length == 0xFFFFFFFF else int(elem.length)
            return length
    except EOFError as e:
        raise BadFile(Reason.TRUNCATED, "the file ends before its last element is complete") from e


def read_header(path: Path) -> tuple[Dataset, int | None]:
    """Read a file's header (pixel data deferred) telling the ways a file can be bad apart:
    unreadable, empty, not DICOM, truncated. Returns (dataset, native Pixel Data length or None)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise BadFile(Reason.UNREADABLE, f"cannot read ({e.strerror or type(e).__name__})") from e
    if size == 0:
        raise BadFile(Reason.EMPTY, "zero bytes")
    if head[128:132] != b"DICM":
        raise BadFile(Reason.NOT_DICOM, "no DICOM preamble and 'DICM' prefix")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=False, defer_size=1024)
        length = _pixel_data_extent(path, size)
    except BadFile:
        raise
    except InvalidDicomError as e:
        raise BadFile(Reason.NOT_DICOM, f"not a DICOM file ({type(e).__name__})") from e
    except EOFError as e:
        raise BadFile(Reason.TRUNCATED, "the file ends before its header is complete") from e
    except _READ_ERRORS as e:
        raise BadFile(Reason.UNREADABLE, f"not a readable DICOM file ({type(e).__name__})") from e
    return ds, length


def _frame_bytes(ds: Dataset) -> int:
    """Bytes of one native (uncompressed) frame."""
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        return rows * cols * 2 * bits // 8
    return (rows * cols * spp * bits + 7) // 8


def check_header(ds: Dataset, min_frames: int, pixel_length: int | None = None) -> int:
    """Validate a cine's header; return its frame count or raise BadFile with the reason.

    pixel_length: the native Pixel Data length (from read_header), checked against the frame count.
    """
    sop = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID", ""))
    if ds.get("Modality", "") != "US" and sop not in US_SOP_CLASSES:
        raise BadFile(Reason.NOT_ULTRASOUND, f"modality {ds.get('Modality', '?')}, SOP class {sop or '?'}")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise BadFile(Reason.UNREADABLE, "no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames <= 1:
        raise BadFile(Reason.SINGLE_FRAME, "a still image, not a cine")
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        raise BadFile(Reason.UNREADABLE, "no transfer syntax in file meta")
    try:
        available = get_decoder(tsyntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise BadFile(Reason.UNSUPPORTED_TRANSFER_SYNTAX, f"{tsyntax.name} ({tsyntax})")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if not (MIN_SIDE <= rows <= MAX_SIDE and MIN_SIDE <= cols <= MAX_SIDE) or frames > MAX_FRAMES:
        raise BadFile(
            Reason.BAD_DIMENSIONS,
            f"{frames} frames of {rows} x {cols} (allowed: {MIN_SIDE}-{MAX_SIDE} pixels, up to {MAX_FRAMES} frames)",
        )
    if frames * rows * cols * max(spp, 3) > MAX_DECODED_BYTES:
        raise BadFile(Reason.BAD_DIMENSIONS, f"{frames} frames of {rows} x {cols} do not fit in memory decoded")
    if frames < min_frames:
        raise BadFile(Reason.TOO_FEW_FRAMES, f"{frames} frames < {min_frames}")
    if pixel_length is not None and not tsyntax.is_encapsulated:
        per_frame = _frame_bytes(ds)
        if per_frame and (pixel_length < frames * per_frame or pixel_length - frames * per_frame >= per_frame):
            raise BadFile(
                Reason.FRAME_COUNT_MISMATCH,
                f"Number of Frames is {frames} but the pixel data holds {pixel_length / per_frame:.4g} frames",
            )
    return frames


def to_uint8(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """One decoded frame to (H, W) or (H, W, 3) uint8 for display-like intensities."""
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
        if frame.dtype != np.uint8:  # 16-bit LUT entries
            frame = (frame >> 8).astype(np.uint8) if frame.max() > 255 else frame.astype(np.uint8)
    if frame.dtype != np.uint8:
        bits = int(ds.get("BitsStored", 8))
        f = frame.astype(np.float64)
        if int(ds.get("PixelRepresentation", 0)) == 1:
            f -= f.min()
        f = f / max((1 << bits) - 1, 1) * 255.0
        frame = np.clip(np.round(f), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        frame = 255 - frame
    return frame


@register_source
class DicomArchiveSource(EchoSource):
    """Options: labels (CSV path), min_frames (default 8), ef_threshold (default 50),
    require_labels (default: True when labels are given), crop_region (default True: crop each
    frame to the declared tissue region; site ingest turns it off to blank the sector itself)."""

    kind = "dicom"
    detect_cost = 1  # walks the folder

    @classmethod
    def detect(cls, root: Path) -> bool:
        if (root / "echo-record-list.csv").is_file():
            return True
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = Path(dirpath) / n
                if _is_candidate(p):
                    try:
                        with open(p, "rb") as f:
                            if f.read(132)[128:] == b"DICM":
                                return True
                    except OSError:
                        continue
        return False

    def __init__(self, root: str | Path, **options):
        super().__init__(root, **options)
        self.min_frames = int(options.get("min_frames", 8))
        self.ef_threshold = float(options.get("ef_threshold", 50.0))
        labels = options.get("labels")
        if labels is None and (self.root / "labels.csv").is_file():
            labels = self.root / "labels.csv"
        self.labels_path = Path(labels) if labels else None
        self.require_labels = bool(options.get("require_labels", self.labels_path is not None))
        self.crop_region = bool(options.get("crop_region", True))

    def cache_params(self) -> dict[str, object]:
        return {**super().cache_params(), **({} if self.crop_region else {"crop_region": False})}

    def _labels(self) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
        if self.labels_path is None:
            return {}, {}
        rows = read_csv_rows(self.labels_path, [], LABEL_ALIASES)
        if rows and "path" not in rows[0] and "sop_instance_uid" not in rows[0]:
            raise SourceError(f"{self.labels_path}: needs a 'path' or 'sop_instance_uid' column to join labels")
        by_path = {r["path"].lstrip("./"): r for r in rows if r.get("path")}
        by_uid = {r["sop_instance_uid"]: r for r in rows if r.get("sop_instance_uid")}
        return by_path, by_uid

    def _targets(self, row: dict[str, str]) -> dict[str, float]:
        targets: dict[str, float] = {}
        for name in ("ef", "esv", "edv"):
            if (v := parse_float(row.get(name, ""))) is not None:
                targets[name] = v
        if "ef" in targets:
            targets["ef_class"] = self.ef_class(targets["ef"])
        grade = row.get("as", "")
        if grade:
            if grade in AS_CLASSES:
                targets["as_class"] = float(AS_CLASSES.index(grade))
            elif (g := parse_float(grade)) is not None and 0 <= g < len(AS_CLASSES):
                targets["as_class"] = float(int(g))
        return targets

    def scan(self) -> ScanResult:
        by_path, by_uid = self._labels()
        records: list[VideoRecord] = []
        problems: list[Problem] = []
        seen_labels: set[int] = set()
        for dirpath, dirnames, names in os.walk(self.root):
            dirnames.sort()
            for name in sorted(names):
                path = Path(dirpath) / name
                if not _is_candidate(path):
                    continue
                rel = relative(path, self.root)
                try:
                    ds, pixel_length = read_header(path)
                    n_frames = check_header(ds, self.min_frames, pixel_length)
                except BadFile as e:
                    problems.append(Problem(rel, e.reason, e.detail))
                    continue
                except _READ_ERRORS as e:
                    problems.append(Problem(rel, Reason.UNREADABLE, f"not a readable DICOM file ({type(e).__name__})"))
                    continue
                uid = str(ds.get("SOPInstanceUID", ""))
                row = by_path.get(rel) or (by_uid.get(uid) if uid else None)
                if row is None and self.require_labels:
                    problems.append(
                        Problem(
                            rel,
                            Reason.MISSING_LABEL,
                            f"not in {self.labels_path.name if self.labels_path else 'labels'}",
                        )
                    )
                    continue
                if row is not None:
                    seen_labels.add(id(row))
                targets = self._targets(row) if row else {}
                records.append(
                    VideoRecord(
                        key=rel,
                        files=(path,),
                        split=(row.get("split", "") if row else "").strip().lower() or "train",
                        targets=targets,
                        fps=frame_rate(ds),
                        n_frames=n_frames,
                        group=str(ds.get("PatientID", "")) or None,
                        meta={
                            "split_given": bool(row and row.get("split", "").strip()),
                            "sop_instance_uid": uid,
                            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
                            "photometric": str(ds.get("PhotometricInterpretation", "")),
                            "rows": int(ds.get("Rows", 0)),
                            "columns": int(ds.get("Columns", 0)),
                        },
                    )
                )
        for rel, row in by_path.items():
            if id(row) not in seen_labels and not (self.root / rel).is_file():
                problems.append(Problem(rel, Reason.UNREADABLE, "listed in the labels CSV but not found"))
        return ScanResult(records, problems)

    def frames(self, record: VideoRecord) -> Iterator[np.ndarray]:
        path = record.files[0]
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as e:
            raise BadFile(Reason.UNREADABLE, f"not a readable DICOM file ({type(e).__name__})") from e
        box = tissue_region(ds) if self.crop_region else None
        as_rgb = str(ds.get("PhotometricInterpretation", "")) != "PALETTE COLOR"
        declared = int(ds.get("NumberOfFrames", 1) or 1)
        count = 0
        try:
            for frame in iter_pixels(path, as_rgb=as_rgb):
                frame = to_uint8(frame, ds)
                if box is not None:
                    x0, y0, x1, y1 = box
                    frame = frame[y0 : y1 + 1, x0 : x1 + 1]
                count += 1
                yield frame
        except BadFile:
            raise
        except Exception as e:
            # Type only: a codec's message is not ours to vouch for (it could quote header values).
            raise BadFile(Reason.CORRUPT_PIXEL_DATA, f"frame {count + 1} does not decode ({type(e).__name__})") from e
        if count != declared:
            raise BadFile(Reason.FRAME_COUNT_MISMATCH, f"Number of Frames is {declared} but {count} frames decoded")
