"""The ``keras`` head: a small Keras classifier on the features, fed by Petastorm.

Training: the training split goes through Petastorm's ``make_spark_converter`` -> ``tf.data``.
The fitted head is a Spark ML ``Model`` (``KerasHeadModel``) whose params hold the architecture
settings and the weights (base64 ``.npz``), so it saves and loads inside the same ``PipelineModel``
as the MLlib heads and is evaluated and logged exactly like them.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Model
from pyspark.ml.param.shared import HasFeaturesCol, HasPredictionCol, HasProbabilityCol, Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable

from imgfeat.config import KerasHeadConfig

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


def build_keras_head(input_dim: int, n_classes: int, hidden_units: int) -> Any:
    """Softmax regression (hidden_units=0) or one hidden ReLU layer + softmax; built in code."""
    import keras

    inputs = keras.Input((input_dim,))
    x = inputs
    if hidden_units:
        x = keras.layers.Dense(hidden_units, activation="relu")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="imgfeat_head")


def weights_to_b64(arrays: list[np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez_compressed(buf, *arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def weights_from_b64(text: str) -> list[np.ndarray]:
    data = np.load(io.BytesIO(base64.b64decode(text)))
    return [data[f"arr_{i}"] for i in range(len(data.files))]


class KerasHeadModel(Model, HasFeaturesCol, HasPredictionCol, HasProbabilityCol, DefaultParamsReadable, DefaultParamsWritable):
    """features (vector) -> probability (vector) and prediction (class index, double)."""

    inputDim = Param(Params._dummy(), "inputDim", "feature width", TypeConverters.toInt)
    numClasses = Param(Params._dummy(), "numClasses", "number of classes", TypeConverters.toInt)
    hiddenUnits = Param(Params._dummy(), "hiddenUnits", "hidden layer width (0 = softmax only)", TypeConverters.toInt)
    weightsB64 = Param(Params._dummy(), "weightsB64", "the layer weights, base64 .npz", TypeConverters.toString)

    @keyword_only
    def __init__(
        self,
        featuresCol: str = "features",
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        inputDim: int = 0,
        numClasses: int = 2,
        hiddenUnits: int = 0,
        weightsB64: str = "",
    ) -> None:
        super().__init__()
        self._setDefault(featuresCol="features", predictionCol="prediction", probabilityCol="probability",
                         inputDim=0, numClasses=2, hiddenUnits=0, weightsB64="")
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, **kwargs: Any) -> KerasHeadModel:
        return self._set(**self._input_kwargs)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        from pyspark.ml.functions import array_to_vector, vector_to_array
        from pyspark.sql import functions as F
        from pyspark.sql.functions import pandas_udf

        dims = (self.getOrDefault("inputDim"), self.getOrDefault("numClasses"), self.getOrDefault("hiddenUnits"))
        weights = self.getOrDefault("weightsB64")

        @pandas_udf("array<double>")
        def predict(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            model = build_keras_head(*dims)
            model.set_weights(weights_from_b64(weights))
            for batch in batches:
                out: list[Any] = [None] * len(batch)
                ok = [i for i, v in enumerate(batch) if v is not None]
                if ok:
                    x = np.stack([np.asarray(batch.iloc[i], dtype=np.float32) for i in ok])
                    proba = model.predict(x, verbose=0, batch_size=1024).astype(np.float64)
                    for j, i in enumerate(ok):
                        out[i] = proba[j].tolist()
                yield pd.Series(out)

        tmp = "_imgfeat_keras_proba"
        result = dataset.withColumn(tmp, predict(vector_to_array(F.col(self.getFeaturesCol()))))
        result = result.withColumn(self.getProbabilityCol(), F.when(F.col(tmp).isNotNull(), array_to_vector(F.col(tmp))))
        argmax = (F.array_position(F.col(tmp), F.array_max(F.col(tmp))) - 1).cast("double")
        return result.withColumn(self.getPredictionCol(), argmax).drop(tmp)


def _feature_moments(train: DataFrame, features_col: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Row count, per-feature mean of the training rows, and one common scale: the root mean square of
    the per-feature standard deviations (as a vector, for ``fold_standardization``). One Spark job.

    One scale for all features keeps their relative sizes: dividing each by its own deviation blows
    up near-constant features (deviations of 1e-5 beside 1.0 in CNN features) and lets their outliers
    on new images dominate. It still fixes the overall scale (InceptionV3's features are ~1e-4).
    """
    from pyspark.ml.stat import Summarizer
    from pyspark.sql import functions as F

    summary = Summarizer.metrics("count", "mean", "std").summary(F.col(features_col))
    stats = train.select(summary.alias("s")).first()["s"]
    mean = stats["mean"].toArray().astype(np.float32)
    scale = float(np.sqrt(np.mean(np.square(stats["std"].toArray()))))
    return int(stats["count"]), mean, np.full_like(mean, scale if scale > 1e-12 else 1.0)


def fold_standardization(weights: list[np.ndarray], mean: np.ndarray, std: np.ndarray) -> list[np.ndarray]:
    """Weights of the same network taking raw features: the first Dense layer absorbs (x - mean) / std."""
    kernel, bias, *rest = weights
    folded_kernel = kernel / std[:, None]
    folded_bias = bias - (mean / std) @ kernel
    return [folded_kernel.astype(kernel.dtype), folded_bias.astype(bias.dtype), *rest]


def train_keras_head(
    spark: SparkSession,
    train: DataFrame,
    n_classes: int,
    input_dim: int,
    kc: KerasHeadConfig,
    seed: int,
    class_weight: dict[int, float] | None,
    features_col: str,
    label_col: str,
    prediction_col: str,
) -> tuple[KerasHeadModel, dict[str, Any]]:
    """Fit the head on ``train`` (vector features, integer label index) through Petastorm."""
    import keras

    n, mean, std = _feature_moments(train, features_col)
    converter = _petastorm_converter(spark, train, kc.cache_dir, features_col, label_col)
    keras.utils.set_random_seed(seed)
    model = build_keras_head(input_dim, n_classes, kc.hidden_units)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=kc.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    steps = max(1, math.ceil(n / kc.batch_size))
    try:
        with converter.make_tf_dataset(batch_size=kc.batch_size, num_epochs=None, workers_count=2, seed=seed) as dataset:
            # Centred and scaled inputs: raw CNN features differ in overall scale by orders of magnitude
            # between backbones, and plain gradient descent converges poorly on tiny ones.
            dataset = dataset.map(lambda row: ((row.features - mean) / std, row.label))
            history = model.fit(dataset, epochs=kc.epochs, steps_per_epoch=steps, class_weight=class_weight, verbose=0)
    finally:
        converter.delete()
    head = KerasHeadModel(featuresCol=features_col, predictionCol=prediction_col, inputDim=input_dim,
                          numClasses=n_classes, hiddenUnits=kc.hidden_units,
                          weightsB64=weights_to_b64(fold_standardization(model.get_weights(), mean, std)))
    return head, _keras_params(kc, history)


def _petastorm_converter(spark: SparkSession, train: DataFrame, cache_dir: str, features_col: str,
                         label_col: str) -> Any:
    """The training rows (float32 features, int label) materialized by Petastorm's ``make_spark_converter``."""
    from petastorm.spark import SparkDatasetConverter, make_spark_converter
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, cache_dir)
    frame = train.select(
        vector_to_array(F.col(features_col), "float32").alias("features"),
        F.col(label_col).cast("int").alias("label"),
    )
    return make_spark_converter(frame)


def _keras_params(kc: KerasHeadConfig, history: Any) -> dict[str, Any]:
    """The head's params to log."""
    return {
        "hidden_units": kc.hidden_units,
        "epochs": kc.epochs,
        "batch_size": kc.batch_size,
        "learning_rate": kc.learning_rate,
        "optimizer": "adam",
        "input_scaling": "centred, one common scale",
        "fed_by": "petastorm.make_spark_converter",
        "final_train_loss": round(float(history.history["loss"][-1]), 6),
    }
