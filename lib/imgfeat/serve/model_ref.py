"""What ``imgfeat predict`` reports (``PredictResult``) and what a model URI resolves to (``ModelRef``): the rows
of the predictions table are keyed by the model a URI points to now, not by the URI's text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PredictResult:
    model_uri: str
    model_key: str
    model_version: str | None
    listed: int
    already_done: int
    processed: int  # = predicted + failed
    predicted: int
    failed: int
    replaced: int
    predictions_path: str
    errors_path: str
    format: str
    labels: list[str]
    predicted_counts: dict[str, int] = field(default_factory=dict)  # multi-label: images each finding is called in
    seconds: float = 0.0
    task: str = "single"  # single | multi (labels are then the findings)
    studies_path: str | None = None  # predict.aggregate: the table of one row per study (series, patient)
    studies: int = 0  # rows in it for this model
    unkeyed: int = 0  # predicted images without a study key: in no study row (listed in the summary)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"[imgfeat] predict {self.model_uri}"
            f"{f' (version {self.model_version})' if self.model_version else ''} = {self.model_key}: listed {self.listed} image files; {self.already_done} already done; "
            f"processed {self.processed} = predicted {self.predicted} + failed {self.failed} in {self.seconds:.1f}s\n"
            f"[imgfeat]   {'called findings' if self.task == 'multi' else 'predicted classes'}: {self.predicted_counts}\n"
            f"[imgfeat]   predictions ({self.format}): {self.predictions_path}\n"
            f"[imgfeat]   errors      ({self.format}): {self.errors_path}"
            + (f"\n[imgfeat]   studies     ({self.format}): {self.studies_path}: {self.studies} rows"
               f"{f'; {self.unkeyed} predicted images have no key and are in none' if self.unkeyed else ''}"
               if self.studies_path else "")
        )


@dataclass(frozen=True)
class ModelRef:
    """What a model URI points to now: the predictions table is keyed by ``key``, not by the URI's text, so
    ``models:/NAME/latest`` after a new version re-scores, and the same model by two URIs never writes twice."""

    uri: str  # as the user gave it
    key: str  # models:/<logged model id> (MLflow 3), else runs:/<run id>/<artifact path>, else the URI
    run_id: str | None
    version: str | None  # the registry version for models:/NAME/... URIs


def resolve_model(uri: str) -> ModelRef:
    from mlflow.models import get_model_info

    info = get_model_info(uri)
    model_id = getattr(info, "model_id", None)
    key = f"models:/{model_id}" if model_id else (f"runs:/{info.run_id}/{info.artifact_path}" if info.run_id else uri)
    return ModelRef(uri=uri, key=key, run_id=info.run_id, version=registry_version(uri))


def registry_version(uri: str) -> str | None:
    """The registry version a ``models:/NAME/...`` URI points to now; None for other URIs."""
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return None
    import mlflow
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    return str(get_model_name_and_version(mlflow.MlflowClient(), uri)[1])
