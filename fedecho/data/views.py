"""Which echocardiographic view a cine shows, as far as its header says.

Hospitals keep EF per study (the echo report), while a study holds cines of many views; a study's
label belongs on its apical four-chamber cines only. Scanners name the view in one of three places,
tried in this order:
- View Code Sequence (0054,0220): a coded concept, SNOMED CT (DICOM CID 12226) or a legacy scheme
  whose Code Meaning is read as text;
- View Name (0008,2127): free text, read with the vocabulary below;
- Series Description (0008,103E): free text too varied to read blindly, so it is used only with a
  pattern the site configures (a regular expression that matches its accepted views' descriptions).
A header that names no view says nothing: the cine is "unnamed", never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

VIEWS = ("A4C", "A2C", "A3C", "A5C", "PLAX", "PSAX", "SUBCOSTAL", "SUPRASTERNAL")
"""Canonical view names (what `--views` takes and reports show)."""

# SNOMED CT concepts of DICOM CID 12226 (Echocardiography Image View), as pydicom's code dictionary has them.
SNOMED_VIEWS = {
    "399214001": "A4C",  # apical four chamber
    "399232001": "A2C",  # apical two chamber
    "399339008": "A3C",  # apical long axis (three chamber)
    "398994001": "A5C",  # five chamber
    "399139001": "PLAX",  # parasternal long axis
    "443082005": "PLAX",  # ... of the right ventricular inflow tract
    "443083000": "PLAX",  # ... of the right ventricular outflow tract
    "399306005": "PSAX",  # parasternal short axis
    "399239005": "PSAX",  # ... at the aortic valve level
    "399036006": "PSAX",  # ... at the mitral valve level
    "399271003": "PSAX",  # ... at the papillary muscle level
    "399371001": "PSAX",  # ... at the level of the mitral chords
    **dict.fromkeys(
        ("399310008", "399200001", "443640005", "443609003", "443499004", "443160001", "443500008", "443100003"),
        "SUBCOSTAL",
    ),
    **dict.fromkeys(("399106004", "399145009", "443562002", "443162009", "443163004"), "SUPRASTERNAL"),
}
SNOMED_SCHEMES = frozenset({"SCT", "SNM3", "SRT", "99SDM"})

# Free text (View Name, Code Meaning): the first rule whose pattern occurs in the normalised text
# (lower case, runs of anything but letters and digits as one space, padded with spaces) wins.
# Subcostal and suprasternal come first: "subcostal four chamber" is not an apical view.
_TEXT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SUBCOSTAL", (" subcostal ", " subxiphoid ", " sc4c ", " scx ", " sub ")),
    ("SUPRASTERNAL", (" suprasternal ", " ssn ")),
    ("PLAX", (" parasternal long ", " plax ")),
    ("PSAX", (" parasternal short ", " psax ", " sax ")),
    ("A5C", (" apical five ", " apical 5 ", " five chamber ", " 5 chamber ", " a5c ", " 5ch ", " ap5 ")),
    (
        "A3C",
        (
            " apical long ",
            " apical three ",
            " apical 3 ",
            " three chamber ",
            " 3 chamber ",
            " a3c ",
            " 3ch ",
            " ap3 ",
            " aplax ",
            " alax ",
        ),
    ),
    ("A2C", (" apical two ", " apical 2 ", " two chamber ", " 2 chamber ", " a2c ", " 2ch ", " ap2 ")),
    ("A4C", (" apical four ", " apical 4 ", " four chamber ", " 4 chamber ", " a4c ", " 4ch ", " ap4 ")),
)


def _normalise(text: str) -> str:
    return " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split()) + " "


def view_from_text(text: str) -> str | None:
    """The canonical view free text names ("Apical 4 chamber", "A4C", "AP4 2D"), or None."""
    norm = _normalise(text)
    for view, patterns in _TEXT_RULES:
        if any(p in norm for p in patterns):
            return view
    return None


@dataclass(frozen=True)
class ViewFilter:
    """Which cines a study-level label applies to.

    views: accepted canonical views. series_pattern: a regular expression the site configures; a
    Series Description it matches (re.search) names an accepted view, one it does not names another.
    accept_unnamed: label cines whose header names no view (an archive known to hold one view only).
    """

    views: frozenset[str] = frozenset({"A4C"})
    series_pattern: re.Pattern[str] | None = None
    accept_unnamed: bool = False

    @classmethod
    def parse(
        cls,
        views: str | list[str] | tuple[str, ...] = "A4C",
        series_pattern: str | None = None,
        accept_unnamed: bool = False,
    ) -> ViewFilter:
        """From user text; an unknown view name or a pattern that does not compile is a ValueError naming it."""
        names = [v.strip().upper() for v in (views.split(",") if isinstance(views, str) else views) if v.strip()]
        unknown = [v for v in names if v not in VIEWS]
        if unknown or not names:
            raise ValueError(f"views: {', '.join(unknown) or '(none)'} not among {', '.join(VIEWS)}")
        pattern = None
        if series_pattern:
            try:
                pattern = re.compile(series_pattern)
            except re.error as e:
                raise ValueError(f"series description pattern {series_pattern!r}: {e}") from e
        return cls(frozenset(names), pattern, accept_unnamed)

    def view(self, ds: Dataset) -> tuple[str | None, str]:
        """(canonical view or None, where it came from). With a series pattern, a matching description
        is reported as the first accepted view, a description it does not match as "other"."""
        for item in ds.get("ViewCodeSequence", None) or []:
            code, scheme = str(item.get("CodeValue", "")).strip(), str(item.get("CodingSchemeDesignator", "")).strip()
            if scheme in SNOMED_SCHEMES and code in SNOMED_VIEWS:
                return SNOMED_VIEWS[code], "View Code Sequence"
            meaning = view_from_text(str(item.get("CodeMeaning", "")))
            if meaning:
                return meaning, "View Code Sequence"
            return "other", "View Code Sequence"  # coded, but not a view this reader knows
        name = str(ds.get("ViewName", "") or "").strip()
        if name:
            return view_from_text(name) or "other", "View Name"
        description = str(ds.get("SeriesDescription", "") or "").strip()
        if self.series_pattern is not None and description:
            if self.series_pattern.search(description):
                return sorted(self.views)[0], "Series Description"
            return "other", "Series Description"
        return None, ""

    def accepts(self, view: str | None) -> bool:
        return self.accept_unnamed if view is None else view in self.views
