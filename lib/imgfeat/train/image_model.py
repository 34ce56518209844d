"""The two models every ``train`` child run and every ``finetune`` run logs, from one featurizer and one head.

``model``: a Spark ``PipelineModel`` of ``ImageFeaturizer`` (raw image bytes in ``content``) + the fitted head +
``IndexToString`` (class names in ``prediction``), for ``imgfeat predict``. ``pyfunc_model``: imgfeat's flavour
(``imgfeat.scoring.flavor``): the featurizer's settings and the head as arrays, for ``imgfeat serve``.
"""

from __future__ import annotations

from typing import Any

from imgfeat.scoring.flavor import ClassifierInfo
from imgfeat.scoring.heads import HeadArrays
from imgfeat.train.heads import PREDICTION_COL


def classifier_info(featurizer: Any, labels: list[str], head_name: str, head_kind: str,
                    run_id: str | None) -> tuple[ClassifierInfo, str | None]:
    """(the pyfunc model's description, the weights file it carries or None) for a featurizer stage and a head."""
    source = featurizer.weights_source()
    get = featurizer.getOrDefault
    info = ClassifierInfo.describe(
        model_name=get("modelName"), weights=get("weights"), weights_sha256=get("weightsSha256"), seed=get("seed"),
        weights_id=source.weights_id, decode=featurizer.decode_options(), precision=get("precision"), labels=labels,
        head_name=head_name, head_kind=head_kind, run_id=run_id)
    return info, source.path if source.is_user_file else None


def log_image_model(featurizer: Any, head: Any, labels: list[str], head_name: str, run_id: str,
                    arrays: HeadArrays | None = None) -> None:
    """Log the active run's ``model`` and ``pyfunc_model``; ``arrays``: the head as arrays (default: exported from
    the fitted ``head``)."""
    import mlflow.spark
    from pyspark.ml import PipelineModel
    from pyspark.ml.feature import IndexToString

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.scoring import flavor
    from imgfeat.train.export import export_head

    model_name = featurizer.getOrDefault("modelName")
    formats = featurizer.decode_options().formats
    converter = IndexToString(inputCol=PREDICTION_COL, outputCol="prediction", labels=labels)
    requirements = flavor.get_default_pip_requirements(get_backbone(model_name).engine, model_name, formats, spark=True)
    mlflow.spark.log_model(PipelineModel(stages=[featurizer, head, converter]), artifact_path=flavor.SPARK_MODEL,
                           pip_requirements=requirements, signature=spark_signature())
    arrays = arrays if arrays is not None else export_head(head)
    info, weights_file = classifier_info(featurizer, labels, head_name, arrays.kind, run_id)
    flavor.log_model(info, arrays, weights_file)


def spark_signature() -> Any:
    """The Spark model's: raw image bytes in ``content``; the predicted class name out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "content")]), outputs=Schema([ColSpec("string", "prediction")]))
