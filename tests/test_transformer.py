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


INFERENCE = {"threads": 3, "device": "cpu", "decodeThreads": 2, "prefetch": False, "compile": True,
             "jpegDecoder": "nvjpeg", "labelTag": "BodyPartExamined", "batchSize": 8, "precision": "bf16"}


def test_the_stage_carries_every_inference_setting_into_its_spec(spark):
    """Built by the same function as extract's and predict's spec: device, decode threads, prefetch, the JPEG
    decoder and the label tag travel too; a Keras backbone decodes with Pillow, uncompiled, as in extract."""
    stage = ImageFeaturizer(modelName="tiny_torch", weights="none", **INFERENCE)
    assert (stage.getThreads(), stage.getDevice(), stage.getJpegDecoder()) == (3, "cpu", "nvjpeg")
    spec = stage.featurize_spec(spark)
    assert (spec.threads, spec.device, spec.decode_threads, spec.prefetch, spec.compile, spec.jpeg_decoder,
            spec.label_tag, spec.batch_size, spec.precision) == (3, "cpu", 2, False, True, "nvjpeg", "BodyPartExamined",
                                                                 8, "bf16")
    keras = ImageFeaturizer(modelName="tiny", weights="none", jpegDecoder="nvjpeg", compile=True).featurize_spec(spark)
    assert (keras.jpeg_decoder, keras.compile, keras.label_tag) == ("pillow", False, None)
    assert stage.setDevice("gpu").setDecodeThreads(4).featurize_spec(spark).decode_threads == 4


def test_saved_stages_keep_every_param_and_stages_saved_before_the_rename_still_load(spark, tmp_path):
    import glob
    import json
    import os

    path = str(tmp_path / "stage")
    ImageFeaturizer(modelName="tiny", weights="none", **INFERENCE).save(path)
    loaded = ImageFeaturizer.load(path)
    assert {name: loaded.getOrDefault(name) for name in INFERENCE} == INFERENCE
    # As an older version saved it: tfThreads instead of threads, none of the newer params.
    (meta,) = glob.glob(os.path.join(path, "metadata", "part-*"))
    data = json.loads(open(meta).read())
    for section in ("paramMap", "defaultParamMap"):
        data[section]["tfThreads"] = data[section].pop("threads")
        for name in ("device", "decodeThreads", "prefetch", "compile", "jpegDecoder", "labelTag"):
            data[section].pop(name)
    open(meta, "w").write(json.dumps(data))
    for checksum in glob.glob(os.path.join(path, "metadata", ".*.crc")):  # Hadoop's checksum of the old text
        os.remove(checksum)
    old = ImageFeaturizer.load(path)
    assert (old.getThreads(), old.getBatchSize(), old.getDevice(), old.getPrefetch(), old.getJpegDecoder()) == (
        3, 8, "auto", True, "pillow")
