"""A site's differential-privacy policy ([privacy] in site.toml): light to import (no torch, no Opacus).

The site decides, the run file cannot weaken it: whether every round must use DP-SGD, the budget
epsilon_max at the site's delta (enforced by the site's ledger, `fedecho.privacy.ledger`), the least
noise it accepts, and the privacy unit: what one epsilon protects.

    [privacy]
    dp = "required"             # "optional": DP-SGD when the run file asks; "required": always
    epsilon_max = 8.0           # the site's total budget over all runs (0: no cap, still accounted)
    delta = 1e-5                # delta of every epsilon this site reports (take it below 1 / patients)
    min_noise_multiplier = 1.0  # a floor on the noise; with "required", the noise when a run sets none
    max_grad_norm = 1.0         # the clipping bound when a run sets none
    unit = "patient"            # "patient" | "video"; absent: the patient wherever the data has patient ids

The privacy unit defaults to the patient wherever every training video has a patient id (DICOM archives):
a patient typically has dozens of cines, and a per-video epsilon protects such a patient only k times more
weakly (group privacy), so the weaker unit must be the site's explicit choice (`unit = "video"`), never an
accident of the default. Where some video has no patient id the default unit is the video; an explicit
`unit = "patient"` there refuses the round.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedecho._toml import Table

DP_MODES = ("optional", "required")
UNITS = ("patient", "video")
# Reply metrics that describe one site's privacy: stored per site, never averaged across sites.
# dp_per_patient: 1 when the site's epsilon holds per patient (every DP round in its ledger had the patient as
# unit), 0 when it holds per video only.
PRIVACY_METRICS = frozenset({"epsilon", "delta", "dp_noise_multiplier", "dp_sample_rate", "dp_steps", "dp_per_patient"})


@dataclass(frozen=True)
class DPSection:
    """[dp] of a run file: DP-SGD at every site, in both phases (each site adds its own floor on the noise and
    its budget, `PrivacyPolicy`)."""

    enabled: bool = False
    noise_multiplier: float = 1.0  # Gaussian noise std / max_grad_norm on each step's summed clipped gradients
    max_grad_norm: float = 1.0  # per-sample (per-video, or per-patient) L2 clipping bound


class PrivacyRefused(Exception):
    """The site's privacy policy or budget does not allow this round (the server records a refusal)."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """A site's own privacy rules; see the module docstring for each field."""

    dp: Literal["optional", "required"] = "optional"
    epsilon_max: float = 0.0
    delta: float = 1e-5
    min_noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    unit: Literal["patient", "video"] | None = None  # None: the patient where every training video has one

    def __post_init__(self) -> None:
        for field, message in policy_problems(vars(self)):
            raise ValueError(f"[privacy].{field} {message}")


def policy_problems(v: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, what is wrong) for each bad value of a policy."""
    out = []
    if v["dp"] not in DP_MODES:
        out.append(("dp", f"must be one of {', '.join(map(repr, DP_MODES))}, not {v['dp']!r}"))
    if v["epsilon_max"] < 0:
        out.append(("epsilon_max", f"must be >= 0, not {v['epsilon_max']}"))
    if not 0 < v["delta"] < 1:
        out.append(("delta", f"must be in (0, 1), not {v['delta']}"))
    if v["min_noise_multiplier"] < 0:
        out.append(("min_noise_multiplier", f"must be >= 0, not {v['min_noise_multiplier']}"))
    if v["dp"] == "required" and v["min_noise_multiplier"] <= 0:
        out.append(("min_noise_multiplier", 'must be > 0 with dp = "required" (the noise when a run sets none)'))
    if v["max_grad_norm"] <= 0:
        out.append(("max_grad_norm", f"must be > 0, not {v['max_grad_norm']}"))
    if v.get("unit") not in (None, *UNITS):
        out.append(("unit", f"must be one of {', '.join(map(repr, UNITS))}, not {v['unit']!r}"))
    return out


DEFAULT_PRIVACY = PrivacyPolicy()


@dataclass(frozen=True)
class DPPlan:
    """One round of DP-SGD at one site, fixed before training so that it can be reserved in the ledger."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    batch_size: int  # expected privacy units per batch
    units: tuple[tuple[int, ...], ...]  # training-set indices of each privacy unit
    unit: Literal["video", "patient"]
    delta: float


def unit_in_force(policy: PrivacyPolicy, groups: list[str | None]) -> tuple[Literal["patient", "video"], str]:
    """The privacy unit of a round over training videos with these patient ids, and how it was decided.

    Raises PrivacyRefused when the site asks for the patient and some video has no patient id."""
    missing = sum(g is None or g == "" for g in groups)
    if policy.unit == "video":
        return "video", 'the site\'s choice ([privacy] unit = "video")'
    if policy.unit == "patient":
        if missing:
            raise PrivacyRefused(
                f'[privacy] unit = "patient" but {missing} of {len(groups)} training videos have no patient id '
                "(the data source does not record patients)"
            )
        return "patient", 'the site\'s choice ([privacy] unit = "patient")'
    if groups and not missing:
        return "patient", f"unit not set: every one of the {len(groups)} training videos has a patient id"
    if not groups:
        return "video", "unit not set: no training videos"
    return "video", f"unit not set: {missing} of {len(groups)} training videos have no patient id"


def privacy_units(groups: list[str | None], by_patient: bool) -> tuple[tuple[int, ...], ...]:
    """Training-set indices grouped into privacy units: one video each, or all videos of one patient."""
    if not by_patient:
        return tuple((i,) for i in range(len(groups)))
    missing = sum(g is None or g == "" for g in groups)
    if missing:
        raise PrivacyRefused(f"{missing} of {len(groups)} training videos have no patient id")
    units: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        units.setdefault(str(g), []).append(i)
    return tuple(tuple(v) for v in units.values())


def plan_round(
    policy: PrivacyPolicy,
    run_dp: DPSection,
    groups: list[str | None],
    batch_size: int,
    steps: int,
    epochs: int,
) -> DPPlan | None:
    """The round's DP-SGD settings, or None when neither the site nor the run asks for DP.

    A run asking for less noise than the site's minimum trains at the site's minimum: the site's policy
    is a floor the run cannot lower, and the noise used is reported with the reply (`dp_noise_multiplier`).
    It reads the training videos' patient ids only (from the data index), so it runs before any video is decoded.
    """
    if policy.dp != "required" and not run_dp.enabled:
        return None
    if run_dp.enabled:
        noise, clip = max(run_dp.noise_multiplier, policy.min_noise_multiplier), run_dp.max_grad_norm
    else:
        noise, clip = policy.min_noise_multiplier, policy.max_grad_norm
    if noise <= 0:
        raise PrivacyRefused("DP-SGD needs a noise multiplier > 0")
    unit, _ = unit_in_force(policy, groups)
    units = privacy_units(groups, unit == "patient")
    if not units:
        raise PrivacyRefused("no training videos")
    expected = min(batch_size, len(units))
    q = expected / len(units)
    n_steps = steps if steps > 0 else max(1, epochs) * math.ceil(len(units) / expected)
    return DPPlan(noise, clip, q, n_steps, expected, units, unit, policy.delta)


def kept_units(plan: DPPlan, kept: list[int]) -> DPPlan:
    """The plan over the training videos that survived decoding (`kept`: their indices in the planned training set,
    in their new order). Units lose the dropped videos and a unit with none left goes; noise, clipping, sample rate,
    steps and the expected batch are unchanged, so the round is still the mechanism the ledger reserved (each
    remaining unit is sampled with the planned rate)."""
    new_index = {old: new for new, old in enumerate(kept)}
    units = tuple(u for u in (tuple(new_index[i] for i in unit if i in new_index) for unit in plan.units) if u)
    return dataclasses.replace(plan, units=units)


def parse_privacy(raw: dict[str, Any], path: Path) -> PrivacyPolicy:
    """[privacy] of a site.toml (optional: the defaults above); mistakes name the file and the field."""
    t = Table(raw, path, "privacy", required=False)
    values = {
        "dp": t.choice("dp", DP_MODES, "optional"),
        "epsilon_max": t.number("epsilon_max", 0.0),
        "delta": t.number("delta", 1e-5),
        "min_noise_multiplier": t.number("min_noise_multiplier", 0.0),
        "max_grad_norm": t.number("max_grad_norm", 1.0),
        "unit": t.optional_choice("unit", UNITS),
    }
    if "group_by_patient" in t.raw:
        raise t.error(
            "group_by_patient",
            'is replaced by unit = "patient" | "video" (absent: the patient wherever every training video has a '
            "patient id)",
        )
    t.finish()
    for key, message in policy_problems(values):
        raise t.error(key, message)
    return PrivacyPolicy(**values)  # type: ignore[arg-type]


__all__ = [
    "DEFAULT_PRIVACY",
    "DP_MODES",
    "PRIVACY_METRICS",
    "UNITS",
    "DPPlan",
    "PrivacyPolicy",
    "PrivacyRefused",
    "kept_units",
    "parse_privacy",
    "plan_round",
    "privacy_units",
    "unit_in_force",
]
