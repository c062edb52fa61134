"""DICOM archives: every pixel encoding, the phantom archive, labels, and every skip reason."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import examples
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000MC, JPEG2000Lossless, RLELossless

from builders import gradient_frames, us_cine, write_csv
from fedecho.data import EchoVideoDataset, Reason, SourceError, fit_square, open_source
from fedecho.synth.dicom_writer import _finish


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _decode_all(root: Path, cache: Path, size: int, **options) -> EchoVideoDataset:
    ds = EchoVideoDataset(open_source(root, "dicom", **options), split=None, targets=(), cache=cache, size=size)
    ds.prepare(progress=False)
    return ds


def _frames_by_name(ds: EchoVideoDataset) -> dict[str, np.ndarray]:
    return {Path(r.key).name: np.asarray(ds.frames(i)) for i, r in enumerate(ds.records)}


def test_lossless_encodings_decode_exactly(tmp_path: Path, cache_dir: Path) -> None:
    gray = gradient_frames(10, 32, 32)
    rgb = gradient_frames(10, 32, 32, rgb=True)
    _save(us_cine(gray, uid_seed="raw"), tmp_path / "a" / "raw.dcm")
    rle = us_cine(gray, uid_seed="rle")
    rle.compress(RLELossless)
    _save(rle, tmp_path / "a" / "rle.dcm")
    j2k = us_cine(gray, uid_seed="j2k")
    j2k.compress(JPEG2000Lossless)
    _save(j2k, tmp_path / "a" / "j2k.dcm")
    _save(us_cine(rgb, "RGB", uid_seed="rgb"), tmp_path / "a" / "rgb")  # hospital exports often lack .dcm
    # Palette colour: indices through a 256-entry LUT (red ramp, green constant, blue inverse).
    lut = np.arange(256, dtype=np.uint16)
    pal = us_cine(
        gray,
        "PALETTE COLOR",
        uid_seed="pal",
        RedPaletteColorLookupTableDescriptor=[256, 0, 8],
        GreenPaletteColorLookupTableDescriptor=[256, 0, 8],
        BluePaletteColorLookupTableDescriptor=[256, 0, 8],
        RedPaletteColorLookupTableData=lut.astype(np.uint8).tobytes(),
        GreenPaletteColorLookupTableData=np.full(256, 77, np.uint8).tobytes(),
        BluePaletteColorLookupTableData=(255 - lut).astype(np.uint8).tobytes(),
    )
    _save(pal, tmp_path / "a" / "pal.dcm")
    ds = _decode_all(tmp_path / "a", cache_dir, size=32, min_frames=2)
    assert not ds.problems
    frames = _frames_by_name(ds)
    for name in ("raw.dcm", "rle.dcm", "j2k.dcm"):
        assert np.array_equal(frames[name], gray), name
    assert np.array_equal(frames["rgb"], rgb)
    expected_pal = np.stack([gray, np.full_like(gray, 77), 255 - gray], axis=-1)
    assert np.array_equal(frames["pal.dcm"], expected_pal)


def test_pydicom_ultrasound_example_jpeg_ybr(tmp_path: Path, cache_dir: Path) -> None:
    """pydicom's own US cine: 30 frames, JPEG baseline YBR_FULL_422, with an ultrasound region."""
    src = Path(examples.get_path("ybr_color"))
    shutil.copy(src, tmp_path / "us.dcm")
    ds = _decode_all(tmp_path, cache_dir, size=64)
    assert not ds.problems and len(ds) == 1
    rec = ds.records[0]
    assert rec.n_frames == 30 and rec.fps == pytest.approx(30.0, abs=0.01)
    ref = pydicom.dcmread(src)
    region = ref.SequenceOfUltrasoundRegions[0]
    x0, y0, x1, y1 = (
        region.RegionLocationMinX0,
        region.RegionLocationMinY0,
        region.RegionLocationMaxX1,
        region.RegionLocationMaxY1,
    )
    expected = np.stack([fit_square(f[y0 : y1 + 1, x0 : x1 + 1], 64) for f in ref.pixel_array])
    got = np.asarray(ds.frames(0))
    if got.ndim == 3:  # stored as grayscale when the channels agree
        expected = expected.mean(-1)
    assert got.shape[:3] == (30, 64, 64)
    assert np.abs(got.astype(float) - expected).mean() < 2.0


def test_phantom_archive_with_labels_and_region_crop(dicom_phantom: Path, cache_dir: Path) -> None:
    site = dicom_phantom / "site01"
    src = open_source(site)
    assert src.kind == "dicom"
    ds = EchoVideoDataset(src, split=None, targets=("ef", "esv", "edv"), cache=cache_dir)
    assert {p.reason for p in ds.problems} <= {Reason.SINGLE_FRAME}  # the Doppler-like stills
    with open(site / "labels.csv") as f:
        labels = {r["path"]: r for r in csv.DictReader(f)}
    assert {r.key for r in ds.records} == set(labels)
    ds.prepare(progress=False)
    for i, r in enumerate(ds.records):
        assert r.targets["ef"] == pytest.approx(float(labels[r.key]["EF"]), abs=1e-5)
        assert r.split == labels[r.key]["split"].lower()
        frames = np.asarray(ds.frames(i))
        assert frames.ndim == 3  # grayscale B-mode, though stored as YBR colour
        # Cropped to the tissue region: the top corners are black sector background, no text.
        assert frames[:, :12, :12].max() < 20 and frames[:, :12, -12:].max() < 20
        assert frames.mean() > 10
    test_time = EchoVideoDataset(src, split="train", targets=("ef",), cache=cache_dir, test_time=True)
    clips, target = test_time[0]
    assert clips.shape[1:] == (3, 16, 112, 112) and set(target) == {"ef", "frame_index"}
    assert clips.shape[0] == test_time.sampler.n_clips(len(test_time.frames(0)))


def test_labels_join_by_sop_instance_uid(tmp_path: Path, cache_dir: Path) -> None:
    a = us_cine(gradient_frames(10), uid_seed="one")
    b = us_cine(gradient_frames(10), uid_seed="two")
    _save(a, tmp_path / "arch" / "x" / "1.dcm")
    _save(b, tmp_path / "arch" / "y" / "2.dcm")
    labels = tmp_path / "site-labels.csv"
    write_csv(labels, ["SOPInstanceUID", "EF", "split"], [[a.SOPInstanceUID, "61.5", "TEST"]])
    ds = EchoVideoDataset(open_source(tmp_path / "arch", labels=labels), split=None, targets=("ef", "ef_class"))
    assert [r.key for r in ds.records] == ["x/1.dcm"]
    assert ds.records[0].targets == {"ef": 61.5, "ef_class": 1.0} and ds.records[0].split == "test"
    assert [(p.path, p.reason) for p in ds.problems] == [("y/2.dcm", Reason.MISSING_LABEL)]
    write_csv(labels, ["file_name", "EF"], [["x/1.dcm", "50"]])
    with pytest.raises(SourceError, match=r"site-labels\.csv: needs a 'path' or 'sop_instance_uid' column"):
        open_source(tmp_path / "arch", labels=labels).scan()


def test_every_skip_reason_and_the_pass_goes_on(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "archive"
    good = _save(us_cine(gradient_frames(10), uid_seed="good"), root / "good.dcm")
    (root / "garbage.dcm").write_bytes(b"\x00" * 64 + b"definitely not DICOM")
    shutil.copy(examples.get_path("ct"), root / "ct.dcm")
    _save(us_cine(gradient_frames(1), uid_seed="still"), root / "still.dcm")
    _save(us_cine(gradient_frames(3), uid_seed="short"), root / "short.dcm")
    mpeg = us_cine(gradient_frames(10), uid_seed="mpeg")
    mpeg.file_meta.TransferSyntaxUID = JPEG2000MC  # no installed decoder (H.264 now decodes)
    mpeg.PixelData = encapsulate([b"\x00" * 16])
    _save(mpeg, root / "mpeg.dcm")
    broken = _finish(
        us_cine(gradient_frames(10, rgb=True), "RGB", uid_seed="broken"), gradient_frames(10, rgb=True), jpeg=True
    )
    broken.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + b"\x13" * 200] * 10)  # JPEG headers, no image
    _save(broken, root / "broken.dcm")
    (root / "echo-record-list.csv").write_text("subject_id,study_id,acquisition_datetime,dicom_filepath\n")
    ds = EchoVideoDataset(open_source(root, min_frames=8), split=None, targets=(), cache=cache_dir, size=32)
    failed = ds.prepare(progress=False)
    reasons = {p.path: p.reason for p in ds.problems}
    assert reasons == {
        "garbage.dcm": Reason.NOT_DICOM,
        "ct.dcm": Reason.NOT_ULTRASOUND,
        "still.dcm": Reason.SINGLE_FRAME,
        "short.dcm": Reason.TOO_FEW_FRAMES,
        "mpeg.dcm": Reason.UNSUPPORTED_TRANSFER_SYNTAX,
        "broken.dcm": Reason.CORRUPT_PIXEL_DATA,
    }
    assert [p.path for p in failed] == ["broken.dcm"]
    assert [r.key for r in ds.records] == [good.name]
    # Reasons carry no patient data, only what is wrong with the file.
    assert all("TEST^PATIENT" not in p.detail for p in ds.problems)
