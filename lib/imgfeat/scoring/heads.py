"""Classifier heads as plain arrays: what ``train`` fitted with MLlib or Keras, scored with NumPy alone.

``imgfeat.train.export`` turns each fitted head into a ``HeadArrays``; this module scores it exactly as Spark
does (same raw scores, same probabilities, same argmax) and explains single predictions on pooled features:

- ``linear``: raw = x W^T + b. ``lr`` (multinomial; probabilities = softmax), ``svc`` (binary: W = [-w, w];
  margins, no probabilities).
- ``trees``: decision trees as node arrays. ``dt`` (class counts at the leaf), ``rf`` (each tree votes its leaf's
  class distribution; raw = the sum), ``gbt`` (binary: margin = sum of weighted regression trees; Spark's
  logistic loss gives P(1) = 1 / (1 + exp(-2 margin))).
- ``mlp``: the Keras head (softmax regression or one hidden ReLU layer), weights only.
- ``ovr``: one binary head per class (MLlib's OneVsRest for multiclass svc/gbt); raw = each one's margin.
- ``findings`` (multi-label): one probability per finding, ``meta["findings"]`` in order. Mode ``per_finding``:
  one binary probabilistic part per finding (``linear`` lr, ``trees`` rf/dt/gbt, or ``constant``: a finding seen
  with one class only in training, scored as its training rate); mode ``masked_bce``: the multi-output network of
  ``imgfeat.train.finding_heads.fit_masked_bce`` (``kernel_i``/``bias_i``, a sigmoid per finding).

Saved as one ``.npz`` (numeric arrays only, loaded with ``allow_pickle=False``) and a JSON description.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = ("linear", "trees", "mlp", "ovr", "findings", "constant")


@dataclass
class HeadArrays:
    kind: str  # linear | trees | mlp | ovr | findings | constant
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"probabilistic": True, "mode": "rf"}
    parts: list[HeadArrays] = field(default_factory=list)  # ovr: one binary head per class

    @property
    def probabilistic(self) -> bool:
        """True when ``raw_scores`` are probabilities (lr, trees, mlp); margins otherwise (svc, ovr)."""
        return bool(self.meta.get("probabilistic"))

    # -- scoring ----------------------------------------------------------------------------------

    def raw_scores(self, x: np.ndarray) -> np.ndarray:
        """(n, classes): probabilities where the head has them (as Spark's ``probability``), else margins
        (as Spark's ``rawPrediction``)."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "linear":
            raw = x @ self.arrays["weights"].T + self.arrays["bias"]
            return _softmax(raw) if self.probabilistic else raw
        if self.kind == "mlp":
            return _softmax(self._mlp_logits(x))
        if self.kind == "trees":
            return self._trees(x)
        if self.kind == "ovr":
            return np.stack([part.margin(x) for part in self.parts], axis=1)
        if self.kind == "findings":
            return self.finding_probabilities(x)
        if self.kind == "constant":
            rate = np.full(len(x), float(self.arrays["rate"][0]))
            return np.stack([1.0 - rate, rate], axis=1)
        raise ValueError(f"unknown head kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def margin(self, x: np.ndarray) -> np.ndarray:
        """A binary head's confidence in class 1, as OneVsRest reads it (rawPrediction[1])."""
        if self.kind == "trees" and self.meta.get("mode") == "gbt":
            return self._gbt_margin(np.asarray(x, dtype=np.float64))
        if self.kind == "linear" and not self.probabilistic:
            return self.raw_scores(x)[:, 1]
        raise ValueError(f"a {self.kind} head ({self.meta.get('mode')}) is not a one-vs-rest part")

    @property
    def findings(self) -> list[str]:
        """A ``findings`` head's finding names, in the order of its probabilities; [] for other heads."""
        return list(self.meta.get("findings", [])) if self.kind == "findings" else []

    def finding_probabilities(self, x: np.ndarray) -> np.ndarray:
        """(n, findings): P(finding present) per image, for a ``findings`` head."""
        if self.kind != "findings":
            raise ValueError(f"a {self.kind} head has classes, not findings: use predict")
        x = np.asarray(x, dtype=np.float64)
        if self.meta.get("mode") == "masked_bce":
            with np.errstate(over="ignore"):
                return 1.0 / (1.0 + np.exp(-self._mlp_logits(x)))
        if not self.parts:
            return np.zeros((len(x), 0))
        return np.stack([part.raw_scores(x)[:, 1] for part in self.parts], axis=1)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class index, class probabilities): the margins of svc/ovr heads go through a softmax, as train
        evaluates them (``imgfeat.train.metrics.scores_to_proba``)."""
        if self.kind == "findings":
            raise ValueError("a findings (multi-label) head has one probability per finding, not one class: use "
                             "finding_probabilities and the thresholds in classifier.json")
        raw = self.raw_scores(x)
        proba = raw if self.probabilistic else _softmax(raw)
        return np.argmax(raw, axis=1), proba

    def _mlp_logits(self, x: np.ndarray, hidden: list[np.ndarray] | None = None) -> np.ndarray:
        n = int(self.meta["layers"])
        h = x
        for i in range(n):
            h = h @ self.arrays[f"kernel_{i}"].astype(np.float64) + self.arrays[f"bias_{i}"].astype(np.float64)
            if i < n - 1:
                if hidden is not None:
                    hidden.append(h.copy())
                h = np.maximum(h, 0.0)
        return h

    def _leaves(self, x: np.ndarray) -> np.ndarray:
        """(n, trees): the leaf each row reaches in each tree (continuous splits: left when x <= threshold)."""
        a = self.arrays
        feature, threshold, left, right = a["feature"], a["threshold"], a["left"], a["right"]
        rows = np.arange(len(x))
        out = np.empty((len(x), len(a["roots"])), dtype=np.int64)
        for t, root in enumerate(a["roots"]):
            node = np.full(len(x), root, dtype=np.int64)
            while True:
                inner = feature[node] >= 0
                if not inner.any():
                    break
                go_left = x[rows, np.where(inner, feature[node], 0)] <= threshold[node]
                node = np.where(inner, np.where(go_left, left[node], right[node]), node)
            out[:, t] = node
        return out

    def _gbt_margin(self, x: np.ndarray) -> np.ndarray:
        leaves = self._leaves(x)
        return (self.arrays["value"][leaves, 0] * self.arrays["tree_weights"]).sum(axis=1)

    def _trees(self, x: np.ndarray) -> np.ndarray:
        mode = self.meta["mode"]
        if mode == "gbt":
            m = self._gbt_margin(x)
            p1 = 1.0 / (1.0 + np.exp(-2.0 * m))
            return np.stack([1.0 - p1, p1], axis=1)
        leaves = self._leaves(x)
        votes = self.arrays["value"][leaves].sum(axis=1)  # (n, classes): each tree's leaf distribution
        return votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-300)

    # -- explanations -----------------------------------------------------------------------------

    def class_direction(self, x: np.ndarray, k: int) -> tuple[np.ndarray, str]:
        """A vector d (features,) such that the score of class ``k`` relative to the others changes by d . dx
        for a change dx of the pooled features, and how exact that is ("exact" for heads that are linear on the
        features, "gradient" for a hidden layer, "path" for trees: Saabas' per-feature path contributions
        divided by the feature values)."""
        x = np.asarray(x, dtype=np.float64).reshape(1, -1)
        if self.kind == "findings":
            return self._finding_direction(x, k)
        if self.kind == "linear":
            w = self.arrays["weights"]
            return w[k] - w.mean(axis=0), "exact"
        if self.kind == "ovr":
            part = self.parts[k]
            if part.kind == "linear":
                return part.arrays["weights"][1], "exact"
            return part._path_contributions(x)[:, 1] / _safe(x[0]), "path"
        if self.kind == "mlp":
            if int(self.meta["layers"]) == 1:
                w = self.arrays["kernel_0"].astype(np.float64).T
                return w[k] - w.mean(axis=0), "exact"
            hidden: list[np.ndarray] = []
            self._mlp_logits(x, hidden)
            w2 = self.arrays["kernel_1"].astype(np.float64)  # (hidden, classes)
            out_dir = w2[:, k] - w2.mean(axis=1)
            gate = (hidden[0][0] > 0).astype(np.float64)
            return self.arrays["kernel_0"].astype(np.float64) @ (gate * out_dir), "gradient"
        if self.kind == "trees":
            contributions = self._path_contributions(x)  # (features, classes)
            column = contributions[:, 1] if self.meta["mode"] == "gbt" else contributions[:, k]
            if self.meta["mode"] == "gbt" and k == 0:
                column = -column
            return column / _safe(x[0]), "path"
        raise ValueError(f"unknown head kind {self.kind!r}")

    def _finding_direction(self, x: np.ndarray, k: int) -> tuple[np.ndarray, str]:
        """The direction in which finding ``k``'s logit grows (its part's class-1 direction; the network's
        output ``k`` for masked_bce)."""
        if self.meta.get("mode") == "masked_bce":
            w0 = self.arrays["kernel_0"].astype(np.float64)
            if int(self.meta["layers"]) == 1:
                return w0[:, k], "exact"
            hidden: list[np.ndarray] = []
            self._mlp_logits(x, hidden)
            gate = (hidden[0][0] > 0).astype(np.float64)
            return w0 @ (gate * self.arrays["kernel_1"].astype(np.float64)[:, k]), "gradient"
        part = self.parts[k]
        if part.kind == "constant":
            return np.zeros(x.shape[1]), "exact"
        if part.kind == "linear":
            w = part.arrays["weights"]
            return w[1] - w[0], "exact"
        return part.class_direction(x, 1)

    def _path_contributions(self, x: np.ndarray) -> np.ndarray:
        """(features, classes): for one row, how much each feature's splits moved the head's output along the
        decision paths (Saabas): every step from a node to its child adds child value - node value."""
        a = self.arrays
        value = a["value"]
        weights = a.get("tree_weights", np.ones(len(a["roots"])))
        n_out = value.shape[1]
        out = np.zeros((x.shape[1], n_out))
        for t, root in enumerate(a["roots"]):
            node = int(root)
            while a["feature"][node] >= 0:
                f = int(a["feature"][node])
                child = int(a["left"][node] if x[0, f] <= a["threshold"][node] else a["right"][node])
                out[f] += weights[t] * (value[child] - value[node])
                node = child
        return out

    # -- persistence ------------------------------------------------------------------------------

    def flat(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(the JSON description, every array by its file key: a part's as ``part<i>__<name>``)."""
        arrays = {k: np.asarray(v) for k, v in self.arrays.items()}
        for i, part in enumerate(self.parts):
            arrays.update({f"part{i}__{k}": np.asarray(v) for k, v in part.arrays.items()})
        return {"kind": self.kind, "meta": self.meta, "parts": [{"kind": p.kind, "meta": p.meta} for p in self.parts]}, arrays

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        description, arrays = self.flat()
        np.savez(os.path.join(folder, "head.npz"), **arrays)
        with open(os.path.join(folder, "head.json"), "w", encoding="utf-8") as fh:
            json.dump(description, fh, indent=2)

    @classmethod
    def load(cls, folder: str) -> HeadArrays:
        with open(os.path.join(folder, "head.json"), encoding="utf-8") as fh:
            description = json.load(fh)
        with np.load(os.path.join(folder, "head.npz"), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls.from_flat(description, arrays)

    @classmethod
    def from_flat(cls, description: dict[str, Any], arrays: dict[str, np.ndarray]) -> HeadArrays:
        """The head ``flat`` described."""
        parts = []
        for i, p in enumerate(description["parts"]):
            prefix = f"part{i}__"
            parts.append(cls(p["kind"], {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}, p["meta"]))
        own = {k: v for k, v in arrays.items() if not k.startswith("part")}
        return cls(description["kind"], own, description["meta"], parts)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _safe(v: np.ndarray) -> np.ndarray:
    return np.where(np.abs(v) > 1e-12, v, np.inf)
