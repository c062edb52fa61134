"""The phantom: exact labels, the EchoNet and DICOM layouts, vendors, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from fedecho.cli import app
from fedecho.data.video import read_avi
from fedecho.synth import MANIFEST, synthesize
from fedecho.synth.heart import N_DISCS, disc_volume
from fedecho.synth.phantom import make_video, sample_heart
from fedecho.synth.vendors import REFERENCE, make_vendors

FILELIST_HEADER = "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tracings(root: Path) -> dict[str, dict[int, np.ndarray]]:
    out: dict[str, dict[int, list[list[float]]]] = {}
    for r in _rows(root / "VolumeTracings.csv"):
        out.setdefault(r["FileName"], {}).setdefault(int(r["Frame"]), []).append(
            [float(r[k]) for k in ("X1", "Y1", "X2", "Y2")]
        )
    return {k: {f: np.array(v) for f, v in d.items()} for k, d in out.items()}


def _volume_px(segments: np.ndarray) -> float:
    """Method of discs from a tracing in pixels (first row the long axis)."""
    axis, chords = segments[0], segments[1:]
    length = np.hypot(axis[2] - axis[0], axis[3] - axis[1])
    return disc_volume(length, np.hypot(chords[:, 2] - chords[:, 0], chords[:, 3] - chords[:, 1]))


def test_filelist_is_exact_echonet_layout(echonet_phantom: Path) -> None:
    assert (echonet_phantom / "FileList.csv").read_text().splitlines()[0] == FILELIST_HEADER
    assert (echonet_phantom / "VolumeTracings.csv").read_text().splitlines()[0] == "FileName,X1,Y1,X2,Y2,Frame"
    rows = _rows(echonet_phantom / "FileList.csv")
    assert len(rows) == 8
    assert {r["Split"] for r in rows} == {"TRAIN", "VAL", "TEST"}
    for r in rows:
        assert re.fullmatch(r"0X[0-9A-F]{16}", r["FileName"])
        video, fps = read_avi(echonet_phantom / "Videos" / f"{r['FileName']}.avi")
        assert video.shape[1:3] == (112, 112) == (int(r["FrameHeight"]), int(r["FrameWidth"]))
        assert len(video) == int(r["NumberOfFrames"])
        assert fps == pytest.approx(float(r["FPS"]))


def test_labels_follow_from_the_written_tracings(echonet_phantom: Path) -> None:
    """EF in FileList equals the method of discs on VolumeTracings (ES listed first, ED last)."""
    tracings = _tracings(echonet_phantom)
    for r in _rows(echonet_phantom / "FileList.csv"):
        traced = tracings[r["FileName"] + ".avi"]
        assert len(traced) == 2
        (es_frame, es), (ed_frame, ed) = traced.items()
        assert es.shape == ed.shape == (N_DISCS + 1, 4)
        v_es, v_ed = _volume_px(es), _volume_px(ed)
        assert v_ed > v_es
        ef = 100 * (v_ed - v_es) / v_ed
        assert ef == pytest.approx(float(r["EF"]), abs=0.05)
        assert float(r["EF"]) == pytest.approx(100 * (1 - float(r["ESV"]) / float(r["EDV"])), abs=1e-4)
        assert 0 <= ed_frame < int(r["NumberOfFrames"]) and 0 <= es_frame < int(r["NumberOfFrames"])


def test_rendered_cavity_is_where_the_tracing_says(echonet_phantom: Path) -> None:
    """Inside the traced LV the image is blood-dark; just outside, the myocardium is bright."""
    tracings = _tracings(echonet_phantom)
    for r in _rows(echonet_phantom / "FileList.csv")[:4]:
        video, _ = read_avi(echonet_phantom / "Videos" / f"{r['FileName']}.avi")
        for frame, seg in tracings[r["FileName"] + ".avi"].items():
            img = video[frame, :, :, 0].astype(float)
            chords = seg[1:]
            outline = np.concatenate([chords[:, :2], chords[::-1, 2:]])
            inside = np.zeros_like(img, np.uint8)
            cv2.fillPoly(inside, [np.round(outline).astype(np.int32)], 1)
            inner = cv2.erode(inside, np.ones((3, 3), np.uint8))
            ring = cv2.dilate(inside, np.ones((7, 7), np.uint8)) - cv2.dilate(inside, np.ones((3, 3), np.uint8))
            assert img[inner > 0].mean() < 0.4 * img[ring > 0].mean()


def test_ef_spread_and_site_mixes_differ() -> None:
    rng = np.random.default_rng(0)
    efs = np.array([sample_heart(REFERENCE, rng).ef for _ in range(400)])
    assert efs.min() < 0.25 and efs.max() > 0.75
    vendors = make_vendors(5, seed=0)
    assert len({v.fps for v in vendors}) == 5
    assert len({round(v.ef_mean, 3) for v in vendors}) == 5
    assert len({round(v.depth, 3) for v in vendors}) == 5
    site_means = [np.mean([v.sample_ef(rng) for _ in range(200)]) for v in vendors]
    assert max(site_means) - min(site_means) > 0.2


@pytest.mark.slow
def test_varied_acquisition_keeps_labels_and_tracings() -> None:
    """Per-video acquisition changes the image (depth, gain, probe position), never the labels;
    the cavity stays where the tracing says, and the result is deterministic."""
    depths, images = set(), []
    for i in range(4):
        fixed = make_video(REFERENCE, np.random.default_rng(i), max_frames=40)
        varied = make_video(REFERENCE, np.random.default_rng(i), max_frames=40, vary=True)
        again = make_video(REFERENCE, np.random.default_rng(i), max_frames=40, vary=True)
        assert np.array_equal(varied.frames, again.frames)
        assert varied.ef == pytest.approx(fixed.ef) and varied.edv == pytest.approx(fixed.edv)
        assert not np.array_equal(varied.frames[: len(fixed.frames)], fixed.frames[: len(varied.frames)])
        depths.add(round(varied.grid.scale * varied.grid.height, 3))
        images.append(varied.frames[varied.ed_frame].mean())
        for tr in (varied.ed_tracing, varied.es_tracing):
            img = varied.frames[tr.frame].astype(float)
            outline = np.concatenate([tr.chords[:, 0], tr.chords[::-1, 1]])
            inside = np.zeros_like(img, np.uint8)
            cv2.fillPoly(inside, [np.round(outline).astype(np.int32)], 1)
            inner = cv2.erode(inside, np.ones((3, 3), np.uint8))
            ring = cv2.dilate(inside, np.ones((7, 7), np.uint8)) - cv2.dilate(inside, np.ones((3, 3), np.uint8))
            assert img[inner > 0].mean() < 0.4 * img[ring > 0].mean()
    assert len(depths) == 4 and np.ptp(images) > 1.0


@pytest.mark.slow
def test_deterministic_in_the_seed(tmp_path: Path) -> None:
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(root).as_posix().encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        synthesize(tmp_path / name, videos=6, sites=2, fmt="dicom", seed=seed, max_frames=12, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_dicom_archive_is_hospital_like(dicom_phantom: Path) -> None:
    manifest = json.loads((dicom_phantom / MANIFEST).read_text())
    assert [s["directory"] for s in manifest["sites"]] == ["site01", "site02"]
    site = dicom_phantom / "site01"
    records = _rows(site / "echo-record-list.csv")
    assert list(records[0]) == ["subject_id", "study_id", "acquisition_datetime", "dicom_filepath"]
    labels = {r["path"]: r for r in _rows(site / "labels.csv")}
    assert labels
    for rec in records:
        rel = rec["dicom_filepath"]
        sid, study = rec["subject_id"], rec["study_id"]
        assert re.fullmatch(rf"files/p{sid[:2]}/p{sid}/s{study}/{study}_\d{{4}}\.dcm", rel)
        ds = pydicom.dcmread(site / rel)
        assert ds.PatientName and ds.PatientID and ds.PatientBirthDate and ds.InstitutionName
        assert ds.BurnedInAnnotation == "YES"
        if rel in labels:
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1"
            assert ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1")
            assert int(ds.NumberOfFrames) > 1
            assert 10.0 <= float(ds.FrameTime) <= 40.0  # 25-100 frames per second
            assert labels[rel]["sop_instance_uid"] == ds.SOPInstanceUID
            region = ds.SequenceOfUltrasoundRegions[0]
            frame = ds.pixel_array[0]
            # Burned-in text sits above the tissue region, where real scanners put it.
            assert frame[: region.RegionLocationMinY0].max() > 150
        else:
            assert "NumberOfFrames" not in ds  # the Doppler-like still


def test_cli_synth_and_bad_format(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["synth", str(tmp_path / "p"), "--videos", "3", "--max-frames", "10"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p" / "FileList.csv").is_file()
    res = runner.invoke(app, ["synth", str(tmp_path / "q"), "--format", "nifti"])
    assert res.exit_code == 2 and "--format" in res.output
    res = runner.invoke(app, ["synth", str(tmp_path / "q"), "--videos", "4", "--sites", "3"])
    assert res.exit_code == 2 and "too few" in res.output
