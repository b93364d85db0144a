"""Quality and fairness figures in numpy, so the gateway needs no scikit-learn (tests check them against it).

Every figure takes optional per-request weights (the feedback's `weight`); fairness rates count
requests, since their Wilson intervals are about counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ECE_BINS = 10
Z_95 = 1.959963984540054


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def auroc(positive: np.ndarray, score: np.ndarray, weight: np.ndarray) -> float:
    """Area under the ROC curve: trapezoids over the distinct scores, ties counted half (as sklearn)."""
    order = np.argsort(-score, kind="mergesort")
    score, positive, weight = score[order], positive[order], weight[order]
    distinct = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]
    tps = np.cumsum(weight * positive)[distinct]
    fps = np.cumsum(weight * ~positive)[distinct]
    if tps[-1] <= 0 or fps[-1] <= 0:
        return math.nan  # one class only: undefined
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


@dataclass(frozen=True)
class CalibrationBin:
    low: float
    high: float
    n: int
    mean_score: float
    positive_rate: float


def calibration(positive: np.ndarray, score: np.ndarray, weight: np.ndarray) -> tuple[float, list[CalibrationBin]]:
    """Expected calibration error over ten equal-width score bins (the bins of sklearn's
    `calibration_curve(strategy="uniform")`): the weighted mean |positive rate - mean score| per bin."""
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    ids = np.searchsorted(edges[1:-1], score)
    total = np.bincount(ids, weights=weight, minlength=ECE_BINS)
    scores = np.bincount(ids, weights=weight * score, minlength=ECE_BINS)
    hits = np.bincount(ids, weights=weight * positive, minlength=ECE_BINS)
    counts = np.bincount(ids, minlength=ECE_BINS)
    filled = total > 0
    gap = np.abs(hits[filled] / total[filled] - scores[filled] / total[filled])
    ece = float(np.sum(total[filled] * gap) / total.sum()) if total.sum() > 0 else math.nan
    bins = [
        CalibrationBin(float(edges[b]), float(edges[b + 1]), int(counts[b]), scores[b] / total[b], hits[b] / total[b])
        for b in range(ECE_BINS)
        if filled[b]
    ]
    return ece, bins


def classification(
    truth: np.ndarray,
    predicted: np.ndarray,
    weight: np.ndarray,
    positive_label: int,
    probabilities: np.ndarray | None,
) -> tuple[dict[str, float], list[CalibrationBin]]:
    """Accuracy; precision, recall (= TPR) and FPR of `positive_label`; with probabilities ([N, classes],
    column = class), log loss, AUROC and ECE of the positive class too."""
    w = weight.astype(np.float64)
    is_pos, said_pos = truth == positive_label, predicted == positive_label
    tp, fp = float(w[is_pos & said_pos].sum()), float(w[~is_pos & said_pos].sum())
    metrics = {
        "accuracy": _ratio(float(w[truth == predicted].sum()), float(w.sum())),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, float(w[is_pos].sum())),
        "tpr": _ratio(tp, float(w[is_pos].sum())),
        "fpr": _ratio(fp, float(w[~is_pos].sum())),
    }
    bins: list[CalibrationBin] = []
    classes = probabilities.shape[1] if probabilities is not None and probabilities.ndim == 2 else 0
    if probabilities is not None and classes > max(positive_label, int(truth.max(initial=0))):
        p = probabilities.astype(np.float64)
        eps = float(np.finfo(probabilities.dtype).eps)  # as sklearn: clip to the probabilities' own precision
        p = np.clip(p, eps, 1 - eps)
        p /= p.sum(axis=1, keepdims=True)
        chosen = p[np.arange(truth.size), truth.astype(np.int64)]
        metrics["log_loss"] = float(-(w * np.log(chosen)).sum() / w.sum())
        score = probabilities[:, positive_label].astype(np.float64)
        metrics["auroc"] = auroc(is_pos, score, w)
        metrics["ece"], bins = calibration(is_pos, score, w)
    return metrics, bins


def regression(truth: np.ndarray, predicted: np.ndarray, weight: np.ndarray) -> dict[str, float]:
    error = predicted.astype(np.float64) - truth
    total = float(weight.sum())
    return {
        "mae": _ratio(float((weight * np.abs(error)).sum()), total),
        "rmse": math.sqrt(_ratio(float((weight * error**2).sum()), total)),
    }


@dataclass(frozen=True)
class Rate:
    """A proportion with its 95% Wilson score interval (NaN when nothing was counted)."""

    value: float
    low: float
    high: float

    @classmethod
    def wilson(cls, hits: int, n: int) -> Rate:
        if n == 0:
            return cls(math.nan, math.nan, math.nan)
        p = hits / n
        z2 = Z_95 * Z_95
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return cls(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))  # rounding keeps p inside
