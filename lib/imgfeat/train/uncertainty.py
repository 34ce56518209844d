"""How sure a test result is: bootstrap intervals, calibration, the operating point at a target sensitivity,
and a paired test between two models on the same test images (NumPy/SciPy on the collected test predictions).

Bootstrap: the test images (or their groups: a patient's images move together) are resampled with replacement,
seeded; each resample is a vector of weights over the test images, so every metric is computed for all
resamples at once from weighted confusion matrices and weighted rank statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Metrics with an interval. AUC and log loss need probabilities; per-class metrics get one per class.
BASE_METRICS = ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "kappa")


def resample_weights(units: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) counts: how often each test image is drawn when its unit (group) is drawn."""
    uniq, inverse = np.unique(units, return_inverse=True)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(uniq), size=(resamples, len(uniq)))
    counts = np.zeros((resamples, len(uniq)))
    np.add.at(counts, (np.arange(resamples)[:, None], drawn), 1)
    return counts[:, inverse]


def _weighted_cm(y: np.ndarray, p: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """(B, k, k) confusion matrices, rows true, columns predicted."""
    cells = y * k + p
    out = np.zeros((w.shape[0], k * k))
    for c in range(k * k):
        out[:, c] = w[:, cells == c].sum(axis=1)
    return out.reshape(-1, k, k)


def _cm_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """The logged metrics from (B, k, k) confusion matrices (zero_division=0, as scikit-learn)."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted, n = cm.sum(axis=2), cm.sum(axis=1), cm.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.where(support > 0, support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.where(precision + recall > 0, precision + recall, 1), 0.0)
        accuracy = tp.sum(axis=1) / n
        chance = (support * predicted).sum(axis=1) / (n * n)
        kappa = np.where(chance < 1, (accuracy - chance) / np.where(chance < 1, 1 - chance, 1), 0.0)
        weighted = (f1 * support).sum(axis=1) / support.sum(axis=1)
    out = {"accuracy": accuracy, "f1_macro": f1.mean(axis=1), "f1_weighted": weighted,
           "precision_macro": precision.mean(axis=1), "recall_macro": recall.mean(axis=1), "kappa": kappa}
    for c in range(cm.shape[1]):
        out[f"precision_{c}"], out[f"recall_{c}"], out[f"f1_{c}"] = precision[:, c], recall[:, c], f1[:, c]
    return out


def _weighted_auc(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B,) AUC with weights (Mann-Whitney; ties count half); NaN where a resample lacks a class."""
    order = np.argsort(score, kind="mergesort")
    s, pos, ww = score[order], positive[order], w[:, order]
    _, start = np.unique(s, return_index=True)
    bounds = np.r_[start, len(s)]
    wpos, wneg = ww * pos, ww * ~pos
    auc_num = np.zeros(w.shape[0])
    neg_below = np.zeros(w.shape[0])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):  # each distinct score: negatives strictly below, and ties
        p_here, n_here = wpos[:, a:b].sum(axis=1), wneg[:, a:b].sum(axis=1)
        auc_num += p_here * (neg_below + 0.5 * n_here)
        neg_below += n_here
    total_pos, total_neg = wpos.sum(axis=1), wneg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((total_pos > 0) & (total_neg > 0), auc_num / (total_pos * total_neg), np.nan)


def bootstrap_intervals(y: np.ndarray, p: np.ndarray, proba: np.ndarray | None, labels: list[str],
                        units: np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 42,
                        metric_key: Any = str) -> dict[str, float]:
    """``test_<metric>_ci_low`` / ``_ci_high`` for every logged test metric (percentile intervals)."""
    y, p = np.asarray(y).astype(int), np.asarray(p).astype(int)
    k = len(labels)
    w = resample_weights(np.asarray(units), resamples, seed)
    values = _cm_metrics(_weighted_cm(y, p, w, k))
    named: dict[str, np.ndarray] = {m: values[m] for m in BASE_METRICS}
    for c, label in enumerate(labels):
        key = metric_key(label)
        for kind in ("precision", "recall", "f1"):
            named[f"{kind}_{key}"] = values[f"{kind}_{c}"]
    if proba is not None:
        proba = np.asarray(proba, dtype=np.float64)
        proba = proba / proba.sum(axis=1, keepdims=True)
        if k == 2:
            named["roc_auc"] = _weighted_auc(y == 1, proba[:, 1], w)
        else:
            with np.errstate(invalid="ignore"):
                named["roc_auc"] = np.nanmean(np.stack([_weighted_auc(y == c, proba[:, c], w) for c in range(k)]), axis=0)
        losses = -np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0))
        named["log_loss"] = (w @ losses) / w.sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    out = {}
    for name, v in named.items():
        v = v[np.isfinite(v)]
        if len(v):
            out[f"test_{name}_ci_low"], out[f"test_{name}_ci_high"] = (float(x) for x in np.percentile(v, [tail, 100 - tail]))
    return out


def calibration(y: np.ndarray, proba: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of the top-label confidence, and the reliability diagram's bins."""
    proba = np.asarray(proba, dtype=np.float64)
    proba = proba / proba.sum(axis=1, keepdims=True)
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(y)).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            ece += mask.mean() * abs(acc - conf)
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(mask.sum()),
                         "accuracy": acc, "confidence": conf})
    return {"ece": float(ece), "bins": rows}


def operating_point(y: np.ndarray, score: np.ndarray, target_sensitivity: float) -> dict[str, float]:
    """Binary: the highest threshold on the positive class's score whose sensitivity reaches the target."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return {}
    thresholds = np.unique(score)[::-1]
    for t in thresholds:
        predicted = score >= t
        sensitivity = float((predicted & y).sum() / y.sum())
        if sensitivity >= target_sensitivity:
            specificity = float((~predicted & ~y).sum() / (~y).sum())
            return {"threshold": float(t), "sensitivity": sensitivity, "specificity": specificity}
    return {}


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test on paired correctness (same test images): p-value of 'A and B are equally accurate'."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a).astype(bool), np.asarray(correct_b).astype(bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p}


def plot_reliability(cal: dict[str, Any], title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for row in cal["bins"]:
        ax.bar((row["low"] + row["high"]) / 2, row["accuracy"], width=row["high"] - row["low"], alpha=0.6,
               edgecolor="black", color="tab:blue")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {cal['ece']:.3f}", fontsize=9)
    fig.tight_layout()
    return fig
