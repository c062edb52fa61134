"""`fedecho predict` on many videos: folder, glob and CSV inputs, error rows, the CSV, and the same estimate as
the single-video form. Real phantom files and a real (tiny, random-headed) checkpoint."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedecho.cli import app
from fedecho.data import AS_CLASSES
from fedecho.models import create_model, save_checkpoint
from fedecho.synth import synthesize

runner = CliRunner()
ENV = {"COLUMNS": "200"}
HEADS = ["ef", "ef_class", *(f"as_class_{c}" for c in AS_CLASSES)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An EchoNet phantom (3 videos), a DICOM phantom (1 cine), a mixed folder with a corrupt .avi and a
    text file, and a small checkpoint whose heads have random weights (so estimates differ between videos)."""
    root = tmp_path_factory.mktemp("predict")
    synthesize(root / "echonet", videos=3, sites=1, fmt="echonet", seed=1, max_frames=20, progress=False)
    synthesize(root / "dicom", videos=1, sites=1, fmt="dicom", seed=1, max_frames=16, progress=False)
    avis = sorted((root / "echonet" / "Videos").glob("*.avi"))
    cine = next((root / "dicom").rglob("*.dcm"))
    mixed = root / "mixed"
    (mixed / "sub").mkdir(parents=True)
    for a in avis[:2]:
        shutil.copy(a, mixed / a.name)
    shutil.copy(cine, mixed / "sub" / cine.name)
    (mixed / "bad.avi").write_bytes(b"RIFF this is not a video at all" * 10)
    (mixed / "notes.txt").write_text("not a video\n")
    torch.manual_seed(0)
    tasks = ("ef", "ef_class", "as_class")
    model = create_model("echo_vit_tiny", decoder=False, img_size=64, num_frames=8, tasks=tasks)
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.normal_(0, 0.5)
    ckpt = save_checkpoint(model, root / "ckpt" / "model.safetensors")
    return {"root": root, "mixed": mixed, "ckpt": ckpt, "echonet": root / "echonet", "dicom": root / "dicom"}


def _predict(world: dict[str, Path], *args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["predict", *args, "--checkpoint", str(world["ckpt"])], env=ENV)
    return res.exit_code, res.output


def _read(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Header and rows keyed by file name."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), {Path(r["file"]).name: r for r in rows}


def test_folder_gives_one_row_per_video_and_an_error_row(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    code, output = _predict(world, str(world["mixed"]), "--out", str(out))
    assert code == 0, output
    header, rows = _read(out)
    assert header == ["file", *HEADS, "clips", "frames", "error"]
    cine = next(world["dicom"].rglob("*.dcm")).name
    assert sorted(rows) == sorted([*(p.name for p in world["mixed"].glob("*.avi")), cine])  # notes.txt skipped
    bad = rows.pop("bad.avi")
    assert "bad.avi" in bad["error"] and all(bad[h] == "" for h in HEADS) and bad["clips"] == ""
    for r in rows.values():
        assert r["error"] == "" and int(r["clips"]) >= 1 and int(r["frames"]) >= 8
        assert 0 <= float(r["ef_class"]) <= 1
        assert sum(float(r[f"as_class_{c}"]) for c in AS_CLASSES) == pytest.approx(1, abs=1e-5)
    assert len({r["ef"] for r in rows.values()}) == 3  # the estimate depends on the video
    assert f"predicted 3 of 4 videos, 1 failed; wrote {out}" in output.replace("\n", "")


def test_glob_pattern(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "g.csv"
    code, output = _predict(world, f"{world['mixed']}/*.avi", "--out", str(out))
    assert code == 0, output
    assert sorted(_read(out)[1]) == sorted(p.name for p in world["mixed"].glob("*.avi"))  # not sub/*.dcm
    code, output = _predict(world, f"{world['mixed']}/**/*.dcm", "--out", str(out))
    assert code == 0 and list(_read(out)[1]) == [next(world["dicom"].rglob("*.dcm")).name]
    code, output = _predict(world, f"{world['mixed']}/*.mp4", "--out", str(out))
    assert code == 2 and "matches no videos" in output


def test_csv_lists(world: dict[str, Path], tmp_path: Path) -> None:
    # EchoNet's FileList.csv: FileName without extension, the videos in Videos/ beside it.
    out = tmp_path / "e.csv"
    code, output = _predict(world, str(world["echonet"] / "FileList.csv"), "--out", str(out))
    assert code == 0, output
    _, rows = _read(out)
    assert sorted(rows) == sorted(p.name for p in (world["echonet"] / "Videos").glob("*.avi"))
    assert all(r["error"] == "" for r in rows.values())
    # A DICOM archive's labels.csv (path column, relative to the CSV).
    code, output = _predict(world, str(world["dicom"] / "labels.csv"), "--out", str(out))
    assert code == 0 and _read(out)[1][next(world["dicom"].rglob("*.dcm")).name]["error"] == ""
    # A hand-made list: a `file` column, one entry missing (an error row), the rest goes on.
    listing = tmp_path / "list.csv"
    avi = sorted(world["mixed"].glob("0X*.avi"))[0]
    listing.write_text(f"site,file\na,{avi}\nb,missing.avi\n")
    code, output = _predict(world, str(listing), "--out", str(out))
    assert code == 0, output
    _, rows = _read(out)
    assert rows[avi.name]["error"] == "" and "missing.avi: unreadable: not found" in rows["missing.avi"]["error"]
    # No column naming the files: the error names the CSV and the columns it has.
    listing.write_text("site,video_id\na,x\n")
    code, output = _predict(world, str(listing), "--out", str(out))
    assert code == 2 and str(listing) in output and "found: site, video_id" in output
    assert "file, path, FileName" in output
    code, output = _predict(world, str(listing), "--out", str(listing))  # never overwrite the input list
    assert code == 2 and "is the input itself" in output


def test_many_videos_need_out_and_all_failed_is_nonzero(world: dict[str, Path], tmp_path: Path) -> None:
    code, output = _predict(world, str(world["mixed"]))
    assert code == 2 and "names 4 videos" in output and "--out" in output
    out = tmp_path / "bad.csv"
    code, output = _predict(world, f"{world['mixed']}/bad*", "--out", str(out))
    assert code == 1 and "predicted 0 of 1 videos, 1 failed" in output
    assert "bad.avi" in _read(out)[1]["bad.avi"]["error"]
    code, output = _predict(world, str(tmp_path / "nothing-here"))
    assert code == 2 and "no such file or folder" in output


def test_batch_estimate_equals_single_video_estimate(world: dict[str, Path], tmp_path: Path) -> None:
    batch = tmp_path / "batch.csv"
    assert _predict(world, str(world["mixed"]), "--out", str(batch))[0] == 0
    _, rows = _read(batch)
    for video in [*sorted(world["mixed"].glob("0X*.avi")), next(world["mixed"].rglob("*.dcm"))]:
        single = tmp_path / f"{video.name}.csv"
        code, output = _predict(world, str(video), "--out", str(single))
        assert code == 0, output
        assert f"{float(rows[video.name]['ef']):.1f} % (LVEF)" in output  # the table shows the same estimate
        assert "P(EF >= threshold)" in output
        header, one = _read(single)
        assert header == ["file", *HEADS, "clips", "frames", "error"]
        assert one[video.name] == rows[video.name]
    code, output = _predict(world, str(world["mixed"] / "bad.avi"))  # the single form: an error, not a traceback
    assert code == 2 and "bad.avi" in output and "Traceback" not in output
