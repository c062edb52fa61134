"""A site's policy: what the coordinator may ask of this hospital, checked at the site before any video is read.

The `[policy]` table of site.toml lists the phases, tasks and models the site takes part in, the most local
steps it trains per round, and the fewest videos (and patients) behind anything that leaves the site
(differential privacy is the `[privacy]` table's: `fedecho.privacy.dp_policy` enforces DP-SGD, the noise
floor and the epsilon budget). The ClientApp builds a `Request` from each message (the run file's text, the
phase and the round's options: nothing from the site's data) and asks `SitePolicy.check` before a single file
is opened; then, from the data index alone (file lists, headers: no video decoded), `SitePolicy.check_data`
counts the videos and patients the round's update or metric would come from.

A policy is in force even without a `[policy]` table (`DEFAULT_POLICY`), with conservative bounds the site
can loosen: a coordinator must not be able to ask a site for an update or a validation metric computed from
one or two videos (a metric over one video is that patient's label; an update from one video is a gradient
of that video), nor for unbounded local training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedecho._toml import Table

if TYPE_CHECKING:
    from fedecho.fl.config import FedRunConfig

PHASES = ("pretrain", "finetune")
# Defaults of a policy without those fields. Ten videos from at least five patients behind every update and
# every metric: a mean over that many says little about any one of them (and where patient ids exist, one
# patient's many cines cannot make up the ten). 1000 local steps a round is about 8000 videos at batch 8: a
# round, not an open-ended local training on the site's data and machine.
DEFAULT_MIN_VIDEOS = 10
DEFAULT_MIN_PATIENTS = 5
DEFAULT_MAX_LOCAL_STEPS = 1000


@dataclass(frozen=True)
class Request:
    """What one message asks the site to do, from the message alone (never from patient data)."""

    kind: str  # train | evaluate
    phase: str
    model: str
    tasks: tuple[str, ...]  # fine-tuning heads (empty in pre-training)
    steps: int  # fixed local steps per round (0: `epochs` passes over the site's training videos)
    epochs: int
    batch_size: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


ALLOW = Decision(True, "within the site's policy")


@dataclass(frozen=True)
class SitePolicy:
    """One site's rules; a None list allows every name, a bound of 0 is no bound (the site must write it)."""

    phases: tuple[str, ...] = PHASES
    tasks: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    max_local_steps: int = DEFAULT_MAX_LOCAL_STEPS
    min_videos: int = DEFAULT_MIN_VIDEOS  # videos behind every update (training set) and metric (validation split)
    min_patients: int = DEFAULT_MIN_PATIENTS  # patients behind them, where every video has a patient id

    def check(self, req: Request, train_videos: Callable[[], int] | None = None) -> Decision:
        """Allowed or refused with a reason. train_videos counts the site's training videos; it is called only
        for an epoch-based training request under a step bound (it reads the data index, not the videos)."""
        if req.phase not in self.phases:
            return Decision(False, f"phase {req.phase!r} is not allowed (policy phases: {', '.join(self.phases)})")
        if self.models is not None and req.model not in self.models:
            return Decision(False, f"model {req.model!r} is not allowed (policy models: {', '.join(self.models)})")
        if self.tasks is not None:
            extra = [t for t in req.tasks if t not in self.tasks]
            if extra:
                return Decision(
                    False, f"task(s) {', '.join(extra)} not allowed (policy tasks: {', '.join(self.tasks) or 'none'})"
                )
        if req.kind != "train":
            return ALLOW  # evaluation trains nothing: the step bound is for training
        if self.max_local_steps:
            if req.steps:
                planned, how = req.steps, f"steps = {req.steps}"
            elif train_videos is None:
                return Decision(False, "cannot bound an epoch-based round: the site's video count is unknown")
            else:
                n = train_videos()
                planned = req.epochs * math.ceil(n / max(req.batch_size, 1))
                how = f"{req.epochs} epoch(s) x ceil({n} videos / batch {req.batch_size})"
            if planned > self.max_local_steps:
                return Decision(
                    False, f"{planned} local steps per round ({how}) exceed the site's maximum {self.max_local_steps}"
                )
        return ALLOW

    def check_data(self, what: str, groups: Sequence[str | None]) -> Decision:
        """Allowed, or refused when `what` (e.g. "the training set") holds fewer videos than min_videos, or, where
        every video has a patient id (`groups`: one per video, from the data index), fewer patients than
        min_patients. Where some video has no patient id only the videos are counted."""
        n = len(groups)
        if n < self.min_videos:
            return Decision(
                False, f"{what} holds {n} video(s), fewer than the site's minimum of {self.min_videos} (min_videos)"
            )
        if self.min_patients and n and all(g not in (None, "") for g in groups):
            patients = len(set(groups))
            if patients < self.min_patients:
                return Decision(
                    False,
                    f"{what} holds the videos of {patients} patient(s), fewer than the site's minimum of "
                    f"{self.min_patients} (min_patients)",
                )
        return ALLOW


DEFAULT_POLICY = SitePolicy()

# Phantoms for tests and benchmarks hold a handful of videos per virtual site (validation splits of one or two):
# their sites loosen the default minimums explicitly. Never a hospital's policy.
SMALL_PHANTOM_POLICY = SitePolicy(min_videos=1, min_patients=1)


def _names(table: Table, key: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    """A list of names, or None when the field is absent (no restriction)."""
    value = table._get(key, None)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise table.error(key, f"must be a list of names, not {value!r}")
    if allowed is not None:
        bad = [v for v in value if v not in allowed]
        if bad:
            raise table.error(key, f"has unknown value(s) {', '.join(map(repr, bad))} (known: {', '.join(allowed)})")
    return tuple(value)


def parse_policy(raw: dict[str, Any], path: Path) -> SitePolicy:
    """The [policy] table of a site.toml (absent: DEFAULT_POLICY; an absent field: its default above); mistakes
    name the file and the field."""
    if "policy" not in raw:
        return DEFAULT_POLICY
    t = Table(raw, path, "policy")
    policy = SitePolicy(
        phases=PHASES if (phases := _names(t, "phases", PHASES)) is None else phases,
        tasks=_names(t, "tasks"),
        models=_names(t, "models"),
        max_local_steps=t.integer("max_local_steps", DEFAULT_MAX_LOCAL_STEPS, minimum=0),
        min_videos=t.integer("min_videos", DEFAULT_MIN_VIDEOS, minimum=1),
        min_patients=t.integer("min_patients", DEFAULT_MIN_PATIENTS, minimum=0),
    )
    t.finish()
    return policy


def request_from(cfg: FedRunConfig, phase: str, train: bool) -> Request:
    """The Request of a parsed run file (FedRunConfig) for one phase; reads nothing but the message."""
    pcfg = cfg.phase(phase)
    return Request(
        kind="train" if train else "evaluate",
        phase=phase,
        model=cfg.local.model_name,
        tasks=tuple(cfg.phase("finetune").tasks) if phase == "finetune" else (),
        steps=int(pcfg.steps),
        epochs=int(pcfg.epochs),
        batch_size=int(pcfg.batch_size),
    )


__all__ = [
    "DEFAULT_MAX_LOCAL_STEPS",
    "DEFAULT_MIN_PATIENTS",
    "DEFAULT_MIN_VIDEOS",
    "DEFAULT_POLICY",
    "Decision",
    "Request",
    "SitePolicy",
    "parse_policy",
    "request_from",
]
