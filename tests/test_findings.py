"""Per-finding (multi-label) results: metrics equal scikit-learn's, masked targets count nowhere, thresholds,
study-level aggregation (imgfeat.train.findings; NumPy only)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from imgfeat.train.findings import (
    Targets,
    aggregate,
    aggregate_targets,
    choose_threshold,
    evaluate_findings,
    findings_table,
    weighted_auc_ap,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_average_precision_equal_scikit_learn_with_ties_and_weights(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    score = np.round(rng.random(300) + 0.3 * y, 1)  # rounded: many ties
    weights = rng.integers(0, 3, 300).astype(float)
    auc, ap = weighted_auc_ap(y, score, np.vstack([np.ones(300), weights]))
    assert auc[0] == pytest.approx(roc_auc_score(y, score))
    assert ap[0] == pytest.approx(average_precision_score(y, score))
    assert auc[1] == pytest.approx(roc_auc_score(y, score, sample_weight=weights))
    assert ap[1] == pytest.approx(average_precision_score(y, score, sample_weight=weights))


def _task(seed=3, n=120):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.3, 0.15, 0.0]).astype(float)
    mask = rng.random((n, 3)) > 0.15
    scores = np.clip(rng.random((n, 3)) * 0.7 + 0.3 * y, 0, 1)
    return Targets(("Effusion", "Nodule", "Hernia"), y, mask), scores, np.arange(n) // 3


def test_masked_targets_are_out_of_every_metric():
    targets, scores, units = _task()
    report = evaluate_findings(targets, scores, [0.5] * 3, units, resamples=200, seed=1)
    # Anything at the masked places (their targets and scores) changes nothing.
    rng = np.random.default_rng(9)
    y2, s2 = targets.y.copy(), scores.copy()
    y2[~targets.mask] = rng.integers(0, 2, (~targets.mask).sum())
    s2[~targets.mask] = rng.random((~targets.mask).sum())
    again = evaluate_findings(Targets(targets.names, y2, targets.mask), s2, [0.5] * 3, units, resamples=200, seed=1)
    assert again.to_dict() == report.to_dict()
    first = report.findings[0]
    known = targets.mask[:, 0]
    assert first.masked == (~known).sum() and first.positives + first.negatives == known.sum()
    assert first.metrics["auc"] == pytest.approx(roc_auc_score(targets.y[known, 0], scores[known, 0]))
    assert first.metrics["ap"] == pytest.approx(average_precision_score(targets.y[known, 0], scores[known, 0]))
    pooled = targets.mask.ravel()
    assert report.micro_auc == pytest.approx(roc_auc_score(targets.y.ravel()[pooled], scores.ravel()[pooled]))


def test_a_finding_training_saw_with_one_class_is_reported_and_left_out_of_the_means():
    targets, scores, units = _task()
    train = Targets(targets.names, np.c_[targets.y[:, :1], np.zeros((len(targets.y), 2))], targets.mask)
    assert train.one_class() == ["Nodule", "Hernia"]  # Nodule: no known positive in training
    report = evaluate_findings(targets, scores, [0.5] * 3, units, resamples=100, one_class=train.one_class())
    effusion, nodule, _ = report.findings
    assert nodule.status == "one class in training" and nodule.metrics["auc"] is None
    assert nodule.intervals["auc"] == [None, None] and nodule.positives > 0 and nodule.metrics["prevalence"] > 0
    assert report.macro_auc == pytest.approx(effusion.metrics["auc"])
    known = targets.mask[:, 0]
    assert report.micro_auc == pytest.approx(roc_auc_score(targets.y[known, 0], scores[known, 0]))
    assert "one class in training" in findings_table(report)["note"].tolist()


def test_a_finding_without_positives_is_reported_not_averaged():
    targets, scores, units = _task()
    report = evaluate_findings(targets, scores, [0.5] * 3, units, resamples=100)
    hernia = report.findings[2]
    assert hernia.status == "no positive test example" and hernia.metrics["auc"] is None
    defined = [f.metrics["auc"] for f in report.findings[:2]]
    assert report.macro_auc == pytest.approx(np.mean(defined))
    low, high = report.findings[0].intervals["auc"]
    assert low < report.findings[0].metrics["auc"] < high
    table = findings_table(report)
    assert list(table["finding"]) == ["Effusion", "Nodule", "Hernia", "macro mean", "micro (pooled)"]
    assert table.loc[2, "note"] == "no positive test example" and table.loc[2, "auc"] == "n/a"


def test_thresholds_youden_and_target_sensitivity():
    rng = np.random.default_rng(5)
    y = rng.random(400) < 0.4
    score = rng.random(400) + 0.6 * y
    t = choose_threshold(y, score, "sensitivity", 0.9)
    assert (score[y] >= t).mean() >= 0.9 and (score[y] > t).mean() < 0.9  # the highest threshold that reaches it
    youden = choose_threshold(y, score, "youden")
    j = lambda th: (score[y] >= th).mean() - (score[~y] >= th).mean()  # noqa: E731
    assert all(j(youden) >= j(th) - 1e-12 for th in np.unique(score))
    assert choose_threshold(np.ones(5, bool), np.arange(5.0)) == 0.5


def test_study_aggregation_mean_max_noisy_or_and_disagreeing_studies():
    keys = np.array(["s2", "s1", "s1", "s2", "s3"])
    p = np.array([[0.2], [0.5], [0.9], [0.4], [0.1]])
    for how, expected in (("mean", [0.7, 0.3, 0.1]), ("max", [0.9, 0.4, 0.1]),
                          ("noisy_or", [1 - 0.5 * 0.1, 1 - 0.8 * 0.6, 0.1])):
        uniq, out = aggregate(keys, p, how)
        assert list(uniq) == ["s1", "s2", "s3"] and out[:, 0] == pytest.approx(expected)
    targets = Targets(("Fracture",), np.array([[1.0], [1.0], [1.0], [0.0], [0.0]]),
                      np.array([[True], [True], [True], [True], [False]]))
    uniq, agg, disagree = aggregate_targets(keys, targets)
    assert agg.y[:, 0].tolist() == [1.0, 1.0, 0.0] and agg.mask[:, 0].tolist() == [True, True, False]
    assert disagree == ["s2"]
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(keys, p, "median")
