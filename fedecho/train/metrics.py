"""Metrics on a full evaluation set: MAE, RMSE, R2; accuracy, F1, AUROC (numpy only)."""

from __future__ import annotations

import numpy as np


def regression(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    err = pred - y
    ss_res = float(np.sum(err**2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U form of the ROC area; NaN when only one class is present."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(np.asarray(score, np.float64))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _f1(y: np.ndarray, pred: np.ndarray, positive: int) -> float:
    tp = float(np.sum((pred == positive) & (y == positive)))
    fp = float(np.sum((pred == positive) & (y != positive)))
    fn = float(np.sum((pred != positive) & (y == positive)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0


def binary(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    y = np.asarray(y).astype(int)
    pred = (np.asarray(prob) >= threshold).astype(int)
    return {"accuracy": float(np.mean(pred == y)), "f1": _f1(y, pred, 1), "auroc": auroc(y, prob)}


def multiclass(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1 and macro one-vs-rest AUROC over the classes present in y."""
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, np.float64)
    pred = probs.argmax(axis=1)
    present = np.unique(y)
    aucs = [auroc(y == c, probs[:, c]) for c in present]
    aucs = [a for a in aucs if not np.isnan(a)]
    return {
        "accuracy": float(np.mean(pred == y)),
        "f1": float(np.mean([_f1(y, pred, int(c)) for c in present])),
        "auroc": float(np.mean(aucs)) if aucs else float("nan"),
    }


def reduced_ef_auroc(ef: np.ndarray, pred: np.ndarray, threshold: float = 50.0) -> float:
    """AUROC of the EF estimate as a test for reduced EF (EF < threshold, heart failure with reduced EF): the
    clinical question behind EF regression, scored whether or not the model has an EF-class head."""
    return auroc(np.asarray(ef) < threshold, -np.asarray(pred, np.float64))


def task_metrics(kind: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    if kind == "regression":
        return regression(y, pred)
    if kind == "binary":
        return binary(y, pred)
    return multiclass(y, pred)
