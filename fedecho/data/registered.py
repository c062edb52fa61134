"""A registered site folder (`fedecho data add` output) as an echo source: kind "site".

DIR/site.db holds the manifest and DIR/videos/<record-key>.npy the de-identified frames, so
`data = DIR` in site.toml trains on registered data only. Records are keyed by pseudonym, grouped
by the salted patient hash, and split as stored at ingest (by patient unless the source had splits).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedecho.data.records import BadFile, Problem, Reason, ScanResult, VideoRecord
from fedecho.data.source import EchoSource, register_source


@register_source
class RegisteredSiteSource(EchoSource):
    """Options are accepted and ignored (labels were joined at ingest)."""

    kind = "site"
    detect_cost = 0

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "site.db").is_file() and (root / "videos").is_dir()

    def scan(self) -> ScanResult:
        from fedecho.storage.site_store import SiteStore  # SQLAlchemy only where the manifest is read

        records: list[VideoRecord] = []
        problems: list[Problem] = []
        with SiteStore(self.root, create=False) as store:
            rows = store.files("ok")
        for row in rows:
            path = self.root / "videos" / f"{row.record_key}.npy"
            if not path.is_file():
                rel = f"videos/{row.record_key}.npy"
                problems.append(Problem(rel, Reason.UNREADABLE, "in the manifest, not on disk"))
                continue
            records.append(
                VideoRecord(
                    key=str(row.record_key),
                    files=(path,),
                    split=row.split,
                    targets=dict(row.targets),
                    fps=row.fps,
                    n_frames=row.frames,
                    group=row.patient or None,
                )
            )
        return ScanResult(records, problems)

    def frames(self, record: VideoRecord) -> Iterator[np.ndarray]:
        try:
            video = np.load(record.files[0], mmap_mode="r")
        except (OSError, ValueError) as e:
            raise BadFile(Reason.UNREADABLE, f"registered video does not load ({type(e).__name__})") from e
        if video.dtype != np.uint8 or video.ndim not in (3, 4):
            raise BadFile(Reason.UNREADABLE, f"registered video is {video.dtype} {video.shape}, not uint8 frames")
        for frame in video:
            yield np.asarray(frame)
