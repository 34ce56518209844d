"""A trained imgfeat model without Spark: image bytes -> label, class probabilities, and where the model looked.

A multi-label model (``ClassifierInfo.task`` "multi", a ``findings`` head) gives every image one probability per
finding and the calls (probability >= that finding's threshold, chosen on the validation split by ``train``);
``predict_study`` scores several images of one study and combines them (``imgfeat.scoring.aggregate``).

``ImageClassifier`` reads the classifier folder of imgfeat's model flavour (``imgfeat.scoring.model_folder``: its
files and ``ClassifierInfo``; save / log / load: ``imgfeat.scoring.flavor``). Images are decoded by the same ``decode_file`` with the settings recorded
with the training features, and featurized by the same engine predictor as ``extract``, so scores equal the Spark
``PipelineModel``'s.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgfeat.backbones.registry import get_backbone
from imgfeat.engines.base import input_batch
from imgfeat.io.decoders import DecodeError, DecodeOptions, decode_or_error
from imgfeat.io.decoders.deadline import DecodeWatchdog
from imgfeat.scoring.aggregate import aggregate_one, check_aggregation
from imgfeat.scoring.heads import HeadArrays
from imgfeat.scoring.model_folder import (
    CLASSIFIER_FILE,
    HEAD_DIR,
    HEAD_FILES,
    ClassifierInfo,
    inside,
    read_info,
    save_model,
)

__all__ = ["ImageClassifier", "Prediction", "StudyResult", "inside", "probability_columns", "study_of",
           "write_classifier"]


@dataclass
class Prediction:
    """One input's outcome: a label and probabilities, or an error class and message (never both)."""

    label: str | None = None
    probabilities: dict[str, float] | None = None
    error_class: str | None = None
    error_message: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)  # (h, w) in 0..1 over the model's input
    heatmap_png: bytes | None = field(default=None, repr=False)  # the map drawn over the image
    explanation: str | None = None  # exact | gradient | path: how the map relates to the score
    # Multi-label only: per finding {name, probability, threshold, positive}, in the model's order; ``label`` is
    # then the called findings joined by "|" ("" when none is called), ``probabilities`` finding -> probability.
    findings: list[dict[str, Any]] | None = None
    explained: str | None = None  # multi-label: the finding the heat map is for

    def to_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "probabilities": self.probabilities, "error_class": self.error_class,
               "error_message": self.error_message, "width": self.width, "height": self.height, "format": self.format}
        if self.findings is not None:
            out["findings"] = self.findings
        if self.explanation:
            out["explanation"] = self.explanation
            if self.explained:
                out["explained"] = self.explained
        return out

    @property
    def positive(self) -> list[str]:
        """Multi-label: the called findings, in the model's order ([] for a single-label prediction)."""
        return [f["name"] for f in self.findings or () if f["positive"]]


@dataclass
class StudyResult:
    """Several images of one study combined: the aggregated probabilities and the study's label (single-label:
    the most probable class; multi-label: the called findings), or why there is none (no image scored)."""

    aggregation: str
    images: int  # images that were scored and aggregated
    failed: int  # images of the study that could not be scored (each carries its own error)
    label: str | None = None
    probabilities: dict[str, float] | None = None
    findings: list[dict[str, Any]] | None = None
    error_class: str | None = None
    error_message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"aggregation": self.aggregation, "images": self.images, "failed": self.failed, "label": self.label,
               "probabilities": self.probabilities, "error_class": self.error_class, "error_message": self.error_message}
        if self.findings is not None:
            out["findings"] = self.findings
        return out


def probability_columns(names: list[str]) -> list[str]:
    """``probability_<name>`` for each name, non-word characters as ``_``; names that would give the same column
    get ``_2``, ``_3``, ... (never one column for two findings)."""
    out: list[str] = []
    for name in names:
        base = "probability_" + re.sub(r"\W", "_", name)
        column, n = base, 1
        while column in out:
            n += 1
            column = f"{base}_{n}"
        out.append(column)
    return out


def finding_calls(names: list[str], thresholds: list[float], proba: np.ndarray) -> list[dict[str, Any]]:
    """[{name, probability, threshold, positive}] of one image's (or study's) per-finding probabilities."""
    return [{"name": name, "probability": float(p), "threshold": float(t), "positive": bool(p >= t)}
            for name, t, p in zip(names, thresholds, proba, strict=True)]


def study_of(predictions: list[Prediction], aggregation: str = "mean") -> StudyResult:
    """The study of ``predictions`` (its images): their probabilities combined by ``aggregation`` (mean, max,
    noisy_or); images with an error are left out and counted in ``failed``."""
    check_aggregation(aggregation)
    scored = [p for p in predictions if p.error_class is None and p.probabilities is not None]
    result = StudyResult(aggregation, len(scored), len(predictions) - len(scored))
    if not scored:
        result.error_class = "no_image_scored"
        result.error_message = (f"none of the study's {len(predictions)} images could be scored (see each image's "
                                "error); send images that decode")
        return result
    names = list(scored[0].probabilities)
    if any(list(p.probabilities) != names for p in scored):
        raise ValueError("the study's images were scored by different models (their classes differ)")
    combined = aggregate_one(np.array([[p.probabilities[n] for n in names] for p in scored]), aggregation)
    result.probabilities = {n: float(v) for n, v in zip(names, combined, strict=True)}
    if scored[0].findings is not None:
        result.findings = finding_calls(names, [f["threshold"] for f in scored[0].findings], combined)
        result.label = "|".join(f["name"] for f in result.findings if f["positive"])
    else:
        result.label = names[int(np.argmax(combined))]
    return result


def write_classifier(folder: str, *, head: HeadArrays, weights_file: str | None = None, **fields: Any) -> str:
    """``flavor.save_model`` with the description as keywords (``ClassifierInfo.describe``'s, less ``head_kind``)."""
    return save_model(folder, ClassifierInfo.describe(head_kind=head.kind, **fields), head, weights_file)


class ImageClassifier:
    """Backbone + head, loaded once; ``predict`` and ``explain`` are safe to call from several threads
    (model calls are serialised: one CPU model at a time is fastest, and memory stays bounded)."""

    def __init__(self, folder: str, threads: int = 0, device: str = "auto", root: str | None = None):
        """``root``: the model folder every file read must lie in (symlinks resolved); default ``folder``."""
        root = root or folder
        self.info: ClassifierInfo = read_info(folder, root)
        self.folder = folder
        self.weights_path = self._weights_path(root)
        self.labels: list[str] = self.info.labels
        self.decode: DecodeOptions = self.info.decode
        for name in HEAD_FILES:
            inside(root, os.path.join(folder, HEAD_DIR, name), f"{HEAD_DIR}/{name}")
        self.head = HeadArrays.load(os.path.join(folder, HEAD_DIR))
        self.multi = self.info.task == "multi"
        self.findings: list[str] = list(self.info.findings or []) if self.multi else []
        self.thresholds: list[float] = [float(t) for t in self.info.thresholds or []] if self.multi else []
        if self.multi:
            self._check_findings()
        self.backbone = get_backbone(self.info.backbone)
        self.threads, self.device = threads, device
        self._lock = threading.Lock()
        self._watchdog = DecodeWatchdog(self.decode.decode_timeout_s)  # a file past the limit: timed_out
        self._predict: Any = None
        self._maps: Any = None

    def _check_findings(self) -> None:
        """A multi-label folder must agree with itself: a findings head over the findings, one threshold each."""
        where = f"{self.folder}/{CLASSIFIER_FILE}"
        if self.head.kind != "findings":
            raise ValueError(f"{where}: task multi needs a findings head, not a {self.head.kind} head; re-log the "
                             "model with `imgfeat train`")
        head_findings = self.head.findings
        if not self.findings or len(self.thresholds) != len(self.findings) or (
                head_findings and head_findings != self.findings):
            raise ValueError(f"{where}: {len(self.findings)} findings, {len(self.thresholds)} thresholds and the "
                             f"head's findings {head_findings} do not match; re-log the model with `imgfeat train`")

    # -- model ------------------------------------------------------------------------------------

    def weights_source(self, weights_file: str | None = None) -> Any:
        """The backbone's weights as the model records them (``WeightsSource``): its weights file (``weights_file``:
        a local copy of it instead, pinned by the recorded sha256), or ``imagenet`` / ``none`` + seed."""
        from imgfeat.engines import resolve_weights

        info = self.info
        weights = (weights_file if weights_file and self.weights_path else None) or self.weights_path or info.weights
        return resolve_weights(self.backbone, weights, int(info.seed), info.weights_sha256 or None)

    def _weights_path(self, root: str) -> str | None:
        """The weights file inside the model folder (``weights: file``), None for ``imagenet`` / ``none``."""
        kind = self.info.weights
        if isinstance(kind, str) and kind.strip().lower() in ("imagenet", "none"):
            return None
        if kind != "file" or not isinstance(self.info.weights_file, str):
            raise ValueError(f"{self.folder}/{CLASSIFIER_FILE}: weights {kind!r} is not 'imagenet', 'none' or 'file' "
                             "with a weights_file inside the model folder; re-log the model with `imgfeat train`")
        return inside(root, os.path.join(self.folder, self.info.weights_file), "weights_file")

    def _options(self) -> Any:
        from imgfeat.engines import EngineOptions

        return EngineOptions(threads=self.threads, device=self.device, precision=self.info.precision,
                             input_size=self.decode.size)

    def load(self, maps: bool = False) -> ImageClassifier:
        """Build the backbone now (the first request would otherwise pay for it); ``maps``: its feature-map
        model for explanations too."""
        with self._lock:
            self._ensure_predictor()
            if maps:
                self._ensure_maps()
        return self

    def _ensure_predictor(self) -> Any:
        if self._predict is None:
            from imgfeat.engines import engine_of

            source = self.weights_source()
            if source.weights_id != self.info.weights_id:
                raise ValueError(f"the backbone's weights resolved to {source.weights_id}, but the model was trained "
                                 f"on {self.info.weights_id}")
            self._predict = engine_of(self.backbone).make_predictor(self.backbone, source, None, self._options())
        return self._predict

    def _ensure_maps(self) -> Any:
        if self._maps is None:
            from imgfeat.engines import engine_of

            self._maps = engine_of(self.backbone).make_map_predictor(self.backbone, self.weights_source(), None, self._options())
        return self._maps

    def describe(self) -> dict[str, Any]:
        keys = ("backbone", "engine", "weights_id", "head", "labels", "input_size", "precision", "run_id")
        out = {k: getattr(self.info, k) for k in keys}
        if self.multi:
            out.update(task="multi", findings=self.findings, thresholds=self.thresholds,
                       aggregation=self.info.aggregation or "mean")
        elif self.info.aggregation:
            out["aggregation"] = self.info.aggregation  # a study's default (serve's ?study=true)
        return out

    # -- scoring ----------------------------------------------------------------------------------

    def decode_one(self, data: bytes | None) -> Any:
        """The first model input of ``data`` (a 2D image, or a volume's selected slice), or the DecodeError."""
        decoded = self._watchdog.call(decode_or_error, data, self.decode)
        return decoded if isinstance(decoded, DecodeError) else decoded[0]

    def predict(self, contents: list[bytes | None], explain: bool = False,
                timings: dict[str, float] | None = None) -> list[Prediction]:
        """One ``Prediction`` per input, in order; bad inputs get their error class and message."""
        timings = timings if timings is not None else {}
        t0 = time.perf_counter()
        decoded = [self.decode_one(c) for c in contents]
        out = [Prediction() for _ in contents]
        ok = []
        for i, d in enumerate(decoded):
            if isinstance(d, DecodeError):
                out[i].error_class, out[i].error_message = d.error_class, d.message
            else:
                out[i].width, out[i].height, out[i].format = d.width, d.height, d.format
                ok.append(i)
        t1 = time.perf_counter()
        timings["decode_ms"] = timings.get("decode_ms", 0.0) + 1000 * (t1 - t0)
        if not ok:
            return out
        size = self.decode.size
        batch = input_batch([decoded[i].array for i in ok], size)  # as featurize_batch builds it
        with self._lock:
            features = np.asarray(self._ensure_predictor()(batch), dtype=np.float32)
            maps = np.asarray(self._ensure_maps()(batch), dtype=np.float32) if explain else None
        t2 = time.perf_counter()
        timings["inference_ms"] = timings.get("inference_ms", 0.0) + 1000 * (t2 - t1)
        explained = self._score(features, [out[i] for i in ok])
        t3 = time.perf_counter()
        timings["head_ms"] = timings.get("head_ms", 0.0) + 1000 * (t3 - t2)
        if maps is not None:
            self._explain(maps, features, [decoded[i] for i in ok], [out[i] for i in ok], explained)
            timings["explain_ms"] = timings.get("explain_ms", 0.0) + 1000 * (time.perf_counter() - t3)
        return out

    def _score(self, features: np.ndarray, outs: list[Prediction]) -> list[int]:
        """Score ``features`` (one row per prediction of ``outs``) with the head; returns, per row, the class (or
        finding) a heat map would explain: the predicted class, or the most probable called finding (else the
        most probable finding)."""
        x = features.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            if self.multi:
                proba = self.head.finding_probabilities(x)
                margin = np.where(proba >= np.asarray(self.thresholds), 1.0, 0.0) + np.nan_to_num(proba)
                index = np.argmax(margin, axis=1)
            else:
                index, proba = self.head.predict(x)
        for k, out in enumerate(outs):
            label = self.labels[int(index[k])] if not self.multi else ""
            _score_one(out, features[k], proba[k], label, self.findings or self.labels)
            if self.multi and out.error_class is None:
                out.findings = finding_calls(self.findings, self.thresholds, proba[k])
                out.label = "|".join(out.positive)
        return [int(i) for i in index]

    def _explain(self, maps: np.ndarray, features: np.ndarray, decoded: list[Any], outs: list[Prediction],
                 index: list[int]) -> None:
        from imgfeat.scoring.explain import class_map, overlay_png

        for k, out in enumerate(outs):
            if out.error_class:
                continue
            heat, how = class_map(self.head, maps[k], features[k], index[k])
            out.heatmap, out.explanation = heat, how
            out.explained = self.findings[index[k]] if self.multi else None
            out.heatmap_png = overlay_png(decoded[k].array, heat, decoded[k].width, decoded[k].height,
                                          self.decode.resize_mode)

    def predict_study(self, contents: list[bytes | None], aggregation: str | None = None, explain: bool = False,
                      timings: dict[str, float] | None = None) -> tuple[list[Prediction], StudyResult]:
        """The images of one study: each one's ``Prediction`` and the study's result, their probabilities combined
        by ``aggregation`` (mean | max | noisy_or; default the model's recorded one, else mean)."""
        how = check_aggregation(aggregation or self.info.aggregation or "mean")
        predictions = self.predict(contents, explain=explain, timings=timings)
        return predictions, study_of(predictions, how)


def _score_one(out: Prediction, features: np.ndarray, proba: np.ndarray, label: str, labels: list[str]) -> None:
    """``out``'s label and probabilities, or its error when the features or the probabilities are not finite."""
    if not np.isfinite(features).all():
        out.error_class = "non_finite_features"
        out.error_message = ("the backbone's features for this image are not finite numbers (NaN or infinity): check "
                             "the backbone's weights and precision")
    elif not np.isfinite(proba).all():
        out.error_class = "non_finite_output"
        out.error_message = ("the model's probabilities for this image are not finite numbers (NaN or infinity): "
                             "check the head's weights")
    else:
        out.label = label
        out.probabilities = {name: float(proba[j]) for j, name in enumerate(labels)}
