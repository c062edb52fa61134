"""The mixed-encoding phantom archive (`fedecho synth --format dicom --encodings all`) against the reader.

One small archive holds every encoding of fedecho.synth.encodings (transfer syntaxes, pixel layouts, header
forms), tiny frames and few of them. The writer's own output is checked first (each file is what its table
row says), then every cine goes through DicomArchiveSource (scan + frames) and must decode to the pixels the
writer encoded: exactly for lossless encodings, within the row's stated tolerance for lossy ones. The
DICOMDIR is skipped without a problem, the 3-D volume is set aside as volume_3d, and after `data add` no
pixel of the burned-in text (listed per file in overlays.json) is left in the registered frames.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pydicom
import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.encaps import generate_fragments
from pydicom.fileset import FileSet
from typer.testing import CliRunner

from builders import burned_text_left, compare_frames
from fedecho.cli import app
from fedecho.data import Reason
from fedecho.data.dicom import DicomArchiveSource
from fedecho.synth import MANIFEST, OVERLAYS, synthesize
from fedecho.synth.dicom_writer import ENHANCED_US_VOLUME, MEDIA_DIR, TINY, text_mask
from fedecho.synth.encodings import (
    DICOMDIR,
    ENCODINGS,
    FRAME_TIME_VECTOR,
    LAYOUTS,
    NO_META,
    PRIVATE_TAGS,
    RESIZED,
    UNDEFINED_LENGTH,
    VOLUME_3D,
)

pytestmark = pytest.mark.slow  # builds a whole phantom archive

SITES = ("site01", "site02")


class Corpus:
    """The archive, its overlays sidecar, and the reference frames the writer returned per cine."""

    def __init__(self, root: Path, references: dict[str, np.ndarray]):
        self.root = root
        self.references = references
        self.sidecar = json.loads((root / OVERLAYS).read_text())
        self.files: dict[str, dict] = self.sidecar["files"]
        self.cine_of = {e["encoding"]: key for key, e in self.files.items() if e["kind"] == "cine"}
        self._scans: dict[str, object] = {}

    def site_and_rel(self, key: str) -> tuple[str, str]:
        site, rel = key.split("/", 1)
        return site, rel

    def source(self, site: str, **options: object) -> DicomArchiveSource:
        return DicomArchiveSource(self.root / site, **options)

    def scan(self, site: str):  # type: ignore[no-untyped-def]
        if site not in self._scans:
            self._scans[site] = self.source(site, crop_region=False).scan()
        return self._scans[site]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Two sites, one cine per encoding, 160-pixel sectors, at most a beat or so per cine."""
    out = tmp_path_factory.mktemp("corpus")
    references: dict[str, np.ndarray] = {}
    synthesize(
        out,
        videos=len(ENCODINGS),
        sites=2,
        fmt="dicom",
        seed=4,
        max_frames=8,
        progress=False,
        encodings="all",
        geometry=TINY,
        references=references,
    )
    return Corpus(out, references)


def test_the_writer_writes_what_each_row_says(corpus: Corpus) -> None:
    """Every encoding is in the archive once, and each file carries its row's transfer syntax, pixel layout and
    header forms; video streams are whole, at the declared rate and frame count, in one fragment unless the
    syntax is fragmentable."""
    assert set(corpus.cine_of) == set(ENCODINGS)
    assert set(corpus.sidecar["encodings"]) == set(ENCODINGS)
    for name, key in corpus.cine_of.items():
        enc, layout = ENCODINGS[name], LAYOUTS[ENCODINGS[name].layout]
        path = corpus.root / key
        raw = path.read_bytes()
        ds = pydicom.dcmread(path, force=True)
        where = f"{name} ({key})"
        if NO_META in enc.forms:
            assert raw[128:132] != b"DICM" and raw[:2] == b"\x08\x00", where  # bare data set, group 0008 first
            assert getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta, where
        else:
            assert raw[128:132] == b"DICM" and ds.file_meta.TransferSyntaxUID == enc.transfer_syntax, where
        assert ds.PhotometricInterpretation == layout.photometric, where
        assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (
            layout.bits_allocated,
            layout.bits_stored,
            layout.samples,
        ), where
        assert int(ds.NumberOfFrames) == len(corpus.references[key]) >= 8, where
        entry = corpus.files[key]
        assert (ds.Rows, ds.Columns) == (entry["rows"], entry["columns"]) == corpus.references[key].shape[1:3]
        region = ds.SequenceOfUltrasoundRegions[0]
        if RESIZED in enc.forms:  # half the frame, the region still in full-size coordinates
            assert (ds.Rows, ds.Columns) == (TINY.rows // 2, TINY.cols // 2), where
            assert region.RegionLocationMaxX1 >= ds.Columns and region.RegionLocationMaxY1 >= ds.Rows, where
        else:
            assert (ds.Rows, ds.Columns) == (TINY.rows, TINY.cols), where
        if UNDEFINED_LENGTH in enc.forms:
            assert ds["SequenceOfUltrasoundRegions"].is_undefined_length, where
        if PRIVATE_TAGS in enc.forms:
            block = ds.private_block(0x0009, str(ds[0x00090010].value))
            settings = block[0x13].value[0]
            assert settings[block.get_tag(0x19)].VR == "SQ", where  # a private sequence inside a private sequence
        if FRAME_TIME_VECTOR in enc.forms:
            assert "FrameTime" not in ds and ds.FrameIncrementPointer == 0x00181065, where
            assert len(ds.FrameTimeVector) == ds.NumberOfFrames, where
        else:
            assert float(ds.FrameTime) == pytest.approx(1000.0 / float(ds.CineRate), rel=0.02), where
        if DICOMDIR in enc.forms:
            assert key.split("/", 1)[1].startswith(f"{MEDIA_DIR}/"), where
            dicomdir = corpus.root / key.split("/", 1)[0] / MEDIA_DIR / "DICOMDIR"
            assert ds.SOPInstanceUID in {i.SOPInstanceUID for i in FileSet(dicomdir)}, where
        if enc.is_video:
            fragments = list(generate_fragments(ds.PixelData))
            bot, stream = fragments[0], b"".join(fragments[1:])
            assert bot == b"", where  # empty Basic Offset Table
            fragmentable = str(enc.transfer_syntax).endswith(".1")
            assert (len(fragments) - 1 > 1) if fragmentable else (len(fragments) == 2), where
            assert ds.PlanarConfiguration == 0 and ds.LossyImageCompression == "01", where
            with av.open(io.BytesIO(stream), format=str(enc.opts["format"])) as container:
                decoded = sum(1 for _ in container.decode(video=0))
                rate = float(container.streams.video[0].codec_context.framerate)  # the stream's own timing
            assert decoded == ds.NumberOfFrames, where
            assert 1000.0 / float(ds.FrameTime) == pytest.approx(rate, rel=0.01), where
            if enc.frame_rates:
                assert round(rate) in enc.frame_rates, where
    volumes = [k for k, e in corpus.files.items() if e["kind"] == "volume_3d"]
    assert volumes and all(pydicom.dcmread(corpus.root / k).SOPClassUID == ENHANCED_US_VOLUME for k in volumes)
    assert any(VOLUME_3D in ENCODINGS[n].forms for n in corpus.cine_of)
    # The sidecar with the burned-in text lies beside the archives, never inside one.
    for site in SITES:
        assert not list((corpus.root / site).rglob("*.json"))
    assert (corpus.root / MANIFEST).is_file()


def test_burned_in_text_is_where_the_sidecar_says(corpus: Corpus) -> None:
    """Re-rendering the recorded texts finds bright pixels in the encoded frames, PHI among them inside the
    declared region (in its corners, off the moving fan) and a frame counter that differs per frame."""
    for name in ("explicit_mono2", "rle_rgb", "jpegls_lossless_rgb"):  # lossless; the last one resized
        key = corpus.cine_of[name]
        entry, ref = corpus.files[key], corpus.references[key]
        gray = ref.mean(-1) if ref.ndim == 4 else ref.astype(float)
        rows, cols = entry["screen"]
        texts = entry["texts"]
        inside = [t for t in texts if t["inside_region"]]
        assert {t["kind"] for t in inside} >= {"id", "date", "counter"}, name
        counters = [t for t in inside if t["kind"] == "counter"]
        assert len({t["text"] for t in counters}) == len(ref), name
        mask = text_mask(texts, rows, cols, len(ref), entry["scale"])
        assert mask.shape == gray.shape, name
        assert (gray[mask] > 0).mean() > 0.97, name  # every recorded text pixel was drawn (on black)
        phi_in_region = text_mask([t for t in inside if t["phi"]], rows, cols, len(ref), entry["scale"])
        assert phi_in_region.any(), name
        # The moving fan never touches the text inside the region.
        moving = np.abs(np.diff(gray, axis=0)).max(0) > 8
        assert not (moving & phi_in_region[0]).any(), name


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_every_encoding_decodes_to_what_was_encoded(corpus: Corpus, name: str) -> None:
    key = corpus.cine_of[name]
    site, rel = corpus.site_and_rel(key)
    scan = corpus.scan(site)
    records = {r.key: r for r in scan.records}
    if rel not in records:
        problem = next((p for p in scan.problems if p.path == rel), None)
        pytest.fail(f"{name}: not registered: {problem or 'neither a record nor a problem'}")
    frames = np.stack(list(corpus.source(site, crop_region=False).frames(records[rel])))
    compare_frames(frames, corpus.references[key], ENCODINGS[name].tolerance, name)


def test_special_objects_get_their_reasons(corpus: Corpus) -> None:
    """Every file is a record or a problem, except the DICOMDIR, which is skipped silently; the 3-D volume is
    volume_3d, the Doppler-like stills single_frame, and nothing else is a problem."""
    for site in SITES:
        scan = corpus.scan(site)
        problems = {p.path: p for p in scan.problems}
        kinds = {k.split("/", 1)[1]: e["kind"] for k, e in corpus.files.items() if k.startswith(f"{site}/")}
        seen = {r.key for r in scan.records} | set(problems)
        assert seen == set(kinds), f"{site}: {sorted(seen ^ set(kinds))}"
        assert not any(p.endswith("DICOMDIR") for p in seen)
        for rel, kind in kinds.items():
            want = {"volume_3d": Reason.VOLUME_3D, "still": Reason.SINGLE_FRAME}.get(kind)
            got = problems[rel].reason if rel in problems else None
            assert got == want, f"{site}/{rel} ({kind}): {problems.get(rel)}"


@pytest.fixture(scope="module")
def registered(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each site of the archive after `data add` (one worker), by site name."""
    from fedecho.data.ingest import ingest

    out = tmp_path_factory.mktemp("registered")
    for site in SITES:
        ingest(corpus.root / site, out / site, workers=1, progress=False)
    return {site: out / site for site in SITES}


def test_no_burned_in_text_reaches_the_registered_frames(corpus: Corpus, registered: dict[str, Path]) -> None:
    """In every registered cine, every pixel the burned-in text covered (outside and inside the declared
    region, the resized cines' too-large regions included) is blank."""
    from fedecho.data.ingest import video_path
    from fedecho.privacy.deid import load_or_create_salt, pseudonym
    from fedecho.storage.site_store import SiteStore

    leaks: list[str] = []
    checked = 0
    for site in SITES:
        reg = registered[site]
        salt = load_or_create_salt(reg)
        with SiteStore(reg) as store:
            rows = {r.path_hash: r for r in store.files(status="ok")}
        for key, entry in corpus.files.items():
            if entry["kind"] != "cine" or not key.startswith(f"{site}/"):
                continue
            row = rows.get(pseudonym(salt, "path", key.split("/", 1)[1]))
            if row is None:
                continue  # not registered: the decode test says why
            stored = np.load(video_path(reg, row.record_key))
            rows_, cols_ = entry["screen"]
            mask = text_mask(entry["texts"], rows_, cols_, entry["frames"], entry["scale"])
            left = burned_text_left(stored, corpus.references[key], mask)
            checked += 1
            if left:
                leaks.append(f"{entry['encoding']}: {left} text pixels kept")
    assert checked >= len(ENCODINGS) // 2, f"only {checked} cines registered"
    assert not leaks, "; ".join(leaks)


TEXT_VRS = frozenset({"AE", "AS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"})


def _header_values(path: Path) -> set[str]:
    """Every text value anywhere in one file's header (nested and private sequences included, file
    meta's instance UID too) except what de-identification keeps, with a person name's parts."""
    from fedecho.privacy.deid import KEPT

    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    kept: set[str] = set()
    values: set[str] = set()
    for elem in ds.iterall():
        texts = [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])] if elem.VR in TEXT_VRS else []
        target = kept if elem.keyword in KEPT else values
        for text in texts:
            target.update(p.strip() for p in [text, *text.split("^")] if p.strip())
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        values.add(str(meta.MediaStorageSOPInstanceUID))
    standard = set(UID_dictionary)  # transfer syntaxes, SOP classes: the standard's, nobody's identity
    return {v for v in values - kept - standard if len(v) >= 4}


def test_no_header_value_reaches_the_site_folder(corpus: Corpus, registered: dict[str, Path]) -> None:
    """No identifying header value of any file in the archive (names, ids, dates, UIDs, private copies
    of the patient's name in nested private sequences) is in any file `data add` wrote."""
    from fedecho.privacy.deid import SALT_FILE

    for site in SITES:
        values: set[str] = set()
        for path in (corpus.root / site).rglob("*"):
            if path.is_file() and path.suffix not in (".csv", ".json"):
                values |= _header_values(path)
        private = {v for v in values if " PROBE " in v}  # the vendors' private elements were read too
        assert len(values) > 50 and private, sorted(values)[:20]
        reg = registered[site]
        files = [p for p in reg.rglob("*") if p.is_file() and p.name != SALT_FILE]
        assert any(p.suffix == ".npy" for p in files)
        for p in files:
            blob = p.read_bytes()
            # Pixel files: strings of 8+ characters only (short ones occur in megabytes of speckle by chance).
            candidates = [v for v in values if len(v) >= 8] if p.suffix == ".npy" else values
            leaked = sorted(v for v in candidates if v.encode() in blob)
            assert not leaked, f"{site}: {p.relative_to(reg)} holds {leaked}"


def test_study_labels_reach_every_encodings_cine(corpus: Corpus) -> None:
    """study-labels.csv (EF per StudyInstanceUID and study_id) labels each cine as labels.csv does: the
    view is read from View Code Sequence or View Name whatever the transfer syntax and header form."""
    for site in SITES:
        root = corpus.root / site
        per_file = {r.key: r.targets for r in DicomArchiveSource(root).scan().records}
        scan = DicomArchiveSource(root, labels=root / "study-labels.csv").scan()
        per_study = {r.key: r.targets for r in scan.records}
        assert per_study == per_file and len(per_file) >= len(ENCODINGS) // 2 - 1
        assert scan.studies is not None and scan.studies.no_accepted_cine == 0


def test_cli_encodings_option(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["synth", str(tmp_path / "a"), "--format", "dicom", "--encodings", "jpeg_ybr422,nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["synth", str(tmp_path / "b"), "--videos", "3", "--encodings", "all"])
    assert res.exit_code == 2 and "--format dicom" in res.output
