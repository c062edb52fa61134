"""TMED-2: still PNG images grouped by study into pseudo-videos with aortic-stenosis labels.

Images live under view_and_diagnosis_labeled_set/<SourceFolder>/ (names like 3725s1_5.png, the
study id before the underscore); a split CSV such as DEV479/TMED2_fold0_labeledpart.csv has
query_key, view_label, diagnosis_label, diagnosis_classifier_split, SourceFolder.
Studies labelled Not_Provided are excluded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

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
from fedecho.data.source import EchoSource, read_csv_rows, register_source

COLUMNS = ["query_key", "view_label", "diagnosis_label", "diagnosis_classifier_split", "SourceFolder"]
IMAGES = "view_and_diagnosis_labeled_set"


def _order(query_key: str) -> tuple[int, str]:
    m = re.search(r"_(\d+)\.png$", query_key)
    return (int(m.group(1)) if m else 0, query_key)


@register_source
class Tmed2Source(EchoSource):
    """Options: split_csv (default: the first TMED2_fold0_labeledpart.csv found), views (all)."""

    kind = "tmed2"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / IMAGES).is_dir()

    def _split_csv(self) -> Path:
        given = self.options.get("split_csv")
        if given:
            p = Path(given)
            return p if p.is_absolute() else self.root / p
        found = sorted(self.root.rglob("TMED2_fold0_labeledpart.csv")) or sorted(
            self.root.rglob("TMED2_*labeledpart.csv")
        )
        if not found:
            raise SourceError(f"{self.root}: no TMED2_*_labeledpart.csv split file found (pass split_csv=...)")
        return found[0]

    def _image(self, folder: str, key: str) -> Path:
        for candidate in (self.root / IMAGES / folder / key, self.root / IMAGES / "labeled" / key):
            if candidate.is_file():
                return candidate
        return self.root / IMAGES / (folder or "labeled") / key

    def scan(self) -> ScanResult:
        views = self.options.get("views")
        rows = read_csv_rows(self._split_csv(), COLUMNS)
        studies: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            if views and row["view_label"] not in views:
                continue
            studies.setdefault(row["query_key"].split("_")[0], []).append(row)
        records: list[VideoRecord] = []
        problems: list[Problem] = []
        for study, members in sorted(studies.items()):
            members.sort(key=lambda r: _order(r["query_key"]))
            labels = {r["diagnosis_label"] for r in members}
            where = f"study {study}"
            if labels & {"Not_Provided", ""} or len(labels) != 1:
                reason = "diagnosis Not_Provided" if "Not_Provided" in labels else f"labels {sorted(labels)}"
                problems.append(Problem(where, Reason.MISSING_LABEL, reason))
                continue
            label = labels.pop()
            if label not in AS_CLASSES:
                problems.append(Problem(where, Reason.MISSING_LABEL, f"unknown diagnosis_label {label!r}"))
                continue
            files, missing, views_found = [], [], []
            for r in members:
                path = self._image(r["SourceFolder"], r["query_key"])
                if path.is_file():
                    files.append(path)
                    views_found.append(r["view_label"])
                else:
                    missing.append(path)
            for path in missing:
                problems.append(
                    Problem(relative(path, self.root), Reason.UNREADABLE, "listed in split CSV but not found")
                )
            if not files:
                continue
            records.append(
                VideoRecord(
                    key=study,
                    files=tuple(files),
                    split=members[0]["diagnosis_classifier_split"].strip().lower(),
                    targets={"as_class": float(AS_CLASSES.index(label))},
                    n_frames=len(files),
                    group=study,
                    meta={"views": views_found},
                )
            )
        return ScanResult(records, problems)

    def frames(self, record: VideoRecord) -> Iterator[np.ndarray]:
        for path in record.files:
            try:
                with Image.open(path) as im:
                    yield np.asarray(im.convert("L"), dtype=np.uint8)
            except OSError as e:
                raise BadFile(Reason.UNREADABLE, f"{path.name}: {e}") from e
