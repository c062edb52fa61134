"""Federated statistics for the regression heads under label shift: what the sites and the server share.

Each hospital has its own mix of EF (and volumes), so a head trained on one site's labels, or on the average
of such heads, is pulled towards the local means. Two remedies answer statistics queries (Flower's QUERY
messages, config key `QUERY`) instead of training (Fed3R, arXiv 2406.01116; CCVR, arXiv 2106.05001):

- `target-stats` (`[finetune].target_stats`, before the first fine-tuning round): per regression task, each
  site sends the count, sum and sum of squares of its training targets (encoded: EF / 100, log volumes); the
  server pools them into the federation's mean and spread and fixes them in the model's heads
  (`fedecho.models.heads.Heads.set_stats`): the heads learn standardised targets.
- `head-stats` (`[finetune].refit`, after the last round's aggregation or after every round's): each site runs
  the global model over its training videos and sends, per regression head, Phi^T Phi and Phi^T y of the
  features entering the head's last Linear (phi with a 1 appended for the bias; y in the head's standardised
  units) and its count n. The server sums them and solves the ridge regression exactly as it would on the
  pooled features: (sum Phi^T Phi + lambda I, no penalty on the bias) w = sum Phi^T y, with lambda = ridge x
  the mean diagonal of sum Phi^T Phi (n times the features' mean square): `ridge` is relative to the
  features' own scale, so one value suits every model and data size.

Why the features are test-time averaged: `evaluate` averages a video's predictions over its test clips, and
the last layer is linear, so the mean over clips of w.phi_c + b is w.(mean phi_c) + b: fitting the mean
feature fits exactly the prediction evaluation makes (for EF, whose decoding is linear; for the log volumes
up to the exponential's curvature). One random clip per video would fit a noisier prediction than the one
scored, and a fixed first clip would fit a different one.

Every sum is taken around a fixed centre, the task's reference (`Task.reference`), never around a value from
the data: the server knows the centre and adds it back (`combine_targets`, `uncentre_moment`), so the pooled
result is exact, and under differential privacy the clipped, centred values have a small range.

Differential privacy (a site under DP-SGD, by its policy or the run's [dp]): each privacy unit's contribution
is clipped and Gaussian noise of std noise_multiplier x sensitivity is added to every released sum, a single
release of the Gaussian mechanism (sample rate 1, one step in the site's ledger). Clipping: a target to
`CLIP_SPREADS` reference spreads around its centre, a feature vector to L2 norm sqrt(d) (`feature_clip`: every
coordinate's root mean square up to 1, the scale of the LayerNorm and GroupNorm outputs the heads read; larger
vectors are shrunk, so a fit from clipped features is biased where the features are larger than that). With the
patient as the unit, a patient's videos are averaged into one contribution (weights 1 / videos), as DP-SGD
averages a patient's gradients. The count leaves the site exactly, as `num-examples` does with every update.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fedecho.models.heads import get_task

QUERY = "query"  # the config key naming a QUERY message's question
TARGET_STATS = "target-stats"
HEAD_STATS = "head-stats"
QUERIES = (TARGET_STATS, HEAD_STATS)
CLIP_SPREADS = 3.0  # under DP: a target is clipped to this many reference spreads around its reference centre
STD_FLOOR = 1e-3  # the pooled spread is at least this fraction of the reference spread (noisy or constant targets)


def regression_tasks(tasks: Iterable[str]) -> list[str]:
    return [t for t in tasks if get_task(t).kind == "regression"]


def feature_clip(dim: int) -> float:
    """Under DP: the L2 bound on a video's feature vector of `dim` coordinates (root mean square 1 each)."""
    return math.sqrt(dim)


# ------------------------------------------------------------ the reply's arrays (float64, exact sums)


def target_keys(task: str) -> tuple[str, str, str]:
    """Names of a task's count, sum and sum of squares (around the task's reference centre) in a reply."""
    return f"{TARGET_STATS}/{task}/count", f"{TARGET_STATS}/{task}/sum", f"{TARGET_STATS}/{task}/sumsq"


def head_keys(task: str) -> tuple[str, str, str]:
    """Names of a head's count, Phi^T Phi and Phi^T (y - centre) in a reply."""
    return f"{HEAD_STATS}/{task}/count", f"{HEAD_STATS}/{task}/gram", f"{HEAD_STATS}/{task}/moment"


def target_shapes(tasks: Iterable[str]) -> dict[str, tuple[int, ...]]:
    return {k: () for t in regression_tasks(tasks) for k in target_keys(t)}


def head_shapes(dims: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """dims: task -> (features entering its last Linear, outputs)."""
    out: dict[str, tuple[int, ...]] = {}
    for t, (d, outputs) in dims.items():
        count, gram, moment = head_keys(t)
        out.update({count: (), gram: (d + 1, d + 1), moment: (d + 1, outputs)})
    return out


# ------------------------------------------------------------ sums at a site


def target_sums(centred: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
    """(sum w, sum w d, sum w d^2) of centred targets d with per-video weights w (1, or 1 / the patient's videos)."""
    d = np.asarray(centred, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum()), float((w * d).sum()), float((w * d * d).sum())


def head_sums(features: np.ndarray, centred: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(sum w, X^T W X, X^T W u) with X the features with a 1 appended (n, d + 1), u the centred targets (n, k)."""
    x = np.asarray(features, dtype=np.float64)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    u = np.asarray(centred, dtype=np.float64).reshape(len(x), -1)
    w = np.asarray(weights, dtype=np.float64)[:, None]
    gram = x.T @ (w * x)
    return float(w.sum()), (gram + gram.T) / 2, x.T @ (w * u)  # exactly symmetric


def clip_rows(x: np.ndarray, bound: float) -> np.ndarray:
    """Each row scaled down to L2 norm `bound` where it is longer."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, bound / np.maximum(norms, 1e-12))


def target_sensitivity(bounds: Sequence[float]) -> float:
    """L2 sensitivity of (sum d, sum d^2) over tasks when every |d| <= its bound (one unit added or removed)."""
    return math.sqrt(sum(b * b + b**4 for b in bounds))


def head_sensitivity(terms: Sequence[tuple[float, float]]) -> float:
    """L2 sensitivity of (Phi^T Phi, Phi^T u) over heads, each (feature bound C, target bound b): one unit adds
    a a^T (Frobenius norm |a|^2 <= C^2 + 1) and a u (norm <= sqrt(C^2 + 1) b) per head."""
    return math.sqrt(sum((c * c + 1) ** 2 + (c * c + 1) * b * b for c, b in terms))


def gaussian_noise(arrays: dict[str, np.ndarray], keys: Iterable[str], std: float) -> None:
    """Add N(0, std^2) to every entry of the named arrays, in place, from the operating system's entropy (the
    server knows the run's seeds); a square matrix gets one draw per upper-triangle entry, mirrored, so it stays
    symmetric (its upper triangle is what is released)."""
    rng = np.random.default_rng(secrets.randbits(128))
    for k in keys:
        a = arrays[k]
        if a.ndim == 2 and a.shape[0] == a.shape[1]:
            noise = np.triu(rng.normal(0.0, std, a.shape))
            arrays[k] = a + noise + np.triu(noise, 1).T
        else:
            arrays[k] = a + rng.normal(0.0, std, a.shape)


# ------------------------------------------------------------ pooling at the server


def combine_targets(
    replies: Sequence[Mapping[str, np.ndarray]], tasks: Iterable[str]
) -> dict[str, tuple[float, float]]:
    """Task -> (mean, spread) of the encoded targets over every reply's sums (population spread, at least
    STD_FLOOR reference spreads). Raises ValueError when a task has no targets."""
    out: dict[str, tuple[float, float]] = {}
    for t in regression_tasks(tasks):
        centre, spread = get_task(t).reference()
        n, s1, s2 = (sum(float(r[k]) for r in replies) for k in target_keys(t))
        if not n > 0:
            raise ValueError(f"no training targets for {t}")
        m = s1 / n
        var = s2 / n - m * m
        out[t] = centre + m, math.sqrt(max(var, (STD_FLOOR * spread) ** 2))
    return out


def target_centre(task: str, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The task's reference centre in a head's standardised units (what a site subtracts from u)."""
    return (get_task(task).reference()[0] - shift) / scale


def uncentre_moment(gram: np.ndarray, moment: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Phi^T u from Phi^T (u - centre): the bias column of Phi^T Phi is Phi^T 1."""
    return moment + gram[:, -1:] * np.asarray(centre, dtype=np.float64).reshape(1, -1)


def ridge_solve(gram: np.ndarray, moment: np.ndarray, count: float, ridge: float) -> np.ndarray:
    """w (d + 1, k) solving (gram + lambda I) w = moment, the identity's last entry (the bias) 0, lambda = ridge x
    the mean of gram's diagonal over the features (`count` units' mean square feature). Raises ValueError when
    the system is singular or the solution not finite."""
    del count  # the diagonal already sums over the units
    energy = float(np.mean(np.diag(gram)[:-1])) if gram.shape[0] > 1 else 0.0
    penalty = np.full(gram.shape[0], ridge * max(energy, 1e-12))
    penalty[-1] = 0.0
    try:
        w = np.linalg.solve(gram + np.diag(penalty), moment)
    except np.linalg.LinAlgError as e:
        raise ValueError(f"the pooled normal equations are singular ({e})") from e
    if not np.isfinite(w).all():
        raise ValueError("the ridge solution is not finite")
    return w


__all__ = [
    "CLIP_SPREADS",
    "HEAD_STATS",
    "QUERIES",
    "QUERY",
    "STD_FLOOR",
    "TARGET_STATS",
    "clip_rows",
    "combine_targets",
    "feature_clip",
    "gaussian_noise",
    "head_keys",
    "head_sensitivity",
    "head_shapes",
    "head_sums",
    "regression_tasks",
    "ridge_solve",
    "target_centre",
    "target_keys",
    "target_sensitivity",
    "target_shapes",
    "target_sums",
    "uncentre_moment",
]
