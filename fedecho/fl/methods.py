"""How a round of real local work per site still trains one model: what the server and the sites share.

Many local steps per round let each site drift towards its own optimum; under label shift (each
hospital its own EF mix) their average drifts too. Three remedies, each a phase option of the run file
(`fedecho.fl.config.FedPhaseSection`) that composes with the strategy, the wire, DP and resume:

- SCAFFOLD (`scaffold = true`, Karimireddy et al. 2020, option II): a site corrects every local step by
  (c - c_i), the server's control variate minus its own, and afterwards sends its update and the change of
  its control variate, c_i+ - c_i = (x - y) / (K lr) - c. The server keeps c (the weighted mean of the
  changes, scaled by the share of sites that replied) in its checkpoint beside the strategy's state. Each
  c_i stays at its site (`SiteCarry`): it is as private as the site's update, it survives a site that
  skips rounds without the server keeping per-site state, and the server never learns more than the
  changes it aggregates. Cost: the control variate travels both ways, so bytes double (counted in
  `bytes_down`/`bytes_up` like the model's).
- An outer optimiser (`outer_lr`, `outer_momentum`, `outer_nesterov`; DiLoCo, Douillard et al. 2023): the
  round's averaged update is a pseudo-gradient, and the server steps the global model along it with
  (Nesterov) momentum (`fedecho.fl.strategies.OuterOptimizer`, a wrapper around any averaging strategy).
  `keep_optimizer = true` lets each site keep its local AdamW moments from round to round (`SiteCarry`).
- Label shift of the heads (`target_stats`, `refit`): sites answer statistics queries (`QUERY_*`).

A site's carried state is saved per round and read back from the newest round before the current one,
so a round the server replays after a crash or a retry starts from exactly the state it started from
the first time: resume stays round-exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedecho.storage.files import atomic_path

CONTROL = "control"  # the record holding SCAFFOLD's control variate: c in a train message, c_i+ - c_i in a reply
CONTROL_PREFIX = "control/"  # the server's c in a checkpoint's strategy state
KEEP_ROUNDS = 3  # rounds of carried state a site keeps per run and phase


def control_keys(model: torch.nn.Module, exchanged: Iterable[str]) -> list[str]:
    """The exchanged tensors SCAFFOLD corrects: the trained parameters (not buffers such as norm statistics)."""
    params = {k for k, p in model.named_parameters()}
    return [k for k in exchanged if k in params]


def scaffold_correct(params: Iterable[tuple[torch.nn.Parameter, torch.Tensor]], lr: float) -> None:
    """After a local optimiser step: p -= lr * (c - c_i) for each (parameter, c - c_i) pair."""
    with torch.no_grad():
        for p, correction in params:
            p.sub_(correction, alpha=lr)


def control_change(
    start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor], steps: int,
    lr: float,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """c_i+ - c_i = (x - y) / (K lr) - c (SCAFFOLD's option II), for the tensors in c."""
    scale = 1.0 / (max(steps, 1) * lr)
    return {k: (start[k] - end[k]) * scale - c[k] for k in c}


class ServerControl:
    """The server's SCAFFOLD control variate c, one tensor per trained parameter, zero at the start."""

    def __init__(self, shapes: Mapping[str, torch.Size]):
        self.c = {k: torch.zeros(s) for k, s in shapes.items()}

    def update(self, changes: list[dict[str, torch.Tensor]], weights: list[float], sites: int) -> None:
        """c += (|S| / N) * weighted mean of the replies' changes (N: the sites the round could have asked)."""
        total = float(sum(weights))
        if not changes or total <= 0:
            return
        share = len(changes) / max(sites, len(changes))
        for k in self.c:
            mean = sum(w * ch[k] for w, ch in zip(weights, changes, strict=True)) / total
            self.c[k] += share * mean

    def state(self) -> dict[str, np.ndarray]:
        return {CONTROL_PREFIX + k: v.numpy().copy() for k, v in self.c.items()}

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        for k in self.c:
            if CONTROL_PREFIX + k in state:
                self.c[k] = torch.from_numpy(np.array(state[CONTROL_PREFIX + k], dtype=np.float32))


def run_key(run_id: Any, run_toml: str) -> str:
    """A site's name for a run's carried state: the server's run id and the run file, so a new run that
    reuses an id (a fresh coordinator store) never inherits another run's state."""
    digest = hashlib.sha256(run_toml.encode()).hexdigest()[:12]
    return f"run-{run_id}-{digest}"


class SiteCarry:
    """What a site carries from one round of a phase to the next (its control variate, its optimiser's
    state), one crash-safe file per round under `folder/<run key>/<phase>/`."""

    def __init__(self, folder: str | Path, key: str, phase: str):
        self.folder = Path(folder) / key / phase

    def _path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:05d}.pt"

    def load(self, server_round: int) -> dict[str, Any]:
        """The state saved after the newest round before `server_round` (empty before the first)."""
        if not self.folder.is_dir():
            return {}
        rounds = sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("round-*.pt"))
        earlier = [r for r in rounds if r < server_round]
        if not earlier:
            return {}
        return dict(torch.load(self._path(earlier[-1]), map_location="cpu", weights_only=True))

    def save(self, server_round: int, state: dict[str, Any]) -> None:
        with atomic_path(self._path(server_round)) as tmp:
            torch.save(state, tmp)
        # Older rounds are no longer needed; later ones are from before a replay of this round, hence stale.
        for p in self.folder.glob("round-*.pt"):
            r = int(p.stem.split("-")[1])
            if r <= server_round - KEEP_ROUNDS or r > server_round:
                p.unlink(missing_ok=True)


__all__ = [
    "CONTROL",
    "CONTROL_PREFIX",
    "ServerControl",
    "SiteCarry",
    "control_change",
    "control_keys",
    "run_key",
    "scaffold_correct",
]
