"""Writes phantom cines as a hospital archive: multi-frame ultrasound DICOM in the
MIMIC-IV-ECHO folder layout, with (fake) patient data in the header and burned into the pixels.

Real archives carry PHI in both places; fedecho's de-identification has to remove both, so the
phantom puts it in both.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from fedecho.storage.files import atomic_path, atomic_write_csv
from fedecho.synth.identity import Patient, institution, physician
from fedecho.synth.phantom import PhantomVideo
from fedecho.synth.vendors import Vendor

ROWS, COLS = 384, 512
SECTOR = 296  # the sector image is SECTOR x SECTOR pixels inside the frame
TOP, LEFT = 36, (COLS - SECTOR) // 2
RECORD_COLUMNS = ["subject_id", "study_id", "acquisition_datetime", "dicom_filepath"]
LABEL_COLUMNS = ["path", "sop_instance_uid", "EF", "ESV", "EDV", "ED_frame", "ES_frame", "split"]


@dataclass(frozen=True)
class Study:
    patient: Patient
    study_id: int
    when: dt.datetime


def relative_path(study: Study, instance: int) -> str:
    """files/p{NN}/p{subject_id}/s{study_id}/{study_id}_{NNNN}.dcm (MIMIC-IV-ECHO)."""
    sid = study.patient.subject_id
    return f"files/p{str(sid)[:2]}/p{sid}/s{study.study_id}/{study.study_id}_{instance:04d}.dcm"


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _overlay(patient: Patient, study: Study, vendor: Vendor, site_index: int, heart_rate: float) -> Image.Image:
    """The static annotation layer: burned-in identity, institution, scanner and HR."""
    img = Image.new("RGB", (COLS, ROWS))
    draw = ImageDraw.Draw(img)
    font = _font(12)
    family, given = patient.name.split("^")
    draw.text((6, 4), f"{family}, {given}", fill=(235, 235, 235), font=font)
    draw.text((6, 19), f"ID {patient.mrn}  DOB {patient.birth_date:%d/%m/%Y}", fill=(235, 235, 235), font=font)
    draw.text((COLS - 6, 4), institution(site_index), fill=(235, 235, 235), font=font, anchor="ra")
    draw.text((COLS - 6, 19), f"{study.when:%d/%m/%Y %H:%M:%S}", fill=(235, 235, 235), font=font, anchor="ra")
    draw.text((6, ROWS - 48), f"{vendor.model}  {vendor.fps:g} Hz", fill=(200, 200, 120), font=font)
    draw.text((COLS - 6, ROWS - 48), f"HR {heart_rate:.0f} bpm", fill=(120, 230, 120), font=font, anchor="ra")
    return img


def _ecg(video: PhantomVideo, n: int) -> np.ndarray:
    """A stylised ECG strip (y pixel per column) with the R wave at each end-diastole."""
    cols = np.arange(COLS)
    duration = n / video.fps
    t = cols / COLS * duration
    phase = ((t - video.heart.t_ed) / video.heart.beat) % 1.0
    r_wave = np.exp(-((((phase + 0.5) % 1.0 - 0.5) / 0.012) ** 2))
    t_wave = 0.3 * np.exp(-(((phase - 0.3) / 0.05) ** 2))
    return (ROWS - 14 - 18 * (r_wave + t_wave)).astype(int)


def compose_frames(video: PhantomVideo, patient: Patient, study: Study, vendor: Vendor, site_index: int) -> np.ndarray:
    """Full scanner frames (T, ROWS, COLS, 3) uint8: sector, annotations, ECG with a cursor."""
    n = len(video.frames)
    base = np.asarray(_overlay(patient, study, vendor, site_index, video.heart.heart_rate)).copy()
    ecg_y = _ecg(video, n)
    cols = np.arange(COLS)
    base[ecg_y, cols] = (60, 220, 60)
    base[np.clip(ecg_y + 1, 0, ROWS - 1), cols] = (60, 220, 60)
    out = np.repeat(base[None], n, axis=0)
    sector = video.frames
    out[:, TOP : TOP + SECTOR, LEFT : LEFT + SECTOR, :] = sector[..., None]
    for i in range(n):
        x = int(i / n * COLS)
        out[i, ROWS - 40 : ROWS - 4, x] = (250, 250, 90)
    return out


def _region(video: PhantomVideo) -> Dataset:
    """Sequence of Ultrasound Regions: where the 2-D tissue image is and its cm/pixel scale."""
    r = Dataset()
    r.RegionSpatialFormat = 1  # 2D
    r.RegionDataType = 1  # tissue
    r.RegionFlags = 0
    r.RegionLocationMinX0 = LEFT
    r.RegionLocationMinY0 = TOP
    r.RegionLocationMaxX1 = LEFT + SECTOR - 1
    r.RegionLocationMaxY1 = TOP + SECTOR - 1
    r.PhysicalUnitsXDirection = 3  # cm
    r.PhysicalUnitsYDirection = 3
    r.PhysicalDeltaX = float(video.grid.scale)
    r.PhysicalDeltaY = float(video.grid.scale)
    r.ReferencePixelX0 = SECTOR // 2
    r.ReferencePixelY0 = 0
    return r


def _base_dataset(
    patient: Patient, study: Study, vendor: Vendor, site_index: int, sop_class: str, instance: int, rng
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid("sop", patient.subject_id, study.study_id, instance)
    ds.StudyInstanceUID = _uid("study", patient.subject_id, study.study_id)
    ds.SeriesInstanceUID = _uid("series", patient.subject_id, study.study_id, instance)
    ds.Modality = "US"
    ds.PatientName = patient.name
    ds.PatientID = patient.mrn
    ds.OtherPatientIDs = str(patient.subject_id)
    ds.PatientBirthDate = f"{patient.birth_date:%Y%m%d}"
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{(study.when.date() - patient.birth_date).days // 365:03d}Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = f"{study.when:%Y%m%d}"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = f"{study.when:%H%M%S}"
    ds.AccessionNumber = f"A{study.study_id}"
    ds.StudyID = str(study.study_id)[-6:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.InstitutionName = institution(site_index)
    ds.InstitutionAddress = f"{100 + site_index} Harbour Road, Springfield"
    ds.ReferringPhysicianName = physician(rng)
    ds.OperatorsName = physician(rng)
    ds.StationName = f"ECHO{site_index + 1:02d}"
    ds.Manufacturer = vendor.manufacturer
    ds.ManufacturerModelName = vendor.model
    ds.DeviceSerialNumber = f"SN{site_index:02d}{study.study_id % 9973:05d}"
    ds.StudyDescription = "TTE COMPLETE"
    ds.BodyPartExamined = "HEART"
    ds.BurnedInAnnotation = "YES"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "CARDIAC", ""]
    return ds


def _finish(ds: Dataset, frames: np.ndarray, jpeg: bool) -> Dataset:
    """Pixel module and file meta: JPEG baseline YBR_FULL_422, or uncompressed MONOCHROME2."""
    n, rows, cols = frames.shape[:3]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if jpeg:
        encoded = []
        for frame in frames:
            buf = io.BytesIO()
            Image.fromarray(frame, "RGB").save(buf, format="JPEG", quality=90, subsampling=1)  # 4:2:2
            encoded.append(buf.getvalue())
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        gray = frames.mean(axis=-1).round().astype(np.uint8) if frames.ndim == 4 else frames
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = gray.tobytes()
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if n > 1:
        ds.NumberOfFrames = n
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def _save(ds: Dataset, path: Path) -> None:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


class DicomArchiveWriter:
    """Accumulates studies into files/, echo-record-list.csv and labels.csv under root."""

    def __init__(self, root: Path, vendor: Vendor, site_index: int):
        self.root, self.vendor, self.site_index = Path(root), vendor, site_index
        self.records: list[list[object]] = []
        self.labels: list[list[object]] = []

    def add(self, video: PhantomVideo, study: Study, split: str, rng: np.random.Generator) -> None:
        """One labelled A4C cine; sometimes also a single-frame still, as real studies have."""
        frames = compose_frames(video, study.patient, study, self.vendor, self.site_index)
        ds = _base_dataset(study.patient, study, self.vendor, self.site_index, UltrasoundMultiFrameImageStorage, 1, rng)
        ds.FrameTime = f"{1000.0 / video.fps:.3f}"
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.CineRate = round(video.fps)
        ds.RecommendedDisplayFrameRate = round(video.fps)
        ds.HeartRate = round(video.heart.heart_rate)
        ds.SequenceOfUltrasoundRegions = Sequence([_region(video)])
        rel = relative_path(study, 1)
        _save(_finish(ds, frames, self.vendor.jpeg), self.root / rel)
        self.records.append([study.patient.subject_id, study.study_id, f"{study.when:%Y-%m-%d %H:%M:%S}", rel])
        self.labels.append(
            [
                rel,
                ds.SOPInstanceUID,
                f"{video.ef:.6f}",
                f"{video.esv:.6f}",
                f"{video.edv:.6f}",
                video.ed_frame,
                video.es_frame,
                split,
            ]
        )
        if rng.random() < 0.3:  # a Doppler-like still in the same study: not a cine
            still = _base_dataset(study.patient, study, self.vendor, self.site_index, UltrasoundImageStorage, 2, rng)
            still.ImageType = ["ORIGINAL", "PRIMARY", "DOPPLER", ""]
            rel2 = relative_path(study, 2)
            _save(_finish(still, frames[:1], self.vendor.jpeg), self.root / rel2)
            self.records.append([study.patient.subject_id, study.study_id, f"{study.when:%Y-%m-%d %H:%M:%S}", rel2])

    def close(self) -> None:
        atomic_write_csv(self.root / "echo-record-list.csv", RECORD_COLUMNS, self.records)
        atomic_write_csv(self.root / "labels.csv", LABEL_COLUMNS, self.labels)
