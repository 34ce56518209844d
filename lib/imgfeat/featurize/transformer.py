"""``ImageFeaturizer``: a saveable Spark ML Transformer, images -> feature vector.

``inputCol`` is either a binary column of encoded file bytes (``spark.read.format("binaryFile")``) or a column of
Spark's image struct (``spark.read.format("image")``: already decoded pixels, converted from BGR exactly once).

Round-trips through ``Pipeline``/``PipelineModel.save/load`` (only JSON-serialisable params are
stored; weights are re-resolved from ``weights`` on load, pinned by ``weightsSha256`` if set).
"""

from __future__ import annotations

from typing import Any

from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.param.shared import (
    HasInputCol,
    HasOutputCol,
    Param,
    Params,
    TypeConverters,
)
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imgfeat.backbones.registry import get_backbone
from imgfeat.backbones.weights import WeightsSource
from imgfeat.io.decoders import DecodeOptions

# Driver-side cache of resolved weights: (model, weights, seed, sha) -> source.
_RESOLVED: dict[tuple[str, str, int, str], WeightsSource] = {}


class ImageFeaturizer(Transformer, HasInputCol, HasOutputCol, DefaultParamsReadable, DefaultParamsWritable):
    """Decode image bytes and run a frozen backbone; rows that fail get a null vector and an error."""

    modelName = Param(Params._dummy(), "modelName", "backbone name, e.g. resnet50 (keras) or efficientnet_lite0 (torch)", TypeConverters.toString)
    weights = Param(Params._dummy(), "weights", "imagenet | none | path to weights file", TypeConverters.toString)
    weightsSha256 = Param(Params._dummy(), "weightsSha256", "required sha256 of the weights file ('' = no pin)", TypeConverters.toString)
    seed = Param(Params._dummy(), "seed", "seed for weights=none", TypeConverters.toInt)
    imageSize = Param(Params._dummy(), "imageSize", "input size in pixels (0 = the backbone's)", TypeConverters.toInt)
    batchSize = Param(Params._dummy(), "batchSize", "images per model call", TypeConverters.toInt)
    resizeMode = Param(Params._dummy(), "resizeMode", "stretch | pad | crop", TypeConverters.toString)
    resample = Param(Params._dummy(), "resample", "nearest | bilinear | bicubic | lanczos | box", TypeConverters.toString)
    highBitDepth = Param(Params._dummy(), "highBitDepth", "minmax | full_range", TypeConverters.toString)
    maxPixels = Param(Params._dummy(), "maxPixels", "decompression-bomb guard: larger images are too_large", TypeConverters.toInt)
    jpegDraft = Param(Params._dummy(), "jpegDraft", "decode large JPEGs at reduced size first", TypeConverters.toBoolean)
    formats = Param(Params._dummy(), "formats", "image formats decoded, comma-separated", TypeConverters.toString)
    dicomWindow = Param(Params._dummy(), "dicomWindow", "DICOM intensities: auto | none | C,W | lung | mediastinum | bone",
                        TypeConverters.toString)
    volume = Param(Params._dummy(), "volume", "volumes: middle | mip (one vector per row; extract also does slices:N)",
                   TypeConverters.toString)
    outputType = Param(Params._dummy(), "outputType", "vector (ML Vector) | array (array<float>)", TypeConverters.toString)
    errorCol = Param(Params._dummy(), "errorCol", "column for decode errors ('' = none)", TypeConverters.toString)
    precision = Param(Params._dummy(), "precision", "fp32 | bf16 | fp16 (GPU): the arithmetic the features were made with",
                      TypeConverters.toString)
    tfThreads = Param(Params._dummy(), "tfThreads", "TensorFlow / PyTorch threads per worker (0 = automatic)", TypeConverters.toInt)

    @keyword_only
    def __init__(
        self,
        inputCol: str = "content",
        outputCol: str = "features",
        modelName: str = "resnet50",
        weights: str = "imagenet",
        weightsSha256: str = "",
        seed: int = 42,
        imageSize: int = 0,
        batchSize: int = 32,
        resizeMode: str = "stretch",
        resample: str = "bilinear",
        highBitDepth: str = "minmax",
        maxPixels: int = DecodeOptions.max_pixels,
        jpegDraft: bool = DecodeOptions.jpeg_draft,
        formats: str = ",".join(DecodeOptions.formats),
        dicomWindow: str = DecodeOptions.dicom_window,
        volume: str = DecodeOptions.volume,
        outputType: str = "vector",
        errorCol: str = "featurize_error",
        tfThreads: int = 0,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self._setDefault(
            inputCol="content", outputCol="features", modelName="resnet50", weights="imagenet",
            weightsSha256="", seed=42, imageSize=0, batchSize=32, resizeMode="stretch",
            resample="bilinear", highBitDepth="minmax", maxPixels=DecodeOptions.max_pixels,
            jpegDraft=DecodeOptions.jpeg_draft, formats=",".join(DecodeOptions.formats),
            dicomWindow=DecodeOptions.dicom_window, volume=DecodeOptions.volume, outputType="vector",
            errorCol="featurize_error", tfThreads=0, precision="fp32",
        )
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, **kwargs: Any) -> ImageFeaturizer:
        return self._set(**self._input_kwargs)

    def weights_source(self) -> WeightsSource:
        """The resolved weights (id, seed or file), cached on the driver."""
        from imgfeat.engines import resolve_weights

        key = (self.getOrDefault("modelName"), self.getOrDefault("weights"), self.getOrDefault("seed"), self.getOrDefault("weightsSha256"))
        if key not in _RESOLVED:
            _RESOLVED[key] = resolve_weights(get_backbone(key[0]), key[1], key[2], key[3] or None)
        return _RESOLVED[key]

    def decode_options(self) -> DecodeOptions:
        """Every decode setting of this stage (the same object extract builds from its config)."""
        get = self.getOrDefault
        return DecodeOptions(
            size=get("imageSize") or get_backbone(get("modelName")).input_size,
            resize_mode=get("resizeMode"),
            resample=get("resample"),
            high_bit_depth=get("highBitDepth"),
            max_pixels=get("maxPixels"),
            jpeg_draft=get("jpegDraft"),
            formats=tuple(f.strip().upper() for f in get("formats").split(",") if f.strip()),
            dicom_window=get("dicomWindow"),
            volume=get("volume"),
        )

    @classmethod
    def from_decode_options(cls, decode: DecodeOptions, **params: Any) -> ImageFeaturizer:
        """A stage whose decoding is exactly ``decode`` (e.g. the settings recorded with a features table)."""
        return cls(imageSize=decode.size, resizeMode=decode.resize_mode, resample=decode.resample,
                   highBitDepth=decode.high_bit_depth, maxPixels=decode.max_pixels, jpegDraft=decode.jpeg_draft,
                   formats=",".join(decode.formats), dicomWindow=decode.dicom_window, volume=decode.volume, **params)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        from pyspark.ml.functions import array_to_vector

        from imgfeat.featurize.udf import FeaturizeSpec, featurize_udf
        from imgfeat.session import tf_threads_for

        backbone = get_backbone(self.getOrDefault("modelName"))
        source = self.weights_source()
        spec = FeaturizeSpec(
            backbone=backbone,
            weights=source,
            decode=self.decode_options(),
            batch_size=self.getOrDefault("batchSize"),
            tf_threads=tf_threads_for(dataset.sparkSession, self.getOrDefault("tfThreads")),
            precision=self.getOrDefault("precision"),
        )
        spark = dataset.sparkSession
        data = source.read_bytes()
        udf = featurize_udf(spec, spark.sparkContext.broadcast(data) if data is not None else None)
        out_col, err_col = self.getOutputCol(), self.getOrDefault("errorCol")
        from pyspark.sql.types import BinaryType, StructType

        from imgfeat.io.decoders.spark_image import IMAGE_FIELDS, is_image_struct

        column = dataset.schema[self.getInputCol()]
        if isinstance(column.dataType, StructType):
            if not is_image_struct(column.dataType.fieldNames()):
                raise ValueError(f"inputCol {self.getInputCol()!r} is a struct without Spark's image fields "
                                 f"({', '.join(IMAGE_FIELDS)}): pass a binary column of file bytes or an image column")
            source = F.struct(*[F.col(f"{self.getInputCol()}.{f}").alias(f) for f in IMAGE_FIELDS])
        elif isinstance(column.dataType, BinaryType):
            source = F.col(self.getInputCol())
        else:
            raise ValueError(f"inputCol {self.getInputCol()!r} is {column.dataType.simpleString()}: ImageFeaturizer takes "
                             "file bytes (binary, spark.read.format('binaryFile')) or Spark's image struct "
                             "(spark.read.format('image'))")
        result = dataset.withColumn("_imgfeat_r", udf(source))
        # One vector per row: a volume's first selected slice (the middle one, or the projection, by default).
        features = F.element_at(F.col("_imgfeat_r.features"), 1)
        if self.getOrDefault("outputType") == "vector":
            features = F.when(features.isNotNull(), array_to_vector(features))
        result = result.withColumn(out_col, features)
        if err_col:
            result = result.withColumn(
                err_col,
                F.when(
                    F.col("_imgfeat_r.error_class").isNotNull(),
                    F.concat_ws(": ", F.col("_imgfeat_r.error_class"), F.col("_imgfeat_r.error_message")),
                ),
            )
        return result.drop("_imgfeat_r")
