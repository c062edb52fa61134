"""The one dataset interface: a source scans its folder into records and decodes frames.

Each format (EchoNet-Dynamic, CAMUS, TMED-2, DICOM archive) is one small class in its own file;
everything after decoding (resizing, caching, clip sampling, normalisation) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fedecho.data.records import ScanResult, SourceError, VideoRecord


class EchoSource(ABC):
    """A folder of echo videos in one known format."""

    kind: ClassVar[str]
    decoder_version: ClassVar[int] = 1  # bump when decoding changes, to invalidate cached frames
    ef_threshold: ClassVar[float] = 50.0
    detect_cost: ClassVar[int] = 0  # detection tries cheap index-file checks before walking folders

    def __init__(self, root: str | Path, **options: Any):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: not a folder")
        self.options = options

    @classmethod
    @abstractmethod
    def detect(cls, root: Path) -> bool:
        """True when root looks like this format."""

    @abstractmethod
    def scan(self) -> ScanResult:
        """Index the folder: records with targets and splits, problems for files to skip."""

    @abstractmethod
    def frames(self, record: VideoRecord) -> Iterator[np.ndarray]:
        """Yield the record's frames at native resolution, (H, W) or (H, W, 3) uint8.

        Raises BadFile when the file cannot be decoded.
        """

    def cache_params(self) -> dict[str, Any]:
        """What, beyond file contents, changes the decoded frames (part of the cache key)."""
        return {"kind": self.kind, "decoder": self.decoder_version}

    def ef_class(self, ef: float) -> float:
        return 1.0 if ef >= self.ef_threshold else 0.0


SOURCES: dict[str, type[EchoSource]] = {}


def register_source(cls: type[EchoSource]) -> type[EchoSource]:
    SOURCES[cls.kind] = cls
    return cls


def _load_builtin() -> None:
    # Imported for their registration side effect.
    from fedecho.data import camus, dicom, echonet, registered, tmed2  # noqa: F401


def detect_source(root: str | Path) -> str | None:
    _load_builtin()
    root = Path(root)
    for kind, cls in sorted(SOURCES.items(), key=lambda kv: kv[1].detect_cost):
        if cls.detect(root):
            return kind
    return None


def open_source(root: str | Path, kind: str = "auto", **options: Any) -> EchoSource:
    """Open a folder as an echo source; kind 'auto' detects the format."""
    _load_builtin()
    if kind == "auto":
        found = detect_source(root)
        if found is None:
            raise SourceError(
                f"{root}: cannot tell the format; expected EchoNet-Dynamic (FileList.csv), CAMUS "
                "(database_nifti/), TMED-2 (view_and_diagnosis_labeled_set/), DICOM files or a registered site "
                "folder (site.db)"
            )
        kind = found
    if kind not in SOURCES:
        raise SourceError(f"unknown source kind {kind!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[kind](root, **options)


def read_csv_rows(path: Path, required: list[str], aliases: dict[str, list[str]] | None = None) -> list[dict[str, str]]:
    """Read a CSV into dicts keyed by canonical column names; missing columns name the file.

    aliases maps a canonical name to other accepted spellings (matched case-insensitively).
    """
    import csv

    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        lookup = {h.lower(): h for h in header}
        mapping: dict[str, str] = {}
        for canon, alts in {**{r: [] for r in required}, **(aliases or {})}.items():
            for name in [canon, *alts]:
                if name.lower() in lookup:
                    mapping[canon] = lookup[name.lower()]
                    break
        missing = [r for r in required if r not in mapping]
        if missing:
            raise SourceError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header)})")
        rows = []
        for raw in reader:
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            rows.append({canon: row.get(col, "") for canon, col in mapping.items()})
        return rows


def parse_float(value: str) -> float | None:
    """A finite float, or None for blanks, NaN and junk."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None
