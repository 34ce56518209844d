"""Held-out metrics from predictions (NumPy only), and the plots logged with them.

``classification_metrics(y_true, y_pred, proba, labels)`` returns the MLflow metric names directly
(``test_accuracy``, ``test_f1_macro``, ``test_precision_<class>``, ...). The tests check every value
against scikit-learn on the same predictions.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np


def metric_key(label: str) -> str:
    """A class name usable in an MLflow metric name (letters, digits, _ - . / and space are allowed)."""
    return re.sub(r"[^\w\-./ ]", "_", str(label))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true.astype(int), y_pred.astype(int)), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN when only one class is present."""
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct threshold."""
    y = y.astype(bool)
    order = np.argsort(-score, kind="mergesort")
    s, yy = score[order], y[order]
    distinct = np.r_[np.where(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(yy)[distinct]
    fps = (1 + distinct) - tps
    tpr = np.r_[0.0, tps / max(1, yy.sum())]
    fpr = np.r_[0.0, fps / max(1, (~yy).sum())]
    return fpr, tpr


def scores_to_proba(scores: np.ndarray) -> np.ndarray:
    """Margins (LinearSVC, GBT one-vs-rest) -> rows that sum to 1 (softmax), for AUC and log loss."""
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None, labels: list[str]
) -> tuple[dict[str, float], dict[str, Any]]:
    """(MLflow metrics, classification report) for class indices ``y_true``/``y_pred`` (0..k-1)."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    k, n = len(labels), len(y_true)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    accuracy = float(tp.sum() / n) if n else float("nan")
    expected = float((support * predicted).sum() / (n * n)) if n else 0.0
    kappa = float((accuracy - expected) / (1 - expected)) if expected < 1 else 0.0
    metrics: dict[str, float] = {
        "test_accuracy": accuracy,
        "test_f1_macro": float(f1.mean()),
        "test_f1_weighted": float((f1 * support).sum() / support.sum()) if n else float("nan"),
        "test_precision_macro": float(precision.mean()),
        "test_recall_macro": float(recall.mean()),
        "test_kappa": kappa,
    }
    for i, label in enumerate(labels):
        key = metric_key(label)
        metrics[f"test_precision_{key}"] = float(precision[i])
        metrics[f"test_recall_{key}"] = float(recall[i])
        metrics[f"test_f1_{key}"] = float(f1[i])
    if proba is not None:
        proba = np.asarray(proba, dtype=np.float64)
        proba = proba / proba.sum(axis=1, keepdims=True)
        if k == 2:
            metrics["test_roc_auc"] = binary_auc(y_true == 1, proba[:, 1])
        else:
            aucs = [binary_auc(y_true == c, proba[:, c]) for c in range(k)]
            metrics["test_roc_auc"] = float(np.mean(aucs))  # NaN when a class is missing from the test set
        eps = np.finfo(np.float64).eps
        clipped = np.clip(proba[np.arange(n), y_true], eps, 1 - eps)
        metrics["test_log_loss"] = float(-np.log(clipped).mean())
    report = {
        "labels": list(labels),
        "confusion_matrix": cm.tolist(),
        "accuracy": accuracy,
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "macro_avg": {"precision": metrics["test_precision_macro"], "recall": metrics["test_recall_macro"], "f1": metrics["test_f1_macro"]},
        "weighted_f1": metrics["test_f1_weighted"],
        "kappa": kappa,
        "roc_auc": metrics.get("test_roc_auc"),
        "log_loss": metrics.get("test_log_loss"),
        "n": n,
    }
    return metrics, report


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], title: str) -> Any:
    """A matplotlib Figure with counts in every cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    return fig


def plot_roc(y_true: np.ndarray, proba: np.ndarray, labels: list[str], title: str) -> Any:
    """ROC curve(s): the positive class for 2 classes, one-vs-rest per class otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    classes = [1] if len(labels) == 2 else range(len(labels))
    for c in classes:
        y = np.asarray(y_true) == c
        if y.all() or not y.any():
            continue
        fpr, tpr = roc_curve(y, proba[:, c])
        ax.plot(fpr, tpr, label=f"{labels[c]} (AUC {binary_auc(y, proba[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
