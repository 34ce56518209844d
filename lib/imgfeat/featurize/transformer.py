"""``ImageFeaturizer``: a saveable Spark ML Transformer, images -> feature vector.

``inputCol`` is either a binary column of encoded file bytes (``spark.read.format("binaryFile")``) or a column of
Spark's image struct (``spark.read.format("image")``: already decoded pixels, converted from BGR exactly once).

Round-trips through ``Pipeline``/``PipelineModel.save/load`` (only JSON-serialisable params are
stored; weights are re-resolved from ``weights`` on load, pinned by ``weightsSha256`` if set).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.param.shared import HasInputCol, HasOutputCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsReader, DefaultParamsWritable
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imgfeat.backbones.registry import get_backbone
from imgfeat.backbones.weights import WeightsSource
from imgfeat.featurize.params import DEFAULTS, HasBackbone, HasDecodeOptions, HasFeaturizerOutput, HasInferenceOptions
from imgfeat.io.decoders import DecodeOptions

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from imgfeat.featurize.spec import FeaturizeSpec

# Driver-side cache of resolved weights: (model, weights, seed, sha) -> source.
_RESOLVED: dict[tuple[str, str, int, str], WeightsSource] = {}
# Params renamed since stages were first saved: old name -> new name (read from saved stages as the new one).
RENAMED_PARAMS = {"tfThreads": "threads"}


class _Reader(DefaultParamsReader):
    """Pyspark's reader of saved stages, reading the params that were renamed by their new names."""

    def load(self, path: str) -> Any:
        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        for section in ("paramMap", "defaultParamMap"):
            values = metadata.get(section) or {}
            for old, new in RENAMED_PARAMS.items():
                if old in values:
                    values.setdefault(new, values.pop(old))
        module, _, name = metadata["class"].rpartition(".")
        instance = getattr(importlib.import_module(module), name)()
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        return instance


class ImageFeaturizer(Transformer, HasInputCol, HasOutputCol, HasBackbone, HasDecodeOptions, HasInferenceOptions,
                      HasFeaturizerOutput, DefaultParamsReadable, DefaultParamsWritable):
    """Decode image bytes and run a frozen backbone; rows that fail get a null vector and an error."""

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
        threads: int = 0,
        precision: str = "fp32",
        device: str = "auto",
        decodeThreads: int = 1,
        prefetch: bool = True,
        compile: bool = False,
        jpegDecoder: str = "pillow",
        labelTag: str = "",
    ) -> None:
        super().__init__()
        self._setDefault(inputCol="content", outputCol="features", **DEFAULTS)
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, **kwargs: Any) -> ImageFeaturizer:
        return self._set(**self._input_kwargs)

    @classmethod
    def read(cls) -> _Reader:
        """Reads stages saved by this and earlier versions (``tfThreads``, now ``threads``)."""
        return _Reader(cls)

    # Setters, one per Param (the getters come with the Params: imgfeat.featurize.params).
    def setModelName(self, value: str) -> ImageFeaturizer:
        return self._set(modelName=value)

    def setWeights(self, value: str) -> ImageFeaturizer:
        return self._set(weights=value)

    def setWeightsSha256(self, value: str) -> ImageFeaturizer:
        return self._set(weightsSha256=value)

    def setSeed(self, value: int) -> ImageFeaturizer:
        return self._set(seed=value)

    def setImageSize(self, value: int) -> ImageFeaturizer:
        return self._set(imageSize=value)

    def setResizeMode(self, value: str) -> ImageFeaturizer:
        return self._set(resizeMode=value)

    def setResample(self, value: str) -> ImageFeaturizer:
        return self._set(resample=value)

    def setHighBitDepth(self, value: str) -> ImageFeaturizer:
        return self._set(highBitDepth=value)

    def setMaxPixels(self, value: int) -> ImageFeaturizer:
        return self._set(maxPixels=value)

    def setJpegDraft(self, value: bool) -> ImageFeaturizer:
        return self._set(jpegDraft=value)

    def setFormats(self, value: str) -> ImageFeaturizer:
        return self._set(formats=value)

    def setDicomWindow(self, value: str) -> ImageFeaturizer:
        return self._set(dicomWindow=value)

    def setVolume(self, value: str) -> ImageFeaturizer:
        return self._set(volume=value)

    def setBatchSize(self, value: int) -> ImageFeaturizer:
        return self._set(batchSize=value)

    def setThreads(self, value: int) -> ImageFeaturizer:
        return self._set(threads=value)

    def setDevice(self, value: str) -> ImageFeaturizer:
        return self._set(device=value)

    def setPrecision(self, value: str) -> ImageFeaturizer:
        return self._set(precision=value)

    def setDecodeThreads(self, value: int) -> ImageFeaturizer:
        return self._set(decodeThreads=value)

    def setPrefetch(self, value: bool) -> ImageFeaturizer:
        return self._set(prefetch=value)

    def setCompile(self, value: bool) -> ImageFeaturizer:
        return self._set(compile=value)

    def setJpegDecoder(self, value: str) -> ImageFeaturizer:
        return self._set(jpegDecoder=value)

    def setOutputType(self, value: str) -> ImageFeaturizer:
        return self._set(outputType=value)

    def setErrorCol(self, value: str) -> ImageFeaturizer:
        return self._set(errorCol=value)

    def setLabelTag(self, value: str) -> ImageFeaturizer:
        return self._set(labelTag=value)

    def setInputCol(self, value: str) -> ImageFeaturizer:
        return self._set(inputCol=value)

    def setOutputCol(self, value: str) -> ImageFeaturizer:
        return self._set(outputCol=value)

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

    def featurize_spec(self, spark: SparkSession) -> FeaturizeSpec:
        """The workers' spec of this stage: built as extract and predict build theirs (``featurize.spec``)."""
        from imgfeat.config.schema import InferenceConfig
        from imgfeat.featurize.spec import featurize_spec
        from imgfeat.session import threads_for

        get = self.getOrDefault
        inference = InferenceConfig(batch_size=get("batchSize"), threads=get("threads"), device=get("device"),
                                    precision=get("precision"), decode_threads=get("decodeThreads"),
                                    prefetch=get("prefetch"), jpeg_decoder=get("jpegDecoder"), compile=get("compile"))
        return featurize_spec(get_backbone(get("modelName")), self.weights_source(), self.decode_options(), inference,
                              threads_for(spark, inference.threads), label_tag=get("labelTag") or None)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        from pyspark.ml.functions import array_to_vector

        from imgfeat.featurize.job import broadcast_weights
        from imgfeat.featurize.udf import featurize_udf

        spark = dataset.sparkSession
        spec = self.featurize_spec(spark)
        udf = featurize_udf(spec, broadcast_weights(spark, spec.weights))
        out_col, err_col = self.getOutputCol(), self.getOrDefault("errorCol")
        source = self._input_column(dataset)
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

    def _input_column(self, dataset: DataFrame) -> Any:
        """The UDF's input: the file bytes, or the image struct's fields in Spark's order."""
        from pyspark.sql.types import BinaryType, StructType

        from imgfeat.io.decoders.spark_image import IMAGE_FIELDS, is_image_struct

        column = dataset.schema[self.getInputCol()]
        if isinstance(column.dataType, StructType):
            if not is_image_struct(column.dataType.fieldNames()):
                raise ValueError(f"inputCol {self.getInputCol()!r} is a struct without Spark's image fields "
                                 f"({', '.join(IMAGE_FIELDS)}): pass a binary column of file bytes or an image column")
            return F.struct(*[F.col(f"{self.getInputCol()}.{f}").alias(f) for f in IMAGE_FIELDS])
        if isinstance(column.dataType, BinaryType):
            return F.col(self.getInputCol())
        raise ValueError(f"inputCol {self.getInputCol()!r} is {column.dataType.simpleString()}: ImageFeaturizer takes "
                         "file bytes (binary, spark.read.format('binaryFile')) or Spark's image struct "
                         "(spark.read.format('image'))")
