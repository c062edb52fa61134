"""Site data registration: de-identification, sector blanking, quarantine, the "site" source."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import examples
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000MC
from typer.testing import CliRunner

from builders import gradient_frames, header_phi, us_cine
from fedecho.cli import app
from fedecho.data import EchoVideoDataset, Reason, decode_video, open_source
from fedecho.data.clips import to_uint8_gray_or_rgb
from fedecho.data.ingest import VIDEOS, ingest
from fedecho.privacy.deid import (
    BASIC_PROFILE,
    KEPT,
    SALT_FILE,
    NoSector,
    PrivacyError,
    blank_outside_sector,
    load_or_create_salt,
    pseudonym,
)
from fedecho.storage.files import file_sha256
from fedecho.storage.site_store import SiteStore
from fedecho.synth.dicom_writer import _finish


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def registered(dicom_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """site01 of the phantom archive, registered twice through the CLI."""
    archive = dicom_phantom / "site01"
    site = tmp_path_factory.mktemp("registered") / "site"
    first = _run("data", "add", str(archive), "--site-dir", str(site))
    second = _run("data", "add", str(archive), "--site-dir", str(site))
    report = _run("data", "report", "--site-dir", str(site))
    return archive, site, first + second + report, second


@pytest.mark.slow
def test_no_identifier_reaches_the_site_folder_or_the_output(registered: tuple[Path, Path, str, str]) -> None:
    archive, site, output, _ = registered
    phi = header_phi(archive)
    assert len(phi) > 20
    files = [p for p in site.rglob("*") if p.is_file() and p.name != SALT_FILE]
    assert {p.name for p in files} >= {"site.db"} and len(list((site / VIDEOS).glob("*.npy"))) >= 2
    for p in files:
        blob = p.read_bytes()
        # Pixel files: only strings of 8+ characters (a 5-letter family name occurs by chance in
        # megabytes of speckle; full names, MRNs, dates and UIDs do not). Everything else: all of them.
        candidates = [s for s in phi if len(s) >= 8] if p.suffix == ".npy" else phi
        leaked = [s for s in candidates if s.encode() in blob]
        assert not leaked, f"{p.relative_to(site)} holds {leaked}"
    assert not [s for s in phi if s in output]
    assert "files/p" not in output  # archive paths embed subject and study ids: not shown by default
    assert stat.S_IMODE((site / SALT_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((site / "site.db").stat().st_mode) == 0o600


def test_frames_are_the_tissue_region_and_a_second_add_adds_nothing(registered: tuple[Path, Path, str, str]) -> None:
    archive, site, _, second = registered
    with SiteStore(site, create=False) as store:
        ok = store.files("ok")
        quarantined = store.files("quarantined")
    cines = open_source(archive, "dicom", require_labels=False)  # today's reading: cropped to the region
    scan = cines.scan()
    assert len(ok) == len(scan.records) and {q.reason for q in quarantined} <= {"single_frame"}
    assert len(quarantined) == len(scan.problems)
    by_sha = {r.sha256: r for r in ok}
    for record in scan.records:
        row = by_sha[file_sha256(record.files[0])]
        stored = np.load(site / VIDEOS / f"{row.record_key}.npy")
        expected = to_uint8_gray_or_rgb(decode_video(cines, record, None))
        # Inside the region only its moving fan is kept: a window of the region, untouched where kept.
        th, tw = stored.shape[1:3]
        kept = [
            (y, x)
            for y in range(expected.shape[1] - th + 1)
            for x in range(expected.shape[2] - tw + 1)
            if np.array_equal(np.where(stored > 0, expected[:, y : y + th, x : x + tw], 0), stored)
        ]
        assert kept and stored.any()
        (y, x), tissue = kept[0], expected.max(0) > 10
        assert ((stored.max(0) > 0) & tissue[y : y + th, x : x + tw]).sum() >= 0.99 * tissue.sum()
        assert row.sector == "region" and row.frames == len(stored) and row.split in ("train", "val", "test")
        assert row.targets["ef"] == pytest.approx(record.targets["ef"], abs=1e-6)
        assert row.patient and row.patient == pseudonym(load_or_create_salt(site), "patient", record.group or "")
    assert "already registered" in second and len(ok) + len(quarantined) == len(scan.records) + len(scan.problems)


def test_sector_estimated_from_the_image_blanks_burned_in_text(dicom_phantom: Path, tmp_path: Path) -> None:
    """Without a Sequence of Ultrasound Regions the sector is what moves; names and dates do not."""
    original = sorted((dicom_phantom / "site02").rglob("*_0001.dcm"))[0]
    ds = pydicom.dcmread(original)
    box = ds.SequenceOfUltrasoundRegions[0]
    x0, y0, x1, y1 = (
        box.RegionLocationMinX0,
        box.RegionLocationMinY0,
        box.RegionLocationMaxX1,
        box.RegionLocationMaxY1,
    )
    del ds.SequenceOfUltrasoundRegions
    (tmp_path / "arch").mkdir()
    ds.save_as(tmp_path / "arch" / "cine.dcm", enforce_file_format=True)
    result = ingest(tmp_path / "arch", tmp_path / "site", progress=False)
    assert len(result.added) == 1
    stored = np.load(tmp_path / "site" / VIDEOS / f"{result.added[0]}.npy")
    uncropped = open_source(tmp_path / "arch", "dicom", crop_region=False)
    full = to_uint8_gray_or_rgb(decode_video(uncropped, uncropped.scan().records[0], None))
    assert full.ndim == 4  # coloured ECG and text around the sector
    gray_full = full.astype(float).mean(-1)
    assert gray_full[:, :y0].max() > 200  # burned-in text above the sector ...
    h, w = stored.shape[1:3]
    assert h <= y1 - y0 + 1 + 10 and w <= x1 - x0 + 1 + 10  # ... is not in the stored frames
    # Every stored pixel is either blanked or the original one at the sector's offset (found on frame 0).
    best = None
    kept = stored > 0
    for dy in range(-4, 13):
        for dx in range(-4, 13):
            ref0 = gray_full[0, y0 + dy : y0 + dy + h, x0 + dx : x0 + dx + w]
            if ref0.shape == (h, w) and np.allclose(stored[0][kept[0]], ref0[kept[0]], atol=1.0):
                best = gray_full[:, y0 + dy : y0 + dy + h, x0 + dx : x0 + dx + w]
    assert best is not None and np.allclose(stored[kept], best[kept], atol=1.0)
    tissue = best.max(0) > 10
    assert ((stored.max(0) > 0) & tissue).sum() >= 0.99 * tissue.sum()  # the sector itself is kept


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_every_bad_input_is_quarantined_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "archive"
    good = _save(us_cine(gradient_frames(10), uid_seed="good"), root / "good.dcm")
    blob = good.read_bytes()
    (root / "truncated.dcm").write_bytes(blob[: len(blob) - 700])
    (root / "notes.dcm").write_bytes(b"\x00" * 64 + b"definitely not DICOM")
    shutil.copy(examples.get_path("ct"), root / "ct.dcm")
    _save(us_cine(gradient_frames(1), uid_seed="still"), root / "still.dcm")
    broken = _finish(
        us_cine(gradient_frames(10, rgb=True), "RGB", uid_seed="broken"), gradient_frames(10, rgb=True), jpeg=True
    )
    broken.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + b"\x13" * 200] * 10)  # JPEG headers, no image
    _save(broken, root / "corrupt.dcm")
    mpeg = us_cine(gradient_frames(10), uid_seed="mpeg")
    mpeg.file_meta.TransferSyntaxUID = JPEG2000MC  # no installed decoder (H.264 now decodes)
    mpeg.PixelData = encapsulate([b"\x00" * 16])
    _save(mpeg, root / "mpeg.dcm")
    _save(us_cine(gradient_frames(10), uid_seed="count", NumberOfFrames=12), root / "count.dcm")
    _save(us_cine(gradient_frames(10), uid_seed="huge", Rows=60000, Columns=60000), root / "huge.dcm")
    (root / "empty.dcm").write_bytes(b"")
    shutil.copy(good, root / "zz_copy.dcm")
    unreadable = root / "unreadable.dcm"
    if os.geteuid() == 0:  # root reads anything: a dangling link (a vanished mount) stands in
        unreadable.symlink_to(root / "gone.dcm")
    else:
        shutil.copy(good, unreadable)
        unreadable.chmod(0)
    site = tmp_path / "site"
    result = ingest(root, site, progress=False)
    reasons = {q.path: q.reason for q in result.quarantined}
    assert reasons == {
        "truncated.dcm": Reason.TRUNCATED,
        "notes.dcm": Reason.NOT_DICOM,
        "ct.dcm": Reason.NOT_ULTRASOUND,
        "still.dcm": Reason.SINGLE_FRAME,
        "corrupt.dcm": Reason.CORRUPT_PIXEL_DATA,
        "mpeg.dcm": Reason.UNSUPPORTED_TRANSFER_SYNTAX,
        "count.dcm": Reason.FRAME_COUNT_MISMATCH,
        "huge.dcm": Reason.BAD_DIMENSIONS,
        "empty.dcm": Reason.EMPTY,
        "zz_copy.dcm": Reason.DUPLICATE,
        "unreadable.dcm": Reason.UNREADABLE,
    }
    assert len(result.added) == 1 and result.duplicates == 1
    assert [p.name for p in (site / VIDEOS).iterdir()] == [f"{result.added[0]}.npy"]  # nothing partial
    assert all("TEST^PATIENT" not in q.detail and "P1" not in q.detail.split() for q in result.quarantined)
    with SiteStore(site, create=False) as store:
        summary = store.summary()
        assert summary["ok"] == 1 and summary["reasons"]["duplicate"] == 1 and summary["quarantined"] == 11
    # The report names the files only with --source, resolving the salted path hashes at the site.
    out = _run("data", "report", "--site-dir", str(site), "--source", str(root))
    assert "truncated.dcm" in out and "frame_count_mismatch" in out and "bad_dimensions" in out
    assert "corrupt.dcm" not in _run("data", "report", "--site-dir", str(site))

    # A crash between writing the frames and recording them leaves no video behind.
    _save(us_cine(gradient_frames(12), uid_seed="late"), root / "late.dcm")
    (site / VIDEOS / ".stale.npy.tmp").write_bytes(b"half a video")

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(SiteStore, "add_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(root, site, progress=False)
    assert sorted(p.name for p in (site / VIDEOS).iterdir()) == [f"{result.added[0]}.npy"]


def test_site_source_feeds_the_training_dataset(registered: tuple[Path, Path, str, str], cache_dir: Path) -> None:
    _, site, _, _ = registered
    src = open_source(site)
    assert src.kind == "site"
    ds = EchoVideoDataset(src, split=None, targets=("ef", "ef_class"), cache=cache_dir, size=64)
    assert not ds.prepare(progress=False) and len(ds) >= 2
    clip, info = ds[0]
    assert clip.shape == (3, 16, 64, 64) and set(info) == {"ef", "ef_class", "frame_index"}
    splits: dict[str, set[str]] = {}
    for r in ds.records:
        splits.setdefault(r.group or "", set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values())  # a patient never straddles splits
    out = _run("data", "inspect", str(site), "--cache", str(cache_dir), "--size", "64")
    assert "(site)" in out


def test_profile_salt_and_blanking_units(tmp_path: Path) -> None:
    removed = {kw for _, kw, action in BASIC_PROFILE if action != "K"}
    assert not removed & set(KEPT)
    assert {"PatientName", "PatientID", "InstitutionName", "StationName", "DeviceSerialNumber"} <= removed
    salt = load_or_create_salt(tmp_path)
    assert load_or_create_salt(tmp_path) == salt and len(salt) == 32
    assert pseudonym(salt, "patient", "MRN1") != pseudonym(os.urandom(32), "patient", "MRN1")
    (tmp_path / SALT_FILE).chmod(0o644)
    with pytest.raises(PrivacyError, match="chmod 600"):
        load_or_create_salt(tmp_path)
    boxes = [(5, 2, 14, 11), (20, 2, 24, 6)]
    still = np.full((4, 20, 30), 200, np.uint8)
    with pytest.raises(NoSector, match="no moving sector"):  # nothing moves: the fan cannot be told from text
        blank_outside_sector(still, boxes)
    frames = still.copy()
    rng = np.random.default_rng(0)
    for x0, y0, x1, y1 in boxes:  # speckle moves inside the declared boxes only
        frames[:, y0 : y1 + 1, x0 : x1 + 1] = rng.integers(0, 256, (4, y1 - y0 + 1, x1 - x0 + 1))
    out, how = blank_outside_sector(frames, boxes)
    assert how == "region" and out.shape == (4, 10, 20)
    assert np.array_equal(out[:, :, :10], frames[:, 2:12, 5:15]) and (out[:, :, 10:15] == 0).all()
    assert np.array_equal(out[:, :5, 15:20], frames[:, 2:7, 20:25]) and (out[:, 5:, 15:] == 0).all()
