"""The pyfunc wrapper of imgfeat's model flavour: no Spark, image bytes in, labels out; and model URIs.

``ImgfeatPyfunc`` is the thin ``mlflow.pyfunc.PythonModel`` that MLflow builds by running ``pyfunc_entry.py``; the
model's files and their save / log / load are ``imgfeat.scoring.flavor``'s. ``mlflow models serve -m
runs:/RUN_ID/pyfunc_model``, ``mlflow.pyfunc.load_model`` and Databricks Model Serving run it with only the pinned
requirements installed.

Input: a DataFrame with a binary column ``content`` (file bytes; over HTTP base64 strings, which MLflow decodes by
the signature), or a list of bytes. Output: one row per input: ``label``, ``probability`` (of that label),
``probabilities`` (label -> probability), ``error_class`` and ``error_message`` (bad input: no label). A multi-label
model gives instead ``findings_positive`` (the called findings joined by "|", "" when none is; null for bad input),
one ``probability_<finding>`` column per finding (non-word characters as ``_``: ``probability_columns``),
``probabilities`` (finding -> probability), ``error_class`` and ``error_message``. Parameter ``explain=true`` adds
``heatmap_png``: the class (or finding) map over the image, a base64 PNG (``imgfeat.scoring.explain``).
"""

from __future__ import annotations

import base64
import os
from typing import Any

import mlflow.pyfunc
import pandas as pd

from imgfeat.scoring.flavor import CLASSIFIER_ARTIFACT, PYFUNC_MODEL, load_model

load_classifier = load_model  # the name serve and older callers use


def _as_bytes(value: Any) -> bytes | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # base64 text, when a client bypasses the signature's decoding
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            return value.encode("utf-8")
    raise TypeError(f"content must be bytes or base64 text, not {type(value).__name__}")


class ImgfeatPyfunc(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc`` wrapper of ``ImageClassifier``."""

    def load_context(self, context: Any) -> None:
        from imgfeat.scoring.classifier import ImageClassifier

        threads = int(os.environ.get("IMGFEAT_THREADS", "0"))
        self.classifier = ImageClassifier(context.artifacts[CLASSIFIER_ARTIFACT], threads=threads)

    # No type hints: MLflow would read them as the input schema.
    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            column = "content" if "content" in model_input.columns else model_input.columns[0]
            values = list(model_input[column])
        elif isinstance(model_input, (bytes, bytearray)):
            values = [model_input]
        else:
            values = list(model_input)
        explain = bool((params or {}).get("explain", False))
        predictions = self.classifier.predict([_as_bytes(v) for v in values], explain=explain)
        if getattr(self.classifier, "multi", False):
            return findings_frame(predictions, self.classifier.findings, explain)
        rows = []
        for p in predictions:
            row = {"label": p.label, "probability": p.probabilities[p.label] if p.label else None,
                   "probabilities": p.probabilities, "error_class": p.error_class, "error_message": p.error_message}
            if explain:
                row["heatmap_png"] = _png(p)
            rows.append(row)
        return pd.DataFrame(rows, columns=["label", "probability", "probabilities", "error_class", "error_message",
                                           *(["heatmap_png"] if explain else [])])


def _png(p: Any) -> str | None:
    return base64.b64encode(p.heatmap_png).decode("ascii") if p.heatmap_png else None


def findings_frame(predictions: list[Any], findings: list[str], explain: bool = False) -> pd.DataFrame:
    """A multi-label model's output: ``findings_positive``, one ``probability_<finding>`` column per finding,
    ``probabilities``, ``error_class``, ``error_message`` (+ ``heatmap_png``); a bad input's values are null."""
    from imgfeat.scoring.classifier import probability_columns

    columns = probability_columns(findings)
    rows = []
    for p in predictions:
        ok = p.error_class is None and p.probabilities is not None
        row = {"findings_positive": "|".join(p.positive) if ok else None}
        row.update({c: p.probabilities[f] if ok else None for c, f in zip(columns, findings, strict=True)})
        row.update(probabilities=p.probabilities, error_class=p.error_class, error_message=p.error_message)
        if explain:
            row["heatmap_png"] = _png(p)
        rows.append(row)
    names = ["findings_positive", *columns, "probabilities", "error_class", "error_message",
             *(["heatmap_png"] if explain else [])]
    return pd.DataFrame(rows, columns=names).astype({c: "float64" for c in columns})


def resolve_uri(model_uri: str) -> str:
    """The pyfunc model's URI for what a user names: ``runs:/RUN_ID`` (a child run of ``train``),
    ``models:/NAME/VERSION`` (or ``models:/NAME/latest``, or an alias: the registered run's pyfunc model, also when
    the registry holds its Spark model), or the pyfunc model's own URI or path (returned as is)."""
    from mlflow import MlflowClient

    if model_uri.startswith("runs:/"):
        rest = model_uri.removeprefix("runs:/").strip("/")
        return f"runs:/{rest}/{PYFUNC_MODEL}" if "/" not in rest else model_uri
    if model_uri.startswith("models:/") and not model_uri.startswith("models:/m-"):
        name, _, ref = model_uri.removeprefix("models:/").partition("/")
        if not ref and "@" in name:
            name, _, alias = name.partition("@")
            version = MlflowClient().get_model_version_by_alias(name, alias)
        elif ref in ("", "latest"):
            versions = MlflowClient().search_model_versions(f"name='{name}'")
            if not versions:
                raise ValueError(f"no registered model named {name!r} in {mlflow.get_tracking_uri()}")
            version = max(versions, key=lambda v: int(v.version))
        else:
            version = MlflowClient().get_model_version(name, ref)
        if not version.run_id:
            raise ValueError(f"{model_uri}: the registered version has no run; pass the pyfunc model's URI instead")
        return f"runs:/{version.run_id}/{PYFUNC_MODEL}"
    return model_uri
