"""Realistic but entirely fake patient identities, so de-identification can be rehearsed.

Every value is drawn from the phantom's seeded generator; none belongs to a real person.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

_FIRST_F = ["MARIA", "ANNA", "LINDA", "SUSAN", "KAREN", "AIKO", "FATIMA", "INGRID", "ROSA", "LEILA"]
_FIRST_M = ["JAMES", "JOHN", "ROBERT", "MICHAEL", "DAVID", "KENJI", "OMAR", "LARS", "JOSE", "PAVEL"]
_LAST = [
    "SMITH",
    "JOHNSON",
    "GARCIA",
    "MUELLER",
    "ROSSI",
    "TANAKA",
    "NOWAK",
    "OKAFOR",
    "DUBOIS",
    "HANSEN",
    "SILVA",
    "KOWALSKI",
    "MURPHY",
    "NGUYEN",
    "PETROV",
    "LINDQVIST",
    "HADDAD",
    "COHEN",
]
_INSTITUTIONS = [
    "ST. ELSEWHERE GENERAL HOSPITAL",
    "NORTHGATE UNIVERSITY MEDICAL CENTER",
    "RIVERSIDE HEART INSTITUTE",
    "LAKESHORE COMMUNITY HOSPITAL",
    "MOUNT CEDAR CLINIC",
    "HARBOR VIEW CARDIOLOGY",
    "ALPINE REGIONAL HOSPITAL",
    "EASTWOOD CHILDREN'S AND ADULT HOSPITAL",
]
_PHYSICIANS = ["HOUSE^GREGORY", "GREY^MEREDITH", "KILDARE^JAMES", "QUINN^MICHAELA", "WELBY^MARCUS"]


@dataclass(frozen=True)
class Patient:
    subject_id: int  # MIMIC-style 8-digit id
    mrn: str
    name: str  # DICOM PN: FAMILY^GIVEN
    sex: str
    birth_date: dt.date


def institution(site_index: int) -> str:
    return _INSTITUTIONS[site_index % len(_INSTITUTIONS)]


def physician(rng: np.random.Generator) -> str:
    return str(rng.choice(_PHYSICIANS))


def make_patients(n: int, rng: np.random.Generator, site_index: int) -> list[Patient]:
    """n distinct fake patients; ids are unique across sites (the site is in the id range)."""
    base = 10_000_000 + site_index * 800_000
    ids = rng.choice(800_000, size=n, replace=False) + base
    out = []
    for sid in ids:
        sex = "F" if rng.random() < 0.45 else "M"
        first = rng.choice(_FIRST_F if sex == "F" else _FIRST_M)
        last = rng.choice(_LAST)
        age_days = int(rng.integers(25 * 365, 92 * 365))
        birth = dt.date(2024, 1, 1) - dt.timedelta(days=age_days)
        out.append(Patient(int(sid), f"MRN{int(rng.integers(1_000_000, 9_999_999))}", f"{last}^{first}", sex, birth))
    return out


def study_datetime(rng: np.random.Generator) -> dt.datetime:
    day = dt.date(2017, 1, 1) + dt.timedelta(days=int(rng.integers(0, 7 * 365)))
    return dt.datetime(
        day.year, day.month, day.day, int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    )
