"""Archive-scale registration: `data add --workers N` gives what one process gives, and a pass killed
midway (the whole command, or one of its decoding workers) ends, once run again, in the same site folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pydicom
import pytest
from pydicom.uid import generate_uid

from fedecho.data import Reason
from fedecho.data.ingest import VIDEOS, ingest
from fedecho.privacy.deid import SALT_FILE
from fedecho.storage.site_store import SiteStore

FEDECHO = str(Path(sys.executable).with_name("fedecho"))
SALT = hashlib.sha256(b"test_ingest_parallel").digest()  # one salt: record keys comparable across folders


def _site(folder: Path) -> Path:
    """An empty site folder with the shared salt."""
    folder.mkdir(mode=0o700, parents=True)
    fd = os.open(folder / SALT_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, SALT)
    os.close(fd)
    return folder


def _state(site: Path) -> tuple[list[str], dict[str, str]]:
    """Manifest rows without their id and time, in a fixed order; each file in videos/ by its hash."""
    with SiteStore(site, create=False) as store:
        rows = sorted(repr({k: v for k, v in vars(r).items() if k not in ("id", "ingested")}) for r in store.files())
    videos = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (site / VIDEOS).iterdir()}
    return rows, videos


def _rows(site: Path) -> int:
    """Committed manifest rows, read the way another process would while a pass runs."""
    if not (site / "site.db").exists():
        return 0
    with sqlite3.connect(f"file:{site / 'site.db'}?mode=ro", uri=True, timeout=10) as db:
        try:
            return int(db.execute("SELECT count(*) FROM files").fetchone()[0])
        except sqlite3.OperationalError:  # the table is being created
            return 0


@pytest.fixture(scope="module")
def archive(dicom_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom's cines and stills, a cine that declares no tissue region, a copy, a truncated
    file and a text file."""
    root = tmp_path_factory.mktemp("parallel") / "archive"
    shutil.copytree(dicom_phantom, root, ignore=shutil.ignore_patterns("*.csv", "*.json"))
    cine = next(p for p in sorted(root.rglob("*_0001.dcm")))
    ds = pydicom.dcmread(cine)
    del ds.SequenceOfUltrasoundRegions
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["no-region"])
    ds.save_as(root / "no_region.dcm", enforce_file_format=True)
    shutil.copy(cine, root / "zz_copy.dcm")
    blob = cine.read_bytes()
    (root / "truncated.dcm").write_bytes(blob[: len(blob) // 2])
    (root / "notes.dcm").write_bytes(b"\x00" * 200 + b"not DICOM at all")
    return root


@pytest.fixture(scope="module")
def reference(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The archive registered by one process."""
    site = _site(tmp_path_factory.mktemp("reference") / "site")
    return site, ingest(archive, site, workers=1, progress=False)


@pytest.mark.slow
def test_two_workers_register_what_one_does(archive: Path, reference: tuple[Path, Any], tmp_path: Path) -> None:
    ref_site, one = reference
    site = _site(tmp_path / "site")
    two = ingest(archive, site, workers=2, progress=False)
    assert two.workers == 2 and one.workers == 1
    assert sorted(two.added) == sorted(one.added) and two.frames == one.frames > 0
    assert _state(site) == _state(ref_site)  # rows, record keys, reasons, frames on disk: all equal
    reasons = {q.path: q.reason for q in two.quarantined}
    assert reasons["truncated.dcm"] == Reason.TRUNCATED and reasons["notes.dcm"] == Reason.NOT_DICOM
    assert [q.detail for q in two.quarantined if q.reason == Reason.DUPLICATE] == [
        q.detail for q in one.quarantined if q.reason == Reason.DUPLICATE
    ]  # the same one of the two copies is registered, whichever worker read it first
    assert two.reasons == one.reasons and two.reasons.get("single_frame", 0) >= 1
    assert two.duplicates == 1 and two.estimated_sectors == one.estimated_sectors == 1
    assert len(two.added) == 6 + 1  # every cine, and the one without a region
    again = ingest(archive, site, workers=2, progress=False)
    assert again.already == len(two.added) + len(two.quarantined) and not again.added and not again.quarantined


def _workers(pid: int) -> list[psutil.Process]:
    """The pass's decoding workers: forked by its fork server (spawned where there is none)."""
    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if p.ppid() != pid or "spawn_main" in " ".join(p.cmdline())
    ]


def _add(archive: Path, site: Path, log: Path) -> subprocess.Popen[bytes]:
    """`fedecho data add --workers 2` in its own process, its output to log."""
    cmd = [FEDECHO, "data", "add", str(archive), "--site-dir", str(site), "--workers", "2"]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})


def _when_rows(proc: subprocess.Popen[bytes], site: Path, timeout: float = 120) -> int:
    """Wait until the running pass has committed its first rows (and its workers are up); return the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the pass ended before it could be interrupted"
        if (n := _rows(site)) > 0 and len(_workers(proc.pid)) == 2:
            return n
        time.sleep(0.02)
    raise AssertionError("the pass committed nothing in time")


@pytest.mark.slow
def test_a_killed_pass_resumes_to_the_same_site_folder(
    archive: Path, reference: tuple[Path, Any], tmp_path: Path
) -> None:
    ref_site, one = reference
    total = len(one.added) + len(one.quarantined)
    site = _site(tmp_path / "site")
    proc = _add(archive, site, tmp_path / "log")
    _when_rows(proc, site)
    workers = _workers(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    psutil.wait_procs(workers, timeout=30)  # they die with their parent
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    committed = _rows(site)
    assert 0 < committed < total, "the pass was not killed midway"
    again = ingest(archive, site, workers=2, progress=False)
    assert _state(site) == _state(ref_site)
    assert again.already == committed and len(again.added) + len(again.quarantined) == total - committed


@pytest.mark.slow
def test_a_worker_killed_mid_file_is_retried_alone(archive: Path, reference: tuple[Path, Any], tmp_path: Path) -> None:
    """The out-of-memory killer (or a crashing codec) ends one worker: the pass still ends as one
    process would have ended it, with nothing quarantined for it."""
    ref_site, _ = reference
    site = _site(tmp_path / "site")
    proc = _add(archive, site, tmp_path / "log")
    _when_rows(proc, site)
    victim = _workers(proc.pid)[0]
    victim.send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    output = (tmp_path / "log").read_text()
    assert proc.returncode == 0, output
    assert _state(site) == _state(ref_site)
    assert "quarantined: duplicate 1, not_dicom 1, single_frame" in output
