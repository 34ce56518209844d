"""sparkdl users change one import: the study's snippet runs on imgfeat, on the image source and on file bytes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.sql import functions as F

from imgfeat.demo.samples import encode, realistic_xray_array


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Class folders of PNGs (lossless: Spark's image source and Pillow decode them to the same pixels)."""
    root = tmp_path_factory.mktemp("sparkdl")
    rng = np.random.default_rng(3)
    for label, sick in (("NORMAL", False), ("PNEUMONIA", True)):
        os.makedirs(root / label)
        for i in range(8):
            data, _ = encode(realistic_xray_array(rng, (120, 100), sick), "rgb_png" if i % 2 else "rgba_png")
            (root / label / f"{i}.png").write_bytes(data)
    return str(root)


@pytest.fixture()
def imagenet_cache(tmp_path, monkeypatch):
    """sparkdl's default weights are ImageNet's: put a (randomly initialised) ResNet50 file where Keras keeps them,
    in the legacy HDF5 layout of Keras' published ``*_notop.h5`` files."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.backbones.weights import keras_cache_path
    from imgfeat.engines.keras import build_architecture

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    backbone = get_backbone("resnet50")
    path = keras_cache_path(backbone)
    os.makedirs(os.path.dirname(path))
    with h5py.File(path, "w") as fh:
        legacy_h5_format.save_weights_to_hdf5_group(fh, build_architecture(backbone))
    return path


def _labelled(df, path_col):
    return df.withColumn("label", F.when(F.col(path_col).contains("/PNEUMONIA/"), 1.0).otherwise(0.0))


def test_the_sparkdl_snippet_runs_with_one_import_changed(spark, folder, imagenet_cache, tmp_path):
    from imgfeat.compat.sparkdl import DeepImageFeaturizer  # was: from sparkdl import DeepImageFeaturizer

    images = spark.read.format("image").load(os.path.join(folder, "*"))            # struct<origin,...,data>
    train = _labelled(images, "image.origin")
    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features", modelName="ResNet50")
    model = Pipeline(stages=[featurizer, LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3)]).fit(train)

    scored = model.transform(train).select("image.origin", "features", "prediction").collect()
    assert len(scored) == 16 and all(r["features"].size == 2048 for r in scored)
    model.save(str(tmp_path / "pipeline"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    assert type(loaded.stages[0]).__name__ == "DeepImageFeaturizer" and loaded.stages[0].getModelName() == "ResNet50"
    again = {r["origin"]: r for r in loaded.transform(train).select("image.origin", "features", "prediction").collect()}
    for r in scored:
        assert again[r["origin"]]["prediction"] == r["prediction"]
        np.testing.assert_allclose(again[r["origin"]]["features"].toArray(), r["features"].toArray(), rtol=1e-6)

    # The same images as file bytes give the same features (PNG: both decoders agree on the pixels).
    files = spark.read.format("binaryFile").load(os.path.join(folder, "*"))
    from_bytes = DeepImageFeaturizer(inputCol="content", outputCol="features", modelName="ResNet50").transform(files)
    by_path = {r["path"]: r["features"].toArray() for r in from_bytes.select("path", "features").collect()}
    for r in scored:
        np.testing.assert_allclose(by_path[r["origin"].replace("file:///", "file:/")], r["features"].toArray(),
                                   rtol=1e-5, atol=1e-5)


def test_invalid_image_source_rows_get_a_null_vector_and_an_error(spark, folder, tmp_path):
    from imgfeat.featurize.transformer import ImageFeaturizer

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "not_an_image.png").write_bytes(b"not an image at all" * 10)
    images = spark.read.format("image").option("dropInvalid", "false").load(str(broken))
    (row,) = ImageFeaturizer(inputCol="image", modelName="tiny", weights="none").transform(images).collect()
    assert row["features"] is None and row["featurize_error"].startswith("not_an_image: Spark's image data source")


def test_sparkdl_names_options_and_missing_classes_fail_clearly():
    from imgfeat.compat import sparkdl

    assert set(sparkdl.MODEL_NAMES) == {"InceptionV3", "Xception", "ResNet50", "VGG16", "VGG19"}
    featurizer = sparkdl.DeepImageFeaturizer(modelName="Xception", scaleHint="SCALE_FAST", weights="none")
    assert featurizer.getOrDefault("modelName") == "xception" and featurizer.getOrDefault("resample") == "nearest"
    with pytest.raises(ValueError, match="unknown modelName 'AlexNet'.*InceptionV3"):
        sparkdl.DeepImageFeaturizer(modelName="AlexNet")
    with pytest.raises(ValueError, match="unknown scaleHint"):
        sparkdl.DeepImageFeaturizer(scaleHint="SCALE_WHATEVER")
    with pytest.raises(ImportError, match="DeepImagePredictor: imgfeat's backbones have no ImageNet classifier"):
        from imgfeat.compat.sparkdl import DeepImagePredictor  # noqa: F401
