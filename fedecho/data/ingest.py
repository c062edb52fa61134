"""`fedecho data add`: register a source's videos into a site folder, de-identified.

Each video is read through the existing sources (DICOM archive, EchoNet-Dynamic, CAMUS, TMED-2)
and decoders, reduced to KEPT header values and salted pseudonyms (fedecho.privacy.deid), blanked
outside the ultrasound sector, and written as uint8 frames to DIR/videos/<record-key>.npy
(temporary file, fsync, rename), then recorded in the manifest (DIR/site.db). A bad file is
quarantined with its reason and the pass goes on; identical bytes are registered once.

Public datasets (EchoNet-Dynamic, CAMUS, TMED-2) are de-identified by their publishers: their
frames are kept as published and their ids become pseudonyms like any other.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedecho.data.cache import decode_video
from fedecho.data.clips import to_uint8_gray_or_rgb
from fedecho.data.records import SPLITS, BadFile, Reason, SourceError, VideoRecord, relative
from fedecho.data.source import EchoSource, open_source
from fedecho.privacy.deid import (
    blank_outside_sector,
    deidentify,
    dicom_region,
    identifying_values,
    load_or_create_salt,
    pseudonym,
    scrub,
)
from fedecho.storage.files import atomic_path, file_sha256
from fedecho.storage.site_store import SiteStore

VIDEOS = "videos"
SPLIT_FRACTIONS = (0.75, 0.125, 0.125)  # train / val / test, by patient


@dataclass(frozen=True)
class Quarantined:
    """One file set aside. path is relative to SOURCE: shown locally on request, never stored."""

    row_id: int
    path: str
    reason: Reason
    detail: str


@dataclass
class IngestResult:
    source_kind: str
    added: list[str] = field(default_factory=list)  # record keys
    frames: int = 0
    already: int = 0  # this very file was ingested before (any outcome): nothing added
    quarantined: list[Quarantined] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return sum(q.reason == Reason.DUPLICATE for q in self.quarantined)


def split_for(patient: str) -> str:
    """A deterministic split from the salted patient hash (75/12.5/12.5): a patient never straddles two."""
    x = int(patient[:8], 16) / 2**32 if patient else 0.0
    train, val, _ = SPLIT_FRACTIONS
    return "train" if x < train else "val" if x < train + val else "test"


def video_path(site_dir: Path, record_key: str) -> Path:
    return site_dir / VIDEOS / f"{record_key}.npy"


def sweep(site_dir: Path, store: SiteStore) -> int:
    """Remove what a crash may have left in DIR/videos: temporary files and videos without a manifest row."""
    folder = site_dir / VIDEOS
    keys = store.record_keys()
    removed = 0
    for p in folder.iterdir() if folder.is_dir() else []:
        if p.name.startswith(".") or p.suffix != ".npy" or p.stem not in keys:
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _content_hash(record: VideoRecord) -> str:
    """sha256 of the original bytes (a multi-file pseudo-video: of its files' hashes in order)."""
    if len(record.files) == 1:
        return file_sha256(record.files[0])
    h = hashlib.sha256()
    for p in record.files:
        h.update(bytes.fromhex(file_sha256(p)))
    return h.hexdigest()


def _record_path(src: EchoSource, record: VideoRecord) -> str:
    return relative(record.files[0], src.root) if len(record.files) == 1 else record.key


class Ingest:
    """One `data add` pass of SOURCE into DIR."""

    def __init__(self, site_dir: str | Path, salt: bytes, store: SiteStore):
        self.site_dir = Path(site_dir)
        self.salt = salt
        self.store = store
        self.seen_now: dict[str, str] = {}  # sha256 -> record key registered in this pass

    def _quarantine(self, result: IngestResult, src: EchoSource, rel: str, sha: str | None, e: BadFile) -> None:
        row = self.store.add_file(
            record_key=None,
            sha256=sha,
            path_hash=pseudonym(self.salt, "path", rel),
            source_kind=src.kind,
            status="quarantined",
            reason=e.reason.value,
            detail=e.detail[:500],
        )
        result.quarantined.append(Quarantined(row.id, rel, e.reason, e.detail))

    def problem(self, result: IngestResult, src: EchoSource, rel: str, reason: Reason, detail: str) -> None:
        """A file the source's scan already rejected."""
        path = src.root / rel
        try:
            sha = file_sha256(path) if path.is_file() else None
        except OSError:
            sha = None
        if self.store.seen(pseudonym(self.salt, "path", rel), sha):
            result.already += 1
            return
        self._quarantine(result, src, rel, sha, BadFile(reason, detail))

    def video(self, result: IngestResult, src: EchoSource, record: VideoRecord) -> None:
        """Register one record, or quarantine it with its reason."""
        rel = _record_path(src, record)
        path_hash = pseudonym(self.salt, "path", rel)
        try:
            sha = _content_hash(record)
        except OSError as e:
            if not self.store.seen(path_hash, None):
                self._quarantine(result, src, rel, None, BadFile(Reason.UNREADABLE, f"cannot read ({e.strerror})"))
            else:
                result.already += 1
            return
        if self.store.seen(path_hash, sha):
            result.already += 1
            return
        twin = self.seen_now.get(sha) or self.store.registered_as(sha)
        if twin:
            self._quarantine(
                result, src, rel, sha, BadFile(Reason.DUPLICATE, f"same bytes as registered video {twin[:12]}")
            )
            return
        values: set[str] = set()
        try:
            row = self._decode(src, record, sha, path_hash, values)
        except BadFile as e:
            self._quarantine(result, src, rel, sha, BadFile(e.reason, scrub(e.detail, values)))
            return
        self.seen_now[sha] = row["record_key"]
        result.added.append(row["record_key"])
        result.frames += row["frames"]

    def _decode(self, src: EchoSource, record: VideoRecord, sha: str, path_hash: str, values: set[str]) -> dict:
        key = pseudonym(self.salt, "video", sha)[:32]
        info: dict = {"transfer_syntax": "", "manufacturer": "", "model": "", "fps": record.fps}
        if src.kind == "dicom":
            try:
                ds = pydicom.dcmread(record.files[0], stop_before_pixels=True)
            except Exception as e:
                raise BadFile(Reason.UNREADABLE, f"not a readable DICOM file ({type(e).__name__})") from e
            values |= identifying_values(ds)
            header, names = deidentify(ds, self.salt)
            region = dicom_region(ds)
            del ds  # nothing below may see the raw header
            frames = decode_video(src, record, None)
            frames, sector = blank_outside_sector(frames, region)
            frames = to_uint8_gray_or_rgb(frames)
            info.update(
                transfer_syntax=header.transfer_syntax,
                manufacturer=header.manufacturer,
                model=header.model,
                fps=header.fps,
            )
            patient, study, series, instance = names.patient, names.study, names.series, names.instance
            given = bool(record.meta.get("split_given"))
        else:
            frames = to_uint8_gray_or_rgb(decode_video(src, record, None))
            sector = "as_published"
            patient = pseudonym(self.salt, "patient", record.group or record.key)
            study, series, instance = pseudonym(self.salt, "record", record.key), "", ""
            given = bool(record.split)
        split = record.split if given and record.split in SPLITS else split_for(patient)
        target = video_path(self.site_dir, key)
        with atomic_path(target, suffix=".npy.tmp") as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(frames))
        try:
            self.store.add_file(
                record_key=key,
                sha256=sha,
                path_hash=path_hash,
                source_kind=src.kind,
                status="ok",
                patient=patient,
                study=study,
                series=series,
                instance=instance,
                frames=int(frames.shape[0]),
                fps=info["fps"],
                height=int(frames.shape[1]),
                width=int(frames.shape[2]),
                channels=int(frames.shape[3]) if frames.ndim == 4 else 1,
                transfer_syntax=info["transfer_syntax"],
                manufacturer=info["manufacturer"],
                model=info["model"],
                sector=sector,
                split=split,
                targets={k: float(v) for k, v in record.targets.items()},
            )
        except BaseException:
            target.unlink(missing_ok=True)  # no video without its manifest row
            raise
        return {"record_key": key, "frames": int(frames.shape[0])}


def ingest(
    source: str | Path,
    site_dir: str | Path,
    *,
    kind: str = "auto",
    labels: str | Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> IngestResult:
    """Register SOURCE into the site folder DIR; see the module docstring."""
    source, site_dir = Path(source), Path(site_dir)
    if (source / "site.db").exists():
        raise SourceError(f"{source}: already a registered site folder; give the original archive or dataset")
    if site_dir.resolve() == source.resolve() or site_dir.resolve().is_relative_to(source.resolve()):
        raise SourceError(f"{site_dir}: the site folder must not lie inside the source {source}")
    options: dict = {"require_labels": False, "crop_region": False}
    if labels:
        options["labels"] = Path(labels)
    src = open_source(source, kind, **options)
    salt = load_or_create_salt(site_dir)
    (site_dir / VIDEOS).mkdir(mode=0o700, parents=True, exist_ok=True)
    with SiteStore(site_dir) as store:
        sweep(site_dir, store)
        scan = src.scan()
        result = IngestResult(src.kind)
        run = Ingest(site_dir, salt, store)
        columns = (
            TextColumn("[bold]register[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, disable=not progress, console=console, transient=True) as bar:
            task = bar.add_task(src.kind, total=len(scan.problems) + len(scan.records))
            for p in scan.problems:
                run.problem(result, src, p.path, p.reason, p.detail)
                bar.advance(task)
            for record in scan.records:
                run.video(result, src, record)
                bar.advance(task)
    os.chmod(site_dir / VIDEOS, 0o700)
    return result
