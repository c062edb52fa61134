"""A DICOM archive's labels CSV: per file, or per study as hospitals keep them.

A row names one file (`path` relative to the archive, or `sop_instance_uid`) or one study
(`study_instance_uid`, or MIMIC-IV-ECHO's `study_id`). A file row labels that file whatever its view;
a study row labels the study's cines that the view filter accepts (fedecho.data.views), since the
report's EF was measured on the apical four-chamber view and not on every cine of the study. A file
row wins over its study's row. A study's `study_id` comes from the archive's echo-record-list.csv
(MIMIC-IV-ECHO's index: dicom_filepath -> study_id) when there is one, else from an `s<digits>` folder
in the file's path (MIMIC's layout).

What the join did is counted (`StudyCounts`), so a site learns how many labelled studies had no cine
the filter accepted instead of losing them silently. Errors name the CSV line, never an identifier.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from fedecho.data.records import SourceError, StudyCounts
from fedecho.data.source import read_csv_rows
from fedecho.data.views import ViewFilter

if TYPE_CHECKING:
    from fedecho.data.dicom import CineHeader

LABEL_ALIASES = {
    "path": ["dicom_filepath", "file", "filepath", "relative_path"],
    "sop_instance_uid": ["SOPInstanceUID", "sop_uid"],
    "study_instance_uid": ["StudyInstanceUID", "study_uid"],
    "study_id": ["StudyId"],
    "ef": ["EF", "lvef"],
    "esv": ["ESV"],
    "edv": ["EDV"],
    "as": ["as_label", "aortic_stenosis", "diagnosis_label"],
    "split": ["Split"],
}
FILE_KEYS = ("path", "sop_instance_uid")
STUDY_KEYS = ("study_instance_uid", "study_id")
RECORD_LIST = "echo-record-list.csv"  # MIMIC-IV-ECHO's index of the archive
_STUDY_FOLDER = re.compile(r"^s(\d+)$")

Row = dict[str, str]


def _study_id(value: str) -> str:
    """MIMIC study ids are written bare (94106955) or as their folder name (s94106955)."""
    value = value.strip()
    m = _STUDY_FOLDER.match(value)
    return m.group(1) if m else value


class LabelTable:
    """The CSV's rows indexed by file and by study; `for_cine` applies the precedence and the filter."""

    def __init__(self, path: Path, root: Path, view_filter: ViewFilter | None = None):
        self.path, self.root = path, root
        self.filter = view_filter or ViewFilter()
        rows = read_csv_rows(path, [], LABEL_ALIASES)
        if rows and not any(k in rows[0] for k in (*FILE_KEYS, *STUDY_KEYS)):
            raise SourceError(
                f"{path}: needs a 'path' or 'sop_instance_uid' column (labels per file) or a "
                "'study_instance_uid' or 'study_id' column (labels per study) to join labels"
            )
        self.index: dict[str, dict[str, Row]] = {k: {} for k in (*FILE_KEYS, *STUDY_KEYS)}
        lines: dict[str, dict[str, int]] = {k: {} for k in self.index}
        self.study_rows: list[Row] = []
        for n, row in enumerate(rows, start=2):  # line 1 is the header
            given = {k: self._key(k, row.get(k, "")) for k in self.index if row.get(k, "").strip()}
            # A file row labels that file only: a study column beside it is not a study label.
            keys = {k: v for k, v in given.items() if k in FILE_KEYS} or given
            if not keys:
                raise SourceError(
                    f"{path} line {n}: names no file or study (columns: path or sop_instance_uid for a file, "
                    "study_instance_uid or study_id for a study)"
                )
            for k, value in keys.items():
                if value in lines[k]:
                    raise SourceError(f"{path} line {n}: the same {k} as line {lines[k][value]}")
                lines[k][value] = n
                self.index[k][value] = row
            if not any(k in keys for k in FILE_KEYS):
                self.study_rows.append(row)
        self.counts = StudyCounts(studies=len(self.study_rows))
        self._record_list: dict[str, str] | None = None
        self._seen: defaultdict[int, list[bool]] = defaultdict(list)  # study row -> accepted? per cine met

    @staticmethod
    def _key(column: str, value: str) -> str:
        value = value.strip()
        if column == "path":
            return value.removeprefix("./")
        return _study_id(value) if column == "study_id" else value

    @property
    def paths(self) -> dict[str, Row]:
        return self.index["path"]

    def _study_ids(self) -> dict[str, str]:
        if self._record_list is None:
            index = self.root / RECORD_LIST
            rows = read_csv_rows(index, ["study_id"], {"path": ["dicom_filepath"]}) if index.is_file() else []
            self._record_list = {r["path"].removeprefix("./"): _study_id(r["study_id"]) for r in rows if r.get("path")}
        return self._record_list

    def study_row(self, rel: str, study_uid: str) -> Row | None:
        """The study row of this cine's study, by StudyInstanceUID or by study_id."""
        if study_uid and study_uid in self.index["study_instance_uid"]:
            return self.index["study_instance_uid"][study_uid]
        if self.index["study_id"]:
            sid = self._study_ids().get(rel)
            if sid is None:
                folders = [m.group(1) for part in Path(rel).parts[:-1] if (m := _STUDY_FOLDER.match(part))]
                sid = folders[-1] if folders else None
            if sid is not None:
                return self.index["study_id"].get(sid)
        return None

    def for_cine(self, rel: str, cine: CineHeader) -> tuple[Row | None, str]:
        """(the row that labels this cine, or None; why a labelled study's cine took no label)."""
        row = self.index["path"].get(rel) or self.index["sop_instance_uid"].get(cine.sop_uid)
        if row is not None:
            return row, ""
        study = self.study_row(rel, cine.study_uid)
        if study is None:
            return None, ""
        view, source = cine.view, cine.view_source
        accepted = self.filter.accepts(view)
        self._seen[id(study)].append(accepted)
        if accepted:
            self.counts.labelled_cines += 1
            where = source or "no view named (accepted)"
            self.counts.view_sources[where] = self.counts.view_sources.get(where, 0) + 1
            return study, ""
        wanted = ", ".join(sorted(self.filter.views))
        if view is None:
            self.counts.unnamed += 1
            return None, f"its study is labelled, but its header names no view (labels go to {wanted} cines)"
        self.counts.other_view += 1
        return None, f"its study is labelled, but its {source} names {view}, not {wanted}"

    def finish(self) -> StudyCounts:
        """Counts after every cine was met: labelled studies without an accepted cine, and without any."""
        c = self.counts
        c.no_accepted_cine = sum(not any(self._seen.get(id(r), ())) for r in self.study_rows)
        c.no_cine = sum(id(r) not in self._seen for r in self.study_rows)
        return c
