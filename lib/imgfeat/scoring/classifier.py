"""A trained imgfeat model without Spark: image bytes -> label, class probabilities, and where the model looked.

``ImageClassifier`` reads the classifier folder of imgfeat's model flavour (``imgfeat.scoring.model_folder``: its
files and ``ClassifierInfo``; save / log / load: ``imgfeat.scoring.flavor``). Images are decoded by the same ``decode_file`` with the settings recorded
with the training features, and featurized by the same engine predictor as ``extract``, so scores equal the Spark
``PipelineModel``'s.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgfeat.backbones.registry import get_backbone
from imgfeat.engines.base import input_batch
from imgfeat.io.decoders import DecodeError, DecodeOptions, decode_or_error
from imgfeat.io.decoders.deadline import DecodeWatchdog
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

__all__ = ["ImageClassifier", "Prediction", "inside", "write_classifier"]


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

    def to_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "probabilities": self.probabilities, "error_class": self.error_class,
               "error_message": self.error_message, "width": self.width, "height": self.height, "format": self.format}
        if self.explanation:
            out["explanation"] = self.explanation
        return out


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
        self.backbone = get_backbone(self.info.backbone)
        self.threads, self.device = threads, device
        self._lock = threading.Lock()
        self._watchdog = DecodeWatchdog(self.decode.decode_timeout_s)  # a file past the limit: timed_out
        self._predict: Any = None
        self._maps: Any = None

    # -- model ------------------------------------------------------------------------------------

    def _source(self) -> Any:
        from imgfeat.engines import resolve_weights

        info = self.info
        weights = self.weights_path or info.weights
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

            source = self._source()
            if source.weights_id != self.info.weights_id:
                raise ValueError(f"the backbone's weights resolved to {source.weights_id}, but the model was trained "
                                 f"on {self.info.weights_id}")
            self._predict = engine_of(self.backbone).make_predictor(self.backbone, source, None, self._options())
        return self._predict

    def _ensure_maps(self) -> Any:
        if self._maps is None:
            from imgfeat.engines import engine_of

            self._maps = engine_of(self.backbone).make_map_predictor(self.backbone, self._source(), None, self._options())
        return self._maps

    def describe(self) -> dict[str, Any]:
        keys = ("backbone", "engine", "weights_id", "head", "labels", "input_size", "precision", "run_id")
        return {k: getattr(self.info, k) for k in keys}

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
        with np.errstate(invalid="ignore", over="ignore"):
            index, proba = self.head.predict(features.astype(np.float64))
        for k, i in enumerate(ok):
            _score_one(out[i], features[k], proba[k], self.labels[int(index[k])], self.labels)
        t3 = time.perf_counter()
        timings["head_ms"] = timings.get("head_ms", 0.0) + 1000 * (t3 - t2)
        if maps is not None:
            from imgfeat.scoring.explain import class_map, overlay_png

            for k, i in enumerate(ok):
                if out[i].error_class:
                    continue
                heat, how = class_map(self.head, maps[k], features[k], int(index[k]))
                out[i].heatmap, out[i].explanation = heat, how
                out[i].heatmap_png = overlay_png(decoded[i].array, heat, decoded[i].width, decoded[i].height,
                                                 self.decode.resize_mode)
            timings["explain_ms"] = timings.get("explain_ms", 0.0) + 1000 * (time.perf_counter() - t3)
        return out


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
