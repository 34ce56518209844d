"""The ``ImageFeaturizer``'s Params, as pyspark.ml declares them: typed and documented where declared, with getters.

Grouped as pyspark's shared params are: the backbone and its weights, how images are decoded (the same settings as
``preprocess``, one ``DecodeOptions``), how the model runs (``inference``), and what the stage outputs.
"""

from __future__ import annotations

from typing import Any

from pyspark.ml.param.shared import Param, Params, TypeConverters

from imgfeat.io.decoders import DecodeOptions

# Every Param's default (the same as the settings' defaults in conf/default.yaml).
DEFAULTS = {
    "modelName": "resnet50", "weights": "imagenet", "weightsSha256": "", "seed": 42,
    "imageSize": 0, "resizeMode": DecodeOptions.resize_mode, "resample": DecodeOptions.resample,
    "highBitDepth": DecodeOptions.high_bit_depth, "maxPixels": DecodeOptions.max_pixels,
    "jpegDraft": DecodeOptions.jpeg_draft, "formats": ",".join(DecodeOptions.formats),
    "dicomWindow": DecodeOptions.dicom_window, "volume": DecodeOptions.volume,
    "batchSize": 32, "threads": 0, "device": "auto", "precision": "fp32", "decodeThreads": 1, "prefetch": True,
    "compile": False, "jpegDecoder": "pillow",
    "outputType": "vector", "errorCol": "featurize_error", "labelTag": "",
}


def _param(name: str, doc: str, converter: Any) -> Param:
    return Param(Params._dummy(), name, doc, converter)


class HasBackbone(Params):
    """The backbone and its weights."""

    modelName = _param("modelName", "backbone name, e.g. resnet50 (keras) or efficientnet_lite0 (torch)",
                       TypeConverters.toString)
    weights = _param("weights", "imagenet | none | path to weights file", TypeConverters.toString)
    weightsSha256 = _param("weightsSha256", "required sha256 of the weights file ('' = no pin)", TypeConverters.toString)
    seed = _param("seed", "seed for weights=none", TypeConverters.toInt)

    def getModelName(self) -> str:
        return self.getOrDefault(self.modelName)

    def getWeights(self) -> str:
        return self.getOrDefault(self.weights)

    def getWeightsSha256(self) -> str:
        return self.getOrDefault(self.weightsSha256)

    def getSeed(self) -> int:
        return self.getOrDefault(self.seed)


class HasDecodeOptions(Params):
    """How image bytes become model input (``preprocess``: ``DecodeOptions``)."""

    imageSize = _param("imageSize", "input size in pixels (0 = the backbone's)", TypeConverters.toInt)
    resizeMode = _param("resizeMode", "stretch | pad | crop", TypeConverters.toString)
    resample = _param("resample", "nearest | bilinear | bicubic | lanczos | box", TypeConverters.toString)
    highBitDepth = _param("highBitDepth", "minmax | full_range", TypeConverters.toString)
    maxPixels = _param("maxPixels", "decompression-bomb guard: larger images are too_large", TypeConverters.toInt)
    jpegDraft = _param("jpegDraft", "decode large JPEGs at reduced size first", TypeConverters.toBoolean)
    formats = _param("formats", "image formats decoded, comma-separated", TypeConverters.toString)
    dicomWindow = _param("dicomWindow", "DICOM intensities: auto | none | C,W | lung | mediastinum | bone",
                         TypeConverters.toString)
    volume = _param("volume", "volumes: middle | mip (one vector per row; extract also does slices:N)",
                    TypeConverters.toString)


    def getImageSize(self) -> int:
        return self.getOrDefault(self.imageSize)

    def getResizeMode(self) -> str:
        return self.getOrDefault(self.resizeMode)

    def getResample(self) -> str:
        return self.getOrDefault(self.resample)

    def getHighBitDepth(self) -> str:
        return self.getOrDefault(self.highBitDepth)

    def getMaxPixels(self) -> int:
        return self.getOrDefault(self.maxPixels)

    def getJpegDraft(self) -> bool:
        return self.getOrDefault(self.jpegDraft)

    def getFormats(self) -> str:
        return self.getOrDefault(self.formats)

    def getDicomWindow(self) -> str:
        return self.getOrDefault(self.dicomWindow)

    def getVolume(self) -> str:
        return self.getOrDefault(self.volume)


class HasInferenceOptions(Params):
    """How the model runs in each worker (``inference``)."""

    batchSize = _param("batchSize", "images per model call", TypeConverters.toInt)
    threads = _param("threads", "TensorFlow / PyTorch threads per worker (0 = cores / task slots); saved by older "
                     "versions as tfThreads", TypeConverters.toInt)
    device = _param("device", "auto | cpu | gpu", TypeConverters.toString)
    precision = _param("precision", "fp32 | bf16 | fp16 (GPU): the arithmetic the features were made with",
                       TypeConverters.toString)
    decodeThreads = _param("decodeThreads", "decoding threads inside each Python worker", TypeConverters.toInt)
    prefetch = _param("prefetch", "decode the next batch while the model runs on this one", TypeConverters.toBoolean)
    compile = _param("compile", "torch.compile the backbone (torch engine)", TypeConverters.toBoolean)
    jpegDecoder = _param("jpegDecoder", "pillow | nvjpeg (torch engine on a GPU: JPEGs decoded there)",
                         TypeConverters.toString)


    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def getThreads(self) -> int:
        return self.getOrDefault(self.threads)

    def getDevice(self) -> str:
        return self.getOrDefault(self.device)

    def getPrecision(self) -> str:
        return self.getOrDefault(self.precision)

    def getDecodeThreads(self) -> int:
        return self.getOrDefault(self.decodeThreads)

    def getPrefetch(self) -> bool:
        return self.getOrDefault(self.prefetch)

    def getCompile(self) -> bool:
        return self.getOrDefault(self.compile)

    def getJpegDecoder(self) -> str:
        return self.getOrDefault(self.jpegDecoder)


class HasFeaturizerOutput(Params):
    """What the stage outputs besides the features."""

    outputType = _param("outputType", "vector (ML Vector) | array (array<float>)", TypeConverters.toString)
    errorCol = _param("errorCol", "column for decode errors ('' = none)", TypeConverters.toString)
    labelTag = _param("labelTag", "DICOM attribute read as each file's label value ('' = none)", TypeConverters.toString)


    def getOutputType(self) -> str:
        return self.getOrDefault(self.outputType)

    def getErrorCol(self) -> str:
        return self.getOrDefault(self.errorCol)

    def getLabelTag(self) -> str:
        return self.getOrDefault(self.labelTag)
