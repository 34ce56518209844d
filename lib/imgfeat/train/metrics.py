"""Held-out metrics from predictions (scikit-learn), class weights, and the plots logged with them.

``classification_metrics(y_true, y_pred, proba, labels)`` returns the MLflow metric names directly
(``test_accuracy``, ``test_f1_macro``, ``test_precision_<class>``, ...). Undefined values (a class absent from
the test set, a single-class AUC) are NaN or 0 exactly as scikit-learn's ``zero_division=0`` defines them.
``evaluate`` adds the bootstrap intervals; ``train``'s child runs and ``finetune`` both report through it.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from imgfeat.config.schema import ValidityConfig


def metric_key(label: str) -> str:
    """A class name usable in an MLflow metric name (letters, digits, _ - . / and space are allowed)."""
    return re.sub(r"[^\w\-./ ]", "_", str(label))


def finding_key(name: str) -> str:
    """A finding's name in metric names: ``metric_key`` with spaces as underscores ("Pleural Effusion" ->
    "Pleural_Effusion")."""
    return metric_key(name).replace(" ", "_")


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present (scikit-learn would raise)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, score))


def scores_to_proba(scores: np.ndarray) -> np.ndarray:
    """Margins (LinearSVC, GBT one-vs-rest) -> rows that sum to 1 (softmax), for AUC and log loss."""
    from scipy.special import softmax

    return softmax(np.asarray(scores, dtype=np.float64), axis=1)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None, labels: list[str]
) -> tuple[dict[str, float], dict[str, Any]]:
    """(MLflow metrics, classification report) for class indices ``y_true``/``y_pred`` (0..k-1)."""
    from sklearn import metrics as skm

    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    k, n = len(labels), len(y_true)
    classes = list(range(k))
    cm = skm.confusion_matrix(y_true, y_pred, labels=classes)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    accuracy = float(skm.accuracy_score(y_true, y_pred)) if n else float("nan")
    agreement_by_chance = float((cm.sum(axis=1) * cm.sum(axis=0)).sum() / (n * n)) if n else 1.0
    kappa = float(skm.cohen_kappa_score(y_true, y_pred, labels=classes)) if agreement_by_chance < 1 else 0.0
    metrics: dict[str, float] = {
        "test_accuracy": accuracy,
        "test_f1_macro": float(f1.mean()),
        "test_f1_weighted": float(skm.f1_score(y_true, y_pred, labels=classes, average="weighted", zero_division=0)),
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
        else:  # one-vs-rest macro; NaN when a class is missing from the test set
            metrics["test_roc_auc"] = float(np.mean([binary_auc(y_true == c, proba[:, c]) for c in classes]))
        metrics["test_log_loss"] = float(skm.log_loss(y_true, proba, labels=classes))
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


def class_weights(counts: Mapping[str, int], labels: list[str]) -> list[float]:
    """Per label (in ``labels`` order): n / (classes x the label's count), n the rows of all ``counts``; weights
    that balance the classes' share of the loss (a label without rows counts as one row)."""
    total = sum(counts.values())
    return [total / (len(labels) * max(1, counts.get(label, 0))) for label in labels]


def evaluate(y: np.ndarray, p: np.ndarray, proba: np.ndarray | None, labels: list[str], units: np.ndarray,
             validity: ValidityConfig, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    """(MLflow metrics, classification report) on the test predictions: ``classification_metrics`` and, with
    ``validity.bootstrap_resamples``, their bootstrap intervals (resampling ``units``: a group's images together)."""
    from imgfeat.train.uncertainty import bootstrap_intervals

    metrics, report = classification_metrics(y, p, proba, labels)
    if validity.bootstrap_resamples and len(y):
        metrics.update(bootstrap_intervals(y, p, proba, labels, units, validity.bootstrap_resamples,
                                           validity.confidence, seed, metric_key=metric_key))
    return metrics, report


def defined(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` without the NaN values (undefined: MLflow would chart them as gaps or refuse them)."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, numbers.Real) and math.isnan(v))}


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
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(y, proba[:, c])
        ax.plot(fpr, tpr, label=f"{labels[c]} (AUC {binary_auc(y, proba[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
