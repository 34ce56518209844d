"""MLflow set-up in one place: tracking URI and experiment (the logged models: ``train.image_model``)."""

from __future__ import annotations

import os

from imgfeat.config.schema import MlflowConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; with it, on its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tracking_uri(settings: MlflowConfig) -> str:
    """``mlflow.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` (working directory)."""
    return settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def use_tracking(settings: MlflowConfig) -> str:
    """Point MLflow at the configured store (the ``mlflow`` settings); returns the URI."""
    import mlflow

    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    return uri


def use_experiment(settings: MlflowConfig, create: bool = True) -> str:
    """The experiment id of ``mlflow.experiment`` (created when missing and ``create``)."""
    import mlflow

    use_tracking(settings)
    name = settings.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        if not create:
            raise ValueError(
                f"MLflow experiment {name!r} does not exist in {tracking_uri(settings)}; run `imgfeat train` first, "
                "or pass --experiment/--tracking-uri for the store where you trained"
            )
        mlflow.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND and create:
        # Experiments made before this tag (or by hand) open in MLflow 3's GenAI traces view, not on their runs.
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id
