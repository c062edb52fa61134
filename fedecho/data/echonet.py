"""EchoNet-Dynamic: FileList.csv, VolumeTracings.csv and Videos/*.avi (BRIEF section 2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedecho.data.records import BadFile, Problem, Reason, ScanResult, VideoRecord, relative
from fedecho.data.source import EchoSource, parse_float, read_csv_rows, register_source
from fedecho.data.video import read_avi

FILELIST = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split"]
TRACINGS = ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]


def read_tracings(path: Path) -> dict[str, dict[int, np.ndarray]]:
    """FileName (without .avi) -> {frame: (rows, 4) X1 Y1 X2 Y2}, frames in order of appearance.

    EchoNet lists two traced frames per video, ES first and ED last; each frame's first row is
    the long axis and the others are the disc chords.
    """
    out: dict[str, dict[int, list[list[float]]]] = {}
    for row in read_csv_rows(path, TRACINGS):
        name = row["FileName"].removesuffix(".avi")
        coords = [parse_float(row[c]) for c in ("X1", "Y1", "X2", "Y2")]
        frame = parse_float(row["Frame"])
        if frame is None or any(c is None for c in coords):
            continue
        out.setdefault(name, {}).setdefault(int(frame), []).append(coords)  # type: ignore[arg-type]
    return {k: {f: np.asarray(v, dtype=np.float64) for f, v in frames.items()} for k, frames in out.items()}


@register_source
class EchoNetSource(EchoSource):
    kind = "echonet"
    ef_threshold = 50.0

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "FileList.csv").is_file()

    def scan(self) -> ScanResult:
        rows = read_csv_rows(self.root / "FileList.csv", FILELIST)
        tracing_file = self.root / "VolumeTracings.csv"
        tracings = read_tracings(tracing_file) if tracing_file.is_file() else {}
        records: list[VideoRecord] = []
        problems: list[Problem] = []
        listed: set[str] = set()
        for row in rows:
            name = row["FileName"].removesuffix(".avi")
            listed.add(name)
            path = self.root / "Videos" / f"{name}.avi"
            if not path.is_file():
                problems.append(
                    Problem(relative(path, self.root), Reason.UNREADABLE, "listed in FileList.csv but not found")
                )
                continue
            targets = {k.lower(): v for k in ("EF", "ESV", "EDV") if (v := parse_float(row[k])) is not None}
            if "ef" in targets:
                targets["ef_class"] = self.ef_class(targets["ef"])
            meta: dict[str, object] = {}
            traced = tracings.get(name, {})
            if len(traced) >= 2:
                frames = list(traced)
                meta = {"es_frame": frames[0], "ed_frame": frames[-1], "tracings": traced}
            n_frames = parse_float(row["NumberOfFrames"])
            records.append(
                VideoRecord(
                    key=name,
                    files=(path,),
                    split=row["Split"].strip().lower(),
                    targets=targets,
                    fps=parse_float(row["FPS"]),
                    n_frames=int(n_frames) if n_frames else None,
                    meta=meta,
                )
            )
        videos = self.root / "Videos"
        if videos.is_dir():
            for path in sorted(videos.glob("*.avi")):
                if path.stem not in listed:
                    problems.append(
                        Problem(relative(path, self.root), Reason.MISSING_LABEL, "not listed in FileList.csv")
                    )
        return ScanResult(records, problems)

    def frames(self, record: VideoRecord) -> Iterator[np.ndarray]:
        try:
            video, _ = read_avi(record.files[0])
        except ValueError as e:
            raise BadFile(Reason.UNREADABLE, str(e).split(": ", 1)[-1]) from e
        yield from video
