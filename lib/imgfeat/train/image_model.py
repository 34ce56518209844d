"""The two models every ``train`` child run and every ``finetune`` run logs, from one featurizer and one head.

``model``: a Spark ``PipelineModel`` of ``ImageFeaturizer`` (raw image bytes in ``content``) + the fitted head +
``IndexToString`` (class names in ``prediction``), for ``imgfeat predict``. ``pyfunc_model``: imgfeat's flavour
(``imgfeat.scoring.flavor``): the featurizer's settings and the head as arrays, for ``imgfeat serve``.

A multi-label run (``log_findings_model``) logs ``model`` = ``ImageFeaturizer`` + ``FindingsHeadModel``
(``imgfeat.train.findings_model``: ``finding_probability`` and ``finding_prediction`` out, the findings and the
thresholds in its params) and a ``pyfunc_model`` whose classifier.json has task multi, the findings and thresholds.
"""

from __future__ import annotations

from typing import Any

from imgfeat.scoring.flavor import ClassifierInfo
from imgfeat.scoring.heads import HeadArrays
from imgfeat.train.heads import PREDICTION_COL


def classifier_info(featurizer: Any, labels: list[str], head_name: str, head_kind: str,
                    run_id: str | None, **extra: Any) -> tuple[ClassifierInfo, str | None]:
    """(the pyfunc model's description, the weights file it carries or None) for a featurizer stage and a head;
    ``extra``: ``findings``, ``thresholds``, ``aggregation`` (``ClassifierInfo.describe``)."""
    source = featurizer.weights_source()
    get = featurizer.getOrDefault
    info = ClassifierInfo.describe(
        model_name=get("modelName"), weights=get("weights"), weights_sha256=get("weightsSha256"), seed=get("seed"),
        weights_id=source.weights_id, decode=featurizer.decode_options(), precision=get("precision"), labels=labels,
        head_name=head_name, head_kind=head_kind, run_id=run_id, **extra)
    return info, source.path if source.is_user_file else None


def log_findings_model(featurizer: Any, stage: Any, head_name: str, run_id: str) -> None:
    """Log a multi-label run's ``model`` (featurizer + ``FindingsHeadModel`` ``stage``) and ``pyfunc_model``."""
    import mlflow.spark
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array
    from pyspark.ml import PipelineModel

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.scoring import flavor

    model_name = featurizer.getOrDefault("modelName")
    formats = featurizer.decode_options().formats
    requirements = flavor.get_default_pip_requirements(get_backbone(model_name).engine, model_name, formats, spark=True)
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "content")]), outputs=Schema([
        ColSpec(Array(DataType.double), stage.getProbabilityCol()), ColSpec(Array(DataType.string), stage.getPredictionCol())]))
    mlflow.spark.log_model(PipelineModel(stages=[featurizer, stage]), artifact_path=flavor.SPARK_MODEL,
                           pip_requirements=requirements, signature=signature)
    arrays, findings = stage.head(), stage.getFindings()
    info, weights_file = classifier_info(featurizer, findings, head_name, arrays.kind, run_id, findings=findings,
                                         thresholds=stage.getThresholds(), aggregation=stage.getAggregation())
    flavor.log_model(info, arrays, weights_file)


def log_image_model(featurizer: Any, head: Any, labels: list[str], head_name: str, run_id: str,
                    arrays: HeadArrays | None = None, aggregation: str | None = None) -> None:
    """Log the active run's ``model`` and ``pyfunc_model``; ``arrays``: the head as arrays (default: exported from
    the fitted ``head``); ``aggregation``: how a study's images combine (recorded in classifier.json)."""
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
    info, weights_file = classifier_info(featurizer, labels, head_name, arrays.kind, run_id, aggregation=aggregation)
    flavor.log_model(info, arrays, weights_file)


def spark_signature() -> Any:
    """The Spark model's: raw image bytes in ``content``; the predicted class name out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "content")]), outputs=Schema([ColSpec("string", "prediction")]))
