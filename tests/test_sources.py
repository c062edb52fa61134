"""EchoNet-Dynamic, CAMUS and TMED-2 sources: reading, splits, targets, bad-file reporting."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from builders import build_camus, build_tmed2, camus_sequence
from fedecho.data import (
    AS_CLASSES,
    ClipSampler,
    EchoVideoDataset,
    Reason,
    SourceError,
    detect_source,
    open_source,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# EchoNet-Dynamic -------------------------------------------------------------------------


def test_echonet_records_targets_and_splits(echonet_phantom: Path) -> None:
    src = open_source(echonet_phantom)
    assert src.kind == "echonet"
    scan = src.scan()
    assert len(scan.records) == 8 and not scan.problems
    with open(echonet_phantom / "FileList.csv") as f:
        rows = {r["FileName"]: r for r in csv.DictReader(f)}
    for r in scan.records:
        row = rows[r.key]
        assert r.split == row["Split"].lower() and r.split in {"train", "val", "test"}
        assert r.targets["ef"] == pytest.approx(float(row["EF"]))
        assert r.targets["esv"] == pytest.approx(float(row["ESV"]))
        assert r.targets["edv"] == pytest.approx(float(row["EDV"]))
        assert r.targets["ef_class"] == (1.0 if float(row["EF"]) >= 50 else 0.0)
        assert r.fps == pytest.approx(50.0)
        assert r.meta["es_frame"] != r.meta["ed_frame"]
        assert r.meta["tracings"][r.meta["ed_frame"]].shape == (21, 4)
    train = EchoVideoDataset(src, split="train", targets=("ef", "esv", "edv"), scan=scan, cache=None)
    test = EchoVideoDataset(src, split="test", scan=scan)
    assert len(train) + len(test) + len(EchoVideoDataset(src, split="val", scan=scan)) == 8
    assert {r.split for r in train.records} == {"train"}


def test_echonet_bad_files_are_reported_not_fatal(echonet_phantom: Path, tmp_path: Path, cache_dir: Path) -> None:
    root = _copy(echonet_phantom, tmp_path / "echonet")
    videos = sorted((root / "Videos").glob("*.avi"))
    videos[0].unlink()  # listed but missing
    videos[1].write_bytes(b"RIFF....garbage, not a video")  # listed but undecodable
    shutil.copy(videos[2], root / "Videos" / "0XUNLISTED000000.avi")  # present but unlabelled
    ds = EchoVideoDataset(open_source(root), split=None, targets=("ef",), cache=cache_dir)
    reasons = {p.path: p.reason for p in ds.problems}
    assert reasons[f"Videos/{videos[0].name}"] == Reason.UNREADABLE
    assert reasons["Videos/0XUNLISTED000000.avi"] == Reason.MISSING_LABEL
    assert len(ds) == 7
    new = ds.prepare(progress=False)
    assert [(p.path, p.reason) for p in new] == [(videos[1].stem, Reason.UNREADABLE)]
    assert len(ds) == 6
    clip, target = ds[0]
    assert clip.shape == (3, 16, 112, 112) and "ef" in target


def test_echonet_missing_column_names_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "FileList.csv").write_text(
        "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,Split\nA,50,1,2,112,112,50,TRAIN\n"
    )
    with pytest.raises(SourceError, match=r"FileList\.csv: missing column\(s\) NumberOfFrames"):
        open_source(tmp_path).scan()


def test_echonet_nan_target_is_missing_label(echonet_phantom: Path, tmp_path: Path) -> None:
    root = _copy(echonet_phantom, tmp_path / "e")
    lines = (root / "FileList.csv").read_text().splitlines()
    parts = lines[1].split(",")
    parts[1] = "nan"
    lines[1] = ",".join(parts)
    (root / "FileList.csv").write_text("\n".join(lines) + "\n")
    ds = EchoVideoDataset(open_source(root), split=None, targets=("ef",))
    assert len(ds) == 7
    assert [(p.path, p.reason) for p in ds.problems] == [(parts[0], Reason.MISSING_LABEL)]


def test_dataset_clip_modes_and_test_time(echonet_phantom: Path, cache_dir: Path) -> None:
    src = open_source(echonet_phantom)
    period = EchoVideoDataset(src, split=None, sampler=ClipSampler(8, 2), cache=cache_dir, test_time=True)
    n = len(period.frames(0))
    clips, _ = period[0]
    assert clips.shape == (n - 15 + 1, 3, 8, 112, 112)
    capped = EchoVideoDataset(src, split=None, sampler=ClipSampler(8, 2), cache=cache_dir, test_time=True, max_clips=4)
    assert capped[0][0].shape[0] == 4
    even = EchoVideoDataset(src, split=None, sampler=ClipSampler(16), cache=cache_dir, size=64)
    assert even[0][0].shape == (3, 16, 64, 64)
    mean, std = even.normalization()
    norm = EchoVideoDataset(src, split=None, cache=cache_dir, size=64, mean=mean, std=std)
    x = np.concatenate([norm[i][0].numpy().reshape(3, -1) for i in range(len(norm))], axis=1)
    assert np.abs(x.mean(1)).max() < 0.35 and np.abs(x.std(1) - 1).max() < 0.35


def test_training_draws_are_deterministic_per_epoch(echonet_phantom: Path, cache_dir: Path) -> None:
    from fedecho.data import Augment

    src = open_source(echonet_phantom)
    a = EchoVideoDataset(src, split=None, cache=cache_dir, sampler=ClipSampler(4, 1), augment=Augment(), seed=5)
    b = EchoVideoDataset(src, split=None, cache=cache_dir, sampler=ClipSampler(4, 1), augment=Augment(), seed=5)
    assert np.array_equal(a[1][0].numpy(), b[1][0].numpy())
    b.set_epoch(1)
    assert not np.array_equal(a[1][0].numpy(), b[1][0].numpy())


# CAMUS ------------------------------------------------------------------------------------


@pytest.fixture()
def camus(tmp_path: Path) -> Path:
    return build_camus(
        tmp_path / "CAMUS_public",
        {
            "patient0001": {"ef": 44, "frames": 12, "split": "training"},
            "patient0002": {"ef": 45, "frames": 14, "split": "validation"},
            "patient0003": {"ef": 60, "frames": 12, "split": "testing"},
            "patient0004": {"ef": None, "frames": 12, "split": "training"},
            "patient0005": {"ef": 50, "frames": 4, "split": "training"},
            "patient0006": {"ef": 55, "frames": 12, "split": "training", "corrupt": True},
        },
    )


def test_camus_records_splits_threshold_and_orientation(camus: Path, cache_dir: Path) -> None:
    assert detect_source(camus) == "camus"
    scan = open_source(camus).scan()
    by_key = {r.key: r for r in scan.records}
    assert set(by_key) == {f"patient000{i}_{v}" for i in (1, 2, 3, 6) for v in ("4CH", "2CH")}
    assert by_key["patient0001_4CH"].split == "train"
    assert by_key["patient0002_2CH"].split == "val"
    assert by_key["patient0003_4CH"].split == "test"
    # CAMUS classifies at EF 45.
    assert by_key["patient0001_4CH"].targets["ef_class"] == 0.0
    assert by_key["patient0002_4CH"].targets["ef_class"] == 1.0
    assert by_key["patient0002_4CH"].meta["es_frame"] == 7 and by_key["patient0002_4CH"].meta["ed_frame"] == 0
    assert by_key["patient0001_4CH"].fps == pytest.approx(48.4)
    reasons = {(p.path.split("/")[1], p.reason) for p in scan.problems}
    assert ("patient0004", Reason.MISSING_LABEL) in reasons
    assert ("patient0005", Reason.TOO_FEW_FRAMES) in reasons
    ds = EchoVideoDataset(open_source(camus), split=None, targets=("ef",), cache=cache_dir, size=40)
    failed = ds.prepare(progress=False)
    assert {p.path for p in failed} == {"patient0006_4CH", "patient0006_2CH"}
    assert all(p.reason == Reason.UNREADABLE for p in failed)
    frames = ds.frames([r.key for r in ds.records].index("patient0001_4CH"))
    expected = camus_sequence(12)
    assert frames.shape == (12, 40, 40)
    # Letterboxed 40x30 -> 40x40: 5 columns of padding on the left; marker at row 2, col 5+5.
    assert frames[0, 2, 10] == 255
    assert np.array_equal(frames[:, 20, 20], expected[:, 20, 15])
    period = EchoVideoDataset(open_source(camus), split="train", sampler=ClipSampler(4, 3), cache=cache_dir, size=40)
    clip, target = period[0]
    assert clip.shape == (3, 4, 40, 40) and set(target) == {"ef", "frame_index"}
    assert [r.split for r in period.records] == ["train"] * 4  # patients 1 and 6, both views


# TMED-2 ----------------------------------------------------------------------------------


def test_tmed2_pseudo_videos_labels_and_exclusions(tmp_path: Path, cache_dir: Path) -> None:
    root = build_tmed2(
        tmp_path / "TMED2",
        {
            "3725s1": ("severe_AS", "train", 5),
            "3726s1": ("no_AS", "val", 3),
            "3727s2": ("Not_Provided", "train", 4),
            "3728s1": ("mild_AS", "test", 2),
        },
        missing=("3728s1_2.png",),
    )
    assert detect_source(root) == "tmed2"
    ds = EchoVideoDataset(open_source(root), split=None, targets=("as_class",), cache=cache_dir, sampler=ClipSampler(8))
    keys = {r.key: r for r in ds.records}
    assert set(keys) == {"3725s1", "3726s1", "3728s1"}
    assert keys["3725s1"].targets["as_class"] == AS_CLASSES.index("severe_AS")
    assert keys["3726s1"].split == "val" and keys["3728s1"].split == "test"
    assert keys["3725s1"].meta["views"] == ["PLAX", "PSAX", "A4C", "A2C", "A4CorA2CorOther"]
    reasons = {(p.path, p.reason) for p in ds.problems}
    assert ("study 3727s2", Reason.MISSING_LABEL) in reasons
    assert ("view_and_diagnosis_labeled_set/labeled/3728s1_2.png", Reason.UNREADABLE) in reasons
    ds.prepare(progress=False)
    i = [r.key for r in ds.records].index("3725s1")
    frames = ds.frames(i)
    assert list(frames[:, 50, 50]) == [5, 15, 25, 35, 45]  # images in study order
    clip, _target = ds[i]
    assert clip.shape == (3, 8, 112, 112)  # 5 images loop to fill 8 frames
    views = EchoVideoDataset(open_source(root, views=["PLAX"]), split=None, targets=("as_class",))
    assert all(r.meta["views"] == ["PLAX"] for r in views.records)


def test_unknown_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="cannot tell the format"):
        open_source(tmp_path)
