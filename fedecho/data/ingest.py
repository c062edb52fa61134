"""`fedecho data add`: register a source's videos into a site folder, de-identified.

Each video is read through the existing sources (DICOM archive, EchoNet-Dynamic, CAMUS, TMED-2)
and decoders, reduced to KEPT header values and salted pseudonyms (fedecho.privacy.deid), blanked
outside the ultrasound sector, and written as uint8 frames to DIR/videos/<record-key>.npy, then
recorded in the manifest (DIR/site.db). A bad file is quarantined with its reason and the pass goes
on; identical bytes are registered once.

Archive scale (MIMIC-IV-ECHO holds 525,328 cines): worker processes read a DICOM archive's headers
for the scan (its labels are joined here, in file order), then worker processes
(`workers`, one thread each, forked from a fork server, never from this process) hash, decode,
de-identify and write each video to a temporary file (fsynced) under a dot name in DIR/videos. Only
this process touches the manifest: it takes the workers' outcomes in scan order, decides duplicates,
renames the temporary files onto their record keys and commits the rows in batches (the renames made
durable first). The result is the one a single process gives, row for row. A killed pass leaves at
most temporary files and renamed videos without a row; the next pass removes them (sweep) and skips,
unread, every file the manifest already holds. A file whose decoding kills its worker (a crashing
codec, the out-of-memory killer) is retried alone; if it kills that worker too it is quarantined.

Public datasets (EchoNet-Dynamic, CAMUS, TMED-2) are de-identified by their publishers: their
frames are kept as published and their ids become pseudonyms like any other.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fedecho._env import environ
from fedecho.data.cache import decode_video
from fedecho.data.clips import to_uint8_gray_or_rgb
from fedecho.data.dicom import DicomArchiveSource
from fedecho.data.dicom_file import read_header, tissue_boxes
from fedecho.data.records import (
    SPLITS,
    BadFile,
    Reason,
    ScanResult,
    SourceError,
    StudyCounts,
    VideoRecord,
    relative,
)
from fedecho.data.source import EchoSource, open_source
from fedecho.privacy.deid import (
    NoSector,
    blank_outside_sector,
    deidentify,
    identifying_values,
    load_or_create_salt,
    pseudonym,
    scrub,
)
from fedecho.storage.files import _fsync_dir, file_sha256
from fedecho.storage.site_store import SiteStore

VIDEOS = "videos"
SPLIT_FRACTIONS = (0.75, 0.125, 0.125)  # train / val / test, by patient
BATCH_ROWS = 64  # manifest rows per transaction (one disk sync each) ...
BATCH_SECONDS = 0.5  # ... or what arrived in this long, whichever comes first
QUEUED_PER_WORKER = 4  # tasks handed out ahead of the one committed next: keeps workers busy past a slow file
CHILD_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerError(RuntimeError):
    """The decoding worker processes cannot run at all (not one file's fault)."""


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
    estimated_sectors: int = 0  # registered cines whose sector came from the image, not a declared region
    studies: StudyCounts | None = None  # a labels CSV with study rows: how they were joined to cines
    workers: int = 1
    seconds: float = 0.0  # the whole pass, scan included
    scan_seconds: float = 0.0  # of which the scan (one process: it reads every file's header)
    cpu_seconds: float = 0.0  # CPU time of this process and of the workers' jobs (a loaded machine's measure)

    @property
    def duplicates(self) -> int:
        return sum(q.reason == Reason.DUPLICATE for q in self.quarantined)

    @property
    def reasons(self) -> dict[str, int]:
        """Quarantined files by reason code, whatever codes the readers produce."""
        return dict(sorted(Counter(str(q.reason) for q in self.quarantined).items()))

    @property
    def files(self) -> int:
        return len(self.added) + self.already + len(self.quarantined)


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if count is not None:
        return max(1, count() or 1)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


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


# ---------------------------------------------------------------- one file's work (any process)


@dataclass(frozen=True)
class Job:
    """One file to settle: a record to register, or a file the scan already rejected (problem)."""

    index: int  # position in the pass: outcomes are committed in this order
    rel: str
    path_hash: str
    known: frozenset[str | None]  # content hashes this path was ingested with before: skipped unread
    record: VideoRecord | None = None
    problem: tuple[Reason, str] | None = None  # the scan's (reason, detail)


@dataclass
class Outcome:
    """What a worker found; the manifest decision (and the duplicate check) is the parent's."""

    status: str  # already | bad | ok | twin (not decoded: its bytes are registered already)
    sha: str | None = None
    reason: Reason | None = None
    detail: str = ""
    tmp: str | None = None  # the frames, written and fsynced under a dot name in DIR/videos
    row: dict[str, Any] = field(default_factory=dict)  # manifest values of an ok video
    cpu: float = 0.0  # CPU seconds a worker process spent on it


class Decoder:
    """Hash one file, skip it if this path already holds these bytes, else decode, de-identify, blank
    and write its frames to a temporary file. It never touches the manifest."""

    def __init__(self, src: EchoSource, salt: bytes, site_dir: Path, twin: Callable[[str], bool] | None = None):
        self.src = src
        self.salt = salt
        self.site_dir = site_dir
        self.twin = twin  # in-process only: skip decoding bytes registered already

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "twin": None}

    def __call__(self, job: Job) -> Outcome:
        if job.problem is not None:
            path = self.src.root / job.rel
            try:
                sha = file_sha256(path) if path.is_file() else None
            except OSError:
                sha = None
            if sha in job.known:
                return Outcome("already", sha)
            return Outcome("bad", sha, *job.problem)
        assert job.record is not None
        try:
            sha = _content_hash(job.record)
        except OSError as e:
            if None in job.known:
                return Outcome("already")
            return Outcome("bad", None, Reason.UNREADABLE, f"cannot read ({e.strerror})")
        if sha in job.known:
            return Outcome("already", sha)
        if self.twin is not None and self.twin(sha):
            return Outcome("twin", sha)
        values: set[str] = set()
        try:
            return self._decode(job, sha, values)
        except BadFile as e:
            return Outcome("bad", sha, e.reason, scrub(e.detail, values))
        except NoSector as e:
            return Outcome("bad", sha, Reason.NO_SECTOR, str(e))

    def _decode(self, job: Job, sha: str, values: set[str]) -> Outcome:
        src, record = self.src, job.record
        assert record is not None
        key = pseudonym(self.salt, "video", sha)[:32]
        info: dict[str, Any] = {"transfer_syntax": "", "manufacturer": "", "model": "", "fps": record.fps}
        if src.kind == "dicom":
            ds, _ = read_header(record.files[0])  # files without preamble or meta too; a BadFile names the reason
            values |= identifying_values(ds)
            header, names = deidentify(ds, self.salt)
            region = tissue_boxes(ds)
            del ds  # nothing below may see the raw header
            frames = decode_video(src, record, None)
            frames, sector = blank_outside_sector(frames, region)
            frames = to_uint8_gray_or_rgb(frames)
            info.update(
                transfer_syntax=header.transfer_syntax,
                manufacturer=header.manufacturer,
                model=header.model,
                fps=record.fps,
            )
            patient, study, series, instance = names.patient, names.study, names.series, names.instance
            given = bool(record.meta.get("split_given"))
        else:
            frames = decode_video(src, record, None)  # grayscale or colour already (to_uint8_gray_or_rgb)
            sector = "as_published"
            patient = pseudonym(self.salt, "patient", record.group or record.key)
            study, series, instance = pseudonym(self.salt, "record", record.key), "", ""
            given = bool(record.split)
        split = record.split if given and record.split in SPLITS else split_for(patient)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy.tmp", dir=self.site_dir / VIDEOS)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(frames))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        row = {
            "record_key": key,
            "sha256": sha,
            "path_hash": job.path_hash,
            "source_kind": src.kind,
            "status": "ok",
            "patient": patient,
            "study": study,
            "series": series,
            "instance": instance,
            "frames": int(frames.shape[0]),
            "fps": info["fps"],
            "height": int(frames.shape[1]),
            "width": int(frames.shape[2]),
            "channels": int(frames.shape[3]) if frames.ndim == 4 else 1,
            "transfer_syntax": info["transfer_syntax"],
            "manufacturer": info["manufacturer"],
            "model": info["model"],
            "sector": sector,
            "split": split,
            "targets": {k: float(v) for k, v in record.targets.items()},
        }
        return Outcome("ok", sha, tmp=tmp, row=row)


# ---------------------------------------------------------------- worker processes

_DECODER: Decoder | None = None
_SLOTS: Any = None  # shared array: the job index each worker is on (-1: idle), to name a crash's file
_SLOT = -1


def _die_with_pass(lifeline: Connection) -> None:
    """A worker outlives no killed pass: the pass holds the only writing end of `lifeline`; when it is
    gone (killed too), reading ends and the worker exits instead of idling on as an orphan. (Its parent
    is the fork server, which in turn waits for its workers, so parent-death signals do not serve.)"""

    def watch() -> None:
        with suppress(EOFError, OSError):
            lifeline.recv_bytes()
        os._exit(1)

    threading.Thread(target=watch, name="pass-watch", daemon=True).start()


def _init_worker(decoder: Decoder, slots: Any, counter: Any, lifeline: Connection) -> None:
    global _DECODER, _SLOTS, _SLOT
    _die_with_pass(lifeline)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pass's to handle
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with counter.get_lock():
        _SLOT = counter.value % len(slots)
        counter.value += 1
    _DECODER, _SLOTS = decoder, slots


def _work(job: Job) -> Outcome:
    assert _DECODER is not None
    _SLOTS[_SLOT] = job.index
    cpu = time.process_time()
    try:
        outcome = _DECODER(job)
        outcome.cpu = time.process_time() - cpu
        return outcome
    finally:
        _SLOTS[_SLOT] = -1


def _one_thread_children() -> AbstractContextManager[None]:
    """Children spawned inside start their numeric libraries on one thread (read at their import)."""
    return environ(dict.fromkeys(CHILD_THREADS, "1"))


def _context() -> multiprocessing.context.BaseContext:
    """Never a plain fork of this process (torch may hold threads here): forked from a fork server that
    has imported the decoders once (each worker starts in milliseconds), else spawned."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Imported once, in the server (when this process first starts it), not again in each worker.
        ctx.set_forkserver_preload(["__main__", __name__])
        return ctx
    return multiprocessing.get_context("spawn")


class _Pool:
    """Worker processes, and the job each one is on."""

    def __init__(self, decoder: Decoder, workers: int):
        ctx = _context()
        self.slots = ctx.Array("q", [-1] * workers, lock=False)
        counter = ctx.Value("i", 0)
        lifeline, self._lifeline = ctx.Pipe(duplex=False)
        self.executor = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(decoder, self.slots, counter, lifeline)
        )

    def submit(self, job: Job) -> Future[Outcome]:
        return self.executor.submit(_work, job)

    def on_jobs(self) -> set[int]:
        return {int(i) for i in self.slots if i >= 0}

    def close(self, wait: bool) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=not wait)
        if wait:
            self._lifeline.close()


SCAN_CHUNK = 64  # headers a scan worker reads per task


def _scan(src: EchoSource, workers: int) -> ScanResult:
    """The source's scan; a DICOM archive's headers are read by `workers` processes (at archive scale
    the scan is hours in one process), its labels joined here. Same result as one process."""
    if workers == 1 or not isinstance(src, DicomArchiveSource):
        return src.scan()
    with _one_thread_children(), ProcessPoolExecutor(workers, mp_context=_context()) as pool:
        try:
            return src.scan(map_fn=functools.partial(pool.map, chunksize=SCAN_CHUNK))
        except BrokenProcessPool:  # a header that kills its reader: read them all here, as one worker does
            return src.scan()


def _in_process(decoder: Decoder, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
    for job in jobs:
        yield job, decoder(job)


def _parallel(decoder: Decoder, jobs: list[Job], workers: int) -> Iterator[tuple[Job, Outcome]]:
    """Outcomes in job order (job.index runs 0..n-1) from `workers` processes. When a worker dies, the
    jobs that were running are retried each alone, and the rest are handed to a fresh pool."""
    ready: dict[int, Outcome] = {}
    futures: dict[int, Future[Outcome]] = {}
    redo: deque[int] = deque()  # jobs handed out to a pool that broke: first in line for the next one
    fresh = head = 0  # the next job never handed out; the next job to yield
    fruitless = 0  # pools in a row that broke before finishing anything
    while head < len(jobs):
        pool = _Pool(decoder, workers)
        progressed = False
        try:
            while head < len(jobs):
                while len(futures) < workers * QUEUED_PER_WORKER and (redo or fresh < len(jobs)):
                    i = redo[0] if redo else fresh
                    futures[i] = pool.submit(jobs[i])
                    if redo:
                        redo.popleft()
                    else:
                        fresh += 1
                if head not in ready:
                    ready[head] = futures[head].result()
                    del futures[head]
                yield jobs[head], ready.pop(head)
                head += 1
                progressed = True
        except BrokenProcessPool as e:
            running = pool.on_jobs()
            suspects = []
            for i, future in sorted(futures.items()):
                if future.done() and not future.cancelled() and future.exception() is None:
                    ready[i] = future.result()  # finished before the break
                    progressed = True
                elif i in running:
                    suspects.append(jobs[i])
                else:
                    redo.append(i)
            futures.clear()
            redo = deque(sorted(redo))
            ready.update(_alone(decoder, suspects))
            fruitless = 0 if progressed or suspects else fruitless + 1
            if fruitless >= 2:
                raise WorkerError(f"the decoding worker processes fail before any file ({e})") from e
        finally:
            pool.close(wait=head >= len(jobs))


def _sha_or_none(src: EchoSource, job: Job) -> str | None:
    """The content hash a worker would have found (so that the next pass knows the file), if readable."""
    try:
        if job.record is not None:
            return _content_hash(job.record)
        path = src.root / job.rel
        return file_sha256(path) if path.is_file() else None
    except OSError:
        return None


def _alone(decoder: Decoder, jobs: list[Job]) -> dict[int, Outcome]:
    """Each job in its own fresh worker: a file that kills that one too is quarantined."""
    pools = {job.index: _Pool(decoder, 1) for job in jobs}
    futures = {job.index: pools[job.index].submit(job) for job in jobs}
    out: dict[int, Outcome] = {}
    for i, future in futures.items():
        try:
            out[i] = future.result()
        except BrokenProcessPool:
            job = next(j for j in jobs if j.index == i)
            out[i] = Outcome("bad", _sha_or_none(decoder.src, job), Reason.CORRUPT_PIXEL_DATA,
                             "decoding it ended its worker process")  # fmt: skip
        pools[i].close(wait=True)
    return out


# ---------------------------------------------------------------- the manifest (this process only)


class Ingest:
    """One `data add` pass of SOURCE into DIR: the manifest side, in job order."""

    def __init__(self, src: EchoSource, site_dir: str | Path, salt: bytes, store: SiteStore):
        self.src = src
        self.site_dir = Path(site_dir)
        self.salt = salt
        self.store = store
        self.result = IngestResult(src.kind)
        self.seen_now: dict[str, str] = {}  # sha256 -> record key registered in this pass

    def registered(self, sha: str) -> str | None:
        return self.seen_now.get(sha) or self.store.registered_as(sha)

    def jobs(self, problems: Iterable[tuple[str, Reason, str]], records: Iterable[VideoRecord]) -> list[Job]:
        """Every file of the pass in order, each with the content hashes its path was ingested with."""
        known = self.store.fingerprints()
        out: list[Job] = []
        for rel, reason, detail in problems:
            path_hash = pseudonym(self.salt, "path", rel)
            out.append(Job(len(out), rel, path_hash, frozenset(known.get(path_hash, ())), problem=(reason, detail)))
        for record in records:
            rel = _record_path(self.src, record)
            path_hash = pseudonym(self.salt, "path", rel)
            out.append(Job(len(out), rel, path_hash, frozenset(known.get(path_hash, ())), record=record))
        return out

    def commit(self, batch: list[tuple[Job, Outcome]]) -> None:
        """Record a batch of outcomes in one transaction; videos are renamed into place (and the rename
        made durable) before their rows commit, and none is left behind if the transaction fails."""
        placed: list[Path] = []
        try:
            with self.store.batch():
                for job, outcome in batch:
                    self._settle(job, outcome, placed)
                if placed:
                    _fsync_dir(self.site_dir / VIDEOS)
        except BaseException:
            for p in placed:
                p.unlink(missing_ok=True)
            raise
        finally:
            for _, outcome in batch:  # what was not renamed into place: duplicates, or all after an error
                if outcome.tmp:
                    Path(outcome.tmp).unlink(missing_ok=True)

    def _settle(self, job: Job, outcome: Outcome, placed: list[Path]) -> None:
        result = self.result
        result.cpu_seconds += outcome.cpu
        if outcome.status == "already":
            result.already += 1
            return
        twin = self.registered(outcome.sha) if job.record is not None and outcome.sha else None
        if twin:
            self._quarantine(job, outcome.sha, Reason.DUPLICATE, f"same bytes as registered video {twin[:12]}")
        elif outcome.status == "bad":
            assert outcome.reason is not None
            self._quarantine(job, outcome.sha, outcome.reason, outcome.detail)
        elif outcome.status == "ok" and outcome.tmp:
            row = outcome.row
            target = video_path(self.site_dir, row["record_key"])
            os.replace(outcome.tmp, target)
            placed.append(target)
            self.store.add_file(**row)
            self.seen_now[row["sha256"]] = row["record_key"]
            result.added.append(row["record_key"])
            result.frames += row["frames"]
            result.estimated_sectors += str(row["sector"]).startswith("image")
        else:  # "twin" means its bytes were registered when it was read; within one pass they stay so
            raise RuntimeError(f"{job.rel}: a {outcome.status!r} outcome whose registered twin is gone")

    def _quarantine(self, job: Job, sha: str | None, reason: Reason, detail: str) -> None:
        row = self.store.add_file(
            record_key=None,
            sha256=sha,
            path_hash=job.path_hash,
            source_kind=self.src.kind,
            status="quarantined",
            reason=reason.value,
            detail=detail[:500],
        )
        self.result.quarantined.append(Quarantined(row.id, job.rel, reason, detail))


class _Rate(ProgressColumn):
    """Files per second over the last half minute."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} files/s" if speed else "- files/s", style="progress.data.speed")


def ingest(
    source: str | Path,
    site_dir: str | Path,
    *,
    kind: str = "auto",
    labels: str | Path | None = None,
    views: dict[str, Any] | None = None,
    workers: int | None = 1,
    progress: bool = True,
    console: Console | None = None,
) -> IngestResult:
    """Register SOURCE into the site folder DIR; see the module docstring.

    views: which cines a study-level label applies to (DICOM archives: `views`, `series_pattern`,
    `accept_unnamed_views`, as fedecho.data.views.ViewFilter.parse takes them).
    workers: decoding processes (None: one per core this process may use; 1: all in this process).
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    source, site_dir = Path(source), Path(site_dir)
    if (source / "site.db").exists():
        raise SourceError(f"{source}: already a registered site folder; give the original archive or dataset")
    if site_dir.resolve() == source.resolve() or site_dir.resolve().is_relative_to(source.resolve()):
        raise SourceError(f"{site_dir}: the site folder must not lie inside the source {source}")
    options: dict = {"require_labels": False, "crop_region": False}
    if labels:
        options["labels"] = Path(labels)
    options.update(views or {})
    src = open_source(source, kind, **options)
    if views and src.kind != "dicom":
        raise SourceError(f"{source}: a {src.kind} source; view filters apply to DICOM archives' study labels")
    salt = load_or_create_salt(site_dir)
    (site_dir / VIDEOS).mkdir(mode=0o700, parents=True, exist_ok=True)
    columns = (
        TextColumn("[bold]register[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeRemainingColumn(),
    )
    with SiteStore(site_dir) as store, Progress(*columns, disable=not progress, console=console, transient=True) as bar:
        sweep(site_dir, store)
        scanning = bar.add_task(f"{src.kind}: scanning", total=None)
        t_scan = time.perf_counter()
        scan = _scan(src, default_workers() if workers is None else max(1, workers))
        scan_seconds = time.perf_counter() - t_scan
        bar.remove_task(scanning)
        run = Ingest(src, site_dir, salt, store)
        run.result.studies = scan.studies
        jobs = run.jobs(((p.path, p.reason, p.detail) for p in scan.problems), scan.records)
        to_decode = sum(not (j.record is None or j.known) for j in jobs)
        n = min(default_workers() if workers is None else max(1, workers), max(1, to_decode))
        run.result.workers, run.result.scan_seconds = n, scan_seconds
        task = bar.add_task(src.kind, total=len(jobs))
        if n == 1:
            outcomes = _in_process(Decoder(src, salt, site_dir, twin=lambda sha: bool(run.registered(sha))), jobs)
        else:
            outcomes = _parallel(Decoder(src, salt, site_dir), jobs, n)
        with _one_thread_children() if n > 1 else nullcontext():
            batch: list[tuple[Job, Outcome]] = []
            started = time.monotonic()
            try:
                for item in outcomes:
                    batch.append(item)
                    if len(batch) >= BATCH_ROWS or time.monotonic() - started >= BATCH_SECONDS:
                        run.commit(batch)
                        bar.advance(task, len(batch))
                        batch, started = [], time.monotonic()
                run.commit(batch)
                bar.advance(task, len(batch))
                batch = []
            finally:
                for _, outcome in batch:  # outcomes never committed (an error above): drop their frames
                    if outcome.tmp:
                        Path(outcome.tmp).unlink(missing_ok=True)
                close = getattr(outcomes, "close", None)
                if close is not None:
                    close()
        sweep(site_dir, store)  # a worker killed mid-file leaves its temporary file behind
    os.chmod(site_dir / VIDEOS, 0o700)
    run.result.seconds = time.perf_counter() - t0
    run.result.cpu_seconds += time.process_time() - cpu0
    return run.result
