"""Multi-label results per finding: targets with a mask, thresholds, and metrics with grouped bootstrap intervals.

A multi-label task has ``k`` findings (Atelectasis, Cardiomegaly, ...). Each image has, per finding, a target 0/1
and a mask: False where the finding is unknown for that image (CheXpert's blank, or -1 under the ``ignore``
policy), so that the image counts for neither the loss nor the metrics of that finding. Results follow CheXNet and
the CheXpert paper: per finding AUC, average precision, sensitivity and specificity at a threshold chosen on the
validation split, prevalence, each with a 95 % percentile interval from a bootstrap over patients (a patient's
images move together), plus the macro mean AUC (over findings with both classes) and the micro AUC (all unmasked
image x finding pairs pooled). A finding with no positive (or no negative) test example is reported as such,
never as an AUC of NaN hidden in a mean. NumPy only: the collected test predictions, no Spark.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from imgfeat.scoring.aggregate import AGGREGATIONS, aggregate  # noqa: F401 (moved to scoring; re-exported)
from imgfeat.train.uncertainty import resample_weights

THRESHOLD_METHODS = ("youden", "sensitivity")


@dataclass(frozen=True)
class Targets:
    """``y`` (n, k) 0/1 and ``mask`` (n, k) bool (True = known) for the findings ``names``."""

    names: tuple[str, ...]
    y: np.ndarray
    mask: np.ndarray

    def one_class(self) -> list[str]:
        """The findings whose known rows hold one class only (or none): nothing to learn from them."""
        out = []
        for j, name in enumerate(self.names):
            known = self.y[self.mask[:, j], j] > 0.5
            if known.all() or not known.any():
                out.append(name)
        return out

    @classmethod
    def from_rows(cls, names: list[str], positives: list[list[str] | None], masked: list[list[str] | None]) -> Targets:
        """From per-image lists: the positive findings (``labels``) and the unknown ones (``label_mask``)."""
        index = {n: j for j, n in enumerate(names)}
        y = np.zeros((len(positives), len(names)))
        mask = np.ones((len(positives), len(names)), dtype=bool)
        for i, (pos, unknown) in enumerate(zip(positives, masked, strict=True)):
            for name in pos or ():
                y[i, index[name]] = 1.0
            for name in unknown or ():
                mask[i, index[name]] = False
        return cls(tuple(names), y, mask)


def _weighted_rates(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per distinct score, descending: (B, t) cumulative weighted positives and negatives at or above it."""
    order = np.argsort(-score, kind="mergesort")
    s, pos, ww = score[order], positive[order], w[:, order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each run of equal scores
    tp = np.cumsum(ww * pos, axis=1)[:, last]
    fp = np.cumsum(ww * ~pos, axis=1)[:, last]
    return tp, fp, s[last]


def weighted_auc_ap(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B,) ROC AUC (ties count half) and average precision (scikit-learn's step definition) for weights (B, n);
    NaN where a resample has no positive (AP, AUC) or no negative (AUC)."""
    tp, fp, _ = _weighted_rates(positive, score, w)
    total_p, total_n = tp[:, -1], fp[:, -1]
    tp0 = np.concatenate([np.zeros((tp.shape[0], 1)), tp], axis=1)
    fp0 = np.concatenate([np.zeros((fp.shape[0], 1)), fp], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (np.diff(fp0, axis=1) * (tp0[:, 1:] + tp0[:, :-1]) / 2).sum(axis=1) / (total_p * total_n)
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
        ap = (np.diff(tp0, axis=1) * precision).sum(axis=1) / total_p
    auc = np.where((total_p > 0) & (total_n > 0), auc, np.nan)
    return auc, np.where(total_p > 0, ap, np.nan)


def choose_threshold(positive: np.ndarray, score: np.ndarray, method: str = "youden", target: float = 0.95) -> float:
    """The decision threshold for one finding on validation predictions: ``youden`` maximises sensitivity +
    specificity - 1; ``sensitivity`` is the highest threshold reaching ``target`` sensitivity. 0.5 without both
    classes (nothing to choose from)."""
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method {method!r}: use one of {', '.join(THRESHOLD_METHODS)}")
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return 0.5
    tp, fp, thresholds = _weighted_rates(positive, np.asarray(score, dtype=float), np.ones((1, len(score))))
    sensitivity, fpr = tp[0] / positive.sum(), fp[0] / (~positive).sum()
    if method == "youden":
        return float(thresholds[int(np.argmax(sensitivity - fpr))])
    return float(thresholds[int(np.argmax(sensitivity >= target - 1e-12))])


def _at_threshold(positive: np.ndarray, score: np.ndarray, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    called = score >= threshold
    tp, fn = (w * (positive & called)).sum(axis=1), (w * (positive & ~called)).sum(axis=1)
    tn, fp = (w * (~positive & ~called)).sum(axis=1), (w * (~positive & called)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"sensitivity": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
                "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
                "prevalence": (tp + fn) / (tp + fn + tn + fp)}


@dataclass
class FindingResult:
    name: str
    positives: int  # known positive test images (or studies)
    negatives: int
    masked: int  # test images whose target is unknown for this finding: in neither count nor any metric
    threshold: float
    # ok | no positive test example | no negative test example | no known test example | one class in training
    status: str = "ok"
    metrics: dict[str, float | None] = field(default_factory=dict)  # auc, ap, sensitivity, specificity, prevalence
    intervals: dict[str, list[float | None]] = field(default_factory=dict)  # metric -> [low, high]


@dataclass
class FindingsReport:
    findings: list[FindingResult]
    macro_auc: float | None
    micro_auc: float | None
    intervals: dict[str, list[float | None]]  # macro_auc, micro_auc
    confidence: float
    resamples: int
    level: str = "image"  # image | study | series | patient | volume

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentiles(values: np.ndarray, confidence: float) -> list[float | None]:
    finite = values[np.isfinite(values)]
    if finite.size < 2:
        return [None, None]
    tail = 100 * (1 - confidence) / 2
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]


def _value(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


ONE_CLASS_IN_TRAINING = "one class in training"  # nothing was learned: the head scores its training rate


def _untrained(result: FindingResult) -> FindingResult:
    """``result`` of a finding that training saw with one class: its test counts and prevalence, no score metric
    (a constant score's AUC of 0.5 would pass for a measurement)."""
    keep = {"prevalence"}
    return FindingResult(result.name, result.positives, result.negatives, result.masked, result.threshold,
                         ONE_CLASS_IN_TRAINING, {k: (v if k in keep else None) for k, v in result.metrics.items()},
                         {k: (v if k in keep else [None, None]) for k, v in result.intervals.items()})


def _status(positives: int, negatives: int) -> str:
    if positives and negatives:
        return "ok"
    if not positives and not negatives:
        return "no known test example"
    return "no positive test example" if not positives else "no negative test example"


def _one_finding(name: str, positive: np.ndarray, score: np.ndarray, known: np.ndarray, threshold: float,
                 weights: np.ndarray, confidence: float) -> tuple[FindingResult, np.ndarray]:
    """One finding's result and its (1 + B,) AUCs (the point estimate first)."""
    pos, sc = positive[known], score[known]
    w = np.vstack([np.ones(known.sum()), weights[:, known]])
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    auc, ap = weighted_auc_ap(pos, sc, w) if known.any() else (np.full(len(w), np.nan),) * 2
    rates = _at_threshold(pos, sc, w, threshold) if known.any() else {}
    values = {"auc": auc, "ap": ap, **rates}
    result = FindingResult(name, n_pos, n_neg, int((~known).sum()), float(threshold), _status(n_pos, n_neg),
                           {k: _value(v[0]) for k, v in values.items()},
                           {k: _percentiles(v[1:], confidence) for k, v in values.items()})
    return result, auc


def _micro_auc(targets: Targets, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    known = targets.mask.ravel()
    pos, sc = targets.y.ravel()[known] > 0.5, scores.ravel()[known]
    k = targets.y.shape[1]
    w = np.vstack([np.ones(known.sum()), np.repeat(weights, k, axis=1)[:, known]])
    return weighted_auc_ap(pos, sc, w)[0]


def evaluate_findings(targets: Targets, scores: np.ndarray, thresholds: list[float], units: np.ndarray,
                      resamples: int = 1000, confidence: float = 0.95, seed: int = 42,
                      level: str = "image", one_class: Collection[str] = ()) -> FindingsReport:
    """Per-finding metrics of ``scores`` (n, k) against ``targets``, resampling ``units`` (patients) together;
    the findings ``one_class`` (one class in training) are reported as such and left out of the means."""
    scores = np.asarray(scores, dtype=float)
    n = scores.shape[0]
    weights = resample_weights(np.asarray(units), resamples, seed) if resamples and n else np.zeros((0, n))
    results, aucs = [], []
    for j, name in enumerate(targets.names):
        result, auc = _one_finding(name, targets.y[:, j] > 0.5, scores[:, j], targets.mask[:, j], thresholds[j],
                                   weights, confidence)
        if name in one_class:
            result = _untrained(result)
        results.append(result)
        aucs.append(auc if result.status == "ok" else np.full(len(weights) + 1, np.nan))
    stacked = np.vstack(aucs) if aucs else np.full((1, len(weights) + 1), np.nan)
    usable = ~np.all(np.isnan(stacked), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # resamples where no finding has both classes
        macro = np.nanmean(stacked[usable], axis=0) if usable.any() else np.full(stacked.shape[1], np.nan)
    learned = Targets(targets.names, targets.y, targets.mask & ~np.isin(np.array(targets.names), list(one_class)))
    micro = _micro_auc(learned, scores, weights) if n else np.full(1, np.nan)
    return FindingsReport(results, _value(macro[0]), _value(micro[0]),
                          {"macro_auc": _percentiles(macro[1:], confidence),
                           "micro_auc": _percentiles(micro[1:], confidence)},
                          confidence, resamples, level)


def aggregate_targets(keys: np.ndarray, targets: Targets) -> tuple[np.ndarray, Targets, list[str]]:
    """Targets per key: a finding is positive when any known image of the key is, known when any image is; the
    keys whose images disagree on a known finding are returned (a study labelled per image, inconsistently)."""
    uniq, inverse = np.unique(np.asarray(keys), return_inverse=True)
    k = len(targets.names)
    pos = np.zeros((len(uniq), k))
    neg = np.zeros((len(uniq), k))
    np.add.at(pos, inverse, targets.y * targets.mask)
    np.add.at(neg, inverse, (1 - targets.y) * targets.mask)
    disagree = [str(u) for u, row in zip(uniq, (pos > 0) & (neg > 0), strict=True) if row.any()]
    return uniq, Targets(targets.names, (pos > 0).astype(float), (pos + neg) > 0), disagree


def findings_table(report: FindingsReport) -> Any:
    """A CheXNet-style pandas table: one row per finding, then the macro and micro means."""
    import pandas as pd

    def cell(value: float | None, interval: list[float | None] | None = None) -> str:
        if value is None:
            return "n/a"
        if interval and interval[0] is not None:
            return f"{value:.3f} ({interval[0]:.3f}-{interval[1]:.3f})"
        return f"{value:.3f}"

    rows = []
    for f in report.findings:
        m, ci = f.metrics, f.intervals
        rows.append({"finding": f.name, "positives": f.positives, "negatives": f.negatives, "masked": f.masked,
                     "prevalence": cell(m.get("prevalence")), "auc": cell(m.get("auc"), ci.get("auc")),
                     "ap": cell(m.get("ap"), ci.get("ap")), "threshold": f"{f.threshold:.3f}",
                     "sensitivity": cell(m.get("sensitivity"), ci.get("sensitivity")),
                     "specificity": cell(m.get("specificity"), ci.get("specificity")),
                     "note": "" if f.status == "ok" else f.status})
    for name, key, value in (("macro mean", "macro_auc", report.macro_auc),
                             ("micro (pooled)", "micro_auc", report.micro_auc)):
        rows.append({**{c: "" for c in rows[0]}, "finding": name, "auc": cell(value, report.intervals[key])} if rows
                    else {"finding": name, "auc": cell(value, report.intervals[key])})
    return pd.DataFrame(rows)


def plot_finding_rocs(targets: Targets, scores: np.ndarray, report: FindingsReport, title: str) -> Any:
    """A matplotlib Figure: one ROC curve per finding with both classes in the test (AUC in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for j, result in enumerate(report.findings):
        if result.status != "ok":
            continue
        known = targets.mask[:, j]
        positive, score = targets.y[known, j] > 0.5, np.asarray(scores, dtype=float)[known, j]
        tp, fp, _ = _weighted_rates(positive, score, np.ones((1, len(score))))
        tpr = np.r_[0.0, tp[0] / positive.sum()]
        fpr = np.r_[0.0, fp[0] / (~positive).sum()]
        ax.plot(fpr, tpr, lw=1.3, label=f"{result.name} ({result.metrics['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    macro = "n/a" if report.macro_auc is None else f"{report.macro_auc:.3f}"
    ax.set_title(f"{title}\nmacro AUC {macro} ({report.level} level)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
