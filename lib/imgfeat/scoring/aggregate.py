"""Several images' probabilities -> one result per key (a study, a series, a patient): mean, max or noisy-OR.

Radiology decides per study: MURA scores a study as the mean of its views' probabilities; a finding seen on any
one view can also be read as the maximum, or as noisy-OR (1 - prod(1 - p): the chance that at least one image
shows it, if the images were independent). NumPy only: ``train`` (metrics per study), ``imgfeat predict`` (the
``<output>_studies`` table), ``imgfeat serve`` (a study upload) and the pyfunc model all use this one function.
"""

from __future__ import annotations

import numpy as np

AGGREGATIONS = ("mean", "max", "noisy_or")


def check_aggregation(how: str) -> str:
    """``how`` when it is one of ``AGGREGATIONS``, else a ValueError saying which are."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r}: use one of {', '.join(AGGREGATIONS)}")
    return how


def aggregate(keys: np.ndarray, probabilities: np.ndarray, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, (m, k) probabilities) of the images of each key (a study, series, patient): their mean,
    maximum, or noisy-OR (1 - prod(1 - p): the chance that at least one image shows the finding)."""
    check_aggregation(how)
    uniq, inverse = np.unique(np.asarray(keys), return_inverse=True)
    inverse = inverse.reshape(-1)
    p = np.asarray(probabilities, dtype=float)
    out = np.zeros((len(uniq), p.shape[1]))
    if how == "mean":
        np.add.at(out, inverse, p)
        out /= np.bincount(inverse, minlength=len(uniq))[:, None]
    elif how == "max":
        out[:] = -np.inf
        np.maximum.at(out, inverse, p)
    else:
        logs = np.zeros_like(out)
        np.add.at(logs, inverse, np.log1p(-np.clip(p, 0.0, 1.0 - 1e-12)))
        out = -np.expm1(logs)
    return uniq, out


def aggregate_one(probabilities: np.ndarray, how: str = "mean") -> np.ndarray:
    """(k,) the aggregate of one key's images' (n, k) probabilities (n >= 1)."""
    p = np.asarray(probabilities, dtype=float)
    if p.ndim != 2 or not len(p):
        raise ValueError(f"aggregating needs (images, k) probabilities of at least one image, not shape {p.shape}")
    return aggregate(np.zeros(len(p), dtype=np.int64), p, how)[1][0]
