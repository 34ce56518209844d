"""MLflow set-up in one place: tracking URI, experiment, and the pip requirements of logged models."""

from __future__ import annotations

import os
from typing import Any

from imgfeat.config import Config

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; with it, on its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tracking_uri(cfg: Config) -> str:
    """``mlflow.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` (working directory)."""
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def use_tracking(cfg: Config) -> str:
    """Point MLflow at the configured store; returns the URI."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return uri


def use_experiment(cfg: Config, create: bool = True) -> str:
    """The experiment id of ``mlflow.experiment`` (created when missing and ``create``)."""
    import mlflow

    use_tracking(cfg)
    name = cfg.mlflow.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        if not create:
            raise ValueError(
                f"MLflow experiment {name!r} does not exist in {tracking_uri(cfg)}; run `imgfeat train` first, "
                "or pass --experiment/--tracking-uri for the store where you trained"
            )
        mlflow.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND and create:
        # Experiments made before this tag (or by hand) open in MLflow 3's GenAI traces view, not on their runs.
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged imgfeat model (explicit: inference would start a second Spark)."""
    from importlib import metadata

    reqs: list[str] = []
    for dist in ("pyspark", "tensorflow-cpu", "tensorflow", "keras", "numpy", "pandas", "pyarrow", "Pillow", "PyYAML", "mlflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def model_signature() -> Any:
    """Input: raw image bytes in ``content``; output: the predicted class name."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "content")]), outputs=Schema([ColSpec("string", "prediction")]))
