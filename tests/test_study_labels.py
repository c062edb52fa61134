"""Study-level labels: EF kept per study (the echo report) reaches the study's A4C cines only.

The phantom archive has four sites whose scanners name a cine's view in the four ways archives do
(View Code Sequence, View Name, Series Description only, nowhere), and each study holds an A4C cine
plus PLAX and A2C cines with the same pixels: only the header tells them apart, so a label that
reached a PLAX cine could only have come from ignoring it.
"""

from __future__ import annotations

import csv
import functools
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.sr import _concepts_dict
from typer.testing import CliRunner

from fedecho.cli import app
from fedecho.data import SourceError
from fedecho.data.dicom import DicomArchiveSource
from fedecho.data.ingest import ingest
from fedecho.data.views import SNOMED_VIEWS, ViewFilter, view_from_text
from fedecho.privacy.deid import load_or_create_salt, pseudonym
from fedecho.storage.site_store import SiteStore
from fedecho.synth import OVERLAYS, synthesize
from fedecho.synth.dicom_writer import STUDY_LABELS, TINY

pytestmark = pytest.mark.slow  # builds a phantom archive of four sites

SITES = {"site01": "code", "site02": "name", "site03": "series", "site04": "none"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("views")
    synthesize(out, videos=12, sites=4, fmt="dicom", seed=3, max_frames=8, progress=False, geometry=TINY, other_views=2)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, columns: list[str], rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _views(archive: Path, site: str) -> dict[str, str]:
    """Archive-relative path -> the view the writer gave each cine (from the overlays sidecar)."""
    import json

    files = json.loads((archive / OVERLAYS).read_text())["files"]
    return {k.split("/", 1)[1]: e["view"] for k, e in files.items() if k.startswith(f"{site}/") and e["kind"] == "cine"}


def _file_ef(archive: Path, site: str) -> dict[str, float]:
    return {r["path"]: float(r["EF"]) for r in _rows(archive / site / "labels.csv")}


def _labelled(archive: Path, site: str, labels: Path, **options: object) -> tuple[dict[str, float], object]:
    scan = DicomArchiveSource(archive / site, labels=labels, require_labels=False, **options).scan()
    return {r.key: r.targets["ef"] for r in scan.records if "ef" in r.targets}, scan.studies


@pytest.mark.parametrize("key", ["study_instance_uid", "study_id"])
@pytest.mark.parametrize("site", ["site01", "site02"])
def test_a_study_label_reaches_its_a4c_cines_only(archive: Path, tmp_path: Path, site: str, key: str) -> None:
    labels = _write(tmp_path / "labels.csv", [key, "EF", "split"], _rows(archive / site / STUDY_LABELS))
    got, counts = _labelled(archive, site, labels)
    views = _views(archive, site)
    assert set(views.values()) == {"A4C", "PLAX", "A2C"}
    want = {rel: ef for rel, ef in _file_ef(archive, site).items()}
    assert {rel for rel, v in views.items() if v == "A4C"} == set(want)
    assert got == pytest.approx(want)
    assert counts.studies == 3 and counts.labelled_cines == 3 and counts.other_view == 6
    assert counts.no_accepted_cine == 0 and counts.unnamed == 0
    source = {"code": "View Code Sequence", "name": "View Name"}[SITES[site]]
    assert counts.view_sources == {source: 3}


def test_views_option_moves_the_label_to_the_views_asked_for(archive: Path, tmp_path: Path) -> None:
    labels = _write(tmp_path / "labels.csv", ["study_id", "EF"], _rows(archive / "site01" / STUDY_LABELS))
    got, counts = _labelled(archive, "site01", labels, views="PLAX,A2C")
    views = _views(archive, "site01")
    assert set(got) == {rel for rel, v in views.items() if v in ("PLAX", "A2C")}
    assert counts.labelled_cines == 6 and counts.other_view == 3


def test_series_description_is_read_only_with_the_sites_pattern(archive: Path, tmp_path: Path) -> None:
    labels = _write(tmp_path / "labels.csv", ["study_id", "EF"], _rows(archive / "site03" / STUDY_LABELS))
    got, counts = _labelled(archive, "site03", labels)
    assert got == {} and counts.no_accepted_cine == 3 and counts.unnamed == 9
    got, counts = _labelled(archive, "site03", labels, series_pattern=r"(?i)\b4ch\b")
    assert got == pytest.approx(_file_ef(archive, "site03"))
    assert counts.view_sources == {"Series Description": 3} and counts.other_view == 6


def test_unnamed_views_are_labelled_only_when_the_site_says_so(archive: Path, tmp_path: Path) -> None:
    labels = _write(tmp_path / "labels.csv", ["study_instance_uid", "EF"], _rows(archive / "site04" / STUDY_LABELS))
    got, counts = _labelled(archive, "site04", labels, series_pattern="4CH")  # no description to match
    assert got == {} and counts.no_accepted_cine == 3 and counts.no_cine == 0
    got, counts = _labelled(archive, "site04", labels, accept_unnamed_views=True)
    assert len(got) == 9 and counts.view_sources == {"no view named (accepted)": 9}


def test_study_id_comes_from_the_record_list_else_the_folder(archive: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(archive / "site02", site)
    studies = _rows(site / STUDY_LABELS)
    a, b = studies[0], studies[1]
    labels = _write(
        tmp_path / "labels.csv", ["study_id", "EF"], [{**r, "study_id": f"s{r['study_id']}"} for r in studies]
    )
    # The record list says study a's A4C cine belongs to study b: the list wins over the folder name.
    record_list = _rows(site / "echo-record-list.csv")
    moved = next(
        r["dicom_filepath"]
        for r in record_list
        if f"/s{a['study_id']}/" in r["dicom_filepath"] and r["dicom_filepath"].endswith("_0001.dcm")
    )
    for r in record_list:
        if r["dicom_filepath"] == moved:
            r["study_id"] = b["study_id"]
    _write(site / "echo-record-list.csv", list(record_list[0]), record_list)
    scan = DicomArchiveSource(site, labels=labels, require_labels=False).scan()
    got = {r.key: r.targets.get("ef") for r in scan.records}
    assert got[moved] == pytest.approx(float(b["EF"]))
    (site / "echo-record-list.csv").unlink()  # without it, the s<study_id> folder names the study
    scan = DicomArchiveSource(site, labels=labels, require_labels=False).scan()
    got = {r.key: r.targets.get("ef") for r in scan.records}
    assert got[moved] == pytest.approx(float(a["EF"]))
    assert scan.studies is not None and scan.studies.labelled_cines == 3


def test_a_file_row_wins_over_its_study_row_and_missing_studies_are_counted(archive: Path, tmp_path: Path) -> None:
    views = _views(archive, "site01")
    plax = next(rel for rel, v in views.items() if v == "PLAX")
    studies = _rows(archive / "site01" / STUDY_LABELS)
    rows = [{"study_id": r["study_id"], "EF": r["EF"]} for r in studies]
    rows += [{"path": plax, "EF": "12.5"}, {"study_id": "99999999", "EF": "40"}]
    labels = _write(tmp_path / "labels.csv", ["path", "study_id", "EF"], rows)
    got, counts = _labelled(archive, "site01", labels)
    assert got[plax] == 12.5 and len(got) == 4
    assert counts.studies == 4 and counts.no_accepted_cine == 1 and counts.no_cine == 1
    # Required labels (training straight from the archive): other views are set aside, saying why.
    scan = DicomArchiveSource(archive / "site01", labels=labels).scan()
    details = [p.detail for p in scan.problems if p.reason == "missing_label"]
    assert len(details) == 5 and all("names PLAX, not A4C" in d or "names A2C, not A4C" in d for d in details)


def test_a_bad_labels_csv_names_the_line(archive: Path, tmp_path: Path) -> None:
    studies = _rows(archive / "site01" / STUDY_LABELS)
    twice = _write(tmp_path / "twice.csv", ["study_id", "EF"], [studies[0], studies[1], studies[0]])
    with pytest.raises(SourceError, match=r"twice.csv line 4: the same study_id as line 2"):
        DicomArchiveSource(archive / "site01", labels=twice).scan()
    keyless = _write(tmp_path / "keyless.csv", ["study_id", "EF"], [studies[0], {"study_id": "", "EF": "50"}])
    with pytest.raises(SourceError, match=r"keyless.csv line 3: names no file or study"):
        DicomArchiveSource(archive / "site01", labels=keyless).scan()
    with pytest.raises(SourceError, match="views: ECHO not among"):
        DicomArchiveSource(archive / "site01", views="A4C,echo")
    with pytest.raises(SourceError, match="series description pattern"):
        DicomArchiveSource(archive / "site01", series_pattern="4CH(")


def test_data_add_registers_study_labels_and_reports_what_it_did(archive: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = [
        "data",
        "add",
        str(archive / "site03"),
        "--labels",
        str(archive / "site03" / STUDY_LABELS),
        "--workers",
        "1",
    ]
    out = runner.invoke(app, [*base, "--site-dir", str(tmp_path / "a")], env={"COLUMNS": "240"})
    assert out.exit_code == 0, out.output
    assert "3 labelled studies had no cine the view filter (A4C) accepted" in out.output
    assert "9 whose header names no view" in out.output
    out = runner.invoke(
        app, [*base, "--site-dir", str(tmp_path / "b"), "--series-pattern", "4CH"], env={"COLUMNS": "240"}
    )
    assert out.exit_code == 0, out.output
    assert "3 cines labelled (3 from Series Description)" in out.output
    salt = load_or_create_salt(tmp_path / "b")
    with SiteStore(tmp_path / "b") as store:
        ef = {r.path_hash: r.targets.get("ef") for r in store.files(status="ok")}
    want = _file_ef(archive, "site03")
    for rel, view in _views(archive, "site03").items():
        got = ef[pseudonym(salt, "path", rel)]
        assert got == (pytest.approx(want[rel]) if view == "A4C" else None), rel
    out = runner.invoke(app, [*base, "--site-dir", str(tmp_path / "c"), "--views", "A4C,XYZ"])
    assert out.exit_code == 2 and "XYZ not among" in out.output


def test_view_filters_apply_to_dicom_archives_only(echonet_phantom: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="view filters apply to DICOM archives"):
        ingest(echonet_phantom, tmp_path / "site", views={"views": "PLAX"}, progress=False)


def test_the_view_vocabulary() -> None:
    """SNOMED CT codes agree with pydicom's code dictionary read as text; free-text names scanners write."""
    meanings = {code: m for d in _concepts_dict.concepts["SCT"].values() for code, (m, _) in d.items()}
    for code, view in SNOMED_VIEWS.items():
        assert view_from_text(meanings[code]) == view, (code, meanings[code])
    cases = {
        "A4C": "A4C",
        "Apical 4 Chamber": "A4C",
        "AP4 zoom": "A4C",
        "4CH 2D": "A4C",
        "apical-2-chamber": "A2C",
        "APLAX": "A3C",
        "Subcostal four chamber": "SUBCOSTAL",
        "PLAX RV inflow": "PLAX",
        "SAX PAP": "PSAX",
        "A5C LVOT": "A5C",
        "MV Doppler": None,
        "44CHAN": None,
    }
    assert {t: view_from_text(t) for t in cases} == cases
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "G-A19B", "SRT", "Apical four chamber"
    ds = pydicom.Dataset()
    ds.ViewCodeSequence = [item]
    ds.ViewName = "PLAX"  # the coded view comes first
    assert ViewFilter().view(ds) == ("A4C", "View Code Sequence")


def test_a_scan_in_worker_processes_is_the_scan_in_one(archive: Path, tmp_path: Path) -> None:
    """At archive scale `data add` reads headers in worker processes: the same records, problems (with
    their reasons) and study counts, in the same order, as one process."""
    site = tmp_path / "site"
    shutil.copytree(archive / "site02", site)
    blob = next(site.rglob("*_0001.dcm")).read_bytes()
    (site / "cut.dcm").write_bytes(blob[: len(blob) // 2])
    src = DicomArchiveSource(site, labels=site / STUDY_LABELS, require_labels=False)
    one = src.scan()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        two = src.scan(map_fn=functools.partial(pool.map, chunksize=2))
    assert two.records == one.records and len(one.records) == 9
    assert two.problems == one.problems and "truncated" in {p.reason for p in one.problems}
    assert two.studies == one.studies and one.studies is not None and one.studies.labelled_cines == 3
