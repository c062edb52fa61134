"""Fixture builders in the exact on-disk formats of BRIEF section 2 (CAMUS, TMED-2, DICOM)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

from fedecho.client.policy import SMALL_PHANTOM_POLICY

TINY_DATA = SMALL_PHANTOM_POLICY  # the test phantoms are tiny: their sites loosen the default minimums explicitly


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def camus_sequence(n_frames: int, height: int = 40, width: int = 30) -> np.ndarray:
    """(T, H, W) uint8 with a per-frame value and an orientation marker at row 2, col 5."""
    video = np.zeros((n_frames, height, width), np.uint8)
    for t in range(n_frames):
        video[t, 10:30, 8:22] = 20 + 10 * t
    video[:, 2, 5] = 255
    return video


def build_camus(root: Path, patients: dict[str, dict[str, object]]) -> Path:
    """database_nifti/patientNNNN/... and database_split/subgroup_*.txt.

    patients: name -> {"ef": float | None, "frames": int, "split": str, "corrupt": bool}
    """
    splits: dict[str, list[str]] = {"training": [], "validation": [], "testing": []}
    for name, spec in patients.items():
        pdir = root / "database_nifti" / name
        pdir.mkdir(parents=True)
        n = int(spec.get("frames", 12))  # type: ignore[arg-type]
        for view in ("2CH", "4CH"):
            seq = pdir / f"{name}_{view}_half_sequence.nii.gz"
            if spec.get("corrupt"):
                seq.write_bytes(b"not a nifti file")
            else:
                # NIfTI stores (x, y, t): transpose from (t, rows, cols).
                data = np.transpose(camus_sequence(n), (2, 1, 0))
                nib.save(nib.Nifti1Image(data, np.eye(4)), seq)
            lines = ["ED: 1", f"ES: {n // 2 + 1}", f"NbFrame: {n}", "Sex: F", "Age: 56", "ImageQuality: Good"]
            if spec.get("ef") is not None:
                lines.append(f"EF: {spec['ef']}")
            lines.append("FrameRate: 48.4")
            (pdir / f"Info_{view}.cfg").write_text("\n".join(lines) + "\n")
        splits[str(spec["split"])].append(name)
    for split, names in splits.items():
        f = root / "database_split" / f"subgroup_{split}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("\n".join(names) + "\n")
    return root


def build_tmed2(root: Path, studies: dict[str, tuple[str, str, int]], missing: tuple[str, ...] = ()) -> Path:
    """PNGs under view_and_diagnosis_labeled_set/labeled and DEV479/TMED2_fold0_labeledpart.csv.

    studies: study id -> (diagnosis_label, split, number of images); image i of a study is filled
    with value 10 * i + 5 so order can be checked.
    """
    images = root / "view_and_diagnosis_labeled_set" / "labeled"
    images.mkdir(parents=True)
    rows = []
    views = ["PLAX", "PSAX", "A4C", "A2C", "A4CorA2CorOther"]
    for study, (label, split, n) in studies.items():
        for i in range(n):
            key = f"{study}_{i + 1}.png"
            if key not in missing:
                Image.fromarray(np.full((112, 112), 10 * i + 5, np.uint8)).save(images / key)
            rows.append([key, views[i % len(views)], label, split, "labeled"])
    rows.reverse()  # the CSV need not be in image order
    header = ["query_key", "view_label", "diagnosis_label", "diagnosis_classifier_split", "SourceFolder"]
    write_csv(root / "DEV479" / "TMED2_fold0_labeledpart.csv", header, rows)
    return root


def us_cine(frames: np.ndarray, photometric: str = "MONOCHROME2", uid_seed: str = "x", **extra: object) -> Dataset:
    """An uncompressed Ultrasound Multi-frame dataset around frames (T, H, W[, 3]) uint8."""
    ds = Dataset()
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[uid_seed])
    ds.Modality = "US"
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "P1"
    ds.NumberOfFrames = len(frames)
    ds.FrameTime = "20.0"
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel = 3 if frames.ndim == 4 else 1
    ds.PhotometricInterpretation = photometric
    if frames.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def gradient_frames(n: int = 10, h: int = 32, w: int = 32, rgb: bool = False) -> np.ndarray:
    t = np.arange(n)[:, None, None]
    y = np.arange(h)[None, :, None]
    x = np.arange(w)[None, None, :]
    gray = ((t * 7 + y * 3 + x * 2) % 256).astype(np.uint8)
    if not rgb:
        return gray
    return np.stack([gray, 255 - gray, (gray // 2).astype(np.uint8)], axis=-1)


TINY_RUN = """
[run]
name = "tiny"
seed = 3
wire_dtype = "{wire}"

[strategy]
name = "{strategy}"

[model]
name = "echo_vit_tiny"
num_frames = 8

[data]
max_test_clips = 1

[pretrain]
rounds = {pretrain_rounds}
steps = 1
batch_size = 2
lr = 1e-3

[finetune]
rounds = {finetune_rounds}
steps = 1
batch_size = 2
lr = 1e-3
tasks = ["ef"]
freeze_encoder = {freeze}
"""


def tiny_run(
    wire: str = "float32",
    strategy: str = "fedavg",
    pretrain_rounds: int = 2,
    finetune_rounds: int = 1,
    freeze: bool = True,
) -> str:
    """A federated run file for echo_vit_tiny on 8-frame clips, one local step per round."""
    return TINY_RUN.format(
        wire=wire, strategy=strategy, pretrain_rounds=pretrain_rounds, finetune_rounds=finetune_rounds,
        freeze=str(freeze).lower(),
    )  # fmt: skip


PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "OperatorsName",
    "StationName",
    "DeviceSerialNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


def header_phi(archive: Path) -> set[str]:
    """Every identifying string the phantom wrote into its headers (and their name parts)."""
    out: set[str] = set()
    for path in archive.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for kw in PHI_KEYWORDS:
            value = str(ds.get(kw, "") or "")
            out.update(p for p in [value, *value.split("^")] if len(p) >= 4)
        birth = str(ds.PatientBirthDate)
        out.add(f"{birth[6:]}/{birth[4:6]}/{birth[:4]}")  # as burned into the pixels
    return out


def _date_forms(yyyymmdd: str) -> list[str]:
    y, m, d = yyyymmdd[:4], yyyymmdd[4:6], yyyymmdd[6:8]
    return [yyyymmdd, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"]


def identifying_strings(archive: Path) -> set[str]:
    """header_phi plus what else identifies a patient in a phantom archive: dates in the usual formats,
    the text burned into the pixels (fedecho.synth.dicom_writer._overlay), the institution's address
    parts, and the archive-relative paths and their p<subject>/s<study> parts (MIMIC-IV-ECHO layout)."""
    out = header_phi(archive)
    for path in archive.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        family, given = str(ds.PatientName).split("^")
        birth, study, time = str(ds.PatientBirthDate), str(ds.StudyDate), str(ds.StudyTime)
        out.update(_date_forms(birth) + _date_forms(study))
        d, m, y, clock = study[6:8], study[4:6], study[:4], f"{time[:2]}:{time[2:4]}:{time[4:6]}"
        out.update(
            {
                f"{family}, {given}",  # burned in
                f"{given} {family}",
                f"ID {ds.PatientID}  DOB {birth[6:]}/{birth[4:6]}/{birth[:4]}",  # burned in
                f"{d}/{m}/{y} {clock}",  # burned in
                f"{y}-{m}-{d} {clock}",  # echo-record-list.csv
                str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")),
            }
        )
        address = str(ds.InstitutionAddress)
        out.update(part.strip() for part in address.split(","))
        rel = path.relative_to(archive)
        out.update({rel.as_posix(), rel.stem, *(p for p in rel.parts if p[1:].isdigit() and len(p) > 4)})
    out.discard("")
    return out


class TinyVideos:
    """A few tiny labelled clips (random pixels, 8 frames, 112 px), as EchoVideoDataset hands them out."""

    def __init__(self, n: int = 3):
        g = torch.Generator().manual_seed(0)
        info = [{"frame_index": torch.arange(8), "ef": torch.tensor(30.0 + 20 * i)} for i in range(n)]
        self.items = [(torch.rand(3, 8, 112, 112, generator=g), info[i]) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.items[i]

    def set_epoch(self, epoch: int) -> None:
        pass


def interrupted_run(cfg: Any, data: Path, state: Path, stop_round: int = 2) -> tuple[Any, Any]:
    """A simulated run stopped after `stop_round` (its on_round raises), then its newest checkpoint corrupted, as a
    crash mid-write would leave it: (the store, the paused run's row). Resuming must fall back a round."""
    import pytest

    from fedecho.server.rounds import RoundFailed
    from fedecho.sim.run import simulate
    from fedecho.storage import Store

    def stop(phase: str, server_round: int, summary: dict[str, object]) -> None:
        if server_round == stop_round:
            raise RoundFailed(f"stopped by the test after round {stop_round}")

    with pytest.raises(RoundFailed):
        simulate(cfg, data, state, on_round=stop, default_policy=TINY_DATA)
    store = Store(f"sqlite:///{state / 'fedecho.db'}")
    (stopped,) = store.list_runs()
    newest = store.checkpoints(stopped.id)[0]
    assert newest.round == stop_round
    Path(newest.path).write_bytes(Path(newest.path).read_bytes()[:-8] + b"\0" * 8)
    return store, stopped


def compare_frames(got: np.ndarray, ref: np.ndarray, tolerance: Any, what: str) -> None:
    """Decoded uint8 frames against the reference the phantom writer encoded, within `tolerance` (a
    fedecho.synth.encodings.Tolerance: exact, max or mean absolute difference). A grey reference
    matches colour frames whose three channels carry it."""
    got = np.asarray(got)
    if got.ndim == 4 and ref.ndim == 3:
        ref = np.repeat(ref[..., None], 3, axis=-1)
    elif got.ndim == 3 and ref.ndim == 4:
        assert (ref == ref[..., :1]).all(), f"{what}: decoded as grey, but the encoded frames are colour"
        ref = ref[..., 0]
    assert got.shape == ref.shape, f"{what}: decoded {got.shape}, encoded {ref.shape}"
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    if tolerance.kind == "exact":
        assert diff.max() == 0, f"{what}: {np.count_nonzero(diff)} samples differ (max {diff.max()}), lossless"
    elif tolerance.kind == "max":
        assert diff.max() <= tolerance.value, f"{what}: max error {diff.max()} > {tolerance.value}"
    else:
        assert diff.mean() <= tolerance.value, f"{what}: mean error {diff.mean():.2f} > {tolerance.value}"


def burned_text_left(stored: np.ndarray, reference: np.ndarray, mask: np.ndarray, bright: int = 40) -> int:
    """How many burned-in text pixels a registered (cropped, blanked) video still shows.

    stored: the registered frames (T, h, w[, 3]); reference: the frames as the phantom encoded them (T, H, W[, 3]);
    mask: (T, H, W) the text's pixels (fedecho.synth.dicom_writer.text_mask). The crop's place in the full frame
    is found by matching the first frame's kept (non-zero) pixels; then every text pixel that was bright in the
    reference must be zero in the stored frames."""
    import cv2

    def grey(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32).mean(-1) if a.ndim == 4 else a.astype(np.float32)

    s, r = grey(stored), grey(reference)
    t = min(len(s), len(r), len(mask))
    h, w = s.shape[1:3]
    assert h <= r.shape[1] and w <= r.shape[2], f"registered frames {s.shape} larger than the source {r.shape}"
    k = int(np.argmax((s[:t] > 0).reshape(t, -1).sum(1)))  # the frame with most kept pixels
    kept = (s[k] > 0).astype(np.float32)
    if not kept.any():
        return 0
    score = cv2.matchTemplate(r[k], s[k], cv2.TM_SQDIFF, mask=kept)
    y, x = np.unravel_index(int(np.argmin(score)), score.shape)
    text = mask[:t, y : y + h, x : x + w] & (r[:t, y : y + h, x : x + w] > bright)
    return int((s[:t][text] > 0).sum())


# Runs one command in a fresh interpreter, as `fedecho ...` does, then prints every module it imported.
_PROBE = """
import json, sys
from fedecho.cli import app
try:
    app(sys.argv[1:], prog_name="fedecho")
except SystemExit:
    pass
print("\\n" + json.dumps(sorted(sys.modules)))
"""


def cli_in_fresh_interpreter(*args: str) -> tuple[str, set[str]]:
    """(what `fedecho ARGS` printed, every module it imported), run as its own process."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "COLUMNS": "220"},
    )  # fmt: skip
    *lines, modules = proc.stdout.strip().splitlines()
    return "\n".join(lines), set(json.loads(modules))
