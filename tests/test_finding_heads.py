"""Heads for multi-label findings: masked rows are no training rows, masked entries weigh nothing in the loss."""

from __future__ import annotations

import numpy as np
import pytest

from imgfeat.train.finding_heads import (
    ConstantFinding,
    finding_rows,
    fit_masked_bce,
    fit_per_finding,
    positive_weights,
    score_per_finding,
)

NAMES = ["Effusion", "Nodule", "Hernia"]


def _data(n=160, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 3))
    y[:, 0] = rng.random(n) < 0.4
    y[:, 1] = rng.random(n) < 0.3
    x = rng.normal(0, 1, (n, 6)) + np.c_[y[:, :2] * 2.5, np.zeros((n, 4))]
    mask = rng.random((n, 3)) > 0.2
    return x, y, mask


def _frame(spark, x, y, mask):
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    rows = [([float(v) for v in xi], [NAMES[j] for j in range(3) if yi[j] and mi[j]],
             [NAMES[j] for j in range(3) if not mi[j]]) for xi, yi, mi in zip(x, y, mask, strict=True)]
    df = spark.createDataFrame(rows, "features array<double>, labels array<string>, label_mask array<string>")
    return df.withColumn("features", array_to_vector(F.col("features")))


def test_per_finding_heads_train_on_known_rows_only(spark):
    from imgfeat.config.schema import HeadParamsConfig

    x, y, mask = _data()
    df = _frame(spark, x, y, mask).cache()
    assert finding_rows(df, "Nodule").count() == mask[:, 1].sum()
    models = fit_per_finding(df, NAMES, "lr", HeadParamsConfig())
    assert isinstance(models[2], ConstantFinding) and models[2].rate == 0.0  # Hernia: never positive in training
    scored = score_per_finding(models, df).select("finding_probability").toPandas()
    p = np.stack(scored["finding_probability"].to_numpy())
    assert p.shape == (len(x), 3) and (p[:, 2] == 0.0).all()
    from sklearn.metrics import roc_auc_score

    for j in range(2):
        assert roc_auc_score(y[mask[:, j], j], p[mask[:, j], j]) > 0.85
    # The masked rows' targets are not seen: flipping them all gives the same models.
    flipped = y.copy()
    flipped[~mask] = 1 - flipped[~mask]
    again = fit_per_finding(_frame(spark, x, flipped, mask), NAMES, "lr", HeadParamsConfig())
    assert again[0].coefficients.toArray() == pytest.approx(models[0].coefficients.toArray())


def test_masked_bce_head_ignores_masked_entries_and_learns_the_findings():
    x, y, mask = _data(seed=1)
    head = fit_masked_bce(x, y, mask.astype(float), epochs=40, seed=3)
    noisy = y.copy()
    noisy[~mask] = np.random.default_rng(2).integers(0, 2, (~mask).sum())
    again = fit_masked_bce(x, noisy, mask.astype(float), epochs=40, seed=3)
    for a, b in zip(head.kernels + head.biases, again.kernels + again.biases, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    p = head.probabilities(x)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[mask[:, 0], 0], p[mask[:, 0], 0]) > 0.9
    assert positive_weights(y, mask.astype(float))[2] == 1.0  # no known positive: weight 1
