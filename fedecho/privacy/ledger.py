"""The site's privacy ledger: every DP-SGD round this site ever trained, in its own database (site.db).

One row per round of DP-SGD: run, phase, round, noise multiplier, sample rate, steps, and a status,
`reserved` or `spent`. The site's epsilon at its delta is computed from *all* rows with Opacus' RDP
accountant (the history of (noise, sample rate, steps) triples), so it composes across rounds, runs
and restarts of the site's processes.

Reserve before spend: before a round trains, `reserve` computes the epsilon the site would have if
the round's planned steps were added; above epsilon_max it refuses (nothing is written, no data is
trained on); else it commits a `reserved` row in the same write transaction (SQLite's write lock taken
up front, so two processes cannot both squeeze under the cap). Only then does training start, and
`spend` marks the row `spent` afterwards. A crash in between leaves the reservation, which counts:
the ledger can overstate what was spent, never understate it, and never exceeds epsilon_max.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from opacus.accountants import RDPAccountant
from sqlalchemy import Double, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from fedecho.privacy.dp_policy import PrivacyRefused
from fedecho.storage.site_store import SiteBase, SiteTables

LEDGER_STATUSES = ("reserved", "spent")

Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class _LedgerRow(SiteBase):
    __tablename__ = "privacy_ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run: Mapped[str] = mapped_column(String(200))
    phase: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    noise_multiplier: Mapped[float] = mapped_column(Double)
    sample_rate: Mapped[float] = mapped_column(Double)
    steps: Mapped[int] = mapped_column(Integer)
    unit: Mapped[str] = mapped_column(String(16), default="video")
    status: Mapped[str] = mapped_column(String(16))
    created: Mapped[float] = mapped_column(Double)
    updated: Mapped[float] = mapped_column(Double)


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    run: str
    phase: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    unit: str
    status: str
    created: float
    updated: float

    @property
    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _entry(r: _LedgerRow) -> LedgerEntry:
    return LedgerEntry(
        r.id, r.run, r.phase, r.round, r.noise_multiplier, r.sample_rate, r.steps, r.unit, r.status, r.created,
        r.updated,
    )  # fmt: skip


def epsilon_of(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """Epsilon at delta of a sequence of subsampled Gaussian mechanisms, composed by Opacus' RDP accountant."""
    accountant = RDPAccountant()
    accountant.history = [(float(n), float(q), int(s)) for n, q, s in mechanisms if s > 0]
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


class PrivacyLedger(SiteTables):
    """The ledger in a site's state folder (STATE/site.db, shared with the site's other tables)."""

    def entries(self) -> list[LedgerEntry]:
        with self.store.read() as s:
            return [_entry(r) for r in s.scalars(select(_LedgerRow).order_by(_LedgerRow.id))]

    def epsilon(self, delta: float, planned: Iterable[Mechanism] = ()) -> float:
        """Epsilon spent so far (reservations included), plus `planned` when given."""
        return epsilon_of([*(e.mechanism for e in self.entries()), *planned], delta)

    def per_patient(self) -> bool:
        """Whether the site's epsilon holds per patient: every DP round in the ledger had the patient as its unit
        (one round per video makes the total a per-video bound only: a patient's k videos weaken it k-fold)."""
        entries = self.entries()
        return bool(entries) and all(e.unit == "patient" for e in entries)

    def reserve(
        self,
        *,
        run: str,
        phase: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        epsilon_max: float,
        unit: str = "video",
    ) -> tuple[int, float]:
        """Record a round's privacy cost before it trains; returns (entry id, epsilon with it).

        Raises PrivacyRefused, writing nothing, when the round would take the site above epsilon_max
        (0: no cap)."""
        planned = (noise_multiplier, sample_rate, steps)
        with self.store.write() as s:  # the write lock is held from the read to the insert
            rows = s.scalars(select(_LedgerRow)).all()
            before = epsilon_of((_entry(r).mechanism for r in rows), delta)
            after = epsilon_of([*(_entry(r).mechanism for r in rows), planned], delta)
            if epsilon_max > 0 and after > epsilon_max:
                raise PrivacyRefused(
                    f"privacy budget: this round ({steps} DP-SGD steps, noise multiplier {noise_multiplier:g}, "
                    f"sample rate {sample_rate:.3g}) would take the site's epsilon from {before:.3f} to "
                    f"{after:.3f} at delta {delta:g}, above its epsilon_max {epsilon_max:g}"
                )
            now = time.time()
            row = _LedgerRow(
                run=run, phase=phase, round=round, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                steps=steps, unit=unit, status="reserved", created=now, updated=now,
            )  # fmt: skip
            s.add(row)
            s.flush()
            return row.id, after

    def spend(self, entry_id: int) -> None:
        """The reserved round has trained: mark its row spent (its cost was counted from the reservation on)."""
        with self.store.write() as s:
            row = s.get(_LedgerRow, entry_id)
            if row is None:
                raise KeyError(f"no privacy ledger entry {entry_id}")
            row.status, row.updated = "spent", time.time()


__all__ = ["LEDGER_STATUSES", "LedgerEntry", "PrivacyLedger", "epsilon_of"]
