"""De-identification of a site's echo cines, before anything is registered.

Reference: DICOM PS3.15 Annex E, Table E.1-1, the Basic Application Level Confidentiality
Profile (`BASIC_PROFILE` below, as data). fedecho does not edit DICOM files: it keeps an
allow-list (`KEPT`) of the few header values training needs and drops the whole header, so every
attribute of the profile, and every private or unknown one, is removed by construction. What the
profile would replace by a UID or dummy (patient, study, series, instance identity) becomes a
salted hash (HMAC-SHA256 with the site's secret salt), so videos of one patient can still be
grouped and split together, at the site only. Burned-in text is removed by blanking every pixel
outside the moving ultrasound sector (`blank_outside_sector`), inside a declared region too.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset

SALT_FILE = "site.salt"
SALT_BYTES = 32

# (tag, keyword, action) from PS3.15 Table E.1-1 (Basic Profile column). Actions: D replace with a
# dummy, Z zero length, X remove, K keep, C clean, U replace UIDs consistently; "X/Z" etc. as in the
# table. The list is what fedecho documents and tests against; removal does not depend on its
# completeness, because only KEPT attributes are ever read into the manifest.
BASIC_PROFILE: tuple[tuple[int, str, str], ...] = (
    (0x00080014, "InstanceCreatorUID", "U"),
    (0x00080018, "SOPInstanceUID", "U"),
    (0x00080020, "StudyDate", "Z"),
    (0x00080021, "SeriesDate", "X/D"),
    (0x00080022, "AcquisitionDate", "X/Z"),
    (0x00080023, "ContentDate", "Z/D"),
    (0x00080024, "OverlayDate", "X"),
    (0x00080025, "CurveDate", "X"),
    (0x0008002A, "AcquisitionDateTime", "X/D"),
    (0x00080030, "StudyTime", "Z"),
    (0x00080031, "SeriesTime", "X/D"),
    (0x00080032, "AcquisitionTime", "X/Z"),
    (0x00080033, "ContentTime", "Z/D"),
    (0x00080050, "AccessionNumber", "Z"),
    (0x00080080, "InstitutionName", "X/Z/D"),
    (0x00080081, "InstitutionAddress", "X"),
    (0x00080082, "InstitutionCodeSequence", "X/Z/D"),
    (0x00080090, "ReferringPhysicianName", "Z"),
    (0x00080092, "ReferringPhysicianAddress", "X"),
    (0x00080094, "ReferringPhysicianTelephoneNumbers", "X"),
    (0x00080096, "ReferringPhysicianIdentificationSequence", "X"),
    (0x00081010, "StationName", "X/Z/D"),
    (0x00081030, "StudyDescription", "X"),
    (0x0008103E, "SeriesDescription", "X"),
    (0x00081040, "InstitutionalDepartmentName", "X"),
    (0x00081048, "PhysiciansOfRecord", "X"),
    (0x00081049, "PhysiciansOfRecordIdentificationSequence", "X"),
    (0x00081050, "PerformingPhysicianName", "X"),
    (0x00081052, "PerformingPhysicianIdentificationSequence", "X"),
    (0x00081060, "NameOfPhysiciansReadingStudy", "X"),
    (0x00081062, "PhysiciansReadingStudyIdentificationSequence", "X"),
    (0x00081070, "OperatorsName", "X/Z/D"),
    (0x00081072, "OperatorIdentificationSequence", "X/D"),
    (0x00081080, "AdmittingDiagnosesDescription", "X"),
    (0x00081084, "AdmittingDiagnosesCodeSequence", "X"),
    (0x00081110, "ReferencedStudySequence", "X/Z"),
    (0x00081111, "ReferencedPerformedProcedureStepSequence", "X/Z/D"),
    (0x00081120, "ReferencedPatientSequence", "X"),
    (0x00081140, "ReferencedImageSequence", "X/Z/U"),
    (0x00081155, "ReferencedSOPInstanceUID", "U"),
    (0x00082111, "DerivationDescription", "X"),
    (0x00100010, "PatientName", "Z"),
    (0x00100020, "PatientID", "Z"),
    (0x00100021, "IssuerOfPatientID", "X"),
    (0x00100030, "PatientBirthDate", "Z"),
    (0x00100032, "PatientBirthTime", "X"),
    (0x00100040, "PatientSex", "Z"),
    (0x00100050, "PatientInsurancePlanCodeSequence", "X"),
    (0x00101000, "OtherPatientIDs", "X"),
    (0x00101001, "OtherPatientNames", "X"),
    (0x00101002, "OtherPatientIDsSequence", "X"),
    (0x00101005, "PatientBirthName", "X"),
    (0x00101010, "PatientAge", "X"),
    (0x00101020, "PatientSize", "X"),
    (0x00101030, "PatientWeight", "X"),
    (0x00101040, "PatientAddress", "X"),
    (0x00101060, "PatientMotherBirthName", "X"),
    (0x00101080, "MilitaryRank", "X"),
    (0x00101081, "BranchOfService", "X"),
    (0x00101090, "MedicalRecordLocator", "X"),
    (0x00102000, "MedicalAlerts", "X"),
    (0x00102110, "Allergies", "X"),
    (0x00102150, "CountryOfResidence", "X"),
    (0x00102152, "RegionOfResidence", "X"),
    (0x00102154, "PatientTelephoneNumbers", "X"),
    (0x00102160, "EthnicGroup", "X"),
    (0x00102180, "Occupation", "X"),
    (0x001021A0, "SmokingStatus", "X"),
    (0x001021B0, "AdditionalPatientHistory", "X"),
    (0x001021C0, "PregnancyStatus", "X"),
    (0x001021D0, "LastMenstrualDate", "X"),
    (0x001021F0, "PatientReligiousPreference", "X"),
    (0x00104000, "PatientComments", "X"),
    (0x00181000, "DeviceSerialNumber", "X/Z/D"),
    (0x00181002, "DeviceUID", "U"),
    (0x00181004, "PlateID", "X"),
    (0x00181005, "GeneratorID", "X"),
    (0x00181007, "CassetteID", "X"),
    (0x00181008, "GantryID", "X"),
    (0x00181030, "ProtocolName", "X/D"),
    (0x00181400, "AcquisitionDeviceProcessingDescription", "X/D"),
    (0x00184000, "AcquisitionComments", "X"),
    (0x0018700A, "DetectorID", "X/D"),
    (0x00189424, "AcquisitionProtocolDescription", "X"),
    (0x0020000D, "StudyInstanceUID", "U"),
    (0x0020000E, "SeriesInstanceUID", "U"),
    (0x00200010, "StudyID", "Z"),
    (0x00200052, "FrameOfReferenceUID", "U"),
    (0x00200200, "SynchronizationFrameOfReferenceUID", "U"),
    (0x00204000, "ImageComments", "X"),
    (0x00209158, "FrameComments", "X"),
    (0x00209161, "ConcatenationUID", "U"),
    (0x00321032, "RequestingPhysician", "X"),
    (0x00321033, "RequestingService", "X"),
    (0x00321060, "RequestedProcedureDescription", "X/Z"),
    (0x00324000, "StudyComments", "X"),
    (0x00380010, "AdmissionID", "X"),
    (0x00380300, "CurrentPatientLocation", "X"),
    (0x00380400, "PatientInstitutionResidence", "X"),
    (0x00384000, "VisitComments", "X"),
    (0x00400241, "PerformedStationAETitle", "X"),
    (0x00400242, "PerformedStationName", "X"),
    (0x00400243, "PerformedLocation", "X"),
    (0x00400244, "PerformedProcedureStepStartDate", "X"),
    (0x00400245, "PerformedProcedureStepStartTime", "X"),
    (0x00400253, "PerformedProcedureStepID", "X"),
    (0x00400254, "PerformedProcedureStepDescription", "X"),
    (0x00401001, "RequestedProcedureID", "X"),
    (0x00402016, "PlacerOrderNumberImagingServiceRequest", "Z"),
    (0x00402017, "FillerOrderNumberImagingServiceRequest", "Z"),
    (0x0040A124, "UID", "U"),
    (0x0040A730, "ContentSequence", "X"),
    (0x00880140, "StorageMediaFileSetUID", "U"),
    (0x30060024, "ReferencedFrameOfReferenceUID", "U"),
    (0x40084000, "ResultsComments", "X"),
    (0xFFFAFFFA, "DigitalSignaturesSequence", "X"),
    (0xFFFCFFFC, "DataSetTrailingPadding", "X"),
)
"""The profile also removes all private attributes, overlays (60xx,3000), curves (50xx,xxxx) and
any attribute not listed as kept by an option; fedecho keeps none of them."""

KEPT = (
    "Modality",  # must be US for a cine to be used
    "SOPClassUID",  # the kind of object, not this object's identity
    "TransferSyntaxUID",  # how pixels were encoded (quarantine reasons, decoder coverage)
    "NumberOfFrames",
    "FrameTime",  # with FrameTimeVector, CineRate, RecommendedDisplayFrameRate: the frame rate only
    "Rows",
    "Columns",
    "PhotometricInterpretation",
    "SequenceOfUltrasoundRegions",  # geometry only: the tissue box and cm per pixel, never its text
    "Manufacturer",  # not in Table E.1-1; scanner vendor explains site shift
    "ManufacturerModelName",  # not in Table E.1-1 (Station Name and Device Serial Number are, and go)
)
"""The only header values the manifest holds (as numbers and short strings), besides the
pseudonyms. Dates, ages, sex, institution, station, device serial and descriptions all go."""


class PrivacyError(RuntimeError):
    """The site's privacy set-up is unsafe (e.g. its salt file is readable by others)."""


@dataclass(frozen=True)
class CleanHeader:
    """What is kept of a DICOM header: geometry, timing and encoding; nothing about the patient."""

    modality: str
    sop_class: str
    transfer_syntax: str
    frames: int
    rows: int
    columns: int
    photometric: str
    manufacturer: str
    model: str
    cm_per_pixel: tuple[float, float] | None


@dataclass(frozen=True)
class Pseudonyms:
    """Salted hashes standing in for the identifiers (HMAC-SHA256, hex); '' when absent."""

    patient: str
    study: str
    series: str
    instance: str


def load_or_create_salt(site_dir: str | Path) -> bytes:
    """The site's secret salt (32 random bytes in DIR/site.salt, mode 0600), created on first use.

    Without it the pseudonyms cannot be reversed by guessing MRNs; it never leaves the site and is
    never printed. A salt readable by group or others is refused rather than silently fixed.
    """
    site_dir = Path(site_dir)
    site_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = site_dir / SALT_FILE
    if not path.exists():
        tmp = site_dir / f".{SALT_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(SALT_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a salt another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PrivacyError(f"{path}: the site salt must be readable by its owner only (chmod 600 {path})")
    salt = path.read_bytes()
    if len(salt) != SALT_BYTES:
        raise PrivacyError(f"{path}: not a fedecho salt ({len(salt)} bytes, expected {SALT_BYTES})")
    return salt


def pseudonym(salt: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of (kind, value) under the site salt; '' for an empty value."""
    if not value:
        return ""
    return hmac.new(salt, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def deidentify(ds: Dataset, salt: bytes) -> tuple[CleanHeader, Pseudonyms]:
    """Reduce a header to KEPT values and salted pseudonyms; the dataset itself is not kept."""
    meta = getattr(ds, "file_meta", None)
    delta = None
    for r in ds.get("SequenceOfUltrasoundRegions", []):
        if int(r.get("RegionSpatialFormat", 0)) == 1 and "PhysicalDeltaX" in r and "PhysicalDeltaY" in r:
            delta = (float(r.PhysicalDeltaX), float(r.PhysicalDeltaY))
            break
    header = CleanHeader(
        modality=_text(ds, "Modality"),
        sop_class=_text(ds, "SOPClassUID"),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        photometric=_text(ds, "PhotometricInterpretation"),
        manufacturer=_text(ds, "Manufacturer")[:64],
        model=_text(ds, "ManufacturerModelName")[:64],
        cm_per_pixel=delta,
    )
    study = pseudonym(salt, "study", _text(ds, "StudyInstanceUID"))
    names = Pseudonyms(
        # Without a Patient ID a study stands for its patient (no grouping across studies is possible).
        patient=pseudonym(salt, "patient", _text(ds, "PatientID")) or study,
        study=study,
        series=pseudonym(salt, "series", _text(ds, "SeriesInstanceUID")),
        instance=pseudonym(salt, "instance", _text(ds, "SOPInstanceUID")),
    )
    return header, names


def identifying_values(ds: Dataset) -> set[str]:
    """The header's values for the profile's attributes (and their name parts), to scrub from text."""
    values: set[str] = set()
    for tag, _, action in BASIC_PROFILE:
        if action == "K" or tag not in ds:
            continue
        value = ds[tag].value
        if isinstance(value, bytes | bytearray) or value is None:
            continue
        items = value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]
        for item in items:
            text = str(item).strip()
            values.update(p for p in [text, *re.split(r"[\^=]", text)] if len(p.strip()) >= 3)
    return values


def scrub(text: str, values: set[str]) -> str:
    """Replace any identifying value in a message by [removed] (defence in depth for error texts)."""
    for v in sorted(values, key=len, reverse=True):
        text = text.replace(v, "[removed]")
    return text


# ---------------------------------------------------------------- pixels

Box = tuple[int, int, int, int]


class NoSector(ValueError):
    """No ultrasound sector found in a cine: burned-in text cannot be told apart, so it is not registered."""


"""(x0, y0, x1, y1), inclusive pixel bounds, as the Sequence of Ultrasound Regions declares them."""

MOTION_LEVEL = 2.0  # grey levels of typical frame-to-frame change: tissue moves, burned-in text does not
MOTION_SAMPLES = 32  # frames sampled across the cine for the motion test
SMOOTH = 5  # px window over which the change is averaged: speckle changes densely, not in every pixel
OPEN = 5  # px opening: removes thin moving lines (cursors, codec ringing along text) before the size test
MARGIN = 2  # px the fan estimate is grown by: its static dark rim and corners the opening rounds off
MIN_SECTOR_FRACTION = 0.05  # of the frame (or of a declared box): a smaller moving area is not a sector
NEARLY_WHOLE = 0.9  # a declared region covering this share of the frame locates nothing
MIN_REGION_SHARE = 0.5  # of the moving fan that a declared region must hold to be believed


def motion_map(frames: np.ndarray) -> np.ndarray:
    """(H, W) uint8, 1 where the picture keeps changing from frame to frame.

    The median of the absolute change between consecutive sampled frames, not the spread over time:
    video codecs (H.264, MPEG-2) and lossy JPEG re-encode static text now and then, so its edges
    flicker in a few frames; speckle inside the sector changes in most. A frame counter does change
    every frame: it is small and apart from the fan, and the size test below leaves it out.
    """
    t, h, w = frames.shape[:3]
    if t < 2:
        return np.zeros((h, w), np.uint8)
    idx = np.unique(np.linspace(0, t - 1, min(t, MOTION_SAMPLES)).round().astype(int))
    channels = frames.shape[3] if frames.ndim == 4 else 1
    if frames.dtype == np.uint8 and channels <= 257:  # channel sums fit 16 bits
        change = _median_change(frames, idx) / channels
    else:  # the general form (np.median), which the uint8 path computes exactly, only faster
        sample = frames[idx]
        gray = sample.sum(-1, dtype=np.int32) if sample.ndim == 4 else sample.astype(np.int32)
        change = np.median(np.abs(np.diff(gray, axis=0)), axis=0).astype(np.float32) / channels
    moving = (cv2.blur(change, (SMOOTH, SMOOTH)) > MOTION_LEVEL).astype(np.uint8)
    return cv2.morphologyEx(moving, cv2.MORPH_OPEN, np.ones((OPEN, OPEN), np.uint8))


MEDIAN_BAND_BYTES = 1 << 22  # a band of rows of every sampled frame, sized for the cache (fewer calls matter more)


def _median_change(frames: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(H, W) float32: per pixel, the median over consecutive sampled frames (uint8, `idx`) of the
    absolute change of the channel sum, exactly what np.median gives (an even count: the mean of the
    two middle values), through a sorting network of elementwise min/max over bands of rows instead
    of a per-pixel selection (the whole cine would otherwise be copied to int32, and np.median's
    partition along time is slow)."""
    h, w = frames.shape[1:3]
    channels = frames.shape[3] if frames.ndim == 4 else 1
    level = np.uint8 if channels == 1 else np.uint16
    m = len(idx) - 1
    net = _median_network(m)
    rows = max(1, MEDIAN_BAND_BYTES // (len(idx) * w * np.dtype(level).itemsize))
    out = np.empty((h, w), np.float32)
    for r0 in range(0, h, rows):
        band = [_channel_sum(frames[i, r0 : r0 + rows], level) for i in idx]
        lanes = [cv2.absdiff(a, b) for a, b in zip(band[1:], band[:-1], strict=True)]
        spare = np.empty_like(lanes[0])  # the network's minima
        for i, j in net:
            np.minimum(lanes[i], lanes[j], out=spare)
            np.maximum(lanes[i], lanes[j], out=lanes[j])
            lanes[i], spare = spare, lanes[i]
        if m % 2:
            out[r0 : r0 + rows] = lanes[m // 2]
        else:
            np.add(lanes[m // 2 - 1], lanes[m // 2], out=out[r0 : r0 + rows], dtype=np.float32)
            out[r0 : r0 + rows] /= 2
    return out


def _channel_sum(band: np.ndarray, dtype: type) -> np.ndarray:
    """(rows, W) contiguous: a uint8 band of a frame, its channels summed in `dtype` (no overflow)."""
    if band.ndim == 2:
        return np.ascontiguousarray(band)
    total = band[..., 0].astype(dtype)
    for c in range(1, band.shape[2]):
        np.add(total, band[..., c], out=total)
    return total


@functools.lru_cache(maxsize=128)
def _median_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, that leave the middle value(s) of n values at n // 2 and (n - 1) // 2:
    Batcher's odd-even merge sort (pruned of those with an index past n, as if the missing values were
    the largest) less every comparator that the middle outputs do not depend on."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    need = {n // 2, (n - 1) // 2}
    kept = []
    for i, j in reversed(pairs):
        if i in need or j in need:
            kept.append((i, j))
            need |= {i, j}
    return tuple(reversed(kept))


def fan_hull(moving: np.ndarray) -> np.ndarray | None:
    """The convex hull of the largest moving area, grown by MARGIN px; None when it is too small.

    The hull fills what moves little inside the fan (blood pools, dark edges); only the largest
    area counts, so a frame counter, an ECG cursor or codec flicker elsewhere add nothing to it.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(moving, connectivity=8)
    if n <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[k, cv2.CC_STAT_AREA] < MIN_SECTOR_FRACTION * moving.size:
        return None
    hull = cv2.convexHull(_row_ends(labels == k))
    mask = np.zeros(moving.shape, np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    return cv2.dilate(mask, np.ones((2 * MARGIN + 1, 2 * MARGIN + 1), np.uint8)).astype(bool)


def _row_ends(area: np.ndarray) -> np.ndarray:
    """(N, 1, 2) int32 (x, y) points: the first and last pixel of each row of a boolean area. Every corner
    of the area's convex hull is one of them (any other pixel lies between two of them on its row), so
    their hull is the area's, from a few hundred points rather than every pixel of a large fan."""
    rows = np.flatnonzero(area.any(axis=1))
    inside = area[rows]
    pts = np.empty((len(rows), 2, 2), np.int32)
    pts[:, :, 1] = rows[:, None]
    pts[:, 0, 0] = inside.argmax(axis=1)
    pts[:, 1, 0] = area.shape[1] - 1 - inside[:, ::-1].argmax(axis=1)
    return pts.reshape(-1, 1, 2)


def estimate_sector(frames: np.ndarray) -> np.ndarray | None:
    """The sector as the (grown) convex hull of the largest area that keeps changing, or None.

    Burned-in names, dates and scales are static across a cine; speckle inside the sector is not.
    """
    return fan_hull(motion_map(frames))


def region_distrust(region: list[Box], h: int, w: int) -> str | None:
    """Why a declared region cannot locate the sector in an H x W frame, or None when it can.

    Archives and anonymisers resize frames without rewriting the Sequence of Ultrasound Regions, so
    a box reaching beyond the frame describes some other frame; clipping it kept the overlays.
    """
    for x0, y0, x1, y1 in region:
        if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
            return f"declared region does not fit the {w}x{h} frame"
    if _boxes_mask(region, h, w).mean() >= NEARLY_WHOLE:
        return f"declared region covers nearly the whole {w}x{h} frame"
    return None


def _boxes_mask(region: list[Box], h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in region:
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def _misses(region: list[Box], fan: np.ndarray) -> bool:
    """Whether most of the frame's moving fan lies outside the declared boxes.

    A region written for a smaller frame can still fit a larger one and point at the wrong place.
    The boxes are grown by what the estimate itself adds around a sector (smoothing, MARGIN).
    """
    grow = 2 * (SMOOTH // 2 + MARGIN) + 1
    boxes = cv2.dilate(_boxes_mask(region, *fan.shape).astype(np.uint8), np.ones((grow, grow), np.uint8))
    return bool((fan & (boxes > 0)).sum() < MIN_REGION_SHARE * fan.sum())


def _fan_in_boxes(moving: np.ndarray, region: list[Box]) -> np.ndarray:
    """Per declared box, the moving fan inside it: two 2-D views each keep their own fan."""
    mask = np.zeros(moving.shape, bool)
    for x0, y0, x1, y1 in region:
        fan = fan_hull(moving[y0 : y1 + 1, x0 : x1 + 1])
        if fan is not None:
            mask[y0 : y1 + 1, x0 : x1 + 1] |= fan
    return mask


def sector_mask(frames: np.ndarray, region: list[Box] | None = None) -> tuple[np.ndarray, str]:
    """(H, W) mask of the ultrasound sector and how it was found.

    'region': inside the scanner's declared 2-D tissue boxes, only the moving fan (text, readouts
    and counters burned inside a box too large for its fan go too). 'image': the moving fan of the
    whole frame, with the reason in parentheses when a declared region was not believed. Raises
    NoSector when nothing that moves like a sector is found. Limit: text within a few
    pixels of the fan (in MPEG-2 or H.264 cines, in a 16-px macroblock it shares with the fan)
    changes with the fan and may be kept; scanners put depth marks there, names and dates further out.
    """
    h, w = frames.shape[1:3]
    moving = motion_map(frames)
    whole = fan_hull(moving)
    doubt = region_distrust(region, h, w) if region else None
    if region and doubt is None:
        if whole is not None and _misses(region, whole):
            doubt = "declared region misses most of the moving sector"
        else:
            mask = _fan_in_boxes(moving, region)
            if mask.any():
                return mask, "region"
            doubt = "nothing moves inside the declared region"
    if whole is None:
        detail = doubt or "no ultrasound region declared"
        raise NoSector(f"{detail} and no moving sector found")
    return whole, f"image ({doubt})" if doubt else "image"


def blank_outside_sector(frames: np.ndarray, region: list[Box] | None = None) -> tuple[np.ndarray, str]:
    """Zero every pixel outside the sector and crop to the sector's bounding box.

    Burned-in names, MRNs, dates and readouts are static, the sector's speckle is not: what survives
    is the moving fan (inside the declared region when that can be believed). Returns (frames, how)
    with how as `sector_mask` says: 'region', 'image' or 'image (why the region was not believed)'.
    """
    mask, how = sector_mask(frames, region)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop, keep = frames[:, y0:y1, x0:x1], mask[y0:y1, x0:x1]
    if frames.dtype.kind not in "ui":  # NaN * 0 is not 0: assign instead
        out = np.array(crop, copy=True)
        out[:, ~keep] = 0
        return out, how
    # Times 1 or 0, with each row's pixels and channels as one run: one pass, no broadcast along channels.
    t, h, w = crop.shape[:3]
    channels = int(np.prod(crop.shape[3:]))
    keep = np.repeat(keep.astype(frames.dtype), channels, axis=1)
    return np.multiply(crop.reshape(t, h, w * channels), keep).reshape(crop.shape), how
