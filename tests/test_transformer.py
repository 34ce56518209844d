import numpy as np
from pyspark.ml import Pipeline, PipelineModel
from pyspark.sql import functions as F

from imgfeat.featurize.transformer import ImageFeaturizer


def _images(spark, root):
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true")
    return reader.load(root).filter(~F.col("path").endswith(".txt")).select("path", "content")


def test_image_featurizer_round_trips_through_pipeline_save_load(spark, samples, tmp_path):
    stage = ImageFeaturizer(modelName="tiny", weights="none", batchSize=4, outputType="vector")
    model = Pipeline(stages=[stage]).fit(_images(spark, samples.root))
    path = str(tmp_path / "pipeline")
    model.save(path)
    loaded = PipelineModel.load(path)
    (restored,) = loaded.stages
    assert isinstance(restored, ImageFeaturizer)
    assert restored.getOrDefault("modelName") == "tiny" and restored.getOrDefault("batchSize") == 4

    before = {r["path"]: r for r in model.transform(_images(spark, samples.root)).collect()}
    after = {r["path"]: r for r in loaded.transform(_images(spark, samples.root)).collect()}
    assert before.keys() == after.keys() and len(after) == samples.valid + len(samples.bad) - 1  # Spark's scan skips the empty file
    good = [p for p, r in after.items() if r["featurize_error"] is None]
    assert len(good) == samples.valid
    for p in good:
        np.testing.assert_allclose(after[p]["features"].toArray(), before[p]["features"].toArray(), rtol=1e-6)
        assert after[p]["features"].size == 16
    bad = [r for r in after.values() if r["featurize_error"] is not None]
    assert all(r["features"] is None for r in bad)
    assert {r["featurize_error"].split(":")[0] for r in bad} == {"truncated", "not_an_image", "unsupported_format", "too_large"}


def test_array_output_type(spark, samples):
    stage = ImageFeaturizer(modelName="tiny", weights="none", outputType="array", outputCol="f", errorCol="")
    out = stage.transform(_images(spark, samples.root).limit(3))
    assert "featurize_error" not in out.columns
    assert dict(out.dtypes)["f"] == "array<float>"
