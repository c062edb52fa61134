"""Writes phantom cines as a hospital archive: multi-frame ultrasound DICOM in the
MIMIC-IV-ECHO folder layout, with (fake) patient data in the header and burned into the pixels.

Real archives carry PHI in both places; fedecho's de-identification has to remove both, so the
phantom puts it in both: in the header bands around the image, and inside the declared tissue
region where it is larger than the moving fan (as scanners print IDs, dates, readouts and frame
counters in the image area's corners). Every burned-in string is returned per file
(DicomArchiveWriter.files) so a leak test can check registered pixels against it. How each cine is
stored (transfer syntax, pixel layout, header form) comes from fedecho.synth.encodings.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence
from pydicom.uid import UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, generate_uid

from fedecho.storage.files import atomic_write_bytes, atomic_write_csv
from fedecho.synth.encodings import (
    DICOMDIR,
    ENCODINGS,
    FRAME_TIME_VECTOR,
    PRIVATE_TAGS,
    RESIZED,
    UNDEFINED_LENGTH,
    VOLUME_3D,
    Encoding,
    encode_pixels,
    frame_time_vector,
    private_tags,
    undefined_lengths,
    write_bytes,
)
from fedecho.synth.identity import Patient, institution, physician
from fedecho.synth.phantom import PhantomVideo
from fedecho.synth.vendors import Vendor

ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"
RECORD_COLUMNS = ["subject_id", "study_id", "acquisition_datetime", "dicom_filepath"]
LABEL_COLUMNS = ["path", "sop_instance_uid", "EF", "ESV", "EDV", "ED_frame", "ES_frame", "split"]
STUDY_LABEL_COLUMNS = ["study_id", "study_instance_uid", "EF", "ESV", "EDV", "split"]
STUDY_LABELS = "study-labels.csv"  # EF per study, as the echo report keeps it
# How scanners name each view: SNOMED CT code and meaning (View Code Sequence), View Name, Series Description.
VIEW_NAMES = {
    "A4C": ("399214001", "Apical four chamber", "A4C", "4CH 2D"),
    "PLAX": ("399139001", "Parasternal long axis", "PLAX", "PLAX 2D"),
    "A2C": ("399232001", "Apical two chamber", "A2C", "2CH 2D"),
    "PSAX": ("399306005", "Parasternal short axis", "PSAX", "SAX PAP 2D"),
}
OTHER_VIEWS = ("PLAX", "A2C", "PSAX")  # the extra cines of a study, in this order
MEDIA_DIR = "cdexport"  # where a study exported to CD (a file-set with a DICOMDIR) lands
TOOLBAR = ("2D", "M", "CW", "PW", "COLOR", "FREEZE", "MEASURE")
WHITE, YELLOW, GREEN, GREY = (235, 235, 235), (200, 200, 120), (120, 230, 120), (175, 175, 175)


@dataclass(frozen=True)
class Geometry:
    """A scanner screen: header band, the square sector image, and a bottom band (ECG, toolbar)."""

    rows: int
    cols: int
    sector: int  # the sector image is sector x sector pixels
    top: int  # header band height
    font: int  # text size in pixels

    @property
    def left(self) -> int:
        return (self.cols - self.sector) // 2

    @property
    def line(self) -> int:
        return self.font + 3


FULL = Geometry(384, 512, 296, 36, 12)
TINY = Geometry(224, 288, 160, 26, 8)  # for tests: every overlay still fits, gaps as on FULL
ROWS, COLS, SECTOR, TOP, LEFT = FULL.rows, FULL.cols, FULL.sector, FULL.top, FULL.left


@dataclass(frozen=True)
class Study:
    patient: Patient
    study_id: int
    when: dt.datetime


@dataclass(frozen=True)
class BurnedText:
    """One string burned into the pixels, where and how it was drawn (full-size screen coordinates)."""

    text: str
    x: int
    y: int
    anchor: str  # Pillow text anchor: 'la' left-ascender, 'ra' right-ascender
    size: int
    kind: str  # name, id, date, institution, readout, counter, toolbar
    phi: bool  # identifies the patient or the site
    inside_region: bool  # inside the declared tissue region (outside the moving fan)
    frame: int | None = None  # only on this frame (frame counters); None: every frame
    fill: tuple[int, int, int] = WHITE

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) exclusive bounds of the drawn text, full-size coordinates."""
        draw = ImageDraw.Draw(Image.new("L", (1, 1)))
        return tuple(
            int(v) for v in draw.textbbox((self.x, self.y), self.text, font=_font(self.size), anchor=self.anchor)
        )  # type: ignore[return-value]

    def as_dict(self, scale: float) -> dict[str, object]:
        x0, y0, x1, y1 = self.box()
        return {
            "text": self.text,
            "kind": self.kind,
            "phi": self.phi,
            "inside_region": self.inside_region,
            "frame": self.frame,
            "xy": [self.x, self.y],
            "anchor": self.anchor,
            "size": self.size,
            "box": [math.floor(x0 * scale), math.floor(y0 * scale), math.ceil(x1 * scale), math.ceil(y1 * scale)],
        }


@dataclass
class Composite:
    frames: np.ndarray  # (T, rows, cols, 3) uint8
    texts: list[BurnedText] = field(default_factory=list)


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


def _draw(draw: ImageDraw.ImageDraw, t: BurnedText) -> None:
    draw.text((t.x, t.y), t.text, fill=t.fill, font=_font(t.size), anchor=t.anchor)


def text_mask(texts: list[dict[str, Any]], rows: int, cols: int, n_frames: int, scale: float = 1.0) -> np.ndarray:
    """(T, rows*scale, cols*scale) bool: the pixels the burned-in texts (as recorded per file, on a
    rows x cols screen) cover, re-rendered, so a leak test can check those pixels in registered frames."""

    def render(chosen: list[dict[str, Any]]) -> np.ndarray:
        img = Image.new("L", (cols, rows))
        draw = ImageDraw.Draw(img)
        for t in chosen:
            draw.text(tuple(t["xy"]), str(t["text"]), fill=255, font=_font(int(t["size"])), anchor=str(t["anchor"]))
        return np.asarray(img) > 0

    masks = np.repeat(render([t for t in texts if t["frame"] is None])[None], n_frames, axis=0)
    for t in texts:
        if t["frame"] is not None and int(t["frame"]) < n_frames:
            masks[int(t["frame"])] |= render([t])
    if scale == 1.0:
        return masks
    h, w = round(rows * scale), round(cols * scale)
    return np.stack([cv2.resize(m.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_AREA) > 0 for m in masks])


def _header_texts(
    patient: Patient, study: Study, vendor: Vendor, site_index: int, heart_rate: float, g: Geometry
) -> list[BurnedText]:
    """Identity, institution and date in the header band; scanner and HR above the ECG."""
    family, given = patient.name.split("^")
    y1, y2, f = 4 if g.font >= 12 else 2, 4 + g.line if g.font >= 12 else 2 + g.line, g.font
    bottom = g.top + g.sector + 2
    return [
        BurnedText(f"{family}, {given}", 6, y1, "la", f, "name", True, False),
        BurnedText(f"ID {patient.mrn}  DOB {patient.birth_date:%d/%m/%Y}", 6, y2, "la", f, "id", True, False),
        BurnedText(institution(site_index), g.cols - 6, y1, "ra", f, "institution", True, False),
        BurnedText(f"{study.when:%d/%m/%Y %H:%M:%S}", g.cols - 6, y2, "ra", f, "date", True, False),
        BurnedText(f"{vendor.model}  {vendor.fps:g} Hz", 6, bottom, "la", f, "readout", False, False, fill=YELLOW),
        BurnedText(f"HR {heart_rate:.0f} bpm", g.cols - 6, bottom, "ra", f, "readout", False, False, fill=GREEN),
    ]


def _side_texts(video: PhantomVideo, study: Study, g: Geometry) -> list[BurnedText]:
    """Acoustic output and acquisition readouts in the left panel, as scanners show them."""
    mi = 0.8 + (study.study_id % 7) / 10
    tis = 0.2 + (study.study_id % 5) / 10
    gain = 40 + study.study_id % 30
    depth = video.grid.scale * video.grid.height
    lines = [f"MI {mi:.1f}", f"TIS {tis:.1f}", f"D {depth:.0f} cm", f"G {gain}%", f"FR {video.fps:g}"]
    y0, f = g.top + 4, max(6, g.font - 1)
    return [
        BurnedText(s, 4, y0 + i * (f + 3), "la", f, "readout", False, False, fill=GREY) for i, s in enumerate(lines)
    ]


def _toolbar(draw: ImageDraw.ImageDraw, g: Geometry) -> list[BurnedText]:
    """Soft-key toolbar along the bottom edge: boxed labels."""
    f = max(6, g.font - 2)
    h = f + 4
    y = g.rows - h - 1
    width = (g.cols - 8) // len(TOOLBAR)
    out = []
    for i, label in enumerate(TOOLBAR):
        x0 = 4 + i * width
        draw.rectangle((x0, y, x0 + width - 3, g.rows - 2), outline=(90, 90, 120), fill=(30, 30, 45))
        out.append(BurnedText(label, x0 + 3, y + 2, "la", f, "toolbar", False, False, fill=GREY))
    return out


def _region_texts(
    patient: Patient, study: Study, video: PhantomVideo, g: Geometry, fan: np.ndarray, n: int
) -> list[BurnedText]:
    """Texts inside the declared region but outside the moving fan (its corners): the patient ID,
    the date, a readout and a per-frame counter. Each takes the first corner slot, at the largest
    size, where it meets neither the fan nor another text; one that fits nowhere is left out."""
    x0, y0, x1, y1 = g.left, g.top, g.left + g.sector - 1, g.top + g.sector - 1
    n_label = f"{n}/{n}"  # the counter's widest label decides its place

    def slots(side: str, size: int) -> list[tuple[int, int, str]]:
        x, anchor = (x0 + 3, "la") if side == "left" else (x1 - 3, "ra")
        return [(x, y0 + 2, anchor), (x, y0 + 2 + size + 3, anchor), (x, y1 - size - 2, anchor)]

    wanted = [
        (patient.mrn, "left", "id", True),
        (f"{study.when:%d/%m/%Y}", "right", "date", True),
        (f"MI {0.8 + (study.study_id % 7) / 10:.1f}", "left", "readout", False),
        (n_label, "right", "counter", False),
    ]
    out: list[BurnedText] = []
    taken: list[tuple[int, int, int, int]] = []
    for text, side, kind, phi in wanted:
        placed = None
        for size in range(g.font, max(5, g.font - 4) - 1, -1):
            for x, y, anchor in slots(side, size):
                t = BurnedText(text, x, y, anchor, size, kind, phi, True, fill=WHITE if phi else GREY)
                box = t.box()
                if not _touches(t, fan, g) and not any(_overlap(box, b) for b in taken):
                    placed = t
                    break
            if placed:
                break
        if placed is None:
            continue
        taken.append(placed.box())
        if kind == "counter":
            out += [
                BurnedText(f"{i + 1}/{n}", placed.x, placed.y, placed.anchor, placed.size, kind, False, True, i, GREY)
                for i in range(n)
            ]
        else:
            out.append(placed)
    return out


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] + 2 and b[0] < a[2] + 2 and a[1] < b[3] + 2 and b[1] < a[3] + 2


def _touches(t: BurnedText, fan: np.ndarray, g: Geometry) -> bool:
    """Whether the text's box leaves the region or meets the (dilated) fan."""
    bx0, by0, bx1, by1 = t.box()
    if bx0 < g.left or by0 < g.top or bx1 > g.left + g.sector or by1 > g.top + g.sector:
        return True
    return bool(fan[by0 - g.top : by1 - g.top, bx0 - g.left : bx1 - g.left].any())


def _ecg(video: PhantomVideo, n: int, g: Geometry) -> np.ndarray:
    """A stylised ECG strip (y pixel per column) with the R wave at each end-diastole."""
    cols = np.arange(g.cols)
    duration = n / video.fps
    t = cols / g.cols * duration
    phase = ((t - video.heart.t_ed) / video.heart.beat) % 1.0
    r_wave = np.exp(-((((phase + 0.5) % 1.0 - 0.5) / 0.012) ** 2))
    t_wave = 0.3 * np.exp(-(((phase - 0.3) / 0.05) ** 2))
    band = g.rows - g.top - g.sector
    baseline = g.rows - g.font - 8
    return (baseline - 0.3 * band * (r_wave + t_wave)).astype(int)


def _counter(n: int, g: Geometry) -> list[BurnedText]:
    """The frame counter in the right-hand panel, one text per frame."""
    f = max(6, g.font - 1)
    return [
        BurnedText(f"F {i + 1}/{n}", g.cols - 4, g.top + 4, "ra", f, "counter", False, False, i, GREY) for i in range(n)
    ]


def _stamp(frame: np.ndarray, t: BurnedText) -> None:
    """Burn one text into one (rows, cols, 3) frame, drawing only its box."""
    x0, y0, x1, y1 = t.box()
    patch = Image.new("RGB", (max(1, x1 - x0), max(1, y1 - y0)))
    ImageDraw.Draw(patch).text((t.x - x0, t.y - y0), t.text, fill=t.fill, font=_font(t.size), anchor=t.anchor)
    a = np.asarray(patch)
    m = a.any(axis=-1)
    frame[y0:y1, x0:x1][m] = a[m]


def compose(
    video: PhantomVideo,
    patient: Patient,
    study: Study,
    vendor: Vendor,
    site_index: int,
    g: Geometry = FULL,
    region_text: bool = True,
) -> Composite:
    """Full scanner frames (T, rows, cols, 3) uint8: sector, annotations, ECG with a cursor, the
    toolbar, readouts and frame counters, and the list of every burned-in text. region_text: also
    print the ID, date, a readout and a counter in the region's corners, outside the fan."""
    n = len(video.frames)
    if video.frames.shape[1:] != (g.sector, g.sector):
        raise ValueError(f"the video is {video.frames.shape[1:]} pixels; this screen needs {g.sector} square")
    screen = Image.new("RGB", (g.cols, g.rows))
    draw = ImageDraw.Draw(screen)
    texts = _header_texts(patient, study, vendor, site_index, video.heart.heart_rate, g)
    texts += _side_texts(video, study, g)
    texts += _toolbar(draw, g)
    for t in texts:
        _draw(draw, t)
    texts += _counter(n, g)
    base = np.asarray(screen).copy()
    ecg_y = _ecg(video, n, g)
    cols = np.arange(g.cols)
    base[ecg_y, cols] = (60, 220, 60)
    base[np.clip(ecg_y + 1, 0, g.rows - 1), cols] = (60, 220, 60)
    out = np.repeat(base[None], n, axis=0)
    out[:, g.top : g.top + g.sector, g.left : g.left + g.sector, :] = video.frames[..., None]
    cursor_top, cursor_bottom = g.top + g.sector + g.line, g.rows - g.font - 6
    for i in range(n):
        out[i, cursor_top:cursor_bottom, int(i / n * g.cols)] = (250, 250, 90)
    if region_text:
        fan = cv2.dilate((video.frames.max(axis=0) > 0).astype(np.uint8), np.ones((13, 13), np.uint8)) > 0  # 6 px clear
        inside = _region_texts(patient, study, video, g, fan, n)
        for t in inside:
            if t.frame is None:
                for frame in out:
                    _stamp(frame, t)
        texts += inside
    for t in texts:
        if t.frame is not None:
            _stamp(out[t.frame], t)
    return Composite(out, texts)


def compose_frames(video: PhantomVideo, patient: Patient, study: Study, vendor: Vendor, site_index: int) -> np.ndarray:
    """Full-size scanner frames (T, ROWS, COLS, 3) uint8 (compose, without the text list)."""
    return compose(video, patient, study, vendor, site_index).frames


def _region(video: PhantomVideo, g: Geometry) -> Dataset:
    """Sequence of Ultrasound Regions: where the 2-D tissue image is and its cm/pixel scale."""
    r = Dataset()
    r.RegionSpatialFormat = 1  # 2D
    r.RegionDataType = 1  # tissue
    r.RegionFlags = 0
    r.RegionLocationMinX0 = g.left
    r.RegionLocationMinY0 = g.top
    r.RegionLocationMaxX1 = g.left + g.sector - 1
    r.RegionLocationMaxY1 = g.top + g.sector - 1
    r.PhysicalUnitsXDirection = 3  # cm
    r.PhysicalUnitsYDirection = 3
    r.PhysicalDeltaX = float(video.grid.scale)
    r.PhysicalDeltaY = float(video.grid.scale)
    r.ReferencePixelX0 = g.sector // 2
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


def name_view(ds: Dataset, view: str, naming: str) -> None:
    """Name the cine's view where this vendor does (fedecho.data.views reads all three places)."""
    code, meaning, name, series = VIEW_NAMES[view]
    if naming == "code":
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SCT", meaning
        ds.ViewCodeSequence = Sequence([item])
    elif naming == "name":
        ds.ViewName = name
    elif naming == "series":
        ds.SeriesDescription = series
    elif naming != "none":
        raise ValueError(f"view naming {naming!r}: not code, name, series or none")


def _finish(ds: Dataset, frames: np.ndarray, jpeg: bool) -> Dataset:
    """Pixel module and file meta: JPEG baseline YBR_FULL_422, or uncompressed MONOCHROME2."""
    rgb = frames if frames.ndim == 4 else np.repeat(frames[..., None], 3, axis=-1)
    encode_pixels(ds, rgb, ENCODINGS["jpeg_ybr422" if jpeg else "explicit_mono2"], 30.0)
    return ds


def _downscale(frames: np.ndarray, factor: int = 2) -> np.ndarray:
    """Frames shrunk after acquisition (a PACS or anonymiser's export), by area averaging."""
    h, w = frames.shape[1] // factor, frames.shape[2] // factor
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])


def _volume(
    video: PhantomVideo, study: Study, vendor: Vendor, site_index: int, rng: np.random.Generator, slices: int
) -> Dataset:
    """An Enhanced US Volume: a 3-D acquisition of the same heart (frames are slices, not time)."""
    ds = _base_dataset(study.patient, study, vendor, site_index, ENHANCED_US_VOLUME, 3, rng)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.BurnedInAnnotation = "NO"
    ds.FrameOfReferenceUID = _uid("frame-of-reference", study.study_id)
    ds.DimensionOrganizationType = "3D"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "PRODUCT"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionDateTime = f"{study.when:%Y%m%d%H%M%S}"
    ed = video.frames[video.ed_frame].astype(np.float64)
    z = np.linspace(-1.0, 1.0, slices)
    vol = np.stack([np.round(ed * math.sqrt(max(0.0, 1.0 - v * v * 0.9))) for v in z]).astype(np.uint8)
    spacing_mm = float(video.grid.scale) * 10.0
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [round(spacing_mm, 6), round(spacing_mm, 6)]
    measures.SliceThickness = round(spacing_mm * 2, 6)
    orientation = Dataset()
    orientation.ImageOrientationVolume = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationVolumeSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(slices):
        item, content, position = Dataset(), Dataset(), Dataset()
        content.DimensionIndexValues = [k + 1]
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        position.ImagePositionVolume = [0.0, 0.0, round(k * spacing_mm * 2, 6)]
        item.FrameContentSequence = Sequence([content])
        item.PlanePositionVolumeSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = slices
    encode_pixels(ds, vol, ENCODINGS["explicit_mono2"], video.fps)
    return ds


class DicomArchiveWriter:
    """Accumulates studies into files/, echo-record-list.csv and labels.csv under root.

    files: for every file written, its archive-relative path -> encoding, size and the burned-in
    texts (written by synthesize to a sidecar outside any archive). references: when a dict is
    given, each cine's reference frames (what a correct decoder returns) by path, for tests.
    region_text: burn the ID, date, a readout and a counter inside the declared region too.
    """

    def __init__(
        self,
        root: Path,
        vendor: Vendor,
        site_index: int,
        geometry: Geometry = FULL,
        references: dict[str, np.ndarray] | None = None,
        region_text: bool = True,
    ):
        self.root, self.vendor, self.site_index, self.geometry = Path(root), vendor, site_index, geometry
        self.references, self.region_text = references, region_text
        self.records: list[list[object]] = []
        self.labels: list[list[object]] = []
        self.study_labels: list[list[object]] = []
        self.files: dict[str, dict[str, object]] = {}
        self.count = 0
        self._fileset: FileSet | None = None

    def encoding(self, index: int) -> Encoding:
        """The vendor's encoding for its index-th cine (its profile, in turn)."""
        names = self.vendor.encodings
        return ENCODINGS[names[index % len(names)]]

    def add(
        self,
        video: PhantomVideo,
        study: Study,
        split: str,
        rng: np.random.Generator,
        encoding: str | None = None,
        other_views: int = 0,
    ) -> str:
        """One labelled A4C cine and `other_views` cines of other views (OTHER_VIEWS, in turn; their
        pixels are the A4C cine's: only the header tells them apart); sometimes also a single-frame
        still, as real studies have. Returns the A4C cine's archive-relative path."""
        enc = ENCODINGS[encoding] if encoding else self.encoding(self.count)
        self.count += 1
        g = self.geometry
        composite = compose(video, study.patient, study, self.vendor, self.site_index, g, self.region_text)
        rel, ds = self._cine(video, study, composite, enc, rng, "A4C", 1)
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
        self.study_labels.append(
            [study.study_id, ds.StudyInstanceUID, f"{video.ef:.6f}", f"{video.esv:.6f}", f"{video.edv:.6f}", split]
        )
        for j in range(other_views):
            self._cine(video, study, composite, enc, rng, OTHER_VIEWS[j % len(OTHER_VIEWS)], 4 + j)
        if VOLUME_3D in enc.forms:
            volume = _volume(video, study, self.vendor, self.site_index, rng, max(8, g.sector // 12))
            volume_enc = ENCODINGS["explicit_mono2"]
            if DICOMDIR in enc.forms:  # exported with its study
                volume_enc = dataclasses.replace(volume_enc, forms=frozenset({DICOMDIR}))
            rel3 = self._write(volume, volume_enc, study, 3)
            self.records.append([study.patient.subject_id, study.study_id, f"{study.when:%Y-%m-%d %H:%M:%S}", rel3])
            self.files[rel3] = {"encoding": "explicit_mono2", "kind": "volume_3d", "texts": []}
        if rng.random() < 0.3:  # a Doppler-like still in the same study: not a cine
            still = _base_dataset(study.patient, study, self.vendor, self.site_index, UltrasoundImageStorage, 2, rng)
            still.ImageType = ["ORIGINAL", "PRIMARY", "DOPPLER", ""]
            plain = not enc.is_video and not (enc.forms - {UNDEFINED_LENGTH, PRIVATE_TAGS, DICOMDIR, VOLUME_3D})
            still_enc = enc if plain else ENCODINGS["jpeg_ybr422"]
            encode_pixels(still, composite.frames[:1], still_enc, video.fps)
            rel2 = self._write(still, still_enc, study, 2)
            self.records.append([study.patient.subject_id, study.study_id, f"{study.when:%Y-%m-%d %H:%M:%S}", rel2])
            self.files[rel2] = {"encoding": still_enc.name, "kind": "still", "texts": []}
        return rel

    def _cine(
        self,
        video: PhantomVideo,
        study: Study,
        composite: Composite,
        enc: Encoding,
        rng: np.random.Generator,
        view: str,
        instance: int,
    ) -> tuple[str, Dataset]:
        """Write one cine of the study (its header naming `view` as the vendor does); returns its path."""
        g = self.geometry
        frames, scale = composite.frames, 1.0
        if RESIZED in enc.forms:
            frames, scale = _downscale(frames), 0.5
        ds = _base_dataset(
            study.patient, study, self.vendor, self.site_index, UltrasoundMultiFrameImageStorage, instance, rng
        )
        name_view(ds, view, self.vendor.view_naming)
        frame_time = 1000.0 / video.fps
        ds.FrameTime = f"{frame_time:.3f}"
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.CineRate = round(video.fps)
        ds.RecommendedDisplayFrameRate = round(video.fps)
        ds.HeartRate = round(video.heart.heart_rate)
        # Resized cines keep the original regions: PACS exports and anonymisers do not rescale them.
        ds.SequenceOfUltrasoundRegions = Sequence([_region(video, g)])
        reference = encode_pixels(ds, frames, enc, video.fps)
        self._forms(ds, enc, len(frames), frame_time, study)
        rel = self._write(ds, enc, study, instance)
        self.records.append([study.patient.subject_id, study.study_id, f"{study.when:%Y-%m-%d %H:%M:%S}", rel])
        self.files[rel] = {
            "encoding": enc.name,
            "kind": "cine",
            "view": view,
            "rows": int(frames.shape[1]),
            "columns": int(frames.shape[2]),
            "frames": int(frames.shape[0]),
            "scale": scale,
            "screen": [g.rows, g.cols],
            "region": [g.left, g.top, g.left + g.sector - 1, g.top + g.sector - 1],
            "texts": [t.as_dict(scale) for t in composite.texts],
        }
        if self.references is not None:
            self.references[rel] = reference
        return rel, ds

    def _forms(self, ds: Dataset, enc: Encoding, n: int, frame_time: float, study: Study) -> None:
        if FRAME_TIME_VECTOR in enc.forms:
            frame_time_vector(ds, n, frame_time)
        if PRIVATE_TAGS in enc.forms:
            private_tags(ds, self.vendor.manufacturer, study.patient.name, self.vendor.model)
        if UNDEFINED_LENGTH in enc.forms:
            undefined_lengths(ds)

    def _write(self, ds: Dataset, enc: Encoding, study: Study, instance: int) -> str:
        """Write one object; DICOMDIR-form objects are staged in the study's CD file-set instead."""
        if DICOMDIR in enc.forms:
            if self._fileset is None:
                self._fileset = FileSet()
            added = self._fileset.add(ds)
            return f"{MEDIA_DIR}/{Path(added.FileID).as_posix()}"
        rel = relative_path(study, instance)
        atomic_write_bytes(self.root / rel, write_bytes(ds, enc))
        return rel

    def close(self) -> None:
        if self._fileset is not None:
            self._fileset.write(self.root / MEDIA_DIR)
        atomic_write_csv(self.root / "echo-record-list.csv", RECORD_COLUMNS, self.records)
        atomic_write_csv(self.root / "labels.csv", LABEL_COLUMNS, self.labels)
        atomic_write_csv(self.root / STUDY_LABELS, STUDY_LABEL_COLUMNS, self.study_labels)


__all__ = [
    "COLS",
    "ENHANCED_US_VOLUME",
    "FULL",
    "MEDIA_DIR",
    "ROWS",
    "SECTOR",
    "TINY",
    "BurnedText",
    "Composite",
    "DicomArchiveWriter",
    "Geometry",
    "Study",
    "compose",
    "compose_frames",
    "relative_path",
    "text_mask",
]
