"""A hospital's DICOM archive: any folder of files (the MIMIC-IV-ECHO layout included).

The archive source on its own: which files of the folder are read, each one's header scanned (in any
process) into a small CineHeader, labels joined from a CSV the site provides (on the file's path
relative to the archive, its SOP Instance UID or its study), records made. Reading one file (recognising
it, its header, its frames, the reason it cannot be used) is fedecho.data.dicom_file's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedecho.data.dicom_file import (
    NOT_DICOM_SUFFIXES,
    check_header,
    frame_rate,
    int_value,
    is_dicomdir,
    looks_like_dicom,
    read_file_header,
    read_frames,
)
from fedecho.data.labels import RECORD_LIST, LabelTable
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
from fedecho.data.source import EchoSource, parse_float, register_source
from fedecho.data.views import ViewFilter


def _is_candidate(path: Path) -> bool:
    name = path.name
    return not (name.startswith(".") or name == "DICOMDIR" or path.suffix.lower() in NOT_DICOM_SUFFIXES)


@dataclass(frozen=True)
class CineHeader:
    """What a scan keeps of one cine's header: small and picklable, so worker processes can read it."""

    n_frames: int
    fps: float | None
    patient: str  # Patient ID: grouping at the site only (it is hashed before anything is stored)
    sop_uid: str
    study_uid: str
    view: str | None  # as fedecho.data.views reads it, and from where
    view_source: str
    transfer_syntax: str
    inferred: bool
    photometric: str
    rows: int
    columns: int


def scan_file(path: Path, min_frames: int, view_filter: ViewFilter) -> CineHeader | BadFile | None:
    """One file's header read and checked: a cine's facts, the reason it is not one, or None for a DICOMDIR.
    Any process may run it (the archive scan's map)."""
    try:
        header = read_file_header(path)
        ds = header.ds
        if is_dicomdir(ds):
            return None
        n_frames = check_header(ds, min_frames, layout=header.pixels)
    except BadFile as e:
        return e
    view, source = view_filter.view(ds)
    return CineHeader(
        n_frames=n_frames,
        fps=frame_rate(ds),
        patient=str(ds.get("PatientID", "") or ""),
        sop_uid=str(ds.get("SOPInstanceUID", "") or "").strip(),
        study_uid=str(ds.get("StudyInstanceUID", "") or "").strip(),
        view=view,
        view_source=source,
        transfer_syntax=str(header.transfer_syntax),
        inferred=header.inferred,
        photometric=str(ds.get("PhotometricInterpretation", "")),
        rows=int_value(ds, "Rows", 0),
        columns=int_value(ds, "Columns", 0),
    )


@register_source
class DicomArchiveSource(EchoSource):
    """Options: labels (CSV path, per file or per study: fedecho.data.labels), min_frames (default 8),
    ef_threshold (default 50), require_labels (default: True when labels are given), crop_region
    (default True: crop each frame to the declared tissue region; site ingest turns it off to blank
    the sector itself), views / series_pattern / accept_unnamed_views (which cines a study's label
    applies to: fedecho.data.views.ViewFilter; default the A4C cines whose header says so)."""

    kind = "dicom"
    detect_cost = 1  # walks the folder

    @classmethod
    def detect(cls, root: Path) -> bool:
        if (root / RECORD_LIST).is_file():
            return True
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = Path(dirpath) / n
                if _is_candidate(p) and looks_like_dicom(p):
                    return True
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
        try:
            self.view_filter = ViewFilter.parse(
                options.get("views", "A4C"), options.get("series_pattern"), bool(options.get("accept_unnamed_views"))
            )
        except ValueError as e:
            raise SourceError(str(e)) from e

    def cache_params(self) -> dict[str, object]:
        return {**super().cache_params(), **({} if self.crop_region else {"crop_region": False})}

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

    def candidates(self) -> list[Path]:
        """Every file the scan reads, in a fixed order (sorted folder by folder)."""
        out: list[Path] = []
        for dirpath, dirnames, names in os.walk(self.root):
            dirnames.sort()
            out.extend(p for name in sorted(names) if _is_candidate(p := Path(dirpath) / name))
        return out

    def scan(self, map_fn: Callable[..., Iterable[CineHeader | BadFile | None]] = map) -> ScanResult:
        """map_fn runs scan_file over the files (the builtin map; at archive scale a process pool's,
        since reading headers is most of a scan); labels are joined here, in file order."""
        table = LabelTable(self.labels_path, self.root, self.view_filter) if self.labels_path else None
        records: list[VideoRecord] = []
        problems: list[Problem] = []
        paths = self.candidates()
        read = functools.partial(scan_file, min_frames=self.min_frames, view_filter=self.view_filter)
        for path, cine in zip(paths, map_fn(read, paths), strict=True):
            rel = relative(path, self.root)
            if cine is None:
                continue  # a DICOMDIR: the archive's index, whatever its name
            if isinstance(cine, BadFile):
                problems.append(Problem(rel, cine.reason, cine.detail))
                continue
            row, why_not = table.for_cine(rel, cine) if table else (None, "")
            if row is None and self.require_labels:
                where = self.labels_path.name if self.labels_path else "labels"
                problems.append(Problem(rel, Reason.MISSING_LABEL, why_not or f"not in {where}"))
                continue
            records.append(
                VideoRecord(
                    key=rel,
                    files=(path,),
                    split=(row.get("split", "") if row else "").strip().lower() or "train",
                    targets=self._targets(row) if row else {},
                    fps=cine.fps,
                    n_frames=cine.n_frames,
                    group=cine.patient or None,
                    meta={
                        "split_given": bool(row and row.get("split", "").strip()),
                        "sop_instance_uid": cine.sop_uid,
                        "transfer_syntax": cine.transfer_syntax,
                        "transfer_syntax_inferred": cine.inferred,
                        "photometric": cine.photometric,
                        "rows": cine.rows,
                        "columns": cine.columns,
                    },
                )
            )
        if table is not None:
            for rel in table.paths:
                if not (self.root / rel).is_file():
                    problems.append(Problem(rel, Reason.UNREADABLE, "listed in the labels CSV but not found"))
        return ScanResult(records, problems, table.finish() if table and table.study_rows else None)

    def frames(self, record: VideoRecord) -> Iterator[np.ndarray]:
        return read_frames(record.files[0], crop_region=self.crop_region)
